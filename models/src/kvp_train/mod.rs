//! `petrel kvp-train`: trains a KV-prediction auxiliary model and predictor with the base
//! model frozen ("KV Prediction for Improved Time to First Token", Horton et al., 2024;
//! corenet's `kv_prediction.py`), on CPU with candle.
//!
//! One step, on `batch` windows of `T` tokens of the training text:
//! 1. the base (no gradients) runs all `T` tokens causally, giving each layer's keys
//!    before RoPE and values (merged heads, `[batch, T, kv_dim]`);
//! 2. the aux blocks run the same tokens from the shared embedding, giving their own keys
//!    and values; the final norm and head of the base give `CE_aux`;
//! 3. the predictor maps aux block `layer_map[l]`'s keys and values to base layer `l`'s;
//! 4. `L1 = Σ_l mean|K̂_l − K_l| + mean|V̂_l − V_l|`;
//! 5. at `--base-positions` random positions `t ≥ 1` per window, the base runs token `t`
//!    through all its layers attending, in each, to the predicted rows `0..t` and its own
//!    key and value at `t` — what the runtime does for a prompt's last token after a
//!    predicted prefill. That token's state depends on nothing else, so the positions run
//!    as one batch. Their next-token cross-entropy is `CE_base`.
//!
//! The loss is `CE_base + CE_aux + l1_weight · L1` (the paper's, without its z-loss), AdamW
//! with one learning rate for the aux blocks and one for the predictor, a short linear
//! warm-up and a cosine decay to a tenth over the wall-clock budget, global gradient-norm
//! clipping. Every step is logged (JSONL); the held-out losses are measured at the start,
//! every `--eval-minutes` and at the end, along with the base's cross-entropy with its own
//! cache at the same positions (the floor `CE_base` approaches).
//!
//! File layout: [`weights`]. The output is the input with the trained `kvp.blk.*` and
//! `kvp.pred.*` tensors (f32) and a JSON summary beside it.

pub mod export;
pub mod model;
pub mod weights;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use petrel_quant::rng::SplitMix64;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::Tokenizer;
use serde::Serialize;
use serde_json::json;

use crate::corpus;
use crate::train::config::{ModCausal, TrainSettings};
use crate::train::data::{heldout_batches, training_batch, Batch};
use crate::train::optim::AdamW;
use model::{KvpModel, Losses};

/// Learning rates end the cosine decay at this fraction of their peak.
const MIN_LR_RATIO: f64 = 0.1;

/// `petrel kvp-train` options.
#[derive(clap::Args, Debug, Clone)]
pub struct KvpTrainArgs {
    /// Input GGUF (f32, f16 or bf16 weights): a base Llama model with `petrel.kvp.*`
    /// metadata and `kvp.pred.*` tensors (e.g. from the ridge fit); its `kvp.blk.*` aux
    /// blocks, when absent, start as the base blocks `petrel.kvp.source_layers` names.
    #[arg(long)]
    pub model: PathBuf,
    /// Output GGUF: the input with the trained aux blocks and predictor. A JSON summary
    /// goes next to it (same name, `.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// Wall-clock training budget in minutes (checked between steps; the first and last
    /// held-out evaluations and the export come on top).
    #[arg(long, default_value_t = 40.0)]
    pub minutes: f64,
    /// Tokens per training window (T).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Positions per window where the base is scored on the predicted cache (CE_base);
    /// at most T − 1.
    #[arg(long, default_value_t = 32)]
    pub base_positions: usize,
    /// Peak learning rate of the aux blocks.
    #[arg(long, default_value_t = 1e-4)]
    pub lr_aux: f64,
    /// Peak learning rate of the predictor.
    #[arg(long, default_value_t = 1e-3)]
    pub lr_pred: f64,
    /// Weight of the L1 term in the loss.
    #[arg(long, default_value_t = 1.0)]
    pub l1_weight: f64,
    /// Global gradient-norm clip (0 = none).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Stop after this many steps even if time is left.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Worker threads for candle's kernels and tokenization (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Training text (UTF-8) [default: the corpora cache's train.txt].
    #[arg(long)]
    pub train_text: Option<PathBuf>,
    /// Held-out text (UTF-8) [default: the corpora cache's heldout.txt].
    #[arg(long)]
    pub heldout_text: Option<PathBuf>,
    /// Seed of the windows and scored positions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Step log (JSON lines) [default: the output's name with `.jsonl`].
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Minutes between held-out evaluations during training (counted in the budget).
    #[arg(long, default_value_t = 10.0)]
    pub eval_minutes: f64,
    /// Held-out batches (of --batch windows) per evaluation.
    #[arg(long, default_value_t = 4)]
    pub eval_batches: usize,
    /// For an input without `petrel.kvp.*` metadata: `every:N` makes a layer-pruned aux
    /// model of base blocks 0, N, 2N, … (base layer l predicted from aux block l / N) with
    /// identity maps and zero biases.
    #[arg(long, value_name = "every:N")]
    pub init_aux: Option<String>,
}

/// Held-out measurements, means over the evaluation batches.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// Steps done when measured.
    pub step: usize,
    /// Seconds of training when measured.
    pub elapsed_s: f64,
    /// CE of the base on the predicted cache at the scored positions (nats/token).
    pub ce_base: f64,
    /// CE of the aux model over all positions (nats/token).
    pub ce_aux: f64,
    /// The summed L1 of keys and values.
    pub l1: f64,
    /// CE of the base with its true cache at the same positions (nats/token).
    pub ce_true: f64,
    /// Per base layer, mean |K̂ − K| (pre-RoPE keys).
    pub l1_k: Vec<f64>,
    /// Per base layer, mean |V̂ − V|.
    pub l1_v: Vec<f64>,
}

/// One batch of an evaluation set with its fixed scored positions.
pub struct EvalBatch {
    /// Inputs and targets, `[batch, T]`.
    pub batch: Batch,
    /// Scored positions, row by row.
    pub positions: Vec<u32>,
}

/// `m` distinct positions in `1..t` per row for `rows` rows (all of them when
/// `m ≥ t − 1`), increasing within a row, drawn from `(seed, step)`.
pub fn sample_positions(seed: u64, step: u64, rows: usize, t: usize, m: usize) -> Vec<u32> {
    let mut rng = SplitMix64(SplitMix64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x4B56_5052).next());
    let m = m.min(t.saturating_sub(1));
    let mut out = Vec::with_capacity(rows * m);
    let mut candidates: Vec<u32> = Vec::with_capacity(t);
    for _ in 0..rows {
        candidates.clear();
        candidates.extend(1..t as u32);
        for i in 0..m {
            let j = i + (rng.next() % (candidates.len() - i) as u64) as usize;
            candidates.swap(i, j);
        }
        let chosen = &mut candidates[..m];
        chosen.sort_unstable();
        out.extend_from_slice(chosen);
    }
    out
}

/// The held-out measurements of `model` on `set`, without gradients.
pub fn evaluate(model: &KvpModel, set: &[EvalBatch], l1_weight: f64) -> Result<Evaluation> {
    let mut sum: Option<Evaluation> = None;
    for b in set {
        let l = model.losses(&b.batch, &b.positions, l1_weight, false)?;
        let e = sum.get_or_insert_with(|| Evaluation {
            step: 0,
            elapsed_s: 0.0,
            ce_base: 0.0,
            ce_aux: 0.0,
            l1: 0.0,
            ce_true: 0.0,
            l1_k: vec![0.0; l.l1_k.len()],
            l1_v: vec![0.0; l.l1_v.len()],
        });
        e.ce_base += l.ce_base;
        e.ce_aux += l.ce_aux;
        e.l1 += l.l1;
        e.ce_true += l.ce_true;
        e.l1_k.iter_mut().zip(&l.l1_k).for_each(|(a, b)| *a += b);
        e.l1_v.iter_mut().zip(&l.l1_v).for_each(|(a, b)| *a += b);
    }
    let mut e = sum.context("the evaluation set is empty")?;
    let n = set.len() as f64;
    for v in
        [&mut e.ce_base, &mut e.ce_aux, &mut e.l1, &mut e.ce_true].into_iter().chain(&mut e.l1_k).chain(&mut e.l1_v)
    {
        *v /= n;
    }
    Ok(e)
}

/// Learning-rate factor (of the peak) at `step` with `progress` (0..1) of the budget
/// spent: linear warm-up over `warmup` steps times a cosine from 1 to [`MIN_LR_RATIO`].
pub fn lr_factor(step: usize, warmup: usize, progress: f64) -> f64 {
    let warm = if warmup == 0 { 1.0 } else { ((step + 1) as f64 / warmup as f64).min(1.0) };
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos());
    warm * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)
}

/// The AdamW settings of the run (only the optimizer's fields matter).
fn optimizer_settings(args: &KvpTrainArgs) -> TrainSettings {
    TrainSettings {
        seed: args.seed,
        steps: 0,
        batch: args.batch,
        lr: args.lr_aux,
        min_lr_ratio: MIN_LR_RATIO,
        warmup: args.warmup,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: args.grad_clip,
        qat: false,
        kurtosis_weight: 0.0,
        mod_causal: ModCausal::default(),
        mod_aux_weight: 0.0,
    }
}

fn parse_init(spec: &Option<String>) -> Result<Option<usize>> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let n = spec.strip_prefix("every:").and_then(|n| n.parse::<usize>().ok());
    match n {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => bail!("--init-aux {spec}: expected every:N with N ≥ 1"),
    }
}

fn log_line(log: &mut std::fs::File, value: serde_json::Value) -> Result<()> {
    writeln!(log, "{value}").context("writing the step log")
}

fn describe(e: &Evaluation) -> String {
    format!(
        "CE_base {:.4} (true cache {:.4}, gap {:.4}) · CE_aux {:.4} · L1 {:.4}",
        e.ce_base,
        e.ce_true,
        e.ce_base - e.ce_true,
        e.ce_aux,
        e.l1
    )
}

/// Runs `petrel kvp-train`.
pub fn run(args: &KvpTrainArgs) -> Result<()> {
    if let Some(n) = args.threads {
        // candle and rayon size their thread pools from this variable, read on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if args.seq_len < 2 || args.batch == 0 || args.base_positions == 0 || args.eval_batches == 0 {
        bail!("--seq-len must be at least 2, and --batch, --base-positions and --eval-batches positive");
    }
    if !(args.minutes > 0.0 && args.lr_aux > 0.0 && args.lr_pred > 0.0 && args.eval_minutes > 0.0) {
        bail!("--minutes, --eval-minutes and the learning rates must be positive");
    }
    let init_every = parse_init(&args.init_aux)?;
    let mapped = MappedFile::open(&args.model).with_context(|| format!("cannot open {}", args.model.display()))?;
    let gguf = GgufFile::parse(mapped.bytes()).with_context(|| format!("cannot parse {}", args.model.display()))?;
    let loaded =
        weights::load(&gguf, init_every, args.seq_len).with_context(|| format!("reading {}", args.model.display()))?;
    let model = &loaded.model;
    let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| anyhow::anyhow!("the model's tokenizer: {e}"))?;
    if tokenizer.vocab_size() as usize > model.shape.vocab {
        bail!("the tokenizer has {} tokens but the embedding {} rows", tokenizer.vocab_size(), model.shape.vocab);
    }

    let train_path = crate::train::corpus_file(&args.train_text, "train.txt")?;
    let heldout_path = crate::train::corpus_file(&args.heldout_text, "heldout.txt")?;
    let started_tokenizing = Instant::now();
    let tokens = corpus::tokenize(&tokenizer, &corpus::read_text(&train_path)?, None);
    let heldout = corpus::tokenize(&tokenizer, &corpus::read_text(&heldout_path)?, None);
    eprintln!(
        "{} training and {} held-out tokens ({:.1} s to tokenize); {} base layers, {} aux blocks ({:?}), map {:?}",
        tokens.len(),
        heldout.len(),
        started_tokenizing.elapsed().as_secs_f64(),
        model.shape.layers,
        model.aux_blocks(),
        loaded.origin,
        loaded.layout.layer_map
    );

    let (t, b, m) = (args.seq_len, args.batch, args.base_positions.min(args.seq_len - 1));
    let eval_set: Vec<EvalBatch> = heldout_batches(&heldout, args.eval_batches, b, t)?
        .into_iter()
        .enumerate()
        .map(|(i, batch)| {
            let rows = batch.inputs.dim(0).unwrap_or(0);
            EvalBatch { positions: sample_positions(args.seed ^ 0xE7A1, i as u64, rows, t, m), batch }
        })
        .collect();

    let log_path = args.log.clone().unwrap_or_else(|| args.out.with_extension("jsonl"));
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let threads = candle_core::utils::get_num_threads();
    log_line(
        &mut log,
        json!({"event": "start", "model": args.model, "layout": loaded.layout, "origin": loaded.origin,
               "seq_len": t, "batch": b, "base_positions": m, "lr_aux": args.lr_aux, "lr_pred": args.lr_pred,
               "l1_weight": args.l1_weight, "minutes": args.minutes, "threads": threads,
               "train_tokens": tokens.len(), "heldout_tokens": heldout.len()}),
    )?;

    let eval_started = Instant::now();
    let mut evaluations = vec![evaluate(model, &eval_set, args.l1_weight)?];
    eprintln!("held-out at start ({:.1} s): {}", eval_started.elapsed().as_secs_f64(), describe(&evaluations[0]));
    log_line(&mut log, json!({"event": "eval", "evaluation": evaluations[0]}))?;

    let settings = optimizer_settings(args);
    let mut optimizer = AdamW::new(&model.params)?;
    let budget = args.minutes * 60.0;
    let started = Instant::now();
    let mut last_eval = 0.0;
    let mut last_print = f64::NEG_INFINITY;
    let mut step = 0usize;
    let tokens_per_step = (b * t) as f64;
    while started.elapsed().as_secs_f64() < budget && args.max_steps.is_none_or(|n| step < n) {
        let step_started = Instant::now();
        let batch = training_batch(&tokens, args.seed, step, b, t)?;
        let positions = sample_positions(args.seed, step as u64, b, t, m);
        let losses: Losses = model.losses(&batch, &positions, args.l1_weight, true)?;
        let grads = losses.total.backward()?;
        let factor = lr_factor(step, args.warmup, started.elapsed().as_secs_f64() / budget);
        let (lr_aux, lr_pred) = (args.lr_aux * factor, args.lr_pred * factor);
        let grad_norm = optimizer.step_with(&model.params, &grads, &settings, |p| {
            Some(if p.name.starts_with("kvp.pred.") { lr_pred } else { lr_aux })
        })?;
        drop(grads);
        step += 1;
        let elapsed = started.elapsed().as_secs_f64();
        let seen = step as f64 * tokens_per_step;
        log_line(
            &mut log,
            json!({"event": "step", "step": step, "elapsed_s": elapsed, "step_s": step_started.elapsed().as_secs_f64(),
                   "tokens": seen, "loss": losses.total.to_scalar::<f32>()?, "ce_base": losses.ce_base,
                   "ce_aux": losses.ce_aux, "l1": losses.l1, "ce_true": losses.ce_true,
                   "lr_aux": lr_aux, "lr_pred": lr_pred, "grad_norm": grad_norm}),
        )?;
        if elapsed - last_print >= 30.0 || step <= 3 {
            last_print = elapsed;
            eprintln!(
                "step {step} · {:.0} s · {seen:.0} tokens ({:.1} tok/s) · CE_base {:.4} (true {:.4}) · CE_aux {:.4} · L1 {:.4} · |g| {grad_norm:.3}",
                elapsed,
                seen / elapsed.max(1e-9),
                losses.ce_base,
                losses.ce_true,
                losses.ce_aux,
                losses.l1
            );
        }
        if elapsed - last_eval >= args.eval_minutes * 60.0 && elapsed < budget {
            last_eval = elapsed;
            let mut e = evaluate(model, &eval_set, args.l1_weight)?;
            (e.step, e.elapsed_s) = (step, started.elapsed().as_secs_f64());
            eprintln!("held-out at step {step}: {}", describe(&e));
            log_line(&mut log, json!({"event": "eval", "evaluation": e}))?;
            evaluations.push(e);
        }
    }
    let train_s = started.elapsed().as_secs_f64();
    let mut last = evaluate(model, &eval_set, args.l1_weight)?;
    (last.step, last.elapsed_s) = (step, train_s);
    eprintln!("held-out at the end (step {step}): {}", describe(&last));
    log_line(&mut log, json!({"event": "eval", "evaluation": last}))?;
    let first = evaluations[0].clone();
    evaluations.push(last.clone());

    let seen = step as f64 * tokens_per_step;
    let notes = [
        ("petrel.train.kvp.steps", step.to_string()),
        ("petrel.train.kvp.tokens", format!("{seen}")),
        ("petrel.train.kvp.heldout_ce_base", format!("{:.4}", last.ce_base)),
    ];
    export::write(&gguf, model, &loaded.layout, &notes, &args.out)?;
    let summary = json!({
        "input": args.model, "output": args.out, "log": log_path, "layout": loaded.layout, "origin": loaded.origin,
        "seq_len": t, "batch": b, "base_positions": m, "lr_aux": args.lr_aux, "lr_pred": args.lr_pred,
        "l1_weight": args.l1_weight, "grad_clip": args.grad_clip, "seed": args.seed, "threads": threads,
        "steps": step, "tokens": seen, "train_seconds": train_s,
        "seconds_per_step": train_s / step.max(1) as f64, "tokens_per_second": seen / train_s.max(1e-9),
        "heldout_windows": eval_set.iter().map(|e| e.batch.inputs.dim(0).unwrap_or(0)).sum::<usize>(),
        "start": first, "end": last, "evaluations": evaluations,
    });
    let summary_path = args.out.with_extension("json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", summary_path.display()))?;
    eprintln!("wrote {} and {}", args.out.display(), summary_path.display());
    Ok(())
}
