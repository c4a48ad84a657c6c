#!/usr/bin/env python3
"""Measure llama.cpp's speed on a GGUF file with llama-bench; print normalized JSON.

Usage:
    python3 bench/llama/llama_speed.py MODEL.gguf [--threads 1,2] [--prompts 64,256,1024]
        [--gen 128] [--reps 2] [--llama-bench PATH] [-- EXTRA LLAMA-BENCH ARGS...]

Needs only the Python standard library and the llama-bench binary that bench/llama/setup.sh
builds (default: $PETREL_LLAMA_BUILD/bin/llama-bench, PETREL_LLAMA_BUILD defaulting to
$PETREL_HOME/llama.cpp-build, PETREL_HOME to ~/.cache/petrel).

Runs `llama-bench -m MODEL -p 64,256,1024 -n 128 -t 1,2 -r 2 -o json` and prints to stdout
one JSON list, one object per (threads, test):

    [{"model": "MODEL.gguf", "threads": 1, "test": "pp64", "tokens_per_second": 1234.5,
      "stddev_tokens_per_second": 3.2, "best_tokens_per_second": 1237.1, "n_prompt": 64,
      "n_gen": 0, "repetitions": 2, "flash_attn": "auto", "repack": true, "type_k": "f16",
      "type_v": "f16", "build_commit": "0c1e570"}, ...]

"model" is the path exactly as given; "test" is ppN (prompt processing of N tokens, one batch)
or tgN (generation of N tokens, one at a time, from an empty context); "tokens_per_second" is
llama-bench's mean over the repetitions. Only the first four keys are the contract; the rest
are context, among them "best_tokens_per_second", the fastest repetition (for best-of-N
comparisons such as `petrel-bench w4a4`). llama-bench's own progress goes to stderr.
Exit status is non-zero if llama-bench fails.

Note: llama-bench's default flash attention is "auto" (on for the CPU backend), unlike
llama-cpp-python's Llama(), which defaults to flash_attn=False. Pass `-- -fa 0` to match that.
"repack" (default on) lets ggml repack Q4_0 weights into its interleaved AVX2/AVX-512 layout;
it is worth ~1.5x on prompt processing for Q4_0 here (`-- --repack 0` turns it off).
Extra arguments that sweep a parameter give several rows with the same "test".
"""

import argparse
import json
import os
import subprocess
import sys


def default_bench() -> str:
    home = os.environ.get("PETREL_HOME", os.path.expanduser("~/.cache/petrel"))
    build = os.environ.get("PETREL_LLAMA_BUILD", os.path.join(home, "llama.cpp-build"))
    return os.path.join(build, "bin", "llama-bench")


def fa_name(v) -> str:
    return {-1: "auto", 0: "off", 1: "on", True: "on", False: "off"}.get(v, str(v))


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompts", default="64,256,1024")
    ap.add_argument("--gen", default="128")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--llama-bench", default=default_bench())
    args = ap.parse_args(argv)

    if not os.access(args.llama_bench, os.X_OK):
        print(f"llama-bench not found at {args.llama_bench}; run bench/llama/setup.sh", file=sys.stderr)
        return 2
    cmd = [args.llama_bench, "-m", args.model, "-p", args.prompts, "-n", args.gen,
           "-t", args.threads, "-r", str(args.reps), "-o", "json", *extra]
    print("+ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"llama-bench exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode or 1
    rows = json.loads(proc.stdout)

    out = []
    for r in rows:
        n_prompt, n_gen = int(r["n_prompt"]), int(r["n_gen"])
        if n_prompt > 0 and n_gen == 0:
            test = f"pp{n_prompt}"
        elif n_gen > 0 and n_prompt == 0:
            test = f"tg{n_gen}"
        else:
            test = f"pp{n_prompt}+tg{n_gen}"
        out.append({
            "model": args.model,
            "threads": int(r["n_threads"]),
            "test": test,
            "tokens_per_second": float(r["avg_ts"]),
            "stddev_tokens_per_second": float(r["stddev_ts"]),
            "best_tokens_per_second": max(map(float, r.get("samples_ts") or [r["avg_ts"]])),
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "repetitions": len(r.get("samples_ts", [])) or args.reps,
            "flash_attn": fa_name(r.get("flash_attn")),
            "repack": r.get("repack"),
            "type_k": r.get("type_k"),
            "type_v": r.get("type_v"),
            "build_commit": r.get("build_commit"),
        })
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
