//! Petrel for applications: open a model, make sessions, generate text.
//!
//! The no_std core (`petrel-runtime`) borrows everything — the file's bytes, the model,
//! the cache — which suits firmware. This crate owns them: a [`Model`] keeps its file
//! mapped for as long as it or a [`Session`] made from it lives, and both are `'static`
//! and `Send`, so they live in an application's structs and move between threads. The C
//! ABI (`petrel-c`), the Python bindings (`petrel-python`) and `petrel serve` are built on
//! it.
//!
//! ```no_run
//! use petrel::{ChatMessage, Model, ModelParams, SamplingParams, SessionParams};
//!
//! # fn main() -> petrel::Result<()> {
//! let model = Model::open("smollm2-135m", &ModelParams::default())?;
//! let mut session = model.session(&SessionParams::default())?;
//! let messages = [
//!     ChatMessage::system("You are a helpful assistant."),
//!     ChatMessage::user("What is the capital of France?"),
//! ];
//! let reply = session.chat(&messages, &SamplingParams::default(), |piece| {
//!     print!("{piece}");
//!     true // false stops the reply
//! })?;
//! println!("\n[{} tokens, {:?}]", reply.tokens.len(), reply.stop);
//! # Ok(())
//! # }
//! ```
//!
//! One error type, [`Error`], with a [`ErrorKind`] for programs and a message for people.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod generation;
mod model;
pub mod registry;
mod session;
pub mod state;

pub use error::{Error, ErrorKind, Result};
pub use generation::{Completion, StopReason};
pub use model::{Model, ModelParams};
pub use petrel_runtime::tokenizer::ChatMessage;
pub use petrel_runtime::KvType;
pub use session::{CancelHandle, SamplingParams, Session, SessionParams, Stream};
