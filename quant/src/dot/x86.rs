//! x86-64 kernels: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI (`vpdpbusd` on
//! 256-bit registers). Both follow the reference arithmetic of the parent module exactly:
//! integer block sums are exact, four blocks are reduced at a time into one `__m128i`,
//! and the float contributions are accumulated lane `b % 4` with separate multiply and add.
//!
//! Q5_0 / Q5_1 expand `qh`'s bits into bytes (`0x10` where set) and OR them onto the
//! nibbles, then follow the Q4_x kernels. The K-quant kernels walk one super-block at a
//! time as two groups of four activation blocks: the codes of a group come from two
//! 32-byte loads (plus `qh` for Q5_K, six bits from `ql` and `qh` for Q6_K); the 6-bit
//! scales and minimums (Q4_K, Q5_K) multiply the reduced sums in i32 (`vpmulld`); Q6_K
//! scales each 16-byte half of a block's eight i32 partial sums by its sub-scale before
//! the reduction, so `scaled_b` is exact too.

use core::arch::x86_64::*;

use super::{check_lengths, combine_lanes, Dot4Fn, DotFn};
use crate::activation::Q8Row;
use crate::blocks::{k_scale_min, read_f16, WeightFormat, BLOCK_LEN};

/// True if the AVX2 kernels can run here (AVX2, FMA and F16C).
pub(super) fn has_avx2() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))
    }
}

/// True if the AVX-512 VNNI kernels can run here (AVX-512 F, BW, VL and VNNI on top of the
/// AVX2 set).
pub(super) fn has_avx512vnni() -> bool {
    #[cfg(feature = "std")]
    {
        has_avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(feature = "std"))]
    {
        has_avx2()
            && cfg!(all(
                target_feature = "avx512f",
                target_feature = "avx512bw",
                target_feature = "avx512vl",
                target_feature = "avx512vnni"
            ))
    }
}

/// Expands 16 bytes of packed nibbles into 32 unsigned bytes: low nibbles first (weights
/// 0..16 of the block), then high nibbles (weights 16..32).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_nibbles(qs: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `qs`; the load is unaligned.
    let packed = unsafe { _mm_loadu_si128(qs as *const __m128i) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(packed, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Expands the 32 bits of `bits` into 32 bytes: byte `j` is `0x10` if bit `j` is set,
/// else 0 (the fifth bit of a Q5_0 / Q5_1 code).
#[inline]
#[target_feature(enable = "avx2")]
fn expand_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
    );
    // Byte `j % 8` of each group of eight keeps its bit `j % 8` after OR-ing every other bit.
    let probe = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7FBF_DFEF_F7FB_FDFE));
    _mm256_and_si256(_mm256_cmpeq_epi8(probe, _mm256_set1_epi8(-1)), _mm256_set1_epi8(0x10))
}

/// The 32 five-bit codes (0..32) of the Q5_0 / Q5_1 block at `block`, whose `qh` is at byte
/// `qh_at` and `qs` right after it.
///
/// # Safety
/// `qh_at + 20` readable bytes at `block`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_q5(block: *const u8, qh_at: usize) -> __m256i {
    // SAFETY: the caller guarantees the block's bytes; both loads are unaligned.
    let (qh, nibbles) =
        unsafe { ((block.add(qh_at) as *const u32).read_unaligned(), unpack_nibbles(block.add(qh_at + 4))) };
    _mm256_or_si256(nibbles, expand_bits(qh))
}

/// The low and high nibbles of 32 bytes: the codes of K-quant sub-blocks `2c` and `2c + 1`.
#[inline]
#[target_feature(enable = "avx2")]
fn split_nibbles(bytes: __m256i) -> (__m256i, __m256i) {
    let mask = _mm256_set1_epi8(0x0F);
    (_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask))
}

/// Sums each of four vectors of eight i32 lanes: returns `[Σp0, Σp1, Σp2, Σp3]`.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce4(p0: __m256i, p1: __m256i, p2: __m256i, p3: __m256i) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
}

/// Converts the f16 at `ptr + k * stride` for the first `count` (≤ 4) of four blocks to
/// f32; missing lanes are 0.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16x4(ptr: *const u8, stride: usize, count: usize) -> __m128 {
    let mut packed = 0u64;
    for k in 0..count {
        // SAFETY: the caller guarantees 2 readable bytes at `ptr + k * stride` for k < count.
        let bits = unsafe { (ptr.add(k * stride) as *const u16).read_unaligned() };
        packed |= (bits as u64) << (16 * k);
    }
    _mm_cvtph_ps(_mm_cvtsi64_si128(packed as i64))
}

/// Loads `count` (≤ 4) f32 from `ptr` into the low lanes; missing lanes are 0.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_f32x4(ptr: *const f32, count: usize) -> __m128 {
    if count == 4 {
        // SAFETY: the caller guarantees `count` readable values.
        return unsafe { _mm_loadu_ps(ptr) };
    }
    let mut lanes = [0f32; 4];
    // SAFETY: as above.
    unsafe { core::ptr::copy_nonoverlapping(ptr, lanes.as_mut_ptr(), count) };
    // SAFETY: `lanes` holds four values.
    unsafe { _mm_loadu_ps(lanes.as_ptr()) }
}

/// Loads `count` (≤ 4) i32 from `ptr` into the low lanes; missing lanes are 0.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_i32x4(ptr: *const i32, count: usize) -> __m128i {
    if count == 4 {
        // SAFETY: the caller guarantees `count` readable values.
        return unsafe { _mm_loadu_si128(ptr as *const __m128i) };
    }
    let mut lanes = [0i32; 4];
    // SAFETY: the caller guarantees `count` readable values.
    unsafe { core::ptr::copy_nonoverlapping(ptr, lanes.as_mut_ptr(), count) };
    // SAFETY: `lanes` holds four values.
    unsafe { _mm_loadu_si128(lanes.as_ptr() as *const __m128i) }
}

/// Adds `contribution` to `acc` in the first `count` lanes only. The other lanes get
/// `-0.0`, which leaves every value (signed zeros included) unchanged, exactly as the
/// reference, which adds nothing to a lane without a block.
#[inline]
#[target_feature(enable = "avx2")]
fn accumulate(acc: __m128, contribution: __m128, count: usize) -> __m128 {
    if count == 4 {
        return _mm_add_ps(acc, contribution);
    }
    let lane = _mm_setr_epi32(0, 1, 2, 3);
    let missing = _mm_castsi128_ps(_mm_cmpgt_epi32(lane, _mm_set1_epi32(count as i32 - 1)));
    _mm_add_ps(acc, _mm_blendv_ps(contribution, _mm_set1_ps(-0.0), missing))
}

/// Combines the four lanes as the reference does.
#[inline]
#[target_feature(enable = "avx2")]
fn finish(acc: __m128) -> f32 {
    let mut lanes = [0f32; 4];
    // SAFETY: `lanes` is 16 writable bytes; the store is unaligned.
    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), acc) };
    combine_lanes(lanes)
}

/// Generates, for one way of multiplying unsigned by signed bytes into eight i32 lanes
/// (`$u8i8`) and one for signed by signed (`$i8i8`, whose result `$fix` corrects with the
/// activation sums), the Q4_0 / Q4_1 / Q8_0 kernels for one activation row and for four.
/// The four-row kernels unpack each weight block once and reuse it for every row.
macro_rules! kernels {
    (
        features = $features:literal,
        $q4_0:ident, $q4_1:ident, $q8_0:ident,
        $q4_0_x4:ident, $q4_1_x4:ident, $q8_0_x4:ident,
        u8xi8 = $u8i8:expr,
        i8xi8 = $i8i8:expr,
        i8xi8_sum_correction = $fix:expr $(,)?
    ) => {
        /// Q4_0 × Q8 (see the parent module for the arithmetic).
        pub(crate) fn $q4_0(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q4_0, row, &x);
            // SAFETY: `check_lengths` proved the slice sizes the kernel reads, and these
            // kernels are only reachable through `Kernels::for_isa`, which checked the CPU.
            unsafe { q4_kernel::<false, 1>(row, &[x], blocks)[0] }
        }

        /// Q4_1 × Q8 (see the parent module for the arithmetic).
        pub(crate) fn $q4_1(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q4_1, row, &x);
            // SAFETY: as for Q4_0.
            unsafe { q4_kernel::<true, 1>(row, &[x], blocks)[0] }
        }

        /// Q8_0 × Q8 (see the parent module for the arithmetic).
        pub(crate) fn $q8_0(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q8_0, row, &x);
            // SAFETY: as for Q4_0.
            unsafe { q8_kernel::<1>(row, &[x], blocks)[0] }
        }

        /// Q4_0 × four Q8 rows.
        pub(crate) fn $q4_0_x4(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check_lengths(WeightFormat::Q4_0, row, &xs[0]);
            xs.iter().for_each(|x| assert_eq!(check_lengths(WeightFormat::Q4_0, row, x), blocks));
            // SAFETY: as for Q4_0, for every row.
            unsafe { q4_kernel::<false, 4>(row, xs, blocks) }
        }

        /// Q4_1 × four Q8 rows.
        pub(crate) fn $q4_1_x4(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check_lengths(WeightFormat::Q4_1, row, &xs[0]);
            xs.iter().for_each(|x| assert_eq!(check_lengths(WeightFormat::Q4_1, row, x), blocks));
            // SAFETY: as for Q4_0, for every row.
            unsafe { q4_kernel::<true, 4>(row, xs, blocks) }
        }

        /// Q8_0 × four Q8 rows.
        pub(crate) fn $q8_0_x4(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check_lengths(WeightFormat::Q8_0, row, &xs[0]);
            xs.iter().for_each(|x| assert_eq!(check_lengths(WeightFormat::Q8_0, row, x), blocks));
            // SAFETY: as for Q4_0, for every row.
            unsafe { q8_kernel::<4>(row, xs, blocks) }
        }

        /// Safety: `row` holds `blocks` blocks and every `xs[j]` has `blocks` blocks.
        #[target_feature(enable = $features)]
        unsafe fn q4_kernel<const WITH_MIN: bool, const N: usize>(
            row: &[u8],
            xs: &[Q8Row<'_>; N],
            blocks: usize,
        ) -> [f32; N] {
            let mut acc = [_mm_setzero_ps(); N];
            let mut b = 0;
            // Full groups with a constant count (fully unrolled), then one padded group.
            while b + 4 <= blocks {
                // SAFETY: blocks b..b+4 exist (see `q4_group`).
                unsafe { q4_group::<WITH_MIN, N>(row, xs, b, 4, &mut acc) };
                b += 4;
            }
            if b < blocks {
                // SAFETY: blocks b..blocks exist.
                unsafe { q4_group::<WITH_MIN, N>(row, xs, b, blocks - b, &mut acc) };
            }
            let mut out = [0f32; N];
            for j in 0..N {
                out[j] = finish(acc[j]);
            }
            out
        }

        /// Accumulates blocks `b..b + count` (`count` ≤ 4) of `row` against every `xs[j]`
        /// into `acc[j]`. A short group is padded with zeros and masked out (`accumulate`).
        /// Safety: those blocks exist in `row` and in every activation row.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q4_group<const WITH_MIN: bool, const N: usize>(
            row: &[u8],
            xs: &[Q8Row<'_>; N],
            b: usize,
            count: usize,
            acc: &mut [__m128; N],
        ) {
            let (block_bytes, qs_at) = if WITH_MIN { (20, 4) } else { (18, 2) };
            let w = row.as_ptr();
            // SAFETY (all loads below): the caller guarantees the blocks; activation rows
            // hold 32 bytes of `qs` and one scale and sum per block.
            let mut n = [_mm256_setzero_si256(); 4];
            for k in 0..count {
                n[k] = unsafe { unpack_nibbles(w.add((b + k) * block_bytes + qs_at)) };
            }
            let dw = unsafe { load_f16x4(w.add(b * block_bytes), block_bytes, count) };
            let mw = if WITH_MIN { unsafe { load_f16x4(w.add(b * block_bytes + 2), block_bytes, count) } } else { dw };
            for j in 0..N {
                let x = &xs[j];
                let xq = x.qs.as_ptr();
                let mut p = [_mm256_setzero_si256(); 4];
                for k in 0..count {
                    let v = unsafe { _mm256_loadu_si256(xq.add((b + k) * BLOCK_LEN) as *const __m256i) };
                    p[k] = $u8i8(n[k], v);
                }
                let isum = reduce4(p[0], p[1], p[2], p[3]);
                let dx = unsafe { load_f32x4(x.scales.as_ptr().add(b), count) };
                let sx = unsafe { load_i32x4(x.sums.as_ptr().add(b), count) };
                let dd = _mm_mul_ps(dw, dx);
                let contribution = if WITH_MIN {
                    let scaled = _mm_mul_ps(dd, _mm_cvtepi32_ps(isum));
                    _mm_add_ps(scaled, _mm_mul_ps(_mm_mul_ps(mw, dx), _mm_cvtepi32_ps(sx)))
                } else {
                    let centred = _mm_sub_epi32(isum, _mm_slli_epi32(sx, 3));
                    _mm_mul_ps(dd, _mm_cvtepi32_ps(centred))
                };
                acc[j] = accumulate(acc[j], contribution, count);
            }
        }

        /// As `q4_group`, for Q8_0 weights.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q8_group<const N: usize>(
            row: &[u8],
            xs: &[Q8Row<'_>; N],
            b: usize,
            count: usize,
            acc: &mut [__m128; N],
        ) {
            let w = row.as_ptr();
            // SAFETY (all loads below): as in `q4_group`; a Q8_0 block is a 2-byte scale
            // followed by 32 weight bytes.
            let mut wq = [_mm256_setzero_si256(); 4];
            for k in 0..count {
                wq[k] = unsafe { _mm256_loadu_si256(w.add((b + k) * 34 + 2) as *const __m256i) };
            }
            let dw = unsafe { load_f16x4(w.add(b * 34), 34, count) };
            for j in 0..N {
                let x = &xs[j];
                let xq = x.qs.as_ptr();
                let mut p = [_mm256_setzero_si256(); 4];
                for k in 0..count {
                    let v = unsafe { _mm256_loadu_si256(xq.add((b + k) * BLOCK_LEN) as *const __m256i) };
                    p[k] = $i8i8(wq[k], v);
                }
                let dx = unsafe { load_f32x4(x.scales.as_ptr().add(b), count) };
                let sx = unsafe { load_i32x4(x.sums.as_ptr().add(b), count) };
                let isum = $fix(reduce4(p[0], p[1], p[2], p[3]), sx);
                let contribution = _mm_mul_ps(_mm_mul_ps(dw, dx), _mm_cvtepi32_ps(isum));
                acc[j] = accumulate(acc[j], contribution, count);
            }
        }

        /// Safety: `row` holds `blocks` blocks and every `xs[j]` has `blocks` blocks.
        #[target_feature(enable = $features)]
        unsafe fn q8_kernel<const N: usize>(row: &[u8], xs: &[Q8Row<'_>; N], blocks: usize) -> [f32; N] {
            let mut acc = [_mm_setzero_ps(); N];
            let mut b = 0;
            while b + 4 <= blocks {
                // SAFETY: blocks b..b+4 exist (see `q8_group`).
                unsafe { q8_group::<N>(row, xs, b, 4, &mut acc) };
                b += 4;
            }
            if b < blocks {
                // SAFETY: blocks b..blocks exist.
                unsafe { q8_group::<N>(row, xs, b, blocks - b, &mut acc) };
            }
            let mut out = [0f32; N];
            for j in 0..N {
                out[j] = finish(acc[j]);
            }
            out
        }
    };
}
/// Generates, for one way of multiplying unsigned by signed bytes into eight i32 lanes
/// (`$u8i8`, each lane the sum of four consecutive byte products), the Q5_0, Q5_1, Q4_K,
/// Q5_K and Q6_K kernels for one activation row and for four, named `dot_q5_0`,
/// `dot4_q5_0` and so on, and the tables `DOT` / `DOT4` of all eight formats. Every weight
/// code here is unsigned and below 64, so `vpmaddubsw` cannot saturate
/// (`2 * 63 * 127 < 2^15`).
macro_rules! more_kernels {
    (features = $features:literal, u8xi8 = $u8i8:expr $(,)?) => {
        /// Checks every row of a four-row call and returns the activation block count.
        fn check4(format: WeightFormat, row: &[u8], xs: &[Q8Row<'_>]) -> usize {
            let blocks = check_lengths(format, row, &xs[0]);
            xs.iter().for_each(|x| assert_eq!(check_lengths(format, row, x), blocks));
            blocks
        }

        /// Q5_0 × Q8 (see the parent module for the arithmetic).
        pub(crate) fn dot_q5_0(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q5_0, row, &x);
            // SAFETY: `check_lengths` proved the slice sizes the kernel reads, and these
            // kernels are only reachable through `Kernels::for_isa`, which checked the CPU.
            unsafe { q5_kernel::<false, 1>(row, &[x], blocks)[0] }
        }

        /// Q5_1 × Q8.
        pub(crate) fn dot_q5_1(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q5_1, row, &x);
            // SAFETY: as for Q5_0.
            unsafe { q5_kernel::<true, 1>(row, &[x], blocks)[0] }
        }

        /// Q4_K × Q8.
        pub(crate) fn dot_q4_k(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q4_K, row, &x);
            // SAFETY: as for Q5_0.
            unsafe { k_kernel::<false, 1>(row, &[x], blocks)[0] }
        }

        /// Q5_K × Q8.
        pub(crate) fn dot_q5_k(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q5_K, row, &x);
            // SAFETY: as for Q5_0.
            unsafe { k_kernel::<true, 1>(row, &[x], blocks)[0] }
        }

        /// Q6_K × Q8.
        pub(crate) fn dot_q6_k(row: &[u8], x: Q8Row<'_>) -> f32 {
            let blocks = check_lengths(WeightFormat::Q6_K, row, &x);
            // SAFETY: as for Q5_0.
            unsafe { q6_k_kernel::<1>(row, &[x], blocks)[0] }
        }

        /// Q5_0 × four Q8 rows.
        pub(crate) fn dot4_q5_0(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check4(WeightFormat::Q5_0, row, xs);
            // SAFETY: as for Q5_0, for every row.
            unsafe { q5_kernel::<false, 4>(row, xs, blocks) }
        }

        /// Q5_1 × four Q8 rows.
        pub(crate) fn dot4_q5_1(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check4(WeightFormat::Q5_1, row, xs);
            // SAFETY: as for Q5_0, for every row.
            unsafe { q5_kernel::<true, 4>(row, xs, blocks) }
        }

        /// Q4_K × four Q8 rows.
        pub(crate) fn dot4_q4_k(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check4(WeightFormat::Q4_K, row, xs);
            // SAFETY: as for Q5_0, for every row.
            unsafe { k_kernel::<false, 4>(row, xs, blocks) }
        }

        /// Q5_K × four Q8 rows.
        pub(crate) fn dot4_q5_k(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check4(WeightFormat::Q5_K, row, xs);
            // SAFETY: as for Q5_0, for every row.
            unsafe { k_kernel::<true, 4>(row, xs, blocks) }
        }

        /// Q6_K × four Q8 rows.
        pub(crate) fn dot4_q6_k(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
            let blocks = check4(WeightFormat::Q6_K, row, xs);
            // SAFETY: as for Q5_0, for every row.
            unsafe { q6_k_kernel::<4>(row, xs, blocks) }
        }

        /// Safety: `row` holds `blocks` Q5_0 (Q5_1 with `WITH_MIN`) blocks and every
        /// `xs[j]` has `blocks` blocks.
        #[target_feature(enable = $features)]
        unsafe fn q5_kernel<const WITH_MIN: bool, const N: usize>(
            row: &[u8],
            xs: &[Q8Row<'_>; N],
            blocks: usize,
        ) -> [f32; N] {
            let mut acc = [_mm_setzero_ps(); N];
            let mut b = 0;
            while b < blocks {
                let count = (blocks - b).min(4);
                // SAFETY: blocks b..b + count exist (see `q5_group`).
                unsafe { q5_group::<WITH_MIN, N>(row, xs, b, count, &mut acc) };
                b += count;
            }
            core::array::from_fn(|j| finish(acc[j]))
        }

        /// Accumulates blocks `b..b + count` (`count` ≤ 4) against every `xs[j]`; as
        /// `q4_group`. Safety: those blocks exist in `row` and in every activation row.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q5_group<const WITH_MIN: bool, const N: usize>(
            row: &[u8],
            xs: &[Q8Row<'_>; N],
            b: usize,
            count: usize,
            acc: &mut [__m128; N],
        ) {
            let (block_bytes, qh_at) = if WITH_MIN { (24, 4) } else { (22, 2) };
            let w = row.as_ptr();
            // SAFETY (all loads below): the caller guarantees the blocks; activation rows
            // hold 32 bytes of `qs` and one scale and sum per block.
            let mut n = [_mm256_setzero_si256(); 4];
            for k in 0..count {
                n[k] = unsafe { unpack_q5(w.add((b + k) * block_bytes), qh_at) };
            }
            let dw = unsafe { load_f16x4(w.add(b * block_bytes), block_bytes, count) };
            let mw = if WITH_MIN { unsafe { load_f16x4(w.add(b * block_bytes + 2), block_bytes, count) } } else { dw };
            for j in 0..N {
                let x = &xs[j];
                let xq = x.qs.as_ptr();
                let mut p = [_mm256_setzero_si256(); 4];
                for k in 0..count {
                    let v = unsafe { _mm256_loadu_si256(xq.add((b + k) * BLOCK_LEN) as *const __m256i) };
                    p[k] = $u8i8(n[k], v);
                }
                let isum = reduce4(p[0], p[1], p[2], p[3]);
                let dx = unsafe { load_f32x4(x.scales.as_ptr().add(b), count) };
                let sx = unsafe { load_i32x4(x.sums.as_ptr().add(b), count) };
                let dd = _mm_mul_ps(dw, dx);
                let contribution = if WITH_MIN {
                    let scaled = _mm_mul_ps(dd, _mm_cvtepi32_ps(isum));
                    _mm_add_ps(scaled, _mm_mul_ps(_mm_mul_ps(mw, dx), _mm_cvtepi32_ps(sx)))
                } else {
                    let centred = _mm_sub_epi32(isum, _mm_slli_epi32(sx, 4));
                    _mm_mul_ps(dd, _mm_cvtepi32_ps(centred))
                };
                acc[j] = accumulate(acc[j], contribution, count);
            }
        }

        /// Q4_K (Q5_K with `FIVE`) super-blocks against `N` activation rows.
        /// Safety: `row` holds `blocks / 8` super-blocks and every `xs[j]` has `blocks`
        /// activation blocks.
        #[target_feature(enable = $features)]
        unsafe fn k_kernel<const FIVE: bool, const N: usize>(
            row: &[u8],
            xs: &[Q8Row<'_>; N],
            blocks: usize,
        ) -> [f32; N] {
            let (block_bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
            let mut acc = [_mm_setzero_ps(); N];
            for sb in 0..blocks / 8 {
                let block = &row[sb * block_bytes..(sb + 1) * block_bytes];
                let (mut sc, mut m) = ([0i32; 8], [0i32; 8]);
                for s in 0..8 {
                    let (a, b) = k_scale_min(&block[4..16], s);
                    (sc[s], m[s]) = (a as i32, b as i32);
                }
                let dw = _mm_set1_ps(read_f16(block, 0));
                let dmin = _mm_set1_ps(read_f16(block, 2));
                let w = block.as_ptr();
                // SAFETY (all loads below): `block` is one whole super-block (`qs` is 128
                // bytes at `qs_at`, Q5_K's `qh` 32 bytes at 16), and activation blocks
                // 8 sb..8 sb + 8 exist in every row.
                let qh = if FIVE {
                    unsafe { _mm256_loadu_si256(w.add(16) as *const __m256i) }
                } else {
                    _mm256_setzero_si256()
                };
                for g in 0..2 {
                    let (c0, c1) = unsafe {
                        (
                            _mm256_loadu_si256(w.add(qs_at + 64 * g) as *const __m256i),
                            _mm256_loadu_si256(w.add(qs_at + 64 * g + 32) as *const __m256i),
                        )
                    };
                    let ((n0, n1), (n2, n3)) = (split_nibbles(c0), split_nibbles(c1));
                    let mut codes = [n0, n1, n2, n3];
                    if FIVE {
                        for (k, code) in codes.iter_mut().enumerate() {
                            let bit = _mm256_set1_epi8((1u8 << (4 * g + k)) as i8);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                            *code = _mm256_or_si256(*code, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
                        }
                    }
                    let sc4 = _mm_setr_epi32(sc[4 * g], sc[4 * g + 1], sc[4 * g + 2], sc[4 * g + 3]);
                    let m4 = _mm_setr_epi32(m[4 * g], m[4 * g + 1], m[4 * g + 2], m[4 * g + 3]);
                    let b = sb * 8 + 4 * g;
                    for j in 0..N {
                        let x = &xs[j];
                        let xq = x.qs.as_ptr();
                        let mut p = [_mm256_setzero_si256(); 4];
                        for k in 0..4 {
                            let v = unsafe { _mm256_loadu_si256(xq.add((b + k) * BLOCK_LEN) as *const __m256i) };
                            p[k] = $u8i8(codes[k], v);
                        }
                        let isum = _mm_mullo_epi32(reduce4(p[0], p[1], p[2], p[3]), sc4);
                        let dx = unsafe { _mm_loadu_ps(x.scales.as_ptr().add(b)) };
                        let sx = unsafe { _mm_loadu_si128(x.sums.as_ptr().add(b) as *const __m128i) };
                        let mins = _mm_mullo_epi32(sx, m4);
                        let scaled = _mm_mul_ps(_mm_mul_ps(dw, dx), _mm_cvtepi32_ps(isum));
                        let offset = _mm_mul_ps(_mm_mul_ps(dmin, dx), _mm_cvtepi32_ps(mins));
                        acc[j] = _mm_add_ps(acc[j], _mm_sub_ps(scaled, offset));
                    }
                }
            }
            core::array::from_fn(|j| finish(acc[j]))
        }

        /// Q6_K super-blocks against `N` activation rows. Safety: as `k_kernel`.
        #[target_feature(enable = $features)]
        unsafe fn q6_k_kernel<const N: usize>(row: &[u8], xs: &[Q8Row<'_>; N], blocks: usize) -> [f32; N] {
            let mut acc = [_mm_setzero_ps(); N];
            let low = _mm256_set1_epi8(0x0F);
            let offset = _mm256_set1_epi8(32);
            for sb in 0..blocks / 8 {
                let block = &row[sb * 210..(sb + 1) * 210];
                let dw = _mm_set1_ps(read_f16(block, 208));
                let w = block.as_ptr();
                for n in 0..2 {
                    // SAFETY (all loads below): `block` is one whole super-block (`ql` at
                    // 0, 128 bytes; `qh` at 128, 64 bytes), and activation blocks
                    // 8 sb..8 sb + 8 exist in every row.
                    let (ql0, ql1, qh) = unsafe {
                        (
                            _mm256_loadu_si256(w.add(64 * n) as *const __m256i),
                            _mm256_loadu_si256(w.add(64 * n + 32) as *const __m256i),
                            _mm256_loadu_si256(w.add(128 + 32 * n) as *const __m256i),
                        )
                    };
                    let codes = [
                        _mm256_or_si256(
                            _mm256_and_si256(ql0, low),
                            _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, low),
                            _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                            _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30)),
                        ),
                    ];
                    // Lanes 0..4 of a block's partial sums cover its first 16 weights.
                    let scales: [__m256i; 4] = core::array::from_fn(|k| {
                        let s = 192 + 8 * n + 2 * k;
                        _mm256_set_m128i(
                            _mm_set1_epi32((block[s + 1] as i8) as i32),
                            _mm_set1_epi32((block[s] as i8) as i32),
                        )
                    });
                    let b = sb * 8 + 4 * n;
                    for j in 0..N {
                        let x = &xs[j];
                        let xq = x.qs.as_ptr();
                        let mut p = [_mm256_setzero_si256(); 4];
                        for k in 0..4 {
                            let v = unsafe { _mm256_loadu_si256(xq.add((b + k) * BLOCK_LEN) as *const __m256i) };
                            let centred = _mm256_sub_epi32($u8i8(codes[k], v), $u8i8(offset, v));
                            p[k] = _mm256_mullo_epi32(centred, scales[k]);
                        }
                        let scaled = reduce4(p[0], p[1], p[2], p[3]);
                        let dx = unsafe { _mm_loadu_ps(x.scales.as_ptr().add(b)) };
                        acc[j] = _mm_add_ps(acc[j], _mm_mul_ps(_mm_mul_ps(dw, dx), _mm_cvtepi32_ps(scaled)));
                    }
                }
            }
            core::array::from_fn(|j| finish(acc[j]))
        }

        /// The single-row kernels, indexed by `WeightFormat as usize`.
        pub(crate) const DOT: [DotFn; 8] =
            [dot_q4_0, dot_q4_1, dot_q8_0, dot_q5_0, dot_q5_1, dot_q4_k, dot_q5_k, dot_q6_k];
        /// The four-row kernels, indexed by `WeightFormat as usize`.
        pub(crate) const DOT4: [Dot4Fn; 8] =
            [dot4_q4_0, dot4_q4_1, dot4_q8_0, dot4_q5_0, dot4_q5_1, dot4_q4_k, dot4_q5_k, dot4_q6_k];
    };
}

mod avx2 {
    use super::*;

    /// Unsigned × signed bytes → eight i32 lanes (no saturation: |n| ≤ 15).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn u8xi8(n: __m256i, v: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(n, v), _mm256_set1_epi16(1))
    }

    /// Signed × signed bytes via |w| and sign(v, w); |w| ≤ 128 and |v| ≤ 127 keep the
    /// pairwise 16-bit sums below 2^15.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn i8xi8(w: __m256i, v: __m256i) -> __m256i {
        u8xi8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w))
    }

    kernels!(
        features = "avx2,fma,f16c",
        dot_q4_0,
        dot_q4_1,
        dot_q8_0,
        dot4_q4_0,
        dot4_q4_1,
        dot4_q8_0,
        u8xi8 = u8xi8,
        i8xi8 = i8xi8,
        i8xi8_sum_correction = |isum: __m128i, _sums: __m128i| isum,
    );
    more_kernels!(features = "avx2,fma,f16c", u8xi8 = u8xi8);
}

mod vnni {
    use super::*;

    /// Unsigned × signed bytes → eight i32 lanes with `vpdpbusd`.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    fn u8xi8(n: __m256i, v: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), n, v)
    }

    /// Signed weights become unsigned by adding 128 (`w ^ 0x80`); the extra `128 Σ v`
    /// is removed per block from the activation sums.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    fn i8xi8(w: __m256i, v: __m256i) -> __m256i {
        u8xi8(_mm256_xor_si256(w, _mm256_set1_epi8(-128)), v)
    }

    kernels!(
        features = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        dot_q4_0,
        dot_q4_1,
        dot_q8_0,
        dot4_q4_0,
        dot4_q4_1,
        dot4_q8_0,
        u8xi8 = u8xi8,
        i8xi8 = i8xi8,
        i8xi8_sum_correction = |isum: __m128i, sums: __m128i| _mm_sub_epi32(isum, _mm_slli_epi32(sums, 7)),
    );
    more_kernels!(features = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", u8xi8 = u8xi8);
}

pub(super) use avx2::{DOT as AVX2_DOT, DOT4 as AVX2_DOT4};
pub(super) use vnni::{DOT as VNNI_DOT, DOT4 as VNNI_DOT4};
