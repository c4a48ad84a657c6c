//! Matrix products of a [`W4Matrix`] with a batch of tokens: the integer kernels of W4A4
//! and W4A8 (int4 weights × int4/int8 activations → i32) and the float kernel of W4A16.
//!
//! # The reference arithmetic
//! Every kernel computes, for each token `t` and row `r` of the panels it is given, the
//! same float operations in the same order, so SIMD versions are **bit-identical** to
//! [`scalar`]:
//! - integer (`W4IntFn`): per group `g`, the exact integer `isum_g = Σ_{c∈g} q_w[r][c] ·
//!   q_x[t][c]`; then `acc = 0` and, group after group, `acc = acc + (s_w[r][g] · s_x[t][g])
//!   · isum_g`: the product of the two scales rounded to f32 first, then its product with
//!   `isum_g` (as f32) rounded, then the sum (no fused multiply–add); the result is `acc`.
//! - float (`W4FloatFn`): per group, `f = 0` and, column after column in increasing order,
//!   `f = f + q_w[r][c] · x[t][c]` (no FMA); then `acc = acc + s_w[r][g] · f` as above; the
//!   result is `acc`.
//!
//! Kernels vectorize across the 16 rows of a panel (never across columns), which keeps
//! each row's order of operations that of the reference.
//!
//! Outputs go to `out[t · out_stride + r]` for the rows `r < rows` of the given panels.

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod aarch64;
#[cfg(all(target_arch = "arm", target_feature = "dsp"))]
mod cortex_m;
#[cfg(feature = "alloc")]
pub mod lut;
pub mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use core::ops::Range;

use super::activation::TokenBatch;
use super::{pad_cols, W4Matrix, PANEL_ROWS};
use crate::dot::Isa;

/// Integer product of the panels `panels` of a W4 matrix with a batch of quantized tokens.
pub type W4IntFn = fn(w: &W4Matrix<'_>, panels: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], out_stride: usize);

/// Float product of the panels `panels` of a W4 matrix with `tokens` rows of f32
/// activations (`tokens × pad_cols(cols)`, zero-padded).
pub type W4FloatFn =
    fn(w: &W4Matrix<'_>, panels: Range<usize>, x: &[f32], tokens: usize, out: &mut [f32], out_stride: usize);

/// The W4 kernels for one instruction set.
#[derive(Clone, Copy, Debug)]
pub struct W4Kernels {
    isa: Isa,
    int: W4IntFn,
    float: W4FloatFn,
}

impl W4Kernels {
    /// The portable scalar reference.
    pub const fn scalar() -> Self {
        W4Kernels { isa: Isa::Scalar, int: scalar::gemm_int, float: scalar::gemm_float }
    }

    /// The kernels for `isa`, or `None` if this CPU (or build) cannot run them.
    pub fn for_isa(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Scalar => Some(Self::scalar()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_supported() => {
                Some(W4Kernels { isa, int: x86::gemm_int_avx2, float: x86::gemm_float_avx2 })
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_supported() => {
                Some(W4Kernels { isa, int: x86::gemm_int_vnni, float: x86::gemm_float_vnni })
            }
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Isa::NeonDot if isa.is_supported() => {
                Some(W4Kernels { isa, int: aarch64::gemm_int_dot, float: aarch64::gemm_float })
            }
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Isa::NeonI8mm if isa.is_supported() => {
                Some(W4Kernels { isa, int: aarch64::gemm_int_i8mm, float: aarch64::gemm_float })
            }
            // Cortex-M: integer kernels only; W4A16's float product is the reference.
            #[cfg(all(target_arch = "arm", target_feature = "dsp"))]
            Isa::CortexMDsp if isa.is_supported() => {
                Some(W4Kernels { isa, int: cortex_m::gemm_int_dsp, float: scalar::gemm_float })
            }
            #[cfg(all(target_arch = "arm", target_feature = "dsp", feature = "helium"))]
            Isa::Helium if isa.is_supported() => {
                Some(W4Kernels { isa, int: cortex_m::gemm_int_helium, float: scalar::gemm_float })
            }
            _ => None,
        }
    }

    /// The fastest kernels this CPU runs.
    pub fn detect() -> Self {
        Isa::ALL.iter().rev().find_map(|&isa| Self::for_isa(isa)).unwrap_or_else(Self::scalar)
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `out[t · out_stride + r] = Σ_c w[r][c] · x[t][c]` (see the module docs) for the rows
    /// of `panels`.
    ///
    /// # Panics
    /// If the operands disagree in shape or `out` is too short.
    #[inline]
    pub fn gemm_int(
        &self,
        w: &W4Matrix<'_>,
        panels: Range<usize>,
        x: &TokenBatch<'_>,
        out: &mut [f32],
        out_stride: usize,
    ) {
        check_int(w, &panels, x, out, out_stride);
        (self.int)(w, panels, x, out, out_stride)
    }

    /// The float product (see the module docs) for the rows of `panels`.
    ///
    /// # Panics
    /// If the operands disagree in shape or `out` is too short.
    #[inline]
    pub fn gemm_float(
        &self,
        w: &W4Matrix<'_>,
        panels: Range<usize>,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        check_float(w, &panels, x, tokens, out, out_stride);
        (self.float)(w, panels, x, tokens, out, out_stride)
    }
}

/// Rows written for `panels`: `start..end`, clipped to the matrix.
#[inline(always)]
fn written_rows(w: &W4Matrix<'_>, panels: &Range<usize>) -> Range<usize> {
    (panels.start * PANEL_ROWS).min(w.shape().rows)..(panels.end * PANEL_ROWS).min(w.shape().rows)
}

fn check_out(w: &W4Matrix<'_>, panels: &Range<usize>, tokens: usize, out: &[f32], out_stride: usize) {
    assert!(panels.start <= panels.end && panels.end <= w.shape().panels(), "panel range outside the matrix");
    let rows = written_rows(w, panels);
    if tokens > 0 && !rows.is_empty() {
        assert!(out_stride >= rows.end, "output stride shorter than a row of outputs");
        assert!(out.len() >= (tokens - 1) * out_stride + rows.end, "output buffer too short");
    }
}

/// Every kernel calls this (through [`W4Kernels`]) before touching memory; it is what makes
/// the SIMD kernels' unchecked loads sound.
fn check_int(w: &W4Matrix<'_>, panels: &Range<usize>, x: &TokenBatch<'_>, out: &[f32], out_stride: usize) {
    assert!(
        x.is_consistent() && x.cols == w.shape().cols && x.group == w.shape().group,
        "activation batch disagrees with the weight matrix"
    );
    check_out(w, panels, x.tokens, out, out_stride);
}

fn check_float(w: &W4Matrix<'_>, panels: &Range<usize>, x: &[f32], tokens: usize, out: &[f32], out_stride: usize) {
    assert_eq!(x.len(), tokens * pad_cols(w.shape().cols), "activations disagree with the weight matrix");
    check_out(w, panels, tokens, out, out_stride);
}
