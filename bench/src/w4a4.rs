//! `petrel-bench w4a4`: Petrel's W4A4 path against llama.cpp's Q4_0 path, in one run.
//!
//! 1. The machine's int8 multiply–accumulate peak (`vpdpbusd zmm` loop, 1 and 2 threads).
//! 2. Kernels, one thread, SmolLM2's shapes × 1, 64, 256 tokens: Petrel's W4 kernels
//!    ([`crate::kernels::petrel`]) and ggml's Q4_0 × Q8_0 mul_mat, repacked and plain
//!    ([`crate::kernels::ggml`]), in GOPS and as a share of the one-thread peak.
//! 3. End to end: Petrel on a W4A4 file against `llama-bench` on llama.cpp's Q4_0 file,
//!    prefill (`pp256`, `pp1024`) and decode (`tg128`) with 1 and 2 threads, best of 3 for
//!    both engines; decode also against the bound set by the read bandwidth measured in the
//!    same run (weight bytes per token / bandwidth).
//!
//! Writes `<out>/<name>.json` (every number) and `<out>/<name>.md` (tables, goals).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use petrel_models::registry;
use petrel_quant::w4::kernels::W4Kernels;
use petrel_quant::w4::GroupSize;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::linear::WeightStorage;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::scheme::{Activations, Rotation};
use petrel_runtime::Model;
use serde::Serialize;

use crate::kernels::{self, KernelRow, QuantRow};
use crate::timing::Budget;
use crate::{cpu_name, file_name, llama_speed, load_average, petrel_rows, read_bandwidth, read_bandwidth_over, Row};

/// Decode goal: Petrel W4A4 tokens/s over llama.cpp Q4_0 tokens/s.
const DECODE_GOAL: f64 = 1.3;
/// Prefill goal.
const PREFILL_GOAL: f64 = 2.0;

/// `petrel-bench w4a4` options.
#[derive(clap::Args, Debug)]
pub struct W4a4Args {
    /// Petrel W4A4 GGUF (default: SmolLM2-135M-Instruct.w4a4.gguf in $PETREL_HOME or
    /// ~/.cache/petrel; make one with `petrel quantize IN OUT --scheme w4a4 …`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// llama.cpp's Q4_0 GGUF (default: SmolLM2-135M-Instruct.Q4_0.gguf in the cache, made by
    /// bench/llama/setup.sh with llama-quantize).
    #[arg(long)]
    llama_model: Option<PathBuf>,
    /// Thread counts (end to end).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Prompt lengths for prefill.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    prompts: Vec<usize>,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Runs per end-to-end figure; the best is kept (for llama-bench too).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Tokens per Petrel prefill batch (the runtime's default is 64).
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Weight groupings of the kernel benchmark: 0 (per channel), 32, 64, 128.
    #[arg(long, value_delimiter = ',', default_value = "0,128")]
    groups: Vec<u32>,
    /// Skip the kernel benchmark.
    #[arg(long)]
    no_kernels: bool,
    /// Skip the end-to-end benchmark.
    #[arg(long)]
    no_e2e: bool,
    /// Skip llama.cpp (llama-bench and ggml_mulmat).
    #[arg(long)]
    no_llama: bool,
    /// Shorter kernel timing (40 ms × 3 instead of 150 ms × 5 per figure), for development.
    #[arg(long)]
    quick: bool,
    /// Before starting, wait (up to 30 minutes) until the 1-minute load average is at most
    /// this (a shared machine's other work skews every figure).
    #[arg(long)]
    wait_load: Option<f64>,
    /// The ggml_mulmat binary bench/llama/setup.sh builds (default:
    /// $PETREL_LLAMA_BUILD/bin/ggml_mulmat, PETREL_LLAMA_BUILD defaulting to
    /// $PETREL_HOME/llama.cpp-build).
    #[arg(long, env = "PETREL_GGML_MULMAT")]
    ggml_mulmat: Option<PathBuf>,
    /// Python interpreter that runs bench/llama/llama_speed.py.
    #[arg(long, env = "PETREL_LLAMA_PYTHON", default_value = "python3")]
    llama_python: PathBuf,
    /// Directory for results (`<name>.json`, `<name>.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Base name of the result files.
    #[arg(long, default_value = "w4a4")]
    name: String,
}

/// A model file measured end to end.
#[derive(Serialize, Debug)]
struct ModelInfo {
    engine: String,
    file: String,
    file_bytes: u64,
    /// Weight bytes read per decoded token (every matrix once, one embedding row), as
    /// Petrel's loader counts them.
    weight_bytes_per_token: usize,
    /// Storage summary (`w4a4, group 128, quarot, head q8_0` …).
    format: String,
}

/// Read bandwidth over a buffer the size of one model's weights.
#[derive(Serialize, Debug)]
struct WorkingSetBandwidth {
    engine: String,
    bytes: usize,
    threads: usize,
    gb_s: f64,
}

/// A goal of the W4A4 work and whether this run meets it.
#[derive(Serialize, Debug)]
struct Goal {
    test: String,
    threads: usize,
    petrel: f64,
    llama_cpp: f64,
    ratio: f64,
    target: f64,
    met: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    machine: String,
    load_average_at_start: Option<[f64; 3]>,
    load_average_before_end_to_end: Option<[f64; 3]>,
    load_average_at_end: Option<[f64; 3]>,
    command: String,
    petrel_kernels: String,
    /// `vpdpbusd zmm` peak GOPS per thread count.
    int8_peak_gops: Vec<(usize, f64)>,
    kernel_rows: Vec<KernelRow>,
    activation_quantization: Vec<QuantRow>,
    /// Read bandwidth over 512 MiB per thread count (the default bench's figure).
    read_bandwidth_gb_s: Vec<(usize, f64)>,
    /// Read bandwidth over a buffer of each model's weight bytes per token.
    working_set_bandwidth: Vec<WorkingSetBandwidth>,
    models: Vec<ModelInfo>,
    e2e_rows: Vec<Row>,
    goals: Vec<Goal>,
    seconds: f64,
}

fn llama_build_dir() -> Result<PathBuf> {
    Ok(match std::env::var_os("PETREL_LLAMA_BUILD") {
        Some(dir) => PathBuf::from(dir),
        None => registry::cache_dir()?.join("llama.cpp-build"),
    })
}

fn wait_for_load(max: f64) {
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    loop {
        match load_average() {
            Some(l) if l[0] > max && Instant::now() < deadline => {
                eprintln!("load average {:.2} > {max}: waiting …", l[0]);
                std::thread::sleep(Duration::from_secs(20));
            }
            Some(l) if l[0] > max => {
                eprintln!("load average still {:.2} after 30 minutes: starting anyway", l[0]);
                return;
            }
            _ => return,
        }
    }
}

pub fn run(args: &W4a4Args) -> Result<()> {
    let groups: Vec<GroupSize> = args
        .groups
        .iter()
        .map(|&g| GroupSize::from_len(g).with_context(|| format!("--groups: {g} is not 0, 32, 64 or 128")))
        .collect::<Result<_>>()?;
    let cache = registry::cache_dir()?;
    let w4_path = args.model.clone().unwrap_or_else(|| cache.join("SmolLM2-135M-Instruct.w4a4.gguf"));
    let q4_path = args.llama_model.clone().unwrap_or_else(|| cache.join("SmolLM2-135M-Instruct.Q4_0.gguf"));
    if !args.no_e2e {
        if !w4_path.exists() {
            bail!(
                "{} is missing: make it with `petrel quantize {} {} --scheme w4a4 --rotate --group 128` or pass --model",
                w4_path.display(),
                cache.join("SmolLM2-135M-Instruct.Q4_1.gguf").display(),
                w4_path.display()
            );
        }
        if !args.no_llama && !q4_path.exists() {
            bail!("{} is missing: run bench/llama/setup.sh or pass --llama-model", q4_path.display());
        }
    }
    let ggml_mulmat = match &args.ggml_mulmat {
        Some(p) => p.clone(),
        None => llama_build_dir()?.join("bin/ggml_mulmat"),
    };
    if !args.no_kernels && !args.no_llama && !ggml_mulmat.exists() {
        bail!("{} is missing: run bench/llama/setup.sh (or pass --ggml-mulmat, or --no-llama)", ggml_mulmat.display());
    }

    if let Some(max) = args.wait_load {
        wait_for_load(max);
    }
    let started = Instant::now();
    let load_start = load_average();
    if let Some(l) = load_start {
        if l[0] > 2.5 {
            eprintln!("warning: load average {:.2} at start: other work competes; figures will be low", l[0]);
        }
    }
    let budget = Budget::new(args.quick);

    // 1. Peak.
    let mut peaks = Vec::new();
    for t in [1usize, 2] {
        if let Some(g) = crate::peak::vnni_gops(t) {
            eprintln!("int8 peak (vpdpbusd zmm), {t} thread(s): {g:.0} GOPS");
            peaks.push((t, g));
        }
    }

    // 2. Kernels.
    let mut kernel_rows = Vec::new();
    let mut quant_rows = Vec::new();
    if !args.no_kernels {
        let (rows, quant) = kernels::petrel(&groups, budget)?;
        kernel_rows.extend(rows);
        quant_rows = quant;
        if !args.no_llama {
            kernel_rows.extend(kernels::ggml(&ggml_mulmat, true, budget)?);
            kernel_rows.extend(kernels::ggml(&ggml_mulmat, false, budget)?);
        }
    }

    // 3. End to end.
    let mut bandwidth = Vec::new();
    let mut ws_bandwidth = Vec::new();
    let mut models = Vec::new();
    let mut e2e = Vec::new();
    let load_e2e = load_average();
    if !args.no_e2e {
        let name = file_name(&w4_path);
        let file = MappedFile::open(&w4_path).with_context(|| format!("cannot open {}", w4_path.display()))?;
        let gguf = GgufFile::parse(file.bytes())?;
        let model = Model::load(&gguf)?;
        models.push(model_info("petrel", &w4_path, &model)?);
        if !args.no_llama {
            let file = MappedFile::open(&q4_path).with_context(|| format!("cannot open {}", q4_path.display()))?;
            let gguf = GgufFile::parse(file.bytes())?;
            models.push(model_info("llama.cpp", &q4_path, &Model::load(&gguf)?)?);
        }
        bandwidth = args.threads.iter().map(|&t| (t, read_bandwidth(t))).collect();
        for (t, gbs) in &bandwidth {
            eprintln!("read bandwidth (512 MiB), {t} thread(s): {gbs:.1} GB/s");
        }
        for m in &models {
            for &t in &args.threads {
                let gb_s = read_bandwidth_over(t, m.weight_bytes_per_token);
                eprintln!(
                    "read bandwidth ({:.0} MB, {} weights), {t} thread(s): {gb_s:.1} GB/s",
                    m.weight_bytes_per_token as f64 / 1e6,
                    m.engine
                );
                ws_bandwidth.push(WorkingSetBandwidth {
                    engine: m.engine.clone(),
                    bytes: m.weight_bytes_per_token,
                    threads: t,
                    gb_s,
                });
            }
        }
        let (rows, _) = petrel_rows(
            &model,
            &name,
            &args.threads,
            &args.prompts,
            args.decode,
            args.repetitions,
            args.max_batch,
            false,
            petrel_runtime::KvType::F32,
        )?;
        e2e.extend(rows);
        if !args.no_llama {
            let q4_name = file_name(&q4_path);
            let speeds =
                llama_speed(&args.llama_python, &q4_path, &args.threads, &args.prompts, args.decode, args.repetitions)?;
            for r in speeds {
                let row = Row::from_llama(&q4_name, r);
                eprintln!("llama.cpp {q4_name} t={} {}: {}", row.threads, row.test, row.summary());
                e2e.push(row);
            }
        }
    }

    let goals = goals(&e2e, args);
    let report = Report {
        machine: match last_level_cache() {
            Some(c) => format!("{}, last-level cache {c}", cpu_name()),
            None => cpu_name(),
        },
        load_average_at_start: load_start,
        load_average_before_end_to_end: load_e2e,
        load_average_at_end: load_average(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        petrel_kernels: W4Kernels::detect().isa().name().to_string(),
        int8_peak_gops: peaks,
        kernel_rows,
        activation_quantization: quant_rows,
        read_bandwidth_gb_s: bandwidth,
        working_set_bandwidth: ws_bandwidth,
        models,
        e2e_rows: e2e,
        goals,
        seconds: started.elapsed().as_secs_f64(),
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join(format!("{}.json", args.name));
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let md = args.out.join(format!("{}.md", args.name));
    let table = markdown(&report, args, &groups);
    std::fs::write(&md, &table)?;
    println!("{table}");
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

/// The size of the largest cache level CPU 0 reports (Linux sysfs), e.g. `480 MiB`.
fn last_level_cache() -> Option<String> {
    let dir = Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut best: Option<(u32, String)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok().map(|s| s.trim().to_string());
        let (Some(Ok(level)), Some(size)) = (read("level").map(|l| l.parse::<u32>()), read("size")) else {
            continue;
        };
        if best.as_ref().is_none_or(|(l, _)| level > *l) {
            best = Some((level, size));
        }
    }
    best.map(|(level, size)| {
        let size = size.strip_suffix('K').and_then(|k| k.parse::<u64>().ok()).map_or(size.clone(), |k| {
            if k >= 1024 {
                format!("{} MiB", k / 1024)
            } else {
                format!("{k} KiB")
            }
        });
        format!("L{level} {size}")
    })
}

fn model_info(engine: &str, path: &Path, model: &Model<'_>) -> Result<ModelInfo> {
    let format = match &model.scheme {
        Some(s) => {
            let group = match s.group {
                GroupSize::PerChannel => "per channel".to_string(),
                g => format!("group {}", g.as_len()),
            };
            let clip = match s.activations {
                Activations::Quantized { clip, .. } => format!(", activation clip {clip}"),
                Activations::Float => String::new(),
            };
            let rotation = if s.rotation == Rotation::QuaRot { ", QuaRot" } else { "" };
            format!(
                "{} ({group}{clip}{rotation}); head {}, embedding {}",
                s.name(),
                storage_name(model.output.storage),
                storage_name(model.token_embedding.storage)
            )
        }
        None => format!(
            "blocks {}; head {}, embedding {}",
            model.layers.first().map_or("–".into(), |l| storage_name(l.wq.storage)),
            storage_name(model.output.storage),
            storage_name(model.token_embedding.storage)
        ),
    };
    Ok(ModelInfo {
        engine: engine.into(),
        file: file_name(path),
        file_bytes: std::fs::metadata(path)?.len(),
        weight_bytes_per_token: model.weight_bytes_per_token(),
        format,
    })
}

/// `Q8_0`, `F32`, `W4` … for a weight storage.
fn storage_name(storage: WeightStorage) -> String {
    match storage {
        WeightStorage::Quantized(f) => format!("{f:?}"),
        WeightStorage::F32 => "F32".into(),
        WeightStorage::F16 => "F16".into(),
        WeightStorage::W4(_) => "W4".into(),
    }
}

fn find(rows: &[Row], engine: &str, threads: usize, test: &str) -> Option<f64> {
    rows.iter().find(|r| r.engine == engine && r.threads == threads && r.test == test).map(|r| r.tokens_per_second)
}

fn goals(rows: &[Row], args: &W4a4Args) -> Vec<Goal> {
    let mut tests: Vec<(String, f64)> = vec![(format!("tg{}", args.decode), DECODE_GOAL)];
    tests.extend(args.prompts.iter().map(|n| (format!("pp{n}"), PREFILL_GOAL)));
    let mut goals = Vec::new();
    for (test, target) in tests {
        for &threads in &args.threads {
            if let (Some(petrel), Some(llama_cpp)) =
                (find(rows, "petrel", threads, &test), find(rows, "llama.cpp", threads, &test))
            {
                let ratio = petrel / llama_cpp;
                goals.push(Goal {
                    test: test.clone(),
                    threads,
                    petrel,
                    llama_cpp,
                    ratio,
                    target,
                    met: ratio >= target,
                });
            }
        }
    }
    goals
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map_or_else(|| "unknown".into(), |l| format!("{:.2} / {:.2} / {:.2}", l[0], l[1], l[2]))
}

fn markdown(report: &Report, args: &W4a4Args, groups: &[GroupSize]) -> String {
    let mut s = String::new();
    s.push_str("# Petrel W4A4 against llama.cpp Q4_0 (SmolLM2-135M)\n\n");
    s.push_str(&format!(
        "Machine: {} · load average (1 / 5 / 15 min) {} at start, {} before the end-to-end part, {} at end · Petrel kernels: {} · {:.0} s\n\n",
        report.machine,
        fmt_load(report.load_average_at_start),
        fmt_load(report.load_average_before_end_to_end),
        fmt_load(report.load_average_at_end),
        report.petrel_kernels,
        report.seconds
    ));
    s.push_str(&format!("Command: `{}`\n\n", report.command));

    if !report.goals.is_empty() {
        s.push_str("## Goals\n\n| test | threads | Petrel W4A4 tok/s | llama.cpp Q4_0 tok/s | ratio | goal | |\n|---|---|---|---|---|---|---|\n");
        for g in &report.goals {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.2}× | ≥ {:.1}× | {} |\n",
                g.test,
                g.threads,
                g.petrel,
                g.llama_cpp,
                g.ratio,
                g.target,
                if g.met { "**met**" } else { "not met" }
            ));
        }
        s.push('\n');
    }

    if !report.e2e_rows.is_empty() {
        s.push_str("## End to end\n\n");
        for m in &report.models {
            s.push_str(&format!(
                "- {}: `{}`, {:.1} MB file, {:.1} MB of weights read per decoded token; {}\n",
                m.engine,
                m.file,
                m.file_bytes as f64 / 1e6,
                m.weight_bytes_per_token as f64 / 1e6,
                m.format
            ));
        }
        let bw: Vec<String> =
            report.read_bandwidth_gb_s.iter().map(|(t, g)| format!("{g:.1} GB/s with {t} thread(s)")).collect();
        s.push_str(&format!("- Read bandwidth measured in this run over 512 MiB: {}", bw.join(", ")));
        let ws: Vec<String> = report
            .working_set_bandwidth
            .iter()
            .map(|w| {
                format!(
                    "{:.1} GB/s with {} thread(s) over {:.0} MB ({})",
                    w.gb_s,
                    w.threads,
                    w.bytes as f64 / 1e6,
                    w.engine
                )
            })
            .collect();
        if !ws.is_empty() {
            s.push_str(&format!("; over a buffer of each model's weight size: {}", ws.join(", ")));
        }
        s.push_str("\n\n");
        s.push_str("| threads | test | Petrel W4A4 tok/s | llama.cpp Q4_0 tok/s | Petrel / llama.cpp | Petrel bound tok/s: 512 MiB / weight-sized (share of each) | llama.cpp bound tok/s: 512 MiB / weight-sized (share of each) |\n|---|---|---|---|---|---|---|\n");
        let bound = |engine: &str, threads: usize, v: Option<f64>| -> String {
            let Some(bytes) = report.models.iter().find(|m| m.engine == engine).map(|m| m.weight_bytes_per_token)
            else {
                return "–".into();
            };
            let dram = report.read_bandwidth_gb_s.iter().find(|(t, _)| *t == threads).map(|(_, g)| *g);
            let ws = report
                .working_set_bandwidth
                .iter()
                .find(|w| w.engine == engine && w.threads == threads)
                .map(|w| w.gb_s);
            let one = |g: Option<f64>| match (g, v) {
                (Some(g), Some(v)) => {
                    let bound = g * 1e9 / bytes as f64;
                    format!("{bound:.0} ({:.0}%)", 100.0 * v / bound)
                }
                (Some(g), None) => format!("{:.0}", g * 1e9 / bytes as f64),
                _ => "–".into(),
            };
            format!("{} / {}", one(dram), one(ws))
        };
        let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
        for &threads in &args.threads {
            let mut tests: Vec<String> = args.prompts.iter().map(|n| format!("pp{n}")).collect();
            tests.push(format!("tg{}", args.decode));
            for test in tests {
                let ours = find(&report.e2e_rows, "petrel", threads, &test);
                let theirs = find(&report.e2e_rows, "llama.cpp", threads, &test);
                let ratio = match (ours, theirs) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                    _ => "–".into(),
                };
                let (b1, b2) = if test.starts_with("tg") {
                    (bound("petrel", threads, ours), bound("llama.cpp", threads, theirs))
                } else {
                    ("–".into(), "–".into())
                };
                s.push_str(&format!(
                    "| {threads} | {test} | {} | {} | {ratio} | {b1} | {b2} |\n",
                    fmt(ours),
                    fmt(theirs)
                ));
            }
        }
        s.push_str(&format!(
            "\nBest of {} runs per figure for both engines (llama-bench `-r {}`, its fastest repetition). Prefill: N random tokens from an empty cache in one call (Petrel: batches of {} tokens; llama-bench: its default ubatch of 512); decode: {} single-token steps from an empty cache. Bound = read bandwidth / weight bytes read per token, with the bandwidth of a 512 MiB buffer (as `petrel-bench` reports it) and of a buffer of the model's weight size: this machine's last-level cache may hold a whole model, so decode can beat the 512 MiB bound.\n\n",
            args.repetitions, args.repetitions, args.max_batch, args.decode
        ));
    }

    let peak1 = report.int8_peak_gops.iter().find(|(t, _)| *t == 1).map(|(_, g)| *g);
    if !report.int8_peak_gops.is_empty() {
        let p: Vec<String> =
            report.int8_peak_gops.iter().map(|(t, g)| format!("{g:.0} GOPS with {t} thread(s)")).collect();
        s.push_str(&format!(
            "## int8 peak\n\n16 independent `vpdpbusd zmm` per loop (64 u8×i8 multiply–accumulates each, 2 ops per MAC): {}. Kernel percentages below are of the one-thread figure.\n\n",
            p.join(", ")
        ));
    }

    if !report.kernel_rows.is_empty() {
        let isa = &report.petrel_kernels;
        let lut = format!("lut-{isa}");
        let k = |engine: &str, kernel: &str, weights: &str, acts: &str, q: bool, n: usize, kk: usize, m: usize| {
            report
                .kernel_rows
                .iter()
                .find(|r| {
                    r.engine == engine
                        && r.kernel == kernel
                        && (weights.is_empty() || r.weights == weights)
                        && (acts.is_empty() || r.activations == acts)
                        && r.with_quantization == q
                        && r.n == n
                        && r.k == kk
                        && r.m == m
                })
                .map(|r| r.gops)
        };
        let ggml = |repack: bool, n: usize, kk: usize, m: usize| {
            report
                .kernel_rows
                .iter()
                .find(|r| {
                    r.engine == "ggml" && r.kernel.starts_with("repack") == repack && r.n == n && r.k == kk && r.m == m
                })
                .map(|r| (r.gops, r.kernel.clone()))
        };
        let cell = |v: Option<f64>| match (v, peak1) {
            (Some(v), Some(p)) => format!("{v:.1} ({:.0}%)", 100.0 * v / p),
            (Some(v), None) => format!("{v:.1}"),
            _ => "–".into(),
        };
        s.push_str("## Kernels (one thread)\n\n");
        s.push_str(&format!(
            "GOPS = 2·M·N·K / time (best of {} runs of ≥ {} ms, on-CPU time of the thread), with the share of the one-thread int8 peak in parentheses. W = N×K weights, M tokens. \
Petrel: `W4Kernels` ({isa}) on int4 (A4) or int8 (A8) per-token activations already quantized, then \"+q\": the same plus quantizing the f32 input (`quantize_token`, once per input in the runtime), which is what ggml's figure includes; `{lut}`: the lookup-table kernel (A4 only); scalar: the reference, M = 1 only. \
ggml: `ggml_mul_mat(W Q4_0, X f32)` on the CPU backend, one thread, X quantized to Q8_0 inside the op (`bench/llama/ggml_mulmat.c`); \"repacked\" is llama.cpp's default (weights interleaved 8 rows at a time, `gemm/gemv_q4_0_8x8_q8_0`), \"plain\" the file layout (M = 1: `ggml_vec_dot_q4_0_q8_0`; M > 1: llamafile's tinyBLAS). Ratios: Petrel +q over ggml repacked.\n\n",
            if args.quick { 3 } else { 5 },
            if args.quick { 40 } else { 150 },
        ));
        for &group in groups {
            let w = kernels::weights_name(group);
            s.push_str(&format!(
                "### Petrel weights {}\n\n| N×K | M | {isa} A4 | {isa} A8 | A4 +q | A8 +q | {lut} A4 | scalar A4 / A8 | ggml repacked | ggml plain | A4 +q / ggml | A8 +q / ggml |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
                match group {
                    GroupSize::PerChannel => "per channel".to_string(),
                    g => format!("group {}", g.as_len()),
                }
            ));
            for (n, kk) in kernels::SHAPES {
                for m in kernels::TOKENS {
                    let a4 = k("petrel", isa, &w, "a4", false, n, kk, m);
                    let a8 = k("petrel", isa, &w, "a8", false, n, kk, m);
                    let a4q = k("petrel", isa, &w, "a4", true, n, kk, m);
                    let a8q = k("petrel", isa, &w, "a8", true, n, kk, m);
                    let l = k("petrel", &lut, &w, "a4", false, n, kk, m);
                    let scalar = match (
                        k("petrel", "scalar", &w, "a4", false, n, kk, m),
                        k("petrel", "scalar", &w, "a8", false, n, kk, m),
                    ) {
                        (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
                        _ => "–".into(),
                    };
                    let rep = ggml(true, n, kk, m);
                    let plain = ggml(false, n, kk, m);
                    let ratio = |p: Option<f64>| match (p, &rep) {
                        (Some(p), Some((g, _))) => format!("{:.2}×", p / g),
                        _ => "–".into(),
                    };
                    s.push_str(&format!(
                        "| {n}×{kk} | {m} | {} | {} | {} | {} | {} | {scalar} | {} | {} | {} | {} |\n",
                        cell(a4),
                        cell(a8),
                        cell(a4q),
                        cell(a8q),
                        cell(l),
                        cell(rep.as_ref().map(|r| r.0)),
                        cell(plain.as_ref().map(|r| r.0)),
                        ratio(a4q),
                        ratio(a8q),
                    ));
                }
            }
            s.push('\n');
        }
        let paths: Vec<String> = {
            let mut p: Vec<String> =
                report.kernel_rows.iter().filter(|r| r.engine == "ggml").map(|r| r.kernel.clone()).collect();
            p.sort();
            p.dedup();
            p
        };
        if !paths.is_empty() {
            s.push_str(&format!("ggml paths taken (as reported by ggml_mulmat): {}.\n\n", paths.join(", ")));
        }
        if !report.activation_quantization.is_empty() {
            s.push_str("Petrel activation quantization alone (µs for M tokens of K inputs):\n\n| K | M | weights | A4 µs | A8 µs |\n|---|---|---|---|---|\n");
            for &group in groups {
                let w = kernels::weights_name(group);
                let mut keys: Vec<(usize, usize)> =
                    report.activation_quantization.iter().filter(|q| q.weights == w).map(|q| (q.k, q.m)).collect();
                keys.sort();
                keys.dedup();
                for (kk, m) in keys {
                    let get = |a: &str| {
                        report
                            .activation_quantization
                            .iter()
                            .find(|q| q.weights == w && q.k == kk && q.m == m && q.activations == a)
                            .map_or("–".into(), |q| format!("{:.1}", q.seconds * 1e6))
                    };
                    s.push_str(&format!("| {kk} | {m} | {w} | {} | {} |\n", get("a4"), get("a8")));
                }
            }
            s.push('\n');
        }
    }
    s
}
