//! `qwen2` (Qwen2, Qwen2.5): Llama's block with biases on Q, K and V, and NeoX RoPE
//! (the converter does not permute Qwen's Q/K rows).

use alloc::vec;

use super::default_attention_scale;
use crate::config::{ArchitectureParts, BlockDescription, Hyper, LayerAttention, RopeStyle};
use crate::model::ModelError;

pub(super) fn parts(h: &Hyper<'_, '_>, layers: usize, head_dim: usize) -> Result<ArchitectureParts, ModelError> {
    let rope_base = h.positive_f32_or("rope.freq_base", 10_000.0)?;
    Ok(ArchitectureParts {
        block: BlockDescription { qkv_bias: true, rope_style: RopeStyle::Neox, ..BlockDescription::LLAMA },
        attention: vec![LayerAttention { rope_base, window: None, rope_table: 0 }; layers],
        attention_scale: default_attention_scale(head_dim),
        embedding_scale: None,
        logit_softcap: None,
    })
}
