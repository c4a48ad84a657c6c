//! Reading a KV-prediction training input: the base model and the `petrel.kvp.*` layout,
//! aux blocks and predictor of a GGUF file, into a [`KvpModel`].
//!
//! | key / tensor | type | meaning |
//! |---|---|---|
//! | `petrel.kvp.block_count` | u32 | `A`, the number of aux blocks |
//! | `petrel.kvp.layer_map` | i32 array, one per base layer, each in `0..A` | base layer `l`'s K/V are predicted from aux block `layer_map[l]`'s |
//! | `petrel.kvp.source_layers` | i32 array of length `A` (optional) | aux block `a` starts as (or, without `kvp.blk.*` tensors, is) base block `source_layers[a]` |
//! | `kvp.blk.{a}.{name}.weight` | the base block's shapes | aux block tensors: all present or all absent |
//! | `kvp.pred.{l}.{k,v}.weight` | ggml dims `[aux kv_dim, base kv_dim]` | the linear maps, on merged heads, keys before RoPE |
//! | `kvp.pred.{l}.{k,v}.bias` | f32 `[base kv_dim]` | their biases |
//!
//! The aux model shares the base's token embedding, final norm and head.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::ModelConfig;
use serde::Serialize;

use super::model::{BlockTensors, KvpModel, BLOCK_TENSORS, PREDICTOR_TENSORS};
use crate::train::config::ModelShape;
use crate::train::model::Parameter;

/// Metadata key of the number of aux blocks (u32).
pub const KEY_BLOCK_COUNT: &str = "petrel.kvp.block_count";
/// Metadata key of the base-layer → aux-block map (i32 array, one per base layer).
pub const KEY_LAYER_MAP: &str = "petrel.kvp.layer_map";
/// Metadata key of the base blocks the aux blocks come from (i32 array, one per aux block).
pub const KEY_SOURCE_LAYERS: &str = "petrel.kvp.source_layers";

/// How the aux model and the predictor are wired to the base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvpLayout {
    /// Number of aux blocks.
    pub block_count: usize,
    /// Per base layer, the aux block it is predicted from (each `< block_count`).
    pub layer_map: Vec<usize>,
    /// Per aux block, the base block it was initialised from, if known.
    pub source_layers: Option<Vec<usize>>,
}

impl KvpLayout {
    /// The layout of `file` (a model of `layers` base layers), or `None` when it has no
    /// `petrel.kvp.*` metadata.
    pub fn from_gguf(file: &GgufFile<'_>, layers: usize) -> Result<Option<Self>> {
        let Some(count) = file.get(KEY_BLOCK_COUNT) else {
            if file.get(KEY_LAYER_MAP).is_some() || file.get(KEY_SOURCE_LAYERS).is_some() {
                bail!("{KEY_BLOCK_COUNT} is missing although other petrel.kvp keys are present");
            }
            return Ok(None);
        };
        let block_count = count
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0 && n <= layers.max(1) * 4)
            .with_context(|| format!("{KEY_BLOCK_COUNT} must be a positive integer (at most 4× the base layers)"))?;
        let list = |key: &str| -> Result<Option<Vec<usize>>> {
            let Some(value) = file.get(key) else {
                return Ok(None);
            };
            let items = value
                .as_array()
                .and_then(|a| a.integers())
                .with_context(|| format!("{key} must be an integer array"))?;
            let items = items
                .map(|i| usize::try_from(i).ok())
                .collect::<Option<Vec<usize>>>()
                .with_context(|| format!("{key} has a negative entry"))?;
            Ok(Some(items))
        };
        let layer_map = list(KEY_LAYER_MAP)?.with_context(|| format!("{KEY_LAYER_MAP} is missing"))?;
        if layer_map.len() != layers {
            bail!("{KEY_LAYER_MAP} has {} entries for {layers} base layers", layer_map.len());
        }
        if let Some(&a) = layer_map.iter().find(|&&a| a >= block_count) {
            bail!("{KEY_LAYER_MAP} names aux block {a}, but there are {block_count}");
        }
        let source_layers = list(KEY_SOURCE_LAYERS)?;
        if let Some(s) = &source_layers {
            if s.len() != block_count {
                bail!("{KEY_SOURCE_LAYERS} has {} entries for {block_count} aux blocks", s.len());
            }
            if let Some(&l) = s.iter().find(|&&l| l >= layers) {
                bail!("{KEY_SOURCE_LAYERS} names base block {l}, but there are {layers}");
            }
        }
        Ok(Some(KvpLayout { block_count, layer_map, source_layers }))
    }

    /// A layer-pruned aux model: blocks `0, n, 2n, …` of `layers`, base layer `l` predicted
    /// from aux block `l / n`.
    pub fn every(n: usize, layers: usize) -> Result<Self> {
        if n == 0 || n > layers {
            bail!("--init-aux every:{n}: N must lie in 1..={layers}");
        }
        let block_count = layers.div_ceil(n);
        Ok(KvpLayout {
            block_count,
            layer_map: (0..layers).map(|l| l / n).collect(),
            source_layers: Some((0..block_count).map(|a| a * n).collect()),
        })
    }

    /// Sets the three `petrel.kvp.*` keys (source layers only when known).
    pub fn write_metadata(&self, w: &mut GgufWriter) -> Result<()> {
        let ints = |v: &[usize]| v.iter().map(|&x| i32::try_from(x)).collect::<Result<Vec<i32>, _>>();
        w.metadata(KEY_BLOCK_COUNT, MetadataValue::U32(u32::try_from(self.block_count)?))
            .metadata(KEY_LAYER_MAP, MetadataValue::I32Array(ints(&self.layer_map)?));
        if let Some(s) = &self.source_layers {
            w.metadata(KEY_SOURCE_LAYERS, MetadataValue::I32Array(ints(s)?));
        }
        Ok(())
    }
}

/// Where the initial aux blocks and predictor came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The file's own `kvp.blk.*` tensors and predictor.
    FileTensors,
    /// The file's predictor; aux blocks copied from the base blocks `source_layers` names.
    SourceLayers,
    /// `--init-aux every:N`: the layout made here, aux blocks copied from the base,
    /// identity maps with zero biases.
    Created,
}

/// What [`load`] read.
pub struct Loaded {
    /// The model, ready to train.
    pub model: KvpModel,
    /// Its layout.
    pub layout: KvpLayout,
    /// Where the aux blocks and predictor came from.
    pub origin: Origin,
}

/// Refuses files whose computation the trainer does not reproduce: quantized, rotated,
/// routed or activation-clamped models.
fn check_plain(file: &GgufFile<'_>) -> Result<()> {
    if let Some(scheme) = file.get(petrel_runtime::scheme::KEY_SCHEME) {
        bail!(
            "the model is quantized ({} = {}): kvp-train needs f32 or f16 weights — train on the f32 model and quantize afterwards",
            petrel_runtime::scheme::KEY_SCHEME,
            scheme.as_str().unwrap_or("?")
        );
    }
    if let Some(rotation) = file.get(petrel_runtime::scheme::KEY_ROTATION).and_then(|v| v.as_str()) {
        if rotation != "none" {
            bail!("the model is rotated ({rotation}): kvp-train needs the unrotated model");
        }
    }
    if file.get(petrel_runtime::routing::KEY_LAYERS).is_some() {
        bail!("the model routes tokens (mixture of depths): kvp-train needs a dense model");
    }
    if let Some(t) = file.tensors().iter().find(|t| t.name.ends_with(".act_clip")) {
        bail!("the model clamps activations ({}): kvp-train does not reproduce that", t.name);
    }
    Ok(())
}

/// The tensor `name` of `file` as f32 with candle dims `dims` (outermost first), or `None`
/// when absent. Quantized types, wrong shapes and non-finite values are errors.
fn read(file: &GgufFile<'_>, name: &str, dims: &[usize]) -> Result<Option<Tensor>> {
    let Some(info) = file.tensor(name) else {
        return Ok(None);
    };
    let want: Vec<u64> = dims.iter().rev().map(|&d| d as u64).collect();
    if info.shape() != want.as_slice() {
        bail!("tensor {name} has ggml dims {:?}, expected {want:?}", info.shape());
    }
    let values: Vec<f32> = match info.ty {
        TensorType::F32 => info.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        TensorType::F16 => info.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        TensorType::BF16 => {
            info.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        other => bail!(
            "tensor {name} is {}: kvp-train needs f32 or f16 weights — train on the f32 model and quantize afterwards",
            other.name()
        ),
    };
    if values.len() as u64 != info.elements() {
        bail!("tensor {name} holds {} values, expected {}", values.len(), info.elements());
    }
    if values.iter().any(|v| !v.is_finite()) {
        bail!("tensor {name} has non-finite values");
    }
    Ok(Some(Tensor::from_vec(values, dims, &Device::Cpu)?))
}

fn required(file: &GgufFile<'_>, name: &str, dims: &[usize]) -> Result<Tensor> {
    read(file, name, dims)?.with_context(|| format!("tensor {name} is missing"))
}

/// Candle dims of each block tensor, in [`BLOCK_TENSORS`] order.
fn block_dims(s: &ModelShape) -> [Vec<usize>; 9] {
    let (d, kv, f) = (s.dim, s.kv_dim(), s.ffn_dim);
    [vec![d], vec![d, d], vec![kv, d], vec![kv, d], vec![d, d], vec![d], vec![f, d], vec![f, d], vec![d, f]]
}

fn read_block(file: &GgufFile<'_>, s: &ModelShape, prefix: &str) -> Result<Option<BlockTensors>> {
    let dims = block_dims(s);
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (name, d) in BLOCK_TENSORS.iter().zip(&dims) {
        let full = format!("{prefix}{name}.weight");
        match read(file, &full, d)? {
            Some(t) => found.push(t),
            None => missing.push(full),
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    if !missing.is_empty() {
        bail!("{} of the block {prefix}* are missing (a block needs all nine or none)", missing.join(", "));
    }
    let [a, b, c, d, e, f, g, h, i]: [Tensor; 9] =
        found.try_into().map_err(|_| anyhow::anyhow!("block {prefix}*: expected nine tensors"))?;
    Ok(Some([a, b, c, d, e, f, g, h, i]))
}

/// Reads `file` for training with sequences of up to `context` tokens. `init_every`
/// (`--init-aux every:N`) creates the layout when the file has none; a file with a
/// layout must not be given one.
pub fn load(file: &GgufFile<'_>, init_every: Option<usize>, context: usize) -> Result<Loaded> {
    check_plain(file)?;
    let config = ModelConfig::from_gguf(file).map_err(|e| anyhow::anyhow!("not a Llama model: {e}"))?;
    if !config.is_llama_like() {
        bail!("KV-prediction training supports llama-architecture blocks only (this file is {})", config.architecture);
    }
    if config.rope_dim != config.head_dim {
        bail!("RoPE over {} of {} head dimensions is not supported", config.rope_dim, config.head_dim);
    }
    if context > config.context_length {
        bail!("--seq-len {context} exceeds the model's context of {}", config.context_length);
    }
    let shape = ModelShape {
        vocab: config.vocab_size,
        dim: config.dim,
        layers: config.layers,
        heads: config.heads,
        kv_heads: config.kv_heads,
        ffn_dim: config.ffn_dim,
        context,
        rope_base: config.rope_bases[0],
        norm_eps: config.norm_eps,
        routing: None,
    };
    let embedding = required(file, "token_embd.weight", &[shape.vocab, shape.dim])?;
    let output_norm = required(file, "output_norm.weight", &[shape.dim])?;
    let head = read(file, "output.weight", &[shape.vocab, shape.dim])?.unwrap_or_else(|| embedding.clone());
    let mut base = Vec::with_capacity(shape.layers);
    for l in 0..shape.layers {
        base.push(
            read_block(file, &shape, &format!("blk.{l}."))?.with_context(|| format!("base block {l} is missing"))?,
        );
    }

    let (layout, created) = match (KvpLayout::from_gguf(file, shape.layers)?, init_every) {
        (Some(_), Some(n)) => bail!("the model already has a petrel.kvp layout: drop --init-aux every:{n}"),
        (Some(layout), None) => (layout, false),
        (None, Some(n)) => (KvpLayout::every(n, shape.layers)?, true),
        (None, None) => bail!(
            "the model has no petrel.kvp.* metadata: give a file from the ridge fit, or pass --init-aux every:N \
             to start from a layer-pruned copy of the base with identity maps"
        ),
    };
    if created && file.tensors().iter().any(|t| t.name.starts_with("kvp.")) {
        bail!("the model has kvp.* tensors but no petrel.kvp.* metadata");
    }

    let mut params = Vec::new();
    let mut from_file = 0;
    for a in 0..layout.block_count {
        let block = match read_block(file, &shape, &format!("kvp.blk.{a}."))? {
            Some(block) => {
                from_file += 1;
                block
            }
            None => match &layout.source_layers {
                Some(sources) => base[sources[a]].clone(),
                None => bail!("aux block {a} has no kvp.blk.{a}.* tensors and {KEY_SOURCE_LAYERS} is missing"),
            },
        };
        for (name, t) in BLOCK_TENSORS.iter().zip(block.iter()) {
            // `Var::from_tensor` copies: training the aux block leaves the base untouched.
            params.push(Parameter {
                name: format!("kvp.blk.{a}.{name}.weight"),
                var: Var::from_tensor(t)?,
                decay: false,
            });
        }
    }
    if from_file != 0 && from_file != layout.block_count {
        bail!("{from_file} of {} aux blocks have kvp.blk tensors: all or none must", layout.block_count);
    }
    let kv = shape.kv_dim();
    let dev = Device::Cpu;
    for l in 0..shape.layers {
        for (i, suffix) in PREDICTOR_TENSORS.iter().enumerate() {
            let name = format!("kvp.pred.{l}.{suffix}");
            let matrix = i % 2 == 0;
            let dims: &[usize] = if matrix { &[kv, kv] } else { &[kv] };
            let value = if created {
                if matrix {
                    Tensor::eye(kv, DType::F32, &dev)?
                } else {
                    Tensor::zeros(kv, DType::F32, &dev)?
                }
            } else {
                required(file, &name, dims)?
            };
            params.push(Parameter { name, var: Var::from_tensor(&value)?, decay: false });
        }
    }
    let origin = match (created, from_file) {
        (true, _) => Origin::Created,
        (false, 0) => Origin::SourceLayers,
        (false, _) => Origin::FileTensors,
    };
    let model = KvpModel::new(shape, embedding, output_norm, head, base, layout.layer_map.clone(), params)?;
    Ok(Loaded { model, layout, origin })
}
