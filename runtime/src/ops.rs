//! The element-wise and per-token operations of the forward pass, in f32.

use core::ops::Range;

use crate::kv_cache::KvRows;
use petrel_quant::float::{exp_poly, KEY_TILE};
use petrel_quant::FloatKernels;

/// `out = x / rms(x) * gain` with `rms(x) = sqrt(mean(x²) + eps)`, for one token.
/// The sum of squares is accumulated in f64, as ggml does.
pub fn rms_norm(out: &mut [f32], x: &[f32], gain: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / libm::sqrtf(mean + eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(gain) {
        *o = v * scale * g;
    }
}

/// [`rms_norm`] for each row of `x` (rows of `gain.len()` values, row-major).
pub fn rms_norm_rows(out: &mut [f32], x: &[f32], gain: &[f32], eps: f32) {
    let dim = gain.len();
    for (o, row) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        rms_norm(o, row, gain, eps);
    }
}

/// Fills `table` (`rope_dim / 2` pairs of `(cos, sin)`) for `position`:
/// pair `i` rotates by `position · base^(-2i / rope_dim)`.
pub fn rope_table(table: &mut [f32], position: usize, rope_dim: usize, base: f32) {
    for (i, pair) in table.chunks_exact_mut(2).enumerate() {
        let freq = libm::pow(base as f64, -2.0 * i as f64 / rope_dim as f64);
        let angle = position as f64 * freq;
        pair[0] = libm::cos(angle) as f32;
        pair[1] = libm::sin(angle) as f32;
    }
}

/// Rotates each head of `x` (`heads × head_dim`) with `table`: the first `rope_dim`
/// values of a head form adjacent pairs `(x[2i], x[2i+1])` (ggml's "normal" RoPE, which
/// the row permutation in GGUF Llama files is made for).
pub fn apply_rope(x: &mut [f32], head_dim: usize, table: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, cs) in head.chunks_exact_mut(2).zip(table.chunks_exact(2)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cs[0] - b * cs[1];
            pair[1] = a * cs[1] + b * cs[0];
        }
    }
}

/// [`apply_rope`] for NeoX-style RoPE: the first `rope_dim = 2 · table.len() / 2` values
/// of a head form the pairs `(x[i], x[i + rope_dim/2])` (ggml's `GGML_ROPE_TYPE_NEOX`, used
/// by Qwen2 and Gemma).
pub fn apply_rope_neox(x: &mut [f32], head_dim: usize, table: &[f32]) {
    let half = table.len() / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (first, second) = head[..2 * half].split_at_mut(half);
        for ((a, b), cs) in first.iter_mut().zip(second.iter_mut()).zip(table.chunks_exact(2)) {
            let (x0, x1) = (*a, *b);
            *a = x0 * cs[0] - x1 * cs[1];
            *b = x0 * cs[1] + x1 * cs[0];
        }
    }
}

/// `gate[i] = gelu(gate[i]) * up[i]`, GELU in its tanh approximation
/// `0.5 g (1 + tanh(√(2/π) (g + 0.044715 g³)))` (ggml's `ggml_gelu`).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + libm::tanhf(SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x))) * u;
    }
}

/// `x ← c · tanh(x / c)` element-wise (final logit soft-capping).
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * libm::tanhf(*v / cap);
    }
}

/// Undoes [`apply_rope`] with the same `table`: rotates each pair by the negative angle
/// (keys cached after RoPE back to the position-free basis in which KV prediction maps
/// them).
pub fn unapply_rope(x: &mut [f32], head_dim: usize, table: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, cs) in head.chunks_exact_mut(2).zip(table.chunks_exact(2)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cs[0] + b * cs[1];
            pair[1] = b * cs[0] - a * cs[1];
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` with `silu(x) = x / (1 + e^-x)`.
pub fn swiglu(fk: &FloatKernels, gate: &mut [f32], up: &[f32]) {
    fk.silu_mul(gate, up);
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Queries processed together by [`attend_batch`] (each key tile is scored by all of them
/// while it is in cache).
const MAX_QUERIES: usize = 64;

/// The attention geometry of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Factor on the query–key dot products (`1/√head_dim` for most models).
    pub scale: f32,
    /// Sliding window in cache rows: the query of row `r` sees rows `r - window + 1 ..= r`;
    /// `None` for all rows up to its own. (Dense layers have one row per position, so this
    /// is the window in tokens.)
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Global attention with scale `1/√head_dim`.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttentionShape { heads, kv_heads, head_dim, scale: 1.0 / libm::sqrtf(head_dim as f32), window: None }
    }

    /// The first cache row the query of row `last` sees.
    #[inline]
    pub fn first_row(&self, last: usize) -> usize {
        match self.window {
            Some(w) => (last + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Causal attention for the query heads `items` of a batch, item `i` being head
/// `i % heads` of token `i / heads` at position `position + i / heads`, which sees the
/// cached positions `0..=position + i / heads`.
///
/// `q` holds the batch's queries (`tokens × heads × head_dim`), `keys`/`values` the layer's
/// cache rows (`kv_heads × head_dim` per position), `out` receives the items' results
/// (`items.len() × head_dim`). The queries of one key/value head are processed together a
/// tile of [`KEY_TILE`] keys at a time: each query scores the tile (eight keys per SIMD
/// reduction, see [`FloatKernels::tile_scores`]) and updates its online softmax and its
/// weighted sum of values (kept in registers across the tile). Tiles start at multiples
/// of `KEY_TILE` and every kernel fixes its order of operations, so a query's result
/// depends on nothing but its own data: not on the batch, the split of `items`, or the
/// instruction set.
#[allow(clippy::too_many_arguments)]
pub fn attend_batch(
    fk: &FloatKernels,
    out: &mut [f32],
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    shape: AttentionShape,
    position: usize,
    items: Range<usize>,
) {
    let AttentionShape { heads, kv_heads, .. } = shape;
    let group = heads / kv_heads;
    if items.is_empty() {
        return;
    }
    let per_pass = (MAX_QUERIES / group).max(1);
    let (first, end) = (items.start / heads, items.end.div_ceil(heads));
    let mut batch = [Query { item: 0, token: 0 }; MAX_QUERIES];
    for block in (first..end).step_by(per_pass) {
        for kv in 0..kv_heads {
            let mut m = 0;
            for t in block..(block + per_pass).min(end) {
                for h in kv * group..(kv + 1) * group {
                    let item = t * heads + h;
                    if !items.contains(&item) {
                        continue;
                    }
                    batch[m] = Query { item, token: t };
                    m += 1;
                    if m == MAX_QUERIES {
                        attend_queries(fk, out, q, keys, values, shape, kv, position, items.start, &batch[..m]);
                        m = 0;
                    }
                }
            }
            if m > 0 {
                attend_queries(fk, out, q, keys, values, shape, kv, position, items.start, &batch[..m]);
            }
        }
    }
}

/// The largest head a 4-bit cache serves (Gemma-3's 256).
pub const MAX_Q4_HEAD: usize = 256;

/// Widens `n` rows of one head of a 4-bit cache — `head_dim` codes from element `base`,
/// rows `stride` elements apart — into `out` as signed bytes, rows back to back, and
/// returns them (`n × head_dim`), for the i8 tile kernels.
#[inline]
fn unpack_q4_tile<'o>(
    codes: &[u8],
    base: usize,
    stride: usize,
    head_dim: usize,
    n: usize,
    out: &'o mut [i8; KEY_TILE * MAX_Q4_HEAD],
) -> &'o [i8] {
    for (j, row) in out.chunks_exact_mut(head_dim).take(n).enumerate() {
        let at = (base + j * stride) / 2;
        for (pair, &byte) in row.chunks_exact_mut(2).zip(&codes[at..at + head_dim / 2]) {
            pair[0] = (byte & 0xF) as i8 - 8;
            pair[1] = (byte >> 4) as i8 - 8;
        }
    }
    &out[..n * head_dim]
}

/// One query of a pass of [`attend_batch`].
#[derive(Clone, Copy)]
struct Query {
    item: usize,
    token: usize,
}

/// [`attend_batch`] for queries of key/value head `kv`, tokens in increasing order.
#[allow(clippy::too_many_arguments)]
fn attend_queries(
    fk: &FloatKernels,
    out: &mut [f32],
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    shape: AttentionShape,
    kv: usize,
    position: usize,
    first_item: usize,
    queries: &[Query],
) {
    let head_dim = shape.head_dim;
    let kv_dim = shape.kv_heads * head_dim;
    let offset = kv * head_dim;
    let scale = shape.scale;
    let row = |item: usize| (item - first_item) * head_dim..(item - first_item + 1) * head_dim;
    let last_of = |query: &Query| position + query.token;
    let max_last = queries.iter().map(last_of).max().unwrap_or(0);
    let min_first = queries.iter().map(|q| shape.first_row(last_of(q))).min().unwrap_or(0);
    let mut max = [f32::NEG_INFINITY; MAX_QUERIES];
    let mut denom = [0f32; MAX_QUERIES];
    let mut tile = [0f32; KEY_TILE];
    for query in queries {
        out[row(query.item)].fill(0.0);
    }
    for tile_start in (min_first / KEY_TILE * KEY_TILE..=max_last).step_by(KEY_TILE) {
        for (i, query) in queries.iter().enumerate() {
            let last = last_of(query);
            // The rows of this tile that the query sees (a sliding window cuts its start).
            let start = tile_start.max(shape.first_row(last));
            if start > last || start >= tile_start + KEY_TILE {
                continue;
            }
            let base = start * kv_dim + offset;
            let n = (last + 1 - start).min(tile_start + KEY_TILE - start);
            let qb = query.token * shape.heads * head_dim + (query.item % shape.heads) * head_dim;
            let query_row = &q[qb..qb + head_dim];
            match keys {
                KvRows::F32(k) => fk.tile_scores(query_row, &k[base..], kv_dim, n, &mut tile),
                KvRows::F16(k) => fk.tile_scores_f16(query_row, &k[base..], kv_dim, n, &mut tile),
                KvRows::Q8 { codes, scales, .. } => {
                    fk.tile_scores_i8(query_row, &codes[base..], kv_dim, n, &mut tile);
                    let heads = shape.kv_heads;
                    for (j, s) in tile[..n].iter_mut().enumerate() {
                        *s *= scales[(start + j) * heads + kv];
                    }
                }
                KvRows::Q4 { codes, scales, .. } => {
                    let mut wide = [0i8; KEY_TILE * MAX_Q4_HEAD];
                    let wide = unpack_q4_tile(codes, base, kv_dim, head_dim, n, &mut wide);
                    fk.tile_scores_i8(query_row, wide, head_dim, n, &mut tile);
                    let heads = shape.kv_heads;
                    for (j, s) in tile[..n].iter_mut().enumerate() {
                        *s *= petrel_quant::blocks::f16_to_f32(scales[(start + j) * heads + kv]);
                    }
                }
            }
            for s in tile[..n].iter_mut() {
                *s *= scale;
            }
            let tile_max = tile[..n].iter().fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
            let o = &mut out[row(query.item)];
            if tile_max > max[i] {
                if max[i] != f32::NEG_INFINITY {
                    let correction = exp_poly(max[i] - tile_max);
                    denom[i] *= correction;
                    for v in o.iter_mut() {
                        *v *= correction;
                    }
                }
                max[i] = tile_max;
            }
            denom[i] += fk.tile_exp(&mut tile, n, max[i]);
            match values {
                KvRows::F32(v) => fk.tile_pv(o, &tile, n, &v[base..], kv_dim),
                KvRows::F16(v) => fk.tile_pv_f16(o, &tile, n, &v[base..], kv_dim),
                KvRows::Q8 { codes, scales, .. } => {
                    // Each value row's scale folds into its weight (after the denominator
                    // took the unscaled weights).
                    let heads = shape.kv_heads;
                    for (j, p) in tile[..n].iter_mut().enumerate() {
                        *p *= scales[(start + j) * heads + kv];
                    }
                    fk.tile_pv_i8(o, &tile, n, &codes[base..], kv_dim);
                }
                KvRows::Q4 { codes, scales, .. } => {
                    let heads = shape.kv_heads;
                    for (j, p) in tile[..n].iter_mut().enumerate() {
                        *p *= petrel_quant::blocks::f16_to_f32(scales[(start + j) * heads + kv]);
                    }
                    let mut wide = [0i8; KEY_TILE * MAX_Q4_HEAD];
                    let wide = unpack_q4_tile(codes, base, kv_dim, head_dim, n, &mut wide);
                    fk.tile_pv_i8(o, &tile, n, wide, head_dim);
                }
            }
        }
    }
    for (i, query) in queries.iter().enumerate() {
        let inv = 1.0 / denom[i];
        for v in out[row(query.item)].iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// A deterministic pseudo-random stream in [-1, 1).
    fn noise(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn unapply_rope_inverts_apply_rope() {
        let (head_dim, rope_dim) = (8, 6);
        let mut seed = 3u64;
        let original: Vec<f32> = (0..2 * head_dim).map(|_| noise(&mut seed)).collect();
        for position in [0, 1, 17, 4000] {
            let mut table = vec![0f32; rope_dim];
            rope_table(&mut table, position, rope_dim, 10_000.0);
            let mut x = original.clone();
            apply_rope(&mut x, head_dim, &table);
            if position > 0 {
                assert_ne!(x, original);
            }
            unapply_rope(&mut x, head_dim, &table);
            for (a, b) in x.iter().zip(&original) {
                assert!((a - b).abs() <= 1e-6, "position {position}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn attend_batch_matches_f64_reference_and_is_exact_across_kernels_and_splits() {
        // (heads, kv_heads, head_dim, position, tokens): ragged tiles, GQA, MHA, a head
        // dimension above 64 and not a multiple of 8, a group above the
        // pass size.
        let cases = [(6, 2, 64, 37, 5), (4, 4, 20, 0, 19), (2, 1, 70, 100, 3), (80, 1, 8, 5, 2), (3, 1, 64, 250, 9)];
        let mut seed = 7u64;
        for (heads, kv_heads, head_dim, position, tokens) in cases {
            let (dim, kv_dim, positions) = (heads * head_dim, kv_heads * head_dim, position + tokens);
            let mut gen = |len: usize, amp: f32| -> Vec<f32> { (0..len).map(|_| noise(&mut seed) * amp).collect() };
            let q = gen(tokens * dim, 3.0);
            let keys = gen(positions * kv_dim, 1.0);
            let values = gen(positions * kv_dim, 1.0);
            let shape = AttentionShape::new(heads, kv_heads, head_dim);
            let items = tokens * heads;
            let run = |fk: &FloatKernels, split: usize| {
                let mut out = vec![0f32; items * head_dim];
                let mut start = 0;
                while start < items {
                    let end = (start + split).min(items);
                    attend_batch(
                        fk,
                        &mut out[start * head_dim..end * head_dim],
                        &q,
                        KvRows::F32(&keys),
                        KvRows::F32(&values),
                        shape,
                        position,
                        start..end,
                    );
                    start = end;
                }
                out
            };
            let reference = run(&FloatKernels::scalar(), items);
            for fk in [FloatKernels::scalar(), FloatKernels::detect()] {
                for split in [1, 5, items] {
                    assert_eq!(run(&fk, split), reference, "{heads}/{kv_heads}/{head_dim} split {split}");
                }
            }
            // An f16 cache gives exactly what the f32 one gives on the same values widened.
            let half = |x: &[f32]| -> Vec<u16> { x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect() };
            let (keys16, values16) = (half(&keys), half(&values));
            let widen = |x: &[u16]| -> Vec<f32> { x.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect() };
            let (keys_wide, values_wide) = (widen(&keys16), widen(&values16));
            for fk in [FloatKernels::scalar(), FloatKernels::detect()] {
                let mut wide = vec![0f32; items * head_dim];
                let mut narrow = vec![0f32; items * head_dim];
                let (kw, vw) = (KvRows::F32(&keys_wide), KvRows::F32(&values_wide));
                attend_batch(&fk, &mut wide, &q, kw, vw, shape, position, 0..items);
                let (kn, vn) = (KvRows::F16(&keys16), KvRows::F16(&values16));
                attend_batch(&fk, &mut narrow, &q, kn, vn, shape, position, 0..items);
                assert_eq!(wide, narrow, "{heads}/{kv_heads}/{head_dim}: f16 cache");
            }
            // A q8 cache: the same across kernel sets, and within float rounding of the f32
            // cache holding the dequantized values.
            let quantize = |x: &[f32]| -> (Vec<i8>, Vec<f32>) {
                let mut codes = vec![0i8; x.len()];
                let mut scales = Vec::new();
                for (c, h) in codes.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)) {
                    let scale = h.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0;
                    for (c, &v) in c.iter_mut().zip(h) {
                        *c = if scale > 0.0 { libm::roundf(v / scale) as i8 } else { 0 };
                    }
                    scales.push(scale);
                }
                (codes, scales)
            };
            let ((kc, ks), (vc, vs)) = (quantize(&keys), quantize(&values));
            let dequantize = |c: &[i8], sc: &[f32]| -> Vec<f32> {
                c.iter().enumerate().map(|(i, &v)| v as f32 * sc[i / head_dim]).collect()
            };
            let (kd, vd) = (dequantize(&kc, &ks), dequantize(&vc, &vs));
            let mut dense = vec![0f32; items * head_dim];
            attend_batch(
                &FloatKernels::scalar(),
                &mut dense,
                &q,
                KvRows::F32(&kd),
                KvRows::F32(&vd),
                shape,
                position,
                0..items,
            );
            let mut first: Option<Vec<f32>> = None;
            for fk in [FloatKernels::scalar(), FloatKernels::detect()] {
                let mut got = vec![0f32; items * head_dim];
                let kq = KvRows::Q8 { codes: &kc, scales: &ks, head_dim };
                let vq = KvRows::Q8 { codes: &vc, scales: &vs, head_dim };
                attend_batch(&fk, &mut got, &q, kq, vq, shape, position, 0..items);
                for (a, b) in got.iter().zip(&dense) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "q8 cache: {a} vs {b}");
                }
                if let Some(f) = &first {
                    assert_eq!(f, &got, "q8 cache differs across kernel sets");
                }
                first = Some(got);
            }
            // A q4 cache: likewise against the f32 cache holding its dequantized values.
            let quantize4 = |x: &[f32]| -> (Vec<u8>, Vec<u16>, Vec<f32>) {
                let (mut codes, mut scales, mut wide) = (vec![0u8; x.len() / 2], Vec::new(), vec![0f32; x.len()]);
                for (h, head) in x.chunks_exact(head_dim).enumerate() {
                    let scale = half::f16::from_f32(head.iter().fold(0f32, |m, &v| m.max(v.abs())) / 7.0);
                    for (i, &v) in head.iter().enumerate() {
                        let c = if scale.to_f32() > 0.0 { libm::roundf(v / scale.to_f32()) as i8 } else { 0 };
                        let at = h * head_dim + i;
                        codes[at / 2] |= ((c + 8) as u8) << (4 * (at % 2));
                        wide[at] = c as f32 * scale.to_f32();
                    }
                    scales.push(scale.to_bits());
                }
                (codes, scales, wide)
            };
            let ((kc4, ks4, kd4), (vc4, vs4, vd4)) = (quantize4(&keys), quantize4(&values));
            let mut dense4 = vec![0f32; items * head_dim];
            let (kw, vw) = (KvRows::F32(&kd4), KvRows::F32(&vd4));
            attend_batch(&FloatKernels::scalar(), &mut dense4, &q, kw, vw, shape, position, 0..items);
            let mut first: Option<Vec<f32>> = None;
            for fk in [FloatKernels::scalar(), FloatKernels::detect()] {
                let mut got = vec![0f32; items * head_dim];
                let kq = KvRows::Q4 { codes: &kc4, scales: &ks4, head_dim };
                let vq = KvRows::Q4 { codes: &vc4, scales: &vs4, head_dim };
                attend_batch(&fk, &mut got, &q, kq, vq, shape, position, 0..items);
                for (a, b) in got.iter().zip(&dense4) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "q4 cache: {a} vs {b}");
                }
                if let Some(f) = &first {
                    assert_eq!(f, &got, "q4 cache differs across kernel sets");
                }
                first = Some(got);
            }
            // Batch independence: each token alone, at its own position.
            for t in 0..tokens {
                let mut out = vec![0f32; heads * head_dim];
                let qt = &q[t * dim..(t + 1) * dim];
                attend_batch(
                    &FloatKernels::detect(),
                    &mut out,
                    qt,
                    KvRows::F32(&keys),
                    KvRows::F32(&values),
                    shape,
                    position + t,
                    0..heads,
                );
                assert_eq!(out[..], reference[t * dim..(t + 1) * dim], "token {t} alone");
            }
            let scale = 1.0 / (head_dim as f64).sqrt();
            for t in 0..tokens {
                for h in 0..heads {
                    let off = (h / (heads / kv_heads)) * head_dim;
                    let qh = &q[t * dim + h * head_dim..t * dim + (h + 1) * head_dim];
                    let scores: Vec<f64> = (0..=position + t)
                        .map(|p| {
                            let k = &keys[p * kv_dim + off..p * kv_dim + off + head_dim];
                            qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for i in 0..head_dim {
                        let expected: f64 =
                            w.iter().enumerate().map(|(p, w)| w / total * values[p * kv_dim + off + i] as f64).sum();
                        let got = reference[(t * heads + h) * head_dim + i] as f64;
                        assert!((got - expected).abs() < 2e-5, "{t}/{h}/{i}: {got} vs {expected}");
                    }
                }
            }
        }
    }

    /// A sliding window and a custom scale against an f64 reference, and the same
    /// independence of splits and kernels as global attention.
    #[test]
    fn windowed_attention_matches_f64_reference() {
        let mut seed = 11u64;
        // (heads, kv_heads, head_dim, position, tokens, window): windows shorter than a
        // tile, across tile edges, longer than the context, of one row.
        for (heads, kv_heads, head_dim, position, tokens, window) in
            [(4, 1, 32, 70, 9, 5), (2, 2, 16, 130, 40, 37), (3, 1, 8, 3, 4, 100), (2, 1, 8, 20, 3, 1)]
        {
            let (dim, kv_dim, positions) = (heads * head_dim, kv_heads * head_dim, position + tokens);
            let mut gen = |len: usize| -> Vec<f32> { (0..len).map(|_| noise(&mut seed) * 2.0).collect() };
            let (q, keys, values) = (gen(tokens * dim), gen(positions * kv_dim), gen(positions * kv_dim));
            let shape =
                AttentionShape { scale: 0.3, window: Some(window), ..AttentionShape::new(heads, kv_heads, head_dim) };
            let items = tokens * heads;
            let run = |fk: &FloatKernels, split: usize| {
                let mut out = vec![0f32; items * head_dim];
                for start in (0..items).step_by(split) {
                    let end = (start + split).min(items);
                    let o = &mut out[start * head_dim..end * head_dim];
                    attend_batch(fk, o, &q, KvRows::F32(&keys), KvRows::F32(&values), shape, position, start..end);
                }
                out
            };
            let reference = run(&FloatKernels::scalar(), items);
            for split in [1, 7] {
                assert_eq!(run(&FloatKernels::detect(), split), reference, "split {split}");
            }
            for t in 0..tokens {
                let last = position + t;
                for h in 0..heads {
                    let off = (h / (heads / kv_heads)) * head_dim;
                    let qh = &q[t * dim + h * head_dim..t * dim + (h + 1) * head_dim];
                    let visible = (last + 1).saturating_sub(window)..last + 1;
                    let scores: Vec<f64> = visible
                        .clone()
                        .map(|p| {
                            let k = &keys[p * kv_dim + off..p * kv_dim + off + head_dim];
                            qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * 0.3
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for i in 0..head_dim {
                        let expected: f64 =
                            visible.clone().zip(&w).map(|(p, w)| w / total * values[p * kv_dim + off + i] as f64).sum();
                        let got = reference[(t * heads + h) * head_dim + i] as f64;
                        assert!((got - expected).abs() < 2e-5, "window {window} {t}/{h}/{i}: {got} vs {expected}");
                    }
                }
            }
        }
    }

    /// NeoX RoPE is adjacent-pair RoPE on the halves interleaved.
    #[test]
    fn neox_rope_is_adjacent_rope_on_interleaved_halves() {
        let (head_dim, rope_dim) = (12, 8);
        let mut seed = 5u64;
        let x: Vec<f32> = (0..2 * head_dim).map(|_| noise(&mut seed)).collect();
        let mut table = vec![0f32; rope_dim];
        rope_table(&mut table, 33, rope_dim, 1e6);
        let mut neox = x.clone();
        apply_rope_neox(&mut neox, head_dim, &table);
        let half = rope_dim / 2;
        // Interleave each head's halves, rotate adjacent pairs, and split back.
        let mut adjacent = x.clone();
        for head in adjacent.chunks_exact_mut(head_dim) {
            let orig = head.to_vec();
            for i in 0..half {
                head[2 * i] = orig[i];
                head[2 * i + 1] = orig[half + i];
            }
        }
        apply_rope(&mut adjacent, head_dim, &table);
        for (h, head) in adjacent.chunks_exact(head_dim).enumerate() {
            for i in 0..half {
                assert_eq!(neox[h * head_dim + i], head[2 * i]);
                assert_eq!(neox[h * head_dim + half + i], head[2 * i + 1]);
            }
            assert_eq!(
                neox[h * head_dim + rope_dim..(h + 1) * head_dim],
                x[h * head_dim + rope_dim..(h + 1) * head_dim]
            );
        }
    }

    #[test]
    fn gelu_tanh_matches_the_formula_in_f64() {
        let mut gate: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.15).collect();
        let up: Vec<f32> = gate.iter().map(|g| 1.0 - g * 0.1).collect();
        let expected: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let g = g as f64;
                0.5 * g * (1.0 + ((2.0 / core::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()) * u as f64
            })
            .collect();
        gelu_tanh_mul(&mut gate, &up);
        for (got, want) in gate.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{got} vs {want}");
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut table = [0f32; 8];
        rope_table(&mut table, 0, 8, 10_000.0);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        apply_rope(&mut x, 8, &table);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        rope_table(&mut table, 17, 8, 10_000.0);
        apply_rope(&mut x, 8, &table);
        let norm: f32 = x.iter().map(|v| v * v).sum();
        assert!((norm - 204.0).abs() < 1e-3);
    }
}
