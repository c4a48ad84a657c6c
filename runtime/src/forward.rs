//! The forward pass: token ids in, logits out, reading and extending the KV cache.
//!
//! Straight-line code in the manner of llama2.c: embedding, then per block
//! `x += post_norm(Wo · attention(rope(qk_norm(Wq · norm(x) + bq)),
//! rope(qk_norm(Wk · norm(x) + bk)), Wv · norm(x) + bv))` and
//! `x += post_norm(Wdown · (act(Wgate · norm(x)) ⊙ (Wup · norm(x))))`, then the final norm
//! and the output head. The optional parts (biases, Q/K norms, post-norms, the activation,
//! the RoPE pairing, a sliding window, the embedding scale) are present or not as the
//! model's [`crate::config::BlockDescription`] and per-layer
//! [`crate::config::LayerAttention`] say (Llama has none of them). Tokens are processed in
//! batches of up to `max_batch`; every buffer is allocated once in [`RunState::new`].
//!
//! Every member of the thread team runs this code (see [`crate::parallel`]): the cheap
//! per-token steps (norms, RoPE, SwiGLU on its own rows) on its private [`RunState`], the
//! matrix products and attention on its share, followed by an exchange of results.
//!
//! In a mixture-of-depths model ([`crate::routing`]) a routed block runs on the chosen
//! tokens only: their rows are gathered into a compact batch that keeps their positions
//! (for RoPE) and appends keys and values to that block's own cache rows, so attention
//! there covers only routed tokens; the other tokens' residuals pass unchanged.

use alloc::vec;
use alloc::vec::Vec;

use crate::backend::Backend;
use crate::config::{GatedActivation, ModelConfig};
use crate::kv_cache::KvCache;
use crate::linear::ActivationBatch;
use crate::linear::Gather;
use crate::model::{LayerWeights, Model};
use crate::ops;
use crate::parallel::{Member, Team};
use crate::routing::{self, Gate, MixtureOfDepths, PrefillRouting, Router};

/// Scratch buffers for a batch of up to `max_batch` tokens (all row-major by token).
#[derive(Debug)]
pub struct RunState {
    pub(crate) max_batch: usize,
    /// Residual stream, `max_batch × dim`.
    pub(crate) x: Vec<f32>,
    /// Normalized input of a sub-block, `max_batch × dim`.
    pub(crate) xb: Vec<f32>,
    /// Queries, `max_batch × q_dim`.
    pub(crate) q: Vec<f32>,
    /// Keys and values of the batch, `max_batch × kv_dim` each.
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Attention output (and projections' outputs), `max_batch × max(q_dim, dim)`.
    pub(crate) att: Vec<f32>,
    /// Scratch for per-head norms of queries and keys, `max_batch × max(q_dim, kv_dim)`
    /// (empty for models without Q/K norms).
    head_norm: Vec<f32>,
    /// MLP hidden activations, `max_batch × ffn_dim` each.
    gate: Vec<f32>,
    up: Vec<f32>,
    /// RoPE `(cos, sin)` pairs per token, `max_batch × rope_dim`, one table per distinct
    /// base ([`ModelConfig::rope_bases`]).
    pub(crate) rope: Vec<Vec<f32>>,
    /// Quantized activations for the integer kernels.
    pub(crate) act: ActivationBatch,
    /// Position of each token of the batch going through the current block, `max_batch`.
    positions: Vec<u32>,
    /// Mixture-of-depths scratch: router scores (`max_batch`), the chosen tokens' indices
    /// (`max_batch`), and the chosen tokens' residuals and RoPE tables (`max_batch × dim`,
    /// `max_batch × rope_dim` per base), swapped with `x` and `rope` while a routed block
    /// runs.
    scores: Vec<f32>,
    order: Vec<u32>,
    x_routed: Vec<f32>,
    rope_routed: Vec<Vec<f32>>,
    /// A block's input, kept for [`ActivationTap::observe_block`] (`max_batch × dim`; empty
    /// until a tap asks for it).
    block_input: Vec<f32>,
    /// Logits of the last token, `vocab_size`.
    logits: Vec<f32>,
}

impl RunState {
    /// Buffers for batches of up to `max_batch` tokens of `config`'s model.
    pub fn new(config: &ModelConfig, max_batch: usize) -> Self {
        let b = max_batch.max(1);
        let (dim, q_dim, kv, ffn) = (config.dim, config.q_dim(), config.kv_dim(), config.ffn_dim);
        let tables = || vec![vec![0.0; b * config.rope_dim]; config.rope_bases.len()];
        RunState {
            max_batch: b,
            x: vec![0.0; b * dim],
            xb: vec![0.0; b * dim],
            q: vec![0.0; b * q_dim],
            k: vec![0.0; b * kv],
            v: vec![0.0; b * kv],
            att: vec![0.0; b * q_dim.max(dim)],
            head_norm: if config.block.qk_norm { vec![0.0; b * q_dim.max(kv)] } else { Vec::new() },
            gate: vec![0.0; b * ffn],
            up: vec![0.0; b * ffn],
            rope: tables(),
            act: ActivationBatch::new(b, dim.max(ffn).max(q_dim)),
            positions: vec![0; b],
            scores: vec![0.0; b],
            order: vec![0; b],
            x_routed: vec![0.0; b * dim],
            rope_routed: tables(),
            block_input: Vec::new(),
            logits: vec![0.0; config.vocab_size],
        }
    }

    /// Tokens per batch.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Logits of the last token processed with [`Logits::Last`].
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Mutable logits of the last token (samplers may modify them in place).
    pub fn logits_mut(&mut self) -> &mut [f32] {
        &mut self.logits
    }
}

/// Which logits a forward pass computes.
#[derive(Debug)]
pub enum Logits<'o> {
    /// Only the last token's, into the leader's [`RunState::logits`].
    Last,
    /// Every token's, into the slice (`tokens × vocab_size`, row-major).
    All(&'o mut [f32]),
}

/// What the forward pass computes with: a backend and threads.
pub struct Compute<'t> {
    /// The arithmetic ([`crate::backend`]).
    pub backend: &'t dyn Backend,
    /// The threads that run the pass (a single member unless the backend takes more).
    pub team: &'t Team,
    /// Receives the input of every linear layer (calibration, statistics); `None` in
    /// normal use.
    pub tap: Option<&'t dyn ActivationTap>,
}

impl core::fmt::Debug for Compute<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Compute").field("backend", &self.backend.name()).field("team", &self.team).finish()
    }
}

impl core::fmt::Debug for dyn ActivationTap + '_ {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ActivationTap")
    }
}

/// Where in a block an [`ActivationTap`] observes activations: the inputs of the linear
/// layers, exactly as they are fed to them (after normalization, and after the online
/// Hadamard transform for `ffn_down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TapSite {
    /// Input of the query, key and value projections (`dim` wide).
    AttentionInput,
    /// Input of the attention output projection (`dim` wide).
    AttentionOutput,
    /// Input of the gate and up projections (`dim` wide).
    MlpInput,
    /// Input of the down projection (`ffn_dim` wide).
    DownInput,
}

impl TapSite {
    /// All sites, in the order a block reaches them.
    pub const ALL: [TapSite; 4] =
        [TapSite::AttentionInput, TapSite::AttentionOutput, TapSite::MlpInput, TapSite::DownInput];
}

/// An observer of the activations entering the linear layers; called by the team's
/// leader only, with `rows` holding `tokens × cols` values row-major.
pub trait ActivationTap: Sync {
    /// Sees the input of the linears at `site` of block `layer` for a batch of tokens.
    fn observe(&self, layer: usize, site: TapSite, rows: &[f32], tokens: usize, cols: usize);

    /// Sees the residual stream of the tokens that went through block `layer`, before
    /// (`input`) and after (`output`) it, `tokens × cols` row-major each. Does nothing
    /// unless implemented.
    fn observe_block(&self, layer: usize, input: &[f32], output: &[f32], tokens: usize, cols: usize) {
        let _ = (layer, input, output, tokens, cols);
    }

    /// Sees the keys (before RoPE) and values that block `layer` computed for the tokens at
    /// `positions`, `positions.len() × kv_dim` row-major each (merged heads). Does nothing
    /// unless implemented.
    fn observe_kv(&self, layer: usize, keys: &[f32], values: &[f32], positions: &[u32], kv_dim: usize) {
        let _ = (layer, keys, values, positions, kv_dim);
    }
}

/// Runs `tokens` at positions `first_position..`, appending their keys and values to
/// `cache`. `states` holds one [`RunState`] per team member (member 0's receives the
/// logits). The caller has checked that the positions fit the cache and that every token
/// id is below the vocabulary size. `routing` says how the routed blocks of a
/// mixture-of-depths model choose their tokens in each batch of up to `max_batch` tokens
/// (a lone token always takes the causal decision).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    model: &Model<'_>,
    states: &[spin::Mutex<RunState>],
    cache: &mut KvCache,
    compute: &Compute<'_>,
    tokens: &[u32],
    first_position: usize,
    logits: Logits<'_>,
    routing: PrefillRouting,
) {
    let cache = spin::RwLock::new(cache);
    let all_logits = match logits {
        Logits::Last => None,
        Logits::All(out) => Some(spin::Mutex::new(out)),
    };
    compute.team.run(|member| {
        let mut state = states[member.index()].lock();
        forward_member(
            model,
            &mut state,
            &cache,
            compute,
            member,
            tokens,
            first_position,
            all_logits.as_ref(),
            routing,
        );
    });
}

/// One team member's part of [`forward`], for callers that keep a team running across
/// several passes (see `Session::generate`). With `all_logits` absent, the leader's
/// `state.logits` receives the last token's logits.
#[allow(clippy::too_many_arguments)]
pub fn forward_member(
    model: &Model<'_>,
    s: &mut RunState,
    cache: &spin::RwLock<&mut KvCache>,
    compute: &Compute<'_>,
    member: &Member<'_>,
    tokens: &[u32],
    first_position: usize,
    all_logits: Option<&spin::Mutex<&mut [f32]>>,
    routing: PrefillRouting,
) {
    let batch = s.max_batch;
    let vocab = model.config.vocab_size;
    for (chunk_index, chunk) in tokens.chunks(batch).enumerate() {
        let position = first_position + chunk_index * batch;
        forward_batch(model, s, cache, compute, member, chunk, position, routing);
        match all_logits {
            None if (chunk_index + 1) * batch >= tokens.len() => {
                output_head(model, s, compute, member, chunk.len() - 1);
            }
            None => {}
            Some(out) => {
                // One token at a time, so the logits buffer stays `vocab_size` long.
                for t in 0..chunk.len() {
                    output_head(model, s, compute, member, t);
                    if member.is_leader() {
                        let row = (chunk_index * batch + t) * vocab;
                        out.lock()[row..row + vocab].copy_from_slice(&s.logits);
                    }
                }
            }
        }
    }
}

/// One batch through every block; leaves the residual stream in `s.x`.
#[allow(clippy::too_many_arguments)]
fn forward_batch(
    model: &Model<'_>,
    s: &mut RunState,
    cache: &spin::RwLock<&mut KvCache>,
    compute: &Compute<'_>,
    member: &Member<'_>,
    tokens: &[u32],
    position: usize,
    routing: PrefillRouting,
) {
    let c = &model.config;
    let (n, dim) = (tokens.len(), c.dim);

    for (t, &token) in tokens.iter().enumerate() {
        let x = &mut s.x[t * dim..(t + 1) * dim];
        model.token_embedding.dequantize_row(token as usize, x);
        if let Some(scale) = c.embedding_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        for (table, &base) in s.rope.iter_mut().zip(&c.rope_bases) {
            ops::rope_table(&mut table[t * c.rope_dim..(t + 1) * c.rope_dim], position + t, c.rope_dim, base);
        }
    }

    for (l, layer) in model.layers.iter().enumerate() {
        let Some((mod_config, router)) = model.routing.as_ref().and_then(|m| Some((m, m.router(l)?))) else {
            for (t, p) in s.positions[..n].iter_mut().enumerate() {
                *p = (position + t) as u32;
            }
            run_block(model, l, layer, s, cache, compute, member, n);
            continue;
        };
        // Mixture of depths: choose the tokens, run the block on them alone (their rows
        // gathered into `x_routed`, which takes `x`'s place), and merge their outputs back.
        for t in 0..n {
            s.scores[t] = router.score(&s.x[t * dim..(t + 1) * dim]);
        }
        let chosen = choose_tokens(mod_config, router, s, n, position, routing, c.norm_eps, compute.backend);
        if chosen == 0 {
            continue;
        }
        for (j, &t) in s.order[..chosen].iter().enumerate() {
            let t = t as usize;
            s.x_routed[j * dim..(j + 1) * dim].copy_from_slice(&s.x[t * dim..(t + 1) * dim]);
            let r = c.rope_dim;
            for (routed, table) in s.rope_routed.iter_mut().zip(&s.rope) {
                routed[j * r..(j + 1) * r].copy_from_slice(&table[t * r..(t + 1) * r]);
            }
            s.positions[j] = (position + t) as u32;
        }
        core::mem::swap(&mut s.x, &mut s.x_routed);
        core::mem::swap(&mut s.rope, &mut s.rope_routed);
        run_block(model, l, layer, s, cache, compute, member, chosen);
        core::mem::swap(&mut s.x, &mut s.x_routed);
        core::mem::swap(&mut s.rope, &mut s.rope_routed);
        for (j, &t) in s.order[..chosen].iter().enumerate() {
            let t = t as usize;
            let (x, out) = (&mut s.x[t * dim..(t + 1) * dim], &s.x_routed[j * dim..(j + 1) * dim]);
            match mod_config.gate {
                Gate::None => x.copy_from_slice(out),
                Gate::Sigmoid => {
                    let g = 1.0 / (1.0 + libm::expf(-s.scores[t]));
                    for (x, &y) in x.iter_mut().zip(out) {
                        *x += g * (y - *x);
                    }
                }
            }
        }
    }
}

/// Chooses the tokens of the batch in `s.x` (`n` tokens from `position` on) that go
/// through a routed block: their indices, increasing, in `s.order[..count]`; returns the
/// count. The router scores must already be in `s.scores`.
#[allow(clippy::too_many_arguments)]
fn choose_tokens(
    mod_config: &MixtureOfDepths,
    router: &Router,
    s: &mut RunState,
    n: usize,
    position: usize,
    routing: PrefillRouting,
    norm_eps: f32,
    backend: &dyn Backend,
) -> usize {
    let dim = s.x.len() / s.max_batch;
    // Attention-sink tokens (the first `sink_tokens` positions) always go through.
    let sinks = mod_config.sink_tokens.saturating_sub(position).min(n);
    match (routing, n) {
        (PrefillRouting::TopK, _) if n > 1 => {
            let k = routing::routed_count(mod_config.capacity, n).max(sinks);
            let rest = k - sinks;
            backend.top_k(&s.scores[sinks..n], rest, &mut s.order[sinks..]);
            for (i, slot) in s.order[..sinks].iter_mut().enumerate() {
                *slot = i as u32;
            }
            for i in &mut s.order[sinks..sinks + rest] {
                *i += sinks as u32;
            }
            sinks + rest
        }
        _ => {
            let mut m = 0;
            for t in 0..n {
                if t < sinks || router.routes(mod_config.decision, s.scores[t], &s.x[t * dim..(t + 1) * dim], norm_eps)
                {
                    s.order[m] = t as u32;
                    m += 1;
                }
            }
            m
        }
    }
}

/// Runs block `l` on the first `n` tokens of `s.x` (positions in `s.positions`, RoPE
/// tables in `s.rope`), appending their keys and values to the layer's cache rows.
#[allow(clippy::too_many_arguments)]
fn run_block(
    model: &Model<'_>,
    l: usize,
    layer: &LayerWeights<'_>,
    s: &mut RunState,
    cache: &spin::RwLock<&mut KvCache>,
    compute: &Compute<'_>,
    member: &Member<'_>,
    n: usize,
) {
    let c = &model.config;
    let (dim, q_dim, kv_dim, ffn) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
    let attention = c.attention[l];
    let observed = compute.tap.is_some() && member.is_leader();
    if observed {
        if s.block_input.len() < n * dim {
            s.block_input.resize(s.max_batch * dim, 0.0);
        }
        s.block_input[..n * dim].copy_from_slice(&s.x[..n * dim]);
    }

    // Attention.
    let backend = compute.backend;
    backend.rms_norm_rows(&mut s.xb[..n * dim], &s.x[..n * dim], &layer.attn_norm, c.norm_eps);
    clip_input(layer, 0, &mut s.xb[..n * dim]);
    s.act.load(&s.xb, n, dim);
    tap(compute, member, l, TapSite::AttentionInput, &s.xb[..n * dim], n, dim);
    backend.matmul(&layer.wq, &mut s.act, &mut s.q, member, Gather::All);
    backend.matmul(&layer.wk, &mut s.act, &mut s.k, member, Gather::All);
    backend.matmul(&layer.wv, &mut s.act, &mut s.v, member, Gather::All);
    if let Some(bias) = &layer.qkv_bias {
        add_to_rows(backend, &mut s.q[..n * q_dim], &bias.q);
        add_to_rows(backend, &mut s.k[..n * kv_dim], &bias.k);
        add_to_rows(backend, &mut s.v[..n * kv_dim], &bias.v);
    }
    if let (true, Some(tap)) = (observed, compute.tap) {
        tap.observe_kv(l, &s.k[..n * kv_dim], &s.v[..n * kv_dim], &s.positions[..n], kv_dim);
    }
    if let Some((q_norm, k_norm)) = &layer.qk_norm {
        norm_heads(backend, &mut s.q[..n * q_dim], &mut s.head_norm, q_norm, c.norm_eps);
        norm_heads(backend, &mut s.k[..n * kv_dim], &mut s.head_norm, k_norm, c.norm_eps);
    }
    let tables = &s.rope[attention.rope_table][..n * c.rope_dim];
    backend.rope(&mut s.q[..n * q_dim], tables, c.rope_dim, c.head_dim, c.block.rope_style);
    backend.rope(&mut s.k[..n * kv_dim], tables, c.rope_dim, c.head_dim, c.block.rope_style);
    let kv_type = cache.read().kv_type();
    if kv_type.rotates_heads() && c.head_dim.is_power_of_two() {
        // An 8-bit cache stores keys rotated per head by an orthonormal Hadamard, which
        // spreads outlier channels over the head before quantization; the queries get the
        // same rotation, so every score is unchanged. (Rotating values too, and the
        // attention output back, measured no better: Qwen q8 perplexity +0.95% against
        // +1.03% with keys alone, SmolLM2 +0.04% against -0.05%.)
        rotate_heads(&mut s.q[..n * q_dim], c.head_dim);
        rotate_heads(&mut s.k[..n * kv_dim], c.head_dim);
    }
    let rotate_values = kv_type.rotates_values() && c.head_dim.is_power_of_two();
    if rotate_values {
        // A 4-bit cache stores values rotated as well; the output is rotated back below.
        rotate_heads(&mut s.v[..n * kv_dim], c.head_dim);
    }
    if member.is_leader() {
        let positions = s.positions[..n].iter().map(|&p| p as usize);
        cache.write().append(l, &s.k[..n * kv_dim], &s.v[..n * kv_dim], positions);
    }
    member.barrier();
    {
        let cache = cache.read();
        let (keys, values) = cache.layer(l);
        // The batch's rows are the layer's last `n`; each token sees the rows before it
        // (within the layer's window, if it has one).
        let first_row = cache.len(l) - n;
        let shape = ops::AttentionShape {
            scale: c.attention_scale,
            window: attention.window,
            ..ops::AttentionShape::new(c.heads, c.kv_heads, c.head_dim)
        };
        let mine = member.share(n * c.heads);
        let out = &mut s.att[mine.start * c.head_dim..mine.end * c.head_dim];
        backend.attend(out, &s.q[..n * q_dim], keys, values, shape, first_row, mine);
        if rotate_values {
            rotate_heads(out, c.head_dim);
        }
    }
    member.all_gather(&mut s.att[..n * q_dim], 1, n * c.heads, c.head_dim);
    clip_input(layer, 1, &mut s.att[..n * q_dim]);
    s.act.load(&s.att, n, q_dim);
    tap(compute, member, l, TapSite::AttentionOutput, &s.att[..n * q_dim], n, q_dim);
    backend.matmul(&layer.wo, &mut s.act, &mut s.xb, member, Gather::All);
    add_residual(backend, &mut s.x[..n * dim], &mut s.xb[..n * dim], &mut s.att, layer.attn_post_norm.as_deref(), c);

    // Gated MLP: each member gates its own rows, then the products are exchanged.
    backend.rms_norm_rows(&mut s.xb[..n * dim], &s.x[..n * dim], &layer.ffn_norm, c.norm_eps);
    clip_input(layer, 2, &mut s.xb[..n * dim]);
    s.act.load(&s.xb, n, dim);
    tap(compute, member, l, TapSite::MlpInput, &s.xb[..n * dim], n, dim);
    backend.matmul(&layer.w_gate, &mut s.act, &mut s.gate, member, Gather::None);
    backend.matmul(&layer.w_up, &mut s.act, &mut s.up, member, Gather::None);
    let mine = layer.w_gate.my_rows(member);
    for t in 0..n {
        let rows = t * ffn + mine.start..t * ffn + mine.end;
        match c.block.activation {
            GatedActivation::Silu => backend.swiglu(&mut s.gate[rows.clone()], &s.up[rows]),
            GatedActivation::GeluTanh => backend.geglu(&mut s.gate[rows.clone()], &s.up[rows]),
        }
    }
    layer.w_gate.gather(member, &mut s.gate[..n * ffn], n, Gather::All);
    if let Some(hadamard) = &model.down_hadamard {
        // In a batch each member rotates its share of the tokens and the rows are
        // exchanged; a single decode token is cheaper to rotate on every member than to
        // wait at one more barrier for.
        let mine = if n == 1 { 0..1 } else { member.share(n) };
        for row in s.gate[mine.start * ffn..mine.end * ffn].chunks_exact_mut(ffn) {
            hadamard.apply(row);
        }
        if n > 1 {
            member.all_gather(&mut s.gate[..n * ffn], 1, n, ffn);
        }
    }
    clip_input(layer, 3, &mut s.gate[..n * ffn]);
    s.act.load(&s.gate, n, ffn);
    tap(compute, member, l, TapSite::DownInput, &s.gate[..n * ffn], n, ffn);
    backend.matmul(&layer.w_down, &mut s.act, &mut s.xb, member, Gather::All);
    add_residual(backend, &mut s.x[..n * dim], &mut s.xb[..n * dim], &mut s.att, layer.ffn_post_norm.as_deref(), c);

    if let (true, Some(tap)) = (observed, compute.tap) {
        tap.observe_block(l, &s.block_input[..n * dim], &s.x[..n * dim], n, dim);
    }
}

/// `x += post_norm(y)` over whole rows of `dim` (`y` as is without a post-norm gain);
/// `scratch` holds at least `y.len()` values.
fn add_residual(
    backend: &dyn Backend,
    x: &mut [f32],
    y: &mut [f32],
    scratch: &mut [f32],
    post_norm: Option<&[f32]>,
    c: &ModelConfig,
) {
    match post_norm {
        None => backend.add(x, y),
        Some(gain) => {
            let normed = &mut scratch[..y.len()];
            backend.rms_norm_rows(normed, y, gain, c.norm_eps);
            backend.add(x, normed);
        }
    }
}

/// Adds `bias` to every row of `rows` (rows of `bias.len()` values).
fn add_to_rows(backend: &dyn Backend, rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        backend.add(row, bias);
    }
}

/// RMSNorm of every head of `x` (heads of `gain.len()` values) with the shared `gain`,
/// in place through `scratch`.
fn norm_heads(backend: &dyn Backend, x: &mut [f32], scratch: &mut [f32], gain: &[f32], eps: f32) {
    let normed = &mut scratch[..x.len()];
    backend.rms_norm_rows(normed, x, gain, eps);
    x.copy_from_slice(normed);
}

/// Clamps a linear input to the layer's learned clip `site` (0 = q/k/v, 1 = o,
/// 2 = gate/up, 3 = down), if the model has them. Every member clamps its own full copy.
#[inline]
fn clip_input(layer: &LayerWeights<'_>, site: usize, rows: &mut [f32]) {
    if let Some(clips) = &layer.activation_clips {
        let [lo, hi] = clips[site];
        rows.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }
}

/// Shows the leader's batch to the tap, if any.
#[inline]
fn tap(compute: &Compute<'_>, member: &Member<'_>, layer: usize, site: TapSite, rows: &[f32], n: usize, cols: usize) {
    if let (Some(tap), true) = (compute.tap, member.is_leader()) {
        tap.observe(layer, site, rows, n, cols);
    }
}

/// Final norm and output head for token `t` of the batch in `s.x`, into the leader's
/// `s.logits`.
fn output_head(model: &Model<'_>, s: &mut RunState, compute: &Compute<'_>, member: &Member<'_>, t: usize) {
    let dim = model.config.dim;
    let backend = compute.backend;
    backend.rms_norm_rows(&mut s.xb[..dim], &s.x[t * dim..(t + 1) * dim], &model.output_norm, model.config.norm_eps);
    s.act.load(&s.xb, 1, dim);
    backend.matmul(&model.output, &mut s.act, &mut s.logits, member, Gather::Leader);
    if let (Some(cap), true) = (model.config.logit_softcap, member.is_leader()) {
        ops::softcap(&mut s.logits, cap);
    }
}

/// `x ← (H / √d) x` for every head of `d` values in `x` (`H` the Sylvester–Hadamard matrix;
/// `d` a power of two): orthonormal, so dot products between rotated heads are unchanged.
fn rotate_heads(x: &mut [f32], head_dim: usize) {
    let norm = 1.0 / libm::sqrtf(head_dim as f32);
    for head in x.chunks_exact_mut(head_dim) {
        petrel_quant::hadamard::fwht(head);
        for v in head.iter_mut() {
            *v *= norm;
        }
    }
}
