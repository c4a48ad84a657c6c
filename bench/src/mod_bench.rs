//! `petrel-bench mod`: a mixture-of-depths model against the same model dense, in one
//! run — prefill time (top-k routing), decode tokens/s (causal decisions), the weight
//! bytes each decoded token reads, and the KV-cache bytes in use.
//!
//! Both models run the same real text (held-out corpus) as prompt and as forced decode
//! tokens, so routing sees the inputs it was fitted for (random token ids would route
//! atypically). For each thread count the two models alternate, repetition by
//! repetition, so that the machine's load drifts over both alike; each figure is the best
//! of its repetitions, and the ratios are taken between figures of this run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::{KvType, Model, Session, SessionOptions};
use serde::Serialize;

use crate::{file_name, load_average, machine_name};

/// `petrel-bench mod` options.
#[derive(clap::Args, Debug)]
pub struct ModArgs {
    /// The dense model.
    #[arg(long)]
    dense: PathBuf,
    /// The same model with mixture-of-depths routing (e.g. from `petrel route-fit`).
    #[arg(long)]
    routed: PathBuf,
    /// UTF-8 text whose tokens are the prompts and the decoded tokens (default: the
    /// corpora cache's heldout.txt).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Prompt lengths for prefill (each prefilled as one batch, so top-k sees it whole).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    prompts: Vec<usize>,
    /// Tokens to decode (after a 16-token prompt).
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Runs per figure; the best is kept.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Directory for results (`<name>.json`, `<name>.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Base name of the result files.
    #[arg(long, default_value = "mod-smollm2")]
    name: String,
}

#[derive(Serialize, Debug)]
struct SpeedRow {
    threads: usize,
    test: String,
    dense_tokens_per_second: f64,
    routed_tokens_per_second: f64,
    speedup: f64,
}

#[derive(Serialize, Debug)]
struct Report {
    machine: String,
    load_average_start: Option<[f64; 3]>,
    dense: String,
    routed: String,
    routed_blocks: Vec<usize>,
    capacity: f32,
    /// Weight bytes a decoded token reads: every block's matrices plus the head.
    dense_bytes_per_token: usize,
    /// Mean over the decoded tokens of the bytes they read (skipped blocks read nothing).
    routed_bytes_per_token: f64,
    /// KV-cache bytes in use after the longest prompt's prefill.
    dense_kv_bytes_prefill: usize,
    routed_kv_bytes_prefill: usize,
    /// KV-cache bytes in use after the decode test.
    dense_kv_bytes_decode: usize,
    routed_kv_bytes_decode: usize,
    rows: Vec<SpeedRow>,
}

struct Loaded<'a> {
    name: String,
    model: Model<'a>,
}

fn load<'a>(path: &Path, gguf: &'a GgufFile<'a>) -> Result<Loaded<'a>> {
    let model = Model::load(gguf).with_context(|| format!("cannot load {}", path.display()))?;
    Ok(Loaded { name: file_name(path), model })
}

/// Seconds to prefill `tokens` from an empty cache, and the KV bytes in use after.
fn prefill_seconds(session: &mut Session<'_, '_>, tokens: &[u32]) -> Result<(f64, usize)> {
    session.reset();
    let start = Instant::now();
    session.prefill(tokens)?;
    Ok((start.elapsed().as_secs_f64(), session.cache_bytes_in_use()))
}

/// Seconds to decode `tokens` one step at a time after `prompt`, the weight bytes the
/// decoded tokens read per token, and the KV bytes in use after.
fn decode_seconds(session: &mut Session<'_, '_>, prompt: &[u32], tokens: &[u32]) -> Result<(f64, f64, usize)> {
    session.reset();
    session.prefill(prompt)?;
    let model = session.model();
    let layers = model.config.layers;
    let before: Vec<usize> = (0..layers).map(|l| session.tokens_through(l)).collect();
    let start = Instant::now();
    for &t in tokens {
        session.step(t)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let block_bytes: usize =
        (0..layers).map(|l| (session.tokens_through(l) - before[l]) * model.block_weight_bytes(l)).sum();
    let per_token = (block_bytes + tokens.len() * model.head_weight_bytes()) as f64 / tokens.len() as f64;
    Ok((seconds, per_token, session.cache_bytes_in_use()))
}

/// Runs `petrel-bench mod`.
pub fn run(args: &ModArgs) -> Result<()> {
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => petrel_models::registry::cache_dir()?.join("corpora/heldout.txt"),
    };
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("cannot read {} (scripts/fetch_corpora.py makes it)", text_path.display()))?;
    let files = [&args.dense, &args.routed]
        .map(|p| MappedFile::open(p).with_context(|| format!("cannot open {}", p.display())));
    let [dense_file, routed_file] = files;
    let (dense_file, routed_file) = (dense_file?, routed_file?);
    let dense_gguf = GgufFile::parse(dense_file.bytes())?;
    let routed_gguf = GgufFile::parse(routed_file.bytes())?;
    let dense = load(&args.dense, &dense_gguf)?;
    let routed = load(&args.routed, &routed_gguf)?;
    let Some(routing) = &routed.model.routing else {
        bail!("{} has no mixture-of-depths routing", args.routed.display());
    };
    if dense.model.routing.is_some() {
        bail!("{} routes tokens: --dense must be the dense model", args.dense.display());
    }
    if dense.model.config != routed.model.config {
        bail!("the two files hold different model shapes");
    }
    let longest = args.prompts.iter().copied().max().unwrap_or(0);
    let prefix_end = text.char_indices().nth((longest + args.decode + 64) * 8).map_or(text.len(), |(i, _)| i);
    let tokens = dense.model.tokenizer.encode(&text[..prefix_end], false);
    if tokens.len() < longest.max(16 + args.decode) {
        bail!("{} is too short for prompts of {longest} tokens", text_path.display());
    }
    let capacity = longest.max(16 + args.decode);
    if capacity > dense.model.config.context_length {
        bail!("prompts of {longest} exceed the model's context of {}", dense.model.config.context_length);
    }
    let load_average_start = load_average();
    let mut rows = Vec::new();
    let (mut kv_prefill, mut kv_decode, mut routed_bytes) = ([0usize; 2], [0usize; 2], 0f64);
    for &threads in &args.threads {
        let options = SessionOptions {
            capacity,
            threads,
            max_batch: longest.max(1),
            kv_type: KvType::F32,
            ..SessionOptions::default()
        };
        let mut sessions = [Session::new(&dense.model, options.clone())?, Session::new(&routed.model, options)?];
        for &n in &args.prompts {
            let mut best = [f64::INFINITY; 2];
            for _ in 0..args.repetitions.max(1) {
                for (i, session) in sessions.iter_mut().enumerate() {
                    let (seconds, kv) = prefill_seconds(session, &tokens[..n])?;
                    best[i] = best[i].min(seconds);
                    if n == longest {
                        kv_prefill[i] = kv;
                    }
                }
            }
            let (d, r) = (n as f64 / best[0], n as f64 / best[1]);
            eprintln!("t={threads} pp{n}: dense {d:.1} tok/s, routed {r:.1} tok/s ({:.2}×)", r / d);
            rows.push(SpeedRow {
                threads,
                test: format!("pp{n}"),
                dense_tokens_per_second: d,
                routed_tokens_per_second: r,
                speedup: r / d,
            });
        }
        let (prompt, decoded) = (&tokens[..16], &tokens[16..16 + args.decode]);
        let mut best = [f64::INFINITY; 2];
        for _ in 0..args.repetitions.max(1) {
            for (i, session) in sessions.iter_mut().enumerate() {
                let (seconds, bytes, kv) = decode_seconds(session, prompt, decoded)?;
                best[i] = best[i].min(seconds);
                kv_decode[i] = kv;
                if i == 1 {
                    routed_bytes = bytes;
                }
            }
        }
        let (d, r) = (args.decode as f64 / best[0], args.decode as f64 / best[1]);
        eprintln!("t={threads} tg{}: dense {d:.1} tok/s, routed {r:.1} tok/s ({:.2}×)", args.decode, r / d);
        rows.push(SpeedRow {
            threads,
            test: format!("tg{}", args.decode),
            dense_tokens_per_second: d,
            routed_tokens_per_second: r,
            speedup: r / d,
        });
    }
    let report = Report {
        machine: machine_name(),
        load_average_start,
        dense: dense.name.clone(),
        routed: routed.name.clone(),
        routed_blocks: routing.routed_layers().collect(),
        capacity: routing.capacity,
        dense_bytes_per_token: dense.model.weight_bytes_per_token(),
        routed_bytes_per_token: routed_bytes,
        dense_kv_bytes_prefill: kv_prefill[0],
        routed_kv_bytes_prefill: kv_prefill[1],
        dense_kv_bytes_decode: kv_decode[0],
        routed_kv_bytes_decode: kv_decode[1],
        rows,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join(format!("{}-speed.json", args.name));
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let md = args.out.join(format!("{}-speed.md", args.name));
    let table = markdown(&report, args);
    std::fs::write(&md, &table)?;
    println!("{table}");
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

fn markdown(r: &Report, args: &ModArgs) -> String {
    let mb = |b: f64| b / 1e6;
    let mut s = format!(
        "# Mixture of depths: routed against dense, same model, one run\n\n\
         Machine: {} · dense `{}`, routed `{}` (blocks {:?}, capacity {})\n\n\
         Command: `petrel-bench mod --dense … --routed … --threads {} --prompts {} --decode {} --repetitions {}`\n\n",
        r.machine,
        args.dense.display(),
        args.routed.display(),
        r.routed_blocks,
        r.capacity,
        args.threads.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        args.prompts.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        args.decode,
        args.repetitions,
    );
    s.push_str("| threads | test | dense tok/s | routed tok/s | routed / dense |\n|---|---|---|---|---|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× |\n",
            row.threads, row.test, row.dense_tokens_per_second, row.routed_tokens_per_second, row.speedup
        ));
    }
    s.push_str(&format!(
        "\nWeight bytes read per decoded token: dense {:.3} MB, routed {:.3} MB ({:.2}× fewer).\n\
         KV cache in use after the {}-token prefill: dense {:.2} MB, routed {:.2} MB ({:.1}% saved); \
         after the decode test: dense {:.2} MB, routed {:.2} MB ({:.1}% saved).\n",
        mb(r.dense_bytes_per_token as f64),
        mb(r.routed_bytes_per_token),
        r.dense_bytes_per_token as f64 / r.routed_bytes_per_token.max(1.0),
        args.prompts.iter().copied().max().unwrap_or(0),
        mb(r.dense_kv_bytes_prefill as f64),
        mb(r.routed_kv_bytes_prefill as f64),
        100.0 * (1.0 - r.routed_kv_bytes_prefill as f64 / r.dense_kv_bytes_prefill.max(1) as f64),
        mb(r.dense_kv_bytes_decode as f64),
        mb(r.routed_kv_bytes_decode as f64),
        100.0 * (1.0 - r.routed_kv_bytes_decode as f64 / r.dense_kv_bytes_decode.max(1) as f64),
    ));
    s
}
