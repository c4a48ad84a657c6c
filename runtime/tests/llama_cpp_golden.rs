//! SmolLM2-135M (Q4_1), Gemma-3-270M and Qwen2.5-Coder-0.5B (Q4_K_M) against llama.cpp's
//! golden outputs (`testdata/llama_cpp/golden*.json`, written by `scripts/make_golden.py
//! --preset NAME` with llama-cpp-python and `logits_all=True`).
//!
//! For five fixed prompts (English, code, digits and whitespace runs, non-ASCII with
//! emoji, a chat turn) this checks:
//! 1. token ids identical to llama.cpp's tokenizer;
//! 2. at every prompt position (and at every step of llama.cpp's greedy continuation,
//!    teacher-forced), the same top-1 token and logits within [`LOGIT_TOLERANCE`] on
//!    llama.cpp's top 64 tokens; every other token must stay below llama.cpp's 64th logit
//!    plus the tolerance, which bounds the max-abs difference over the whole vocabulary
//!    where it matters;
//! 3. our own greedy continuation of 32 tokens identical to llama.cpp's — or, where they
//!    part, the two candidates within [`LOGIT_TOLERANCE`] of each other in llama.cpp's
//!    logits (a near-tie, printed with its margin).
//!
//! Why 2.5 logits and 0.25 for a near-tie: two correct W4A8 engines do not agree bit for
//! bit. Both quantize activations to 8-bit blocks with f16 scales, but llama.cpp keeps the
//! KV cache and Q·K products in f16 (Petrel in f32), folds Q4_1's minimum through an f16
//! block sum, and sums in another order; 30 layers amplify those differences. Measured here
//! over 357 positions: median 0.40, 95th percentile 0.72, maximum 2.02 (an early position
//! of the non-ASCII prompt). candle-transformers, a third engine we did not write, is as far
//! from llama.cpp (`models/tests/candle_quantized_llama.rs` prints both: 0.19–0.55 for
//! candle, 0.15–0.56 for Petrel at the same positions). Where the top-1 tokens differ
//! (8 of 357 positions), llama.cpp's own margin between the two was at most 0.19 logits. A real bug — a wrong
//! RoPE pairing, norm, head grouping or block layout — shifts logits by several units and
//! changes the top-1 token at most positions.

use std::path::PathBuf;

use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::argmax;
use petrel_runtime::{Model, Session, SessionOptions};
use serde_json::Value;

/// Largest |Δlogit| allowed on llama.cpp's top 64 tokens at any position.
const LOGIT_TOLERANCE: f32 = 2.5;
/// Largest gap, in llama.cpp's own logits, between its top-1 token and ours at a position
/// where they differ, for the difference to count as a near-tie.
const NEAR_TIE_MARGIN: f32 = 0.25;
const GOLDEN: &str = include_str!("../../testdata/llama_cpp/golden.json");

// Diagnostics: `PETREL_GOLDEN_VERBOSE=1` prints every position's difference;
// `PETREL_GOLDEN_NO_ASSERT=1` prints them without failing (to study a change's effect).

fn model_path(file_name: &str, pull_name: &str) -> PathBuf {
    let home = std::env::var_os("PETREL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/petrel"));
    let path = home.join(file_name);
    assert!(path.exists(), "{} is missing: run `petrel pull {pull_name}` first", path.display());
    path
}

/// `[[id, logit], …]`, best first.
fn top_list(v: &Value) -> Vec<(u32, f32)> {
    v.as_array()
        .expect("top list")
        .iter()
        .map(|pair| (pair[0].as_u64().expect("id") as u32, pair[1].as_f64().expect("logit") as f32))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Compares our logits with llama.cpp's top 64 at one position; returns the max-abs
/// difference over those 64 tokens.
fn compare_position(ours: &[f32], theirs: &[(u32, f32)], what: &str, tolerance: Tolerance) -> f32 {
    if std::env::var_os("PETREL_GOLDEN_NO_ASSERT").is_some() {
        let d = theirs.iter().map(|&(id, l)| (ours[id as usize] - l).abs()).fold(0.0, f32::max);
        println!(
            "{what}: max |Δlogit| {d:.4}, llama.cpp top {:.3} ({}), ours top {}",
            theirs[0].1,
            theirs[0].0,
            argmax(ours)
        );
        return d;
    }
    let mut max_diff = 0f32;
    for &(id, logit) in theirs {
        max_diff = max_diff.max((ours[id as usize] - logit).abs());
    }
    if std::env::var_os("PETREL_GOLDEN_VERBOSE").is_some() {
        println!("{what}: max |Δlogit| {max_diff:.4}, llama.cpp top logit {:.3}", theirs[0].1);
    }
    assert!(max_diff <= tolerance.logits, "{what}: max |Δlogit| over llama.cpp's top 64 is {max_diff}");
    let floor = theirs.last().expect("non-empty").1;
    for (id, &l) in ours.iter().enumerate() {
        if !theirs.iter().any(|&(t, _)| t as usize == id) {
            assert!(l <= floor + tolerance.logits, "{what}: token {id} has logit {l}, llama.cpp's 64th is {floor}");
        }
    }
    let (ours_top, theirs_top) = (argmax(ours), theirs[0].0);
    if ours_top != theirs_top {
        let theirs_of_ours = theirs.iter().find(|&&(t, _)| t == ours_top).map(|&(_, l)| l);
        let margin = theirs_of_ours.map(|l| theirs[0].1 - l);
        println!("{what}: top-1 differs (ours {ours_top}, llama.cpp {theirs_top}); llama.cpp margin {margin:?}");
        assert!(margin.is_some_and(|m| m <= tolerance.near_tie), "{what}: top-1 differs beyond a near-tie");
    }
    max_diff
}

/// How far two correct engines may part on one model (see the module docs and each test).
#[derive(Clone, Copy)]
struct Tolerance {
    /// Largest |Δlogit| on llama.cpp's top 64 tokens at any position.
    logits: f32,
    /// Largest gap in llama.cpp's logits between its top-1 and ours for a near-tie.
    near_tie: f32,
}

#[test]
fn smollm2_logits_and_greedy_continuations_match_llama_cpp() {
    let tolerance = Tolerance { logits: LOGIT_TOLERANCE, near_tie: NEAR_TIE_MARGIN };
    check_against_golden(GOLDEN, "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m", tolerance);
}

/// Runs every prompt of a golden file through the model and compares (module docs).
fn check_against_golden(golden: &str, file_name: &str, pull_name: &str, tolerance: Tolerance) {
    let file = MappedFile::open(model_path(file_name, pull_name)).expect("model maps");
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&gguf).expect("model loads");
    let golden: Value = serde_json::from_str(golden).expect("golden JSON");
    let add_bos = golden["metadata"]["add_bos"].as_bool().unwrap_or(false);
    assert_eq!(model.tokenizer.add_bos(), add_bos, "add_bos differs from llama.cpp's");
    let vocab = model.config.vocab_size;
    let mut overall = 0f32;
    for prompt in golden["prompts"].as_array().expect("prompts") {
        let name = prompt["name"].as_str().expect("name");
        let text = prompt["text"].as_str().expect("text");
        let tokens = ids(&prompt["tokens"]);
        let generated = ids(&prompt["generated"]);
        let mut ours = Vec::new();
        if add_bos {
            ours.push(model.tokenizer.bos());
        }
        ours.extend(model.tokenizer.encode(text, true));
        assert_eq!(ours, tokens, "{name}: token ids differ from llama.cpp");

        // Teacher-forced: prompt + llama.cpp's greedy tokens, logits at every position.
        let all: Vec<u32> = tokens.iter().chain(&generated).copied().collect();
        let options = SessionOptions { capacity: all.len() + 1, threads: 2, ..SessionOptions::default() };
        let mut session = Session::new(&model, options.clone()).expect("session");
        let mut logits = vec![0f32; all.len() * vocab];
        session.prefill_all_logits(&all, &mut logits).expect("prefill");
        let mut worst = 0f32;
        let reference = prompt["prompt_top"].as_array().expect("prompt_top").iter().chain(
            // generated_top[k] follows generated[k]; the last one has no next token to check.
            prompt["generated_top"].as_array().expect("generated_top").iter(),
        );
        for (position, top) in reference.enumerate().take(all.len()) {
            let ours = &logits[position * vocab..(position + 1) * vocab];
            let what = format!("{name} position {position}");
            worst = worst.max(compare_position(ours, &top_list(top), &what, tolerance));
        }

        // Free-running greedy continuation.
        let mut session = Session::new(&model, options).expect("session");
        let mut next = argmax(session.prefill(&tokens).expect("prefill"));
        let mut ours = Vec::new();
        for _ in 0..generated.len() {
            ours.push(next);
            next = argmax(session.step(*ours.last().expect("one token")).expect("step"));
        }
        if let Some(k) = ours.iter().zip(&generated).position(|(a, b)| a != b) {
            let step_top =
                if k == 0 { &prompt["prompt_top"][tokens.len() - 1] } else { &prompt["generated_top"][k - 1] };
            let top = top_list(step_top);
            let theirs_of_ours = top.iter().find(|&&(t, _)| t == ours[k]).map(|&(_, l)| l);
            let margin = theirs_of_ours.map(|l| top[0].1 - l);
            println!(
                "{name}: greedy parts at step {k} (ours {}, llama.cpp {}): llama.cpp margin {margin:?}",
                ours[k], generated[k]
            );
            assert!(
                margin.is_some_and(|m| m <= tolerance.near_tie),
                "{name}: greedy continuation parts without a near-tie"
            );
        } else {
            println!("{name}: greedy continuation of {} tokens identical", generated.len());
        }
        println!("{name}: {} positions, max |Δlogit| on llama.cpp's top 64 = {worst:.4}", all.len());
        overall = overall.max(worst);
    }
    println!("overall max |Δlogit| = {overall:.4} (tolerance {})", tolerance.logits);
}

/// Gemma-3-270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0) against llama.cpp (see
/// [`GEMMA3_TOLERANCE`]).
#[test]
fn gemma3_logits_and_greedy_continuations_match_llama_cpp() {
    check_against_golden(GEMMA3_GOLDEN, "gemma-3-270m-q4_k_m.gguf", "gemma3-270m", GEMMA3_TOLERANCE);
}

/// Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) against llama.cpp (see [`QWEN2_TOLERANCE`]).
#[test]
fn qwen2_logits_and_greedy_continuations_match_llama_cpp() {
    check_against_golden(
        QWEN2_GOLDEN,
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-0.5b",
        QWEN2_TOLERANCE,
    );
}

const GEMMA3_GOLDEN: &str = include_str!("../../testdata/llama_cpp/golden-gemma3-270m.json");
const QWEN2_GOLDEN: &str = include_str!("../../testdata/llama_cpp/golden-qwen2.5-coder-0.5b.json");
/// Measured over Gemma's 357 positions: median 0.55, 95th percentile 1.39, maximum 2.91
/// (the chat prompt). Gemma's logits span −64…31 over 262,144 tokens, and besides the
/// differences named in the module docs llama.cpp quantizes the activations of its K-quant
/// matrices per 256 values with an f32 scale (Q8_K) where Petrel keeps 8-bit blocks of 32,
/// and computes GELU from an f16 table; 18 blocks with pre- and post-norms amplify that.
/// Where the top-1 tokens differ (11 positions) llama.cpp's own margin is at most 0.26:
/// the near-tie bound is 0.3 here (0.25 for the other models), raised when the vectorized
/// GELU — within 2·10⁻⁶ of libm's, where llama.cpp reads GELU from an f16 table — moved one
/// position's top-1 to a token llama.cpp ranks 0.26 below its own.
const GEMMA3_TOLERANCE: Tolerance = Tolerance { logits: 3.5, near_tie: 0.3 };
/// Measured over Qwen's 373 positions: maximum 0.49 (the non-ASCII prompt); the SmolLM2
/// tolerance holds with a wide margin.
const QWEN2_TOLERANCE: Tolerance = Tolerance { logits: 2.5, near_tie: 0.25 };

/// The K-quant models' prefill logits are the same, bit for bit, on every kernel set this
/// CPU runs: the scalar reference, the four-token block dot products of each SIMD set, and
/// (with AVX-512 VNNI) the panel kernel that batches of 12 tokens or more take, on
/// `vpdpbusd` and (where the CPU has it) on AMX tiles.
#[test]
fn k_quant_prefill_is_bit_identical_on_every_kernel_set() {
    use petrel_quant::dot::Isa;
    use petrel_quant::Kernels;
    for (file_name, pull_name) in
        [("gemma-3-270m-q4_k_m.gguf", "gemma3-270m"), ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b")]
    {
        let file = MappedFile::open(model_path(file_name, pull_name)).expect("model maps");
        let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
        let model = Model::load(&gguf).expect("model loads");
        let tokens = model.tokenizer.encode("def reverse(s):\n    return s[::-1]  # 16 tokens or so, enough", true);
        assert!(tokens.len() >= 12, "{file_name}: the prompt must reach the panel kernel's batch size");
        let logits = |kernels: Kernels, amx: bool| {
            let options = SessionOptions {
                capacity: tokens.len() + 1,
                threads: 2,
                kernels: Some(kernels),
                amx,
                ..SessionOptions::default()
            };
            let mut session = Session::new(&model, options).expect("session");
            let mut out = vec![0f32; tokens.len() * model.config.vocab_size];
            session.prefill_all_logits(&tokens, &mut out).expect("prefill");
            out
        };
        let reference = logits(Kernels::scalar(), false);
        let amx = petrel_quant::gemm::PanelGemm::amx().is_some();
        for isa in Isa::ALL.into_iter().skip(1) {
            let Some(kernels) = Kernels::for_isa(isa) else { continue };
            let with_amx = if isa == Isa::Avx512Vnni && amx { &[false, true][..] } else { &[false][..] };
            for &amx in with_amx {
                let got = logits(kernels, amx);
                let name = if amx { "amx-int8" } else { isa.name() };
                let same = got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{file_name}: {name} prefill differs from the scalar reference");
                println!("{file_name}: {name} prefill of {} tokens bit-identical to scalar", tokens.len());
            }
        }
    }
}
