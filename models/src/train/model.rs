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

use candle_core::{DType, Device, Result, Tensor, Var, D};
use petrel_quant::rng::SplitMix64;

use super::config::ModelShape;
use super::fake_quant::initial_clip;
use super::fused::{self, causal_softmax, fake_quantize};

/// Standard deviation of the initial weights (GPT-2's); output projections are further
/// scaled by `1/√(2·layers)`.
const INIT_STD: f64 = 0.02;

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
    /// then the final norm.
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
}

/// A forward pass's results.
pub struct ForwardOutput {
    /// Logits, `[batch, tokens, vocab]`.
    pub logits: Tensor,
    /// Mean over linear outputs and tokens of the per-token kurtosis across channels
    /// (a scalar), when asked for.
    pub kurtosis: Option<Tensor>,
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

impl Decoder {
    /// A freshly initialized decoder: normal(0, 0.02) matrices (output projections
    /// scaled down), unit norm gains, clips ±4 until [`Decoder::calibrate_clips`].
    /// Deterministic in `seed`, independent of candle's RNG.
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
        Self::from_params(shape, params)
    }

    /// A decoder over existing parameters (in [`Decoder::new`]'s order and shapes).
    pub fn from_params(shape: ModelShape, params: Vec<Parameter>) -> Result<Self> {
        let expected = 1 + shape.layers * BlockIndex::LEN + 1;
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
        self.params[self.params.len() - 1].var.as_tensor()
    }

    /// Sets every clip pair to `ratio` times the range its activation takes on `tokens`
    /// (`[batch, T]` u32), layer by layer as the quantized forward pass would see it.
    /// Done once with ratio 1, before the first step of a QAT run.
    pub fn calibrate_clips(&self, tokens: &Tensor, ratio: f32) -> Result<()> {
        self.run(tokens, ForwardOptions { fake_quant: true, ..ForwardOptions::default() }, Some(ratio))?;
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
        let (hd, h, kvh) = (s.head_dim(), s.heads, s.kv_heads);
        let cos = self.rope_cos.narrow(0, 0, t)?;
        let sin = self.rope_sin.narrow(0, 0, t)?;
        let mut kurtosis_terms: Vec<Tensor> = Vec::new();
        let mut x = self.embedding().embedding(&tokens.flatten_all()?)?.reshape((batch, t, s.dim))?;
        for l in 0..s.layers {
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

            let a = rms_norm(&x, w(BlockIndex::ATTN_NORM), s.norm_eps)?;
            let a = quantize_input(&a, 0)?;
            let q = linear(&a, w(BlockIndex::Q))?.reshape((batch, t, h, hd))?.transpose(1, 2)?;
            let k = linear(&a, w(BlockIndex::K))?.reshape((batch, t, kvh, hd))?.transpose(1, 2)?;
            let v = linear(&a, w(BlockIndex::V))?.reshape((batch, t, kvh, hd))?.transpose(1, 2)?;
            let q = rope(&q, &cos, &sin)?;
            let k = repeat_kv(&rope(&k, &cos, &sin)?, h / kvh)?;
            let v = repeat_kv(&v.contiguous()?, h / kvh)?;
            let probs = causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f32).sqrt())?;
            let attended = probs.matmul(&v)?;
            let attended = attended.transpose(1, 2)?.reshape((batch, t, s.dim))?;
            let attended = quantize_input(&attended, 1)?;
            x = (x + linear(&attended, w(BlockIndex::O))?)?;

            let m = rms_norm(&x, w(BlockIndex::FFN_NORM), s.norm_eps)?;
            let m = quantize_input(&m, 2)?;
            let gate = linear(&m, w(BlockIndex::GATE))?;
            let up = linear(&m, w(BlockIndex::UP))?;
            let hidden = quantize_input(&(gate.silu()? * up)?, 3)?;
            x = (x + linear(&hidden, w(BlockIndex::DOWN))?)?;
        }
        let x = rms_norm(&x, self.output_norm(), s.norm_eps)?;
        let logits = matmul_rows(&x, self.embedding())?;
        let kurtosis = if options.kurtosis && !kurtosis_terms.is_empty() {
            let n = kurtosis_terms.len() as f64;
            Some((Tensor::stack(&kurtosis_terms, 0)?.sum_all()? / n)?)
        } else {
            None
        };
        Ok(ForwardOutput { logits, kurtosis })
    }
}

/// `a · weightᵀ` for activations `[batch, T, in]` and a weight `[out, in]`, as one 2-D
/// matmul over all tokens (a batched matmul would first broadcast the weight).
fn matmul_rows(a: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, t, d) = a.dims3()?;
    a.reshape((b * t, d))?.matmul(&weight.t()?)?.reshape((b, t, weight.dim(0)?))
}

/// `x / √(mean(x²) + ε) · gain` over the last dimension.
fn rms_norm(x: &Tensor, gain: &Tensor, eps: f32) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (mean_square + eps as f64)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(gain)
}

/// Cos and sin of RoPE's angles, `[context, head_dim / 2]`, computed exactly as the
/// runtime's `rope_table` (f64 `libm`, then rounded to f32).
fn rope_tables(shape: &ModelShape) -> Result<(Tensor, Tensor)> {
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
/// by the angles of `cos`/`sin` (`[T, hd/2]`).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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
fn repeat_kv(x: &Tensor, times: usize) -> Result<Tensor> {
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
