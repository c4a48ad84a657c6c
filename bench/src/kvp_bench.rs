//! `petrel-bench kvp`: time to first token with KV-prediction prefill against the base's
//! own prefill, in one run.
//!
//! TTFT here is the time from an empty cache to the logits of the first generated token:
//! `Session::prefill` of the whole prompt (base), or with
//! [`SessionOptions::kv_prediction`] (auxiliary model over the prompt minus its last
//! token, the maps, then the base on the last token). Each predictor file also reports its
//! auxiliary model alone over the whole prompt. Prompts are real held-out text. For each
//! thread count and prompt length the variants alternate, repetition by repetition, so the
//! machine's drifting load hits them alike; each figure is the best of its repetitions
//! and the ratios are taken within this run. llama.cpp's prefill of the same prompt
//! lengths (llama-bench's ppN, on its Q4_0 file of the base) is the outside reference.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::{KvType, Model, Session, SessionOptions};
use serde::Serialize;

use crate::{file_name, llama_speed, load_average, machine_name};

/// `petrel-bench kvp` options.
#[derive(clap::Args, Debug)]
pub struct KvpArgs {
    /// Files with a KV predictor (`petrel kvp-fit`, `petrel kvp-train`), all over the same
    /// base; the first one's base is the reference.
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// UTF-8 text whose tokens are the prompts (default: the corpora cache's heldout.txt).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Prompt lengths, tokens.
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048")]
    prompts: Vec<usize>,
    /// Runs per figure; the best is kept.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// llama.cpp's file of the base for its prefill figures (default: the cache's
    /// SmolLM2 Q4_0); `none` skips llama.cpp.
    #[arg(long)]
    llama_model: Option<String>,
    /// Python interpreter that runs bench/llama/llama_speed.py.
    #[arg(long, env = "PETREL_LLAMA_PYTHON", default_value = "python3")]
    llama_python: PathBuf,
    /// Directory for results (`<name>.json`, `<name>.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Base name of the result files.
    #[arg(long, default_value = "kvp-ttft")]
    name: String,
}

/// One prompt length at one thread count.
#[derive(Serialize, Debug)]
struct TtftRow {
    threads: usize,
    prompt: usize,
    /// The base's own prefill, ms.
    base_ms: f64,
    /// Per predictor file: KV-prediction prefill, ms.
    predicted_ms: Vec<f64>,
    /// Per predictor file: its auxiliary model alone over the whole prompt, ms.
    aux_only_ms: Vec<f64>,
    /// llama.cpp's prefill of the same length on its file of the base, ms.
    llama_cpp_ms: Option<f64>,
}

#[derive(Serialize, Debug)]
struct Report {
    machine: String,
    load_average_start: Option<[f64; 3]>,
    models: Vec<String>,
    aux_blocks: Vec<usize>,
    base_blocks: usize,
    llama_cpp_model: Option<String>,
    rows: Vec<TtftRow>,
}

/// Milliseconds from an empty cache to the first token's logits.
fn ttft_ms(session: &mut Session<'_, '_>, prompt: &[u32]) -> Result<f64> {
    session.reset();
    let start = Instant::now();
    session.prefill(prompt)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Runs `petrel-bench kvp`.
pub fn run(args: &KvpArgs) -> Result<()> {
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => petrel_models::registry::cache_dir()?.join("corpora/heldout.txt"),
    };
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("cannot read {} (scripts/fetch_corpora.py makes it)", text_path.display()))?;
    let files = args
        .models
        .iter()
        .map(|p| MappedFile::open(p).with_context(|| format!("cannot open {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let ggufs = files.iter().map(|f| GgufFile::parse(f.bytes())).collect::<Result<Vec<_>, _>>()?;
    let models = ggufs
        .iter()
        .zip(&args.models)
        .map(|(g, p)| Model::load(g).with_context(|| format!("cannot load {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    for (m, p) in models.iter().zip(&args.models) {
        if m.kv_predictor.is_none() {
            bail!("{} has no KV predictor", p.display());
        }
        if m.config != models[0].config {
            bail!("{} holds a different base model than {}", p.display(), args.models[0].display());
        }
    }
    let longest = args.prompts.iter().copied().max().unwrap_or(0);
    if longest < 2 || longest > models[0].config.context_length {
        bail!("prompts must be between 2 and the model's context of {} tokens", models[0].config.context_length);
    }
    let prefix_end = text.char_indices().nth(longest * 8).map_or(text.len(), |(i, _)| i);
    let tokens = models[0].tokenizer.encode(&text[..prefix_end], false);
    if tokens.len() < longest {
        bail!("{} is too short for prompts of {longest} tokens", text_path.display());
    }
    let llama_model = match args.llama_model.as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(petrel_models::registry::cache_dir()?.join("SmolLM2-135M-Instruct.Q4_0.gguf")),
    };
    let load_average_start = load_average();
    let mut rows = Vec::new();
    for &threads in &args.threads {
        let options = SessionOptions { capacity: longest, threads, kv_type: KvType::F32, ..SessionOptions::default() };
        let predicted = SessionOptions { kv_prediction: true, ..options.clone() };
        let mut base = Session::new(&models[0], options.clone())?;
        let mut sessions = models.iter().map(|m| Session::new(m, predicted.clone())).collect::<Result<Vec<_>, _>>()?;
        let auxes: Vec<&Model<'_>> = models.iter().filter_map(|m| m.kv_predictor.as_deref()).map(|p| &p.aux).collect();
        let mut aux_sessions = auxes.iter().map(|m| Session::new(m, options.clone())).collect::<Result<Vec<_>, _>>()?;
        for &n in &args.prompts {
            let prompt = &tokens[..n];
            let (mut best_base, mut best_pred, mut best_aux) =
                (f64::INFINITY, vec![f64::INFINITY; models.len()], vec![f64::INFINITY; models.len()]);
            for _ in 0..args.repetitions.max(1) {
                best_base = best_base.min(ttft_ms(&mut base, prompt)?);
                for (i, s) in sessions.iter_mut().enumerate() {
                    best_pred[i] = best_pred[i].min(ttft_ms(s, prompt)?);
                }
                for (i, s) in aux_sessions.iter_mut().enumerate() {
                    best_aux[i] = best_aux[i].min(ttft_ms(s, prompt)?);
                }
            }
            let ratios: Vec<String> = best_pred.iter().map(|p| format!("{:.2}×", best_base / p)).collect();
            eprintln!(
                "t={threads} prompt {n}: base {best_base:.1} ms, predicted {best_pred:.1?} ms ({})",
                ratios.join(", ")
            );
            rows.push(TtftRow {
                threads,
                prompt: n,
                base_ms: best_base,
                predicted_ms: best_pred,
                aux_only_ms: best_aux,
                llama_cpp_ms: None,
            });
        }
    }
    if let Some(llama) = &llama_model {
        let speeds = llama_speed(&args.llama_python, llama, &args.threads, &args.prompts, 0, args.repetitions.max(1))?;
        for row in &mut rows {
            let test = format!("pp{}", row.prompt);
            if let Some(s) = speeds.iter().find(|s| s.threads == row.threads && s.test == test) {
                let tok_s = s.best_tokens_per_second.unwrap_or(s.tokens_per_second);
                row.llama_cpp_ms = Some(row.prompt as f64 / tok_s * 1e3);
            }
        }
    }
    let report = Report {
        machine: machine_name(),
        load_average_start,
        models: args.models.iter().map(|p| file_name(p)).collect(),
        aux_blocks: models.iter().filter_map(|m| m.kv_predictor.as_ref()).map(|p| p.aux.layers.len()).collect(),
        base_blocks: models[0].config.layers,
        llama_cpp_model: llama_model.as_deref().map(file_name),
        rows,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join(format!("{}.json", args.name));
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let md = args.out.join(format!("{}.md", args.name));
    let table = markdown(&report, args);
    std::fs::write(&md, &table)?;
    println!("{table}");
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

fn markdown(r: &Report, args: &KvpArgs) -> String {
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let mut s = format!(
        "# KV-prediction prefill: time to first token, one run\n\n\
         Machine: {} · base: {} blocks · llama.cpp file: {}\n\n\
         Command: `petrel-bench kvp {} --threads {} --prompts {} --repetitions {}`\n\n",
        r.machine,
        r.base_blocks,
        r.llama_cpp_model.as_deref().unwrap_or("(skipped)"),
        args.models.iter().map(|p| format!("--model {}", p.display())).collect::<Vec<_>>().join(" "),
        list(&args.threads),
        list(&args.prompts),
        args.repetitions,
    );
    s.push_str("| threads | prompt | base ms | llama.cpp ms | base / llama.cpp |");
    for (m, a) in r.models.iter().zip(&r.aux_blocks) {
        s.push_str(&format!(" `{m}` ({a} aux blocks): predicted ms | speedup | aux alone ms |"));
    }
    s.push_str("\n|---|---|---|---|---|");
    s.push_str(&"---|---|---|".repeat(r.models.len()));
    s.push('\n');
    for row in &r.rows {
        let llama = row.llama_cpp_ms.map_or("–".into(), |m| format!("{m:.1}"));
        let vs = row.llama_cpp_ms.map_or("–".into(), |m| format!("{:.2}×", row.base_ms / m));
        s.push_str(&format!("| {} | {} | {:.1} | {llama} | {vs} |", row.threads, row.prompt, row.base_ms));
        for (p, a) in row.predicted_ms.iter().zip(&row.aux_only_ms) {
            s.push_str(&format!(" {p:.1} | **{:.2}×** | {a:.1} |", row.base_ms / p));
        }
        s.push('\n');
    }
    s.push_str(
        "\nTTFT = empty cache to the first token's logits (best of the repetitions). Speedup = base ms / predicted ms. \
         base / llama.cpp > 1 means our prefill is slower than llama.cpp's on its own Q4_0 file.\n",
    );
    s
}
