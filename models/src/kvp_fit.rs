//! `petrel kvp-fit`: a KV predictor for a model, fitted in closed form.
//!
//! The auxiliary model is a layer-pruned copy of the base (`--keep every:4` keeps blocks
//! 0, 4, 8, …; base block `l` is then predicted from the last kept block at or below it,
//! `l / 4`, the paper's `AuxLayerToBaseLayer`), or the auxiliary model the file already
//! has (then only the maps are refitted: after training, or after quantizing a trained
//! auxiliary model). Each base layer's key and value maps (`LinearAuxKVToBaseKV`, with
//! bias, on merged heads, keys before RoPE) are fitted by ridge regression on calibration
//! windows run through both models, pairing rows by position:
//!
//! 1. Per window, the auxiliary model and then the base run over the text with a tap that
//!    records every block's keys (before RoPE) and values.
//! 2. Per base layer, f64 normal equations for K and V: `Σx`, `Σxxᵀ`, `Σy`, `Σxyᵀ`, `Σy²`.
//!    A routed (mixture-of-depths) base block has rows only for its routed tokens, and
//!    is fitted on those.
//! 3. Per base layer and output, ridge on standardized inputs (one Cholesky factor shared
//!    by all outputs), mapped back to raw inputs; the intercepts are the biases.
//!
//! The fit runs on the file itself (W4A4 included), so quantization and rotation are
//! absorbed by the maps: a fit on the W4A4 pair predicts what the W4A4 base computes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use petrel_quant::blocks::{quantize_row, WeightFormat};
use petrel_quant::w4::GroupSize;
use petrel_runtime::forward::{ActivationTap, TapSite};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::kv_predict::{predictor_tensor_name, KEY_BLOCK_COUNT, KEY_LAYER_MAP, KEY_SOURCE_LAYERS};
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::scheme::KEY_ACTIVATION_BITS_PREFIX;
use petrel_runtime::{KvType, Model, Session, SessionOptions};
use rayon::prelude::*;

use crate::quantize::master::Matrix;
use crate::quantize::{put_w4, quantize_w4};

use crate::ridge::{cholesky, solve, standardize, Standardized};
use crate::{corpus, registry};

/// How the map matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MapType {
    /// 32-bit floats (exact; float kernels).
    F32,
    /// 16-bit floats.
    F16,
    /// llama.cpp's Q8_0 (8-bit blocks of 32, integer kernels with 8-bit activations).
    #[value(name = "q8_0")]
    Q8_0,
    /// The model's W4 format with 8-bit activations (W4 files only; the fast W4 GEMM).
    W4a8,
    /// The model's W4 format with its own activation bits (4 in a W4A4 file).
    W4,
}

/// `petrel kvp-fit` options.
#[derive(clap::Args, Debug, Clone)]
pub struct KvpFitArgs {
    /// The base model (a known name or a GGUF path; any format the runtime runs).
    #[arg(long, short)]
    pub model: String,
    /// Calibration text (UTF-8), e.g. the corpora's train.txt.
    #[arg(long)]
    pub text: PathBuf,
    /// Output GGUF: the base, the auxiliary model's description and the fitted maps
    /// (plus `OUT.json` with the fit quality per layer).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Auxiliary blocks cut from the base: `every:N` (blocks 0, N, 2N, …) or a list
    /// `0+4+8`. Omit it to refit the maps of a model that already has an auxiliary model.
    #[arg(long)]
    pub keep: Option<String>,
    /// Calibration tokens (consecutive windows of --window tokens).
    #[arg(long, default_value_t = 16_384)]
    pub calib_tokens: usize,
    /// Tokens per window (the positions the maps see: use the prompt lengths you serve).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Ridge strength on standardized inputs (0.1 measured best on SmolLM2 W4A4 among
    /// 0.001, 0.01, 0.1 and 1: continuation perplexity 338, 262, 254, 311).
    #[arg(long, default_value_t = 0.1)]
    pub ridge: f64,
    /// Storage of the map matrices (default: w4a8 for W4 models, f32 otherwise).
    #[arg(long, value_enum)]
    pub map_type: Option<MapType>,
    /// Worker threads (default: all available cores).
    #[arg(long, short)]
    pub threads: Option<usize>,
}

/// The auxiliary blocks for `spec` in a base of `layers` blocks.
pub fn parse_keep(spec: &str, layers: usize) -> Result<Vec<usize>> {
    let keep: Vec<usize> = if let Some(n) = spec.strip_prefix("every:") {
        let n: usize = n.parse().with_context(|| format!("--keep {spec}: expected every:N"))?;
        if n == 0 || n > layers {
            bail!("--keep {spec}: N must be between 1 and the model's {layers} blocks");
        }
        (0..layers).step_by(n).collect()
    } else {
        spec.split('+')
            .map(|p| p.trim().parse::<usize>().with_context(|| format!("--keep {spec}: expected every:N or 0+4+8")))
            .collect::<Result<_>>()?
    };
    if keep.is_empty() || keep.iter().any(|&l| l >= layers) {
        bail!("--keep {spec}: blocks must exist (the model has {layers})");
    }
    if keep.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--keep {spec}: blocks must be strictly increasing");
    }
    Ok(keep)
}

/// Per base layer, the auxiliary block it is predicted from: the last kept block at or
/// below it (the first for layers before it).
pub fn layer_map(keep: &[usize], layers: usize) -> Vec<usize> {
    (0..layers).map(|l| keep.iter().filter(|&&k| k <= l).count().saturating_sub(1)).collect()
}

/// Every block's keys (before RoPE), values and positions for one window.
#[derive(Default)]
struct Recorded {
    keys: Vec<f32>,
    values: Vec<f32>,
    positions: Vec<u32>,
}

/// A tap that records [`Recorded`] per block.
struct KvRecorder {
    blocks: Mutex<Vec<Recorded>>,
}

impl KvRecorder {
    fn new(blocks: usize) -> Self {
        KvRecorder { blocks: Mutex::new((0..blocks).map(|_| Recorded::default()).collect()) }
    }

    fn take(&self) -> Vec<Recorded> {
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        blocks.iter_mut().map(std::mem::take).collect()
    }
}

impl ActivationTap for KvRecorder {
    fn observe(&self, _layer: usize, _site: TapSite, _rows: &[f32], _tokens: usize, _cols: usize) {}

    fn observe_kv(&self, layer: usize, keys: &[f32], values: &[f32], positions: &[u32], _kv_dim: usize) {
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        let r = &mut blocks[layer];
        r.keys.extend_from_slice(keys);
        r.values.extend_from_slice(values);
        r.positions.extend_from_slice(positions);
    }
}

/// Normal equations of one multi-output regression `y ≈ W x + b` (`n` inputs, `n` outputs).
#[derive(Clone)]
struct Normal {
    n: usize,
    rows: usize,
    sum_x: Vec<f64>,
    /// Upper triangle of Σ x xᵀ (`n × n`).
    sum_xx: Vec<f64>,
    sum_y: Vec<f64>,
    sum_yy: Vec<f64>,
    /// Σ x yᵀ (`n × n`, input-major).
    sum_xy: Vec<f64>,
}

impl Normal {
    fn new(n: usize) -> Self {
        Normal {
            n,
            rows: 0,
            sum_x: vec![0.0; n],
            sum_xx: vec![0.0; n * n],
            sum_y: vec![0.0; n],
            sum_yy: vec![0.0; n],
            sum_xy: vec![0.0; n * n],
        }
    }

    fn add(&mut self, x: &[f32], y: &[f32]) {
        let n = self.n;
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        self.rows += 1;
        for i in 0..n {
            self.sum_x[i] += x[i];
            self.sum_y[i] += y[i];
            self.sum_yy[i] += y[i] * y[i];
            let xi = x[i];
            for (s, &xj) in self.sum_xx[i * n + i..(i + 1) * n].iter_mut().zip(&x[i..]) {
                *s += xi * xj;
            }
            for (s, &yj) in self.sum_xy[i * n..(i + 1) * n].iter_mut().zip(&y) {
                *s += xi * yj;
            }
        }
    }

    /// The ridge solution: `W` (`n × n`, output-major, f32), `b`, and the fraction of the
    /// outputs' variance it explains on the calibration rows.
    fn fit(&self, lambda: f64) -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let (n, rows) = (self.n, self.rows as f64);
        if self.rows < 2 {
            bail!("too few calibration rows");
        }
        let Standardized { mean: mean_x, std, correlation: a } = standardize(&self.sum_x, &self.sum_xx, rows);
        let mean_y: Vec<f64> = self.sum_y.iter().map(|s| s / rows).collect();
        let factor = cholesky(&a, n, lambda)?;
        let mut weight = vec![0f32; n * n];
        let mut bias = vec![0f32; n];
        let (mut explained, mut total) = (0f64, 0f64);
        for j in 0..n {
            let c: Vec<f64> =
                (0..n).map(|i| (self.sum_xy[i * n + j] / rows - mean_x[i] * mean_y[j]) / std[i]).collect();
            let beta = solve(&factor, &c, n);
            let w: Vec<f64> = (0..n).map(|i| beta[i] / std[i]).collect();
            bias[j] = (mean_y[j] - w.iter().zip(&mean_x).map(|(w, m)| w * m).sum::<f64>()) as f32;
            for i in 0..n {
                weight[j * n + i] = w[i] as f32;
            }
            // Explained variance of a least-squares fit: 2βᵀc − βᵀAβ (standardized inputs).
            let a_beta: Vec<f64> = (0..n).map(|i| (0..n).map(|k| a[i * n + k] * beta[k]).sum()).collect();
            explained += 2.0 * dot(&beta, &c) - dot(&beta, &a_beta);
            total += (self.sum_yy[j] / rows - mean_y[j] * mean_y[j]).max(0.0);
        }
        Ok((weight, bias, explained / total.max(1e-30)))
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Writes map matrix `w` (`n × n`, output-major) as tensor `name` in `ty`'s storage
/// (`group`: the model's W4 group size, for the W4 storages).
fn put_map(
    writer: &mut GgufWriter,
    name: &str,
    w: &[f32],
    n: usize,
    ty: MapType,
    group: Option<GroupSize>,
) -> Result<()> {
    if let (MapType::W4a8 | MapType::W4, Some(group)) = (ty, group) {
        let matrix = Matrix { rows: n, cols: n, data: w.to_vec() };
        put_w4(writer, name, quantize_w4(&matrix, group, None, false)?);
        if ty == MapType::W4a8 {
            writer.metadata(&format!("{KEY_ACTIVATION_BITS_PREFIX}{name}"), MetadataValue::U32(8));
        }
        return Ok(());
    }
    let (ty, bytes) = map_tensor(w, n, ty);
    writer.tensor(name, &[n as u64, n as u64], ty, bytes);
    Ok(())
}

/// The map matrix `w` (`n × n`) in `ty`'s bytes and GGUF type (float and Q8_0 storages).
fn map_tensor(w: &[f32], n: usize, ty: MapType) -> (TensorType, Vec<u8>) {
    match ty {
        MapType::F32 => (TensorType::F32, w.iter().flat_map(|v| v.to_le_bytes()).collect()),
        MapType::F16 => {
            (TensorType::F16, w.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect())
        }
        MapType::Q8_0 => {
            let row_bytes = WeightFormat::Q8_0.row_bytes(n).unwrap_or(0);
            let mut out = vec![0u8; n * row_bytes];
            for (o, row) in out.chunks_exact_mut(row_bytes).zip(w.chunks_exact(n)) {
                quantize_row(WeightFormat::Q8_0, row, o);
            }
            (TensorType::Q8_0, out)
        }
        MapType::W4a8 | MapType::W4 => unreachable!("W4 maps are written by put_map"),
    }
}

/// Runs `petrel kvp-fit`.
pub fn run(args: &KvpFitArgs) -> Result<()> {
    if args.window < 2 || args.calib_tokens < args.window {
        bail!("--calib-tokens ({}) must hold at least one --window ({} ≥ 2)", args.calib_tokens, args.window);
    }
    let path = registry::resolve(&args.model)?;
    let mapped = MappedFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let gguf = GgufFile::parse(mapped.bytes()).with_context(|| format!("cannot parse {}", path.display()))?;
    let model = Model::load(&gguf).with_context(|| format!("cannot load {}", path.display()))?;
    let layers = model.config.layers;
    if args.window > model.config.context_length {
        bail!("--window {} exceeds the model's context of {}", args.window, model.config.context_length);
    }
    // The auxiliary model: cut from the base, or the file's own (refit).
    let (cut, map, source, refit) = match (&args.keep, &model.kv_predictor) {
        (Some(spec), None) => {
            let keep = parse_keep(spec, layers)?;
            (Some(model.layer_pruned(&keep)), layer_map(&keep, layers), Some(keep), false)
        }
        (None, Some(p)) => (None, p.layer_map.clone(), p.source_layers.clone(), true),
        (Some(_), Some(_)) => bail!(
            "{} already has an auxiliary model: omit --keep to refit its maps, or start from the plain base",
            path.display()
        ),
        (None, None) => bail!("{} has no auxiliary model: say which blocks to keep (--keep every:4)", path.display()),
    };
    let aux = match (&cut, &model.kv_predictor) {
        (Some(aux), _) => aux,
        (None, Some(p)) => &p.aux,
        (None, None) => bail!("no auxiliary model"),
    };
    let map_type = args.map_type.unwrap_or(if model.scheme.is_some() { MapType::W4a8 } else { MapType::F32 });
    let group = model.scheme.map(|s| s.group);
    if matches!(map_type, MapType::W4a8 | MapType::W4) && group.is_none() {
        bail!("--map-type {map_type:?} needs a W4 model (this one has no petrel.quant.scheme)");
    }
    let kv = model.config.kv_dim();
    if map_type == MapType::Q8_0 && !kv.is_multiple_of(32) {
        bail!("--map-type q8_0 needs a key/value width divisible by 32 (this model's is {kv})");
    }

    let text = corpus::read_text(&args.text)?;
    let prefix_end = text.char_indices().nth(args.calib_tokens * 8).map_or(text.len(), |(i, _)| i);
    let tokens = model.tokenizer.encode(&text[..prefix_end], false);
    let windows = tokens.len().min(args.calib_tokens) / args.window;
    if windows == 0 {
        bail!("{} has {} tokens, fewer than one window of {}", args.text.display(), tokens.len(), args.window);
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options = SessionOptions { capacity: args.window, threads, kv_type: KvType::F32, ..SessionOptions::default() };
    let mut base_session = Session::new(&model, options.clone())?;
    let mut aux_session = Session::new(aux, options)?;
    let (base_tap, aux_tap) = (KvRecorder::new(layers), KvRecorder::new(aux.config.layers));
    let mut normals: Vec<[Normal; 2]> = (0..layers).map(|_| [Normal::new(kv), Normal::new(kv)]).collect();
    let bar = ProgressBar::new((windows * args.window) as u64).with_style(
        ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for w in 0..windows {
        let window = &tokens[w * args.window..(w + 1) * args.window];
        aux_session.reset();
        aux_session.prefill_observed(window, &aux_tap)?;
        base_session.reset();
        base_session.prefill_observed(window, &base_tap)?;
        let (aux_kv, base_kv) = (aux_tap.take(), base_tap.take());
        normals.par_iter_mut().enumerate().for_each(|(l, [keys, values])| {
            let (x, y) = (&aux_kv[map[l]], &base_kv[l]);
            // The auxiliary model is dense: its row for position p is row p.
            for (r, &p) in y.positions.iter().enumerate() {
                let (p, rows) = (p as usize, r * kv..(r + 1) * kv);
                keys.add(&x.keys[p * kv..(p + 1) * kv], &y.keys[rows.clone()]);
                values.add(&x.values[p * kv..(p + 1) * kv], &y.values[rows]);
            }
        });
        bar.inc(args.window as u64);
    }
    bar.finish_and_clear();

    let fitted: Vec<_> = normals
        .par_iter()
        .enumerate()
        .map(|(l, [k, v])| -> Result<_> {
            let keys = k.fit(args.ridge).with_context(|| format!("fitting the key map of layer {l}"))?;
            let values = v.fit(args.ridge).with_context(|| format!("fitting the value map of layer {l}"))?;
            Ok((keys, values))
        })
        .collect::<Result<_>>()?;

    let mut writer = GgufWriter::copy_of(&gguf, |name| {
        !name.starts_with("petrel.kvp.")
            && !name.starts_with("kvp.pred.")
            && !name.starts_with(&format!("{KEY_ACTIVATION_BITS_PREFIX}kvp.pred."))
    });
    writer
        .metadata(KEY_BLOCK_COUNT, MetadataValue::U32(aux.config.layers as u32))
        .metadata(KEY_LAYER_MAP, MetadataValue::I32Array(map.iter().map(|&a| a as i32).collect()));
    if let Some(source) = &source {
        writer.metadata(KEY_SOURCE_LAYERS, MetadataValue::I32Array(source.iter().map(|&l| l as i32).collect()));
    }
    let mut report = Vec::new();
    eprintln!("layer  aux  R²(K)  R²(V)");
    for (l, ((kw, kb, kr2), (vw, vb, vr2))) in fitted.iter().enumerate() {
        for (which, w, b) in [("k", kw, kb), ("v", vw, vb)] {
            put_map(&mut writer, &predictor_tensor_name(l, &format!("{which}.weight")), w, kv, map_type, group)?;
            let bias: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.tensor(&predictor_tensor_name(l, &format!("{which}.bias")), &[kv as u64], TensorType::F32, bias);
        }
        eprintln!("{l:>5}  {:>3}  {kr2:.3}  {vr2:.3}", map[l]);
        report.push(format!(
            "    {{\"layer\": {l}, \"aux_block\": {}, \"r2_keys\": {kr2}, \"r2_values\": {vr2}}}",
            map[l]
        ));
    }
    crate::gguf_out::write_loadable(&args.out, &writer.to_bytes())?;
    let json = format!(
        "{{\n  \"model\": \"{}\",\n  \"refit\": {refit},\n  \"aux_blocks\": {},\n  \"source_layers\": {:?},\n  \"calibration_tokens\": {},\n  \"window\": {},\n  \"ridge\": {},\n  \"map_type\": \"{:?}\",\n  \"layers\": [\n{}\n  ]\n}}\n",
        path.display(),
        aux.config.layers,
        source.unwrap_or_default(),
        windows * args.window,
        args.window,
        args.ridge,
        map_type,
        report.join(",\n")
    );
    let json_path = json_path(&args.out);
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!("wrote {} and {}", args.out.display(), json_path.display());
    Ok(())
}

fn json_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_specs_and_the_layer_map() {
        assert_eq!(parse_keep("every:4", 30).expect("valid"), vec![0, 4, 8, 12, 16, 20, 24, 28]);
        assert_eq!(parse_keep("0+2+5", 6).expect("valid"), vec![0, 2, 5]);
        for bad in ["every:0", "every:31", "0+30", "4+2", "0+x", ""] {
            assert!(parse_keep(bad, 30).is_err(), "{bad}");
        }
        assert_eq!(layer_map(&[0, 4, 8], 10), vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2]);
        assert_eq!(layer_map(&[2, 5], 7), vec![0, 0, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn the_fit_recovers_an_affine_map() {
        let n = 4;
        let w = [1.0f32, 0.5, 0.0, -1.0, 0.0, 2.0, 0.25, 0.0, -0.5, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 3.0];
        let b = [0.1f32, -0.2, 0.3, 0.0];
        let mut normal = Normal::new(n);
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for _ in 0..500 {
            let x: Vec<f32> = (0..n).map(|_| next()).collect();
            let y: Vec<f32> = (0..n).map(|j| (0..n).map(|i| w[j * n + i] * x[i]).sum::<f32>() + b[j]).collect();
            normal.add(&x, &y);
        }
        let (fw, fb, r2) = normal.fit(1e-9).expect("fits");
        assert!(fw.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-3), "{fw:?}");
        assert!(fb.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-3), "{fb:?}");
        assert!(r2 > 0.999, "{r2}");
    }
}
