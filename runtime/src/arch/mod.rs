//! One loader per architecture: reads its own metadata keys into the plain description
//! the shared block runs ([`crate::config::ArchitectureParts`]).
//!
//! Tensor names are llama.cpp's and shared by all (`blk.N.attn_q.weight`, …); which
//! optional tensors a block has follows from its [`crate::config::BlockDescription`]. A new
//! architecture whose block is a combination of the features described there is a new
//! file here and one line in [`LOADERS`].

mod gemma3;
mod llama;
mod qwen2;

use crate::config::{ArchitectureParts, Hyper};
use crate::model::ModelError;

/// An architecture's loader: `(keys, block count, head width) → its parts`.
pub type Loader = fn(&Hyper<'_, '_>, usize, usize) -> Result<ArchitectureParts, ModelError>;

/// Every architecture Petrel runs, by `general.architecture`.
pub const LOADERS: &[(&str, Loader)] = &[("llama", llama::parts), ("qwen2", qwen2::parts), ("gemma3", gemma3::parts)];

/// The loader of `architecture`, if Petrel runs it.
pub fn loader(architecture: &str) -> Option<Loader> {
    LOADERS.iter().find(|(name, _)| *name == architecture).map(|&(_, l)| l)
}

/// The names of the supported architectures, comma-separated (for error messages).
pub fn supported() -> impl Iterator<Item = &'static str> {
    LOADERS.iter().map(|&(name, _)| name)
}

/// `1/√head_dim`, computed as the attention kernels always have (f32 square root).
pub(crate) fn default_attention_scale(head_dim: usize) -> f32 {
    1.0 / libm::sqrtf(head_dim as f32)
}
