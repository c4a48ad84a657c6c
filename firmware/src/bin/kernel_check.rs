//! The Cortex-M kernels against the scalar reference, inside QEMU: every kernel set this
//! core has (DSP; Helium on the Cortex-M55 build) must give bit-identical outputs on
//! random shapes with ragged tails (rows not a multiple of 16, columns not a multiple of 32,
//! partial panel ranges, every group size, int4 and int8 activations, 1–3 tokens), for the
//! W4 matrix kernels and the Q8_0 dot products. Then it counts the instructions each set
//! takes for Petrel-tiny's largest matrix shape. Exit code 0 only if every case matched.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

use cortex_m_rt::entry;
use cortex_m_semihosting::debug::{exit, EXIT_SUCCESS};
use petrel_firmware::counter::Counter;
use petrel_firmware::{fail, memory, say};
use petrel_quant::dot::Isa;
use petrel_quant::w4::activation::{quantize_token, ActBits, TokenBatch};
use petrel_quant::w4::kernels::W4Kernels;
use petrel_quant::w4::{pack, pad_cols, GroupSize, W4Matrix, W4Shape};
use petrel_quant::{quantize_row_q8, Kernels, Q8Row, Q8RowMut, WeightFormat, BLOCK_LEN};

/// Random cases per kernel family.
const CASES: usize = 60;

/// A 64-bit linear congruential generator (Knuth's constants), high bits out.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }

    /// A value in [-4, 4) with an occasional outlier.
    fn value(&mut self) -> f32 {
        let v = (self.next() % 8192) as f32 / 1024.0 - 4.0;
        if self.below(23) == 0 {
            v * 25.0
        } else {
            v
        }
    }
}

/// An owned W4 matrix: random codes (extremes included) and scales.
struct Matrix {
    shape: W4Shape,
    packed: Vec<u8>,
    scales: Vec<u8>,
}

impl Matrix {
    fn random(rows: usize, cols: usize, group: GroupSize, rng: &mut Rng) -> Self {
        let shape = W4Shape { rows, cols, group };
        let codes: Vec<i8> = (0..rows * cols)
            .map(|_| match rng.below(8) {
                0 => -8,
                1 => 7,
                _ => rng.below(16) as i8 - 8,
            })
            .collect();
        let scales: Vec<f32> = (0..rows * shape.groups()).map(|_| rng.below(1000) as f32 * 1e-4).collect();
        let (mut packed, mut scale_bytes) = (vec![0u8; shape.packed_bytes()], vec![0u8; shape.scale_count() * 2]);
        pack(&shape, &codes, &scales, &mut packed, &mut scale_bytes);
        Matrix { shape, packed, scales: scale_bytes }
    }

    fn view(&self) -> W4Matrix<'_> {
        match W4Matrix::new(self.shape, &self.packed, &self.scales) {
            Ok(m) => m,
            Err(_) => fail("a packed test matrix was rejected"),
        }
    }
}

/// Owned quantized tokens.
struct Tokens {
    tokens: usize,
    cols: usize,
    group: GroupSize,
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl Tokens {
    /// Tokens of `cols` random values times `magnitude`.
    fn random(tokens: usize, cols: usize, group: GroupSize, bits: ActBits, magnitude: f32, rng: &mut Rng) -> Self {
        let (pc, groups) = (pad_cols(cols), group.groups(cols));
        let (mut codes, mut scales, mut sums) =
            (vec![0i8; tokens * pc], vec![0f32; tokens * groups], vec![0i32; tokens * groups]);
        for t in 0..tokens {
            let x: Vec<f32> = (0..cols).map(|_| rng.value() * magnitude).collect();
            quantize_token(
                &x,
                bits,
                0.9,
                group,
                &mut codes[t * pc..(t + 1) * pc],
                &mut sums[t * groups..(t + 1) * groups],
                &mut scales[t * groups..(t + 1) * groups],
            );
        }
        Tokens { tokens, cols, group, codes, scales, sums }
    }

    fn batch(&self) -> TokenBatch<'_> {
        TokenBatch {
            tokens: self.tokens,
            cols: self.cols,
            group: self.group,
            codes: &self.codes,
            scales: &self.scales,
            sums: &self.sums,
        }
    }
}

/// Owned Q8 activation rows for `blocks` blocks of 32.
fn q8_rows(rows: usize, blocks: usize, rng: &mut Rng) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let n = blocks * BLOCK_LEN;
    let (mut qs, mut scales, mut sums) = (vec![0i8; rows * n], vec![0f32; rows * blocks], vec![0i32; rows * blocks]);
    for r in 0..rows {
        let x: Vec<f32> = (0..n).map(|_| rng.value()).collect();
        quantize_row_q8(
            &x,
            Q8RowMut {
                qs: &mut qs[r * n..(r + 1) * n],
                scales: &mut scales[r * blocks..(r + 1) * blocks],
                sums: &mut sums[r * blocks..(r + 1) * blocks],
            },
        );
    }
    (qs, scales, sums)
}

/// A random Q8_0 weight row of `blocks` blocks (f16 scale, then 32 signed codes).
fn q8_0_row(blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut row = vec![0u8; blocks * 34];
    for b in 0..blocks {
        let d = half_bits(rng.below(1000) as f32 * 1e-3);
        row[b * 34..b * 34 + 2].copy_from_slice(&d.to_le_bytes());
        for v in &mut row[b * 34 + 2..(b + 1) * 34] {
            *v = match rng.below(8) {
                0 => 0x80,
                1 => 0x7F,
                _ => rng.next() as u8,
            };
        }
    }
    row
}

/// An f16's bits for a small positive `v` (only used to make test scales).
fn half_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32 - 127 + 15;
    if v == 0.0 || exponent <= 0 {
        return 0;
    }
    ((exponent as u16) << 10) | ((bits >> 13) & 0x3FF) as u16
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[entry]
fn main() -> ! {
    memory::HEAP.init();
    let Some(peripherals) = cortex_m::Peripherals::take() else { fail("core peripherals already taken") };
    let counter = Counter::start(peripherals.SYST);
    let sets: Vec<Isa> = Isa::ALL.iter().copied().filter(|&isa| isa != Isa::Scalar && isa.is_supported()).collect();
    if sets.is_empty() {
        fail("this core has no kernels besides the reference");
    }
    let mut rng = Rng(0x5EED_0F_C0DE);
    let groups = [GroupSize::PerChannel, GroupSize::G32, GroupSize::G64, GroupSize::G128];
    let reference = W4Kernels::scalar();
    for &isa in &sets {
        let Some(kernels) = W4Kernels::for_isa(isa) else { fail("a supported instruction set has no W4 kernels") };
        for case in 0..CASES {
            let (rows, cols) = (1 + rng.below(70), 1 + rng.below(300));
            let group = groups[rng.below(groups.len())];
            let bits = if rng.below(2) == 0 { ActBits::A4 } else { ActBits::A8 };
            let tokens = 1 + rng.below(3);
            let matrix = Matrix::random(rows, cols, group, &mut rng);
            // The last cases have activation scales near 1e-36, so that the products of
            // scales are subnormal f32: a kernel that flushed them to zero would differ.
            let magnitude = if case + 8 >= CASES { 1e-35 } else { 1.0 };
            let x = Tokens::random(tokens, cols, group, bits, magnitude, &mut rng);
            let panels = matrix.shape.panels();
            let start = rng.below(panels);
            let range = start..start + 1 + rng.below(panels - start);
            let (mut want, mut got) = (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
            reference.gemm_int(&matrix.view(), range.clone(), &x.batch(), &mut want, rows);
            kernels.gemm_int(&matrix.view(), range, &x.batch(), &mut got, rows);
            if !same_bits(&want, &got) {
                say!(
                    "w4 {} case {}: {}x{} group {} tokens {} differs from the reference",
                    isa.name(),
                    case,
                    rows,
                    cols,
                    group.as_len(),
                    tokens
                );
                fail("W4 kernel mismatch");
            }
        }
        say!("w4 {}: {} random shapes bit-identical to the reference (8 with subnormal products)", isa.name(), CASES);

        let Some(dots) = Kernels::for_isa(isa) else { fail("a supported instruction set has no dot kernels") };
        let scalar = Kernels::scalar();
        for case in 0..CASES {
            let blocks = 1 + rng.below(12);
            let row = q8_0_row(blocks, &mut rng);
            let (qs, scales, sums) = q8_rows(4, blocks, &mut rng);
            let n = blocks * BLOCK_LEN;
            let xs: [Q8Row<'_>; 4] = core::array::from_fn(|r| Q8Row {
                qs: &qs[r * n..(r + 1) * n],
                scales: &scales[r * blocks..(r + 1) * blocks],
                sums: &sums[r * blocks..(r + 1) * blocks],
            });
            let want = scalar.dot(WeightFormat::Q8_0, &row, xs[0]);
            let got = dots.dot(WeightFormat::Q8_0, &row, xs[0]);
            let want4 = (scalar.for_format_x4(WeightFormat::Q8_0))(&row, &xs);
            let got4 = (dots.for_format_x4(WeightFormat::Q8_0))(&row, &xs);
            if want.to_bits() != got.to_bits() || !same_bits(&want4, &got4) {
                say!("q8_0 {} case {}: {} blocks differs from the reference", isa.name(), case, blocks);
                fail("Q8_0 kernel mismatch");
            }
        }
        say!("q8_0 {}: {} random rows bit-identical to the reference", isa.name(), CASES);
    }

    // Instructions per multiply–accumulate on Petrel-tiny's FFN shape (384 × 128, groups of
    // 32, int4 activations, one token) and its head (1024 rows of Q8_0 × 128).
    let matrix = Matrix::random(384, 128, GroupSize::G32, &mut rng);
    let x = Tokens::random(1, 128, GroupSize::G32, ActBits::A4, 1.0, &mut rng);
    let head: Vec<Vec<u8>> = (0..64).map(|_| q8_0_row(4, &mut rng)).collect();
    let (qs, scales, sums) = q8_rows(1, 4, &mut rng);
    let xq = Q8Row { qs: &qs, scales: &scales, sums: &sums };
    let mut out = vec![0f32; 384];
    for &isa in [Isa::Scalar].iter().chain(&sets) {
        let (Some(w4), Some(dots)) = (W4Kernels::for_isa(isa), Kernels::for_isa(isa)) else { continue };
        let start = counter.ticks();
        w4.gemm_int(&matrix.view(), 0..matrix.shape.panels(), &x.batch(), &mut out, 384);
        let w4_instructions = counter.instructions(counter.ticks() - start);
        let start = counter.ticks();
        let mut sink = 0f32;
        for row in &head {
            sink += dots.dot(WeightFormat::Q8_0, row, xq);
        }
        let dot_instructions = counter.instructions(counter.ticks() - start);
        say!("cost {}: w4a4 384x128 {} instructions ({} per 100 MACs); q8_0 64x128 {} instructions ({} per 100 MACs) [{}]",
            isa.name(), w4_instructions, w4_instructions * 100 / (384 * 128), dot_instructions,
            dot_instructions * 100 / (64 * 128), (sink != 0.0) as u32);
    }
    say!("done: exit 0");
    exit(EXIT_SUCCESS);
    loop {
        cortex_m::asm::bkpt();
    }
}
