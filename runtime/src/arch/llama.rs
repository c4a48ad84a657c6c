//! `llama` (Llama 1–3, SmolLM, Mistral-style files): pre-RMSNorm blocks, SwiGLU,
//! adjacent-pair RoPE on Q/K rows that the GGUF converter permuted, one RoPE base.

use alloc::vec;

use super::default_attention_scale;
use crate::config::{ArchitectureParts, BlockDescription, Hyper, LayerAttention};
use crate::model::ModelError;

pub(super) fn parts(h: &Hyper<'_, '_>, layers: usize, head_dim: usize) -> Result<ArchitectureParts, ModelError> {
    let rope_base = h.positive_f32_or("rope.freq_base", 10_000.0)?;
    Ok(ArchitectureParts {
        block: BlockDescription::LLAMA,
        attention: vec![LayerAttention { rope_base, window: None, rope_table: 0 }; layers],
        attention_scale: default_attention_scale(head_dim),
        embedding_scale: None,
        logit_softcap: None,
    })
}
