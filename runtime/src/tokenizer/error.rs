//! What can be wrong with a file's tokenizer.

use alloc::string::String;
use core::fmt;

/// Why a tokenizer could not be built from a GGUF file's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerError {
    /// A required metadata key is absent.
    MissingKey(&'static str),
    /// A metadata key holds a value of the wrong type; `expected` describes the right one.
    WrongType { key: &'static str, expected: &'static str },
    /// `tokenizer.ggml.model` names a tokenizer other than `gpt2` (byte-level BPE) or
    /// `llama` (SentencePiece).
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    UnsupportedPreTokenizer(String),
    /// `tokenizer.ggml.tokens` is empty.
    EmptyVocabulary,
    /// More tokens than a `u32` id can number.
    VocabularyTooLarge(usize),
    /// An array that must have one entry per token has `found` entries for `expected` tokens.
    LengthMismatch { key: &'static str, expected: usize, found: usize },
    /// `tokenizer.ggml.token_type` holds a value that is not a llama.cpp token type (0..=6).
    BadTokenType { id: u32, value: i64 },
    /// A token id stored under `key` is not below the vocabulary size.
    TokenIdOutOfRange { key: &'static str, id: u64, vocab_size: u32 },
    /// Merge number `index` is not two tokens separated by a space.
    MalformedMerge { index: usize, merge: String },
    /// Merge number `index` names (or produces) `token`, which is not in the vocabulary.
    UnknownMergeToken { index: usize, token: String },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::MissingKey(key) => write!(f, "tokenizer metadata key {key:?} is missing"),
            TokenizerError::WrongType { key, expected } => {
                write!(f, "tokenizer metadata key {key:?} should hold {expected}")
            }
            TokenizerError::UnsupportedModel(m) => {
                write!(f, "tokenizer model {m:?} is not supported (only \"gpt2\" byte-level BPE and \"llama\" SentencePiece are)")
            }
            TokenizerError::UnsupportedPreTokenizer(p) => {
                write!(
                    f,
                    "pre-tokenizer {p:?} is not supported (supported: \"smollm\", \"gpt2\", \"default\", \"qwen2\", \"llama-bpe\" and their llama.cpp aliases)"
                )
            }
            TokenizerError::EmptyVocabulary => write!(f, "the tokenizer vocabulary is empty"),
            TokenizerError::VocabularyTooLarge(n) => write!(f, "vocabulary of {n} tokens is too large"),
            TokenizerError::LengthMismatch { key, expected, found } => {
                write!(f, "{key:?} has {found} entries, expected one per token ({expected})")
            }
            TokenizerError::BadTokenType { id, value } => write!(f, "token {id} has unknown token type {value}"),
            TokenizerError::TokenIdOutOfRange { key, id, vocab_size } => {
                write!(f, "{key:?} = {id} is not a token id (vocabulary size {vocab_size})")
            }
            TokenizerError::MalformedMerge { index, merge } => {
                write!(f, "merge {index} ({merge:?}) is not two tokens separated by a space")
            }
            TokenizerError::UnknownMergeToken { index, token } => {
                write!(f, "merge {index} refers to {token:?}, which is not in the vocabulary")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TokenizerError {}
