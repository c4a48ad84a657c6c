//! The portable reference kernels (see the parent module for the arithmetic they define).

use super::{check_lengths, combine_lanes};
use crate::activation::Q8Row;
use crate::blocks::{read_f16, WeightFormat, BLOCK_LEN};

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
