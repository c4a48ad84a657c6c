//! Weight block formats, as stored in GGUF files by llama.cpp (ggml's layouts, byte for
//! byte).
//!
//! The classic formats group 32 consecutive weights of one row into a block; the K-quants
//! group [`K_BLOCK_LEN`] = 256 weights into a super-block ([`WeightFormat::block_len`]).
//! Either way a block covers whole activation blocks of [`BLOCK_LEN`] = 32. Multi-byte
//! fields are little-endian; f16 is IEEE 754 binary16.
//!
//! | format | weights | bytes | layout | weight `j` |
//! |---|---|---|---|---|
//! | Q4_0 | 32 | 18 | `d: f16, qs: [u8; 16]` | `d * (n_j - 8)` |
//! | Q4_1 | 32 | 20 | `d: f16, m: f16, qs: [u8; 16]` | `d * n_j + m` |
//! | Q5_0 | 32 | 22 | `d: f16, qh: u32, qs: [u8; 16]` | `d * (n_j + 16 h_j - 16)` |
//! | Q5_1 | 32 | 24 | `d: f16, m: f16, qh: u32, qs: [u8; 16]` | `d * (n_j + 16 h_j) + m` |
//! | Q8_0 | 32 | 34 | `d: f16, qs: [i8; 32]` | `d * qs[j]` |
//! | Q4_K | 256 | 144 | `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]` | `(d sc_s) n_j - (dmin m_s)` |
//! | Q5_K | 256 | 176 | `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` | `(d sc_s)(n_j + 16 h_j) - (dmin m_s)` |
//! | Q6_K | 256 | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` | `(d sc_s)(q_j - 32)` |
//!
//! - Q4_0, Q4_1, Q5_0, Q5_1: `n_j = qs[j] & 0xF` for `j < 16` and `n_j = qs[j - 16] >> 4`
//!   for `j >= 16` (low nibbles: first half of the block); `h_j` is bit `j` of `qh`.
//! - Q4_K, Q5_K: eight sub-blocks `s` of 32 weights, each with a 6-bit scale `sc_s` and a
//!   6-bit minimum `m_s` packed in `scales` ([`k_scale_min`]). Weights `64c..64c + 32` are
//!   the low nibbles of `qs[32c..32c + 32]`, weights `64c + 32..64c + 64` the high nibbles;
//!   so sub-block `s = 2c + hi` reads nibble `hi` of `qs[32c + l]` for its weight `l`. Q5_K's
//!   fifth bit `h` of weight `l` of sub-block `s` is bit `s` of `qh[l]`.
//! - Q6_K: sixteen sub-blocks of 16 weights with signed 8-bit scales `scales[s]`
//!   (`s = j / 16`). In half `n` (weights `128n..128n + 128`), weight `32k + l` (`k < 4`,
//!   `l < 32`) has the low 4 bits `ql[64n + 32 (k & 1) + l]`, nibble `k >> 1`, and the
//!   high 2 bits `(qh[32n + l] >> 2k) & 3`.
//!
//! Every product in the last column is one f32 operation, rounded, in the order written
//! (as `gguf-py`'s numpy dequantizers compute it, which `dequantize_row` matches bit for
//! bit).

use half::f16;

/// Number of activations in one 8-bit activation block, and of weights in a classic block
/// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); K-quant super-blocks span eight of them.
pub const BLOCK_LEN: usize = 32;

/// Number of weights in one K-quant super-block (llama.cpp's `QK_K`).
pub const K_BLOCK_LEN: usize = 256;

/// A block-quantized weight format that the integer kernels compute on directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // llama.cpp's names
pub enum WeightFormat {
    /// 4-bit symmetric with an implicit offset of 8; 18 bytes per 32 weights.
    Q4_0,
    /// 4-bit with scale and minimum; 20 bytes per 32 weights.
    Q4_1,
    /// 8-bit symmetric; 34 bytes per 32 weights.
    Q8_0,
    /// 5-bit symmetric with an implicit offset of 16; 22 bytes per 32 weights.
    Q5_0,
    /// 5-bit with scale and minimum; 24 bytes per 32 weights.
    Q5_1,
    /// K-quant, 4-bit codes with 6-bit sub-block scales and minimums; 144 bytes per 256
    /// weights (4.5 bits per weight).
    Q4_K,
    /// K-quant, 5-bit codes with 6-bit sub-block scales and minimums; 176 bytes per 256
    /// weights (5.5 bits per weight).
    Q5_K,
    /// K-quant, 6-bit codes with signed 8-bit scales per 16 weights; 210 bytes per 256
    /// weights (6.5625 bits per weight).
    Q6_K,
}

impl WeightFormat {
    /// Every format, classic ones first.
    pub const ALL: [WeightFormat; 8] = [
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q8_0,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q4_K,
        WeightFormat::Q5_K,
        WeightFormat::Q6_K,
    ];

    /// Weights in one block: 32 ([`BLOCK_LEN`]) or 256 ([`K_BLOCK_LEN`]) for the K-quants.
    pub const fn block_len(self) -> usize {
        match self {
            WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q8_0 | WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
                BLOCK_LEN
            }
            WeightFormat::Q4_K | WeightFormat::Q5_K | WeightFormat::Q6_K => K_BLOCK_LEN,
        }
    }

    /// Bytes of one block of [`block_len`](Self::block_len) weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q5_0 => 22,
            WeightFormat::Q5_1 => 24,
            WeightFormat::Q4_K => 144,
            WeightFormat::Q5_K => 176,
            WeightFormat::Q6_K => 210,
        }
    }

    /// Activation blocks of [`BLOCK_LEN`] per weight block (1, or 8 for the K-quants).
    pub const fn activation_blocks(self) -> usize {
        self.block_len() / BLOCK_LEN
    }

    /// llama.cpp's name (`Q4_0`, `Q4_K`, …).
    pub const fn name(self) -> &'static str {
        match self {
            WeightFormat::Q4_0 => "Q4_0",
            WeightFormat::Q4_1 => "Q4_1",
            WeightFormat::Q8_0 => "Q8_0",
            WeightFormat::Q5_0 => "Q5_0",
            WeightFormat::Q5_1 => "Q5_1",
            WeightFormat::Q4_K => "Q4_K",
            WeightFormat::Q5_K => "Q5_K",
            WeightFormat::Q6_K => "Q6_K",
        }
    }

    /// Byte offsets of the f16 scale fields (`d`, and `m` or `dmin`) inside one block.
    pub(crate) const fn f16_fields(self) -> &'static [(usize, &'static str)] {
        match self {
            WeightFormat::Q4_0 | WeightFormat::Q8_0 | WeightFormat::Q5_0 => &[(0, "scale d")],
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => &[(0, "scale d"), (2, "minimum m")],
            WeightFormat::Q4_K | WeightFormat::Q5_K => &[(0, "scale d"), (2, "scale dmin")],
            WeightFormat::Q6_K => &[(208, "scale d")],
        }
    }

    /// Bytes of a row of `len` weights, or `None` if `len` is not a multiple of
    /// [`block_len`](Self::block_len).
    pub const fn row_bytes(self, len: usize) -> Option<usize> {
        if !len.is_multiple_of(self.block_len()) {
            return None;
        }
        Some(len / self.block_len() * self.block_bytes())
    }
}

/// A block that fails [`validate_row`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadBlock {
    /// Index of the offending block within the validated bytes (`usize::MAX` when the byte
    /// count is not a whole number of blocks).
    pub block: usize,
    /// What is wrong, e.g. `"non-finite scale d"`.
    pub what: &'static str,
}

impl core::fmt::Display for BadBlock {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.block == usize::MAX {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{} in block {}", self.what, self.block)
        }
    }
}

/// Checks `bytes` (any number of whole blocks of `format`, e.g. a whole tensor): every f16
/// scale field (`d`, and `m` or `dmin`) must be finite. The kernels' arithmetic is only
/// defined for finite scales; a NaN or infinity in a file is an error, not a result.
pub fn validate_row(format: WeightFormat, bytes: &[u8]) -> Result<(), BadBlock> {
    let bb = format.block_bytes();
    if !bytes.len().is_multiple_of(bb) {
        return Err(BadBlock { block: usize::MAX, what: "byte count is not a whole number of blocks" });
    }
    for (i, block) in bytes.chunks_exact(bb).enumerate() {
        for &(at, name) in format.f16_fields() {
            let bits = u16::from_le_bytes([block[at], block[at + 1]]);
            if bits & 0x7C00 == 0x7C00 {
                let what = match name {
                    "scale d" => "non-finite scale d",
                    "minimum m" => "non-finite minimum m",
                    _ => "non-finite scale dmin",
                };
                return Err(BadBlock { block: i, what });
            }
        }
    }
    Ok(())
}

/// Sub-block `j`'s (0..8) 6-bit scale and minimum from a Q4_K / Q5_K `scales` field
/// (12 bytes): `j < 4` takes the low six bits of bytes `j` and `j + 4`; `j >= 4` takes the
/// nibbles of byte `j + 4` and the top two bits of bytes `j - 4` and `j` as bits 4..6.
#[inline(always)]
pub fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// The inverse of [`k_scale_min`]: packs eight 6-bit scales and minimums.
pub fn pack_k_scales(sc: &[u8; 8], m: &[u8; 8], out: &mut [u8]) {
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
}

/// The 6-bit code (0..64, offset 32 not removed) of weight `k * 32 + l` of half `n` of a
/// Q6_K block (`k < 4`, `l < 32`), per the module docs.
#[inline(always)]
pub(crate) fn q6_k_code(block: &[u8], n: usize, k: usize, l: usize) -> u8 {
    let ql = block[64 * n + 32 * (k & 1) + l];
    let low = if k >= 2 { ql >> 4 } else { ql & 0xF };
    low | (((block[128 + 32 * n + l] >> (2 * k)) & 3) << 4)
}

/// The 4-bit (Q4_K) or 5-bit (Q5_K) code of weight `l` (< 32) of sub-block `s` (< 8).
#[inline(always)]
pub(crate) fn k_code(format: WeightFormat, block: &[u8], s: usize, l: usize) -> u8 {
    let qs_at = if format == WeightFormat::Q5_K { 48 } else { 16 };
    let byte = block[qs_at + 32 * (s / 2) + l];
    let nibble = if s % 2 == 1 { byte >> 4 } else { byte & 0xF };
    if format == WeightFormat::Q5_K {
        nibble | (((block[16 + l] >> s) & 1) << 4)
    } else {
        nibble
    }
}

/// The 5-bit code of weight `j` (< 32) of a Q5_0 / Q5_1 block whose `qh` is at `qh_at`.
#[inline(always)]
pub(crate) fn q5_code(block: &[u8], qh_at: usize, j: usize) -> u8 {
    let qh = u32::from_le_bytes([block[qh_at], block[qh_at + 1], block[qh_at + 2], block[qh_at + 3]]);
    let qs = block[qh_at + 4 + j % 16];
    let nibble = if j >= 16 { qs >> 4 } else { qs & 0xF };
    nibble | ((((qh >> j) & 1) as u8) << 4)
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

/// Dequantizes one row stored in `format` into `out`, exactly as `gguf-py`'s numpy
/// reference does (same f32 operations in the same order; see the module docs).
///
/// `row` must hold exactly `out.len() / format.block_len()` blocks.
///
/// # Panics
/// If the lengths disagree (a programming error: the model loader validates shapes).
pub fn dequantize_row(format: WeightFormat, row: &[u8], out: &mut [f32]) {
    let (block_len, block_bytes) = (format.block_len(), format.block_bytes());
    assert_eq!(out.len() % block_len, 0, "row length must be a multiple of the format's block length");
    assert_eq!(row.len(), out.len() / block_len * block_bytes, "row bytes disagree with length");
    for (block, values) in row.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block_len)) {
        match format {
            WeightFormat::Q4_0 => {
                let d = read_f16(block, 0);
                let qs = &block[2..18];
                for j in 0..16 {
                    values[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
                    values[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
                }
            }
            WeightFormat::Q4_1 => {
                let (d, m) = (read_f16(block, 0), read_f16(block, 2));
                let qs = &block[4..20];
                for j in 0..16 {
                    values[j] = d * (qs[j] & 0xF) as f32 + m;
                    values[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
            }
            WeightFormat::Q8_0 => {
                let d = read_f16(block, 0);
                for (value, &q) in values.iter_mut().zip(&block[2..34]) {
                    *value = d * (q as i8) as f32;
                }
            }
            WeightFormat::Q5_0 => {
                let d = read_f16(block, 0);
                for (j, value) in values.iter_mut().enumerate() {
                    *value = d * (q5_code(block, 2, j) as i32 - 16) as f32;
                }
            }
            WeightFormat::Q5_1 => {
                let (d, m) = (read_f16(block, 0), read_f16(block, 2));
                for (j, value) in values.iter_mut().enumerate() {
                    *value = d * q5_code(block, 4, j) as f32 + m;
                }
            }
            WeightFormat::Q4_K | WeightFormat::Q5_K => {
                let (d, dmin) = (read_f16(block, 0), read_f16(block, 2));
                for (s, sub) in values.chunks_exact_mut(BLOCK_LEN).enumerate() {
                    let (sc, m) = k_scale_min(&block[4..16], s);
                    let (ds, dm) = (d * sc as f32, dmin * m as f32);
                    for (l, value) in sub.iter_mut().enumerate() {
                        *value = ds * k_code(format, block, s, l) as f32 - dm;
                    }
                }
            }
            WeightFormat::Q6_K => {
                let d = read_f16(block, 208);
                for (n, half) in values.chunks_exact_mut(128).enumerate() {
                    for k in 0..4 {
                        for l in 0..32 {
                            let sc = block[192 + 8 * n + 2 * k + l / 16] as i8;
                            half[32 * k + l] = (d * sc as f32) * (q6_k_code(block, n, k, l) as i32 - 32) as f32;
                        }
                    }
                }
            }
        }
    }
}

/// Quantizes `values` (a multiple of `format.block_len()` long) into `format` by rounding to
/// nearest. Q4_0, Q4_1 and Q8_0 follow llama.cpp's reference quantizers; Q5_0 and Q5_1
/// follow them too; the K-quants use a plain round-to-nearest (each sub-block's range sets
/// its scale, the largest scale sets the super-block's `d`) — good enough for test data and
/// small models, not llama.cpp's search-based quantizer.
///
/// # Panics
/// If `out` is not exactly the row's size in `format`.
pub fn quantize_row(format: WeightFormat, values: &[f32], out: &mut [u8]) {
    let (block_len, block_bytes) = (format.block_len(), format.block_bytes());
    assert_eq!(values.len() % block_len, 0, "row length must be a multiple of the format's block length");
    assert_eq!(out.len(), values.len() / block_len * block_bytes, "output size disagrees");
    for (x, block) in values.chunks_exact(block_len).zip(out.chunks_exact_mut(block_bytes)) {
        match format {
            WeightFormat::Q4_0 | WeightFormat::Q5_0 => {
                // The value of largest magnitude maps to the most negative code, as in llama.cpp.
                let (half, bits) = if format == WeightFormat::Q4_0 { (8.0, 15) } else { (16.0, 31) };
                let mut max = 0.0f32;
                for &v in x {
                    if abs(v) > abs(max) {
                        max = v;
                    }
                }
                let d = max / -half;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                write_f16(block, 0, d);
                let q = |v: f32| ((v * id + (half + 0.5)) as i32).clamp(0, bits) as u8;
                pack_low_codes(format, block, |j| q(x[j]));
            }
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => {
                let levels = if format == WeightFormat::Q4_1 { 15 } else { 31 };
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / levels as f32;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                write_f16(block, 0, d);
                write_f16(block, 2, min);
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, levels) as u8;
                pack_low_codes(format, block, |j| q(x[j]));
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
            WeightFormat::Q4_K | WeightFormat::Q5_K => quantize_k(format, x, block),
            WeightFormat::Q6_K => quantize_q6_k(x, block),
        }
    }
}

/// Stores 32 codes (4 or 5 bits) of a classic block: nibbles in `qs`, bit 4 in `qh`.
fn pack_low_codes(format: WeightFormat, block: &mut [u8], code: impl Fn(usize) -> u8) {
    let qh_at = match format {
        WeightFormat::Q5_0 => Some(2),
        WeightFormat::Q5_1 => Some(4),
        _ => None,
    };
    let qs_at = match format {
        WeightFormat::Q4_0 => 2,
        WeightFormat::Q4_1 => 4,
        _ => qh_at.unwrap_or(0) + 4,
    };
    let mut qh = 0u32;
    for j in 0..16 {
        let (lo, hi) = (code(j), code(j + 16));
        block[qs_at + j] = (lo & 0xF) | ((hi & 0xF) << 4);
        qh |= ((lo >> 4) as u32 & 1) << j | ((hi >> 4) as u32 & 1) << (j + 16);
    }
    if let Some(at) = qh_at {
        block[at..at + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Rounds `v` to the nearest integer in `lo..=hi`.
fn round_clamped(v: f32, lo: i32, hi: i32) -> i32 {
    round_to_i32(v.clamp(lo as f32 - 1.0, hi as f32 + 1.0)).clamp(lo, hi)
}

/// Round-to-nearest Q4_K / Q5_K super-block (see [`quantize_row`]).
fn quantize_k(format: WeightFormat, x: &[f32], block: &mut [u8]) {
    let levels = if format == WeightFormat::Q4_K { 15 } else { 31 };
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (s, sub) in x.chunks_exact(BLOCK_LEN).enumerate() {
        let min = sub.iter().copied().fold(0.0f32, f32::min);
        let max = sub.iter().copied().fold(0.0f32, f32::max);
        scales[s] = (max - min) / levels as f32;
        mins[s] = -min;
    }
    let d = scales.iter().copied().fold(0.0f32, f32::max) / 63.0;
    let dmin = mins.iter().copied().fold(0.0f32, f32::max) / 63.0;
    write_f16(block, 0, d);
    write_f16(block, 2, dmin);
    let (d, dmin) = (read_f16(block, 0), read_f16(block, 2));
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for s in 0..8 {
        sc[s] = if d > 0.0 { round_clamped(scales[s] / d, 0, 63) as u8 } else { 0 };
        m[s] = if dmin > 0.0 { round_clamped(mins[s] / dmin, 0, 63) as u8 } else { 0 };
    }
    pack_k_scales(&sc, &m, &mut block[4..16]);
    let qs_at = if format == WeightFormat::Q4_K { 16 } else { 48 };
    block[qs_at..qs_at + 128].fill(0);
    if format == WeightFormat::Q5_K {
        block[16..48].fill(0);
    }
    for (s, sub) in x.chunks_exact(BLOCK_LEN).enumerate() {
        let (ds, dm) = (d * sc[s] as f32, dmin * m[s] as f32);
        for (l, &v) in sub.iter().enumerate() {
            let q = if ds > 0.0 { round_clamped((v + dm) / ds, 0, levels) as u8 } else { 0 };
            block[qs_at + 32 * (s / 2) + l] |= (q & 0xF) << (4 * (s % 2));
            if format == WeightFormat::Q5_K {
                block[16 + l] |= (q >> 4) << s;
            }
        }
    }
}

/// Round-to-nearest Q6_K super-block (see [`quantize_row`]).
fn quantize_q6_k(x: &[f32], block: &mut [u8]) {
    let mut scales = [0f32; 16];
    for (s, sub) in x.chunks_exact(16).enumerate() {
        let mut max = 0.0f32;
        for &v in sub {
            if abs(v) > abs(max) {
                max = v;
            }
        }
        scales[s] = max / -32.0;
    }
    let amax = scales.iter().fold(0.0f32, |m, &v| m.max(abs(v)));
    write_f16(block, 208, amax / 127.0);
    let d = read_f16(block, 208);
    block[..192].fill(0);
    for s in 0..16 {
        let sc = if d > 0.0 { round_clamped(scales[s] / d, -128, 127) } else { 0 };
        block[192 + s] = sc as i8 as u8;
    }
    for (n, half) in x.chunks_exact(128).enumerate() {
        for k in 0..4 {
            for l in 0..32 {
                let ds = d * (block[192 + 8 * n + 2 * k + l / 16] as i8) as f32;
                let q = if ds != 0.0 { round_clamped(half[32 * k + l] / ds, -32, 31) + 32 } else { 32 } as u8;
                block[64 * n + 32 * (k & 1) + l] |= (q & 0xF) << (4 * (k >> 1));
                block[128 + 32 * n + l] |= (q >> 4) << (2 * k);
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

    /// `dequantize_row` against llama.cpp's numpy reference (`gguf-py`), bit for bit, on
    /// random blocks (see scripts/make_kquant_fixture.py for the file layout).
    #[cfg(feature = "std")]
    #[test]
    fn dequantize_matches_gguf_py() {
        let fixture: &[u8] = include_bytes!("../../testdata/quant/dequant_fixture.bin");
        let u32_at = |at: usize| u32::from_le_bytes(fixture[at..at + 4].try_into().unwrap()) as usize;
        let mut at = 0;
        let mut seen = std::vec::Vec::new();
        while at < fixture.len() {
            let name = core::str::from_utf8(&fixture[at..at + 8]).unwrap().trim_end_matches('\0');
            let (blocks, bb, bl) = (u32_at(at + 8), u32_at(at + 12), u32_at(at + 16));
            at += 20;
            let format = WeightFormat::ALL.into_iter().find(|f| f.name() == name).expect("known format");
            assert_eq!((format.block_bytes(), format.block_len()), (bb, bl), "{name}");
            let data = &fixture[at..at + blocks * bb];
            at += blocks * bb;
            let want: std::vec::Vec<f32> = fixture[at..at + blocks * bl * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            at += blocks * bl * 4;
            let mut got = std::vec![0f32; blocks * bl];
            dequantize_row(format, data, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{name} value {i}: {g} vs numpy {w}");
            }
            seen.push(format);
        }
        assert_eq!(seen, WeightFormat::ALL);
    }

    #[test]
    fn k_scales_round_trip() {
        let sc = [1u8, 63, 17, 0, 33, 62, 5, 48];
        let m = [63u8, 0, 9, 41, 16, 31, 60, 2];
        let mut packed = [0u8; 12];
        pack_k_scales(&sc, &m, &mut packed);
        for j in 0..8 {
            assert_eq!(k_scale_min(&packed, j), (sc[j], m[j]));
        }
    }

    #[test]
    fn validation_rejects_non_finite_scales() {
        for format in WeightFormat::ALL {
            let mut row = [0u8; 420];
            let row = &mut row[..2 * format.block_bytes()];
            assert_eq!(validate_row(format, row), Ok(()));
            assert!(validate_row(format, &row[1..]).is_err());
            for &(at, _) in format.f16_fields() {
                let mut bad = [0u8; 420];
                let bad = &mut bad[..row.len()];
                let at = format.block_bytes() + at;
                bad[at..at + 2].copy_from_slice(&0x7E00u16.to_le_bytes());
                assert_eq!(validate_row(format, bad).map_err(|e| e.block), Err(1), "{format:?}");
                bad[at..at + 2].copy_from_slice(&0xFC00u16.to_le_bytes());
                assert!(validate_row(format, bad).is_err());
            }
        }
    }

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
        for format in WeightFormat::ALL {
            let mut packed = [0u8; 544];
            let bytes = format.row_bytes(512).unwrap();
            let values: [f32; 512] = core::array::from_fn(|i| values[i % 64]);
            quantize_row(format, &values, &mut packed[..bytes]);
            let mut back = [0f32; 512];
            dequantize_row(format, &packed[..bytes], &mut back);
            let step = match format {
                WeightFormat::Q8_0 => 4.5 / 127.0,
                WeightFormat::Q4_0 | WeightFormat::Q4_1 => 9.0 / 15.0,
                WeightFormat::Q4_K => 9.0 / 15.0 + 0.1,
                _ => 9.0 / 31.0 + 0.1,
            };
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{format:?}: {a} vs {b}");
            }
        }
    }
}
