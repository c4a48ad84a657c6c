//! Petrel's inference core.
//!
//! `no_std` + `alloc`; the `std` feature adds threads, memory-mapped files and run-time CPU
//! detection. Modules, in the order data flows through them:
//! - [`gguf`]: the zero-copy, validating model-file reader;
//! - [`tokenizer`]: byte-level BPE from the file's vocabulary, and the chat format;
//! - [`model`]: the Llama-family weights and the forward pass;
//! - [`sampler`]: greedy, temperature, top-k, top-p and repetition penalty;
//! - [`session`]: load, prefill, step and stream, over a KV cache allocated once.
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod config;
pub mod forward;
pub mod gguf;
pub mod gguf_writer;
pub mod kv_cache;
pub mod linear;
#[cfg(feature = "std")]
pub mod mapped;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod sampler;
pub mod session;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use gguf::{GgufError, GgufFile};
pub use model::{Model, ModelError};
pub use petrel_quant::Kernels;
pub use sampler::{Sampler, SamplerConfig};
pub use session::{Session, SessionError, SessionOptions, StopReason};
pub use tokenizer::Tokenizer;
