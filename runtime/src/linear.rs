//! Weight matrices and the matrix multiplication on their stored blocks.
//!
//! A [`Linear`] borrows a GGUF tensor of `rows × cols` (ggml dims `[cols, rows]`, each row
//! contiguous). Quantized weights (Q4_0, Q4_1, Q8_0) are multiplied directly against
//! 8-bit activation blocks ([`ActivationBatch`]) by `petrel-quant`'s integer kernels;
//! F32 and F16 weights against the float activations.

use alloc::vec;
use alloc::vec::Vec;
use petrel_quant::{blocks, quantize_row_q8, Kernels, Q8Row, Q8RowMut, WeightFormat, BLOCK_LEN};

use crate::gguf::{TensorInfo, TensorType};
use crate::model::ModelError;
use crate::parallel::Member;

/// How a weight matrix's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightStorage {
    /// Blocks of 32 computed on by the integer kernels.
    Quantized(WeightFormat),
    /// Little-endian f32.
    F32,
    /// Little-endian IEEE f16.
    F16,
}

impl WeightStorage {
    fn of(ty: TensorType) -> Option<Self> {
        Some(match ty {
            TensorType::Q4_0 => WeightStorage::Quantized(WeightFormat::Q4_0),
            TensorType::Q4_1 => WeightStorage::Quantized(WeightFormat::Q4_1),
            TensorType::Q8_0 => WeightStorage::Quantized(WeightFormat::Q8_0),
            TensorType::F32 => WeightStorage::F32,
            TensorType::F16 => WeightStorage::F16,
            _ => return None,
        })
    }

    fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightStorage::Quantized(f) => cols / BLOCK_LEN * f.block_bytes(),
            WeightStorage::F32 => cols * 4,
            WeightStorage::F16 => cols * 2,
        }
    }
}

/// A `rows × cols` weight matrix borrowed from the model file, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Linear<'a> {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Element storage.
    pub storage: WeightStorage,
    data: &'a [u8],
}

impl<'a> Linear<'a> {
    /// Wraps `tensor`, checking that it is a `rows × cols` matrix of a supported type.
    pub fn new(tensor: &TensorInfo<'a>, rows: usize, cols: usize) -> Result<Self, ModelError> {
        if tensor.n_dims > 2
            || tensor.dims[0] != cols as u64
            || tensor.dims[1] != rows as u64
            || !cols.is_multiple_of(BLOCK_LEN)
        {
            return Err(ModelError::BadTensorShape {
                tensor: tensor.name.into(),
                expected: vec![cols as u64, rows as u64],
                found: tensor.shape().to_vec(),
            });
        }
        let storage = WeightStorage::of(tensor.ty)
            .ok_or(ModelError::UnsupportedTensorType { tensor: tensor.name.into(), ty: tensor.ty.name() })?;
        Ok(Linear { rows, cols, storage, data: tensor.data })
    }

    /// Bytes of the whole matrix.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The stored bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.storage.row_bytes(self.cols);
        &self.data[r * n..(r + 1) * n]
    }

    /// Writes row `r` as f32 into `out` (`cols` long): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        match self.storage {
            WeightStorage::Quantized(format) => blocks::dequantize_row(format, row, out),
            WeightStorage::F32 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            WeightStorage::F16 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }

    /// `out[t][r] = Σ_c W[r][c] · x[t][c]` for every token `t` of `x`, written row-major
    /// by token (`out` is `x.tokens() × rows`). Each team member computes its share of the
    /// rows; `to` says who receives the complete result.
    pub fn matmul(&self, kernels: &Kernels, x: &ActivationBatch, out: &mut [f32], member: &Member<'_>, to: Gather) {
        let tokens = x.tokens;
        debug_assert_eq!(x.cols, self.cols);
        let out = &mut out[..tokens * self.rows];
        let mine = member.share(self.rows);
        for r in mine.clone() {
            if r + PREFETCH_ROWS < mine.end {
                petrel_quant::dot::prefetch(self.row(r + PREFETCH_ROWS));
            }
            self.row_times_batch(kernels, r, x, out);
        }
        match to {
            Gather::All => member.all_gather(out, tokens, self.rows, 1),
            Gather::Leader => member.gather_to_leader(out, tokens, self.rows, 1),
            Gather::None => {}
        }
    }

    /// `out[t * rows + r] = W[r] · x[t]` for every token of the batch.
    #[inline]
    fn row_times_batch(&self, kernels: &Kernels, r: usize, x: &ActivationBatch, out: &mut [f32]) {
        let (row, rows, tokens) = (self.row(r), self.rows, x.tokens);
        match self.storage {
            WeightStorage::Quantized(format) => {
                let (dot, dot4) = (kernels.for_format(format), kernels.for_format_x4(format));
                let mut t = 0;
                while t + 4 <= tokens {
                    let xs = [x.q8_row(t), x.q8_row(t + 1), x.q8_row(t + 2), x.q8_row(t + 3)];
                    for (j, v) in dot4(row, &xs).into_iter().enumerate() {
                        out[(t + j) * rows + r] = v;
                    }
                    t += 4;
                }
                for t in t..tokens {
                    out[t * rows + r] = dot(row, x.q8_row(t));
                }
            }
            WeightStorage::F32 | WeightStorage::F16 => {
                for t in 0..tokens {
                    out[t * rows + r] = float_dot(self.storage, row, x.f32_row(t));
                }
            }
        }
    }
}

/// Which team members need the complete result of a parallel operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    /// Every member (the result feeds the next layer).
    All,
    /// Only the leader (the logits).
    Leader,
    /// Nobody: each member keeps only its own rows (`member.share(rows)` of every token).
    None,
}

/// How many rows ahead of the current one the matmul prefetches.
const PREFETCH_ROWS: usize = 8;

fn float_dot(storage: WeightStorage, row: &[u8], x: &[f32]) -> f32 {
    let mut sum = 0f32;
    match storage {
        WeightStorage::F32 => {
            for (b, &v) in row.chunks_exact(4).zip(x) {
                sum += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v;
            }
        }
        _ => {
            for (b, &v) in row.chunks_exact(2).zip(x) {
                sum += half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() * v;
            }
        }
    }
    sum
}

/// A batch of activation rows, in f32 and quantized to 8-bit blocks, allocated once for
/// up to `max_tokens × max_cols`.
#[derive(Debug)]
pub struct ActivationBatch {
    f32: Vec<f32>,
    qs: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    tokens: usize,
    cols: usize,
}

impl ActivationBatch {
    /// Storage for up to `max_tokens` rows of up to `max_cols` (a multiple of 32) values.
    pub fn new(max_tokens: usize, max_cols: usize) -> Self {
        let blocks = max_tokens * max_cols / BLOCK_LEN;
        ActivationBatch {
            f32: vec![0.0; max_tokens * max_cols],
            qs: vec![0; max_tokens * max_cols],
            scales: vec![0.0; blocks],
            sums: vec![0; blocks],
            tokens: 0,
            cols: 0,
        }
    }

    /// Loads `x` (`tokens × cols`, row-major) and quantizes every row.
    pub fn load(&mut self, x: &[f32], tokens: usize, cols: usize) {
        let n = tokens * cols;
        self.tokens = tokens;
        self.cols = cols;
        self.f32[..n].copy_from_slice(&x[..n]);
        let blocks = n / BLOCK_LEN;
        for t in 0..tokens {
            let (b0, b1) = (t * cols / BLOCK_LEN, (t + 1) * cols / BLOCK_LEN);
            quantize_row_q8(
                &x[t * cols..(t + 1) * cols],
                Q8RowMut {
                    qs: &mut self.qs[t * cols..(t + 1) * cols],
                    scales: &mut self.scales[b0..b1],
                    sums: &mut self.sums[b0..b1],
                },
            );
        }
        debug_assert!(blocks <= self.scales.len());
    }

    /// Number of rows loaded.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Row `t`, quantized.
    #[inline]
    pub fn q8_row(&self, t: usize) -> Q8Row<'_> {
        let (b0, b1) = (t * self.cols / BLOCK_LEN, (t + 1) * self.cols / BLOCK_LEN);
        Q8Row {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            scales: &self.scales[b0..b1],
            sums: &self.sums[b0..b1],
        }
    }

    /// Row `t`, in f32.
    #[inline]
    pub fn f32_row(&self, t: usize) -> &[f32] {
        &self.f32[t * self.cols..(t + 1) * self.cols]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufFile, TensorType};
    use crate::gguf_writer::GgufWriter;
    use petrel_quant::blocks::quantize_row;

    /// Every weight storage the native backend computes with, against a float matmul of
    /// the dequantized weights with the (quantized, for the integer path) activations.
    #[test]
    fn matmul_matches_float_reference_for_every_storage() {
        let (rows, cols, tokens) = (13, 96, 6);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 97.0).collect();
        let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 104_729 % 89) as f32 - 44.0) / 31.0).collect();
        let encode = |ty: TensorType| -> Vec<u8> {
            match ty {
                TensorType::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                TensorType::F16 => w.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
                _ => {
                    let format = match ty {
                        TensorType::Q4_0 => WeightFormat::Q4_0,
                        TensorType::Q4_1 => WeightFormat::Q4_1,
                        _ => WeightFormat::Q8_0,
                    };
                    let row_bytes = format.row_bytes(cols).unwrap();
                    let mut out = vec![0u8; rows * row_bytes];
                    for (r, chunk) in out.chunks_exact_mut(row_bytes).enumerate() {
                        quantize_row(format, &w[r * cols..(r + 1) * cols], chunk);
                    }
                    out
                }
            }
        };
        let team = crate::parallel::Team::new(2);
        for ty in [TensorType::F32, TensorType::F16, TensorType::Q4_0, TensorType::Q4_1, TensorType::Q8_0] {
            let mut writer = GgufWriter::new();
            writer.tensor("w", &[cols as u64, rows as u64], ty, encode(ty));
            let bytes = writer.to_bytes();
            let file = GgufFile::parse(&bytes).unwrap();
            let linear = Linear::new(file.tensor("w").unwrap(), rows, cols).unwrap();
            let mut act = ActivationBatch::new(tokens, cols);
            act.load(&x, tokens, cols);
            for kernels in [Kernels::scalar(), Kernels::detect()] {
                let out = team.run(|member| {
                    let mut out = vec![0f32; tokens * rows];
                    linear.matmul(&kernels, &act, &mut out, member, Gather::All);
                    out
                });
                let mut dequantized = vec![0f32; cols];
                for r in 0..rows {
                    linear.dequantize_row(r, &mut dequantized);
                    for t in 0..tokens {
                        let xs: Vec<f32> = match linear.storage {
                            WeightStorage::Quantized(_) => {
                                let q = act.q8_row(t);
                                (0..cols).map(|c| q.scales[c / BLOCK_LEN] * q.qs[c] as f32).collect()
                            }
                            _ => x[t * cols..(t + 1) * cols].to_vec(),
                        };
                        let expected: f32 = dequantized.iter().zip(&xs).map(|(a, b)| a * b).sum();
                        let got = out[t * rows + r];
                        assert!(
                            (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                            "{ty:?} {r} {t}: {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn unsupported_types_and_wrong_shapes_are_named_at_load() {
        let mut writer = GgufWriter::new();
        writer.tensor("k", &[256, 2], TensorType::Q4_K, vec![0; 2 * 144]).tensor(
            "f",
            &[32, 2],
            TensorType::F32,
            vec![0; 256],
        );
        let bytes = writer.to_bytes();
        let file = GgufFile::parse(&bytes).unwrap();
        let err = Linear::new(file.tensor("k").unwrap(), 2, 256).unwrap_err();
        assert_eq!(err, ModelError::UnsupportedTensorType { tensor: "k".into(), ty: "Q4_K" });
        assert!(matches!(Linear::new(file.tensor("f").unwrap(), 3, 32), Err(ModelError::BadTensorShape { .. })));
    }
}
