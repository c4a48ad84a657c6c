//! The portable reference kernels (see the parent module for the arithmetic they define).

use core::ops::Range;

use super::written_rows;
use crate::w4::activation::TokenBatch;
use crate::w4::{W4Matrix, OCT, PANEL_BLOCK_BYTES, PANEL_ROWS};

/// Unpacks the 16 × 8 codes of one panel block: `codes[i][c]` for row `i`, column `c`.
#[inline(always)]
fn unpack_block(block: &[u8]) -> [[i8; OCT]; PANEL_ROWS] {
    let mut codes = [[0i8; OCT]; PANEL_ROWS];
    for (i, row) in codes.iter_mut().enumerate() {
        for j in 0..4 {
            let byte = block[4 * i + j];
            row[j] = (byte & 0xF) as i8 - 8;
            row[4 + j] = (byte >> 4) as i8 - 8;
        }
    }
    codes
}

/// The reference integer kernel.
pub fn gemm_int(w: &W4Matrix<'_>, panels: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], out_stride: usize) {
    let shape = w.shape();
    let (pc, groups, group_len) = (shape.padded_cols(), shape.groups(), shape.group_len());
    let rows = written_rows(w, &panels);
    for p in panels {
        for t in 0..x.tokens {
            let codes = &x.codes[t * pc..(t + 1) * pc];
            let mut acc = [0f32; PANEL_ROWS];
            for g in 0..groups {
                let mut isum = [0i32; PANEL_ROWS];
                for o in g * group_len / OCT..((g + 1) * group_len).min(pc) / OCT {
                    let at = shape.block_offset(p, o);
                    let block = unpack_block(&w.packed()[at..at + PANEL_BLOCK_BYTES]);
                    for (i, row) in block.iter().enumerate() {
                        for (c, &q) in row.iter().enumerate() {
                            isum[i] += q as i32 * codes[o * OCT + c] as i32;
                        }
                    }
                }
                let xs = x.scales[t * groups + g];
                for i in 0..PANEL_ROWS {
                    acc[i] += (w.scale(p * PANEL_ROWS + i, g) * xs) * isum[i] as f32;
                }
            }
            for (i, &a) in acc.iter().enumerate() {
                let r = p * PANEL_ROWS + i;
                if rows.contains(&r) {
                    out[t * out_stride + r] = a;
                }
            }
        }
    }
}

/// The reference float kernel.
pub fn gemm_float(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let shape = w.shape();
    let (pc, groups, group_len) = (shape.padded_cols(), shape.groups(), shape.group_len());
    let rows = written_rows(w, &panels);
    for p in panels {
        for t in 0..tokens {
            let xs = &x[t * pc..(t + 1) * pc];
            let mut acc = [0f32; PANEL_ROWS];
            for g in 0..groups {
                let mut f = [0f32; PANEL_ROWS];
                for o in g * group_len / OCT..((g + 1) * group_len).min(pc) / OCT {
                    let at = shape.block_offset(p, o);
                    let block = unpack_block(&w.packed()[at..at + PANEL_BLOCK_BYTES]);
                    for c in 0..OCT {
                        for i in 0..PANEL_ROWS {
                            f[i] += block[i][c] as f32 * xs[o * OCT + c];
                        }
                    }
                }
                for i in 0..PANEL_ROWS {
                    acc[i] += w.scale(p * PANEL_ROWS + i, g) * f[i];
                }
            }
            for (i, &a) in acc.iter().enumerate() {
                let r = p * PANEL_ROWS + i;
                if rows.contains(&r) {
                    out[t * out_stride + r] = a;
                }
            }
        }
    }
}
