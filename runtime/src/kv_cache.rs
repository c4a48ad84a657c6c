//! The key/value cache: allocated once at a chosen capacity, appended to in place.

use alloc::vec;
use alloc::vec::Vec;

use crate::config::LlamaConfig;

/// Keys and values of every layer for up to `capacity` positions, in f32.
///
/// Layout: `k[layer][position][kv_head * head_dim + i]` (likewise `v`), contiguous, with
/// keys stored after RoPE.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    /// A cache for `capacity` positions of `config`'s model, or `None` if that many bytes
    /// cannot be allocated (the size comes from the file and the caller, so it may be
    /// absurd; this reports it instead of aborting).
    pub fn new(config: &LlamaConfig, capacity: usize) -> Option<Self> {
        let n = config.layers.checked_mul(capacity)?.checked_mul(config.kv_dim())?;
        let zeroed = || {
            // Probe that the allocation can succeed, then let `vec!` take zeroed memory from
            // the allocator (calloc: pages stay untouched, so unused context costs no RSS;
            // filling a reserved Vec would write every page).
            Vec::<f32>::new().try_reserve_exact(n).ok()?;
            Some(vec![0.0f32; n])
        };
        Some(KvCache { k: zeroed()?, v: zeroed()?, capacity, kv_dim: config.kv_dim() })
    }

    /// Bytes a cache of `capacity` positions of `config`'s model needs (saturating).
    pub fn bytes_for(config: &LlamaConfig, capacity: usize) -> usize {
        2usize
            .saturating_mul(config.layers)
            .saturating_mul(capacity)
            .saturating_mul(config.kv_dim())
            .saturating_mul(core::mem::size_of::<f32>())
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the cache occupies.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * core::mem::size_of::<f32>()
    }

    /// Keys and values of `layer` (each `capacity × kv_dim`).
    #[inline]
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.capacity * self.kv_dim;
        (&self.k[layer * n..(layer + 1) * n], &self.v[layer * n..(layer + 1) * n])
    }

    /// Stores `k` and `v` (`tokens × kv_dim`, row-major) of `layer` at positions
    /// `first..first + tokens`. The caller checked that they fit.
    pub fn write(&mut self, layer: usize, first: usize, k: &[f32], v: &[f32]) {
        let start = (layer * self.capacity + first) * self.kv_dim;
        self.k[start..start + k.len()].copy_from_slice(k);
        self.v[start..start + v.len()].copy_from_slice(v);
    }
}
