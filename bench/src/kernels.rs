//! Single-thread matrix-product throughput on SmolLM2's shapes: Petrel's W4 kernels
//! (`W4Kernels` on the best instruction set, the scalar reference at one token, the
//! lookup-table kernel) against ggml's Q4_0 × Q8_0 product (`bench/llama/ggml_mulmat.c`),
//! in GOPS = 2 · M · N · K / time.
//!
//! Petrel's kernels are timed on activations already quantized; the
//! per-token activation quantization (`quantize_token`, which the runtime runs once per
//! input and reuses for every matrix that reads it) is timed on its own, and rows "with
//! quantization" add the two, which is what ggml's figure includes (its mul_mat quantizes
//! the f32 input to Q8_0 inside the op).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use petrel_quant::w4::activation::{quantize_token, ActBits, TokenBatch};
use petrel_quant::w4::kernels::lut::{LutKernel, LutMatrix};
use petrel_quant::w4::kernels::W4Kernels;
use petrel_quant::w4::{pack, pad_cols, GroupSize, W4Matrix, W4Shape};
use serde::Serialize;

use crate::timing::{seconds_per_call, Budget};

/// SmolLM2-135M's matrix shapes, `(N, K)` = (outputs, inputs): q/o, k/v, gate/up, down, and
/// the output head.
pub const SHAPES: [(usize, usize); 5] = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];

/// Tokens per product: decode, Petrel's prefill batch, and a larger batch.
pub const TOKENS: [usize; 3] = [1, 64, 256];

/// One measured product.
#[derive(Serialize, Debug, Clone)]
pub struct KernelRow {
    /// Output rows.
    pub n: usize,
    /// Inputs.
    pub k: usize,
    /// Tokens.
    pub m: usize,
    /// `petrel` or `ggml`.
    pub engine: String,
    /// Kernel: `avx512vnni`, `avx2`, `scalar`, `lut-avx512vnni`, … for Petrel; ggml's path
    /// (`repack-q4_0_8x8`, `tinyblas`, `vec_dot`).
    pub kernel: String,
    /// Weight format: `w4-pc` (per channel), `w4-g128`, …, or `q4_0`.
    pub weights: String,
    /// Activations the kernel multiplies: `a4`, `a8`, or `q8_0` (ggml).
    pub activations: String,
    /// Whether the time includes quantizing the f32 input.
    pub with_quantization: bool,
    /// Seconds per product (best of the runs).
    pub seconds: f64,
    /// 2 · M · N · K / seconds / 1e9.
    pub gops: f64,
}

/// Petrel's per-token activation quantization of M tokens of K inputs, timed alone.
#[derive(Serialize, Debug, Clone)]
pub struct QuantRow {
    pub k: usize,
    pub m: usize,
    pub weights: String,
    pub activations: String,
    pub seconds: f64,
}

/// Name of a weight grouping in tables and JSON.
pub fn weights_name(group: GroupSize) -> String {
    match group {
        GroupSize::PerChannel => "w4-pc".into(),
        g => format!("w4-g{}", g.as_len()),
    }
}

fn act_name(bits: ActBits) -> &'static str {
    match bits {
        ActBits::A4 => "a4",
        ActBits::A8 => "a8",
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// Quantized activations of `m` tokens, owned.
struct Acts {
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

fn quantize(x: &[f32], m: usize, k: usize, bits: ActBits, group: GroupSize, a: &mut Acts) {
    let (pc, groups) = (pad_cols(k), group.groups(k));
    for t in 0..m {
        quantize_token(
            &x[t * k..(t + 1) * k],
            bits,
            1.0,
            group,
            &mut a.codes[t * pc..(t + 1) * pc],
            &mut a.sums[t * groups..(t + 1) * groups],
            &mut a.scales[t * groups..(t + 1) * groups],
        );
    }
}

/// Measures Petrel's kernels on every shape, token count, grouping and activation width.
pub fn petrel(groups: &[GroupSize], budget: Budget) -> Result<(Vec<KernelRow>, Vec<QuantRow>)> {
    let best = W4Kernels::detect();
    let scalar = W4Kernels::scalar();
    let lut = LutKernel::detect();
    let mut rows = Vec::new();
    let mut quant_rows = Vec::new();
    let mut rng = Rng(42);
    for &group in groups {
        let wname = weights_name(group);
        for (n, k) in SHAPES {
            let shape = W4Shape { rows: n, cols: k, group };
            let codes: Vec<i8> = (0..n * k).map(|_| (rng.next() % 16) as i8 - 8).collect();
            let scales: Vec<f32> = (0..n * shape.groups()).map(|_| (rng.next() % 1000 + 1) as f32 * 1e-4).collect();
            let (mut packed, mut sb) = (vec![0u8; shape.packed_bytes()], vec![0u8; shape.scale_count() * 2]);
            pack(&shape, &codes, &scales, &mut packed, &mut sb);
            let w = W4Matrix::new(shape, &packed, &sb).map_err(|e| anyhow::anyhow!("{e}"))?;
            let lut_matrix = lut.map(|_| LutMatrix::new(&w));
            for m in TOKENS {
                let x: Vec<f32> = (0..m * k).map(|_| (rng.next() % 2000) as f32 / 1000.0 - 1.0).collect();
                let groups_k = group.groups(k);
                let ops = 2.0 * (m * n * k) as f64;
                let mut out = vec![0f32; m * n];
                for bits in [ActBits::A4, ActBits::A8] {
                    let mut a = Acts {
                        codes: vec![0; m * pad_cols(k)],
                        scales: vec![0.0; m * groups_k],
                        sums: vec![0; m * groups_k],
                    };
                    // The quantization depends on K, M and the grouping only: timed once.
                    let quant_secs = match quant_seconds(&quant_rows, k, m, &wname, bits) {
                        Some(s) => {
                            quantize(&x, m, k, bits, group, &mut a);
                            s
                        }
                        None => {
                            let s = seconds_per_call(|| quantize(&x, m, k, bits, group, &mut a), budget);
                            let activations = act_name(bits).into();
                            quant_rows.push(QuantRow { k, m, weights: wname.clone(), activations, seconds: s });
                            s
                        }
                    };
                    let batch =
                        TokenBatch { tokens: m, cols: k, group, codes: &a.codes, scales: &a.scales, sums: &a.sums };
                    let row = |kernel: &str, with_quantization: bool, seconds: f64| KernelRow {
                        n,
                        k,
                        m,
                        engine: "petrel".into(),
                        kernel: kernel.into(),
                        weights: wname.clone(),
                        activations: act_name(bits).into(),
                        with_quantization,
                        seconds,
                        gops: ops / seconds / 1e9,
                    };
                    let secs = seconds_per_call(|| best.gemm_int(&w, 0..shape.panels(), &batch, &mut out, n), budget);
                    let reference = if m == 1 {
                        let fast = out.clone();
                        let s =
                            seconds_per_call(|| scalar.gemm_int(&w, 0..shape.panels(), &batch, &mut out, n), budget);
                        if fast.iter().zip(&out).any(|(a, b)| a.to_bits() != b.to_bits()) {
                            bail!("{} differs from the scalar reference at {n}×{k}", best.isa().name());
                        }
                        rows.push(row("scalar", false, s));
                        Some(fast)
                    } else {
                        None
                    };
                    rows.push(row(best.isa().name(), false, secs));
                    rows.push(row(best.isa().name(), true, secs + quant_secs));
                    if let (Some(kern), Some(lm), ActBits::A4) = (lut, &lut_matrix, bits) {
                        let s = seconds_per_call(
                            || kern.gemm_int(lm, 0..lm.blocks(), &batch, &mut out, n).expect("int4 codes"),
                            budget,
                        );
                        if let Some(r) = &reference {
                            if r.iter().zip(&out).any(|(a, b)| a.to_bits() != b.to_bits()) {
                                bail!("the lookup-table kernel differs from the reference at {n}×{k}");
                            }
                        }
                        rows.push(row(&format!("lut-{}", kern.isa().name()), false, s));
                    }
                    eprintln!(
                        "petrel {n}×{k} M={m} {wname} {}: {} {:.1} GOPS (activation quantization {:.1} µs)",
                        act_name(bits),
                        best.isa().name(),
                        ops / secs / 1e9,
                        quant_secs * 1e6
                    );
                }
            }
        }
    }
    Ok((rows, quant_rows))
}

fn quant_seconds(rows: &[QuantRow], k: usize, m: usize, weights: &str, bits: ActBits) -> Option<f64> {
    rows.iter()
        .find(|r| r.k == k && r.m == m && r.weights == weights && r.activations == act_name(bits))
        .map(|r| r.seconds)
}

/// Runs `ggml_mulmat` (built by `bench/llama/setup.sh`) on every shape and token count, with
/// ggml's repacked Q4_0 layout (`repack`) or the plain one, one thread.
pub fn ggml(binary: &Path, repack: bool, budget: Budget) -> Result<Vec<KernelRow>> {
    let shapes: Vec<String> =
        SHAPES.iter().flat_map(|&(n, k)| TOKENS.iter().map(move |m| format!("{n}:{k}:{m}"))).collect();
    eprintln!("ggml {} Q4_0 × Q8_0: running {} …", if repack { "repacked" } else { "plain" }, binary.display());
    let output = Command::new(binary)
        .args(["--repack", if repack { "1" } else { "0" }, "--threads", "1"])
        .args(["--min-ms", &budget.min.as_millis().to_string(), "--runs", &budget.runs.to_string()])
        .args(&shapes)
        .output()
        .with_context(|| {
            format!("cannot run {} (build it with bench/llama/setup.sh, or pass --no-llama)", binary.display())
        })?;
    if !output.status.success() {
        bail!("{} failed: {}", binary.display(), String::from_utf8_lossy(&output.stderr));
    }
    let rows = parse_ggml(&String::from_utf8_lossy(&output.stdout))?;
    if rows.len() != shapes.len() {
        bail!("{} printed {} results for {} shapes", binary.display(), rows.len(), shapes.len());
    }
    for r in &rows {
        eprintln!("ggml {}×{} M={} {}: {:.1} GOPS", r.n, r.k, r.m, r.kernel, r.gops);
    }
    Ok(rows)
}

/// Parses `ggml_mulmat`'s lines (`ggml_mulmat N=576 K=576 M=64 threads=1 repack=1
/// path=repack-q4_0_8x8 seconds=1.2e-4 gops=345.6`).
fn parse_ggml(stdout: &str) -> Result<Vec<KernelRow>> {
    let mut rows = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with("ggml_mulmat ")) {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .with_context(|| format!("no {key}= in {line:?}"))
        };
        let (n, k, m): (usize, usize, usize) = (field("N")?.parse()?, field("K")?.parse()?, field("M")?.parse()?);
        let seconds: f64 = field("seconds")?.parse()?;
        rows.push(KernelRow {
            n,
            k,
            m,
            engine: "ggml".into(),
            kernel: field("path")?.to_string(),
            weights: "q4_0".into(),
            activations: "q8_0".into(),
            with_quantization: true,
            seconds,
            gops: 2.0 * (m * n * k) as f64 / seconds / 1e9,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ggml_mulmat_lines() {
        let out = "ggml_mulmat N=576 K=576 M=64 threads=1 repack=1 path=repack-q4_0_8x8 seconds=3.238926e-04 gops=131.115\nnoise\n";
        let rows = parse_ggml(out).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.n, r.k, r.m, r.kernel.as_str()), (576, 576, 64, "repack-q4_0_8x8"));
        assert!((r.gops - 131.1).abs() < 0.1);
        assert!(parse_ggml("ggml_mulmat N=1 K=32\n").is_err());
    }
}
