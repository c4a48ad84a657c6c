//! `petrel route-fit`: mixture-of-depths routers for a pretrained model whose weights stay
//! frozen.
//!
//! Skipping block `l` for a token removes that block's update `f(x) = block(x) − x` from
//! its residual stream (and its keys and values from later tokens' attention there). The
//! router should therefore send through each block the tokens whose update matters most.
//! We fit each block's router `r = w · x + b` (on the block's input residual `x`, the
//! runtime's router) by ridge regression onto `ln(‖f(x)‖ / ‖x‖)`, the size of the update
//! relative to the stream, over a calibration text run through the dense model:
//!
//! 1. One pass of the model over `--calib-tokens` tokens; a tap accumulates, per block, the
//!    normal equations of the regression in f64 and keeps a sample of inputs.
//! 2. Per block, ridge on standardized inputs (closed form, Cholesky), then the bias is
//!    shifted so that a fraction `capacity` of the sampled tokens score above 0: the
//!    router's own logit is the causal decision at decode (gate `none`: a routed token's
//!    residual becomes `block(x)` exactly, so nothing is rescaled).
//! 3. The blocks to route (`auto:N`) are the `N` with the least estimated cost of skipping
//!    the tokens the router would skip: the mean over sampled tokens of
//!    `‖f(x)‖² / ‖x‖²` for tokens scoring ≤ 0. The first and last blocks are never routed.
//!
//! This is not the paper's end-to-end training of routers (the gradient through a frozen
//! 135 M-parameter model costs more CPU time than we have); it is the closed-form proxy,
//! and its perplexity cost is measured, not assumed.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use petrel_runtime::forward::{ActivationTap, TapSite};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::routing::{self, Gate};
use petrel_runtime::{KvType, Model, Session, SessionOptions};

use crate::ridge::{ridge_solve, standardize, Standardized};
use crate::{corpus, registry};

/// `petrel route-fit` options.
#[derive(clap::Args, Debug, Clone)]
pub struct RouteFitArgs {
    /// The dense model (a known name or a GGUF path; any format, W4A4 included: routers are
    /// fitted to the residual stream the file itself computes).
    #[arg(long, short)]
    pub model: String,
    /// Calibration text (UTF-8), e.g. the corpora's train.txt.
    #[arg(long)]
    pub text: PathBuf,
    /// Output directory: one `route-c{capacity}-{layers}.gguf` per capacity and layer
    /// choice, and `fit.json` (per-block fit quality and skip costs).
    #[arg(long)]
    pub out: PathBuf,
    /// Capacities to write (fractions of each prefill batch in (0, 1]), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    pub capacity: Vec<f32>,
    /// Which blocks to route: `auto:N` (the N cheapest to skip, by the estimate above) or
    /// an explicit list `3+5+7`; repeat the flag for several files.
    #[arg(long, default_value = "auto:8")]
    pub layers: Vec<String>,
    /// The first N positions of the context go through every routed block (attention
    /// sinks: pretrained models lean on the first tokens' keys in every layer).
    #[arg(long, default_value_t = 1)]
    pub sink_tokens: usize,
    /// Calibration tokens (consecutive windows of --window tokens).
    #[arg(long, default_value_t = 16_384)]
    pub calib_tokens: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Ridge strength on standardized inputs (unit-variance features).
    #[arg(long, default_value_t = 0.01)]
    pub ridge: f64,
    /// Inputs kept per block for thresholds and skip costs.
    #[arg(long, default_value_t = 2048)]
    pub sample: usize,
    /// Worker threads (default: all available cores).
    #[arg(long, short)]
    pub threads: Option<usize>,
}

/// Per-block sums for the regression and the sampled inputs.
#[derive(Clone, Debug, Default)]
struct BlockData {
    tokens: usize,
    /// Σ x, Σ y, Σ y² (f64).
    sum_x: Vec<f64>,
    sum_y: f64,
    sum_yy: f64,
    /// Σ x xᵀ (upper and lower, `dim × dim`) and Σ x y.
    sum_xx: Vec<f64>,
    sum_xy: Vec<f64>,
    /// Sampled inputs (`dim` each) with their squared relative update `‖f(x)‖²/‖x‖²`.
    sample: Vec<(Vec<f32>, f64)>,
}

/// The tap that fills [`BlockData`] from every block's input and output.
struct Collector {
    blocks: Mutex<Vec<BlockData>>,
    /// Keep every `stride`-th token of each batch in the sample.
    stride: usize,
    sample: usize,
}

impl ActivationTap for Collector {
    fn observe(&self, _layer: usize, _site: TapSite, _rows: &[f32], _tokens: usize, _cols: usize) {}

    fn observe_block(&self, layer: usize, input: &[f32], output: &[f32], tokens: usize, cols: usize) {
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        let b = &mut blocks[layer];
        if b.sum_x.is_empty() {
            b.sum_x = vec![0.0; cols];
            b.sum_xx = vec![0.0; cols * cols];
            b.sum_xy = vec![0.0; cols];
        }
        let mut x = vec![0f64; cols];
        for t in 0..tokens {
            let (xin, xout) = (&input[t * cols..(t + 1) * cols], &output[t * cols..(t + 1) * cols]);
            let norm_in: f64 = xin.iter().map(|&v| v as f64 * v as f64).sum();
            let norm_f: f64 = xin.iter().zip(xout).map(|(&a, &b)| (b as f64 - a as f64).powi(2)).sum();
            let relative = norm_f / norm_in.max(1e-30);
            let y = 0.5 * relative.max(1e-30).ln();
            for (xi, &v) in x.iter_mut().zip(xin) {
                *xi = v as f64;
            }
            b.tokens += 1;
            b.sum_y += y;
            b.sum_yy += y * y;
            for i in 0..cols {
                b.sum_x[i] += x[i];
                b.sum_xy[i] += x[i] * y;
                let row = &mut b.sum_xx[i * cols..(i + 1) * cols];
                // Upper triangle only; mirrored before solving.
                for j in i..cols {
                    row[j] += x[i] * x[j];
                }
            }
            if b.sample.len() < self.sample && t % self.stride == 0 {
                b.sample.push((xin.to_vec(), relative));
            }
        }
    }
}

/// A fitted router of one block, before its bias is set for a capacity.
#[derive(Clone, Debug)]
struct FittedRouter {
    weight: Vec<f32>,
    /// The regression's intercept.
    intercept: f64,
    /// Correlation of the fitted score with the target on the calibration tokens.
    correlation: f64,
    /// Scores of the sampled tokens and their squared relative updates.
    sample_scores: Vec<(f64, f64)>,
}

impl FittedRouter {
    /// The bias that routes a fraction `capacity` of the sampled tokens (score > 0).
    fn bias_for(&self, capacity: f32) -> f64 {
        let mut scores: Vec<f64> = self.sample_scores.iter().map(|s| s.0).collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        let k = routing::routed_count(capacity, scores.len()).min(scores.len());
        // The threshold lies between the k-th and (k+1)-th highest scores.
        let threshold = match (scores.get(k - 1), scores.get(k)) {
            (Some(&a), Some(&b)) => 0.5 * (a + b),
            (Some(&a), None) => a - 1.0,
            _ => 0.0,
        };
        self.intercept - threshold
    }

    /// The estimated cost of skipping at `capacity`: mean over sampled tokens of
    /// `‖f(x)‖²/‖x‖²` for those the router skips.
    fn skip_cost(&self, capacity: f32) -> f64 {
        let shift = self.bias_for(capacity) - self.intercept;
        let skipped: f64 = self.sample_scores.iter().filter(|s| s.0 + shift <= 0.0).map(|s| s.1).sum();
        skipped / self.sample_scores.len().max(1) as f64
    }
}

/// Ridge regression of the target on standardized inputs, mapped back to raw inputs.
fn fit(b: &BlockData, dim: usize, lambda: f64) -> Result<FittedRouter> {
    let n = b.tokens as f64;
    if b.tokens < 2 {
        bail!("too few calibration tokens");
    }
    let Standardized { mean, std, correlation: a } = standardize(&b.sum_x, &b.sum_xx, n);
    let mean_y = b.sum_y / n;
    let c: Vec<f64> = (0..dim).map(|i| (b.sum_xy[i] / n - mean[i] * mean_y) / std[i]).collect();
    let beta = ridge_solve(&a, &c, dim, lambda)?;
    let weight: Vec<f64> = (0..dim).map(|i| beta[i] / std[i]).collect();
    let intercept = mean_y - weight.iter().zip(&mean).map(|(w, m)| w * m).sum::<f64>();
    // Correlation of prediction and target: cov(ŷ, y) / (σ_ŷ σ_y), from the moments.
    let cov_pred_y: f64 = (0..dim).map(|i| beta[i] * c[i]).sum();
    let var_pred: f64 = (0..dim).map(|i| (0..dim).map(|j| beta[i] * a[i * dim + j] * beta[j]).sum::<f64>()).sum();
    let var_y = (b.sum_yy / n - mean_y * mean_y).max(1e-30);
    let correlation = cov_pred_y / (var_pred.max(1e-30) * var_y).sqrt();
    let sample_scores = b
        .sample
        .iter()
        .map(|(x, rel)| (weight.iter().zip(x).map(|(w, &v)| w * v as f64).sum::<f64>() + intercept, *rel))
        .collect();
    Ok(FittedRouter { weight: weight.iter().map(|&w| w as f32).collect(), intercept, correlation, sample_scores })
}

/// A `--layers` choice resolved to block indices.
fn resolve_layers(spec: &str, fitted: &[FittedRouter], capacity: f32) -> Result<Vec<usize>> {
    let blocks = fitted.len();
    if let Some(n) = spec.strip_prefix("auto:") {
        let n: usize = n.parse().with_context(|| format!("--layers {spec}: expected auto:N"))?;
        if n == 0 || n + 2 > blocks {
            bail!("--layers {spec}: between 1 and {} blocks can be routed (not the first or last)", blocks - 2);
        }
        let mut candidates: Vec<usize> = (1..blocks - 1).collect();
        candidates.sort_by(|&a, &b| fitted[a].skip_cost(capacity).total_cmp(&fitted[b].skip_cost(capacity)));
        let mut chosen = candidates[..n].to_vec();
        chosen.sort_unstable();
        return Ok(chosen);
    }
    let mut chosen = Vec::new();
    for part in spec.split('+') {
        let l: usize = part.trim().parse().with_context(|| format!("--layers {spec}: expected auto:N or 3+5+7"))?;
        if l >= blocks {
            bail!("--layers {spec}: block {l} does not exist (the model has {blocks})");
        }
        chosen.push(l);
    }
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `source` plus routing over `layers` at `capacity` to `path` (checked by loading).
fn write_routed(
    source: &GgufFile<'_>,
    fitted: &[FittedRouter],
    layers: &[usize],
    capacity: f32,
    sink_tokens: usize,
    path: &Path,
) -> Result<()> {
    let mut w = GgufWriter::copy_of(source, |name| !name.starts_with("petrel.mod.") && !name.contains(".mod_"));
    w.metadata(routing::KEY_LAYERS, MetadataValue::I32Array(layers.iter().map(|&l| l as i32).collect()))
        .metadata(routing::KEY_CAPACITY, MetadataValue::F32(capacity))
        .metadata(routing::KEY_GATE, MetadataValue::String(Gate::None.name().into()))
        .metadata(routing::KEY_DECISION, MetadataValue::String("router".into()))
        .metadata(routing::KEY_SINK_TOKENS, MetadataValue::U32(sink_tokens as u32));
    for &l in layers {
        let r = &fitted[l];
        w.tensor(
            &format!("blk.{l}.mod_router.weight"),
            &[r.weight.len() as u64],
            TensorType::F32,
            f32_bytes(&r.weight),
        );
        let bias = [r.bias_for(capacity) as f32];
        w.tensor(&format!("blk.{l}.mod_router.bias"), &[1], TensorType::F32, f32_bytes(&bias));
    }
    crate::gguf_out::write_loadable(path, &w.to_bytes())
}

/// Runs `petrel route-fit`.
pub fn run(args: &RouteFitArgs) -> Result<()> {
    for &c in &args.capacity {
        if !(c > 0.0 && c <= 1.0) {
            bail!("--capacity {c} is outside (0, 1]");
        }
    }
    if args.window < 2 || args.calib_tokens < args.window {
        bail!("--calib-tokens ({}) must hold at least one --window ({} ≥ 2)", args.calib_tokens, args.window);
    }
    let path = registry::resolve(&args.model)?;
    let mapped = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let gguf = GgufFile::parse(mapped.bytes()).with_context(|| format!("cannot parse {}", path.display()))?;
    let model = Model::load(&gguf).with_context(|| format!("cannot load {}", path.display()))?;
    if model.routing.is_some() {
        bail!("{} already routes tokens: fit routers on the dense model", path.display());
    }
    if args.window > model.config.context_length {
        bail!("--window {} exceeds the model's context of {}", args.window, model.config.context_length);
    }
    let text = corpus::read_text(&args.text)?;
    // Tokenize a prefix long enough for the calibration windows (about 8 bytes per token
    // is ample for English).
    let prefix_end = text.char_indices().nth(args.calib_tokens * 8).map_or(text.len(), |(i, _)| i);
    let tokens = model.tokenizer.encode(&text[..prefix_end], false);
    let windows = tokens.len().min(args.calib_tokens) / args.window;
    if windows == 0 {
        bail!("{} has {} tokens, fewer than one window of {}", args.text.display(), tokens.len(), args.window);
    }
    let (layers, dim) = (model.config.layers, model.config.dim);
    let per_window = args.sample.div_ceil(windows).max(1);
    let collector = Collector {
        blocks: Mutex::new(vec![BlockData::default(); layers]),
        stride: (args.window / per_window).max(1),
        sample: args.sample,
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options = SessionOptions { capacity: args.window, threads, kv_type: KvType::F32, ..SessionOptions::default() };
    let mut session = Session::new(&model, options)?;
    let bar = ProgressBar::new((windows * args.window) as u64).with_style(
        ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for w in 0..windows {
        session.reset();
        session.prefill_observed(&tokens[w * args.window..(w + 1) * args.window], &collector)?;
        bar.inc(args.window as u64);
    }
    bar.finish_and_clear();

    let blocks = collector.blocks.into_inner().unwrap_or_else(PoisonError::into_inner);
    let mut fitted = Vec::with_capacity(layers);
    for (l, b) in blocks.iter().enumerate() {
        fitted.push(fit(b, dim, args.ridge).with_context(|| format!("fitting the router of block {l}"))?);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    eprintln!("block  correlation  skip cost at each capacity");
    let mut report_blocks = Vec::new();
    for (l, f) in fitted.iter().enumerate() {
        let costs: Vec<f64> = args.capacity.iter().map(|&c| f.skip_cost(c)).collect();
        let shown: Vec<String> = costs.iter().map(|c| format!("{c:.4}")).collect();
        eprintln!("{l:>5}  {:>11.3}  {}", f.correlation, shown.join(" "));
        report_blocks.push(format!(
            "    {{\"block\": {l}, \"correlation\": {}, \"skip_cost\": [{}]}}",
            f.correlation,
            costs.iter().map(f64::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    let mut outputs = Vec::new();
    for &capacity in &args.capacity {
        for spec in &args.layers {
            let chosen = resolve_layers(spec, &fitted, capacity)?;
            let name = format!("route-c{capacity}-{}.gguf", spec.replace(':', ""));
            let out = args.out.join(&name);
            write_routed(&gguf, &fitted, &chosen, capacity, args.sink_tokens, &out)?;
            eprintln!("wrote {} (blocks {chosen:?}, capacity {capacity})", out.display());
            outputs.push(format!(
                "    {{\"file\": \"{name}\", \"capacity\": {capacity}, \"spec\": \"{spec}\", \"blocks\": {chosen:?}}}"
            ));
        }
    }
    let json = format!(
        "{{\n  \"model\": \"{}\",\n  \"calibration_tokens\": {},\n  \"blocks\": [\n{}\n  ],\n  \"files\": [\n{}\n  ]\n}}\n",
        path.display(),
        windows * args.window,
        report_blocks.join(",\n"),
        outputs.join(",\n")
    );
    std::fs::write(args.out.join("fit.json"), json).context("writing fit.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_finds_the_direction_that_predicts_the_update() {
        // Blocks whose relative update grows with x[1]: the router must weigh x[1] most,
        // and its bias must route the requested fraction of the sample.
        let dim = 4;
        let collector = Collector { blocks: Mutex::new(vec![BlockData::default()]), stride: 1, sample: 1000 };
        let mut seed = 1u64;
        let mut next = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for _ in 0..200 {
            let input: Vec<f32> = (0..dim).map(|_| next() + 2.0).collect();
            let scale = (0.5 * input[1]).exp();
            let output: Vec<f32> = input.iter().map(|&v| v * (1.0 + 0.1 * scale)).collect();
            collector.observe_block(0, &input, &output, 1, dim);
        }
        let blocks = collector.blocks.into_inner().expect("not poisoned");
        let f = fit(&blocks[0], dim, 1e-6).expect("fits");
        assert!(f.correlation > 0.95, "correlation {}", f.correlation);
        let largest = (0..dim).max_by(|&a, &b| f.weight[a].abs().total_cmp(&f.weight[b].abs()));
        assert_eq!(largest, Some(1), "{:?}", f.weight);
        let shift = f.bias_for(0.25) - f.intercept;
        let routed = f.sample_scores.iter().filter(|s| s.0 + shift > 0.0).count();
        assert_eq!(routed, 50);
    }
}
