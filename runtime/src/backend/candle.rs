//! The candle backend: the forward pass as candle tensor ops on a candle [`Device`].
//!
//! Every operation — matrix products, RMSNorm, RoPE, causal attention over the cache,
//! SwiGLU, residual adds, top-k — runs as candle ops on the device; the host slices of the
//! [`Backend`] seam are uploaded and read back around each call (on CPU a copy; on a GPU a
//! transfer per op, which makes this path correct but not fast: see README).
//!
//! # Weights and W4A4
//! Every weight matrix is dequantized once, when the backend is built, to f32 on the device
//! (stored transposed, `cols × rows`), whatever its storage: Q4_0, Q4_1, Q8_0, F16, F32 and
//! W4. The activations it multiplies are the values native's kernels see
//! ([`ActivationBatch::seen_by`]): 8-bit blocks for block weights, int4/int8 codes per token
//! and group for W4A4/W4A8 — so W4A4 is reproduced by fake quantization, and candle differs
//! from native only in the order of float sums. Nothing is refused: every storage
//! dequantizes exactly.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

/// candle's device type, re-exported for building a [`CandleBackend`].
pub use candle_core::Device;
use candle_core::{DType, Tensor};
use hashbrown::HashMap;
use spin::Mutex;

use super::Backend;
use crate::config::RopeStyle;
use crate::kv_cache::KvRows;
use crate::linear::{ActivationBatch, Gather, Linear};
use crate::model::{Model, ModelError};
use crate::ops::AttentionShape;
use crate::parallel::Member;

/// The candle backend: prepared weights on one device.
pub struct CandleBackend {
    device: Device,
    name: &'static str,
    /// Transposed f32 weights (`cols × rows`), by [`Linear::key`].
    weights: HashMap<usize, Tensor>,
    /// Scratch for the activations of a matrix product.
    seen: Mutex<Vec<f32>>,
}

impl core::fmt::Debug for CandleBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CandleBackend").field("device", &self.name).field("weights", &self.weights.len()).finish()
    }
}

/// A device failure while running: the seam has no error path (a backend validated
/// everything it could when it was built), so this panics with candle's message.
fn run<T>(what: &str, r: candle_core::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("candle backend: {what} failed: {e}"))
}

impl CandleBackend {
    /// Prepares every weight matrix of `model` (see [`Model::linears`]) on `device`.
    pub fn new(model: &Model<'_>, device: Device) -> Result<Self, ModelError> {
        let name = match &device {
            Device::Cpu => "candle-cpu",
            Device::Cuda(_) => "candle-cuda",
            Device::Metal(_) => "candle-metal",
        };
        let failed = |e: candle_core::Error| ModelError::BackendFailed { backend: name, reason: e.to_string() };
        let mut weights = HashMap::new();
        for (_, linear) in model.linears() {
            if weights.contains_key(&linear.key()) {
                continue;
            }
            let (rows, cols) = (linear.rows, linear.cols);
            let mut dense = vec![0f32; rows * cols];
            for (r, out) in dense.chunks_exact_mut(cols).enumerate() {
                linear.dequantize_row(r, out);
            }
            let w = Tensor::from_vec(dense, (rows, cols), &device).map_err(failed)?;
            weights.insert(linear.key(), w.t().and_then(|t| t.contiguous()).map_err(failed)?);
        }
        Ok(CandleBackend { device, name, weights, seen: Mutex::new(Vec::new()) })
    }

    /// The backend on candle's CUDA device `ordinal` (feature `cuda`). Type-checked in CI
    /// (`ci/cuda-check.sh`); running it needs a machine with Rust and CUDA.
    #[cfg(feature = "cuda")]
    pub fn cuda(model: &Model<'_>, ordinal: usize) -> Result<Self, ModelError> {
        let device = Device::new_cuda(ordinal)
            .map_err(|e| ModelError::BackendFailed { backend: "candle-cuda", reason: e.to_string() })?;
        Self::new(model, device)
    }

    /// The device the backend computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Tensor {
        run("upload", Tensor::from_slice(data, shape, &self.device))
    }

    fn download(&self, t: &Tensor, out: &mut [f32]) {
        let values = run("read back", t.flatten_all().and_then(|t| t.to_vec1::<f32>()));
        out[..values.len()].copy_from_slice(&values);
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn max_team(&self) -> usize {
        1
    }

    fn matmul(&self, w: &Linear<'_>, x: &mut ActivationBatch, out: &mut [f32], member: &Member<'_>, to: Gather) {
        let weight = self.weights.get(&w.key()).unwrap_or_else(|| {
            panic!(
                "candle backend: a {}×{} matrix that was not prepared (build the backend from this model)",
                w.rows, w.cols
            )
        });
        let tokens = x.tokens();
        let mut seen = self.seen.lock();
        x.seen_by(w, &mut seen);
        let product = self.upload(&seen, &[tokens, w.cols]).matmul(weight);
        self.download(&run("matmul", product), &mut out[..tokens * w.rows]);
        w.gather(member, out, tokens, to);
    }

    fn rms_norm_rows(&self, out: &mut [f32], x: &[f32], gain: &[f32], eps: f32) {
        let dim = gain.len();
        let x = self.upload(x, &[x.len() / dim, dim]);
        let gain = self.upload(gain, &[dim]);
        self.download(&run("rms_norm", candle_nn::ops::rms_norm(&x, &gain, eps)), out);
    }

    fn rope(&self, x: &mut [f32], tables: &[f32], rope_dim: usize, head_dim: usize, style: RopeStyle) {
        let tokens = tables.len() / rope_dim;
        if tokens == 0 {
            return;
        }
        let heads = x.len() / tokens / head_dim;
        let half = rope_dim / 2;
        let rotated = || -> candle_core::Result<Tensor> {
            let table = self.upload(tables, &[tokens, 1, half, 2]);
            let (cos, sin) = (table.narrow(3, 0, 1)?, table.narrow(3, 1, 1)?);
            let t = self.upload(x, &[tokens, heads, head_dim]);
            // The pairs as [tokens, heads, half, 2]: adjacent elements, or the two halves.
            let pairs = match style {
                RopeStyle::Adjacent => t.narrow(2, 0, rope_dim)?.reshape((tokens, heads, half, 2))?,
                RopeStyle::Neox => t.narrow(2, 0, rope_dim)?.reshape((tokens, heads, 2, half))?.transpose(2, 3)?,
            };
            let (a, b) = (pairs.narrow(3, 0, 1)?, pairs.narrow(3, 1, 1)?);
            let a2 = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let b2 = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
            let rotated = match style {
                RopeStyle::Adjacent => Tensor::cat(&[a2, b2], 3)?.reshape((tokens, heads, rope_dim))?,
                RopeStyle::Neox => Tensor::cat(&[a2, b2], 3)?.transpose(2, 3)?.reshape((tokens, heads, rope_dim))?,
            };
            if rope_dim == head_dim {
                Ok(rotated)
            } else {
                Tensor::cat(&[rotated, t.narrow(2, rope_dim, head_dim - rope_dim)?], 2)
            }
        };
        let rotated = run("rope", rotated());
        self.download(&rotated, x);
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
        let AttentionShape { heads, kv_heads, head_dim, scale, .. } = shape;
        let tokens = q.len() / (heads * head_dim);
        assert!(items == (0..tokens * heads), "candle backend: attention runs on one team member");
        let rows = first_row + tokens;
        let kv = kv_heads * head_dim;
        let attended = || -> candle_core::Result<Tensor> {
            // [heads, tokens, d] queries against [heads, rows, d] keys (each KV head repeated
            // for its group of query heads).
            let q = self.upload(q, &[tokens, heads, head_dim]).transpose(0, 1)?;
            let expand = |t: Tensor| -> candle_core::Result<Tensor> {
                let t = t.transpose(0, 1)?; // [kv_heads, rows, d]
                t.unsqueeze(1)?.expand((kv_heads, heads / kv_heads, rows, head_dim))?.reshape((heads, rows, head_dim))
            };
            // The cache's rows, widened to f32 where it stores f16 (host side; the candle
            // backend uploads its operands per call anyway).
            let widen = |rows_of: KvRows<'_>| -> Vec<f32> {
                let mut wide = vec![0f32; rows * kv];
                rows_of.read(0..rows * kv, &mut wide);
                wide
            };
            let k = expand(self.upload(&widen(keys), &[rows, kv_heads, head_dim]))?;
            let v = expand(self.upload(&widen(values), &[rows, kv_heads, head_dim]))?;
            let scores = (q.contiguous()?.matmul(&k.t()?)? * scale as f64)?;
            // Token t sees rows shape.first_row(first_row + t) ..= first_row + t.
            let mask: Vec<u8> = (0..tokens)
                .flat_map(|t| {
                    let last = first_row + t;
                    (0..rows).map(move |r| u8::from(r <= last && r >= shape.first_row(last)))
                })
                .collect();
            let mask = Tensor::from_vec(mask, (tokens, rows), &self.device)?.broadcast_as((heads, tokens, rows))?;
            let hidden = Tensor::full(f32::NEG_INFINITY, (heads, tokens, rows), &self.device)?;
            let probs = candle_nn::ops::softmax_last_dim(&mask.where_cond(&scores, &hidden)?)?;
            probs.matmul(&v)?.transpose(0, 1)?.contiguous()
        };
        let attended = run("attention", attended());
        self.download(&attended, out);
    }

    fn swiglu(&self, gate: &mut [f32], up: &[f32]) {
        let g = self.upload(gate, &[gate.len()]);
        let u = self.upload(up, &[up.len()]);
        let product = run("swiglu", candle_nn::ops::silu(&g).and_then(|s| s * u));
        self.download(&product, gate);
    }

    fn geglu(&self, gate: &mut [f32], up: &[f32]) {
        let g = self.upload(gate, &[gate.len()]);
        let u = self.upload(up, &[up.len()]);
        // candle's `gelu` is the tanh approximation (`gelu_erf` the exact one).
        let product = run("geglu", g.gelu().and_then(|s| s * u));
        self.download(&product, gate);
    }

    fn add(&self, x: &mut [f32], y: &[f32]) {
        let sum = run("add", self.upload(x, &[x.len()]) + self.upload(y, &[y.len()]));
        self.download(&sum, x);
    }

    fn top_k(&self, scores: &[f32], k: usize, order: &mut [u32]) {
        // A stable descending sort keeps ties in index order, as native's contract asks.
        let sorted = run("top_k", self.upload(scores, &[scores.len()]).arg_sort_last_dim(false));
        let mut indices = run("top_k", sorted.to_dtype(DType::U32).and_then(|t| t.to_vec1::<u32>()));
        indices.truncate(k);
        indices.sort_unstable();
        order[..k].copy_from_slice(&indices);
    }
}
