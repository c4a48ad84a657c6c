//! Model hyper-parameters and the plain description of a block, read from GGUF metadata.
//!
//! [`ModelConfig::from_gguf`] reads the keys every decoder shares (`{arch}.block_count`,
//! `.embedding_length`, heads, …) and hands the architecture-specific ones to the
//! architecture's own loader in [`crate::arch`], which fills in a [`BlockDescription`] and
//! the per-layer attention ([`LayerAttention`]). The forward pass branches on that data
//! only; it never looks at the architecture's name.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::gguf::{GgufFile, Value};
use crate::model::ModelError;

/// How RoPE pairs the elements of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: ggml's "normal" RoPE, for which GGUF Llama files
    /// store their Q/K rows permuted.
    Adjacent,
    /// Pairs `(x[i], x[i + rope_dim/2])`: ggml's NeoX RoPE (Qwen2, Gemma).
    Neox,
}

/// The gated activation of the MLP: `down · (act(gate · x) ⊙ (up · x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatedActivation {
    /// `silu(g) = g / (1 + e^-g)` (SwiGLU: Llama, Qwen2).
    Silu,
    /// GELU, tanh approximation `0.5 g (1 + tanh(√(2/π) (g + 0.044715 g³)))` (GeGLU: Gemma).
    GeluTanh,
}

/// What a block contains beyond the Llama baseline (pre-RMSNorm attention and MLP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescription {
    /// Biases on the query, key and value projections (`attn_{q,k,v}.bias`, Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (`attn_{q,k}_norm.weight`,
    /// `head_dim` gains shared by all heads; Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and MLP outputs before they join the residual stream
    /// (`post_attention_norm.weight`, `post_ffw_norm.weight`; Gemma 2/3).
    pub post_norms: bool,
    /// The MLP's gated activation.
    pub activation: GatedActivation,
    /// How RoPE pairs a head's elements.
    pub rope_style: RopeStyle,
}

impl BlockDescription {
    /// Llama's block: no biases, no Q/K norm, pre-norms only, SwiGLU, adjacent-pair RoPE.
    pub const LLAMA: BlockDescription = BlockDescription {
        qkv_bias: false,
        qk_norm: false,
        post_norms: false,
        activation: GatedActivation::Silu,
        rope_style: RopeStyle::Adjacent,
    };
}

/// The attention of one layer: which RoPE base it uses and how far back it looks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerAttention {
    /// RoPE base frequency θ of this layer.
    pub rope_base: f32,
    /// Sliding window in tokens: a query at position `p` sees the keys at positions
    /// `p - window + 1 ..= p`; `None` for global attention.
    pub window: Option<usize>,
    /// Index of `rope_base` in [`ModelConfig::rope_bases`] (set by
    /// [`ModelConfig::from_gguf`]; loaders leave it 0).
    pub rope_table: usize,
}

/// Hyper-parameters of a decoder-only transformer, all taken from the file's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture` (`llama`, `qwen2`, `gemma3`).
    pub architecture: String,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Hidden width of the gated MLP.
    pub ffn_dim: usize,
    /// Number of query heads.
    pub heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `heads`).
    pub kv_heads: usize,
    /// Width of one head (`{arch}.attention.key_length`, else `dim / heads`).
    pub head_dim: usize,
    /// Number of leading dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    /// RMSNorm ε.
    pub norm_eps: f32,
    /// Context length the model was trained for, in tokens.
    pub context_length: usize,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// What each block contains.
    pub block: BlockDescription,
    /// Per layer: RoPE base and sliding window (`layers` entries).
    pub attention: Vec<LayerAttention>,
    /// The distinct RoPE bases of the layers, in order of first use (one for most models,
    /// two for Gemma 3's local and global layers): the forward pass keeps one table each.
    pub rope_bases: Vec<f32>,
    /// Factor on the query–key dot products (`1/√head_dim` for most models).
    pub attention_scale: f32,
    /// Factor on the embedding rows (`√dim` for Gemma), `None` for 1.
    pub embedding_scale: Option<f32>,
    /// Final logit soft-capping `c · tanh(logit / c)` (Gemma 2), `None` for none.
    pub logit_softcap: Option<f32>,
}

/// What an architecture's loader in [`crate::arch`] decides.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchitectureParts {
    /// The block description.
    pub block: BlockDescription,
    /// Per-layer attention (`layers` entries).
    pub attention: Vec<LayerAttention>,
    /// See [`ModelConfig::attention_scale`].
    pub attention_scale: f32,
    /// See [`ModelConfig::embedding_scale`].
    pub embedding_scale: Option<f32>,
    /// See [`ModelConfig::logit_softcap`].
    pub logit_softcap: Option<f32>,
}

/// Reads `{architecture}.*` keys with typed, validated accessors for the loaders.
#[derive(Clone, Copy)]
pub struct Hyper<'f, 'a> {
    file: &'f GgufFile<'a>,
    architecture: &'f str,
}

impl<'f, 'a> Hyper<'f, 'a> {
    /// The full key of `name` (`{architecture}.{name}`).
    pub fn key(&self, name: &str) -> String {
        alloc::format!("{}.{name}", self.architecture)
    }

    /// The raw value of `{architecture}.{name}`, if present.
    pub fn get(&self, name: &str) -> Option<Value<'a>> {
        self.file.get(&self.key(name))
    }

    /// A required positive integer.
    pub fn positive(&self, name: &str) -> Result<usize, ModelError> {
        let key = self.key(name);
        let value = self.file.get(&key).ok_or_else(|| ModelError::MissingMetadata(key.clone()))?;
        value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or(ModelError::BadMetadata { key, reason: "expected a positive integer" })
    }

    /// An optional positive integer.
    pub fn positive_or(&self, name: &str, default: usize) -> Result<usize, ModelError> {
        match self.get(name) {
            None => Ok(default),
            Some(_) => self.positive(name),
        }
    }

    /// An optional positive, finite number.
    pub fn positive_f32_or(&self, name: &str, default: f32) -> Result<f32, ModelError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .as_f32()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or(ModelError::BadMetadata { key: self.key(name), reason: "expected a positive number" }),
        }
    }
}

impl ModelConfig {
    /// Reads the hyper-parameters of `file`; `vocab_size` comes from the embedding table.
    /// An architecture without a loader in [`crate::arch`] is
    /// [`ModelError::UnsupportedArchitecture`].
    pub fn from_gguf(file: &GgufFile<'_>) -> Result<Self, ModelError> {
        let architecture = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or(ModelError::MissingMetadata("general.architecture".to_string()))?;
        let loader = crate::arch::loader(architecture)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(architecture.to_string()))?;
        let h = Hyper { file, architecture };
        let layers = h.positive("block_count")?;
        // Every block has at least nine tensors; a larger count cannot be real, and trusting
        // it would size allocations by a number an untrusted file chose.
        if layers > file.tensors().len() / 9 {
            return Err(ModelError::BadMetadata {
                key: h.key("block_count"),
                reason: "more blocks than the file has tensors for",
            });
        }
        let dim = h.positive("embedding_length")?;
        let ffn_dim = h.positive("feed_forward_length")?;
        let heads = h.positive("attention.head_count")?;
        let kv_heads = h.positive_or("attention.head_count_kv", heads)?;
        if heads % kv_heads != 0 {
            return Err(ModelError::BadMetadata {
                key: h.key("attention.head_count_kv"),
                reason: "the query heads must be a multiple of the key/value heads",
            });
        }
        let head_dim = match h.get("attention.key_length") {
            Some(_) => h.positive("attention.key_length")?,
            None if dim % heads == 0 => dim / heads,
            None => {
                return Err(ModelError::BadMetadata {
                    key: h.key("attention.head_count"),
                    reason: "the heads must divide the embedding width (or attention.key_length be given)",
                })
            }
        };
        if h.positive_or("attention.value_length", head_dim)? != head_dim {
            return Err(ModelError::BadMetadata {
                key: h.key("attention.value_length"),
                reason: "value heads of another width than key heads are not supported",
            });
        }
        let rope_dim = h.positive_or("rope.dimension_count", head_dim)?;
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::BadMetadata {
                key: h.key("rope.dimension_count"),
                reason: "must be even and at most the head width",
            });
        }
        let vocab_size = file
            .tensor("token_embd.weight")
            .map(|t| t.dims[1] as usize)
            .ok_or(ModelError::MissingTensor("token_embd.weight".to_string()))?;
        let mut parts = loader(&h, layers, head_dim)?;
        debug_assert_eq!(parts.attention.len(), layers);
        let mut rope_bases: Vec<f32> = Vec::new();
        for a in &mut parts.attention {
            a.rope_table = match rope_bases.iter().position(|b| b.to_bits() == a.rope_base.to_bits()) {
                Some(i) => i,
                None => {
                    rope_bases.push(a.rope_base);
                    rope_bases.len() - 1
                }
            };
        }
        Ok(ModelConfig {
            architecture: architecture.to_string(),
            layers,
            dim,
            ffn_dim,
            heads,
            kv_heads,
            head_dim,
            rope_dim,
            norm_eps: h.positive_f32_or("attention.layer_norm_rms_epsilon", 1e-5)?,
            context_length: h.positive("context_length")?,
            vocab_size,
            block: parts.block,
            attention: parts.attention,
            rope_bases,
            attention_scale: parts.attention_scale,
            embedding_scale: parts.embedding_scale,
            logit_softcap: parts.logit_softcap,
        })
    }

    /// Width of the key (and value) projection: `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of the query projection and of the attention output: `heads * head_dim`
    /// (equal to `dim` for Llama and Qwen2, not for Gemma 3).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Whether every block is Llama's (one RoPE base, global attention, plain blocks):
    /// what the transforms built for Llama (QuaRot, KV prediction, routing) assume.
    pub fn is_llama_like(&self) -> bool {
        self.block == BlockDescription::LLAMA
            && self.rope_bases.len() == 1
            && self.attention.iter().all(|a| a.window.is_none())
            && self.embedding_scale.is_none()
            && self.logit_softcap.is_none()
    }
}
