#!/usr/bin/env python3
"""Mixture-of-depths retrofitted to SmolLM2-135M-Instruct (weights frozen): perplexity
against capacity and number of routed blocks, and the chat answer of each setting.
Writes bench/results/mod-smollm2.{md,json,svg}.

The base is the W4A4 file of the quality table (rotated + GPTQ, 8-bit activations at the
normalized residual), `~/.cache/petrel/quality/w4a4-rot-gptq-a8norm.gguf`, made by
`scripts/w4a4_quality.py`. `petrel route-fit` fits one router per block on training text
and writes one routed copy per (capacity, number of blocks); `petrel eval ppl` scores each
on held-out text with top-k routing over each window (what prefill does) and with each
token's causal decision (what decoding does).

    cargo build --release -p petrel-models
    python3 scripts/mod_smollm2.py [--tokens 4096] [--capacities 0.25,0.5,0.75,0.875]
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
CORPORA = HOME / "corpora"
BASE = HOME / "quality/w4a4-rot-gptq-a8norm.gguf"
QUESTION = "What is the capital of France?"


def sh(cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def ppl(model, tokens, threads, routing=None):
    out = Path("/tmp") / f"mod-ppl-{os.getpid()}.json"
    cmd = [PETREL, "eval", "ppl", "--model", model, "--text", CORPORA / "heldout.txt", "--window", "512",
           "--max-tokens", tokens, "--threads", threads, "--json", out]
    if routing:
        cmd += ["--mod-routing", routing]
    sh(cmd)
    return json.loads(out.read_text())


def answer(model):
    text = sh([PETREL, "run", "--kv-type", "f32", "--model", model, "--max-tokens", "24", "--threads", "1", QUESTION])
    return " ".join(text.split())


def svg(rows, dense, path):
    """Perplexity (log scale) against capacity: one line per number of routed blocks, top-k
    solid and causal dashed, the dense model as a horizontal line."""
    import math
    w, h, left, right, top, bottom = 640, 400, 70, 150, 30, 50
    caps = sorted({r["capacity"] for r in rows})
    ys = [r["topk"]["perplexity"] for r in rows] + [r["causal"]["perplexity"] for r in rows] + [dense]
    y_lo, y_hi = math.log(min(ys) * 0.95), math.log(max(ys) * 1.05)
    x_of = lambda c: left + (c - 0.0) / 1.0 * (w - left - right)
    y_of = lambda p: top + (y_hi - math.log(p)) / (y_hi - y_lo) * (h - top - bottom)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w/2 - 60}" y="18">SmolLM2-135M W4A4 + MoD routers (held-out perplexity)</text>']
    for c in [0.0, 0.25, 0.5, 0.75, 1.0]:
        parts.append(f'<line x1="{x_of(c)}" y1="{h-bottom}" x2="{x_of(c)}" y2="{h-bottom+5}" stroke="black"/>')
        parts.append(f'<text x="{x_of(c)-10}" y="{h-bottom+18}">{c:g}</text>')
    ticks = [t for t in (30, 40, 50, 70, 100, 150, 200, 300, 500, 700, 1000) if y_lo <= math.log(t) <= y_hi]
    for p in ticks:
        parts.append(f'<line x1="{left-5}" y1="{y_of(p)}" x2="{w-right}" y2="{y_of(p)}" stroke="#ddd"/>')
        parts.append(f'<text x="{left-45}" y="{y_of(p)+4}">{p:.0f}</text>')
    parts.append(f'<text x="{(w-right+left)/2-60}" y="{h-12}">capacity (fraction routed)</text>')
    parts.append(f'<text x="8" y="{top + 10}">perplexity (log)</text>')
    parts.append(f'<line x1="{left}" y1="{h-bottom}" x2="{w-right}" y2="{h-bottom}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h-bottom}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{y_of(dense)}" x2="{w-right}" y2="{y_of(dense)}" stroke="black" stroke-dasharray="2,3"/>')
    parts.append(f'<text x="{w-right+5}" y="{y_of(dense)+4}">dense {dense:.1f}</text>')
    blocks = sorted({r["blocks_routed"] for r in rows})
    for i, n in enumerate(blocks):
        color = colors[i % len(colors)]
        series = sorted((r for r in rows if r["blocks_routed"] == n), key=lambda r: r["capacity"])
        for key, dash in (("topk", ""), ("causal", ' stroke-dasharray="6,4"')):
            pts = " ".join(f'{x_of(r["capacity"])},{y_of(r[key]["perplexity"])}' for r in series)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            for r in series:
                parts.append(f'<circle cx="{x_of(r["capacity"])}" cy="{y_of(r[key]["perplexity"])}" r="3" fill="{color}"/>')
        parts.append(f'<text x="{w-right+5}" y="{top+20+i*18}" fill="{color}">{n} blocks routed</text>')
    parts.append(f'<text x="{w-right+5}" y="{top+30+len(blocks)*18}">solid: top-k</text>')
    parts.append(f'<text x="{w-right+5}" y="{top+46+len(blocks)*18}">dashed: causal</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored per model")
    ap.add_argument("--capacities", default="0.25,0.5,0.75,0.875")
    ap.add_argument("--blocks", default="4,8,16", help="numbers of routed blocks (auto:N)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HOME / "mod/smollm2")
    ap.add_argument("--choose", choices=["measured", "auto"], default="measured",
                    help="routed blocks: least perplexity cost alone (measured) or route-fit's estimate (auto)")
    ap.add_argument("--probe-tokens", type=int, default=2048, help="held-out tokens per block-sensitivity probe")
    ap.add_argument("--name", default="mod-smollm2", help="base name of the result files")
    args = ap.parse_args()
    for f in (BASE, CORPORA / "train.txt", CORPORA / "heldout.txt", PETREL):
        if not f.exists():
            sys.exit(f"{f} is missing (see this script's docstring)")
    fit = [PETREL, "route-fit", "--model", BASE, "--text", CORPORA / "train.txt",
           "--calib-tokens", "8192", "--sink-tokens", "1", "--threads", args.threads]
    sensitivity = None
    if args.choose == "measured":
        # Which blocks to route, by measurement: each block alone routed at capacity 0.5,
        # scored on the first --probe-tokens held-out tokens; the least hurt are routed.
        probe = args.out / "single"
        layers = [x for l in range(1, 29) for x in ("--layers", str(l))]
        sh(fit + ["--out", probe, "--capacity", "0.5"] + layers)
        sensitivity = {"dense": ppl(BASE, args.probe_tokens, args.threads)["perplexity"]}
        for l in range(1, 29):
            sensitivity[l] = ppl(probe / f"route-c0.5-{l}.gguf", args.probe_tokens, args.threads, "top-k")["perplexity"]
            print(f"block {l} alone at capacity 0.5: {sensitivity[l]:.2f}", flush=True)
            (probe / f"route-c0.5-{l}.gguf").unlink()
        ranked = sorted((l for l in sensitivity if l != "dense"), key=sensitivity.get)
        choices = ["+".join(str(l) for l in sorted(ranked[:int(n)])) for n in args.blocks.split(",")]
    else:
        choices = [f"auto:{n}" for n in args.blocks.split(",")]
    fit += ["--out", args.out, "--capacity", args.capacities]
    for c in choices:
        fit += ["--layers", c]
    sh(fit)
    fitted = json.loads((args.out / "fit.json").read_text())
    dense = ppl(BASE, args.tokens, args.threads)
    dense_answer = answer(BASE)
    rows = []
    for f in fitted["files"]:
        model = args.out / f["file"]
        row = {"file": f["file"], "capacity": f["capacity"], "blocks": f["blocks"], "blocks_routed": len(f["blocks"]),
               "topk": ppl(model, args.tokens, args.threads, "top-k"),
               "causal": ppl(model, args.tokens, args.threads, "causal"),
               "answer": answer(model)}
        rows.append(row)
        print(f'{f["file"]}: top-k {row["topk"]["perplexity"]:.2f}, causal {row["causal"]["perplexity"]:.2f} '
              f'({row["causal"]["routed_fraction"]:.3f} routed); {row["answer"][:60]}', flush=True)
    results = ROOT / "bench/results"
    dp = dense["perplexity"]
    (results / f"{args.name}.json").write_text(json.dumps(
        {"base": str(BASE), "dense": dense, "dense_answer": dense_answer, "fit": fitted, "rows": rows,
         "block_sensitivity": sensitivity, "choose": args.choose}, indent=1) + "\n")
    svg(rows, dp, results / f"{args.name}.svg")
    lines = [
        "# Mixture-of-depths retrofitted to SmolLM2-135M-Instruct (W4A4, weights frozen)",
        "",
        f"Base: `{BASE.name}` (held-out perplexity {dp:.2f} on the first {dense['tokens_scored'] + 1} held-out tokens, "
        "window 512, stride 256). Routers fitted by `petrel route-fit` on 8,192 training tokens; the first token of "
        "each context always goes through (attention sink). Routed blocks chosen "
        + ("by measurement (each block alone routed at capacity 0.5; the least hurt first)" if args.choose == "measured"
           else "by route-fit's skip-cost estimate")
        + f". Produced by `python3 scripts/mod_smollm2.py --choose {args.choose}`.",
        "",
        "Block work skipped at decode = share of block visits the causal decisions skip, over all 30 blocks.",
        "",
        "| blocks routed | capacity | top-k ppl | vs dense | causal ppl | vs dense | causal routed share | block work skipped at decode | answer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["blocks_routed"], r["capacity"])):
        tk, ca = r["topk"]["perplexity"], r["causal"]["perplexity"]
        skipped = r["blocks_routed"] * (1 - r["causal"]["routed_fraction"]) / 30
        lines.append(f'| {r["blocks_routed"]} | {r["capacity"]} | {tk:.2f} | {100*(tk/dp-1):+.1f}% | {ca:.2f} | '
                     f'{100*(ca/dp-1):+.1f}% | {r["causal"]["routed_fraction"]:.3f} | {100*skipped:.1f}% | {r["answer"][:70]} |')
    lines += ["", f"Dense answer: {dense_answer}", "", f"![perplexity vs capacity]({args.name}.svg)", ""]
    if sensitivity:
        lines += ["Each block alone routed at capacity 0.5 (top-k perplexity on the first "
                  f"{args.probe_tokens} held-out tokens):", "",
                  "| block | " + " | ".join(str(l) for l in sensitivity) + " |",
                  "|---|" + "---|" * len(sensitivity),
                  "| ppl | " + " | ".join(f"{v:.1f}" for v in sensitivity.values()) + " |", ""]
    (results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        # Redraw the SVG from an existing results JSON.
        data = json.loads(Path(sys.argv[2]).read_text())
        svg(data["rows"], data["dense"]["perplexity"], Path(sys.argv[2]).with_suffix(".svg"))
    else:
        main()
