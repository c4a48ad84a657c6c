//! `petrel-bench backends`: prefill and decode speed of each backend on the same model and
//! thread count, as ratios to native measured in the same run (variants alternate within
//! each round; the best round of each is kept).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use petrel_models::backends::{BackendChoice, PreparedBackend};
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::argmax;
use petrel_runtime::{KvType, Model, Session, SessionOptions};
use serde_json::json;

/// Arguments of `petrel-bench backends`.
#[derive(clap::Args, Debug)]
pub struct BackendsArgs {
    /// GGUF files to measure.
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Threads for the session (native splits matrices between them; candle runs one
    /// team member and threads inside its own kernels).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompt tokens prefilled in one call.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Rounds; each backend's best is kept.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory for results (`backends.json`, `backends.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// One backend's best speeds, tokens per second.
struct Speed {
    prefill: f64,
    decode: f64,
}

fn measure(model: &Model<'_>, backend: &PreparedBackend, args: &BackendsArgs, prompt: &[u32]) -> Result<Speed> {
    let options = SessionOptions {
        capacity: args.prompt + args.decode + 1,
        threads: args.threads,
        max_batch: args.prompt,
        kv_type: KvType::F32,
        ..SessionOptions::default()
    };
    let mut session = Session::with_backend(model, options, backend.backend())?;
    let start = Instant::now();
    let mut next = argmax(session.prefill(prompt)?);
    let prefill = prompt.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..args.decode {
        next = argmax(session.step(next)?);
    }
    Ok(Speed { prefill, decode: args.decode as f64 / start.elapsed().as_secs_f64() })
}

/// Runs the benchmark and writes the results.
pub fn run(args: &BackendsArgs) -> Result<()> {
    let choices = [BackendChoice::Native, BackendChoice::Candle, BackendChoice::Tract];
    let (mut rows, mut table) = (Vec::new(), String::new());
    writeln!(table, "# Backends: prefill and decode speed, same model and threads ({} threads)\n", args.threads)?;
    writeln!(
        table,
        "`petrel-bench backends --threads {} --prompt {} --decode {}`; best of {} alternating rounds.\n",
        args.threads, args.prompt, args.decode, args.rounds
    )?;
    writeln!(table, "| model | backend | prefill tok/s | vs native | decode tok/s | vs native |")?;
    writeln!(table, "|---|---|---|---|---|---|")?;
    for path in &args.models {
        let file = MappedFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let gguf = GgufFile::parse(file.bytes())?;
        let model = Model::load(&gguf)?;
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(64);
        let mut prompt = model.tokenizer.encode(&text, false);
        prompt.truncate(args.prompt);
        let mut backends = Vec::new();
        for &choice in &choices {
            match PreparedBackend::build(choice, &model, args.threads) {
                Ok(b) => backends.push(b),
                Err(e) => {
                    eprintln!("{}: {choice:?} skipped: {e:#}", path.display());
                    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                    writeln!(table, "| {name} | {choice:?} | refused at load: {e:#} | | | |")?;
                    rows.push(json!({"model": name, "backend": format!("{choice:?}"), "refused": format!("{e:#}")}));
                }
            }
        }
        let mut best: Vec<Speed> = backends.iter().map(|_| Speed { prefill: 0.0, decode: 0.0 }).collect();
        for _ in 0..args.rounds {
            for (b, backend) in backends.iter().enumerate() {
                let s = measure(&model, backend, args, &prompt)?;
                best[b].prefill = best[b].prefill.max(s.prefill);
                best[b].decode = best[b].decode.max(s.decode);
            }
        }
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        for (b, backend) in backends.iter().enumerate() {
            let (p, d) = (best[b].prefill, best[b].decode);
            let (rp, rd) = (p / best[0].prefill, d / best[0].decode);
            let backend = backend.backend().name();
            writeln!(table, "| {name} | {backend} | {p:.1} | {rp:.3}× | {d:.1} | {rd:.3}× |")?;
            eprintln!(
                "{name} {backend}: prefill {p:.1} tok/s ({rp:.3}× native), decode {d:.1} tok/s ({rd:.3}× native)"
            );
            rows.push(json!({"model": name, "backend": backend, "prefill_tok_s": p, "decode_tok_s": d,
                "prefill_vs_native": rp, "decode_vs_native": rd}));
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let json = json!({"threads": args.threads, "prompt": args.prompt, "decode": args.decode, "rows": rows});
    std::fs::write(args.out.join("backends.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    std::fs::write(args.out.join("backends.md"), table)?;
    Ok(())
}
