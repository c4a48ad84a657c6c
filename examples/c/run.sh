#!/usr/bin/env bash
# Builds Petrel's static C library, links examples/c/chat.c against it and runs it.
#   examples/c/run.sh MODEL [QUESTION]             # this machine (the registry included)
#   examples/c/run.sh --aarch64 MODEL [QUESTION]   # aarch64-unknown-linux-gnu, run under qemu
# The aarch64 build uses Debian's rustc with its arm64 std and gcc-aarch64-linux-gnu (the
# packages .ci/run installs; see /work/shared/TOOLCHAINS.md), without the registry (a
# path, not a name), as an Android/Linux-ARM app would embed it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ ${1:-} == --aarch64 ]]; then
    shift
    RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc /usr/bin/cargo build --release \
        --target aarch64-unknown-linux-gnu --target-dir target/aarch64 -p petrel-c --no-default-features
    lib=target/aarch64/aarch64-unknown-linux-gnu/release/libpetrel_c.a
    exe=target/aarch64/chat-example
    aarch64-linux-gnu-gcc -O2 -Wall -Wextra -Werror -Icapi/include examples/c/chat.c "$lib" -lpthread -ldl -lm -o "$exe"
    run=(qemu-aarch64-static -cpu max "$exe")
else
    cargo build --release -p petrel-c
    lib=target/release/libpetrel_c.a
    exe=target/release/chat-example
    cc -O2 -Wall -Wextra -Werror -Icapi/include examples/c/chat.c "$lib" -lpthread -ldl -lm -o "$exe"
    run=("$exe")
fi
echo "library $(du -h "$lib" | cut -f1) ($lib), executable $(du -h "$exe" | cut -f1)" >&2
"${run[@]}" "$@"
