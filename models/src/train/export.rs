//! Writing a trained decoder as a GGUF file the runtime runs: `llama` metadata, the
//! tokenizer, and the block tensors in f32 under llama.cpp's names. The embedding doubles
//! as the head (no `output.weight`), as in SmolLM2. A QAT model's learned clips become
//! `blk.N.act_clip` tensors. A routed (mixture-of-depths) model's routers and predictors
//! are copied under `petrel_runtime::routing`'s names with its `petrel.mod.*` metadata.

use std::path::Path;

use anyhow::{Context, Result};
use petrel_runtime::gguf::TensorType;
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::routing::{self, Decision, Gate};

use super::model::{Decoder, CLIP_SITES};
use crate::bpe_train::TrainedTokenizer;

/// Writes `decoder` and `tokenizer` to `path` (temp file, load check, rename). With
/// `activation_clips` (models trained with QAT), each block's four learned clip pairs go
/// into `blk.N.act_clip` (8 f32: q/k/v, o, gate/up, down inputs), which the runtime clamps
/// those inputs to. `notes` are extra string metadata (provenance). A routed model also
/// gets `petrel.mod.layers` (i32 array), `petrel.mod.capacity` (f32), `petrel.mod.gate`
/// (`sigmoid`) and `petrel.mod.decision` (`predictor` when predictors were trained, else
/// `router`); its `blk.N.mod_*` tensors are written like every other parameter (f32, ggml
/// dims = candle's reversed, e.g. `mod_pred_in.weight` `[hidden, dim]` → `[dim, hidden]`).
pub fn write_gguf(
    path: &Path,
    decoder: &Decoder,
    tokenizer: &TrainedTokenizer,
    activation_clips: bool,
    notes: &[(&str, String)],
) -> Result<()> {
    let s = &decoder.shape;
    let mut w = GgufWriter::new();
    let u32_of = |n: usize| MetadataValue::U32(n as u32);
    w.metadata("general.architecture", MetadataValue::String("llama".into()))
        .metadata("general.name", MetadataValue::String("petrel-tiny".into()))
        .metadata("llama.block_count", u32_of(s.layers))
        .metadata("llama.embedding_length", u32_of(s.dim))
        .metadata("llama.feed_forward_length", u32_of(s.ffn_dim))
        .metadata("llama.attention.head_count", u32_of(s.heads))
        .metadata("llama.attention.head_count_kv", u32_of(s.kv_heads))
        .metadata("llama.rope.dimension_count", u32_of(s.head_dim()))
        .metadata("llama.rope.freq_base", MetadataValue::F32(s.rope_base))
        .metadata("llama.attention.layer_norm_rms_epsilon", MetadataValue::F32(s.norm_eps))
        .metadata("llama.context_length", u32_of(s.context));
    if let Some(r) = &s.routing {
        let layers = r.layers.iter().map(|&l| i32::try_from(l)).collect::<Result<Vec<i32>, _>>()?;
        let decision = if r.predictor_hidden > 0 { Decision::Predictor } else { Decision::Router };
        w.metadata(routing::KEY_LAYERS, MetadataValue::I32Array(layers))
            .metadata(routing::KEY_CAPACITY, MetadataValue::F32(r.capacity))
            .metadata(routing::KEY_GATE, MetadataValue::String(Gate::Sigmoid.name().into()))
            .metadata(routing::KEY_DECISION, MetadataValue::String(decision.name().into()));
    }
    for (key, value) in notes {
        w.metadata(key, MetadataValue::String(value.clone()));
    }
    tokenizer.write_metadata(&mut w);
    let f32_bytes = |values: &[f32]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    for p in decoder.params.iter().filter(|p| !p.name.contains(".clip.")) {
        let t = p.var.as_tensor();
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let dims: Vec<u64> = t.dims().iter().rev().map(|&d| d as u64).collect();
        w.tensor(&p.name, &dims, TensorType::F32, f32_bytes(&values));
    }
    if activation_clips {
        for l in 0..s.layers {
            let mut clips = Vec::with_capacity(8);
            for site in CLIP_SITES {
                let name = format!("blk.{l}.clip.{site}");
                let p = decoder.params.iter().find(|p| p.name == name).context("missing clip parameter")?;
                clips.extend(p.var.as_tensor().to_vec1::<f32>()?);
            }
            w.tensor(&format!("blk.{l}.act_clip"), &[8], TensorType::F32, f32_bytes(&clips));
        }
    }
    crate::gguf_out::write_loadable(path, &w.to_bytes())
}
