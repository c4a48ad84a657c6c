//! `petrel convert`: a decoder-only Llama-family model exported to ONNX (by
//! `torch.onnx.export`, as `scripts/make_onnx_fixture.py` does) into a GGUF file the
//! runtime runs.
//!
//! The ONNX file is read through tract's ONNX parser (`tract-onnx`): its initializers are
//! the weights, found by the Hugging Face parameter names the TorchScript exporter keeps
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...). The hyper-parameters come from the
//! model's Hugging Face `config.json`, the tokenizer from another GGUF file's
//! `tokenizer.*` metadata (the vocabulary sizes must agree).
//!
//! Hugging Face stores each query/key head's RoPE pairs as halves (dimension `i` with
//! `i + head_dim/2`); GGUF Llama files, and Petrel, pair adjacent dimensions. So the rows
//! of `q_proj` and `k_proj` are permuted per head: GGUF row `2i + a` is HF row
//! `a · head_dim/2 + i`, the permutation llama.cpp's converter applies.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use petrel_runtime::gguf::TensorType;
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::GgufFile;
use serde_json::Value;
use tract_onnx::prelude::Framework;

use crate::gguf_out::write_loadable;

/// Arguments of `petrel convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The ONNX model (a single file, weights inside; `torch.onnx.export` with
    /// `dynamo=False, do_constant_folding=False` keeps the parameter names).
    pub onnx: PathBuf,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// The model's Hugging Face `config.json` (default: next to the ONNX file).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A GGUF file whose tokenizer the model uses (its `tokenizer.*` metadata is copied).
    #[arg(long)]
    pub tokenizer: PathBuf,
}

/// An ONNX initializer: shape and f32 values.
struct Weight {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Every float initializer of the ONNX file, by name.
fn read_initializers(path: &std::path::Path) -> Result<HashMap<String, Weight>> {
    let onnx = tract_onnx::onnx();
    let proto = onnx.proto_model_for_path(path).with_context(|| format!("cannot read {} as ONNX", path.display()))?;
    let graph = proto.graph.as_ref().context("the ONNX file has no graph")?;
    let dir = path.parent().and_then(|p| p.to_str());
    let resolver = tract_onnx::data_resolver::default();
    let mut weights = HashMap::new();
    for init in &graph.initializer {
        let tensor = tract_onnx::tensor::load_tensor(&*resolver, init, dir)
            .with_context(|| format!("cannot load initializer {:?}", init.name))?;
        let Ok(values) = tensor.cast_to::<f32>() else { continue };
        let values: Vec<f32> =
            values.to_plain_array_view::<f32>().context("initializer values")?.iter().copied().collect();
        weights.insert(init.name.clone(), Weight { shape: tensor.shape().to_vec(), values });
    }
    Ok(weights)
}

/// The Hugging Face hyper-parameters the converter needs.
struct HfConfig {
    vocab: usize,
    dim: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    rope_theta: f32,
    context: usize,
    tied: bool,
}

fn read_config(path: &std::path::Path) -> Result<HfConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let usize_of = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .with_context(|| format!("config.json has no integer {k:?}"))
    };
    let arch = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    ensure!(arch == "llama", "config.json describes a {arch:?} model; the converter takes Llama-family models");
    let (dim, heads) = (usize_of("hidden_size")?, usize_of("num_attention_heads")?);
    // transformers 5 moves rope_theta into rope_parameters.
    let rope_theta = v
        .get("rope_theta")
        .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0) as f32;
    if let Some(kind) = v.get("rope_parameters").and_then(|r| r.get("rope_type")).and_then(Value::as_str) {
        ensure!(kind == "default", "RoPE scaling {kind:?} is not supported (only the default rotation)");
    }
    Ok(HfConfig {
        vocab: usize_of("vocab_size")?,
        dim,
        ffn: usize_of("intermediate_size")?,
        layers: usize_of("num_hidden_layers")?,
        heads,
        kv_heads: usize_of("num_key_value_heads").unwrap_or(heads),
        head_dim: usize_of("head_dim").unwrap_or(dim / heads),
        eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32,
        rope_theta,
        context: usize_of("max_position_embeddings")?,
        tied: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// `rows × cols` HF weight rows permuted from half-split to adjacent RoPE pairs, per head.
fn permute_rope_rows(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for i in 0..half {
            for a in 0..2 {
                let (to, from) = (h * head_dim + 2 * i + a, h * head_dim + a * half + i);
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Converts; returns the number of tensors written.
pub fn run(args: &ConvertArgs) -> Result<usize> {
    let config_path = match &args.config {
        Some(p) => p.clone(),
        None => args.onnx.with_file_name("config.json"),
    };
    let c = read_config(&config_path)?;
    let weights = read_initializers(&args.onnx)?;
    let tok_bytes =
        std::fs::read(&args.tokenizer).with_context(|| format!("cannot read {}", args.tokenizer.display()))?;
    let tok_file = GgufFile::parse(&tok_bytes).map_err(|e| anyhow::anyhow!("{}: {e}", args.tokenizer.display()))?;
    let vocab = tok_file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map_or(0, |a| a.len());
    ensure!(vocab == c.vocab, "the tokenizer has {vocab} tokens but the model's vocabulary is {}", c.vocab);

    let mut w = GgufWriter::copy_of(&tok_file, |k| k.starts_with("tokenizer."));
    let u32_of = |n: usize| MetadataValue::U32(n as u32);
    w.metadata("general.architecture", MetadataValue::String("llama".into()))
        .metadata("general.name", MetadataValue::String(format!("{} (from ONNX)", args.onnx.display())))
        .metadata("llama.block_count", u32_of(c.layers))
        .metadata("llama.embedding_length", u32_of(c.dim))
        .metadata("llama.feed_forward_length", u32_of(c.ffn))
        .metadata("llama.attention.head_count", u32_of(c.heads))
        .metadata("llama.attention.head_count_kv", u32_of(c.kv_heads))
        .metadata("llama.rope.dimension_count", u32_of(c.head_dim))
        .metadata("llama.context_length", u32_of(c.context))
        .metadata("llama.rope.freq_base", MetadataValue::F32(c.rope_theta))
        .metadata("llama.attention.layer_norm_rms_epsilon", MetadataValue::F32(c.eps));

    let names: Vec<&String> = {
        let mut n: Vec<&String> = weights.keys().collect();
        n.sort();
        n
    };
    let get = |name: &str, shape: &[usize]| -> Result<&Weight> {
        let t = weights.get(name).with_context(|| {
            format!("the ONNX file has no initializer {name:?} (it has: {names:?}); export with torch.onnx.export(dynamo=False, do_constant_folding=False)")
        })?;
        if t.shape != shape {
            bail!("initializer {name:?} has shape {:?}, expected {shape:?}", t.shape);
        }
        Ok(t)
    };
    let mut count = 0;
    let mut put = |w: &mut GgufWriter, name: &str, values: &[f32], shape: &[usize]| {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        w.tensor(name, &dims, TensorType::F32, f32_bytes(values));
        count += 1;
    };
    let (dim, kv_dim) = (c.dim, c.kv_heads * c.head_dim);
    let q_dim = c.heads * c.head_dim;
    put(&mut w, "token_embd.weight", &get("model.embed_tokens.weight", &[c.vocab, dim])?.values, &[c.vocab, dim]);
    for l in 0..c.layers {
        let p = format!("model.layers.{l}");
        let norm = |n: &str| get(&format!("{p}.{n}.weight"), &[dim]);
        put(&mut w, &format!("blk.{l}.attn_norm.weight"), &norm("input_layernorm")?.values, &[dim]);
        put(&mut w, &format!("blk.{l}.ffn_norm.weight"), &norm("post_attention_layernorm")?.values, &[dim]);
        let q = get(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, dim])?;
        let k = get(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, dim])?;
        put(
            &mut w,
            &format!("blk.{l}.attn_q.weight"),
            &permute_rope_rows(&q.values, c.heads, c.head_dim, dim),
            &[q_dim, dim],
        );
        put(
            &mut w,
            &format!("blk.{l}.attn_k.weight"),
            &permute_rope_rows(&k.values, c.kv_heads, c.head_dim, dim),
            &[kv_dim, dim],
        );
        for (hf, gguf, shape) in [
            ("self_attn.v_proj", "attn_v", [kv_dim, dim]),
            ("self_attn.o_proj", "attn_output", [dim, q_dim]),
            ("mlp.gate_proj", "ffn_gate", [c.ffn, dim]),
            ("mlp.up_proj", "ffn_up", [c.ffn, dim]),
            ("mlp.down_proj", "ffn_down", [dim, c.ffn]),
        ] {
            put(&mut w, &format!("blk.{l}.{gguf}.weight"), &get(&format!("{p}.{hf}.weight"), &shape)?.values, &shape);
        }
    }
    put(&mut w, "output_norm.weight", &get("model.norm.weight", &[dim])?.values, &[dim]);
    match weights.get("lm_head.weight") {
        Some(_) => put(&mut w, "output.weight", &get("lm_head.weight", &[c.vocab, dim])?.values, &[c.vocab, dim]),
        None if c.tied => {} // the runtime uses the embedding as the head
        None => bail!("the ONNX file has no lm_head.weight and config.json does not tie the embeddings"),
    }
    write_loadable(&args.output, &w.to_bytes())?;
    Ok(count)
}
