//! 8-bit activation blocks, the right-hand operand of every integer dot product.
//!
//! A row of `n` activations (a multiple of 32) is quantized per block of 32 to
//! `q = round(x / d)` with `d = max|x| / 127`, so `|q| <= 127`. The format is stored
//! as three parallel arrays (structure of arrays, friendlier to SIMD than llama.cpp's
//! interleaved Q8_0/Q8_1 blocks):
//! - `qs: [i8; n]` — the quantized values;
//! - `scales: [f32; n / 32]` — `d` per block, rounded to an f16 value (as llama.cpp's and
//!   candle's Q8 blocks store it, so that the engines quantize activations identically) and
//!   kept as f32 so kernels need no conversion;
//! - `sums: [i32; n / 32]` — `Σ q` per block, exact, which lets the kernels treat 4-bit
//!   weights as unsigned nibbles and fold offsets (Q4_0's 8, Q4_1's minimum) in afterwards.

use crate::blocks::{abs, round_to_i32, BLOCK_LEN};

/// A borrowed row of quantized activations (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct Q8Row<'a> {
    /// Quantized values, `n` long.
    pub qs: &'a [i8],
    /// One scale per block of 32, `n / 32` long.
    pub scales: &'a [f32],
    /// Exact sum of `qs` over each block, `n / 32` long.
    pub sums: &'a [i32],
}

/// Mutable storage for one row of quantized activations.
#[derive(Debug)]
pub struct Q8RowMut<'a> {
    /// Quantized values, `n` long.
    pub qs: &'a mut [i8],
    /// One scale per block of 32, `n / 32` long.
    pub scales: &'a mut [f32],
    /// Exact sum of `qs` over each block, `n / 32` long.
    pub sums: &'a mut [i32],
}

impl Q8Row<'_> {
    /// Number of blocks of 32 in the row.
    pub fn blocks(&self) -> usize {
        self.scales.len()
    }
}

/// Quantizes `x` (a multiple of 32 long) into `out`.
///
/// # Panics
/// If the lengths of `out`'s arrays do not match `x.len()` (a programming error).
pub fn quantize_row_q8(x: &[f32], out: Q8RowMut<'_>) {
    let blocks = x.len() / BLOCK_LEN;
    assert_eq!(x.len() % BLOCK_LEN, 0, "activation length must be a multiple of 32");
    assert!(out.qs.len() == x.len() && out.scales.len() == blocks && out.sums.len() == blocks);
    for (b, values) in x.chunks_exact(BLOCK_LEN).enumerate() {
        let amax = values.iter().fold(0.0f32, |m, &v| m.max(abs(v)));
        // The scale is rounded to f16 as llama.cpp's Q8_0/Q8_1 blocks store it, so that
        // both engines quantize activations identically (see the module docs).
        let d = half::f16::from_f32(amax / 127.0).to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in out.qs[b * BLOCK_LEN..(b + 1) * BLOCK_LEN].iter_mut().zip(values) {
            let r = round_to_i32(v * id).clamp(-127, 127);
            *q = r as i8;
            sum += r;
        }
        out.scales[b] = d;
        out.sums[b] = sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizes_within_half_a_step_and_sums_exactly() {
        let x: [f32; 64] = core::array::from_fn(|i| (i as f32 * 0.37).sin() * (1 + i % 5) as f32);
        let (mut qs, mut scales, mut sums) = ([0i8; 64], [0f32; 2], [0i32; 2]);
        quantize_row_q8(&x, Q8RowMut { qs: &mut qs, scales: &mut scales, sums: &mut sums });
        for b in 0..2 {
            let block = &qs[b * 32..(b + 1) * 32];
            assert_eq!(sums[b], block.iter().map(|&q| q as i32).sum::<i32>());
            assert!(block.iter().any(|&q| q.abs() == 127));
            for j in 0..32 {
                let err = (x[b * 32 + j] - scales[b] * block[j] as f32).abs();
                assert!(err <= scales[b] * 0.5 + 1e-6);
            }
        }
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let x = [0f32; 32];
        let (mut qs, mut scales, mut sums) = ([1i8; 32], [1f32; 1], [1i32; 1]);
        quantize_row_q8(&x, Q8RowMut { qs: &mut qs, scales: &mut scales, sums: &mut sums });
        assert_eq!((scales[0], sums[0]), (0.0, 0));
        assert!(qs.iter().all(|&q| q == 0));
    }
}
