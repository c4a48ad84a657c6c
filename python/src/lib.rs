//! `petrel._native`: the Python classes over the `petrel` crate (re-exported by the
//! `petrel` package, python/petrel/__init__.py).
//!
//! Computation runs with the GIL released; Ctrl-C is honoured between tokens. A streamed
//! reply is computed on a thread of its own and handed over piece by piece; dropping the
//! iterator stops it at its next piece.

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};

use petrel::{ChatMessage, ErrorKind, KvType, SamplingParams, Session, SessionParams};
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pyo3::create_exception!(_native, PetrelError, PyException, "An error from the Petrel runtime.");

/// A library error as the Python exception that fits it, with the runtime's message.
fn to_py(e: petrel::Error) -> PyErr {
    let message = e.to_string();
    match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::ContextFull | ErrorKind::Template => PyValueError::new_err(message),
        ErrorKind::UnknownModel => PyFileNotFoundError::new_err(message),
        ErrorKind::Io if message.contains("No such file") => PyFileNotFoundError::new_err(message),
        ErrorKind::Io => PyOSError::new_err(message),
        _ => PetrelError::new_err(message),
    }
}

/// A language model and one conversation with it.
///
/// `Model(path_or_name, threads=0, context=0, kv_type="f16")` opens a GGUF file or a
/// known model name ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"; downloaded into
/// ~/.cache/petrel on first use). `threads=0` uses every core; `context=0` means 4096
/// tokens or the model's context length if smaller.
#[pyclass(module = "petrel", frozen)]
struct Model {
    model: petrel::Model,
    session: Arc<Mutex<Session>>,
}

/// Sampling options as Python passes them.
#[allow(clippy::too_many_arguments)]
fn sampling(
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repeat_penalty: f32,
    seed: u64,
    stop: Option<Vec<String>>,
) -> PyResult<SamplingParams> {
    let params =
        SamplingParams { max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop: stop.unwrap_or_default() };
    params.validate().map_err(to_py)?;
    Ok(params)
}

/// `[{"role": ..., "content": ...}, ...]` as messages.
fn messages(list: &Bound<'_, PyList>) -> PyResult<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let dict = item.downcast::<PyDict>().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!("messages[{i}] must be a dict with 'role' and 'content'"))
        })?;
        let field = |name: &str| -> PyResult<String> {
            match dict.get_item(name)? {
                Some(v) => v.extract::<String>().map_err(|_| {
                    pyo3::exceptions::PyTypeError::new_err(format!("messages[{i}]['{name}'] must be a str"))
                }),
                None => Err(PyValueError::new_err(format!("messages[{i}] has no '{name}'"))),
            }
        };
        out.push(ChatMessage::new(field("role")?, field("content")?));
    }
    Ok(out)
}

/// What a reply is computed from.
enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// Runs one reply on `session` (emptied first for a text prompt), passing pieces to
/// `on_text`.
fn run(
    session: &mut Session,
    prompt: &Prompt,
    params: &SamplingParams,
    on_text: impl FnMut(&str) -> bool,
) -> petrel::Result<petrel::Completion> {
    match prompt {
        Prompt::Text(text) => {
            session.reset();
            session.generate(text, params, on_text)
        }
        Prompt::Chat(messages) => session.chat(messages, params, on_text),
    }
}

fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    // A panic in an earlier reply poisons nothing the session depends on (the library
    // leaves no half-written state).
    session.lock().unwrap_or_else(|p| p.into_inner())
}

impl Model {
    /// The reply to `prompt`, whole or as a [`TextStream`].
    fn reply(&self, py: Python<'_>, prompt: Prompt, params: SamplingParams, stream: bool) -> PyResult<PyObject> {
        if stream {
            let (sender, receiver) = mpsc::channel::<Result<String, petrel::Error>>();
            let session = Arc::clone(&self.session);
            std::thread::Builder::new()
                .name("petrel-stream".into())
                .spawn(move || {
                    let mut session = lock(&session);
                    let result = run(&mut session, &prompt, &params, |piece| {
                        piece.is_empty() || sender.send(Ok(piece.to_string())).is_ok()
                    });
                    if let Err(e) = result {
                        let _ = sender.send(Err(e));
                    }
                })
                .map_err(|e| PetrelError::new_err(format!("cannot start a thread: {e}")))?;
            let stream = TextStream { receiver: Mutex::new(Some(receiver)) };
            return Ok(Py::new(py, stream)?.into_any());
        }
        let session = Arc::clone(&self.session);
        let mut interrupted = None;
        let result = py.allow_threads(|| {
            let mut session = lock(&session);
            let mut text = String::new();
            run(&mut session, &prompt, &params, |piece| {
                text.push_str(piece);
                // Ctrl-C: Python's signal handlers run when asked, with the GIL.
                match Python::with_gil(|py| py.check_signals()) {
                    Ok(()) => true,
                    Err(e) => {
                        interrupted = Some(e);
                        false
                    }
                }
            })
            .map(|completion| completion.text)
        });
        if let Some(e) = interrupted {
            return Err(e);
        }
        Ok(result.map_err(to_py)?.into_pyobject(py)?.into_any().unbind())
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path_or_name, threads = 0, context = 0, kv_type = "f16"))]
    fn new(py: Python<'_>, path_or_name: &str, threads: usize, context: usize, kv_type: &str) -> PyResult<Self> {
        let kv_type = KvType::parse(kv_type).ok_or_else(|| {
            PyValueError::new_err(format!("kv_type must be one of f32, f16, q8, q4, not {kv_type:?}"))
        })?;
        let spec = path_or_name.to_string();
        py.allow_threads(|| {
            let model = petrel::Model::open(&spec, &petrel::ModelParams::default())?;
            let session = model.session(&SessionParams { threads, context, kv_type, ..SessionParams::default() })?;
            Ok(Model { model, session: Arc::new(Mutex::new(session)) })
        })
        .map_err(to_py)
    }

    /// Continues `prompt` (plain text) and returns the reply: a str, or with
    /// `stream=True` an iterator of str pieces. Each call starts from an empty context.
    #[pyo3(signature = (prompt, max_tokens = 256, temperature = 0.0, top_k = 40, top_p = 0.95, repeat_penalty = 1.0, seed = 0x5EED, stop = None, stream = false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repeat_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        stream: bool,
    ) -> PyResult<PyObject> {
        let params = sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)?;
        self.reply(py, Prompt::Text(prompt), params, stream)
    }

    /// The assistant's reply to `messages` (a list of {"role", "content"} dicts, rendered
    /// with the model's chat template): a str, or with `stream=True` an iterator of
    /// pieces. A conversation that extends the previous call's reuses its cached prefix.
    #[pyo3(signature = (messages, max_tokens = 256, temperature = 0.0, top_k = 40, top_p = 0.95, repeat_penalty = 1.0, seed = 0x5EED, stop = None, stream = false))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyList>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repeat_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        stream: bool,
    ) -> PyResult<PyObject> {
        let params = sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)?;
        self.reply(py, Prompt::Chat(self::messages(messages)?), params, stream)
    }

    /// The token ids of `text` (BOS first when the vocabulary asks for it and `add_bos`;
    /// special-token texts parsed when `special`).
    #[pyo3(signature = (text, add_bos = true, special = false))]
    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Vec<u32> {
        self.model.tokenize(text, add_bos, special)
    }

    /// The text of `ids`.
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        self.model.detokenize(&ids).map_err(to_py)
    }

    /// Saves the conversation (tokens and KV cache) to `path`.
    fn save_state(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.allow_threads(|| lock(&self.session).save_state(&path)).map_err(to_py)
    }

    /// Restores a conversation saved by `save_state` (same model file and cache type).
    fn load_state(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.allow_threads(|| lock(&self.session).load_state(&path)).map_err(to_py)
    }

    /// Forgets the conversation.
    fn reset(&self) {
        lock(&self.session).reset();
    }

    /// The model's name (`general.name`).
    #[getter]
    fn name(&self) -> String {
        self.model.name()
    }

    /// The trained context length in tokens.
    #[getter]
    fn context_length(&self) -> usize {
        self.model.context_length()
    }

    /// Tokens in the vocabulary.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!("petrel.Model({:?})", self.model.path().display().to_string())
    }
}

/// The pieces of a streamed reply (from `generate`/`chat` with `stream=True`). Dropping it
/// before the end cancels the reply.
#[pyclass(module = "petrel", frozen)]
struct TextStream {
    /// `None` once the reply has ended; dropping the receiver stops the generating thread
    /// at its next piece.
    receiver: Mutex<Option<Receiver<Result<String, petrel::Error>>>>,
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let receiver = &self.receiver;
        let end = || *receiver.lock().unwrap_or_else(|p| p.into_inner()) = None;
        loop {
            // Wait a little at a time with the GIL released, so Ctrl-C is seen.
            let next = py.allow_threads(|| {
                let guard = receiver.lock().unwrap_or_else(|p| p.into_inner());
                guard.as_ref().map(|r| r.recv_timeout(std::time::Duration::from_millis(100)))
            });
            match next {
                None => return Ok(None),
                Some(Ok(Ok(piece))) => return Ok(Some(piece)),
                Some(Ok(Err(e))) => {
                    end();
                    return Err(to_py(e));
                }
                Some(Err(mpsc::RecvTimeoutError::Timeout)) => {
                    if let Err(e) = py.check_signals() {
                        end();
                        return Err(e);
                    }
                }
                Some(Err(mpsc::RecvTimeoutError::Disconnected)) => {
                    end();
                    return Ok(None);
                }
            }
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<TextStream>()?;
    m.add("PetrelError", m.py().get_type::<PetrelError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
