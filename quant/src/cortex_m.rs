//! Instruction primitives of the Cortex-M cores: the Armv7E-M DSP extension (Cortex-M4,
//! M7, M33, M55, M85) and the Armv8.1-M vector extension, Helium/MVE (Cortex-M55, M85).
//!
//! The kernels built on these live beside their scalar references
//! (`dot::cortex_m`, `w4::kernels::cortex_m`). Rust exposes the DSP intrinsics only on
//! nightly and no MVE intrinsics at all, so both come as inline assembly.
//!
//! # Which build gets which
//! - DSP: any `arm` target with the `dsp` target feature (thumbv7em, thumbv8m.main with a
//!   DSP-capable `target-cpu`).
//! - Helium: only with this crate's `helium` feature, for `thumbv8m.main-none-eabihf` with
//!   `-C target-cpu=cortex-m55` (or `cortex-m85`). LLVM does not report `mve` as a `cfg`
//!   target feature, so the build says so explicitly; enabling `helium` for a core without
//!   MVE fails to assemble rather than faulting at run time.

use core::arch::asm;

/// `acc + a.lo · b.lo + a.hi · b.hi` on the signed 16-bit halves of `a` and `b` (`SMLAD`).
/// Wraps like `i32` addition (the Q flag it may set is never read).
#[inline(always)]
pub(crate) fn smlad(a: u32, b: u32, acc: i32) -> i32 {
    let out: i32;
    // SAFETY: SMLAD reads and writes registers only; the `dsp` feature gating the callers
    // guarantees the core has it.
    unsafe {
        asm!("smlad {out}, {a}, {b}, {acc}", out = lateout(reg) out, a = in(reg) a, b = in(reg) b,
             acc = in(reg) acc, options(pure, nomem, nostack));
    }
    out
}

/// Bytes 0 and 2 of `a`, sign-extended into the two 16-bit halves (`SXTB16`).
#[inline(always)]
pub(crate) fn sxtb16(a: u32) -> u32 {
    let out: u32;
    // SAFETY: as in `smlad`.
    unsafe {
        asm!("sxtb16 {out}, {a}", out = lateout(reg) out, a = in(reg) a, options(pure, nomem, nostack, preserves_flags));
    }
    out
}

/// Bytes 1 and 3 of `a`, sign-extended into the two 16-bit halves (`SXTB16` with `ROR #8`).
#[inline(always)]
pub(crate) fn sxtb16_ror8(a: u32) -> u32 {
    let out: u32;
    // SAFETY: as in `smlad`.
    unsafe {
        asm!("sxtb16 {out}, {a}, ror #8", out = lateout(reg) out, a = in(reg) a,
             options(pure, nomem, nostack, preserves_flags));
    }
    out
}

/// Four bytes at `p` as a little-endian word (one `LDR`; Armv7-M allows unaligned words).
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
pub(crate) unsafe fn load_word(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees the 4 bytes are readable; `read_unaligned` needs no
    // alignment.
    unsafe { (p as *const u32).read_unaligned() }
}
