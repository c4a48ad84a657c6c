//! Per-token activations for the W4 kernels: int4 (W4A4), int8 (W4A8), or f32 (W4A16).
//!
//! A token's `n` activations are quantized dynamically with one scale per token:
//! `s = clip · max|x| / q_max` and `q = clamp(round(x / s), q_min, q_max)`, where
//! `[q_min, q_max]` is `[-8, 7]` for int4 and `[-127, 127]` for int8 and `clip ∈ (0, 1]`
//! trades clipping error on outliers for resolution on everything else.
//!
//! # Layout of a batch ([`TokenBatch`])
//! - `codes: [i8; tokens · padded_cols]` — one code per byte (int4 codes too: activations
//!   are transient, and the kernels want bytes), row-major by token, each row zero-padded
//!   to [`pad_cols`]`(n)`;
//! - `scales: [f32; tokens]` — `s` per token;
//! - `sums: [i32; tokens · groups]` — `Σ q` over each weight group of the row (the groups
//!   of the weight matrix the batch will meet), which lets x86 kernels treat the weight
//!   codes as unsigned nibbles and subtract `8 · Σ q` afterwards.

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
/// zeroed) and `sums` (one per group of `group` over `n`), and returns the token's scale.
///
/// A token of zeros gets scale 0 and zero codes.
///
/// # Panics
/// If `codes` or `sums` have the wrong length, or `clip` is not in `(0, 1]`.
pub fn quantize_token(
    x: &[f32],
    bits: ActBits,
    clip: f32,
    group: GroupSize,
    codes: &mut [i8],
    sums: &mut [i32],
) -> f32 {
    let n = x.len();
    assert!(clip > 0.0 && clip <= 1.0, "activation clip ratio must be in (0, 1]");
    assert!(codes.len() == pad_cols(n) && sums.len() == group.groups(n), "quantize_token: buffer sizes");
    let (q_min, q_max) = bits.range();
    let amax = x.iter().fold(0.0f32, |m, &v| m.max(abs(v)));
    let s = clip * amax / q_max as f32;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (q, &v) in codes.iter_mut().zip(x) {
        *q = round_to_i32(v * inv).clamp(q_min, q_max) as i8;
    }
    codes[n..].fill(0);
    let len = group.elements(n);
    for (g, sum) in sums.iter_mut().enumerate() {
        let end = ((g + 1) * len).min(codes.len());
        *sum = codes[g * len..end].iter().map(|&q| q as i32).sum();
    }
    s
}

/// A batch of quantized tokens, borrowed (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    /// Number of tokens.
    pub tokens: usize,
    /// Columns of a row before padding.
    pub cols: usize,
    /// The weight grouping `sums` were computed for.
    pub group: GroupSize,
    /// Codes, `tokens × pad_cols(cols)`.
    pub codes: &'a [i8],
    /// Scale per token.
    pub scales: &'a [f32],
    /// Code sums per token and group, `tokens × group.groups(cols)`.
    pub sums: &'a [i32],
}

impl TokenBatch<'_> {
    /// Checks that the slices have the lengths the header promises.
    pub fn is_consistent(&self) -> bool {
        self.codes.len() == self.tokens * pad_cols(self.cols)
            && self.scales.len() == self.tokens
            && self.sums.len() == self.tokens * self.group.groups(self.cols)
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
            let mut sums = [0i32; 2];
            let s = quantize_token(&x, bits, clip, GroupSize::G32, &mut codes, &mut sums);
            let (lo, hi) = bits.range();
            assert!(codes.iter().all(|&q| (lo..=hi).contains(&(q as i32))));
            assert_eq!(&codes[45..], &[0, 0, 0]);
            assert_eq!(sums[0], codes[..32].iter().map(|&q| q as i32).sum::<i32>());
            assert_eq!(sums[1], codes[32..].iter().map(|&q| q as i32).sum::<i32>());
            for (i, &v) in x.iter().enumerate() {
                let clipped = v.clamp(lo as f32 * s, hi as f32 * s);
                assert!((clipped - s * codes[i] as f32).abs() <= s * 0.5 + 1e-6, "{bits:?} {i}");
            }
        }
    }

    #[test]
    fn zero_token_has_zero_scale() {
        let (mut codes, mut sums) = ([1i8; 8], [1i32; 1]);
        assert_eq!(quantize_token(&[0.0; 8], ActBits::A4, 1.0, GroupSize::PerChannel, &mut codes, &mut sums), 0.0);
        assert_eq!((codes, sums), ([0; 8], [0]));
    }
}
