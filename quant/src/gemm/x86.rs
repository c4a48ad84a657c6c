//! The AVX-512 VNNI panel kernel: 16 rows in the lanes of a 512-bit register, up to four
//! tokens per pass. Per activation block, eight `vpdpbusd` per token (the unsigned codes of
//! four columns × 16 rows against one broadcast of four signed activations) give the 16
//! rows' exact integer sums; the block's float contribution is then formed for 16 rows at
//! once with the reference's expression (separate multiply and add, `vpmulld` for the
//! integer sub-scales) and added to lane `b % 4`.

use core::arch::x86_64::*;

use super::{Family, Panel, PanelLine, Q8Batch, LINES_PER_BLOCK};
use crate::blocks::{k_scale_min, read_f16, WeightFormat, BLOCK_LEN};

/// Family tags for the monomorphized kernels.
pub(super) const OFFSET: u8 = 0;
pub(super) const MINIMUM: u8 = 1;
pub(super) const K_QUANT: u8 = 2;
pub(super) const SIX_BIT: u8 = 3;

/// See [`super::PanelGemm::run`]; the caller has checked every length and that this CPU has
/// AVX-512 F, BW and VNNI.
pub(super) fn gemm(panel: &Panel<'_>, family: Family, x: &Q8Batch<'_>, out: &mut [f32], stride: usize) {
    let (tag, offset) = family_tag(family);
    let mut t = 0;
    while t < x.tokens {
        let group = (x.tokens - t).min(4);
        // SAFETY: `PanelGemm::for_isa` hands out this kernel only where the CPU has AVX-512
        // F, BW and VNNI; `run` checked that the panel holds `blocks` records, that every
        // activation row holds `blocks` blocks, and that `out` reaches
        // `(tokens - 1) * stride + rows`, which bounds every load and (masked) store below.
        unsafe {
            match (group, tag) {
                (4, OFFSET) => pass::<4, OFFSET>(panel, offset, x, t, out, stride),
                (4, MINIMUM) => pass::<4, MINIMUM>(panel, offset, x, t, out, stride),
                (4, K_QUANT) => pass::<4, K_QUANT>(panel, offset, x, t, out, stride),
                (4, _) => pass::<4, SIX_BIT>(panel, offset, x, t, out, stride),
                (3, OFFSET) => pass::<3, OFFSET>(panel, offset, x, t, out, stride),
                (3, MINIMUM) => pass::<3, MINIMUM>(panel, offset, x, t, out, stride),
                (3, K_QUANT) => pass::<3, K_QUANT>(panel, offset, x, t, out, stride),
                (3, _) => pass::<3, SIX_BIT>(panel, offset, x, t, out, stride),
                (2, OFFSET) => pass::<2, OFFSET>(panel, offset, x, t, out, stride),
                (2, MINIMUM) => pass::<2, MINIMUM>(panel, offset, x, t, out, stride),
                (2, K_QUANT) => pass::<2, K_QUANT>(panel, offset, x, t, out, stride),
                (2, _) => pass::<2, SIX_BIT>(panel, offset, x, t, out, stride),
                (_, OFFSET) => pass::<1, OFFSET>(panel, offset, x, t, out, stride),
                (_, MINIMUM) => pass::<1, MINIMUM>(panel, offset, x, t, out, stride),
                (_, K_QUANT) => pass::<1, K_QUANT>(panel, offset, x, t, out, stride),
                (_, _) => pass::<1, SIX_BIT>(panel, offset, x, t, out, stride),
            }
        }
        t += group;
    }
}

/// The family's tag for the monomorphized kernels, and its offset (0 but for `Offset`).
pub(super) fn family_tag(family: Family) -> (u8, i32) {
    match family {
        Family::Offset(offset) => (OFFSET, offset),
        Family::Minimum => (MINIMUM, 0),
        Family::KQuant => (K_QUANT, 0),
        Family::SixBit => (SIX_BIT, 0),
    }
}

/// `Σ x` over the first 16 of the 32 signed activations at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn low_half_sum(p: *const i8) -> i32 {
    // SAFETY: the caller's block holds 32 readable bytes at `p`.
    let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
    // Bias to unsigned, sum with `psadbw` against zero, remove the bias (16 × 128).
    let sums = _mm_sad_epu8(_mm_xor_si128(v, _mm_set1_epi8(-128)), _mm_setzero_si128());
    (_mm_cvtsi128_si32(sums) + _mm_extract_epi16::<4>(sums)) - 2048
}

/// The float contribution of panel record `record` (one activation block) for one token,
/// 16 rows at once, with the reference's expression: `acc` holds the rows' exact sums of
/// code × activation over the block (for Q6_K only its low 16 columns, `acc_high` the high
/// 16), `block_x` the token's 32 activations, `d_x` and `sum_x` their scale and exact sum.
/// Shared by the VNNI and AMX kernels, so that both are the same arithmetic.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn contribution<const FAM: u8>(
    record: *const PanelLine,
    offset: i32,
    acc: __m512i,
    acc_high: __m512i,
    block_x: *const i8,
    d_x: f32,
    sum_x: i32,
) -> __m512 {
    // SAFETY: the caller's `record` is 12 aligned panel lines and `block_x` 32 bytes.
    unsafe {
        let d_w = _mm512_load_ps(record.add(8) as *const f32);
        let d_x_v = _mm512_set1_ps(d_x);
        let dwdx = _mm512_mul_ps(d_w, d_x_v);
        match FAM {
            OFFSET => {
                let isum = _mm512_sub_epi32(acc, _mm512_set1_epi32(offset * sum_x));
                _mm512_mul_ps(dwdx, _mm512_cvtepi32_ps(isum))
            }
            MINIMUM => {
                let m_w = _mm512_load_ps(record.add(9) as *const f32);
                _mm512_add_ps(
                    _mm512_mul_ps(dwdx, _mm512_cvtepi32_ps(acc)),
                    _mm512_mul_ps(_mm512_mul_ps(m_w, d_x_v), _mm512_set1_ps(sum_x as f32)),
                )
            }
            K_QUANT => {
                let dmin = _mm512_load_ps(record.add(9) as *const f32);
                let sc = _mm512_load_si512(record.add(10) as *const __m512i);
                let m = _mm512_load_si512(record.add(11) as *const __m512i);
                let scaled = _mm512_cvtepi32_ps(_mm512_mullo_epi32(sc, acc));
                let mins = _mm512_cvtepi32_ps(_mm512_mullo_epi32(m, _mm512_set1_epi32(sum_x)));
                _mm512_sub_ps(_mm512_mul_ps(dwdx, scaled), _mm512_mul_ps(_mm512_mul_ps(dmin, d_x_v), mins))
            }
            _ => {
                let sc_low = _mm512_load_si512(record.add(10) as *const __m512i);
                let sc_high = _mm512_load_si512(record.add(11) as *const __m512i);
                let low_sum = low_half_sum(block_x);
                let low = _mm512_sub_epi32(acc, _mm512_set1_epi32(32 * low_sum));
                let high = _mm512_sub_epi32(acc_high, _mm512_set1_epi32(32 * (sum_x - low_sum)));
                let scaled = _mm512_add_epi32(_mm512_mullo_epi32(sc_low, low), _mm512_mullo_epi32(sc_high, high));
                _mm512_mul_ps(dwdx, _mm512_cvtepi32_ps(scaled))
            }
        }
    }
}

/// Tokens `t0 .. t0 + C` against the whole panel.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pass<const C: usize, const FAM: u8>(
    panel: &Panel<'_>,
    offset: i32,
    x: &Q8Batch<'_>,
    t0: usize,
    out: &mut [f32],
    stride: usize,
) {
    let blocks = panel.blocks;
    let cols = blocks * BLOCK_LEN;
    let (mut qs, mut scales, mut sums) = ([core::ptr::null::<i8>(); C], [&[][..]; C], [&[][..]; C]);
    for c in 0..C {
        let t = t0 + c;
        qs[c] = x.qs[t * cols..(t + 1) * cols].as_ptr();
        scales[c] = &x.scales[t * blocks..(t + 1) * blocks];
        sums[c] = &x.sums[t * blocks..(t + 1) * blocks];
    }
    let lines: *const PanelLine = panel.lines.as_ptr();
    let mut lanes = [[_mm512_setzero_ps(); C]; 4];
    let mut b0 = 0;
    while b0 < blocks {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let b = b0 + j;
            if b >= blocks {
                break;
            }
            // SAFETY: record `b` of the panel is 12 aligned lines (`b < blocks`), and each
            // token's block `b` is 32 bytes at `qs[c] + 32 b` (lengths checked by `run`).
            unsafe {
                let record = lines.add(b * LINES_PER_BLOCK);
                let mut acc = [_mm512_setzero_si512(); C];
                let mut acc_high = [_mm512_setzero_si512(); C];
                for g in 0..8 {
                    let w = _mm512_load_si512(record.add(g) as *const __m512i);
                    for c in 0..C {
                        let four = (qs[c].add(b * BLOCK_LEN + 4 * g) as *const i32).read_unaligned();
                        let xv = _mm512_set1_epi32(four);
                        if FAM == SIX_BIT && g >= 4 {
                            acc_high[c] = _mm512_dpbusd_epi32(acc_high[c], w, xv);
                        } else {
                            acc[c] = _mm512_dpbusd_epi32(acc[c], w, xv);
                        }
                    }
                }
                for c in 0..C {
                    let block_x = qs[c].add(b * BLOCK_LEN);
                    let part =
                        contribution::<FAM>(record, offset, acc[c], acc_high[c], block_x, scales[c][b], sums[c][b]);
                    lane[c] = _mm512_add_ps(lane[c], part);
                }
            }
        }
        b0 += 4;
    }
    let mask: __mmask16 = if panel.rows >= 16 { 0xFFFF } else { (1u16 << panel.rows) - 1 };
    #[allow(clippy::needless_range_loop)] // `c` indexes four lane arrays and the output rows
    for c in 0..C {
        let result = _mm512_add_ps(_mm512_add_ps(lanes[0][c], lanes[1][c]), _mm512_add_ps(lanes[2][c], lanes[3][c]));
        let at = (t0 + c) * stride;
        // SAFETY: `run` checked `out.len() >= (tokens - 1) * stride + rows`, so the `rows`
        // unmasked lanes from `at` lie inside `out`; masked-off lanes are not accessed.
        unsafe { _mm512_mask_storeu_ps(out[at..].as_mut_ptr(), mask, result) };
    }
}

/// Format tags for the monomorphized packing loop (`WeightFormat as u8`).
const Q4_0: u8 = WeightFormat::Q4_0 as u8;
const Q4_1: u8 = WeightFormat::Q4_1 as u8;
const Q8_0: u8 = WeightFormat::Q8_0 as u8;
const Q5_0: u8 = WeightFormat::Q5_0 as u8;
const Q5_1: u8 = WeightFormat::Q5_1 as u8;
const Q4_K: u8 = WeightFormat::Q4_K as u8;
const Q5_K: u8 = WeightFormat::Q5_K as u8;
const Q6_K: u8 = WeightFormat::Q6_K as u8;

/// [`super::pack_panel`] with AVX2 code extraction: the same panel, byte for byte. The
/// caller has checked the lengths and that this CPU has AVX2.
pub(super) fn pack(format: WeightFormat, data: &[u8], rows: usize, row_bytes: usize, lines: &mut [PanelLine]) {
    // SAFETY: `PanelGemm::pack` calls this only with AVX-512 VNNI present (which implies
    // AVX2), after checking `data.len() == rows * row_bytes` with `row_bytes` a whole
    // number of blocks of `format` covering `lines.len() / 12` activation blocks.
    unsafe {
        match format {
            WeightFormat::Q4_0 => pack_rows::<Q4_0>(data, rows, row_bytes, lines),
            WeightFormat::Q4_1 => pack_rows::<Q4_1>(data, rows, row_bytes, lines),
            WeightFormat::Q8_0 => pack_rows::<Q8_0>(data, rows, row_bytes, lines),
            WeightFormat::Q5_0 => pack_rows::<Q5_0>(data, rows, row_bytes, lines),
            WeightFormat::Q5_1 => pack_rows::<Q5_1>(data, rows, row_bytes, lines),
            WeightFormat::Q4_K => pack_rows::<Q4_K>(data, rows, row_bytes, lines),
            WeightFormat::Q5_K => pack_rows::<Q5_K>(data, rows, row_bytes, lines),
            WeightFormat::Q6_K => pack_rows::<Q6_K>(data, rows, row_bytes, lines),
        }
    }
}

/// The format with tag `F`.
const fn format_of(tag: u8) -> WeightFormat {
    match tag {
        Q4_0 => WeightFormat::Q4_0,
        Q4_1 => WeightFormat::Q4_1,
        Q8_0 => WeightFormat::Q8_0,
        Q5_0 => WeightFormat::Q5_0,
        Q5_1 => WeightFormat::Q5_1,
        Q4_K => WeightFormat::Q4_K,
        Q5_K => WeightFormat::Q5_K,
        _ => WeightFormat::Q6_K,
    }
}

/// How far ahead in each row the packing loop prefetches.
const PACK_PREFETCH_BYTES: usize = 512;

/// Four rows at a time (four streams for the hardware prefetcher), every activation
/// block's 32 codes of each extracted into one register, the four registers transposed in
/// 4-byte groups (`unpack{lo,hi}_epi32/64`) so that each code line takes one 16-byte store
/// per four rows, then the parameters.
#[target_feature(enable = "avx2")]
unsafe fn pack_rows<const F: u8>(data: &[u8], rows: usize, row_bytes: usize, lines: &mut [PanelLine]) {
    let format = format_of(F);
    let (per_block, block_bytes) = (format.activation_blocks(), format.block_bytes());
    let blocks = lines.len() / LINES_PER_BLOCK;
    let base = lines.as_mut_ptr() as *mut u8;
    for i0 in (0..super::PANEL_ROWS).step_by(4) {
        for b in 0..blocks {
            let mut codes = [_mm256_setzero_si256(); 4];
            let mut params = [super::BlockParams::scale(0.0); 4];
            for (r, (codes, params)) in codes.iter_mut().zip(&mut params).enumerate() {
                if i0 + r < rows {
                    let row = &data[(i0 + r) * row_bytes..(i0 + r + 1) * row_bytes];
                    let at = b / per_block * block_bytes;
                    // The weights come from memory once per batch; four short streams are
                    // too slow for the hardware prefetcher alone.
                    if let Some(ahead) = row.get(at + PACK_PREFETCH_BYTES) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const u8 as *const i8);
                    }
                    let block = &row[at..at + block_bytes];
                    // SAFETY: `block` is one whole weight block of `format`.
                    (*codes, *params) = unsafe { unpack::<F>(block, b % per_block) };
                }
            }
            // Lane halves: `g` in the low 128 bits, `g + 4` in the high ones.
            let (t0, t1) = (_mm256_unpacklo_epi32(codes[0], codes[1]), _mm256_unpackhi_epi32(codes[0], codes[1]));
            let (t2, t3) = (_mm256_unpacklo_epi32(codes[2], codes[3]), _mm256_unpackhi_epi32(codes[2], codes[3]));
            let groups = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ];
            // SAFETY: record `b` is 12 lines of 64 bytes inside `lines` (`b < blocks`); rows
            // `i0 .. i0 + 4` own bytes `4 i0 .. 4 i0 + 16` of each line.
            unsafe {
                let record = base.add(b * LINES_PER_BLOCK * 64 + 4 * i0);
                for (g, &pair) in groups.iter().enumerate() {
                    _mm_storeu_si128(record.add(64 * g) as *mut __m128i, _mm256_castsi256_si128(pair));
                    _mm_storeu_si128(record.add(64 * (g + 4)) as *mut __m128i, _mm256_extracti128_si256::<1>(pair));
                }
                for (r, p) in params.iter().enumerate() {
                    (record.add(64 * 8 + 4 * r) as *mut f32).write_unaligned(p.d);
                    (record.add(64 * 9 + 4 * r) as *mut f32).write_unaligned(p.second);
                    (record.add(64 * 10 + 4 * r) as *mut i32).write_unaligned(p.int_a);
                    (record.add(64 * 11 + 4 * r) as *mut i32).write_unaligned(p.int_b);
                }
            }
        }
    }
}

/// `0x10` in byte `j` where bit `j` of `qh` is set (Q5_0 / Q5_1 high bits).
#[inline]
#[target_feature(enable = "avx2")]
fn high_bits(qh: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The 32 nibble codes of 16 packed bytes at `p` (low nibbles first).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller's block holds 16 bytes at `p`.
    let qs = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let low = _mm_set1_epi8(0xF);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(qs), low), _mm_and_si128(qs, low))
}

/// The codes and parameters of activation block `s` of weight block `block`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack<const F: u8>(block: &[u8], s: usize) -> (__m256i, super::BlockParams) {
    use super::BlockParams;
    let p = block.as_ptr();
    let nibble = _mm256_set1_epi8(0xF);
    // SAFETY (every load): `block` is one whole block of the format, and each load lies
    // inside its documented layout (Q4_K 144, Q5_K 176, Q6_K 210 bytes).
    unsafe {
        match F {
            Q4_0 => (nibbles(p.add(2)), BlockParams::scale(read_f16(block, 0))),
            Q4_1 => (
                nibbles(p.add(4)),
                BlockParams { second: read_f16(block, 2), ..BlockParams::scale(read_f16(block, 0)) },
            ),
            Q5_0 | Q5_1 => {
                let qh_at = if F == Q5_1 { 4 } else { 2 };
                let qh = u32::from_le_bytes([block[qh_at], block[qh_at + 1], block[qh_at + 2], block[qh_at + 3]]);
                let codes = _mm256_or_si256(nibbles(p.add(qh_at + 4)), high_bits(qh));
                let second = if F == Q5_1 { read_f16(block, 2) } else { 0.0 };
                (codes, BlockParams { second, ..BlockParams::scale(read_f16(block, 0)) })
            }
            Q8_0 => {
                let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                (_mm256_xor_si256(q, _mm256_set1_epi8(-128)), BlockParams::scale(read_f16(block, 0)))
            }
            Q4_K | Q5_K => {
                let qs_at = if F == Q5_K { 48 } else { 16 };
                let q = _mm256_loadu_si256(p.add(qs_at + 32 * (s / 2)) as *const __m256i);
                let mut codes = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * (s % 2) as i32)), nibble);
                if F == Q5_K {
                    let h = _mm256_loadu_si256(p.add(16) as *const __m256i);
                    let bit = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(s as i32)), _mm256_set1_epi8(1));
                    codes = _mm256_or_si256(codes, _mm256_slli_epi16::<4>(bit));
                }
                let (sc, m) = k_scale_min(&block[4..16], s);
                let params = BlockParams {
                    d: read_f16(block, 0),
                    second: read_f16(block, 2),
                    int_a: sc as i32,
                    int_b: m as i32,
                };
                (codes, params)
            }
            _ => {
                let (n, k) = (s / 4, s % 4);
                let l = _mm256_loadu_si256(p.add(64 * n + 32 * (k & 1)) as *const __m256i);
                let h = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let low = _mm256_and_si256(_mm256_srl_epi16(l, _mm_cvtsi32_si128(4 * (k / 2) as i32)), nibble);
                let high = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * k as i32)), _mm256_set1_epi8(3));
                let codes = _mm256_or_si256(low, _mm256_slli_epi16::<4>(high));
                let sc = &block[192 + 2 * s..194 + 2 * s];
                let params = BlockParams {
                    d: read_f16(block, 208),
                    second: 0.0,
                    int_a: (sc[0] as i8) as i32,
                    int_b: (sc[1] as i8) as i32,
                };
                (codes, params)
            }
        }
    }
}
