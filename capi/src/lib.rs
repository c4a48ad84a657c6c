//! Petrel's C ABI, in the manner of llama.cpp's `llama.h`: opaque handles, `*_default_params()`,
//! status codes with a thread-local last-error string, streaming through a callback with a
//! user pointer, cancellation from any thread. The header, `include/petrel.h`, is generated
//! from this file by cbindgen (a test fails when the committed header is stale); its opening
//! comment states who owns every pointer and what may run on which thread.
//!
//! Every exported function runs its body inside [`std::panic::catch_unwind`]: a panic is
//! reported as `PETREL_ERR_INTERNAL`, never unwound into C.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Mutex, TryLockError};

use petrel::{
    CancelHandle, ChatMessage, Completion, ErrorKind, KvType, Model, SamplingParams, Session, SessionParams, StopReason,
};

/// What a call did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum petrel_status {
    /// Success.
    PETREL_OK = 0,
    /// A NULL pointer, text that is not UTF-8, a parameter out of range.
    PETREL_ERR_INVALID_ARGUMENT = 1,
    /// A file could not be opened, read or written.
    PETREL_ERR_IO = 2,
    /// Neither a file nor a model name the registry knows.
    PETREL_ERR_UNKNOWN_MODEL = 3,
    /// Downloading a known model failed.
    PETREL_ERR_DOWNLOAD = 4,
    /// The model file is malformed or of a kind Petrel does not run.
    PETREL_ERR_INVALID_MODEL = 5,
    /// The prompt does not fit the session's context.
    PETREL_ERR_CONTEXT_FULL = 6,
    /// The KV cache could not be allocated.
    PETREL_ERR_OUT_OF_MEMORY = 7,
    /// The chat template failed to render.
    PETREL_ERR_TEMPLATE = 8,
    /// A saved session was refused (another model or cache type, truncated, altered).
    PETREL_ERR_INVALID_STATE = 9,
    /// The session is in use by another thread.
    PETREL_ERR_BUSY = 10,
    /// The output buffer is too small; the size needed was written.
    PETREL_ERR_BUFFER_TOO_SMALL = 11,
    /// A bug in Petrel (a caught panic).
    PETREL_ERR_INTERNAL = 12,
}
use petrel_status::*;

/// `kv_type` of [`petrel_session_params`]: 4 bytes per value.
pub const PETREL_KV_F32: u32 = 0;
/// `kv_type`: IEEE half precision (the default).
pub const PETREL_KV_F16: u32 = 1;
/// `kv_type`: 8-bit codes with a scale per token and head.
pub const PETREL_KV_Q8: u32 = 2;
/// `kv_type`: 4-bit codes with a scale per token and head (poor quality on some models).
pub const PETREL_KV_Q4: u32 = 3;

/// `stop_reason` of [`petrel_completion`]: the model ended its turn.
pub const PETREL_STOP_END_OF_GENERATION: u32 = 0;
/// `stop_reason`: `max_tokens` were generated.
pub const PETREL_STOP_MAX_TOKENS: u32 = 1;
/// `stop_reason`: the context is full.
pub const PETREL_STOP_CONTEXT_FULL: u32 = 2;
/// `stop_reason`: the callback returned false or `petrel_session_cancel` was called.
pub const PETREL_STOP_CANCELLED: u32 = 3;

/// How a model is opened (no options yet; use [`petrel_model_default_params`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct petrel_model_params {
    /// Set to 0.
    pub reserved: u32,
}

/// How a session is set up.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct petrel_session_params {
    /// Tokens the KV cache holds; 0 means 4096 or the model's context length if smaller.
    pub context: u32,
    /// Compute threads; 0 means every available core.
    pub threads: u32,
    /// One of `PETREL_KV_*`.
    pub kv_type: u32,
}

/// How tokens are chosen.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct petrel_sampling_params {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 keeps all).
    pub top_k: u32,
    /// Nucleus threshold in (0, 1].
    pub top_p: f32,
    /// Divides the logits of tokens already seen (1 is off).
    pub repeat_penalty: f32,
    /// Random seed.
    pub seed: u64,
}

/// One turn of a conversation (both strings UTF-8, NUL-terminated, borrowed for the call).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct petrel_chat_message {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: *const c_char,
    /// The text.
    pub content: *const c_char,
}

/// A summary of a session's last reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct petrel_completion {
    /// Tokens fed before the reply.
    pub prompt_tokens: u32,
    /// Tokens of the reply.
    pub completion_tokens: u32,
    /// One of `PETREL_STOP_*`.
    pub stop_reason: u32,
    /// Milliseconds from the call to the first reply token.
    pub time_to_first_token_ms: f64,
    /// Milliseconds from the first reply token to the last.
    pub decode_ms: f64,
}

/// Receives each piece of a reply: `len` bytes of UTF-8 at `piece` (NUL-terminated as
/// well; valid only during the call) and the `user` pointer given to the generating call.
/// Return true to continue, false to stop the reply.
pub type petrel_token_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> bool>;

/// An opened model (opaque).
pub struct petrel_model {
    model: Model,
}

/// A conversation with a model (opaque).
pub struct petrel_session {
    cancel: CancelHandle,
    session: Mutex<SessionState>,
}

struct SessionState {
    session: Session,
    last: Option<Completion>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failed call: its status and message.
struct Failure {
    status: petrel_status,
    message: String,
}

impl Failure {
    fn invalid(message: impl Into<String>) -> Self {
        Failure { status: PETREL_ERR_INVALID_ARGUMENT, message: message.into() }
    }
}

impl From<petrel::Error> for Failure {
    fn from(e: petrel::Error) -> Self {
        let status = match e.kind() {
            ErrorKind::Io => PETREL_ERR_IO,
            ErrorKind::UnknownModel => PETREL_ERR_UNKNOWN_MODEL,
            ErrorKind::Download => PETREL_ERR_DOWNLOAD,
            ErrorKind::InvalidModel => PETREL_ERR_INVALID_MODEL,
            ErrorKind::ContextFull => PETREL_ERR_CONTEXT_FULL,
            ErrorKind::OutOfMemory => PETREL_ERR_OUT_OF_MEMORY,
            ErrorKind::Template => PETREL_ERR_TEMPLATE,
            ErrorKind::InvalidState => PETREL_ERR_INVALID_STATE,
            ErrorKind::Busy => PETREL_ERR_BUSY,
            ErrorKind::InvalidArgument => PETREL_ERR_INVALID_ARGUMENT,
            _ => PETREL_ERR_INTERNAL,
        };
        Failure { status, message: e.to_string() }
    }
}

fn set_last_error(message: &str) {
    // A message with an interior NUL is cut there rather than lost.
    let bytes: Vec<u8> = message.bytes().take_while(|&b| b != 0).collect();
    let text = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error (caught at the C boundary; please report it): {what}")
}

/// Runs `body`, turning its failure or panic into a status and the last error.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> petrel_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => PETREL_OK,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(payload) => {
            set_last_error(&panic_message(payload.as_ref()));
            PETREL_ERR_INTERNAL
        }
    }
}

/// Runs `body`, turning its failure or panic into NULL and the last error.
fn guard_ptr<T>(body: impl FnOnce() -> Result<Box<T>, Failure>) -> *mut T {
    let mut out = std::ptr::null_mut();
    let status = guard(|| {
        out = Box::into_raw(body()?);
        Ok(())
    });
    if status == PETREL_OK {
        out
    } else {
        std::ptr::null_mut()
    }
}

/// Borrows a C string as UTF-8; `what` names it in the error.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that lives for `'a`.
unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller guarantees a live NUL-terminated string.
    let c = unsafe { CStr::from_ptr(ptr) };
    c.to_str().map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8 ({e})")))
}

/// Borrows `ptr` as a reference; `what` names it in the error.
///
/// # Safety
/// `ptr` is NULL or a valid pointer to a live `T` for `'a`.
unsafe fn handle<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller guarantees `ptr` is NULL or valid.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// Locks a session for one call; a session in use by another thread is refused.
fn lock(session: &petrel_session) -> Result<std::sync::MutexGuard<'_, SessionState>, Failure> {
    match session.session.try_lock() {
        Ok(guard) => Ok(guard),
        // A panic during an earlier call was caught; the session itself is still whole
        // (the library leaves nothing half-written on failure).
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => {
            Err(Failure { status: PETREL_ERR_BUSY, message: "the session is in use by another thread".into() })
        }
    }
}

/// The default model parameters.
#[no_mangle]
pub extern "C" fn petrel_model_default_params() -> petrel_model_params {
    petrel_model_params { reserved: 0 }
}

/// The default session parameters: context 0 (4096 or the model's), threads 0 (all
/// cores), an f16 KV cache.
#[no_mangle]
pub extern "C" fn petrel_session_default_params() -> petrel_session_params {
    petrel_session_params { context: 0, threads: 0, kv_type: PETREL_KV_F16 }
}

/// The default sampling parameters: 256 tokens, greedy (temperature 0), top-k 40, top-p
/// 0.95, no repetition penalty, seed 0x5EED.
#[no_mangle]
pub extern "C" fn petrel_sampling_default_params() -> petrel_sampling_params {
    let d = SamplingParams::default();
    petrel_sampling_params {
        max_tokens: d.max_tokens as u32,
        temperature: d.temperature,
        top_k: d.top_k as u32,
        top_p: d.top_p,
        repeat_penalty: d.repeat_penalty,
        seed: d.seed,
    }
}

/// Petrel's version, as a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn petrel_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread (an empty string if none). Valid
/// until the next failing call on this thread; do not free it.
#[no_mangle]
pub extern "C" fn petrel_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Opens a GGUF model file (or, in builds with the registry, a known model name such as
/// `"smollm2-135m"`, downloaded on first use). `params` may be NULL for the defaults.
/// Returns NULL on error (see [`petrel_last_error`]); free the model with
/// [`petrel_model_free`].
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `params` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn petrel_model_open(
    path: *const c_char,
    params: *const petrel_model_params,
) -> *mut petrel_model {
    guard_ptr(|| {
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let path = unsafe { text(path, "path") }?;
        // SAFETY: the caller passes NULL or a valid pointer; only its presence is used.
        let _params = unsafe { params.as_ref() };
        let model = Model::open(path, &petrel::ModelParams::default())?;
        Ok(Box::new(petrel_model { model }))
    })
}

/// Frees a model (NULL is ignored). Sessions made from it stay usable.
///
/// # Safety
/// `model` is NULL or was returned by [`petrel_model_open`] and not freed yet.
#[no_mangle]
pub unsafe extern "C" fn petrel_model_free(model: *mut petrel_model) {
    if !model.is_null() {
        // SAFETY: the pointer came from Box::into_raw in petrel_model_open and is freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// The model's trained context length in tokens (0 for NULL).
///
/// # Safety
/// `model` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn petrel_model_context_length(model: *const petrel_model) -> u32 {
    // SAFETY: the caller passes NULL or a live model.
    unsafe { model.as_ref() }.map_or(0, |m| m.model.context_length() as u32)
}

/// Makes a conversation with `model` (the KV cache is allocated here). `params` may be
/// NULL for the defaults. Returns NULL on error; free with [`petrel_session_free`].
///
/// # Safety
/// `model` is NULL or a live model; `params` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_new(
    model: *const petrel_model,
    params: *const petrel_session_params,
) -> *mut petrel_session {
    guard_ptr(|| {
        // SAFETY: the caller passes NULL or a live model.
        let model = unsafe { handle(model, "model") }?;
        // SAFETY: the caller passes NULL or a valid pointer.
        let p = unsafe { params.as_ref() }.copied().unwrap_or_else(|| petrel_session_default_params());
        let kv_type = match p.kv_type {
            PETREL_KV_F32 => KvType::F32,
            PETREL_KV_F16 => KvType::F16,
            PETREL_KV_Q8 => KvType::Q8,
            PETREL_KV_Q4 => KvType::Q4,
            other => return Err(Failure::invalid(format!("kv_type {other} is not one of PETREL_KV_*"))),
        };
        let params = SessionParams {
            context: p.context as usize,
            threads: p.threads as usize,
            kv_type,
            ..SessionParams::default()
        };
        let session = model.model.session(&params)?;
        Ok(Box::new(petrel_session {
            cancel: session.cancel_handle(),
            session: Mutex::new(SessionState { session, last: None }),
        }))
    })
}

/// Frees a session (NULL is ignored). No call on it may be running.
///
/// # Safety
/// `session` is NULL or was returned by [`petrel_session_new`] and not freed yet.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_free(session: *mut petrel_session) {
    if !session.is_null() {
        // SAFETY: the pointer came from Box::into_raw in petrel_session_new and is freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(session) })));
    }
}

/// Forgets the conversation (the cache is kept, emptied).
///
/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_reset(session: *const petrel_session) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a live session.
        let session = unsafe { handle(session, "session") }?;
        lock(session)?.session.reset();
        Ok(())
    })
}

/// Stops the session's running reply after its current token; callable from any thread
/// at any time (a cancel while nothing runs stops the next reply at its first token).
///
/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_cancel(session: *const petrel_session) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a live session; only the shared cancel flag is touched.
        unsafe { handle(session, "session") }?.cancel.cancel();
        Ok(())
    })
}

fn sampling(params: Option<&petrel_sampling_params>) -> SamplingParams {
    let p = params.copied().unwrap_or_else(|| petrel_sampling_default_params());
    SamplingParams {
        max_tokens: p.max_tokens as usize,
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        repeat_penalty: p.repeat_penalty,
        seed: p.seed,
        stop: Vec::new(),
    }
}

/// Calls the C callback with one piece (NUL-terminated copy).
fn deliver(callback: petrel_token_callback, user: *mut c_void, piece: &str, buffer: &mut Vec<u8>) -> bool {
    let Some(callback) = callback else { return true };
    buffer.clear();
    buffer.extend_from_slice(piece.as_bytes());
    buffer.push(0);
    // SAFETY: the buffer is NUL-terminated and outlives the call; `user` is the caller's own
    // pointer, passed back untouched; the caller guarantees the function pointer is valid.
    unsafe { callback(buffer.as_ptr().cast(), piece.len(), user) }
}

/// Continues the conversation with `prompt` (plain UTF-8 text; BOS first if the session
/// is empty) and generates a reply, passing each piece of text to `callback` (may be
/// NULL) with `user`. `params` may be NULL for the defaults.
///
/// # Safety
/// `session` is NULL or a live session; `prompt` NULL or NUL-terminated; `params` NULL or
/// valid; `callback` NULL or a function that may be called with `user`.
#[no_mangle]
pub unsafe extern "C" fn petrel_generate(
    session: *const petrel_session,
    prompt: *const c_char,
    params: *const petrel_sampling_params,
    callback: petrel_token_callback,
    user: *mut c_void,
) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or valid pointers (see the function's contract).
        let (session, prompt, params) =
            unsafe { (handle(session, "session")?, text(prompt, "prompt")?, params.as_ref()) };
        let mut state = lock(session)?;
        let mut buffer = Vec::new();
        let completion =
            state.session.generate(prompt, &sampling(params), |piece| deliver(callback, user, piece, &mut buffer))?;
        state.last = Some(completion);
        Ok(())
    })
}

/// Renders `messages[0..count]` with the model's chat template and generates the
/// assistant's reply (see [`petrel_generate`]); a conversation that extends the last one
/// reuses its cached prefix.
///
/// # Safety
/// `messages` is NULL (with `count` 0) or points to `count` messages whose strings are
/// NUL-terminated; the other pointers as for [`petrel_generate`].
#[no_mangle]
pub unsafe extern "C" fn petrel_chat(
    session: *const petrel_session,
    messages: *const petrel_chat_message,
    count: usize,
    params: *const petrel_sampling_params,
    callback: petrel_token_callback,
    user: *mut c_void,
) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a live session, and NULL or valid params.
        let (session, params) = unsafe { (handle(session, "session")?, params.as_ref()) };
        if messages.is_null() {
            return Err(Failure::invalid("messages is NULL"));
        }
        // SAFETY: non-NULL, and the caller guarantees `count` valid messages.
        let raw = unsafe { std::slice::from_raw_parts(messages, count) };
        let mut turns = Vec::with_capacity(count);
        for (i, m) in raw.iter().enumerate() {
            // SAFETY: the caller guarantees NUL-terminated strings (or NULL, refused).
            let (role, content) = unsafe {
                (text(m.role, &format!("messages[{i}].role"))?, text(m.content, &format!("messages[{i}].content"))?)
            };
            turns.push(ChatMessage::new(role, content));
        }
        let mut state = lock(session)?;
        let mut buffer = Vec::new();
        let completion =
            state.session.chat(&turns, &sampling(params), |piece| deliver(callback, user, piece, &mut buffer))?;
        state.last = Some(completion);
        Ok(())
    })
}

/// Writes a summary of the session's last reply to `out`.
///
/// # Safety
/// `session` is NULL or a live session; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_last_completion(
    session: *const petrel_session,
    out: *mut petrel_completion,
) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a live session.
        let session = unsafe { handle(session, "session") }?;
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        let state = lock(session)?;
        let c = state.last.as_ref().ok_or_else(|| Failure::invalid("the session has not replied yet"))?;
        let summary = petrel_completion {
            prompt_tokens: c.prompt_tokens as u32,
            completion_tokens: c.tokens.len() as u32,
            stop_reason: match c.stop {
                StopReason::EndOfGeneration | StopReason::StopSequence => PETREL_STOP_END_OF_GENERATION,
                StopReason::MaxTokens => PETREL_STOP_MAX_TOKENS,
                StopReason::ContextFull => PETREL_STOP_CONTEXT_FULL,
                StopReason::Cancelled => PETREL_STOP_CANCELLED,
            },
            time_to_first_token_ms: c.time_to_first_token.as_secs_f64() * 1e3,
            decode_ms: c.decode_time.as_secs_f64() * 1e3,
        };
        // SAFETY: non-NULL, and the caller guarantees it is writable.
        unsafe { out.write(summary) };
        Ok(())
    })
}

/// Saves the conversation (tokens and KV cache) to the file `path`.
///
/// # Safety
/// `session` is NULL or a live session; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_save(session: *const petrel_session, path: *const c_char) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or valid pointers.
        let (session, path) = unsafe { (handle(session, "session")?, text(path, "path")?) };
        Ok(lock(session)?.session.save_state(Path::new(path))?)
    })
}

/// Restores a conversation saved by [`petrel_session_save`] from a session of the same
/// model file and KV-cache type; on an error the session is left empty.
///
/// # Safety
/// `session` is NULL or a live session; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn petrel_session_load(session: *const petrel_session, path: *const c_char) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or valid pointers.
        let (session, path) = unsafe { (handle(session, "session")?, text(path, "path")?) };
        Ok(lock(session)?.session.load_state(Path::new(path))?)
    })
}

/// Tokenizes `text`: writes up to `capacity` ids to `out` (NULL when `capacity` is 0) and
/// the number of ids to `*count`; `PETREL_ERR_BUFFER_TOO_SMALL` when they do not fit.
/// BOS first when the vocabulary asks for it and `add_bos`; special-token texts parsed
/// when `parse_special`.
///
/// # Safety
/// `model` NULL or live; `text` NULL or NUL-terminated; `out` NULL or writable for
/// `capacity` ids; `count` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn petrel_tokenize(
    model: *const petrel_model,
    text: *const c_char,
    add_bos: bool,
    parse_special: bool,
    out: *mut u32,
    capacity: usize,
    count: *mut usize,
) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or valid pointers.
        let (model, input) = unsafe { (handle(model, "model")?, self::text(text, "text")?) };
        if count.is_null() || (out.is_null() && capacity > 0) {
            return Err(Failure::invalid("count is NULL, or out is NULL with a capacity"));
        }
        let ids = model.model.tokenize(input, add_bos, parse_special);
        // SAFETY: non-NULL and writable by the contract.
        unsafe { count.write(ids.len()) };
        if ids.len() > capacity {
            return Err(Failure {
                status: PETREL_ERR_BUFFER_TOO_SMALL,
                message: format!("{} ids do not fit {capacity}", ids.len()),
            });
        }
        if !ids.is_empty() {
            // SAFETY: `out` is writable for `capacity` ≥ `ids.len()` ids and does not overlap `ids`.
            unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), out, ids.len()) };
        }
        Ok(())
    })
}

/// Writes the text of `ids[0..n]` to `out` as a NUL-terminated string of at most
/// `capacity` bytes, and its length (without the NUL) to `*length`;
/// `PETREL_ERR_BUFFER_TOO_SMALL` when it does not fit.
///
/// # Safety
/// `model` NULL or live; `ids` NULL (with `n` 0) or readable for `n` ids; `out` NULL or
/// writable for `capacity` bytes; `length` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn petrel_detokenize(
    model: *const petrel_model,
    ids: *const u32,
    n: usize,
    out: *mut c_char,
    capacity: usize,
    length: *mut usize,
) -> petrel_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a live model.
        let model = unsafe { handle(model, "model") }?;
        if length.is_null() || (ids.is_null() && n > 0) || (out.is_null() && capacity > 0) {
            return Err(Failure::invalid("length is NULL, or ids/out is NULL with a size"));
        }
        let ids: &[u32] = if n == 0 {
            &[]
        } else {
            // SAFETY: non-NULL and readable for `n` ids by the contract.
            unsafe { std::slice::from_raw_parts(ids, n) }
        };
        let text = model.model.detokenize(ids)?;
        // SAFETY: non-NULL and writable by the contract.
        unsafe { length.write(text.len()) };
        if text.len() + 1 > capacity {
            return Err(Failure {
                status: PETREL_ERR_BUFFER_TOO_SMALL,
                message: format!("{} bytes and a NUL do not fit {capacity}", text.len()),
            });
        }
        // SAFETY: `out` is writable for `capacity` > `text.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), out.cast::<u8>(), text.len());
            out.add(text.len()).write(0);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests;
