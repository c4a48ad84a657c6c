//! Every instruction set against the scalar reference, bit for bit, on random shapes with
//! ragged tails (block counts that are not multiples of four) and extreme codes.

use proptest::prelude::*;

use super::{Isa, Kernels};
use crate::activation::{quantize_row_q8, Q8Row, Q8RowMut};
use crate::blocks::{write_f16, WeightFormat, BLOCK_LEN};

const FORMATS: [WeightFormat; 8] = WeightFormat::ALL;

/// Random weight bytes (`blocks` blocks of `format`) with valid, finite f16 scales: `d`
/// from `scales`, a minimum `m` of the opposite sign (Q4_1, Q5_1), a positive `dmin`
/// (Q4_K, Q5_K). Every other byte (codes, K-quant sub-scales) comes from `bytes`.
pub(crate) fn weight_row(format: WeightFormat, blocks: usize, bytes: &[u8], scales: &[f32]) -> std::vec::Vec<u8> {
    let bb = format.block_bytes();
    let mut row: std::vec::Vec<u8> = (0..blocks * bb).map(|i| bytes[i % bytes.len()]).collect();
    for b in 0..blocks {
        for (i, &(at, _)) in format.f16_fields().iter().enumerate() {
            let s = scales[(b + i) % scales.len()];
            let value = match (i, format) {
                (0, _) => s,
                (_, WeightFormat::Q4_1 | WeightFormat::Q5_1) => -s * 3.0,
                _ => s * 0.5,
            };
            write_f16(&mut row, b * bb + at, value);
        }
    }
    row
}

/// Every supported ISA's single and four-row kernels against the reference, bit for bit;
/// `x.len()` must be a multiple of `format.block_len()`.
fn check_all_isas(format: WeightFormat, row: &[u8], x: &[f32]) {
    let blocks = x.len() / BLOCK_LEN;
    let mut qs = std::vec![0i8; x.len()];
    let mut scales = std::vec![0f32; blocks];
    let mut sums = std::vec![0i32; blocks];
    quantize_row_q8(x, Q8RowMut { qs: &mut qs, scales: &mut scales, sums: &mut sums });
    let xr = Q8Row { qs: &qs, scales: &scales, sums: &sums };
    let reference = Kernels::scalar().dot(format, row, xr);
    // Four rows: the same row twice and two shifted copies, against single dot products.
    // (The kernels' contract: `sums` are the block sums of `qs`.)
    let shifted: std::vec::Vec<i8> = qs.iter().map(|&q| q.saturating_add(3).clamp(-127, 127)).collect();
    let shifted_sums: std::vec::Vec<i32> =
        shifted.chunks_exact(BLOCK_LEN).map(|b| b.iter().map(|&q| q as i32).sum()).collect();
    let other = Q8Row { qs: &shifted, scales: &scales, sums: &shifted_sums };
    let reference4 = [reference, Kernels::scalar().dot(format, row, other), reference, reference];
    let xs = [xr, other, xr, xr];
    for isa in Isa::ALL {
        if let Some(kernels) = Kernels::for_isa(isa) {
            let got = kernels.dot(format, row, xr);
            assert_eq!(got.to_bits(), reference.to_bits(), "{format:?} {isa:?}: {got} vs {reference}");
            let got4 = kernels.for_format_x4(format)(row, &xs);
            for j in 0..4 {
                assert_eq!(got4[j].to_bits(), reference4[j].to_bits(), "{format:?} {isa:?} x4 row {j}");
            }
        }
    }
}

#[test]
fn reference_matches_dequantized_float_dot() {
    for format in FORMATS {
        for units in [1usize, 3, 4, 7, 18] {
            let blocks = units * format.activation_blocks();
            let x: std::vec::Vec<f32> = (0..blocks * 32).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.5).collect();
            let row = weight_row(format, units, &[0x12, 0xF0, 0x7F, 0x80, 0x5A, 0x0F, 0x33], &[0.01, 0.02, 0.003]);
            let mut w = std::vec![0f32; x.len()];
            crate::blocks::dequantize_row(format, &row, &mut w);
            let mut qs = std::vec![0i8; x.len()];
            let (mut s, mut sums) = (std::vec![0f32; blocks], std::vec![0i32; blocks]);
            quantize_row_q8(&x, Q8RowMut { qs: &mut qs, scales: &mut s, sums: &mut sums });
            let xq: std::vec::Vec<f32> = (0..x.len()).map(|i| s[i / 32] * qs[i] as f32).collect();
            let exact: f64 = w.iter().zip(&xq).map(|(&a, &b)| a as f64 * b as f64).sum();
            let got = Kernels::scalar().dot(format, &row, Q8Row { qs: &qs, scales: &s, sums: &sums });
            let scale: f64 = w.iter().zip(&xq).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            assert!((got as f64 - exact).abs() <= 1e-5 * scale.max(1.0), "{format:?} {blocks}: {got} vs {exact}");
        }
    }
}

#[test]
fn extreme_codes_are_bit_identical() {
    for format in FORMATS {
        for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
            let units = if format.block_len() == 32 { 9 } else { 3 };
            let blocks = units * format.activation_blocks();
            let row = weight_row(format, units, &[fill], &[1.0, -2.0]);
            let x: std::vec::Vec<f32> = (0..blocks * 32).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
            check_all_isas(format, &row, &x);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn simd_is_bit_identical_to_scalar(
        format_index in 0usize..8,
        units in 1usize..40,
        bytes in proptest::collection::vec(any::<u8>(), 1..500),
        scales in proptest::collection::vec(-1.0f32..1.0, 1..8),
        x in proptest::collection::vec(-50f32..50.0, 40 * 32),
    ) {
        let format = FORMATS[format_index];
        // 1..40 classic blocks, or 1..6 super-blocks (up to 40 activation blocks).
        let units = if format.block_len() == 32 { units } else { 1 + units % 5 };
        let row = weight_row(format, units, &bytes, &scales);
        check_all_isas(format, &row, &x[..units * format.block_len()]);
    }
}

/// With `PETREL_EXPECT_ISA` (a comma-separated list of `Isa::name`s, as CI sets it), each
/// named kernel table must be available here, so a bit-identity run cannot silently test
/// only the reference.
#[test]
fn expected_isas_are_available() {
    let Ok(expected) = std::env::var("PETREL_EXPECT_ISA") else { return };
    for name in expected.split(',').filter(|n| !n.is_empty()) {
        let isa = Isa::ALL.into_iter().find(|i| i.name() == name);
        let isa = isa.unwrap_or_else(|| panic!("PETREL_EXPECT_ISA: unknown ISA {name:?}"));
        assert!(Kernels::for_isa(isa).is_some(), "PETREL_EXPECT_ISA: {name} is not available on this CPU");
    }
}
