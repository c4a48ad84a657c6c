#!/usr/bin/env python3
"""Write testdata/llama_cpp/golden*.json: llama.cpp's logits and greedy output on fixed prompts.

Usage (with the venv that bench/llama/setup.sh creates):

    $PETREL_HOME/llama-venv/bin/python scripts/make_golden.py [--preset NAME] [--model FILE] [--out FILE]

Presets (the model file in $PETREL_HOME, default ~/.cache/petrel, and the output under
testdata/llama_cpp/ of the repository):
  smollm2-135m        SmolLM2-135M-Instruct.Q4_1.gguf          -> golden.json
  gemma3-270m         gemma-3-270m-q4_k_m.gguf                 -> golden-gemma3-270m.json
  qwen2.5-coder-0.5b  qwen2.5-coder-0.5b-instruct-q4_k_m.gguf  -> golden-qwen2.5-coder-0.5b.json

What is recorded, per prompt (all token ids are llama.cpp's, tokenized with
add_bos as the model's metadata says (`tokenizer.ggml.add_bos_token`), special=True;
logits are rounded to 4 decimals):

  tokens         prompt token ids, length P
  prompt_top     P entries; entry i is the top-64 [id, logit] pairs (logit descending, ties
                 by id ascending) of the logits at position i, i.e. after feeding tokens[0..=i]
  generated      32 greedy ids: generated[0] = argmax of the logits at position P-1,
                 generated[k] = argmax of generated_top[k-1]'s full logits
  generated_top  32 entries; entry k is the top-64 of the logits after feeding generated[k]
                 (position P+k). So every position 0..P+32 has exactly one top-64 entry.
  eos_index      index in `generated` of the first end-of-generation token, or null.
                 Generation does NOT stop at end-of-generation: all 32 tokens are produced
                 and fed back, so the tail after eos_index is still a valid forward-pass check.
  generated_text llama.cpp's detokenization of `generated` (special tokens rendered)

Settings: Llama(logits_all=True, n_ctx=2048, n_threads=2, seed=0), llama-cpp-python's
defaults otherwise (flash attention off, f16 KV cache, n_batch 512). The prompt is evaluated
in one batch, then one token per eval call.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

PROMPTS = {
    "english": "The quick brown fox jumps over the lazy dog. Rivers carry sediment toward the sea, where it settles into deltas.",
    "code": "fn main() {\n    let xs: Vec<u32> = (1..=10).map(|x| x * x).collect();\n    println!(\"{:?}\", xs);\n}\n",
    "digits_whitespace": "Order 66 shipped 1234567 units on 2024-03-15.\n\n\tTotal:    $98,765.43   \n\n\n   end",
    "unicode": "Café déjà vu — naïve façade. 日本語のテキスト。Emoji: 🚀🔥👍🏽 and Ελληνικά, русский.",
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
}
CHAT_TOKENS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
PRESETS = {
    "smollm2-135m": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "out": "golden.json",
        "prompts": PROMPTS,
    },
    "gemma3-270m": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "out": "golden-gemma3-270m.json",
        # A base model: raw text, and Gemma's own turn markers for the chat-shaped prompt.
        "prompts": {
            **{k: v for k, v in PROMPTS.items() if k != "chat"},
            "story": "Once upon a time",
            "chat": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
        },
    },
    "qwen2.5-coder-0.5b": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "out": "golden-qwen2.5-coder-0.5b.json",
        "prompts": {
            **{k: v for k, v in PROMPTS.items() if k != "chat"},
            "chat": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n",
        },
    },
}
TOP_K = 64
N_GEN = 32
N_CTX = 2048
N_THREADS = 2
SEED = 0


def top_k(logits: np.ndarray) -> list:
    idx = np.argpartition(-logits, TOP_K)[:TOP_K]
    order = sorted(idx.tolist(), key=lambda i: (-float(logits[i]), i))
    return [[i, round(float(logits[i]), 4)] for i in order]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ggml_commit() -> str | None:
    """The commit string that ggml embeds in the library (e.g. '0c1e570-dirty')."""
    import ctypes

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(libdir, name)
        if os.path.exists(path):
            fn = getattr(ctypes.CDLL(path), "ggml_commit", None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def detok(llm: Llama, ids: list) -> str:
    """llama.cpp's own llama_detokenize (no leading-space stripping, special tokens shown)."""
    import ctypes

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, True)
    assert n >= 0, n
    return buf.raw[:n].decode("utf-8", errors="replace")


def dump(golden: dict) -> str:
    """Valid JSON, one line per metadata field, per scalar field and per top-64 list."""
    c = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    meta = ",\n".join(f"  {c(k)}: {c(v)}" for k, v in golden["metadata"].items())
    prompts = []
    for r in golden["prompts"]:
        fields = []
        for k, v in r.items():
            if k.endswith("_top"):
                rows = ",\n".join(f"      {c(row)}" for row in v)
                fields.append(f"    {c(k)}: [\n{rows}\n    ]")
            else:
                fields.append(f"    {c(k)}: {c(v)}")
        prompts.append("  {\n" + ",\n".join(fields) + "\n  }")
    return '{\n"metadata": {\n' + meta + '\n},\n"prompts": [\n' + ",\n".join(prompts) + "\n]\n}\n"


def run_prompt(llm: Llama, name: str, text: str, add_bos: bool) -> dict:
    tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
    llm.reset()
    llm.eval(tokens)
    p = len(tokens)
    prompt_top = [top_k(llm.scores[i]) for i in range(p)]
    generated, generated_top = [], []
    nxt = int(np.argmax(llm.scores[p - 1]))
    for k in range(N_GEN):
        generated.append(nxt)
        llm.eval([nxt])
        logits = llm.scores[p + k]
        generated_top.append(top_k(logits))
        nxt = int(np.argmax(logits))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eos_index = next((k for k, t in enumerate(generated) if llama_cpp.llama_vocab_is_eog(vocab, t)), None)
    return {
        "name": name,
        "text": text,
        "tokens": tokens,
        "prompt_top": prompt_top,
        "generated": generated,
        "generated_top": generated_top,
        "eos_index": eos_index,
        "generated_text": detok(llm, generated),
    }


def main() -> int:
    home = os.environ.get("PETREL_HOME", os.path.expanduser("~/.cache/petrel"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    ap.add_argument("--model", help="the GGUF file (default: the preset's file in $PETREL_HOME)")
    ap.add_argument("--out", help="the JSON to write (default: the preset's file under testdata/llama_cpp/)")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    args.model = args.model or os.path.join(home, preset["file"])
    args.out = args.out or os.path.join(repo, "testdata", "llama_cpp", preset["out"])

    digest = sha256(args.model)
    if digest != preset["sha256"]:
        print(f"warning: {args.model} has sha256 {digest}, expected {preset['sha256']}", file=sys.stderr)

    llm = Llama(model_path=args.model, logits_all=True, n_ctx=N_CTX, n_threads=N_THREADS, seed=SEED, verbose=False)
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
    cparams = llm.context_params
    results = []
    for name, text in preset["prompts"].items():
        r = run_prompt(llm, name, text, add_bos)
        results.append(r)
        print(f"{name}: {len(r['tokens'])} prompt tokens, eos_index={r['eos_index']}, "
              f"greedy: {r['generated_text']!r}", file=sys.stderr)

    chat = next(r for r in results if r["name"] == "chat")
    answer = detok(llm, chat["generated"][: chat["eos_index"]] if chat["eos_index"] is not None else chat["generated"])
    ok_tokens = ok_answer = True
    if args.preset == "smollm2-135m":
        ok_tokens = chat["tokens"] == CHAT_TOKENS
        ok_answer = answer.startswith("The capital of France is Paris.")
        print(f"chat tokens match expected: {ok_tokens}", file=sys.stderr)
    print(f"chat greedy answer: {answer!r}", file=sys.stderr)

    golden = {
        "metadata": {
            "llama_cpp_python_version": llama_cpp.__version__,
            "llama_cpp_commit": ggml_commit(),
            "model_file": os.path.basename(args.model),
            "model_sha256": digest,
            "n_threads": N_THREADS,
            "n_ctx": N_CTX,
            "n_batch": llm.n_batch,
            "seed": SEED,
            "flash_attn": cparams.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "kv_cache_type": "f16" if cparams.type_k == 1 and cparams.type_v == 1 else f"k={cparams.type_k},v={cparams.type_v}",
            "tokenize": f"tokenize(text.encode(), add_bos={add_bos}, special=True)",
            "add_bos": add_bos,
            "top_k": TOP_K,
            "n_generated": N_GEN,
            "logit_decimals": 4,
            "stops_at_eos": False,
            "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), repo)] + sys.argv[1:]),
            "python_executable": sys.executable,
        },
        "prompts": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dump(golden))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)
    return 0 if ok_tokens and ok_answer else 1


if __name__ == "__main__":
    sys.exit(main())
