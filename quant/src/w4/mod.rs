//! W4: symmetric int4 weights in 16-row panels, the weight format of Petrel's W4A4, W4A8
//! and W4A16 schemes, and ([`activation`]) the int4/int8 activations they meet, quantized
//! per token with a scale per weight group.
//!
//! # Codes and scales
//! A weight is `w ≈ s · q` with a code `q ∈ [-8, 7]` (symmetric: no zero point) and a
//! scale `s ≥ 0` shared by one output row (per channel) or by a group of 32, 64 or 128
//! consecutive inputs of a row ([`GroupSize`]). Scales are stored as IEEE f16; codes are
//! computed against the f16-rounded scale ([`round_scale`]).
//!
//! # Packed layout (`packed`, `padded_rows · padded_cols / 2` bytes)
//! Rows are padded to a multiple of [`PANEL_ROWS`] = 16 and columns to a multiple of
//! [`OCT`] = 8 with code 0. The matrix is cut into panels of 16 rows; a panel is stored as
//! `padded_cols / 8` consecutive 64-byte blocks, one per *oct* of 8 columns. In the block of
//! panel `p` and oct `o` (at byte `(p · padded_cols / 8 + o) · 64`), byte `4·i + j`
//! (`i < 16`, `j < 4`) holds, as offset-binary nibbles `q + 8`:
//! - low nibble: row `16p + i`, column `8o + j`;
//! - high nibble: row `16p + i`, column `8o + 4 + j`.
//!
//! So one 64-byte load gives, after a mask and a shift, the 16 rows × 4 columns that one
//! AVX-512 `vpdpbusd` (or four NEON `sdot`s) multiplies with a broadcast quad of activations,
//! and the zip of the two halves gives the 2 × 8 tiles of Arm's `smmla`.
//!
//! # Scales layout (`scales`, `padded_rows · groups` little-endian f16)
//! Panel-major, then group, then the panel's 16 rows: the scale of row `16p + i` and group
//! `g` is element `(p · groups + g) · 16 + i`. Padding rows have scale 0.

pub mod activation;
pub mod kernels;

use crate::blocks::round_to_i32;

/// Rows per panel of the packed layout.
pub const PANEL_ROWS: usize = 16;
/// Columns per 64-byte block of the packed layout.
pub const OCT: usize = 8;
/// Bytes of one panel block (16 rows × 8 columns of nibbles).
pub const PANEL_BLOCK_BYTES: usize = PANEL_ROWS * OCT / 2;
/// Smallest and largest weight code.
pub const CODE_MIN: i32 = -8;
/// Largest weight code.
pub const CODE_MAX: i32 = 7;

/// How many consecutive inputs of a row share one weight scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupSize {
    /// One scale per output row.
    PerChannel,
    /// One scale per 32 inputs.
    G32,
    /// One scale per 64 inputs.
    G64,
    /// One scale per 128 inputs.
    G128,
}

impl GroupSize {
    /// From the number stored in files: 0 for per channel, else 32, 64 or 128.
    pub const fn from_len(len: u32) -> Option<Self> {
        Some(match len {
            0 => GroupSize::PerChannel,
            32 => GroupSize::G32,
            64 => GroupSize::G64,
            128 => GroupSize::G128,
            _ => return None,
        })
    }

    /// The number stored in files: 0 for per channel, else the group length.
    pub const fn as_len(self) -> u32 {
        match self {
            GroupSize::PerChannel => 0,
            GroupSize::G32 => 32,
            GroupSize::G64 => 64,
            GroupSize::G128 => 128,
        }
    }

    /// Inputs per group for a row of `cols` inputs (per channel: the padded row).
    pub const fn elements(self, cols: usize) -> usize {
        match self {
            GroupSize::PerChannel => pad_cols(cols),
            g => g.as_len() as usize,
        }
    }

    /// Groups per row of `cols` inputs (the last one may be short).
    pub const fn groups(self, cols: usize) -> usize {
        match self {
            GroupSize::PerChannel => 1,
            g => cols.div_ceil(g.as_len() as usize),
        }
    }
}

/// `rows` rounded up to whole panels.
pub const fn pad_rows(rows: usize) -> usize {
    rows.div_ceil(PANEL_ROWS) * PANEL_ROWS
}

/// `cols` rounded up to whole octs.
pub const fn pad_cols(cols: usize) -> usize {
    cols.div_ceil(OCT) * OCT
}

/// The shape of a W4 matrix: `rows` outputs × `cols` inputs, and its scale groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4Shape {
    /// Output features (rows of the weight matrix).
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Scale grouping along the inputs.
    pub group: GroupSize,
}

impl W4Shape {
    /// Rows padded to whole panels.
    pub const fn padded_rows(&self) -> usize {
        pad_rows(self.rows)
    }

    /// Columns padded to whole octs.
    pub const fn padded_cols(&self) -> usize {
        pad_cols(self.cols)
    }

    /// Number of 16-row panels.
    pub const fn panels(&self) -> usize {
        self.padded_rows() / PANEL_ROWS
    }

    /// Scale groups per row.
    pub const fn groups(&self) -> usize {
        self.group.groups(self.cols)
    }

    /// Inputs per group (the last group of a row may be shorter).
    pub const fn group_len(&self) -> usize {
        self.group.elements(self.cols)
    }

    /// Bytes of the packed codes.
    pub const fn packed_bytes(&self) -> usize {
        self.padded_rows() * self.padded_cols() / 2
    }

    /// Number of f16 scales.
    pub const fn scale_count(&self) -> usize {
        self.padded_rows() * self.groups()
    }

    /// Byte offset of the block of panel `p`, oct `o` in the packed codes.
    #[inline(always)]
    pub const fn block_offset(&self, p: usize, o: usize) -> usize {
        (p * (self.padded_cols() / OCT) + o) * PANEL_BLOCK_BYTES
    }

    /// Index of the scale of row `r`, group `g`.
    #[inline(always)]
    pub const fn scale_index(&self, r: usize, g: usize) -> usize {
        ((r / PANEL_ROWS) * self.groups() + g) * PANEL_ROWS + r % PANEL_ROWS
    }
}

/// Why bytes do not form a valid W4 matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum W4Error {
    /// The packed codes are not `expected` bytes long.
    PackedSize { expected: usize, found: usize },
    /// The scales are not `expected` bytes long.
    ScalesSize { expected: usize, found: usize },
    /// Scale number `index` is negative, infinite or NaN.
    BadScale { index: usize },
    /// A matrix with no rows or no columns.
    Empty,
}

impl core::fmt::Display for W4Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            W4Error::PackedSize { expected, found } => {
                write!(f, "packed int4 codes are {found} bytes, the shape needs {expected}")
            }
            W4Error::ScalesSize { expected, found } => {
                write!(f, "scales are {found} bytes, the shape and group size need {expected}")
            }
            W4Error::BadScale { index } => write!(f, "scale {index} is negative, infinite or NaN"),
            W4Error::Empty => write!(f, "matrix has no rows or no columns"),
        }
    }
}

/// A W4 matrix borrowed from a model file (see the module docs for both layouts).
#[derive(Clone, Copy, Debug)]
pub struct W4Matrix<'a> {
    shape: W4Shape,
    packed: &'a [u8],
    scales: &'a [u8],
}

impl<'a> W4Matrix<'a> {
    /// Checks the byte counts against `shape` and every scale for being finite and
    /// non-negative (padding rows included), so kernels never see a malformed matrix.
    pub fn new(shape: W4Shape, packed: &'a [u8], scales: &'a [u8]) -> Result<Self, W4Error> {
        if shape.rows == 0 || shape.cols == 0 {
            return Err(W4Error::Empty);
        }
        if packed.len() != shape.packed_bytes() {
            return Err(W4Error::PackedSize { expected: shape.packed_bytes(), found: packed.len() });
        }
        if scales.len() != shape.scale_count() * 2 {
            return Err(W4Error::ScalesSize { expected: shape.scale_count() * 2, found: scales.len() });
        }
        for (index, b) in scales.chunks_exact(2).enumerate() {
            let s = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
            if !s.is_finite() || s.is_sign_negative() && s.to_f32() != 0.0 {
                return Err(W4Error::BadScale { index });
            }
        }
        Ok(W4Matrix { shape, packed, scales })
    }

    /// The shape.
    #[inline(always)]
    pub fn shape(&self) -> &W4Shape {
        &self.shape
    }

    /// The packed codes.
    #[inline(always)]
    pub fn packed(&self) -> &'a [u8] {
        self.packed
    }

    /// The scales' bytes (little-endian f16).
    #[inline(always)]
    pub fn scale_bytes(&self) -> &'a [u8] {
        self.scales
    }

    /// Code of row `r`, column `c` (both may address padding).
    #[inline]
    pub fn code(&self, r: usize, c: usize) -> i8 {
        code_at(&self.shape, self.packed, r, c)
    }

    /// Scale of row `r`, group `g`.
    #[inline]
    pub fn scale(&self, r: usize, g: usize) -> f32 {
        let at = self.shape.scale_index(r, g) * 2;
        crate::blocks::f16_to_f32(u16::from_le_bytes([self.scales[at], self.scales[at + 1]]))
    }

    /// Writes row `r` dequantized (`s · q`) into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let len = self.shape.group_len();
        for (c, o) in out[..self.shape.cols].iter_mut().enumerate() {
            *o = self.scale(r, c / len) * self.code(r, c) as f32;
        }
    }
}

#[inline(always)]
fn code_at(shape: &W4Shape, packed: &[u8], r: usize, c: usize) -> i8 {
    let (p, i, o, j) = (r / PANEL_ROWS, r % PANEL_ROWS, c / OCT, c % OCT);
    let byte = packed[shape.block_offset(p, o) + 4 * i + j % 4];
    let nibble = if j < 4 { byte & 0xF } else { byte >> 4 };
    nibble as i8 - 8
}

/// `s` rounded to the nearest f16 value: the scale the file will hold, which codes must be
/// computed against.
pub fn round_scale(s: f32) -> f32 {
    half::f16::from_f32(s).to_f32()
}

/// The code of `w` under scale `s` (an already [`round_scale`]d value): `round(w / s)`
/// clamped to `[-8, 7]`, or 0 when `s` is 0.
#[inline]
pub fn quantize_weight(w: f32, s: f32) -> i8 {
    if s == 0.0 {
        return 0;
    }
    round_to_i32(w / s).clamp(CODE_MIN, CODE_MAX) as i8
}

/// Packs `codes` (`rows × cols`, row-major, each in `[-8, 7]`) and `scales`
/// (`rows × groups`, row-major) into the two stored arrays, zero-padding rows and columns.
///
/// # Panics
/// If a slice length disagrees with `shape` or a code is out of range.
pub fn pack(shape: &W4Shape, codes: &[i8], scales: &[f32], packed: &mut [u8], scale_bytes: &mut [u8]) {
    let (rows, cols, groups) = (shape.rows, shape.cols, shape.groups());
    assert!(codes.len() == rows * cols && scales.len() == rows * groups, "pack: input sizes disagree with shape");
    assert!(packed.len() == shape.packed_bytes() && scale_bytes.len() == shape.scale_count() * 2);
    // Code 0 is nibble 8 in both halves of a byte.
    packed.fill(0x88);
    scale_bytes.fill(0);
    for r in 0..rows {
        for c in 0..cols {
            let q = codes[r * cols + c];
            assert!((CODE_MIN..=CODE_MAX).contains(&(q as i32)), "pack: code {q} out of range");
            let (p, i, o, j) = (r / PANEL_ROWS, r % PANEL_ROWS, c / OCT, c % OCT);
            let at = shape.block_offset(p, o) + 4 * i + j % 4;
            let nibble = (q + 8) as u8;
            packed[at] = if j < 4 { (packed[at] & 0xF0) | nibble } else { (packed[at] & 0x0F) | (nibble << 4) };
        }
        for g in 0..groups {
            let at = shape.scale_index(r, g) * 2;
            scale_bytes[at..at + 2]
                .copy_from_slice(&half::f16::from_f32(scales[r * groups + g]).to_bits().to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn shape(rows: usize, cols: usize, group: GroupSize) -> W4Shape {
        W4Shape { rows, cols, group }
    }

    #[test]
    fn pack_round_trips_codes_and_scales() {
        for (rows, cols, group) in [
            (1, 1, GroupSize::PerChannel),
            (17, 13, GroupSize::G32),
            (33, 100, GroupSize::G64),
            (16, 200, GroupSize::G128),
        ] {
            let s = shape(rows, cols, group);
            let codes: vec::Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + i / 3) % 16) as i8 - 8).collect();
            let scales: vec::Vec<f32> = (0..rows * s.groups()).map(|i| 0.01 * (i % 5 + 1) as f32).collect();
            let (mut packed, mut sb) = (vec![0u8; s.packed_bytes()], vec![0u8; s.scale_count() * 2]);
            pack(&s, &codes, &scales, &mut packed, &mut sb);
            let m = W4Matrix::new(s, &packed, &sb).unwrap();
            for r in 0..s.padded_rows() {
                for c in 0..s.padded_cols() {
                    let expected = if r < rows && c < cols { codes[r * cols + c] } else { 0 };
                    assert_eq!(m.code(r, c), expected, "{r} {c}");
                }
                for g in 0..s.groups() {
                    let expected = if r < rows { round_scale(scales[r * s.groups() + g]) } else { 0.0 };
                    assert_eq!(m.scale(r, g), expected);
                }
            }
        }
    }

    #[test]
    fn group_counts_cover_ragged_rows() {
        assert_eq!(GroupSize::G128.groups(576), 5);
        assert_eq!(GroupSize::G32.groups(576), 18);
        assert_eq!(GroupSize::PerChannel.groups(577), 1);
        assert_eq!(GroupSize::PerChannel.elements(577), 584);
        let s = shape(576, 1536, GroupSize::G64);
        assert_eq!(s.packed_bytes(), 576 * 1536 / 2);
        assert_eq!(s.scale_count(), 576 * 24);
    }

    #[test]
    fn malformed_matrices_are_rejected() {
        let s = shape(16, 8, GroupSize::PerChannel);
        let packed = vec![0x88u8; 64];
        let mut scales = vec![0u8; 32];
        assert!(W4Matrix::new(s, &packed, &scales).is_ok());
        assert_eq!(
            W4Matrix::new(s, &packed[..63], &scales).unwrap_err(),
            W4Error::PackedSize { expected: 64, found: 63 }
        );
        assert_eq!(
            W4Matrix::new(s, &packed, &scales[..30]).unwrap_err(),
            W4Error::ScalesSize { expected: 32, found: 30 }
        );
        scales[6..8].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes());
        assert_eq!(W4Matrix::new(s, &packed, &scales).unwrap_err(), W4Error::BadScale { index: 3 });
        scales[6..8].copy_from_slice(&half::f16::from_f32(-1.0).to_bits().to_le_bytes());
        assert_eq!(W4Matrix::new(s, &packed, &scales).unwrap_err(), W4Error::BadScale { index: 3 });
        assert_eq!(W4Matrix::new(shape(0, 8, GroupSize::G32), &[], &[]).unwrap_err(), W4Error::Empty);
    }
}
