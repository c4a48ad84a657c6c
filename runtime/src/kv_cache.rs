//! The key/value cache: allocated once at a chosen capacity, appended to in place.
//!
//! Every block keeps its own fill level: in a mixture-of-depths block only the routed
//! tokens leave keys and values, so its rows are the routed tokens in position order, and
//! the position of each row is stored beside it.

use alloc::vec;
use alloc::vec::Vec;

use crate::config::ModelConfig;

/// Keys and values of every layer for up to `capacity` rows each, in f32.
///
/// Layout: `k[layer][row][kv_head * head_dim + i]` (likewise `v`), contiguous, with keys
/// stored after RoPE. Row `r` of a layer holds the `r`-th token that went through that
/// layer (for a dense layer, the token at position `r`); `positions[layer][r]` is its
/// position.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    positions: Vec<u32>,
    /// Rows written per layer.
    lens: Vec<usize>,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    /// A cache for `capacity` positions of `config`'s model, or `None` if that many bytes
    /// cannot be allocated (the size comes from the file and the caller, so it may be
    /// absurd; this reports it instead of aborting).
    pub fn new(config: &ModelConfig, capacity: usize) -> Option<Self> {
        let rows = config.layers.checked_mul(capacity)?;
        let n = rows.checked_mul(config.kv_dim())?;
        if capacity > u32::MAX as usize {
            return None;
        }
        // Probe that the allocation can succeed, then let `vec!` take zeroed memory from
        // the allocator (calloc: pages stay untouched, so unused context — and the rows a
        // routed block never writes — cost no RSS; filling a reserved Vec would write
        // every page).
        Vec::<f32>::new().try_reserve_exact(n).ok()?;
        let k = vec![0.0f32; n];
        Vec::<f32>::new().try_reserve_exact(n).ok()?;
        let v = vec![0.0f32; n];
        Vec::<u32>::new().try_reserve_exact(rows).ok()?;
        let positions = vec![0u32; rows];
        Some(KvCache { k, v, positions, lens: vec![0; config.layers], capacity, kv_dim: config.kv_dim() })
    }

    /// Bytes a cache of `capacity` positions of `config`'s model needs (saturating).
    pub fn bytes_for(config: &ModelConfig, capacity: usize) -> usize {
        let per_row = 2usize.saturating_mul(config.kv_dim()).saturating_mul(core::mem::size_of::<f32>()) + 4;
        config.layers.saturating_mul(capacity).saturating_mul(per_row)
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the cache reserves.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * core::mem::size_of::<f32>() + self.positions.len() * 4
    }

    /// Bytes of keys and values written so far (rows in use across layers): what a cache
    /// sized to its contents would need.
    pub fn bytes_in_use(&self) -> usize {
        self.lens.iter().sum::<usize>() * 2 * self.kv_dim * core::mem::size_of::<f32>()
    }

    /// Rows written in `layer`: tokens that went through it.
    #[inline]
    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    /// Whether no layer holds a row.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&n| n == 0)
    }

    /// Keys and values of `layer` (each `capacity × kv_dim`; the first [`KvCache::len`]
    /// rows are valid).
    #[inline]
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.capacity * self.kv_dim;
        (&self.k[layer * n..(layer + 1) * n], &self.v[layer * n..(layer + 1) * n])
    }

    /// Positions of `layer`'s rows, increasing.
    pub fn positions(&self, layer: usize) -> &[u32] {
        &self.positions[layer * self.capacity..layer * self.capacity + self.lens[layer]]
    }

    /// Appends the rows `k` and `v` (`tokens × kv_dim`, row-major) of tokens at
    /// `positions` (increasing, after every row already in the layer) to `layer`. The
    /// caller checked that they fit.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], positions: impl Iterator<Item = usize>) {
        let len = self.lens[layer];
        let start = (layer * self.capacity + len) * self.kv_dim;
        self.k[start..start + k.len()].copy_from_slice(k);
        self.v[start..start + v.len()].copy_from_slice(v);
        let rows = k.len() / self.kv_dim;
        let first = layer * self.capacity + len;
        for (slot, p) in self.positions[first..first + rows].iter_mut().zip(positions) {
            *slot = p as u32;
        }
        self.lens[layer] = len + rows;
    }

    /// Forgets every row whose position is `position` or later.
    pub fn truncate(&mut self, position: usize) {
        for layer in 0..self.lens.len() {
            let kept = self.positions(layer).partition_point(|&p| (p as usize) < position);
            self.lens[layer] = kept;
        }
    }
}
