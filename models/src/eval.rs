//! `petrel eval`: measuring a model's quality. `petrel eval ppl` computes perplexity on a
//! text file; `petrel eval act-stats` reports the outlier statistics of every linear
//! layer's input (see [`petrel_models::act_stats`]).
//!
//! Two ways to cut a long text into the model's context:
//! - **strided** (the default, as in Hugging Face's perplexity guide): windows of `window`
//!   tokens starting every `stride` tokens, each run from an empty cache; a window scores only
//!   the tokens that no earlier window scored, so with `stride < window` every token but the
//!   first is scored exactly once, with at least `window − stride` tokens of context;
//! - **llama.cpp** (`--llama-cpp`, what `llama-perplexity -c WINDOW` computes):
//!   non-overlapping chunks of `window` tokens, BOS in place of each chunk's first token when
//!   the model adds BOS, and only the predictions in each chunk's second half are scored
//!   (positions `window/2 .. window−1`, so `window − window/2 − 1` tokens per chunk).
//!
//! Perplexity is `exp(mean negative log-likelihood)`, accumulated in f64.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use petrel_models::act_stats::{self, SiteStats, SiteSummary};
use petrel_models::registry;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::routing::{Decision, PrefillRouting};
use petrel_runtime::{KvType, Model, Session, SessionOptions};

/// `petrel eval` subcommands.
#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a model on a text file (lower is better).
    Ppl(PplArgs),
    /// Per-layer activation outlier statistics of the linear layers' inputs: mean per-token
    /// kurtosis over the channels, and the max and median over channels of each channel's
    /// largest |activation|.
    ActStats(ActStatsArgs),
    /// Quality of KV-prediction prefill: accuracy on a repeated-word task and perplexity
    /// of continuations after prompts of several lengths, with the base's own cache, the
    /// predicted cache, and the auxiliary model alone.
    Kvp(crate::kvp_eval::KvpEvalArgs),
}

/// Arguments of `petrel eval ppl`.
#[derive(Args, Debug)]
pub struct PplArgs {
    /// A known model name (pulled on first use) or a path to a GGUF file.
    #[arg(long, short, default_value = "smollm2-135m")]
    model: String,
    /// UTF-8 text file to score (tokenized whole, without BOS unless the model adds it).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per forward pass (the context each window sees); at most the model's context.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Tokens between window starts [default: window / 2]. Not used with --llama-cpp.
    #[arg(long)]
    stride: Option<usize>,
    /// Reproduce llama-perplexity's method: non-overlapping chunks of --window tokens,
    /// second half of each scored.
    #[arg(long)]
    llama_cpp: bool,
    /// Worker threads (default: all available cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// How the KV cache stores keys and values (`f32`, `f16`, `q8`, `q4`). f32 here, unlike
    /// `run` and the library: evaluation scores the model itself, and the README's
    /// perplexities were measured that way.
    #[arg(long, default_value = "f32", value_parser = |s: &str| KvType::parse(s).ok_or_else(|| format!("unknown KV-cache type {s:?} (f16, f32, q8, q4)")))]
    kv_type: KvType,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Mixture-of-depths models: route each window by top-k over the whole window (as in
    /// training; a token's route then depends on later tokens' router scores) or by each
    /// token's causal decision (as in decoding).
    #[arg(long, value_enum, default_value = "top-k")]
    mod_routing: ModRouting,
    /// Mixture-of-depths models: the causal decision to use [default: the file's].
    #[arg(long, value_enum)]
    mod_decision: Option<ModDecision>,
}

/// `--mod-routing` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModRouting {
    /// Top-k of each window by router score.
    TopK,
    /// Each token's causal decision.
    Causal,
}

/// `--mod-decision` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModDecision {
    /// The router's logit is positive.
    Router,
    /// The predictor MLP's logit is positive.
    Predictor,
}

/// Arguments of `petrel eval act-stats`.
#[derive(Args, Debug)]
pub struct ActStatsArgs {
    /// A known model name (pulled on first use) or a path to a GGUF file.
    #[arg(long, short, default_value = "smollm2-135m")]
    model: String,
    /// UTF-8 text file to run (tokenized whole, without BOS unless the model adds it).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per forward pass: the text is cut into consecutive, non-overlapping windows,
    /// each run from an empty cache; at most the model's context.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Measure only the first N tokens of the text.
    #[arg(long, default_value_t = 8192)]
    max_tokens: usize,
    /// Worker threads (default: all available cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs an eval subcommand.
pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Ppl(args) => perplexity(&args),
        EvalCommand::ActStats(args) => activation_stats(&args),
        EvalCommand::Kvp(args) => crate::kvp_eval::run(&args),
    }
}

/// One forward pass over `tokens[start..end]` from an empty cache, scoring the predictions
/// of `tokens[score_from..end]` (each from the tokens before it in the window).
/// `start < score_from <= end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub score_from: usize,
}

impl Window {
    /// Tokens this window scores.
    pub fn scored(&self) -> usize {
        self.end - self.score_from
    }
}

/// Strided windows over `n_tokens` tokens: starts `0, stride, 2·stride, …` until a window
/// reaches the end; each scores the tokens after the previous window's end (the first
/// window all but its first token). Needs `1 <= stride <= window` and `n_tokens >= 2`.
pub fn strided_windows(n_tokens: usize, window: usize, stride: usize) -> Vec<Window> {
    assert!(1 <= stride && stride <= window && n_tokens >= 2, "bad strided plan");
    let mut windows = Vec::new();
    let mut scored_to = 1;
    let mut start = 0;
    loop {
        let end = (start + window).min(n_tokens);
        windows.push(Window { start, end, score_from: scored_to.max(start + 1) });
        if end == n_tokens {
            return windows;
        }
        scored_to = end;
        start += stride;
    }
}

/// llama-perplexity's chunks: `n_tokens / window` non-overlapping chunks, each scoring the
/// predictions from position `window / 2` on (tokens `window/2 + 1 .. window` of the chunk).
pub fn llama_cpp_chunks(n_tokens: usize, window: usize) -> Vec<Window> {
    (0..n_tokens / window)
        .map(|c| {
            let start = c * window;
            Window { start, end: start + window, score_from: start + window / 2 + 1 }
        })
        .collect()
}

/// `−log softmax(logits)[target]`, computed stably: the maximum is subtracted before
/// exponentiating and the sum of exponentials is accumulated in f64.
pub fn negative_log_likelihood(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from((x - max).exp())).sum();
    f64::from(max) - f64::from(logits[target]) + sum.ln()
}

/// Summed negative log-likelihood and how many tokens it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    /// Σ −ln p(target), nats.
    pub nll_sum: f64,
    /// Tokens scored.
    pub scored: usize,
    /// Mixture-of-depths models: token visits to routed blocks, and tokens fed times
    /// routed blocks (their ratio is the capacity actually used).
    pub routed_visits: usize,
    /// See `routed_visits`.
    pub routed_slots: usize,
}

impl Score {
    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.scored as f64).exp()
    }
}

/// Scores `windows` of `tokens` with `session` (whose capacity must hold the longest
/// window). With `bos`, each window's first token is replaced by it, as llama-perplexity
/// does. `on_scored` is told how many tokens each step scored. A mixture-of-depths model
/// gets each window in one call, so that top-k routing sees the whole window (the
/// session's batch must hold it).
pub fn score(
    session: &mut Session<'_, '_>,
    tokens: &[u32],
    windows: &[Window],
    bos: Option<u32>,
    mut on_scored: impl FnMut(usize),
) -> Result<Score> {
    let vocab = session.model().config.vocab_size;
    let routed: Vec<usize> = session.model().routing.iter().flat_map(|r| r.routed_layers()).collect();
    let batch = if routed.is_empty() { 64 } else { session.capacity() };
    let mut logits = vec![0.0f32; batch * vocab];
    let mut input = Vec::with_capacity(session.capacity());
    let mut total = Score::default();
    for w in windows {
        input.clear();
        input.extend_from_slice(&tokens[w.start..w.end]);
        if let Some(bos) = bos {
            input[0] = bos;
        }
        session.reset();
        // Logits at window position `p` predict `input[p + 1]`: feed the tokens before the
        // first needed position without the output head, the rest with it. The last token
        // predicts nothing inside the window, so it is not fed.
        let first = w.score_from - w.start - 1;
        let fed = if routed.is_empty() { first } else { 0 };
        if fed > 0 {
            session.prefill(&input[..fed])?;
        }
        for from in (fed..input.len() - 1).step_by(batch) {
            let to = (from + batch).min(input.len() - 1);
            session.prefill_all_logits(&input[from..to], &mut logits)?;
            for (row, p) in (from..to).enumerate().filter(|&(_, p)| p >= first) {
                let target = input[p + 1] as usize;
                total.nll_sum += negative_log_likelihood(&logits[row * vocab..(row + 1) * vocab], target);
            }
            total.scored += to - from.max(first);
            on_scored(to - from.max(first));
        }
        total.routed_visits += routed.iter().map(|&l| session.tokens_through(l)).sum::<usize>();
        total.routed_slots += routed.len() * (input.len() - 1);
    }
    Ok(total)
}

fn perplexity(args: &PplArgs) -> Result<()> {
    let method = if args.llama_cpp { "llama-cpp" } else { "strided" };
    if args.window < 4 {
        bail!("--window must be at least 4 tokens");
    }
    let stride = match (args.llama_cpp, args.stride) {
        (true, Some(_)) => bail!("--stride does not apply with --llama-cpp (its chunks do not overlap)"),
        (true, None) => args.window,
        (false, Some(s)) if s == 0 || s > args.window => {
            bail!("--stride must be between 1 and the window ({}), not {s}", args.window)
        }
        (false, s) => s.unwrap_or(args.window / 2),
    };
    let text = read_text(&args.text)?;

    let path = registry::resolve(&args.model)?;
    let file = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let model_error = || format!("cannot load the model {}", path.display());
    let gguf = GgufFile::parse(file.bytes()).with_context(model_error)?;
    let mut model = Model::load(&gguf).with_context(model_error)?;
    if args.window > model.config.context_length {
        bail!("--window {} exceeds the model's context length of {} tokens", args.window, model.config.context_length);
    }
    let mut prefill_routing = PrefillRouting::TopK;
    if let Some(routing) = &mut model.routing {
        if args.mod_routing == ModRouting::Causal {
            prefill_routing = PrefillRouting::Causal;
        }
        match args.mod_decision {
            Some(ModDecision::Predictor) if !routing.has_predictors() => {
                bail!("{} has no predictors: --mod-decision predictor does not apply", path.display())
            }
            Some(ModDecision::Predictor) => routing.decision = Decision::Predictor,
            Some(ModDecision::Router) => routing.decision = Decision::Router,
            None => {}
        }
    }
    let model = model;

    let (tokens, bos, text_tokens) = tokenize(&model, &text, args.max_tokens);
    let windows = if args.llama_cpp {
        if tokens.len() < 2 * args.window {
            bail!(
                "llama-perplexity needs at least 2 × window = {} tokens; the text has {} (after --max-tokens)",
                2 * args.window,
                tokens.len()
            );
        }
        llama_cpp_chunks(tokens.len(), args.window)
    } else {
        if tokens.len() < 2 {
            bail!("{} has {} tokens; at least 2 are needed to score one", args.text.display(), tokens.len());
        }
        strided_windows(tokens.len(), args.window, stride)
    };
    let to_score: usize = windows.iter().map(Window::scored).sum();

    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // A routed model's windows run as one batch, so that top-k sees the whole window.
    let max_batch = if model.routing.is_some() { args.window } else { SessionOptions::default().max_batch };
    let options = SessionOptions {
        capacity: args.window,
        threads,
        max_batch,
        prefill_routing,
        kv_type: args.kv_type,
        ..SessionOptions::default()
    };
    let mut session = Session::new(&model, options)?;
    eprintln!(
        "{}: {} tokens ({text_tokens} in the file), {} windows of {} ({method}{}), {threads} threads",
        args.text.display(),
        tokens.len(),
        windows.len(),
        args.window,
        if args.llama_cpp { String::new() } else { format!(", stride {stride}") },
    );

    let bar = ProgressBar::new(to_score as u64);
    bar.set_style(
        ProgressStyle::with_template("scoring {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let chunk_bos = if args.llama_cpp { bos } else { None };
    let result = score(&mut session, &tokens, &windows, chunk_bos, |n| bar.inc(n as u64))?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    debug_assert_eq!(result.scored, to_score);

    let ppl = result.perplexity();
    if !ppl.is_finite() {
        bail!("the perplexity is not finite (mean NLL {}): the model produced non-finite logits", result.nll_sum);
    }
    let report = Report {
        model: &path,
        text: &args.text,
        method,
        perplexity: ppl,
        mean_nll: result.nll_sum / result.scored as f64,
        tokens_scored: result.scored,
        tokens_in_text: text_tokens,
        windows: windows.len(),
        window: args.window,
        stride,
        threads,
        seconds,
        routing: model.routing.as_ref().map(|r| {
            let how = match prefill_routing {
                PrefillRouting::TopK => format!("top-k, capacity {}", r.capacity),
                PrefillRouting::Causal => format!("causal, {} decision", r.decision.name()),
            };
            (how, result.routed_visits as f64 / result.routed_slots.max(1) as f64)
        }),
    };
    report.print();
    if let Some(out) = &args.json {
        std::fs::write(out, report.json()).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// `text` as the evals feed it: BOS first if the model adds it, then the whole text, cut
/// to `max_tokens`. Also returns the BOS token (if added) and the text's full token count.
fn tokenize(model: &Model<'_>, text: &str, max_tokens: Option<usize>) -> (Vec<u32>, Option<u32>, usize) {
    let tokenizer = &model.tokenizer;
    let bos = tokenizer.add_bos().then(|| tokenizer.bos());
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    tokenizer.encode_into(text, false, &mut tokens);
    let text_tokens = tokens.len();
    if let Some(max) = max_tokens {
        tokens.truncate(max);
    }
    (tokens, bos, text_tokens)
}

fn activation_stats(args: &ActStatsArgs) -> Result<()> {
    if args.window == 0 {
        bail!("--window must be at least 1 token");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let text = read_text(&args.text)?;
    let path = registry::resolve(&args.model)?;
    let file = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let model_error = || format!("cannot load the model {}", path.display());
    let gguf = GgufFile::parse(file.bytes()).with_context(model_error)?;
    let model = Model::load(&gguf).with_context(model_error)?;
    if args.window > model.config.context_length {
        bail!("--window {} exceeds the model's context length of {} tokens", args.window, model.config.context_length);
    }
    let (tokens, _, text_tokens) = tokenize(&model, &text, Some(args.max_tokens));
    if tokens.is_empty() {
        bail!("{} has no tokens", args.text.display());
    }
    let windows = tokens.len().div_ceil(args.window);
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "{}: {} tokens ({text_tokens} in the file), {windows} windows of up to {}, {threads} threads",
        args.text.display(),
        tokens.len(),
        args.window,
    );

    let bar = ProgressBar::new(tokens.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("measuring {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let stats = act_stats::measure(&model, &tokens, args.window, threads, |n| bar.inc(n as u64))?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let summary = act_stats::summarize(&stats);
    let odd = stats.iter().filter(|s| !(s.mean_kurtosis.is_finite() && s.ratio.is_finite())).count();
    if odd > 0 {
        eprintln!("warning: {odd} sites have a non-finite kurtosis or max/median (constant or non-finite activations)");
    }
    let report = ActReport {
        model: &path,
        text: &args.text,
        tokens: tokens.len(),
        tokens_in_text: text_tokens,
        window: args.window,
        windows,
        threads,
        seconds,
        stats: &stats,
        summary: &summary,
    };
    report.print()?;
    if let Some(out) = &args.json {
        std::fs::write(out, report.json()).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// What `petrel eval act-stats` prints and writes as JSON.
struct ActReport<'a> {
    model: &'a Path,
    text: &'a Path,
    tokens: usize,
    tokens_in_text: usize,
    window: usize,
    windows: usize,
    threads: usize,
    seconds: f64,
    stats: &'a [SiteStats],
    summary: &'a [SiteSummary],
}

impl ActReport<'_> {
    /// A markdown table of every (layer, site), then one of the per-site means over layers.
    fn print(&self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}: {} tokens ({} in the text), {} windows of up to {} tokens, {:.1} s on {} threads\n",
            self.model.display(),
            self.tokens,
            self.tokens_in_text,
            self.windows,
            self.window,
            self.seconds,
            self.threads
        )?;
        writeln!(out, "| layer | site | kurtosis | max channel | median channel | max/median |")?;
        writeln!(out, "|---:|:---|---:|---:|---:|---:|")?;
        for s in self.stats {
            writeln!(
                out,
                "| {} | {} | {:.2} | {:.4} | {:.4} | {:.2} |",
                s.layer,
                act_stats::site_name(s.site),
                s.mean_kurtosis,
                s.max_channel,
                s.median_channel,
                s.ratio
            )?;
        }
        writeln!(out, "\n| site | layers | mean kurtosis | mean max/median |")?;
        writeln!(out, "|:---|---:|---:|---:|")?;
        for s in self.summary {
            writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} |",
                act_stats::site_name(s.site),
                s.layers,
                s.mean_kurtosis,
                s.mean_ratio
            )?;
        }
        out.flush()
    }

    fn json(&self) -> String {
        let sites: Vec<String> = self
            .stats
            .iter()
            .map(|s| {
                format!(
                    concat!(
                        "    {{\"layer\": {}, \"site\": \"{}\", \"tokens\": {}, \"channels\": {}, ",
                        "\"mean_kurtosis\": {}, \"max_channel\": {}, \"median_channel\": {}, \"ratio\": {}}}"
                    ),
                    s.layer,
                    act_stats::site_name(s.site),
                    s.tokens,
                    s.channels,
                    json_number(s.mean_kurtosis),
                    json_number(s.max_channel),
                    json_number(s.median_channel),
                    json_number(s.ratio),
                )
            })
            .collect();
        let summary: Vec<String> = self
            .summary
            .iter()
            .map(|s| {
                format!(
                    "    {{\"site\": \"{}\", \"layers\": {}, \"mean_kurtosis\": {}, \"mean_ratio\": {}}}",
                    act_stats::site_name(s.site),
                    s.layers,
                    json_number(s.mean_kurtosis),
                    json_number(s.mean_ratio),
                )
            })
            .collect();
        format!(
            concat!(
                "{{\n  \"model\": {},\n  \"text\": {},\n  \"tokens\": {},\n  \"tokens_in_text\": {},\n",
                "  \"window\": {},\n  \"windows\": {},\n  \"threads\": {},\n  \"seconds\": {},\n",
                "  \"sites\": [\n{}\n  ],\n  \"summary\": [\n{}\n  ]\n}}\n"
            ),
            json_string(&self.model.display().to_string()),
            json_string(&self.text.display().to_string()),
            self.tokens,
            self.tokens_in_text,
            self.window,
            self.windows,
            self.threads,
            self.seconds,
            sites.join(",\n"),
            summary.join(",\n"),
        )
    }
}

/// `x` as a JSON number, or `null` when it is not finite (JSON has no NaN or infinity).
fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".to_string()
    }
}

/// The text file as UTF-8, with a clear error for a missing, unreadable or empty file.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the text file {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(text)
}

/// What `petrel eval ppl` prints and writes as JSON.
struct Report<'a> {
    model: &'a Path,
    text: &'a Path,
    method: &'a str,
    perplexity: f64,
    mean_nll: f64,
    tokens_scored: usize,
    tokens_in_text: usize,
    windows: usize,
    window: usize,
    stride: usize,
    threads: usize,
    seconds: f64,
    /// Mixture-of-depths models: how windows were routed, and the fraction of tokens the
    /// routed blocks processed.
    routing: Option<(String, f64)>,
}

impl Report<'_> {
    fn print(&self) {
        let mut out = std::io::stdout().lock();
        let rate = self.tokens_scored as f64 / self.seconds.max(1e-9);
        let _ = writeln!(out, "perplexity: {:.4} (mean NLL {:.5} nats)", self.perplexity, self.mean_nll);
        let _ = writeln!(out, "tokens scored: {} (the text has {})", self.tokens_scored, self.tokens_in_text);
        let _ = writeln!(
            out,
            "window: {}, stride: {}, method: {} ({} windows)",
            self.window, self.stride, self.method, self.windows
        );
        let _ = writeln!(out, "time: {:.1} s ({rate:.1} scored tokens/s, {} threads)", self.seconds, self.threads);
        if let Some((how, used)) = &self.routing {
            let _ = writeln!(out, "routing: {how}; routed blocks processed {:.1}% of tokens", used * 100.0);
        }
    }

    fn json(&self) -> String {
        format!(
            concat!(
                "{{\n  \"model\": {},\n  \"text\": {},\n  \"method\": \"{}\",\n  \"perplexity\": {},\n",
                "  \"mean_nll\": {},\n  \"tokens_scored\": {},\n  \"tokens_in_text\": {},\n  \"windows\": {},\n",
                "  \"window\": {},\n  \"stride\": {},\n  \"threads\": {},\n  \"seconds\": {},\n",
                "  \"routing\": {},\n  \"routed_fraction\": {}\n}}\n"
            ),
            json_string(&self.model.display().to_string()),
            json_string(&self.text.display().to_string()),
            self.method,
            self.perplexity,
            self.mean_nll,
            self.tokens_scored,
            self.tokens_in_text,
            self.windows,
            self.window,
            self.stride,
            self.threads,
            self.seconds,
            self.routing.as_ref().map_or("null".to_string(), |(how, _)| json_string(how)),
            self.routing.as_ref().map_or("null".to_string(), |(_, used)| used.to_string()),
        )
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How often each token index is scored.
    fn coverage(n: usize, windows: &[Window]) -> Vec<usize> {
        let mut seen = vec![0; n];
        for w in windows {
            assert!(w.start < w.score_from && w.score_from <= w.end && w.end <= n, "{w:?}");
            for count in &mut seen[w.score_from..w.end] {
                *count += 1;
            }
        }
        seen
    }

    #[test]
    fn strided_windows_score_every_token_but_the_first_exactly_once() {
        for n in 2..90 {
            for window in 1..20 {
                for stride in 1..window {
                    let windows = strided_windows(n, window, stride);
                    let seen = coverage(n, &windows);
                    assert_eq!(seen[0], 0);
                    assert!(seen[1..].iter().all(|&c| c == 1), "n {n}, window {window}, stride {stride}: {seen:?}");
                    for w in &windows {
                        assert!(w.end - w.start <= window);
                        // Every scored token sees at least `window − stride` tokens before it
                        // (or all tokens before it, near the start of the text).
                        assert!(w.score_from - w.start >= (window - stride).min(w.score_from));
                    }
                    assert_eq!(windows.last().unwrap().end, n);
                }
            }
        }
    }

    #[test]
    fn strided_windows_match_a_hand_worked_example() {
        let w = |start, end, score_from| Window { start, end, score_from };
        assert_eq!(strided_windows(1000, 512, 256), [w(0, 512, 1), w(256, 768, 512), w(512, 1000, 768)]);
        assert_eq!(strided_windows(300, 512, 256), [w(0, 300, 1)]);
        // stride = window: disjoint windows, each window's first token has no context.
        assert_eq!(strided_windows(10, 4, 4), [w(0, 4, 1), w(4, 8, 5), w(8, 10, 9)]);
    }

    #[test]
    fn llama_cpp_chunks_score_the_second_half_less_one() {
        let chunks = llama_cpp_chunks(1300, 512);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1], Window { start: 512, end: 1024, score_from: 512 + 257 });
        assert!(chunks.iter().all(|c| c.scored() == 255));
        let seen = coverage(1300, &chunks);
        assert_eq!(seen.iter().sum::<usize>(), 510);
        assert!(seen.iter().all(|&c| c <= 1));
    }

    #[test]
    fn negative_log_likelihood_is_exact_and_stable() {
        // Uniform logits: every token has probability 1/n.
        let uniform = vec![3.5f32; 1000];
        assert!((negative_log_likelihood(&uniform, 7) - 1000f64.ln()).abs() < 1e-9);
        // Two tokens, logits 0 and ln 3: probabilities 1/4 and 3/4.
        let two = [0.0f32, 3f32.ln()];
        assert!((negative_log_likelihood(&two, 0) - 4f64.ln()).abs() < 1e-6);
        assert!((negative_log_likelihood(&two, 1) - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        // Huge logits would overflow a naive softmax.
        let huge = [1e30f32, 1e30, -1e30];
        assert!((negative_log_likelihood(&huge, 0) - 2f64.ln()).abs() < 1e-9);
        assert!(negative_log_likelihood(&huge, 2).is_finite());
    }

    /// `score` on SmolLM2 (from the cache, as the other model tests) against a plain
    /// reference: each window fed one token at a time, each target scored from the logits
    /// of `Session::step`.
    #[test]
    fn score_matches_token_by_token_decoding() {
        let path = registry::cache_dir().unwrap().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(path.exists(), "{} is missing: run `petrel pull smollm2-135m` first", path.display());
        let file = MappedFile::open(&path).unwrap();
        let gguf = GgufFile::parse(file.bytes()).unwrap();
        let model = Model::load(&gguf).unwrap();
        let text = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of \
                    times; 12345 apples, and a café.";
        let tokens = model.tokenizer.encode(text, false);
        assert!(tokens.len() > 30);
        let options = SessionOptions { capacity: 16, threads: 2, ..SessionOptions::default() };
        let mut session = Session::new(&model, options).unwrap();
        for (windows, bos) in
            [(strided_windows(tokens.len(), 16, 5), None), (llama_cpp_chunks(tokens.len(), 16), Some(7))]
        {
            let mut progress = 0;
            let got = score(&mut session, &tokens, &windows, bos, |n| progress += n).unwrap();
            let mut want = Score::default();
            for w in &windows {
                session.reset();
                for p in w.start..w.end - 1 {
                    let input = if p == w.start { bos.unwrap_or(tokens[p]) } else { tokens[p] };
                    let logits = session.step(input).unwrap();
                    if p + 1 >= w.score_from {
                        want.nll_sum += negative_log_likelihood(logits, tokens[p + 1] as usize);
                        want.scored += 1;
                    }
                }
            }
            assert_eq!((got.scored, progress), (want.scored, want.scored));
            let expected: usize = windows.iter().map(Window::scored).sum();
            assert_eq!(got.scored, expected);
            assert!(got.perplexity().is_finite() && got.perplexity() > 1.0);
            let relative = (got.nll_sum - want.nll_sum).abs() / want.nll_sum;
            assert!(relative < 1e-6, "batched {} vs token by token {}", got.nll_sum, want.nll_sum);
        }
    }

    #[test]
    fn act_stats_json_is_valid_and_complete() {
        let stats = petrel_models::act_stats::ActStats::new(2);
        use petrel_runtime::forward::{ActivationTap, TapSite};
        stats.observe(0, TapSite::AttentionInput, &[1.0, -2.0, 3.0, 0.5], 2, 2);
        stats.observe(1, TapSite::DownInput, &[0.0, 0.0, 4.0, 1.0], 2, 2);
        let stats = stats.finish().unwrap();
        let summary = act_stats::summarize(&stats);
        let report = ActReport {
            model: Path::new("m.gguf"),
            text: Path::new("t \"x\".txt"),
            tokens: 4,
            tokens_in_text: 9,
            window: 2,
            windows: 2,
            threads: 1,
            seconds: 0.5,
            stats: &stats,
            summary: &summary,
        };
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["sites"].as_array().unwrap().len(), 2);
        assert_eq!(json["sites"][1]["site"], "down_in");
        assert_eq!(json["sites"][1]["tokens"], 2);
        // Row [0, 0] has no kurtosis, row [4, 1] has kurtosis 1.
        assert_eq!(json["sites"][1]["mean_kurtosis"], 1.0);
        assert_eq!(json["sites"][1]["ratio"], 4.0 / 2.5);
        assert_eq!(json["summary"][0]["site"], "attn_in");
        assert_eq!(json["text"], "t \"x\".txt");
        assert_eq!(json_number(f64::INFINITY), "null");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd"), "\"a\\\"b\\\\c\\u000ad\"");
    }
}
