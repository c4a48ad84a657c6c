//! Petrel's model tooling: the model cache and downloads, and helpers shared by the
//! `petrel` command-line tool and the benchmark.

pub mod act_stats;
pub mod backends;
pub mod bpe_train;
pub mod corpus;
pub mod gguf_out;
pub mod kvp_fit;
pub mod kvp_train;
#[cfg(feature = "tract")]
pub mod onnx_import;
pub mod quantize;
pub mod registry;
pub mod ridge;
pub mod route_fit;
pub mod stats;
pub mod train;
