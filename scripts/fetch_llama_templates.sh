#!/usr/bin/env bash
# Puts the chat templates and the tokenizer suite of llama.cpp, as vendored in the
# llama-cpp-python 0.3.36 sdist, where runtime/tests/chat_templates.rs (all_sdist_templates),
# the tokenizer-suite tests and scripts/make_golden_chat.py look for them:
#   $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/*.jinja
#   $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*.gguf{,.inp,.out}
#   $PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/llama_cpp/llama_chat_format.py
# The sdist comes from PyPI through pip (`pip download --no-binary :all:`), as in
# bench/llama/setup.sh; only those files are unpacked, nothing is built. Idempotent.
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
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
fi
tar -xzf "$tarball" -C "$DIR" --wildcards \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*" \
    "llama_cpp_python-$VERSION/llama_cpp/llama_chat_format.py"
echo "templates at $SRC/vendor/llama.cpp/models/templates ($(ls "$SRC"/vendor/llama.cpp/models/templates/*.jinja | wc -l) files)"
