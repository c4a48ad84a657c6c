//! An owned conversation: a model handle, its KV cache and the tokens the cache holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use petrel_runtime::tokenizer::ChatMessage;
use petrel_runtime::{KvType, Sampler, SamplerConfig, SessionOptions, StopReason as RuntimeStop};

use crate::error::{Error, ErrorKind, Result};
use crate::generation::{Completion, Decoding, Step, StopReason};
use crate::model::{Loaded, Model};

/// How a session is set up.
#[derive(Clone, Debug)]
pub struct SessionParams {
    /// Positions the KV cache holds (prompt, reply and earlier turns); `0` means 4,096 or
    /// the model's trained context length if smaller.
    pub context: usize,
    /// Threads for the matrix products and attention; `0` means every available core.
    pub threads: usize,
    /// How the cache stores keys and values (see [`KvType`]; f16 by default: half of
    /// f32's bytes at the same perplexity).
    pub kv_type: KvType,
    /// Prefill a fresh conversation by KV prediction (files made by `petrel kvp-fit`).
    pub kv_prediction: bool,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams { context: 0, threads: 0, kv_type: KvType::F16, kv_prediction: false }
    }
}

/// How tokens are chosen and when a reply ends.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; `0` is greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`0` keeps all).
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: f32,
    /// Divides the logits of tokens already seen (`1` is off).
    pub repeat_penalty: f32,
    /// Random seed; the same seed, prompt and session give the same reply.
    pub seed: u64,
    /// The reply ends before the first occurrence of any of these texts (not included).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 256,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            seed: 0x5EED,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Refuses values no sampler can use (negative or non-finite temperature, `top_p`
    /// outside `(0, 1]`, a penalty that is not positive).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::new(ErrorKind::InvalidArgument, what));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number ≥ 0, not {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad(format!("repeat_penalty must be a finite number > 0, not {}", self.repeat_penalty));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop sequences must not be empty".into());
        }
        Ok(())
    }

    fn sampler(&self, vocab_size: usize) -> Sampler {
        let config = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplerConfig::default()
        };
        Sampler::new(config, vocab_size)
    }
}

/// Stops a generation from another thread ([`Session::cancel_handle`]).
#[derive(Clone, Debug)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Ends the session's running generation after its current token (its
    /// [`StopReason`] is then `Cancelled`). A cancel while nothing runs ends the next
    /// generation at its first token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
}

type RuntimeSession<'a> = petrel_runtime::Session<'a, 'a>;

self_cell::self_cell!(
    /// A model handle and the runtime session borrowing it.
    struct SessionCell {
        owner: Arc<Loaded>,
        #[covariant]
        dependent: RuntimeSession,
    }
);

/// One conversation: a KV cache allocated once at the chosen context, and the tokens it
/// holds. `Session` owns a handle to its model, so it is `'static` and `Send`: keep it in
/// a struct, move it to a worker thread. One session computes one generation at a time
/// (`&mut self`); make one session per concurrent conversation.
///
/// Text given to [`Session::generate`] continues what the session holds; [`Session::chat`]
/// renders a whole conversation with the model's template and reuses the cached prefix
/// it shares with the previous turn.
pub struct Session {
    cell: SessionCell,
    model: Model,
    /// The tokens of the conversation: what the cache holds, then possibly one sampled
    /// token that has not been fed yet (the last token of a reply).
    history: Vec<u32>,
    cancel: Arc<AtomicBool>,
    params: SessionParams,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model.path())
            .field("tokens", &self.history.len())
            .field("params", &self.params)
            .finish()
    }
}

impl Session {
    /// Allocates the KV cache and scratch memory for `model`. Generation allocates nothing
    /// more per token.
    pub fn new(model: &Model, params: &SessionParams) -> Result<Session> {
        let context_length = model.context_length();
        let capacity = match params.context {
            0 => context_length.min(4096),
            n => n,
        };
        let threads = match params.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let options = SessionOptions {
            capacity,
            threads,
            kv_type: params.kv_type,
            kv_prediction: params.kv_prediction,
            ..SessionOptions::default()
        };
        let cell = SessionCell::try_new(Arc::clone(&model.loaded), |loaded| {
            petrel_runtime::Session::new(loaded.runtime(), options)
        })?;
        Ok(Session {
            cell,
            model: model.clone(),
            history: Vec::new(),
            cancel: Arc::new(AtomicBool::new(false)),
            params: SessionParams { context: capacity, threads, ..params.clone() },
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The parameters, with `context` and `threads` resolved.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Positions the cache holds.
    pub fn context(&self) -> usize {
        self.params.context
    }

    /// The conversation's tokens so far (prompts and replies).
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Bytes of KV cache per token of context.
    pub fn cache_bytes_per_token(&self) -> usize {
        self.cell.borrow_dependent().cache_bytes_per_token()
    }

    /// A handle that cancels this session's generation from any thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(Arc::clone(&self.cancel))
    }

    /// Forgets the conversation (the cache is kept, emptied).
    pub fn reset(&mut self) {
        self.cell.with_dependent_mut(|_, session| session.reset());
        self.history.clear();
    }

    fn position(&self) -> usize {
        self.cell.borrow_dependent().position()
    }

    /// Continues the conversation with `prompt` (plain text; special-token texts are not
    /// parsed; BOS is added first if the session is empty and the vocabulary asks for it)
    /// and generates a reply, calling `on_text` with each piece of text as soon as it is
    /// complete UTF-8 (return `false` to stop).
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        let ids = self.model.tokenize(prompt, self.history.is_empty(), false);
        self.generate_tokens(&ids, params, on_text)
    }

    /// As [`Session::generate`], from token ids.
    pub fn generate_tokens(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        let feed = self.prepare_continuation(prompt, params)?;
        self.run(&feed, params, on_text)
    }

    /// Renders `messages` (the whole conversation so far, ending with the user's turn)
    /// with the model's chat template, feeds what the cache does not hold yet (the tokens
    /// after the longest prefix shared with what it holds), and generates the assistant's
    /// reply as [`Session::generate`] does.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        let feed = self.prepare_chat(messages, params)?;
        self.run(&feed, params, on_text)
    }

    /// The reply to `prompt` (as [`Session::generate`]) as an iterator of text pieces,
    /// one token computed per call of `next`. Dropping the iterator early ends the reply.
    pub fn stream(&mut self, prompt: &str, params: &SamplingParams) -> Result<Stream<'_>> {
        let ids = self.model.tokenize(prompt, self.history.is_empty(), false);
        let feed = self.prepare_continuation(&ids, params)?;
        Ok(Stream::new(self, feed, params))
    }

    /// [`Session::chat`] as an iterator of text pieces.
    pub fn stream_chat(&mut self, messages: &[ChatMessage], params: &SamplingParams) -> Result<Stream<'_>> {
        let feed = self.prepare_chat(messages, params)?;
        Ok(Stream::new(self, feed, params))
    }

    /// The tokens to feed to continue with `prompt`: an unfed last token, then the prompt.
    fn prepare_continuation(&mut self, prompt: &[u32], params: &SamplingParams) -> Result<Vec<u32>> {
        params.validate()?;
        let vocab = self.model.vocab_size();
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let position = self.position();
        let mut feed = self.history[position..].to_vec();
        feed.extend_from_slice(prompt);
        if feed.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "the prompt is empty"));
        }
        self.check_fits(position, feed.len())?;
        Ok(feed)
    }

    fn prepare_chat(&mut self, messages: &[ChatMessage], params: &SamplingParams) -> Result<Vec<u32>> {
        params.validate()?;
        if messages.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "the conversation has no messages"));
        }
        let text = self.model.render_chat(messages, true)?;
        let prompt = self.model.tokenize(&text, true, true);
        let held = self.position();
        // Keep at least one token to feed: its logits choose the first reply token.
        let common = prompt.iter().zip(&self.history[..held]).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        self.check_fits(common, prompt.len() - common)?;
        self.cell.with_dependent_mut(|_, session| session.truncate(common));
        self.history.truncate(common);
        Ok(prompt[common..].to_vec())
    }

    /// Refuses a prompt that leaves no room for a reply token.
    fn check_fits(&self, position: usize, tokens: usize) -> Result<()> {
        if position + tokens >= self.context() {
            return Err(Error::new(
                ErrorKind::ContextFull,
                format!(
                    "the prompt has {tokens} tokens after the {position} the session holds, but the context holds {} (raise the context or reset the session)",
                    self.context()
                ),
            ));
        }
        Ok(())
    }

    /// Generates the reply to `feed` through the runtime's decode loop (one thread team
    /// for the whole reply).
    fn run(
        &mut self,
        feed: &[u32],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        let mut sampler = params.sampler(self.model.vocab_size());
        let mut decoding = Decoding::new(params);
        let model = self.model.clone();
        let cancel = Arc::clone(&self.cancel);
        let start = Instant::now();
        let mut first_token = None;
        let mut generated = Vec::with_capacity(params.max_tokens.min(4096));
        let held = self.position();
        let result = self.cell.with_dependent_mut(|_, session| {
            if params.max_tokens == 0 {
                return session.prefill(feed).map(|_| None);
            }
            session
                .generate(feed, &mut sampler, params.max_tokens, |token| {
                    first_token.get_or_insert_with(Instant::now);
                    match decoding.accept(&model, token, cancel.load(Ordering::Acquire)) {
                        Step::Text(text) => {
                            generated.push(token);
                            on_text(&text) && !decoding.is_done()
                        }
                        Step::Done => false,
                    }
                })
                .map(Some)
        });
        // On an error nothing was written to the cache, and the history stays as it was.
        let runtime_stop = result?;
        let end = Instant::now();
        // The cache now holds `feed` and every reply token but the last.
        self.history.truncate(held);
        self.history.extend_from_slice(feed);
        self.history.extend_from_slice(&generated);
        let tail = decoding.flush();
        if !tail.is_empty() {
            on_text(&tail);
        }
        let stop = match runtime_stop {
            None => StopReason::MaxTokens,
            Some(RuntimeStop::EndOfGeneration) => StopReason::EndOfGeneration,
            Some(RuntimeStop::MaxTokens) => StopReason::MaxTokens,
            Some(RuntimeStop::ContextFull) => StopReason::ContextFull,
            Some(RuntimeStop::Callback) => decoding.done().unwrap_or(StopReason::Cancelled),
        };
        if stop == StopReason::Cancelled {
            self.cancel.store(false, Ordering::Release);
        }
        let first = first_token.unwrap_or(end);
        Ok(Completion {
            text: decoding.text().to_string(),
            tokens: generated,
            prompt_tokens: feed.len(),
            stop,
            time_to_first_token: first - start,
            decode_time: end.saturating_duration_since(first),
        })
    }

    /// Saves the conversation (its tokens and KV cache) to `path`; see [`crate::state`].
    pub fn save_state(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let mut cache = Vec::new();
        self.cell.borrow_dependent().save_state(&mut cache);
        crate::state::write(path, &self.model, self.params.kv_type, &self.history, &cache)
    }

    /// Restores a conversation [`Session::save_state`] wrote, from a session of the same
    /// model file and KV-cache type. A file of another model, a truncated or altered file
    /// is refused, and the session is then empty.
    pub fn load_state(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let result = crate::state::read(path, &self.model, self.params.kv_type).and_then(|(tokens, cache)| {
            self.cell.with_dependent_mut(|_, session| session.load_state(&cache)).map_err(Error::from)?;
            if tokens.len() < self.position() || tokens.len() > self.position() + 1 {
                return Err(Error::new(ErrorKind::InvalidState, "the saved session's tokens do not match its cache"));
            }
            Ok(tokens)
        });
        match result {
            Ok(tokens) => {
                self.history = tokens;
                Ok(())
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }
}

/// A reply computed one token per [`Iterator::next`] (see [`Session::stream`]). Each item
/// is a piece of text; an error ends the iteration. [`Stream::completion`] gives the
/// summary once it has ended.
pub struct Stream<'s> {
    session: &'s mut Session,
    feed: Vec<u32>,
    sampler: Sampler,
    decoding: Decoding,
    generated: Vec<u32>,
    started: Option<Instant>,
    first_token: Option<Instant>,
    max_tokens: usize,
    completion: Option<Completion>,
    /// The last sampled token, to be fed before the next is sampled.
    pending: Option<u32>,
    /// Whether `feed` is in the cache.
    prefilled: bool,
    failed: bool,
}

impl<'s> Stream<'s> {
    fn new(session: &'s mut Session, feed: Vec<u32>, params: &SamplingParams) -> Self {
        let sampler = params.sampler(session.model.vocab_size());
        let decoding = Decoding::new(params);
        Stream {
            session,
            feed,
            sampler,
            decoding,
            generated: Vec::new(),
            started: None,
            first_token: None,
            max_tokens: params.max_tokens,
            completion: None,
            pending: None,
            prefilled: false,
            failed: false,
        }
    }

    /// The summary of the reply, once the iterator has returned `None`.
    pub fn completion(&self) -> Option<&Completion> {
        self.completion.as_ref()
    }

    /// Computes the next token; `Ok(None)` when the reply has ended.
    fn advance(&mut self) -> Result<Option<String>> {
        if self.completion.is_some() || self.failed {
            return Ok(None);
        }
        let session = &mut *self.session;
        let model = session.model.clone();
        if self.started.is_none() {
            self.started = Some(Instant::now());
            for &t in &self.feed {
                self.sampler.observe(t);
            }
        }
        loop {
            if self.decoding.is_done() {
                return self.end(None);
            }
            let (feed, sampler, pending, prefilled) = (&self.feed, &mut self.sampler, self.pending, self.prefilled);
            let held = session.position();
            let token = session.cell.with_dependent_mut(|_, s| {
                let logits = match pending {
                    _ if !prefilled => s.prefill(feed)?,
                    Some(t) if s.position() < s.capacity() => s.step(t)?,
                    _ => return Ok(None),
                };
                Ok::<_, petrel_runtime::SessionError>(Some(sampler.sample(logits)))
            })?;
            if !prefilled {
                session.history.truncate(held);
                session.history.extend_from_slice(feed);
                self.prefilled = true;
                if self.max_tokens == 0 {
                    return self.end(Some(StopReason::MaxTokens));
                }
            }
            let Some(token) = token else {
                return self.end(Some(StopReason::ContextFull));
            };
            self.sampler.observe(token);
            self.first_token.get_or_insert_with(Instant::now);
            let cancelled = session.cancel.load(Ordering::Acquire);
            match self.decoding.accept(&model, token, cancelled) {
                Step::Text(text) => {
                    self.generated.push(token);
                    session.history.push(token);
                    self.pending = Some(token);
                    if !text.is_empty() {
                        return Ok(Some(text));
                    }
                }
                Step::Done => return self.end(None),
            }
        }
    }

    /// Ends the reply (`stop` when the model side decided it): the last piece of text,
    /// then `None`.
    fn end(&mut self, stop: Option<StopReason>) -> Result<Option<String>> {
        let session = &mut *self.session;
        let end = Instant::now();
        let start = self.started.unwrap_or(end);
        let first = self.first_token.unwrap_or(end);
        let tail = self.decoding.flush();
        let stop = self.decoding.done().or(stop).unwrap_or(StopReason::MaxTokens);
        if stop == StopReason::Cancelled {
            session.cancel.store(false, Ordering::Release);
        }
        self.completion = Some(Completion {
            text: self.decoding.text().to_string(),
            tokens: std::mem::take(&mut self.generated),
            prompt_tokens: self.feed.len(),
            stop,
            time_to_first_token: first - start,
            decode_time: end.saturating_duration_since(first),
        });
        Ok((!tail.is_empty()).then_some(tail))
    }
}

impl Iterator for Stream<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.advance() {
            Ok(Some(text)) => Some(Ok(text)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
