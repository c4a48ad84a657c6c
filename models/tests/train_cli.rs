//! `petrel train` end to end on a toy shape: a run killed mid-way and resumed ends with
//! exactly the model of an uninterrupted run, having lost only the steps since its last
//! checkpoint; bad input (a corpus that is not UTF-8, a damaged checkpoint, an existing run
//! without --resume) stops with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PETREL: &str = env!("CARGO_BIN_EXE_petrel");

/// Writes the toy corpus (this repository's README, split by position) into `dir`.
fn corpus(dir: &Path) -> (PathBuf, PathBuf) {
    let text = include_str!("../../README.md");
    let cut = text.char_indices().map(|(i, _)| i).find(|&i| i >= text.len() * 3 / 4).unwrap_or(0);
    let (train, heldout) = (dir.join("train.txt"), dir.join("heldout.txt"));
    std::fs::write(&train, &text[..cut]).unwrap();
    std::fs::write(&heldout, &text[cut..]).unwrap();
    (train, heldout)
}

fn train_command(out: &Path, train: &Path, heldout: &Path, steps: usize, extra: &[&str]) -> Command {
    let mut cmd = Command::new(PETREL);
    cmd.args(["train", "--recipe", "tiny", "--out"]).arg(out).arg("--train").arg(train).arg("--heldout").arg(heldout);
    for (flag, value) in [
        ("--vocab", "300"),
        ("--dim", "64"),
        ("--layers", "2"),
        ("--heads", "4"),
        ("--kv-heads", "2"),
        ("--ffn", "96"),
        ("--context", "32"),
        ("--batch", "4"),
        ("--warmup", "5"),
        ("--eval-every", "50"),
        ("--eval-batches", "1"),
        ("--threads", "1"),
        ("--checkpoint-every", "20"),
    ] {
        cmd.args([flag, value]);
    }
    cmd.args(["--steps", &steps.to_string()]).args(extra);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("petrel runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn killed_run_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let (train, heldout) = corpus(dir.path());
    let steps = 400;

    let whole = dir.path().join("whole");
    let o = run(train_command(&whole, &train, &heldout, steps, &["--w4a4", "false"]));
    assert!(o.status.success(), "{}", stderr(&o));

    let killed = dir.path().join("killed");
    let mut child = train_command(&killed, &train, &heldout, steps, &["--w4a4", "false"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = killed.join("checkpoint.gguf");
    let started = Instant::now();
    while !checkpoint.exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(checkpoint.exists(), "no checkpoint within two minutes");
    assert!(!killed.join("model-f32.gguf").exists(), "the run finished before it was killed; make it longer");

    let o = run(train_command(&killed, &train, &heldout, steps, &["--w4a4", "false", "--resume"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed_at: usize = stderr(&o)
        .lines()
        .find_map(|l| l.strip_prefix("resuming at step "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resume line in: {}", stderr(&o)));
    assert!(resumed_at > 0 && resumed_at.is_multiple_of(20) && resumed_at < steps, "resumed at {resumed_at}");

    let a = std::fs::read(whole.join("model-f32.gguf")).unwrap();
    let b = std::fs::read(killed.join("model-f32.gguf")).unwrap();
    assert!(a == b, "the resumed run's model differs from the uninterrupted run's");
}

#[test]
fn finished_run_writes_a_w4a4_model_and_refuses_to_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let (train, heldout) = corpus(dir.path());
    let out = dir.path().join("run");
    let o = run(train_command(&out, &train, &heldout, 30, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["tokenizer.gguf", "checkpoint.gguf", "log.jsonl", "model-f32.gguf", "model-w4a4.gguf"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let last_step = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["event"] == "step")
        .expect("step lines");
    assert_eq!(last_step["step"], 30);
    assert!(last_step["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(last_step["kurtosis"].as_f64().unwrap() > 0.0);

    // The W4A4 file runs.
    let o = run({
        let mut c = Command::new(PETREL);
        c.args(["run", "--raw", "-n", "8", "--threads", "1", "--model"]).arg(out.join("model-w4a4.gguf")).arg("The");
        c
    });
    assert!(o.status.success(), "{}", stderr(&o));

    // Starting again in the same directory without --resume is refused.
    let o = run(train_command(&out, &train, &heldout, 30, &[]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));

    // A damaged checkpoint is refused with a clear error.
    let checkpoint = out.join("checkpoint.gguf");
    let bytes = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(train_command(&out, &train, &heldout, 30, &["--resume"]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
}

#[test]
fn corpus_that_is_not_utf8_is_refused_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let (train, heldout) = corpus(dir.path());
    let mut bytes = std::fs::read(&train).unwrap();
    bytes.splice(10..10, [0xFFu8, 0xFE]);
    std::fs::write(&train, &bytes).unwrap();
    let o = run(train_command(&dir.path().join("run"), &train, &heldout, 5, &[]));
    assert!(!o.status.success());
    let message = stderr(&o);
    assert!(message.contains("UTF-8") && message.contains("train.txt") && message.contains("10"), "{message}");
}
