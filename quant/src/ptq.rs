//! Post-training quantization (PTQ) of an `f32` weight matrix to [`w4`](crate::w4) codes
//! and scales: round-to-nearest ([`rtn`]) with an optional MSE clip search, and GPTQ
//! ([`gptq`], [`GptqPlan`]; Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
//! for Generative Pre-trained Transformers").
//!
//! # Conventions
//! - A layer computes `y = W·x`; `W` is `rows × cols`, row-major (`w[r·cols + c]`), so a
//!   row is one output channel and a column one input feature.
//! - Codes are `rows × cols` row-major `i8` in `[-8, 7]`; scales are `rows × groups`
//!   row-major `f32`, each already [`round_scale`]d (exactly representable in f16), where
//!   `groups = group.groups(cols)` and group `g` of a row covers columns
//!   `g·len .. min((g+1)·len, cols)` (`len` = 32, 64 or 128; per channel: the whole row).
//!   `ŵ = s·q`. These are the inputs of [`w4::pack`](crate::w4::pack).
//! - A scale is `s = round_scale(c · absmax / 7)` for the group's largest `|w|` and a clip
//!   ratio `c ∈ [0.5, 1]` ([`ClipSearch`]); a group of zeros gets `s = 0` and codes 0.
//! - The Hessian of a layer is `H = (2/n)·Σ_t x_t x_tᵀ` over `n` calibration tokens
//!   (`cols × cols`, row-major `f64`; [`accumulate_hessian`], [`finish_hessian`]; the
//!   functions here read only its upper triangle `j ≥ i` and take it to be symmetric). GPTQ
//!   minimizes the proxy loss `Σ_rows (w − ŵ)ᵀ H (w − ŵ)` ([`proxy_loss`]), which is twice
//!   the mean over tokens of the squared output error `‖(W − Ŵ)·x_t‖²`.
//!
//! # GPTQ as implemented here
//! Algorithm 1 of the paper, as in the reference implementation (`gptq.py`,
//! `fasterquant`): dead columns (`H_jj = 0`) get `H_jj = 1` and their weights zeroed;
//! `H += λ·I` with `λ = damp · mean(diag H)`; `U` is the upper Cholesky factor of `H⁻¹`
//! (`H⁻¹ = UᵀU`); then columns are quantized one at a time, each column's scaled error
//! `e = (w_j − ŵ_j) / U_jj` is spread over the remaining columns of its block
//! (`w_k −= e·U_jk`), and after each block of `block` columns the block's errors are applied
//! to all later columns at once (`W[:, end..] −= E · U[block, end..]`, the "lazy batch
//! update"). Differences from the reference, all deliberate:
//! - `U` is computed as `J·L⁻¹·J` where `J` reverses the index order and `L` is the lower
//!   Cholesky factor of `J·H·J`. This is the same matrix (the upper Cholesky factor of `H⁻¹`
//!   is unique) for half the work of Cholesky → inverse → Cholesky, without forming `H⁻¹`.
//!   The factorization runs in `f64`; `U` and the row updates are `f32` (as in the
//!   reference, which works in `float32` throughout).
//! - If the factorization fails, the dampening is retried at 10× and 100× (relative
//!   dampening 0 retries at 0.01, 0.1) before [`PtqError::NotPositiveDefinite`].
//! - Dead columns are zeroed before scales are chosen (their inputs are always 0, so their
//!   weights must not widen a scale).
//! - Per-group scales (without `act_order`) are chosen when the sweep reaches a group's first
//!   column, from the group's weights *with every update so far applied*; the block length
//!   is rounded up to a multiple of the group length so that a group never straddles blocks.
//!   (The reference reads the group from a copy that lacks the current block's in-block
//!   updates; for group 128 = block 128 the two agree.)
//! - With `act_order` and groups, scales are "static": chosen from the original
//!   (dead-zeroed) weights of each group in the original column order, so a column's group
//!   is simply `c / len` and the scales equal [`rtn`]'s.
//!
//! Rows are independent once `U` is known: [`GptqPlan`] holds `U` and quantizes any slice of
//! whole rows, so a caller can split the rows across threads and share one plan.

use alloc::vec;
use alloc::vec::Vec;

use crate::w4::{quantize_weight, round_scale, GroupSize, CODE_MAX};

/// Largest finite f16; scales are clamped to it before rounding.
const F16_MAX: f32 = 65504.0;
/// Rows of `W` processed together by the GPTQ sweep (they share each read of `U`).
const TILE_ROWS: usize = 16;
/// Rows processed together by the blocked factorization kernels.
const FACTOR_ROWS: usize = 4;
/// Extra factorization attempts, each with 10× the relative dampening.
const DAMP_RETRIES: usize = 2;

/// How the clip ratio `c` of a scale `s = round_scale(c · absmax / 7)` is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClipSearch {
    /// `c = 1`: `s = absmax / 7`.
    None,
    /// Per row (per channel) or per group, try `c_k = 1 − 0.5·k/steps` for
    /// `k = 0..=steps` (evenly spaced over `[0.5, 1]`; `steps = 0` tries only `c = 1`) and
    /// keep the scale with the least squared error `Σ (w − s·q)²` (the largest `c` on ties).
    /// `steps = 40` (a step of 0.0125) is a good default.
    Mse {
        /// Number of steps from `c = 1` down to `c = 0.5`.
        steps: u32,
    },
}

/// Codes and scales of a quantized matrix (layouts in the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// `rows × cols` codes in `[-8, 7]`, row-major.
    pub codes: Vec<i8>,
    /// `rows × groups` scales, row-major, each already [`round_scale`]d (so `≥ 0`, finite).
    pub scales: Vec<f32>,
}

/// Why a matrix could not be quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum PtqError {
    /// A slice does not have the length the shape needs.
    Size {
        /// Which input.
        what: &'static str,
        /// The length the shape needs.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A matrix with no columns.
    Empty,
    /// An option is out of range.
    InvalidOption(&'static str),
    /// Element `index` of `what` is infinite or NaN: for weights an index into `w` (the
    /// slice given), for the Hessian into `hessian`; for the inverse Hessian factor (an
    /// `f32` overflow or underflow to 0 on its diagonal) into the `cols × cols` factor.
    NonFinite {
        /// Which input or intermediate.
        what: &'static str,
        /// Flat index of the offending element.
        index: usize,
    },
    /// The Cholesky factorization of the dampened Hessian failed even at relative
    /// dampening `damp` (the last tried); the Hessian is probably not positive semidefinite.
    NotPositiveDefinite {
        /// The last relative dampening tried (`λ = damp · mean(diag H)`).
        damp: f64,
    },
}

impl core::fmt::Display for PtqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PtqError::Size { what, expected, found } => {
                write!(f, "{what} has {found} elements, the shape needs {expected}")
            }
            PtqError::Empty => write!(f, "matrix has no columns"),
            PtqError::InvalidOption(what) => write!(f, "invalid option: {what}"),
            PtqError::NonFinite { what, index } => write!(f, "{what}: element {index} is infinite or NaN"),
            PtqError::NotPositiveDefinite { damp } => write!(
                f,
                "Cholesky factorization of the Hessian failed even with dampening {damp} × mean diagonal \
                 (is it positive semidefinite?)"
            ),
        }
    }
}

impl core::error::Error for PtqError {}

/// Columns per group (per channel: the whole row, at least 1 so that indexing works for
/// `cols = 0`).
fn group_cols(group: GroupSize, cols: usize) -> usize {
    match group {
        GroupSize::PerChannel => cols.max(1),
        g => g.as_len() as usize,
    }
}

/// The code of `w` under the rounded scale `s`: [`quantize_weight`] after clamping `w` to
/// `±9s`, which changes no in-range result but keeps `round_to_i32` in its valid range
/// when GPTQ's updates push a weight far outside its group.
#[inline(always)]
fn code(w: f32, s: f32) -> i8 {
    let lim = 9.0 * s;
    quantize_weight(w.max(-lim).min(lim), s)
}

/// `Σ (w − s·q)²` in `f64` for the codes `q` of `w` under `s`.
fn squared_error(w: &[f32], s: f32) -> f64 {
    w.iter()
        .map(|&v| {
            let d = v as f64 - (s * code(v, s) as f32) as f64;
            d * d
        })
        .sum()
}

/// The rounded scale of one group (or row) of weights `w` under `clip` (see [`ClipSearch`]):
/// `round_scale(c · max|w| / 7)`, clamped to the largest finite f16; 0 for a group of zeros
/// or an empty group. Weights must be finite.
pub fn group_scale(w: &[f32], clip: ClipSearch) -> f32 {
    let amax = w.iter().fold(0.0f32, |m, &v| m.max(f32::from_bits(v.to_bits() & 0x7fff_ffff)));
    if amax == 0.0 {
        return 0.0;
    }
    let base = amax / CODE_MAX as f32;
    let scale = |c: f32| round_scale((c * base).min(F16_MAX));
    match clip {
        ClipSearch::None | ClipSearch::Mse { steps: 0 } => scale(1.0),
        ClipSearch::Mse { steps } => {
            let (mut best_s, mut best_e) = (0.0f32, f64::INFINITY);
            let mut last = f32::NAN;
            for k in 0..=steps {
                let s = scale(1.0 - 0.5 * k as f32 / steps as f32);
                if s == last {
                    continue; // f16 rounding can map neighbouring ratios to one scale
                }
                last = s;
                let e = squared_error(w, s);
                if e < best_e {
                    (best_s, best_e) = (s, e);
                }
            }
            best_s
        }
    }
}

/// Round-to-nearest quantization of `w` (`rows × cols`, row-major): per row and group, the
/// scale from [`group_scale`] with `clip`, then `q = quantize_weight(w, s)`.
///
/// # Panics
/// If `w.len() != rows · cols` or a weight is infinite or NaN.
pub fn rtn(w: &[f32], rows: usize, cols: usize, group: GroupSize, clip: ClipSearch) -> Quantized {
    assert_eq!(w.len(), rows * cols, "rtn: w must be rows × cols");
    assert!(w.iter().all(|v| v.is_finite()), "rtn: weights must be finite");
    let (groups, len) = (group.groups(cols), group_cols(group, cols));
    let mut scales = vec![0.0f32; rows * groups];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for (g, s) in scales[r * groups..(r + 1) * groups].iter_mut().enumerate() {
            *s = group_scale(&row[g * len..((g + 1) * len).min(cols)], clip);
        }
    }
    let codes = quantize_with_scales(w, rows, cols, group, &scales);
    Quantized { codes, scales }
}

/// The codes of `w` (`rows × cols`, row-major) under given `scales` (`rows × groups`,
/// row-major): `quantize_weight(w, round_scale(s))` (`round_scale` is a no-op on scales that
/// are already rounded, and makes the codes match what the file will hold otherwise).
///
/// # Panics
/// If a slice length disagrees with `rows`, `cols` and `group`.
pub fn quantize_with_scales(w: &[f32], rows: usize, cols: usize, group: GroupSize, scales: &[f32]) -> Vec<i8> {
    let (groups, len) = (group.groups(cols), group_cols(group, cols));
    assert_eq!(w.len(), rows * cols, "quantize_with_scales: w must be rows × cols");
    assert_eq!(scales.len(), rows * groups, "quantize_with_scales: scales must be rows × groups");
    let mut codes = vec![0i8; rows * cols];
    for r in 0..rows {
        for (g, &s) in scales[r * groups..(r + 1) * groups].iter().enumerate() {
            let (c0, c1) = (r * cols + g * len, r * cols + ((g + 1) * len).min(cols));
            let s = round_scale(s);
            for (q, &v) in codes[c0..c1].iter_mut().zip(&w[c0..c1]) {
                *q = code(v, s);
            }
        }
    }
    codes
}

/// Adds `Σ_t x_t x_tᵀ` over `tokens` activation rows `x` (`tokens × cols`, row-major `f32`,
/// the inputs of the layer) to the upper triangle (`h[i·cols + j]`, `j ≥ i`) of `h`
/// (`cols × cols`, row-major `f64`, accumulated in `f64`); the strict lower triangle is not
/// touched. Start from zeros and call it once per batch of tokens; then [`finish_hessian`]
/// with the total token count gives GPTQ's full symmetric `H = (2/n)·Σ x xᵀ`. (Every
/// function here reads only the upper triangle of a Hessian, so an unfinished raw sum
/// already works with [`gptq`], whose result does not depend on the scale of `H`.) Costs
/// `tokens · cols² / 2` multiply-adds; to parallelize, give each thread its own `h` and add
/// them up elementwise before finishing.
///
/// # Panics
/// If `h.len() != cols²` or `x.len() != tokens · cols`.
pub fn accumulate_hessian(h: &mut [f64], x: &[f32], tokens: usize, cols: usize) {
    const TB: usize = 4;
    assert_eq!(h.len(), cols * cols, "accumulate_hessian: h must be cols × cols");
    assert_eq!(x.len(), tokens * cols, "accumulate_hessian: x must be tokens × cols");
    let mut xb = vec![0.0f64; TB * cols];
    for t0 in (0..tokens).step_by(TB) {
        let nt = TB.min(tokens - t0);
        for (dst, &src) in xb.iter_mut().zip(&x[t0 * cols..(t0 + nt) * cols]) {
            *dst = src as f64;
        }
        xb[nt * cols..].fill(0.0);
        let (x0, rest) = xb.split_at(cols);
        let (x1, rest) = rest.split_at(cols);
        let (x2, x3) = rest.split_at(cols);
        for i in 0..cols {
            let (a0, a1, a2, a3) = (x0[i], x1[i], x2[i], x3[i]);
            if a0 == 0.0 && a1 == 0.0 && a2 == 0.0 && a3 == 0.0 {
                continue;
            }
            let len = cols - i;
            let row = &mut h[i * cols + i..(i + 1) * cols];
            let (y0, y1, y2, y3) = (&x0[i..], &x1[i..], &x2[i..], &x3[i..]);
            for j in 0..len {
                row[j] += a0 * y0[j] + a1 * y1[j] + a2 * y2[j] + a3 * y3[j];
            }
        }
    }
}

/// Turns the raw sum of [`accumulate_hessian`] (`cols × cols`, upper triangle) into GPTQ's
/// Hessian `H = (2/n)·Σ x xᵀ` for `n_tokens` tokens in all: multiplies the upper triangle
/// by `2 / n_tokens` and copies it to the lower one, so `h` comes out full and symmetric.
///
/// # Panics
/// If `h` is not square or `n_tokens == 0`.
pub fn finish_hessian(h: &mut [f64], n_tokens: usize) {
    let n = h.len().isqrt();
    assert_eq!(n * n, h.len(), "finish_hessian: h must be square");
    assert!(n_tokens > 0, "finish_hessian: no tokens");
    let f = 2.0 / n_tokens as f64;
    for i in 0..n {
        for v in &mut h[i * n + i..(i + 1) * n] {
            *v *= f;
        }
    }
    for i in 0..n {
        for j in i + 1..n {
            h[j * n + i] = h[i * n + j];
        }
    }
}

/// The proxy loss `Σ_rows (w − ŵ)ᵀ H (w − ŵ)` of the quantized `q` of `w` (`rows × cols`)
/// under the Hessian `hessian` (`cols × cols`; only the upper triangle `j ≥ i` is read and
/// `H` is taken to be symmetric), with `ŵ = s·q` per `group`; `cols` is
/// `sqrt(hessian.len())`. In `f64`. For `H = (2/n)·Σ x xᵀ` it is twice the mean over the
/// `n` tokens of the squared output error `‖(W − Ŵ)·x_t‖²`.
///
/// # Panics
/// If `hessian` is not square or the lengths of `w`, `q.codes` and `q.scales` disagree.
pub fn proxy_loss(w: &[f32], q: &Quantized, group: GroupSize, hessian: &[f64]) -> f64 {
    let n = hessian.len().isqrt();
    assert_eq!(n * n, hessian.len(), "proxy_loss: hessian must be square");
    if n == 0 {
        return 0.0;
    }
    let rows = w.len() / n;
    let (groups, len) = (group.groups(n), group_cols(group, n));
    assert_eq!(w.len(), rows * n, "proxy_loss: w must be rows × cols");
    assert_eq!(q.codes.len(), rows * n, "proxy_loss: codes must be rows × cols");
    assert_eq!(q.scales.len(), rows * groups, "proxy_loss: scales must be rows × groups");
    let mut d = vec![0.0f64; FACTOR_ROWS * n];
    let mut total = 0.0;
    for r0 in (0..rows).step_by(FACTOR_ROWS) {
        let nr = FACTOR_ROWS.min(rows - r0);
        for (rr, dr) in d.chunks_exact_mut(n).take(nr).enumerate() {
            let r = r0 + rr;
            for (c, dv) in dr.iter_mut().enumerate() {
                let s = q.scales[r * groups + c / len];
                *dv = w[r * n + c] as f64 - (s * q.codes[r * n + c] as f32) as f64;
            }
        }
        // dᵀHd = Σ_i d_i · (H_ii·d_i + 2·Σ_{j>i} H_ij·d_j)
        let mut acc = [0.0f64; FACTOR_ROWS];
        for i in 0..n {
            let (hii, upper) = (hessian[i * n + i], &hessian[i * n + i + 1..(i + 1) * n]);
            if nr == FACTOR_ROWS {
                let (d0, rest) = d.split_at(n);
                let (d1, rest) = rest.split_at(n);
                let (d2, d3) = rest.split_at(n);
                let s = dots4([&d0[i + 1..], &d1[i + 1..], &d2[i + 1..], &d3[i + 1..]], upper);
                acc[0] += d0[i] * (hii * d0[i] + 2.0 * s[0]);
                acc[1] += d1[i] * (hii * d1[i] + 2.0 * s[1]);
                acc[2] += d2[i] * (hii * d2[i] + 2.0 * s[2]);
                acc[3] += d3[i] * (hii * d3[i] + 2.0 * s[3]);
            } else {
                for (a, dr) in acc.iter_mut().zip(d.chunks_exact(n)).take(nr) {
                    *a += dr[i] * (hii * dr[i] + 2.0 * dot(&dr[i + 1..], upper));
                }
            }
        }
        total += acc[..nr].iter().sum::<f64>();
    }
    total
}

/// Options of [`gptq`] / [`GptqPlan::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Relative dampening: `λ = damp · mean(diag H)` is added to the diagonal (default
    /// 0.01). Must be finite and `≥ 0`.
    pub damp: f64,
    /// Columns per lazy-batch block (default 128; rounded up to a multiple of the group
    /// length). Must be `≥ 1`. Changes only rounding, not the algorithm's result in exact
    /// arithmetic.
    pub block: usize,
    /// How scales are chosen (default `Mse { steps: 40 }`).
    pub clip: ClipSearch,
    /// Quantize columns in order of decreasing `H_jj` (default off). With groups, implies
    /// static group scales (see the module docs).
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.01, block: 128, clip: ClipSearch::Mse { steps: 40 }, act_order: false }
    }
}

/// GPTQ quantization of `w` (`rows × cols`, row-major) with the layer's Hessian `hessian`
/// (`cols × cols`, row-major `f64`, `H = (2/n)·Σ x xᵀ` or any positive multiple: the result
/// does not depend on the scale of `H`). Single-threaded; for threads, build one
/// [`GptqPlan`] and call [`GptqPlan::quantize_rows`] on disjoint row ranges.
///
/// # Errors
/// Wrong slice lengths, `cols = 0`, invalid options, infinite or NaN weights or Hessian
/// entries, or a Hessian that cannot be factorized (see [`GptqPlan::new`]).
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    group: GroupSize,
    hessian: &[f64],
    opts: GptqOptions,
) -> Result<Quantized, PtqError> {
    if w.len() != rows * cols {
        return Err(PtqError::Size { what: "weights", expected: rows * cols, found: w.len() });
    }
    let plan = GptqPlan::new(hessian, cols, group, &opts)?;
    let mut q = Quantized { codes: vec![0; rows * cols], scales: vec![0.0; rows * plan.groups()] };
    plan.quantize_rows(w, &mut q.codes, &mut q.scales)?;
    Ok(q)
}

/// The prepared state of a GPTQ run for one Hessian: the upper Cholesky factor `U` of the
/// dampened `H⁻¹` (in the column processing order) and the options. Immutable and `Sync`:
/// share it across threads and give each a disjoint range of rows.
#[derive(Clone)]
pub struct GptqPlan {
    cols: usize,
    group: GroupSize,
    clip: ClipSearch,
    /// Effective block length (a multiple of the group length).
    block: usize,
    /// Relative dampening actually used.
    damp: f64,
    /// `order[j]`: the original column processed `j`-th (identity without `act_order`).
    order: Vec<usize>,
    /// Dead columns (`H_jj = 0`), by original index.
    dead: Vec<bool>,
    /// Group scales from the original weights (act_order with groups).
    static_groups: bool,
    /// `U`, `cols × cols` row-major `f32`, rows and columns in processing order; only the
    /// upper triangle (`k ≥ j`) is used.
    u: Vec<f32>,
}

impl core::fmt::Debug for GptqPlan {
    /// The shape and options, not the `cols²` factor.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GptqPlan")
            .field("cols", &self.cols)
            .field("group", &self.group)
            .field("clip", &self.clip)
            .field("block", &self.block)
            .field("damp", &self.damp)
            .field("act_order", &self.order.iter().enumerate().any(|(j, &c)| j != c))
            .field("static_groups", &self.static_groups)
            .field("dead_columns", &self.dead_columns())
            .finish_non_exhaustive()
    }
}

impl GptqPlan {
    /// Prepares GPTQ for a layer with `cols` inputs and Hessian `hessian` (`cols × cols`,
    /// row-major `f64`; only the upper triangle `j ≥ i` is read and `H` is taken to be
    /// symmetric). Dead columns, dampening and the inverse factor as in the module docs.
    /// Costs about `cols³ / 3` `f64` multiply-adds and `12 · cols²` bytes at the peak.
    ///
    /// # Errors
    /// [`PtqError::Size`], [`PtqError::Empty`] (`cols = 0`), [`PtqError::InvalidOption`],
    /// [`PtqError::NonFinite`] for a non-finite Hessian entry (or an inverse factor that
    /// overflows `f32`), and [`PtqError::NotPositiveDefinite`] when the factorization fails
    /// at `damp`, `10·damp` and `100·damp`.
    pub fn new(hessian: &[f64], cols: usize, group: GroupSize, opts: &GptqOptions) -> Result<Self, PtqError> {
        let n = cols;
        if n == 0 {
            return Err(PtqError::Empty);
        }
        if hessian.len() != n * n {
            return Err(PtqError::Size { what: "hessian", expected: n * n, found: hessian.len() });
        }
        if let Some(index) = hessian.iter().position(|v| !v.is_finite()) {
            return Err(PtqError::NonFinite { what: "hessian", index });
        }
        if !(opts.damp.is_finite() && opts.damp >= 0.0) {
            return Err(PtqError::InvalidOption("damp must be finite and ≥ 0"));
        }
        if opts.block == 0 {
            return Err(PtqError::InvalidOption("block must be ≥ 1"));
        }
        let h = |i: usize, j: usize| if i <= j { hessian[i * n + j] } else { hessian[j * n + i] };
        let dead: Vec<bool> = (0..n).map(|j| h(j, j) == 0.0).collect();
        let diag: Vec<f64> = (0..n).map(|j| if dead[j] { 1.0 } else { h(j, j) }).collect();
        let mut order: Vec<usize> = (0..n).collect();
        if opts.act_order {
            order.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        }
        let mean = diag.iter().sum::<f64>() / n as f64;

        // A = J·P·H·P·J + λI (lower triangle), then A = L·Lᵀ in place.
        let mut a = vec![0.0f64; n * n];
        let mut damp = opts.damp;
        let mut attempt = 0;
        loop {
            let lambda = damp * mean;
            for i in 0..n {
                let pi = order[n - 1 - i];
                let row = &mut a[i * n..(i + 1) * n];
                for (k, v) in row[..i].iter_mut().enumerate() {
                    *v = h(pi, order[n - 1 - k]);
                }
                row[i] = diag[pi] + lambda;
                row[i + 1..].fill(0.0);
            }
            if cholesky_lower(&mut a, n) {
                break;
            }
            attempt += 1;
            if attempt > DAMP_RETRIES {
                return Err(PtqError::NotPositiveDefinite { damp });
            }
            damp = if damp > 0.0 { damp * 10.0 } else { 0.01 };
        }
        // L⁻¹ in place, then U = J·L⁻¹·J: U[p][q] = L⁻¹[n−1−p][n−1−q] for q ≥ p.
        invert_lower(&mut a, n);
        let mut u = vec![0.0f32; n * n];
        for p in 0..n {
            let x = &a[(n - 1 - p) * n..(n - 1 - p) * n + (n - p)];
            for (dst, &src) in u[p * n + p..(p + 1) * n].iter_mut().zip(x.iter().rev()) {
                *dst = src as f32;
            }
        }
        drop(a);
        for p in 0..n {
            let row = &u[p * n + p..(p + 1) * n];
            if let Some(k) = row.iter().position(|v| !v.is_finite()) {
                return Err(PtqError::NonFinite { what: "inverse Hessian factor (f32)", index: p * n + p + k });
            }
            if row[0] <= 0.0 {
                return Err(PtqError::NonFinite { what: "inverse Hessian factor (f32)", index: p * n + p });
            }
        }

        let static_groups = opts.act_order && group != GroupSize::PerChannel;
        let block = match group {
            GroupSize::PerChannel => opts.block,
            g => opts.block.div_ceil(g.as_len() as usize) * g.as_len() as usize,
        };
        Ok(GptqPlan { cols: n, group, clip: opts.clip, block, damp, order, dead, static_groups, u })
    }

    /// Columns (inputs) of the layer.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The scale grouping.
    pub fn group(&self) -> GroupSize {
        self.group
    }

    /// Scales per row: `group.groups(cols)`.
    pub fn groups(&self) -> usize {
        self.group.groups(self.cols)
    }

    /// The relative dampening that made the factorization succeed (`opts.damp`, or 10× or
    /// 100× it after failed attempts).
    pub fn damp(&self) -> f64 {
        self.damp
    }

    /// Number of dead columns (`H_jj = 0`; their codes come out 0 for a positive
    /// semidefinite `H`).
    pub fn dead_columns(&self) -> usize {
        self.dead.iter().filter(|&&d| d).count()
    }

    /// Quantizes whole rows: `w` is `rows × cols` row-major (`rows = w.len() / cols`, any
    /// contiguous range of the matrix's rows), `codes` receives `rows × cols` codes and
    /// `scales` `rows × groups` scales, both row-major. Rows are independent, so disjoint
    /// ranges may run on different threads with one shared plan. Allocates about
    /// `17 · cols` `f32` of scratch per call; costs `rows · cols² / 2` multiply-adds in
    /// `f32`.
    ///
    /// # Errors
    /// [`PtqError::Size`] for lengths that are not whole rows or disagree with each other,
    /// [`PtqError::NonFinite`] for a non-finite weight (index into `w`) or, should one ever
    /// occur, a non-finite error-updated weight.
    pub fn quantize_rows(&self, w: &[f32], codes: &mut [i8], scales: &mut [f32]) -> Result<(), PtqError> {
        let n = self.cols;
        let rows = w.len() / n;
        let groups = self.groups();
        let len = group_cols(self.group, n);
        if w.len() != rows * n {
            return Err(PtqError::Size { what: "weights (whole rows)", expected: rows * n, found: w.len() });
        }
        if codes.len() != rows * n {
            return Err(PtqError::Size { what: "codes", expected: rows * n, found: codes.len() });
        }
        if scales.len() != rows * groups {
            return Err(PtqError::Size { what: "scales", expected: rows * groups, found: scales.len() });
        }
        if let Some(index) = w.iter().position(|v| !v.is_finite()) {
            return Err(PtqError::NonFinite { what: "weights", index });
        }
        let tile = TILE_ROWS.min(rows);
        let mut wt = vec![0.0f32; tile * n];
        let mut err = vec![0.0f32; tile * self.block.min(n)];
        let mut orig = vec![0.0f32; n];
        for t0 in (0..rows).step_by(TILE_ROWS) {
            let tr = TILE_ROWS.min(rows - t0);
            let sc = &mut scales[t0 * groups..(t0 + tr) * groups];
            for r in 0..tr {
                for (c, o) in orig.iter_mut().enumerate() {
                    *o = if self.dead[c] { 0.0 } else { w[(t0 + r) * n + c] };
                }
                if self.group == GroupSize::PerChannel {
                    sc[r] = group_scale(&orig, self.clip);
                } else if self.static_groups {
                    for g in 0..groups {
                        sc[r * groups + g] = group_scale(&orig[g * len..((g + 1) * len).min(n)], self.clip);
                    }
                }
                for (dst, &c) in wt[r * n..(r + 1) * n].iter_mut().zip(&self.order) {
                    *dst = orig[c];
                }
            }
            let cd = &mut codes[t0 * n..(t0 + tr) * n];
            if let Err(at) = self.sweep(&mut wt[..tr * n], tr, &mut err, cd, sc) {
                return Err(PtqError::NonFinite { what: "error-updated weights", index: t0 * n + at });
            }
        }
        Ok(())
    }

    /// The GPTQ sweep over a tile of `tr` rows `wt` (`tr × cols`, processing order), writing
    /// codes (original order) and, for non-static groups, scales. `Err(r·cols + c)` when
    /// the scaled error of row `r`, original column `c` is not finite.
    fn sweep(
        &self,
        wt: &mut [f32],
        tr: usize,
        err: &mut [f32],
        codes: &mut [i8],
        scales: &mut [f32],
    ) -> Result<(), usize> {
        let n = self.cols;
        let bs = self.block.min(n);
        let groups = self.groups();
        let len = group_cols(self.group, n);
        let dynamic_groups = self.group != GroupSize::PerChannel && !self.static_groups;
        for b0 in (0..n).step_by(bs) {
            let b1 = (b0 + bs).min(n);
            for j in b0..b1 {
                if dynamic_groups && j % len == 0 {
                    let end = (j + len).min(n);
                    for r in 0..tr {
                        scales[r * groups + j / len] = group_scale(&wt[r * n + j..r * n + end], self.clip);
                    }
                }
                let urow = &self.u[j * n..(j + 1) * n];
                let d = urow[j];
                let c = self.order[j];
                let g = if self.group == GroupSize::PerChannel { 0 } else { c / len };
                for r in 0..tr {
                    let row = &mut wt[r * n..(r + 1) * n];
                    let x = row[j];
                    let s = scales[r * groups + g];
                    let q = code(x, s);
                    codes[r * n + c] = q;
                    let e = (x - s * q as f32) / d;
                    if !e.is_finite() {
                        return Err(r * n + c);
                    }
                    err[r * bs + (j - b0)] = e;
                    for (wv, &uv) in row[j + 1..b1].iter_mut().zip(&urow[j + 1..b1]) {
                        *wv -= e * uv;
                    }
                }
            }
            if b1 < n {
                lazy_update(wt, tr, n, b1, err, bs, b1 - b0, &self.u[b0 * n..b1 * n]);
            }
        }
        Ok(())
    }
}

/// `W[r][c0..] −= Σ_k E[r][k] · U[k][c0..]` for the `tr` rows of `wt` (`tr × n`), the
/// errors `err` (`tr × bs`, first `kb` used) and the `kb × n` slab `u` of `U`.
#[allow(clippy::too_many_arguments)]
fn lazy_update(wt: &mut [f32], tr: usize, n: usize, c0: usize, err: &[f32], bs: usize, kb: usize, u: &[f32]) {
    let len = n - c0;
    let urow = |k: usize| &u[k * n + c0..(k + 1) * n];
    let mut r = 0;
    while tr - r >= 4 {
        let (w0, rest) = wt[r * n..(r + 4) * n].split_at_mut(n);
        let (w1, rest) = rest.split_at_mut(n);
        let (w2, w3) = rest.split_at_mut(n);
        let (w0, w1, w2, w3) = (&mut w0[c0..], &mut w1[c0..], &mut w2[c0..], &mut w3[c0..]);
        let e = |i: usize, k: usize| err[(r + i) * bs + k];
        let mut k = 0;
        while kb - k >= 4 {
            let (u0, u1, u2, u3) = (urow(k), urow(k + 1), urow(k + 2), urow(k + 3));
            let [e0, e1, e2, e3]: [[f32; 4]; 4] = core::array::from_fn(|i| core::array::from_fn(|m| e(i, k + m)));
            for j in 0..len {
                let (a, b, c, d) = (u0[j], u1[j], u2[j], u3[j]);
                w0[j] -= e0[0] * a + e0[1] * b + e0[2] * c + e0[3] * d;
                w1[j] -= e1[0] * a + e1[1] * b + e1[2] * c + e1[3] * d;
                w2[j] -= e2[0] * a + e2[1] * b + e2[2] * c + e2[3] * d;
                w3[j] -= e3[0] * a + e3[1] * b + e3[2] * c + e3[3] * d;
            }
            k += 4;
        }
        while k < kb {
            let u0 = urow(k);
            let (f0, f1, f2, f3) = (e(0, k), e(1, k), e(2, k), e(3, k));
            for j in 0..len {
                let a = u0[j];
                w0[j] -= f0 * a;
                w1[j] -= f1 * a;
                w2[j] -= f2 * a;
                w3[j] -= f3 * a;
            }
            k += 1;
        }
        r += 4;
    }
    while r < tr {
        let w0 = &mut wt[r * n + c0..(r + 1) * n];
        for k in 0..kb {
            let f = err[r * bs + k];
            for (wv, &uv) in w0.iter_mut().zip(urow(k)) {
                *wv -= f * uv;
            }
        }
        r += 1;
    }
}

/// `Σ a_i b_i` over `b.len()` elements with four accumulators.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let a = &a[..b.len()];
    let mut s = [0.0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..4 {
            s[k] += x[k] * y[k];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (x, y) in ar.iter().zip(br) {
        t += x * y;
    }
    t
}

/// Four dot products `a[r] · b` over `b.len()` elements, reading `b` once.
fn dots4(a: [&[f64]; 4], b: &[f64]) -> [f64; 4] {
    let m = b.len();
    let (a0, a1, a2, a3) = (&a[0][..m], &a[1][..m], &a[2][..m], &a[3][..m]);
    let mut s = [[0.0f64; 2]; 4];
    let m2 = m / 2 * 2;
    let mut j = 0;
    while j < m2 {
        let (y0, y1) = (b[j], b[j + 1]);
        s[0][0] += a0[j] * y0;
        s[0][1] += a0[j + 1] * y1;
        s[1][0] += a1[j] * y0;
        s[1][1] += a1[j + 1] * y1;
        s[2][0] += a2[j] * y0;
        s[2][1] += a2[j + 1] * y1;
        s[3][0] += a3[j] * y0;
        s[3][1] += a3[j + 1] * y1;
        j += 2;
    }
    let mut t = s.map(|v| v[0] + v[1]);
    if m2 < m {
        t[0] += a0[m2] * b[m2];
        t[1] += a1[m2] * b[m2];
        t[2] += a2[m2] * b[m2];
        t[3] += a3[m2] * b[m2];
    }
    t
}

/// In-place lower Cholesky factorization `A = L·Lᵀ` of the `n × n` row-major matrix whose
/// lower triangle is in `a` (the strict upper triangle is neither read nor written).
/// Row-oriented (dot-product form), `FACTOR_ROWS` rows at a time so that each finished row
/// is read once per group. `false` when a pivot is not positive and finite.
fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    let mut i0 = 0;
    while i0 < n {
        let nb = FACTOR_ROWS.min(n - i0);
        let (done, cur) = a.split_at_mut(i0 * n);
        // Columns left of the group: L[i][k] = (A[i][k] − L[i][..k]·L[k][..k]) / L[k][k].
        for k in 0..i0 {
            let lk = &done[k * n..k * n + k];
            let dkk = done[k * n + k];
            if nb == FACTOR_ROWS {
                let (r0, rest) = cur.split_at_mut(n);
                let (r1, rest) = rest.split_at_mut(n);
                let (r2, rest) = rest.split_at_mut(n);
                let r3 = &mut rest[..n];
                let s = dots4([r0, r1, r2, r3], lk);
                r0[k] = (r0[k] - s[0]) / dkk;
                r1[k] = (r1[k] - s[1]) / dkk;
                r2[k] = (r2[k] - s[2]) / dkk;
                r3[k] = (r3[k] - s[3]) / dkk;
            } else {
                for row in cur.chunks_exact_mut(n).take(nb) {
                    let s = dot(row, lk);
                    row[k] = (row[k] - s) / dkk;
                }
            }
        }
        // The group's own triangle.
        for ii in 0..nb {
            let i = i0 + ii;
            for kk in 0..=ii {
                let k = i0 + kk;
                let s = dot(&cur[ii * n..ii * n + k], &cur[kk * n..kk * n + k]);
                let v = cur[ii * n + k] - s;
                if kk < ii {
                    cur[ii * n + k] = v / cur[kk * n + k];
                } else {
                    if !(v > 0.0 && v.is_finite()) {
                        return false;
                    }
                    cur[ii * n + i] = libm::sqrt(v);
                }
            }
        }
        i0 += nb;
    }
    true
}

/// Replaces the lower-triangular `L` in `a` (`n × n` row-major, positive diagonal) by
/// `L⁻¹` (also lower triangular): row `i` of `X = L⁻¹` is
/// `X[i][..i] = −(Σ_{k<i} L[i][k]·X[k][..i]) / L[i][i]`, `X[i][i] = 1 / L[i][i]`, computed
/// `FACTOR_ROWS` rows at a time so that each finished row of `X` is read once per group.
fn invert_lower(a: &mut [f64], n: usize) {
    let mut t = vec![0.0f64; FACTOR_ROWS * n];
    let mut i0 = 0;
    while i0 < n {
        let nb = FACTOR_ROWS.min(n - i0);
        t.fill(0.0);
        let (done, cur) = a.split_at_mut(i0 * n);
        for k in 0..i0 {
            let xk = &done[k * n..k * n + k + 1];
            if nb == FACTOR_ROWS {
                let (c0, c1, c2, c3) = (cur[k], cur[n + k], cur[2 * n + k], cur[3 * n + k]);
                let (t0, rest) = t.split_at_mut(n);
                let (t1, rest) = rest.split_at_mut(n);
                let (t2, t3) = rest.split_at_mut(n);
                let m = k + 1;
                let (t0, t1, t2, t3) = (&mut t0[..m], &mut t1[..m], &mut t2[..m], &mut t3[..m]);
                for j in 0..m {
                    let x = xk[j];
                    t0[j] += c0 * x;
                    t1[j] += c1 * x;
                    t2[j] += c2 * x;
                    t3[j] += c3 * x;
                }
            } else {
                for (row, tr) in cur.chunks_exact(n).zip(t.chunks_exact_mut(n)).take(nb) {
                    let c = row[k];
                    for (tv, &x) in tr.iter_mut().zip(xk) {
                        *tv += c * x;
                    }
                }
            }
        }
        for ii in 0..nb {
            let i = i0 + ii;
            let tr = &mut t[ii * n..(ii + 1) * n];
            for kk in 0..ii {
                let k = i0 + kk;
                let c = cur[ii * n + k];
                for (tv, &x) in tr.iter_mut().zip(&cur[kk * n..kk * n + k + 1]) {
                    *tv += c * x;
                }
            }
            let inv = 1.0 / cur[ii * n + i];
            for (dst, &tv) in cur[ii * n..ii * n + i].iter_mut().zip(tr.iter()) {
                *dst = -tv * inv;
            }
            cur[ii * n + i] = inv;
        }
        i0 += nb;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::time::Instant;
    use std::{println, vec::Vec};

    struct Rng(crate::rng::SplitMix64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0.uniform()
        }
        fn normal(&mut self) -> f32 {
            let (u1, u2) = (1.0 - self.uniform(), self.uniform());
            (libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(2.0 * core::f64::consts::PI * u2)) as f32
        }
        fn normals(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.normal()).collect()
        }
    }

    const GROUPS: [GroupSize; 4] = [GroupSize::PerChannel, GroupSize::G32, GroupSize::G64, GroupSize::G128];

    /// Correlated activations `x = A·z + 0.1·noise` (`z` of dimension `rank`), with a few
    /// outlier channels scaled by 20.
    fn correlated_x(rng: &mut Rng, tokens: usize, cols: usize, rank: usize) -> Vec<f32> {
        let a = rng.normals(cols * rank);
        let mut x = vec![0.0f32; tokens * cols];
        for t in 0..tokens {
            let z = rng.normals(rank);
            for c in 0..cols {
                let mut v: f32 = (0..rank).map(|k| a[c * rank + k] * z[k]).sum::<f32>() / (rank as f32).sqrt();
                v += 0.1 * rng.normal();
                if c % 61 == 7 {
                    v *= 20.0;
                }
                x[t * cols + c] = v;
            }
        }
        x
    }

    fn hessian_of(x: &[f32], tokens: usize, cols: usize) -> Vec<f64> {
        let mut h = vec![0.0f64; cols * cols];
        accumulate_hessian(&mut h, x, tokens, cols);
        finish_hessian(&mut h, tokens);
        h
    }

    fn identity(n: usize) -> Vec<f64> {
        let mut h = vec![0.0f64; n * n];
        for i in 0..n {
            h[i * n + i] = 1.0;
        }
        h
    }

    #[test]
    fn ptq_inverse_factor_matches_cholesky_of_the_inverse() {
        // Reference path: H⁻¹ explicitly (Gauss–Jordan), then its upper Cholesky factor.
        let n = 9;
        let mut rng = Rng(crate::rng::SplitMix64(3));
        let b: Vec<f64> = (0..n * n).map(|_| rng.normal() as f64).collect();
        let mut h = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] =
                    (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>() + if i == j { 0.5 } else { 0.0 };
            }
        }
        let mut inv = identity(n);
        let mut m = h.clone();
        for c in 0..n {
            let p = m[c * n + c];
            for j in 0..n {
                m[c * n + j] /= p;
                inv[c * n + j] /= p;
            }
            for r in 0..n {
                if r != c {
                    let f = m[r * n + c];
                    for j in 0..n {
                        m[r * n + j] -= f * m[c * n + j];
                        inv[r * n + j] -= f * inv[c * n + j];
                    }
                }
            }
        }
        // Upper Cholesky of inv: inv = UᵀU.
        let mut u_ref = vec![0.0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let s: f64 = (0..i).map(|k| u_ref[k * n + i] * u_ref[k * n + j]).sum();
                let v = inv[i * n + j] - s;
                u_ref[i * n + j] = if i == j { v.sqrt() } else { v / u_ref[i * n + i] };
            }
        }
        let plan =
            GptqPlan::new(&h, n, GroupSize::PerChannel, &GptqOptions { damp: 0.0, ..Default::default() }).unwrap();
        for i in 0..n {
            for j in i..n {
                let (got, want) = (plan.u[i * n + j] as f64, u_ref[i * n + j]);
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "U[{i}][{j}] {got} vs {want}");
            }
        }
    }

    #[test]
    fn ptq_gptq_with_identity_or_diagonal_hessian_is_rtn() {
        let mut rng = Rng(crate::rng::SplitMix64(1));
        let (rows, cols) = (21, 200);
        let mut w = rng.normals(rows * cols);
        w[5] = 9.0; // an outlier, so clipping matters
        let mut diag = identity(cols);
        for i in 0..cols {
            diag[i * cols + i] = 0.5 + rng.uniform();
        }
        for group in GROUPS {
            for clip in [ClipSearch::None, ClipSearch::Mse { steps: 40 }] {
                let want = rtn(&w, rows, cols, group, clip);
                for (h, act_order) in [(identity(cols), false), (diag.clone(), false), (diag.clone(), true)] {
                    for block in [128, 7] {
                        let opts = GptqOptions { clip, act_order, block, ..Default::default() };
                        let got = gptq(&w, rows, cols, group, &h, opts).unwrap();
                        assert_eq!(got, want, "{group:?} {clip:?} act_order={act_order} block={block}");
                    }
                }
            }
        }
    }

    #[test]
    fn ptq_gptq_beats_rtn_on_correlated_inputs() {
        let mut rng = Rng(crate::rng::SplitMix64(2));
        let (rows, cols, tokens) = (48, 256, 1024);
        let w = rng.normals(rows * cols);
        let x = correlated_x(&mut rng, tokens, cols, 24);
        let h = hessian_of(&x, tokens, cols);
        for group in [GroupSize::PerChannel, GroupSize::G32, GroupSize::G128] {
            for clip in [ClipSearch::None, ClipSearch::Mse { steps: 40 }] {
                let base = proxy_loss(&w, &rtn(&w, rows, cols, group, clip), group, &h);
                for act_order in [false, true] {
                    let opts = GptqOptions { clip, act_order, ..Default::default() };
                    let q = gptq(&w, rows, cols, group, &h, opts).unwrap();
                    assert!(q.codes.iter().all(|&c| (-8..=7).contains(&c)));
                    assert!(q.scales.iter().all(|&s| s >= 0.0 && s == round_scale(s)));
                    let loss = proxy_loss(&w, &q, group, &h);
                    println!("{group:?} {clip:?} act_order={act_order}: gptq/rtn proxy loss = {:.3}", loss / base);
                    assert!(loss < 0.8 * base, "{group:?} {clip:?} act_order={act_order}: {loss} vs rtn {base}");
                }
            }
        }
    }

    #[test]
    fn ptq_proxy_loss_is_twice_the_mean_output_error() {
        let mut rng = Rng(crate::rng::SplitMix64(4));
        let (rows, cols, tokens) = (7, 40, 50);
        let w = rng.normals(rows * cols);
        let x = correlated_x(&mut rng, tokens, cols, 5);
        let h = hessian_of(&x, tokens, cols);
        // Accumulated in two uneven batches, then finished: the full symmetric 2/n·Σ x xᵀ.
        let mut h2 = vec![0.0f64; cols * cols];
        accumulate_hessian(&mut h2, &x[..23 * cols], 23, cols);
        accumulate_hessian(&mut h2, &x[23 * cols..], tokens - 23, cols);
        finish_hessian(&mut h2, tokens);
        for i in 0..cols {
            for j in 0..cols {
                let want = 2.0 * (0..tokens).map(|t| x[t * cols + i] as f64 * x[t * cols + j] as f64).sum::<f64>()
                    / tokens as f64;
                assert!((h2[i * cols + j] - want).abs() <= 1e-12 * (1.0 + want.abs()), "H[{i}][{j}]");
            }
        }
        for group in [GroupSize::PerChannel, GroupSize::G32] {
            let q = rtn(&w, rows, cols, group, ClipSearch::None);
            let len = group_cols(group, cols);
            let mut direct = 0.0f64;
            for t in 0..tokens {
                for r in 0..rows {
                    let y: f64 = (0..cols)
                        .map(|c| {
                            let wh = q.scales[r * group.groups(cols) + c / len] * q.codes[r * cols + c] as f32;
                            (w[r * cols + c] as f64 - wh as f64) * x[t * cols + c] as f64
                        })
                        .sum();
                    direct += y * y;
                }
            }
            let direct = 2.0 * direct / tokens as f64;
            let loss = proxy_loss(&w, &q, group, &h);
            assert!((loss - direct).abs() <= 1e-9 * direct, "{loss} vs {direct}");
        }
    }

    #[test]
    fn ptq_mse_clipping_never_loses_to_full_range() {
        let mut rng = Rng(crate::rng::SplitMix64(5));
        let (rows, cols) = (64, 160);
        let mut w = rng.normals(rows * cols);
        for (i, v) in w.iter_mut().enumerate() {
            if i % 37 == 0 {
                *v *= 8.0;
            }
            if i % 11 == 3 {
                *v = (*v * 3.0).round() / 3.0; // a few exactly-representable patterns
            }
        }
        for group in GROUPS {
            let (full, mse) = (
                rtn(&w, rows, cols, group, ClipSearch::None),
                rtn(&w, rows, cols, group, ClipSearch::Mse { steps: 40 }),
            );
            let (len, groups) = (group_cols(group, cols), group.groups(cols));
            let (mut better, mut total_full, mut total_mse) = (0, 0.0, 0.0);
            for r in 0..rows {
                for g in 0..groups {
                    let part = &w[r * cols + g * len..r * cols + ((g + 1) * len).min(cols)];
                    let (a, b) = (
                        squared_error(part, full.scales[r * groups + g]),
                        squared_error(part, mse.scales[r * groups + g]),
                    );
                    assert!(b <= a, "{group:?} row {r} group {g}: {b} > {a}");
                    better += (b < a) as usize;
                    total_full += a;
                    total_mse += b;
                }
            }
            println!(
                "{group:?}: MSE clip improves {better}/{} groups, total error {:.3}×",
                rows * groups,
                total_mse / total_full
            );
            assert!(better > 0);
        }
        assert_eq!(group_scale(&[0.0; 5], ClipSearch::Mse { steps: 40 }), 0.0);
        assert_eq!(group_scale(&[], ClipSearch::None), 0.0);
        assert_eq!(group_scale(&[7.0, -1.0], ClipSearch::Mse { steps: 0 }), 1.0);
        assert_eq!(group_scale(&[1e9], ClipSearch::None), F16_MAX);
    }

    #[test]
    fn ptq_dead_columns_and_rank_deficient_hessians() {
        let mut rng = Rng(crate::rng::SplitMix64(6));
        let (rows, cols, tokens) = (32, 128, 24); // 24 tokens: rank ≤ 24 < 128
        let w = rng.normals(rows * cols);
        let mut x = correlated_x(&mut rng, tokens, cols, 8);
        let dead = [0usize, 5, 64, 127];
        for t in 0..tokens {
            for &c in &dead {
                x[t * cols + c] = 0.0;
            }
        }
        let h = hessian_of(&x, tokens, cols);
        for group in [GroupSize::PerChannel, GroupSize::G32] {
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, ..Default::default() };
                let plan = GptqPlan::new(&h, cols, group, &opts).unwrap();
                assert_eq!(plan.dead_columns(), dead.len());
                let q = gptq(&w, rows, cols, group, &h, opts).unwrap();
                for r in 0..rows {
                    for &c in &dead {
                        assert_eq!(q.codes[r * cols + c], 0, "dead column {c}");
                    }
                }
                let base = proxy_loss(&w, &rtn(&w, rows, cols, group, opts.clip), group, &h);
                let loss = proxy_loss(&w, &q, group, &h);
                assert!(loss < 0.8 * base, "{group:?} act_order={act_order}: {loss} vs {base}");
            }
        }
        // All columns dead: everything quantizes to zero.
        let q = gptq(&w, rows, cols, GroupSize::G32, &vec![0.0; cols * cols], GptqOptions::default()).unwrap();
        assert!(q.codes.iter().all(|&c| c == 0) && q.scales.iter().all(|&s| s == 0.0));
        // Zero dampening on a singular (rank-1) Hessian: retried with more dampening.
        let v = rng.normals(cols);
        let h1: Vec<f64> = (0..cols * cols).map(|i| v[i / cols] as f64 * v[i % cols] as f64).collect();
        let plan =
            GptqPlan::new(&h1, cols, GroupSize::PerChannel, &GptqOptions { damp: 0.0, ..Default::default() }).unwrap();
        assert!(plan.damp() > 0.0);
    }

    #[test]
    fn ptq_bad_inputs_are_errors() {
        let (rows, cols) = (4, 64);
        let mut rng = Rng(crate::rng::SplitMix64(7));
        let w = rng.normals(rows * cols);
        let h = identity(cols);
        let opts = GptqOptions::default();
        let mut bad_w = w.clone();
        bad_w[70] = f32::NAN;
        assert_eq!(
            gptq(&bad_w, rows, cols, GroupSize::G32, &h, opts),
            Err(PtqError::NonFinite { what: "weights", index: 70 })
        );
        bad_w[70] = f32::INFINITY;
        assert!(matches!(gptq(&bad_w, rows, cols, GroupSize::G32, &h, opts), Err(PtqError::NonFinite { .. })));
        let mut bad_h = h.clone();
        bad_h[3 * cols + 9] = f64::INFINITY;
        assert_eq!(
            gptq(&w, rows, cols, GroupSize::G32, &bad_h, opts),
            Err(PtqError::NonFinite { what: "hessian", index: 3 * cols + 9 })
        );
        // Negative definite: fails at every dampening tried.
        let neg: Vec<f64> = h.iter().map(|v| -v).collect();
        match gptq(&w, rows, cols, GroupSize::G32, &neg, opts) {
            Err(PtqError::NotPositiveDefinite { damp }) => assert!((damp - 1.0).abs() < 1e-12, "{damp}"),
            other => panic!("{other:?}"),
        }
        // Strongly indefinite: eigenvalue −10 against a mean diagonal of 1.
        let mut ind = h.clone();
        ind[1] = 11.0;
        ind[cols] = 11.0;
        assert!(matches!(gptq(&w, rows, cols, GroupSize::G32, &ind, opts), Err(PtqError::NotPositiveDefinite { .. })));
        assert!(matches!(gptq(&w, rows, cols, GroupSize::G32, &h[1..], opts), Err(PtqError::Size { .. })));
        assert!(matches!(gptq(&w[1..], rows, cols, GroupSize::G32, &h, opts), Err(PtqError::Size { .. })));
        assert_eq!(gptq(&[], 0, 0, GroupSize::G32, &[], opts), Err(PtqError::Empty));
        for bad in [
            GptqOptions { damp: -1.0, ..opts },
            GptqOptions { damp: f64::NAN, ..opts },
            GptqOptions { block: 0, ..opts },
        ] {
            assert!(matches!(gptq(&w, rows, cols, GroupSize::G32, &h, bad), Err(PtqError::InvalidOption(_))));
        }
    }

    #[test]
    fn ptq_plan_rows_split_like_one_call() {
        let mut rng = Rng(crate::rng::SplitMix64(8));
        let (rows, cols, tokens) = (37, 96, 200);
        let w = rng.normals(rows * cols);
        let x = correlated_x(&mut rng, tokens, cols, 6);
        let h = hessian_of(&x, tokens, cols);
        let opts = GptqOptions::default();
        let whole = gptq(&w, rows, cols, GroupSize::G32, &h, opts).unwrap();
        let plan = GptqPlan::new(&h, cols, GroupSize::G32, &opts).unwrap();
        let mut q = Quantized { codes: vec![0; rows * cols], scales: vec![0.0; rows * plan.groups()] };
        // Row ranges that cut tiles and 4-row kernel groups at odd places.
        for (a, b) in [(0, 5), (5, 22), (22, 37)] {
            let g = plan.groups();
            plan.quantize_rows(&w[a * cols..b * cols], &mut q.codes[a * cols..b * cols], &mut q.scales[a * g..b * g])
                .unwrap();
        }
        assert_eq!(q, whole);
    }

    /// Timing at a realistic size (cols 1536, rows 576); run with
    /// `cargo test -p petrel-quant --release ptq_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn ptq_timing_1536() {
        let mut rng = Rng(crate::rng::SplitMix64(9));
        let (rows, cols, tokens) = (576, 1536, 512);
        let w = rng.normals(rows * cols);
        let x = correlated_x(&mut rng, tokens, cols, 64);
        let t = Instant::now();
        let h = hessian_of(&x, tokens, cols);
        println!("accumulate_hessian ({tokens} tokens): {:?}", t.elapsed());
        for group in [GroupSize::PerChannel, GroupSize::G128, GroupSize::G32] {
            let clip = ClipSearch::Mse { steps: 40 };
            let t = Instant::now();
            let r = rtn(&w, rows, cols, group, clip);
            println!("{group:?}: rtn (mse clip): {:?}", t.elapsed());
            let t = Instant::now();
            let plan = GptqPlan::new(&h, cols, group, &GptqOptions::default()).unwrap();
            let t_plan = t.elapsed();
            let t = Instant::now();
            let mut q = Quantized { codes: vec![0; rows * cols], scales: vec![0.0; rows * plan.groups()] };
            plan.quantize_rows(&w, &mut q.codes, &mut q.scales).unwrap();
            let t_rows = t.elapsed();
            let t = Instant::now();
            let (lr, lg) = (proxy_loss(&w, &r, group, &h), proxy_loss(&w, &q, group, &h));
            println!(
                "{group:?}: plan {t_plan:?}, quantize_rows {t_rows:?}, 2× proxy_loss {:?}; gptq/rtn loss {:.3}",
                t.elapsed(),
                lg / lr
            );
        }
    }
}
