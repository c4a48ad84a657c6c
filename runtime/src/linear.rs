//! Weight matrices borrowed in their stored form, and the activation batches they are
//! multiplied with. The products themselves belong to the backends (Petrel's own kernels:
//! [`crate::backend::native`]); this module knows layouts, shapes and the team's row split.
//!
//! A [`Linear`] borrows a GGUF tensor of `rows × cols` (ggml dims `[cols, rows]`, each row
//! contiguous, or a W4 panel layout). Block-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0 and the K-quants Q4_K, Q5_K, Q6_K) are multiplied against 8-bit activation blocks
//! by `petrel-quant`'s integer kernels; their f16 scales are checked finite at load; W4
//! weights ([`petrel_quant::w4`]) against int4/int8 activations scaled per token and weight
//! group (W4A4, W4A8) or f32 ones (W4A16); F32 and F16 weights against f32 activations.
//!
//! In a team, a member computes whole 16-row panels when `rows` is a multiple of 16 (W4
//! needs it; the other storages follow the same split so that callers need not care).

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use petrel_quant::gemm::{PanelLine, Q8Batch};
use petrel_quant::w4::activation::{quantize_token, ActBits, TokenBatch};
use petrel_quant::w4::{pad_cols, GroupSize, W4Matrix, W4Shape, PANEL_ROWS};
use petrel_quant::{blocks, quantize_row_q8, Q8Row, Q8RowMut, WeightFormat, BLOCK_LEN};

use crate::gguf::{GgufFile, TensorInfo, TensorType};
use crate::model::ModelError;
use crate::parallel::Member;
use crate::scheme::{Activations, QuantScheme, SCALES_SUFFIX};

/// How a weight matrix's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightStorage {
    /// Blocks of 32 (or K-quant super-blocks of 256) computed on by the integer kernels.
    Quantized(WeightFormat),
    /// Little-endian f32.
    F32,
    /// Little-endian IEEE f16.
    F16,
    /// Symmetric int4 in 16-row panels, multiplied with these activations.
    W4(Activations),
}

impl WeightStorage {
    fn of(ty: TensorType) -> Option<Self> {
        Some(match ty {
            TensorType::Q4_0 => WeightStorage::Quantized(WeightFormat::Q4_0),
            TensorType::Q4_1 => WeightStorage::Quantized(WeightFormat::Q4_1),
            TensorType::Q8_0 => WeightStorage::Quantized(WeightFormat::Q8_0),
            TensorType::Q5_0 => WeightStorage::Quantized(WeightFormat::Q5_0),
            TensorType::Q5_1 => WeightStorage::Quantized(WeightFormat::Q5_1),
            TensorType::Q4_K => WeightStorage::Quantized(WeightFormat::Q4_K),
            TensorType::Q5_K => WeightStorage::Quantized(WeightFormat::Q5_K),
            TensorType::Q6_K => WeightStorage::Quantized(WeightFormat::Q6_K),
            TensorType::F32 => WeightStorage::F32,
            TensorType::F16 => WeightStorage::F16,
            _ => return None,
        })
    }

    pub(crate) fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightStorage::Quantized(f) => cols / f.block_len() * f.block_bytes(),
            WeightStorage::F32 => cols * 4,
            WeightStorage::F16 => cols * 2,
            WeightStorage::W4(_) => pad_cols(cols) / 2,
        }
    }
}

/// A `rows × cols` weight matrix borrowed from the model file.
#[derive(Clone, Copy, Debug)]
pub struct Linear<'a> {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Element storage.
    pub storage: WeightStorage,
    data: &'a [u8],
    w4: Option<W4Matrix<'a>>,
}

impl<'a> Linear<'a> {
    /// Loads tensor `name` of `file` as a `rows × cols` matrix: a W4 tensor (type `I8`
    /// with a `name.scales` companion, per `scheme`) or any storage [`Linear::new`] takes.
    pub fn load(
        file: &GgufFile<'a>,
        name: &str,
        rows: usize,
        cols: usize,
        scheme: Option<&QuantScheme>,
    ) -> Result<Self, ModelError> {
        let tensor = file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if tensor.ty != TensorType::I8 {
            return Self::new(tensor, rows, cols);
        }
        let scheme = scheme.ok_or(ModelError::BadMetadata {
            key: crate::scheme::KEY_SCHEME.to_string(),
            reason: "the file has W4 (I8) tensors but no quantization scheme",
        })?;
        let shape = W4Shape { rows, cols, group: scheme.group };
        let bad_shape = |t: &TensorInfo<'_>, expected: Vec<u64>| ModelError::BadTensorShape {
            tensor: t.name.to_string(),
            expected,
            found: t.shape().to_vec(),
        };
        let packed_dims = vec![(shape.padded_cols() / 2) as u64, shape.padded_rows() as u64];
        if tensor.shape() != packed_dims.as_slice() || !rows.is_multiple_of(PANEL_ROWS) {
            return Err(bad_shape(tensor, packed_dims));
        }
        let scales_name = alloc::format!("{name}{SCALES_SUFFIX}");
        let scales = file.tensor(&scales_name).ok_or(ModelError::MissingTensor(scales_name))?;
        let scale_dims = vec![(PANEL_ROWS * shape.groups()) as u64, shape.panels() as u64];
        if scales.ty != TensorType::F16 {
            return Err(ModelError::UnsupportedTensorType { tensor: scales.name.to_string(), ty: scales.ty.name() });
        }
        if scales.shape() != scale_dims.as_slice() {
            return Err(bad_shape(scales, scale_dims));
        }
        let w4 = W4Matrix::new(shape, tensor.data, scales.data)
            .map_err(|e| ModelError::BadW4Tensor { tensor: name.to_string(), reason: e })?;
        let activations = scheme.activations_for(file, name)?;
        Ok(Linear { rows, cols, storage: WeightStorage::W4(activations), data: tensor.data, w4: Some(w4) })
    }

    /// Wraps `tensor`, checking that it is a `rows × cols` matrix of a supported
    /// (non-W4) type, `cols` a multiple of the type's block length (32, or 256 for the
    /// K-quants), and, for block formats, that every f16 scale is finite
    /// ([`blocks::validate_row`]; `BadTensorValues` naming the tensor otherwise).
    pub fn new(tensor: &TensorInfo<'a>, rows: usize, cols: usize) -> Result<Self, ModelError> {
        let storage = WeightStorage::of(tensor.ty);
        let block_len = match storage {
            Some(WeightStorage::Quantized(f)) => f.block_len(),
            _ => BLOCK_LEN,
        };
        if tensor.n_dims > 2
            || tensor.dims[0] != cols as u64
            || tensor.dims[1] != rows as u64
            || !cols.is_multiple_of(block_len)
        {
            return Err(ModelError::BadTensorShape {
                tensor: tensor.name.into(),
                expected: vec![cols as u64, rows as u64],
                found: tensor.shape().to_vec(),
            });
        }
        let storage =
            storage.ok_or(ModelError::UnsupportedTensorType { tensor: tensor.name.into(), ty: tensor.ty.name() })?;
        if let WeightStorage::Quantized(format) = storage {
            blocks::validate_row(format, tensor.data).map_err(|e| match e.block {
                usize::MAX => ModelError::BadTensorValues { tensor: tensor.name.into(), reason: e.what },
                block => ModelError::BadTensorBlock {
                    tensor: tensor.name.into(),
                    block,
                    row: block / (cols / format.block_len()).max(1),
                    reason: e.what,
                },
            })?;
        }
        Ok(Linear { rows, cols, storage, data: tensor.data, w4: None })
    }

    /// The identity of the stored matrix (the address of its bytes): equal for a tied
    /// embedding and head, and for the shared blocks of a layer-pruned model. Backends key
    /// their prepared weights by it.
    pub fn key(&self) -> usize {
        self.data.as_ptr() as usize
    }

    /// The storage's name in reports and errors (`Q4_1`, `F16`, `W4A4`, ...).
    pub fn storage_name(&self) -> &'static str {
        match self.storage {
            WeightStorage::Quantized(format) => format.name(),
            WeightStorage::F32 => "F32",
            WeightStorage::F16 => "F16",
            WeightStorage::W4(Activations::Float) => "W4A16",
            WeightStorage::W4(Activations::Quantized { bits: ActBits::A4, .. }) => "W4A4",
            WeightStorage::W4(Activations::Quantized { bits: ActBits::A8, .. }) => "W4A8",
        }
    }

    /// The stored bytes: blocks or little-endian floats row after row, or a W4 matrix's
    /// packed panels (see [`Linear::w4`]).
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The W4 matrix (codes and scales), for W4 storage.
    pub fn w4(&self) -> Option<&W4Matrix<'a>> {
        self.w4.as_ref()
    }

    /// Bytes of the whole matrix (codes and scales).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.w4.map_or(0, |w| w.scale_bytes().len())
    }

    /// Whether both matrices borrow the same bytes (a tied embedding and output head).
    pub fn same_data(&self, other: &Linear<'_>) -> bool {
        core::ptr::eq(self.data, other.data)
    }

    /// Bytes read to use one row (an embedding lookup).
    pub fn row_bytes(&self) -> usize {
        self.storage.row_bytes(self.cols) + self.w4.map_or(0, |w| w.shape().groups() * 2)
    }

    /// The stored bytes of row `r` (not for W4 matrices, whose rows are interleaved).
    #[inline]
    pub(crate) fn row(&self, r: usize) -> &'a [u8] {
        let n = self.storage.row_bytes(self.cols);
        &self.data[r * n..(r + 1) * n]
    }

    /// Writes row `r` as f32 into `out` (`cols` long): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if let Some(w4) = &self.w4 {
            return w4.dequantize_row(r, out);
        }
        let row = self.row(r);
        match self.storage {
            WeightStorage::Quantized(format) => blocks::dequantize_row(format, row, out),
            WeightStorage::F32 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            _ => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }

    /// The rows `member` computes in [`Linear::matmul`]: its share of whole 16-row panels
    /// when `rows` is a multiple of 16, else its share of rows.
    pub fn my_rows(&self, member: &Member<'_>) -> Range<usize> {
        if self.rows.is_multiple_of(PANEL_ROWS) {
            let panels = member.share(self.rows / PANEL_ROWS);
            panels.start * PANEL_ROWS..panels.end * PANEL_ROWS
        } else {
            member.share(self.rows)
        }
    }

    /// Completes `out` (`tokens × rows`) from every member's [`Linear::my_rows`] for the
    /// members `to` names.
    pub fn gather(&self, member: &Member<'_>, out: &mut [f32], tokens: usize, to: Gather) {
        let (n, width) =
            if self.rows.is_multiple_of(PANEL_ROWS) { (self.rows / PANEL_ROWS, PANEL_ROWS) } else { (self.rows, 1) };
        match to {
            Gather::All => member.all_gather(out, tokens, n, width),
            Gather::Leader => member.gather_to_leader(out, tokens, n, width),
            Gather::None => {}
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
    /// Nobody: each member keeps only its own rows ([`Linear::my_rows`] of every token).
    None,
}

/// A batch of activation rows in f32, and — computed on first use after each
/// [`ActivationBatch::load`] — quantized to 8-bit blocks (for block weights) or per token and group
/// (for W4 weights). Allocated once for up to `max_tokens × max_cols`.
#[derive(Debug)]
pub struct ActivationBatch {
    /// f32 rows, each `pad_cols(cols)` long with zero padding.
    f32: Vec<f32>,
    qs: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    q8_ready: bool,
    codes: Vec<i8>,
    token_scales: Vec<f32>,
    group_sums: Vec<i32>,
    /// The (bits, clip bits, grouping) `codes` hold, if current.
    w4_ready: Option<(ActBits, u32, GroupSize)>,
    /// One packed weight panel for the prefill panel kernel, grown on first use (empty
    /// until then: decode and CPUs without the kernel never allocate it).
    panel: Vec<PanelLine>,
    tokens: usize,
    cols: usize,
}

impl ActivationBatch {
    /// Storage for up to `max_tokens` rows of up to `max_cols` values.
    pub fn new(max_tokens: usize, max_cols: usize) -> Self {
        let padded = pad_cols(max_cols);
        let blocks = max_tokens * max_cols.div_ceil(BLOCK_LEN);
        ActivationBatch {
            f32: vec![0.0; max_tokens * padded],
            qs: vec![0; max_tokens * max_cols],
            scales: vec![0.0; blocks],
            sums: vec![0; blocks],
            q8_ready: false,
            codes: vec![0; max_tokens * padded],
            // The finest grouping (32) needs the most scales and sums.
            token_scales: vec![0.0; max_tokens * max_cols.div_ceil(32)],
            group_sums: vec![0; blocks],
            w4_ready: None,
            panel: Vec::new(),
            tokens: 0,
            cols: 0,
        }
    }

    /// Loads `x` (`tokens × cols`, row-major); quantized forms are recomputed on demand.
    pub fn load(&mut self, x: &[f32], tokens: usize, cols: usize) {
        let padded = pad_cols(cols);
        self.tokens = tokens;
        self.cols = cols;
        for t in 0..tokens {
            let row = &mut self.f32[t * padded..(t + 1) * padded];
            row[..cols].copy_from_slice(&x[t * cols..(t + 1) * cols]);
            row[cols..].fill(0.0);
        }
        self.q8_ready = false;
        self.w4_ready = None;
    }

    /// Number of rows loaded.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Quantizes every row to 8-bit blocks of 32 (`cols` must be a multiple of 32).
    pub(crate) fn ensure_q8(&mut self) {
        if self.q8_ready {
            return;
        }
        let (cols, padded) = (self.cols, pad_cols(self.cols));
        for t in 0..self.tokens {
            let (b0, b1) = (t * cols / BLOCK_LEN, (t + 1) * cols / BLOCK_LEN);
            quantize_row_q8(
                &self.f32[t * padded..t * padded + cols],
                Q8RowMut {
                    qs: &mut self.qs[t * cols..(t + 1) * cols],
                    scales: &mut self.scales[b0..b1],
                    sums: &mut self.sums[b0..b1],
                },
            );
        }
        self.q8_ready = true;
    }

    /// Row `t`, quantized to 8-bit blocks (after [`ActivationBatch::ensure_q8`]).
    #[inline]
    pub(crate) fn q8_row(&self, t: usize) -> Q8Row<'_> {
        let (b0, b1) = (t * self.cols / BLOCK_LEN, (t + 1) * self.cols / BLOCK_LEN);
        Q8Row {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            scales: &self.scales[b0..b1],
            sums: &self.sums[b0..b1],
        }
    }

    /// The whole batch quantized to 8-bit blocks (after [`ActivationBatch::ensure_q8`]),
    /// and a panel buffer of at least `lines` lines.
    pub(crate) fn q8_batch_and_panel(&mut self, lines: usize) -> (Q8Batch<'_>, &mut [PanelLine]) {
        if self.panel.len() < lines {
            self.panel.resize(lines, PanelLine::ZERO);
        }
        let blocks = self.tokens * self.cols / BLOCK_LEN;
        let batch = Q8Batch {
            qs: &self.qs[..self.tokens * self.cols],
            scales: &self.scales[..blocks],
            sums: &self.sums[..blocks],
            tokens: self.tokens,
        };
        (batch, &mut self.panel[..lines])
    }

    /// The batch quantized per token and weight group to `bits` with clip ratio `clip`, with code sums per
    /// `group` (computed once per load and reused by every W4 matrix of that form).
    pub fn w4_batch(&mut self, bits: ActBits, clip: f32, group: GroupSize) -> TokenBatch<'_> {
        let (cols, padded, groups) = (self.cols, pad_cols(self.cols), group.groups(self.cols));
        let form = (bits, clip.to_bits(), group);
        if self.w4_ready != Some(form) {
            for t in 0..self.tokens {
                quantize_token(
                    &self.f32[t * padded..t * padded + cols],
                    bits,
                    clip,
                    group,
                    &mut self.codes[t * padded..(t + 1) * padded],
                    &mut self.group_sums[t * groups..(t + 1) * groups],
                    &mut self.token_scales[t * groups..(t + 1) * groups],
                );
            }
            self.w4_ready = Some(form);
        }
        TokenBatch {
            tokens: self.tokens,
            cols,
            group,
            codes: &self.codes[..self.tokens * padded],
            scales: &self.token_scales[..self.tokens * groups],
            sums: &self.group_sums[..self.tokens * groups],
        }
    }

    /// The activations exactly as the native kernels multiply them with `w`, back in f32,
    /// into `out` (`tokens × cols`, resized): for W4A4/W4A8 weights the per-token codes
    /// times their group scales, for block weights the 8-bit block codes times their block
    /// scales, otherwise the f32 rows. A backend that multiplies these with the exactly
    /// dequantized weights differs from native only in the order of its float sums.
    pub fn seen_by(&mut self, w: &Linear<'_>, out: &mut Vec<f32>) {
        let (tokens, cols, padded) = (self.tokens, self.cols, pad_cols(self.cols));
        out.clear();
        out.reserve(tokens * cols);
        match (w.storage, w.w4.as_ref()) {
            (WeightStorage::W4(Activations::Quantized { bits, clip }), Some(m)) => {
                let group = m.shape().group;
                let len = group.elements(cols);
                let groups = group.groups(cols);
                let batch = self.w4_batch(bits, clip, group);
                for t in 0..tokens {
                    let codes = &batch.codes[t * padded..t * padded + cols];
                    let scales = &batch.scales[t * groups..(t + 1) * groups];
                    out.extend(codes.iter().enumerate().map(|(c, &q)| q as f32 * scales[c / len]));
                }
            }
            (WeightStorage::Quantized(_), _) => {
                self.ensure_q8();
                for t in 0..tokens {
                    let row = self.q8_row(t);
                    out.extend(row.qs.iter().enumerate().map(|(c, &q)| q as f32 * row.scales[c / BLOCK_LEN]));
                }
            }
            _ => {
                for t in 0..tokens {
                    out.extend_from_slice(self.f32_row(t));
                }
            }
        }
    }

    /// Every row in f32, `tokens × pad_cols(cols)` with zero padding.
    #[inline]
    pub fn f32_padded(&self) -> &[f32] {
        &self.f32[..self.tokens * pad_cols(self.cols)]
    }

    /// Row `t`, in f32 (`cols` long).
    #[inline]
    pub fn f32_row(&self, t: usize) -> &[f32] {
        let padded = pad_cols(self.cols);
        &self.f32[t * padded..t * padded + self.cols]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::native::NativeBackend;
    use crate::gguf::{GgufFile, TensorType};
    use crate::gguf_writer::{GgufWriter, MetadataValue};
    use crate::parallel::Team;
    use petrel_quant::blocks::quantize_row;
    use petrel_quant::w4::W4Error;
    use petrel_quant::Kernels;

    fn compute(team: &Team, scalar: bool) -> (NativeBackend, &Team) {
        (NativeBackend::with_kernels(if scalar { Kernels::scalar() } else { Kernels::detect() }), team)
    }

    /// Runs `linear` on `x` with the team and returns the leader's complete result with
    /// the activation batch it used.
    fn run(
        linear: &Linear<'_>,
        compute: &(NativeBackend, &Team),
        x: &[f32],
        tokens: usize,
    ) -> (Vec<f32>, ActivationBatch) {
        let (native, team) = compute;
        team.run(|member| {
            let mut act = ActivationBatch::new(tokens, linear.cols);
            act.load(x, tokens, linear.cols);
            let mut out = vec![0f32; tokens * linear.rows];
            crate::backend::Backend::matmul(native, linear, &mut act, &mut out, member, Gather::All);
            (out, act)
        })
    }

    fn test_inputs(rows: usize, cols: usize, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 97.0).collect();
        let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 104_729 % 89) as f32 - 44.0) / 31.0).collect();
        (w, x)
    }

    /// Encodes `w` (`rows × cols`) as a tensor of type `ty` (float or block format).
    fn encode(w: &[f32], cols: usize, ty: TensorType) -> Vec<u8> {
        match ty {
            TensorType::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TensorType::F16 => w.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
            _ => {
                let Some(WeightStorage::Quantized(format)) = WeightStorage::of(ty) else { panic!("{ty:?}") };
                let row_bytes = format.row_bytes(cols).unwrap();
                let mut out = vec![0u8; w.len() / cols * row_bytes];
                for (chunk, row) in out.chunks_exact_mut(row_bytes).zip(w.chunks_exact(cols)) {
                    quantize_row(format, row, chunk);
                }
                out
            }
        }
    }

    /// Every block and float storage against a float matmul of the dequantized weights
    /// with the (quantized, for the integer path) activations.
    #[test]
    fn matmul_matches_float_reference_for_every_storage() {
        let (rows, tokens) = (13, 6);
        let team = Team::new(2);
        for ty in [
            TensorType::F32,
            TensorType::F16,
            TensorType::Q4_0,
            TensorType::Q4_1,
            TensorType::Q8_0,
            TensorType::Q5_0,
            TensorType::Q5_1,
            TensorType::Q4_K,
            TensorType::Q5_K,
            TensorType::Q6_K,
        ] {
            let k_quant = matches!(ty, TensorType::Q4_K | TensorType::Q5_K | TensorType::Q6_K);
            let cols = if k_quant { 512 } else { 96 };
            let (w, x) = test_inputs(rows, cols, tokens);
            let mut writer = GgufWriter::new();
            writer.tensor("w", &[cols as u64, rows as u64], ty, encode(&w, cols, ty));
            let bytes = writer.to_bytes();
            let file = GgufFile::parse(&bytes).unwrap();
            let linear = Linear::new(file.tensor("w").unwrap(), rows, cols).unwrap();
            assert_eq!(linear.storage_name(), ty.name());
            for scalar in [true, false] {
                let (out, mut act) = run(&linear, &compute(&team, scalar), &x, tokens);
                act.ensure_q8();
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
                        let scale: f32 = dequantized.iter().zip(&xs).map(|(a, b)| (a * b).abs()).sum();
                        let got = out[t * rows + r];
                        assert!(
                            (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()) + 1e-6 * scale,
                            "{ty:?} {r} {t}: {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    /// The formats of the Q4_K_M files Petrel runs (Q4_K, Q6_K, Q5_0 next to Q8_0 / F32):
    /// a matmul on the stored blocks equals the float product of the dequantized weights
    /// and activations, an embedding lookup dequantizes, a column count that is no
    /// multiple of 256 is a shape error, and a NaN or infinite scale is rejected at load,
    /// naming the tensor.
    #[test]
    fn k_quant_tensors_multiply_and_bad_scales_are_rejected_at_load() {
        let (rows, cols, tokens) = (5, 256, 3);
        let (w, x) = test_inputs(rows, cols, tokens);
        let types = [TensorType::Q4_K, TensorType::Q6_K, TensorType::Q5_0];
        let mut writer = GgufWriter::new();
        for ty in types {
            writer.tensor(ty.name(), &[cols as u64, rows as u64], ty, encode(&w, cols, ty));
        }
        let bytes = writer.to_bytes();
        let file = GgufFile::parse(&bytes).unwrap();
        let team = Team::new(1);
        let compute = compute(&team, false);
        for ty in types {
            let linear = Linear::new(file.tensor(ty.name()).unwrap(), rows, cols).unwrap();
            let (out, mut act) = run(&linear, &compute, &x, tokens);
            act.ensure_q8();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                linear.dequantize_row(r, &mut row);
                let error: f32 = row.iter().zip(&w[r * cols..]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                // About half a quantization step of the ±1.1 test weights, a whole one
                // where the symmetric formats clamp the far end (code 31 of -32..31), and
                // a little for the K-quants' rounded sub-block scales.
                let bound = match ty {
                    TensorType::Q4_K => 0.1,
                    TensorType::Q5_0 => 0.075,
                    _ => 0.04,
                };
                assert!(error < bound, "{ty:?} row {r}: dequantization error {error}");
                for t in 0..tokens {
                    let q = act.q8_row(t);
                    let expected: f64 =
                        (0..cols).map(|c| row[c] as f64 * (q.scales[c / 32] * q.qs[c] as f32) as f64).sum();
                    let got = out[t * rows + r] as f64;
                    assert!(
                        (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                        "{ty:?} {r} {t}: {got} vs {expected}"
                    );
                }
            }
        }
        // 128 columns: two Q5_0 blocks per row, but half a K-quant super-block.
        let mut writer = GgufWriter::new();
        writer.tensor("short", &[128, 2], TensorType::Q4_K, vec![0; 144]);
        let bytes = writer.to_bytes();
        if let Ok(file) = GgufFile::parse(&bytes) {
            let err = Linear::new(file.tensor("short").unwrap(), 2, 128).unwrap_err();
            assert!(matches!(err, ModelError::BadTensorShape { .. }), "{err:?}");
        }
        // A NaN `d` in the second Q4_K super-block, an infinite `d` in a Q6_K block, a NaN
        // `dmin`, a NaN Q5_0 scale in block 3; the error names the block and its row.
        for (ty, at, bits, block) in [
            (TensorType::Q4_K, 144, 0x7E00u16, 1),
            (TensorType::Q6_K, 208, 0x7C00, 0),
            (TensorType::Q4_K, 2, 0xFE00, 0),
            (TensorType::Q5_0, 22 * 3, 0x7E01, 3),
        ] {
            let mut data = encode(&w, cols, ty);
            data[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            let mut writer = GgufWriter::new();
            writer.tensor("blk.0.ffn_down.weight", &[cols as u64, rows as u64], ty, data);
            let bytes = writer.to_bytes();
            let file = GgufFile::parse(&bytes).unwrap();
            let err = Linear::new(file.tensor("blk.0.ffn_down.weight").unwrap(), rows, cols).unwrap_err();
            let ModelError::BadTensorBlock { tensor, block: found, row, reason } = &err else {
                panic!("{ty:?}: {err:?}")
            };
            assert_eq!(tensor, "blk.0.ffn_down.weight");
            assert_eq!(
                (*found, *row),
                (block, block / (cols / if ty == TensorType::Q5_0 { 32 } else { 256 })),
                "{err}"
            );
            assert!(reason.starts_with("non-finite"), "{reason}");
            assert!(err.to_string().contains(&alloc::format!("in block {block}")), "{err}");
            assert!(err.to_string().contains("blk.0.ffn_down.weight"), "{err}");
        }
    }

    fn w4_file(
        w: &[f32],
        rows: usize,
        cols: usize,
        scheme: &str,
        group: GroupSize,
        corrupt: impl Fn(&mut Vec<u8>, &mut Vec<u8>),
    ) -> Vec<u8> {
        let shape = W4Shape { rows, cols, group };
        let groups = shape.groups();
        let len = shape.group_len();
        let mut scales = vec![0f32; rows * groups];
        let mut codes = vec![0i8; rows * cols];
        for r in 0..rows {
            for g in 0..groups {
                let range = r * cols + g * len..r * cols + ((g + 1) * len).min(cols);
                let amax = w[range.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = petrel_quant::w4::round_scale(amax / 7.0);
                scales[r * groups + g] = s;
                for i in range {
                    codes[i] = petrel_quant::w4::quantize_weight(w[i], s);
                }
            }
        }
        let (mut packed, mut scale_bytes) = (vec![0u8; shape.packed_bytes()], vec![0u8; shape.scale_count() * 2]);
        petrel_quant::w4::pack(&shape, &codes, &scales, &mut packed, &mut scale_bytes);
        corrupt(&mut packed, &mut scale_bytes);
        let mut writer = GgufWriter::new();
        writer
            .metadata(crate::scheme::KEY_SCHEME, MetadataValue::String(scheme.into()))
            .metadata(crate::scheme::KEY_GROUP_SIZE, MetadataValue::U32(group.as_len()))
            .metadata(crate::scheme::KEY_ACTIVATION_CLIP, MetadataValue::F32(0.9))
            .tensor("w", &[(shape.padded_cols() / 2) as u64, shape.padded_rows() as u64], TensorType::I8, packed)
            .tensor("w.scales", &[(PANEL_ROWS * groups) as u64, shape.panels() as u64], TensorType::F16, scale_bytes);
        writer.to_bytes()
    }

    /// W4A4, W4A8 and W4A16 through the runtime's matmul (two members, scalar and SIMD)
    /// against the dequantized weights times the activations each scheme feeds them.
    #[test]
    fn w4_matmul_matches_dequantized_reference() {
        let (rows, cols, tokens) = (48, 200, 5);
        let (w, x) = test_inputs(rows, cols, tokens);
        let team = Team::new(2);
        for (scheme, group) in [("w4a4", GroupSize::PerChannel), ("w4a8", GroupSize::G64), ("w4a16", GroupSize::G32)] {
            let bytes = w4_file(&w, rows, cols, scheme, group, |_, _| {});
            let file = GgufFile::parse(&bytes).unwrap();
            let scheme_meta = QuantScheme::from_gguf(&file).unwrap().unwrap();
            assert_eq!(scheme_meta.name(), scheme);
            let linear = Linear::load(&file, "w", rows, cols, Some(&scheme_meta)).unwrap();
            let mut reference_out = None;
            for scalar in [true, false] {
                let (out, mut act) = run(&linear, &compute(&team, scalar), &x, tokens);
                let xs: Vec<f32> = match scheme_meta.activations {
                    Activations::Quantized { bits, clip } => {
                        let b = act.w4_batch(bits, clip, group);
                        let (pc, groups, len) = (pad_cols(cols), group.groups(cols), group.elements(cols));
                        // Each activation dequantized with its (token, group) scale.
                        (0..tokens * cols)
                            .map(|i| {
                                let (t, c) = (i / cols, i % cols);
                                b.scales[t * groups + c / len] * b.codes[t * pc + c] as f32
                            })
                            .collect()
                    }
                    Activations::Float => x.clone(),
                };
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    linear.dequantize_row(r, &mut row);
                    for t in 0..tokens {
                        let expected: f32 = row.iter().zip(&xs[t * cols..(t + 1) * cols]).map(|(a, b)| a * b).sum();
                        let got = out[t * rows + r];
                        assert!(
                            (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                            "{scheme} {r} {t}: {got} vs {expected}"
                        );
                    }
                }
                // SIMD and scalar agree bit for bit.
                match &reference_out {
                    None => reference_out = Some(out),
                    Some(r) => assert!(r.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()), "{scheme}"),
                }
            }
        }
    }

    /// Files whose W4 tensors disagree with their scheme, shape or scales fail at load.
    #[test]
    fn malformed_w4_tensors_are_rejected_at_load() {
        let (rows, cols) = (32, 64);
        let (w, _) = test_inputs(rows, cols, 1);
        let load = |bytes: &[u8], rows: usize| -> Result<(), ModelError> {
            let file = GgufFile::parse(bytes).map_err(ModelError::Gguf)?;
            let scheme = QuantScheme::from_gguf(&file)?;
            Linear::load(&file, "w", rows, cols, scheme.as_ref()).map(|_| ())
        };
        let ok = w4_file(&w, rows, cols, "w4a4", GroupSize::G32, |_, _| {});
        assert_eq!(load(&ok, rows), Ok(()));
        // The matrix is declared with other rows than the metadata implies.
        assert!(matches!(load(&ok, 16), Err(ModelError::BadTensorShape { .. })));
        // A NaN scale.
        let nan = w4_file(&w, rows, cols, "w4a4", GroupSize::G32, |_, s| {
            s[10..12].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes())
        });
        assert!(matches!(
            load(&nan, rows),
            Err(ModelError::BadW4Tensor { reason: W4Error::BadScale { index: 5 }, .. })
        ));
        // Scales written for another group size than the metadata says.
        let mut wrong_group = w4_file(&w, rows, cols, "w4a4", GroupSize::PerChannel, |_, _| {});
        let file = GgufFile::parse(&wrong_group).unwrap();
        let scheme = QuantScheme { group: GroupSize::G32, ..QuantScheme::from_gguf(&file).unwrap().unwrap() };
        assert!(matches!(Linear::load(&file, "w", rows, cols, Some(&scheme)), Err(ModelError::BadTensorShape { .. })));
        // An unknown scheme name, a bad group size, a clip ratio out of range.
        for (key, value) in [
            (crate::scheme::KEY_SCHEME, MetadataValue::String("w3a3".into())),
            (crate::scheme::KEY_GROUP_SIZE, MetadataValue::U32(48)),
            (crate::scheme::KEY_ACTIVATION_CLIP, MetadataValue::F32(1.5)),
        ] {
            wrong_group = w4_file(&w, rows, cols, "w4a4", GroupSize::G32, |_, _| {});
            let file = GgufFile::parse(&wrong_group).unwrap();
            let mut writer = GgufWriter::new();
            for (k, v) in file.metadata() {
                if *k != key {
                    let value = match (v.as_str(), v.as_u64(), v.as_f32()) {
                        (Some(s), _, _) => MetadataValue::String(s.into()),
                        (_, Some(n), _) => MetadataValue::U32(n as u32),
                        (_, _, Some(f)) => MetadataValue::F32(f),
                        _ => unreachable!(),
                    };
                    writer.metadata(k, value);
                }
            }
            writer.metadata(key, value);
            let bytes = writer.to_bytes();
            let file = GgufFile::parse(&bytes).unwrap();
            assert!(matches!(QuantScheme::from_gguf(&file), Err(ModelError::BadMetadata { .. })), "{key}");
        }
        // A per-tensor activation override: 8 bits is honoured, 5 bits is an error.
        for (bits, expected) in [(8u32, true), (5, false)] {
            let base = w4_file(&w, rows, cols, "w4a4", GroupSize::G32, |_, _| {});
            let file = GgufFile::parse(&base).unwrap();
            let mut writer = GgufWriter::new();
            for (k, v) in file.metadata() {
                let value = match (v.as_str(), v.as_u64(), v.as_f32()) {
                    (Some(s), _, _) => MetadataValue::String(s.into()),
                    (_, Some(n), _) => MetadataValue::U32(n as u32),
                    (_, _, Some(f)) => MetadataValue::F32(f),
                    _ => unreachable!(),
                };
                writer.metadata(k, value);
            }
            writer.metadata("petrel.quant.activation_bits.w", MetadataValue::U32(bits));
            for t in file.tensors() {
                writer.tensor(t.name, t.shape(), t.ty, t.data.to_vec());
            }
            let bytes = writer.to_bytes();
            let file = GgufFile::parse(&bytes).unwrap();
            let scheme = QuantScheme::from_gguf(&file).unwrap().unwrap();
            let loaded = Linear::load(&file, "w", rows, cols, Some(&scheme));
            match expected {
                true => assert_eq!(
                    loaded.unwrap().storage,
                    WeightStorage::W4(Activations::Quantized { bits: ActBits::A8, clip: 1.0 })
                ),
                false => assert!(matches!(loaded, Err(ModelError::BadMetadata { .. }))),
            }
        }
        // W4 tensors without any scheme metadata.
        let mut writer = GgufWriter::new();
        writer.tensor("w", &[32, 32], TensorType::I8, vec![0x88; 1024]);
        let bytes = writer.to_bytes();
        assert!(matches!(load(&bytes, rows), Err(ModelError::BadMetadata { .. })));
    }

    #[test]
    fn unsupported_types_and_wrong_shapes_are_named_at_load() {
        let mut writer = GgufWriter::new();
        writer.tensor("k", &[256, 2], TensorType::Q2_K, vec![0; 2 * 84]).tensor(
            "f",
            &[32, 2],
            TensorType::F32,
            vec![0; 256],
        );
        let bytes = writer.to_bytes();
        let file = GgufFile::parse(&bytes).unwrap();
        let err = Linear::new(file.tensor("k").unwrap(), 2, 256).unwrap_err();
        assert_eq!(err, ModelError::UnsupportedTensorType { tensor: "k".into(), ty: "Q2_K" });
        assert!(matches!(Linear::new(file.tensor("f").unwrap(), 3, 32), Err(ModelError::BadTensorShape { .. })));
    }
}
