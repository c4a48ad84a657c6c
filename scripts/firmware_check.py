#!/usr/bin/env python3
"""Builds the firmware for both cores, runs it under QEMU and checks it (issue 8).

For the Cortex-M4F (mps2-an386) and the Cortex-M55 (mps3-an547, Helium):
  1. the in-QEMU kernel check (DSP, Helium against the scalar reference, bit for bit);
  2. the demo: its prompt and generated token ids must equal the desktop runtime's
     (`petrel run --raw --token-ids`, greedy, same file, same context), for every kernel set;
  3. the fault drills (truncated model in flash, prompt longer than the context) must end
     with an `error:` line and exit code 1;
and, on the M4F, the plain-semihosting fallback build. Then it writes the table of flash,
RAM, stack and instructions per token to bench/results/firmware.{md,json}.

Needs: Debian's rustc-web/cargo-web/rust-web-src (see ../shared/TOOLCHAINS.md),
qemu-system-arm, defmt-print, readelf, and `cargo build --release -p petrel-models`.
Exit status 0 only if every check passed.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
MODEL = ROOT / "models/petrel-tiny/petrel-tiny-w4a4.gguf"
PETREL = ROOT / "target/release/petrel"
PROMPT, NEW_TOKENS, CONTEXT = "The king said", 32, 36  # as firmware/src/main.rs
CORES = [
    # name, target, machine, features
    ("Cortex-M4F", "thumbv7em-none-eabihf", "mps2-an386", []),
    ("Cortex-M55", "thumbv8m.main-none-eabihf", "mps3-an547", ["helium"]),
]
ENV = dict(os.environ, RUSTC="/usr/bin/rustc", RUSTDOC="/usr/bin/rustdoc", RUSTC_BOOTSTRAP="1")
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def build(target, features, default=True):
    cmd = ["/usr/bin/cargo", "build", "--release", "--target", target, "--bins"]
    if not default:
        cmd.append("--no-default-features")
    if features:
        cmd += ["--features", ",".join(features)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=FIRMWARE, env=ENV, check=True)
    return FIRMWARE / "target" / target / "release"


def run(machine, elf):
    proc = subprocess.run(["./qemu-run.sh", machine, str(elf)], cwd=FIRMWARE, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    print(out.rstrip(), flush=True)
    return proc.returncode, out


def ids(line_name, text):
    m = re.search(rf"^{line_name}: ([0-9 ]+)$", text, re.M)
    return [int(t) for t in m.group(1).split()] if m else None


def sections(elf):
    out = subprocess.run(["readelf", "-S", "-W", str(elf)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for m in re.finditer(r"\]\s+(\.\S+)\s+\S+\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)", out):
        sizes[m.group(1)] = int(m.group(2), 16)
    return sizes


def main():
    host = subprocess.run([str(PETREL), "run", "--raw", "--token-ids", "--kv-type", "f32", "--temperature", "0", "-n", str(NEW_TOKENS),
                           "--context", str(CONTEXT), "-t", "1", "--model", str(MODEL), PROMPT],
                          capture_output=True, text=True, check=True).stderr
    host_prompt = [int(t) for t in re.search(r"\[prompt ids: ([0-9 ]+)\]", host).group(1).split()]
    host_ids = [int(t) for t in re.search(r"\[generated ids: ([0-9 ]+)\]", host).group(1).split()]
    print(f"host runtime: prompt {host_prompt}, generated {host_ids}")

    rows, cores = [], {}
    for name, target, machine, features in CORES:
        out_dir = build(target, features)
        rc, text = run(machine, out_dir / "kernel_check")
        check(rc == 0 and "bit-identical" in text, f"{name}: in-QEMU kernel check (exit {rc})")
        costs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^cost (\S+): w4a4 384x128 (\d+) instructions", text, re.M)}

        rc, text = run(machine, out_dir / "petrel-firmware")
        check(rc == 0, f"{name}: demo exits 0 (exit {rc})")
        check(ids("prompt ids", text) == host_prompt, f"{name}: prompt token ids equal the host runtime's")
        check(ids("generated ids", text) == host_ids, f"{name}: generated token ids equal the host runtime's")
        kernels = re.findall(r"^kernels (\S+): prefill (\d+) instructions \((\d+) tokens\), decode (\d+) instructions per token",
                             text, re.M)
        same = re.findall(r"^kernels (\S+): same tokens as the reference", text, re.M)
        check(len(kernels) >= 2 and len(same) == len(kernels) - 1, f"{name}: every kernel set generated the same tokens")
        mem = re.search(r"heap peak (\d+) of (\d+) bytes, stack high-water (\d+) of (\d+) bytes", text)
        heap_peak, heap_arena, stack, stack_room = (int(g) for g in mem.groups())
        s = sections(out_dir / "petrel-firmware")
        scalar = next(int(d) for k, _, _, d in kernels if k == "scalar")
        cores[name] = {"machine": machine, "sections": s, "heap_peak": heap_peak, "heap_arena": heap_arena,
                       "stack_high_water": stack, "stack_room": stack_room, "kernel_costs_384x128": costs,
                       "kernels": {k: {"prefill_instructions": int(p), "prompt_tokens": int(n),
                                       "decode_instructions_per_token": int(d)} for k, p, n, d in kernels}}
        for k, p, n, d in kernels:
            rows.append((name, k, int(p), int(n), int(d), scalar / int(d)))

        for fault, expect in (("fault-corrupt-model", "not a valid GGUF file"), ("fault-long-prompt", "context")):
            out_fault = build(target, features + [fault])
            rc, text = run(machine, out_fault / "petrel-firmware")
            check(rc == 1 and re.search(r"^error: .*" + expect, text, re.M) is not None,
                  f"{name}: {fault} ends with an error line and exit 1 (exit {rc})")
        build(target, features)  # leave the normal images in place

    # The M55's "scalar" row above is the reference as LLVM compiles it for the M55, which
    # auto-vectorizes parts of it with MVE. The same image without MVE code generation shows
    # what truly scalar code costs on that core.
    no_mve = dict(ENV, RUSTFLAGS="-C link-arg=-Tlink.x -C target-cpu=cortex-m55 -C target-feature=-neon,-mve,-mve.fp")
    cmd = ["/usr/bin/cargo", "build", "--release", "--target", "thumbv8m.main-none-eabihf", "--target-dir", "target/m55-no-mve",
           "--bin", "petrel-firmware"]
    print("$ RUSTFLAGS='" + no_mve["RUSTFLAGS"] + "'", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=FIRMWARE, env=no_mve, check=True)
    rc, text = run("mps3-an547", FIRMWARE / "target/m55-no-mve/thumbv8m.main-none-eabihf/release/petrel-firmware")
    check(rc == 0 and ids("generated ids", text) == host_ids, "Cortex-M55 without MVE code generation: same tokens, exit 0")
    kernels = re.findall(r"^kernels (\S+): prefill (\d+) instructions \((\d+) tokens\), decode (\d+) instructions per token",
                         text, re.M)
    cores["Cortex-M55, no MVE codegen"] = {"kernels": {k: {"prefill_instructions": int(p), "prompt_tokens": int(n),
                                                          "decode_instructions_per_token": int(d)} for k, p, n, d in kernels}}
    helium = cores["Cortex-M55"]["kernels"]["helium"]["decode_instructions_per_token"]
    extra = [f"| Cortex-M55, built without MVE code generation | {k} | {int(p):,} | {int(d):,} | "
             f"(the Helium image takes {int(d) / helium:.2f}× fewer) |" for k, p, _, d in kernels]

    out_dir = build("thumbv7em-none-eabihf", ["semihosting-log"], default=False)
    rc, text = run("mps2-an386", out_dir / "petrel-firmware")
    check(rc == 0 and ids("generated ids", text) == host_ids, "Cortex-M4F, plain semihosting log: same tokens, exit 0")
    build("thumbv7em-none-eabihf", [])

    results = ROOT / "bench/results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "firmware.json").write_text(json.dumps({"prompt": PROMPT, "context": CONTEXT, "new_tokens": NEW_TOKENS,
                                                       "host_ids": host_ids, "cores": cores}, indent=1) + "\n")
    kib = lambda b: f"{b / 1024:.1f} KiB"
    lines = ["# Petrel-tiny firmware under QEMU (`python3 scripts/firmware_check.py`)", "",
             f"Prompt \"{PROMPT}\", {NEW_TOKENS} greedy tokens, KV cache of {CONTEXT} positions; the tokens equal the "
             "desktop runtime's on both cores and for every kernel set.", "",
             "## Flash and RAM (linker sections, `readelf -S`; heap peak and stack high-water measured in QEMU)", "",
             "| core | .vector_table + .text | .rodata | .model (flash) | .data | .bss | .uninit (heap arena) "
             "| heap peak | stack high-water | RAM used (.data + .bss + .uninit + stack) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in cores.items():
        if "sections" not in c:
            continue
        sec = c["sections"]
        ram = sum(sec.get(k, 0) for k in (".data", ".bss", ".uninit")) + c["stack_high_water"]
        lines.append(f"| {name} | {kib(sec.get('.vector_table', 0) + sec.get('.text', 0))} | {kib(sec.get('.rodata', 0))} "
                     f"| {kib(sec.get('.model', 0))} | {sec.get('.data', 0)} B | {sec.get('.bss', 0)} B "
                     f"| {kib(sec.get('.uninit', 0))} | {kib(c['heap_peak'])} | {kib(c['stack_high_water'])} | {kib(ram)} |")
    lines += ["", "## Instructions (SysTick under `qemu-system-arm -icount shift=0`, calibrated on a loop of known length)",
              "", "| core | kernels | prefill (3 prompt tokens) | per decoded token | fewer than scalar, same image |",
              "|---|---|---|---|---|"]
    for core, k, prefill, n, decode, ratio in rows:
        lines.append(f"| {core} | {k} | {prefill:,} | {decode:,} | {ratio:.2f}× |")
    lines += extra
    lines += ["", "The M55's own `scalar` row is the reference as LLVM compiles it for the M55 (it auto-vectorizes parts "
              "of it with MVE); the last rows are the same firmware built with MVE code generation off, for the cost of "
              "truly scalar code on that core."]
    (results / "firmware.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failures:
        print(f"\n{len(failures)} check(s) failed:", *failures, sep="\n  ")
        return 1
    print("\nall firmware checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
