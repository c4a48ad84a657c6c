//! The seam between the model code and the arithmetic: [`Backend`].
//!
//! `forward.rs` and `kv_predict.rs` say *what* a block computes; a backend says *how*. The
//! operations are the ones a Llama-family block needs — matrix products on the stored
//! weights, RMSNorm, RoPE (adjacent or NeoX pairs), causal attention over the KV cache
//! (optionally windowed), SwiGLU and GeGLU, residual adds and
//! (for mixture-of-depths routing) top-k — on host `f32` slices. Activations, the KV cache,
//! routers, taps and the Hadamard transform stay in host memory, so every feature of the
//! runtime works on every backend.
//!
//! Backends:
//! - [`native::NativeBackend`]: Petrel's own integer kernels, the reference, on the
//!   session's thread team;
//! - `candle::CandleBackend` (feature `candle`): every operation as candle tensor ops on
//!   a candle `Device` (its CPU device here; CUDA and Metal with the `cuda` / `metal`
//!   features);
//! - `tract::TractBackend` (feature `tract`): the matrix products through tract's
//!   kernels (4-bit weights as tract's Q4_0 blocks), the rest native.
//!
//! A backend prepares its weights when it is built, and refuses there — with
//! [`crate::ModelError::UnsupportedByBackend`] — any tensor type or operation it cannot
//! serve; it never falls back silently.

#[cfg(feature = "candle")]
pub mod candle;
pub mod native;
#[cfg(feature = "tract")]
pub mod tract;

use core::ops::Range;

use crate::config::RopeStyle;
use crate::kv_cache::KvRows;
use crate::linear::{ActivationBatch, Gather, Linear};
use crate::ops::AttentionShape;
use crate::parallel::Member;

/// The operations of the forward pass. All slices are host memory, row-major.
pub trait Backend: Sync {
    /// A short name for reports and errors (`native`, `candle-cpu`, `tract`).
    fn name(&self) -> &'static str;

    /// Most team members the backend can use: native splits rows between the session's
    /// threads; backends that thread internally say 1.
    fn max_team(&self) -> usize;

    /// `out[t · rows + r] = Σ_c W[r][c] · x[t][c]` for the rows of `w` that `member` owns
    /// ([`Linear::my_rows`]), then [`Linear::gather`] with `to`. `out` holds at least
    /// `x.tokens() × rows` values.
    fn matmul(&self, w: &Linear<'_>, x: &mut ActivationBatch, out: &mut [f32], member: &Member<'_>, to: Gather);

    /// RMSNorm of each row of `x` (rows of `gain.len()` values) into `out`:
    /// `x · gain / sqrt(mean(x²) + eps)`.
    fn rms_norm_rows(&self, out: &mut [f32], x: &[f32], gain: &[f32], eps: f32);

    /// Rotates `x` (`tokens × width`, whole heads of `head_dim`) by the RoPE tables of its
    /// tokens (`tables`: `tokens × rope_dim` values, `rope_dim / 2` pairs of `(cos, sin)`
    /// per token, as `ops::rope_table` fills them), pairing elements as `style` says.
    fn rope(&self, x: &mut [f32], tables: &[f32], rope_dim: usize, head_dim: usize, style: RopeStyle);

    /// Causal attention of the batch's queries `q` (`tokens × heads × head_dim`) over the
    /// cached `keys` and `values` (`rows × kv_heads × head_dim`), for the query heads
    /// `items` (item `i` = head `i % heads` of token `i / heads`, which sees the rows up to
    /// `first_row + i / heads`), written to `out` (`items.len() × head_dim`).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        out: &mut [f32],
        q: &[f32],
        keys: KvRows<'_>,
        values: KvRows<'_>,
        shape: AttentionShape,
        first_row: usize,
        items: Range<usize>,
    );

    /// `gate = silu(gate) · up`, element-wise.
    fn swiglu(&self, gate: &mut [f32], up: &[f32]);

    /// `gate = gelu_tanh(gate) · up`, element-wise (`ops::gelu_tanh_mul`).
    fn geglu(&self, gate: &mut [f32], up: &[f32]);

    /// `x += y`, element-wise.
    fn add(&self, x: &mut [f32], y: &[f32]);

    /// The indices of the `k` highest `scores` (ties to the lower index) in increasing
    /// order, as the first `k` entries of `order` (`scores.len()` long, overwritten), as
    /// `routing::select_top_k` defines them.
    fn top_k(&self, scores: &[f32], k: usize, order: &mut [u32]);
}

impl core::fmt::Debug for dyn Backend + '_ {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
