//! The tokenizers of Gemma-3 (SentencePiece with byte fallback) and Qwen2.5 (byte-level
//! BPE, `qwen2` pre-tokenizer) against llama.cpp on the real model files' vocabularies.
//!
//! Needs the model files in `$PETREL_HOME` (default `~/.cache/petrel`):
//! `gemma-3-270m-q4_k_m.gguf` and `qwen2.5-coder-0.5b-instruct-q4_k_m.gguf` (only their
//! metadata is read; the files are memory-mapped), and the golden files
//! `testdata/llama_cpp/tokens_gemma3.json` / `tokens_qwen25.json`, written by
//! `scripts/make_golden_tokens.py --all` with llama-cpp-python: ids from
//! `tokenize(text, add_bos = <the model's add_bos>, special = True)`, text from
//! `llama_detokenize(ids, remove_special = False, unparse_special = True)`, and the
//! vocabulary's BOS, EOS, add_bos and end-of-generation ids.

use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::tokenizer::{StreamDecoder, Tokenizer, TokenizerKind};
use serde_json::Value;
use std::path::PathBuf;

fn petrel_home() -> PathBuf {
    match std::env::var_os("PETREL_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/petrel"),
    }
}

fn load(model_file: &str) -> Tokenizer {
    let path = petrel_home().join(model_file);
    let file = MappedFile::open(&path).unwrap_or_else(|e| {
        panic!("cannot open {} ({e}): download it into $PETREL_HOME (CI does this before the tests)", path.display())
    });
    let gguf = GgufFile::parse(file.bytes()).expect("the model file parses");
    Tokenizer::from_gguf(&gguf).expect("the model's tokenizer loads")
}

fn golden(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/llama_cpp").join(name);
    let json = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): run scripts/make_golden_tokens.py --all", path.display()));
    serde_json::from_str(&json).expect("golden file is JSON")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids are a list")
        .iter()
        .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()).expect("ids are u32"))
        .collect()
}

/// Compares the vocabulary's special ids with llama.cpp's (the golden file's metadata).
fn check_special_ids(t: &Tokenizer, meta: &Value) {
    assert_eq!(Some(t.add_bos()), meta["add_bos"].as_bool(), "add_bos");
    assert_eq!(Some(t.add_eos()), meta["add_eos"].as_bool(), "add_eos");
    assert_eq!(Some(u64::from(t.bos())), meta["bos"].as_u64(), "bos");
    assert_eq!(Some(u64::from(t.eos())), meta["eos"].as_u64(), "eos");
    assert_eq!(Some(u64::from(t.vocab_size())), meta["n_tokens"].as_u64(), "vocabulary size");
    assert_eq!(t.end_of_generation_ids(), ids_of(&meta["eog"]), "end-of-generation ids");
    // llama.cpp picks its EOT from a hash map when several texts qualify; ours must be
    // one of the end-of-generation ids either way.
    if let Some(eot) = t.eot() {
        assert!(t.is_end_of_generation(eot));
    }
    println!("eot: petrel {:?}, llama.cpp {}; eog {:?}", t.eot(), meta["eot"], t.end_of_generation_ids());
}

/// Compares Petrel with the golden file: ids (with BOS as the model's metadata says),
/// decode, streamed decode and the vocabulary's special ids.
fn check(model_file: &str, golden_file: &str, kind: TokenizerKind) {
    let t = load(model_file);
    let g = golden(golden_file);
    let meta = &g["metadata"];
    check_special_ids(&t, meta);
    assert_eq!(meta["model_file"].as_str(), Some(model_file));
    assert_eq!(t.kind(), kind);

    let cases = g["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let expected = ids_of(&case["ids"]);
        let detok = case["detok"].as_str().expect("detok");
        let mut ours = Vec::new();
        if t.add_bos() {
            ours.push(t.bos());
        }
        t.encode_into(text, true, &mut ours);
        if ours != expected {
            failures.push(format!("encode {text:?}:\n  llama.cpp {expected:?}\n  petrel    {ours:?}"));
        }
        let decoded = t.decode(&expected);
        if decoded != detok {
            failures.push(format!("decode {expected:?}:\n  llama.cpp {detok:?}\n  petrel    {decoded:?}"));
        }
        let mut stream = StreamDecoder::new();
        let mut streamed: String = expected.iter().map(|&id| stream.push(&t, id).to_string()).collect();
        streamed.push_str(stream.finish());
        if streamed != decoded {
            failures.push(format!("stream {expected:?}: {streamed:?} != {decoded:?}"));
        }
    }
    println!(
        "{model_file}: {} of {} cases match llama.cpp",
        cases.len() - failures.len().min(cases.len()),
        cases.len()
    );
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn gemma3_matches_llama_cpp() {
    check("gemma-3-270m-q4_k_m.gguf", "tokens_gemma3.json", TokenizerKind::SentencePiece);
}

#[test]
fn qwen25_matches_llama_cpp() {
    check("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "tokens_qwen25.json", TokenizerKind::ByteLevelBpe);
}

/// SmolLM2's end-of-generation set and special ids, as llama.cpp derives them (its cases
/// are checked by `tokenizer_llama_cpp.rs`).
#[test]
fn smollm2_special_ids_match_llama_cpp() {
    let t = load("SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = golden("tokens.json");
    check_special_ids(&t, &g["metadata"]);
    assert!(t.is_end_of_generation(2) && t.is_end_of_generation(0) && !t.is_end_of_generation(1));
}

/// Long inputs stay fast and round-trip on both vocabularies.
#[test]
fn long_texts_round_trip_quickly() {
    let paragraph =
        "The quick brown fox jumps over the lazy dog; it's 12:30 — café, naïve, 日本語, 🚀!\n\tfn main() {}\n";
    let text = paragraph.repeat(300);
    for model in ["gemma-3-270m-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"] {
        let start = std::time::Instant::now();
        let t = load(model);
        println!("{model}: tokenizer loaded in {:?}", start.elapsed());
        for parse_special in [false, true] {
            let start = std::time::Instant::now();
            let ids = t.encode(&text, parse_special);
            let elapsed = start.elapsed();
            println!(
                "{model}: {} bytes -> {} tokens in {elapsed:?} (parse_special {parse_special})",
                text.len(),
                ids.len()
            );
            assert!(ids.len() > 5_000);
            assert_eq!(t.decode(&ids), text);
            assert!(elapsed.as_secs_f64() < 2.0, "{model}: encoding took {elapsed:?}");
        }
    }
}
