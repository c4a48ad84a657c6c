//! `petrel eval kvp`: what KV-prediction prefill costs in quality.
//!
//! Samples are fixed positions `p` in a held-out text where the next token is a word of
//! at least `--min-word-chars` letters that already appeared in the 128 tokens before it
//! (a word the context makes predictable: the repeated-word task). For each prompt length
//! `N` the prompt is the `N` tokens before `p`, so every length asks about the same words.
//! For each sample and each mode:
//! - **accuracy**: is the most likely token after the prompt the word (greedy, one token)?
//! - **perplexity** of the `--continuation` tokens from `p` on, teacher-forced: the first
//!   from the prompt's logits, the rest decoded against the cache the prefill left.
//!
//! Modes: `base` (the true cache), `predicted` (KV-prediction prefill, then the base), and
//! `aux` (the auxiliary model alone, prompt and continuation).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::argmax;
use petrel_runtime::{Model, Session, SessionOptions};
use serde::Serialize;

use crate::eval::negative_log_likelihood;
use petrel_models::{corpus, registry};

/// The words must appear within this many tokens before the sample (the shortest prompt
/// length the task supports).
const RECALL_WINDOW: usize = 128;

/// Arguments of `petrel eval kvp`.
#[derive(Args, Debug)]
pub struct KvpEvalArgs {
    /// A GGUF with a KV predictor (`petrel kvp-fit` / `petrel kvp-train`).
    #[arg(long, short)]
    pub model: String,
    /// Held-out UTF-8 text.
    #[arg(long)]
    pub text: PathBuf,
    /// Prompt lengths in tokens, comma-separated (each at least 128).
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024")]
    pub prompt_lens: Vec<usize>,
    /// Tokens scored after each prompt.
    #[arg(long, default_value_t = 32)]
    pub continuation: usize,
    /// Samples (passages) per prompt length.
    #[arg(long, default_value_t = 48)]
    pub samples: usize,
    /// Which caches to measure: base, predicted, aux (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "base,predicted,aux")]
    pub modes: Vec<Mode>,
    /// Shortest target word, in letters.
    #[arg(long, default_value_t = 5)]
    pub min_word_chars: usize,
    /// Worker threads (default: all available cores).
    #[arg(long, short)]
    pub threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Which cache the base decodes against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The base's own prefill.
    Base,
    /// KV-prediction prefill.
    Predicted,
    /// The auxiliary model alone.
    Aux,
}

/// One prompt length's result for one mode.
#[derive(Clone, Debug, Serialize)]
pub struct KvpResult {
    /// Cache the continuation was decoded against.
    pub mode: Mode,
    /// Prompt length, tokens.
    pub prompt_len: usize,
    /// Samples measured.
    pub samples: usize,
    /// Fraction of samples whose greedy next token was the target word.
    pub accuracy: f64,
    /// Perplexity of the continuations (all samples' tokens pooled).
    pub perplexity: f64,
    /// Wall time of this mode at this length, seconds (not a benchmark: see the bench).
    pub seconds: f64,
}

/// Sample positions: tokens that start a word of at least `min_chars` letters seen in
/// the [`RECALL_WINDOW`] tokens before, at least `before` tokens from the start, `after`
/// tokens from the end, and `before + after` apart, spread evenly over the candidates.
pub fn sample_positions(
    tokens: &[u32],
    word: impl Fn(u32) -> bool,
    before: usize,
    after: usize,
    samples: usize,
) -> Vec<usize> {
    let mut candidates = Vec::new();
    let mut last: Option<usize> = None;
    for p in before.max(RECALL_WINDOW)..tokens.len().saturating_sub(after) {
        if last.is_some_and(|l| p < l + before + after) {
            continue;
        }
        // Not the token right before (that would be a stutter), but earlier in the window.
        if word(tokens[p]) && tokens[p - RECALL_WINDOW..p - 1].contains(&tokens[p]) {
            candidates.push(p);
            last = Some(p);
        }
    }
    if candidates.len() <= samples {
        return candidates;
    }
    (0..samples).map(|i| candidates[i * candidates.len() / samples]).collect()
}

/// Runs `petrel eval kvp`.
pub fn run(args: &KvpEvalArgs) -> Result<()> {
    if args.prompt_lens.is_empty() || args.prompt_lens.iter().any(|&n| n < RECALL_WINDOW) {
        bail!("--prompt-lens must be at least {RECALL_WINDOW} tokens each");
    }
    if args.continuation == 0 || args.samples == 0 {
        bail!("--continuation and --samples must be positive");
    }
    let path = registry::resolve(&args.model)?;
    let mapped = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let gguf = GgufFile::parse(mapped.bytes()).with_context(|| format!("cannot parse {}", path.display()))?;
    let model = Model::load(&gguf).with_context(|| format!("cannot load {}", path.display()))?;
    let predictor = model.kv_predictor.as_deref();
    if predictor.is_none() && args.modes.iter().any(|&m| m != Mode::Base) {
        bail!("{} has no KV predictor: only --modes base applies", path.display());
    }
    let longest = args.prompt_lens.iter().copied().max().unwrap_or(RECALL_WINDOW);
    let capacity = longest + args.continuation;
    if capacity > model.config.context_length {
        bail!(
            "prompts of {longest} + {} tokens exceed the model's context of {}",
            args.continuation,
            model.config.context_length
        );
    }

    let text = corpus::read_text(&args.text)?;
    // Enough text for the samples with room to choose (about 4 bytes per token).
    let wanted = (args.samples * (capacity + RECALL_WINDOW) * 3).max(1 << 16);
    let end = text.char_indices().nth(wanted * 5).map_or(text.len(), |(i, _)| i);
    let tokens = model.tokenizer.encode(&text[..end], false);
    let tokenizer = &model.tokenizer;
    let is_word = |t: u32| {
        tokenizer.token_text(t).is_some_and(|s| {
            let s = s.strip_prefix('Ġ').or_else(|| s.strip_prefix(' '));
            s.is_some_and(|w| w.chars().count() >= args.min_word_chars && w.chars().all(|c| c.is_alphabetic()))
        })
    };
    let positions = sample_positions(&tokens, is_word, longest, args.continuation, args.samples);
    if positions.len() < args.samples {
        bail!("{} yields only {} samples of the {} asked for", args.text.display(), positions.len(), args.samples);
    }

    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let vocab = model.config.vocab_size;
    let mut logits = vec![0f32; args.continuation * vocab];
    let mut results = Vec::new();
    let bar = ProgressBar::new((args.modes.len() * args.prompt_lens.len() * positions.len()) as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for &mode in &args.modes {
        let (runner, kv_prediction) = match (mode, predictor) {
            (Mode::Aux, Some(p)) => (&p.aux, false),
            (Mode::Predicted, _) => (&model, true),
            _ => (&model, false),
        };
        let options = SessionOptions { capacity, threads, kv_prediction, ..SessionOptions::default() };
        let mut session = Session::new(runner, options)?;
        for &n in &args.prompt_lens {
            bar.set_message(format!("{mode:?} {n}"));
            let started = Instant::now();
            let (mut correct, mut nll, mut scored) = (0usize, 0f64, 0usize);
            for &p in &positions {
                let (prompt, continuation) = (&tokens[p - n..p], &tokens[p..p + args.continuation]);
                session.reset();
                let first = session.prefill(prompt)?;
                correct += usize::from(argmax(first) == continuation[0]);
                nll += negative_log_likelihood(first, continuation[0] as usize);
                let rest = args.continuation - 1;
                if rest > 0 {
                    session.prefill_all_logits(&continuation[..rest], &mut logits)?;
                    for (t, &target) in continuation[1..].iter().enumerate() {
                        nll += negative_log_likelihood(&logits[t * vocab..(t + 1) * vocab], target as usize);
                    }
                }
                scored += args.continuation;
                bar.inc(1);
            }
            results.push(KvpResult {
                mode,
                prompt_len: n,
                samples: positions.len(),
                accuracy: correct as f64 / positions.len() as f64,
                perplexity: (nll / scored as f64).exp(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }
    bar.finish_and_clear();
    println!("{:<10} {:>7} {:>9} {:>11}", "mode", "prompt", "accuracy", "perplexity");
    for r in &results {
        println!(
            "{:<10} {:>7} {:>8.1}% {:>11.2}",
            format!("{:?}", r.mode).to_lowercase(),
            r.prompt_len,
            100.0 * r.accuracy,
            r.perplexity
        );
    }
    if let Some(out) = &args.json {
        let report = serde_json::json!({
            "model": path.display().to_string(),
            "aux_blocks": predictor.map(|p| p.aux.layers.len()),
            "continuation": args.continuation,
            "samples": positions.len(),
            "min_word_chars": args.min_word_chars,
            "results": results,
        });
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_repeated_words_far_enough_apart() {
        // Token 7 is the only "word"; it repeats every 50 tokens.
        let tokens: Vec<u32> = (0..2000).map(|i| if i % 50 == 0 { 7 } else { (i % 13 + 20) as u32 }).collect();
        let positions = sample_positions(&tokens, |t| t == 7, 200, 10, 100);
        assert!(!positions.is_empty());
        for w in positions.windows(2) {
            assert!(w[1] >= w[0] + 210, "{positions:?}");
        }
        for &p in &positions {
            assert!(p >= 200 && p + 10 <= tokens.len() && tokens[p] == 7);
            assert!(tokens[p - RECALL_WINDOW..p - 1].contains(&7));
        }
        assert_eq!(sample_positions(&tokens, |t| t == 7, 200, 10, 2).len(), 2);
    }
}
