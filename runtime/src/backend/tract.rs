//! The tract backend: the matrix products through tract's kernels, the rest native.
//!
//! Each weight matrix becomes a one-operation tract graph (`EinSum "mk,Gnk->mn"` or
//! `"mk,nk->mn"` against a constant), optimized by tract into its packed matrix kernels
//! (AVX2/FMA tiles on x86-64, NEON on ARM), with one plan per matrix and batch size, built
//! on first use and kept. 4-bit weights stay 4-bit: tract's block-quantized `Q4_0` format is
//! byte-identical to GGUF's, so Q4_0 tensors go in as stored and Petrel's W4 matrices are
//! repacked into it without loss (a W4 code and its group's f16 scale are a Q4_0 nibble and
//! block scale). F32, F16 and Q8_0 (embeddings and heads) are expanded to f32 constants.
//! **Q4_1 is refused** at load: tract's 4-bit kernels take Q4_0 only, and expanding to f32
//! would hide an 8× larger model behind the same flag.
//!
//! The activations are native's own ([`ActivationBatch::seen_by`]), so W4A4 and W4A8 are
//! reproduced and tract differs from native only in the order of float sums. RMSNorm, RoPE,
//! attention, SwiGLU, adds and top-k are memory-bound element-wise work on small tensors
//! that a graph per call would slow down; they run native's code, single-threaded (the
//! backend is one team member: tract threads inside its matrix kernels).

use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use hashbrown::HashMap;
use petrel_quant::w4::PANEL_ROWS;
use petrel_quant::WeightFormat;
use spin::Mutex;
use tract_core::internal::{
    tvec, Blob, Datum, DatumExt, DatumType, IntoTValue, SpecialOps, Tensor, TractResult, TypedModel,
};
use tract_core::model::IntoRunnable;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::konst::Const;
use tract_core::prelude::TypedRunnableModel;
use tract_linalg::block_quant::{BlockQuantFact, BlockQuantStorage, Q4_0};

use super::native::NativeBackend;
use super::Backend;
use crate::config::RopeStyle;
use crate::kv_cache::KvRows;
use crate::linear::{ActivationBatch, Gather, Linear, WeightStorage};
use crate::model::{Model, ModelError};
use crate::ops::AttentionShape;
use crate::parallel::Member;

/// Bytes of a Q4_0 block: an f16 scale and 16 bytes of nibbles.
const Q4_0_BLOCK: usize = 18;

/// A weight matrix as tract holds it.
enum Weight {
    /// Q4_0 blocks (`rows × cols / 32`), multiplied by tract's block-quant kernels.
    Q4_0(Arc<Tensor>),
    /// f32 values, `rows × cols`.
    Dense(Arc<Tensor>),
}

/// The tract backend: prepared weights, and a plan per matrix and batch size.
pub struct TractBackend {
    weights: HashMap<usize, Weight>,
    plans: Mutex<HashMap<(usize, usize), Arc<TypedRunnableModel>>>,
    seen: Mutex<Vec<f32>>,
    /// The element-wise operations.
    native: NativeBackend,
}

impl core::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TractBackend").field("weights", &self.weights.len()).finish()
    }
}

fn refuse(tensor: &str, linear: &Linear<'_>, reason: &str) -> ModelError {
    ModelError::UnsupportedByBackend {
        backend: "tract",
        tensor: tensor.to_string(),
        ty: linear.storage_name(),
        reason: reason.to_string(),
    }
}

fn failed(e: impl core::fmt::Display) -> ModelError {
    ModelError::BackendFailed { backend: "tract", reason: e.to_string() }
}

/// A W4 matrix as Q4_0 blocks: per row and 32 columns, the group's f16 scale and the codes
/// as offset nibbles (byte `j` holds elements `j` and `j + 16`).
fn w4_as_q4_0(linear: &Linear<'_>) -> Vec<u8> {
    let w4 = linear.w4().expect("a W4 matrix");
    let shape = w4.shape();
    let group_len = shape.group_len();
    let scale_bytes = w4.scale_bytes();
    let blocks = linear.cols / 32;
    let mut out = vec![0u8; linear.rows * blocks * Q4_0_BLOCK];
    for r in 0..linear.rows {
        for b in 0..blocks {
            let block = &mut out[(r * blocks + b) * Q4_0_BLOCK..][..Q4_0_BLOCK];
            let at = shape.scale_index(r, b * 32 / group_len) * 2;
            block[..2].copy_from_slice(&scale_bytes[at..at + 2]);
            for j in 0..16 {
                let lo = (w4.code(r, b * 32 + j) + 8) as u8;
                let hi = (w4.code(r, b * 32 + j + 16) + 8) as u8;
                block[2 + j] = lo | (hi << 4);
            }
        }
    }
    out
}

/// A one-operation graph: `tokens × cols` f32 activations times the `rows × cols` matrix
/// `weight`, optimized into tract's kernels.
fn build_plan(weight: &Weight, rows: usize, cols: usize, tokens: usize) -> TractResult<Arc<TypedRunnableModel>> {
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([tokens, cols]))?;
    let (konst, axes) = match weight {
        Weight::Q4_0(t) => {
            let fact = Box::new(BlockQuantFact::new(Box::new(Q4_0), tvec!(1, rows, cols)));
            (Const::new_with_exotic_fact(t.clone(), fact)?, "mk,Gnk->mn")
        }
        Weight::Dense(t) => (Const::new(t.clone())?, "mk,nk->mn"),
    };
    let w = model.wire_node("w", konst, &[])?[0];
    let op = EinSum { axes: axes.parse()?, operating_dt: DatumType::F32, q_params: None };
    let out = model.wire_node("matmul", op, &[x, w])?;
    model.select_output_outlets(&out)?;
    model.into_optimized()?.into_runnable()
}

/// Q4_0 blocks (`rows × cols / 32` of them) as tract's block-quant constant.
fn q4_0_weight(bytes: &[u8], rows: usize, cols: usize) -> TractResult<Weight> {
    let storage = BlockQuantStorage::new(Box::new(Q4_0), rows, cols, Arc::new(Blob::from_bytes(bytes)?))?;
    Ok(Weight::Q4_0(Arc::new(storage.into_tensor_with_shape(f32::datum_type(), &[1, rows, cols]))))
}

impl TractBackend {
    /// Prepares every weight matrix of `model` (see [`Model::linears`]), refusing those
    /// tract cannot serve, and runs tract's matrix kernels on `threads` threads (a
    /// process-wide setting of tract's).
    pub fn new(model: &Model<'_>, threads: usize) -> Result<Self, ModelError> {
        if threads > 1 {
            tract_linalg::multithread::set_default_executor(tract_linalg::multithread::Executor::multithread(threads));
        }
        let mut weights = HashMap::new();
        for (name, linear) in model.linears() {
            if weights.contains_key(&linear.key()) {
                continue;
            }
            let (rows, cols) = (linear.rows, linear.cols);
            let q4_0 = |bytes: &[u8]| q4_0_weight(bytes, rows, cols).map_err(failed);
            let weight = match linear.storage {
                WeightStorage::Quantized(WeightFormat::Q4_0) => q4_0(linear.data())?,
                WeightStorage::Quantized(WeightFormat::Q4_1) => {
                    return Err(refuse(
                        &name,
                        linear,
                        "tract's 4-bit kernels take Q4_0 blocks only; requantize the file to Q4_0 \
                         (llama.cpp: llama-quantize --allow-requantize IN OUT Q4_0) or use --backend native or candle",
                    ))
                }
                WeightStorage::W4(_) if !cols.is_multiple_of(32) || !rows.is_multiple_of(PANEL_ROWS) => {
                    return Err(refuse(&name, linear, "W4 matrices reach tract as Q4_0 blocks of 32 columns"))
                }
                WeightStorage::W4(_) => q4_0(&w4_as_q4_0(linear))?,
                _ => {
                    let mut dense = vec![0f32; rows * cols];
                    for (r, out) in dense.chunks_exact_mut(cols).enumerate() {
                        linear.dequantize_row(r, out);
                    }
                    Weight::Dense(Arc::new(Tensor::from_shape(&[rows, cols], &dense).map_err(failed)?))
                }
            };
            weights.insert(linear.key(), weight);
        }
        Ok(TractBackend {
            weights,
            plans: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            native: NativeBackend::detect(),
        })
    }

    /// The plan multiplying `tokens` rows with the matrix `key`.
    fn plan(&self, key: usize, linear: &Linear<'_>, tokens: usize) -> TractResult<Arc<TypedRunnableModel>> {
        if let Some(plan) = self.plans.lock().get(&(key, tokens)) {
            return Ok(plan.clone());
        }
        let plan = build_plan(&self.weights[&key], linear.rows, linear.cols, tokens)?;
        self.plans.lock().insert((key, tokens), plan.clone());
        Ok(plan)
    }

    /// Plans built so far (matrix × batch size).
    pub fn plans(&self) -> usize {
        self.plans.lock().len()
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn max_team(&self) -> usize {
        1
    }

    fn matmul(&self, w: &Linear<'_>, x: &mut ActivationBatch, out: &mut [f32], member: &Member<'_>, to: Gather) {
        let tokens = x.tokens();
        let key = w.key();
        assert!(
            self.weights.contains_key(&key),
            "tract backend: a matrix that was not prepared (build it from this model)"
        );
        let mut seen = self.seen.lock();
        x.seen_by(w, &mut seen);
        let run = || -> TractResult<Vec<f32>> {
            let plan = self.plan(key, w, tokens)?;
            let input = Tensor::from_shape(&[tokens, w.cols], &seen)?;
            let result = plan.run(tvec!(input.into_tvalue()))?;
            Ok(result[0].to_plain_array_view::<f32>()?.iter().copied().collect())
        };
        let values = run().unwrap_or_else(|e| panic!("tract backend: a {}×{} product failed: {e:?}", w.rows, w.cols));
        out[..tokens * w.rows].copy_from_slice(&values);
        w.gather(member, out, tokens, to);
    }

    fn rms_norm_rows(&self, out: &mut [f32], x: &[f32], gain: &[f32], eps: f32) {
        self.native.rms_norm_rows(out, x, gain, eps);
    }

    fn rope(&self, x: &mut [f32], tables: &[f32], rope_dim: usize, head_dim: usize, style: RopeStyle) {
        self.native.rope(x, tables, rope_dim, head_dim, style);
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
        self.native.attend(out, q, keys, values, shape, first_row, items);
    }

    fn swiglu(&self, gate: &mut [f32], up: &[f32]) {
        self.native.swiglu(gate, up);
    }

    fn geglu(&self, gate: &mut [f32], up: &[f32]) {
        self.native.geglu(gate, up);
    }

    fn add(&self, x: &mut [f32], y: &[f32]) {
        self.native.add(x, y);
    }

    fn top_k(&self, scores: &[f32], k: usize, order: &mut [u32]) {
        self.native.top_k(scores, k, order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_quant::blocks::{dequantize_row, quantize_row};

    /// tract's Q4_0 product against the exact product of the dequantized weights.
    #[test]
    fn q4_0_product_precision() {
        for (tokens, rows, cols) in
            [(1, 64, 128), (3, 64, 128), (1, 576, 576), (1, 1536, 576), (1, 576, 1536), (7, 576, 1536), (1, 192, 576)]
        {
            let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 97.0).collect();
            let mut bytes = vec![0u8; rows * cols / 32 * 18];
            for (r, out) in bytes.chunks_exact_mut(cols / 32 * 18).enumerate() {
                quantize_row(WeightFormat::Q4_0, &values[r * cols..(r + 1) * cols], out);
            }
            let mut dense = vec![0f32; rows * cols];
            for (r, out) in dense.chunks_exact_mut(cols).enumerate() {
                dequantize_row(WeightFormat::Q4_0, &bytes[r * cols / 32 * 18..(r + 1) * cols / 32 * 18], out);
            }
            let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 104_729 % 89) as f32 - 44.0) / 31.0).collect();
            let plan = build_plan(&q4_0_weight(&bytes, rows, cols).unwrap(), rows, cols, tokens).unwrap();
            let got = plan.run(tvec!(Tensor::from_shape(&[tokens, cols], &x).unwrap().into_tvalue())).unwrap();
            let got: Vec<f32> = got[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect();
            let mut worst = 0f64;
            for t in 0..tokens {
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| dense[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                    worst = worst.max((got[t * rows + r] as f64 - exact).abs() / exact.abs().max(1.0));
                }
            }
            std::eprintln!("tract Q4_0 product, {tokens} tokens, {rows}x{cols}: worst relative error {worst:e}");
            // Measured at most 2.2e-5 (f32 sums over up to 1536 products); a wrong block
            // layout or scale would be off by far more.
            assert!(worst < 1e-4, "tract's Q4_0 product is off by {worst:e} ({tokens}×{rows}×{cols})");
        }
    }
}
