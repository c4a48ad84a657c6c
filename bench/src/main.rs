//! `petrel-bench`: prefill and decode speed of Petrel and of llama.cpp on the same GGUF
//! files with the same thread counts, in one run, plus the machine's measured read
//! bandwidth and the decode rate it allows. Writes JSON and a Markdown table.
//!
//! Method (mirrors `llama-bench`): prefill = one prompt of N random token ids from an
//! empty cache, tokens/s = N / time; decode = 128 single-token steps from an empty cache,
//! tokens/s = 128 / time. Each figure is the best of `--repetitions` runs, which filters
//! the noise of a shared machine. Ratios are taken between numbers of this run only.
//!
//! `petrel-bench mod` ([`mod_bench`]) compares a mixture-of-depths model with the same
//! model dense.
//!
//! `petrel-bench w4a4` ([`w4a4`]) compares Petrel's W4A4 path with llama.cpp's Q4_0 one:
//! kernel throughput on SmolLM2's shapes against the machine's int8 peak, and end-to-end
//! prefill and decode.

mod backends_bench;
mod kernels;
mod kv_bench;
mod kvp_bench;
mod mod_bench;
mod panel_bench;
mod peak;
mod timing;
mod w4a4;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use petrel_models::registry;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::Pcg32;
use petrel_runtime::{KvType, Model, Session, SessionOptions};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "petrel-bench",
    about = "Benchmark Petrel against llama.cpp and the machine's memory bandwidth",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    args: Args,
}

#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// Petrel's W4A4 against llama.cpp's Q4_0: kernel throughput on SmolLM2's shapes (one
    /// thread, against the measured int8 peak) and end-to-end prefill and decode; writes
    /// bench/results/w4a4.{json,md}.
    W4a4(w4a4::W4a4Args),
    /// A mixture-of-depths model against the same model dense: prefill and decode speed,
    /// weight bytes per decoded token, KV-cache bytes; writes
    /// bench/results/<name>-speed.{json,md}.
    Mod(mod_bench::ModArgs),
    /// KV-prediction prefill against the base's own prefill: time to first token for
    /// several prompt lengths, with llama.cpp's prefill as reference; writes
    /// bench/results/<name>.{json,md}.
    Kvp(kvp_bench::KvpArgs),
    /// Each backend (native, candle) on the same model and threads: prefill and decode
    /// tokens per second as ratios to native; writes bench/results/backends.{json,md}.
    Backends(backends_bench::BackendsArgs),
    /// Each KV-cache type (f32, f16) on the same model and threads: bytes per token and
    /// decode speed after a long prompt, as ratios to f32; writes
    /// bench/results/kv-cache.{json,md}.
    Kv(kv_bench::KvArgs),
    /// The prefill panel kernels (AVX-512 VNNI, AMX-INT8) on a model's own weights, one
    /// thread: unpacking and multiply time, GOPS against the measured peaks; writes
    /// bench/results/panels.{json,md}.
    Panels(panel_bench::PanelArgs),
}

/// The default benchmark: the same GGUF files through Petrel and llama.cpp. The flags are
/// llama-bench's (`-m FILE -p 256,1024 -n 128 -t 1,2 -r 3 -o md|json`), so one command line
/// runs both engines.
#[derive(clap::Args, Debug)]
struct Args {
    /// GGUF files or known model names (`gemma3-270m`, `qwen2.5-coder-0.5b`, pulled on
    /// first use) to measure (default: SmolLM2-135M Q4_1 and Q4_0 from the cache).
    #[arg(short = 'm', long = "model")]
    models: Vec<String>,
    /// Thread counts.
    #[arg(short = 't', long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Prompt lengths for prefill (`ppN` tests; 0 for none).
    #[arg(short = 'p', long, visible_alias = "n-prompt", value_delimiter = ',', default_value = "64,256,1024")]
    prompts: Vec<usize>,
    /// Tokens to decode (the `tgN` test; 0 for none).
    #[arg(short = 'n', long, visible_alias = "n-gen", default_value_t = 128)]
    decode: usize,
    /// Runs per figure: mean ± standard deviation and the best are reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// What to print on standard output: a Markdown table, or llama-bench's JSON records
    /// (`model_filename`, `n_prompt`, `n_gen`, `n_threads`, `avg_ts`, `stddev_ts`, plus
    /// `engine`, `test` and `best_ts`). The result files are written either way.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Md)]
    output: OutputFormat,
    /// Tokens per prefill batch (default: the runtime's `SessionOptions::max_batch`).
    #[arg(long)]
    max_batch: Option<usize>,
    /// Prefill on AMX-INT8 tile multiplies where the CPU has them (otherwise the AVX-512
    /// VNNI panel kernel).
    #[arg(long)]
    amx: bool,
    /// Petrel's KV-cache type (`f32`, `f16`, `q8`, `q4`). f32, as the committed tables were
    /// measured (llama-bench's cache is f16; at these lengths the type moves Petrel's
    /// figures by a few percent at most, see `petrel-bench kv`).
    #[arg(long, default_value = "f32", value_parser = |s: &str| KvType::parse(s).ok_or_else(|| format!("unknown KV-cache type {s:?}")))]
    kv_type: KvType,
    /// Skip llama.cpp (otherwise run through bench/llama/llama_speed.py).
    #[arg(long)]
    no_llama: bool,
    /// Python interpreter that runs bench/llama/llama_speed.py (standard library only; it
    /// drives the llama-bench binary that bench/llama/setup.sh builds).
    #[arg(long, env = "PETREL_LLAMA_PYTHON", default_value = "python3")]
    llama_python: PathBuf,
    /// Directory for results (`<name>.json`, `<name>.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Base name of the result files.
    #[arg(long, default_value = "smollm2-135m")]
    name: String,
}

/// Standard output's format (`-o`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OutputFormat {
    Md,
    Json,
}

/// One engine's figure for one test, in llama-bench's JSON field names.
#[derive(Serialize, Debug, Clone)]
struct Row {
    #[serde(rename = "model_filename")]
    model: String,
    engine: String,
    #[serde(rename = "n_threads")]
    threads: usize,
    /// `ppN` or `tgN`.
    test: String,
    n_prompt: usize,
    n_gen: usize,
    /// Mean tokens per second over the repetitions.
    #[serde(rename = "avg_ts")]
    mean: f64,
    /// Their sample standard deviation (0 for one repetition).
    #[serde(rename = "stddev_ts")]
    stddev: f64,
    /// The fastest repetition.
    #[serde(rename = "best_ts")]
    tokens_per_second: f64,
}

impl Row {
    /// A row from each repetition's tokens per second.
    fn from_samples(model: &str, engine: &str, threads: usize, test: &str, samples: &[f64]) -> Row {
        let n = samples.len().max(1) as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let variance =
            if samples.len() > 1 { samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        let (n_prompt, n_gen) = test_tokens(test);
        Row {
            model: model.to_string(),
            engine: engine.to_string(),
            threads,
            test: test.to_string(),
            n_prompt,
            n_gen,
            mean,
            stddev: variance.sqrt(),
            tokens_per_second: samples.iter().copied().fold(0f64, f64::max),
        }
    }

    /// llama.cpp's row for `model` from `bench/llama/llama_speed.py`.
    fn from_llama(model: &str, r: LlamaSpeed) -> Row {
        let (n_prompt, n_gen) = test_tokens(&r.test);
        Row {
            model: model.to_string(),
            engine: "llama.cpp".into(),
            threads: r.threads,
            n_prompt,
            n_gen,
            mean: r.tokens_per_second,
            stddev: r.stddev_tokens_per_second.unwrap_or(0.0),
            tokens_per_second: r.best_tokens_per_second.unwrap_or(r.tokens_per_second),
            test: r.test,
        }
    }

    /// `mean ± sd (best b)` in tokens per second.
    fn summary(&self) -> String {
        format!("{:.1} ± {:.1} tok/s (best {:.1})", self.mean, self.stddev, self.tokens_per_second)
    }
}

/// `(n_prompt, n_gen)` of a `ppN` / `tgN` test name.
fn test_tokens(test: &str) -> (usize, usize) {
    let count = |s: &str| s.parse().unwrap_or(0);
    match (test.strip_prefix("pp"), test.strip_prefix("tg")) {
        (Some(n), _) => (count(n), 0),
        (_, Some(n)) => (0, count(n)),
        _ => (0, 0),
    }
}

#[derive(Serialize, Debug)]
struct Report {
    machine: String,
    kernels: String,
    read_bandwidth_gb_s: Vec<(usize, f64)>,
    weight_bytes_per_token: Vec<(String, usize)>,
    rows: Vec<Row>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(BenchCommand::W4a4(args)) => w4a4::run(&args),
        Some(BenchCommand::Mod(args)) => mod_bench::run(&args),
        Some(BenchCommand::Kvp(args)) => kvp_bench::run(&args),
        Some(BenchCommand::Backends(args)) => backends_bench::run(&args),
        Some(BenchCommand::Kv(args)) => kv_bench::run(&args),
        Some(BenchCommand::Panels(args)) => panel_bench::run(&args),
        None => same_file_bench(&cli.args),
    }
}

fn same_file_bench(args: &Args) -> Result<()> {
    let models = if args.models.is_empty() {
        default_models()?
    } else {
        args.models.iter().map(|m| registry::resolve(m)).collect::<Result<Vec<_>, _>>()?
    };
    let mut rows = Vec::new();
    let mut weight_bytes = Vec::new();
    let mut kernels = String::new();

    let bandwidth: Vec<(usize, f64)> = args.threads.iter().map(|&t| (t, read_bandwidth(t))).collect();
    for (t, gbs) in &bandwidth {
        eprintln!("read bandwidth, {t} thread(s): {gbs:.1} GB/s");
    }

    for path in &models {
        let name = file_name(path);
        let file = MappedFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let gguf = GgufFile::parse(file.bytes())?;
        let model = Model::load(&gguf)?;
        weight_bytes.push((name.clone(), model.weight_bytes_per_token()));
        let (petrel, isa) = petrel_rows(
            &model,
            &name,
            &args.threads,
            &args.prompts,
            args.decode,
            args.repetitions,
            args.max_batch.unwrap_or(SessionOptions::default().max_batch),
            args.amx,
            args.kv_type,
        )?;
        rows.extend(petrel);
        kernels = isa;
        if !args.no_llama {
            let speeds =
                llama_speed(&args.llama_python, path, &args.threads, &args.prompts, args.decode, args.repetitions)?;
            rows.extend(speeds.into_iter().map(|r| {
                let row = Row::from_llama(&name, r);
                eprintln!("llama.cpp {name} t={} {}: {}", row.threads, row.test, row.summary());
                row
            }));
        }
    }

    let report = Report {
        machine: machine_name(),
        kernels,
        read_bandwidth_gb_s: bandwidth,
        weight_bytes_per_token: weight_bytes,
        rows,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join(format!("{}.json", args.name));
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let md = args.out.join(format!("{}.md", args.name));
    let table = markdown(&report, args);
    std::fs::write(&md, &table)?;
    match args.output {
        OutputFormat::Md => println!("{table}"),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report.rows)?),
    }
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

/// Petrel's prefill (`pp{n}` for each of `prompts` but 0) and decode (`tg{decode}`, unless
/// 0) speed on `model` with each thread count, each repetition kept; also the kernels' names.
#[allow(clippy::too_many_arguments)] // the benchmark's settings, passed through
fn petrel_rows(
    model: &Model<'_>,
    name: &str,
    threads: &[usize],
    prompts: &[usize],
    decode: usize,
    repetitions: usize,
    max_batch: usize,
    amx: bool,
    kv_type: KvType,
) -> Result<(Vec<Row>, String)> {
    let mut rows = Vec::new();
    let mut kernels = String::new();
    for &threads in threads {
        let capacity = prompts.iter().copied().max().unwrap_or(0).max(decode) + 1;
        let options = SessionOptions { capacity, threads, max_batch, amx, kv_type, ..SessionOptions::default() };
        let mut session = Session::new(model, options)?;
        kernels = match session.panel_kernel() {
            Some(panel) => format!("{}, prefill panels {}", session.kernels().isa().name(), panel.name()),
            None => session.kernels().isa().name().to_string(),
        };
        for &n in prompts.iter().filter(|&&n| n > 0) {
            let tokens = random_tokens(n, model.config.vocab_size);
            let samples = samples(repetitions, || {
                session.reset();
                let start = Instant::now();
                session.prefill(&tokens).map(|_| ())?;
                Ok(n as f64 / start.elapsed().as_secs_f64())
            })?;
            let row = Row::from_samples(name, "petrel", threads, &format!("pp{n}"), &samples);
            eprintln!("petrel {name} t={threads} pp{n}: {}", row.summary());
            rows.push(row);
        }
        if decode == 0 {
            continue;
        }
        let tokens = random_tokens(decode, model.config.vocab_size);
        let samples = samples(repetitions, || {
            session.reset();
            let start = Instant::now();
            for &t in &tokens {
                session.step(t)?;
            }
            Ok(decode as f64 / start.elapsed().as_secs_f64())
        })?;
        let row = Row::from_samples(name, "petrel", threads, &format!("tg{decode}"), &samples);
        eprintln!("petrel {name} t={threads} tg{decode}: {}", row.summary());
        rows.push(row);
    }
    Ok((rows, kernels))
}

fn default_models() -> Result<Vec<PathBuf>> {
    let dir = registry::cache_dir()?;
    let q4_1 = registry::resolve("smollm2-135m")?;
    let q4_0 = dir.join("SmolLM2-135M-Instruct.Q4_0.gguf");
    if !q4_0.exists() {
        bail!("{} is missing: run bench/llama/setup.sh (it quantizes Q4_0 with llama.cpp)", q4_0.display());
    }
    Ok(vec![q4_1, q4_0])
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn random_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = Pcg32::new(1234);
    (0..n).map(|_| rng.next_u32() % vocab as u32).collect()
}

/// `run`'s figure from each of `repetitions` runs (at least one).
fn samples(repetitions: usize, mut run: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    (0..repetitions.max(1)).map(|_| run()).collect()
}

/// Read bandwidth in GB/s: the best of several passes summing a 512 MiB buffer, split
/// over `threads` threads, each streaming its part with software prefetch a few KiB ahead
/// (as Petrel's matmuls do), so the figure is the bandwidth a streaming reader can reach.
fn read_bandwidth(threads: usize) -> f64 {
    read_bandwidth_over(threads, 512 << 20)
}

/// As [`read_bandwidth`] over a buffer of `bytes` (at least 5 passes, and enough to read
/// about 2 GiB in all, at most 50), e.g. one of a model's weight size, which a large
/// last-level cache may hold.
fn read_bandwidth_over(threads: usize, bytes: usize) -> f64 {
    const STEP: usize = 4096;
    const AHEAD: usize = 4 * STEP;
    let bytes = bytes.max(STEP * threads);
    let passes = ((2usize << 30) / bytes).clamp(5, 50);
    let data: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let mut best = 0f64;
    for _ in 0..passes {
        let start = Instant::now();
        let part = bytes.div_ceil(threads);
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            data.par_chunks(part)
                .map(|c| {
                    let mut acc = [0u64; 8];
                    for (i, step) in c.chunks(STEP).enumerate() {
                        if let Some(ahead) = c.get(i * STEP + AHEAD..(i * STEP + AHEAD + STEP).min(c.len())) {
                            petrel_quant::dot::prefetch(ahead);
                        }
                        for word in step.chunks_exact(64) {
                            for (k, lane) in word.chunks_exact(8).enumerate() {
                                let v = u64::from_le_bytes([
                                    lane[0], lane[1], lane[2], lane[3], lane[4], lane[5], lane[6], lane[7],
                                ]);
                                acc[k] = acc[k].wrapping_add(v);
                            }
                        }
                    }
                    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                })
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// One row of `bench/llama/llama_speed.py`'s output.
#[derive(serde::Deserialize, Debug)]
struct LlamaSpeed {
    threads: usize,
    test: String,
    /// Mean over the repetitions.
    tokens_per_second: f64,
    /// Their standard deviation (absent from older versions of the script).
    stddev_tokens_per_second: Option<f64>,
    /// The fastest repetition (absent from older versions of the script).
    best_tokens_per_second: Option<f64>,
}

/// Runs llama.cpp's `llama-bench` on `path` through `bench/llama/llama_speed.py`.
fn llama_speed(
    python: &Path,
    path: &Path,
    threads: &[usize],
    prompts: &[usize],
    decode: usize,
    repetitions: usize,
) -> Result<Vec<LlamaSpeed>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("llama/llama_speed.py");
    let threads: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    let prompts: Vec<String> = prompts.iter().map(|t| t.to_string()).collect();
    eprintln!("llama.cpp {}: running llama-bench …", file_name(path));
    let output = Command::new(python)
        .arg(&script)
        .arg(path)
        .args(["--threads", &threads.join(","), "--prompts", &prompts.join(","), "--gen", &decode.to_string()])
        .args(["--reps", &repetitions.to_string()])
        .output()
        .with_context(|| {
            format!("cannot run {} (set up llama.cpp with bench/llama/setup.sh, or pass --no-llama)", python.display())
        })?;
    if !output.status.success() {
        bail!("llama_speed.py failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    serde_json::from_slice(&output.stdout).context("llama_speed.py printed invalid JSON")
}

fn machine_name() -> String {
    // The 1-minute load average before the run: above ~0.5 on a 2-core machine something
    // else is competing and the 2-thread figures (of every engine) are not trustworthy.
    let load = load_average().map_or_else(|| "unknown".into(), |l| format!("{:.2}", l[0]));
    format!("{}, load average {load} at start", cpu_name())
}

/// The CPU's model name and the number of logical CPUs this process may use.
fn cpu_name() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// The 1-, 5- and 15-minute load averages (Linux).
fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

fn markdown(report: &Report, args: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!("Machine: {} · Petrel kernels: {}\n\n", report.machine, report.kernels));
    s.push_str("Read bandwidth (measured in this run): ");
    let bw: Vec<String> =
        report.read_bandwidth_gb_s.iter().map(|(t, g)| format!("{g:.1} GB/s with {t} thread(s)")).collect();
    s.push_str(&bw.join(", "));
    s.push_str("\n\n| model | threads | test | Petrel tok/s (mean ± sd) | best | llama.cpp tok/s (mean ± sd) | best | Petrel / llama.cpp (means) | (bests) | bandwidth bound tok/s |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let find = |engine: &str, model: &str, threads: usize, test: &str| {
        report.rows.iter().find(|r| r.engine == engine && r.model == model && r.threads == threads && r.test == test)
    };
    for (model, bytes) in &report.weight_bytes_per_token {
        for &threads in &args.threads {
            let mut tests: Vec<String> = args.prompts.iter().filter(|&&n| n > 0).map(|n| format!("pp{n}")).collect();
            if args.decode > 0 {
                tests.push(format!("tg{}", args.decode));
            }
            for test in tests {
                let (ours, theirs) = (find("petrel", model, threads, &test), find("llama.cpp", model, threads, &test));
                let ratio = |f: fn(&Row) -> f64| match (ours, theirs) {
                    (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}×", f(a) / f(b)),
                    _ => "–".into(),
                };
                let bound = if test.starts_with("tg") {
                    report
                        .read_bandwidth_gb_s
                        .iter()
                        .find(|(t, _)| *t == threads)
                        .map_or("–".into(), |(_, g)| format!("{:.0}", g * 1e9 / *bytes as f64))
                } else {
                    "–".into()
                };
                let spread = |r: Option<&Row>| r.map_or("–".into(), |r| format!("{:.1} ± {:.1}", r.mean, r.stddev));
                let best = |r: Option<&Row>| r.map_or("–".into(), |r| format!("{:.1}", r.tokens_per_second));
                s.push_str(&format!(
                    "| {model} | {threads} | {test} | {} | {} | {} | {} | {} | {} | {bound} |\n",
                    spread(ours),
                    best(ours),
                    spread(theirs),
                    best(theirs),
                    ratio(|r| r.mean),
                    ratio(|r| r.tokens_per_second),
                ));
            }
        }
    }
    s.push_str(&format!(
        "\n{} runs per figure (mean ± sample standard deviation, and the best), both engines in this run on the same file and threads. Prefill: N random tokens from an empty cache; decode: {} single-token steps from an empty cache (llama-bench's pp/tg tests). Bandwidth bound = measured read bandwidth / weight bytes read per token.\n",
        args.repetitions, args.decode
    ));
    s
}
