//! The CUDA path of Petrel's candle backend, compiled against candle's `cuda` feature:
//! `cargo check` proves it type-checks; running it needs a machine with Rust and CUDA.

use petrel_runtime::backend::candle::CandleBackend;
use petrel_runtime::{Model, ModelError};

/// The candle backend on CUDA device `ordinal`.
pub fn cuda_backend(model: &Model<'_>, ordinal: usize) -> Result<CandleBackend, ModelError> {
    CandleBackend::cuda(model, ordinal)
}
