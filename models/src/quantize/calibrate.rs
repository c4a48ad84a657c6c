//! Calibration for GPTQ: the Hessian `H = (2/n)·Σ x·xᵀ` of every linear layer's input,
//! measured by running the model on calibration text.

use std::sync::Mutex;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use petrel_runtime::forward::{ActivationTap, TapSite};
use petrel_runtime::{KvType, Model, Session, SessionOptions};

/// Input Hessians per block and [`TapSite`], each `cols × cols` row-major in f64, with
/// the number of tokens they summarize.
#[derive(Debug)]
pub struct Hessians {
    /// `[layer][site]`: `Σ x·xᵀ` (not yet scaled).
    sums: Vec<[Vec<f64>; 4]>,
    /// Tokens observed.
    pub tokens: usize,
}

impl Hessians {
    /// `H = (2/n)·Σ x·xᵀ` of the inputs at `site` of block `layer`.
    pub fn get(&self, layer: usize, site: TapSite) -> Vec<f64> {
        let scale = 2.0 / self.tokens.max(1) as f64;
        self.sums[layer][site_index(site)].iter().map(|v| v * scale).collect()
    }
}

fn site_index(site: TapSite) -> usize {
    TapSite::ALL.iter().position(|&s| s == site).unwrap_or(0)
}

/// Collects what the model's leader thread shows it during one prefill.
struct Capture {
    rows: Vec<Mutex<Vec<f32>>>,
}

impl ActivationTap for Capture {
    fn observe(&self, layer: usize, site: TapSite, rows: &[f32], _tokens: usize, _cols: usize) {
        if let Ok(mut buffer) = self.rows[layer * 4 + site_index(site)].lock() {
            buffer.extend_from_slice(rows);
        }
    }
}

/// Runs `model` over `sequences` (each from an empty cache) and accumulates the input
/// Hessians of every linear. `Σ x·xᵀ` is a matrix product per sequence, done with candle
/// on all cores after the forward pass.
pub fn collect(model: &Model<'_>, sequences: &[Vec<u32>], threads: usize) -> Result<Hessians> {
    let c = &model.config;
    let width = |site: TapSite| if site == TapSite::DownInput { c.ffn_dim } else { c.dim };
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(1);
    let mut session = Session::new(
        model,
        SessionOptions { capacity: longest, max_batch: 64, threads, kv_type: KvType::F32, ..SessionOptions::default() },
    )?;
    let mut sums: Vec<[Vec<f64>; 4]> =
        (0..c.layers).map(|_| TapSite::ALL.map(|s| vec![0f64; width(s) * width(s)])).collect();
    let capture = Capture { rows: (0..c.layers * 4).map(|_| Mutex::new(Vec::new())).collect() };
    let bar = ProgressBar::new(sequences.len() as u64).with_style(
        ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} sequences, {elapsed} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tokens = 0;
    for seq in sequences {
        session.reset();
        session.prefill_observed(seq, &capture)?;
        tokens += seq.len();
        for (l, layer) in sums.iter_mut().enumerate() {
            for (s, site) in TapSite::ALL.iter().enumerate() {
                let mut buffer = capture.rows[l * 4 + s].lock().map_err(|_| anyhow::anyhow!("capture poisoned"))?;
                let k = width(*site);
                let x = Tensor::from_slice(&buffer[..], (buffer.len() / k, k), &Device::Cpu)?;
                let xtx = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>().context("Hessian product")?;
                for (acc, v) in layer[s].iter_mut().zip(xtx) {
                    *acc += v as f64;
                }
                buffer.clear();
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Hessians { sums, tokens })
}
