//! Choosing a backend on the command line (`--backend native|candle|tract`, tract with the
//! `tract` feature) and building it for a
//! loaded model.

use anyhow::{Context, Result};
use clap::ValueEnum;
use petrel_runtime::backend::candle::{CandleBackend, Device};
use petrel_runtime::backend::native::NativeBackend;
#[cfg(feature = "tract")]
use petrel_runtime::backend::tract::TractBackend;
use petrel_runtime::backend::Backend;
use petrel_runtime::Model;

/// The backends the command-line tools offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// Petrel's own integer kernels (the reference; multi-threaded by the session).
    Native,
    /// candle on its CPU device: every op as candle tensor ops, weights dequantized to
    /// f32 when the model loads (W4A4 reproduced by native's quantized activations).
    Candle,
    /// tract's matrix kernels (4-bit weights as Q4_0 blocks; Q4_1 files are refused),
    /// the element-wise ops native (builds with the `tract` feature).
    #[cfg(feature = "tract")]
    Tract,
}

/// A backend built for one model.
pub enum PreparedBackend {
    /// [`BackendChoice::Native`].
    Native(Box<NativeBackend>),
    /// [`BackendChoice::Candle`].
    Candle(Box<CandleBackend>),
    /// [`BackendChoice::Tract`].
    #[cfg(feature = "tract")]
    Tract(Box<TractBackend>),
}

impl PreparedBackend {
    /// Builds `choice` for `model` (tract's kernels on `threads` threads); fails with the
    /// backend's reason if it cannot serve the model.
    pub fn build(choice: BackendChoice, model: &Model<'_>, threads: usize) -> Result<Self> {
        #[cfg(not(feature = "tract"))]
        let _ = threads;
        Ok(match choice {
            BackendChoice::Native => PreparedBackend::Native(Box::new(NativeBackend::detect())),
            BackendChoice::Candle => PreparedBackend::Candle(Box::new(
                CandleBackend::new(model, Device::Cpu).context("the candle backend cannot run this model")?,
            )),
            #[cfg(feature = "tract")]
            BackendChoice::Tract => PreparedBackend::Tract(Box::new(
                TractBackend::new(model, threads).context("the tract backend cannot run this model")?,
            )),
        })
    }

    /// The backend, for `Session::with_backend`.
    pub fn backend(&self) -> &dyn Backend {
        match self {
            PreparedBackend::Native(b) => b.as_ref(),
            PreparedBackend::Candle(b) => b.as_ref(),
            #[cfg(feature = "tract")]
            PreparedBackend::Tract(b) => b.as_ref(),
        }
    }
}
