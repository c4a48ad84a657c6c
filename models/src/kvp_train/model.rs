//! The computation of one KV-prediction training step, in candle operations that all have
//! a backward pass (the trainer's own norms, RoPE, causal softmax and cross-entropy from
//! [`crate::train::model`] and [`crate::train::fused`]).
//!
//! Layouts are the trainer's and the runtime's: matrices `[rows = outputs, cols = inputs]`
//! with GGUF's permuted q/k rows, interleaved-pair RoPE over the whole head, grouped-query
//! attention (query head `i` reads KV head `i / (heads / kv_heads)`). Keys and values are
//! exchanged between the models as *merged heads*, `[batch, T, kv_heads · head_dim]`, and
//! keys *before* RoPE, as the predictor maps them (`K̂ = K_aux · Wkᵀ + bk`, then RoPE at the
//! row's position; `V̂ = V_aux · Wvᵀ + bv`).
//!
//! The base model is frozen: its weights are plain tensors, and its linear layers use
//! [`frozen_rows`], whose backward pass computes the input's gradient only (candle's matmul
//! would also compute the weight's, which nobody reads).

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, D};

use crate::train::config::ModelShape;
use crate::train::data::Batch;
use crate::train::fused::{causal_softmax, f32_slice};
use crate::train::model::{cross_entropy, matmul_rows, repeat_kv, rms_norm, rope, rope_tables, Parameter};

/// The nine tensors of a block, as GGUF names them (`blk.N.{name}.weight`), in the order of
/// a [`BlockTensors`] array.
pub const BLOCK_TENSORS: [&str; 9] =
    ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

const ATTN_NORM: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const O: usize = 4;
const FFN_NORM: usize = 5;
const GATE: usize = 6;
const UP: usize = 7;
const DOWN: usize = 8;

/// One block's weights in [`BLOCK_TENSORS`] order: norm gains `[dim]`, matrices
/// `[outputs, inputs]` (q `[dim, dim]`, k and v `[kv_dim, dim]`, output `[dim, dim]`, gate
/// and up `[ffn, dim]`, down `[dim, ffn]`).
pub type BlockTensors = [Tensor; 9];

/// Tensors of one base layer's predictor in [`KvpModel::params`], in this order.
pub const PREDICTOR_TENSORS: [&str; 4] = ["k.weight", "k.bias", "v.weight", "v.bias"];

/// Additive score of a key a query may not see (finite, so that nothing becomes NaN).
const MASKED: f32 = -1e30;

/// A base model with its KV-prediction auxiliary blocks and predictor.
pub struct KvpModel {
    /// The base model's shape; `context` is the longest sequence the RoPE tables cover.
    pub shape: ModelShape,
    /// Token embedding `[vocab, dim]` (frozen, shared by base and aux).
    pub embedding: Tensor,
    /// Final norm gain `[dim]` (frozen, shared).
    pub output_norm: Tensor,
    /// Output head `[vocab, dim]` (frozen, shared; the embedding itself when tied).
    pub head: Tensor,
    /// The base blocks (frozen).
    pub base: Vec<BlockTensors>,
    /// Per base layer `l`, the aux block whose K/V predict layer `l`'s.
    pub layer_map: Vec<usize>,
    /// The trained parameters: per aux block `a` its nine tensors named
    /// `kvp.blk.{a}.{name}.weight` ([`BLOCK_TENSORS`] order, shapes as [`BlockTensors`]),
    /// then per base layer `l` `kvp.pred.{l}.k.weight` `[base kv_dim, aux kv_dim]`,
    /// `kvp.pred.{l}.k.bias` `[base kv_dim]`, and the same for `v`.
    pub params: Vec<Parameter>,
    cos: Tensor,
    sin: Tensor,
}

/// The losses of one batch (nats for cross-entropies; L1 in the keys' and values' units).
pub struct Losses {
    /// `CE_base + CE_aux + l1_weight · L1`, a scalar tensor (with its graph when training).
    pub total: Tensor,
    /// Mean next-token cross-entropy of the base at the sampled positions, run on the
    /// predicted cache.
    pub ce_base: f64,
    /// Mean next-token cross-entropy of the aux model (its blocks, then the base's final
    /// norm and head) over all positions.
    pub ce_aux: f64,
    /// `Σ_l (mean|K̂_l − K_l| + mean|V̂_l − V_l|)`, keys before RoPE.
    pub l1: f64,
    /// Per base layer, `mean|K̂_l − K_l|`.
    pub l1_k: Vec<f64>,
    /// Per base layer, `mean|V̂_l − V_l|`.
    pub l1_v: Vec<f64>,
    /// The base's cross-entropy at the same positions with its own (true) cache.
    pub ce_true: f64,
}

/// Per-layer keys (pre-RoPE) and values, `[batch, T, kv_dim]` each, and the final hidden
/// state `[batch, T, dim]` of a causal run through some blocks.
struct CausalRun {
    hidden: Tensor,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl KvpModel {
    /// A model over the given tensors; `shape.context` sets the RoPE tables' length.
    pub fn new(
        shape: ModelShape,
        embedding: Tensor,
        output_norm: Tensor,
        head: Tensor,
        base: Vec<BlockTensors>,
        layer_map: Vec<usize>,
        params: Vec<Parameter>,
    ) -> Result<Self> {
        let aux = params.iter().filter(|p| p.name.starts_with("kvp.blk.")).count() / BLOCK_TENSORS.len();
        if layer_map.len() != shape.layers || layer_map.iter().any(|&a| a >= aux) {
            candle_core::bail!("bad layer map {layer_map:?} for {} base layers and {aux} aux blocks", shape.layers);
        }
        if params.len() != aux * BLOCK_TENSORS.len() + shape.layers * PREDICTOR_TENSORS.len() {
            candle_core::bail!(
                "{} trained parameters, expected {aux} aux blocks and {} predictors",
                params.len(),
                shape.layers
            );
        }
        let (cos, sin) = rope_tables(&shape)?;
        Ok(KvpModel { shape, embedding, output_norm, head, base, layer_map, params, cos, sin })
    }

    /// Number of auxiliary blocks.
    pub fn aux_blocks(&self) -> usize {
        (self.params.len() - self.shape.layers * PREDICTOR_TENSORS.len()) / BLOCK_TENSORS.len()
    }

    fn param(&self, i: usize, detach: bool) -> Tensor {
        let t = self.params[i].var.as_tensor();
        if detach {
            t.detach()
        } else {
            t.clone()
        }
    }

    /// Aux block `a`'s weights (without gradient tracking when `detach`).
    fn aux_block(&self, a: usize, detach: bool) -> BlockTensors {
        std::array::from_fn(|i| self.param(a * BLOCK_TENSORS.len() + i, detach))
    }

    /// Base layer `l`'s predictor: `[Wk, bk, Wv, bv]`.
    fn predictor(&self, l: usize, detach: bool) -> [Tensor; 4] {
        let start = self.aux_blocks() * BLOCK_TENSORS.len() + l * PREDICTOR_TENSORS.len();
        std::array::from_fn(|i| self.param(start + i, detach))
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.embedding.embedding(&tokens.flatten_all()?)?.reshape((b, t, self.shape.dim))
    }

    /// Logits `[batch, n, vocab]` of hidden states `[batch, n, dim]`: final norm, head.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        frozen_rows(&rms_norm(hidden, &self.output_norm, self.shape.norm_eps)?, &self.head)
    }

    /// Runs `blocks` causally over `x` (`[batch, T, dim]`, positions `0..T`).
    fn causal_run(&self, x: &Tensor, blocks: &[BlockTensors], frozen: bool) -> Result<CausalRun> {
        let t = x.dim(1)?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let mut run = CausalRun { hidden: x.clone(), keys: Vec::new(), values: Vec::new() };
        for w in blocks {
            let (hidden, k, v) = causal_block(&self.shape, &run.hidden, w, frozen, &cos, &sin)?;
            run.hidden = hidden;
            run.keys.push(k);
            run.values.push(v);
        }
        Ok(run)
    }

    /// The base's full forward pass on `tokens` (`[batch, T]` u32), no gradients: the
    /// logits `[batch, T, vocab]` (for tests and references).
    pub fn base_logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let run = self.causal_run(&self.embed(tokens)?, &self.base, true)?;
        self.logits(&run.hidden)
    }

    /// The predicted cache of `tokens` (`[1, T]` u32) computed in candle: per base layer,
    /// the keys after RoPE at positions `0..T` and the values, `[T, kv_dim]` each — what
    /// the runtime's KV-prediction prefill writes for a prompt of `T + 1` tokens (a
    /// reference for it).
    pub fn predicted_cache(&self, tokens: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let t = tokens.dim(1)?;
        let aux: Vec<BlockTensors> = (0..self.aux_blocks()).map(|a| self.aux_block(a, true)).collect();
        let run = self.causal_run(&self.embed(tokens)?, &aux, true)?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim());
        (0..self.shape.layers)
            .map(|l| {
                let [wk, bk, wv, bv] = self.predictor(l, true);
                let a = self.layer_map[l];
                let k = matmul_rows(&run.keys[a], &wk)?.broadcast_add(&bk)?;
                let v = matmul_rows(&run.values[a], &wv)?.broadcast_add(&bv)?;
                let k = rope(&k.reshape((1, t, kvh, hd))?.transpose(1, 2)?, &cos, &sin)?;
                Ok((k.transpose(1, 2)?.reshape((t, kvh * hd))?, v.reshape((t, kvh * hd))?))
            })
            .collect()
    }

    /// The losses of `batch` (inputs and targets `[batch, T]`) with the base scored at
    /// `positions` (`batch · m` entries, row by row, each in `1..T`). With `train`, the
    /// total carries the graph to the trained parameters; otherwise nothing is tracked.
    pub fn losses(&self, batch: &Batch, positions: &[u32], l1_weight: f64, train: bool) -> Result<Losses> {
        let s = &self.shape;
        let dev = &Device::Cpu;
        let (b, t) = batch.inputs.dims2()?;
        if b == 0 || positions.is_empty() || !positions.len().is_multiple_of(b) {
            candle_core::bail!("{} scored positions for {b} sequences", positions.len());
        }
        if let Some(&p) = positions.iter().find(|&&p| p == 0 || p as usize >= t) {
            candle_core::bail!("scored position {p} outside 1..{t}");
        }
        let m = positions.len() / b;
        let x = self.embed(&batch.inputs)?;

        // 1. The teacher: the base's own keys and values, and its cross-entropy at the
        //    scored positions.
        let teacher = self.causal_run(&x, &self.base, true)?;
        let rows: Vec<u32> = positions.iter().enumerate().map(|(i, &p)| (i / m * t) as u32 + p).collect();
        let rows = Tensor::from_vec(rows, b * m, dev)?;
        let targets_at = batch.targets.flatten_all()?.index_select(&rows, 0)?.reshape((b, m))?;
        let gather = |h: &Tensor| -> Result<Tensor> {
            h.reshape((b * t, s.dim))?.index_select(&rows, 0)?.reshape((b, m, s.dim))
        };
        let ce_true = scalar(&cross_entropy(&self.logits(&gather(&teacher.hidden)?)?, &targets_at)?)?;

        // 2. The aux model over all positions.
        let aux: Vec<BlockTensors> = (0..self.aux_blocks()).map(|a| self.aux_block(a, !train)).collect();
        let aux_run = self.causal_run(&x, &aux, false)?;
        let ce_aux = cross_entropy(&self.logits(&aux_run.hidden)?, &batch.targets)?;

        // 3–4. The predicted cache and its L1 distance to the teacher's.
        let (mut predicted_k, mut predicted_v) = (Vec::new(), Vec::new());
        let mut l1_terms = Vec::new();
        let (mut l1_k, mut l1_v) = (Vec::new(), Vec::new());
        for l in 0..s.layers {
            let [wk, bk, wv, bv] = self.predictor(l, !train);
            let a = self.layer_map[l];
            let k = matmul_rows(&aux_run.keys[a], &wk)?.broadcast_add(&bk)?;
            let v = matmul_rows(&aux_run.values[a], &wv)?.broadcast_add(&bv)?;
            let dk = (&k - &teacher.keys[l].detach())?.abs()?.mean_all()?;
            let dv = (&v - &teacher.values[l].detach())?.abs()?.mean_all()?;
            l1_k.push(scalar(&dk)?);
            l1_v.push(scalar(&dv)?);
            l1_terms.push(dk);
            l1_terms.push(dv);
            predicted_k.push(k);
            predicted_v.push(v);
        }
        let l1 = Tensor::stack(&l1_terms, 0)?.sum_all()?;

        // 5. The base at the scored positions, each attending to the predicted rows before
        //    it and to its own key and value.
        let positions_t = Tensor::from_vec(positions.to_vec(), b * m, dev)?;
        let pairs = s.head_dim() / 2;
        let q_cos = self.cos.index_select(&positions_t, 0)?.reshape((b, 1, m, pairs))?;
        let q_sin = self.sin.index_select(&positions_t, 0)?.reshape((b, 1, m, pairs))?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let mask = prefix_mask(positions, b, t)?;
        let mut h = gather(&x)?;
        for (l, w) in self.base.iter().enumerate() {
            let cache = PredictedCache { keys: &predicted_k[l], values: &predicted_v[l], cos: &cos, sin: &sin };
            h = predicted_block(s, &h, w, &q_cos, &q_sin, &cache, &mask)?;
        }
        let ce_base = cross_entropy(&self.logits(&h)?, &targets_at)?;

        let total = ((&ce_base + &ce_aux)? + (&l1 * l1_weight)?)?;
        Ok(Losses {
            total,
            ce_base: scalar(&ce_base)?,
            ce_aux: scalar(&ce_aux)?,
            l1: scalar(&l1)?,
            l1_k,
            l1_v,
            ce_true,
        })
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

/// One block over `x` (`[batch, T, dim]`, positions `0..T`, causal), with RoPE tables
/// `cos`/`sin` `[T, head_dim / 2]`: the new residual, and the block's keys before RoPE and
/// values, `[batch, T, kv_dim]` each.
fn causal_block(
    s: &ModelShape,
    x: &Tensor,
    w: &BlockTensors,
    frozen: bool,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, _) = x.dims3()?;
    let (hd, h, kvh) = (s.head_dim(), s.heads, s.kv_heads);
    let linear = |a: &Tensor, weight: &Tensor| if frozen { frozen_rows(a, weight) } else { matmul_rows(a, weight) };
    let a = rms_norm(x, &w[ATTN_NORM], s.norm_eps)?;
    let keys = linear(&a, &w[K])?;
    let values = linear(&a, &w[V])?;
    let q = rope(&linear(&a, &w[Q])?.reshape((b, t, h, hd))?.transpose(1, 2)?, cos, sin)?;
    let k = rope(&keys.reshape((b, t, kvh, hd))?.transpose(1, 2)?, cos, sin)?;
    let k = repeat_kv(&k, h / kvh)?;
    let v = repeat_kv(&values.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?, h / kvh)?;
    let probs = causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f32).sqrt())?;
    let attended = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, s.dim))?;
    let x = (x + linear(&attended, &w[O])?)?;
    Ok((mlp(s, &x, w, frozen)?, keys, values))
}

/// The MLP half of a block with its residual: `x + down(silu(gate(n)) · up(n))`,
/// `n = ffn_norm(x)`.
fn mlp(s: &ModelShape, x: &Tensor, w: &BlockTensors, frozen: bool) -> Result<Tensor> {
    let linear = |a: &Tensor, weight: &Tensor| if frozen { frozen_rows(a, weight) } else { matmul_rows(a, weight) };
    let n = rms_norm(x, &w[FFN_NORM], s.norm_eps)?;
    let hidden = (linear(&n, &w[GATE])?.silu()? * linear(&n, &w[UP])?)?;
    x + linear(&hidden, &w[DOWN])?
}

/// One base layer's predicted cache: keys before RoPE and values, `[batch, T, kv_dim]`,
/// and the RoPE tables of positions `0..T` (`[T, head_dim / 2]`).
struct PredictedCache<'a> {
    keys: &'a Tensor,
    values: &'a Tensor,
    cos: &'a Tensor,
    sin: &'a Tensor,
}

/// A frozen base block for `m` tokens per sequence (`x`: `[batch, m, dim]`) at their
/// positions (RoPE tables `q_cos`/`q_sin`: `[batch, 1, m, head_dim / 2]`), each attending
/// to the predicted rows its `mask` row allows and to its own key and value.
fn predicted_block(
    s: &ModelShape,
    x: &Tensor,
    w: &BlockTensors,
    q_cos: &Tensor,
    q_sin: &Tensor,
    cache: &PredictedCache,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, m, _) = x.dims3()?;
    let t = cache.keys.dim(1)?;
    let (hd, h, kvh) = (s.head_dim(), s.heads, s.kv_heads);
    let heads = |a: &Tensor, n: usize, count: usize| a.reshape((b, n, count, hd))?.transpose(1, 2);
    let a = rms_norm(x, &w[ATTN_NORM], s.norm_eps)?;
    let q = rope(&heads(&frozen_rows(&a, &w[Q])?, m, h)?, q_cos, q_sin)?;
    let k_own = repeat_kv(&rope(&heads(&frozen_rows(&a, &w[K])?, m, kvh)?, q_cos, q_sin)?, h / kvh)?;
    let v_own = repeat_kv(&heads(&frozen_rows(&a, &w[V])?, m, kvh)?.contiguous()?, h / kvh)?;
    let k_pred = repeat_kv(&rope(&heads(cache.keys, t, kvh)?, cache.cos, cache.sin)?, h / kvh)?;
    let v_pred = repeat_kv(&heads(cache.values, t, kvh)?.contiguous()?, h / kvh)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let attended = predicted_attention(&q, &k_own, &v_own, &k_pred, &v_pred, mask, scale)?;
    let attended = attended.transpose(1, 2)?.reshape((b, m, s.dim))?;
    let x = (x + frozen_rows(&attended, &w[O])?)?;
    mlp(s, &x, w, true)
}

/// Attention of `m` queries per sequence over a predicted cache plus each query's own key:
/// query `i` (`q`: `[batch, heads, m, hd]`, RoPE applied) sees the predicted keys
/// `k_pred` (`[batch, heads, T, hd]`, RoPE applied, KV heads repeated) that its row of
/// `mask` (`[batch, 1, m, T]`, 0 = visible, a large negative number = hidden) allows, and
/// its own key `k_own` (`[batch, heads, m, hd]`); values likewise. Scores are `scale · q·k`;
/// the softmax is written out (detached row maximum, exp, normalization) so that it is
/// differentiable. Returns `[batch, heads, m, hd]`.
pub fn predicted_attention(
    q: &Tensor,
    k_own: &Tensor,
    v_own: &Tensor,
    k_pred: &Tensor,
    v_pred: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let t = k_pred.dim(2)?;
    let prefix = (q.contiguous()?.matmul(&k_pred.t()?)? * scale)?.broadcast_add(mask)?;
    let own = ((q * k_own)?.sum_keepdim(D::Minus1)? * scale)?;
    let scores = Tensor::cat(&[&prefix, &own], D::Minus1)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let from_cache = probs.narrow(3, 0, t)?.contiguous()?.matmul(&v_pred.contiguous()?)?;
    from_cache + probs.narrow(3, t, 1)?.broadcast_mul(v_own)?
}

/// The additive mask `[batch, 1, m, T]` of queries at `positions` (`batch · m`, row by
/// row): query at position `p` sees cache rows `0..p`.
pub fn prefix_mask(positions: &[u32], batch: usize, t: usize) -> Result<Tensor> {
    let m = positions.len() / batch.max(1);
    let mut mask = vec![0f32; positions.len() * t];
    for (row, &p) in mask.chunks_exact_mut(t).zip(positions) {
        row[(p as usize).min(t)..].fill(MASKED);
    }
    Tensor::from_vec(mask, (batch, 1, m, t), &Device::Cpu)
}

/// `a · weightᵀ` (activations `[batch, n, in]`, a frozen weight `[out, in]`) whose backward
/// pass returns the activations' gradient only. Untracked inputs take candle's matmul.
pub fn frozen_rows(a: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !a.track_op() {
        return matmul_rows(a, weight);
    }
    let (b, n, d) = a.dims3()?;
    let out = a.reshape((b * n, d))?.contiguous()?.apply_op1(FrozenLinear { weight: weight.detach() })?;
    out.reshape((b, n, weight.dim(0)?))
}

/// `x · Wᵀ` for `x` `[rows, in]` and a constant `W` `[out, in]`.
struct FrozenLinear {
    weight: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (out, inputs) = self.weight.dims2()?;
        let rows = match layout.shape().dims() {
            [rows, cols] if *cols == inputs => *rows,
            dims => candle_core::bail!("frozen-linear: input {dims:?} for a weight [{out}, {inputs}]"),
        };
        let y = Tensor::from_slice(x, (rows, inputs), &Device::Cpu)?.matmul(&self.weight.t()?)?;
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}
