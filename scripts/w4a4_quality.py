#!/usr/bin/env python3
"""SmolLM2-135M quality under Petrel's quantization schemes: the table in README.md and
bench/results/w4a4-quality.{md,json}.

Every row is produced here, by `petrel quantize` and `petrel eval ppl` on the held-out
split of scripts/fetch_corpora.py (the same first --tokens tokens for every row), plus the
chat answer to "What is the capital of France?" and the peak memory of that run. GPTQ
calibrates on the training split, never on held-out text.

    python3 scripts/fetch_corpora.py
    cargo build --release -p petrel-models
    python3 scripts/w4a4_quality.py [--tokens 8192] [--group 128] [--clip 0.7]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PETREL_HOME", Path.home() / ".cache/petrel"))
PETREL = Path(os.environ.get("PETREL_BIN", ROOT / "target/release/petrel"))
SOURCE = HOME / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPORA = HOME / "corpora"


def sh(cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout + done.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored per row")
    ap.add_argument("--group", type=int, default=128, help="weight group size (0 = per channel)")
    ap.add_argument("--clip", type=float, default=0.8, help="activation clip ratio for w4a4")
    ap.add_argument("--clip-g32", type=float, default=1.0,
                    help="activation clip ratio of the group-32 row (finer groups clip less)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=HOME / "quality")
    ap.add_argument("--only", help="comma-separated row names to (re)run; others are read from --out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    heldout, train = CORPORA / "heldout.txt", CORPORA / "train.txt"
    for f in (SOURCE, heldout, train, PETREL):
        if not f.exists():
            sys.exit(f"{f} is missing (see this script's docstring)")
    calib = args.out / "calib.txt"
    if not calib.exists():
        # The first 3 MB of the training split: far more than --calib-tokens needs.
        calib.write_bytes(train.read_bytes()[: 3_000_000])

    g, c = str(args.group), str(args.clip)
    gptq = ["--gptq", "--calib", calib, "--calib-tokens", str(args.calib_tokens)]
    rows = [
        ("source-q4_1", "the source file as published (Q4_1 weights, 8-bit activation blocks)", None),
        ("reference-f32", "reference: the file's weights dequantized, f32 activations", ["--scheme", "f32"]),
        ("w4a16-rot-gptq", "W4A16, rotated + GPTQ", ["--scheme", "w4a16", "--group", g, "--rotate", *gptq]),
        ("w4a8-rot-gptq", "W4A8, rotated + GPTQ", ["--scheme", "w4a8", "--group", g, "--rotate", "--act-clip", "1.0", *gptq]),
        ("w4a4-rtn", "W4A4, round-to-nearest, no rotation", ["--scheme", "w4a4", "--group", g, "--act-clip", c]),
        ("w4a4-rot-rtn", "W4A4, rotated + RTN", ["--scheme", "w4a4", "--group", g, "--act-clip", c, "--rotate"]),
        ("w4a4-rot-gptq", "W4A4, rotated + GPTQ", ["--scheme", "w4a4", "--group", g, "--act-clip", c, "--rotate", *gptq]),
        ("w4a4-rot-gptq-g32", "W4A4, rotated + GPTQ, weight and activation groups of 32",
         ["--scheme", "w4a4", "--group", "32", "--act-clip", str(args.clip_g32), "--rotate", *gptq]),
        ("w4a4-rot-gptq-a8norm", "W4A4, rotated + GPTQ, 8-bit activations at the normalized residual (q/k/v, gate/up inputs)",
         ["--scheme", "w4a4", "--group", g, "--act-clip", c, "--rotate", *gptq, "--a8", "attn-in,mlp-in"]),
        ("w4a4-rot-gptq-w4head", "W4A4, rotated + GPTQ, W4 output head (A4 too)",
         ["--scheme", "w4a4", "--group", g, "--act-clip", c, "--rotate", *gptq, "--head", "w4"]),
        ("w4a4-rot-gptq-w4emb", "W4A4, rotated + GPTQ, W4 embedding table",
         ["--scheme", "w4a4", "--group", g, "--act-clip", c, "--rotate", *gptq, "--embedding", "w4"]),
    ]
    only = set(args.only.split(",")) if args.only else None
    results = []
    for name, label, quantize in rows:
        record_path = args.out / f"{name}.json"
        if only is not None and name not in only and record_path.exists():
            results.append(json.loads(record_path.read_text()))
            continue
        model = SOURCE if quantize is None else args.out / f"{name}.gguf"
        started = time.time()
        if quantize is not None:
            sh([PETREL, "quantize", SOURCE, model, *quantize])
        quantize_s = time.time() - started
        ppl_json = args.out / f"{name}.ppl.json"
        sh([PETREL, "eval", "ppl", "-m", model, "--text", heldout, "--window", "512", "--stride", "256",
            "--max-tokens", str(args.tokens), "--json", ppl_json])
        ppl = json.loads(ppl_json.read_text())
        chat = sh([PETREL, "run", "--kv-type", "f32", "--model", model, "--max-tokens", "24", "--temperature", "0",
                   "What is the capital of France?"])
        peak = re.search(r"peak memory ([0-9.]+) MiB", chat)
        answer = chat.split("[TTFT")[0].strip().splitlines()[-1] if "[TTFT" in chat else chat.strip()
        record = {
            "name": name, "label": label, "quantize": None if quantize is None else [str(a) for a in quantize],
            "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
            "file_bytes": model.stat().st_size, "peak_rss_mib": float(peak.group(1)) if peak else None,
            "answer": answer, "quantize_seconds": round(quantize_s, 1),
        }
        record_path.write_text(json.dumps(record, indent=1))
        results.append(record)
        print(json.dumps(record), flush=True)

    ref = next(r for r in results if r["name"] == "reference-f32")["perplexity"]
    lines = [
        f"SmolLM2-135M-Instruct on the held-out split ({results[0]['tokens_scored']} tokens scored, window 512, "
        f"stride 256); W4 group size {args.group or 'per channel'}, W4A4 activation clip {args.clip} "
        f"({args.clip_g32} for the group-32 row); GPTQ "
        f"calibrated on {args.calib_tokens} training tokens. Produced by `python3 scripts/w4a4_quality.py "
        f"--tokens {args.tokens} --group {args.group} --clip {args.clip} --clip-g32 {args.clip_g32}`.",
        "",
        "| row | perplexity | vs reference | file MB | peak RSS MiB | answer |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / ref - 1):+.1f}% | "
            f"{r['file_bytes'] / 1e6:.1f} | {r['peak_rss_mib'] or '–'} | {r['answer'][:60]} |"
        )
    md = "\n".join(lines) + "\n"
    (ROOT / "bench/results/w4a4-quality.md").write_text(md)
    (ROOT / "bench/results/w4a4-quality.json").write_text(json.dumps(
        {"tokens": args.tokens, "group": args.group, "clip": args.clip, "clip_g32": args.clip_g32,
         "calib_tokens": args.calib_tokens,
         "rows": results}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
