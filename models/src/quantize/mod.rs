//! `petrel quantize`: a GGUF model in, a Petrel W4 model out.
//!
//! The pipeline: dequantize every weight to f32 ([`master`]); optionally apply QuaRot's
//! rotations ([`master::MasterWeights::rotate`]); quantize every linear layer of every
//! block to W4 — round-to-nearest with per-channel MSE-optimal clipping, or GPTQ with input
//! Hessians measured on calibration text ([`calibrate`]) — and the embedding table and
//! output head to the format asked for; write one GGUF with the scheme in `petrel.*`
//! metadata ([`petrel_runtime::scheme`]).

pub mod calibrate;
pub mod master;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use petrel_quant::blocks::quantize_row;
use petrel_quant::ptq::{self, ClipSearch, GptqOptions};
use petrel_quant::w4::{pack, GroupSize, W4Shape, PANEL_ROWS};
use petrel_quant::WeightFormat;
use petrel_runtime::forward::TapSite;
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};

/// Metadata keys of mixture-of-depths routing, kept by quantization.
const MOD_KEY_PREFIX: &str = "petrel.mod.";
/// KV-prediction metadata (`petrel.kvp.*`) passes through; its tensors are re-quantized.
const KVP_KEY_PREFIX: &str = "petrel.kvp.";
use petrel_runtime::kv_predict::{predictor_tensor_name, AUX_PREFIX as KVP_AUX_PREFIX};
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::scheme::{
    KEY_ACTIVATION_BITS_PREFIX, KEY_ACTIVATION_CLIP, KEY_GROUP_SIZE, KEY_ROTATION, KEY_SCHEME, SCALES_SUFFIX,
};
use petrel_runtime::Model;
use rayon::prelude::*;

use master::{MasterLayer, MasterWeights, Matrix};

/// The quantization scheme of the blocks' linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scheme {
    /// int4 weights, int4 per-token activations.
    W4a4,
    /// int4 weights, int8 per-token activations.
    W4a8,
    /// int4 weights, f32 activations (weight-only).
    W4a16,
    /// No quantization: every weight dequantized to f32, f32 activations (the reference
    /// that quantized models are measured against).
    F32,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::W4a4 => "w4a4",
            Scheme::W4a8 => "w4a8",
            Scheme::W4a16 => "w4a16",
            Scheme::F32 => "f32",
        }
    }
}

/// How the embedding table and the output head are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TableFormat {
    /// llama.cpp's Q8_0 (8-bit blocks of 32; the head then meets 8-bit activation blocks).
    #[value(name = "q8_0")]
    Q8_0,
    /// W4 with the file's group size (the head then meets the scheme's activations).
    W4,
    /// IEEE f16.
    F16,
    /// f32.
    F32,
}

/// The inputs of a block's linear layers (see [`TapSite`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Site {
    /// Input of the query, key and value projections.
    AttnIn,
    /// Input of the attention output projection.
    AttnOut,
    /// Input of the gate and up projections.
    MlpIn,
    /// Input of the down projection.
    DownIn,
}

impl Site {
    fn tap(self) -> TapSite {
        match self {
            Site::AttnIn => TapSite::AttentionInput,
            Site::AttnOut => TapSite::AttentionOutput,
            Site::MlpIn => TapSite::MlpInput,
            Site::DownIn => TapSite::DownInput,
        }
    }
}

/// The input site of the linear named `suffix` (`attn_q`, `ffn_down`, …).
fn site_of(suffix: &str) -> TapSite {
    match suffix {
        "attn_q" | "attn_k" | "attn_v" => TapSite::AttentionInput,
        "attn_output" => TapSite::AttentionOutput,
        "ffn_gate" | "ffn_up" => TapSite::MlpInput,
        _ => TapSite::DownInput,
    }
}

/// `petrel quantize` options.
#[derive(clap::Args, Debug, Clone)]
pub struct QuantizeArgs {
    /// Input GGUF (any type the runtime reads; its weights are dequantized first).
    pub input: PathBuf,
    /// Output GGUF.
    pub output: PathBuf,
    /// Scheme of the blocks' linear layers.
    #[arg(long, value_enum)]
    pub scheme: Scheme,
    /// Inputs per weight scale: 0 for one scale per output channel, or 32, 64, 128.
    #[arg(long, default_value_t = 0)]
    pub group: u32,
    /// Apply QuaRot's rotations (norms folded, residual rotated, online Hadamard before
    /// ffn_down) before quantizing.
    #[arg(long)]
    pub rotate: bool,
    /// Seed of the random signs of the residual rotation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Quantize with GPTQ (needs --calib) instead of round-to-nearest.
    #[arg(long, requires = "calib")]
    pub gptq: bool,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal ("act-order"; group
    /// scales then come from the unquantized weights).
    #[arg(long, requires = "gptq")]
    pub act_order: bool,
    /// Calibration text for GPTQ (use training text, not the evaluation text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens for GPTQ, in sequences of --calib-seq-len.
    #[arg(long, default_value_t = 8192)]
    pub calib_tokens: usize,
    /// Calibration sequence length.
    #[arg(long, default_value_t = 256)]
    pub calib_seq_len: usize,
    /// Activation clip ratio (per-token scale = ratio · max|x| / q_max) for w4a4 and w4a8.
    #[arg(long, default_value_t = 0.9)]
    pub act_clip: f32,
    /// With w4a4: linear inputs kept at 8-bit activations (per-tensor override written
    /// into the file), e.g. `--a8 attn-in,mlp-in` for the normalized residual stream.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub a8: Vec<Site>,
    /// Storage of the token embedding table.
    #[arg(long, value_enum, default_value = "q8_0")]
    pub embedding: TableFormat,
    /// Storage of the output head.
    #[arg(long, value_enum, default_value = "q8_0")]
    pub head: TableFormat,
    /// Threads for calibration.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    pub threads: usize,
}

/// What the pipeline wrote.
#[derive(Debug)]
pub struct Summary {
    /// Bytes of the output file.
    pub file_bytes: u64,
    /// Calibration tokens used (GPTQ).
    pub calib_tokens: usize,
}

/// Runs the pipeline.
pub fn run(args: &QuantizeArgs) -> Result<Summary> {
    let group = GroupSize::from_len(args.group).context("--group must be 0 (per channel), 32, 64 or 128")?;
    if !(args.act_clip > 0.0 && args.act_clip <= 1.0) {
        bail!("--act-clip must be in (0, 1]");
    }
    if !args.a8.is_empty() && args.scheme != Scheme::W4a4 {
        bail!("--a8 applies to --scheme w4a4 only");
    }
    if args.scheme == Scheme::F32 && (args.rotate || args.gptq) {
        bail!("--scheme f32 is the unquantized reference: --rotate and --gptq do not apply");
    }
    let file = MappedFile::open(&args.input).with_context(|| format!("cannot open {}", args.input.display()))?;
    let gguf =
        GgufFile::parse(file.bytes()).with_context(|| format!("{} is not a valid GGUF file", args.input.display()))?;
    let model = Model::load(&gguf).with_context(|| format!("cannot load {}", args.input.display()))?;
    eprintln!("dequantizing {} …", args.input.display());
    if !model.config.is_llama_like() {
        bail!(
            "petrel quantize supports llama-architecture models only; {} is {} (its blocks have {:?})",
            args.input.display(),
            model.config.architecture,
            model.config.block
        );
    }
    let mut master = MasterWeights::from_model(&model);
    if args.rotate && model.layers.iter().any(|l| l.activation_clips.is_some()) {
        bail!("{} has learned activation clips (activation QAT): they hold in the unrotated basis, so --rotate does not apply", args.input.display());
    }
    if args.rotate && model.routing.is_some() {
        bail!("{} routes tokens (mixture of depths): its routers read the unrotated residual stream, so --rotate does not apply", args.input.display());
    }
    if args.rotate {
        eprintln!("rotating (QuaRot, seed {}) …", args.seed);
        master.rotate(args.seed)?;
    }

    let mut calib_tokens = 0;
    let hessians = if args.gptq {
        let path = args.calib.as_ref().context("--gptq needs --calib FILE")?;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        // English runs at about 4 bytes per token: tokenize a prefix that surely suffices,
        // not a whole corpus.
        let mut end = text.len().min(args.calib_tokens.saturating_mul(16).max(4096));
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let tokens = model.tokenizer.encode(&text[..end], false);
        let seq = args.calib_seq_len.clamp(16, model.config.context_length);
        let sequences: Vec<Vec<u32>> =
            tokens.chunks_exact(seq).take(args.calib_tokens / seq).map(<[u32]>::to_vec).collect();
        if sequences.is_empty() {
            bail!("{} holds fewer than {seq} tokens: not enough to calibrate", path.display());
        }
        calib_tokens = sequences.len() * seq;
        // The calibration model: the (rotated) master weights at 8 bits, near-lossless and
        // fast on the integer kernels.
        let bytes = write_model(&gguf, &master, &Layout::calibration(args.rotate), None)?.to_bytes();
        let calib_file = GgufFile::parse(&bytes)?;
        let calib_model = Model::load(&calib_file)?;
        eprintln!("measuring input Hessians on {calib_tokens} tokens of {} …", path.display());
        Some(calibrate::collect(&calib_model, &sequences, args.threads)?)
    } else {
        None
    };

    let layout = Layout {
        scheme: args.scheme,
        group,
        act_clip: args.act_clip,
        rotated: args.rotate,
        act_order: args.act_order,
        embedding: if args.scheme == Scheme::F32 { TableFormat::F32 } else { args.embedding },
        head: if args.scheme == Scheme::F32 { TableFormat::F32 } else { args.head },
        dense_linears: TableFormat::F32,
        a8_sites: args.a8.iter().map(|s| s.tap()).collect(),
    };
    let writer = write_model(&gguf, &master, &layout, hessians.as_ref())?;
    let bytes = writer.to_bytes();
    crate::gguf_out::write_loadable(&args.output, &bytes)?;
    Ok(Summary { file_bytes: bytes.len() as u64, calib_tokens })
}

/// How each tensor of the written model is stored.
#[derive(Clone, Debug)]
struct Layout {
    scheme: Scheme,
    group: GroupSize,
    act_clip: f32,
    rotated: bool,
    act_order: bool,
    embedding: TableFormat,
    head: TableFormat,
    /// Storage of the blocks' linears when the scheme is `F32` (unquantized).
    dense_linears: TableFormat,
    /// Sites whose linears get 8-bit activations in a W4A4 file.
    a8_sites: Vec<TapSite>,
}

impl Layout {
    /// Every matrix at Q8_0: the model calibration runs.
    fn calibration(rotated: bool) -> Self {
        Layout {
            scheme: Scheme::F32,
            group: GroupSize::PerChannel,
            act_clip: 1.0,
            rotated,
            act_order: false,
            embedding: TableFormat::Q8_0,
            head: TableFormat::Q8_0,
            dense_linears: TableFormat::Q8_0,
            a8_sites: Vec::new(),
        }
    }
}

/// Serializes `master` per `layout`, with the metadata of `source` (minus `petrel.*`).
fn write_model(
    source: &GgufFile<'_>,
    master: &MasterWeights,
    layout: &Layout,
    hessians: Option<&calibrate::Hessians>,
) -> Result<GgufWriter> {
    let mut w = GgufWriter::new();
    for (key, value) in source.metadata() {
        // Our own quantization keys are rewritten below; mixture-of-depths routing is
        // independent of the weights' format and passes through.
        if key.starts_with("petrel.") && !key.starts_with(MOD_KEY_PREFIX) && !key.starts_with(KVP_KEY_PREFIX) {
            continue;
        }
        if let Some(v) = MetadataValue::from_value(value) {
            w.metadata(key, v);
        }
    }
    if layout.rotated || layout.scheme != Scheme::F32 {
        // Unquantized files of rotated weights still need the online Hadamard: they are
        // written as W4A16 files without W4 tensors.
        let name = if layout.scheme == Scheme::F32 { "w4a16" } else { layout.scheme.name() };
        w.metadata(KEY_SCHEME, MetadataValue::String(name.into()));
        w.metadata(KEY_GROUP_SIZE, MetadataValue::U32(layout.group.as_len()));
        w.metadata(KEY_ACTIVATION_CLIP, MetadataValue::F32(layout.act_clip));
        w.metadata(KEY_ROTATION, MetadataValue::String(if layout.rotated { "quarot" } else { "none" }.into()));
    }

    let aux_blocks = master.kvp.as_ref().map_or(0, |k| k.aux_layers.len());
    let bar = ProgressBar::new(((master.layers.len() + aux_blocks) * 7 + 2) as u64).with_style(
        ProgressStyle::with_template("quantizing {bar:30} {pos}/{len} matrices {msg} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let table = |w: &mut GgufWriter, name: &str, m: &Matrix, format: TableFormat| -> Result<()> {
        match format {
            TableFormat::W4 => put_w4(w, name, quantize_w4(m, layout.group, None, false)?),
            other => put_dense(w, name, m, other),
        }
        Ok(())
    };
    table(&mut w, "token_embd.weight", &master.embedding, layout.embedding)?;
    bar.inc(1);
    if let Some(head) = &master.head {
        table(&mut w, "output.weight", head, layout.head)?;
    } else if layout.head != layout.embedding {
        table(&mut w, "output.weight", &master.embedding, layout.head)?;
    }
    bar.inc(1);
    w.tensor("output_norm.weight", &[master.output_norm.len() as u64], TensorType::F32, f32_bytes(&master.output_norm));
    for (l, layer) in master.layers.iter().enumerate() {
        // Mixture-of-depths routers and predictors (f32) pass through unchanged.
        let prefix = format!("blk.{l}.mod_");
        for t in source.tensors().iter().filter(|t| t.name.starts_with(&prefix)) {
            w.tensor(t.name, t.shape(), t.ty, t.data.to_vec());
        }
        // Learned activation clips (activation QAT) pass through unchanged.
        let clips_name = format!("blk.{l}.act_clip");
        if let Some(clips) = source.tensor(&clips_name) {
            let values: Vec<f32> = match clips.ty {
                TensorType::F16 => {
                    clips.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                }
                _ => clips.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            };
            w.tensor(&clips_name, &[values.len() as u64], TensorType::F32, f32_bytes(&values));
        }
        write_block(&mut w, "", l, layer, layout, |site| hessians.map(|h| h.get(l, site)), &bar)?;
    }
    if let Some(kvp) = &master.kvp {
        // The auxiliary blocks are quantized like the base's (round to nearest: the
        // calibration pass runs the base only); the maps get 8-bit activations.
        for (a, layer) in kvp.aux_layers.iter().enumerate() {
            write_block(&mut w, KVP_AUX_PREFIX, a, layer, layout, |_| None, &bar)?;
        }
        for (l, ((k, kb), (v, vb))) in kvp.keys.iter().zip(&kvp.values).enumerate() {
            for (which, m, b) in [("k", k, kb), ("v", v, vb)] {
                let name = predictor_tensor_name(l, &format!("{which}.weight"));
                match layout.scheme {
                    Scheme::F32 => put_dense(&mut w, &name, m, layout.dense_linears),
                    _ => {
                        w.metadata(&format!("{KEY_ACTIVATION_BITS_PREFIX}{name}"), MetadataValue::U32(8));
                        put_w4(&mut w, &name, quantize_w4(m, layout.group, None, false)?);
                    }
                }
                let bias = predictor_tensor_name(l, &format!("{which}.bias"));
                w.tensor(&bias, &[b.len() as u64], TensorType::F32, f32_bytes(b));
            }
        }
    }
    bar.finish_and_clear();
    Ok(w)
}

/// Writes block `l`'s norms and linears as `{prefix}blk.{l}.…` per `layout`, with GPTQ
/// where `hessian` gives an input Hessian for a site.
fn write_block(
    w: &mut GgufWriter,
    prefix: &str,
    l: usize,
    layer: &MasterLayer,
    layout: &Layout,
    hessian: impl Fn(TapSite) -> Option<Vec<f64>>,
    bar: &ProgressBar,
) -> Result<()> {
    for (norm, gain) in [("attn_norm", &layer.attn_norm), ("ffn_norm", &layer.ffn_norm)] {
        w.tensor(&format!("{prefix}blk.{l}.{norm}.weight"), &[gain.len() as u64], TensorType::F32, f32_bytes(gain));
    }
    for (suffix, m) in layer.linears() {
        let name = format!("{prefix}blk.{l}.{suffix}.weight");
        bar.set_message(name.clone());
        match layout.scheme {
            Scheme::F32 => put_dense(w, &name, m, layout.dense_linears),
            _ => {
                let site = site_of(suffix);
                if layout.a8_sites.contains(&site) {
                    w.metadata(&format!("{KEY_ACTIVATION_BITS_PREFIX}{name}"), MetadataValue::U32(8));
                }
                let q = quantize_w4(m, layout.group, hessian(site).as_deref(), layout.act_order)
                    .with_context(|| format!("quantizing {name}"))?;
                put_w4(w, &name, q);
            }
        }
        bar.inc(1);
    }
    Ok(())
}

/// A W4 matrix ready to write.
pub(crate) struct W4Tensor {
    shape: W4Shape,
    packed: Vec<u8>,
    scales: Vec<u8>,
}

/// Round-to-nearest with MSE-optimal clipping, or GPTQ when a Hessian is given.
pub(crate) fn quantize_w4(m: &Matrix, group: GroupSize, hessian: Option<&[f64]>, act_order: bool) -> Result<W4Tensor> {
    let shape = W4Shape { rows: m.rows, cols: m.cols, group };
    if !m.rows.is_multiple_of(PANEL_ROWS) {
        bail!("W4 needs a multiple of {PANEL_ROWS} rows, the matrix has {}", m.rows);
    }
    let clip = ClipSearch::Mse { steps: 40 };
    let (rows, cols, groups) = (m.rows, m.cols, shape.groups());
    // Rows are independent in both methods: 16-row chunks run on all cores.
    let (mut codes, mut row_scales) = (vec![0i8; rows * cols], vec![0f32; rows * groups]);
    let chunks = m
        .data
        .par_chunks(PANEL_ROWS * cols)
        .zip(codes.par_chunks_mut(PANEL_ROWS * cols))
        .zip(row_scales.par_chunks_mut(PANEL_ROWS * groups));
    match hessian {
        None => chunks.for_each(|((w, c), s)| {
            let q = ptq::rtn(w, w.len() / cols, cols, group, clip);
            c.copy_from_slice(&q.codes);
            s.copy_from_slice(&q.scales);
        }),
        Some(h) => {
            let plan = ptq::GptqPlan::new(h, cols, group, &GptqOptions { clip, act_order, ..GptqOptions::default() })
                .map_err(|e| anyhow::anyhow!("GPTQ cannot factor the Hessian: {e}"))?;
            chunks
                .try_for_each(|((w, c), s)| plan.quantize_rows(w, c, s))
                .map_err(|e| anyhow::anyhow!("GPTQ failed: {e}"))?;
        }
    }
    let (mut packed, mut scales) = (vec![0u8; shape.packed_bytes()], vec![0u8; shape.scale_count() * 2]);
    pack(&shape, &codes, &row_scales, &mut packed, &mut scales);
    Ok(W4Tensor { shape, packed, scales })
}

pub(crate) fn put_w4(w: &mut GgufWriter, name: &str, t: W4Tensor) {
    let s = &t.shape;
    w.tensor(name, &[(s.padded_cols() / 2) as u64, s.padded_rows() as u64], TensorType::I8, t.packed);
    w.tensor(
        &format!("{name}{SCALES_SUFFIX}"),
        &[(PANEL_ROWS * s.groups()) as u64, s.panels() as u64],
        TensorType::F16,
        t.scales,
    );
}

fn put_dense(w: &mut GgufWriter, name: &str, m: &Matrix, format: TableFormat) {
    let dims = [m.cols as u64, m.rows as u64];
    match format {
        TableFormat::Q8_0 => {
            let row_bytes = WeightFormat::Q8_0.row_bytes(m.cols).unwrap_or(0);
            let mut out = vec![0u8; row_bytes * m.rows];
            out.par_chunks_mut(row_bytes.max(1))
                .zip(m.data.par_chunks(m.cols))
                .for_each(|(o, row)| quantize_row(WeightFormat::Q8_0, row, o));
            w.tensor(name, &dims, TensorType::Q8_0, out);
        }
        TableFormat::F16 => {
            let out = m.data.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect();
            w.tensor(name, &dims, TensorType::F16, out);
        }
        TableFormat::F32 | TableFormat::W4 => {
            w.tensor(name, &dims, TensorType::F32, f32_bytes(&m.data));
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests;
