//! Writing the trained aux blocks and predictor: a copy of the input file with the
//! `kvp.blk.*` and `kvp.pred.*` tensors replaced (f32) and the `petrel.kvp.*` layout set.

use std::path::Path;

use anyhow::Result;
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};

use super::model::KvpModel;
use super::weights::KvpLayout;

/// Writes `source` with `model`'s trained tensors and `layout` to `path` (checked to load
/// in the runtime, written atomically). Each trained tensor is f32 with ggml dims the
/// reverse of candle's: `kvp.blk.{a}.*` like the base block's, `kvp.pred.{l}.{k,v}.weight`
/// `[aux kv_dim, base kv_dim]`, biases `[base kv_dim]`. Every other tensor and metadata
/// entry of `source` is copied as stored; `notes` are added as string metadata.
pub fn write(
    source: &GgufFile<'_>,
    model: &KvpModel,
    layout: &KvpLayout,
    notes: &[(&str, String)],
    path: &Path,
) -> Result<()> {
    let mut w = GgufWriter::copy_of(source, |name| !name.starts_with("kvp."));
    layout.write_metadata(&mut w)?;
    for (key, value) in notes {
        w.metadata(key, MetadataValue::String(value.clone()));
    }
    for p in &model.params {
        let t = p.var.as_tensor();
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let dims: Vec<u64> = t.dims().iter().rev().map(|&d| d as u64).collect();
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.tensor(&p.name, &dims, TensorType::F32, bytes);
    }
    crate::gguf_out::write_loadable(path, &w.to_bytes())
}
