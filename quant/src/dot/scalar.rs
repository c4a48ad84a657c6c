//! The portable reference kernels (see the parent module for the arithmetic they define).

use super::{check_lengths, combine_lanes};
use crate::activation::Q8Row;
use crate::blocks::{k_code, k_scale_min, q5_code, q6_k_code, read_f16, WeightFormat, BLOCK_LEN};

/// Exact `Σ n_j x_j` over one block, `n_j` the unsigned nibbles of `qs` (16 bytes).
#[inline(always)]
pub(crate) fn nibble_dot(qs: &[u8], x: &[i8]) -> i32 {
    let mut sum = 0i32;
    for j in 0..16 {
        sum += (qs[j] & 0xF) as i32 * x[j] as i32;
        sum += (qs[j] >> 4) as i32 * x[j + 16] as i32;
    }
    sum
}

/// Q4_0 block contribution from the exact nibble dot product `isum` (step 2).
#[inline(always)]
pub(crate) fn q4_0_contribution(d_w: f32, d_x: f32, isum: i32, sum_x: i32) -> f32 {
    (d_w * d_x) * (isum - 8 * sum_x) as f32
}

/// Q4_1 block contribution from the exact nibble dot product `isum` (step 2).
#[inline(always)]
pub(crate) fn q4_1_contribution(d_w: f32, m_w: f32, d_x: f32, isum: i32, sum_x: i32) -> f32 {
    (d_w * d_x) * isum as f32 + (m_w * d_x) * sum_x as f32
}

/// Q8_0 block contribution from the exact signed dot product `isum` (step 2).
#[inline(always)]
pub(crate) fn q8_0_contribution(d_w: f32, d_x: f32, isum: i32) -> f32 {
    (d_w * d_x) * isum as f32
}

/// Block `b`'s contribution for Q4_0 weights.
#[inline(always)]
pub(crate) fn q4_0_block(row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let block = &row[b * 18..b * 18 + 18];
    let isum = nibble_dot(&block[2..18], &x.qs[b * BLOCK_LEN..]);
    q4_0_contribution(read_f16(block, 0), x.scales[b], isum, x.sums[b])
}

/// Block `b`'s contribution for Q4_1 weights.
#[inline(always)]
pub(crate) fn q4_1_block(row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let block = &row[b * 20..b * 20 + 20];
    let isum = nibble_dot(&block[4..20], &x.qs[b * BLOCK_LEN..]);
    q4_1_contribution(read_f16(block, 0), read_f16(block, 2), x.scales[b], isum, x.sums[b])
}

/// Block `b`'s contribution for Q8_0 weights.
#[inline(always)]
pub(crate) fn q8_0_block(row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let block = &row[b * 34..b * 34 + 34];
    let xs = &x.qs[b * BLOCK_LEN..(b + 1) * BLOCK_LEN];
    let isum: i32 = block[2..34].iter().zip(xs).map(|(&w, &v)| (w as i8) as i32 * v as i32).sum();
    q8_0_contribution(read_f16(block, 0), x.scales[b], isum)
}

fn accumulate(blocks: usize, contribution: impl Fn(usize) -> f32) -> f32 {
    let mut lanes = [0f32; 4];
    for b in 0..blocks {
        lanes[b % 4] += contribution(b);
    }
    combine_lanes(lanes)
}

/// Reference for one row against four activation rows: four single dot products.
pub fn dot4(format: WeightFormat, row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4] {
    let dot = match format {
        WeightFormat::Q4_0 => dot_q4_0,
        WeightFormat::Q4_1 => dot_q4_1,
        WeightFormat::Q8_0 => dot_q8_0,
        WeightFormat::Q5_0 => dot_q5_0,
        WeightFormat::Q5_1 => dot_q5_1,
        WeightFormat::Q4_K => dot_q4_k,
        WeightFormat::Q5_K => dot_q5_k,
        WeightFormat::Q6_K => dot_q6_k,
    };
    core::array::from_fn(|j| dot(row, xs[j]))
}

/// Reference Q4_0 × Q8 dot product.
pub fn dot_q4_0(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q4_0, row, &x);
    accumulate(blocks, |b| q4_0_block(row, &x, b))
}

/// Reference Q4_1 × Q8 dot product.
pub fn dot_q4_1(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q4_1, row, &x);
    accumulate(blocks, |b| q4_1_block(row, &x, b))
}

/// Reference Q8_0 × Q8 dot product.
pub fn dot_q8_0(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q8_0, row, &x);
    accumulate(blocks, |b| q8_0_block(row, &x, b))
}

/// Exact `Σ q_j x_j` over one block of 32 codes given by `code`.
#[inline(always)]
fn code_dot(x: &[i8], code: impl Fn(usize) -> u8) -> i32 {
    (0..BLOCK_LEN).map(|j| code(j) as i32 * x[j] as i32).sum()
}

/// Q5_0 block contribution from the exact dot product `isum` of the 5-bit codes (step 2).
#[inline(always)]
pub(crate) fn q5_0_contribution(d_w: f32, d_x: f32, isum: i32, sum_x: i32) -> f32 {
    (d_w * d_x) * (isum - 16 * sum_x) as f32
}

/// K-quant (Q4_K, Q5_K) contribution of one activation block against sub-block scale `sc`
/// and minimum `m` (step 2).
#[inline(always)]
pub(crate) fn k_contribution(d_w: f32, dmin_w: f32, d_x: f32, sc: i32, m: i32, isum: i32, sum_x: i32) -> f32 {
    (d_w * d_x) * (sc * isum) as f32 - (dmin_w * d_x) * (m * sum_x) as f32
}

/// Q6_K contribution of one activation block from its exact scaled sum
/// `sc_lo * Σ_lo (q - 32) x + sc_hi * Σ_hi (q - 32) x` (step 2).
#[inline(always)]
pub(crate) fn q6_k_contribution(d_w: f32, d_x: f32, scaled: i32) -> f32 {
    (d_w * d_x) * scaled as f32
}

/// Block `b`'s contribution for Q5_0 weights.
#[inline(always)]
fn q5_0_block(row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let block = &row[b * 22..b * 22 + 22];
    let isum = code_dot(&x.qs[b * BLOCK_LEN..], |j| q5_code(block, 2, j));
    q5_0_contribution(read_f16(block, 0), x.scales[b], isum, x.sums[b])
}

/// Block `b`'s contribution for Q5_1 weights (the Q4_1 formula with 5-bit codes).
#[inline(always)]
fn q5_1_block(row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let block = &row[b * 24..b * 24 + 24];
    let isum = code_dot(&x.qs[b * BLOCK_LEN..], |j| q5_code(block, 4, j));
    q4_1_contribution(read_f16(block, 0), read_f16(block, 2), x.scales[b], isum, x.sums[b])
}

/// Activation block `b`'s contribution for Q4_K or Q5_K weights (sub-block `b % 8` of
/// super-block `b / 8`).
#[inline(always)]
fn k_block(format: WeightFormat, row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let bb = format.block_bytes();
    let block = &row[b / 8 * bb..(b / 8 + 1) * bb];
    let s = b % 8;
    let isum = code_dot(&x.qs[b * BLOCK_LEN..], |l| k_code(format, block, s, l));
    let (sc, m) = k_scale_min(&block[4..16], s);
    k_contribution(read_f16(block, 0), read_f16(block, 2), x.scales[b], sc as i32, m as i32, isum, x.sums[b])
}

/// Activation block `b`'s contribution for Q6_K weights: weights `32k..32k + 32` of half
/// `n` of super-block `b / 8`, with `b % 8 = 4n + k`, the 16-weight sub-blocks `2 (b % 8)`
/// and `2 (b % 8) + 1`.
#[inline(always)]
fn q6_k_block(row: &[u8], x: &Q8Row<'_>, b: usize) -> f32 {
    let block = &row[b / 8 * 210..(b / 8 + 1) * 210];
    let (n, k) = ((b % 8) / 4, b % 4);
    let xs = &x.qs[b * BLOCK_LEN..];
    let mut halves = [0i32; 2];
    for l in 0..BLOCK_LEN {
        halves[l / 16] += (q6_k_code(block, n, k, l) as i32 - 32) * xs[l] as i32;
    }
    let sc = &block[192 + 2 * (b % 8)..];
    let scaled = (sc[0] as i8) as i32 * halves[0] + (sc[1] as i8) as i32 * halves[1];
    q6_k_contribution(read_f16(block, 208), x.scales[b], scaled)
}

/// Reference Q5_0 × Q8 dot product.
pub fn dot_q5_0(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q5_0, row, &x);
    accumulate(blocks, |b| q5_0_block(row, &x, b))
}

/// Reference Q5_1 × Q8 dot product.
pub fn dot_q5_1(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q5_1, row, &x);
    accumulate(blocks, |b| q5_1_block(row, &x, b))
}

/// Reference Q4_K × Q8 dot product.
pub fn dot_q4_k(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q4_K, row, &x);
    accumulate(blocks, |b| k_block(WeightFormat::Q4_K, row, &x, b))
}

/// Reference Q5_K × Q8 dot product.
pub fn dot_q5_k(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q5_K, row, &x);
    accumulate(blocks, |b| k_block(WeightFormat::Q5_K, row, &x, b))
}

/// Reference Q6_K × Q8 dot product.
pub fn dot_q6_k(row: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = check_lengths(WeightFormat::Q6_K, row, &x);
    accumulate(blocks, |b| q6_k_block(row, &x, b))
}
