#!/usr/bin/env bash
# Puts the chat templates and the tokenizer suite of llama.cpp, as vendored in the
# llama-cpp-python 0.3.36 sdist, where runtime/tests/chat_templates.rs (all_sdist_templates),
# the tokenizer-suite tests and scripts/make_golden_chat.py look for them:
#   $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/*.jinja
#   $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*.gguf{,.inp,.out}
#   $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/llama_cpp/llama_chat_format.py
# The sdist comes from PyPI (its simple index); only those files are unpacked, nothing is
# built. Idempotent.
set -euo pipefail
PETREL_HOME=${PETREL_HOME:-$HOME/.cache/petrel}
PYTHON=${PYTHON:-python3}
VERSION=0.3.36
DIR=$PETREL_HOME/llama-sdist
SRC=$DIR/llama_cpp_python-$VERSION
if compgen -G "$SRC/vendor/llama.cpp/models/templates/*.jinja" >/dev/null \
    && compgen -G "$SRC/vendor/llama.cpp/models/ggml-vocab-*.gguf.inp" >/dev/null; then
    echo "templates and vocabularies already at $SRC/vendor/llama.cpp/models"
    exit 0
fi
mkdir -p "$DIR"
tarball=$DIR/llama_cpp_python-$VERSION.tar.gz
if [[ ! -f $tarball ]]; then
    # The sdist file itself, located through PyPI's simple index (PEP 691 JSON) and
    # SHA-256 checked. (`pip download --no-binary :all:` would also prepare its metadata,
    # which builds CMake from source first: 30+ minutes on 2 cores.)
    "$PYTHON" - "$VERSION" "$tarball" <<'PY'
import hashlib, json, os, sys, urllib.request
version, target = sys.argv[1], sys.argv[2]
name = f"llama_cpp_python-{version}.tar.gz"
index = urllib.request.Request(
    "https://pypi.org/simple/llama-cpp-python/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
)
with urllib.request.urlopen(index, timeout=60) as r:
    entry = next(f for f in json.load(r)["files"] if f["filename"] == name)
with urllib.request.urlopen(entry["url"], timeout=600) as r:
    data = r.read()
digest = hashlib.sha256(data).hexdigest()
if digest != entry["hashes"]["sha256"]:
    sys.exit(f"SHA-256 mismatch for {name}: {digest}")
with open(target + ".partial", "wb") as f:
    f.write(data)
os.replace(target + ".partial", target)
print(f"downloaded {name} ({len(data) / 1e6:.1f} MB, SHA-256 checked)")
PY
fi
tar -xzf "$tarball" -C "$DIR" --wildcards \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*" \
    "llama_cpp_python-$VERSION/llama_cpp/llama_chat_format.py"
echo "templates at $SRC/vendor/llama.cpp/models/templates ($(ls "$SRC"/vendor/llama.cpp/models/templates/*.jinja | wc -l) files)"
