//! Why a model could not be loaded: [`ModelError`], at the bottom of the module graph
//! (the reader, the tokenizer, the architecture loaders, the weights and the backends all
//! return it; it depends on none of them but their own error types).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::gguf::GgufError;
use crate::tokenizer::TokenizerError;
use petrel_quant::w4::W4Error;

/// Why a model could not be loaded.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelError {
    /// The file itself is malformed.
    Gguf(GgufError),
    /// The tokenizer metadata is missing or malformed.
    Tokenizer(TokenizerError),
    /// `general.architecture` names a family Petrel does not run.
    UnsupportedArchitecture(String),
    /// A required metadata key is absent.
    MissingMetadata(String),
    /// A metadata value has the wrong type or an impossible value.
    BadMetadata { key: String, reason: &'static str },
    /// A required tensor is absent.
    MissingTensor(String),
    /// A tensor's shape (ggml order, innermost first) differs from what the metadata implies.
    BadTensorShape { tensor: String, expected: Vec<u64>, found: Vec<u64> },
    /// A tensor stored in a type this backend cannot compute with.
    UnsupportedTensorType { tensor: String, ty: &'static str },
    /// A W4 tensor whose codes or scales are malformed.
    BadW4Tensor { tensor: String, reason: W4Error },
    /// A tensor whose values are impossible (non-finite, out of order).
    BadTensorValues { tensor: String, reason: &'static str },
    /// A quantized tensor with an impossible block (a non-finite scale): which block (of
    /// the whole tensor, counted from 0), in which row, and what is wrong.
    BadTensorBlock { tensor: String, block: usize, row: usize, reason: &'static str },
    /// A tensor stored in a way (`ty`) that a non-native backend cannot serve.
    UnsupportedByBackend { backend: &'static str, tensor: String, ty: &'static str, reason: String },
    /// A backend failed while preparing the model (a device error).
    BackendFailed { backend: &'static str, reason: String },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Gguf(e) => write!(f, "invalid GGUF file: {e}"),
            ModelError::Tokenizer(e) => write!(f, "invalid tokenizer: {e}"),
            ModelError::UnsupportedArchitecture(a) => {
                write!(f, "unsupported architecture {a:?} (supported:")?;
                for name in crate::arch::supported() {
                    write!(f, " {name}")?;
                }
                write!(f, ")")
            }
            ModelError::MissingMetadata(k) => write!(f, "metadata key {k:?} is missing"),
            ModelError::BadMetadata { key, reason } => write!(f, "metadata key {key:?} is invalid: {reason}"),
            ModelError::BadTensorValues { tensor, reason } => write!(f, "tensor {tensor:?} is invalid: {reason}"),
            ModelError::BadTensorBlock { tensor, block, row, reason } => {
                write!(f, "tensor {tensor:?} is invalid: {reason} in block {block} (row {row})")
            }
            ModelError::MissingTensor(t) => write!(f, "tensor {t:?} is missing"),
            ModelError::BadTensorShape { tensor, expected, found } => {
                write!(f, "tensor {tensor:?} has shape {found:?}, expected {expected:?}")
            }
            ModelError::UnsupportedTensorType { tensor, ty } => {
                write!(f, "tensor {tensor:?} has type {ty}, which the native backend cannot compute with")
            }
            ModelError::BadW4Tensor { tensor, reason } => write!(f, "W4 tensor {tensor:?} is malformed: {reason}"),
            ModelError::UnsupportedByBackend { backend, tensor, ty, reason } => {
                write!(f, "the {backend} backend cannot serve tensor {tensor:?} ({ty}): {reason}")
            }
            ModelError::BackendFailed { backend, reason } => write!(f, "the {backend} backend failed: {reason}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ModelError {}

impl From<GgufError> for ModelError {
    fn from(e: GgufError) -> Self {
        ModelError::Gguf(e)
    }
}

impl From<TokenizerError> for ModelError {
    fn from(e: TokenizerError) -> Self {
        ModelError::Tokenizer(e)
    }
}
