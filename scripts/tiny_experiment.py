#!/usr/bin/env python3
"""The paper experiment of Nrusimha et al. (2024) at Petrel-tiny's scale, and Petrel-tiny
itself: bench/results/tiny-qat.{md,json} and the README table.

Two runs of `petrel train`, same shape, same seed, same batches, same tokenizer:
  standard  — plain training                                  → (a) f32, (b) + W4A4 PTQ
  tiny      — activation QAT (4-bit, learned clips) + kurtosis → (c) f32, (d) + W4A4 PTQ
The tiny run's W4A4 file is Petrel-tiny (models/petrel-tiny/). Both runs train at the same
time with one thread each (the machine has two cores). Then every model is scored by
`petrel eval ppl` on held-out text, the f32 models' per-layer activation statistics by
`petrel eval act-stats`, and the W4A4 files generate greedy samples.

    python3 scripts/fetch_corpora.py
    cargo build --release -p petrel-models
    python3 scripts/tiny_experiment.py [--steps 1600] [--out ~/.cache/petrel/tiny]
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PETREL_HOME", Path.home() / ".cache/petrel"))
PETREL = Path(os.environ.get("PETREL_BIN", ROOT / "target/release/petrel"))
CORPORA = HOME / "corpora"
PROMPTS = ["The king said", "It is a truth universally acknowledged", "And God said", "She looked at him and"]


def sh(cmd, stdout_only=False):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout if stdout_only else done.stdout + done.stderr


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--out", type=Path, default=HOME / "tiny")
    ap.add_argument("--tokens", type=int, default=10**9, help="held-out tokens scored per model (default: all)")
    ap.add_argument("--stats-tokens", type=int, default=8192, help="held-out tokens for act-stats")
    ap.add_argument("--skip-training", action="store_true", help="reuse finished runs in --out")
    ap.add_argument("--commit-model", action="store_true", help="copy the tiny run's files to models/petrel-tiny/")
    args = ap.parse_args()
    heldout = CORPORA / "heldout.txt"
    for f in (heldout, CORPORA / "train.txt", PETREL):
        if not f.exists():
            sys.exit(f"{f} is missing (see this script's docstring)")
    runs = {"standard": args.out / "standard", "tiny": args.out / "tiny"}
    commands = {
        name: [PETREL, "train", "--recipe", name, "--out", run, "--steps", args.steps, "--threads", "1"]
        for name, run in runs.items()
    }
    if not args.skip_training:
        started = time.time()
        procs = {}
        for name, cmd in commands.items():
            resume = ["--resume"] if (runs[name] / "checkpoint.gguf").exists() else []
            runs[name].mkdir(parents=True, exist_ok=True)
            print("$", " ".join(str(c) for c in cmd + resume), flush=True)
            procs[name] = subprocess.Popen([str(c) for c in cmd + resume],
                                           stderr=open(runs[name] / "stderr.txt", "w"))
        for name, p in procs.items():
            if p.wait() != 0:
                sys.exit(f"{name} failed: see {runs[name] / 'stderr.txt'}")
        print(f"both runs done in {(time.time() - started) / 60:.1f} min", flush=True)
    if sha256(runs["standard"] / "tokenizer.gguf") != sha256(runs["tiny"] / "tokenizer.gguf"):
        sys.exit("the two runs trained different tokenizers")

    rows, stats, samples, logs = [], {}, {}, {}
    for name, run in runs.items():
        log = [json.loads(l) for l in open(run / "log.jsonl")]
        steps = [e for e in log if e["event"] == "step"]
        start = next(e for e in log if e["event"] == "start")
        shape = start["shape"]
        # Matmul FLOPs of one token's forward pass (ModelShape::forward_flops_per_token).
        kv = shape["kv_heads"] * shape["dim"] // shape["heads"]
        forward = 2 * (shape["layers"] * (2 * shape["dim"] ** 2 + 2 * shape["dim"] * kv + 3 * shape["dim"] * shape["ffn_dim"])
                       + shape["layers"] * 2 * shape["context"] * shape["dim"] + shape["vocab"] * shape["dim"])
        forward = start.get("forward_flops_per_token", forward)
        rate = sum(e["tokens_per_s"] for e in steps[-10:]) / min(10, len(steps))
        logs[name] = {"final_train_loss": steps[-1]["cross_entropy"], "tokens": steps[-1]["tokens"],
                      "tokens_per_s": rate, "minutes": steps[-1]["elapsed_s"] / 60,
                      "parameters": start["parameters"], "train_gflops": 3 * forward * rate / 1e9,
                      "heldout_loss": [e for e in log if e["event"] == "eval"][-1]["heldout_loss"]}
        # Beyond the paper: the standard model's PTQ after QuaRot's rotations, as used for
        # SmolLM2. (A QAT model's learned clips hold in the unrotated basis.)
        kinds = ["f32", "w4a4"]
        if name == "standard":
            kinds.append("w4a4-rotated")
            sh([PETREL, "quantize", run / "model-f32.gguf", run / "model-w4a4-rotated.gguf", "--scheme", "w4a4",
                "--rotate", "--group", "32", "--act-clip", "1.0", "--gptq", "--calib", CORPORA / "train.txt",
                "--calib-tokens", "16384", "--calib-seq-len", "256"])
        for kind in kinds:
            model = run / f"model-{kind}.gguf"
            out = run / f"ppl-{kind}.json"
            sh([PETREL, "eval", "ppl", "--model", model, "--text", heldout, "--window", "256", "--stride", "128",
                "--max-tokens", args.tokens, "--json", out])
            ppl = json.loads(out.read_text())["perplexity"]
            rows.append({"run": name, "kind": kind, "perplexity": ppl, "file_bytes": model.stat().st_size})
        out = run / "act-stats.json"
        sh([PETREL, "eval", "act-stats", "--model", run / "model-f32.gguf", "--text", heldout, "--window", "256",
            "--max-tokens", args.stats_tokens, "--json", out])
        stats[name] = json.loads(out.read_text())
        samples[name] = []
        for prompt in PROMPTS:
            text = sh([PETREL, "run", "--raw", "--kv-type", "f32", "--model", run / "model-w4a4.gguf", "-n", "48", "--threads", "1", prompt],
                      stdout_only=True)
            samples[name].append({"prompt": prompt, "text": prompt + text.rstrip()})

    by = {(r["run"], r["kind"]): r["perplexity"] for r in rows}
    label = {("standard", "f32"): "(a) standard training, full precision",
             ("standard", "w4a4"): "(b) standard training + W4A4 PTQ",
             ("tiny", "f32"): "(c) QAT + kurtosis, full precision (inputs clamped to the learned clips)",
             ("tiny", "w4a4"): "(d) QAT + kurtosis + W4A4 PTQ",
             ("standard", "w4a4-rotated"): "(b′) standard training + QuaRot + W4A4 PTQ"}
    md = ["| model | held-out perplexity | vs (a) | file |", "|---|---|---|---|"]
    for r in rows:
        key = (r["run"], r["kind"])
        rel = 100 * (r["perplexity"] / by[("standard", "f32")] - 1)
        md.append(f"| {label[key]} | {r['perplexity']:.2f} | {rel:+.1f}% | {r['file_bytes'] / 1e6:.2f} MB |")
    md += ["", "W4A4 PTQ cost: standard " f"{100 * (by[('standard', 'w4a4')] / by[('standard', 'f32')] - 1):+.1f}%, "
           f"QAT + kurtosis {100 * (by[('tiny', 'w4a4')] / by[('tiny', 'f32')] - 1):+.1f}%.", ""]
    md += ["Per-layer activation statistics of the f32 models (kurtosis across channels per token, mean over "
           "tokens; max/median of the per-channel max |x|):", "",
           "| layer | site | (a) kurtosis | (c) kurtosis | (a) max/median | (c) max/median |", "|---|---|---|---|---|---|"]
    for a, c in zip(stats["standard"]["sites"], stats["tiny"]["sites"]):
        md.append(f"| {a['layer']} | {a['site']} | {a['mean_kurtosis']:.2f} | {c['mean_kurtosis']:.2f} | "
                  f"{a['ratio']:.2f} | {c['ratio']:.2f} |")
    md += ["", "Training (one thread each, both at once): " + ", ".join(
        f"{n} {l['tokens'] / 1e6:.2f} M tokens in {l['minutes']:.1f} min ({l['tokens_per_s']:.0f} tokens/s, "
        f"{l['train_gflops']:.1f} GFLOP/s of matmuls), final train loss {l['final_train_loss']:.3f}"
        for n, l in logs.items()), ""]
    md += ["Greedy samples from the W4A4 files:", ""]
    for name in runs:
        for s in samples[name]:
            shown = s["text"].replace("\n", " ⏎ ")
            md.append(f"- {name}: {shown}")
    report = {"rows": rows, "act_stats": stats, "training": logs, "samples": samples,
              "commands": {n: " ".join(str(c) for c in cmd[1:]) for n, cmd in commands.items()}}
    results = ROOT / "bench/results"
    (results / "tiny-qat.md").write_text("\n".join(md) + "\n")
    (results / "tiny-qat.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("\n".join(md))
    if args.commit_model:
        dest = ROOT / "models/petrel-tiny"
        dest.mkdir(exist_ok=True)
        for f in ("model-w4a4.gguf", "tokenizer.gguf"):
            shutil.copy(runs["tiny"] / f, dest / f)
        print(f"copied Petrel-tiny to {dest}")


if __name__ == "__main__":
    main()
