//! `petrel train`: train a small Llama-style decoder from scratch on CPU with candle, with
//! the W4A4 recipe of Nrusimha et al. (2024) as options, and export it for the runtime.
//!
//! A run lives in one directory (`--out`): `tokenizer.gguf` (trained here unless
//! `--tokenizer` names one), `checkpoint.gguf` (every `--checkpoint-every` steps, written
//! atomically), `log.jsonl` (one JSON object per logged step or evaluation), and at the end
//! `model-f32.gguf` and, with `--w4a4` (the default), `model-w4a4.gguf` — weights
//! quantized post-training by the W4 pipeline (GPTQ on training text), activations 4-bit
//! at run time.
//!
//! Mixture-of-depths (`--mod-layers`): the listed blocks are routed — each sequence's
//! top `⌈capacity · T⌉` tokens by a learned router score go through the block, the others
//! skip it — with causal decision mechanisms (router BCE and/or a predictor MLP) learned
//! alongside for decoding; see [`model`] and `petrel_runtime::routing`. Their agreement
//! with top-k is logged (`router_agreement`, `predictor_agreement`).
//!
//! Recipes: `tiny` = QAT of every linear input (4-bit, learned clips, straight-through) +
//! kurtosis penalty on every linear output; `standard` = neither. Both train the same
//! model on the same batches; any setting can be overridden.
//!
//! Training runs on candle's CPU device. The fused operations that make it fast
//! ([`fused`]) have CPU implementations only, so candle's `cuda` and `metal` features are
//! not offered here; the composed candle forms they replace (in their tests) are what a GPU
//! path would use.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod export;
pub mod fake_quant;
pub mod fused;
pub mod model;
pub mod optim;
pub mod trainer;

#[cfg(test)]
pub(crate) mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::bpe_train::TrainedTokenizer;
use crate::corpus;
use config::{ModCausal, ModelShape, RoutingShape, TrainSettings};
use model::Decoder;
use trainer::Trainer;

/// Training recipes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// Petrel-tiny with the W4A4 recipe: activation QAT + kurtosis penalty.
    Tiny,
    /// Petrel-tiny's shape, plain training (the paper's baseline).
    Standard,
}

/// Special tokens of tokenizers trained here (`<|endoftext|>` is BOS and EOS).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// `petrel train` options.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Run directory: tokenizer, checkpoint, log and exported models go here.
    #[arg(long)]
    pub out: PathBuf,
    /// Recipe (sets the QAT and kurtosis defaults).
    #[arg(long, value_enum, default_value = "tiny")]
    pub recipe: Recipe,
    /// Training text (UTF-8) [default: the corpora cache's train.txt, from
    /// scripts/fetch_corpora.py].
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Held-out text (UTF-8) for the logged evaluation loss [default: heldout.txt].
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// A tokenizer file from an earlier run (`tokenizer.gguf`); by default one is trained
    /// on the training text with --vocab tokens.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint (the settings must match).
    #[arg(long)]
    pub resume: bool,
    /// Vocabulary size of a newly trained tokenizer (and of the model).
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    /// Residual width.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// MLP hidden width.
    #[arg(long, default_value_t = 384)]
    pub ffn: usize,
    /// Sequence length in tokens.
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1600)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Activation QAT on or off [default: on for tiny, off for standard].
    #[arg(long)]
    pub qat: Option<bool>,
    /// Kurtosis penalty weight [default: 0.01 for tiny, 0 for standard].
    #[arg(long)]
    pub kurtosis_weight: Option<f64>,
    /// Seed of initialization and batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps between checkpoints (a killed run loses at most these).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Steps between held-out evaluations.
    #[arg(long, default_value_t = 250)]
    pub eval_every: usize,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 4)]
    pub eval_batches: usize,
    /// Worker threads for candle's kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// After training, also write the W4A4 file (`model-w4a4.gguf`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub w4a4: bool,
    /// W4 weight group size of the W4A4 file (0, 32, 64, 128).
    #[arg(long, default_value_t = 32)]
    pub group: u32,
    /// Activation clip ratio of the W4A4 file.
    #[arg(long, default_value_t = 1.0)]
    pub act_clip: f32,
    /// Mixture-of-depths: the routed blocks, a comma-separated list of block indices in
    /// increasing order (e.g. `1,3,5`: every other block from the second). Omitted: a dense
    /// model. The other --mod-* options need this one.
    #[arg(long, value_delimiter = ',', value_name = "BLOCKS")]
    pub mod_layers: Vec<usize>,
    /// Fraction of each sequence's tokens a routed block processes, in (0, 1]
    /// (`⌈capacity · context⌉` tokens per sequence, chosen by router score).
    #[arg(long, default_value_t = 0.125, requires = "mod_layers")]
    pub mod_capacity: f32,
    /// Causal decisions learned for decoding, each by binary cross-entropy against top-k
    /// membership: `bce` (the router's logit), `predictor` (a small MLP per routed block)
    /// or `both`. The exported file decodes with the predictor when one was trained.
    #[arg(long, value_enum, default_value = "both", requires = "mod_layers")]
    pub mod_causal: ModCausal,
    /// Hidden width of each routed block's predictor MLP (0 = none; ignored, i.e. 0, with
    /// --mod-causal bce).
    #[arg(long, default_value_t = 32, requires = "mod_layers")]
    pub mod_predictor_hidden: usize,
    /// Weight of the causal decisions' loss in the optimized loss.
    #[arg(long, default_value_t = 1.0, requires = "mod_layers")]
    pub mod_aux_weight: f64,
}

impl TrainArgs {
    fn shape(&self) -> ModelShape {
        ModelShape {
            vocab: self.vocab,
            dim: self.dim,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            ffn_dim: self.ffn,
            context: self.context,
            routing: (!self.mod_layers.is_empty()).then(|| RoutingShape {
                layers: self.mod_layers.clone(),
                capacity: self.mod_capacity,
                predictor_hidden: if self.mod_causal == ModCausal::Bce { 0 } else { self.mod_predictor_hidden },
            }),
            ..ModelShape::tiny()
        }
    }

    fn settings(&self) -> TrainSettings {
        let recipe_on = self.recipe == Recipe::Tiny;
        TrainSettings {
            seed: self.seed,
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            min_lr_ratio: 0.1,
            warmup: self.warmup.min(self.steps),
            weight_decay: self.weight_decay,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: self.grad_clip,
            qat: self.qat.unwrap_or(recipe_on),
            kurtosis_weight: self.kurtosis_weight.unwrap_or(if recipe_on { 0.01 } else { 0.0 }),
            mod_causal: self.mod_causal,
            mod_aux_weight: self.mod_aux_weight,
        }
    }
}

/// Adds the routing measurements (mean and per-block agreements, aux loss) to a log entry.
fn add_routing(entry: &mut serde_json::Value, mod_aux: Option<f64>, layers: &[model::LayerRouting]) {
    let Some((router, predictor)) = trainer::mean_agreement(layers) else {
        return;
    };
    let per_layer: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| json!({"layer": l.layer, "router": l.router_agreement, "predictor": l.predictor_agreement}))
        .collect();
    if let Some(map) = entry.as_object_mut() {
        map.insert("mod_aux".into(), json!(mod_aux));
        map.insert("router_agreement".into(), json!(router));
        map.insert("predictor_agreement".into(), json!(predictor));
        map.insert("agreement_by_layer".into(), json!(per_layer));
    }
}

/// ` · agree r 0.93 p 0.95` for the progress line (empty when dense).
fn agreement_note(layers: &[model::LayerRouting]) -> String {
    match trainer::mean_agreement(layers) {
        None => String::new(),
        Some((r, None)) => format!(" · agree r {r:.3}"),
        Some((r, Some(p))) => format!(" · agree r {r:.3} p {p:.3}"),
    }
}

/// `given`, or the corpora cache's `name` (which must exist).
pub(crate) fn corpus_file(given: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => {
            let p = crate::registry::cache_dir()?.join("corpora").join(name);
            if !p.exists() {
                bail!("{} not found: run `python3 scripts/fetch_corpora.py` or pass the file", p.display());
            }
            Ok(p)
        }
    }
}

fn append_log(log: &mut std::fs::File, value: serde_json::Value) -> Result<()> {
    writeln!(log, "{value}").context("writing the training log")?;
    Ok(())
}

/// Runs `petrel train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    if let Some(n) = args.threads {
        // candle sizes its thread pools from this variable, read on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let shape = args.shape();
    shape.validate()?;
    let settings = args.settings();
    if shape.routing.as_ref().is_some_and(|r| r.predictor_hidden == 0) && settings.mod_causal == ModCausal::Predictor {
        bail!("--mod-causal predictor needs a predictor: --mod-predictor-hidden must be positive");
    }
    if settings.batch == 0 || settings.steps == 0 || args.checkpoint_every == 0 {
        bail!("--steps, --batch and --checkpoint-every must be positive");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let checkpoint_path = args.out.join("checkpoint.gguf");
    if checkpoint_path.exists() && !args.resume {
        bail!("{} exists: pass --resume to continue that run, or choose another --out", checkpoint_path.display());
    }

    let train_path = corpus_file(&args.train, "train.txt")?;
    let heldout_path = corpus_file(&args.heldout, "heldout.txt")?;
    let train_text = corpus::read_text(&train_path)?;
    let heldout_text = corpus::read_text(&heldout_path)?;
    let tokenizer = obtain_tokenizer(args, &train_text)?;
    if tokenizer.tokens.len() != shape.vocab {
        bail!("the tokenizer has {} tokens but the model --vocab is {}", tokenizer.tokens.len(), shape.vocab);
    }
    let runtime_tokenizer = tokenizer.runtime_tokenizer()?;
    let bar = spinner("tokenizing");
    let tokens = corpus::tokenize(&runtime_tokenizer, &train_text, Some(&bar));
    let heldout = corpus::tokenize(&runtime_tokenizer, &heldout_text, Some(&bar));
    bar.finish_and_clear();
    let fingerprint = data::fingerprint(&tokens);
    eprintln!(
        "{} training tokens ({:.2} bytes/token), {} held-out; model {} parameters",
        tokens.len(),
        train_text.len() as f64 / tokens.len().max(1) as f64,
        heldout.len(),
        shape.parameters()
    );

    let mut trainer = if args.resume && checkpoint_path.exists() {
        let c = checkpoint::load(&checkpoint_path)?;
        if c.shape != shape || c.settings != settings {
            bail!(
                "the checkpoint was made with other settings:\n  checkpoint: {:?} {:?}\n  now:        {:?} {:?}",
                c.shape,
                c.settings,
                shape,
                settings
            );
        }
        if c.data != fingerprint {
            bail!("the checkpoint was trained on other data ({}); now {}", c.data, fingerprint);
        }
        eprintln!("resuming at step {}", c.step);
        Trainer { decoder: c.decoder, optimizer: c.optimizer, settings: c.settings, step: c.step }
    } else {
        Trainer::new(Decoder::new(shape.clone(), settings.seed)?, settings.clone(), &tokens)?
    };

    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("log.jsonl"))
        .context("opening log.jsonl")?;
    let mut start = json!({"event": "start", "step": trainer.step, "shape": shape, "settings": settings,
           "parameters": shape.parameters(), "forward_flops_per_token": shape.forward_flops_per_token(),
           "train_tokens": tokens.len(), "data": fingerprint,
           "threads": candle_core::utils::get_num_threads()});
    if shape.routing.is_some() {
        if let Some(map) = start.as_object_mut() {
            map.insert("dense_forward_flops_per_token".into(), json!(shape.dense_forward_flops_per_token()));
        }
    }
    append_log(&mut log, start)?;
    let eval_set = data::heldout_batches(&heldout, args.eval_batches, settings.batch, shape.context)?;
    let tokens_per_step = (settings.batch * shape.context) as f64;

    let bar = ProgressBar::new(settings.steps as u64).with_position(trainer.step as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps · {msg} · eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let first_step = trainer.step;
    while trainer.step < settings.steps {
        let report = trainer.step(&tokens)?;
        let done = trainer.step;
        let elapsed = started.elapsed().as_secs_f64();
        let throughput = (done - first_step) as f64 * tokens_per_step / elapsed.max(1e-9);
        bar.set_position(done as u64);
        bar.set_message(format!(
            "loss {:.3}{} · {:.0} tok/s",
            report.cross_entropy,
            agreement_note(&report.routing),
            throughput
        ));
        if done % 10 == 0 || done == settings.steps {
            let mut entry = json!({"event": "step", "step": done, "loss": report.loss,
                   "cross_entropy": report.cross_entropy, "kurtosis": report.kurtosis, "lr": report.lr,
                   "grad_norm": report.grad_norm, "tokens": done as f64 * tokens_per_step,
                   "tokens_per_s": throughput, "elapsed_s": elapsed});
            add_routing(&mut entry, report.mod_aux, &report.routing);
            append_log(&mut log, entry)?;
        }
        if done % args.eval_every == 0 || done == settings.steps {
            let eval = trainer.evaluate(&eval_set)?;
            bar.println(format!(
                "step {done}: train {:.3}, held-out {:.3} nats/token{}",
                report.cross_entropy,
                eval.loss,
                agreement_note(&eval.routing)
            ));
            let mut entry = json!({"event": "eval", "step": done, "heldout_loss": eval.loss});
            add_routing(&mut entry, eval.mod_aux, &eval.routing);
            append_log(&mut log, entry)?;
        }
        if done % args.checkpoint_every == 0 || done == settings.steps {
            checkpoint::save(&checkpoint_path, done, &settings, &fingerprint, &trainer.decoder, &trainer.optimizer)?;
        }
    }
    bar.finish_and_clear();

    let notes = [
        ("petrel.train.recipe", format!("{:?}", args.recipe).to_lowercase()),
        ("petrel.train.steps", settings.steps.to_string()),
        ("petrel.train.tokens", format!("{}", settings.steps as f64 * tokens_per_step)),
        ("petrel.train.settings", serde_json::to_string(&settings)?),
    ];
    let f32_path = args.out.join("model-f32.gguf");
    export::write_gguf(&f32_path, &trainer.decoder, &tokenizer, settings.qat, &notes)?;
    eprintln!("wrote {}", f32_path.display());
    if args.w4a4 {
        let w4_path = args.out.join("model-w4a4.gguf");
        let summary = write_w4a4(&f32_path, &w4_path, &train_path, args)?;
        if shape.routing.is_some() && !carries_routing(&w4_path)? {
            // A file without the routers would run as a dense model the weights were not
            // trained for: better none than a silently wrong one.
            std::fs::remove_file(&w4_path).with_context(|| format!("removing {}", w4_path.display()))?;
            eprintln!(
                "warning: petrel quantize dropped the mixture-of-depths routing, so {} was not kept; \
                 quantize model-f32.gguf once it carries petrel.mod.* through",
                w4_path.display()
            );
        } else {
            eprintln!("wrote {} ({} bytes)", w4_path.display(), summary.file_bytes);
        }
    }
    Ok(())
}

/// The W4 PTQ of the recipe: GPTQ on training text, group `--group`, no rotation, Q8_0
/// embedding/head, 4-bit activations at run time with clip ratio `--act-clip`.
pub fn write_w4a4(input: &Path, output: &Path, calib: &Path, args: &TrainArgs) -> Result<crate::quantize::Summary> {
    crate::quantize::run(&crate::quantize::QuantizeArgs {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        scheme: crate::quantize::Scheme::W4a4,
        group: args.group,
        rotate: false,
        seed: 0,
        gptq: true,
        act_order: false,
        calib: Some(calib.to_path_buf()),
        calib_tokens: 16384,
        calib_seq_len: args.context,
        act_clip: args.act_clip,
        a8: Vec::new(),
        embedding: crate::quantize::TableFormat::Q8_0,
        head: crate::quantize::TableFormat::Q8_0,
        threads: args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    })
}

/// Whether the GGUF file at `path` has mixture-of-depths routing metadata.
fn carries_routing(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = petrel_runtime::GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(file.get(petrel_runtime::routing::KEY_LAYERS).is_some())
}

fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_string());
    bar
}

fn obtain_tokenizer(args: &TrainArgs, train_text: &str) -> Result<TrainedTokenizer> {
    let path = args.out.join("tokenizer.gguf");
    if let Some(given) = &args.tokenizer {
        let t = TrainedTokenizer::load(given)?;
        if given != &path {
            t.save(&path)?;
        }
        return Ok(t);
    }
    if path.exists() {
        return TrainedTokenizer::load(&path);
    }
    let bar = ProgressBar::new((args.vocab - SPECIAL_TOKENS.len().min(args.vocab)) as u64);
    bar.set_style(
        ProgressStyle::with_template("training the tokenizer [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = crate::bpe_train::train_bpe(train_text, args.vocab, &SPECIAL_TOKENS, Some(&bar))?;
    bar.finish_and_clear();
    t.save(&path)?;
    Ok(t)
}
