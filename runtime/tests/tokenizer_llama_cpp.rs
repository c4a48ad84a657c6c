//! The tokenizer against llama.cpp on SmolLM2-135M-Instruct's own vocabulary.
//!
//! Needs the model file in `$PETREL_HOME` (default `~/.cache/petrel`), fetched with
//! `petrel pull smollm2-135m`, and `testdata/llama_cpp/tokens.json`, written by
//! `scripts/make_golden_tokens.py` with llama-cpp-python
//! (`tokenize(text, add_bos=False, special=True)`, detokenized with special tokens shown).

use petrel_runtime::gguf::GgufFile;
use petrel_runtime::tokenizer::{format_chat, ChatMessage, StreamDecoder, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let home = match std::env::var_os("PETREL_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/petrel"),
    };
    home.join(MODEL_FILE)
}

fn with_tokenizer(check: impl FnOnce(&Tokenizer)) {
    let path = model_path();
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): run `petrel pull smollm2-135m` first", path.display()));
    let file = GgufFile::parse(&bytes).expect("the model file parses");
    let tokenizer = Tokenizer::from_gguf(&file).expect("the model's tokenizer loads");
    check(&tokenizer);
}

#[test]
fn chat_prompt_matches_llama_cpp() {
    with_tokenizer(|t| {
        let prompt = format_chat(&[ChatMessage::user("What is the capital of France?")], true);
        assert_eq!(prompt, "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n");
        let ids = t.encode(&prompt, true);
        assert_eq!(ids, [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]);
        assert_eq!(t.decode(&ids), prompt);
        assert_eq!((t.bos(), t.eos(), t.vocab_size(), t.add_bos()), (1, 2, 49152, false));
        assert!(t.is_end_of_generation(2) && t.is_end_of_generation(0) && !t.is_end_of_generation(1));
        assert_eq!(t.token_id("<|im_end|>"), Some(2));
    });
}

/// The golden cases: `{"text", "ids", "detok"?}` objects, in a top-level list or in the
/// first list-valued field of a top-level object (`"cases"`).
fn golden_cases() -> Vec<(String, Vec<u32>, Option<String>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/llama_cpp/tokens.json");
    let json = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): run scripts/make_golden_tokens.py", path.display()));
    let root: Value = serde_json::from_str(&json).expect("tokens.json is JSON");
    let list = match &root {
        Value::Array(list) => list,
        Value::Object(map) => map
            .get("cases")
            .and_then(Value::as_array)
            .or_else(|| map.values().find_map(Value::as_array))
            .expect("tokens.json holds a list of cases"),
        _ => panic!("tokens.json should be a list or an object"),
    };
    list.iter()
        .map(|case| {
            let text = case["text"].as_str().expect("case has a text").to_string();
            let ids = case["ids"]
                .as_array()
                .expect("case has ids")
                .iter()
                .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()).expect("ids are u32"))
                .collect();
            let detok = case.get("detok").and_then(Value::as_str).map(str::to_string);
            (text, ids, detok)
        })
        .collect()
}

#[test]
fn golden_strings_match_llama_cpp() {
    let cases = golden_cases();
    assert!(!cases.is_empty(), "tokens.json has no cases");
    with_tokenizer(|t| {
        let mut failures = Vec::new();
        let mut matching = 0;
        for (text, ids, detok) in &cases {
            let failures_before = failures.len();
            let ours = t.encode(text, true);
            if &ours != ids {
                failures.push(format!("encode {text:?}:\n  llama.cpp {ids:?}\n  petrel    {ours:?}"));
            }
            let expected = detok.as_deref().unwrap_or(text);
            let decoded = t.decode(ids);
            if decoded != expected {
                failures.push(format!("decode {ids:?}:\n  llama.cpp {expected:?}\n  petrel    {decoded:?}"));
            }
            let mut stream = StreamDecoder::new();
            let mut streamed: String = ids.iter().map(|&id| stream.push(t, id).to_string()).collect();
            streamed.push_str(stream.finish());
            if streamed != decoded {
                failures.push(format!("stream {ids:?}: {streamed:?} != {decoded:?}"));
            }
            matching += usize::from(failures.len() == failures_before);
        }
        println!("{matching} of {} llama.cpp strings match (encode, decode and stream)", cases.len());
        assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    });
}

/// tokens.json is encoded with special tokens parsed; these were taken from llama-cpp-python
/// with `tokenize(text.encode(), add_bos=False, special=False)`.
#[test]
fn unparsed_special_tokens_match_llama_cpp() {
    let cases: [(&str, &[u32]); 3] = [
        (
            "<|im_start|>user\nHi<|im_end|>",
            &[44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 44, 108, 306, 79, 486, 108, 46],
        ),
        ("a <|endoftext|>b", &[81, 2067, 108, 486, 1714, 2692, 108, 46, 82]),
        (" \u{3000}\u{3000}x  \n\n 7", &[216, 12109, 218, 12109, 218, 104, 256, 8866, 39]),
    ];
    with_tokenizer(|t| {
        for (text, ids) in cases {
            assert_eq!(t.encode(text, false), ids, "{text:?}");
            assert_eq!(t.decode(ids), text);
        }
    });
}

#[test]
fn long_text_round_trips() {
    with_tokenizer(|t| {
        let paragraph = "The quick brown fox jumps over the lazy dog; it's 12:30 — café, naïve, 日本語, 🚀!\n";
        let text = paragraph.repeat(400);
        let ids = t.encode(&text, false);
        assert!(ids.len() > 10_000, "{} tokens", ids.len());
        assert_eq!(t.decode(&ids), text);
    });
}
