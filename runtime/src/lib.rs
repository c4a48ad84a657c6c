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
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod gguf;
pub mod tokenizer;
