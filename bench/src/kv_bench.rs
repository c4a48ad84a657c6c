//! `petrel-bench kv`: each KV-cache type on the same model and threads — bytes per token of
//! context, and decode speed after a prompt of `--depth` tokens (where attention reads the
//! most cache), as ratios to the f32 cache measured in the same run (types alternate within
//! each round; the best round of each is kept).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use petrel_models::registry;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::Pcg32;
use petrel_runtime::{KvType, Model, Session, SessionOptions};
use serde_json::json;

/// Arguments of `petrel-bench kv`.
#[derive(clap::Args, Debug)]
pub struct KvArgs {
    /// GGUF files or known model names.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Tokens in the cache before decoding starts (random ids, prefilled untimed).
    #[arg(long, default_value_t = 2048)]
    depth: usize,
    /// Tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// Rounds; each type's best is kept.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory for results (`kv-cache.json`, `kv-cache.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// Decode tokens per second after `prompt`, and the cache's bytes per token.
fn measure(model: &Model<'_>, kv_type: KvType, threads: usize, prompt: &[u32], decode: &[u32]) -> Result<(f64, usize)> {
    let options =
        SessionOptions { capacity: prompt.len() + decode.len() + 1, threads, kv_type, ..SessionOptions::default() };
    let mut session = Session::new(model, options)?;
    session.prefill(prompt)?;
    let start = Instant::now();
    for &t in decode {
        session.step(t)?;
    }
    Ok((decode.len() as f64 / start.elapsed().as_secs_f64(), session.cache_bytes_per_token()))
}

/// Runs the benchmark and writes the results.
pub fn run(args: &KvArgs) -> Result<()> {
    let (mut rows, mut table) = (Vec::new(), String::new());
    writeln!(table, "# KV-cache types: bytes per token and decode speed at depth {}\n", args.depth)?;
    writeln!(
        table,
        "`petrel-bench kv --depth {} --decode {}`; decode after a {}-token prompt of random ids, best of {} alternating rounds.\n",
        args.depth, args.decode, args.depth, args.rounds
    )?;
    writeln!(table, "| model | threads | KV type | bytes / token | decode tok/s | vs f32 |")?;
    writeln!(table, "|---|---|---|---|---|---|")?;
    for spec in &args.models {
        let path = registry::resolve(spec)?;
        let file = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let gguf = GgufFile::parse(file.bytes())?;
        let model = Model::load(&gguf)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut rng = Pcg32::new(0xC0FFEE);
        let vocab = model.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..args.depth).map(|_| rng.next_u32() % vocab).collect();
        let decode: Vec<u32> = (0..args.decode).map(|_| rng.next_u32() % vocab).collect();
        for &threads in &args.threads {
            let mut best = [(0f64, 0usize); KvType::ALL.len()];
            for _ in 0..args.rounds {
                for (i, &kv_type) in KvType::ALL.iter().enumerate() {
                    let (speed, bytes) = measure(&model, kv_type, threads, &prompt, &decode)?;
                    best[i] = (best[i].0.max(speed), bytes);
                }
            }
            for (i, &kv_type) in KvType::ALL.iter().enumerate() {
                let (speed, bytes) = best[i];
                let ratio = speed / best[0].0;
                writeln!(table, "| {name} | {threads} | {} | {bytes} | {speed:.1} | {ratio:.3}× |", kv_type.name())?;
                eprintln!(
                    "{name} t={threads} kv={}: {bytes} B/token, decode {speed:.1} tok/s ({ratio:.3}× f32)",
                    kv_type.name()
                );
                rows.push(json!({"model": name, "threads": threads, "kv_type": kv_type.name(),
                    "bytes_per_token": bytes, "decode_tok_s": speed, "decode_vs_f32": ratio}));
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let json = json!({"depth": args.depth, "decode": args.decode, "rounds": args.rounds, "rows": rows});
    std::fs::write(args.out.join("kv-cache.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    std::fs::write(args.out.join("kv-cache.md"), table)?;
    Ok(())
}
