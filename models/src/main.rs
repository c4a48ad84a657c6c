//! `petrel`: run language models on the Petrel runtime.

mod eval;
mod kvp_eval;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use petrel_models::backends::{BackendChoice, PreparedBackend};
use petrel_models::{registry, stats};
use petrel_runtime::gguf::{GgufFile, Value};
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::tokenizer::{format_chat, ChatMessage, StreamDecoder, Tokenizer};
use petrel_runtime::{KvType, Model, Sampler, SamplerConfig, Session, SessionOptions, StopReason};

/// Petrel runs decoder-only language models from GGUF files on CPUs, from one no_std core.
#[derive(Parser, Debug)]
#[command(name = "petrel", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download a known model into the cache ($PETREL_HOME, default ~/.cache/petrel).
    Pull {
        /// Model name (known: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b).
        name: String,
    },
    /// Generate a reply to one prompt, streaming tokens, then print timings.
    Run {
        #[command(flatten)]
        generation: GenerationArgs,
        /// Use the prompt as raw text instead of wrapping it in the chat template.
        #[arg(long)]
        raw: bool,
        /// Also print the prompt's and the reply's token ids (to stderr), e.g. to compare
        /// with the firmware's output.
        #[arg(long)]
        token_ids: bool,
        /// The prompt.
        prompt: String,
    },
    /// Talk with a model interactively; the conversation is kept in the KV cache.
    Chat {
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Serve a model over HTTP with OpenAI's API: `POST /v1/chat/completions` and
    /// `/v1/completions` (`"stream": true` for server-sent events), `GET /v1/models` and
    /// `/health`. Requests wait in a bounded queue (429 when full) for the workers, each
    /// with its own session; a client that disconnects cancels its request. Listens on
    /// loopback unless told otherwise.
    Serve(ServeArgs),
    /// Import a decoder-only Llama-family model exported to ONNX (torch.onnx.export) into
    /// an f32 GGUF the runtime runs, with the tokenizer of another GGUF file.
    #[cfg(feature = "tract")]
    Convert(petrel_models::onnx_import::ConvertArgs),
    /// Quantize a model to W4 (W4A4, W4A8, W4A16), optionally rotated (QuaRot) and with
    /// GPTQ, into a GGUF the runtime runs.
    Quantize(petrel_models::quantize::QuantizeArgs),
    /// Train a small decoder from scratch (candle, CPU) with the W4A4 recipe (activation
    /// QAT + kurtosis penalty) or plainly, and export it (f32 and W4A4 GGUF).
    Train(Box<petrel_models::train::TrainArgs>),
    /// Fit mixture-of-depths routers to a pretrained model (weights frozen) and write
    /// routed copies of it, one per capacity and choice of blocks.
    RouteFit(Box<petrel_models::route_fit::RouteFitArgs>),
    /// Give a model a KV predictor for fast prefill: a layer-pruned auxiliary model and
    /// per-layer key/value maps fitted in closed form (or refit the maps of one it has).
    KvpFit(Box<petrel_models::kvp_fit::KvpFitArgs>),
    /// Train a KV-prediction aux model and predictor with the base frozen (candle, CPU).
    ///
    /// KV prediction (Horton et al., 2024) prefills a prompt with a small aux model whose
    /// keys and values a learned linear map per base layer turns into the base's cache;
    /// the base then runs only the last prompt token. This trains the aux blocks
    /// (`kvp.blk.*`) and the maps (`kvp.pred.*`) of an f32/f16 GGUF that has a
    /// `petrel.kvp.*` layout (or gets one with --init-aux every:N), for --minutes of wall
    /// clock, on loss = CE_base + CE_aux + L1: CE_base is the base's next-token
    /// cross-entropy at --base-positions random positions per window, each attending to the
    /// predicted cache before it plus its own key/value (exactly the runtime's last prompt
    /// token); CE_aux is the aux model's own (shared embedding, final norm and head); L1
    /// sums, over base layers, the mean |predicted − true| of keys (before RoPE) and
    /// values.
    ///
    /// Writes OUT (the input plus the trained f32 tensors), OUT's name with .json (held-out
    /// losses at start and end, throughput) and .jsonl (every step's losses).
    KvpTrain(Box<petrel_models::kvp_train::KvpTrainArgs>),
    /// Measure a model (`petrel eval ppl`: perplexity on a text file; `petrel eval act-stats`:
    /// activation outlier statistics per layer).
    Eval {
        #[command(subcommand)]
        command: eval::EvalCommand,
    },
    /// Tokenize text with a model's vocabulary (only the vocabulary is read: vocab-only
    /// GGUFs work) and print the token ids.
    ///
    /// By default the text is encoded as llama.cpp's `llama_tokenize(..., add_special,
    /// parse_special=false)` with `add_special` from the file's `tokenizer.ggml.add_bos_token`;
    /// `--no-bos` never adds BOS, `--special` parses special-token texts such as
    /// `<|im_start|>`. With `--inputs FILE` every test of a llama.cpp tokenizer-suite
    /// `.inp` file (cases separated by a `__ggml_vocab_test__` line) is encoded, BOS never
    /// added, one line of ids per case: the format of the suite's `.out` files.
    Tokenize {
        /// A known model name or a path to a GGUF file.
        #[arg(long, short)]
        model: String,
        /// Print JSON: `{"ids": [...], "pieces": [...]}` (pieces as UTF-8 text, lossy).
        #[arg(long)]
        json: bool,
        /// Never add BOS.
        #[arg(long)]
        no_bos: bool,
        /// Parse special-token texts in the input.
        #[arg(long)]
        special: bool,
        /// Encode every case of a llama.cpp tokenizer-suite `.inp` file instead of TEXT.
        #[arg(long, conflicts_with = "text")]
        inputs: Option<PathBuf>,
        /// The text to tokenize.
        #[arg(required_unless_present = "inputs")]
        text: Option<String>,
    },
    /// Print a GGUF file's metadata and tensor table.
    Inspect {
        /// Path to a .gguf file.
        file: PathBuf,
        /// Print every element of long arrays (by default only the first few).
        #[arg(long)]
        full: bool,
    },
}

#[derive(Args, Debug)]
struct GenerationArgs {
    /// A known model name (pulled on first use) or a path to a GGUF file.
    #[arg(long, short, default_value = "smollm2-135m")]
    model: String,
    /// System prompt, replacing the chat template's default one (Qwen's template, for
    /// one, adds "You are Qwen…" when the conversation has none). The template is the
    /// file's `tokenizer.chat_template`, rendered as llama.cpp --jinja / llama-cpp-python
    /// do; ChatML when the file has none.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate per reply.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// KV-cache capacity in tokens (prompt + reply) [default: 2048, or the model's context
    /// length if smaller; 0 = the model's context length].
    #[arg(long)]
    context: Option<usize>,
    /// Worker threads (default: all available cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
    /// Prefill the prompt by KV prediction: the model's auxiliary model reads it and its
    /// keys and values are mapped into the base's cache (needs a file made by `petrel
    /// kvp-fit` or `petrel kvp-train`); only the first turn of a chat is predicted.
    #[arg(long)]
    kv_prediction: bool,
    /// Which backend computes: Petrel's own kernels, candle on its CPU device, or tract's
    /// matrix kernels (in builds with `--features tract`).
    #[arg(long, value_enum, default_value = "native")]
    backend: BackendChoice,
    /// How the KV cache stores keys and values: `f16` (half of f32's bytes per token, the
    /// same perplexity), `f32`, `q8` (8-bit codes, rotated keys) or `q4` (4-bit codes;
    /// poor quality on Qwen2.5). Perplexity and speed per type are in the README. The stats
    /// line shows the bytes per token.
    #[arg(long, default_value = "f16", value_parser = parse_kv_type)]
    kv_type: KvType,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A known model name (pulled on first use) or a path to a GGUF file.
    #[arg(long, short, default_value = "smollm2-135m")]
    model: String,
    /// The id clients send as `"model"` [default: the known name, or the file name
    /// without its extension].
    #[arg(long)]
    model_id: Option<String>,
    /// Address to listen on (`0.0.0.0` exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to listen on (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Threads per worker (default: all available cores divided among the workers).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Requests computed at once, each on its own session (and KV cache).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Requests that may wait for a worker; beyond that the server answers 429.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// KV-cache capacity per worker in tokens (prompt + reply) [default: 2048, or the
    /// model's context length if smaller].
    #[arg(long)]
    context: Option<usize>,
    /// The largest `max_tokens` a request may ask for (and chat's default).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// The largest request body in bytes (413 above).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// How the KV cache stores keys and values (as for `petrel run`).
    #[arg(long, default_value = "f16", value_parser = parse_kv_type)]
    kv_type: KvType,
}

fn serve(args: &ServeArgs) -> Result<()> {
    let model = petrel::Model::open(&args.model, &petrel::ModelParams::default())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.max(1);
    let model_id = args.model_id.clone().unwrap_or_else(|| match registry::known_model(&args.model) {
        Some(known) => known.name.to_string(),
        None => {
            Path::new(&args.model).file_stem().map_or_else(|| args.model.clone(), |s| s.to_string_lossy().into_owned())
        }
    });
    let config = petrel_server::ServeConfig {
        model_id,
        listen: std::net::SocketAddr::new(args.host, args.port),
        session: petrel::SessionParams {
            context: args.context.unwrap_or_else(|| model.context_length().min(2048)),
            threads: args.threads.unwrap_or((cores / workers).max(1)),
            kv_type: args.kv_type,
            ..petrel::SessionParams::default()
        },
        workers,
        queue: args.queue,
        max_tokens: args.max_tokens.max(1),
        max_body_bytes: args.max_body_bytes,
    };
    petrel_server::serve(&model, &config)?;
    Ok(())
}

/// `--kv-type`'s parser.
fn parse_kv_type(name: &str) -> Result<KvType, String> {
    KvType::parse(name).ok_or_else(|| {
        let names: Vec<&str> = KvType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown KV-cache type {name:?} (choose from {})", names.join(", "))
    })
}

impl GenerationArgs {
    fn sampler(&self, vocab_size: usize) -> Sampler {
        let config = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplerConfig::default()
        };
        Sampler::new(config, vocab_size)
    }

    fn session_options(&self, model: &Model<'_>) -> SessionOptions {
        let threads = self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let capacity = self.context.unwrap_or_else(|| model.config.context_length.min(2048));
        SessionOptions {
            capacity,
            threads,
            kv_prediction: self.kv_prediction,
            kv_type: self.kv_type,
            ..SessionOptions::default()
        }
    }
}

fn quantize(args: &petrel_models::quantize::QuantizeArgs) -> Result<()> {
    let started = Instant::now();
    let summary = petrel_models::quantize::run(args)?;
    let calibration = match summary.calib_tokens {
        0 => String::new(),
        n => format!(", GPTQ calibrated on {n} tokens"),
    };
    eprintln!(
        "wrote {} ({:.1} MB) in {:.1} s{calibration}",
        args.output.display(),
        summary.file_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pull { name } => pull(&name),
        Command::Run { generation, raw, token_ids, prompt } => run(&generation, raw, token_ids, &prompt),
        Command::Serve(args) => serve(&args),
        #[cfg(feature = "tract")]
        Command::Convert(args) => petrel_models::onnx_import::run(&args).map(|n| {
            eprintln!("wrote {} ({n} tensors)", args.output.display());
        }),
        Command::Chat { generation } => chat(&generation),
        Command::Inspect { file, full } => inspect(&file, full),
        Command::Tokenize { model, json, no_bos, special, inputs, text } => {
            tokenize(&model, json, no_bos, special, inputs.as_deref(), text.as_deref())
        }
        Command::Eval { command } => eval::run(command),
        Command::Quantize(args) => quantize(&args),
        Command::Train(args) => petrel_models::train::run(&args),
        Command::RouteFit(args) => petrel_models::route_fit::run(&args),
        Command::KvpFit(args) => petrel_models::kvp_fit::run(&args),
        Command::KvpTrain(args) => petrel_models::kvp_train::run(&args),
    };
    if let Err(e) = result {
        // A closed pipe (`petrel inspect … | head`) is a normal way to stop reading.
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn pull(name: &str) -> Result<()> {
    let Some(model) = registry::known_model(name) else {
        let names: Vec<&str> = registry::KNOWN_MODELS.iter().map(|m| m.name).collect();
        bail!("unknown model {name:?} (known: {})", names.join(", "));
    };
    let cached = registry::cached_path(model)?;
    if registry::verify(model, &cached).is_ok() {
        eprintln!("{} is already in the cache ({}), SHA-256 verified", model.name, cached.display());
        return Ok(());
    }
    registry::pull(model)?;
    Ok(())
}

/// The separator line between the cases of llama.cpp's tokenizer-suite files.
const SUITE_SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn tokenize(
    spec: &str,
    json: bool,
    no_bos: bool,
    special: bool,
    inputs: Option<&Path>,
    text: Option<&str>,
) -> Result<()> {
    let (path, file) = open(spec)?;
    let gguf = GgufFile::parse(file.bytes()).with_context(|| format!("cannot read {}", path.display()))?;
    let tokenizer =
        Tokenizer::from_gguf(&gguf).with_context(|| format!("cannot load the vocabulary of {}", path.display()))?;
    let mut stdout = std::io::stdout().lock();
    if let Some(inputs) = inputs {
        let suite = std::fs::read_to_string(inputs).with_context(|| format!("cannot read {}", inputs.display()))?;
        let body = suite.strip_suffix(SUITE_SEPARATOR).unwrap_or(&suite);
        for case in body.split(SUITE_SEPARATOR) {
            let ids = tokenizer.encode(case, special);
            let line: String = ids.iter().map(|id| format!(" {id}")).collect();
            writeln!(stdout, "{line}")?;
        }
        return Ok(());
    }
    let text = text.unwrap_or_default();
    let mut ids = Vec::new();
    if tokenizer.add_bos() && !no_bos {
        ids.push(tokenizer.bos());
    }
    ids.extend(tokenizer.encode(text, special));
    if json {
        let pieces: Vec<String> = ids
            .iter()
            .map(|&id| String::from_utf8_lossy(tokenizer.token_bytes(id).unwrap_or_default()).into_owned())
            .collect();
        writeln!(stdout, "{}", serde_json::json!({ "ids": ids, "pieces": pieces }))?;
    } else {
        let line: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", line.join(" "))?;
    }
    Ok(())
}

/// Opens a model file: the map, kept alive by the caller, and its parsed header.
fn open(spec: &str) -> Result<(PathBuf, MappedFile)> {
    let path = registry::resolve(spec)?;
    let file = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok((path, file))
}

/// Timings of one reply.
struct ReplyStats {
    prompt_tokens: usize,
    generated: usize,
    /// The reply's token ids.
    tokens: Vec<u32>,
    time_to_first_token: Duration,
    decode: Duration,
    /// The KV cache's type and bytes per token of context.
    kv: (KvType, usize),
}

impl ReplyStats {
    fn print(&self) {
        let rate = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
        let peak = stats::peak_memory_bytes().map_or_else(|| "unknown".into(), stats::format_bytes);
        eprintln!(
            "[TTFT {:.1} ms | prefill {} tok at {:.1} tok/s | decode {} tok at {:.1} tok/s | KV cache {} at {:.1} KiB/token | peak memory {peak}]",
            self.time_to_first_token.as_secs_f64() * 1e3,
            self.prompt_tokens,
            rate(self.prompt_tokens, self.time_to_first_token),
            self.generated,
            rate(self.generated.saturating_sub(1), self.decode),
            self.kv.0.name(),
            self.kv.1 as f64 / 1024.0,
        );
    }
}

/// Generates one reply to `tokens`, streaming text to stdout.
fn reply(
    session: &mut Session<'_, '_>,
    sampler: &mut Sampler,
    tokens: &[u32],
    max_tokens: usize,
) -> Result<ReplyStats> {
    let tokenizer = &session.model().tokenizer;
    let mut decoder = StreamDecoder::continuing();
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let mut first_token_at = None;
    let mut reply_tokens = Vec::with_capacity(max_tokens);
    let mut write_error = None;
    let stop = session.generate(tokens, sampler, max_tokens, |token| {
        first_token_at.get_or_insert_with(Instant::now);
        reply_tokens.push(token);
        let text = decoder.push(tokenizer, token);
        if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()) {
            write_error = Some(e);
            return false;
        }
        true
    });
    let end = Instant::now();
    let stop = stop?;
    if let Some(e) = write_error {
        return Err(e).context("cannot write to stdout");
    }
    writeln!(stdout)?;
    if stop == StopReason::ContextFull {
        eprintln!("(stopped: the context of {} tokens is full)", session.capacity());
    }
    let first = first_token_at.unwrap_or(end);
    Ok(ReplyStats {
        prompt_tokens: tokens.len(),
        generated: reply_tokens.len(),
        tokens: reply_tokens,
        time_to_first_token: first - start,
        decode: end - first,
        kv: (session.kv_type(), session.cache_bytes_per_token()),
    })
}

fn run(args: &GenerationArgs, raw: bool, token_ids: bool, prompt: &str) -> Result<()> {
    let (path, file) = open(&args.model)?;
    let model_error = || format!("cannot load the model {}", path.display());
    let gguf = GgufFile::parse(file.bytes()).with_context(model_error)?;
    let model = Model::load(&gguf).with_context(model_error)?;
    let text = if raw {
        prompt.to_string()
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(prompt));
        // The file's own template (`tokenizer.chat_template`), ChatML when it has none.
        model.tokenizer.render_chat(&messages, true).context("cannot render the model's chat template")?
    };
    let tokens = prompt_tokens(&model.tokenizer, &text, !raw);
    let options = args.session_options(&model);
    let backend = PreparedBackend::build(args.backend, &model, options.threads)?;
    let mut session = Session::with_backend(&model, options, backend.backend())?;
    if tokens.len() >= session.capacity() {
        bail!("the prompt has {} tokens but the context holds {} (raise --context)", tokens.len(), session.capacity());
    }
    let mut sampler = args.sampler(model.config.vocab_size);
    let predicted = session.predicts_prefill(&tokens);
    let stats = reply(&mut session, &mut sampler, &tokens, args.max_tokens)?;
    stats.print();
    if args.backend != BackendChoice::Native {
        eprintln!("[backend: {}, {} thread]", session.backend_name(), session.threads());
    }
    if token_ids {
        let line = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
        eprintln!("[prompt ids: {}]", line(&tokens));
        eprintln!("[generated ids: {}]", line(&stats.tokens));
    }
    print_prefill_mode(&model, predicted);
    print_routing(&session);
    Ok(())
}

/// The ids of a prompt: BOS first when the vocabulary asks for it
/// (`tokenizer.ggml.add_bos_token`) and the text does not already begin with it (chat
/// templates often write it themselves), then the text; special-token texts are parsed
/// when `special`.
fn prompt_tokens(tokenizer: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    let mut tokens = Vec::new();
    let encoded = tokenizer.encode(text, special);
    if tokenizer.add_bos() && encoded.first() != Some(&tokenizer.bos()) {
        tokens.push(tokenizer.bos());
    }
    tokens.extend(encoded);
    tokens
}

/// Says how the prompt was prefilled, beside the TTFT.
fn print_prefill_mode(model: &Model<'_>, predicted: bool) {
    match (&model.kv_predictor, predicted) {
        (Some(p), true) => eprintln!(
            "[prefill: KV prediction, auxiliary model of {} blocks for the base's {} ({} of weights beyond the base)]",
            p.aux.layers.len(),
            model.layers.len(),
            stats::format_bytes(p.extra_weight_bytes(model) as u64),
        ),
        (Some(_), false) => eprintln!("[prefill: base model (the file has a KV predictor; --kv-prediction uses it)]"),
        (None, _) => {}
    }
}

/// For a mixture-of-depths model: the share of tokens its routed blocks processed and the
/// KV-cache bytes in use against a dense model's.
fn print_routing(session: &Session<'_, '_>) {
    let model = session.model();
    let Some(routing) = &model.routing else {
        return;
    };
    let routed: Vec<usize> = routing.routed_layers().collect();
    let visits: usize = routed.iter().map(|&l| session.tokens_through(l)).sum();
    let share = visits as f64 / (routed.len() * session.position()).max(1) as f64;
    let dense_kv = session.position() * model.config.layers * 2 * model.config.kv_dim() * 4;
    eprintln!(
        "[mixture of depths: blocks {routed:?} at capacity {}; they processed {:.1}% of the tokens | KV cache {} of a dense model's {}]",
        routing.capacity,
        100.0 * share,
        stats::format_bytes(session.cache_bytes_in_use() as u64),
        stats::format_bytes(dense_kv as u64),
    );
}

fn chat(args: &GenerationArgs) -> Result<()> {
    let (path, file) = open(&args.model)?;
    let model_error = || format!("cannot load the model {}", path.display());
    let gguf = GgufFile::parse(file.bytes()).with_context(model_error)?;
    let model = Model::load(&gguf).with_context(model_error)?;
    let options = args.session_options(&model);
    let backend = PreparedBackend::build(args.backend, &model, options.threads)?;
    let mut session = Session::with_backend(&model, options, backend.backend())?;
    let mut sampler = args.sampler(model.config.vocab_size);
    eprintln!(
        "petrel chat — {} ({} tokens of context). Type a message; /reset clears the history, /quit or Ctrl-D ends.",
        path.display(),
        session.capacity()
    );
    // Every turn renders the whole conversation with the file's template (ChatML when it
    // has none) and feeds only what the cache does not hold yet: the tokens after the
    // longest common prefix of the new prompt and the tokens already fed. Templates differ
    // in how they close a turn, so nothing about them is assumed.
    let template = model.tokenizer.compile_chat_template().transpose().context("cannot compile the chat template")?;
    let render = |messages: &[ChatMessage]| -> Result<String> {
        let options = model.tokenizer.render_options(true);
        match &template {
            Some(t) => t.render(messages, &options).context("cannot render the chat template"),
            None => Ok(format_chat(messages, true)),
        }
    };
    let fresh_history = || args.system.iter().map(|s| ChatMessage::system(s.clone())).collect::<Vec<_>>();
    let mut history = fresh_history();
    let mut fed: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                session.reset();
                history = fresh_history();
                fed.clear();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::user(line));
        let prompt = match render(&history) {
            Ok(p) => prompt_tokens(&model.tokenizer, &p, true),
            Err(e) => {
                history.pop();
                eprintln!("error: {e:#}");
                continue;
            }
        };
        let common = prompt.iter().zip(&fed).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        if prompt.len() + 1 > session.capacity() {
            history.pop();
            eprintln!("(the conversation no longer fits the context; use /reset)");
            continue;
        }
        session.truncate(common);
        fed.truncate(common);
        let start = session.position();
        match reply(&mut session, &mut sampler, &prompt[common..], args.max_tokens) {
            Ok(stats) => {
                stats.print();
                fed.extend_from_slice(&prompt[common..]);
                fed.extend_from_slice(&stats.tokens);
                // The last sampled token (often end-of-turn) was not fed back.
                fed.truncate(session.position());
                let said: Vec<u32> =
                    stats.tokens.iter().copied().filter(|&t| !model.tokenizer.is_end_of_generation(t)).collect();
                history.push(ChatMessage::assistant(model.tokenizer.decode(&said).trim()));
            }
            Err(e) => {
                session.truncate(start);
                fed.truncate(start);
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

fn inspect(path: &Path, full: bool) -> Result<()> {
    let file = MappedFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let gguf = GgufFile::parse(file.bytes()).with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "{}: GGUF v{}, {} bytes, alignment {}, data at byte {}",
        path.display(),
        gguf.version,
        file.bytes().len(),
        gguf.alignment,
        gguf.data_offset
    )?;
    writeln!(out, "\nmetadata ({} keys):", gguf.metadata().len())?;
    for (key, value) in gguf.metadata() {
        writeln!(out, "  {key} = {}", describe(value, full))?;
    }
    writeln!(out, "\ntensors ({}):", gguf.tensors().len())?;
    writeln!(out, "  {:<32} {:>6} {:>18} {:>12} {:>12}", "name", "type", "shape", "bytes", "offset")?;
    let mut total = 0usize;
    for t in gguf.tensors() {
        let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
        writeln!(
            out,
            "  {:<32} {:>6} {:>18} {:>12} {:>12}",
            t.name,
            t.ty.name(),
            shape.join("×"),
            t.data.len(),
            t.offset
        )?;
        total += t.data.len();
    }
    writeln!(out, "  total tensor bytes: {total}")?;
    out.flush()?;
    Ok(())
}

fn describe(value: &Value<'_>, full: bool) -> String {
    match value {
        Value::String(s) if !full && s.len() > 120 => {
            format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(120)], s.len())
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => {
            let shown = if full { a.len() } else { a.len().min(8) };
            let items: Vec<String> = a.iter().take(shown).map(|v| describe(&v, full)).collect();
            let more = if shown < a.len() { format!(", … ({} total)", a.len()) } else { String::new() };
            format!("[{}{more}]", items.join(", "))
        }
        Value::U8(v) => v.to_string(),
        Value::I8(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
        Value::F32(v) => v.to_string(),
        Value::F64(v) => v.to_string(),
        Value::Bool(v) => v.to_string(),
    }
}
