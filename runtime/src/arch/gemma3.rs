//! `gemma3` (Gemma 3 text models): RMSNorm before *and after* attention and MLP, RMSNorm
//! of each query and key head, GELU-gated MLP, NeoX RoPE, embeddings scaled by `√dim`,
//! and sliding-window attention on local layers with their own RoPE base.
//!
//! Layer pattern (llama.cpp's, from Gemma's reference code): with
//! `gemma3.attention.sliding_window` set, layer `l` is local unless
//! `l % pattern == pattern - 1` (pattern `gemma3.attention.sliding_window_pattern`,
//! default 6: five local layers, then one global). Local layers use
//! `gemma3.rope.freq_base_swa` (default 10,000), global ones `gemma3.rope.freq_base`.
//! The query scale is `1/√head_dim`, except for the 62-block 27B model (`1/√(dim/heads)`).
//! The GGUF converter has already added Gemma's `1 +` to the norm gains.

use alloc::vec::Vec;

use crate::config::{ArchitectureParts, BlockDescription, GatedActivation, Hyper, LayerAttention, RopeStyle};
use crate::model::ModelError;

pub(super) fn parts(h: &Hyper<'_, '_>, layers: usize, head_dim: usize) -> Result<ArchitectureParts, ModelError> {
    let global_base = h.positive_f32_or("rope.freq_base", 10_000.0)?;
    let local_base = h.positive_f32_or("rope.freq_base_swa", 10_000.0)?;
    let window = match h.get("attention.sliding_window") {
        None => None,
        Some(_) => Some(h.positive("attention.sliding_window")?),
    };
    let pattern = match h.get("attention.sliding_window_pattern") {
        Some(v) if v.as_array().is_some() => {
            return Err(ModelError::BadMetadata {
                key: h.key("attention.sliding_window_pattern"),
                reason: "per-layer window patterns are not supported; expected an integer",
            })
        }
        _ => h.positive_or("attention.sliding_window_pattern", 6)?,
    };
    let attention: Vec<LayerAttention> = (0..layers)
        .map(|l| match window {
            Some(w) if l % pattern < pattern - 1 => {
                LayerAttention { rope_base: local_base, window: Some(w), rope_table: 0 }
            }
            _ => LayerAttention { rope_base: global_base, window: None, rope_table: 0 },
        })
        .collect();
    let dim = h.positive("embedding_length")?;
    let heads = h.positive("attention.head_count")?;
    let query_scale_width = if layers == 62 { dim / heads } else { head_dim };
    let softcap = h.positive_f32_or("final_logit_softcapping", f32::INFINITY)?;
    Ok(ArchitectureParts {
        block: BlockDescription {
            qkv_bias: false,
            qk_norm: true,
            post_norms: true,
            activation: GatedActivation::GeluTanh,
            rope_style: RopeStyle::Neox,
        },
        attention,
        attention_scale: 1.0 / libm::sqrtf(query_scale_width as f32),
        embedding_scale: Some(libm::sqrtf(dim as f32)),
        logit_softcap: softcap.is_finite().then_some(softcap),
    })
}
