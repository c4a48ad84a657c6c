//! Checkpoints: everything a run needs to continue exactly where it stopped — the model's
//! parameters, AdamW's moments, the step, the settings and a fingerprint of the training
//! data — in one GGUF file (the format the runtime already reads and validates).
//!
//! Layout: metadata `petrel.checkpoint.{version, step, updates, shape, settings, data,
//! checksum}` (shape and settings as JSON, checksum = SHA-256 of all tensor bytes in file
//! order, hex); f32 tensors `param/NAME`, `adam.m/NAME`, `adam.v/NAME` for each parameter
//! in the decoder's order, ggml dims (innermost first).
//!
//! A checkpoint is written to `NAME.tmp`, synced and then renamed over `NAME`, so a run
//! killed at any moment leaves the previous checkpoint whole.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use sha2::{Digest, Sha256};

use super::config::{ModelShape, TrainSettings};
use super::model::{Decoder, Parameter};
use super::optim::AdamW;

const VERSION: u32 = 1;

/// A run's state as read back from a checkpoint.
pub struct Checkpoint {
    /// Steps completed.
    pub step: usize,
    /// The model's shape.
    pub shape: ModelShape,
    /// The run's settings.
    pub settings: TrainSettings,
    /// Fingerprint of the training tokens the run was started on.
    pub data: String,
    /// The decoder with its parameters.
    pub decoder: Decoder,
    /// The optimizer with its moments.
    pub optimizer: AdamW,
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn ggml_dims(t: &Tensor) -> Vec<u64> {
    t.dims().iter().rev().map(|&d| d as u64).collect()
}

/// Writes a checkpoint of `decoder` and `optimizer` after `step` steps to `path`
/// (atomically: temp file, sync, rename).
pub fn save(
    path: &Path,
    step: usize,
    settings: &TrainSettings,
    data: &str,
    decoder: &Decoder,
    optimizer: &AdamW,
) -> Result<()> {
    let mut writer = GgufWriter::new();
    let mut hasher = Sha256::new();
    for (prefix, tensors) in [
        ("param", decoder.params.iter().map(|p| p.var.as_tensor().clone()).collect::<Vec<_>>()),
        ("adam.m", optimizer.m.clone()),
        ("adam.v", optimizer.v.clone()),
    ] {
        for (p, t) in decoder.params.iter().zip(&tensors) {
            let bytes = f32_bytes(t)?;
            hasher.update(&bytes);
            writer.tensor(&format!("{prefix}/{}", p.name), &ggml_dims(t), TensorType::F32, bytes);
        }
    }
    let checksum: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    writer
        .metadata("general.architecture", MetadataValue::String("petrel-checkpoint".into()))
        .metadata("petrel.checkpoint.version", MetadataValue::U32(VERSION))
        .metadata("petrel.checkpoint.step", MetadataValue::U64(step as u64))
        .metadata("petrel.checkpoint.updates", MetadataValue::U64(optimizer.updates))
        .metadata("petrel.checkpoint.shape", MetadataValue::String(serde_json::to_string(&decoder.shape)?))
        .metadata("petrel.checkpoint.settings", MetadataValue::String(serde_json::to_string(settings)?))
        .metadata("petrel.checkpoint.data", MetadataValue::String(data.into()))
        .metadata("petrel.checkpoint.checksum", MetadataValue::String(checksum));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    {
        use std::io::Write;
        let mut file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&writer.to_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads a checkpoint, checking its structure, checksum and every tensor's shape; a
/// damaged file is an error that names what is wrong, never a panic.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    parse(&bytes).with_context(|| format!("checkpoint {} is corrupt or not a Petrel checkpoint", path.display()))
}

fn parse(bytes: &[u8]) -> Result<Checkpoint> {
    let file = GgufFile::parse(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = |key: &str| -> Result<&str> {
        file.get(key).and_then(|v| v.as_str()).with_context(|| format!("metadata {key} is missing"))
    };
    let number = |key: &str| -> Result<u64> {
        file.get(key).and_then(|v| v.as_u64()).with_context(|| format!("metadata {key} is missing"))
    };
    let version = number("petrel.checkpoint.version")?;
    if version != VERSION as u64 {
        bail!("checkpoint version {version}, this build reads version {VERSION}");
    }
    let shape: ModelShape = serde_json::from_str(text("petrel.checkpoint.shape")?).context("bad model shape")?;
    shape.validate()?;
    let settings: TrainSettings =
        serde_json::from_str(text("petrel.checkpoint.settings")?).context("bad training settings")?;
    let fresh = Decoder::new(shape.clone(), 0)?;
    let mut hasher = Sha256::new();
    let mut read = |prefix: &str, p: &Parameter| -> Result<Tensor> {
        let name = format!("{prefix}/{}", p.name);
        let info = file.tensor(&name).with_context(|| format!("tensor {name} is missing"))?;
        let want = ggml_dims(p.var.as_tensor());
        if info.ty != TensorType::F32 || info.shape() != want.as_slice() {
            bail!("tensor {name} is {:?} {:?}, expected F32 {want:?}", info.ty, info.shape());
        }
        hasher.update(info.data);
        let values: Vec<f32> =
            info.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Tensor::from_vec(values, p.var.as_tensor().dims(), &Device::Cpu)?)
    };
    let mut params = Vec::with_capacity(fresh.params.len());
    for p in &fresh.params {
        let value = read("param", p)?;
        params.push(Parameter { name: p.name.clone(), var: Var::from_tensor(&value)?, decay: p.decay });
    }
    let m = fresh.params.iter().map(|p| read("adam.m", p)).collect::<Result<Vec<_>>>()?;
    let v = fresh.params.iter().map(|p| read("adam.v", p)).collect::<Result<Vec<_>>>()?;
    let checksum: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if checksum != text("petrel.checkpoint.checksum")? {
        bail!("the tensor data does not match its checksum");
    }
    Ok(Checkpoint {
        step: usize::try_from(number("petrel.checkpoint.step")?)?,
        data: text("petrel.checkpoint.data")?.to_string(),
        decoder: Decoder::from_params(shape.clone(), params)?,
        optimizer: AdamW { m, v, updates: number("petrel.checkpoint.updates")? },
        shape,
        settings,
    })
}
