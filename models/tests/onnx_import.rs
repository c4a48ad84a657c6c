//! `petrel convert` on the committed ONNX fixture (`testdata/onnx/`, made by
//! `scripts/make_onnx_fixture.py`: a 2-block Llama exported by `torch.onnx.export`), against
//! onnxruntime's logits for the same input (`tiny-llama.expected.json`, written by the same
//! script), on every backend (native, candle, tract). Both sides compute in f32, so they must
//! agree to float rounding; a wrong RoPE permutation, head grouping or tied head moves
//! logits by far more than the tolerance.
#![cfg(feature = "tract")]

use std::path::PathBuf;
use std::process::Command;

use petrel_runtime::backend::candle::{CandleBackend, Device};
use petrel_runtime::backend::native::NativeBackend;
use petrel_runtime::backend::tract::TractBackend;
use petrel_runtime::backend::Backend;
use petrel_runtime::{GgufFile, Model, Session, SessionOptions};
use serde_json::Value;

/// Largest |Δlogit| against onnxruntime (measured: 1.6e-7 at logits of magnitude ≤ 1).
const TOLERANCE: f32 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn converted_onnx_model_matches_onnxruntime() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("tiny-llama.gguf");
    let status = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("convert")
        .arg(root().join("testdata/onnx/tiny-llama.onnx"))
        .arg(&out)
        .arg("--tokenizer")
        .arg(root().join("models/petrel-tiny/petrel-tiny-w4a4.gguf"))
        .status()
        .expect("petrel runs");
    assert!(status.success(), "petrel convert failed");

    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("testdata/onnx/tiny-llama.expected.json")).unwrap())
            .expect("expected JSON");
    let ids: Vec<u32> = expected["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let want: Vec<Vec<f32>> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();

    let bytes = std::fs::read(&out).expect("converted file");
    let gguf = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&gguf).expect("loads");
    let vocab = model.config.vocab_size;
    // The same file on every backend.
    let backends: Vec<Box<dyn Backend>> = vec![
        Box::new(NativeBackend::detect()),
        Box::new(CandleBackend::new(&model, Device::Cpu).expect("candle serves f32")),
        Box::new(TractBackend::new(&model, 1).expect("tract serves f32")),
    ];
    for backend in &backends {
        let options = SessionOptions { capacity: 64, ..SessionOptions::default() };
        let mut session = Session::with_backend(&model, options, backend.as_ref()).unwrap();
        let mut got = vec![0f32; ids.len() * vocab];
        session.prefill_all_logits(&ids, &mut got).expect("runs");
        let mut worst = 0f32;
        for (t, row) in want.iter().enumerate() {
            for (a, b) in row.iter().zip(&got[t * vocab..(t + 1) * vocab]) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{}: max |Δlogit| against onnxruntime over {} positions: {worst}", backend.name(), ids.len());
        assert!(worst <= TOLERANCE, "{}: max |Δlogit| {worst} > {TOLERANCE}", backend.name());
    }
}

#[test]
fn convert_explains_a_missing_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let onnx = dir.path().join("model.onnx");
    std::fs::copy(root().join("testdata/onnx/tiny-llama.onnx"), &onnx).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("convert")
        .arg(&onnx)
        .arg(dir.path().join("out.gguf"))
        .arg("--tokenizer")
        .arg(root().join("models/petrel-tiny/petrel-tiny-w4a4.gguf"))
        .output()
        .expect("petrel runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!dir.path().join("out.gguf").exists());
}
