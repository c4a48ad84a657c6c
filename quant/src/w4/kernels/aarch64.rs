//! aarch64 kernels: the integer product with NEON + dotprod (`sdot`) or NEON + i8mm
//! (`smmla`), and the float product with plain NEON.
//!
//! All of them follow the reference arithmetic of the parent module exactly. The weight
//! codes become signed bytes (`nibble − 8`, done as `(byte ^ 0x88)` and sign-extending
//! shifts) and meet the signed activation codes directly, so the integer sums are exact and
//! need no correction (`TokenBatch::sums` is not read). The float work is vectorized across
//! the 16 rows of a panel, four rows per `float32x4_t`, and uses separate `fmul` and `fadd`
//! (never `fmla`), so each row sees the reference's operations in the reference's order: in
//! the integer kernels, per group, the 16 weight scales times the token's broadcast scale of
//! the group, that times `(f32) isum`, then the add.
//!
//! `sdot` and `smmla` are written as inline assembly: their intrinsics (`vdotq_s32`,
//! `vmmlaq_s32`) are not stable on the compilers Petrel supports.

use core::arch::aarch64::*;
use core::arch::asm;
use core::ops::Range;

use super::written_rows;
use crate::w4::activation::TokenBatch;
use crate::w4::{W4Matrix, OCT, PANEL_ROWS};

/// `$acc.4s += $w.16b · $x.4b[$lane]`: four 4-way signed byte dot products of the four
/// 32-bit lanes of `$w` with the `$lane`-th four bytes of `$x`. Only for functions that
/// enable `dotprod`.
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $x:expr, $lane:literal) => {
        // SAFETY: register-only arithmetic; the enclosing function enables `dotprod`, and
        // its callers checked the CPU has it.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
                acc = inout(vreg) $acc,
                w = in(vreg) $w,
                x = in(vreg) $x,
                lane = const $lane,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// `$acc.4s += $a (2 × 8 s8) · $b (2 × 8 s8)ᵀ`: lane `2i + j` gains row `i` of `$a` dotted
/// with row `j` of `$b`. Only for functions that enable `i8mm`.
macro_rules! smmla {
    ($acc:expr, $a:expr, $b:expr) => {
        // SAFETY: register-only arithmetic; the enclosing function enables `i8mm`, and its
        // callers checked the CPU has it.
        unsafe {
            asm!(
                "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) $acc,
                a = in(vreg) $a,
                b = in(vreg) $b,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// Loads one 64-byte panel block as four vectors of signed codes offset-corrected: vector
/// `k` holds rows `4k..4k + 4`, each row one 32-bit lane whose byte `j` is
/// `(column j) | (column 4 + j) << 4` as 4-bit two's complement (`nibble ^ 8` = `nibble − 8`).
///
/// # Safety
/// 64 readable bytes at `block`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_block_xor(block: *const u8) -> [int8x16_t; 4] {
    let bias = vdupq_n_u8(0x88);
    // SAFETY: the caller guarantees 64 readable bytes; `ld1` of bytes needs no alignment.
    core::array::from_fn(|k| vreinterpretq_s8_u8(veorq_u8(unsafe { vld1q_u8(block.add(16 * k)) }, bias)))
}

/// Splits [`load_block_xor`]'s vectors into signed codes: `(lo, hi)` with `lo[k]` holding
/// rows `4k..4k + 4` × columns 0..4 and `hi[k]` the same rows × columns 4..8 (byte `4i + j`:
/// row `4k + i`, column `j` or `4 + j`).
#[inline]
#[target_feature(enable = "neon")]
fn split_nibbles(v: [int8x16_t; 4]) -> ([int8x16_t; 4], [int8x16_t; 4]) {
    (v.map(|v| vshrq_n_s8::<4>(vshlq_n_s8::<4>(v))), v.map(|v| vshrq_n_s8::<4>(v)))
}

/// Converts the 16 little-endian f16 scales at `ptr` (one panel, one group) to four
/// `float32x4_t` (rows `4k..4k + 4` in vector `k`), exactly: the sign moves to bit 31 and
/// exponent and mantissa to bits 13..28, which reads as the f16 value times 2⁻¹¹², so one
/// multiplication by 2¹¹² restores it (subnormal f16 included; scales are finite).
///
/// # Safety
/// 32 readable bytes at `ptr`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_scales(ptr: *const u8) -> [float32x4_t; 4] {
    // SAFETY: the caller guarantees 32 readable bytes; byte loads need no alignment.
    let halves = unsafe { [vld1q_u8(ptr), vld1q_u8(ptr.add(16))] }.map(|v| vreinterpretq_u16_u8(v));
    let two_112 = vdupq_n_f32(f32::from_bits((127 + 112) << 23));
    let widen = |h: uint16x4_t| {
        let u = vmovl_u16(h);
        let sign = vshlq_n_u32::<16>(vandq_u32(u, vdupq_n_u32(0x8000)));
        let rest = vshlq_n_u32::<13>(vandq_u32(u, vdupq_n_u32(0x7FFF)));
        vmulq_f32(vreinterpretq_f32_u32(vorrq_u32(sign, rest)), two_112)
    };
    [
        widen(vget_low_u16(halves[0])),
        widen(vget_high_u16(halves[0])),
        widen(vget_low_u16(halves[1])),
        widen(vget_high_u16(halves[1])),
    ]
}

/// `acc[k] = acc[k] + (s[k] · xs) · isum[k]` for the four row quads: the reference's group
/// step with the weight scales `s` and the token's scale `xs` of the group, each operation
/// rounded (no `fmla`).
#[inline]
#[target_feature(enable = "neon")]
fn add_group(acc: &mut [float32x4_t; 4], s: &[float32x4_t; 4], xs: f32, isum: &[int32x4_t; 4]) {
    let xs = vdupq_n_f32(xs);
    for ((a, &s), &i) in acc.iter_mut().zip(s).zip(isum) {
        *a = vaddq_f32(*a, vmulq_f32(vmulq_f32(s, xs), vcvtq_f32_s32(i)));
    }
}

/// Writes the 16 results of panel `p` for one token to `out[base + 16p ..]`, clipped to
/// `rows`.
#[inline]
#[target_feature(enable = "neon")]
fn store_panel(acc: &[float32x4_t; 4], p: usize, rows: &Range<usize>, out: &mut [f32], base: usize) {
    let mut vals = [0f32; PANEL_ROWS];
    for (k, &a) in acc.iter().enumerate() {
        // SAFETY: `vals` has 16 writable floats and `4k + 4 ≤ 16`.
        unsafe { vst1q_f32(vals.as_mut_ptr().add(4 * k), a) };
    }
    let first = p * PANEL_ROWS;
    let n = rows.end.saturating_sub(first).min(PANEL_ROWS);
    out[base + first..base + first + n].copy_from_slice(&vals[..n]);
}

/// The octs of group `g` (the reference's loop bounds).
#[inline(always)]
fn group_octs(g: usize, group_len: usize, padded_cols: usize) -> Range<usize> {
    g * group_len / OCT..((g + 1) * group_len).min(padded_cols) / OCT
}

/// The integer product with `sdot` (see the parent module for the arithmetic).
pub(crate) fn gemm_int_dot(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &TokenBatch<'_>,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: `W4Kernels::gemm_int` checked the operands' sizes (`check_int`), which bounds
    // every load below, and this kernel is only reachable through `W4Kernels::for_isa`,
    // which checked that the CPU has dotprod.
    unsafe { int_dot(w, panels, x, out, out_stride) }
}

/// [`gemm_int_dot`] once the CPU's dotprod is known: panels, then tiles of up to 4 tokens.
#[target_feature(enable = "neon,dotprod")]
unsafe fn int_dot(w: &W4Matrix<'_>, panels: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], out_stride: usize) {
    let rows = written_rows(w, &panels);
    for p in panels {
        let mut t = 0;
        while t < x.tokens {
            let n = (x.tokens - t).min(4);
            // SAFETY: tokens t..t + n exist; the rest as for `gemm_int_dot`.
            unsafe {
                match n {
                    4 => int_dot_tile::<4>(w, p, x, t, &rows, out, out_stride),
                    3 => int_dot_tile::<3>(w, p, x, t, &rows, out, out_stride),
                    2 => int_dot_tile::<2>(w, p, x, t, &rows, out, out_stride),
                    _ => int_dot_tile::<1>(w, p, x, t, &rows, out, out_stride),
                }
            }
            t += n;
        }
    }
}

/// Panel `p` × tokens `t0..t0 + T`: per oct, the 16 × 4 low-nibble codes meet the token's
/// first four activation bytes and the high-nibble codes its last four, one `sdot` by
/// element per 4 rows.
///
/// # Safety
/// The operands passed `check_int`, `p` is a panel of the matrix, tokens `t0..t0 + T`
/// exist, and the CPU has dotprod.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn int_dot_tile<const T: usize>(
    w: &W4Matrix<'_>,
    p: usize,
    x: &TokenBatch<'_>,
    t0: usize,
    rows: &Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let shape = w.shape();
    let (pc, groups, group_len) = (shape.padded_cols(), shape.groups(), shape.group_len());
    let (packed, codes) = (w.packed().as_ptr(), x.codes.as_ptr());
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for g in 0..groups {
        let mut isum = [[vdupq_n_s32(0); 4]; T];
        for o in group_octs(g, group_len, pc) {
            // SAFETY: block (p, o) lies inside `packed`, whose length `W4Matrix::new` checked.
            let (lo, hi) = split_nibbles(unsafe { load_block_xor(packed.add(shape.block_offset(p, o))) });
            for (j, sum) in isum.iter_mut().enumerate() {
                // SAFETY: token t0 + j's row of `pc` codes exists (`check_int`) and oct o
                // is inside it.
                let xq = unsafe { vld1_s8(codes.add((t0 + j) * pc + o * OCT)) };
                for ((sk, &l), &h) in sum.iter_mut().zip(&lo).zip(&hi) {
                    sdot_lane!(*sk, l, xq, 0);
                    sdot_lane!(*sk, h, xq, 1);
                }
            }
        }
        // SAFETY: the 16 scales of panel p, group g lie inside the checked scale bytes.
        let s = unsafe { load_scales(w.scale_bytes().as_ptr().add(shape.scale_index(p * PANEL_ROWS, g) * 2)) };
        for (j, (a, sum)) in acc.iter_mut().zip(&isum).enumerate() {
            add_group(a, &s, x.scales[(t0 + j) * groups + g], sum);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        store_panel(a, p, rows, out, (t0 + j) * out_stride);
    }
}

/// The integer product with `smmla` (see the parent module for the arithmetic).
pub(crate) fn gemm_int_i8mm(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &TokenBatch<'_>,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: as for `gemm_int_dot`, with i8mm checked by `W4Kernels::for_isa`.
    unsafe { int_i8mm(w, panels, x, out, out_stride) }
}

/// [`gemm_int_i8mm`] once the CPU's i8mm is known: panels, then tiles of up to 2 token pairs.
#[target_feature(enable = "neon,i8mm")]
unsafe fn int_i8mm(w: &W4Matrix<'_>, panels: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], out_stride: usize) {
    let rows = written_rows(w, &panels);
    for p in panels {
        let mut t = 0;
        while t < x.tokens {
            let n = (x.tokens - t).min(4);
            // SAFETY: tokens t..t + n exist; the rest as for `gemm_int_i8mm`.
            unsafe {
                if n > 2 {
                    int_i8mm_tile::<2>(w, p, x, t, n, &rows, out, out_stride)
                } else {
                    int_i8mm_tile::<1>(w, p, x, t, n, &rows, out, out_stride)
                }
            }
            t += n;
        }
    }
}

/// Panel `p` × tokens `t0..t0 + n` (`n ≤ 2P`, as `P` pairs; a missing second token of the
/// last pair is zeros and its results are dropped). Per oct, the block's rows are zipped
/// into eight 2 × 8 tiles (`vzip1q`/`vzip2q` on 32-bit lanes of the low and high nibble
/// codes: row `i` columns 0..4, row `i` columns 4..8, row `i + 1` likewise), and each pair
/// of tokens (2 × 8 activation codes) meets each tile in one `smmla`, whose lanes are
/// `[t0·r_i, t0·r_{i+1}, t1·r_i, t1·r_{i+1}]`.
///
/// # Safety
/// As [`int_dot_tile`], for tokens `t0..t0 + n`, with i8mm instead of dotprod.
#[inline]
#[target_feature(enable = "neon,i8mm")]
#[allow(clippy::too_many_arguments)]
unsafe fn int_i8mm_tile<const P: usize>(
    w: &W4Matrix<'_>,
    p: usize,
    x: &TokenBatch<'_>,
    t0: usize,
    n: usize,
    rows: &Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let shape = w.shape();
    let (pc, groups, group_len) = (shape.padded_cols(), shape.groups(), shape.group_len());
    let (packed, codes) = (w.packed().as_ptr(), x.codes.as_ptr());
    // acc[q][h]: token t0 + 2q + h.
    let mut acc = [[[vdupq_n_f32(0.0); 4]; 2]; P];
    for g in 0..groups {
        // m[q][2k + h]: rows 4k + 2h and 4k + 2h + 1 against the tokens of pair q.
        let mut m = [[vdupq_n_s32(0); 8]; P];
        for o in group_octs(g, group_len, pc) {
            // SAFETY: block (p, o) lies inside `packed`, whose length `W4Matrix::new` checked.
            let (lo, hi) = split_nibbles(unsafe { load_block_xor(packed.add(shape.block_offset(p, o))) });
            let tiles: [int8x16_t; 8] = core::array::from_fn(|i| {
                let (l, h) = (vreinterpretq_s32_s8(lo[i / 2]), vreinterpretq_s32_s8(hi[i / 2]));
                vreinterpretq_s8_s32(if i % 2 == 0 { vzip1q_s32(l, h) } else { vzip2q_s32(l, h) })
            });
            for (q, mq) in m.iter_mut().enumerate() {
                let t = t0 + 2 * q;
                // SAFETY: token t exists (t < t0 + n) and oct o is inside its row of codes.
                let first = unsafe { vld1_s8(codes.add(t * pc + o * OCT)) };
                let second = if t + 1 < t0 + n {
                    // SAFETY: as above, for token t + 1, which exists.
                    unsafe { vld1_s8(codes.add((t + 1) * pc + o * OCT)) }
                } else {
                    vdup_n_s8(0)
                };
                let a = vcombine_s8(first, second);
                for (mi, &tile) in mq.iter_mut().zip(&tiles) {
                    smmla!(*mi, a, tile);
                }
            }
        }
        // SAFETY: the 16 scales of panel p, group g lie inside the checked scale bytes.
        let s = unsafe { load_scales(w.scale_bytes().as_ptr().add(shape.scale_index(p * PANEL_ROWS, g) * 2)) };
        for (q, (aq, mq)) in acc.iter_mut().zip(&m).enumerate() {
            let per_token = |h: usize| -> [int32x4_t; 4] {
                core::array::from_fn(|k| {
                    let (a, b) = (vreinterpretq_s64_s32(mq[2 * k]), vreinterpretq_s64_s32(mq[2 * k + 1]));
                    vreinterpretq_s32_s64(if h == 0 { vzip1q_s64(a, b) } else { vzip2q_s64(a, b) })
                })
            };
            // A missing second token of the last pair (zero codes) borrows the first one's
            // scale; its results are dropped.
            let t = t0 + 2 * q;
            let second = if t + 1 < t0 + n { t + 1 } else { t };
            add_group(&mut aq[0], &s, x.scales[t * groups + g], &per_token(0));
            add_group(&mut aq[1], &s, x.scales[second * groups + g], &per_token(1));
        }
    }
    for (q, aq) in acc.iter().enumerate() {
        for (h, a) in aq.iter().enumerate() {
            let t = t0 + 2 * q + h;
            if t < t0 + n {
                store_panel(a, p, rows, out, t * out_stride);
            }
        }
    }
}

/// The float product with NEON (see the parent module for the arithmetic).
pub(crate) fn gemm_float(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: `W4Kernels::gemm_float` checked the operands' sizes (`check_float`), which
    // bounds every load below; NEON is part of every aarch64 target this module builds for.
    unsafe { float_neon(w, panels, x, tokens, out, out_stride) }
}

/// [`gemm_float`]'s body: panels, then tiles of up to 4 tokens.
#[target_feature(enable = "neon")]
unsafe fn float_neon(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let rows = written_rows(w, &panels);
    for p in panels {
        let mut t = 0;
        while t < tokens {
            let n = (tokens - t).min(4);
            // SAFETY: tokens t..t + n exist; the rest as for `gemm_float`.
            unsafe {
                match n {
                    4 => float_tile::<4>(w, p, x, t, &rows, out, out_stride),
                    3 => float_tile::<3>(w, p, x, t, &rows, out, out_stride),
                    2 => float_tile::<2>(w, p, x, t, &rows, out, out_stride),
                    _ => float_tile::<1>(w, p, x, t, &rows, out, out_stride),
                }
            }
            t += n;
        }
    }
}

/// Column `c` of a block from [`load_block_xor`]'s vectors as f32, rows `4k..4k + 4` in
/// vector `k`. `SHL = 28 − 8·(c % 4) − 4·(c / 4)` moves the column's nibble to the top of
/// each 32-bit lane; the arithmetic shift right by 28 sign-extends it.
#[inline]
#[target_feature(enable = "neon")]
fn column<const SHL: i32>(v: &[int8x16_t; 4]) -> [float32x4_t; 4] {
    v.map(|v| vcvtq_f32_s32(vshrq_n_s32::<28>(vshlq_n_s32::<SHL>(vreinterpretq_s32_s8(v)))))
}

/// Panel `p` × f32 tokens `t0..t0 + T`, column after column: `f = f + q · x` per row.
///
/// # Safety
/// The operands passed `check_float`, `p` is a panel of the matrix, and tokens
/// `t0..t0 + T` exist.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn float_tile<const T: usize>(
    w: &W4Matrix<'_>,
    p: usize,
    x: &[f32],
    t0: usize,
    rows: &Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let shape = w.shape();
    let (pc, groups, group_len) = (shape.padded_cols(), shape.groups(), shape.group_len());
    let (packed, xs) = (w.packed().as_ptr(), x.as_ptr());
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for g in 0..groups {
        let mut f = [[vdupq_n_f32(0.0); 4]; T];
        for o in group_octs(g, group_len, pc) {
            // SAFETY: block (p, o) lies inside `packed`, whose length `W4Matrix::new` checked.
            let v = unsafe { load_block_xor(packed.add(shape.block_offset(p, o))) };
            // SAFETY: token t0 + j's row of `pc` floats exists (`check_float`) and the 8
            // floats of oct o are inside it.
            let xv: [[float32x4_t; 2]; T] = core::array::from_fn(|j| {
                let at = (t0 + j) * pc + o * OCT;
                unsafe { [vld1q_f32(xs.add(at)), vld1q_f32(xs.add(at + 4))] }
            });
            macro_rules! step {
                ($shl:literal, $half:literal, $lane:literal) => {
                    let wc = column::<$shl>(&v);
                    for (fj, xj) in f.iter_mut().zip(&xv) {
                        for (fk, &wk) in fj.iter_mut().zip(&wc) {
                            *fk = vaddq_f32(*fk, vmulq_laneq_f32::<$lane>(wk, xj[$half]));
                        }
                    }
                };
            }
            // Columns 0..8 in order.
            step!(28, 0, 0);
            step!(20, 0, 1);
            step!(12, 0, 2);
            step!(4, 0, 3);
            step!(24, 1, 0);
            step!(16, 1, 1);
            step!(8, 1, 2);
            step!(0, 1, 3);
        }
        // SAFETY: the 16 scales of panel p, group g lie inside the checked scale bytes.
        let s = unsafe { load_scales(w.scale_bytes().as_ptr().add(shape.scale_index(p * PANEL_ROWS, g) * 2)) };
        for (a, fj) in acc.iter_mut().zip(&f) {
            for ((ak, &sk), &fk) in a.iter_mut().zip(&s).zip(fj) {
                *ak = vaddq_f32(*ak, vmulq_f32(sk, fk));
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        store_panel(a, p, rows, out, (t0 + j) * out_stride);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Fixture, Tokens};
    use super::super::W4Kernels;
    use super::*;
    use crate::dot::Isa;
    use crate::w4::activation::ActBits;
    use crate::w4::GroupSize;

    /// With `PETREL_EXPECT_ISA=neon-dotprod,neon-i8mm` (CI's `-cpu max` run), the named
    /// kernels must be available: otherwise the comparisons against the reference would
    /// silently test only the scalar code.
    #[test]
    fn expected_isas_are_available() {
        let Ok(expected) = std::env::var("PETREL_EXPECT_ISA") else { return };
        for name in expected.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let isa = Isa::ALL.into_iter().find(|i| i.name() == name);
            let isa = isa.unwrap_or_else(|| panic!("PETREL_EXPECT_ISA: unknown ISA {name:?}"));
            assert!(W4Kernels::for_isa(isa).is_some(), "PETREL_EXPECT_ISA: {name} is not available on this CPU");
        }
    }

    #[test]
    fn f16_scales_convert_exactly() {
        // Every finite f16 with either sign, 16 at a time.
        let bits: std::vec::Vec<u16> = (0..0x7C00u16).flat_map(|b| [b, b | 0x8000]).collect();
        for chunk in bits.chunks_exact(16) {
            let bytes: std::vec::Vec<u8> = chunk.iter().flat_map(|b| b.to_le_bytes()).collect();
            // SAFETY: `bytes` holds 32 bytes.
            let v = unsafe { load_scales(bytes.as_ptr()) };
            let mut got = [0f32; 16];
            for (k, &q) in v.iter().enumerate() {
                // SAFETY: `got` has room for 16 floats.
                unsafe { vst1q_f32(got.as_mut_ptr().add(4 * k), q) };
            }
            for (&b, g) in chunk.iter().zip(got) {
                assert_eq!(g.to_bits(), half::f16::from_bits(b).to_f32().to_bits(), "{b:#06x}");
            }
        }
    }

    /// Full-range int8 codes over many groups make `s_w · isum` inexact in f32 for most
    /// rows, so a fused multiply–add in the group step (or a different group order) shows.
    #[test]
    fn integer_combine_is_unfused_on_wide_sums() {
        let (rows, cols, tokens, group) = (32, 1024, 3, GroupSize::G128);
        let fixture = Fixture::new(rows, cols, group, 77);
        let w = fixture.matrix();
        let mut state = 12345u64;
        let codes: std::vec::Vec<i8> = (0..tokens * cols)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((state >> 33) % 255) as i32 - 127) as i8
            })
            .collect();
        let sums: std::vec::Vec<i32> = codes.chunks(128).map(|g| g.iter().map(|&q| q as i32).sum()).collect();
        let scales: std::vec::Vec<f32> =
            (0..sums.len()).map(|i| [0.013f32, 1.7, 0.00021][i % 3] * (1 + i % 5) as f32).collect();
        let batch = TokenBatch { tokens, cols, group, codes: &codes, scales: &scales, sums: &sums };
        let mut reference = std::vec![0f32; tokens * rows];
        W4Kernels::scalar().gemm_int(&w, 0..w.shape().panels(), &batch, &mut reference, rows);
        for k in [Isa::NeonDot, Isa::NeonI8mm].into_iter().filter_map(W4Kernels::for_isa) {
            let mut got = std::vec![0f32; tokens * rows];
            k.gemm_int(&w, 0..w.shape().panels(), &batch, &mut got, rows);
            for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{:?} at {i}: {a} vs {b}", k.isa());
            }
        }
    }

    /// Each NEON kernel by name (not through `Isa::ALL`) against the reference, for every
    /// token count 1..=9 (the tile tails, odd counts for `smmla`) and ragged shapes.
    #[test]
    fn neon_kernels_match_the_reference_for_every_tile_tail() {
        let scalar = W4Kernels::scalar();
        let kernels: std::vec::Vec<W4Kernels> =
            [Isa::NeonDot, Isa::NeonI8mm].into_iter().filter_map(W4Kernels::for_isa).collect();
        for (rows, cols, group) in [(16, 8, GroupSize::PerChannel), (37, 200, GroupSize::G64), (5, 33, GroupSize::G32)]
        {
            let fixture = Fixture::new(rows, cols, group, rows as u64);
            let w = fixture.matrix();
            for tokens in 1..=9 {
                for bits in [ActBits::A4, ActBits::A8] {
                    let x = Tokens::new(tokens, cols, group, bits, tokens as u64);
                    let batch = x.batch(cols, group);
                    let stride = rows + 1;
                    let run = |k: &W4Kernels, int: bool| {
                        let mut out = std::vec![f32::NAN; tokens * stride];
                        if int {
                            k.gemm_int(&w, 0..w.shape().panels(), &batch, &mut out, stride);
                        } else {
                            k.gemm_float(&w, 0..w.shape().panels(), &x.f32, tokens, &mut out, stride);
                        }
                        out
                    };
                    for int in [true, false] {
                        let reference = run(&scalar, int);
                        for k in &kernels {
                            let got = run(k, int);
                            let same = got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{:?} int={int} {rows}x{cols} t={tokens} {bits:?}", k.isa());
                        }
                    }
                }
            }
        }
    }
}
