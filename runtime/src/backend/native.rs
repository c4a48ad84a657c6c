//! The native backend: Petrel's own kernels ([`petrel_quant`]), the reference every other
//! backend is measured against.

use core::ops::Range;

use petrel_quant::w4::kernels::W4Kernels;
use petrel_quant::{FloatKernels, Kernels};

use super::Backend;
use crate::config::RopeStyle;
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
}

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
        w.matmul_native(self, x, out, member, to);
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
        keys: &[f32],
        values: &[f32],
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
