//! A lookup-table kernel for W4A4 (after T-MAC): products come from byte shuffles instead of
//! multiplies.
//!
//! With int4 weights and int4 activations every product `q_w · q_x` lies in `[-56, 64]`.
//! For an activation code `a`, the 16 products `a · (u - 8)` with the 16 weight nibbles `u`
//! fit one 128-bit register, so one `vpshufb` with the weight nibbles of 16 (32, 64) rows at
//! one column as indices yields their 16 (32, 64) products with that column's activation.
//! The 16 tables (one per activation code, 256 bytes) are constants.
//!
//! # Layout ([`LutMatrix`], built once from a [`W4Matrix`])
//! Rows are cut into blocks of [`LUT_ROWS`] = 64 (four W4 panels; missing rows have code 0
//! and scale 0). A block holds, per pair of columns `(2k, 2k + 1)`, 64 bytes: byte `i` is the
//! row `16 · (i % 4) + i / 4` of the block, with the nibble `u = q + 8` of column `2k` low and
//! of column `2k + 1` high. That row order makes the accumulation below come out as four
//! vectors of 16 consecutive rows, i.e. the four W4 panels, in order. Scales are f32 in the
//! W4 order (panel, group, 16 rows).
//!
//! # Arithmetic
//! The tables hold products biased by +56 (so in `[0, 120]`); the two products of a column
//! pair add in u8 (at most 240). These byte sums are accumulated in u16 lanes in two
//! registers: `all` adds the sums as 16-bit words (`sum_even + 256 · sum_odd`, wrapping) and
//! `odd` adds them shifted right by 8 (`sum_odd`); `all - 256 · odd` then recovers
//! `sum_even`. Both are exact for up to [`FLUSH_PAIRS`] column pairs (`240 · 256 < 2^16`),
//! after which (and at the end of each scale group) they are widened into i32 sums, which
//! are exact: minus the bias, `isum = Σ q_w · q_x` of the reference. The float combine is then
//! the reference's (per group `acc = acc + (s_w · s_x[g]) · (f32) isum`: the weight scales
//! times the token's broadcast group scale, that times the sum, then the add; `acc` is the
//! result), lane per row, so the results are bit-identical to [`super::scalar::gemm_int`] for
//! int4 activations.
//!
//! # Cost
//! Per column pair, token and register of rows this is two shuffles, a byte add, a shift and
//! two word adds (6 instructions for 2 × 64 products with 512-bit registers), where the
//! unpack-to-int8 kernels need 2 `vpdpbusd` for 2 × 64 products plus a share of the
//! unpacking, or 5 AVX2 instructions for 2 × 32. With 4-bit weights a table index covers one
//! weight, so the table cannot win back the widening it needs (T-MAC gains at 1–2 bits).
//! Measured single-threaded on an AVX-512 VNNI Xeon (SmolLM2 shapes, per channel,
//! `petrel-bench w4a4`, results in `bench/results/w4a4.md`): about 0.36× the VNNI kernel with 512-bit registers and 0.8× the AVX2
//! unpack kernel with 256-bit registers, at every shape and token count, so
//! [`super::W4Kernels`] stays the default.

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use crate::dot::Isa;
use crate::w4::activation::TokenBatch;
use crate::w4::{W4Matrix, W4Shape, PANEL_ROWS};

/// Rows per block of the lookup-table layout (four W4 panels).
pub const LUT_ROWS: usize = 64;

/// Column pairs accumulated in 16-bit lanes before they are widened to 32 bits.
pub const FLUSH_PAIRS: usize = 256;

/// Bias added to every table entry, so that products are unsigned bytes.
#[cfg(target_arch = "x86_64")]
const BIAS: i32 = 56;

/// `TABLES[a + 8][u] = a · (u - 8) + BIAS` for every activation code `a` and weight nibble `u`.
#[cfg(target_arch = "x86_64")]
static TABLES: [[u8; 16]; 16] = {
    let mut t = [[0u8; 16]; 16];
    let mut a = 0;
    while a < 16 {
        let mut u = 0;
        while u < 16 {
            t[a][u] = ((a as i32 - 8) * (u as i32 - 8) + BIAS) as u8;
            u += 1;
        }
        a += 1;
    }
    t
};

/// A W4 matrix repacked for the lookup-table kernel (see the module docs for the layout).
#[derive(Clone, Debug)]
pub struct LutMatrix {
    shape: W4Shape,
    blocks: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl LutMatrix {
    /// Repacks `w` (one pass over its codes and scales).
    pub fn new(w: &W4Matrix<'_>) -> Self {
        let shape = *w.shape();
        let (padded_rows, groups) = (shape.padded_rows(), shape.groups());
        let blocks = shape.rows.div_ceil(LUT_ROWS);
        let pairs = shape.padded_cols() / 2;
        let mut codes = vec![0x88u8; blocks * pairs * LUT_ROWS];
        for (n, chunk) in codes.chunks_exact_mut(LUT_ROWS).enumerate() {
            let (b, k) = (n / pairs, n % pairs);
            for (i, byte) in chunk.iter_mut().enumerate() {
                let r = b * LUT_ROWS + 16 * (i % 4) + i / 4;
                if r < padded_rows {
                    let lo = (w.code(r, 2 * k) + 8) as u8;
                    let hi = (w.code(r, 2 * k + 1) + 8) as u8;
                    *byte = lo | hi << 4;
                }
            }
        }
        let mut scales = vec![0f32; blocks * LUT_ROWS * groups];
        for (n, s) in scales.iter_mut().enumerate() {
            let (panel, g, i) = (n / (groups * PANEL_ROWS), n / PANEL_ROWS % groups, n % PANEL_ROWS);
            let r = panel * PANEL_ROWS + i;
            if r < padded_rows {
                *s = w.scale(r, g);
            }
        }
        LutMatrix { shape, blocks, codes, scales }
    }

    /// The shape of the source matrix.
    pub fn shape(&self) -> &W4Shape {
        &self.shape
    }

    /// Number of 64-row blocks.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Bytes of codes and scales held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

/// Why the lookup-table kernel did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LutError {
    /// No lookup-table kernel for this CPU or build (only x86-64 with AVX2 has one).
    Unsupported,
    /// An activation code lies outside the int4 range `[-8, 7]`.
    NotInt4,
}

impl core::fmt::Display for LutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LutError::Unsupported => write!(f, "no lookup-table kernel for this CPU"),
            LutError::NotInt4 => write!(f, "the lookup-table kernel needs int4 activation codes"),
        }
    }
}

/// The lookup-table kernel for one instruction set.
#[derive(Clone, Copy, Debug)]
pub struct LutKernel {
    isa: Isa,
}

impl LutKernel {
    /// The kernel for `isa` (AVX2, or AVX-512 BW within [`Isa::Avx512Vnni`]), or `None` if
    /// this CPU or build cannot run it or there is none for `isa`.
    pub fn for_isa(isa: Isa) -> Option<Self> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_supported() => Some(LutKernel { isa }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_supported() => Some(LutKernel { isa }),
            _ => None,
        }
    }

    /// The fastest lookup-table kernel this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        Isa::ALL.iter().rev().find_map(|&isa| Self::for_isa(isa))
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `out[t · out_stride + r] = Σ_c w[r][c] · x[t][c]` for the rows `r < rows` of the
    /// 64-row `blocks`, bit-identical to [`super::W4Kernels::gemm_int`] on the same rows.
    ///
    /// # Errors
    /// [`LutError::NotInt4`] if an activation code is outside `[-8, 7]` (nothing is written).
    ///
    /// # Panics
    /// If the operands disagree in shape or `out` is too short.
    pub fn gemm_int(
        &self,
        m: &LutMatrix,
        blocks: Range<usize>,
        x: &TokenBatch<'_>,
        out: &mut [f32],
        out_stride: usize,
    ) -> Result<(), LutError> {
        check(m, &blocks, x, out, out_stride)?;
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                x86::gemm_avx2(m, blocks, x, out, out_stride);
                Ok(())
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                x86::gemm_avx512(m, blocks, x, out, out_stride);
                Ok(())
            }
            _ => Err(LutError::Unsupported),
        }
    }
}

/// The whole product of `m` with `x` on the fastest lookup-table kernel of this CPU (see
/// [`LutKernel::gemm_int`]).
///
/// # Errors
/// [`LutError::Unsupported`] without one, [`LutError::NotInt4`] for int8 activations.
pub fn lut_gemm_int(m: &LutMatrix, x: &TokenBatch<'_>, out: &mut [f32], out_stride: usize) -> Result<(), LutError> {
    LutKernel::detect().ok_or(LutError::Unsupported)?.gemm_int(m, 0..m.blocks, x, out, out_stride)
}

/// Checks what the SIMD code relies on: the shapes, the output's extent and the code range.
fn check(m: &LutMatrix, blocks: &Range<usize>, x: &TokenBatch<'_>, out: &[f32], stride: usize) -> Result<(), LutError> {
    assert!(
        x.is_consistent() && x.cols == m.shape.cols && x.group == m.shape.group,
        "activation batch disagrees with the weight matrix"
    );
    assert!(blocks.start <= blocks.end && blocks.end <= m.blocks, "block range outside the matrix");
    let rows = (blocks.start * LUT_ROWS).min(m.shape.rows)..(blocks.end * LUT_ROWS).min(m.shape.rows);
    if x.tokens > 0 && !rows.is_empty() {
        assert!(stride >= rows.end, "output stride shorter than a row of outputs");
        assert!(out.len() >= (x.tokens - 1) * stride + rows.end, "output buffer too short");
    }
    if x.codes.iter().any(|&q| !(-8..=7).contains(&q)) {
        return Err(LutError::NotInt4);
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 and AVX-512 BW lookup-table tiles: `T` tokens × `P` blocks, each weight
    //! vector unpacked once for the `T` tokens and each table broadcast once for the `P`
    //! blocks.
    //!
    //! Safety: everything here reads through raw pointers without bounds checks. It is only
    //! reached through [`super::LutKernel::gemm_int`], which is only built after the CPU
    //! features were detected and which ran [`super::check`] first: that proves the shapes
    //! (`tokens × padded_cols` codes, all in `[-8, 7]`, so every table index is in `0..16`,
    //! and `tokens × groups` scales),
    //! the block range, and that `out` holds every `t · stride + r` for the rows written;
    //! [`super::LutMatrix::new`] sized the codes and scales to `blocks`.

    use core::arch::x86_64::*;
    use core::ops::Range;

    use super::{LutMatrix, BIAS, FLUSH_PAIRS, LUT_ROWS, TABLES};
    use crate::w4::activation::TokenBatch;
    use crate::w4::PANEL_ROWS;

    /// One call's operands as raw parts.
    struct Call {
        codes: *const u8,
        scales: *const f32,
        pairs: usize,
        groups: usize,
        /// Column pairs per group (the last may have fewer).
        group_pairs: usize,
        rows: usize,
        x: *const i8,
        x_scales: *const f32,
        pc: usize,
        tokens: usize,
        out: *mut f32,
        stride: usize,
    }

    impl Call {
        fn new(m: &LutMatrix, x: &TokenBatch<'_>, out: &mut [f32], stride: usize) -> Self {
            Call {
                codes: m.codes.as_ptr(),
                scales: m.scales.as_ptr(),
                pairs: m.shape.padded_cols() / 2,
                groups: m.shape.groups(),
                group_pairs: m.shape.group_len() / 2,
                rows: m.shape.rows,
                x: x.codes.as_ptr(),
                x_scales: x.scales.as_ptr(),
                pc: m.shape.padded_cols(),
                tokens: x.tokens,
                out: out.as_mut_ptr(),
                stride,
            }
        }

        /// The 64 bytes of block `b`, pair `k`. Safety: `b` is a block, `k < pairs`.
        #[inline(always)]
        unsafe fn block(&self, b: usize, k: usize) -> *const u8 {
            // SAFETY: as the caller promises, inside the codes.
            unsafe { self.codes.add((b * self.pairs + k) * LUT_ROWS) }
        }

        /// The 16-byte table for code `c` of token `t`. Safety: `t < tokens`, `c < pc`.
        #[inline(always)]
        unsafe fn table(&self, t: usize, c: usize) -> *const u8 {
            // SAFETY: the index is in the codes; the code is in [-8, 7] (checked), so the
            // table row exists.
            unsafe {
                let a = self.x.add(t * self.pc + c).read();
                TABLES.as_ptr().add((a as i32 + 8) as usize) as *const u8
            }
        }

        /// The 16 scales of panel `p` (of the repacked matrix), group `g`.
        /// Safety: `p < 4 · blocks`, `g < groups`.
        #[inline(always)]
        unsafe fn scales(&self, p: usize, g: usize) -> *const f32 {
            // SAFETY: as the caller promises.
            unsafe { self.scales.add((p * self.groups + g) * PANEL_ROWS) }
        }

        /// The scale of token `t`, group `g`. Safety: `t < tokens`, `g < groups`.
        #[inline(always)]
        unsafe fn x_scale(&self, t: usize, g: usize) -> f32 {
            // SAFETY: as the caller promises, inside the `tokens × groups` scales.
            unsafe { self.x_scales.add(t * self.groups + g).read() }
        }

        /// Rows of panel `p` that exist (0 for panels past the matrix).
        #[inline(always)]
        fn valid_rows(&self, p: usize) -> usize {
            self.rows.saturating_sub(p * PANEL_ROWS).min(PANEL_ROWS)
        }

        /// Where row `16p` of token `t` goes. Safety: `valid_rows(p) > 0` and the block of
        /// `p` is in the call's range.
        #[inline(always)]
        unsafe fn out(&self, t: usize, p: usize) -> *mut f32 {
            // SAFETY: as the caller promises (see the module docs).
            unsafe { self.out.add(t * self.stride + p * PANEL_ROWS) }
        }

        /// Pairs `start..end` of group `g`.
        #[inline(always)]
        fn group_pairs(&self, g: usize) -> (usize, usize) {
            let start = g * self.group_pairs;
            (start, (start + self.group_pairs).min(self.pairs))
        }
    }

    /// Calls `$call` with `$t` a constant equal to the run-time `$n` in `1..=4`.
    macro_rules! by_tokens {
        ($n:expr, |$t:ident| $call:expr) => {
            match $n {
                4 => {
                    const $t: usize = 4;
                    $call
                }
                3 => {
                    const $t: usize = 3;
                    $call
                }
                2 => {
                    const $t: usize = 2;
                    $call
                }
                1 => {
                    const $t: usize = 1;
                    $call
                }
                _ => unreachable!(),
            }
        };
    }

    /// The tiles of one instruction set.
    trait Tiles {
        /// Tokens `t0..t0 + T` × blocks `b0..b0 + P`. Safety: see the module docs; the tile
        /// lies inside the batch and the checked block range, and the CPU has the features.
        unsafe fn tile<const T: usize, const P: usize>(c: &Call, b0: usize, t0: usize);
    }

    /// Blocks outer (`PP` at a time, one for a remainder), tokens inner (`TT ≤ 4` at a time).
    /// Safety: see [`Tiles::tile`].
    #[inline(always)]
    unsafe fn drive<K: Tiles, const TT: usize, const PP: usize>(c: &Call, blocks: Range<usize>) {
        let (mut b, end) = (blocks.start, blocks.end);
        while b < end {
            let step = if b + PP <= end { PP } else { 1 };
            let mut t = 0;
            while t < c.tokens {
                let n = (c.tokens - t).min(TT);
                // SAFETY: the tile lies inside the tokens and `blocks`.
                if step == PP {
                    by_tokens!(n, |N| unsafe { K::tile::<N, PP>(c, b, t) });
                } else {
                    by_tokens!(n, |N| unsafe { K::tile::<N, 1>(c, b, t) });
                }
                t += n;
            }
            b += step;
        }
    }

    /// The AVX-512 BW tiles (64 rows per register).
    struct Avx512;

    impl Tiles for Avx512 {
        #[inline(always)]
        unsafe fn tile<const T: usize, const P: usize>(c: &Call, b0: usize, t0: usize) {
            // SAFETY: forwarded.
            unsafe { tile_avx512::<T, P>(c, b0, t0) }
        }
    }

    /// Safety: see [`Tiles::tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn tile_avx512<const T: usize, const P: usize>(c: &Call, b0: usize, t0: usize) {
        let nibble = _mm512_set1_epi8(0x0F);
        let word = _mm512_set1_epi32(0xFFFF);
        let mut acc = [[[_mm512_setzero_ps(); 4]; P]; T];
        for g in 0..c.groups {
            let (start, end) = c.group_pairs(g);
            let mut isum = [[[_mm512_setzero_si512(); 4]; P]; T];
            let mut k = start;
            while k < end {
                let flush_end = (k + FLUSH_PAIRS).min(end);
                let mut all = [[_mm512_setzero_si512(); P]; T];
                let mut odd = [[_mm512_setzero_si512(); P]; T];
                while k < flush_end {
                    let mut lo = [_mm512_setzero_si512(); P];
                    let mut hi = [_mm512_setzero_si512(); P];
                    for p in 0..P {
                        // SAFETY: block `b0 + p` is in the range and `k < pairs`.
                        let v = unsafe { _mm512_loadu_si512(c.block(b0 + p, k) as *const _) };
                        lo[p] = _mm512_and_si512(v, nibble);
                        hi[p] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                    }
                    for t in 0..T {
                        // SAFETY: token `t0 + t` exists and columns `2k, 2k + 1 < pc`.
                        let (ta, tb) = unsafe {
                            (
                                _mm512_broadcast_i32x4(_mm_loadu_si128(c.table(t0 + t, 2 * k) as *const __m128i)),
                                _mm512_broadcast_i32x4(_mm_loadu_si128(c.table(t0 + t, 2 * k + 1) as *const __m128i)),
                            )
                        };
                        for p in 0..P {
                            let s = _mm512_add_epi8(_mm512_shuffle_epi8(ta, lo[p]), _mm512_shuffle_epi8(tb, hi[p]));
                            all[t][p] = _mm512_add_epi16(all[t][p], s);
                            odd[t][p] = _mm512_add_epi16(odd[t][p], _mm512_srli_epi16::<8>(s));
                        }
                    }
                    k += 1;
                }
                for t in 0..T {
                    for p in 0..P {
                        let even = _mm512_sub_epi16(all[t][p], _mm512_slli_epi16::<8>(odd[t][p]));
                        let s = &mut isum[t][p];
                        s[0] = _mm512_add_epi32(s[0], _mm512_and_si512(even, word));
                        s[1] = _mm512_add_epi32(s[1], _mm512_and_si512(odd[t][p], word));
                        s[2] = _mm512_add_epi32(s[2], _mm512_srli_epi32::<16>(even));
                        s[3] = _mm512_add_epi32(s[3], _mm512_srli_epi32::<16>(odd[t][p]));
                    }
                }
            }
            let bias = _mm512_set1_epi32(2 * BIAS * (end - start) as i32);
            // SAFETY: tokens `t0 + t` exist and `g` is a group.
            let xs: [__m512; T] = core::array::from_fn(|t| _mm512_set1_ps(unsafe { c.x_scale(t0 + t, g) }));
            for p in 0..P {
                for f in 0..4 {
                    // SAFETY: panel `4(b0 + p) + f` of the repacked matrix and group `g` exist.
                    let s = unsafe { _mm512_loadu_ps(c.scales(4 * (b0 + p) + f, g)) };
                    for t in 0..T {
                        let isum = _mm512_cvtepi32_ps(_mm512_sub_epi32(isum[t][p][f], bias));
                        let st = _mm512_mul_ps(s, xs[t]);
                        acc[t][p][f] = _mm512_add_ps(acc[t][p][f], _mm512_mul_ps(st, isum));
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                for (f, &a) in acc.iter().enumerate() {
                    let panel = 4 * (b0 + p) + f;
                    let valid = c.valid_rows(panel);
                    if valid > 0 {
                        let mask: __mmask16 = if valid == PANEL_ROWS { 0xFFFF } else { (1u16 << valid) - 1 };
                        // SAFETY: the unmasked lanes are rows this call writes.
                        unsafe { _mm512_mask_storeu_ps(c.out(t0 + t, panel), mask, a) };
                    }
                }
            }
        }
    }

    /// The AVX2 tiles (a 64-row block is two registers of 32 rows: bytes `32h..32h + 32`
    /// hold the rows `16f + 8h..16f + 8h + 8` of the four panels `f`).
    struct Avx2;

    impl Tiles for Avx2 {
        #[inline(always)]
        unsafe fn tile<const T: usize, const P: usize>(c: &Call, b0: usize, t0: usize) {
            // SAFETY: forwarded.
            unsafe { tile_avx2::<T, P>(c, b0, t0) }
        }
    }

    /// Safety: see [`Tiles::tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const T: usize, const P: usize>(c: &Call, b0: usize, t0: usize) {
        let nibble = _mm256_set1_epi8(0x0F);
        let word = _mm256_set1_epi32(0xFFFF);
        let mut acc = [[[[_mm256_setzero_ps(); 2]; 4]; P]; T];
        for g in 0..c.groups {
            let (start, end) = c.group_pairs(g);
            let mut isum = [[[[_mm256_setzero_si256(); 2]; 4]; P]; T];
            let mut k = start;
            while k < end {
                let flush_end = (k + FLUSH_PAIRS).min(end);
                let mut all = [[[_mm256_setzero_si256(); 2]; P]; T];
                let mut odd = [[[_mm256_setzero_si256(); 2]; P]; T];
                while k < flush_end {
                    let mut lo = [[_mm256_setzero_si256(); 2]; P];
                    let mut hi = [[_mm256_setzero_si256(); 2]; P];
                    for p in 0..P {
                        for h in 0..2 {
                            // SAFETY: block `b0 + p` is in the range and `k < pairs`.
                            let v = unsafe { _mm256_loadu_si256(c.block(b0 + p, k).add(32 * h) as *const __m256i) };
                            lo[p][h] = _mm256_and_si256(v, nibble);
                            hi[p][h] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                        }
                    }
                    for t in 0..T {
                        // SAFETY: token `t0 + t` exists and columns `2k, 2k + 1 < pc`.
                        let (ta, tb) = unsafe {
                            (
                                _mm256_broadcastsi128_si256(_mm_loadu_si128(c.table(t0 + t, 2 * k) as *const __m128i)),
                                _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                    c.table(t0 + t, 2 * k + 1) as *const __m128i
                                )),
                            )
                        };
                        for p in 0..P {
                            for h in 0..2 {
                                let s = _mm256_add_epi8(
                                    _mm256_shuffle_epi8(ta, lo[p][h]),
                                    _mm256_shuffle_epi8(tb, hi[p][h]),
                                );
                                all[t][p][h] = _mm256_add_epi16(all[t][p][h], s);
                                odd[t][p][h] = _mm256_add_epi16(odd[t][p][h], _mm256_srli_epi16::<8>(s));
                            }
                        }
                    }
                    k += 1;
                }
                for t in 0..T {
                    for p in 0..P {
                        for h in 0..2 {
                            let (a, o) = (all[t][p][h], odd[t][p][h]);
                            let even = _mm256_sub_epi16(a, _mm256_slli_epi16::<8>(o));
                            let s = &mut isum[t][p];
                            s[0][h] = _mm256_add_epi32(s[0][h], _mm256_and_si256(even, word));
                            s[1][h] = _mm256_add_epi32(s[1][h], _mm256_and_si256(o, word));
                            s[2][h] = _mm256_add_epi32(s[2][h], _mm256_srli_epi32::<16>(even));
                            s[3][h] = _mm256_add_epi32(s[3][h], _mm256_srli_epi32::<16>(o));
                        }
                    }
                }
            }
            let bias = _mm256_set1_epi32(2 * BIAS * (end - start) as i32);
            // SAFETY: tokens `t0 + t` exist and `g` is a group.
            let xs: [__m256; T] = core::array::from_fn(|t| _mm256_set1_ps(unsafe { c.x_scale(t0 + t, g) }));
            for p in 0..P {
                for f in 0..4 {
                    for h in 0..2 {
                        // SAFETY: panel `4(b0 + p) + f` of the repacked matrix and group `g`
                        // exist: 16 scales, of which these are 8h..8h + 8.
                        let s = unsafe { _mm256_loadu_ps(c.scales(4 * (b0 + p) + f, g).add(8 * h)) };
                        for t in 0..T {
                            let isum = _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[t][p][f][h], bias));
                            let st = _mm256_mul_ps(s, xs[t]);
                            acc[t][p][f][h] = _mm256_add_ps(acc[t][p][f][h], _mm256_mul_ps(st, isum));
                        }
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                for (f, halves) in acc.iter().enumerate() {
                    let panel = 4 * (b0 + p) + f;
                    let valid = c.valid_rows(panel);
                    for (h, &v) in halves.iter().enumerate() {
                        if valid <= 8 * h {
                            continue;
                        }
                        // SAFETY: `valid > 0`, so the panel's rows are written by this call.
                        let dst = unsafe { c.out(t0 + t, panel).add(8 * h) };
                        if valid >= 8 * (h + 1) {
                            // SAFETY: rows `8h..8h + 8` of the panel are written by this call.
                            unsafe { _mm256_storeu_ps(dst, v) };
                        } else {
                            let mut lanes = [0f32; 8];
                            // SAFETY: `lanes` is 32 writable bytes.
                            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                            // SAFETY: rows `8h..valid` of the panel are written by this call.
                            unsafe { core::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, valid - 8 * h) };
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 BW kernel over `blocks`. The caller has run [`super::check`] and holds a
    /// [`super::LutKernel`] for [`crate::dot::Isa::Avx512Vnni`], so the CPU has AVX-512 BW.
    pub(super) fn gemm_avx512(m: &LutMatrix, blocks: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], stride: usize) {
        let c = Call::new(m, x, out, stride);
        // SAFETY: see the module docs and above.
        unsafe { drive_avx512(&c, blocks) }
    }

    /// Safety: see [`Tiles::tile`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn drive_avx512(c: &Call, blocks: Range<usize>) {
        // SAFETY: forwarded.
        unsafe { drive::<Avx512, 4, 2>(c, blocks) }
    }

    /// The AVX2 kernel over `blocks`. The caller has run [`super::check`] and holds a
    /// [`super::LutKernel`] for [`crate::dot::Isa::Avx2`], so the CPU has AVX2.
    pub(super) fn gemm_avx2(m: &LutMatrix, blocks: Range<usize>, x: &TokenBatch<'_>, out: &mut [f32], stride: usize) {
        let c = Call::new(m, x, out, stride);
        // SAFETY: see the module docs and above.
        unsafe { drive_avx2(&c, blocks) }
    }

    /// Safety: see [`Tiles::tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn drive_avx2(c: &Call, blocks: Range<usize>) {
        // SAFETY: forwarded.
        unsafe { drive::<Avx2, 2, 1>(c, blocks) }
    }
}
