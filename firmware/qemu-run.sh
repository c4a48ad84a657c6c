#!/usr/bin/env bash
# Cargo's runner: qemu-run.sh MACHINE ELF. Runs the image under QEMU with semihosting and
# `-icount shift=0` (one guest instruction = one nanosecond of virtual time, which is what
# the firmware's SysTick counter measures), decoding defmt output when the image has it.
# The exit status is the firmware's (0 or 1); 124 if it ran past the timeout.
set -euo pipefail
machine=$1
elf=$2
qemu=(timeout "${PETREL_QEMU_TIMEOUT:-300}" qemu-system-arm -machine "$machine" -nographic -monitor none
    -serial null -icount shift=0 -semihosting-config enable=on,target=native -kernel "$elf")
if readelf -S "$elf" | grep -q '\.defmt'; then
    "${qemu[@]}" | defmt-print -e "$elf"
else
    "${qemu[@]}"
fi
