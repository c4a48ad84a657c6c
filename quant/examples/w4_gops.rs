//! Throughput of the W4A4 integer kernels on SmolLM2 shapes, single thread:
//! `cargo run --release -p petrel-quant --example w4_gops [-- --quick] [--group g32|g64|g128] [--float]`.
//!
//! Prints GOPS = 2 · M · N · K / time (best of several runs, on-CPU time of the thread where
//! Linux reports it, so that a shared machine's other processes count less) for
//! the scalar reference, AVX2, AVX-512 VNNI and the lookup-table kernels, and the peak of a
//! loop of independent 512-bit `vpdpbusd` for comparison.

use std::time::{Duration, Instant};

use petrel_quant::dot::Isa;
use petrel_quant::w4::activation::{quantize_token, ActBits, TokenBatch};
use petrel_quant::w4::kernels::lut::{LutKernel, LutMatrix};
use petrel_quant::w4::kernels::W4Kernels;
use petrel_quant::w4::{pack, pad_cols, GroupSize, W4Matrix, W4Shape};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// Nanoseconds this thread has run on a CPU (Linux `schedstat`), so that time slices lost
/// to other processes on a shared machine do not count; `None` where unavailable.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Best seconds per call of `f` over `runs` runs of at least `min` each, in on-CPU time
/// where the OS reports it, else wall time.
fn time(mut f: impl FnMut(), min: Duration, runs: usize) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..runs {
        let (start, cpu_start, mut calls) = (Instant::now(), cpu_ns(), 0u32);
        while calls == 0 || start.elapsed() < min {
            f();
            calls += 1;
        }
        let secs = match (cpu_start, cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 * 1e-9,
            _ => start.elapsed().as_secs_f64(),
        };
        best = best.min(secs / calls as f64);
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod peak {
    /// `iters` rounds of 16 independent `vpdpbusd zmm`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    fn dp_loop(iters: u64) {
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

    /// Peak GOPS (2 per MAC) of one core on `vpdpbusd zmm`, or `None` without AVX-512 VNNI.
    pub fn vnni_gops() -> Option<f64> {
        if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni")) {
            return None;
        }
        let iters = 10_000_000u64;
        let secs = super::time(
            || {
                // SAFETY: the features were detected above.
                unsafe { dp_loop(std::hint::black_box(iters)) };
            },
            std::time::Duration::from_millis(300),
            5,
        );
        Some(2.0 * 16.0 * 64.0 * iters as f64 / secs / 1e9)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--float`: the W4A16 float kernels instead of the integer ones (no lookup table).
    let float = args.iter().any(|a| a == "--float");
    let group = match args.iter().position(|a| a == "--group").map(|i| args[i + 1].as_str()) {
        Some("g32") => GroupSize::G32,
        Some("g64") => GroupSize::G64,
        Some("g128") => GroupSize::G128,
        _ => GroupSize::PerChannel,
    };
    let (min, runs) = if quick { (Duration::from_millis(40), 3) } else { (Duration::from_millis(150), 7) };

    #[cfg(target_arch = "x86_64")]
    let peak = peak::vnni_gops();
    #[cfg(not(target_arch = "x86_64"))]
    let peak: Option<f64> = None;
    if let Some(p) = peak {
        println!("peak: 16 independent vpdpbusd zmm: {p:.0} GOPS (single thread)");
    }
    println!("{} kernels, group: {group:?}; GOPS = 2·M·N·K / time", if float { "W4A16 float" } else { "W4A4 integer" });

    let mut kernels: Vec<(String, W4Kernels)> = Vec::new();
    for isa in Isa::ALL {
        if let Some(k) = W4Kernels::for_isa(isa) {
            kernels.push((isa.name().to_string(), k));
        }
    }
    let luts: Vec<(String, LutKernel)> = Isa::ALL
        .iter()
        .filter(|_| !float)
        .filter_map(|&isa| LutKernel::for_isa(isa).map(|k| (format!("lut-{}", isa.name()), k)))
        .collect();
    print!("{:>10} {:>5}", "N×K", "M");
    for (name, _) in kernels.iter().map(|(n, k)| (n, k)) {
        print!(" {name:>11}");
    }
    for (name, _) in &luts {
        print!(" {name:>15}");
    }
    if peak.is_some() && !float {
        print!(" {:>11}", "vnni %peak");
    }
    println!();

    let mut rng = Rng(42);
    for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let shape = W4Shape { rows: n, cols: k, group };
        let codes: Vec<i8> = (0..n * k).map(|_| (rng.next() % 16) as i8 - 8).collect();
        let scales: Vec<f32> = (0..n * shape.groups()).map(|_| (rng.next() % 1000 + 1) as f32 * 1e-4).collect();
        let (mut packed, mut sb) = (vec![0u8; shape.packed_bytes()], vec![0u8; shape.scale_count() * 2]);
        pack(&shape, &codes, &scales, &mut packed, &mut sb);
        let w = W4Matrix::new(shape, &packed, &sb).unwrap();
        let lut = LutMatrix::new(&w);
        let pc = pad_cols(k);
        for m in [1usize, 64, 256] {
            let x: Vec<f32> = (0..m * k).map(|_| (rng.next() % 2000) as f32 / 1000.0 - 1.0).collect();
            let groups = group.groups(k);
            let (mut xc, mut xs, mut xsum) = (vec![0i8; m * pc], vec![0f32; m * groups], vec![0i32; m * groups]);
            for t in 0..m {
                quantize_token(
                    &x[t * k..(t + 1) * k],
                    ActBits::A4,
                    1.0,
                    group,
                    &mut xc[t * pc..(t + 1) * pc],
                    &mut xsum[t * groups..(t + 1) * groups],
                    &mut xs[t * groups..(t + 1) * groups],
                );
            }
            let batch = TokenBatch { tokens: m, cols: k, group, codes: &xc, scales: &xs, sums: &xsum };
            let mut out = vec![0f32; m * n];
            let mut xf = vec![0f32; m * pc];
            for t in 0..m {
                xf[t * pc..t * pc + k].copy_from_slice(&x[t * k..(t + 1) * k]);
            }
            let run = |kern: &W4Kernels, out: &mut [f32]| {
                if float {
                    kern.gemm_float(&w, 0..shape.panels(), &xf, m, out, n)
                } else {
                    kern.gemm_int(&w, 0..shape.panels(), &batch, out, n)
                }
            };
            let mut reference = vec![0f32; m * n];
            run(&W4Kernels::scalar(), &mut reference);
            let ops = 2.0 * (m * n * k) as f64;
            print!("{:>10} {m:>5}", format!("{n}×{k}"));
            let mut vnni = None;
            for (name, kern) in &kernels {
                let (kmin, kruns) = if name == "scalar" { (Duration::from_millis(20), 1) } else { (min, runs) };
                let secs = time(|| run(kern, &mut out), kmin, kruns);
                assert!(out.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
                let gops = ops / secs / 1e9;
                if name == "avx512vnni" {
                    vnni = Some(gops);
                }
                print!(" {gops:>11.1}");
            }
            for (name, kern) in &luts {
                let secs = time(|| kern.gemm_int(&lut, 0..lut.blocks(), &batch, &mut out, n).unwrap(), min, runs);
                assert!(out.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
                print!(" {:>15.1}", ops / secs / 1e9);
            }
            if let (Some(p), Some(v), false) = (peak, vnni, float) {
                print!(" {:>10.0}%", 100.0 * v / p);
            }
            println!();
        }
    }
}
