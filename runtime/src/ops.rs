//! The element-wise and per-token operations of the forward pass, in f32.

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

/// Positions scored at once by [`attend`] (a stack buffer of this many f32).
const ATTENTION_TILE: usize = 128;

/// Causal attention of one query head over cached positions `0..=last`.
///
/// `q` is the head's query (`head_dim`), `keys`/`values` the layer's cache rows
/// (`kv_dim` apart, the head's slice starting at `offset`), `out` receives the
/// softmax-weighted sum of values. Positions are scored a tile at a time with a running
/// maximum (online softmax), so the scratch is one fixed stack tile whatever the context.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    fk: &FloatKernels,
    out: &mut [f32],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_dim: usize,
    offset: usize,
    last: usize,
) {
    let head_dim = q.len();
    let scale = 1.0 / libm::sqrtf(head_dim as f32);
    let mut scores = [0f32; ATTENTION_TILE];
    let mut max = f32::NEG_INFINITY;
    let mut denom = 0f32;
    out.fill(0.0);
    let row = |p: usize| p * kv_dim + offset..p * kv_dim + offset + head_dim;
    for start in (0..=last).step_by(ATTENTION_TILE) {
        let n = (last + 1 - start).min(ATTENTION_TILE);
        let tile = &mut scores[..n];
        for (i, s) in tile.iter_mut().enumerate() {
            *s = fk.dot(q, &keys[row(start + i)]) * scale;
        }
        let tile_max = tile.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if tile_max > max {
            let correction = libm::expf(max - tile_max);
            denom *= correction;
            for o in out.iter_mut() {
                *o *= correction;
            }
            max = tile_max;
        }
        denom += fk.exp_sub(tile, max);
        for (i, &w) in tile.iter().enumerate() {
            fk.axpy(out, w, &values[row(start + i)]);
        }
    }
    let inv = 1.0 / denom;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attend_matches_two_pass_softmax() {
        // 300 positions: several tiles, with the maximum moving between them.
        let (head_dim, kv_dim, offset, positions) = (4, 8, 4, 300);
        let q = [0.3, -1.2, 0.5, 2.0];
        let keys: std::vec::Vec<f32> =
            (0..kv_dim * positions).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.4 + (i / kv_dim) as f32 * 0.004).collect();
        let values: std::vec::Vec<f32> = (0..kv_dim * positions).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
        for fk in [FloatKernels::scalar(), FloatKernels::detect()] {
            check_attend(&fk, &q, &keys, &values, kv_dim, offset, positions, head_dim);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_attend(
        fk: &FloatKernels,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_dim: usize,
        offset: usize,
        positions: usize,
        head_dim: usize,
    ) {
        let mut out = [0f32; 4];
        attend(fk, &mut out, q, keys, values, kv_dim, offset, positions - 1);
        let scores: std::vec::Vec<f32> = (0..positions)
            .map(|p| (0..head_dim).map(|i| q[i] * keys[p * kv_dim + offset + i]).sum::<f32>() / 2.0)
            .collect();
        let max = scores.iter().copied().fold(f32::MIN, f32::max);
        let w: std::vec::Vec<f32> = scores.iter().map(|s| libm::expf(s - max)).collect();
        let total: f32 = w.iter().sum();
        for i in 0..head_dim {
            let expected: f32 = (0..positions).map(|p| w[p] / total * values[p * kv_dim + offset + i]).sum();
            assert!((out[i] - expected).abs() < 1e-5, "{i}: {} vs {expected}", out[i]);
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
