#!/usr/bin/env python3
"""KV-prediction prefill on SmolLM2-135M-Instruct W4A4: quality of each variant (base cache,
ridge-fitted predicted cache, trained predicted cache, auxiliary model alone) after prompts
of 128/512/1024 tokens, time to first token of each (`petrel-bench kvp`, with llama.cpp's
prefill), and the TTFT-vs-accuracy Pareto plot. Writes bench/results/kvp-smollm2.{md,json,svg}
and bench/results/kvp-ttft.{md,json}.

The base is SmolLM2 quantized with the quality table's best recipe (W4A4, rotated + GPTQ,
8-bit activations at the normalized residual), made here (`~/.cache/petrel/kvp/w4a4-base.gguf`)
with the same command that quantizes the trained files, so every variant has the same base
bit for bit. Variants:
- ridge, 0.25 / 0.5: `petrel kvp-fit --keep every:4 / every:2` on the W4A4 file itself
  (the auxiliary model is the base's own blocks 0,4,…,28 / 0,2,…,28; W4A8 maps);
- trained, 0.25: `petrel kvp-train` output (f32, from `kvp-fit` on the f32 reference),
  quantized with the base's exact recipe (`petrel quantize`, the auxiliary blocks rotated and
  W4A4 like the base's, maps carried through the rotation), and the same with its maps refit
  in closed form on the W4A4 pair (`kvp-fit` without --keep).

    cargo build --release -p petrel-models -p petrel-bench
    python3 scripts/kvp_smollm2.py --trained ~/.cache/petrel/kvp/trained-a8/f32-trained-a8.gguf
    python3 scripts/kvp_smollm2.py --replot bench/results/kvp-smollm2.json
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PETREL_HOME", Path.home() / ".cache/petrel"))
PETREL = Path(os.environ.get("PETREL_BIN", ROOT / "target/release/petrel"))
BENCH = Path(os.environ.get("PETREL_BENCH_BIN", ROOT / "target/release/petrel-bench"))
CORPORA = HOME / "corpora"
SOURCE = HOME / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORK = HOME / "kvp"
# The base: the published file quantized with the quality table's best recipe, made here so
# that it is bit-identical to the base inside the quantized trained files.
BASE = WORK / "w4a4-base.gguf"
# The base's recipe (bench/results/w4a4-quality.md, row w4a4-rot-gptq-a8norm).
QUANTIZE = ["--scheme", "w4a4", "--group", "128", "--act-clip", "0.8", "--rotate", "--gptq",
            "--calib", HOME / "quality/calib.txt", "--calib-tokens", "8192", "--a8", "attn-in,mlp-in"]


def sh(cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def make(path, cmd, reuse):
    if not (reuse and Path(path).exists()):
        sh(cmd)
    return path


def evaluate(model, modes, args):
    out = WORK / f"eval-{Path(model).stem}.json"
    if not (args.reuse and out.exists()):
        sh([PETREL, "eval", "kvp", "--model", model, "--text", CORPORA / "heldout.txt", "--modes", modes,
            "--samples", args.samples, "--continuation", args.continuation, "--prompt-lens", args.prompt_lens,
            "--threads", args.threads, "--json", out])
    return json.loads(out.read_text())


def panel(points, key, log, x0, w, h, title):
    """One scatter panel of `key` (accuracy: higher is better, linear; perplexity: lower is
    better, log) against TTFT, with the Pareto front joined; returns SVG elements."""
    import math
    left, right, top, bottom = x0 + 60, x0 + w - 15, 45, h - 45
    xs = [p["ttft_ms"] for p in points]
    vals = [p[key] for p in points]
    x_hi = max(xs) * 1.1
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = (f(min(vals)) - 0.2, f(max(vals)) + 0.2) if log else (0.0, max(max(vals) * 1.15, 0.05))
    x_of = lambda x: left + x / x_hi * (right - left)
    y_of = lambda v: top + (hi - f(v)) / (hi - lo) * (bottom - top)
    out = [f'<text x="{left}" y="{top - 12}" font-size="13">{title}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>',
           f'<text x="{(left + right) / 2 - 80}" y="{h - 10}">time to first token, ms (1 thread)</text>']
    step = max(50, round(x_hi / 5 / 50) * 50)
    for x in range(0, int(x_hi) + 1, step):
        out.append(f'<line x1="{x_of(x)}" y1="{bottom}" x2="{x_of(x)}" y2="{bottom + 5}" stroke="black"/>')
        out.append(f'<text x="{x_of(x) - 10}" y="{bottom + 18}" font-size="10">{x}</text>')
    if log:
        for e in range(math.ceil(lo), math.floor(hi) + 1):
            out.append(f'<line x1="{left - 4}" y1="{y_of(10 ** e)}" x2="{right}" y2="{y_of(10 ** e)}" stroke="#eee"/>')
            out.append(f'<text x="{left - 50}" y="{y_of(10 ** e) + 4}" font-size="10">1e{e}</text>')
    else:
        for i in range(6):
            v = hi * i / 5
            out.append(f'<line x1="{left - 4}" y1="{y_of(v)}" x2="{right}" y2="{y_of(v)}" stroke="#eee"/>')
            out.append(f'<text x="{left - 40}" y="{y_of(v) + 4}" font-size="10">{100 * v:.1f}%</text>')
    better = (lambda a, b: a < b) if log else (lambda a, b: a > b)
    front = []
    for p in sorted(points, key=lambda p: p["ttft_ms"]):
        if not front or better(p[key], front[-1][key]):
            front.append(p)
    pts = " ".join(f'{x_of(p["ttft_ms"])},{y_of(p[key])}' for p in front)
    out.append(f'<polyline points="{pts}" fill="none" stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="5,3"/>')
    for i, p in enumerate(points):
        color = COLORS.get(p["kind"], "#9467bd")
        out.append(f'<circle cx="{x_of(p["ttft_ms"])}" cy="{y_of(p[key])}" r="5" fill="{color}" fill-opacity="0.8"/>')
        out.append(f'<text x="{x_of(p["ttft_ms"]) + 6}" y="{y_of(p[key]) - 5}" font-size="10">{i + 1}</text>')
    return out


COLORS = {"base": "#000000", "ridge": "#1f77b4", "trained": "#d62728", "aux": "#7f7f7f"}


def svg(points, path):
    """TTFT at 512-token prompts (1 thread) against repeated-word accuracy (left) and
    continuation perplexity (right, log), one numbered point per variant, Pareto fronts
    dashed, and the legend."""
    pw, h, legend = 420, 420, 400
    w = 2 * pw + legend
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             '<text x="60" y="18" font-size="14">SmolLM2-135M W4A4: KV-prediction prefill, 512-token prompts</text>']
    parts += panel(points, "accuracy", False, 0, pw, h, "repeated-word accuracy (higher is better)")
    parts += panel(points, "perplexity", True, pw, pw, h, "continuation perplexity (lower is better)")
    for i, p in enumerate(points):
        color = COLORS.get(p["kind"], "#9467bd")
        parts.append(f'<text x="{2 * pw + 5}" y="{50 + i * 16}" fill="{color}" font-size="11">{i + 1}. {p["label"]}</text>')
    parts.append(f'<text x="{2 * pw + 5}" y="{66 + len(points) * 16}" fill="#2ca02c" font-size="11">dashed: Pareto front</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", type=Path, action="append", default=[],
                    help="kvp-train output (f32) to quantize and include (repeatable)")
    ap.add_argument("--samples", default="64")
    ap.add_argument("--continuation", default="32")
    ap.add_argument("--prompt-lens", default="128,512,1024")
    ap.add_argument("--ttft-prompts", default="128,512,1024,2048")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--ridge", default="0.1", help="kvp-fit ridge strength")
    ap.add_argument("--reuse", action="store_true", help="keep files and evaluations that exist")
    ap.add_argument("--name", default="kvp-smollm2")
    ap.add_argument("--skip-bench", action="store_true", help="use the existing bench/results/kvp-ttft.json")
    ap.add_argument("--replot", type=Path, help="only redraw the SVG from a results JSON")
    args = ap.parse_args()
    results = ROOT / "bench/results"
    if args.replot:
        svg(json.loads(args.replot.read_text())["pareto"], args.replot.with_suffix(".svg"))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    make(BASE, [PETREL, "quantize", SOURCE, BASE] + QUANTIZE, args.reuse)
    train = CORPORA / "train.txt"
    fit = [PETREL, "kvp-fit", "--text", train, "--calib-tokens", "16384", "--window", "512", "--ridge", args.ridge]
    variants = []  # (label, kind, file)
    for keep, aux in (("every:4", 8), ("every:2", 15)):
        out = WORK / f"w4a4-ridge-a{aux}.gguf"
        make(out, fit + ["--model", BASE, "--keep", keep, "--out", out], args.reuse)
        variants.append((f"ridge maps, aux = base blocks {keep} ({aux} blocks)", "ridge", out, aux))
    for trained in args.trained:
        aux = json.loads(trained.with_suffix(".json").read_text())["layout"]["block_count"]
        quantized = WORK / f"w4a4-{trained.stem}.gguf"
        make(quantized, [PETREL, "quantize", trained, quantized] + QUANTIZE, args.reuse)
        variants.append((f"trained aux + trained maps ({aux} blocks)", "trained", quantized, aux))
        refit = WORK / f"w4a4-{trained.stem}-refit.gguf"
        make(refit, fit + ["--model", quantized, "--out", refit], args.reuse)
        variants.append((f"trained aux + maps refit on W4A4 ({aux} blocks)", "trained", refit, aux))

    evals = [evaluate(f, "base,predicted,aux" if i == 0 else "predicted,aux", args)
             for i, (_, _, f, _) in enumerate(variants)]
    if not args.skip_bench:
        sh([BENCH, "kvp"] + sum((["--model", f] for _, _, f, _ in variants), [])
           + ["--prompts", args.ttft_prompts, "--threads", "1,2", "--repetitions", "3", "--out", results])
    ttft = json.loads((results / "kvp-ttft.json").read_text())

    def ttft_of(threads, prompt):
        return next(r for r in ttft["rows"] if r["threads"] == threads and r["prompt"] == prompt)

    def result(e, mode, n):
        return next(r for r in e["results"] if r["mode"] == mode and r["prompt_len"] == n)

    lens = [int(n) for n in args.prompt_lens.split(",")]
    rows = []
    base_eval = evals[0]
    for n in lens:
        r = result(base_eval, "base", n)
        rows.append({"variant": "base (true cache)", "prompt": n, "accuracy": r["accuracy"], "perplexity": r["perplexity"]})
    for (label, _, _, _), e in zip(variants, evals):
        for n in lens:
            r = result(e, "predicted", n)
            rows.append({"variant": label, "prompt": n, "accuracy": r["accuracy"], "perplexity": r["perplexity"]})
    for (label, kind, _, aux), e in zip(variants, evals):
        if kind == "trained" and "refit" in label:
            continue  # same auxiliary model as the row before
        for n in lens:
            r = result(e, "aux", n)
            rows.append({"variant": f"aux alone: {label.split(',')[0].split(' +')[0]} ({aux} blocks)",
                         "prompt": n, "accuracy": r["accuracy"], "perplexity": r["perplexity"]})

    t512 = ttft_of(1, 512)
    def point(label, kind, ttft_ms, r):
        return {"label": label, "kind": kind, "ttft_ms": ttft_ms, "accuracy": r["accuracy"],
                "perplexity": r["perplexity"]}

    pareto = [point("base prefill", "base", t512["base_ms"], result(base_eval, "base", 512))]
    for i, ((label, kind, _, aux), e) in enumerate(zip(variants, evals)):
        pareto.append(point(f"predicted: {label}", kind, t512["predicted_ms"][i], result(e, "predicted", 512)))
        if "refit" not in label:
            pareto.append(point(f"aux alone ({aux} blocks, {kind})", "aux", t512["aux_only_ms"][i], result(e, "aux", 512)))

    report = {"base": str(BASE), "variants": [{"label": l, "file": str(f), "aux_blocks": a} for l, _, f, a in variants],
              "samples": int(args.samples), "continuation": int(args.continuation), "rows": rows,
              "ttft": ttft, "pareto": pareto}
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    svg(pareto, results / f"{args.name}.svg")
    lines = ["# KV-prediction prefill on SmolLM2-135M-Instruct (W4A4)", "",
             f"Command: `python3 scripts/kvp_smollm2.py {' '.join(sys.argv[1:])}`", "",
             f"Held-out text, {args.samples} passages per prompt length; accuracy = greedy next token is the target word "
             f"(a word of ≥ 5 letters that already appeared in the 128 tokens before); perplexity over the "
             f"{args.continuation} tokens from the target on, decoded against the cache the prefill left.", "",
             "| variant | " + " | ".join(f"acc @{n}" for n in lens) + " | " + " | ".join(f"ppl @{n}" for n in lens) + " |",
             "|---|" + "---|" * (2 * len(lens))]
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["prompt"]] = r
    for v, per in by_variant.items():
        accs = " | ".join(f"{100*per[n]['accuracy']:.1f}%" for n in lens)
        ppls = " | ".join(f"{per[n]['perplexity']:.2f}" for n in lens)
        lines.append(f"| {v} | {accs} | {ppls} |")
    lines += ["", "## Time to first token (same run, best of 3)", "",
              "| threads | prompt | base ms | llama.cpp ms | " + " | ".join(f"{l} ms (speedup)" for l, _, _, _ in variants) + " |",
              "|---|---|---|---|" + "---|" * len(variants)]
    for r in ttft["rows"]:
        llama = f"{r['llama_cpp_ms']:.1f}" if r.get("llama_cpp_ms") else "–"
        cells = " | ".join(f"{p:.1f} ({r['base_ms']/p:.2f}×)" for p in r["predicted_ms"])
        lines.append(f"| {r['threads']} | {r['prompt']} | {r['base_ms']:.1f} | {llama} | {cells} |")
    lines += ["", f"![TTFT vs accuracy]({args.name}.svg)", ""]
    (results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
