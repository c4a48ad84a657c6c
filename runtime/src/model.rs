//! The Llama-family model: its weights, borrowed from a GGUF file, and load-time checks.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::config::ModelConfig;
pub use crate::error::ModelError;
use crate::gguf::{GgufFile, TensorInfo, TensorType};
use crate::kv_predict::KvPredictor;
use crate::linear::Linear;
use crate::routing::MixtureOfDepths;
use crate::scheme::{QuantScheme, Rotation};
use crate::tokenizer::Tokenizer;
use petrel_quant::hadamard::Hadamard;

/// Biases of the query, key and value projections (`q_dim`, `kv_dim`, `kv_dim` long).
#[derive(Clone, Debug, PartialEq)]
pub struct QkvBias {
    /// Query bias, `q_dim` long.
    pub q: Vec<f32>,
    /// Key bias, `kv_dim` long.
    pub k: Vec<f32>,
    /// Value bias, `kv_dim` long.
    pub v: Vec<f32>,
}

/// The weights of one transformer block. Which optional parts are present follows the
/// model's [`crate::config::BlockDescription`].
#[derive(Clone, Debug)]
pub struct LayerWeights<'a> {
    /// RMSNorm gain before attention, `dim` long.
    pub attn_norm: Vec<f32>,
    /// Query projection, `q_dim × dim` (for adjacent-pair RoPE, rows permuted as GGUF
    /// stores them).
    pub wq: Linear<'a>,
    /// Key projection, `kv_dim × dim` (permuted likewise).
    pub wk: Linear<'a>,
    /// Value projection, `kv_dim × dim`.
    pub wv: Linear<'a>,
    /// Biases of the three projections (`attn_{q,k,v}.bias`), when the block has them.
    pub qkv_bias: Option<QkvBias>,
    /// RMSNorm gains of each query and key head (`attn_q_norm`, `attn_k_norm`, `head_dim`
    /// long each), when the block has them.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Attention output projection, `dim × q_dim`.
    pub wo: Linear<'a>,
    /// RMSNorm gain of the attention output before the residual add
    /// (`post_attention_norm`, `dim`), when the block has post-norms.
    pub attn_post_norm: Option<Vec<f32>>,
    /// RMSNorm gain before the MLP, `dim` long.
    pub ffn_norm: Vec<f32>,
    /// Gate projection, `ffn_dim × dim`.
    pub w_gate: Linear<'a>,
    /// Up projection, `ffn_dim × dim`.
    pub w_up: Linear<'a>,
    /// Down projection, `dim × ffn_dim`.
    pub w_down: Linear<'a>,
    /// RMSNorm gain of the MLP output before the residual add (`post_ffw_norm`, `dim`),
    /// when the block has post-norms.
    pub ffn_post_norm: Option<Vec<f32>>,
    /// Learned activation clips of a model trained with activation QAT (tensor
    /// `blk.N.act_clip`, 8 f32): `[lo, hi]` for the inputs of q/k/v, o, gate/up and down,
    /// in that order. The forward pass clamps each input to its range before the linear
    /// layers read it, as training did; `None` for models without them.
    pub activation_clips: Option<[[f32; 2]; 4]>,
}

impl<'a> LayerWeights<'a> {
    /// Block `l`'s tensors, named `{prefix}blk.{l}.…` (the empty prefix for a model's own
    /// blocks), checked against `config`'s shapes. `rotated`: the model has QuaRot's online
    /// Hadamard transform (learned activation clips are then refused).
    pub fn load(
        file: &GgufFile<'a>,
        prefix: &str,
        l: usize,
        config: &ModelConfig,
        scheme: Option<&QuantScheme>,
        rotated: bool,
    ) -> Result<Self, ModelError> {
        let (dim, q_dim, kv_dim, ffn) = (config.dim, config.q_dim(), config.kv_dim(), config.ffn_dim);
        let name = |suffix: &str| alloc::format!("{prefix}blk.{l}.{suffix}");
        let tensor = |name: &str| file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()));
        let gain = |suffix: &str, len: usize| vector(tensor(&name(suffix))?, len);
        let linear = |name: &str, rows: usize, cols: usize| Linear::load(file, name, rows, cols, scheme);
        let block = &config.block;
        let qkv_bias = match block.qkv_bias {
            false => None,
            true => Some(QkvBias {
                q: gain("attn_q.bias", q_dim)?,
                k: gain("attn_k.bias", kv_dim)?,
                v: gain("attn_v.bias", kv_dim)?,
            }),
        };
        let qk_norm = match block.qk_norm {
            false => None,
            true => Some((gain("attn_q_norm.weight", config.head_dim)?, gain("attn_k_norm.weight", config.head_dim)?)),
        };
        let (attn_post_norm, ffn_post_norm) = match block.post_norms {
            false => (None, None),
            true => (Some(gain("post_attention_norm.weight", dim)?), Some(gain("post_ffw_norm.weight", dim)?)),
        };
        Ok(LayerWeights {
            attn_norm: gain("attn_norm.weight", dim)?,
            wq: linear(&name("attn_q.weight"), q_dim, dim)?,
            wk: linear(&name("attn_k.weight"), kv_dim, dim)?,
            wv: linear(&name("attn_v.weight"), kv_dim, dim)?,
            qkv_bias,
            qk_norm,
            wo: linear(&name("attn_output.weight"), dim, q_dim)?,
            attn_post_norm,
            ffn_norm: gain("ffn_norm.weight", dim)?,
            w_gate: linear(&name("ffn_gate.weight"), ffn, dim)?,
            w_up: linear(&name("ffn_up.weight"), ffn, dim)?,
            w_down: linear(&name("ffn_down.weight"), dim, ffn)?,
            ffn_post_norm,
            activation_clips: activation_clips(file, &name("act_clip"), rotated)?,
        })
    }
}

/// A loaded model: hyper-parameters, weights borrowed from the file, and the tokenizer.
#[derive(Debug)]
pub struct Model<'a> {
    /// Hyper-parameters from the metadata.
    pub config: ModelConfig,
    /// Token embedding table, `vocab_size × dim`.
    pub token_embedding: Linear<'a>,
    /// Transformer blocks, in order.
    pub layers: Vec<LayerWeights<'a>>,
    /// Final RMSNorm gain, `dim` long.
    pub output_norm: Vec<f32>,
    /// Output head, `vocab_size × dim`; the embedding table itself when the file ties them.
    pub output: Linear<'a>,
    /// The tokenizer stored in the file.
    pub tokenizer: Tokenizer,
    /// How W4 tensors are computed with, for files Petrel quantized.
    pub scheme: Option<QuantScheme>,
    /// The online Hadamard transform applied to the input of `ffn_down` (QuaRot files).
    pub down_hadamard: Option<Hadamard>,
    /// Mixture-of-depths routing (`petrel.mod.*`), for files that have it.
    pub routing: Option<MixtureOfDepths>,
    /// KV-prediction prefill's auxiliary model and maps (`petrel.kvp.*`), for files that
    /// have them.
    pub kv_predictor: Option<alloc::boxed::Box<KvPredictor<'a>>>,
}

impl<'a> Model<'a> {
    /// Every weight matrix a forward pass multiplies with, with its tensor name: the
    /// blocks' seven linears, the output head, and a KV predictor's auxiliary blocks and
    /// maps. Backends prepare these when they are built.
    pub fn linears(&self) -> Vec<(String, &Linear<'a>)> {
        fn blocks<'m, 'a>(prefix: &str, layers: &'m [LayerWeights<'a>], all: &mut Vec<(String, &'m Linear<'a>)>) {
            for (l, w) in layers.iter().enumerate() {
                let named = [
                    ("attn_q", &w.wq),
                    ("attn_k", &w.wk),
                    ("attn_v", &w.wv),
                    ("attn_output", &w.wo),
                    ("ffn_gate", &w.w_gate),
                    ("ffn_up", &w.w_up),
                    ("ffn_down", &w.w_down),
                ];
                for (name, linear) in named {
                    all.push((alloc::format!("{prefix}{l}.{name}.weight"), linear));
                }
            }
        }
        let mut all = Vec::new();
        blocks("blk.", &self.layers, &mut all);
        all.push(("output.weight".to_string(), &self.output));
        if let Some(p) = &self.kv_predictor {
            blocks(&alloc::format!("{}blk.", crate::kv_predict::AUX_PREFIX), &p.aux.layers, &mut all);
            for (l, (k, v)) in p.keys.iter().zip(&p.values).enumerate() {
                all.push((alloc::format!("kvp.pred.{l}.k.weight"), &k.weight));
                all.push((alloc::format!("kvp.pred.{l}.v.weight"), &v.weight));
            }
        }
        all
    }

    /// Builds the model from a parsed file, checking every tensor's presence, shape and type.
    pub fn load(file: &GgufFile<'a>) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(file)?;
        let tokenizer = Tokenizer::from_gguf(file)?;
        if tokenizer.vocab_size() as usize != config.vocab_size {
            return Err(ModelError::BadTensorShape {
                tensor: "token_embd.weight".to_string(),
                expected: alloc::vec![config.dim as u64, tokenizer.vocab_size() as u64],
                found: alloc::vec![config.dim as u64, config.vocab_size as u64],
            });
        }
        let scheme = QuantScheme::from_gguf(file)?;
        let tensor = |name: &str| file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()));
        let linear = |name: &str, rows: usize, cols: usize| Linear::load(file, name, rows, cols, scheme.as_ref());
        let (dim, ffn) = (config.dim, config.ffn_dim);
        let token_embedding = linear("token_embd.weight", config.vocab_size, dim)?;
        let output = match file.tensor("output.weight") {
            Some(_) => linear("output.weight", config.vocab_size, dim)?,
            None => token_embedding,
        };
        let down_hadamard = match scheme.map(|s| s.rotation) {
            Some(Rotation::QuaRot) => Some(Hadamard::new(ffn).ok_or(ModelError::BadMetadata {
                key: crate::scheme::KEY_ROTATION.to_string(),
                reason: "quarot needs a Hadamard matrix of the FFN width, and none is known for it",
            })?),
            _ => None,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            layers.push(LayerWeights::load(file, "", l, &config, scheme.as_ref(), down_hadamard.is_some())?);
        }
        let output_norm = vector(tensor("output_norm.weight")?, dim)?;
        let routing = MixtureOfDepths::from_gguf(file, config.layers, dim)?;
        // Routing, rotation and KV prediction were built for Llama's block; other
        // architectures refuse them until they are made to fit.
        let transform = if routing.is_some() {
            Some(crate::routing::KEY_LAYERS)
        } else if down_hadamard.is_some() {
            Some(crate::scheme::KEY_ROTATION)
        } else if file.get(crate::kv_predict::KEY_LAYER_MAP).is_some() {
            Some(crate::kv_predict::KEY_LAYER_MAP)
        } else {
            None
        };
        if let (Some(key), false) = (transform, config.is_llama_like()) {
            return Err(ModelError::BadMetadata {
                key: key.to_string(),
                reason: "this transform is only supported on llama-architecture blocks",
            });
        }
        let mut model = Model {
            config,
            token_embedding,
            layers,
            output_norm,
            output,
            tokenizer,
            scheme,
            down_hadamard,
            routing,
            kv_predictor: None,
        };
        model.kv_predictor = KvPredictor::from_gguf(file, &model)?.map(alloc::boxed::Box::new);
        Ok(model)
    }

    /// A model made of base blocks `keep` (in that order) with this model's embedding,
    /// final norm, head, tokenizer and quantization: a layer-pruned copy sharing the
    /// file's weights (the norms and tokenizer are copied). No routing, no predictor.
    ///
    /// # Panics
    /// If an index in `keep` is not below the block count.
    pub fn layer_pruned(&self, keep: &[usize]) -> Model<'a> {
        let mut config = self.config.clone();
        config.layers = keep.len();
        Model {
            config,
            token_embedding: self.token_embedding,
            layers: keep.iter().map(|&l| self.layers[l].clone()).collect(),
            output_norm: self.output_norm.clone(),
            output: self.output,
            tokenizer: self.tokenizer.clone(),
            scheme: self.scheme,
            down_hadamard: self.down_hadamard.clone(),
            routing: None,
            kv_predictor: None,
        }
    }

    /// Bytes of weights read per decoded token (every matrix once; norms ignored).
    pub fn weight_bytes_per_token(&self) -> usize {
        let per_layer: usize = (0..self.layers.len()).map(|l| self.block_weight_bytes(l)).sum();
        per_layer + self.head_weight_bytes()
    }

    /// Bytes of block `layer`'s matrices: what a token that goes through it reads.
    pub fn block_weight_bytes(&self, layer: usize) -> usize {
        let l = &self.layers[layer];
        [l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down].iter().map(|w| w.bytes()).sum()
    }

    /// Bytes every decoded token reads outside the blocks: the output head and one
    /// embedding row.
    pub fn head_weight_bytes(&self) -> usize {
        self.output.bytes() + self.token_embedding.row_bytes()
    }
}

/// Reads an optional `blk.N.act_clip` tensor: 8 finite f32 forming four `lo < hi` pairs.
/// A rotated model cannot have them: the clips hold in the basis the model was trained in.
fn activation_clips(file: &GgufFile<'_>, name: &str, rotated: bool) -> Result<Option<[[f32; 2]; 4]>, ModelError> {
    let Some(t) = file.tensor(name) else {
        return Ok(None);
    };
    let values = vector(t, 8)?;
    let bad = |reason| ModelError::BadTensorValues { tensor: name.to_string(), reason };
    if rotated {
        return Err(bad("learned activation clips cannot be combined with a rotated model"));
    }
    let mut clips = [[0f32; 2]; 4];
    for (clip, pair) in clips.iter_mut().zip(values.chunks_exact(2)) {
        if !(pair[0].is_finite() && pair[1].is_finite() && pair[0] < pair[1]) {
            return Err(bad("each activation clip must be a finite pair lo < hi"));
        }
        *clip = [pair[0], pair[1]];
    }
    Ok(Some(clips))
}

/// Copies a 1-D F32 (or F16) tensor of `len` values.
pub(crate) fn vector(t: &TensorInfo<'_>, len: usize) -> Result<Vec<f32>, ModelError> {
    if t.n_dims != 1 || t.dims[0] != len as u64 {
        return Err(ModelError::BadTensorShape {
            tensor: t.name.to_string(),
            expected: alloc::vec![len as u64],
            found: t.shape().to_vec(),
        });
    }
    match t.ty {
        TensorType::F32 => Ok(t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        TensorType::F16 => Ok(t
            .data
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()),
        other => Err(ModelError::UnsupportedTensorType { tensor: t.name.to_string(), ty: other.name() }),
    }
}
