//! The native backend: Petrel's own kernels ([`petrel_quant`]), the reference every other
//! backend is measured against.

use core::ops::Range;

use petrel_quant::dot::Isa;
use petrel_quant::gemm::PanelGemm;
use petrel_quant::w4::kernels::W4Kernels;
use petrel_quant::{FloatKernels, Kernels};

use super::Backend;
use crate::config::RopeStyle;
use crate::kv_cache::KvRows;
use crate::linear::{ActivationBatch, Gather, Linear};
use crate::ops::{self, AttentionShape};
use crate::parallel::Member;
use crate::routing;

/// Petrel's integer and float kernels for one instruction set.
#[derive(Clone, Copy, Debug)]
pub struct NativeBackend {
    /// Block dot products (Q4_0, Q4_1, Q8_0 weights).
    pub kernels: Kernels,
    /// W4 matrix kernels; they follow `kernels`' instruction set, so that choosing the
    /// scalar reference chooses it everywhere.
    pub w4: W4Kernels,
    /// f32 kernels for attention and SwiGLU.
    pub float: FloatKernels,
    /// The prefill panel kernel for block weights, where `kernels`' instruction set has
    /// one (AVX-512 VNNI; AMX-INT8 through [`NativeBackend::with_amx`]); batches of at
    /// least [`PANEL_MIN_TOKENS`] tokens use it.
    pub panel: Option<PanelGemm>,
}

/// The smallest batch for which the panel kernel beats the four-token block dot products:
/// unpacking a panel costs about as much as a few tokens' products. Measured on
/// Qwen2.5-Coder-0.5B Q4_K_M, one thread (`petrel-bench --prompts 4,8,16,32`): 8 tokens
/// 28.7 tok/s with the dot products against 24.0 with panels, 16 tokens 31.1 against 43.0.
pub const PANEL_MIN_TOKENS: usize = 12;

impl NativeBackend {
    /// The fastest kernels this CPU runs.
    pub fn detect() -> Self {
        Self::with_kernels(Kernels::detect())
    }

    /// `kernels`, with the W4 kernels of the same instruction set.
    pub fn with_kernels(kernels: Kernels) -> Self {
        NativeBackend {
            kernels,
            w4: W4Kernels::for_isa(kernels.isa()).unwrap_or_else(W4Kernels::scalar),
            float: FloatKernels::detect(),
            panel: match kernels.isa() {
                Isa::Scalar => None,
                isa => PanelGemm::for_isa(isa),
            },
        }
    }

    /// The same kernels with the AMX-INT8 panel kernel in place of the AVX-512 VNNI one,
    /// where the CPU and OS allow it (otherwise unchanged).
    pub fn with_amx(self) -> Self {
        match (self.panel, PanelGemm::amx()) {
            (Some(panel), Some(amx)) if panel.isa() == amx.isa() => NativeBackend { panel: Some(amx), ..self },
            _ => self,
        }
    }
}

impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn max_team(&self) -> usize {
        usize::MAX
    }

    fn matmul(&self, w: &Linear<'_>, x: &mut ActivationBatch, out: &mut [f32], member: &Member<'_>, to: Gather) {
        matmul::matmul(w, self, x, out, member, to);
    }

    fn rms_norm_rows(&self, out: &mut [f32], x: &[f32], gain: &[f32], eps: f32) {
        ops::rms_norm_rows(out, x, gain, eps);
    }

    fn rope(&self, x: &mut [f32], tables: &[f32], rope_dim: usize, head_dim: usize, style: RopeStyle) {
        let tokens = tables.len() / rope_dim;
        if tokens == 0 {
            return;
        }
        let width = x.len() / tokens;
        for (row, table) in x.chunks_exact_mut(width).zip(tables.chunks_exact(rope_dim)) {
            match style {
                RopeStyle::Adjacent => ops::apply_rope(row, head_dim, table),
                RopeStyle::Neox => ops::apply_rope_neox(row, head_dim, table),
            }
        }
    }

    fn attend(
        &self,
        out: &mut [f32],
        q: &[f32],
        keys: KvRows<'_>,
        values: KvRows<'_>,
        shape: AttentionShape,
        first_row: usize,
        items: Range<usize>,
    ) {
        ops::attend_batch(&self.float, out, q, keys, values, shape, first_row, items);
    }

    fn swiglu(&self, gate: &mut [f32], up: &[f32]) {
        ops::swiglu(&self.float, gate, up);
    }

    fn geglu(&self, gate: &mut [f32], up: &[f32]) {
        self.float.gelu_tanh_mul(gate, up);
    }

    fn add(&self, x: &mut [f32], y: &[f32]) {
        ops::add_assign(x, y);
    }

    fn top_k(&self, scores: &[f32], k: usize, order: &mut [u32]) {
        routing::select_top_k(scores, k, order);
    }
}

/// Petrel's own matrix product on a weight's stored form (the native backend's
/// [`Backend::matmul`]): integer block dot products, W4 panels, or float rows.
mod matmul {
    use petrel_quant::gemm;
    use petrel_quant::w4::PANEL_ROWS;

    use super::{NativeBackend, PANEL_MIN_TOKENS};
    use crate::linear::{ActivationBatch, Gather, Linear, WeightStorage};
    use crate::parallel::Member;
    use crate::scheme::Activations;

    /// How many rows ahead of the current one the block matmul prefetches (at least).
    const PREFETCH_ROWS: usize = 8;

    /// How far ahead, in bytes, decode's block matmul prefetches.
    const PREFETCH_BYTES: usize = 16 << 10;

    /// `out[t][r] = Σ_c W[r][c] · x[t][c]` for every token `t` of `x`, written row-major
    /// by token (`out` is `x.tokens() × rows`), on Petrel's own kernels (the native
    /// backend's product). Each team member computes [`Linear::my_rows`]; `to` says who
    /// receives the complete result.
    pub(super) fn matmul(
        w: &Linear<'_>,
        compute: &NativeBackend,
        x: &mut ActivationBatch,
        out: &mut [f32],
        member: &Member<'_>,
        to: Gather,
    ) {
        let tokens = x.tokens();
        let out = &mut out[..tokens * w.rows];
        let mine = w.my_rows(member);
        match (w.storage, w.w4()) {
            (WeightStorage::W4(activations), Some(w4)) => {
                let panels = mine.start / PANEL_ROWS..mine.end / PANEL_ROWS;
                match activations {
                    Activations::Quantized { bits, clip } => {
                        let batch = x.w4_batch(bits, clip, w4.shape().group);
                        compute.w4.gemm_int(w4, panels, &batch, out, w.rows);
                    }
                    Activations::Float => {
                        compute.w4.gemm_float(w4, panels, x.f32_padded(), tokens, out, w.rows);
                    }
                }
            }
            (WeightStorage::Quantized(format), _) if tokens == 1 => {
                // Decode: one activation row against every row of the share, the kernel and
                // the row slices looked up once (the same kernel calls as the batch path).
                x.ensure_q8();
                let (dot, activations) = (compute.kernels.for_format(format), x.q8_row(0));
                let n = w.storage.row_bytes(w.cols);
                let rows = &w.data()[mine.start * n..mine.end * n];
                // Prefetch about PREFETCH_BYTES ahead (at least PREFETCH_ROWS rows): short rows
                // (Gemma's 680-byte head rows) need more rows in flight than long ones.
                let ahead_rows = (PREFETCH_BYTES / n).max(PREFETCH_ROWS);
                for (i, (row, o)) in rows.chunks_exact(n).zip(&mut out[mine.clone()]).enumerate() {
                    if let Some(ahead) = rows.get((i + ahead_rows) * n..(i + ahead_rows + 1) * n) {
                        petrel_quant::dot::prefetch(ahead);
                    }
                    *o = dot(row, activations);
                }
            }
            // (Only x86-64 has a panel kernel: elsewhere the branch is compiled out, so that
            // firmware images carry no panel code.)
            (WeightStorage::Quantized(format), _)
                if cfg!(target_arch = "x86_64") && tokens >= PANEL_MIN_TOKENS && compute.panel.is_some() =>
            {
                x.ensure_q8();
                let gemm = compute.panel.as_ref().expect("checked above");
                let n = w.storage.row_bytes(w.cols);
                let (batch, lines) = x.q8_batch_and_panel(gemm::panel_lines(w.cols));
                let mut r = mine.start;
                while r < mine.end {
                    let rows = (mine.end - r).min(gemm::PANEL_ROWS);
                    let panel = gemm.pack(format, &w.data()[r * n..(r + rows) * n], rows, w.cols, lines);
                    gemm.run(&panel, &batch, &mut out[r..], w.rows);
                    r += rows;
                }
            }
            (WeightStorage::Quantized(_), _) => {
                x.ensure_q8();
                for r in mine.clone() {
                    if r + PREFETCH_ROWS < mine.end {
                        petrel_quant::dot::prefetch(w.row(r + PREFETCH_ROWS));
                    }
                    row_times_batch(w, compute, r, x, out);
                }
            }
            _ => {
                for r in mine {
                    row_times_batch(w, compute, r, x, out);
                }
            }
        }
        w.gather(member, out, tokens, to);
    }

    /// `out[t * rows + r] = W[r] · x[t]` for every token of the batch (block and float
    /// storages).
    #[inline]
    fn row_times_batch(w: &Linear<'_>, compute: &NativeBackend, r: usize, x: &ActivationBatch, out: &mut [f32]) {
        let (row, rows, tokens) = (w.row(r), w.rows, x.tokens());
        match w.storage {
            WeightStorage::Quantized(format) => {
                let kernels = &compute.kernels;
                let (dot, dot4) = (kernels.for_format(format), kernels.for_format_x4(format));
                let mut t = 0;
                while t + 4 <= tokens {
                    let xs = [x.q8_row(t), x.q8_row(t + 1), x.q8_row(t + 2), x.q8_row(t + 3)];
                    for (j, v) in dot4(row, &xs).into_iter().enumerate() {
                        out[(t + j) * rows + r] = v;
                    }
                    t += 4;
                }
                for t in t..tokens {
                    out[t * rows + r] = dot(row, x.q8_row(t));
                }
            }
            WeightStorage::F32 => {
                // The runtime reads files without `unsafe`, so the little-endian f32
                // weights are decoded in chunks that the float kernel then multiplies.
                let mut buf = [0f32; 64];
                for t in 0..tokens {
                    let xs = x.f32_row(t);
                    let mut sum = 0f32;
                    for (chunk, xc) in row.chunks(4 * buf.len()).zip(xs.chunks(buf.len())) {
                        for (o, b) in buf.iter_mut().zip(chunk.chunks_exact(4)) {
                            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                        sum += compute.float.dot(&buf[..xc.len()], xc);
                    }
                    out[t * rows + r] = sum;
                }
            }
            _ => {
                for t in 0..tokens {
                    let mut sum = 0f32;
                    for (b, &v) in row.chunks_exact(2).zip(x.f32_row(t)) {
                        sum += half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() * v;
                    }
                    out[t * rows + r] = sum;
                }
            }
        }
    }
}
