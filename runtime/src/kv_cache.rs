//! The key/value cache: allocated once at a chosen capacity, appended to in place.
//!
//! Every block keeps its own fill level: in a mixture-of-depths block only the routed
//! tokens leave keys and values, so its rows are the routed tokens in position order, and
//! the position of each row is stored beside it.

use alloc::vec;
use alloc::vec::Vec;

use crate::config::ModelConfig;

/// How the cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// 4 bytes per value, exactly as computed. The library's default (what the tools and
    /// tests compare against).
    #[default]
    F32,
    /// IEEE half precision, 2 bytes per value (round to nearest even; llama.cpp's default
    /// cache type). Attention widens it exactly on load. `petrel run|chat`'s default:
    /// held-out perplexity within 0.07% of f32 on SmolLM2 and Qwen2.5, decode at depth 2048
    /// 1.02–1.21× f32's speed, half the bytes.
    F16,
    /// 8-bit codes with one f32 scale per token and key/value head (`max |x| / 127`,
    /// round to nearest): about 1 byte per value. Attention multiplies each key's score
    /// and each value's weight by its scale. Where the head size is a power of two, keys
    /// and queries are rotated per head by an orthonormal Hadamard before the keys are
    /// stored ([`KvType::rotates_heads`]), so the cache holds rotated keys.
    Q8,
    /// 4-bit codes in `-7..=7` (stored `+ 8`, two per byte, the even value in the low
    /// nibble) with one f16 scale per token and key/value head (`max |x| / 7`, round to
    /// nearest): about half a byte per value. As QuaRot does for its 4-bit cache, keys and
    /// queries are rotated per head as for [`KvType::Q8`], and so are values, the attention
    /// output being rotated back ([`KvType::rotates_values`]).
    Q4,
}

impl KvType {
    /// Every type, in the order `--kv-type` lists them.
    pub const ALL: [KvType; 4] = [KvType::F32, KvType::F16, KvType::Q8, KvType::Q4];

    /// Bytes of one row of `kv_dim` keys (or values) in heads of `head_dim`, scales
    /// included.
    pub const fn row_bytes(self, kv_dim: usize, head_dim: usize) -> usize {
        match self {
            KvType::F32 => 4 * kv_dim,
            KvType::F16 => 2 * kv_dim,
            KvType::Q8 => kv_dim + 4 * (kv_dim / head_dim),
            KvType::Q4 => kv_dim / 2 + 2 * (kv_dim / head_dim),
        }
    }

    /// Whether the forward pass rotates queries and keys per head (by `H / √head_dim`,
    /// for power-of-two heads) before the keys enter a cache of this type.
    pub const fn rotates_heads(self) -> bool {
        matches!(self, KvType::Q8 | KvType::Q4)
    }

    /// Whether values are rotated per head too (with [`KvType::rotates_heads`]) and each
    /// head of the attention output rotated back by the same (self-inverse) Hadamard.
    pub const fn rotates_values(self) -> bool {
        matches!(self, KvType::Q4)
    }

    /// The name `--kv-type` takes (`f32`, `f16`, `q8`, `q4`).
    pub const fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8 => "q8",
            KvType::Q4 => "q4",
        }
    }

    /// The type named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Allocations of at least this many bytes are probed before the zeroed allocation.
/// Smaller ones are not: glibc raises its mmap threshold (up to 32 MiB) when a block is
/// freed, so a probe of a few MiB would send the real allocation to the heap, where calloc
/// writes every page; above 32 MiB it always maps fresh, untouched pages.
const PROBE_BYTES: usize = 64 << 20;

/// Whether `n` values of `T` can be allocated (only checked from [`PROBE_BYTES`] on).
fn probe<T>(n: usize) -> Option<()> {
    if n.saturating_mul(core::mem::size_of::<T>()) >= PROBE_BYTES {
        Vec::<T>::new().try_reserve_exact(n).ok()?;
    }
    Some(())
}

/// The stored keys or values of all layers.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<u16>),
    /// Codes, and one scale per `head_dim` consecutive codes (a token's head).
    Q8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
        head_dim: usize,
    },
    /// Two codes per byte, and one f16 scale (its bits) per `head_dim` values.
    Q4 {
        codes: Vec<u8>,
        scales: Vec<u16>,
        head_dim: usize,
    },
}

impl Store {
    /// `n` zeroed values of `ty` in heads of `head_dim`, or `None` if they cannot be
    /// allocated.
    fn zeroed(ty: KvType, n: usize, head_dim: usize) -> Option<Self> {
        // `vec!` takes zeroed memory from the allocator (calloc: pages stay untouched, so
        // unused context — and the rows a routed block never writes — cost no RSS; filling
        // a reserved Vec would write every page). Large sizes are first probed, so that an
        // absurd size from a file or a caller is reported instead of aborting.
        let heads = n / head_dim.max(1);
        Some(match ty {
            KvType::F32 => {
                probe::<f32>(n)?;
                Store::F32(vec![0.0; n])
            }
            KvType::F16 => {
                probe::<u16>(n)?;
                Store::F16(vec![0; n])
            }
            KvType::Q8 => {
                probe::<i8>(n)?;
                probe::<f32>(heads)?;
                Store::Q8 { codes: vec![0; n], scales: vec![0.0; heads], head_dim }
            }
            KvType::Q4 => {
                probe::<u8>(n / 2)?;
                probe::<u16>(heads)?;
                Store::Q4 { codes: vec![0; n / 2], scales: vec![0; heads], head_dim }
            }
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
            Store::Q8 { codes, scales, .. } => codes.len() + scales.len() * 4,
            Store::Q4 { codes, scales, .. } => codes.len() + scales.len() * 2,
        }
    }

    fn rows(&self, range: core::ops::Range<usize>) -> KvRows<'_> {
        match self {
            Store::F32(v) => KvRows::F32(&v[range]),
            Store::F16(v) => KvRows::F16(&v[range]),
            Store::Q8 { codes, scales, head_dim } => KvRows::Q8 {
                scales: &scales[range.start / head_dim..range.end / head_dim],
                codes: &codes[range],
                head_dim: *head_dim,
            },
            Store::Q4 { codes, scales, head_dim } => KvRows::Q4 {
                scales: &scales[range.start / head_dim..range.end / head_dim],
                codes: &codes[range.start / 2..range.end / 2],
                head_dim: *head_dim,
            },
        }
    }

    /// Stores `values` from element `at` (a multiple of the head size) on.
    fn write(&mut self, at: usize, values: &[f32]) {
        match self {
            Store::F32(v) => v[at..at + values.len()].copy_from_slice(values),
            Store::F16(v) => {
                for (h, &x) in v[at..at + values.len()].iter_mut().zip(values) {
                    *h = half::f16::from_f32(x).to_bits();
                }
            }
            Store::Q8 { codes, scales, head_dim } => {
                let head_dim = *head_dim;
                let heads = codes[at..at + values.len()].chunks_exact_mut(head_dim).zip(values.chunks_exact(head_dim));
                for (h, (out, x)) in heads.enumerate() {
                    let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for (c, &v) in out.iter_mut().zip(x) {
                        *c = libm::roundf(v * inverse).clamp(-127.0, 127.0) as i8;
                    }
                    scales[at / head_dim + h] = scale;
                }
            }
            Store::Q4 { codes, scales, head_dim } => {
                let head_dim = *head_dim;
                let bytes = &mut codes[at / 2..(at + values.len()) / 2];
                for (h, (out, x)) in bytes.chunks_exact_mut(head_dim / 2).zip(values.chunks_exact(head_dim)).enumerate()
                {
                    let scale = q4_scale(x);
                    let inverse = if scale.to_f32() > 0.0 { 1.0 / scale.to_f32() } else { 0.0 };
                    let code = |v: f32| (libm::roundf(v * inverse).clamp(-7.0, 7.0) as i8 + 8) as u8;
                    for (byte, pair) in out.iter_mut().zip(x.chunks_exact(2)) {
                        *byte = code(pair[0]) | (code(pair[1]) << 4);
                    }
                    scales[at / head_dim + h] = scale.to_bits();
                }
            }
        }
    }
}

/// Fractions of `max |x| / 7` that [`q4_scale`] tries: clipping the largest values of a
/// head to a smaller step costs less than the coarser step costs every other value.
impl Store {
    /// Appends elements `range` (and their heads' scales) to `out`, little-endian.
    fn save(&self, range: core::ops::Range<usize>, out: &mut Vec<u8>) {
        match self {
            Store::F32(v) => v[range].iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Store::F16(v) => v[range].iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Store::Q8 { codes, scales, head_dim } => {
                out.extend(codes[range.clone()].iter().map(|&c| c as u8));
                let heads = range.start / head_dim..range.end / head_dim;
                scales[heads].iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
            Store::Q4 { codes, scales, head_dim } => {
                out.extend_from_slice(&codes[range.start / 2..range.end / 2]);
                let heads = range.start / head_dim..range.end / head_dim;
                scales[heads].iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
        }
    }

    /// Reads what [`Store::save`] wrote for elements `range` from the front of `bytes`,
    /// advancing it.
    fn load(&mut self, range: core::ops::Range<usize>, bytes: &mut &[u8]) -> Result<(), StateError> {
        let n = range.len();
        match self {
            Store::F32(v) => {
                for (x, b) in v[range].iter_mut().zip(take(bytes, 4 * n)?.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Store::F16(v) => {
                for (x, b) in v[range].iter_mut().zip(take(bytes, 2 * n)?.chunks_exact(2)) {
                    *x = u16::from_le_bytes([b[0], b[1]]);
                }
            }
            Store::Q8 { codes, scales, head_dim } => {
                let heads = range.start / *head_dim..range.end / *head_dim;
                for (c, &b) in codes[range].iter_mut().zip(take(bytes, n)?) {
                    *c = b as i8;
                }
                let raw = take(bytes, 4 * heads.len())?;
                for (x, b) in scales[heads].iter_mut().zip(raw.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Store::Q4 { codes, scales, head_dim } => {
                let heads = range.start / *head_dim..range.end / *head_dim;
                codes[range.start / 2..range.end / 2].copy_from_slice(take(bytes, n / 2)?);
                let raw = take(bytes, 2 * heads.len())?;
                for (x, b) in scales[heads].iter_mut().zip(raw.chunks_exact(2)) {
                    *x = u16::from_le_bytes([b[0], b[1]]);
                }
            }
        }
        Ok(())
    }
}

/// Splits `n` bytes off the front of `bytes`.
fn take<'b>(bytes: &mut &'b [u8], n: usize) -> Result<&'b [u8], StateError> {
    if bytes.len() < n {
        return Err(StateError::Truncated);
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

/// Reads a little-endian `u32` off the front of `bytes`.
fn take_u32(bytes: &mut &[u8]) -> Result<u32, StateError> {
    let b = take(bytes, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Why [`KvCache::load`] refused a saved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// The bytes end before the state does.
    Truncated,
    /// The state was saved from a cache of another shape or type: which property differs.
    Mismatch(&'static str),
    /// A layer holds more rows than this cache's capacity, or positions out of order.
    Corrupt(&'static str),
}

impl core::fmt::Display for StateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StateError::Truncated => write!(f, "the saved cache state is truncated"),
            StateError::Mismatch(what) => write!(f, "the saved cache state has another {what} than this session"),
            StateError::Corrupt(what) => write!(f, "the saved cache state is corrupt: {what}"),
        }
    }
}

const Q4_CLIPS: [f32; 6] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75];

/// The f16 scale of one head of a 4-bit cache: of `max |x| / 7` times each of
/// [`Q4_CLIPS`], the one whose codes reproduce `x` with the least squared error.
fn q4_scale(x: &[f32]) -> half::f16 {
    let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let mut best = (f32::INFINITY, half::f16::ZERO);
    for clip in Q4_CLIPS {
        let scale = half::f16::from_f32(amax * clip / 7.0);
        let step = scale.to_f32();
        if step <= 0.0 {
            return half::f16::ZERO;
        }
        let error: f32 = x
            .iter()
            .map(|&v| {
                let e = libm::roundf(v / step).clamp(-7.0, 7.0) * step - v;
                e * e
            })
            .sum();
        if error < best.0 {
            best = (error, scale);
        }
    }
    best.1
}

/// Stored keys or values of one layer, row-major (`kv_heads × head_dim` per row).
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values as their bits.
    F16(&'a [u16]),
    /// 8-bit codes; value `i` is `codes[i] · scales[i / head_dim]`.
    Q8 {
        /// The codes.
        codes: &'a [i8],
        /// One scale per `head_dim` codes.
        scales: &'a [f32],
        /// Values per head.
        head_dim: usize,
    },
    /// 4-bit codes; value `i` is `(nibble i − 8) · scales[i / head_dim]` (nibble `i` the
    /// low half of byte `i / 2` for even `i`, the high half for odd).
    Q4 {
        /// The codes, two per byte.
        codes: &'a [u8],
        /// One f16 scale (its bits) per `head_dim` values.
        scales: &'a [u16],
        /// Values per head (even).
        head_dim: usize,
    },
}

/// The signed 4-bit code `i` of `codes` (see [`KvRows::Q4`]).
#[inline]
fn q4_code(codes: &[u8], i: usize) -> i8 {
    ((codes[i / 2] >> (4 * (i % 2))) & 0xF) as i8 - 8
}

impl KvRows<'_> {
    /// Values `range`, widened to f32, into `out` (`range.len()` long).
    pub fn read(&self, range: core::ops::Range<usize>, out: &mut [f32]) {
        match self {
            KvRows::F32(v) => out.copy_from_slice(&v[range]),
            KvRows::F16(v) => {
                for (o, &h) in out.iter_mut().zip(&v[range]) {
                    *o = petrel_quant::blocks::f16_to_f32(h);
                }
            }
            KvRows::Q8 { codes, scales, head_dim } => {
                for (i, o) in range.clone().zip(out.iter_mut()) {
                    *o = codes[i] as f32 * scales[i / head_dim];
                }
            }
            KvRows::Q4 { codes, scales, head_dim } => {
                for (i, o) in range.clone().zip(out.iter_mut()) {
                    *o = q4_code(codes, i) as f32 * petrel_quant::blocks::f16_to_f32(scales[i / head_dim]);
                }
            }
        }
    }
}

/// Keys and values of every layer for up to `capacity` rows each, stored as [`KvType`]
/// says.
///
/// Layout: `k[layer][row][kv_head * head_dim + i]` (likewise `v`), contiguous, with keys
/// stored after RoPE. Row `r` of a layer holds the `r`-th token that went through that
/// layer (for a dense layer, the token at position `r`); `positions[layer][r]` is its
/// position.
#[derive(Debug)]
pub struct KvCache {
    k: Store,
    v: Store,
    kv_type: KvType,
    positions: Vec<u32>,
    /// Rows written per layer.
    lens: Vec<usize>,
    capacity: usize,
    kv_dim: usize,
    head_dim: usize,
}

impl KvCache {
    /// A cache for `capacity` positions of `config`'s model storing keys and values as
    /// `kv_type`, or `None` if that many bytes cannot be allocated (the size comes from the
    /// file and the caller, so it may be absurd; this reports it instead of aborting).
    pub fn new(config: &ModelConfig, capacity: usize, kv_type: KvType) -> Option<Self> {
        Self::sized(config.layers, config.kv_dim(), config.head_dim, capacity, kv_type)
    }

    /// A cache of `layers` layers of `capacity` rows of `kv_dim` keys and values, in heads
    /// of `head_dim`.
    fn sized(layers: usize, kv_dim: usize, head_dim: usize, capacity: usize, kv_type: KvType) -> Option<Self> {
        let rows = layers.checked_mul(capacity)?;
        let n = rows.checked_mul(kv_dim)?;
        if capacity > u32::MAX as usize {
            return None;
        }
        let k = Store::zeroed(kv_type, n, head_dim)?;
        let v = Store::zeroed(kv_type, n, head_dim)?;
        Vec::<u32>::new().try_reserve_exact(rows).ok()?;
        let positions = vec![0u32; rows];
        Some(KvCache { k, v, kv_type, positions, lens: vec![0; layers], capacity, kv_dim, head_dim })
    }

    /// Bytes a cache of `capacity` positions of `config`'s model needs in `kv_type`
    /// (saturating).
    pub fn bytes_for(config: &ModelConfig, capacity: usize, kv_type: KvType) -> usize {
        let row = Self::row_bytes(config.kv_dim(), config.head_dim.max(1), kv_type);
        config.layers.saturating_mul(capacity).saturating_mul(row)
    }

    /// Bytes per cached token and layer: keys, values and the position.
    fn row_bytes(kv_dim: usize, head_dim: usize, kv_type: KvType) -> usize {
        2 * kv_type.row_bytes(kv_dim, head_dim) + 4
    }

    /// How keys and values are stored.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Bytes one token takes across all layers (keys, values, positions).
    pub fn bytes_per_token(&self) -> usize {
        self.lens.len() * Self::row_bytes(self.kv_dim, self.head_dim, self.kv_type)
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the cache reserves.
    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes() + self.positions.len() * 4
    }

    /// Bytes of keys and values written so far (rows in use across layers): what a cache
    /// sized to its contents would need.
    pub fn bytes_in_use(&self) -> usize {
        self.lens.iter().sum::<usize>() * 2 * self.kv_type.row_bytes(self.kv_dim, self.head_dim)
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
    pub fn layer(&self, layer: usize) -> (KvRows<'_>, KvRows<'_>) {
        let n = self.capacity * self.kv_dim;
        (self.k.rows(layer * n..(layer + 1) * n), self.v.rows(layer * n..(layer + 1) * n))
    }

    /// Positions of `layer`'s rows, increasing.
    pub fn positions(&self, layer: usize) -> &[u32] {
        &self.positions[layer * self.capacity..layer * self.capacity + self.lens[layer]]
    }

    /// Appends the rows `k` and `v` (`tokens × kv_dim`, row-major) of tokens at
    /// `positions` (increasing, after every row already in the layer) to `layer`,
    /// converted to the cache's type. The caller checked that they fit.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], positions: impl Iterator<Item = usize>) {
        let len = self.lens[layer];
        let start = (layer * self.capacity + len) * self.kv_dim;
        self.k.write(start, k);
        self.v.write(start, v);
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

impl KvCache {
    /// Appends the cache's contents to `out` (little-endian): the number of layers, the
    /// key/value width, the head size and the type's name length and bytes, then per layer
    /// its row count, the rows' positions (`u32` each) and the keys' and values' rows in
    /// the cache's own encoding (scales after the codes). Only filled rows are written.
    pub fn save(&self, out: &mut Vec<u8>) {
        for x in [self.lens.len(), self.kv_dim, self.head_dim] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
        out.push(self.kv_type.name().len() as u8);
        out.extend_from_slice(self.kv_type.name().as_bytes());
        for layer in 0..self.lens.len() {
            let len = self.lens[layer];
            out.extend_from_slice(&(len as u32).to_le_bytes());
            self.positions(layer).iter().for_each(|p| out.extend_from_slice(&p.to_le_bytes()));
            let start = layer * self.capacity * self.kv_dim;
            self.k.save(start..start + len * self.kv_dim, out);
            self.v.save(start..start + len * self.kv_dim, out);
        }
    }

    /// Replaces the contents with a state [`KvCache::save`] wrote, from the front of
    /// `bytes` (advanced past it). The cache must have the same layers, widths and type,
    /// and room for every layer's rows; on an error the cache is left empty.
    pub fn load(&mut self, bytes: &mut &[u8]) -> Result<(), StateError> {
        let result = self.load_unchecked(bytes);
        if result.is_err() {
            self.truncate(0);
        }
        result
    }

    fn load_unchecked(&mut self, bytes: &mut &[u8]) -> Result<(), StateError> {
        if take_u32(bytes)? as usize != self.lens.len() {
            return Err(StateError::Mismatch("number of layers"));
        }
        if take_u32(bytes)? as usize != self.kv_dim || take_u32(bytes)? as usize != self.head_dim {
            return Err(StateError::Mismatch("key/value shape"));
        }
        let name_len = take(bytes, 1)?[0] as usize;
        if take(bytes, name_len)? != self.kv_type.name().as_bytes() {
            return Err(StateError::Mismatch("KV-cache type"));
        }
        for layer in 0..self.lens.len() {
            let len = take_u32(bytes)? as usize;
            if len > self.capacity {
                return Err(StateError::Corrupt("a layer holds more rows than the context"));
            }
            let first = layer * self.capacity;
            let mut previous = None;
            for slot in self.positions[first..first + len].iter_mut() {
                let p = take_u32(bytes)?;
                if previous.is_some_and(|q| p <= q) {
                    return Err(StateError::Corrupt("positions out of order"));
                }
                previous = Some(p);
                *slot = p;
            }
            let start = first * self.kv_dim;
            self.k.load(start..start + len * self.kv_dim, bytes)?;
            self.v.load(start..start + len * self.kv_dim, bytes)?;
            self.lens[layer] = len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rows_round_to_nearest_and_read_back_widened() {
        let (layers, kv, head_dim) = (2, 24, 8);
        for kv_type in KvType::ALL {
            let mut cache = KvCache::sized(layers, kv, head_dim, 4, kv_type).expect("fits");
            assert_eq!(cache.kv_type(), kv_type);
            let row = match kv_type {
                KvType::F32 => 4 * kv,
                KvType::F16 => 2 * kv,
                KvType::Q8 => kv + 4 * 3,
                KvType::Q4 => kv / 2 + 2 * 3,
            };
            assert_eq!(cache.bytes_per_token(), layers * (2 * row + 4));
            let k: Vec<f32> = (0..2 * kv).map(|i| (i as f32 * 0.377).sin() * 3.0 + 1e-3).collect();
            let v: Vec<f32> = k.iter().map(|x| -x * 7.0).collect();
            cache.append(1, &k, &v, [5usize, 9].into_iter());
            assert_eq!((cache.len(0), cache.len(1)), (0, 2));
            assert_eq!(cache.positions(1), &[5, 9]);
            let (keys, values) = cache.layer(1);
            let (mut rk, mut rv) = (vec![0f32; 2 * kv], vec![0f32; 2 * kv]);
            keys.read(0..2 * kv, &mut rk);
            values.read(0..2 * kv, &mut rv);
            match kv_type {
                KvType::F32 | KvType::F16 => {
                    let round = |x: f32| if kv_type == KvType::F16 { half::f16::from_f32(x).to_f32() } else { x };
                    assert!(rk.iter().zip(&k).all(|(&a, &b)| a.to_bits() == round(b).to_bits()));
                    assert!(rv.iter().zip(&v).all(|(&a, &b)| a.to_bits() == round(b).to_bits()));
                }
                KvType::Q8 | KvType::Q4 => {
                    // Within half a step of each head's scale (q4: the f16-rounded scale,
                    // whose rounding can cost the largest value up to 7 × 2⁻¹¹ relative).
                    let levels = if kv_type == KvType::Q8 { 127.0 } else { 7.0 };
                    for (got, want) in [(&rk, &k), (&rv, &v)] {
                        for (g, w) in got.chunks_exact(head_dim).zip(want.chunks_exact(head_dim)) {
                            let amax = w.iter().fold(0f32, |m, &x| m.max(x.abs()));
                            let step = amax / levels;
                            let slack = if kv_type == KvType::Q4 { amax * 7.0 / 2048.0 } else { 0.0 };
                            assert!(g.iter().zip(w).all(|(a, b)| (a - b).abs() <= 0.5 * step * 1.0001 + slack));
                        }
                    }
                }
            }
            cache.truncate(6);
            assert_eq!(cache.len(1), 1);
        }
        assert_eq!(KvType::parse("f16"), Some(KvType::F16));
        assert_eq!(KvType::parse("q8"), Some(KvType::Q8));
        assert_eq!(KvType::parse("q4"), Some(KvType::Q4));
        assert_eq!(KvType::parse("q3"), None);
    }

    #[test]
    fn saved_state_loads_back_exactly_and_bad_states_are_refused() {
        let (layers, kv, head_dim) = (3, 16, 8);
        for kv_type in KvType::ALL {
            let mut cache = KvCache::sized(layers, kv, head_dim, 6, kv_type).expect("fits");
            // Uneven fill levels, as a mixture-of-depths model leaves them.
            for (layer, positions) in [(0usize, &[0usize, 1, 2][..]), (2, &[1, 2])] {
                let rows = positions.len();
                let k: Vec<f32> = (0..rows * kv).map(|i| (i as f32 * 0.71 + layer as f32).sin()).collect();
                let v: Vec<f32> = k.iter().map(|x| x * -2.5).collect();
                cache.append(layer, &k, &v, positions.iter().copied());
            }
            let mut saved = Vec::new();
            cache.save(&mut saved);
            let mut restored = KvCache::sized(layers, kv, head_dim, 4, kv_type).expect("fits");
            let mut bytes = &saved[..];
            restored.load(&mut bytes).expect("loads");
            assert!(bytes.is_empty());
            for layer in 0..layers {
                assert_eq!(restored.positions(layer), cache.positions(layer));
                let n = cache.len(layer) * kv;
                for (a, b) in
                    [(cache.layer(layer).0, restored.layer(layer).0), (cache.layer(layer).1, restored.layer(layer).1)]
                {
                    let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
                    a.read(0..n, &mut x);
                    b.read(0..n, &mut y);
                    assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{kv_type:?} layer {layer}");
                }
            }
            // Every truncation is refused and leaves the cache empty.
            for cut in [0, 1, 13, saved.len() / 2, saved.len() - 1] {
                let mut bytes = &saved[..cut];
                assert_eq!(restored.load(&mut bytes), Err(StateError::Truncated), "cut at {cut}");
                assert!(restored.is_empty());
            }
            // Another type, another width, too small a cache.
            let other = if kv_type == KvType::F32 { KvType::F16 } else { KvType::F32 };
            let mut wrong = KvCache::sized(layers, kv, head_dim, 6, other).expect("fits");
            assert_eq!(wrong.load(&mut &saved[..]), Err(StateError::Mismatch("KV-cache type")));
            let mut wrong = KvCache::sized(layers, 2 * kv, head_dim, 6, kv_type).expect("fits");
            assert_eq!(wrong.load(&mut &saved[..]), Err(StateError::Mismatch("key/value shape")));
            let mut small = KvCache::sized(layers, kv, head_dim, 2, kv_type).expect("fits");
            assert!(matches!(small.load(&mut &saved[..]), Err(StateError::Corrupt(_))));
        }
    }
}
