//! Cortex-M Q8_0 dot products: DSP (`SMLAD` on sign-extended byte pairs) and Helium
//! (`VMLADAVA.S8`, 16 products per instruction), bit-identical to [`super::scalar`]: the
//! integer block sums are exact, and the float steps are the reference's
//! (`q8_0_contribution` and the four-lane accumulation).
//!
//! Only Q8_0 has Cortex-M kernels: it is the embedding/head format of the models that run
//! on these cores (their blocks are W4, see `w4::kernels::cortex_m`). Q4_0 and Q4_1 use
//! the reference in the Cortex-M tables.
//!
//! # Safety
//! Blocks are read through raw pointers after [`super::check_lengths`] proved that `row`
//! holds `blocks` Q8_0 blocks (34 bytes) and `x` the matching 32 codes per block.

use super::scalar::q8_0_contribution;
use super::{check_lengths, combine_lanes};
use crate::activation::Q8Row;
use crate::blocks::{read_f16, WeightFormat, BLOCK_LEN};
use crate::cortex_m::{load_word, smlad, sxtb16, sxtb16_ror8};

/// Bytes of a Q8_0 block: an f16 scale, then 32 codes.
const Q8_0_BLOCK: usize = 34;

/// `Σ w_j x_j` over one block of 32 signed bytes, by `SMLAD` on byte pairs.
///
/// # Safety
/// `w..w + 32` and `x..x + 32` must be readable.
#[inline(always)]
unsafe fn block_sum_dsp(w: *const u8, x: *const i8) -> i32 {
    let mut s = 0i32;
    for k in 0..BLOCK_LEN / 4 {
        // SAFETY: word k of 8 in each 32-byte block.
        let (a, b) = unsafe { (load_word(w.add(4 * k)), load_word(x.add(4 * k) as *const u8)) };
        s = smlad(sxtb16(a), sxtb16(b), s);
        s = smlad(sxtb16_ror8(a), sxtb16_ror8(b), s);
    }
    s
}

/// The reference's accumulation, with `block_sum` for the exact integer sums.
#[inline(always)]
fn dot_q8_0_with(row: &[u8], x: Q8Row<'_>, block_sum: unsafe fn(*const u8, *const i8) -> i32) -> f32 {
    let blocks = check_lengths(WeightFormat::Q8_0, row, &x);
    let mut lanes = [0f32; 4];
    for b in 0..blocks {
        let block = &row[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK];
        // SAFETY: `check_lengths` proved that block `b` has its 32 codes after the scale and
        // that `x` has 32 codes for it.
        let isum = unsafe { block_sum(block[2..].as_ptr(), x.qs[b * BLOCK_LEN..].as_ptr()) };
        lanes[b % 4] += q8_0_contribution(read_f16(block, 0), x.scales[b], isum);
    }
    combine_lanes(lanes)
}

/// DSP Q8_0 × Q8 dot product (`DotFn`).
pub(super) fn dot_q8_0_dsp(row: &[u8], x: Q8Row<'_>) -> f32 {
    dot_q8_0_with(row, x, block_sum_dsp)
}

/// DSP Q8_0 dot products of one row with four activation rows (`Dot4Fn`).
pub(super) fn dot4_q8_0_dsp(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    core::array::from_fn(|j| dot_q8_0_dsp(row, xs[j]))
}

#[cfg(feature = "helium")]
pub(super) use helium::{dot4_q8_0_helium, dot_q8_0_helium};

#[cfg(feature = "helium")]
mod helium {
    use core::arch::asm;

    use super::dot_q8_0_with;
    use crate::activation::Q8Row;

    /// `Σ w_j x_j` over one block of 32 signed bytes: two 16-byte loads of each operand and
    /// two `VMLADAVA.S8`.
    ///
    /// # Safety
    /// `w..w + 32` and `x..x + 32` must be readable.
    unsafe fn block_sum_helium(w: *const u8, x: *const i8) -> i32 {
        let s: i32;
        // SAFETY: the four byte loads read `w..w + 32` and `x..x + 32` (byte loads need no
        // alignment); q0 and q1 are declared clobbered.
        unsafe {
            asm!(
                "vldrb.u8 q0, [{w}]",
                "vldrb.u8 q1, [{x}]",
                "vmladav.s8 r0, q0, q1",
                "vldrb.u8 q0, [{w}, #16]",
                "vldrb.u8 q1, [{x}, #16]",
                "vmladava.s8 r0, q0, q1",
                w = in(reg) w,
                x = in(reg) x,
                out("r0") s,
                out("d0") _, out("d1") _, out("d2") _, out("d3") _,
                options(nostack, readonly, preserves_flags),
            );
        }
        s
    }

    /// Helium Q8_0 × Q8 dot product (`DotFn`).
    pub(crate) fn dot_q8_0_helium(row: &[u8], x: Q8Row<'_>) -> f32 {
        dot_q8_0_with(row, x, block_sum_helium)
    }

    /// Helium Q8_0 dot products of one row with four activation rows (`Dot4Fn`).
    pub(crate) fn dot4_q8_0_helium(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
        core::array::from_fn(|j| dot_q8_0_helium(row, xs[j]))
    }
}
