//! Known models and the local model cache: the `petrel` crate's registry, which the CLI
//! and the tools share.

pub use petrel::registry::*;
