//! Per-token activations for the W4 kernels: int4 (W4A4), int8 (W4A8), or f32 (W4A16).
//!
//! A token's `n` activations are quantized dynamically with one scale per weight group of
//! the row (the groups of the weight matrix the token will meet; per channel, one group:
//! the whole row): `s_g = clip · max|x over g| / q_max` and `q = clamp(round(x / s_g),
//! q_min, q_max)`, where `[q_min, q_max]` is `[-8, 7]` for int4 and `[-127, 127]` for int8
//! and `clip ∈ (0, 1]` trades clipping error on outliers for resolution on everything else.
//! Since the kernels scale each group's integer sum anyway, a scale per group costs nothing
//! there and follows the activations' range more closely than one per token.
//!
//! # Layout of a batch ([`TokenBatch`])
//! - `codes: [i8; tokens · padded_cols]` — one code per byte (int4 codes too: activations
//!   are transient, and the kernels want bytes), row-major by token, each row zero-padded
//!   to [`pad_cols`]`(n)`;
//! - `scales: [f32; tokens · groups]` — `s_g` per token and weight group, row-major by token;
//! - `sums: [i32; tokens · groups]` — `Σ q` over each weight group of the row, which lets
//!   x86 kernels treat the weight codes as unsigned nibbles and subtract `8 · Σ q`
//!   afterwards.

use super::{pad_cols, GroupSize};
use crate::blocks::{abs, round_to_i32};

/// Bits of a quantized activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActBits {
    /// Codes in `[-8, 7]`.
    A4,
    /// Codes in `[-127, 127]`.
    A8,
}

impl ActBits {
    /// From the number stored in files (4 or 8).
    pub const fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            4 => Some(ActBits::A4),
            8 => Some(ActBits::A8),
            _ => None,
        }
    }

    /// 4 or 8.
    pub const fn bits(self) -> u32 {
        match self {
            ActBits::A4 => 4,
            ActBits::A8 => 8,
        }
    }

    /// `(q_min, q_max)`.
    pub const fn range(self) -> (i32, i32) {
        match self {
            ActBits::A4 => (-8, 7),
            ActBits::A8 => (-127, 127),
        }
    }
}

/// Quantizes one token `x` (`n` values) into `codes` (`pad_cols(n)` long; the padding is
/// zeroed), `scales` and `sums` (one of each per group of `group` over `n`, the last group
/// possibly short; per channel, one for the whole row).
///
/// A group of zeros gets scale 0 and zero codes.
///
/// # Panics
/// If `codes`, `sums` or `scales` have the wrong length, or `clip` is not in `(0, 1]`.
pub fn quantize_token(
    x: &[f32],
    bits: ActBits,
    clip: f32,
    group: GroupSize,
    codes: &mut [i8],
    sums: &mut [i32],
    scales: &mut [f32],
) {
    let n = x.len();
    let groups = group.groups(n);
    assert!(clip > 0.0 && clip <= 1.0, "activation clip ratio must be in (0, 1]");
    assert!(
        codes.len() == pad_cols(n) && sums.len() == groups && scales.len() == groups,
        "quantize_token: buffer sizes"
    );
    let (q_min, q_max) = bits.range();
    let len = group.elements(n);
    for (g, (sum, scale)) in sums.iter_mut().zip(scales.iter_mut()).enumerate() {
        let (start, end) = (g * len, ((g + 1) * len).min(n));
        let xs = &x[start..end];
        let amax = xs.iter().fold(0.0f32, |m, &v| m.max(abs(v)));
        let s = clip * amax / q_max as f32;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let mut total = 0i32;
        for (q, &v) in codes[start..end].iter_mut().zip(xs) {
            *q = round_to_i32(v * inv).clamp(q_min, q_max) as i8;
            total += *q as i32;
        }
        *sum = total;
        *scale = s;
    }
    codes[n..].fill(0);
}

/// A batch of quantized tokens, borrowed (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    /// Number of tokens.
    pub tokens: usize,
    /// Columns of a row before padding.
    pub cols: usize,
    /// The weight grouping `scales` and `sums` were computed for.
    pub group: GroupSize,
    /// Codes, `tokens × pad_cols(cols)`.
    pub codes: &'a [i8],
    /// Scales per token and group, `tokens × group.groups(cols)`.
    pub scales: &'a [f32],
    /// Code sums per token and group, `tokens × group.groups(cols)`.
    pub sums: &'a [i32],
}

impl TokenBatch<'_> {
    /// Checks that the slices have the lengths the header promises.
    pub fn is_consistent(&self) -> bool {
        let groups = self.tokens * self.group.groups(self.cols);
        self.codes.len() == self.tokens * pad_cols(self.cols)
            && self.scales.len() == groups
            && self.sums.len() == groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_codes_are_within_half_a_step_and_sums_exact() {
        let x: [f32; 45] = core::array::from_fn(|i| (i as f32 * 0.71).sin() * (1 + i % 4) as f32);
        for (bits, clip) in [(ActBits::A4, 1.0), (ActBits::A4, 0.8), (ActBits::A8, 1.0)] {
            let mut codes = [9i8; 48];
            let (mut sums, mut scales) = ([0i32; 2], [0f32; 2]);
            quantize_token(&x, bits, clip, GroupSize::G32, &mut codes, &mut sums, &mut scales);
            let (lo, hi) = bits.range();
            assert!(codes.iter().all(|&q| (lo..=hi).contains(&(q as i32))));
            assert_eq!(&codes[45..], &[0, 0, 0]);
            assert_eq!(sums[0], codes[..32].iter().map(|&q| q as i32).sum::<i32>());
            assert_eq!(sums[1], codes[32..].iter().map(|&q| q as i32).sum::<i32>());
            for (i, &v) in x.iter().enumerate() {
                let s = scales[i / 32];
                let clipped = v.clamp(lo as f32 * s, hi as f32 * s);
                assert!((clipped - s * codes[i] as f32).abs() <= s * 0.5 + 1e-6, "{bits:?} {i}");
            }
        }
    }

    #[test]
    fn group_scales_follow_each_groups_max() {
        // 70 values over three groups of 32 (the last short), with different ranges, and
        // one group of zeros.
        let x: [f32; 70] = core::array::from_fn(|i| match i / 32 {
            0 => (i as f32 * 0.3).cos() * 0.5,
            1 => 0.0,
            _ => (i as f32 * 0.9).sin() * 40.0 - 1.0,
        });
        for (bits, clip) in [(ActBits::A4, 1.0), (ActBits::A4, 0.9), (ActBits::A8, 1.0)] {
            let q_max = bits.range().1 as f32;
            let mut codes = [0i8; 72];
            let (mut sums, mut scales) = ([0i32; 3], [0f32; 3]);
            quantize_token(&x, bits, clip, GroupSize::G32, &mut codes, &mut sums, &mut scales);
            for (g, &s) in scales.iter().enumerate() {
                let amax = x[32 * g..(32 * g + 32).min(70)].iter().fold(0.0f32, |m, &v| m.max(abs(v)));
                assert_eq!(s, clip * amax / q_max, "{bits:?} group {g}");
            }
            assert!(scales[0] > 0.0 && scales[1] == 0.0 && scales[2] > scales[0]);
            assert!(codes[32..64].iter().all(|&q| q == 0) && sums[1] == 0);
            // With clip 1 each non-zero group's largest value maps to ±q_max.
            if clip == 1.0 {
                for g in [0, 2] {
                    let top = codes[32 * g..(32 * g + 32).min(70)].iter().map(|&q| (q as i32).abs()).max();
                    assert_eq!(top, Some(q_max as i32), "{bits:?} group {g}");
                }
            }

            // Per channel: one scale for the row, the old per-token scale.
            let mut pc_codes = [0i8; 72];
            let (mut pc_sums, mut pc_scales) = ([0i32; 1], [0f32; 1]);
            quantize_token(&x, bits, clip, GroupSize::PerChannel, &mut pc_codes, &mut pc_sums, &mut pc_scales);
            let amax = x.iter().fold(0.0f32, |m, &v| m.max(abs(v)));
            let s = clip * amax / q_max;
            assert_eq!(pc_scales[0], s);
            assert_eq!(pc_scales[0], scales[2], "the row's max lies in the last group");
            for (i, &v) in x.iter().enumerate() {
                let q = round_to_i32(v * (1.0 / s)).clamp(bits.range().0, bits.range().1);
                assert_eq!(pc_codes[i] as i32, q, "{bits:?} {i}");
            }
            assert_eq!(pc_sums[0], pc_codes.iter().map(|&q| q as i32).sum::<i32>());
        }
    }

    #[test]
    fn zero_token_has_zero_scale() {
        let (mut codes, mut sums, mut scales) = ([1i8; 8], [1i32; 1], [1f32; 1]);
        quantize_token(&[0.0; 8], ActBits::A4, 1.0, GroupSize::PerChannel, &mut codes, &mut sums, &mut scales);
        assert_eq!((codes, sums, scales), ([0; 8], [0], [0.0]));
    }
}
