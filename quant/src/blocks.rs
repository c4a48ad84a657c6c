//! Weight block formats, as stored in GGUF files by llama.cpp.
//!
//! Every format groups [`BLOCK_LEN`] = 32 consecutive weights of one row into a block.
//! Multi-byte fields are little-endian; f16 is IEEE 754 binary16.
//!
//! | format | bytes | layout | weight `j` |
//! |---|---|---|---|
//! | Q4_0 | 18 | `d: f16, qs: [u8; 16]` | `d * (n_j - 8)` |
//! | Q4_1 | 20 | `d: f16, m: f16, qs: [u8; 16]` | `d * n_j + m` |
//! | Q8_0 | 34 | `d: f16, qs: [i8; 32]` | `d * qs[j]` |
//!
//! For the 4-bit formats `n_j = qs[j] & 0xF` for `j < 16` and `n_j = qs[j - 16] >> 4` for
//! `j >= 16`: the low nibbles hold the first half of the block, the high nibbles the second.

use half::f16;

/// Number of weights (and activations) in one quantization block.
pub const BLOCK_LEN: usize = 32;

/// A block-quantized weight format that the integer kernels compute on directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 4-bit symmetric with an implicit offset of 8; 18 bytes per 32 weights.
    Q4_0,
    /// 4-bit with scale and minimum; 20 bytes per 32 weights.
    Q4_1,
    /// 8-bit symmetric; 34 bytes per 32 weights.
    Q8_0,
}

impl WeightFormat {
    /// Bytes of one block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q8_0 => 34,
        }
    }

    /// Bytes of a row of `len` weights, or `None` if `len` is not a multiple of 32.
    pub const fn row_bytes(self, len: usize) -> Option<usize> {
        if !len.is_multiple_of(BLOCK_LEN) {
            return None;
        }
        Some(len / BLOCK_LEN * self.block_bytes())
    }
}

/// Reads the little-endian f16 at `bytes[at..at + 2]` as f32 (the conversion is exact).
#[inline(always)]
pub fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// The f16 with bits `bits` as f32 (exact). Normal numbers take a few integer operations
/// (rebias the exponent, widen the mantissa); zeros, subnormals, infinities and NaNs take
/// `half`'s general conversion. Scales are read per weight group in every kernel, and on
/// cores without a hardware conversion (Cortex-M4) `half`'s path alone costs tens of
/// instructions.
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let exponent = (bits >> 10) & 0x1F;
    if exponent != 0 && exponent != 0x1F {
        let bits = bits as u32;
        f32::from_bits(((bits & 0x8000) << 16) | (((bits & 0x7FFF) << 13) + ((127 - 15) << 23)))
    } else {
        f16::from_bits(bits).to_f32()
    }
}

/// Writes `value` rounded to f16 (nearest, ties to even) at `bytes[at..at + 2]`.
#[inline]
pub fn write_f16(bytes: &mut [u8], at: usize, value: f32) {
    bytes[at..at + 2].copy_from_slice(&f16::from_f32(value).to_bits().to_le_bytes());
}

/// Dequantizes one row stored in `format` into `out`.
///
/// `row` must hold exactly `out.len() / 32` blocks and `out.len()` must be a multiple of 32.
///
/// # Panics
/// If the lengths disagree (a programming error: the model loader validates shapes).
pub fn dequantize_row(format: WeightFormat, row: &[u8], out: &mut [f32]) {
    let block_bytes = format.block_bytes();
    assert_eq!(out.len() % BLOCK_LEN, 0, "row length must be a multiple of 32");
    assert_eq!(row.len(), out.len() / BLOCK_LEN * block_bytes, "row bytes disagree with length");
    for (block, values) in row.chunks_exact(block_bytes).zip(out.chunks_exact_mut(BLOCK_LEN)) {
        let d = read_f16(block, 0);
        match format {
            WeightFormat::Q4_0 => {
                let qs = &block[2..18];
                for j in 0..16 {
                    values[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
                    values[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
                }
            }
            WeightFormat::Q4_1 => {
                let m = read_f16(block, 2);
                let qs = &block[4..20];
                for j in 0..16 {
                    values[j] = d * (qs[j] & 0xF) as f32 + m;
                    values[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
            }
            WeightFormat::Q8_0 => {
                for (value, &q) in values.iter_mut().zip(&block[2..34]) {
                    *value = d * (q as i8) as f32;
                }
            }
        }
    }
}

/// Quantizes `values` (a multiple of 32 long) into `format`, as llama.cpp's reference
/// quantizers do (round to nearest). Used to build test data and small models.
///
/// # Panics
/// If `out` is not exactly the row's size in `format`.
pub fn quantize_row(format: WeightFormat, values: &[f32], out: &mut [u8]) {
    let block_bytes = format.block_bytes();
    assert_eq!(values.len() % BLOCK_LEN, 0, "row length must be a multiple of 32");
    assert_eq!(out.len(), values.len() / BLOCK_LEN * block_bytes, "output size disagrees");
    for (x, block) in values.chunks_exact(BLOCK_LEN).zip(out.chunks_exact_mut(block_bytes)) {
        match format {
            WeightFormat::Q4_0 => {
                // The value of largest magnitude maps to -8, as in llama.cpp.
                let mut max = 0.0f32;
                for &v in x {
                    if abs(v) > abs(max) {
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                write_f16(block, 0, d);
                for j in 0..16 {
                    let lo = (x[j] * id + 8.5) as i32;
                    let hi = (x[j + 16] * id + 8.5) as i32;
                    block[2 + j] = (lo.clamp(0, 15) | (hi.clamp(0, 15) << 4)) as u8;
                }
            }
            WeightFormat::Q4_1 => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                write_f16(block, 0, d);
                write_f16(block, 2, min);
                for j in 0..16 {
                    let lo = ((x[j] - min) * id + 0.5) as i32;
                    let hi = ((x[j + 16] - min) * id + 0.5) as i32;
                    block[4 + j] = (lo.clamp(0, 15) | (hi.clamp(0, 15) << 4)) as u8;
                }
            }
            WeightFormat::Q8_0 => {
                let amax = x.iter().fold(0.0f32, |m, &v| m.max(abs(v)));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                write_f16(block, 0, d);
                for j in 0..BLOCK_LEN {
                    block[2 + j] = round_to_i32(x[j] * id).clamp(-127, 127) as i8 as u8;
                }
            }
        }
    }
}

/// `|v|` without `std` (clears the sign bit).
#[inline(always)]
pub(crate) fn abs(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0x7fff_ffff)
}

/// Rounds to the nearest integer, ties to even, for `|v| < 2^22` (the float-magic trick
/// llama.cpp uses; needs no `std`).
#[inline(always)]
pub(crate) fn round_to_i32(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[cfg(test)]
mod f16_tests {
    #[test]
    fn f16_to_f32_matches_half_on_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = super::f16_to_f32(bits);
            assert_eq!(want.to_bits(), got.to_bits(), "{bits:#06x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_ties_to_even() {
        assert_eq!(round_to_i32(0.5), 0);
        assert_eq!(round_to_i32(1.5), 2);
        assert_eq!(round_to_i32(-1.5), -2);
        assert_eq!(round_to_i32(-0.4), 0);
        assert_eq!(round_to_i32(126.6), 127);
        assert_eq!(round_to_i32(-126.6), -127);
    }

    #[test]
    fn quantize_then_dequantize_is_close() {
        let values: [f32; 64] = core::array::from_fn(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0);
        for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let mut packed = [0u8; 68];
            let bytes = format.row_bytes(64).unwrap();
            quantize_row(format, &values, &mut packed[..bytes]);
            let mut back = [0f32; 64];
            dequantize_row(format, &packed[..bytes], &mut back);
            let step = if format == WeightFormat::Q8_0 { 4.5 / 127.0 } else { 9.0 / 15.0 };
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{format:?}: {a} vs {b}");
            }
        }
    }
}
