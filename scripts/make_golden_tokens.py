#!/usr/bin/env python3
"""Write testdata/llama_cpp/tokens*.json: llama.cpp's token ids for tricky strings.

Usage (with the venv that bench/llama/setup.sh creates):

    $PETREL_HOME/llama-venv/bin/python scripts/make_golden_tokens.py [--model GGUF] [--out FILE]
    $PETREL_HOME/llama-venv/bin/python scripts/make_golden_tokens.py --all

Defaults: model $PETREL_HOME/SmolLM2-135M-Instruct.Q4_1.gguf (PETREL_HOME defaults to
~/.cache/petrel), out testdata/llama_cpp/tokens.json. With --all it also writes
tokens_gemma3.json (gemma-3-270m-q4_k_m.gguf, SentencePiece with byte fallback) and
tokens_qwen25.json (qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, qwen2 pre-tokenizer), with
EXTRA_CASES added. Every file is tokenized with add_bos as the model's metadata says
(llama_vocab_get_add_bos; false for SmolLM2) and special=True, and its metadata also
records llama.cpp's BOS/EOS/EOT, add_bos/add_eos and the end-of-generation ids
(llama_vocab_is_eog over the whole vocabulary).

The model's tokenizer is GPT-2 byte-level BPE with the `smollm` pre-tokenizer (digits split
one by one, no added prefix space). Only the vocabulary is loaded (vocab_only=True).

Each case is {"text", "ids", "detok", "roundtrip"}:
  ids        tokenize(text.encode(), add_bos=False, special=True): special tokens such as
             <|im_start|> inside the text become their single ids
  detok      llama_detokenize(ids, remove_special=False, unparse_special=True): llama.cpp's
             own inverse, special tokens rendered as text
  roundtrip  detok == text
"""

import argparse
import ctypes
import hashlib
import json
import os
import sys

import llama_cpp
from llama_cpp import Llama

CASES = [
    # empty, spaces, whitespace runs
    "",
    " ",
    "  ",
    "hello",
    " hello",
    "  hello",
    "Hello world",
    "hello   world",
    "trailing space ",
    "trailing spaces   ",
    "    four leading spaces",
    "\t",
    "tab\tseparated\tvalues\t",
    "\n",
    "\n\n\n",
    "line1\nline2\n\nline4",
    "windows\r\nline\r\n",
    "   \n   \n\t \n",
    "\u00a0nbsp\u2003emspace\u200bzwsp",
    # contractions
    "It's",
    "they're we've I'm you'll he'd isn't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D ISN'T",
    "It'S mixed 'Re 'vE 'Ll 'D",
    "'s 't 're 've 'm 'll 'd",
    " 's",
    "don\u2019t won\u2019t",
    "Mr. Smith's 2nd-place finish (3rd overall)",
    # digits and numbers
    "0",
    "1234567890",
    "3.14159",
    "1,000,000",
    "10 000 and 1 234.5",
    "-42 +7 1e-9 0x1F",
    "2024-03-15T12:34:56Z",
    "Version 1.2.3-beta",
    "Order 66 shipped 1234567 units",
    # punctuation runs
    "!!!???...",
    "Hello!!! What?! ...wait...",
    "(){}[]<>;:,.",
    "a--b---c___d",
    "$$$ %%% ^^^ &&& *** ###",
    "\x07bell \x1b[0m escape",
    # URLs, paths, markup, code
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "C:\\Users\\name\\file.txt",
    "<html><body class=\"x\">Hi</body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "def f(x):\n    if x:\n        return x * 2\n    return None\n",
    "fn main() {\n\tprintln!(\"hi\");\n}",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\"\n",
    "x = y+z*2; // comment",
    "mixedCASE camelCase snake_case SCREAMING_CASE",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    # accents and scripts
    "Caf\u00e9",
    "na\u00efve fa\u00e7ade d\u00e9j\u00e0 vu",
    "e\u0301 (e + combining acute)",
    "Zoe\u0308 n\u0303o",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002",
    "\u4e2d\u6587\uff0c\u6807\u70b9\u7b26\u53f7\uff01",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b1\u03b9 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u044f\u0437\u044b\u043a",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0939\u093f\u0928\u094d\u0926\u0940",
    "\u0e44\u0e17\u0e22",
    "Latin, \u4e2d\u6587, and \u0440\u0443\u0441\u0441\u043a\u0438\u0439 in one line",
    # emoji
    "\U0001f680\U0001f525",
    "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5",
    "Emoji: \U0001f680\U0001f525\U0001f44d\U0001f3fd and text",
    # special tokens
    "<|im_start|>user\nHi<|im_end|>\n",
    "before<|im_start|>after",
    "text <|im_end|> more <|endoftext|> end",
    "<|im_start|",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


# Extra cases for the SentencePiece byte fallback (Gemma) and the qwen2 pre-tokenizer.
EXTRA_CASES = [
    "\U00020000\U0002a6a5\u9f98 rare CJK",
    "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522",
    "\U0001fae0\U0001f9ac\U0001fabf new emoji",
    "\x00\x01\x02\x7f controls \x1f\x0b\x0c",
    "nul\x00inside",
    "\ue000\uf8ff private use \U000f0000",
    "\ufeffBOM and \u200d ZWJ \u2060",
    " " * 37,
    "x" + " " * 17 + "y",
    "\t\t\t\tindented\n\t\t\t\t\tmore\n",
    "\n" * 9,
    " \n \n\n  \r\n\t \u3000",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i] * b[i];\n}\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "HELLO'S WORLD'LL 'RE 'VE 'M 'D 'T",
    "12345678901234567890",
    "\u0661\u0662\u0663 \u0967\u0968 \uff11\uff12 \u2460\u2461 \u00bd",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<bos>text<eos> <pad> <unk>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "\u2581already escaped\u2581\u2581",
]

MODELS = [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "tokens.json", False),
    ("gemma-3-270m-q4_k_m.gguf", "tokens_gemma3.json", True),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "tokens_qwen25.json", True),
]


def detok(llm: Llama, ids: list) -> str:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, True)
    assert n >= 0, n
    return buf.raw[:n].decode("utf-8", errors="replace")


def write(model: str, out: str, repo: str, full: bool) -> None:
    """Writes one golden file. `full`: with EXTRA_CASES."""
    with open(model, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    cases, bad = [], 0
    for text in CASES + (EXTRA_CASES if full else []):
        if text or add_bos:
            ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        else:
            ids = []
        back = detok(llm, ids)
        cases.append({"text": text, "ids": ids, "detok": back, "roundtrip": back == text})
        if back != text:
            bad += 1
            print(f"no round trip: {text!r} -> {ids} -> {back!r}", file=sys.stderr)

    c = lambda v: json.dumps(v, ensure_ascii=False)
    meta = {
        "llama_cpp_python_version": llama_cpp.__version__,
        "model_file": os.path.basename(model),
        "model_sha256": digest,
        "tokenize": f"tokenize(text.encode(), add_bos={add_bos}, special=True)",
        "detokenize": "llama_detokenize(ids, remove_special=False, unparse_special=True)",
        "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), repo)] + sys.argv[1:]),
    }
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    meta.update({
        "add_bos": add_bos,
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "eot": llama_cpp.llama_vocab_eot(vocab),
        "n_tokens": n,
        "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
    })
    body = '{\n"metadata": ' + c(meta) + ',\n"cases": [\n' + ",\n".join("  " + c(x) for x in cases) + "\n]\n}\n"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(body)
    print(f"wrote {out}: {len(cases)} cases, {bad} without round trip", file=sys.stderr)


def main() -> int:
    home = os.environ.get("PETREL_HOME", os.path.expanduser("~/.cache/petrel"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(home, MODELS[0][0]))
    ap.add_argument("--out", default=os.path.join(repo, "testdata", "llama_cpp", MODELS[0][1]))
    ap.add_argument("--all", action="store_true", help="write the golden files of all MODELS")
    args = ap.parse_args()
    if args.all:
        for name, out, full in MODELS:
            write(os.path.join(home, name), os.path.join(repo, "testdata", "llama_cpp", out), repo, full)
    else:
        write(args.model, args.out, repo, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
