//! Activation outlier statistics of the inputs of every linear layer, per block and
//! [`TapSite`], as reported by Nrusimha et al. (2024), "Mitigating the Impact of Outlier
//! Channels for Language Model Quantization with Activation Regularization":
//!
//! - **kurtosis**: for each token, the Pearson (non-excess) kurtosis of its activation
//!   vector over the channels, `E[(x−μ)⁴] / (E[(x−μ)²])²` with `μ = E[x]` and the
//!   expectations taken over the `cols` channels of that token (population moments). It is
//!   3 for Gaussian-distributed channels and grows with outlier channels. The report gives
//!   its mean over tokens;
//! - **channel magnitudes**: for each channel, `max |x|` over all observed tokens; the
//!   report gives the largest and the median of these per-channel maxima and their ratio,
//!   which is large when a few channels carry outliers.
//!
//! [`ActStats`] collects these from an [`ActivationTap`]; [`measure`] runs a tokenized text
//! through a model in windows and returns the report. Everything is accumulated in f64.

use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use petrel_runtime::forward::{ActivationTap, TapSite};
use petrel_runtime::{Model, Session, SessionOptions};

/// Running statistics of one (layer, site).
#[derive(Clone, Debug, Default)]
struct Accumulator {
    /// Tokens observed.
    tokens: usize,
    /// Sum over tokens of their kurtosis (tokens with zero variance are left out).
    kurtosis_sum: f64,
    /// Tokens that contributed to `kurtosis_sum`.
    kurtosis_tokens: usize,
    /// Per channel, the largest `|x|` seen; empty until the first batch.
    channel_max: Vec<f32>,
}

impl Accumulator {
    /// Adds `tokens` rows of `cols` values; the caller checked the shape.
    fn add(&mut self, rows: &[f32], tokens: usize, cols: usize) {
        if self.channel_max.is_empty() {
            self.channel_max = vec![0.0; cols];
        }
        for row in rows.chunks_exact(cols).take(tokens) {
            if let Some(k) = kurtosis(row) {
                self.kurtosis_sum += k;
                self.kurtosis_tokens += 1;
            }
            for (m, &x) in self.channel_max.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
        self.tokens += tokens;
    }
}

/// Pearson (non-excess) kurtosis of `values`: `E[(x−μ)⁴] / (E[(x−μ)²])²` with population
/// moments over the elements, computed in f64 in two passes. `None` when it is undefined
/// (no elements, or all equal so the variance is zero); NaN if an element is not finite.
pub fn kurtosis(values: &[f32]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let (mut m2, mut m4) = (0.0f64, 0.0f64);
    for &x in values {
        let d = f64::from(x) - mean;
        let d2 = d * d;
        m2 += d2;
        m4 += d2 * d2;
    }
    let (m2, m4) = (m2 / n, m4 / n);
    if m2 == 0.0 {
        return None;
    }
    Some(m4 / (m2 * m2))
}

/// The median of `values` (the mean of the two middle ones for an even count); NaN for
/// none. NaNs sort last.
fn median(values: &[f32]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// An [`ActivationTap`] that accumulates outlier statistics per block and [`TapSite`] (see
/// the module docs). Safe to share between threads: every (layer, site) has its own lock,
/// and each `observe` call counts the `tokens` rows it is given, so a token is counted once
/// per call that shows it (the forward pass shows each batch once, from the team's leader).
#[derive(Debug)]
pub struct ActStats {
    /// `[layer][site]`, sites in [`TapSite::ALL`] order.
    sites: Vec<[Mutex<Accumulator>; 4]>,
    /// The first malformed call (layer out of range, wrong row length, width change);
    /// such calls are otherwise ignored, and [`ActStats::finish`] reports the problem.
    problem: Mutex<Option<String>>,
}

fn site_index(site: TapSite) -> usize {
    TapSite::ALL.iter().position(|&s| s == site).unwrap_or(0)
}

/// A short lowercase name for `site`, as printed in reports: `attn_in` (input of q, k, v),
/// `attn_out` (input of o), `mlp_in` (input of gate and up), `down_in` (input of down).
pub fn site_name(site: TapSite) -> &'static str {
    match site {
        TapSite::AttentionInput => "attn_in",
        TapSite::AttentionOutput => "attn_out",
        TapSite::MlpInput => "mlp_in",
        TapSite::DownInput => "down_in",
    }
}

impl ActStats {
    /// An empty collector for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        ActStats { sites: (0..layers).map(|_| Default::default()).collect(), problem: Mutex::new(None) }
    }

    fn complain(&self, message: String) {
        let mut problem = self.problem.lock().unwrap_or_else(PoisonError::into_inner);
        problem.get_or_insert(message);
    }

    /// The statistics of every (layer, site) that saw at least one token, by layer, then
    /// in [`TapSite::ALL`] order. Fails if a call to `observe` was malformed.
    pub fn finish(self) -> Result<Vec<SiteStats>> {
        if let Some(problem) = self.problem.into_inner().unwrap_or_else(PoisonError::into_inner) {
            bail!("activation statistics: {problem}");
        }
        let mut out = Vec::new();
        for (layer, sites) in self.sites.into_iter().enumerate() {
            for (site, acc) in TapSite::ALL.into_iter().zip(sites) {
                let acc = acc.into_inner().unwrap_or_else(PoisonError::into_inner);
                if acc.tokens == 0 {
                    continue;
                }
                let max_channel = acc.channel_max.iter().map(|&m| f64::from(m)).fold(0.0, f64::max);
                let median_channel = median(&acc.channel_max);
                out.push(SiteStats {
                    layer,
                    site,
                    tokens: acc.tokens,
                    channels: acc.channel_max.len(),
                    mean_kurtosis: if acc.kurtosis_tokens == 0 {
                        f64::NAN
                    } else {
                        acc.kurtosis_sum / acc.kurtosis_tokens as f64
                    },
                    max_channel,
                    median_channel,
                    ratio: max_channel / median_channel,
                });
            }
        }
        Ok(out)
    }
}

impl ActivationTap for ActStats {
    fn observe(&self, layer: usize, site: TapSite, rows: &[f32], tokens: usize, cols: usize) {
        let Some(sites) = self.sites.get(layer) else {
            return self.complain(format!("layer {layer} is beyond the {} blocks", self.sites.len()));
        };
        if tokens == 0 || cols == 0 || tokens.checked_mul(cols) != Some(rows.len()) {
            return self.complain(format!(
                "layer {layer} {}: {} values for {tokens} tokens × {cols} channels",
                site_name(site),
                rows.len()
            ));
        }
        let mut acc = sites[site_index(site)].lock().unwrap_or_else(PoisonError::into_inner);
        if !acc.channel_max.is_empty() && acc.channel_max.len() != cols {
            let before = acc.channel_max.len();
            drop(acc);
            return self.complain(format!("layer {layer} {}: {cols} channels after {before} before", site_name(site)));
        }
        acc.add(rows, tokens, cols);
    }
}

/// Outlier statistics of the input of the linears at one site of one block.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteStats {
    /// Block index, from 0.
    pub layer: usize,
    /// Which linears' input.
    pub site: TapSite,
    /// Tokens observed.
    pub tokens: usize,
    /// Channels (the input width: `dim`, or `ffn_dim` for [`TapSite::DownInput`]).
    pub channels: usize,
    /// Mean over tokens of the per-token Pearson kurtosis over the channels
    /// (dimensionless, 3 for Gaussian channels; tokens whose activations are all equal are
    /// left out, NaN if every token was).
    pub mean_kurtosis: f64,
    /// Largest per-channel maximum: `max_c max_t |x[t, c]|` (in activation units).
    pub max_channel: f64,
    /// Median over channels of the per-channel maximum `max_t |x[t, c]|` (the mean of the
    /// two middle channels for an even count; activation units).
    pub median_channel: f64,
    /// `max_channel / median_channel` (dimensionless; infinite if the median is 0).
    pub ratio: f64,
}

/// The mean over layers of one site's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSummary {
    /// Which linears' input.
    pub site: TapSite,
    /// Layers averaged over.
    pub layers: usize,
    /// Mean over layers of [`SiteStats::mean_kurtosis`] (dimensionless).
    pub mean_kurtosis: f64,
    /// Mean over layers of [`SiteStats::ratio`] (max/median channel; dimensionless).
    pub mean_ratio: f64,
}

/// Per site present in `stats`, in [`TapSite::ALL`] order: the means over its layers.
pub fn summarize(stats: &[SiteStats]) -> Vec<SiteSummary> {
    TapSite::ALL
        .into_iter()
        .filter_map(|site| {
            let of_site: Vec<&SiteStats> = stats.iter().filter(|s| s.site == site).collect();
            let layers = of_site.len();
            (layers > 0).then(|| SiteSummary {
                site,
                layers,
                mean_kurtosis: of_site.iter().map(|s| s.mean_kurtosis).sum::<f64>() / layers as f64,
                mean_ratio: of_site.iter().map(|s| s.ratio).sum::<f64>() / layers as f64,
            })
        })
        .collect()
}

/// Runs `tokens` through `model` in consecutive, non-overlapping windows of `window`
/// tokens (the last one may be shorter), each from an empty KV cache, and returns the
/// statistics of every linear layer's input over all of them. `threads` worker threads run
/// the forward pass (the result does not depend on it); `progress` is told how many tokens
/// each window held. Needs `1 <= window <=` the model's context length and some tokens.
pub fn measure(
    model: &Model<'_>,
    tokens: &[u32],
    window: usize,
    threads: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<SiteStats>> {
    if window == 0 {
        bail!("the window must hold at least one token");
    }
    if tokens.is_empty() {
        bail!("no tokens to measure");
    }
    let capacity = window.min(tokens.len());
    let options = SessionOptions { capacity, threads: threads.max(1), ..SessionOptions::default() };
    let mut session = Session::new(model, options).context("cannot start a session")?;
    let stats = ActStats::new(model.config.layers);
    for chunk in tokens.chunks(window) {
        session.reset();
        session.prefill_observed(chunk, &stats)?;
        progress(chunk.len());
    }
    stats.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, relative: f64) -> bool {
        (a - b).abs() <= relative * a.abs().max(b.abs()) || a == b
    }

    #[test]
    fn kurtosis_of_known_vectors() {
        // ±1: every deviation is 1, so E[d⁴] / E[d²]² = 1.
        assert_eq!(kurtosis(&[1.0, -1.0, 1.0, -1.0]), Some(1.0));
        // Shift and scale do not change it.
        assert_eq!(kurtosis(&[5.0, 3.0, 5.0, 3.0]), Some(1.0));
        // Constant or empty: undefined.
        assert_eq!(kurtosis(&[2.0; 7]), None);
        assert_eq!(kurtosis(&[]), None);

        // One outlier `a` among `n − 1` zeros, worked by hand: μ = a/n; the outlier deviates
        // by a(n−1)/n and the zeros by −a/n, so E[d²] = a²(n−1)/n² and
        // E[d⁴] = a⁴(n−1)((n−1)³ + 1)/n⁵, hence kurtosis = ((n−1)³ + 1) / (n(n−1))
        // = (n² − 3n + 3) / (n − 1): 9703 / 99 ≈ 98.01 for n = 100, whatever `a`.
        let mut v = vec![0.0f32; 100];
        v[37] = 40.0;
        let expected = 9703.0 / 99.0;
        let got = kurtosis(&v).unwrap();
        assert!(close(got, expected, 1e-12), "{got} vs {expected}");
        // The same, spelled out from the definition with the vector shifted by 2.
        let shifted: Vec<f32> = v.iter().map(|x| x + 2.0).collect();
        let n = shifted.len() as f64;
        let mean = shifted.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let m2 = shifted.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        let m4 = shifted.iter().map(|&x| (f64::from(x) - mean).powi(4)).sum::<f64>() / n;
        assert!(close(kurtosis(&shifted).unwrap(), m4 / (m2 * m2), 1e-12));
        assert!(close(m4 / (m2 * m2), expected, 1e-9));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    /// `tokens × cols` rows with channel 3 ten times larger than the others, and channel
    /// magnitudes growing with the channel index.
    fn outlier_batch(tokens: usize, cols: usize) -> Vec<f32> {
        let mut rows = Vec::with_capacity(tokens * cols);
        for t in 0..tokens {
            for c in 0..cols {
                let sign = if (t + c) % 2 == 0 { 1.0 } else { -1.0 };
                let magnitude = (1 + c) as f32 * (1.0 + t as f32 / tokens as f32);
                rows.push(sign * if c == 3 { 100.0 * magnitude / 4.0 } else { magnitude });
            }
        }
        rows
    }

    #[test]
    fn channel_max_and_median_with_one_outlier_channel() {
        let (tokens, cols) = (6, 9);
        let rows = outlier_batch(tokens, cols);
        let stats = ActStats::new(2);
        stats.observe(1, TapSite::MlpInput, &rows, tokens, cols);
        let report = stats.finish().unwrap();
        assert_eq!(report.len(), 1);
        let s = &report[0];
        assert_eq!((s.layer, s.site, s.tokens, s.channels), (1, TapSite::MlpInput, tokens, cols));
        // Largest |x| of channel c is at the last token: (1 + c)·(1 + 5/6); channel 3 is
        // 100·4/4 = 100 times that factor. Channel maxima sorted: 1..9 without 4, and 100,
        // so the median (of 9) is the 5th smallest: 6.
        let last = 1.0 + 5.0 / 6.0;
        assert!(close(s.max_channel, 100.0 * last, 1e-6), "{}", s.max_channel);
        assert!(close(s.median_channel, 6.0 * last, 1e-6), "{}", s.median_channel);
        assert!(close(s.ratio, 100.0 / 6.0, 1e-6), "{}", s.ratio);
        // The mean kurtosis is the mean of the rows' kurtoses.
        let want = rows.chunks(cols).map(|r| kurtosis(r).unwrap()).sum::<f64>() / tokens as f64;
        assert!(close(s.mean_kurtosis, want, 1e-12));
    }

    #[test]
    fn split_observations_give_the_same_stats() {
        let (tokens, cols) = (10, 16);
        let rows = outlier_batch(tokens, cols);
        let whole = ActStats::new(1);
        let split = ActStats::new(1);
        for site in TapSite::ALL {
            whole.observe(0, site, &rows, tokens, cols);
            split.observe(0, site, &rows[..3 * cols], 3, cols);
            split.observe(0, site, &rows[3 * cols..], tokens - 3, cols);
        }
        let (whole, split) = (whole.finish().unwrap(), split.finish().unwrap());
        assert_eq!(whole.len(), 4);
        assert_eq!(whole, split);
        assert!(whole.iter().all(|s| s.tokens == tokens));
    }

    #[test]
    fn summary_averages_over_layers() {
        let stats = ActStats::new(3);
        for layer in 0..3 {
            let rows: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * (layer + 1) as f32).collect();
            stats.observe(layer, TapSite::DownInput, &rows, 2, 4);
        }
        let report = stats.finish().unwrap();
        let summary = summarize(&report);
        assert_eq!(summary.len(), 1);
        assert_eq!((summary[0].site, summary[0].layers), (TapSite::DownInput, 3));
        let mean = |f: fn(&SiteStats) -> f64| report.iter().map(f).sum::<f64>() / 3.0;
        assert!(close(summary[0].mean_kurtosis, mean(|s| s.mean_kurtosis), 1e-12));
        assert!(close(summary[0].mean_ratio, mean(|s| s.ratio), 1e-12));
    }

    #[test]
    fn malformed_observations_are_reported() {
        let stats = ActStats::new(1);
        stats.observe(1, TapSite::MlpInput, &[1.0, 2.0], 1, 2);
        assert!(stats.finish().is_err());
        let stats = ActStats::new(1);
        stats.observe(0, TapSite::MlpInput, &[1.0, 2.0, 3.0], 1, 2);
        assert!(stats.finish().is_err());
        let stats = ActStats::new(1);
        stats.observe(0, TapSite::MlpInput, &[1.0, 2.0], 1, 2);
        stats.observe(0, TapSite::MlpInput, &[1.0, 2.0, 3.0], 1, 3);
        assert!(stats.finish().is_err());
    }

    /// On SmolLM2 (from the cache, as the other model tests): one and two threads count
    /// every token once at every site and agree on the statistics.
    #[test]
    fn measure_is_independent_of_the_thread_count() {
        let known = crate::registry::known_model("smollm2-135m").expect("a known model");
        let path = crate::registry::cached_path(known).expect("a cache directory");
        assert!(path.exists(), "{} is missing: run `petrel pull smollm2-135m` first", path.display());
        let file = petrel_runtime::mapped::MappedFile::open(&path).expect("model maps");
        let gguf = petrel_runtime::gguf::GgufFile::parse(file.bytes()).expect("valid GGUF");
        let model = Model::load(&gguf).expect("loads");
        let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age \
                    of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season \
                    of Light, it was the season of Darkness, it was the spring of hope.";
        let mut tokens = model.tokenizer.encode(&text.repeat(2), false);
        tokens.truncate(100);
        assert_eq!(tokens.len(), 100);
        // Windows of 70 and 30 tokens; the first takes two prefill batches (64 + 6).
        let window = 70;
        let mut seen = 0;
        let one = measure(&model, &tokens, window, 1, |n| seen += n).expect("measures");
        assert_eq!(seen, tokens.len());
        let two = measure(&model, &tokens, window, 2, |_| {}).expect("measures");
        assert_eq!(one.len(), model.config.layers * 4);
        assert_eq!(one.len(), two.len());
        for (a, b) in one.iter().zip(&two) {
            assert_eq!((a.layer, a.site, a.channels), (b.layer, b.site, b.channels));
            assert_eq!((a.tokens, b.tokens), (tokens.len(), tokens.len()), "layer {} {:?}", a.layer, a.site);
            let width = if a.site == TapSite::DownInput { model.config.ffn_dim } else { model.config.dim };
            assert_eq!(a.channels, width);
            for (x, y) in [
                (a.mean_kurtosis, b.mean_kurtosis),
                (a.max_channel, b.max_channel),
                (a.median_channel, b.median_channel),
                (a.ratio, b.ratio),
            ] {
                assert!(x.is_finite() && close(x, y, 1e-9), "layer {} {:?}: {x} vs {y}", a.layer, a.site);
            }
            assert!(a.mean_kurtosis >= 1.0 && a.ratio >= 1.0);
        }
    }
}
