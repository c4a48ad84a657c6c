//! The decoder the trainer optimizes, written with candle operations that all have a
//! backward pass: candle's fused RmsNorm, softmax and rotary kernels have none, so norms
//! and RoPE are spelled out here, and the causal softmax and the cross-entropy are our own
//! fused operations with backward passes ([`super::fused`]). A test checks that every
//! parameter gets a gradient.
//!
//! The computation is the runtime's (`petrel_runtime::forward`): pre-norm blocks,
//! interleaved-pair RoPE on the first `head_dim` values of each head, grouped-query
//! attention, SwiGLU, tied embedding and head. Parameters are named and laid out as in the
//! GGUF files the runtime reads (`blk.N.attn_q.weight`, rows = outputs), so export is a copy.
//!
//! Mixture-of-depths (Raposo et al., 2024), as `petrel_runtime::routing` defines it: in a
//! routed block a scalar router `r = w · x + b` scores each token's input residual `x`;
//! the top `⌈capacity · T⌉` tokens of each sequence (chosen by the runtime's own
//! [`select_top_k`], in position order) go through attention — among themselves, causal
//! in position order, RoPE at their original positions — and the MLP, and their residual
//! becomes `x + σ(r) · (block(x) − x)`; the others pass unchanged. The top-k is not
//! causal, so each routed block also learns causal stand-ins (the router logit's sign
//! and/or a small predictor MLP's), trained with binary cross-entropy against top-k
//! membership on the gradient-stopped residual.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use petrel_quant::rng::SplitMix64;
use petrel_runtime::routing::{routed_count, select_top_k, Decision};

use super::config::{ModCausal, ModelShape};
use super::fake_quant::initial_clip;
use super::fused::{self, causal_softmax, fake_quantize};

/// Standard deviation of the initial weights (GPT-2's); output projections are further
/// scaled by `1/√(2·layers)`.
const INIT_STD: f64 = 0.02;

/// Narrowest learned clip range (the width `initial_clip` guarantees at the start).
pub const MIN_CLIP_WIDTH: f32 = 2e-3;

/// The four linear inputs of a block, each with its own learned clip pair.
pub const CLIP_SITES: [&str; 4] = ["attn_in", "attn_out", "mlp_in", "down_in"];

/// One trainable tensor: its GGUF name, value and whether weight decay applies.
pub struct Parameter {
    /// GGUF tensor name, or `blk.N.clip.SITE` for a clip pair (not exported).
    pub name: String,
    /// The value; shapes are candle's (outermost first): `[rows, cols]` for matrices.
    pub var: Var,
    /// Decoupled weight decay applies (matrices only).
    pub decay: bool,
}

/// All parameters of the decoder, in a fixed order (the checkpoint's and the optimizer's).
pub struct Decoder {
    /// The model's shape.
    pub shape: ModelShape,
    /// Parameters: embedding, then per block the nine GGUF tensors and four clip pairs,
    /// then the final norm, then per routed block (increasing) `blk.N.mod_router.weight`
    /// `[dim]`, `blk.N.mod_router.bias` `[1]` and, with a predictor,
    /// `blk.N.mod_pred_in.weight` `[hidden, dim]`, `blk.N.mod_pred_in.bias` `[hidden]`,
    /// `blk.N.mod_pred_out.weight` `[hidden]`, `blk.N.mod_pred_out.bias` `[1]`.
    pub params: Vec<Parameter>,
    rope_cos: Tensor,
    rope_sin: Tensor,
}

/// What a forward pass computes besides the logits.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOptions {
    /// Fake-quantize every linear input to 4 bits with the learned clips.
    pub fake_quant: bool,
    /// Without `fake_quant`: clamp every linear input to its learned clips (what the
    /// runtime does with an exported QAT model before its own activation quantization).
    pub clamp: bool,
    /// Return the mean kurtosis of the linear layers' outputs.
    pub kurtosis: bool,
    /// Which causal decision mechanisms' losses a routed model computes (ignored when
    /// dense; the agreements are measured either way).
    pub mod_causal: ModCausal,
    /// Route each token by this causal decision (logit > 0) instead of top-k, as the
    /// runtime does when decoding (evaluation only: the count per sequence varies).
    pub causal_routing: Option<Decision>,
}

/// A forward pass's results.
pub struct ForwardOutput {
    /// Logits, `[batch, tokens, vocab]`.
    pub logits: Tensor,
    /// Mean over linear outputs and tokens of the per-token kurtosis across channels
    /// (a scalar), when asked for.
    pub kurtosis: Option<Tensor>,
    /// The routed blocks' auxiliary loss and decision agreements (routed models only).
    pub routing: Option<RoutingOutput>,
}

/// What the routed blocks of a forward pass report.
pub struct RoutingOutput {
    /// The causal mechanisms' loss (a scalar, nats): the mean over routed blocks of the sum
    /// of the trained mechanisms' (per [`ForwardOptions::mod_causal`]) mean-over-tokens
    /// binary cross-entropy with logits against top-k membership (1 routed, 0 skipped).
    pub aux_loss: Tensor,
    /// One entry per routed block, in increasing block order.
    pub layers: Vec<LayerRouting>,
    /// Per routed block (same order), the tokens it processed, as flat indices
    /// `row · T + position`, increasing.
    pub routed_tokens: Vec<Vec<u32>>,
}

/// How well one routed block's causal decisions agree with its top-k choice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerRouting {
    /// The block's index.
    pub layer: usize,
    /// Fraction (0..=1) of the batch's tokens with `(router logit > 0) == routed`.
    pub router_agreement: f64,
    /// Fraction (0..=1) of tokens with `(predictor logit > 0) == routed`, when the block
    /// has a predictor.
    pub predictor_agreement: Option<f64>,
}

/// Indices into `params` of one block's tensors.
struct BlockIndex;

impl BlockIndex {
    const ATTN_NORM: usize = 0;
    const Q: usize = 1;
    const K: usize = 2;
    const V: usize = 3;
    const O: usize = 4;
    const FFN_NORM: usize = 5;
    const GATE: usize = 6;
    const UP: usize = 7;
    const DOWN: usize = 8;
    const CLIPS: usize = 9;
    const LEN: usize = 13;
}

/// Offsets of one routed block's tensors within its group (after the final norm).
struct RoutingIndex;

impl RoutingIndex {
    const ROUTER_WEIGHT: usize = 0;
    const ROUTER_BIAS: usize = 1;
    const PRED_IN_WEIGHT: usize = 2;
    const PRED_IN_BIAS: usize = 3;
    const PRED_OUT_WEIGHT: usize = 4;
    const PRED_OUT_BIAS: usize = 5;
}

impl Decoder {
    /// A freshly initialized decoder: normal(0, 0.02) matrices (output projections
    /// scaled down), unit norm gains, clips ±4 until [`Decoder::calibrate_clips`]; routers
    /// normal(0, 0.02) with bias 0, predictors normal with std `1/√fan_in` and zero biases.
    /// Deterministic in `seed`, independent of candle's RNG (a dense shape's parameters
    /// do not depend on whether routing code exists: routing draws come last).
    pub fn new(shape: ModelShape, seed: u64) -> Result<Self> {
        let dev = Device::Cpu;
        let mut rng = SplitMix64(seed ^ 0x5EED_F7E7_u64);
        let mut normal = |rows: usize, cols: usize, std: f64| -> Result<Var> {
            let mut v = Vec::with_capacity(rows * cols);
            while v.len() < rows * cols {
                // Box–Muller: two independent normals from two uniforms in (0, 1].
                let u1 = 1.0 - rng.uniform();
                let u2 = rng.uniform();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let t = 2.0 * core::f64::consts::PI * u2;
                v.push((r * t.cos()) as f32);
                v.push((r * t.sin()) as f32);
            }
            v.truncate(rows * cols);
            Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev)?)
        };
        let ones = |n: usize| Var::from_tensor(&Tensor::ones(n, DType::F32, &dev)?);
        let (d, kv, f) = (shape.dim, shape.kv_dim(), shape.ffn_dim);
        let out_std = INIT_STD / (2.0 * shape.layers as f64).sqrt();
        let mut params =
            vec![Parameter { name: "token_embd.weight".into(), var: normal(shape.vocab, d, INIT_STD)?, decay: true }];
        for l in 0..shape.layers {
            let p = |name: &str, var: Var, decay: bool| Parameter { name: format!("blk.{l}.{name}"), var, decay };
            params.push(p("attn_norm.weight", ones(d)?, false));
            params.push(p("attn_q.weight", normal(d, d, INIT_STD)?, true));
            params.push(p("attn_k.weight", normal(kv, d, INIT_STD)?, true));
            params.push(p("attn_v.weight", normal(kv, d, INIT_STD)?, true));
            params.push(p("attn_output.weight", normal(d, d, out_std)?, true));
            params.push(p("ffn_norm.weight", ones(d)?, false));
            params.push(p("ffn_gate.weight", normal(f, d, INIT_STD)?, true));
            params.push(p("ffn_up.weight", normal(f, d, INIT_STD)?, true));
            params.push(p("ffn_down.weight", normal(d, f, out_std)?, true));
            for site in CLIP_SITES {
                let clip = Var::from_tensor(&Tensor::new(&[-4.0f32, 4.0], &dev)?)?;
                params.push(p(&format!("clip.{site}"), clip, false));
            }
        }
        params.push(Parameter { name: "output_norm.weight".into(), var: ones(d)?, decay: false });
        if let Some(r) = &shape.routing {
            let zeros = |n: usize| Var::from_tensor(&Tensor::zeros(n, DType::F32, &dev)?);
            let hidden = r.predictor_hidden;
            for &l in &r.layers {
                let p = |name: &str, var: Var| Parameter { name: format!("blk.{l}.{name}"), var, decay: false };
                let router = normal(1, d, INIT_STD)?.as_tensor().reshape(d)?;
                params.push(p("mod_router.weight", Var::from_tensor(&router)?));
                params.push(p("mod_router.bias", zeros(1)?));
                if hidden > 0 {
                    params.push(p("mod_pred_in.weight", normal(hidden, d, 1.0 / (d as f64).sqrt())?));
                    params.push(p("mod_pred_in.bias", zeros(hidden)?));
                    let out = normal(1, hidden, 1.0 / (hidden as f64).sqrt())?.as_tensor().reshape(hidden)?;
                    params.push(p("mod_pred_out.weight", Var::from_tensor(&out)?));
                    params.push(p("mod_pred_out.bias", zeros(1)?));
                }
            }
        }
        Self::from_params(shape, params)
    }

    /// A decoder over existing parameters (in [`Decoder::new`]'s order and shapes).
    pub fn from_params(shape: ModelShape, params: Vec<Parameter>) -> Result<Self> {
        let routing = shape.routing.as_ref().map_or(0, |r| r.layers.len() * r.tensors_per_layer());
        let expected = 1 + shape.layers * BlockIndex::LEN + 1 + routing;
        if params.len() != expected {
            candle_core::bail!("{} parameters, expected {expected}", params.len());
        }
        let (cos, sin) = rope_tables(&shape)?;
        Ok(Decoder { rope_cos: cos, rope_sin: sin, shape, params })
    }

    fn block(&self, layer: usize, which: usize) -> &Tensor {
        self.params[1 + layer * BlockIndex::LEN + which].var.as_tensor()
    }

    fn embedding(&self) -> &Tensor {
        self.params[0].var.as_tensor()
    }

    fn output_norm(&self) -> &Tensor {
        self.params[1 + self.shape.layers * BlockIndex::LEN].var.as_tensor()
    }

    /// Position of block `layer` among the routed blocks, if it is routed.
    fn routed_slot(&self, layer: usize) -> Option<usize> {
        self.shape.routing.as_ref()?.layers.iter().position(|&l| l == layer)
    }

    /// Tensor `which` ([`RoutingIndex`]) of the routed block in slot `slot`, if present.
    fn routing_param(&self, slot: usize, which: usize) -> Option<&Tensor> {
        let r = self.shape.routing.as_ref()?;
        if which >= r.tensors_per_layer() || slot >= r.layers.len() {
            return None;
        }
        let at = 2 + self.shape.layers * BlockIndex::LEN + slot * r.tensors_per_layer() + which;
        Some(self.params[at].var.as_tensor())
    }

    fn slot_of(&self, layer: usize) -> Result<usize> {
        match self.routed_slot(layer) {
            Some(slot) => Ok(slot),
            None => candle_core::bail!("block {layer} is not routed"),
        }
    }

    /// The router logits `w · x + b` of routed block `layer` for residuals `x` (`[n, dim]`,
    /// the block's input, not normalized): `[n]`.
    pub fn router_logits(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let slot = self.slot_of(layer)?;
        match (
            self.routing_param(slot, RoutingIndex::ROUTER_WEIGHT),
            self.routing_param(slot, RoutingIndex::ROUTER_BIAS),
        ) {
            (Some(w), Some(b)) => x.matmul(&w.unsqueeze(1)?)?.squeeze(1)?.broadcast_add(b),
            _ => candle_core::bail!("block {layer} has no router"),
        }
    }

    /// The predictor logits of routed block `layer` for residuals `x` (`[n, dim]`):
    /// `w_out · silu(W_in · x̂ + b_in) + b_out` with `x̂ = x / √(mean(x²) + norm_eps)` (no
    /// gain), as the runtime's `Router::predictor_logit`: `[n]`, or `None` without a
    /// predictor.
    pub fn predictor_logits(&self, layer: usize, x: &Tensor) -> Result<Option<Tensor>> {
        let slot = self.slot_of(layer)?;
        let param = |which| self.routing_param(slot, which);
        let (Some(w_in), Some(b_in), Some(w_out), Some(b_out)) = (
            param(RoutingIndex::PRED_IN_WEIGHT),
            param(RoutingIndex::PRED_IN_BIAS),
            param(RoutingIndex::PRED_OUT_WEIGHT),
            param(RoutingIndex::PRED_OUT_BIAS),
        ) else {
            return Ok(None);
        };
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.shape.norm_eps as f64)?.sqrt()?.recip()?;
        let hidden = x.broadcast_mul(&inv_rms)?.matmul(&w_in.t()?)?.broadcast_add(b_in)?.silu()?;
        Ok(Some(hidden.matmul(&w_out.unsqueeze(1)?)?.squeeze(1)?.broadcast_add(b_out)?))
    }

    /// Sets every clip pair to `ratio` times the range its activation takes on `tokens`
    /// (`[batch, T]` u32), layer by layer as the quantized forward pass would see it.
    /// Done once with ratio 1, before the first step of a QAT run.
    pub fn calibrate_clips(&self, tokens: &Tensor, ratio: f32) -> Result<()> {
        self.run(tokens, ForwardOptions { fake_quant: true, ..ForwardOptions::default() }, Some(ratio))?;
        Ok(())
    }

    /// Keeps every learned clip pair a valid quantization range after an optimizer step:
    /// at least [`MIN_CLIP_WIDTH`] wide, centred where the step left it. Gradient steps
    /// can move `lo` past `hi` when an activation collapses towards a constant; the
    /// quantizer needs `lo < hi`. Pairs that are wide enough are left untouched, bit for bit.
    pub fn project_clips(&self) -> Result<()> {
        for l in 0..self.shape.layers {
            for site in 0..4 {
                let clip = &self.params[1 + l * BlockIndex::LEN + BlockIndex::CLIPS + site].var;
                let pair = clip.as_tensor().to_vec1::<f32>()?;
                let (lo, hi) = (pair[0], pair[1]);
                if hi - lo < MIN_CLIP_WIDTH {
                    let mid = 0.5 * (lo + hi);
                    let half = 0.5 * MIN_CLIP_WIDTH;
                    clip.set(&Tensor::new(&[mid - half, mid + half], &Device::Cpu)?)?;
                }
            }
        }
        Ok(())
    }

    /// Runs the decoder on `tokens` (`[batch, T]` u32, `T ≤ context`).
    pub fn forward(&self, tokens: &Tensor, options: ForwardOptions) -> Result<ForwardOutput> {
        self.run(tokens, options, None)
    }

    /// The forward pass. With `calibrate = Some(ratio)`, each clip pair is first set to
    /// `ratio` times the range of the activation it quantizes.
    fn run(&self, tokens: &Tensor, options: ForwardOptions, calibrate: Option<f32>) -> Result<ForwardOutput> {
        let s = &self.shape;
        let (batch, t) = tokens.dims2()?;
        let cos = self.rope_cos.narrow(0, 0, t)?;
        let sin = self.rope_sin.narrow(0, 0, t)?;
        let mut kurtosis_terms: Vec<Tensor> = Vec::new();
        let mut aux_terms: Vec<Tensor> = Vec::new();
        let mut agreements: Vec<LayerRouting> = Vec::new();
        let mut routed_tokens: Vec<Vec<u32>> = Vec::new();
        let mut x = self.embedding().embedding(&tokens.flatten_all()?)?.reshape((batch, t, s.dim))?;
        for l in 0..s.layers {
            let step = BlockStep { layer: l, options, calibrate };
            x = match self.routed_slot(l) {
                None => self.block_forward(&step, &x, &cos, &sin, &mut kurtosis_terms)?,
                Some(_) => {
                    let routed = self.routed_block(&step, &x, &mut kurtosis_terms)?;
                    aux_terms.push(routed.aux_loss);
                    agreements.push(routed.agreement);
                    routed_tokens.push(routed.chosen);
                    routed.output
                }
            };
        }
        let x = rms_norm(&x, self.output_norm(), s.norm_eps)?;
        let logits = matmul_rows(&x, self.embedding())?;
        let kurtosis = if options.kurtosis && !kurtosis_terms.is_empty() {
            let n = kurtosis_terms.len() as f64;
            Some((Tensor::stack(&kurtosis_terms, 0)?.sum_all()? / n)?)
        } else {
            None
        };
        let routing = if aux_terms.is_empty() {
            None
        } else {
            let n = aux_terms.len() as f64;
            Some(RoutingOutput {
                aux_loss: (Tensor::stack(&aux_terms, 0)?.sum_all()? / n)?,
                layers: agreements,
                routed_tokens,
            })
        };
        Ok(ForwardOutput { logits, kurtosis, routing })
    }

    /// One block (attention and MLP, residuals added) on `x` (`[batch, n, dim]`), the
    /// tokens attending causally in their order, with RoPE tables `cos`/`sin` that
    /// broadcast against `[batch, heads, n, head_dim / 2]` (`[n, hd/2]` for positions
    /// `0..n`, `[batch, 1, n, hd/2]` for gathered positions).
    fn block_forward(
        &self,
        step: &BlockStep,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kurtosis_terms: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let s = &self.shape;
        let (l, options, calibrate) = (step.layer, step.options, step.calibrate);
        let (batch, t, _) = x.dims3()?;
        let (hd, h, kvh) = (s.head_dim(), s.heads, s.kv_heads);
        let w = |i: usize| self.block(l, i);
        let quantize_input = |a: &Tensor, site: usize| -> Result<Tensor> {
            let clip = &self.params[1 + l * BlockIndex::LEN + BlockIndex::CLIPS + site].var;
            if !options.fake_quant {
                if !options.clamp {
                    return Ok(a.clone());
                }
                let (lo, hi) = (clip.as_tensor().narrow(0, 0, 1)?, clip.as_tensor().narrow(0, 1, 1)?);
                return a.broadcast_maximum(&lo)?.broadcast_minimum(&hi);
            }
            if let Some(ratio) = calibrate {
                let [lo, hi] = initial_clip(a)?;
                clip.set(&Tensor::new(&[lo * ratio, hi * ratio], &Device::Cpu)?)?;
            }
            fake_quantize(a, clip.as_tensor())
        };
        let mut linear = |a: &Tensor, weight: &Tensor| -> Result<Tensor> {
            let out = matmul_rows(a, weight)?;
            if options.kurtosis {
                kurtosis_terms.push(mean_kurtosis(&out)?);
            }
            Ok(out)
        };

        let a = rms_norm(x, w(BlockIndex::ATTN_NORM), s.norm_eps)?;
        let a = quantize_input(&a, 0)?;
        let q = linear(&a, w(BlockIndex::Q))?.reshape((batch, t, h, hd))?.transpose(1, 2)?;
        let k = linear(&a, w(BlockIndex::K))?.reshape((batch, t, kvh, hd))?.transpose(1, 2)?;
        let v = linear(&a, w(BlockIndex::V))?.reshape((batch, t, kvh, hd))?.transpose(1, 2)?;
        let q = rope(&q, cos, sin)?;
        let k = repeat_kv(&rope(&k, cos, sin)?, h / kvh)?;
        let v = repeat_kv(&v.contiguous()?, h / kvh)?;
        let probs = causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f32).sqrt())?;
        let attended = probs.matmul(&v)?;
        let attended = attended.transpose(1, 2)?.reshape((batch, t, s.dim))?;
        let attended = quantize_input(&attended, 1)?;
        let x = (x + linear(&attended, w(BlockIndex::O))?)?;

        let m = rms_norm(&x, w(BlockIndex::FFN_NORM), s.norm_eps)?;
        let m = quantize_input(&m, 2)?;
        let gate = linear(&m, w(BlockIndex::GATE))?;
        let up = linear(&m, w(BlockIndex::UP))?;
        let hidden = quantize_input(&(gate.silu()? * up)?, 3)?;
        x + linear(&hidden, w(BlockIndex::DOWN))?
    }

    /// Runs block `layer` densely on `x` (`[batch, n, dim]`) whose tokens sit at
    /// `positions` (`[batch, n]` u32, increasing along each row, each below the context):
    /// they attend causally among themselves, with RoPE at those positions. What a routed
    /// block does with its chosen tokens (exposed for reference computations).
    pub fn block_at_positions(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Tensor,
        options: ForwardOptions,
    ) -> Result<Tensor> {
        let (batch, n) = positions.dims2()?;
        let (cos, sin) = self.rope_at(&positions.flatten_all()?, batch, n)?;
        let step = BlockStep { layer, options, calibrate: None };
        let mut kurtosis_terms = Vec::new();
        self.block_forward(&step, x, &cos, &sin, &mut kurtosis_terms)
    }

    /// RoPE tables at `positions` (`[batch · n]` u32): `[batch, 1, n, head_dim / 2]` each.
    fn rope_at(&self, positions: &Tensor, batch: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let pairs = self.shape.head_dim() / 2;
        let cos = self.rope_cos.index_select(positions, 0)?.reshape((batch, 1, n, pairs))?;
        let sin = self.rope_sin.index_select(positions, 0)?.reshape((batch, 1, n, pairs))?;
        Ok((cos, sin))
    }

    /// A routed block on `x` (`[batch, T, dim]`): top-k by router score per sequence,
    /// the block on those tokens only, the gated update scattered back, and the causal
    /// mechanisms' losses and agreements.
    fn routed_block(&self, step: &BlockStep, x: &Tensor, kurtosis_terms: &mut Vec<Tensor>) -> Result<RoutedBlock> {
        let Some(routing) = &self.shape.routing else {
            candle_core::bail!("routed_block on a dense model");
        };
        let (l, causal) = (step.layer, step.options.mod_causal);
        let (batch, t, d) = x.dims3()?;
        let flat = x.reshape((batch * t, d))?;
        let logits = self.router_logits(l, &flat)?;
        // The choice itself has no gradient: it is made on copies of the logits.
        let scores: Vec<f32> = logits.to_vec1()?;
        let mut member = vec![0f32; batch * t];
        let mut chosen: Vec<u32> = Vec::new();
        match step.options.causal_routing {
            None => {
                let k = routed_count(routing.capacity, t);
                let mut order = vec![0u32; t];
                for (row, row_scores) in scores.chunks_exact(t).enumerate() {
                    for &i in select_top_k(row_scores, k, &mut order) {
                        chosen.push((row * t) as u32 + i);
                    }
                }
            }
            Some(decision) => {
                let decisions: Vec<f32> = match decision {
                    Decision::Router => scores.clone(),
                    Decision::Predictor => match self.predictor_logits(l, &flat)? {
                        Some(p) => p.to_vec1()?,
                        None => candle_core::bail!("block {l} has no predictor"),
                    },
                };
                chosen.extend((0..batch * t).filter(|&i| decisions[i] > 0.0).map(|i| i as u32));
            }
        }
        for &i in &chosen {
            member[i as usize] = 1.0;
        }
        let dev = x.device();
        let gated_update = |ids: &[u32], rows: usize, n: usize, kurtosis_terms: &mut Vec<Tensor>| -> Result<Tensor> {
            let positions: Vec<u32> = ids.iter().map(|&i| i % t as u32).collect();
            let (cos, sin) = self.rope_at(&Tensor::from_vec(positions, rows * n, dev)?, rows, n)?;
            let ids = Tensor::from_vec(ids.to_vec(), rows * n, dev)?;
            let selected = flat.index_select(&ids, 0)?;
            let out = self.block_forward(step, &selected.reshape((rows, n, d))?, &cos, &sin, kurtosis_terms)?;
            let gate = sigmoid(&logits.index_select(&ids, 0)?)?.unsqueeze(1)?;
            (out.reshape((rows * n, d))? - &selected)?.broadcast_mul(&gate)
        };
        let update = match step.options.causal_routing {
            // Top-k: every row routes k tokens, so the rows form one batch.
            None => Some(gated_update(&chosen, batch, chosen.len() / batch, kurtosis_terms)?),
            // Causal decisions: counts differ per row; each row's tokens form a sequence.
            Some(_) => {
                let mut updates = Vec::new();
                for row in 0..batch {
                    let ids: Vec<u32> = chosen.iter().copied().filter(|&i| i as usize / t == row).collect();
                    if !ids.is_empty() {
                        updates.push(gated_update(&ids, 1, ids.len(), kurtosis_terms)?);
                    }
                }
                if updates.is_empty() {
                    None
                } else {
                    Some(Tensor::cat(&updates, 0)?)
                }
            }
        };
        let output = match update {
            Some(update) => flat
                .index_add(&Tensor::from_vec(chosen.clone(), chosen.len(), dev)?, &update, 0)?
                .reshape((batch, t, d))?,
            None => x.clone(),
        };

        // The causal mechanisms see the residual with its gradient stopped.
        let agree = |logits: &[f32]| -> f64 {
            let hits = logits.iter().zip(&member).filter(|&(&z, &m)| (z > 0.0) == (m > 0.5)).count();
            hits as f64 / member.len().max(1) as f64
        };
        let router_agreement = agree(&scores);
        let membership = Tensor::from_vec(member.clone(), batch * t, dev)?;
        let detached = flat.detach();
        let mut aux_loss = Tensor::zeros((), DType::F32, dev)?;
        if causal.trains_router() {
            aux_loss = (aux_loss + bce_with_logits(&self.router_logits(l, &detached)?, &membership)?)?;
        }
        let predictor_agreement = match self.predictor_logits(l, &detached)? {
            Some(p) => {
                let agreement = agree(&p.to_vec1::<f32>()?);
                if causal.trains_predictor() {
                    aux_loss = (aux_loss + bce_with_logits(&p, &membership)?)?;
                }
                Some(agreement)
            }
            None => None,
        };
        Ok(RoutedBlock {
            output,
            chosen,
            aux_loss,
            agreement: LayerRouting { layer: l, router_agreement, predictor_agreement },
        })
    }
}

/// What a block computes besides its input: its index and the pass's options.
struct BlockStep {
    layer: usize,
    options: ForwardOptions,
    /// Set each clip pair to this ratio of its activation's range first.
    calibrate: Option<f32>,
}

/// A routed block's results.
struct RoutedBlock {
    /// The new residual, `[batch, T, dim]`.
    output: Tensor,
    /// The tokens the block processed (flat indices `row · T + position`, increasing).
    chosen: Vec<u32>,
    /// The block's causal-mechanism loss (a scalar).
    aux_loss: Tensor,
    agreement: LayerRouting,
}

/// `σ(z) = 1 / (1 + e^{−z})`, composed so that it has a backward pass.
fn sigmoid(z: &Tensor) -> Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

/// Mean binary cross-entropy (nats) of logits `z` against targets `y` in {0, 1} (same
/// shape): `mean(max(z, 0) − z·y + ln(1 + e^{−|z|}))`, stable for any `z`.
fn bce_with_logits(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    (softplus - (z * y)?)?.mean_all()
}

/// `a · weightᵀ` for activations `[batch, T, in]` and a weight `[out, in]`, as one 2-D
/// matmul over all tokens (a batched matmul would first broadcast the weight).
pub(crate) fn matmul_rows(a: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, t, d) = a.dims3()?;
    a.reshape((b * t, d))?.matmul(&weight.t()?)?.reshape((b, t, weight.dim(0)?))
}

/// `x / √(mean(x²) + ε) · gain` over the last dimension.
pub(crate) fn rms_norm(x: &Tensor, gain: &Tensor, eps: f32) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (mean_square + eps as f64)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(gain)
}

/// Cos and sin of RoPE's angles, `[context, head_dim / 2]`, computed exactly as the
/// runtime's `rope_table` (f64 `libm`, then rounded to f32).
pub(crate) fn rope_tables(shape: &ModelShape) -> Result<(Tensor, Tensor)> {
    let pairs = shape.head_dim() / 2;
    let mut table = vec![0f32; 2 * pairs];
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for position in 0..shape.context {
        petrel_runtime::ops::rope_table(&mut table, position, shape.head_dim(), shape.rope_base);
        for pair in table.chunks_exact(2) {
            cos.push(pair[0]);
            sin.push(pair[1]);
        }
    }
    let dev = Device::Cpu;
    Ok((Tensor::from_vec(cos, (shape.context, pairs), &dev)?, Tensor::from_vec(sin, (shape.context, pairs), &dev)?))
}

/// Rotates adjacent pairs `(x[2i], x[2i+1])` of each head of `x` (`[batch, heads, T, hd]`)
/// by the angles of `cos`/`sin` (`[T, hd/2]`, or `[batch, 1, T, hd/2]` for per-sequence
/// positions; any shape that broadcasts to `[batch, heads, T, hd/2]`).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let pairs = x.contiguous()?.reshape((b, h, t, hd / 2, 2))?;
    let a = pairs.narrow(4, 0, 1)?.squeeze(4)?;
    let c = pairs.narrow(4, 1, 1)?.squeeze(4)?;
    let first = (a.broadcast_mul(cos)? - c.broadcast_mul(sin)?)?;
    let second = (a.broadcast_mul(sin)? + c.broadcast_mul(cos)?)?;
    Tensor::stack(&[first, second], 4)?.reshape((b, h, t, hd))
}

/// Repeats each key/value head `times` times along the head axis (grouped-query attention:
/// query head `i` reads KV head `i / times`).
pub(crate) fn repeat_kv(x: &Tensor, times: usize) -> Result<Tensor> {
    if times == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, hd) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kvh, times, t, hd))?.reshape((b, kvh * times, t, hd))
}

/// Mean over all tokens of the kurtosis across the last dimension,
/// `E[(x−μ)⁴] / E[(x−μ)²]²` (3 for a Gaussian; large when a few channels dominate).
pub fn mean_kurtosis(x: &Tensor) -> Result<Tensor> {
    fused::mean_kurtosis(x)
}

/// Mean cross-entropy (natural log) of `logits` (`[batch, T, vocab]`) against `targets`
/// (`[batch, T]` u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    fused::cross_entropy(&logits.reshape(((), vocab))?, &targets.flatten_all()?)
}
