//! x86-64 W4 kernels: AVX2 (+ FMA, F16C) and AVX-512 VNNI (+ F, BW, VL), bit-identical to
//! [`super::scalar`].
//!
//! # Integer kernels (`W4IntFn`)
//! A panel block is used as it is stored: every byte holds, for one row, the offset-binary
//! nibbles `u = q + 8` of two columns. The low nibbles (`b & 0x0F`) are the unsigned
//! operand of `vpdpbusd` (VNNI) or `vpmaddubsw` (AVX2) against four consecutive activation
//! codes broadcast as one i32, which gives `Σ u · x` per row. AVX2 shifts the high nibbles
//! down; VNNI does too for short groups, but for groups of 96 inputs or more (per channel,
//! G128) keeps them in place (`b & 0xF0 = 16 u`) in a second accumulator and divides that by
//! 16 (exactly: it is a multiple of 16) when a group ends, which saves an instruction per
//! block and panel. Starting the accumulator of a group at `-8 · Σ x` (the sums of
//! [`TokenBatch`]) turns `Σ u · x` into the exact `isum = Σ q · x` of the reference. The
//! float combine is then the reference's, lane per row: per group, the 16 weight scales times
//! the token's broadcast scale of that group, that times `(f32) isum`, then the add to `acc`
//! (three rounded operations, no FMA); `acc` is the result.
//!
//! Integer sums are exact whatever the order, so only the float steps above have to follow
//! the reference, and they do: each lane is one row, and rows never mix.
//!
//! # Float kernels (`W4FloatFn`)
//! Per column `c` of a block, the 16 rows' codes become f32 (VNNI: `vpermps` from a table
//! of `-8.0 ..= 7.0` indexed by the nibble; AVX2: sign-extension by shifts after `b ^ 0x88`)
//! and `f = f + q · x[c]` (multiply, then add), column after column.
//!
//! # Blocking
//! A tile is `T` tokens × `P` panels: each weight block is loaded and unpacked once for
//! the `T` tokens and each activation broadcast once for the `P` panels. Prefill (several
//! tokens) uses 6 × 2 tiles on VNNI (24 `vpdpbusd` against 4 masks per oct; AVX2: 4 × 1),
//! walking all tokens for one panel pair while its weights sit in L1. Decode (one token)
//! streams 1 × 4 tiles (AVX2: 1 × 2) with software prefetch 8 blocks ahead.
//!
//! # Safety
//! The kernels read the operands through raw pointers without bounds checks. That is sound
//! because they are only reachable through [`super::W4Kernels`], which (1) is only built
//! with them by `for_isa` after the CPU features were detected, and (2) calls `check_int` /
//! `check_float` before the function pointer: those prove that the panel range lies in the
//! matrix, that the activations have `tokens × padded_cols` codes (or floats) and
//! `tokens × groups` scales and sums, and that `out` holds every `t · out_stride + r` for
//! the rows written; [`W4Matrix::new`] proved the packed codes and scales match the shape.

use core::arch::x86_64::*;
use core::ops::Range;

use crate::w4::activation::TokenBatch;
use crate::w4::{W4Matrix, OCT, PANEL_BLOCK_BYTES, PANEL_ROWS};

/// Octs after which the VNNI kernels fold the high-nibble accumulator (`16 Σ u · x`, at most
/// `4 · 240 · 128` per oct and lane) into the low one, so that it can never overflow i32
/// and the exact division by 16 stays exact, whatever the row length.
const FOLD_OCTS: usize = 16384;

/// How far ahead of the current block the decode kernels prefetch, in bytes.
const PREFETCH_BYTES: usize = 8 * PANEL_BLOCK_BYTES;

/// The weight operand as raw parts (see the module's safety section).
#[derive(Clone, Copy)]
struct Weights {
    packed: *const u8,
    scales: *const u8,
    /// `padded_cols / 8`: blocks per panel.
    octs: usize,
    groups: usize,
    /// Octs per group (the last group of a row may have fewer).
    group_octs: usize,
    rows: usize,
}

impl Weights {
    fn new(w: &W4Matrix<'_>) -> Self {
        let shape = w.shape();
        Weights {
            packed: w.packed().as_ptr(),
            scales: w.scale_bytes().as_ptr(),
            octs: shape.padded_cols() / OCT,
            groups: shape.groups(),
            group_octs: shape.group_len() / OCT,
            rows: shape.rows,
        }
    }

    /// Octs `start..end` of group `g`.
    #[inline(always)]
    fn group_octs(&self, g: usize) -> (usize, usize) {
        let start = g * self.group_octs;
        (start, (start + self.group_octs).min(self.octs))
    }

    /// The block of panel `p`, oct `o`. Safety: `p` is a panel and `o < octs`.
    #[inline(always)]
    unsafe fn block(&self, p: usize, o: usize) -> *const u8 {
        // SAFETY: the caller keeps the block inside the packed codes.
        unsafe { self.packed.add((p * self.octs + o) * PANEL_BLOCK_BYTES) }
    }

    /// The 16 f16 scales of panel `p`, group `g`. Safety: `p` is a panel and `g < groups`.
    #[inline(always)]
    unsafe fn scales(&self, p: usize, g: usize) -> *const u8 {
        // SAFETY: the caller keeps the 32 bytes inside the scales.
        unsafe { self.scales.add((p * self.groups + g) * PANEL_ROWS * 2) }
    }

    /// Rows of panel `p` that exist (1..=16).
    #[inline(always)]
    fn valid_rows(&self, p: usize) -> usize {
        (self.rows - p * PANEL_ROWS).min(PANEL_ROWS)
    }
}

/// Quantized activations as raw parts.
#[derive(Clone, Copy)]
struct IntActs {
    codes: *const i8,
    sums: *const i32,
    scales: *const f32,
    /// Padded columns: the length of a token's row of codes.
    pc: usize,
    tokens: usize,
}

impl IntActs {
    fn new(x: &TokenBatch<'_>, w: &W4Matrix<'_>) -> Self {
        IntActs {
            codes: x.codes.as_ptr(),
            sums: x.sums.as_ptr(),
            scales: x.scales.as_ptr(),
            pc: w.shape().padded_cols(),
            tokens: x.tokens,
        }
    }

    /// Codes `8o..8o + 4` (`HALF = 0`) or `8o + 4..8o + 8` (`HALF = 1`) of token `t` as
    /// one little-endian i32. Safety: `t < tokens`, `o < pc / 8`.
    #[inline(always)]
    unsafe fn quad<const HALF: usize>(&self, t: usize, o: usize) -> i32 {
        // SAFETY: the caller keeps the four bytes inside token `t`'s row.
        unsafe { (self.codes.add(t * self.pc + o * OCT + 4 * HALF) as *const i32).read_unaligned() }
    }

    /// `-8 · Σ x` over group `g` of token `t` (wrapping like the i32 accumulators it seeds).
    /// Safety: `t < tokens`, `g < groups`.
    #[inline(always)]
    unsafe fn correction(&self, t: usize, g: usize, groups: usize) -> i32 {
        // SAFETY: the caller keeps the index inside `tokens × groups` sums.
        unsafe { self.sums.add(t * groups + g).read() }.wrapping_mul(-8)
    }

    /// The scale of token `t`, group `g`. Safety: `t < tokens`, `g < groups`.
    #[inline(always)]
    unsafe fn scale(&self, t: usize, g: usize, groups: usize) -> f32 {
        // SAFETY: the caller keeps the index inside `tokens × groups` scales.
        unsafe { self.scales.add(t * groups + g).read() }
    }
}

/// f32 activations as raw parts.
#[derive(Clone, Copy)]
struct FloatActs {
    x: *const f32,
    pc: usize,
    tokens: usize,
}

impl FloatActs {
    /// Activation `c` of token `t`. Safety: `t < tokens`, `c < pc`.
    #[inline(always)]
    unsafe fn at(&self, t: usize, c: usize) -> f32 {
        // SAFETY: the caller keeps the index inside `tokens × pc`.
        unsafe { self.x.add(t * self.pc + c).read() }
    }
}

/// The output as raw parts.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: usize,
}

impl Out {
    /// Where row `16p` of token `t` goes. Safety: the row is written by this call (see the
    /// module's safety section), so the offset lies inside `out`.
    #[inline(always)]
    unsafe fn panel(&self, t: usize, p: usize) -> *mut f32 {
        // SAFETY: as the caller promises.
        unsafe { self.ptr.add(t * self.stride + p * PANEL_ROWS) }
    }
}

/// The tile shapes of one instruction set. `tile` computes tokens `t0..t0 + T` × panels
/// `p0..p0 + P`; `STREAM` adds software prefetch for the decode path.
trait Tiles {
    /// Safety: the operands passed the checks of the module's safety section, the tile lies
    /// inside the batch and the panel range, and the CPU has the instruction set.
    unsafe fn int<const T: usize, const P: usize, const STREAM: bool>(
        w: &Weights,
        x: &IntActs,
        out: &Out,
        p0: usize,
        t0: usize,
    );

    /// As `int`, for the float kernel.
    unsafe fn float<const T: usize, const P: usize>(w: &Weights, x: &FloatActs, out: &Out, p0: usize, t0: usize);
}

/// Evaluates `$call` with `$t` a constant equal to the run-time token count `$n` (1..=6).
macro_rules! by_tokens {
    ($n:expr, |$t:ident| $call:expr) => {
        by_tokens!(@arms $n, $t, $call, 6, 5, 4, 3, 2, 1)
    };
    (@arms $n:expr, $t:ident, $call:expr, $($k:literal),*) => {
        match $n {
            $($k => {
                const $t: usize = $k;
                $call
            })*
            _ => unreachable!(),
        }
    };
}

/// The integer product over `panels`: 1 × `GP` streaming tiles (then 2, then 1) for one
/// token, else `TT` × `PP` tiles (`TT ≤ 6`; then fewer tokens, one panel), all tokens of a
/// panel group before the next. Safety: see [`Tiles::int`].
#[inline(always)]
unsafe fn drive_int<K: Tiles, const TT: usize, const PP: usize, const GP: usize>(
    w: &Weights,
    x: &IntActs,
    out: &Out,
    panels: Range<usize>,
) {
    let (mut p, end) = (panels.start, panels.end);
    if x.tokens == 0 {
        return;
    }
    // SAFETY (every tile call below): tiles cover tokens `0..tokens` and panels inside
    // `panels`; the rest is the caller's promise.
    if x.tokens == 1 {
        while p + GP <= end {
            unsafe { K::int::<1, GP, true>(w, x, out, p, 0) };
            p += GP;
        }
        while p + 2 <= end {
            unsafe { K::int::<1, 2, true>(w, x, out, p, 0) };
            p += 2;
        }
        if p < end {
            unsafe { K::int::<1, 1, true>(w, x, out, p, 0) };
        }
        return;
    }
    while p < end {
        let step = if p + PP <= end { PP } else { 1 };
        let mut t = 0;
        while t < x.tokens {
            let n = (x.tokens - t).min(TT);
            if step == PP {
                by_tokens!(n, |N| unsafe { K::int::<N, PP, false>(w, x, out, p, t) });
            } else {
                by_tokens!(n, |N| unsafe { K::int::<N, 1, false>(w, x, out, p, t) });
            }
            t += n;
        }
        p += step;
    }
}

/// The float product over `panels` in `TT` × `PP` tiles (`TT ≤ 6`; then fewer tokens, one
/// panel). Safety: see [`Tiles::float`].
#[inline(always)]
unsafe fn drive_float<K: Tiles, const TT: usize, const PP: usize>(
    w: &Weights,
    x: &FloatActs,
    out: &Out,
    panels: Range<usize>,
) {
    let (mut p, end) = (panels.start, panels.end);
    while p < end {
        let step = if p + PP <= end { PP } else { 1 };
        let mut t = 0;
        while t < x.tokens {
            let n = (x.tokens - t).min(TT);
            // SAFETY: the tile lies inside the tokens and `panels`; the rest is the
            // caller's promise.
            if step == PP {
                by_tokens!(n, |N| unsafe { K::float::<N, PP>(w, x, out, p, t) });
            } else {
                by_tokens!(n, |N| unsafe { K::float::<N, 1>(w, x, out, p, t) });
            }
            t += n;
        }
        p += step;
    }
}

// ---------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------

/// The AVX-512 VNNI tiles.
struct Vnni;

/// `-8.0, -7.0, …, 7.0`: the f32 value of a code by its nibble.
#[inline]
#[target_feature(enable = "avx512f")]
fn code_table_512() -> __m512 {
    _mm512_setr_ps(-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
}

/// Stores the 16 lanes of `v` for the valid rows of panel `p` at `dst`.
/// Safety: `dst` is where row `16p` of one token goes (see [`Out::panel`]).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_panel_512(w: &Weights, p: usize, dst: *mut f32, v: __m512) {
    let valid = w.valid_rows(p);
    let mask: __mmask16 = if valid == PANEL_ROWS { 0xFFFF } else { (1u16 << valid) - 1 };
    // SAFETY: the lanes below `valid` are rows this call writes; masked lanes are not
    // accessed.
    unsafe { _mm512_mask_storeu_ps(dst, mask, v) };
}

/// Groups of at least this many octs keep the high nibbles in place (`SPLIT`): that costs
/// a shift and an add per accumulator and group, against a shift per block and panel.
const SPLIT_OCTS: usize = 12;

/// The integer tile (see the module docs); `SPLIT` keeps the high nibbles in place in their
/// own accumulators, else they are shifted down into the same ones. Safety: see
/// [`Tiles::int`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn int_tile_vnni<const T: usize, const P: usize, const STREAM: bool, const SPLIT: bool>(
    w: &Weights,
    x: &IntActs,
    out: &Out,
    p0: usize,
    t0: usize,
) {
    let lo_mask = _mm512_set1_epi8(0x0F);
    let hi_mask = _mm512_set1_epi8(0xF0u8 as i8);
    let mut acc = [[_mm512_setzero_ps(); P]; T];
    for g in 0..w.groups {
        let (start, end) = w.group_octs(g);
        let mut lo = [[_mm512_setzero_si512(); P]; T];
        for (t, lo) in lo.iter_mut().enumerate() {
            // SAFETY: `t0 + t` is a token of the batch and `g` a group.
            let c = unsafe { x.correction(t0 + t, g, w.groups) };
            *lo = [_mm512_set1_epi32(c); P];
        }
        let mut o = start;
        while o < end {
            let fold_end = (o + FOLD_OCTS).min(end);
            let mut hi = [[_mm512_setzero_si512(); P]; T];
            while o < fold_end {
                let mut wl = [_mm512_setzero_si512(); P];
                let mut wh = [_mm512_setzero_si512(); P];
                for p in 0..P {
                    // SAFETY: `p0 + p` is a panel of the call and `o < octs`: the 64 bytes are
                    // in the packed codes. The prefetch address may pass the end of the
                    // codes, which is harmless: it is never dereferenced and a prefetch
                    // cannot fault.
                    let b = unsafe {
                        let block = w.block(p0 + p, o);
                        if STREAM {
                            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_BYTES) as *const i8);
                        }
                        _mm512_loadu_si512(block as *const _)
                    };
                    wl[p] = _mm512_and_si512(b, lo_mask);
                    wh[p] = if SPLIT {
                        _mm512_and_si512(b, hi_mask)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(b), lo_mask)
                    };
                }
                for t in 0..T {
                    // SAFETY: token `t0 + t` exists and `o` is an oct of its row.
                    let (ql, qh) = unsafe { (x.quad::<0>(t0 + t, o), x.quad::<1>(t0 + t, o)) };
                    let (xl, xh) = (_mm512_set1_epi32(ql), _mm512_set1_epi32(qh));
                    for p in 0..P {
                        lo[t][p] = _mm512_dpbusd_epi32(lo[t][p], wl[p], xl);
                        if SPLIT {
                            hi[t][p] = _mm512_dpbusd_epi32(hi[t][p], wh[p], xh);
                        } else {
                            lo[t][p] = _mm512_dpbusd_epi32(lo[t][p], wh[p], xh);
                        }
                    }
                }
                o += 1;
            }
            if SPLIT {
                for t in 0..T {
                    for p in 0..P {
                        lo[t][p] = _mm512_add_epi32(lo[t][p], _mm512_srai_epi32::<4>(hi[t][p]));
                    }
                }
            }
        }
        // SAFETY: panels `p0 + p` and group `g` exist: 32 bytes of scales each.
        let s: [__m512; P] = core::array::from_fn(|p| {
            _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(w.scales(p0 + p, g) as *const __m256i) })
        });
        for t in 0..T {
            // One token scale at a time: a 6 × 2 tile has no registers to spare.
            // SAFETY: token `t0 + t` exists and `g` is a group.
            let xs = _mm512_set1_ps(unsafe { x.scale(t0 + t, g, w.groups) });
            for p in 0..P {
                let st = _mm512_mul_ps(s[p], xs);
                acc[t][p] = _mm512_add_ps(acc[t][p], _mm512_mul_ps(st, _mm512_cvtepi32_ps(lo[t][p])));
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (p, &a) in acc.iter().enumerate() {
            // SAFETY: rows of panel `p0 + p` for token `t0 + t` are written by this call.
            unsafe { store_panel_512(w, p0 + p, out.panel(t0 + t, p0 + p), a) };
        }
    }
}

/// The float tile (see the module docs). Safety: see [`Tiles::float`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn float_tile_vnni<const T: usize, const P: usize>(w: &Weights, x: &FloatActs, out: &Out, p0: usize, t0: usize) {
    let table = code_table_512();
    let mut acc = [[_mm512_setzero_ps(); P]; T];
    for g in 0..w.groups {
        let (start, end) = w.group_octs(g);
        let mut f = [[_mm512_setzero_ps(); P]; T];
        for o in start..end {
            let mut blocks = [_mm512_setzero_si512(); P];
            for (p, b) in blocks.iter_mut().enumerate() {
                // SAFETY: `p0 + p` is a panel of the call and `o < octs`.
                *b = unsafe { _mm512_loadu_si512(w.block(p0 + p, o) as *const _) };
            }
            for c in 0..OCT {
                // Column `c`: the low nibble of byte `c` (c < 4) or the high nibble of byte
                // `c - 4` of each row's i32 lane; `vpermps` reads the low 4 bits of the index.
                let shift = _mm512_set1_epi32(if c < 4 { 8 * c } else { 8 * (c - 4) + 4 } as i32);
                let mut q = [_mm512_setzero_ps(); P];
                for p in 0..P {
                    q[p] = _mm512_permutexvar_ps(_mm512_srlv_epi32(blocks[p], shift), table);
                }
                for (t, f) in f.iter_mut().enumerate() {
                    // SAFETY: token `t0 + t` exists and `8o + c < pc`.
                    let xv = _mm512_set1_ps(unsafe { x.at(t0 + t, o * OCT + c) });
                    for (f, &q) in f.iter_mut().zip(&q) {
                        *f = _mm512_add_ps(*f, _mm512_mul_ps(q, xv));
                    }
                }
            }
        }
        for p in 0..P {
            // SAFETY: panel `p0 + p` and group `g` exist: 32 bytes of scales.
            let s = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(w.scales(p0 + p, g) as *const __m256i) });
            for t in 0..T {
                acc[t][p] = _mm512_add_ps(acc[t][p], _mm512_mul_ps(s, f[t][p]));
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (p, &a) in acc.iter().enumerate() {
            // SAFETY: rows of panel `p0 + p` for token `t0 + t` are written by this call.
            unsafe { store_panel_512(w, p0 + p, out.panel(t0 + t, p0 + p), a) };
        }
    }
}

impl Tiles for Vnni {
    #[inline(always)]
    unsafe fn int<const T: usize, const P: usize, const STREAM: bool>(
        w: &Weights,
        x: &IntActs,
        out: &Out,
        p0: usize,
        t0: usize,
    ) {
        // SAFETY: forwarded from the caller, who checked the CPU.
        unsafe {
            if w.group_octs >= SPLIT_OCTS {
                int_tile_vnni::<T, P, STREAM, true>(w, x, out, p0, t0)
            } else {
                int_tile_vnni::<T, P, STREAM, false>(w, x, out, p0, t0)
            }
        }
    }

    #[inline(always)]
    unsafe fn float<const T: usize, const P: usize>(w: &Weights, x: &FloatActs, out: &Out, p0: usize, t0: usize) {
        // SAFETY: forwarded from the caller, who checked the CPU.
        unsafe { float_tile_vnni::<T, P>(w, x, out, p0, t0) }
    }
}

/// AVX-512 VNNI integer kernel (`W4IntFn`).
pub(super) fn gemm_int_vnni(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &TokenBatch<'_>,
    out: &mut [f32],
    stride: usize,
) {
    let (wr, xr, o) = (Weights::new(w), IntActs::new(x, w), Out { ptr: out.as_mut_ptr(), stride });
    // SAFETY: only reachable through `W4Kernels::for_isa(Isa::Avx512Vnni)`, which checked the
    // CPU, and `W4Kernels::gemm_int`, which ran `check_int` (see the module docs).
    unsafe { drive_vnni_int(&wr, &xr, &o, panels) }
}

/// Safety: as [`Tiles::int`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn drive_vnni_int(w: &Weights, x: &IntActs, out: &Out, panels: Range<usize>) {
    // SAFETY: forwarded.
    unsafe { drive_int::<Vnni, 6, 2, 4>(w, x, out, panels) }
}

/// AVX-512 VNNI float kernel (`W4FloatFn`).
pub(super) fn gemm_float_vnni(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    let xr = FloatActs { x: x.as_ptr(), pc: w.shape().padded_cols(), tokens };
    let (wr, o) = (Weights::new(w), Out { ptr: out.as_mut_ptr(), stride });
    // SAFETY: only reachable through `W4Kernels::for_isa(Isa::Avx512Vnni)`, which checked the
    // CPU, and `W4Kernels::gemm_float`, which ran `check_float` (see the module docs).
    unsafe { drive_vnni_float(&wr, &xr, &o, panels) }
}

/// Safety: as [`Tiles::float`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn drive_vnni_float(w: &Weights, x: &FloatActs, out: &Out, panels: Range<usize>) {
    // SAFETY: forwarded.
    unsafe { drive_float::<Vnni, 4, 2>(w, x, out, panels) }
}

// ---------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------

/// The AVX2 tiles: a panel is two halves of 8 rows (bytes 0..32 and 32..64 of a block).
struct Avx2;

/// Stores the 8 lanes of `v`, rows `8h..8h + 8` of panel `p`, at `dst` (row `16p`).
/// Safety: `dst` is where row `16p` of one token goes (see [`Out::panel`]).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_half_256(w: &Weights, p: usize, h: usize, dst: *mut f32, v: __m256) {
    let valid = w.valid_rows(p);
    if valid >= 8 * (h + 1) {
        // SAFETY: rows `8h..8h + 8` are written by this call.
        unsafe { _mm256_storeu_ps(dst.add(8 * h), v) };
    } else if valid > 8 * h {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 32 writable bytes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        // SAFETY: rows `8h..valid` are written by this call.
        unsafe { core::ptr::copy_nonoverlapping(lanes.as_ptr(), dst.add(8 * h), valid - 8 * h) };
    }
}

/// The integer tile. Safety: see [`Tiles::int`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int_tile_avx2<const T: usize, const P: usize, const STREAM: bool>(
    w: &Weights,
    x: &IntActs,
    out: &Out,
    p0: usize,
    t0: usize,
) {
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; T];
    for g in 0..w.groups {
        let (start, end) = w.group_octs(g);
        let mut isum = [[[_mm256_setzero_si256(); 2]; P]; T];
        for (t, isum) in isum.iter_mut().enumerate() {
            // SAFETY: `t0 + t` is a token of the batch and `g` a group.
            let c = unsafe { x.correction(t0 + t, g, w.groups) };
            *isum = [[_mm256_set1_epi32(c); 2]; P];
        }
        for o in start..end {
            let mut wl = [[_mm256_setzero_si256(); 2]; P];
            let mut wh = [[_mm256_setzero_si256(); 2]; P];
            for p in 0..P {
                for h in 0..2 {
                    // SAFETY: `p0 + p` is a panel of the call and `o < octs`; the prefetch
                    // address is never dereferenced (see the VNNI tile).
                    let b = unsafe {
                        let block = w.block(p0 + p, o);
                        if STREAM && h == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_BYTES) as *const i8);
                        }
                        _mm256_loadu_si256(block.add(32 * h) as *const __m256i)
                    };
                    wl[p][h] = _mm256_and_si256(b, mask);
                    wh[p][h] = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
                }
            }
            for (t, isum) in isum.iter_mut().enumerate() {
                // SAFETY: token `t0 + t` exists and `o` is an oct of its row.
                let (ql, qh) = unsafe { (x.quad::<0>(t0 + t, o), x.quad::<1>(t0 + t, o)) };
                let (xl, xh) = (_mm256_set1_epi32(ql), _mm256_set1_epi32(qh));
                for p in 0..P {
                    for h in 0..2 {
                        // Each `vpmaddubsw` lane is at most 2 · 15 · 128 in magnitude, the
                        // sum of two at most 7680: no saturation.
                        let pairs =
                            _mm256_add_epi16(_mm256_maddubs_epi16(wl[p][h], xl), _mm256_maddubs_epi16(wh[p][h], xh));
                        isum[p][h] = _mm256_add_epi32(isum[p][h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
        }
        // SAFETY: panels `p0 + p` and group `g` exist: 32 bytes of scales each.
        let s: [[__m256; 2]; P] = core::array::from_fn(|p| {
            core::array::from_fn(|h| {
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.scales(p0 + p, g).add(16 * h) as *const __m128i) })
            })
        });
        for t in 0..T {
            // SAFETY: token `t0 + t` exists and `g` is a group.
            let xs = _mm256_set1_ps(unsafe { x.scale(t0 + t, g, w.groups) });
            for p in 0..P {
                for h in 0..2 {
                    let st = _mm256_mul_ps(s[p][h], xs);
                    acc[t][p][h] = _mm256_add_ps(acc[t][p][h], _mm256_mul_ps(st, _mm256_cvtepi32_ps(isum[t][p][h])));
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (p, halves) in acc.iter().enumerate() {
            for (h, &a) in halves.iter().enumerate() {
                // SAFETY: rows of panel `p0 + p` for token `t0 + t` are written by this call.
                unsafe { store_half_256(w, p0 + p, h, out.panel(t0 + t, p0 + p), a) };
            }
        }
    }
}

/// The float tile. Safety: see [`Tiles::float`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_tile_avx2<const T: usize, const P: usize>(w: &Weights, x: &FloatActs, out: &Out, p0: usize, t0: usize) {
    let flip = _mm256_set1_epi8(0x88u8 as i8);
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; T];
    for g in 0..w.groups {
        let (start, end) = w.group_octs(g);
        let mut f = [[[_mm256_setzero_ps(); 2]; P]; T];
        for o in start..end {
            // `u ^ 8` is the code `q` as a 4-bit two's complement number.
            let mut blocks = [[_mm256_setzero_si256(); 2]; P];
            for (p, halves) in blocks.iter_mut().enumerate() {
                for (h, half) in halves.iter_mut().enumerate() {
                    // SAFETY: `p0 + p` is a panel of the call and `o < octs`.
                    let b = unsafe { _mm256_loadu_si256(w.block(p0 + p, o).add(32 * h) as *const __m256i) };
                    *half = _mm256_xor_si256(b, flip);
                }
            }
            for c in 0..OCT {
                // Column `c` sits at bits `8c..8c + 4` (c < 4) or `8(c - 4) + 4..` of each
                // row's lane: shift it to the top, then arithmetically back down.
                let top = if c < 4 { 28 - 8 * c } else { 24 - 8 * (c - 4) } as i32;
                let (up, down) = (_mm256_set1_epi32(top), _mm256_set1_epi32(28));
                let mut q = [[_mm256_setzero_ps(); 2]; P];
                for p in 0..P {
                    for h in 0..2 {
                        let code = _mm256_srav_epi32(_mm256_sllv_epi32(blocks[p][h], up), down);
                        q[p][h] = _mm256_cvtepi32_ps(code);
                    }
                }
                for (t, f) in f.iter_mut().enumerate() {
                    // SAFETY: token `t0 + t` exists and `8o + c < pc`.
                    let xv = _mm256_set1_ps(unsafe { x.at(t0 + t, o * OCT + c) });
                    for p in 0..P {
                        for h in 0..2 {
                            f[p][h] = _mm256_add_ps(f[p][h], _mm256_mul_ps(q[p][h], xv));
                        }
                    }
                }
            }
        }
        for p in 0..P {
            for h in 0..2 {
                // SAFETY: panel `p0 + p` and group `g` exist: 32 bytes of scales.
                let s = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.scales(p0 + p, g).add(16 * h) as *const __m128i) });
                for t in 0..T {
                    acc[t][p][h] = _mm256_add_ps(acc[t][p][h], _mm256_mul_ps(s, f[t][p][h]));
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (p, halves) in acc.iter().enumerate() {
            for (h, &a) in halves.iter().enumerate() {
                // SAFETY: rows of panel `p0 + p` for token `t0 + t` are written by this call.
                unsafe { store_half_256(w, p0 + p, h, out.panel(t0 + t, p0 + p), a) };
            }
        }
    }
}

impl Tiles for Avx2 {
    #[inline(always)]
    unsafe fn int<const T: usize, const P: usize, const STREAM: bool>(
        w: &Weights,
        x: &IntActs,
        out: &Out,
        p0: usize,
        t0: usize,
    ) {
        // SAFETY: forwarded from the caller, who checked the CPU.
        unsafe { int_tile_avx2::<T, P, STREAM>(w, x, out, p0, t0) }
    }

    #[inline(always)]
    unsafe fn float<const T: usize, const P: usize>(w: &Weights, x: &FloatActs, out: &Out, p0: usize, t0: usize) {
        // SAFETY: forwarded from the caller, who checked the CPU.
        unsafe { float_tile_avx2::<T, P>(w, x, out, p0, t0) }
    }
}

/// AVX2 integer kernel (`W4IntFn`).
pub(super) fn gemm_int_avx2(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &TokenBatch<'_>,
    out: &mut [f32],
    stride: usize,
) {
    let (wr, xr, o) = (Weights::new(w), IntActs::new(x, w), Out { ptr: out.as_mut_ptr(), stride });
    // SAFETY: only reachable through `W4Kernels::for_isa(Isa::Avx2)`, which checked the CPU,
    // and `W4Kernels::gemm_int`, which ran `check_int` (see the module docs).
    unsafe { drive_avx2_int(&wr, &xr, &o, panels) }
}

/// Safety: as [`Tiles::int`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn drive_avx2_int(w: &Weights, x: &IntActs, out: &Out, panels: Range<usize>) {
    // SAFETY: forwarded.
    unsafe { drive_int::<Avx2, 4, 1, 2>(w, x, out, panels) }
}

/// AVX2 float kernel (`W4FloatFn`).
pub(super) fn gemm_float_avx2(
    w: &W4Matrix<'_>,
    panels: Range<usize>,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    let xr = FloatActs { x: x.as_ptr(), pc: w.shape().padded_cols(), tokens };
    let (wr, o) = (Weights::new(w), Out { ptr: out.as_mut_ptr(), stride });
    // SAFETY: only reachable through `W4Kernels::for_isa(Isa::Avx2)`, which checked the CPU,
    // and `W4Kernels::gemm_float`, which ran `check_float` (see the module docs).
    unsafe { drive_avx2_float(&wr, &xr, &o, panels) }
}

/// Safety: as [`Tiles::float`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn drive_avx2_float(w: &Weights, x: &FloatActs, out: &Out, panels: Range<usize>) {
    // SAFETY: forwarded.
    unsafe { drive_float::<Avx2, 2, 1>(w, x, out, panels) }
}
