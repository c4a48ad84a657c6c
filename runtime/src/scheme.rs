//! The `petrel.quant.*` and `petrel.rotation` metadata: how a Petrel-quantized file's W4
//! tensors are to be computed with.
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `petrel.quant.scheme` | string | `w4a4`, `w4a8` or `w4a16` |
//! | `petrel.quant.group_size` | u32 | inputs per weight scale: 0 (per output channel), 32, 64, 128 |
//! | `petrel.quant.activation_clip` | f32 | activation clip ratio in (0, 1] (`w4a4`, `w4a8`) |
//! | `petrel.rotation` | string | `none`, or `quarot` (see [`Rotation`]) |
//! | `petrel.quant.activation_bits.NAME` | u32 | optional, per W4 tensor `NAME`: 4, 8 or 16 overrides the scheme's activations (8 bits use clip ratio 1) |
//!
//! A W4 weight `X.weight` is an `I8` tensor of ggml dims `[padded_cols / 2, padded_rows]`
//! holding the packed codes, with its scales in the F16 tensor `X.weight.scales` of dims
//! `[16 · groups, padded_rows / 16]` (layouts: [`petrel_quant::w4`]).

use alloc::string::ToString;

use petrel_quant::w4::activation::ActBits;
use petrel_quant::w4::GroupSize;

use crate::gguf::GgufFile;
use crate::model::ModelError;

/// Metadata key of the scheme name.
pub const KEY_SCHEME: &str = "petrel.quant.scheme";
/// Metadata key of the weight group size.
pub const KEY_GROUP_SIZE: &str = "petrel.quant.group_size";
/// Metadata key of the activation clip ratio.
pub const KEY_ACTIVATION_CLIP: &str = "petrel.quant.activation_clip";
/// Metadata key of the rotation.
pub const KEY_ROTATION: &str = "petrel.rotation";
/// Prefix of the per-tensor activation-bits overrides.
pub const KEY_ACTIVATION_BITS_PREFIX: &str = "petrel.quant.activation_bits.";
/// Suffix of the tensor holding a W4 weight's scales.
pub const SCALES_SUFFIX: &str = ".scales";

/// What a W4 linear layer multiplies its int4 weights with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activations {
    /// Per-token quantized activations: int4 (W4A4) or int8 (W4A8), clipped at
    /// `clip · max|x|`.
    Quantized { bits: ActBits, clip: f32 },
    /// f32 activations (W4A16: weight-only quantization).
    Float,
}

/// Orthogonal rotations folded into the weights of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// None.
    None,
    /// QuaRot's: RMSNorm gains folded into the next linears (the file's norm gains are 1),
    /// the residual stream rotated by an orthogonal matrix fused into every weight that
    /// reads or writes it, the values and attention outputs rotated per head by a
    /// Hadamard matrix, and the input of `ffn_down` rotated **online** by the orthonormal
    /// Hadamard transform of size `ffn_dim` ([`petrel_quant::hadamard::Hadamard`]), whose
    /// transpose is fused into `ffn_down`'s weights.
    QuaRot,
}

/// A file's quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantScheme {
    /// The activations of every W4 tensor.
    pub activations: Activations,
    /// Weight scale grouping of every W4 tensor.
    pub group: GroupSize,
    /// Rotation folded into the weights.
    pub rotation: Rotation,
}

impl QuantScheme {
    /// The scheme's name (`w4a4`, `w4a8`, `w4a16`).
    pub fn name(&self) -> &'static str {
        match self.activations {
            Activations::Quantized { bits: ActBits::A4, .. } => "w4a4",
            Activations::Quantized { bits: ActBits::A8, .. } => "w4a8",
            Activations::Float => "w4a16",
        }
    }

    /// Reads the scheme of `file`: `None` for a file without `petrel.quant.scheme` (it
    /// may then hold no W4 tensors), an error for any inconsistent or unknown value.
    pub fn from_gguf(file: &GgufFile<'_>) -> Result<Option<Self>, ModelError> {
        let bad = |key: &str, reason: &'static str| ModelError::BadMetadata { key: key.to_string(), reason };
        let rotation = match file.get(KEY_ROTATION) {
            None => Rotation::None,
            Some(v) => match v.as_str() {
                Some("none") => Rotation::None,
                Some("quarot") => Rotation::QuaRot,
                _ => return Err(bad(KEY_ROTATION, "expected \"none\" or \"quarot\"")),
            },
        };
        let Some(scheme) = file.get(KEY_SCHEME) else {
            if rotation != Rotation::None {
                return Err(bad(KEY_ROTATION, "a rotated file must also name its petrel.quant.scheme"));
            }
            return Ok(None);
        };
        let bits = match scheme.as_str() {
            Some("w4a4") => Some(ActBits::A4),
            Some("w4a8") => Some(ActBits::A8),
            Some("w4a16") => None,
            _ => return Err(bad(KEY_SCHEME, "expected \"w4a4\", \"w4a8\" or \"w4a16\"")),
        };
        let group = file
            .get(KEY_GROUP_SIZE)
            .ok_or_else(|| ModelError::MissingMetadata(KEY_GROUP_SIZE.to_string()))?
            .as_u64()
            .and_then(|g| u32::try_from(g).ok())
            .and_then(GroupSize::from_len)
            .ok_or(bad(KEY_GROUP_SIZE, "expected 0 (per channel), 32, 64 or 128"))?;
        let activations = match bits {
            None => Activations::Float,
            Some(bits) => {
                let clip = file
                    .get(KEY_ACTIVATION_CLIP)
                    .ok_or_else(|| ModelError::MissingMetadata(KEY_ACTIVATION_CLIP.to_string()))?
                    .as_f32()
                    .filter(|c| *c > 0.0 && *c <= 1.0)
                    .ok_or(bad(KEY_ACTIVATION_CLIP, "expected a ratio in (0, 1]"))?;
                Activations::Quantized { bits, clip }
            }
        };
        Ok(Some(QuantScheme { activations, group, rotation }))
    }

    /// The activations of W4 tensor `name`: the scheme's, unless the file overrides them
    /// for that tensor (`petrel.quant.activation_bits.NAME`).
    pub fn activations_for(&self, file: &GgufFile<'_>, name: &str) -> Result<Activations, ModelError> {
        let key = alloc::format!("{KEY_ACTIVATION_BITS_PREFIX}{name}");
        let Some(value) = file.get(&key) else { return Ok(self.activations) };
        let clip = match self.activations {
            Activations::Quantized { clip, .. } => clip,
            Activations::Float => 1.0,
        };
        match value.as_u64() {
            Some(4) => Ok(Activations::Quantized { bits: ActBits::A4, clip }),
            Some(8) => Ok(Activations::Quantized { bits: ActBits::A8, clip: 1.0 }),
            Some(16) => Ok(Activations::Float),
            _ => Err(ModelError::BadMetadata { key, reason: "expected 4, 8 or 16 activation bits" }),
        }
    }
}
