#!/usr/bin/env python3
"""Mixture-of-depths at Petrel-tiny's scale, the paper's comparison (Raposo et al. 2024):
bench/results/mod-tiny.{md,json}.

Three runs of `petrel train --recipe standard`, same shape, seed, batches and tokenizer:
  dense            — the standard run of scripts/tiny_experiment.py (1600 steps)
  mod-equal-params — blocks 1, 3, 5 routed at capacity 0.125, 1600 steps (fewer FLOPs)
  mod-equal-flops  — the same model trained for as many steps as the dense run's training
                     FLOPs allow (2700: a routed forward pass costs 0.591 of a dense one)
Both routed runs learn both causal decisions (router BCE and the predictor MLP). Each model
is scored by `petrel eval ppl` on held-out text (window 256, stride 128) in f32 and W4A4
(GPTQ, group 32, no rotation, written by `petrel train`), routed by top-k over each window
and by each causal decision; agreements with top-k come from the runs' final held-out
evaluation.

    python3 scripts/fetch_corpora.py && python3 scripts/tiny_experiment.py
    cargo build --release -p petrel-models
    python3 scripts/mod_tiny.py [--out ~/.cache/petrel/mod/tiny] [--tokens 65536] [--skip-training]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PETREL_HOME", Path.home() / ".cache/petrel"))
PETREL = Path(os.environ.get("PETREL_BIN", ROOT / "target/release/petrel"))
CORPORA = HOME / "corpora"
MOD = ["--mod-layers", "1,3,5", "--mod-capacity", "0.125", "--mod-causal", "both"]
RUNS = {"mod-equal-params": 1600, "mod-equal-flops": 2700}


def sh(cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def ppl(model, tokens, routing=None, decision=None):
    """`petrel eval ppl`'s JSON, kept beside the model (reused while newer than it)."""
    out = model.parent / f"ppl-{model.stem}-{routing or 'top-k'}-{decision or 'file'}-{tokens}.json"
    if out.exists() and out.stat().st_mtime > model.stat().st_mtime:
        return json.loads(out.read_text())
    cmd = [PETREL, "eval", "ppl", "--model", model, "--text", CORPORA / "heldout.txt", "--window", "256",
           "--stride", "128", "--max-tokens", tokens, "--threads", "1", "--json", out]
    if routing:
        cmd += ["--mod-routing", routing]
    if decision:
        cmd += ["--mod-decision", decision]
    sh(cmd)
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HOME / "mod/tiny")
    ap.add_argument("--dense", type=Path, default=HOME / "tiny/standard", help="the dense run")
    ap.add_argument("--tokens", type=int, default=65536, help="held-out tokens scored per model")
    ap.add_argument("--jobs", type=int, default=2, help="evaluations run at once")
    ap.add_argument("--skip-training", action="store_true", help="reuse finished runs in --out")
    args = ap.parse_args()
    runs = {name: args.out / name for name in RUNS}
    if not args.skip_training:
        started, procs = time.time(), {}
        for name, steps in RUNS.items():
            cmd = [PETREL, "train", "--recipe", "standard", "--out", runs[name], "--steps", steps, "--threads", "1"] + MOD
            if (runs[name] / "checkpoint.gguf").exists():
                cmd.append("--resume")
            runs[name].mkdir(parents=True, exist_ok=True)
            print("$", " ".join(str(c) for c in cmd), flush=True)
            procs[name] = subprocess.Popen([str(c) for c in cmd], stderr=open(args.out / f"{name}.stderr", "w"))
        for name, p in procs.items():
            if p.wait() != 0:
                sys.exit(f"{name} failed: see {args.out / f'{name}.stderr'}")
        print(f"runs done in {(time.time() - started) / 60:.1f} min", flush=True)
    all_runs = {"dense": args.dense, **runs}
    tokenizers = {(r / "tokenizer.gguf").read_bytes() for r in all_runs.values()}
    if len(tokenizers) != 1:
        sys.exit("the runs trained different tokenizers")

    # Every evaluation, two at a time (one thread each: the machine has two cores).
    jobs = {}
    for name, run in all_runs.items():
        for kind in ("f32", "w4a4"):
            model = run / f"model-{kind}.gguf"
            jobs[(name, f"{kind}_topk")] = (model, None, None)
            if name != "dense":
                for decision in ("predictor", "router"):
                    jobs[(name, f"{kind}_causal_{decision}")] = (model, "causal", decision)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(ppl, m, args.tokens, r, d) for key, (m, r, d) in jobs.items()}
        scores = {key: f.result() for key, f in futures.items()}

    rows = []
    for name, run in all_runs.items():
        log = [json.loads(l) for l in open(run / "log.jsonl")]
        start = next(e for e in log if e["event"] == "start")
        steps = [e for e in log if e["event"] == "step"]
        evals = [e for e in log if e["event"] == "eval"]
        shape = start["shape"]
        kv = shape["kv_heads"] * shape["dim"] // shape["heads"]
        dense_forward = 2 * (shape["layers"] * (2 * shape["dim"] ** 2 + 2 * shape["dim"] * kv
                                                + 3 * shape["dim"] * shape["ffn_dim"])
                             + shape["layers"] * 2 * shape["context"] * shape["dim"] + shape["vocab"] * shape["dim"])
        forward = start.get("forward_flops_per_token", dense_forward)
        tokens = steps[-1]["tokens"]
        row = {"run": name, "steps": start["settings"]["steps"], "parameters": start["parameters"],
               "train_tokens": tokens, "forward_flops_per_token": forward, "train_flops": 3 * forward * tokens,
               "minutes": steps[-1]["elapsed_s"] / 60,
               "tokens_per_s": sum(e["tokens_per_s"] for e in steps[-10:]) / min(10, len(steps)),
               "heldout_loss": evals[-1]["heldout_loss"],
               "router_agreement": evals[-1].get("router_agreement"),
               "predictor_agreement": evals[-1].get("predictor_agreement"),
               "agreement_by_layer": evals[-1].get("agreement_by_layer")}
        row.update({key: score for (run_name, key), score in scores.items() if run_name == name})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}), flush=True)

    dense = rows[0]
    p = lambda r, k: r[k]["perplexity"] if k in r else None
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    md = [
        "| model | steps | training FLOPs | forward FLOPs / token | f32 ppl (top-k) | f32 ppl (causal: predictor / router) "
        "| W4A4 ppl (top-k) | W4A4 ppl (causal: predictor / router) | agreement with top-k (predictor / router) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = lambda k: "" if p(r, k) is None else f" ({100 * (p(r, k) / p(dense, 'f32_topk') - 1):+.1f}%)"
        agreement = "–" if r["predictor_agreement"] is None else \
            f"{100 * r['predictor_agreement']:.1f}% / {100 * r['router_agreement']:.1f}%"
        md.append(
            f"| {r['run']} | {r['steps']} | {r['train_flops'] / 1e12:.2f} T ({r['train_flops'] / dense['train_flops']:.2f}×) "
            f"| {r['forward_flops_per_token'] / 1e6:.2f} M ({r['forward_flops_per_token'] / dense['forward_flops_per_token']:.2f}×) "
            f"| {fmt(p(r, 'f32_topk'))}{rel('f32_topk')} "
            f"| {fmt(p(r, 'f32_causal_predictor'))} / {fmt(p(r, 'f32_causal_router'))} "
            f"| {fmt(p(r, 'w4a4_topk'))} | {fmt(p(r, 'w4a4_causal_predictor'))} / {fmt(p(r, 'w4a4_causal_router'))} "
            f"| {agreement} |")
    md += ["", f"Held-out perplexity on the first {dense['f32_topk']['tokens_scored'] + 1} held-out tokens "
           "(window 256, stride 128). Causal routing: each token by its own decision, as decoding does; the share "
           "of tokens the routed blocks then process:"]
    for r in rows[1:]:
        md.append(f"- {r['run']}: predictor {100 * r['f32_causal_predictor']['routed_fraction']:.1f}%, "
                  f"router {100 * r['f32_causal_router']['routed_fraction']:.1f}% (top-k: 12.5%)")
    md += ["", "Training, one thread per run: " + ", ".join(
        f"{r['run']} {r['train_tokens'] / 1e6:.2f} M tokens in {r['minutes']:.1f} min ({r['tokens_per_s']:.0f} tokens/s)"
        for r in rows), ""]
    results = ROOT / "bench/results"
    (results / "mod-tiny.md").write_text("\n".join(md) + "\n")
    (results / "mod-tiny.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
