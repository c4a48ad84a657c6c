//! KV-prediction prefill (Horton et al., 2024, "KV Prediction for Improved Time to First
//! Token"): a small auxiliary model reads the prompt, and per base layer a learned affine
//! map turns the keys and values of one auxiliary block into the base layer's. The base
//! model then runs only the last prompt token, against the predicted cache, and decodes
//! as usual; the auxiliary model is not used again.
//!
//! File layout (beside a normal Llama model):
//! - `petrel.kvp.block_count` (u32): the auxiliary model's blocks, `A`.
//! - `petrel.kvp.layer_map` (i32 array, one per base layer, each in `0..A`): base layer `l`
//!   is predicted from auxiliary block `layer_map[l]`.
//! - `petrel.kvp.source_layers` (i32 array of `A` base block indices, optional): the base
//!   blocks the auxiliary model was cut from. When the file has no `kvp.blk.*` tensors the
//!   auxiliary model *is* these base blocks (a layer-pruned base, no extra weight bytes).
//! - `kvp.blk.{a}.*`: the auxiliary blocks' own weights, named and shaped as base blocks.
//! - `kvp.pred.{l}.{k,v}.weight` (`kv_dim × kv_dim`, any storage a linear layer takes) and
//!   `kvp.pred.{l}.{k,v}.bias` (`kv_dim` f32).
//!
//! The auxiliary model shares the base's token embedding, final norm and output head (a
//! layer-pruned copy of the base, as in the paper's auxiliary models, without duplicating
//! the 28 M-parameter table). Its hyper-parameters are the base's with `A` blocks.
//!
//! Keys are mapped **before RoPE** (as in the reference implementation): our caches hold
//! keys after RoPE, so an auxiliary key row is un-rotated at its position, mapped, and
//! rotated again. A map applied to rotated keys would have to mean something different at
//! every position. Values are mapped directly.
//!
//! With mixture of depths the base's routed blocks receive predicted rows for every prompt
//! position (routes cannot be predicted); the last prompt token and every decoded token
//! then take the causal decision as usual.

use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use crate::config::ModelConfig;
use crate::forward::{forward_member, Compute, RunState};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::linear::{Gather, Linear};
use crate::model::{vector, LayerWeights, Model, ModelError};
use crate::ops;
use crate::parallel::Member;
use crate::routing::PrefillRouting;

/// Metadata key: number of auxiliary blocks (u32).
pub const KEY_BLOCK_COUNT: &str = "petrel.kvp.block_count";
/// Metadata key: per base layer, the auxiliary block it is predicted from (i32 array).
pub const KEY_LAYER_MAP: &str = "petrel.kvp.layer_map";
/// Metadata key: per auxiliary block, the base block it was cut from (i32 array).
pub const KEY_SOURCE_LAYERS: &str = "petrel.kvp.source_layers";
/// Name prefix of the auxiliary blocks' tensors (`kvp.blk.{a}.…`).
pub const AUX_PREFIX: &str = "kvp.";

/// Name of base layer `layer`'s predictor tensor `part` (`"k.weight"`, `"v.bias"`, …).
pub fn predictor_tensor_name(layer: usize, part: &str) -> alloc::string::String {
    format!("kvp.pred.{layer}.{part}")
}

/// `y = W · x + b` on one row of merged heads (`kv_dim` in, `kv_dim` out).
#[derive(Clone, Debug)]
pub struct AffineMap<'a> {
    /// `kv_dim × kv_dim`, rows = outputs.
    pub weight: Linear<'a>,
    /// `kv_dim`.
    pub bias: Vec<f32>,
}

/// The auxiliary model and the per-layer maps from its keys and values to the base's.
#[derive(Debug)]
pub struct KvPredictor<'a> {
    /// The auxiliary model: the base's embedding, norm and head with `A` blocks of its own
    /// (or cut from the base); no routing, no predictor.
    pub aux: Model<'a>,
    /// Per base layer, the auxiliary block it is predicted from.
    pub layer_map: Vec<usize>,
    /// Per auxiliary block, the base block it was cut from, when the file says.
    pub source_layers: Option<Vec<usize>>,
    /// The auxiliary blocks are stored in the file (`kvp.blk.*`), not base blocks.
    pub own_blocks: bool,
    /// Per base layer: pre-RoPE key map.
    pub keys: Vec<AffineMap<'a>>,
    /// Per base layer: value map.
    pub values: Vec<AffineMap<'a>>,
}

impl<'a> KvPredictor<'a> {
    /// Reads the predictor of `file` for `base` (loaded without one); `None` when the file
    /// has no `petrel.kvp.*` metadata and no `kvp.*` tensors.
    pub fn from_gguf(file: &GgufFile<'a>, base: &Model<'a>) -> Result<Option<Self>, ModelError> {
        let bad = |key: &str, reason: &'static str| ModelError::BadMetadata { key: key.to_string(), reason };
        let Some(count) = file.get(KEY_BLOCK_COUNT) else {
            if let Some(t) = file.tensors().iter().find(|t| t.name.starts_with("kvp.")) {
                return Err(ModelError::BadTensorValues {
                    tensor: t.name.to_string(),
                    reason: "a KV-prediction tensor without petrel.kvp.block_count",
                });
            }
            return Ok(None);
        };
        let layers = base.config.layers;
        let blocks = count.as_u64().ok_or(bad(KEY_BLOCK_COUNT, "expected an unsigned integer"))?;
        if blocks == 0 || blocks > layers as u64 {
            return Err(bad(KEY_BLOCK_COUNT, "must be between 1 and the base model's block count"));
        }
        let blocks = blocks as usize;
        let layer_map = indices(file, KEY_LAYER_MAP, blocks, "points outside the auxiliary model")?
            .ok_or_else(|| ModelError::MissingMetadata(KEY_LAYER_MAP.to_string()))?;
        if layer_map.len() != layers {
            return Err(bad(KEY_LAYER_MAP, "needs one entry per base block"));
        }
        let source_layers = indices(file, KEY_SOURCE_LAYERS, layers, "names a block the base model does not have")?;
        if source_layers.as_ref().is_some_and(|s| s.len() != blocks) {
            return Err(bad(KEY_SOURCE_LAYERS, "needs one entry per auxiliary block"));
        }

        let own_blocks = file.tensors().iter().any(|t| t.name.starts_with("kvp.blk."));
        let mut aux = match (&source_layers, own_blocks) {
            (_, true) => {
                let mut aux = base.layer_pruned(&[]);
                aux.config.layers = blocks;
                let rotated = base.down_hadamard.is_some();
                for a in 0..blocks {
                    let layer = LayerWeights::load(file, AUX_PREFIX, a, &aux.config, base.scheme.as_ref(), rotated)?;
                    aux.layers.push(layer);
                }
                aux
            }
            (Some(source), false) => base.layer_pruned(source),
            (None, false) => {
                return Err(ModelError::MissingTensor(format!("{AUX_PREFIX}blk.0.attn_q.weight")));
            }
        };
        aux.routing = None;

        let kv_dim = base.config.kv_dim();
        let map = |l: usize, which: &str| -> Result<AffineMap<'a>, ModelError> {
            let weight = Linear::load(
                file,
                &predictor_tensor_name(l, &format!("{which}.weight")),
                kv_dim,
                kv_dim,
                base.scheme.as_ref(),
            )?;
            let bias_name = predictor_tensor_name(l, &format!("{which}.bias"));
            let tensor = file.tensor(&bias_name).ok_or_else(|| ModelError::MissingTensor(bias_name.clone()))?;
            let bias = vector(tensor, kv_dim)?;
            if bias.iter().any(|b| !b.is_finite()) {
                return Err(ModelError::BadTensorValues { tensor: bias_name, reason: "non-finite bias" });
            }
            Ok(AffineMap { weight, bias })
        };
        let keys = (0..layers).map(|l| map(l, "k")).collect::<Result<Vec<_>, _>>()?;
        let values = (0..layers).map(|l| map(l, "v")).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(KvPredictor { aux, layer_map, source_layers, own_blocks, keys, values }))
    }

    /// Bytes of weights the prediction reads beyond the base model: the auxiliary blocks
    /// when the file stores its own, and the maps.
    pub fn extra_weight_bytes(&self, base: &Model<'_>) -> usize {
        let maps: usize = self.keys.iter().chain(&self.values).map(|m| m.weight.bytes() + m.bias.len() * 4).sum();
        let blocks: usize = (0..self.aux.layers.len())
            .filter(|&a| !(0..base.layers.len()).any(|l| base.layers[l].wq.same_data(&self.aux.layers[a].wq)))
            .map(|a| self.aux.block_weight_bytes(a))
            .sum();
        maps + blocks
    }
}

/// Reads an optional i32 array of indices, each below `bound`.
fn indices(
    file: &GgufFile<'_>,
    key: &str,
    bound: usize,
    outside: &'static str,
) -> Result<Option<Vec<usize>>, ModelError> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    let bad = |reason: &'static str| ModelError::BadMetadata { key: key.to_string(), reason };
    let integers = value
        .as_array()
        .and_then(|a| a.integers().map(|i| i.collect::<Vec<i64>>()))
        .ok_or(bad("expected an array of block indices"))?;
    integers
        .into_iter()
        .map(|i| if i >= 0 && (i as u64) < bound as u64 { Ok(i as usize) } else { Err(bad(outside)) })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The predicted prefill of a prompt of `prompt.len() ≥ 2` tokens starting at position 0,
/// one team member's part: the auxiliary model runs `prompt[..n−1]` into `aux_cache`, the
/// maps fill every base layer's rows `0..n−1`, and the base runs the last token. Leaves the
/// last token's logits in the leader's `s.logits` like [`forward_member`]. The caller has
/// checked the prompt against both caches (which must be empty) and the vocabulary.
#[allow(clippy::too_many_arguments)]
pub fn predicted_prefill_member(
    model: &Model<'_>,
    predictor: &KvPredictor<'_>,
    s: &mut RunState,
    aux_cache: &spin::RwLock<&mut KvCache>,
    cache: &spin::RwLock<&mut KvCache>,
    compute: &Compute<'_>,
    member: &Member<'_>,
    prompt: &[u32],
) {
    let n = prompt.len() - 1;
    forward_member(&predictor.aux, s, aux_cache, compute, member, &prompt[..n], 0, None, PrefillRouting::TopK);
    member.barrier();
    predict_rows_member(model, predictor, s, &aux_cache.read(), cache, compute, member, n);
    member.barrier();
    forward_member(model, s, cache, compute, member, &prompt[n..], n, None, PrefillRouting::Causal);
}

/// Appends predicted keys and values for positions `0..rows` to every base layer of
/// `cache`, from the first `rows` rows of each block of `aux_cache`.
#[allow(clippy::too_many_arguments)]
pub fn predict_rows_member(
    model: &Model<'_>,
    predictor: &KvPredictor<'_>,
    s: &mut RunState,
    aux_cache: &KvCache,
    cache: &spin::RwLock<&mut KvCache>,
    compute: &Compute<'_>,
    member: &Member<'_>,
    rows: usize,
) {
    let c: &ModelConfig = &model.config;
    let (kv, hd, rd) = (c.kv_dim(), c.head_dim, c.rope_dim);
    let batch = s.max_batch();
    let mut start = 0;
    while start < rows {
        let b = batch.min(rows - start);
        for t in 0..b {
            ops::rope_table(&mut s.rope[0][t * rd..(t + 1) * rd], start + t, rd, c.rope_bases[0]);
        }
        for a in 0..predictor.aux.layers.len() {
            let (keys, values) = aux_cache.layer(a);
            // Pre-RoPE auxiliary keys in `att`, values in `xb` (both `b × kv_dim`).
            keys.read(start * kv..(start + b) * kv, &mut s.att[..b * kv]);
            for t in 0..b {
                ops::unapply_rope(&mut s.att[t * kv..(t + 1) * kv], hd, &s.rope[0][t * rd..(t + 1) * rd]);
            }
            values.read(start * kv..(start + b) * kv, &mut s.xb[..b * kv]);
            for l in (0..c.layers).filter(|&l| predictor.layer_map[l] == a) {
                let (key_map, value_map) = (&predictor.keys[l], &predictor.values[l]);
                s.act.load(&s.att, b, kv);
                compute.backend.matmul(&key_map.weight, &mut s.act, &mut s.k, member, Gather::Leader);
                s.act.load(&s.xb, b, kv);
                compute.backend.matmul(&value_map.weight, &mut s.act, &mut s.v, member, Gather::Leader);
                if member.is_leader() {
                    for t in 0..b {
                        let (k, v) = (&mut s.k[t * kv..(t + 1) * kv], &mut s.v[t * kv..(t + 1) * kv]);
                        ops::add_assign(k, &key_map.bias);
                        ops::add_assign(v, &value_map.bias);
                        ops::apply_rope(k, hd, &s.rope[0][t * rd..(t + 1) * rd]);
                    }
                    cache.write().append(l, &s.k[..b * kv], &s.v[..b * kv], start..start + b);
                }
            }
        }
        start += b;
    }
}
