#!/usr/bin/env python3
"""Golden chat-template renderings for runtime/tests/chat_templates.rs.

Renders three conversations with every chat template of interest, using
llama-cpp-python 0.3.36's own `Jinja2ChatFormatter` (jinja2's ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, loop controls, HF's {% generation %} pass-through, a
json.dumps `tojson`, `raise_exception`, `strftime_now`), and writes one JSON file per
template to testdata/llama_cpp/chat/golden/.

Where the class comes from: `from llama_cpp.llama_chat_format import Jinja2ChatFormatter`
when llama_cpp imports (e.g. run with the llama-cpp-python venv's python); otherwise the
class's source is taken verbatim from the sdist's llama_cpp/llama_chat_format.py (with
`ast`) and executed against jinja2 with stand-ins for the llama_cpp-internal names it
only uses in type annotations. The JSON records which (`"formatter"`).

Template sources:
  * `tokenizer.chat_template` of the model files in $PETREL_HOME (default
    ~/.cache/petrel): SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (read with the
    `gguf` package); bos/eos are those tokens' texts.
  * every vendor/llama.cpp/models/templates/*.jinja of the sdist
    ($PETREL_LLAMA_SRC = that vendor/llama.cpp dir, else
    $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp); bos/eos are chosen
    by model family (see `family_tokens`) and recorded in the JSON.
The sources of the models' templates and of SELECTED sdist templates are copied to
testdata/llama_cpp/chat/templates/ so their goldens can be checked without the sdist.

`strftime_now` is pinned to 2024-07-26 00:00:00 (NOW_UNIX, UTC) so that goldens do not
change from day to day; the Rust test passes the same time in RenderOptions::now.

Usage: python3 scripts/make_golden_chat.py   (needs jinja2 and gguf)
"""

import ast
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "llama_cpp" / "chat"
HOME = Path(os.environ.get("PETREL_HOME", Path.home() / ".cache" / "petrel"))
SDIST = HOME / "llama-sdist" / "llama_cpp_python-0.3.36"
LLAMA_SRC = Path(os.environ.get("PETREL_LLAMA_SRC", SDIST / "vendor" / "llama.cpp"))

NOW_UNIX = 1721952000  # 2024-07-26T00:00:00Z
NOW = datetime.fromtimestamp(NOW_UNIX, tz=timezone.utc).replace(tzinfo=None)

MODELS = {
    # golden name: model file in $PETREL_HOME
    "SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}

# sdist templates whose sources are copied into testdata (checked without the sdist).
SELECTED = [
    "google-gemma-2-2b-it",  # the sdist has no Gemma 3 template; Gemma 2's is the same format
    "google-gemma-4-31B-it",
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "microsoft-Phi-3.5-mini-instruct",
    "HuggingFaceTB-SmolLM3-3B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-V3.1",
    "Qwen-Qwen3-0.6B",
    "ibm-granite-granite-3.3-2B-Instruct",
    "openai-gpt-oss-120b",
]

CONVERSATIONS = [
    {
        "name": "a",
        "add_generation_prompt": True,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
    },
    {
        "name": "b",
        "add_generation_prompt": True,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
    },
    {
        "name": "c",
        "add_generation_prompt": True,
        "messages": [
            {
                "role": "user",
                "content": "  Grüße aus Zürich — 日本語, emoji 🐦 and \"quotes\"\nsecond line\n\n\ttabbed line  \n",
            }
        ],
    },
]


def family_tokens(name):
    """(bos, eos) texts for an sdist template, by model family."""
    n = name.lower()
    if "llama-3" in n or "hermes-2-pro-llama-3" in n or "hermes-3-llama-3" in n or "firefunction" in n or "functionary" in n:
        return "<|begin_of_text|>", "<|eot_id|>"
    if "gemma" in n:
        return "<bos>", "<eos>"
    if "deepseek" in n:
        return "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    if "qwen" in n or "smollm" in n:
        return "<|im_start|>", "<|im_end|>"
    if "phi" in n:
        return "<s>", "<|endoftext|>"
    return "<s>", "</s>"


def load_formatter():
    """llama-cpp-python's Jinja2ChatFormatter, and a description of where it came from."""
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # type: ignore

        import llama_cpp  # type: ignore

        return Jinja2ChatFormatter, f"llama_cpp {llama_cpp.__version__} (imported)"
    except Exception:  # noqa: BLE001 - any import failure means: use the sdist's source
        pass
    path = SDIST / "llama_cpp" / "llama_chat_format.py"
    source = path.read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Jinja2ChatFormatter")
    class_source = ast.get_source_segment(source, cls)

    import dataclasses
    import types
    from typing import Any, List, Optional, Tuple, Union  # noqa: F401

    import jinja2
    import jinja2.ext
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    @dataclasses.dataclass
    class ChatFormatterResponse:
        prompt: str
        stop: Any = None
        stopping_criteria: Any = None
        added_special: bool = False

    namespace = {
        "jinja2": jinja2,
        "Extension": Extension,
        "ImmutableSandboxedEnvironment": ImmutableSandboxedEnvironment,
        "json": json,
        "datetime": datetime,
        "Any": Any,
        "List": List,
        "Optional": Optional,
        "Tuple": Tuple,
        "Union": Union,
        "ChatFormatter": object,
        "ChatFormatterResponse": ChatFormatterResponse,
        "llama_types": types.SimpleNamespace(),
        "llama": types.SimpleNamespace(StoppingCriteriaList=list),
        "np": None,
        "npt": None,
        "chat_formatter_to_chat_completion_handler": None,
    }
    # The module has `from __future__ import annotations`: annotations stay unevaluated.
    import __future__

    code = compile(class_source, str(path), "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)  # noqa: S102 - the sdist's own class
    return namespace["Jinja2ChatFormatter"], f"Jinja2ChatFormatter source from {path.relative_to(HOME)} (jinja2 {jinja2.__version__})"


def render_all(formatter_cls, source, bos, eos):
    cases = []
    for conv in CONVERSATIONS:
        case = {"name": conv["name"], "add_generation_prompt": conv["add_generation_prompt"], "messages": conv["messages"]}
        try:
            f = formatter_cls(template=source, eos_token=eos, bos_token=bos, add_generation_prompt=conv["add_generation_prompt"])
            f.strftime_now = lambda fmt: NOW.strftime(fmt)  # pinned time (see module doc)
            # __call__ reads strftime_now from self: the instance attribute wins.
            case["output"] = f(messages=conv["messages"]).prompt
            case["ok"] = True
        except Exception as e:  # noqa: BLE001 - the template's failure is the golden
            case["ok"] = False
            case["error"] = f"{type(e).__name__}: {e}"
        cases.append(case)
    return cases


def model_template(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"]
    bos = tokens.contents(fields["tokenizer.ggml.bos_token_id"].contents())
    eos = tokens.contents(fields["tokenizer.ggml.eos_token_id"].contents())
    return fields["tokenizer.chat_template"].contents(), bos, eos


def main():
    formatter_cls, formatter = load_formatter()
    print("formatter:", formatter)
    (OUT / "golden").mkdir(parents=True, exist_ok=True)
    (OUT / "templates").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, file in MODELS.items():
        path = HOME / file
        if not path.exists():
            sys.exit(f"{path} is missing: fetch the model files into $PETREL_HOME first")
        source, bos, eos = model_template(path)
        (OUT / "templates" / f"{name}.jinja").write_text(source)
        entries.append((name, f"gguf:{file}", source, bos, eos))
    templates = sorted((LLAMA_SRC / "models" / "templates").glob("*.jinja"))
    if not templates:
        sys.exit(f"no templates under {LLAMA_SRC}/models/templates: set PETREL_LLAMA_SRC")
    for path in templates:
        source = path.read_text()
        bos, eos = family_tokens(path.stem)
        if path.stem in SELECTED:
            (OUT / "templates" / path.name).write_text(source)
        entries.append((path.stem, f"sdist:models/templates/{path.name}", source, bos, eos))
    ok = 0
    for name, origin, source, bos, eos in entries:
        cases = render_all(formatter_cls, source, bos, eos)
        ok += all(c["ok"] for c in cases[:1])
        doc = {
            "template": name,
            "origin": origin,
            "formatter": formatter,
            "now_unix": NOW_UNIX,
            "bos_token": bos,
            "eos_token": eos,
            "cases": cases,
        }
        with open(OUT / "golden" / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print(f"{len(entries)} templates, {ok} render conversation (a) in python")


if __name__ == "__main__":
    main()
