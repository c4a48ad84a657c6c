//! The machine's int8 multiply–accumulate peak: a loop of 16 independent 512-bit
//! `vpdpbusd` (AVX-512 VNNI: 64 u8×i8 products summed into 16 i32 lanes each), the
//! instruction Petrel's VNNI W4 kernel and ggml's AVX-512 Q4_0 kernels are built on.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::timing::{seconds_per_call, Budget};

/// `vpdpbusd zmm` per loop iteration.
const CHAINS: u64 = 16;
/// Operations (2 per multiply–accumulate) of one `vpdpbusd zmm`.
const OPS_PER_INSTRUCTION: u64 = 2 * 64;
/// Iterations per call.
const ITERS: u64 = 10_000_000;

#[cfg(target_arch = "x86_64")]
mod vnni {
    /// `iters` rounds of 16 independent `vpdpbusd zmm`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dp_loop(iters: u64) {
        // SAFETY: register-only instructions the caller's features cover; every register
        // written is declared.
        unsafe {
            core::arch::asm!(
                "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2", "vpxord zmm3, zmm3, zmm3",
                "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5", "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7",
                "vpxord zmm8, zmm8, zmm8", "vpxord zmm9, zmm9, zmm9", "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11",
                "vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13", "vpxord zmm14, zmm14, zmm14", "vpxord zmm15, zmm15, zmm15",
                "vpternlogd zmm16, zmm16, zmm16, 0xff", "vpternlogd zmm17, zmm17, zmm17, 0xff",
                "2:",
                "vpdpbusd zmm0, zmm16, zmm17", "vpdpbusd zmm1, zmm16, zmm17", "vpdpbusd zmm2, zmm16, zmm17", "vpdpbusd zmm3, zmm16, zmm17",
                "vpdpbusd zmm4, zmm16, zmm17", "vpdpbusd zmm5, zmm16, zmm17", "vpdpbusd zmm6, zmm16, zmm17", "vpdpbusd zmm7, zmm16, zmm17",
                "vpdpbusd zmm8, zmm16, zmm17", "vpdpbusd zmm9, zmm16, zmm17", "vpdpbusd zmm10, zmm16, zmm17", "vpdpbusd zmm11, zmm16, zmm17",
                "vpdpbusd zmm12, zmm16, zmm17", "vpdpbusd zmm13, zmm16, zmm17", "vpdpbusd zmm14, zmm16, zmm17", "vpdpbusd zmm15, zmm16, zmm17",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _,
                options(nomem, nostack),
            );
        }
    }

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni")
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    /// Tile configuration: tiles 0..6 of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// `iters` rounds of 4 independent `tdpbsud` (16 × 16 × 64 products each) on tiles that
    /// stay in registers.
    ///
    /// # Safety
    /// The CPU must have AMX-TILE and AMX-INT8 and the process the tile state
    /// (`PanelGemm::amx()` returned `Some`).
    pub unsafe fn dp_loop(iters: u64) {
        let mut config = Config([0; 64]);
        config.0[0] = 1;
        for tile in 0..6 {
            config.0[16 + 2 * tile] = 64;
            config.0[48 + tile] = 16;
        }
        // SAFETY: a valid palette-1 configuration, then register-only tile instructions;
        // `tilerelease` leaves the tile state unused.
        unsafe {
            core::arch::asm!(
                "ldtilecfg [{config}]",
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", "tilezero tmm4", "tilezero tmm5",
                "2:",
                "tdpbsud tmm0, tmm4, tmm5", "tdpbsud tmm1, tmm4, tmm5", "tdpbsud tmm2, tmm4, tmm5", "tdpbsud tmm3, tmm4, tmm5",
                "dec {n}",
                "jnz 2b",
                "tilerelease",
                config = in(reg) &config,
                n = inout(reg) iters => _,
                options(nostack),
            );
        }
    }
}

/// `tdpbsud` per loop iteration of the AMX loop.
#[cfg(target_arch = "x86_64")]
const AMX_CHAINS: u64 = 4;
/// Operations of one `tdpbsud` on full tiles: 2 × 16 × 16 × 64.
#[cfg(target_arch = "x86_64")]
const AMX_OPS_PER_INSTRUCTION: u64 = 2 * 16 * 16 * 64;
/// Iterations per call of the AMX loop.
#[cfg(target_arch = "x86_64")]
const AMX_ITERS: u64 = 1_000_000;

/// Peak GOPS of `tdpbsud` on one thread (best of 5 runs of ≥ 300 ms on-CPU), or `None`
/// where AMX-INT8 is unavailable.
pub fn amx_gops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if petrel_quant::gemm::PanelGemm::amx().is_some() {
        let secs = seconds_per_call(
            // SAFETY: `PanelGemm::amx()` checked the CPU and obtained the tile state.
            || unsafe { amx::dp_loop(std::hint::black_box(AMX_ITERS)) },
            Budget { min: Duration::from_millis(300), runs: 5 },
        );
        return Some((AMX_ITERS * AMX_CHAINS * AMX_OPS_PER_INSTRUCTION) as f64 / secs / 1e9);
    }
    None
}

/// One call of the loop (`ITERS` iterations), or `false` without AVX-512 VNNI.
fn run_loop() -> bool {
    #[cfg(target_arch = "x86_64")]
    if vnni::available() {
        // SAFETY: the features were detected just above.
        unsafe { vnni::dp_loop(std::hint::black_box(ITERS)) };
        return true;
    }
    false
}

fn ops_per_call() -> f64 {
    (ITERS * CHAINS * OPS_PER_INSTRUCTION) as f64
}

/// Peak GOPS (2 per multiply–accumulate) of `vpdpbusd zmm` on `threads` threads, or `None`
/// without AVX-512 VNNI. One thread: the best of 5 runs of ≥ 300 ms in on-CPU time (as
/// the kernels are timed). Several threads: each runs the loop at the same moment (after a
/// barrier); the figure is all their operations over the wall time of the slowest, best of
/// 7 rounds, so that two logical CPUs sharing one core show as such.
pub fn vnni_gops(threads: usize) -> Option<f64> {
    if !run_loop() {
        return None;
    }
    if threads <= 1 {
        let secs = seconds_per_call(
            || {
                run_loop();
            },
            Budget { min: Duration::from_millis(300), runs: 5 },
        );
        return Some(ops_per_call() / secs / 1e9);
    }
    let mut best = 0f64;
    for _ in 0..7 {
        let barrier = Barrier::new(threads);
        let slowest = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let start = Instant::now();
                        for _ in 0..4 {
                            run_loop();
                        }
                        start.elapsed().as_secs_f64()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("peak thread")).fold(0f64, f64::max)
        });
        best = best.max(4.0 * threads as f64 * ops_per_call() / slowest / 1e9);
    }
    Some(best)
}
