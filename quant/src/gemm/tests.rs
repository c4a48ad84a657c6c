//! The panel kernels against the block dot products' scalar reference, bit for bit, on
//! random formats, row counts (ragged panels), column counts (block counts that are not
//! multiples of four) and token counts (ragged groups of four).

use proptest::prelude::*;

use super::{pack_panel, panel_lines, PanelGemm, PanelLine, Q8Batch, PANEL_ROWS};
use crate::activation::{quantize_row_q8, Q8Row, Q8RowMut};
use crate::blocks::{WeightFormat, BLOCK_LEN};
use crate::dot::tests::weight_row;
use crate::dot::Kernels;

/// Quantized activations for `tokens` rows of `cols`, from `seed` values.
fn batch(tokens: usize, cols: usize, seed: &[f32]) -> (std::vec::Vec<i8>, std::vec::Vec<f32>, std::vec::Vec<i32>) {
    let blocks = cols / BLOCK_LEN;
    let (mut qs, mut scales, mut sums) =
        (std::vec![0i8; tokens * cols], std::vec![0f32; tokens * blocks], std::vec![0i32; tokens * blocks]);
    for t in 0..tokens {
        let x: std::vec::Vec<f32> =
            (0..cols).map(|i| seed[(i * 7 + t * 13) % seed.len()] * (1 + (i + t) % 3) as f32).collect();
        quantize_row_q8(
            &x,
            Q8RowMut {
                qs: &mut qs[t * cols..(t + 1) * cols],
                scales: &mut scales[t * blocks..(t + 1) * blocks],
                sums: &mut sums[t * blocks..(t + 1) * blocks],
            },
        );
    }
    (qs, scales, sums)
}

/// Packs `rows` rows and checks every available panel kernel against scalar dot products.
fn check(format: WeightFormat, rows: usize, units: usize, tokens: usize, bytes: &[u8], scales: &[f32], seed: &[f32]) {
    let cols = units * format.block_len();
    let data: std::vec::Vec<u8> = (0..rows)
        .flat_map(|r| {
            let rotated: std::vec::Vec<u8> =
                bytes.iter().map(|&b| b.wrapping_add((r as u8).wrapping_mul(37))).collect();
            weight_row(format, units, &rotated, &scales[r % scales.len()..])
        })
        .collect();
    let (qs, xs, sums) = batch(tokens, cols, seed);
    let x = Q8Batch { qs: &qs, scales: &xs, sums: &sums, tokens };
    let row_bytes = data.len() / rows;
    let blocks = cols / BLOCK_LEN;
    let reference: std::vec::Vec<f32> = (0..tokens)
        .flat_map(|t| {
            let xt = Q8Row {
                qs: &qs[t * cols..(t + 1) * cols],
                scales: &xs[t * blocks..(t + 1) * blocks],
                sums: &sums[t * blocks..(t + 1) * blocks],
            };
            let data = &data;
            (0..rows).map(move |r| Kernels::scalar().dot(format, &data[r * row_bytes..(r + 1) * row_bytes], xt))
        })
        .collect();
    let mut lines = std::vec![PanelLine([0xAA; 64]); panel_lines(cols)];
    let reference_panel: std::vec::Vec<[u8; 64]> =
        pack_panel(format, &data, rows, cols, &mut lines).lines.iter().map(|l| l.0).collect();
    let stride = rows + 3;
    let kernels = [Some(PanelGemm::scalar()), PanelGemm::for_isa(crate::dot::Isa::Avx512Vnni), PanelGemm::amx()];
    for gemm in kernels.into_iter().flatten() {
        let mut lines = std::vec![PanelLine([0x55; 64]); panel_lines(cols)];
        let panel = gemm.pack(format, &data, rows, cols, &mut lines);
        let packed: std::vec::Vec<[u8; 64]> = panel.lines.iter().map(|l| l.0).collect();
        assert!(packed == reference_panel, "{format:?} {:?}: packed panel differs from pack_panel's", gemm.name());
        let mut out = std::vec![f32::NAN; (tokens - 1) * stride + rows];
        gemm.run(&panel, &x, &mut out, stride);
        for t in 0..tokens {
            for r in 0..rows {
                let (got, want) = (out[t * stride + r], reference[t * rows + r]);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{format:?} {} row {r} token {t}: {got} vs {want}",
                    gemm.name()
                );
            }
            for gap in rows..stride.min(out.len() - t * stride) {
                assert!(out[t * stride + gap].is_nan(), "{format:?} {} wrote past its rows", gemm.name());
            }
        }
    }
}

#[test]
fn extreme_codes_are_bit_identical() {
    for format in WeightFormat::ALL {
        for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
            let units = if format.block_len() == 32 { 9 } else { 2 };
            for tokens in [5, 17] {
                check(format, PANEL_ROWS, units, tokens, &[fill], &[1.0, -2.0], &[1.0, -1.0, 127.0, -127.0]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]
    #[test]
    fn panel_kernels_are_bit_identical_to_the_reference(
        format_index in 0usize..8,
        rows in 1usize..=16,
        units in 1usize..24,
        tokens in 1usize..40,
        bytes in proptest::collection::vec(any::<u8>(), 1..400),
        scales in proptest::collection::vec(-1.0f32..1.0, 16..24),
        seed in proptest::collection::vec(-50f32..50.0, 1..64),
    ) {
        let format = WeightFormat::ALL[format_index];
        let units = if format.block_len() == 32 { units } else { 1 + units % 4 };
        check(format, rows, units, tokens, &bytes, &scales, &seed);
    }
}

/// CI sets `PETREL_EXPECT_ISA`; where it names `avx512vnni` (or `amx-int8`), that panel
/// kernel must exist, so that the tests above cannot pass by skipping it.
#[test]
fn expected_panel_kernel_is_available() {
    let Ok(expected) = std::env::var("PETREL_EXPECT_ISA") else { return };
    if expected.split(',').any(|n| n == "avx512vnni") {
        assert!(
            PanelGemm::for_isa(crate::dot::Isa::Avx512Vnni).is_some(),
            "PETREL_EXPECT_ISA names avx512vnni but there is no panel kernel"
        );
    }
    if expected.split(',').any(|n| n == "amx-int8") {
        assert!(PanelGemm::amx().is_some(), "PETREL_EXPECT_ISA names amx-int8 but AMX is unavailable");
    }
}
