#!/usr/bin/env bash
# Type-checks the candle backend's CUDA path without nvcc: candle-kernels' build script
# compiles CUDA kernels with nvcc, so it is replaced by a stub that writes empty PTX files
# (its Rust code only `include_str!`s them) and links nothing; cudarc is told the CUDA
# version instead of asking nvcc. `cargo check` never links, so no CUDA library is needed.
# Run from the repository root.
set -euo pipefail
STUB=target/candle-kernels-stub
if [[ ! -f $STUB/.petrel-stub ]]; then
    cargo fetch --manifest-path ci/kernels-fetch/Cargo.toml
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/candle-kernels-0.11.1.crate | head -1)
    rm -rf "$STUB" target/candle-kernels-0.11.1
    mkdir -p target
    tar xzf "$crate" -C target
    mv target/candle-kernels-0.11.1 "$STUB"
    # Keep the package's name and version (the patch must match them) but drop the nvcc
    # build dependency.
    python3 - "$STUB/Cargo.toml" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r"\n\[build-dependencies\.cudaforge\]\nversion = \"[^\"]*\"\n", "\n", s)
open(p, "w").write(s)
PY
    cat > "$STUB/build.rs" <<'RS'
// Stub: empty PTX for each kernel module and the generated ptx.rs; no nvcc, no linking.
fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for name in ["affine", "binary", "cast", "conv", "fill", "indexing", "quantized", "reduce", "sort", "ternary", "unary"] {
        std::fs::write(out.join(format!("{name}.ptx")), "").unwrap();
    }
    std::fs::copy("src/ptx.rs", out.join("ptx.rs")).unwrap();
}
RS
    touch "$STUB/.petrel-stub"
fi
CUDARC_CUDA_VERSION=13000 cargo check --manifest-path ci/cuda-check/Cargo.toml --target-dir target/cuda-check
echo "cuda type-check passed"
