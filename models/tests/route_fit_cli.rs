//! `petrel route-fit` end to end on the committed Petrel-tiny: routed copies load with the
//! routing asked for, `petrel eval ppl` scores them both ways, and bad flags are clear
//! errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::assert_error;
use petrel_runtime::{GgufFile, Model};

fn petrel(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_petrel"));
    cmd.args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    cmd.output().expect("petrel runs")
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("petrel-tiny/petrel-tiny-w4a4.gguf")
}

/// About 1,500 tokens of English in Petrel-tiny's vocabulary.
fn text(dir: &Path) -> PathBuf {
    let sentence = "It is a truth universally acknowledged, that a single man in possession of a good \
                    fortune, must be in want of a wife. And the king said unto his servants, Go ye. ";
    let path = dir.join("text.txt");
    std::fs::write(&path, sentence.repeat(40)).expect("writes");
    path
}

#[test]
fn route_fit_writes_routed_models_that_evaluate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (text, out) = (text(dir.path()), dir.path().join("routed"));
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let fitted = petrel(
        &[
            "route-fit",
            "--capacity",
            "0.5,0.75",
            "--layers",
            "1+3",
            "--layers",
            "auto:2",
            "--calib-tokens",
            "512",
            "--window",
            "64",
            "--threads",
            "1",
        ],
        &[("--model", &tiny()), ("--text", &text), ("--out", &out)],
    );
    assert!(fitted.status.success(), "{}", stderr(&fitted));
    for capacity in ["0.5", "0.75"] {
        for spec in ["1+3", "auto2"] {
            let path = out.join(format!("route-c{capacity}-{spec}.gguf"));
            let bytes = std::fs::read(&path).expect("routed file written");
            let file = GgufFile::parse(&bytes).expect("parses");
            let model = Model::load(&file).expect("loads");
            let routing = model.routing.as_ref().expect("routed");
            assert_eq!(routing.capacity.to_string(), capacity);
            assert_eq!(routing.sink_tokens, 1);
            let layers: Vec<usize> = routing.routed_layers().collect();
            assert_eq!(layers.len(), 2);
            assert!(layers.iter().all(|&l| (1..5).contains(&l)), "never the first or last block: {layers:?}");
            if spec == "1+3" {
                assert_eq!(layers, [1, 3]);
            }
        }
    }
    assert!(out.join("fit.json").exists());

    let routed = out.join("route-c0.5-1+3.gguf");
    for routing in ["top-k", "causal"] {
        let eval = petrel(
            &["eval", "ppl", "--window", "64", "--threads", "1", "--mod-routing", routing],
            &[("--model", &routed), ("--text", &text)],
        );
        let stdout = String::from_utf8_lossy(&eval.stdout);
        assert!(eval.status.success(), "{}", stderr(&eval));
        assert!(stdout.contains("perplexity:") && stdout.contains("routed blocks processed"), "{stdout}");
    }
    let no_predictor = petrel(
        &["eval", "ppl", "--window", "64", "--mod-decision", "predictor"],
        &[("--model", &routed), ("--text", &text)],
    );
    assert_error(&no_predictor, "has no predictors");
}

#[test]
fn route_fit_bad_flags_are_clear_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (text, out) = (text(dir.path()), dir.path().join("routed"));
    let run = |extra: &[&str]| {
        let mut args = vec!["route-fit", "--calib-tokens", "512", "--window", "64"];
        args.extend_from_slice(extra);
        petrel(&args, &[("--model", &tiny()), ("--text", &text), ("--out", &out)])
    };
    assert_error(&run(&["--capacity", "1.5"]), "outside (0, 1]");
    assert_error(&run(&["--layers", "9"]), "does not exist");
    assert_error(&run(&["--layers", "auto:5"]), "can be routed");
    assert_error(&run(&["--layers", "auto:x"]), "expected auto:N");
    let routed = out.join("route-c0.5-1.gguf");
    assert!(run(&["--layers", "1"]).status.success());
    let again = petrel(
        &["route-fit", "--calib-tokens", "512", "--window", "64"],
        &[("--model", &routed), ("--text", &text), ("--out", &out)],
    );
    assert_error(&again, "already routes tokens");
}
