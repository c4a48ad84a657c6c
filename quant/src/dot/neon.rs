//! aarch64 kernels for Q5_0, Q5_1, Q4_K, Q5_K and Q6_K: NEON unpacks the weight codes and
//! the dot-product extension (`sdot`) computes the exact integer sums of step 1; steps 2–4
//! (the float contributions, lanes and combine) are the reference's own scalar code
//! (`scalar::*_contribution`), so the result is bit-identical to [`super::scalar`] by
//! construction. All codes are non-negative and below 64 (Q6_K's are centred to
//! `-32..32` before the product), so signed × signed `sdot` is exact.
//!
//! `sdot` is written as inline assembly: its intrinsic (`vdotq_s32`) is not stable on the
//! compilers Petrel supports. The i8mm table uses these kernels too (every i8mm CPU has
//! dotprod; `install` checks anyway).

use core::arch::aarch64::*;
use core::arch::asm;

use super::scalar::{k_contribution, q4_1_contribution, q5_0_contribution, q6_k_contribution};
use super::{check_lengths, combine_lanes, Dot4Fn, DotFn, Isa};
use crate::activation::Q8Row;
use crate::blocks::{k_scale_min, read_f16, WeightFormat, BLOCK_LEN};

/// `$acc.4s += $a.16b · $b.16b`: four 4-way signed byte dot products. Only for functions
/// that enable `dotprod`.
macro_rules! sdot {
    ($acc:expr, $a:expr, $b:expr) => {
        // SAFETY: register-only arithmetic; the enclosing function enables `dotprod`, and
        // its callers checked the CPU has it (`install`).
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) $acc,
                a = in(vreg) $a,
                b = in(vreg) $b,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// Puts the NEON kernels into a kernel table (the rest stays the reference), if this CPU
/// has the dot-product extension.
pub(super) fn install(dot: &mut [DotFn; 8], dot4: &mut [Dot4Fn; 8]) {
    if !Isa::NeonDot.is_supported() {
        return;
    }
    dot[WeightFormat::Q5_0 as usize] = dot_q5_0;
    dot[WeightFormat::Q5_1 as usize] = dot_q5_1;
    dot[WeightFormat::Q4_K as usize] = dot_q4_k;
    dot[WeightFormat::Q5_K as usize] = dot_q5_k;
    dot[WeightFormat::Q6_K as usize] = dot_q6_k;
    dot4[WeightFormat::Q5_0 as usize] = dot4_q5_0;
    dot4[WeightFormat::Q5_1 as usize] = dot4_q5_1;
    dot4[WeightFormat::Q4_K as usize] = dot4_q4_k;
    dot4[WeightFormat::Q5_K as usize] = dot4_q5_k;
    dot4[WeightFormat::Q6_K as usize] = dot4_q6_k;
}

/// The 32 codes of one activation block: weights 0..16 and 16..32.
type Codes = [int8x16_t; 2];

/// The two halves' exact sums `(Σ_{l<16} c_l x_l, Σ_{l>=16} c_l x_l)` of one block of codes
/// against 32 activation codes at `x`.
///
/// # Safety
/// 32 readable bytes at `x`; the CPU has `dotprod`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn halves(c: Codes, x: *const i8) -> (i32, i32) {
    // SAFETY: the caller guarantees 32 readable bytes; `ld1` needs no alignment.
    let (x0, x1) = unsafe { (vld1q_s8(x), vld1q_s8(x.add(16))) };
    let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
    sdot!(lo, c[0], x0);
    sdot!(hi, c[1], x1);
    (vaddvq_s32(lo), vaddvq_s32(hi))
}

/// The exact `Σ c_l x_l` of one block (see [`halves`]).
///
/// # Safety
/// As [`halves`].
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn isum(c: Codes, x: *const i8) -> i32 {
    // SAFETY: as the caller's.
    let (x0, x1) = unsafe { (vld1q_s8(x), vld1q_s8(x.add(16))) };
    let mut acc = vdupq_n_s32(0);
    sdot!(acc, c[0], x0);
    sdot!(acc, c[1], x1);
    vaddvq_s32(acc)
}

/// `0x10` in byte `j` where bit `j` of the two bytes `lo | hi << 8` is set.
#[inline]
#[target_feature(enable = "neon")]
fn expand_bits16(lo: u8, hi: u8) -> uint8x16_t {
    let spread = vcombine_u8(vdup_n_u8(lo), vdup_n_u8(hi));
    let bits = vcombine_u8(vcreate_u8(0x8040_2010_0804_0201), vcreate_u8(0x8040_2010_0804_0201));
    vandq_u8(vtstq_u8(spread, bits), vdupq_n_u8(0x10))
}

/// The 5-bit codes of a Q5_0 / Q5_1 block whose `qh` is at byte `qh_at`.
///
/// # Safety
/// `qh_at + 20` readable bytes at `block`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q5_codes(block: *const u8, qh_at: usize) -> Codes {
    // SAFETY: the caller guarantees the block's bytes.
    let (qs, qh) = unsafe { (vld1q_u8(block.add(qh_at + 4)), (block.add(qh_at) as *const u32).read_unaligned()) };
    let [b0, b1, b2, b3] = qh.to_le_bytes();
    let lo = vorrq_u8(vandq_u8(qs, vdupq_n_u8(0x0F)), expand_bits16(b0, b1));
    let hi = vorrq_u8(vshrq_n_u8::<4>(qs), expand_bits16(b2, b3));
    [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi)]
}

/// Q5_0 (Q5_1 with `WITH_MIN`) against `N` activation rows.
///
/// # Safety
/// `row` holds `blocks` blocks, every `xs[j]` has `blocks` blocks, the CPU has `dotprod`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn q5_kernel<const WITH_MIN: bool, const N: usize>(row: &[u8], xs: &[Q8Row<'_>; N], blocks: usize) -> [f32; N] {
    let (block_bytes, qh_at) = if WITH_MIN { (24, 4) } else { (22, 2) };
    let mut lanes = [[0f32; 4]; N];
    for b in 0..blocks {
        let block = &row[b * block_bytes..(b + 1) * block_bytes];
        // SAFETY: `block` is one whole block.
        let codes = unsafe { q5_codes(block.as_ptr(), qh_at) };
        let d = read_f16(block, 0);
        for j in 0..N {
            let x = &xs[j];
            // SAFETY: activation block `b` exists (the caller's guarantee).
            let s = unsafe { isum(codes, x.qs.as_ptr().add(b * BLOCK_LEN)) };
            lanes[j][b % 4] += if WITH_MIN {
                q4_1_contribution(d, read_f16(block, 2), x.scales[b], s, x.sums[b])
            } else {
                q5_0_contribution(d, x.scales[b], s, x.sums[b])
            };
        }
    }
    core::array::from_fn(|j| combine_lanes(lanes[j]))
}

/// Q4_K (Q5_K with `FIVE`) against `N` activation rows.
///
/// # Safety
/// `row` holds `blocks / 8` super-blocks, every `xs[j]` has `blocks` activation blocks, the
/// CPU has `dotprod`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn k_kernel<const FIVE: bool, const N: usize>(row: &[u8], xs: &[Q8Row<'_>; N], blocks: usize) -> [f32; N] {
    let (block_bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    let mut lanes = [[0f32; 4]; N];
    let low = vdupq_n_u8(0x0F);
    for sb in 0..blocks / 8 {
        let block = &row[sb * block_bytes..(sb + 1) * block_bytes];
        let (d, dmin) = (read_f16(block, 0), read_f16(block, 2));
        let w = block.as_ptr();
        // SAFETY (all loads): `block` is one whole super-block (`qs` 128 bytes at `qs_at`,
        // Q5_K's `qh` 32 bytes at 16).
        let qh = if FIVE { unsafe { [vld1q_u8(w.add(16)), vld1q_u8(w.add(32))] } } else { [vdupq_n_u8(0); 2] };
        for s in 0..8 {
            let at = qs_at + 32 * (s / 2);
            let bytes = unsafe { [vld1q_u8(w.add(at)), vld1q_u8(w.add(at + 16))] };
            let codes: Codes = core::array::from_fn(|h| {
                let nibble = if s % 2 == 1 { vshrq_n_u8::<4>(bytes[h]) } else { vandq_u8(bytes[h], low) };
                let code = if FIVE {
                    let bit = vdupq_n_u8(1 << s);
                    vorrq_u8(nibble, vandq_u8(vtstq_u8(qh[h], bit), vdupq_n_u8(0x10)))
                } else {
                    nibble
                };
                vreinterpretq_s8_u8(code)
            });
            let (sc, m) = k_scale_min(&block[4..16], s);
            let b = sb * 8 + s;
            for j in 0..N {
                let x = &xs[j];
                // SAFETY: activation block `b` exists (the caller's guarantee).
                let i = unsafe { isum(codes, x.qs.as_ptr().add(b * BLOCK_LEN)) };
                lanes[j][b % 4] += k_contribution(d, dmin, x.scales[b], sc as i32, m as i32, i, x.sums[b]);
            }
        }
    }
    core::array::from_fn(|j| combine_lanes(lanes[j]))
}

/// Q6_K against `N` activation rows.
///
/// # Safety
/// As [`k_kernel`].
#[target_feature(enable = "neon,dotprod")]
unsafe fn q6_k_kernel<const N: usize>(row: &[u8], xs: &[Q8Row<'_>; N], blocks: usize) -> [f32; N] {
    let mut lanes = [[0f32; 4]; N];
    let (low, three, offset) = (vdupq_n_u8(0x0F), vdupq_n_u8(3), vdupq_n_s8(32));
    for sb in 0..blocks / 8 {
        let block = &row[sb * 210..(sb + 1) * 210];
        let d = read_f16(block, 208);
        let w = block.as_ptr();
        for s in 0..8 {
            let (n, k) = (s / 4, s % 4);
            let at = 64 * n + 32 * (k & 1);
            // SAFETY: `block` is one whole super-block (`ql` 128 bytes at 0, `qh` 64 at 128).
            let (ql, qh) = unsafe {
                (
                    [vld1q_u8(w.add(at)), vld1q_u8(w.add(at + 16))],
                    [vld1q_u8(w.add(128 + 32 * n)), vld1q_u8(w.add(128 + 32 * n + 16))],
                )
            };
            let shift = vdupq_n_s8(-2 * k as i8);
            let codes: Codes = core::array::from_fn(|h| {
                let nibble = if k >= 2 { vshrq_n_u8::<4>(ql[h]) } else { vandq_u8(ql[h], low) };
                let high = vshlq_n_u8::<4>(vandq_u8(vshlq_u8(qh[h], shift), three));
                vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(nibble, high)), offset)
            });
            let (sc_lo, sc_hi) = ((block[192 + 2 * s] as i8) as i32, (block[193 + 2 * s] as i8) as i32);
            let b = sb * 8 + s;
            for j in 0..N {
                let x = &xs[j];
                // SAFETY: activation block `b` exists (the caller's guarantee).
                let (lo, hi) = unsafe { halves(codes, x.qs.as_ptr().add(b * BLOCK_LEN)) };
                lanes[j][b % 4] += q6_k_contribution(d, x.scales[b], sc_lo * lo + sc_hi * hi);
            }
        }
    }
    core::array::from_fn(|j| combine_lanes(lanes[j]))
}

/// Checks every row of a four-row call and returns the activation block count.
fn check4(format: WeightFormat, row: &[u8], xs: &[Q8Row<'_>]) -> usize {
    let blocks = check_lengths(format, row, &xs[0]);
    xs.iter().for_each(|x| assert_eq!(check_lengths(format, row, x), blocks));
    blocks
}

// SAFETY (every call below): `check_lengths` proved the sizes the kernels read, and the
// functions are only reachable through `install`, which checked the CPU has `dotprod`.

/// Q5_0 × Q8.
fn dot_q5_0(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q5_0, row, &x);
    // SAFETY: see above.
    unsafe { q5_kernel::<false, 1>(row, &[x], blocks)[0] }
}

/// Q5_1 × Q8.
fn dot_q5_1(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q5_1, row, &x);
    // SAFETY: see above.
    unsafe { q5_kernel::<true, 1>(row, &[x], blocks)[0] }
}

/// Q4_K × Q8.
fn dot_q4_k(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q4_K, row, &x);
    // SAFETY: see above.
    unsafe { k_kernel::<false, 1>(row, &[x], blocks)[0] }
}

/// Q5_K × Q8.
fn dot_q5_k(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q5_K, row, &x);
    // SAFETY: see above.
    unsafe { k_kernel::<true, 1>(row, &[x], blocks)[0] }
}

/// Q6_K × Q8.
fn dot_q6_k(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q6_K, row, &x);
    // SAFETY: see above.
    unsafe { q6_k_kernel::<1>(row, &[x], blocks)[0] }
}

/// Q5_0 × four Q8 rows.
fn dot4_q5_0(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    let blocks = check4(WeightFormat::Q5_0, row, xs);
    // SAFETY: see above, for every row.
    unsafe { q5_kernel::<false, 4>(row, xs, blocks) }
}

/// Q5_1 × four Q8 rows.
fn dot4_q5_1(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    let blocks = check4(WeightFormat::Q5_1, row, xs);
    // SAFETY: see above, for every row.
    unsafe { q5_kernel::<true, 4>(row, xs, blocks) }
}

/// Q4_K × four Q8 rows.
fn dot4_q4_k(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    let blocks = check4(WeightFormat::Q4_K, row, xs);
    // SAFETY: see above, for every row.
    unsafe { k_kernel::<false, 4>(row, xs, blocks) }
}

/// Q5_K × four Q8 rows.
fn dot4_q5_k(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    let blocks = check4(WeightFormat::Q5_K, row, xs);
    // SAFETY: see above, for every row.
    unsafe { k_kernel::<true, 4>(row, xs, blocks) }
}

/// Q6_K × four Q8 rows.
fn dot4_q6_k(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    let blocks = check4(WeightFormat::Q6_K, row, xs);
    // SAFETY: see above, for every row.
    unsafe { q6_k_kernel::<4>(row, xs, blocks) }
}
