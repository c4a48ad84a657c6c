//! The forward pass: token ids in, logits out, reading and extending the KV cache.
//!
//! Straight-line code in the manner of llama2.c: embedding, then per block
//! `x += Wo · attention(rope(Wq · norm(x)), rope(Wk · norm(x)), Wv · norm(x))` and
//! `x += Wdown · (silu(Wgate · norm(x)) ⊙ (Wup · norm(x)))`, then the final norm and the
//! output head. Tokens are processed in batches of up to `max_batch`; every buffer is
//! allocated once in [`RunState::new`].

use alloc::vec;
use alloc::vec::Vec;
use petrel_quant::{FloatKernels, Kernels};

use crate::config::LlamaConfig;
use crate::kv_cache::KvCache;
use crate::linear::ActivationBatch;
use crate::model::Model;
use crate::ops;
use crate::parallel::ThreadPool;

/// Scratch buffers for a batch of up to `max_batch` tokens (all row-major by token).
#[derive(Debug)]
pub struct RunState {
    max_batch: usize,
    /// Residual stream, `max_batch × dim`.
    x: Vec<f32>,
    /// Normalized input of a sub-block, `max_batch × dim`.
    xb: Vec<f32>,
    /// Queries, `max_batch × dim`.
    q: Vec<f32>,
    /// Keys and values of the batch, `max_batch × kv_dim` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output (and projections' outputs), `max_batch × dim`.
    att: Vec<f32>,
    /// MLP hidden activations, `max_batch × ffn_dim` each.
    gate: Vec<f32>,
    up: Vec<f32>,
    /// RoPE `(cos, sin)` pairs per token, `max_batch × rope_dim`.
    rope: Vec<f32>,
    /// Quantized activations for the integer kernels.
    act: ActivationBatch,
    /// Matmul transposition scratch, `max_batch × max(dim, ffn_dim)`.
    scratch: Vec<f32>,
    /// Logits of the last token, `vocab_size`.
    logits: Vec<f32>,
}

impl RunState {
    /// Buffers for batches of up to `max_batch` tokens of `config`'s model.
    pub fn new(config: &LlamaConfig, max_batch: usize) -> Self {
        let b = max_batch.max(1);
        let (dim, kv, ffn) = (config.dim, config.kv_dim(), config.ffn_dim);
        RunState {
            max_batch: b,
            x: vec![0.0; b * dim],
            xb: vec![0.0; b * dim],
            q: vec![0.0; b * dim],
            k: vec![0.0; b * kv],
            v: vec![0.0; b * kv],
            att: vec![0.0; b * dim],
            gate: vec![0.0; b * ffn],
            up: vec![0.0; b * ffn],
            rope: vec![0.0; b * config.rope_dim],
            act: ActivationBatch::new(b, dim.max(ffn)),
            scratch: vec![0.0; b * dim.max(ffn)],
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
    /// Only the last token's, into [`RunState::logits`].
    Last,
    /// Every token's, into the slice (`tokens × vocab_size`); `scratch` holds
    /// `vocab_size × max_batch` floats.
    All { out: &'o mut [f32], scratch: &'o mut [f32] },
}

/// What the forward pass computes with: kernels and threads.
#[derive(Debug)]
pub struct Compute<'p> {
    /// Integer dot-product kernels.
    pub kernels: Kernels,
    /// f32 kernels for attention.
    pub float: FloatKernels,
    /// Threads for matmuls and attention.
    pub pool: &'p ThreadPool,
}

/// Runs `tokens` at positions `first_position..`, appending their keys and values to
/// `cache`. The caller has checked that the positions fit the cache and that every token
/// id is below the vocabulary size.
pub fn forward(
    model: &Model<'_>,
    state: &mut RunState,
    cache: &mut KvCache,
    compute: &Compute<'_>,
    tokens: &[u32],
    first_position: usize,
    mut logits: Logits<'_>,
) {
    let batch = state.max_batch;
    for (chunk_index, chunk) in tokens.chunks(batch).enumerate() {
        let position = first_position + chunk_index * batch;
        let is_last_chunk = (chunk_index + 1) * batch >= tokens.len();
        forward_batch(model, state, cache, compute, chunk, position);
        match &mut logits {
            Logits::Last if is_last_chunk => output_head(model, state, compute, chunk.len() - 1, 1, None),
            Logits::Last => {}
            Logits::All { out, scratch } => {
                let vocab = model.config.vocab_size;
                let out = &mut out[chunk_index * batch * vocab..];
                output_head(model, state, compute, 0, chunk.len(), Some((out, scratch)));
            }
        }
    }
}

/// One batch through every block; leaves the residual stream in `state.x`.
fn forward_batch(
    model: &Model<'_>,
    s: &mut RunState,
    cache: &mut KvCache,
    compute: &Compute<'_>,
    tokens: &[u32],
    position: usize,
) {
    let c = &model.config;
    let (n, dim, kv_dim, ffn) = (tokens.len(), c.dim, c.kv_dim(), c.ffn_dim);
    let (kernels, pool) = (&compute.kernels, compute.pool);

    for (t, &token) in tokens.iter().enumerate() {
        model.token_embedding.dequantize_row(token as usize, &mut s.x[t * dim..(t + 1) * dim]);
        ops::rope_table(&mut s.rope[t * c.rope_dim..(t + 1) * c.rope_dim], position + t, c.rope_dim, c.rope_base);
    }

    for (l, layer) in model.layers.iter().enumerate() {
        // Attention.
        for t in 0..n {
            let r = t * dim..(t + 1) * dim;
            ops::rms_norm(&mut s.xb[r.clone()], &s.x[r], &layer.attn_norm, c.norm_eps);
        }
        s.act.load(&s.xb, n, dim);
        layer.wq.matmul(kernels, &s.act, &mut s.q, &mut s.scratch, pool);
        layer.wk.matmul(kernels, &s.act, &mut s.k, &mut s.scratch, pool);
        layer.wv.matmul(kernels, &s.act, &mut s.v, &mut s.scratch, pool);
        for t in 0..n {
            let table = &s.rope[t * c.rope_dim..(t + 1) * c.rope_dim];
            ops::apply_rope(&mut s.q[t * dim..(t + 1) * dim], c.head_dim, table);
            ops::apply_rope(&mut s.k[t * kv_dim..(t + 1) * kv_dim], c.head_dim, table);
        }
        cache.write(l, position, &s.k[..n * kv_dim], &s.v[..n * kv_dim]);
        let (keys, values) = cache.layer(l);
        let (q, heads, head_dim, group) = (&s.q, c.heads, c.head_dim, c.heads / c.kv_heads);
        pool.for_each_chunk(&mut s.att[..n * dim], head_dim, |i, out| {
            let (t, h) = (i / heads, i % heads);
            let query = &q[t * dim + h * head_dim..t * dim + (h + 1) * head_dim];
            ops::attend(&compute.float, out, query, keys, values, kv_dim, (h / group) * head_dim, position + t);
        });
        s.act.load(&s.att, n, dim);
        layer.wo.matmul(kernels, &s.act, &mut s.xb, &mut s.scratch, pool);
        ops::add_assign(&mut s.x[..n * dim], &s.xb[..n * dim]);

        // SwiGLU MLP.
        for t in 0..n {
            let r = t * dim..(t + 1) * dim;
            ops::rms_norm(&mut s.xb[r.clone()], &s.x[r], &layer.ffn_norm, c.norm_eps);
        }
        s.act.load(&s.xb, n, dim);
        layer.w_gate.matmul(kernels, &s.act, &mut s.gate, &mut s.scratch, pool);
        layer.w_up.matmul(kernels, &s.act, &mut s.up, &mut s.scratch, pool);
        ops::swiglu(&mut s.gate[..n * ffn], &s.up[..n * ffn]);
        s.act.load(&s.gate, n, ffn);
        layer.w_down.matmul(kernels, &s.act, &mut s.xb, &mut s.scratch, pool);
        ops::add_assign(&mut s.x[..n * dim], &s.xb[..n * dim]);
    }
}

/// Final norm and output head for tokens `first..first + count` of the batch in `s.x`.
fn output_head(
    model: &Model<'_>,
    s: &mut RunState,
    compute: &Compute<'_>,
    first: usize,
    count: usize,
    all: Option<(&mut [f32], &mut [f32])>,
) {
    let dim = model.config.dim;
    for t in 0..count {
        let r = (first + t) * dim..(first + t + 1) * dim;
        ops::rms_norm(&mut s.xb[t * dim..(t + 1) * dim], &s.x[r], &model.output_norm, model.config.norm_eps);
    }
    s.act.load(&s.xb, count, dim);
    match all {
        None => model.output.matmul(&compute.kernels, &s.act, &mut s.logits, &mut s.scratch, compute.pool),
        Some((out, scratch)) => model.output.matmul(&compute.kernels, &s.act, out, scratch, compute.pool),
    }
}
