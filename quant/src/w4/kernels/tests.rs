//! Every instruction set against the scalar reference, bit for bit, on random shapes:
//! columns not a multiple of any vector width, one token and several, odd row counts,
//! partial panel ranges, every group size, int4 and int8 activations.

use proptest::prelude::*;
use std::vec::Vec;

use super::W4Kernels;
use crate::dot::Isa;
use crate::w4::activation::{quantize_token, ActBits, TokenBatch};
use crate::w4::{pack, pad_cols, GroupSize, W4Matrix, W4Shape};

/// An owned W4 matrix with codes and scales from a seed (extreme codes included).
pub(crate) struct Fixture {
    pub shape: W4Shape,
    pub packed: Vec<u8>,
    pub scales: Vec<u8>,
}

impl Fixture {
    pub fn new(rows: usize, cols: usize, group: GroupSize, seed: u64) -> Self {
        let shape = W4Shape { rows, cols, group };
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let codes: Vec<i8> = (0..rows * cols)
            .map(|_| match next() % 8 {
                0 => -8,
                1 => 7,
                _ => (next() % 16) as i8 - 8,
            })
            .collect();
        let scales: Vec<f32> = (0..rows * shape.groups()).map(|_| (next() % 1000) as f32 * 1e-4).collect();
        let (mut packed, mut sb) = (std::vec![0u8; shape.packed_bytes()], std::vec![0u8; shape.scale_count() * 2]);
        pack(&shape, &codes, &scales, &mut packed, &mut sb);
        Fixture { shape, packed, scales: sb }
    }

    pub fn matrix(&self) -> W4Matrix<'_> {
        W4Matrix::new(self.shape, &self.packed, &self.scales).unwrap()
    }
}

/// Owned quantized tokens.
pub(crate) struct Tokens {
    pub tokens: usize,
    pub f32: Vec<f32>,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
}

impl Tokens {
    pub fn new(tokens: usize, cols: usize, group: GroupSize, bits: ActBits, seed: u64) -> Self {
        let pc = pad_cols(cols);
        let mut f32 = std::vec![0f32; tokens * pc];
        for t in 0..tokens {
            for c in 0..cols {
                let v = ((seed as usize + t * 131 + c * 7919) % 1013) as f32 / 101.3 - 5.0;
                f32[t * pc + c] = if c % 17 == 3 { v * 20.0 } else { v };
            }
        }
        let groups = group.groups(cols);
        let (mut codes, mut scales, mut sums) =
            (std::vec![0i8; tokens * pc], std::vec![0f32; tokens * groups], std::vec![0i32; tokens * groups]);
        for t in 0..tokens {
            quantize_token(
                &f32[t * pc..t * pc + cols],
                bits,
                0.9,
                group,
                &mut codes[t * pc..(t + 1) * pc],
                &mut sums[t * groups..(t + 1) * groups],
                &mut scales[t * groups..(t + 1) * groups],
            );
        }
        Tokens { tokens, f32, codes, scales, sums }
    }

    pub fn batch(&self, cols: usize, group: GroupSize) -> TokenBatch<'_> {
        TokenBatch { tokens: self.tokens, cols, group, codes: &self.codes, scales: &self.scales, sums: &self.sums }
    }
}

fn group_of(i: u8) -> GroupSize {
    [GroupSize::PerChannel, GroupSize::G32, GroupSize::G64, GroupSize::G128][i as usize % 4]
}

fn check_every_isa(rows: usize, cols: usize, tokens: usize, group: GroupSize, bits: ActBits, seed: u64) {
    let fixture = Fixture::new(rows, cols, group, seed);
    let w = fixture.matrix();
    let x = Tokens::new(tokens, cols, group, bits, seed);
    let batch = x.batch(cols, group);
    let panels = w.shape().panels();
    let stride = rows + 3;
    let run = |k: &W4Kernels, int: bool, range: core::ops::Range<usize>| {
        let mut out = std::vec![f32::NAN; tokens * stride];
        if int {
            k.gemm_int(&w, range, &batch, &mut out, stride);
        } else {
            k.gemm_float(&w, range, &x.f32, tokens, &mut out, stride);
        }
        out
    };
    let scalar = W4Kernels::scalar();
    for int in [true, false] {
        // Whole matrix, and a range that starts after the first panel.
        for range in [0..panels, panels / 2..panels] {
            let reference = run(&scalar, int, range.clone());
            for isa in Isa::ALL {
                if let Some(k) = W4Kernels::for_isa(isa) {
                    let got = run(&k, int, range.clone());
                    for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{isa:?} int={int} {rows}x{cols} t={tokens} {group:?} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn reference_matches_dequantized_products() {
    let (rows, cols, tokens) = (19, 77, 3);
    for group in [GroupSize::PerChannel, GroupSize::G32, GroupSize::G64] {
        let fixture = Fixture::new(rows, cols, group, 5);
        let w = fixture.matrix();
        let x = Tokens::new(tokens, cols, group, ActBits::A4, 9);
        let (mut int_out, mut float_out) = (std::vec![0f32; tokens * rows], std::vec![0f32; tokens * rows]);
        W4Kernels::scalar().gemm_int(&w, 0..w.shape().panels(), &x.batch(cols, group), &mut int_out, rows);
        W4Kernels::scalar().gemm_float(&w, 0..w.shape().panels(), &x.f32, tokens, &mut float_out, rows);
        let mut row = std::vec![0f32; cols];
        let (pc, groups, len) = (pad_cols(cols), group.groups(cols), group.elements(cols));
        for r in 0..rows {
            w.dequantize_row(r, &mut row);
            for t in 0..tokens {
                let dot = |xs: &dyn Fn(usize) -> f64| (0..cols).map(|c| row[c] as f64 * xs(c)).sum::<f64>();
                // Activations dequantized with their group's scale.
                let exact_int = dot(&|c| x.codes[t * pc + c] as f64 * x.scales[t * groups + c / len] as f64);
                let exact_float = dot(&|c| x.f32[t * pc + c] as f64);
                assert!((int_out[t * rows + r] as f64 - exact_int).abs() <= 1e-4 * (1.0 + exact_int.abs()));
                assert!((float_out[t * rows + r] as f64 - exact_float).abs() <= 1e-4 * (1.0 + exact_float.abs()));
            }
        }
    }
}

#[test]
fn smollm2_shapes_match_the_reference() {
    check_every_isa(64, 576, 5, GroupSize::PerChannel, ActBits::A4, 1);
    check_every_isa(48, 1536, 1, GroupSize::G128, ActBits::A8, 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn every_isa_matches_the_reference(
        rows in 1usize..70, cols in 1usize..300, tokens in 1usize..9, group in 0u8..4, a8 in any::<bool>(), seed in any::<u64>(),
    ) {
        let bits = if a8 { ActBits::A8 } else { ActBits::A4 };
        check_every_isa(rows, cols, tokens, group_of(group), bits, seed);
    }
}

#[test]
fn smollm2_shapes_with_more_tokens_match_the_reference() {
    for (rows, cols) in [(1536, 576), (576, 1536)] {
        for (i, tokens) in [1, 4, 7, 64].into_iter().enumerate() {
            let group = group_of(i as u8);
            check_every_isa(rows, cols, tokens, group, if i % 2 == 0 { ActBits::A4 } else { ActBits::A8 }, i as u64);
        }
    }
}

/// Extreme codes on rows long enough for the VNNI kernels' high-nibble accumulators to be
/// folded mid-row (every 16384 octs) at their bound (`4 · 240 · 127` per oct).
#[test]
fn extreme_codes_on_very_long_rows_match_the_reference() {
    let (rows, cols) = (20, 16384 * 8 + 72);
    let shape = W4Shape { rows, cols, group: GroupSize::PerChannel };
    let codes: Vec<i8> = (0..rows * cols).map(|i| if i % cols < 3 { -8 } else { 7 }).collect();
    let scales: Vec<f32> = (0..rows).map(|r| 1e-3 * (r + 1) as f32).collect();
    let (mut packed, mut sb) = (std::vec![0u8; shape.packed_bytes()], std::vec![0u8; shape.scale_count() * 2]);
    pack(&shape, &codes, &scales, &mut packed, &mut sb);
    let w = W4Matrix::new(shape, &packed, &sb).unwrap();
    for tokens in [1, 2] {
        let pc = pad_cols(cols);
        let mut xc = std::vec![0i8; tokens * pc];
        for t in 0..tokens {
            xc[t * pc..t * pc + cols].fill(if t == 0 { 127 } else { -127 });
        }
        let sums: Vec<i32> = (0..tokens).map(|t| xc[t * pc..(t + 1) * pc].iter().map(|&q| q as i32).sum()).collect();
        let xs: Vec<f32> = (0..tokens).map(|t| 0.5 + t as f32).collect();
        let batch = TokenBatch { tokens, cols, group: GroupSize::PerChannel, codes: &xc, scales: &xs, sums: &sums };
        let mut reference = std::vec![0f32; tokens * rows];
        W4Kernels::scalar().gemm_int(&w, 0..shape.panels(), &batch, &mut reference, rows);
        for isa in Isa::ALL {
            if let Some(k) = W4Kernels::for_isa(isa) {
                let mut got = std::vec![0f32; tokens * rows];
                k.gemm_int(&w, 0..shape.panels(), &batch, &mut got, rows);
                assert_eq!(got, reference, "{isa:?} t={tokens}");
            }
        }
    }
}

/// The lookup-table kernel of every instruction set that has one against the scalar
/// reference, bit for bit, on the whole matrix and on a range of blocks that starts later.
fn check_lut(rows: usize, cols: usize, tokens: usize, group: GroupSize, seed: u64) {
    use super::lut::{LutKernel, LutMatrix};
    let fixture = Fixture::new(rows, cols, group, seed);
    let w = fixture.matrix();
    let lut = LutMatrix::new(&w);
    let x = Tokens::new(tokens, cols, group, ActBits::A4, seed);
    let batch = x.batch(cols, group);
    let stride = rows + 5;
    let blocks = lut.blocks();
    for range in [0..blocks, blocks / 2..blocks] {
        let panels = (range.start * 4).min(w.shape().panels())..w.shape().panels();
        let mut reference = std::vec![f32::NAN; tokens * stride];
        W4Kernels::scalar().gemm_int(&w, panels, &batch, &mut reference, stride);
        for isa in Isa::ALL {
            if let Some(k) = LutKernel::for_isa(isa) {
                let mut got = std::vec![f32::NAN; tokens * stride];
                k.gemm_int(&lut, range.clone(), &batch, &mut got, stride).unwrap();
                for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "lut {isa:?} {rows}x{cols} t={tokens} {group:?} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn lut_matches_the_reference_on_smollm2_shapes() {
    check_lut(576, 576, 5, GroupSize::PerChannel, 3);
    check_lut(192, 576, 9, GroupSize::G32, 4);
    check_lut(1536, 576, 1, GroupSize::G128, 5);
    check_lut(576, 1536, 4, GroupSize::PerChannel, 6);
}

/// Every product at its maximum (`-8 · -8`) over more than `FLUSH_PAIRS` column pairs: the
/// 16-bit accumulators run at their bound and the results must still be exact.
#[test]
fn lut_is_exact_at_the_accumulator_bounds() {
    use super::lut::{lut_gemm_int, LutMatrix, FLUSH_PAIRS};
    let (rows, cols) = (70, 2 * FLUSH_PAIRS * 3 + 8);
    for group in [GroupSize::PerChannel, GroupSize::G128] {
        let shape = W4Shape { rows, cols, group };
        let codes = std::vec![-8i8; rows * cols];
        let scales = std::vec![0.5f32; rows * shape.groups()];
        let (mut packed, mut sb) = (std::vec![0u8; shape.packed_bytes()], std::vec![0u8; shape.scale_count() * 2]);
        pack(&shape, &codes, &scales, &mut packed, &mut sb);
        let w = W4Matrix::new(shape, &packed, &sb).unwrap();
        let tokens = 3;
        let pc = pad_cols(cols);
        let mut xc = std::vec![0i8; tokens * pc];
        for t in 0..tokens {
            xc[t * pc..t * pc + cols].fill(-8);
        }
        let sums: Vec<i32> = (0..tokens * shape.groups())
            .map(|i| {
                let g = i % shape.groups();
                let len = shape.group_len();
                -8 * ((g + 1) * len).min(cols).saturating_sub(g * len) as i32
            })
            .collect();
        let xs = std::vec![0.25f32; tokens * shape.groups()];
        let batch = TokenBatch { tokens, cols, group, codes: &xc, scales: &xs, sums: &sums };
        let mut reference = std::vec![0f32; tokens * rows];
        W4Kernels::scalar().gemm_int(&w, 0..shape.panels(), &batch, &mut reference, rows);
        assert_eq!(reference[0], 0.5 * 64.0 * cols as f32 * 0.25);
        let mut got = std::vec![0f32; tokens * rows];
        match lut_gemm_int(&LutMatrix::new(&w), &batch, &mut got, rows) {
            Ok(()) => assert_eq!(got, reference),
            Err(e) => assert_eq!(e, super::lut::LutError::Unsupported),
        }
    }
}

#[test]
fn lut_rejects_int8_activations() {
    use super::lut::{LutKernel, LutMatrix};
    let (rows, cols, group) = (20, 40, GroupSize::G32);
    let fixture = Fixture::new(rows, cols, group, 1);
    let lut = LutMatrix::new(&fixture.matrix());
    let x = Tokens::new(2, cols, group, ActBits::A8, 1);
    let mut out = std::vec![1f32; 2 * rows];
    for isa in Isa::ALL {
        if let Some(k) = LutKernel::for_isa(isa) {
            assert_eq!(
                k.gemm_int(&lut, 0..lut.blocks(), &x.batch(cols, group), &mut out, rows),
                Err(super::lut::LutError::NotInt4)
            );
            assert!(out.iter().all(|&v| v == 1.0));
        }
    }
}

/// `PROPTEST_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]
    #[test]
    fn lut_matches_the_reference(
        rows in 1usize..200, cols in 1usize..600, tokens in 1usize..11, group in 0u8..4, seed in any::<u64>(),
    ) {
        check_lut(rows, cols, tokens, group_of(group), seed);
    }
}
