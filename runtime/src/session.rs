//! A generation session: one model, one KV cache allocated once, and the decode loop.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use petrel_quant::Kernels;

use crate::backend::native::NativeBackend;
use crate::backend::Backend;
use crate::forward::{forward, forward_member, ActivationTap, Compute, Logits, RunState};
use crate::kv_cache::{KvCache, KvType};
use crate::kv_predict::{predicted_prefill_member, KvPredictor};
use crate::model::Model;
use crate::parallel::Team;
use crate::routing::PrefillRouting;
use crate::sampler::Sampler;

/// How a session is set up.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Positions the KV cache holds (prompt plus generated tokens); `0` means the model's
    /// trained context length.
    pub capacity: usize,
    /// Tokens per prefill batch (bounds scratch memory: about `max_batch × 4 × (ffn_dim +
    /// 2 dim)` bytes per thread, 15 MB for Qwen2.5-0.5B at the default 256). A mixture-of-
    /// depths model takes its top-k over each batch. 256 rather than 64 spreads each
    /// unpacked weight panel over four times the tokens: +16–17% prefill at 256 tokens on
    /// Qwen2.5-Coder-0.5B and SmolLM2 Q4_0, one thread (`petrel-bench --max-batch`).
    pub max_batch: usize,
    /// Threads for matmuls and attention (ignored without `std`).
    pub threads: usize,
    /// Dot-product kernels; `None` picks the fastest this CPU runs.
    pub kernels: Option<Kernels>,
    /// Prefill matrix products on AMX-INT8 tiles where the CPU has them (bit-identical to
    /// the AVX-512 VNNI panel kernel used otherwise). Off by default: on the Xeon we
    /// measure, the per-block float step bounds both kernels and AMX is not faster end to
    /// end (`petrel-bench panels`).
    pub amx: bool,
    /// How a mixture-of-depths model routes prefill batches (decoding always takes the
    /// causal decision). Ignored by dense models.
    pub prefill_routing: PrefillRouting,
    /// Prefill a fresh conversation by KV prediction ([`crate::kv_predict`]): the model's
    /// auxiliary model reads the prompt, its keys and values are mapped into the base's
    /// cache, and the base runs only the last prompt token. Needs a model with a predictor;
    /// later turns of a conversation (a prefill at a position above 0) and one-token prompts
    /// run the base as usual.
    pub kv_prediction: bool,
    /// How the KV cache stores keys and values (the auxiliary model's cache included).
    pub kv_type: KvType,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            capacity: 0,
            max_batch: 256,
            threads: 1,
            kernels: None,
            amx: false,
            prefill_routing: PrefillRouting::TopK,
            kv_prediction: false,
            kv_type: KvType::F32,
        }
    }
}

/// Why a session refused work. Nothing is written to the cache when an error is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionError {
    /// The tokens do not fit: `needed` positions against a cache of `capacity`.
    ContextFull { needed: usize, capacity: usize },
    /// A token id outside the vocabulary.
    TokenOutOfRange { token: u32, vocab_size: usize },
    /// Prefill was called with no tokens.
    EmptyPrompt,
    /// The requested capacity exceeds the model's trained context length.
    CapacityTooLarge { requested: usize, context_length: usize },
    /// The KV cache (`bytes`) could not be allocated.
    OutOfMemory { bytes: usize },
    /// KV prediction was asked for, but the model file has no predictor.
    NoKvPredictor,
    /// KV prediction was asked for with a cache type that stores rotated keys
    /// ([`KvType::rotates_heads`]), which the predictor's maps do not expect.
    KvTypeWithPrediction { kv_type: &'static str },
    /// A 4-bit cache needs an even head size of at most [`crate::ops::MAX_Q4_HEAD`].
    KvTypeHeadSize { kv_type: &'static str, head_dim: usize },
    /// A saved state ([`Session::load_state`]) that does not fit this session.
    BadState(crate::kv_cache::StateError),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::ContextFull { needed, capacity } => {
                write!(f, "the context holds {capacity} tokens but {needed} are needed")
            }
            SessionError::TokenOutOfRange { token, vocab_size } => {
                write!(f, "token id {token} is outside the vocabulary of {vocab_size}")
            }
            SessionError::EmptyPrompt => write!(f, "the prompt is empty"),
            SessionError::CapacityTooLarge { requested, context_length } => {
                write!(f, "a context of {requested} tokens exceeds the model's {context_length}")
            }
            SessionError::OutOfMemory { bytes } => {
                write!(f, "cannot allocate {bytes} bytes for the KV cache (choose a smaller context)")
            }
            SessionError::NoKvPredictor => {
                write!(f, "the model has no KV predictor (petrel.kvp.* metadata); make one with `petrel kvp-fit`")
            }
            SessionError::KvTypeWithPrediction { kv_type } => {
                write!(
                    f,
                    "KV prediction cannot fill a {kv_type} cache (it stores rotated keys); use --kv-type f32 or f16"
                )
            }
            SessionError::KvTypeHeadSize { kv_type, head_dim } => write!(
                f,
                "a {kv_type} cache needs an even head size of at most {}, and this model's is {head_dim}",
                crate::ops::MAX_Q4_HEAD
            ),
            SessionError::BadState(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SessionError {}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The token callback asked to stop.
    Callback,
    /// The KV cache is full.
    ContextFull,
}

/// Model, cache and scratch for one conversation.
#[derive(Debug)]
pub struct Session<'m, 'a> {
    model: &'m Model<'a>,
    cache: KvCache,
    /// One scratch state per team member; member 0's holds the logits.
    states: Vec<spin::Mutex<RunState>>,
    team: Team,
    /// Petrel's own kernels, used unless the session was made with another backend.
    native: NativeBackend,
    /// The backend given to [`Session::with_backend`].
    external: Option<&'m dyn Backend>,
    position: usize,
    prefill_routing: PrefillRouting,
    /// The auxiliary model's cache, when prefills use KV prediction.
    aux_cache: Option<KvCache>,
}

impl<'m, 'a> Session<'m, 'a> {
    /// Allocates the cache and scratch buffers. After this, generation allocates nothing
    /// (with several threads, [`Session::prefill`] and [`Session::step`] start the team's
    /// threads per call; [`Session::generate`] starts them once per reply).
    pub fn new(model: &'m Model<'a>, options: SessionOptions) -> Result<Self, SessionError> {
        Self::build(model, options, None)
    }

    /// As [`Session::new`], computing with `backend` instead of Petrel's own kernels
    /// (`options.kernels` is then unused). The team has at most `backend.max_team()`
    /// threads; a backend that threads internally runs with one.
    pub fn with_backend(
        model: &'m Model<'a>,
        options: SessionOptions,
        backend: &'m dyn Backend,
    ) -> Result<Self, SessionError> {
        Self::build(model, options, Some(backend))
    }

    fn build(
        model: &'m Model<'a>,
        options: SessionOptions,
        external: Option<&'m dyn Backend>,
    ) -> Result<Self, SessionError> {
        let context_length = model.config.context_length;
        let capacity = if options.capacity == 0 { context_length } else { options.capacity };
        if capacity > context_length {
            return Err(SessionError::CapacityTooLarge { requested: capacity, context_length });
        }
        let team = Team::new(options.threads.min(external.map_or(usize::MAX, |b| b.max_team())));
        let native = NativeBackend::with_kernels(options.kernels.unwrap_or_else(Kernels::detect));
        let native = if options.amx { native.with_amx() } else { native };
        let kv_type = options.kv_type;
        if options.kv_prediction && kv_type.rotates_heads() {
            return Err(SessionError::KvTypeWithPrediction { kv_type: kv_type.name() });
        }
        let head_dim = model.config.head_dim;
        if kv_type == KvType::Q4 && (!head_dim.is_multiple_of(2) || head_dim > crate::ops::MAX_Q4_HEAD) {
            return Err(SessionError::KvTypeHeadSize { kv_type: kv_type.name(), head_dim });
        }
        let cache = KvCache::new(&model.config, capacity, kv_type)
            .ok_or(SessionError::OutOfMemory { bytes: KvCache::bytes_for(&model.config, capacity, kv_type) })?;
        let aux_cache = match (options.kv_prediction, &model.kv_predictor) {
            (false, _) => None,
            (true, None) => return Err(SessionError::NoKvPredictor),
            (true, Some(p)) => Some(
                KvCache::new(&p.aux.config, capacity, kv_type)
                    .ok_or(SessionError::OutOfMemory { bytes: KvCache::bytes_for(&p.aux.config, capacity, kv_type) })?,
            ),
        };
        Ok(Session {
            model,
            cache,
            states: (0..team.threads())
                .map(|_| spin::Mutex::new(RunState::new(&model.config, options.max_batch)))
                .collect(),
            team,
            native,
            external,
            position: 0,
            prefill_routing: options.prefill_routing,
            aux_cache,
        })
    }

    /// Whether a prefill of `tokens` now would use KV prediction: it is on, the
    /// conversation is empty and the prompt has at least two tokens.
    pub fn predicts_prefill(&self, tokens: &[u32]) -> bool {
        self.predictor_for(tokens).is_some()
    }

    fn predictor_for(&self, tokens: &[u32]) -> Option<&'m KvPredictor<'a>> {
        let model: &'m Model<'a> = self.model;
        match (&self.aux_cache, &model.kv_predictor, self.position, tokens.len()) {
            (Some(_), Some(p), 0, 2..) => Some(p),
            _ => None,
        }
    }

    /// The model.
    pub fn model(&self) -> &'m Model<'a> {
        self.model
    }

    /// Tokens in the cache so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Bytes of the KV cache (the auxiliary model's included, with KV prediction on).
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes() + self.aux_cache.as_ref().map_or(0, KvCache::bytes)
    }

    /// Bytes of keys and values written so far. In a mixture-of-depths model routed
    /// blocks hold rows for their routed tokens only, so this is below
    /// `position × layers × 2 × kv_dim × 4`.
    pub fn cache_bytes_in_use(&self) -> usize {
        self.cache.bytes_in_use()
    }

    /// Tokens that have gone through block `layer` so far (its cache rows): the session's
    /// position for a dense block, fewer for a routed one.
    pub fn tokens_through(&self, layer: usize) -> usize {
        self.cache.len(layer)
    }

    /// The keys (after RoPE, and rotated per head for a cache type that
    /// [`KvType::rotates_heads`]) and values cached for block `layer`, widened to f32:
    /// [`Session::tokens_through`] rows of `kv_dim` each, row-major, in position order.
    pub fn kv_rows(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let n = self.cache.len(layer) * self.model.config.kv_dim();
        let (keys, values) = self.cache.layer(layer);
        let (mut k, mut v) = (vec![0f32; n], vec![0f32; n]);
        keys.read(0..n, &mut k);
        values.read(0..n, &mut v);
        (k, v)
    }

    /// How the KV cache stores keys and values.
    pub fn kv_type(&self) -> KvType {
        self.cache.kv_type()
    }

    /// KV-cache bytes per token of context (every layer's keys, values and position; the
    /// auxiliary model's cache included, with KV prediction on).
    pub fn cache_bytes_per_token(&self) -> usize {
        self.cache.bytes_per_token() + self.aux_cache.as_ref().map_or(0, KvCache::bytes_per_token)
    }

    /// Positions of the tokens that have gone through block `layer`, increasing.
    pub fn positions_through(&self, layer: usize) -> &[u32] {
        self.cache.positions(layer)
    }

    /// The native kernels (in use unless the session has another backend).
    pub fn kernels(&self) -> Kernels {
        self.native.kernels
    }

    /// The native prefill panel kernel for block weights, where this CPU has one.
    pub fn panel_kernel(&self) -> Option<petrel_quant::gemm::PanelGemm> {
        self.native.panel
    }

    /// The backend that computes: `native` unless made by [`Session::with_backend`].
    pub fn backend_name(&self) -> &'static str {
        self.external.map_or("native", |b| b.name())
    }

    /// Threads in use.
    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    /// Forgets the conversation (the cache is reused, not freed).
    pub fn reset(&mut self) {
        self.position = 0;
        self.cache.truncate(0);
    }

    /// Drops cached positions from `position` on (e.g. to retry a turn).
    pub fn truncate(&mut self, position: usize) {
        self.position = self.position.min(position);
        self.cache.truncate(self.position);
    }

    fn check(&self, tokens: &[u32]) -> Result<(), SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        let needed = self.position + tokens.len();
        if needed > self.cache.capacity() {
            return Err(SessionError::ContextFull { needed, capacity: self.cache.capacity() });
        }
        let vocab_size = self.model.config.vocab_size;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(SessionError::TokenOutOfRange { token, vocab_size });
        }
        Ok(())
    }

    /// Appends `tokens` to the conversation and returns the logits after the last one. A
    /// mixture-of-depths model routes them as [`SessionOptions::prefill_routing`] says;
    /// with [`SessionOptions::kv_prediction`] a fresh conversation's prompt is prefilled
    /// by KV prediction.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&mut [f32], SessionError> {
        self.prefill_with_tap(tokens, None, self.prefill_routing)
    }

    /// As [`Session::prefill`], showing the input of every linear layer to `tap` on the
    /// way (calibration and activation statistics).
    pub fn prefill_observed(&mut self, tokens: &[u32], tap: &dyn ActivationTap) -> Result<&mut [f32], SessionError> {
        self.prefill_with_tap(tokens, Some(tap), self.prefill_routing)
    }

    fn prefill_with_tap(
        &mut self,
        tokens: &[u32],
        tap: Option<&dyn ActivationTap>,
        routing: PrefillRouting,
    ) -> Result<&mut [f32], SessionError> {
        self.check(tokens)?;
        let backend: &dyn Backend = self.external.unwrap_or(&self.native);
        let compute = Compute { backend, team: &self.team, tap };
        match (self.predictor_for(tokens), self.aux_cache.as_mut()) {
            (Some(predictor), Some(aux_cache)) => {
                aux_cache.truncate(0);
                let (model, states) = (self.model, &self.states);
                let (aux_cache, cache) = (spin::RwLock::new(aux_cache), spin::RwLock::new(&mut self.cache));
                self.team.run(|member| {
                    let mut state = states[member.index()].lock();
                    predicted_prefill_member(
                        model, predictor, &mut state, &aux_cache, &cache, &compute, member, tokens,
                    );
                });
            }
            _ => forward(
                self.model,
                &self.states,
                &mut self.cache,
                &compute,
                tokens,
                self.position,
                Logits::Last,
                routing,
            ),
        }
        self.position += tokens.len();
        Ok(self.states[0].get_mut().logits_mut())
    }

    /// Appends one token and returns the logits after it (a mixture-of-depths model routes
    /// it by its causal decision). Single-threaded sessions allocate nothing here; for a
    /// decode loop on several threads prefer [`Session::generate`].
    pub fn step(&mut self, token: u32) -> Result<&mut [f32], SessionError> {
        self.prefill_with_tap(&[token], None, PrefillRouting::Causal)
    }

    /// Appends `tokens` and writes the logits after *every* one of them into `out`
    /// (`tokens.len() × vocab_size`, row-major). For evaluation (slower per token than
    /// [`Session::prefill`]: the output head runs once per token).
    ///
    /// # Panics
    /// If `out` is shorter than `tokens.len() × vocab_size`.
    pub fn prefill_all_logits(&mut self, tokens: &[u32], out: &mut [f32]) -> Result<(), SessionError> {
        self.check(tokens)?;
        let vocab = self.model.config.vocab_size;
        assert!(out.len() >= tokens.len() * vocab, "logits buffer too small");
        let backend: &dyn Backend = self.external.unwrap_or(&self.native);
        let compute = Compute { backend, team: &self.team, tap: None };
        let logits = Logits::All(out);
        forward(
            self.model,
            &self.states,
            &mut self.cache,
            &compute,
            tokens,
            self.position,
            logits,
            self.prefill_routing,
        );
        self.position += tokens.len();
        Ok(())
    }

    /// Appends the conversation's state to `out`: the position (`u64`, little-endian)
    /// and the cache ([`KvCache::save`]). With [`Session::load_state`], a conversation
    /// continues later, or in another process, exactly where it stopped.
    pub fn save_state(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.position as u64).to_le_bytes());
        self.cache.save(out);
    }

    /// Replaces the conversation with one [`Session::save_state`] wrote, from a session of
    /// the same model and cache type (the context may differ if it holds the saved
    /// positions). On an error the session is reset.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let result = self.load_state_unchecked(bytes);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn load_state_unchecked(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        use crate::kv_cache::StateError;
        let (head, mut rest) = bytes.split_at_checked(8).ok_or(SessionError::BadState(StateError::Truncated))?;
        let mut position = [0u8; 8];
        position.copy_from_slice(head);
        let position = u64::from_le_bytes(position);
        self.cache.load(&mut rest).map_err(SessionError::BadState)?;
        if !rest.is_empty() {
            return Err(SessionError::BadState(StateError::Corrupt("bytes after the cache")));
        }
        let capacity = self.cache.capacity() as u64;
        let beyond = (0..self.model.config.layers)
            .any(|l| self.cache.positions(l).last().is_some_and(|&p| p as u64 >= position));
        if position > capacity || beyond {
            return Err(SessionError::BadState(StateError::Corrupt("the position does not match the cache")));
        }
        self.position = position as usize;
        Ok(())
    }

    /// Prefills `prompt`, then samples up to `max_new_tokens`, calling `on_token` with each
    /// new token as soon as it is chosen (return `false` to stop). One thread team serves
    /// the whole call, and the decode loop allocates nothing.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        max_new_tokens: usize,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<StopReason, SessionError> {
        self.check(prompt)?;
        for &t in prompt {
            sampler.observe(t);
        }
        let (model, states, start, capacity) = (self.model, &self.states, self.position, self.cache.capacity());
        let (prompt_routing, decode) = (self.prefill_routing, PrefillRouting::Causal);
        let backend: &dyn Backend = self.external.unwrap_or(&self.native);
        let compute = Compute { backend, team: &self.team, tap: None };
        let predicted = match (self.predictor_for(prompt), self.aux_cache.as_mut()) {
            (Some(predictor), Some(aux_cache)) => {
                aux_cache.truncate(0);
                Some((predictor, spin::RwLock::new(aux_cache)))
            }
            _ => None,
        };
        let cache = spin::RwLock::new(&mut self.cache);
        let run_prompt = |member: &crate::parallel::Member<'_>, state: &mut RunState| match &predicted {
            Some((predictor, aux_cache)) => {
                predicted_prefill_member(model, predictor, state, aux_cache, &cache, &compute, member, prompt)
            }
            None => forward_member(model, state, &cache, &compute, member, prompt, start, None, prompt_routing),
        };
        // What the leader asks of the workers after each barrier: `None` ends the call.
        let next: spin::Mutex<Option<(u32, usize)>> = spin::Mutex::new(None);
        let (reason, end) = self.team.run_led(
            |member| {
                let mut state = states[member.index()].lock();
                run_prompt(member, &mut state);
                loop {
                    member.barrier();
                    let Some((token, position)) = *next.lock() else { return };
                    forward_member(model, &mut state, &cache, &compute, member, &[token], position, None, decode);
                }
            },
            |member| {
                let mut state = states[member.index()].lock();
                run_prompt(member, &mut state);
                let mut position = start + prompt.len();
                if max_new_tokens == 0 {
                    member.barrier();
                    return (StopReason::MaxTokens, position);
                }
                let mut generated = 0;
                let reason = loop {
                    let token = sampler.sample(state.logits_mut());
                    sampler.observe(token);
                    let stop = if model.tokenizer.is_end_of_generation(token) {
                        Some(StopReason::EndOfGeneration)
                    } else if !on_token(token) {
                        Some(StopReason::Callback)
                    } else if generated + 1 >= max_new_tokens {
                        Some(StopReason::MaxTokens)
                    } else if position >= capacity {
                        Some(StopReason::ContextFull)
                    } else {
                        None
                    };
                    generated += 1;
                    *next.lock() = stop.is_none().then_some((token, position));
                    member.barrier();
                    if let Some(reason) = stop {
                        break reason;
                    }
                    forward_member(model, &mut state, &cache, &compute, member, &[token], position, None, decode);
                    position += 1;
                };
                (reason, position)
            },
        );
        self.position = end;
        Ok(reason)
    }
}
