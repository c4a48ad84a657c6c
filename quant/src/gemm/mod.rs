//! Prefill matrix products on block weights: 16-row panels unpacked once per product, then
//! multiplied by a whole batch of 8-bit activation rows.
//!
//! The block dot products of [`crate::dot`] unpack every weight block again for each
//! token (four tokens at a time), which leaves a prefill at a few percent of the machine's
//! int8 multiply rate. Here a team member unpacks 16 rows of any block format into a
//! [`Panel`] — unsigned byte codes interleaved so that one 64-byte load holds four
//! consecutive codes of each of the 16 rows, plus the rows' block scales as f32 and their
//! integer sub-scales as i32 — and the kernel then runs `vpdpbusd` over 16 rows at once,
//! one activation broadcast per token and four codes. The unpacking is paid once per 16
//! rows and batch, not once per token; it needs no extra memory beyond one panel per team
//! member (`12 × 64` bytes per 32 columns) and keeps the file's weights zero-copy.
//!
//! # Arithmetic
//!
//! The result is **bit-identical** to [`crate::dot`]'s reference for every format: the
//! integer block sums are exact (codes are stored unsigned, and the offsets that the
//! reference folds in — Q8_0's sign, Q6_K's 32 — are taken out exactly with the activation
//! block sums), each block's float contribution is computed with the reference's own
//! expression (no FMA), and contributions accumulate in the reference's four lanes
//! `b % 4` before `(lane0 + lane1) + (lane2 + lane3)`.
//!
//! # Panel layout
//!
//! For activation block `b` (columns `32 b .. 32 b + 32`) a panel holds
//! [`LINES_PER_BLOCK`] = 12 lines of 64 bytes, in this order:
//! - lines 0..8, the codes: line `g` holds, for rows `i = 0..16`, the codes of columns
//!   `32 b + 4 g .. 32 b + 4 g + 4` at bytes `4 i .. 4 i + 4`;
//! - line 8: `d` per row (f32 little-endian; the block's or super-block's scale);
//! - line 9: the second float per row: Q4_1 / Q5_1 minimum `m`, K-quant `dmin`, else 0;
//! - line 10: an integer per row (i32): Q4_K / Q5_K sub-block scale, Q6_K scale of the low
//!   16 columns, else 0;
//! - line 11: an integer per row: Q4_K / Q5_K sub-block minimum, Q6_K scale of the high
//!   16 columns, else 0.
//!
//! Codes are those of the reference's integer step: nibbles for Q4_0 / Q4_1, 5-bit codes
//! for Q5_x and Q5_K, nibbles for Q4_K, the raw 6-bit codes (offset 32 kept) for Q6_K, and
//! `q + 128` for Q8_0. Rows beyond the panel's valid rows are zero.

#[cfg(all(target_arch = "x86_64", feature = "std"))]
mod amx;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::activation::Q8Row;
use crate::blocks::{k_scale_min, read_f16, WeightFormat, BLOCK_LEN};
use crate::dot::scalar;
use crate::dot::Isa;

/// Rows in one panel.
pub const PANEL_ROWS: usize = 16;

/// 64-byte lines per activation block of 32 columns (see the module docs).
pub const LINES_PER_BLOCK: usize = 12;

/// One 64-byte, 64-byte-aligned line of a [`Panel`].
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct PanelLine(pub [u8; 64]);

impl PanelLine {
    /// A line of zeros.
    pub const ZERO: PanelLine = PanelLine([0; 64]);
}

/// Lines a panel over `cols` columns (a multiple of 32) needs.
pub const fn panel_lines(cols: usize) -> usize {
    cols / BLOCK_LEN * LINES_PER_BLOCK
}

/// A packed panel of up to 16 weight rows (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct Panel<'a> {
    format: WeightFormat,
    lines: &'a [PanelLine],
    blocks: usize,
    rows: usize,
}

impl<'a> Panel<'a> {
    /// A view of lines that [`pack_panel`] or [`PanelGemm::pack`] filled earlier for `rows`
    /// rows of `format` over `cols` columns (so that a panel can be unpacked once and
    /// multiplied many times).
    ///
    /// # Panics
    /// If `rows` is not in `1..=16`, `cols` is not a whole number of `format`'s blocks, or
    /// `lines` is not [`panel_lines`]`(cols)` long.
    pub fn from_packed(format: WeightFormat, lines: &'a [PanelLine], rows: usize, cols: usize) -> Self {
        assert!(
            (1..=PANEL_ROWS).contains(&rows) && format.row_bytes(cols).is_some() && lines.len() == panel_lines(cols),
            "packed panel disagrees with its shape"
        );
        Panel { format, lines, blocks: cols / BLOCK_LEN, rows }
    }

    /// The weight rows it holds (1..=16).
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// A batch of quantized activation rows stored back to back: token `t`'s values are
/// `qs[t * cols .. (t + 1) * cols]`, its block scales and sums
/// `scales[t * cols / 32 ..]` and `sums[t * cols / 32 ..]` (see [`Q8Row`]).
#[derive(Clone, Copy, Debug)]
pub struct Q8Batch<'a> {
    /// Quantized values, `tokens × cols`.
    pub qs: &'a [i8],
    /// Block scales, `tokens × cols / 32`.
    pub scales: &'a [f32],
    /// Exact block sums, `tokens × cols / 32`.
    pub sums: &'a [i32],
    /// Rows in the batch.
    pub tokens: usize,
}

impl<'a> Q8Batch<'a> {
    /// Columns per row.
    fn cols(&self) -> usize {
        self.qs.len().checked_div(self.tokens).unwrap_or(0)
    }

    /// Token `t`'s row.
    pub fn row(&self, t: usize) -> Q8Row<'a> {
        let (cols, blocks) = (self.cols(), self.cols() / BLOCK_LEN);
        Q8Row {
            qs: &self.qs[t * cols..(t + 1) * cols],
            scales: &self.scales[t * blocks..(t + 1) * blocks],
            sums: &self.sums[t * blocks..(t + 1) * blocks],
        }
    }
}

/// Unpacks `rows` consecutive weight rows of `format` (`data` holds exactly those rows,
/// `cols` weights each) into `out` and returns the panel.
///
/// # Panics
/// If `rows` is not in `1..=16`, `cols` is not a whole number of `format`'s blocks,
/// `data` is not `rows` rows long, or `out` is shorter than [`panel_lines`]`(cols)`.
pub fn pack_panel<'a>(
    format: WeightFormat,
    data: &[u8],
    rows: usize,
    cols: usize,
    out: &'a mut [PanelLine],
) -> Panel<'a> {
    pack_checked(format, data, rows, cols, out, pack_portable)
}

/// Checks the lengths [`pack_panel`] documents, then lets `unpack(format, data, rows,
/// row_bytes, lines)` fill the panel's lines.
fn pack_checked<'a>(
    format: WeightFormat,
    data: &[u8],
    rows: usize,
    cols: usize,
    out: &'a mut [PanelLine],
    unpack: fn(WeightFormat, &[u8], usize, usize, &mut [PanelLine]),
) -> Panel<'a> {
    let row_bytes = format.row_bytes(cols).expect("columns must be whole blocks");
    assert!((1..=PANEL_ROWS).contains(&rows) && data.len() == rows * row_bytes, "panel rows disagree in length");
    let lines = &mut out[..panel_lines(cols)];
    unpack(format, data, rows, row_bytes, lines);
    Panel { format, lines, blocks: cols / BLOCK_LEN, rows }
}

/// The portable unpacking loop behind [`pack_panel`] (lengths checked by the caller).
fn pack_portable(format: WeightFormat, data: &[u8], rows: usize, row_bytes: usize, lines: &mut [PanelLine]) {
    let bytes = format.block_bytes();
    // One monomorphized loop per format: `unpack(weight block, activation block index
    // within it, codes out)` returns the block's parameters.
    match format {
        WeightFormat::Q4_0 => pack_with(data, rows, row_bytes, lines, 1, bytes, |block, _, c| {
            nibbles(&block[2..18], c);
            BlockParams::scale(read_f16(block, 0))
        }),
        WeightFormat::Q4_1 => pack_with(data, rows, row_bytes, lines, 1, bytes, |block, _, c| {
            nibbles(&block[4..20], c);
            BlockParams { second: read_f16(block, 2), ..BlockParams::scale(read_f16(block, 0)) }
        }),
        WeightFormat::Q5_0 => pack_with(data, rows, row_bytes, lines, 1, bytes, |block, _, c| {
            five_bit(&block[2..22], c);
            BlockParams::scale(read_f16(block, 0))
        }),
        WeightFormat::Q5_1 => pack_with(data, rows, row_bytes, lines, 1, bytes, |block, _, c| {
            five_bit(&block[4..24], c);
            BlockParams { second: read_f16(block, 2), ..BlockParams::scale(read_f16(block, 0)) }
        }),
        WeightFormat::Q8_0 => pack_with(data, rows, row_bytes, lines, 1, bytes, |block, _, c| {
            for (c, &q) in c.iter_mut().zip(&block[2..34]) {
                *c = q ^ 0x80;
            }
            BlockParams::scale(read_f16(block, 0))
        }),
        WeightFormat::Q4_K | WeightFormat::Q5_K => pack_with(data, rows, row_bytes, lines, 8, bytes, |block, s, c| {
            let qs_at = if format == WeightFormat::Q5_K { 48 } else { 16 };
            let qs = &block[qs_at + 32 * (s / 2)..qs_at + 32 * (s / 2) + 32];
            let shift = 4 * (s % 2);
            for (c, &q) in c.iter_mut().zip(qs) {
                *c = (q >> shift) & 0xF;
            }
            if format == WeightFormat::Q5_K {
                for (c, &h) in c.iter_mut().zip(&block[16..48]) {
                    *c |= ((h >> s) & 1) << 4;
                }
            }
            let (sc, m) = k_scale_min(&block[4..16], s);
            BlockParams { d: read_f16(block, 0), second: read_f16(block, 2), int_a: sc as i32, int_b: m as i32 }
        }),
        WeightFormat::Q6_K => pack_with(data, rows, row_bytes, lines, 8, bytes, |block, s, c| {
            let (n, k) = (s / 4, s % 4);
            let ql = &block[64 * n + 32 * (k & 1)..64 * n + 32 * (k & 1) + 32];
            let qh = &block[128 + 32 * n..128 + 32 * n + 32];
            let (low_shift, high_shift) = (4 * (k / 2), 2 * k);
            for ((c, &l), &h) in c.iter_mut().zip(ql).zip(qh) {
                *c = ((l >> low_shift) & 0xF) | (((h >> high_shift) & 3) << 4);
            }
            let sc = &block[192 + 2 * s..194 + 2 * s];
            BlockParams {
                d: read_f16(block, 208),
                second: 0.0,
                int_a: (sc[0] as i8) as i32,
                int_b: (sc[1] as i8) as i32,
            }
        }),
    }
}

/// Codes of a Q4_0 / Q4_1 block from its 16 bytes of nibbles (low nibbles first).
#[inline(always)]
fn nibbles(qs: &[u8], codes: &mut [u8; 32]) {
    for j in 0..16 {
        codes[j] = qs[j] & 0xF;
        codes[j + 16] = qs[j] >> 4;
    }
}

/// Codes of a Q5_0 / Q5_1 block from its `qh` (4 bytes) and nibbles (16 bytes).
#[inline(always)]
fn five_bit(qh_qs: &[u8], codes: &mut [u8; 32]) {
    let qh = u32::from_le_bytes([qh_qs[0], qh_qs[1], qh_qs[2], qh_qs[3]]);
    nibbles(&qh_qs[4..20], codes);
    for (j, c) in codes.iter_mut().enumerate() {
        *c |= (((qh >> j) & 1) as u8) << 4;
    }
}

/// The packing loop: every row in turn (each read front to back, one stream for the
/// hardware prefetcher), every activation block's codes from `unpack` (given the row's
/// weight block and the activation block's index within it) written into the 4-byte
/// interleave of the layout, with the block's parameters. Rows past `rows` are zeroed.
#[inline(always)]
fn pack_with(
    data: &[u8],
    rows: usize,
    row_bytes: usize,
    lines: &mut [PanelLine],
    per_block: usize,
    block_bytes: usize,
    unpack: impl Fn(&[u8], usize, &mut [u8; 32]) -> BlockParams,
) {
    for i in 0..PANEL_ROWS {
        let row = if i < rows { Some(&data[i * row_bytes..(i + 1) * row_bytes]) } else { None };
        for (b, record) in lines.chunks_exact_mut(LINES_PER_BLOCK).enumerate() {
            let mut codes = [0u8; 32];
            let params = match row {
                Some(row) => {
                    let at = b / per_block * block_bytes;
                    unpack(&row[at..at + block_bytes], b % per_block, &mut codes)
                }
                None => BlockParams::scale(0.0),
            };
            let (code_lines, param_lines) = record.split_at_mut(8);
            for (line, quad) in code_lines.iter_mut().zip(codes.chunks_exact(4)) {
                line.0[4 * i..4 * i + 4].copy_from_slice(quad);
            }
            param_lines[0].0[4 * i..4 * i + 4].copy_from_slice(&params.d.to_le_bytes());
            param_lines[1].0[4 * i..4 * i + 4].copy_from_slice(&params.second.to_le_bytes());
            param_lines[2].0[4 * i..4 * i + 4].copy_from_slice(&params.int_a.to_le_bytes());
            param_lines[3].0[4 * i..4 * i + 4].copy_from_slice(&params.int_b.to_le_bytes());
        }
    }
}

/// The per-row parameters of one activation block (lines 8..12 of the layout).
#[derive(Clone, Copy)]
struct BlockParams {
    d: f32,
    second: f32,
    int_a: i32,
    int_b: i32,
}

impl BlockParams {
    /// A block with only a scale.
    const fn scale(d: f32) -> Self {
        BlockParams { d, second: 0.0, int_a: 0, int_b: 0 }
    }
}

/// How a format's block contribution is formed from the panel's exact sums (step 2 of the
/// reference arithmetic in [`crate::dot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// `(d_w d_x) (Σ c x - offset Σ x)`: Q4_0 (8), Q5_0 (16), Q8_0 (128).
    Offset(i32),
    /// `(d_w d_x) Σ c x + (m_w d_x) Σ x`: Q4_1, Q5_1.
    Minimum,
    /// `(d_w d_x) (sc Σ c x) - (dmin_w d_x) (m Σ x)`: Q4_K, Q5_K.
    KQuant,
    /// `(d_w d_x) (sc_lo Σ_lo (c - 32) x + sc_hi Σ_hi (c - 32) x)`: Q6_K.
    SixBit,
}

impl Family {
    fn of(format: WeightFormat) -> Family {
        match format {
            WeightFormat::Q4_0 => Family::Offset(8),
            WeightFormat::Q5_0 => Family::Offset(16),
            WeightFormat::Q8_0 => Family::Offset(128),
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => Family::Minimum,
            WeightFormat::Q4_K | WeightFormat::Q5_K => Family::KQuant,
            WeightFormat::Q6_K => Family::SixBit,
        }
    }
}

/// Reads the little-endian f32 of row `i` from a parameter line.
#[inline(always)]
fn param_f32(line: &PanelLine, i: usize) -> f32 {
    f32::from_le_bytes([line.0[4 * i], line.0[4 * i + 1], line.0[4 * i + 2], line.0[4 * i + 3]])
}

/// Reads the little-endian i32 of row `i` from a parameter line.
#[inline(always)]
fn param_i32(line: &PanelLine, i: usize) -> i32 {
    i32::from_le_bytes([line.0[4 * i], line.0[4 * i + 1], line.0[4 * i + 2], line.0[4 * i + 3]])
}

/// The portable panel kernel: `out[t * stride + i] = W[i] · x[t]` for every token `t` of
/// `x` and row `i < panel.rows()`, from the panel alone (the reference for the layout).
fn gemm_scalar(panel: &Panel<'_>, x: &Q8Batch<'_>, out: &mut [f32], stride: usize) {
    let family = Family::of(panel.format);
    for t in 0..x.tokens {
        let xt = x.row(t);
        for i in 0..panel.rows {
            let mut lanes = [0f32; 4];
            for (b, record) in panel.lines.chunks_exact(LINES_PER_BLOCK).enumerate() {
                let xs = &xt.qs[b * BLOCK_LEN..(b + 1) * BLOCK_LEN];
                let mut halves = [0i32; 2];
                for (g, line) in record[..8].iter().enumerate() {
                    for j in 0..4 {
                        halves[g / 4] += line.0[4 * i + j] as i32 * xs[4 * g + j] as i32;
                    }
                }
                let (d_w, d_x, sum_x) = (param_f32(&record[8], i), xt.scales[b], xt.sums[b]);
                let isum = halves[0] + halves[1];
                lanes[b % 4] += match family {
                    Family::Offset(offset) => scalar::q8_0_contribution(d_w, d_x, isum - offset * sum_x),
                    Family::Minimum => scalar::q4_1_contribution(d_w, param_f32(&record[9], i), d_x, isum, sum_x),
                    Family::KQuant => scalar::k_contribution(
                        d_w,
                        param_f32(&record[9], i),
                        d_x,
                        param_i32(&record[10], i),
                        param_i32(&record[11], i),
                        isum,
                        sum_x,
                    ),
                    Family::SixBit => {
                        let low_sum: i32 = xs[..16].iter().map(|&v| v as i32).sum();
                        let low = halves[0] - 32 * low_sum;
                        let high = halves[1] - 32 * (sum_x - low_sum);
                        let scaled = param_i32(&record[10], i) * low + param_i32(&record[11], i) * high;
                        scalar::q6_k_contribution(d_w, d_x, scaled)
                    }
                };
            }
            out[t * stride + i] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        }
    }
}

/// A panel matrix-product kernel for one instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PanelGemm {
    isa: Isa,
    /// AMX-INT8 tile multiplies instead of `vpdpbusd` (with AVX-512 VNNI for the rest).
    amx: bool,
}

impl PanelGemm {
    /// The portable kernel (the reference for the panel layout; slower than the block
    /// dot products, so the runtime uses it only to test).
    pub const fn scalar() -> Self {
        PanelGemm { isa: Isa::Scalar, amx: false }
    }

    /// The kernel for `isa`, or `None` where there is none or this CPU lacks it. Only
    /// AVX-512 VNNI (512-bit `vpdpbusd`) has one; other instruction sets keep the block
    /// dot products.
    pub fn for_isa(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Scalar => Some(Self::scalar()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_supported() => Some(PanelGemm { isa, amx: false }),
            _ => None,
        }
    }

    /// The AMX-INT8 kernel, where this CPU has AMX-TILE, AMX-INT8 and AVX-512 VNNI and the
    /// OS grants the tile state (on Linux, asked for once with `arch_prctl`); needs the
    /// `std` feature. Its integer sums are exact, so it is bit-identical to the others.
    pub fn amx() -> Option<Self> {
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if Isa::Avx512Vnni.is_supported() && amx::available() {
            return Some(PanelGemm { isa: Isa::Avx512Vnni, amx: true });
        }
        None
    }

    /// The instruction set of this kernel (AVX-512 VNNI for the AMX kernel too, whose float
    /// step uses it).
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// A short name: `amx-int8`, or the instruction set's name.
    pub fn name(&self) -> &'static str {
        if self.amx {
            "amx-int8"
        } else {
            self.isa.name()
        }
    }

    /// [`pack_panel`] with this instruction set's code extraction (the same panel, byte
    /// for byte).
    ///
    /// # Panics
    /// As [`pack_panel`].
    pub fn pack<'a>(
        &self,
        format: WeightFormat,
        data: &[u8],
        rows: usize,
        cols: usize,
        out: &'a mut [PanelLine],
    ) -> Panel<'a> {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => pack_checked(format, data, rows, cols, out, x86::pack),
            _ => pack_panel(format, data, rows, cols, out),
        }
    }

    /// `out[t * stride + i] = W[i] · x[t]` for every token `t` of `x` and every row
    /// `i < panel.rows()`, bit-identical to [`crate::dot`]'s reference.
    ///
    /// # Panics
    /// If `x`'s rows are not as long as the panel, or `out` is too short for
    /// `(x.tokens - 1) * stride + panel.rows()` values.
    pub fn run(&self, panel: &Panel<'_>, x: &Q8Batch<'_>, out: &mut [f32], stride: usize) {
        if x.tokens == 0 {
            return;
        }
        let blocks = panel.blocks;
        assert!(
            x.qs.len() == x.tokens * blocks * BLOCK_LEN
                && x.scales.len() == x.tokens * blocks
                && x.sums.len() == x.tokens * blocks
                && panel.lines.len() == blocks * LINES_PER_BLOCK,
            "panel and activations disagree in length"
        );
        assert!(out.len() >= (x.tokens - 1) * stride + panel.rows, "panel output too short");
        match self.isa {
            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            Isa::Avx512Vnni if self.amx => amx::gemm(panel, Family::of(panel.format), x, out, stride),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => x86::gemm(panel, Family::of(panel.format), x, out, stride),
            _ => gemm_scalar(panel, x, out, stride),
        }
    }
}

#[cfg(test)]
mod tests;
