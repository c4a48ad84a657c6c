//! Cortex-M W4 integer kernels: DSP (`SMLAD`, Cortex-M4 and later) and Helium
//! (`VMLADAVA.S8`, Cortex-M55/M85), bit-identical to [`super::scalar`].
//!
//! # Integer sums
//! Both work on the stored offset-binary nibbles `u = q + 8` and subtract `8 · Σ x` (the
//! group sums of [`TokenBatch`]) at the end of each group, which gives the reference's
//! exact `isum = Σ q · x`; the float combine per row is then the reference's, in its order.
//!
//! - **DSP.** In a panel block, the word of row `i` holds the nibbles of its 8 columns:
//!   byte `j` has column `j` low and `4 + j` high. Masking with `0x000F_000F` after shifts of
//!   0, 8, 4 and 12 bits gives the 16-bit pairs of columns (0, 2), (1, 3), (4, 6) and (5, 7),
//!   which `SMLAD` multiplies with the matching pairs of activation codes, sign-extended once
//!   per oct and token by `SXTB16` and held in registers while the 16 rows pass: 4 `SMLAD`s,
//!   4 mask instructions and a load per row and 8 inputs.
//! - **Helium.** Four consecutive octs (32 inputs) of one row are four words 64 bytes apart:
//!   one gather load (`VLDRW.U32 q, [r, q_offsets]`) brings them into a vector, `VAND` and
//!   `VSHR.U8` split the low and high nibbles, and two `VMLADAVA.S8` multiply them with the
//!   activation codes rearranged once per chunk and token into the same order (the low
//!   columns `8k + j` and the high columns `8k + 4 + j` of the 4 octs). The 16 rows of a panel
//!   run in one assembly loop. A group whose oct count is not a multiple of 4 finishes with
//!   the DSP code, and weights that are not 4-byte aligned (gathers need aligned words) take
//!   the DSP kernel. The float combine runs four rows per vector (`VCVTB.F32.F16` for the
//!   scales, then `VMUL`, `VMUL`, `VADD`: the reference's three roundings per row); a group
//!   in which MVE flushed a subnormal (FPSCR's UFC or IDC flag) is redone by the scalar FPU.
//!
//! # Safety
//! Weights and activations are read through raw pointers without bounds checks. That is
//! sound because these functions are only reachable through [`super::W4Kernels`], which
//! calls `check_int` first (panel range in the matrix, `tokens × padded_cols` codes,
//! `tokens × groups` scales and sums, `out` long enough), and [`W4Matrix::new`] proved that
//! the packed codes match the shape.

use core::ops::Range;

use super::written_rows;
use crate::blocks::f16_to_f32;
use crate::cortex_m::{load_word, smlad, sxtb16, sxtb16_ror8};
use crate::w4::activation::TokenBatch;
use crate::w4::{W4Matrix, OCT, PANEL_BLOCK_BYTES, PANEL_ROWS};

/// Selects the low nibbles of bytes 0 and 2 of a word, as two 16-bit lanes.
const PAIR_MASK: u32 = 0x000F_000F;

/// The activation codes of one oct as the four 16-bit pairs the nibble pairs meet:
/// columns (0, 2), (1, 3), (4, 6), (5, 7).
///
/// # Safety
/// `codes..codes + 8` must be readable.
#[inline(always)]
unsafe fn activation_pairs(codes: *const i8) -> [u32; 4] {
    // SAFETY: forwarded to the caller.
    let (a, b) = unsafe { (load_word(codes as *const u8), load_word(codes.add(4) as *const u8)) };
    [sxtb16(a), sxtb16_ror8(a), sxtb16(b), sxtb16_ror8(b)]
}

/// Adds `Σ u · x` over octs `octs` of each of the panel's 16 rows to `isum`, by `SMLAD`:
/// oct by oct, its activation pairs held in registers while two rows at a time pass.
///
/// # Safety
/// `block` is the panel block of oct `octs.start` in a matrix that holds the following
/// `octs.len()` blocks of the panel; `codes` holds `8 · octs.end` activation codes.
#[inline(always)]
unsafe fn dsp_octs(block: *const u8, codes: *const i8, octs: Range<usize>, isum: &mut [i32; PANEL_ROWS]) {
    for (k, o) in octs.enumerate() {
        // SAFETY: oct `o` is in the range, so its 8 codes are inside `codes`.
        let [x02, x13, x46, x57] = unsafe { activation_pairs(codes.add(o * OCT)) };
        // SAFETY: the block of the k-th oct of the range follows `block` by 64 bytes each.
        let rows = unsafe { block.add(k * PANEL_BLOCK_BYTES) };
        for (i, pair) in isum.chunks_exact_mut(2).enumerate() {
            // SAFETY: rows 2i and 2i + 1 (< 16) of that block.
            let (w0, w1) = unsafe { (load_word(rows.add(8 * i)), load_word(rows.add(8 * i + 4))) };
            let mut s0 = smlad(w0 & PAIR_MASK, x02, pair[0]);
            let mut s1 = smlad(w1 & PAIR_MASK, x02, pair[1]);
            s0 = smlad((w0 >> 8) & PAIR_MASK, x13, s0);
            s1 = smlad((w1 >> 8) & PAIR_MASK, x13, s1);
            s0 = smlad((w0 >> 4) & PAIR_MASK, x46, s0);
            s1 = smlad((w1 >> 4) & PAIR_MASK, x46, s1);
            pair[0] = smlad((w0 >> 12) & PAIR_MASK, x57, s0);
            pair[1] = smlad((w1 >> 12) & PAIR_MASK, x57, s1);
        }
    }
}

/// The reference's float combine of one group for a panel's 16 rows: `acc[i] += (s_w[i] ·
/// s_x) · (f32)(isum[i] − correction)`, with `s_w` the 16 little-endian f16 scales in
/// `scales` (32 bytes).
#[inline(always)]
fn combine_rows(acc: &mut [f32; PANEL_ROWS], isum: &[i32; PANEL_ROWS], scales: &[u8], xs: f32, correction: i32) {
    for ((a, &s), ws) in acc.iter_mut().zip(isum).zip(scales.chunks_exact(2)) {
        *a += (f16_to_f32(u16::from_le_bytes([ws[0], ws[1]])) * xs) * (s - correction) as f32;
    }
}

/// The loops shared by both kernels: per panel, token and group, `octs` adds the group's
/// `Σ u · x` per row and `combine` folds it into the accumulators as [`combine_rows`] does.
#[inline(always)]
fn drive(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &TokenBatch<'_>,
    out: &mut [f32],
    out_stride: usize,
    octs: impl Fn(*const u8, *const i8, Range<usize>, &mut [i32; PANEL_ROWS]),
    combine: impl Fn(&mut [f32; PANEL_ROWS], &[i32; PANEL_ROWS], &[u8], f32, i32),
) {
    let shape = w.shape();
    let (pc, groups, group_len) = (shape.padded_cols(), shape.groups(), shape.group_len());
    let rows = written_rows(w, &panels);
    let packed = w.packed().as_ptr();
    for p in panels {
        for t in 0..x.tokens {
            let codes = x.codes[t * pc..(t + 1) * pc].as_ptr();
            let mut acc = [0f32; PANEL_ROWS];
            for g in 0..groups {
                let group_octs = g * group_len / OCT..((g + 1) * group_len).min(pc) / OCT;
                let mut isum = [0i32; PANEL_ROWS];
                // SAFETY: `check_int` put panel `p` inside the matrix, so its block of the
                // group's first oct is inside `packed`.
                let block = unsafe { packed.add(shape.block_offset(p, group_octs.start)) };
                octs(block, codes, group_octs, &mut isum);
                let xs = x.scales[t * groups + g];
                let correction = 8 * x.sums[t * groups + g];
                // The panel's 16 scales of group g are consecutive (see `W4Matrix`).
                let at = (p * groups + g) * PANEL_ROWS * 2;
                combine(&mut acc, &isum, &w.scale_bytes()[at..at + PANEL_ROWS * 2], xs, correction);
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

/// DSP integer kernel (`W4IntFn`).
pub(super) fn gemm_int_dsp(w: &W4Matrix<'_>, panels: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], stride: usize) {
    drive(
        w,
        panels,
        x,
        out,
        stride,
        |block, codes, octs, isum| {
            // SAFETY: `drive` passes the block of the group's first oct and the token's codes
            // (see the module docs).
            unsafe { dsp_octs(block, codes, octs, isum) }
        },
        combine_rows,
    )
}

#[cfg(feature = "helium")]
pub(super) use helium::gemm_int_helium;

#[cfg(feature = "helium")]
mod helium {
    use core::arch::asm;
    use core::ops::Range;

    use super::{combine_rows, drive, dsp_octs, gemm_int_dsp};
    use crate::cortex_m::load_word;
    use crate::w4::activation::TokenBatch;
    use crate::w4::{W4Matrix, OCT, PANEL_BLOCK_BYTES, PANEL_ROWS};

    /// Octs per Helium step: 4 words of a row, one 128-bit gather.
    const STEP_OCTS: usize = 4;

    /// Helium integer kernel (`W4IntFn`).
    pub(crate) fn gemm_int_helium(
        w: &W4Matrix<'_>,
        panels: Range<usize>,
        x: &TokenBatch<'_>,
        out: &mut [f32],
        stride: usize,
    ) {
        if w.packed().as_ptr() as usize % 4 != 0 || w.scale_bytes().as_ptr() as usize % 2 != 0 {
            return gemm_int_dsp(w, panels, x, out, stride);
        }
        let octs = |block: *const u8, codes: *const i8, octs: Range<usize>, isum: &mut [i32; PANEL_ROWS]| {
            let mut o = octs.start;
            while o + STEP_OCTS <= octs.end {
                // SAFETY: octs `o..o + 4` lie in the group (see the module docs).
                unsafe { step(block.add((o - octs.start) * PANEL_BLOCK_BYTES), codes.add(o * OCT), isum) };
                o += STEP_OCTS;
            }
            // SAFETY: the remaining octs of the group, as above.
            unsafe { dsp_octs(block.add((o - octs.start) * PANEL_BLOCK_BYTES), codes, o..octs.end, isum) };
        };
        drive(w, panels, x, out, stride, octs, combine)
    }

    /// FPSCR's cumulative exception flags (IOC, DZC, OFC, UFC, IXC, IDC).
    const FPSCR_CUMULATIVE: u32 = 0x9F;
    /// FPSCR's underflow and input-denormal flags: set whenever a subnormal was flushed.
    const FPSCR_FLUSHED: u32 = (1 << 3) | (1 << 7);

    /// [`super::combine_rows`] four rows per vector: the f16 scales widened and converted by
    /// `VCVTB.F32.F16`, then the reference's multiply, multiply and add, each rounded to f32
    /// (lanes are rows, which never mix). MVE arithmetic may flush subnormals to zero where
    /// the scalar FPU keeps them, so the FPSCR flags that a flush raises are cleared first
    /// and checked after; if any is set, the group is redone by the reference code.
    #[inline(always)]
    fn combine(acc: &mut [f32; PANEL_ROWS], isum: &[i32; PANEL_ROWS], scales: &[u8], xs: f32, correction: i32) {
        assert!(scales.len() == 2 * PANEL_ROWS);
        let before = *acc;
        let flags: u32;
        // SAFETY: reads 32 bytes of `scales` (2-byte aligned: checked by the caller) and the
        // 16 words of `isum`, reads and writes the 16 words of `acc`; q0-q2 are declared, and
        // only FPSCR's cumulative flags change.
        unsafe {
            asm!(
                // The build disables `neon`, which LLVM ties to `mve.fp`; the M55 and M85
                // with floating point (the configuration this feature targets) have it.
                ".arch_extension mve.fp",
                "vmrs {flags}, fpscr",
                "bic {flags}, {flags}, #{cumulative}",
                "vmsr fpscr, {flags}",
                "2:",
                // The widening load takes a low base register (r0-r7).
                "vldrh.u32 q0, [r0], #8",
                "vcvtb.f32.f16 q0, q0",
                "vmul.f32 q0, q0, {xs}",
                "vldrw.u32 q1, [{isum}], #16",
                "vsub.i32 q1, q1, {correction}",
                "vcvt.f32.s32 q1, q1",
                "vmul.f32 q0, q0, q1",
                "vldrw.u32 q2, [{acc}]",
                "vadd.f32 q2, q2, q0",
                "vstrw.32 q2, [{acc}], #16",
                "subs {n}, #1",
                "bne 2b",
                "vmrs {flags}, fpscr",
                cumulative = const FPSCR_CUMULATIVE,
                flags = out(reg) flags,
                inout("r0") scales.as_ptr() => _,
                isum = inout(reg) isum.as_ptr() => _,
                acc = inout(reg) acc.as_mut_ptr() => _,
                xs = in(reg) xs.to_bits(),
                correction = in(reg) correction,
                n = inout(reg) PANEL_ROWS / 4 => _,
                out("d0") _, out("d1") _, out("d2") _, out("d3") _, out("d4") _, out("d5") _,
                options(nostack),
            );
        }
        if flags & FPSCR_FLUSHED != 0 {
            *acc = before;
            combine_rows(acc, isum, scales, xs, correction);
        }
    }

    /// Adds `Σ u · x` over 4 octs to each of the 16 rows of `isum`.
    ///
    /// # Safety
    /// `block` is 4-byte aligned and followed by the 4 panel blocks (256 bytes); `codes`
    /// holds the 32 activation codes of those octs.
    #[inline(always)]
    unsafe fn step(block: *const u8, codes: *const i8, isum: &mut [i32; PANEL_ROWS]) {
        // Low-nibble columns 8k + j, then high-nibble columns 8k + 4 + j, for k, j < 4.
        let mut x = [0u32; 2 * STEP_OCTS];
        for k in 0..STEP_OCTS {
            // SAFETY: oct k's 8 codes are inside `codes`.
            unsafe {
                x[k] = load_word(codes.add(k * OCT) as *const u8);
                x[STEP_OCTS + k] = load_word(codes.add(k * OCT + 4) as *const u8);
            }
        }
        // SAFETY: the gathers read words at `block + 4i + 64k` (i < 16, k < 4), inside the 4
        // blocks and aligned; `x` and `isum` are live arrays of the sizes read and written.
        // The loop uses r0-r5 and q0-q7 (declared), and leaves VPR alone.
        unsafe {
            asm!(
                "vldrw.u32 q6, [{x}]",
                "vldrw.u32 q5, [{x}, #16]",
                "vmov.i8 q4, #15",
                "movs r4, #0",
                "vidup.u32 q7, r4, #1",
                "vshl.i32 q7, q7, #6",
                "movs r3, #16",
                "2:",
                "vldrw.u32 q0, [r1, q7]",
                "ldr r0, [r2]",
                "vshr.u8 q1, q0, #4",
                "vand q0, q0, q4",
                "vmladava.s8 r0, q0, q6",
                "vmladava.s8 r0, q1, q5",
                "str r0, [r2], #4",
                "adds r1, #4",
                "subs r3, #1",
                "bne 2b",
                x = in(reg) x.as_ptr(),
                inout("r1") block => _,
                inout("r2") isum.as_mut_ptr() => _,
                out("r0") _, out("r3") _, out("r4") _,
                out("d0") _, out("d1") _, out("d2") _, out("d3") _,
                out("d8") _, out("d9") _, out("d10") _, out("d11") _,
                out("d12") _, out("d13") _, out("d14") _, out("d15") _,
                options(nostack),
            );
        }
    }
}
