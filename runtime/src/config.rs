//! Model hyper-parameters, read from GGUF metadata.

use alloc::string::{String, ToString};

use crate::gguf::GgufFile;
use crate::model::ModelError;

/// Hyper-parameters of a Llama-family decoder, all taken from the file's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture` (`llama`).
    pub architecture: String,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Hidden width of the SwiGLU MLP.
    pub ffn_dim: usize,
    /// Number of query heads.
    pub heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `heads`).
    pub kv_heads: usize,
    /// Width of one head (`dim / heads`).
    pub head_dim: usize,
    /// Number of leading dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    /// RoPE base frequency θ.
    pub rope_base: f32,
    /// RMSNorm ε.
    pub norm_eps: f32,
    /// Context length the model was trained for, in tokens.
    pub context_length: usize,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
}

/// Architectures whose tensors and metadata follow llama.cpp's `llama` layout.
const SUPPORTED: &[&str] = &["llama"];

impl LlamaConfig {
    /// Reads the hyper-parameters of `file`; `vocab_size` comes from the embedding table.
    pub fn from_gguf(file: &GgufFile<'_>) -> Result<Self, ModelError> {
        let architecture = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or(ModelError::MissingMetadata("general.architecture".to_string()))?;
        if !SUPPORTED.contains(&architecture) {
            return Err(ModelError::UnsupportedArchitecture(architecture.to_string()));
        }
        let key = |name: &str| alloc::format!("{architecture}.{name}");
        let usize_of = |name: &str| -> Result<usize, ModelError> {
            let k = key(name);
            let v = file.get(&k).ok_or_else(|| ModelError::MissingMetadata(k.clone()))?;
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or(ModelError::BadMetadata { key: k, reason: "expected a positive integer" })
        };
        let f32_or = |name: &str, default: f32| -> Result<f32, ModelError> {
            let k = key(name);
            match file.get(&k) {
                None => Ok(default),
                Some(v) => v
                    .as_f32()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or(ModelError::BadMetadata { key: k, reason: "expected a positive number" }),
            }
        };
        let layers = usize_of("block_count")?;
        // Every block has nine tensors; a larger count cannot be real, and trusting it would
        // size allocations by a number an untrusted file chose.
        if layers > file.tensors().len() / 9 {
            return Err(ModelError::BadMetadata {
                key: key("block_count"),
                reason: "more blocks than the file has tensors for",
            });
        }
        let dim = usize_of("embedding_length")?;
        let ffn_dim = usize_of("feed_forward_length")?;
        let heads = usize_of("attention.head_count")?;
        let kv_heads = if file.get(&key("attention.head_count_kv")).is_some() {
            usize_of("attention.head_count_kv")?
        } else {
            heads
        };
        if dim % heads != 0 || heads % kv_heads != 0 {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count"),
                reason: "heads must divide the embedding width and be a multiple of the KV heads",
            });
        }
        let head_dim = dim / heads;
        let rope_dim =
            if file.get(&key("rope.dimension_count")).is_some() { usize_of("rope.dimension_count")? } else { head_dim };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::BadMetadata {
                key: key("rope.dimension_count"),
                reason: "must be even and at most the head width",
            });
        }
        let vocab_size = file
            .tensor("token_embd.weight")
            .map(|t| t.dims[1] as usize)
            .ok_or(ModelError::MissingTensor("token_embd.weight".to_string()))?;
        Ok(LlamaConfig {
            architecture: architecture.to_string(),
            layers,
            dim,
            ffn_dim,
            heads,
            kv_heads,
            head_dim,
            rope_dim,
            rope_base: f32_or("rope.freq_base", 10_000.0)?,
            norm_eps: f32_or("attention.layer_norm_rms_epsilon", 1e-5)?,
            context_length: usize_of("context_length")?,
            vocab_size,
        })
    }

    /// Width of the key (and value) projection: `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
