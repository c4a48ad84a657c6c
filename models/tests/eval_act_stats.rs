//! `petrel eval act-stats` end to end on SmolLM2 (from the cache, as the other model
//! tests): the table and the JSON report agree with the text, and bad input is a clear
//! error, not a panic.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{assert_error, model_path};

fn act_stats(model: &Path, text: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["eval", "act-stats", "--threads", "2", "--model"])
        .arg(model)
        .arg("--text")
        .arg(text)
        .args(extra)
        .output()
        .expect("petrel runs")
}

#[test]
fn act_stats_report_is_consistent() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.").unwrap();
    let json = dir.path().join("out.json");
    let output = act_stats(&model, &text, &["--window", "16", "--max-tokens", "40", "--json", json.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("| layer | site | kurtosis | max channel | median channel | max/median |"), "{stdout}");
    assert!(stdout.contains("| 29 | down_in |"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((report["tokens"].as_u64(), report["windows"].as_u64()), (Some(40), Some(3)), "{report}");
    let sites = report["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 30 * 4);
    for s in sites {
        assert_eq!(s["tokens"].as_u64(), Some(40), "{s}");
        let (k, ratio) = (s["mean_kurtosis"].as_f64().unwrap(), s["ratio"].as_f64().unwrap());
        assert!(k >= 1.0 && ratio >= 1.0, "{s}");
        let (max, median) = (s["max_channel"].as_f64().unwrap(), s["median_channel"].as_f64().unwrap());
        assert!((max / median - ratio).abs() <= 1e-12 * ratio, "{s}");
    }
    let summary = report["summary"].as_array().unwrap();
    let names: Vec<&str> = summary.iter().map(|s| s["site"].as_str().unwrap()).collect();
    assert_eq!(names, ["attn_in", "attn_out", "mlp_in", "down_in"]);
    assert!(summary.iter().all(|s| s["layers"].as_u64() == Some(30)));
}

#[test]
fn act_stats_bad_input_is_a_clear_error() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.txt");
    assert_error(&act_stats(&model, &missing, &[]), "cannot read the text file");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Hello there, this is a short text.").unwrap();
    assert_error(&act_stats(&model, &short, &["--window", "100000"]), "exceeds the model's context length");
    assert_error(&act_stats(&model, &short, &["--window", "0"]), "--window must be at least 1");
    assert_error(&act_stats(&model, &short, &["--max-tokens", "0"]), "--max-tokens must be at least 1");
}
