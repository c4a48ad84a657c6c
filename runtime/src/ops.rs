//! The element-wise and per-token operations of the forward pass, in f32.

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
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + libm::expf(-*g)) * u;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Causal attention of one query head over cached positions `0..=last`.
///
/// `q` is the head's query (`head_dim`), `keys`/`values` the layer's cache rows
/// (`kv_dim` apart, the head's slice starting at `offset`), `out` receives the weighted
/// sum of values. Uses a single pass with a running maximum (online softmax), so it needs
/// no scratch memory.
#[allow(clippy::too_many_arguments)]
pub fn attend(out: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], kv_dim: usize, offset: usize, last: usize) {
    let head_dim = q.len();
    let scale = 1.0 / libm::sqrtf(head_dim as f32);
    let mut max = f32::NEG_INFINITY;
    let mut denom = 0f32;
    out.fill(0.0);
    for p in 0..=last {
        let k = &keys[p * kv_dim + offset..p * kv_dim + offset + head_dim];
        let score = q.iter().zip(k).map(|(&a, &b)| a * b).sum::<f32>() * scale;
        if score > max {
            let correction = libm::expf(max - score);
            denom *= correction;
            for o in out.iter_mut() {
                *o *= correction;
            }
            max = score;
        }
        let w = libm::expf(score - max);
        denom += w;
        let v = &values[p * kv_dim + offset..p * kv_dim + offset + head_dim];
        for (o, &vv) in out.iter_mut().zip(v) {
            *o += w * vv;
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
        let (head_dim, kv_dim, offset, positions) = (4, 8, 4, 5);
        let q = [0.3, -1.2, 0.5, 2.0];
        let keys: [f32; 40] = core::array::from_fn(|i| ((i * 13 % 7) as f32 - 3.0) * 0.4);
        let values: [f32; 40] = core::array::from_fn(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2);
        let mut out = [0f32; 4];
        attend(&mut out, &q, &keys, &values, kv_dim, offset, positions - 1);
        let scores: [f32; 5] =
            core::array::from_fn(|p| (0..head_dim).map(|i| q[i] * keys[p * kv_dim + offset + i]).sum::<f32>() / 2.0);
        let max = scores.iter().copied().fold(f32::MIN, f32::max);
        let w: [f32; 5] = core::array::from_fn(|p| libm::expf(scores[p] - max));
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
