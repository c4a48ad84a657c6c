//! f32 master weights of a Llama model, and QuaRot's rotations applied to them.
//!
//! All matrices are row-major `rows × cols` with `y = W · x` (a row per output feature),
//! as GGUF stores them (Q and K rows permuted for ggml's RoPE; rotations never touch
//! that order).

use anyhow::{bail, Result};
use petrel_quant::hadamard::Hadamard;
use petrel_quant::rng::SplitMix64;
use petrel_runtime::kv_predict::AffineMap;
use petrel_runtime::linear::Linear;
use petrel_runtime::model::LayerWeights;
use petrel_runtime::{Model, ModelConfig};
use rayon::prelude::*;

/// A dense f32 matrix, row-major.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// `rows × cols` values.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Dequantizes a stored matrix.
    pub fn from_linear(linear: &Linear<'_>) -> Self {
        let (rows, cols) = (linear.rows, linear.cols);
        let mut data = vec![0f32; rows * cols];
        data.par_chunks_mut(cols).enumerate().for_each(|(r, row)| linear.dequantize_row(r, row));
        Matrix { rows, cols, data }
    }

    /// Applies `f` to every row.
    fn map_rows(&mut self, f: impl Fn(&mut [f32]) + Sync + Send) {
        self.data.par_chunks_mut(self.cols).for_each(f);
    }

    /// Applies `f` to every column (as a contiguous vector).
    fn map_columns(&mut self, f: impl Fn(&mut [f32]) + Sync + Send) {
        let mut t = self.transposed();
        t.map_rows(f);
        *self = t.transposed();
    }

    fn transposed(&self) -> Matrix {
        let mut data = vec![0f32; self.data.len()];
        data.par_chunks_mut(self.rows).enumerate().for_each(|(c, out)| {
            for (r, o) in out.iter_mut().enumerate() {
                *o = self.data[r * self.cols + c];
            }
        });
        Matrix { rows: self.cols, cols: self.rows, data }
    }

    /// Multiplies column `c` by `gain[c]`: folds an RMSNorm gain into the layer after it.
    fn fold_gain(&mut self, gain: &[f32]) {
        self.map_rows(|row| row.iter_mut().zip(gain).for_each(|(w, g)| *w *= g));
    }
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct MasterLayer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

impl MasterLayer {
    /// Dequantizes a loaded block.
    pub fn from_weights(l: &LayerWeights<'_>) -> Self {
        MasterLayer {
            attn_norm: l.attn_norm.clone(),
            wq: Matrix::from_linear(&l.wq),
            wk: Matrix::from_linear(&l.wk),
            wv: Matrix::from_linear(&l.wv),
            wo: Matrix::from_linear(&l.wo),
            ffn_norm: l.ffn_norm.clone(),
            w_gate: Matrix::from_linear(&l.w_gate),
            w_up: Matrix::from_linear(&l.w_up),
            w_down: Matrix::from_linear(&l.w_down),
        }
    }

    /// The block's linears with their GGUF names' suffixes.
    pub fn linears(&self) -> [(&'static str, &Matrix); 7] {
        [
            ("attn_q", &self.wq),
            ("attn_k", &self.wk),
            ("attn_v", &self.wv),
            ("attn_output", &self.wo),
            ("ffn_gate", &self.w_gate),
            ("ffn_up", &self.w_up),
            ("ffn_down", &self.w_down),
        ]
    }
}

/// A KV predictor's weights (`petrel_runtime::kv_predict`) in f32.
#[derive(Clone, Debug)]
pub struct MasterKvp {
    /// The auxiliary model's own blocks; empty when it reuses base blocks.
    pub aux_layers: Vec<MasterLayer>,
    /// Per base layer, the pre-RoPE key map (`kv_dim × kv_dim`) and its bias.
    pub keys: Vec<(Matrix, Vec<f32>)>,
    /// Per base layer, the value map and its bias.
    pub values: Vec<(Matrix, Vec<f32>)>,
}

/// The whole model in f32.
#[derive(Clone, Debug)]
pub struct MasterWeights {
    /// The KV predictor, for files that have one.
    pub kvp: Option<MasterKvp>,
    pub config: ModelConfig,
    /// Token embeddings, `vocab × dim`.
    pub embedding: Matrix,
    /// Output head, `vocab × dim`; `None` when tied to the embeddings.
    pub head: Option<Matrix>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<MasterLayer>,
}

impl MasterWeights {
    /// Dequantizes every weight of `model`.
    pub fn from_model(model: &Model<'_>) -> Self {
        let embedding = Matrix::from_linear(&model.token_embedding);
        let tied = model.output.same_data(&model.token_embedding);
        let head = if tied { None } else { Some(Matrix::from_linear(&model.output)) };
        let layers = model.layers.iter().map(MasterLayer::from_weights).collect();
        let kvp = model.kv_predictor.as_deref().map(|p| {
            let maps = |maps: &[AffineMap<'_>]| {
                maps.iter().map(|m| (Matrix::from_linear(&m.weight), m.bias.clone())).collect()
            };
            MasterKvp {
                aux_layers: if p.own_blocks {
                    p.aux.layers.iter().map(MasterLayer::from_weights).collect()
                } else {
                    Vec::new()
                },
                keys: maps(&p.keys),
                values: maps(&p.values),
            }
        });
        MasterWeights {
            config: model.config.clone(),
            embedding,
            head,
            output_norm: model.output_norm.clone(),
            layers,
            kvp,
        }
    }

    /// QuaRot (Ashkboos et al., 2024), every rotation fused offline except one:
    /// 1. RMSNorm gains fold into the linears that read the normalized stream (the norms
    ///    become plain RMS normalizations, gain 1) and the head unties from the embeddings;
    /// 2. the residual stream is rotated by `R = D·H` (`D` a seeded random ±1 diagonal,
    ///    `H` the orthonormal Hadamard matrix of size `dim`): embeddings and readers become
    ///    `W·R`, writers `Rᵀ·W` — RMS normalization commutes with `R`, so the function is
    ///    unchanged while outlier channels are spread over all channels;
    /// 3. values and attention outputs are rotated per head by the Hadamard matrix of size
    ///    `head_dim` (`W_v` rows, `W_o` columns);
    /// 4. `ffn_down`'s weights become `W·H_ffnᵀ`; the runtime applies `H_ffn` to its input
    ///    online (`petrel.rotation = quarot`), so the product with the SwiGLU output — the
    ///    activation with the worst outliers — is computed in the rotated basis.
    pub fn rotate(&mut self, seed: u64) -> Result<()> {
        let c = self.config.clone();
        let Some(h_dim) = Hadamard::new(c.dim) else {
            bail!("no Hadamard matrix is known for the model width {}", c.dim)
        };
        let Some(h_head) = Hadamard::new(c.head_dim) else { bail!("no Hadamard matrix for head size {}", c.head_dim) };
        let Some(h_ffn) = Hadamard::new(c.ffn_dim) else { bail!("no Hadamard matrix for the FFN width {}", c.ffn_dim) };
        let signs = random_signs(c.dim, seed);
        // v ↦ Rᵀ·v = Hᵀ·(D∘v); a row w of a reader becomes w·R = (Rᵀ·wᵀ)ᵀ, the same map.
        let rotate = |v: &mut [f32]| {
            v.iter_mut().zip(&signs).for_each(|(x, s)| *x *= s);
            h_dim.apply_transpose(v);
        };

        let mut head = self.head.take().unwrap_or_else(|| self.embedding.clone());
        head.fold_gain(&self.output_norm);
        self.output_norm.fill(1.0);
        head.map_rows(rotate);
        self.head = Some(head);
        self.embedding.map_rows(rotate);

        let per_head = |v: &mut [f32]| v.chunks_exact_mut(c.head_dim).for_each(|h| h_head.apply(h));
        let aux_layers = self.kvp.as_mut().map_or(&mut [][..], |k| &mut k.aux_layers[..]);
        for l in self.layers.iter_mut().chain(aux_layers) {
            for w in [&mut l.wq, &mut l.wk, &mut l.wv] {
                w.fold_gain(&l.attn_norm);
            }
            for w in [&mut l.w_gate, &mut l.w_up] {
                w.fold_gain(&l.ffn_norm);
            }
            l.attn_norm.fill(1.0);
            l.ffn_norm.fill(1.0);
            for w in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.w_gate, &mut l.w_up] {
                w.map_rows(rotate);
            }
            for w in [&mut l.wo, &mut l.w_down] {
                w.map_columns(rotate);
            }
            // v' = (I ⊗ H_head)·v per KV head; W_o' = W_o·(I ⊗ H_headᵀ), row-wise H_head per head.
            l.wv.map_columns(per_head);
            l.wo.map_rows(per_head);
            l.w_down.map_rows(|row| h_ffn.apply(row));
        }
        // A KV predictor's maps: keys are untouched (W_k only gained a rotated input);
        // values became P·v with P = I ⊗ H_head on both sides of a value map, so
        // W' = P·W·Pᵀ and b' = P·b.
        // (W·Pᵀ's rows are P applied to W's rows, as for W_o above.)
        if let Some(kvp) = &mut self.kvp {
            for (w, b) in &mut kvp.values {
                w.map_columns(per_head);
                w.map_rows(per_head);
                per_head(b);
            }
        }
        Ok(())
    }
}

/// `n` values ±1 from a seeded SplitMix64.
fn random_signs(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| if rng.next() & 1 == 0 { 1.0 } else { -1.0 }).collect()
}
