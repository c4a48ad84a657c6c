//! `petrel-bench panels`: the prefill panel kernels on a model's own weights, one thread.
//!
//! For each block-format matrix of the first transformer block (its real rows, from the
//! file), a batch of random 8-bit activation rows is multiplied on the AVX-512 VNNI panel
//! kernel and on the AMX-INT8 one where the CPU has it: time to unpack the panels, time to
//! multiply, and the multiply rate against the machine's measured peaks (`vpdpbusd zmm`
//! and `tdpbsud` loops run in the same process).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use petrel_models::registry;
use petrel_quant::dot::Isa;
use petrel_quant::gemm::{panel_lines, Panel, PanelGemm, PanelLine, Q8Batch, PANEL_ROWS};
use petrel_quant::{quantize_row_q8, Q8RowMut, WeightFormat, BLOCK_LEN};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::Pcg32;
use serde::Serialize;

use crate::peak;
use crate::timing::{seconds_per_call, Budget};

/// Arguments of `petrel-bench panels`.
#[derive(clap::Args, Debug)]
pub struct PanelArgs {
    /// GGUF files or known model names.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Activation rows per product (the runtime's default prefill batch).
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Weight rows per product, from the start of each matrix (a multiple of 16).
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// Shorter timing runs (for a quick look; the figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Directory for results (`panels.json`, `panels.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// One matrix on one kernel.
#[derive(Serialize, Debug)]
struct PanelRow {
    model: String,
    tensor: String,
    format: String,
    rows: usize,
    cols: usize,
    tokens: usize,
    kernel: String,
    /// Microseconds to unpack all `rows / 16` panels.
    pack_us: f64,
    /// Microseconds to multiply them by the batch.
    multiply_us: f64,
    /// `2 · rows · cols · tokens / multiply time`, in GOPS.
    gops: f64,
    /// The same with the unpacking included.
    gops_with_pack: f64,
}

fn format_of(ty: TensorType) -> Option<WeightFormat> {
    Some(match ty {
        TensorType::Q4_0 => WeightFormat::Q4_0,
        TensorType::Q4_1 => WeightFormat::Q4_1,
        TensorType::Q5_0 => WeightFormat::Q5_0,
        TensorType::Q5_1 => WeightFormat::Q5_1,
        TensorType::Q8_0 => WeightFormat::Q8_0,
        TensorType::Q4_K => WeightFormat::Q4_K,
        TensorType::Q5_K => WeightFormat::Q5_K,
        TensorType::Q6_K => WeightFormat::Q6_K,
        _ => return None,
    })
}

/// `tokens` rows of `cols` random activations, quantized as the runtime does.
fn activations(tokens: usize, cols: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let blocks = cols / BLOCK_LEN;
    let mut rng = Pcg32::new(7);
    let (mut qs, mut scales, mut sums) =
        (vec![0i8; tokens * cols], vec![0f32; tokens * blocks], vec![0i32; tokens * blocks]);
    for t in 0..tokens {
        let x: Vec<f32> = (0..cols).map(|_| (rng.next_u32() % 2001) as f32 / 1000.0 - 1.0).collect();
        quantize_row_q8(
            &x,
            Q8RowMut {
                qs: &mut qs[t * cols..(t + 1) * cols],
                scales: &mut scales[t * blocks..(t + 1) * blocks],
                sums: &mut sums[t * blocks..(t + 1) * blocks],
            },
        );
    }
    (qs, scales, sums)
}

/// Runs the benchmark and writes the results.
pub fn run(args: &PanelArgs) -> Result<()> {
    if args.rows == 0 || !args.rows.is_multiple_of(PANEL_ROWS) || args.tokens == 0 {
        bail!("--rows must be a positive multiple of {PANEL_ROWS} and --tokens positive");
    }
    let Some(vnni) = PanelGemm::for_isa(Isa::Avx512Vnni) else {
        bail!("this CPU has no AVX-512 VNNI, so no panel kernel to measure");
    };
    let kernels: Vec<PanelGemm> = [Some(vnni), PanelGemm::amx()].into_iter().flatten().collect();
    let budget = Budget::new(args.quick);
    let vnni_peak = peak::vnni_gops(1).context("no VNNI peak")?;
    let amx_peak = peak::amx_gops();
    eprintln!(
        "peaks, one thread: vpdpbusd {vnni_peak:.0} GOPS, tdpbsud {}",
        amx_peak.map_or("–".into(), |p| format!("{p:.0} GOPS"))
    );

    let mut rows = Vec::new();
    for model in &args.models {
        let path = registry::resolve(model)?;
        let file = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let gguf = GgufFile::parse(file.bytes())?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        for tensor in gguf.tensors().iter().filter(|t| t.name.starts_with("blk.0.") && t.n_dims == 2) {
            let Some(format) = format_of(tensor.ty) else { continue };
            let (cols, all_rows) = (tensor.dims[0] as usize, tensor.dims[1] as usize);
            let n = args.rows.min(all_rows / PANEL_ROWS * PANEL_ROWS);
            let row_bytes = format.row_bytes(cols).context("ragged row")?;
            if n == 0 || tensor.data.len() < n * row_bytes {
                continue;
            }
            let data = &tensor.data[..n * row_bytes];
            let (qs, scales, sums) = activations(args.tokens, cols);
            let x = Q8Batch { qs: &qs, scales: &scales, sums: &sums, tokens: args.tokens };
            let mut lines = vec![PanelLine::ZERO; panel_lines(cols) * (n / PANEL_ROWS)];
            let mut out = vec![0f32; args.tokens * n];
            for kernel in &kernels {
                let pack_all = |lines: &mut [PanelLine]| {
                    for (p, chunk) in lines.chunks_exact_mut(panel_lines(cols)).enumerate() {
                        let rows = &data[p * PANEL_ROWS * row_bytes..(p + 1) * PANEL_ROWS * row_bytes];
                        kernel.pack(format, rows, PANEL_ROWS, cols, chunk);
                    }
                };
                // The timed calls leave the panels packed for the multiply below.
                let pack = seconds_per_call(|| pack_all(&mut lines), budget);
                let multiply = seconds_per_call(
                    || {
                        for (p, chunk) in lines.chunks_exact(panel_lines(cols)).enumerate() {
                            let panel = Panel::from_packed(format, chunk, PANEL_ROWS, cols);
                            kernel.run(&panel, &x, &mut out[p * PANEL_ROWS..], n);
                        }
                    },
                    budget,
                );
                let ops = 2.0 * (n * cols * args.tokens) as f64;
                let row = PanelRow {
                    model: name.clone(),
                    tensor: tensor.name.to_string(),
                    format: format!("{format:?}"),
                    rows: n,
                    cols,
                    tokens: args.tokens,
                    kernel: kernel.name().to_string(),
                    pack_us: pack * 1e6,
                    multiply_us: multiply * 1e6,
                    gops: ops / multiply / 1e9,
                    gops_with_pack: ops / (multiply + pack) / 1e9,
                };
                eprintln!(
                    "{name} {} {:?} {}: {:.0} GOPS ({:.0} with unpacking)",
                    row.tensor, format, row.kernel, row.gops, row.gops_with_pack
                );
                rows.push(row);
            }
        }
    }
    write(args, vnni_peak, amx_peak, &rows)
}

fn write(args: &PanelArgs, vnni_peak: f64, amx_peak: Option<f64>, rows: &[PanelRow]) -> Result<()> {
    let mut md = String::new();
    writeln!(md, "# Prefill panel kernels on the models' own weights, one thread\n")?;
    writeln!(
        md,
        "`petrel-bench panels{} --tokens {} --rows {}`: the first {} rows of each block-format matrix of block 0, times {} random 8-bit activation rows; best of {} runs in on-CPU time. Peaks measured in the same run: `vpdpbusd zmm` {vnni_peak:.0} GOPS, `tdpbsud` {}.\n",
        args.models.iter().map(|m| format!(" --model {m}")).collect::<String>(),
        args.tokens,
        args.rows,
        args.rows,
        args.tokens,
        Budget::new(args.quick).runs,
        amx_peak.map_or("unavailable".into(), |p| format!("{p:.0} GOPS")),
    )?;
    writeln!(md, "| model | tensor | format | rows × cols | kernel | unpack µs | multiply µs | GOPS | % of VNNI peak | % of AMX peak | GOPS with unpack |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in rows {
        let amx_share = match amx_peak {
            Some(p) if r.kernel == "amx-int8" => format!("{:.1}%", 100.0 * r.gops / p),
            _ => "–".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} × {} | {} | {:.1} | {:.1} | {:.0} | {:.0}% | {} | {:.0} |",
            r.model,
            r.tensor,
            r.format,
            r.rows,
            r.cols,
            r.kernel,
            r.pack_us,
            r.multiply_us,
            r.gops,
            100.0 * r.gops / vnni_peak,
            amx_share,
            r.gops_with_pack
        )?;
    }
    std::fs::create_dir_all(&args.out)?;
    let json = serde_json::json!({ "vnni_peak_gops": vnni_peak, "amx_peak_gops": amx_peak, "rows": rows });
    std::fs::write(args.out.join("panels.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(args.out.join("panels.md"), &md)?;
    println!("{md}");
    eprintln!("wrote {}", args.out.join("panels.md").display());
    Ok(())
}
