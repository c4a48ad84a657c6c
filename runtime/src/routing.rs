//! Mixture-of-depths routing (Raposo et al., 2024): in a routed block a scalar router
//! scores every token and only some tokens go through the block's attention and MLP; the
//! others skip it, leaving no keys or values there.
//!
//! - **Prefill** takes the top `k = ⌈capacity · n⌉` of each batch of `n` tokens by router
//!   score ([`routed_count`], [`select_top_k`]), so shapes are known in advance. Ties go to
//!   the earlier token; the chosen tokens run in position order.
//! - **Decode** (and, on request, prefill) uses a causal decision per token
//!   ([`Router::routes`]): the router's own logit `> 0` (trained with a BCE loss against
//!   top-k membership) or a small predictor MLP's logit `> 0`.
//! - A routed token's new residual is `x + g · (block(x) − x)` with `g = σ(router logit)`
//!   ([`Gate::Sigmoid`], models trained with routing) or simply `block(x)`
//!   ([`Gate::None`], routers fitted to a pretrained model, which must not be rescaled).
//!
//! In the file: `petrel.mod.layers` (array of block indices, increasing),
//! `petrel.mod.capacity` (f32 in (0, 1]), `petrel.mod.gate` (`sigmoid` | `none`),
//! `petrel.mod.decision` (`router` | `predictor`), optionally `petrel.mod.sink_tokens`
//! (positions that always go through, default 0), and per routed block N the f32 tensors
//! `blk.N.mod_router.weight` (`dim`), `blk.N.mod_router.bias` (1) and, for the predictor,
//! `blk.N.mod_pred_in.weight` (`hidden × dim`, ggml dims `[dim, hidden]`),
//! `blk.N.mod_pred_in.bias` (`hidden`), `blk.N.mod_pred_out.weight` (`hidden`),
//! `blk.N.mod_pred_out.bias` (1).

use alloc::string::ToString;
use alloc::vec::Vec;

use crate::gguf::{GgufFile, TensorInfo, TensorType};
use crate::model::ModelError;

/// Metadata key: the routed blocks' indices (array of integers, strictly increasing).
pub const KEY_LAYERS: &str = "petrel.mod.layers";
/// Metadata key: the fraction of a prefill batch each routed block processes, in (0, 1].
pub const KEY_CAPACITY: &str = "petrel.mod.capacity";
/// Metadata key: how a routed token's block output is weighted (`sigmoid` or `none`).
pub const KEY_GATE: &str = "petrel.mod.gate";
/// Metadata key: the causal decision used at decode (`router` or `predictor`).
pub const KEY_DECISION: &str = "petrel.mod.decision";
/// Metadata key (optional, default 0): the first this many positions of the context go
/// through every routed block whatever their score.
pub const KEY_SINK_TOKENS: &str = "petrel.mod.sink_tokens";

/// How a routed token's block output enters the residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `x + σ(r) · (block(x) − x)`: the router is on the gradient path (trained models).
    Sigmoid,
    /// `block(x)`: routers fitted to a frozen pretrained model only select.
    None,
}

impl Gate {
    /// The metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Gate::Sigmoid => "sigmoid",
            Gate::None => "none",
        }
    }
}

/// The causal per-token decision that replaces top-k where the batch is not known
/// (decoding one token at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Route when the router's logit is positive.
    Router,
    /// Route when the predictor MLP's logit is positive.
    Predictor,
}

impl Decision {
    /// The metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Router => "router",
            Decision::Predictor => "predictor",
        }
    }
}

/// How a prefill batch is routed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillRouting {
    /// The top `⌈capacity · n⌉` tokens of each batch of `n` (the paper's training rule).
    #[default]
    TopK,
    /// Each token by the causal decision, as in decoding (for evaluation: no token's route
    /// depends on later tokens).
    Causal,
}

/// A small MLP that predicts, from a block's input alone, whether top-k would route the
/// token: `w_out · silu(W_in · x̂ + b_in) + b_out` with `x̂ = x / rms(x)`.
#[derive(Clone, Debug)]
pub struct Predictor {
    /// `hidden × dim`, row-major.
    w_in: Vec<f32>,
    /// `hidden`.
    b_in: Vec<f32>,
    /// `hidden`.
    w_out: Vec<f32>,
    b_out: f32,
}

/// The router of one block (`r = w · x + b` on the block's input residual `x`) and its
/// optional predictor.
#[derive(Clone, Debug)]
pub struct Router {
    /// `dim`.
    weight: Vec<f32>,
    bias: f32,
    predictor: Option<Predictor>,
}

impl Router {
    /// The router's logit for one token's residual `x` (`dim` long), accumulated in f64.
    pub fn score(&self, x: &[f32]) -> f32 {
        (dot_f64(&self.weight, x) + self.bias as f64) as f32
    }

    /// The predictor's logit for `x`, if this router has a predictor. `eps` is the model's
    /// RMSNorm ε.
    pub fn predictor_logit(&self, x: &[f32], eps: f32) -> Option<f32> {
        let p = self.predictor.as_ref()?;
        let mean_square = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
        let inv_rms = 1.0 / libm::sqrt(mean_square + eps as f64);
        let mut out = p.b_out as f64;
        for ((row, &b), &w) in p.w_in.chunks_exact(x.len()).zip(&p.b_in).zip(&p.w_out) {
            let pre = dot_f64(row, x) * inv_rms + b as f64;
            let silu = pre / (1.0 + libm::exp(-pre));
            out += w as f64 * silu;
        }
        Some(out as f32)
    }

    /// The causal decision for `x`, whose router score [`Router::score`] is `score`: does
    /// this token go through the block?
    pub fn routes(&self, decision: Decision, score: f32, x: &[f32], eps: f32) -> bool {
        match decision {
            Decision::Router => score > 0.0,
            // Loading checks that a predictor exists when the file asks for it.
            Decision::Predictor => self.predictor_logit(x, eps).is_some_and(|p| p > 0.0),
        }
    }

    /// Hidden width of the predictor (0 without one).
    pub fn predictor_hidden(&self) -> usize {
        self.predictor.as_ref().map_or(0, |p| p.b_in.len())
    }
}

/// A model's mixture-of-depths configuration and routers.
#[derive(Clone, Debug)]
pub struct MixtureOfDepths {
    /// Fraction of each prefill batch a routed block processes, in (0, 1].
    pub capacity: f32,
    /// How routed tokens' outputs are weighted.
    pub gate: Gate,
    /// The causal decision used when decoding (callers may switch it to compare).
    pub decision: Decision,
    /// The first `sink_tokens` positions always go through every routed block. Pretrained
    /// models concentrate attention on the first tokens (attention sinks, Xiao et al.
    /// 2023); a block that loses their keys and values attends very differently. Within
    /// top-k they count towards `k` (which grows to hold them if needed).
    pub sink_tokens: usize,
    /// One entry per block: its router, or `None` for a block every token goes through.
    routers: Vec<Option<Router>>,
}

impl MixtureOfDepths {
    /// Reads the routing of `file` for a model of `layers` blocks of width `dim`; `None`
    /// when the file has no `petrel.mod.*` metadata (a dense model).
    pub fn from_gguf(file: &GgufFile<'_>, layers: usize, dim: usize) -> Result<Option<Self>, ModelError> {
        let Some(listed) = file.get(KEY_LAYERS) else {
            return Ok(None);
        };
        let bad = |key: &str, reason: &'static str| ModelError::BadMetadata { key: key.to_string(), reason };
        let integers = listed
            .as_array()
            .and_then(|a| a.integers().map(|i| i.collect::<Vec<i64>>()))
            .ok_or(bad(KEY_LAYERS, "expected an array of block indices"))?;
        if integers.is_empty() {
            return Err(bad(KEY_LAYERS, "names no block"));
        }
        let mut routers: Vec<Option<Router>> = (0..layers).map(|_| None).collect();
        let mut previous: Option<i64> = None;
        for &l in &integers {
            if l < 0 || l as u64 >= layers as u64 {
                return Err(bad(KEY_LAYERS, "names a block the model does not have"));
            }
            if previous.is_some_and(|p| p >= l) {
                return Err(bad(KEY_LAYERS, "block indices must be strictly increasing"));
            }
            previous = Some(l);
        }
        let capacity = file
            .get(KEY_CAPACITY)
            .ok_or_else(|| ModelError::MissingMetadata(KEY_CAPACITY.to_string()))?
            .as_f32()
            .ok_or(bad(KEY_CAPACITY, "expected a number"))?;
        if !(capacity > 0.0 && capacity <= 1.0) {
            return Err(bad(KEY_CAPACITY, "the capacity must lie in (0, 1]"));
        }
        let gate = match file.get(KEY_GATE).and_then(|v| v.as_str()) {
            Some("sigmoid") => Gate::Sigmoid,
            Some("none") => Gate::None,
            Some(_) => return Err(bad(KEY_GATE, "expected \"sigmoid\" or \"none\"")),
            None => return Err(ModelError::MissingMetadata(KEY_GATE.to_string())),
        };
        let decision = match file.get(KEY_DECISION).and_then(|v| v.as_str()) {
            Some("router") => Decision::Router,
            Some("predictor") => Decision::Predictor,
            Some(_) => return Err(bad(KEY_DECISION, "expected \"router\" or \"predictor\"")),
            None => return Err(ModelError::MissingMetadata(KEY_DECISION.to_string())),
        };
        let sink_tokens = match file.get(KEY_SINK_TOKENS) {
            None => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or(bad(KEY_SINK_TOKENS, "expected a non-negative integer"))?,
        };
        for &l in &integers {
            let name = |suffix: &str| alloc::format!("blk.{l}.{suffix}");
            let weight = finite_vector(file, &name("mod_router.weight"), Some(dim))?;
            let bias = finite_vector(file, &name("mod_router.bias"), Some(1))?[0];
            let predictor = match file.tensor(&name("mod_pred_in.weight")) {
                None if decision == Decision::Predictor => {
                    return Err(ModelError::MissingTensor(name("mod_pred_in.weight")))
                }
                None => None,
                Some(t) => {
                    let hidden = if t.n_dims == 2 && t.dims[0] == dim as u64 { t.dims[1] as usize } else { 0 };
                    if hidden == 0 {
                        return Err(ModelError::BadTensorShape {
                            tensor: t.name.to_string(),
                            expected: alloc::vec![dim as u64, t.dims[1].max(1)],
                            found: t.shape().to_vec(),
                        });
                    }
                    Some(Predictor {
                        w_in: finite_values(t, hidden * dim)?,
                        b_in: finite_vector(file, &name("mod_pred_in.bias"), Some(hidden))?,
                        w_out: finite_vector(file, &name("mod_pred_out.weight"), Some(hidden))?,
                        b_out: finite_vector(file, &name("mod_pred_out.bias"), Some(1))?[0],
                    })
                }
            };
            routers[l as usize] = Some(Router { weight, bias, predictor });
        }
        Ok(Some(MixtureOfDepths { capacity, gate, decision, sink_tokens, routers }))
    }

    /// The router of block `layer`, if it is routed.
    pub fn router(&self, layer: usize) -> Option<&Router> {
        self.routers.get(layer).and_then(Option::as_ref)
    }

    /// Indices of the routed blocks, increasing.
    pub fn routed_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.routers.iter().enumerate().filter(|(_, r)| r.is_some()).map(|(l, _)| l)
    }

    /// Whether every routed block has a predictor.
    pub fn has_predictors(&self) -> bool {
        self.routers.iter().flatten().all(|r| r.predictor.is_some())
    }
}

/// Tokens a routed block processes out of a batch of `tokens`: `⌈capacity · tokens⌉`,
/// at least 1 for a non-empty batch. The product is shrunk by one part in a million
/// before rounding up, so that a capacity stored as f32 (0.1 is 0.100000001…) gives the
/// count its decimal value means.
pub fn routed_count(capacity: f32, tokens: usize) -> usize {
    if tokens == 0 {
        return 0;
    }
    let exact = capacity as f64 * tokens as f64 * (1.0 - 1e-6);
    (libm::ceil(exact) as usize).clamp(1, tokens)
}

/// Chooses the `k` highest of `scores` (ties to the lower index; NaN ranks by
/// `f32::total_cmp`) and returns their indices in increasing order, as the first `k`
/// entries of `order` (which must hold `scores.len()` entries; it is overwritten).
///
/// # Panics
/// If `order` is shorter than `scores` or `k > scores.len()`.
pub fn select_top_k<'o>(scores: &[f32], k: usize, order: &'o mut [u32]) -> &'o [u32] {
    let n = scores.len();
    assert!(k <= n && order.len() >= n, "select_top_k: k {k} of {n} scores, {} slots", order.len());
    let order = &mut order[..n];
    for (i, slot) in order.iter_mut().enumerate() {
        *slot = i as u32;
    }
    order.sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
    order[..k].sort_unstable();
    &order[..k]
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The values of tensor `name`: f32, 1-D of `len` when given, every value finite.
fn finite_vector(file: &GgufFile<'_>, name: &str, len: Option<usize>) -> Result<Vec<f32>, ModelError> {
    let t = file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    let n = len.unwrap_or(t.elements() as usize);
    if t.n_dims != 1 || t.dims[0] != n as u64 {
        return Err(ModelError::BadTensorShape {
            tensor: name.to_string(),
            expected: alloc::vec![n as u64],
            found: t.shape().to_vec(),
        });
    }
    finite_values(t, n)
}

fn finite_values(t: &TensorInfo<'_>, n: usize) -> Result<Vec<f32>, ModelError> {
    if t.ty != TensorType::F32 {
        return Err(ModelError::UnsupportedTensorType { tensor: t.name.to_string(), ty: t.ty.name() });
    }
    let values: Vec<f32> = t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if values.len() != n || !values.iter().all(|v| v.is_finite()) {
        return Err(ModelError::BadTensorValues {
            tensor: t.name.to_string(),
            reason: "router weights must be finite",
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_count_rounds_up_the_decimal_capacity() {
        assert_eq!(routed_count(0.125, 256), 32);
        assert_eq!(routed_count(0.125, 257), 33);
        assert_eq!(routed_count(0.1, 10), 1);
        assert_eq!(routed_count(0.1, 11), 2);
        assert_eq!(routed_count(0.5, 1), 1);
        assert_eq!(routed_count(1.0, 7), 7);
        assert_eq!(routed_count(0.01, 3), 1);
        assert_eq!(routed_count(0.3, 0), 0);
    }

    #[test]
    fn top_k_takes_the_highest_scores_earlier_first_on_ties() {
        let scores = [0.5, 2.0, -1.0, 2.0, 0.7, f32::NEG_INFINITY];
        let mut order = [0u32; 6];
        assert_eq!(select_top_k(&scores, 3, &mut order), &[1, 3, 4]);
        assert_eq!(select_top_k(&scores, 1, &mut order), &[1]);
        assert_eq!(select_top_k(&scores, 6, &mut order), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(select_top_k(&scores, 0, &mut order), &[] as &[u32]);
    }

    #[test]
    fn top_k_matches_a_full_sort_on_random_scores() {
        let mut seed = 7u64;
        for n in 1..40 {
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    ((seed >> 40) % 9) as f32 // many ties
                })
                .collect();
            let k = routed_count(0.3, n);
            let mut order = alloc::vec![0u32; n];
            let chosen = select_top_k(&scores, k, &mut order).to_vec();
            let mut ranked: Vec<usize> = (0..n).collect();
            ranked.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
            let mut expected: Vec<u32> = ranked[..k].iter().map(|&i| i as u32).collect();
            expected.sort();
            assert_eq!(chosen, expected);
        }
    }
}
