//! Architectures as data: the block features other files need, checked on SmolLM2
//! rewritten into those architectures, and the loaders' errors on bad files.
//!
//! The equivalence tests need no reference engine: a `llama` file is turned into a `qwen2`
//! file that computes the same function (Q/K rows un-permuted from ggml's adjacent-pair
//! layout back to the NeoX layout, zero biases) and a `gemma3`-shaped one is checked for
//! its loader's decisions. The real files are compared with llama.cpp in
//! `llama_cpp_golden.rs`.

mod common;

use petrel_runtime::config::{GatedActivation, RopeStyle};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::linear::Linear;
use petrel_runtime::{Model, ModelError, Session, SessionOptions};

/// SmolLM2's file with `llama.*` keys renamed to `arch.*`, `general.architecture = arch`,
/// and `edit` applied to the writer.
fn rewritten(file: &GgufFile<'_>, arch: &str, edit: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::copy_of(file, |k| !k.starts_with("llama."));
    for (key, value) in file.metadata() {
        if let (Some(rest), Some(v)) = (key.strip_prefix("llama."), MetadataValue::from_value(value)) {
            w.metadata(&format!("{arch}.{rest}"), v);
        }
    }
    w.metadata("general.architecture", MetadataValue::String(arch.into()));
    edit(&mut w);
    w.to_bytes()
}

/// The rows of a GGUF Q/K matrix (`heads` heads of `head_dim` rows of `row_bytes` each)
/// back in Hugging Face's order: GGUF row `2i + j` of a head is HF row `j · head_dim/2 + i`.
fn unpermute_rows(data: &[u8], heads: usize, head_dim: usize, row_bytes: usize) -> Vec<u8> {
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * head_dim + 2 * i + j) * row_bytes;
                let to = (h * head_dim + j * half + i) * row_bytes;
                out[to..to + row_bytes].copy_from_slice(&data[from..from + row_bytes]);
            }
        }
    }
    out
}

fn logits_of(model: &Model<'_>, tokens: &[u32]) -> Vec<f32> {
    let options = SessionOptions { capacity: 64, threads: 2, ..SessionOptions::default() };
    let mut session = Session::new(model, options).expect("session");
    let mut all = vec![0f32; tokens.len() * model.config.vocab_size];
    session.prefill_all_logits(tokens, &mut all).expect("prefill");
    all
}

/// Tensor `name` (a `rows × cols` matrix) dequantized to little-endian f32 bytes.
fn to_f32(file: &GgufFile<'_>, name: &str) -> (Vec<u64>, Vec<u8>) {
    let t = file.tensor(name).expect("tensor");
    let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
    let linear = Linear::new(t, rows, cols).expect("a matrix");
    let mut row = vec![0f32; cols];
    let mut out = Vec::with_capacity(rows * cols * 4);
    for r in 0..rows {
        linear.dequantize_row(r, &mut row);
        out.extend(row.iter().flat_map(|v| v.to_le_bytes()));
    }
    (t.shape().to_vec(), out)
}

/// The first `layers` blocks of SmolLM2 with f32 weights and an f32 head, as `arch`,
/// the Q/K rows un-permuted to NeoX order when `neox`, plus `edit`. In f32 no activation is
/// quantized, so two files computing the same function differ only in float rounding (with
/// 8-bit activation blocks one rounding difference can flip a code and move logits by the
/// quantization noise).
fn small_f32(
    file: &GgufFile<'_>,
    arch: &str,
    layers: usize,
    neox: bool,
    edit: impl FnOnce(&mut GgufWriter),
) -> Vec<u8> {
    let c = Model::load(file).expect("loads").config;
    rewritten(file, arch, |w| {
        w.metadata(&format!("{arch}.block_count"), MetadataValue::U32(layers as u32));
        let names: Vec<String> = file.tensors().iter().map(|t| t.name.to_string()).collect();
        for name in names {
            w.remove_tensor(&name);
            let block =
                name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
            if block.is_some_and(|l| l >= layers) {
                continue;
            }
            let t = file.tensor(&name).expect("tensor");
            if t.n_dims == 1 || name == "token_embd.weight" {
                w.tensor(&name, t.shape(), t.ty, t.data.to_vec());
                continue;
            }
            let (shape, mut data) = to_f32(file, &name);
            let heads = if name.ends_with("attn_q.weight") {
                Some(c.heads)
            } else if name.ends_with("attn_k.weight") {
                Some(c.kv_heads)
            } else {
                None
            };
            if let (Some(heads), true) = (heads, neox) {
                data = unpermute_rows(&data, heads, c.head_dim, c.dim * 4);
            }
            w.tensor(&name, &shape, TensorType::F32, data);
        }
        let (shape, head) = to_f32(file, "token_embd.weight");
        w.tensor("output.weight", &shape, TensorType::F32, head);
        edit(w);
    })
}

/// `qwen2` = Llama + Q/K/V biases + NeoX RoPE: SmolLM2 (four blocks, f32) with its Q/K
/// rows put back in NeoX order and zero biases computes the same logits through the qwen2
/// path as through the llama path (only the order of the q·k sums changes).
#[test]
fn qwen2_block_with_neox_rope_and_zero_biases_reproduces_llama() {
    let file = common::model_file();
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let c = Model::load(&gguf).expect("llama loads").config;
    let layers = 4;
    let llama_bytes = small_f32(&gguf, "llama", layers, false, |_| {});
    let qwen_bytes = small_f32(&gguf, "qwen2", layers, true, |w| {
        for l in 0..layers {
            for (name, width) in [("attn_q", c.q_dim()), ("attn_k", c.kv_dim()), ("attn_v", c.kv_dim())] {
                w.tensor(&format!("blk.{l}.{name}.bias"), &[width as u64], TensorType::F32, vec![0; width * 4]);
            }
        }
    });
    let (llama_file, qwen_file) =
        (GgufFile::parse(&llama_bytes).expect("parses"), GgufFile::parse(&qwen_bytes).expect("parses"));
    let (llama, qwen) = (Model::load(&llama_file).expect("llama loads"), Model::load(&qwen_file).expect("qwen2 loads"));
    assert_eq!(qwen.config.block.rope_style, RopeStyle::Neox);
    assert!(qwen.config.block.qkv_bias && qwen.layers[0].qkv_bias.is_some());
    let tokens =
        llama.tokenizer.encode("The capital of France is Paris, and 12 + 30 = 42. Rivers carry sediment.", false);
    let (a, b) = (logits_of(&llama, &tokens), logits_of(&qwen, &tokens));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("{} positions: max |Δlogit| {worst:e} (logit scale {scale})", tokens.len());
    assert!(worst <= 1e-4 * scale, "qwen2 path differs from llama by {worst} (logit scale {scale})");
    // A non-zero bias does change the result (the biases are really added).
    let biased = small_f32(&gguf, "qwen2", layers, true, |w| {
        for l in 0..layers {
            for (name, width) in [("attn_q", c.q_dim()), ("attn_k", c.kv_dim()), ("attn_v", c.kv_dim())] {
                let one: Vec<u8> = (0..width).flat_map(|_| 0.5f32.to_le_bytes()).collect();
                w.tensor(&format!("blk.{l}.{name}.bias"), &[width as u64], TensorType::F32, one);
            }
        }
    });
    let biased_file = GgufFile::parse(&biased).expect("parses");
    let d = logits_of(&Model::load(&biased_file).expect("loads"), &tokens);
    assert!(a.iter().zip(&d).any(|(x, y)| (x - y).abs() > 1e-2), "biases had no effect");
}

/// A `gemma3` file's loader decisions: five local layers then a global one, their RoPE
/// bases, the window, the √dim embedding scale, GELU, NeoX RoPE, Q/K and post norms — and
/// the tensors those features need are required by name.
#[test]
fn gemma3_loader_reads_its_pattern_and_requires_its_tensors() {
    let file = common::model_file();
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let llama = Model::load(&gguf).expect("llama loads");
    let c = llama.config.clone();
    let gain = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| 1f32.to_le_bytes()).collect() };
    let add_norms = |w: &mut GgufWriter, skip: &str| {
        for l in 0..c.layers {
            for (name, n) in [
                ("attn_q_norm", c.head_dim),
                ("attn_k_norm", c.head_dim),
                ("post_attention_norm", c.dim),
                ("post_ffw_norm", c.dim),
            ] {
                let tname = format!("blk.{l}.{name}.weight");
                if tname != skip {
                    w.tensor(&tname, &[n as u64], TensorType::F32, gain(n));
                }
            }
        }
    };
    let bytes = rewritten(&gguf, "gemma3", |w| {
        w.metadata("gemma3.attention.sliding_window", MetadataValue::U32(512));
        w.metadata("gemma3.rope.freq_base", MetadataValue::F32(1e6));
        add_norms(w, "");
    });
    let gemma_file = GgufFile::parse(&bytes).expect("parses");
    let gemma = Model::load(&gemma_file).expect("gemma3 loads");
    let g = &gemma.config;
    assert_eq!(g.block.activation, GatedActivation::GeluTanh);
    assert!(g.block.qk_norm && g.block.post_norms && !g.block.qkv_bias);
    assert_eq!(g.embedding_scale, Some((c.dim as f32).sqrt()));
    assert_eq!(g.rope_bases, vec![10_000.0, 1e6]);
    for (l, a) in g.attention.iter().enumerate() {
        let global = l % 6 == 5;
        assert_eq!(a.window, if global { None } else { Some(512) }, "layer {l}");
        assert_eq!(a.rope_base, if global { 1e6 } else { 10_000.0 }, "layer {l}");
    }
    // It runs (a function nobody trained, so only finiteness is checked here).
    let tokens = llama.tokenizer.encode("Once upon a time", false);
    assert!(logits_of(&gemma, &tokens).iter().all(|v| v.is_finite()));

    // A missing post-norm is named.
    let bytes = rewritten(&gguf, "gemma3", |w| add_norms(w, "blk.3.post_ffw_norm.weight"));
    let missing = GgufFile::parse(&bytes).expect("parses");
    assert_eq!(Model::load(&missing).map(|_| ()), Err(ModelError::MissingTensor("blk.3.post_ffw_norm.weight".into())));
}

#[test]
fn unknown_architectures_and_mis_shaped_tensors_are_named() {
    let file = common::model_file();
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let bytes = rewritten(&gguf, "mamba", |_| {});
    let err = Model::load(&GgufFile::parse(&bytes).expect("parses")).map(|_| ()).unwrap_err();
    assert_eq!(err, ModelError::UnsupportedArchitecture("mamba".into()));
    assert_eq!(err.to_string(), "unsupported architecture \"mamba\" (supported: llama qwen2 gemma3)");

    // A qwen2 bias of the wrong length.
    let c = Model::load(&gguf).expect("loads").config;
    let bytes = rewritten(&gguf, "qwen2", |w| {
        for l in 0..c.layers {
            for (name, n) in [("attn_q", c.q_dim() - 1), ("attn_k", c.kv_dim()), ("attn_v", c.kv_dim())] {
                w.tensor(&format!("blk.{l}.{name}.bias"), &[n as u64], TensorType::F32, vec![0; n * 4]);
            }
        }
    });
    let err = Model::load(&GgufFile::parse(&bytes).expect("parses")).map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, ModelError::BadTensorShape { tensor, .. } if tensor == "blk.0.attn_q.bias"),
        "unexpected error {err:?}"
    );
}
