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
    /// A cache for `capacity` positions of `config`'s model.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Self {
        let n = config.layers * capacity * config.kv_dim();
        KvCache { k: vec![0.0; n], v: vec![0.0; n], capacity, kv_dim: config.kv_dim() }
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
