//! Petrel's inference core.
//!
//! `no_std` + `alloc`; the `std` feature adds threads, memory-mapped files and run-time CPU
//! detection. Modules, in the order data flows through them:
//! - [`gguf`]: the zero-copy, validating model-file reader ([`gguf_writer`] writes files;
//!   [`mapped`] maps them on `std`);
//! - [`tokenizer`]: byte-level BPE from the file's vocabulary, and the chat format;
//! - [`config`], [`arch`] and [`model`]: hyper-parameters and the plain block description
//!   from the metadata (one loader per architecture: `llama`, `qwen2`, `gemma3`), and the
//!   weights borrowed from the file;
//! - [`linear`]: matrix products on the stored quantized blocks;
//! - [`backend`]: the seam between the model code and the arithmetic — Petrel's own
//!   kernels (native), or candle and tract behind features;
//! - [`forward`] with [`ops`], [`kv_cache`] and [`parallel`]: the forward pass, its per-token
//!   operations, the KV cache and the thread team;
//! - [`routing`]: mixture-of-depths routers, top-k and causal routing decisions;
//! - [`sampler`]: greedy, temperature, top-k, top-p and repetition penalty;
//! - [`session`]: load, prefill, step and stream, over a KV cache allocated once.
//!
//! `unsafe` is denied here except in [`mapped`] (the memory map); the SIMD kernels live in
//! `petrel-quant`.
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod arch;
pub mod backend;
pub mod config;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod gguf_writer;
pub mod kv_cache;
pub mod kv_predict;
pub mod linear;
#[cfg(feature = "std")]
pub mod mapped;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod routing;
pub mod sampler;
pub mod scheme;
pub mod session;
pub mod tokenizer;

pub use config::ModelConfig;
pub use gguf::{GgufError, GgufFile};
pub use kv_cache::KvType;
pub use model::{Model, ModelError};
pub use petrel_quant::Kernels;
pub use sampler::{Sampler, SamplerConfig};
pub use session::{Session, SessionError, SessionOptions, StopReason};
pub use tokenizer::Tokenizer;
