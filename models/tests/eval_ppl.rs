//! `petrel eval ppl` end to end on SmolLM2 (from the cache, as the other model tests): the
//! JSON report is consistent with the text, and bad input is a clear error, not a panic.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{assert_error, model_path};

fn petrel_eval(model: &Path, text: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["eval", "ppl", "--threads", "2", "--model"])
        .arg(model)
        .arg("--text")
        .arg(text)
        .args(extra)
        .output()
        .expect("petrel runs")
}

#[test]
fn perplexity_report_is_consistent() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.").unwrap();
    let json = dir.path().join("out.json");
    let output = petrel_eval(&model, &text, &["--window", "32", "--stride", "8", "--json", json.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("perplexity: "), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let ppl = report["perplexity"].as_f64().unwrap();
    // A fluent English sentence: far better than uniform over 49,152 tokens.
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 1000.0, "{report}");
    let tokens = report["tokens_in_text"].as_u64().unwrap();
    assert!(tokens > 40);
    assert_eq!(report["tokens_scored"].as_u64(), Some(tokens - 1), "{report}");
    assert_eq!((report["window"].as_u64(), report["stride"].as_u64()), (Some(32), Some(8)));
    assert!((report["mean_nll"].as_f64().unwrap().exp() - ppl).abs() < 1e-9 * ppl);

    // --max-tokens cuts the text; the scored count follows.
    let output =
        petrel_eval(&model, &text, &["--window", "32", "--max-tokens", "20", "--json", json.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["tokens_scored"].as_u64(), Some(19), "{report}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.txt");
    assert_error(&petrel_eval(&model, &missing, &[]), "cannot read the text file");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, " \n").unwrap();
    assert_error(&petrel_eval(&model, &empty, &[]), "is empty");

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Hello there, this is a short text.").unwrap();
    assert_error(&petrel_eval(&model, &short, &["--window", "100000"]), "exceeds the model's context length");
    assert_error(&petrel_eval(&model, &short, &["--window", "16", "--stride", "17"]), "--stride must be between");
    assert_error(&petrel_eval(&model, &short, &["--window", "16", "--llama-cpp"]), "needs at least 2 × window");
    assert_error(&petrel_eval(&model, &short, &["--max-tokens", "1"]), "at least 2 are needed");

    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [b'a', 0xff, b'b']).unwrap();
    assert_error(&petrel_eval(&model, &binary, &[]), "is not UTF-8");
}
