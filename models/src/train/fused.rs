//! Fused CPU operations with their own backward passes, for the elementwise work that
//! dominated a training step: the causal softmax of the attention scores, the
//! cross-entropy over the vocabulary, the per-token kurtosis of every linear output and the
//! 4-bit fake quantizer of every linear input. Composed from candle's elementwise
//! operations each takes about ten passes over memory forward and more backward; fused they
//! take one or two. Tests compare values and gradients with the composed forms.
//!
//! Both read contiguous f32 tensors on candle's CPU device.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: expected f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor");
    };
    Ok(&data[start..end])
}

/// `softmax(scale · x)` over the last dimension of scores `[…, T, T]`, with row `i` of
/// each `T × T` block seeing only columns `0..=i` (the others come out 0): causal
/// self-attention over a sequence that starts at position 0.
pub fn causal_softmax(scores: &Tensor, scale: f32) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let t = dims.last().copied().unwrap_or(0);
        if dims.len() < 2 || dims[dims.len() - 2] != t || t == 0 {
            candle_core::bail!("causal-softmax: expected […, T, T] scores, got {dims:?}");
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(row, (o, x))| {
            let visible = row % t + 1;
            let max = x[..visible].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (o, &v) in o[..visible].iter_mut().zip(&x[..visible]) {
                *o = ((v - max) * self.scale).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o[..visible].iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // ∂x_j = scale · p_j · (g_j − Σ_k g_k p_k), row by row.
        Ok(Some(probs.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?))
    }
}

struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(n).zip(p.par_chunks(n).zip(g.par_chunks(n))).for_each(|(o, (p, g))| {
            let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                *o = self.scale * p * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean cross-entropy (nats) of `logits` (`[rows, vocab]`) against `targets` (`[rows]`
/// u32): `mean(log Σ_j e^{x_j} − x_target)`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    let targets_f32 = targets.to_dtype(candle_core::DType::F32)?;
    let per_row = logits.contiguous()?.apply_op2(&targets_f32, CrossEntropy)?;
    per_row.sum_all()? / rows as f64
}

struct CrossEntropy;

fn row_target(t: f32, vocab: usize) -> Result<usize> {
    let i = t as usize;
    if t < 0.0 || i >= vocab {
        candle_core::bail!("cross-entropy: target {t} outside the vocabulary of {vocab}");
    }
    Ok(i)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let targets = f32_slice(s2, l2, self.name())?;
        let vocab = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        if targets.len() * vocab != x.len() {
            candle_core::bail!("cross-entropy: {} targets for {} logits of width {vocab}", targets.len(), x.len());
        }
        let losses = x
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let target = row_target(t, vocab)?;
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                Ok(sum.ln() + max - row[target])
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok((CpuStorage::F32(losses), Shape::from(targets.len())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // ∂x_j = g_row · (softmax(x)_j − [j = target]).
        let dlogits = logits.apply_op2_no_bwd(targets, &CrossEntropyBackward)?;
        Ok((Some(dlogits.broadcast_mul(&grad.unsqueeze(1)?)?), None))
    }
}

struct CrossEntropyBackward;

impl CustomOp2 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let targets = f32_slice(s2, l2, self.name())?;
        let vocab = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(vocab).zip(x.par_chunks(vocab).zip(targets.par_iter())).try_for_each(|(o, (row, &t))| {
            let target = row_target(t, vocab)?;
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
            o[target] -= 1.0;
            Ok::<(), candle_core::Error>(())
        })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean over rows of the kurtosis of each row of `x` (`[…, n]`):
/// `E[(x−μ)⁴] / (E[(x−μ)²]² + 1e-12)`, a scalar.
pub fn mean_kurtosis(x: &Tensor) -> Result<Tensor> {
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
    x.contiguous()?.apply_op1(RowKurtosis)?.sum_all()? / rows.max(1) as f64
}

/// Added to `m2²` so that a constant row has kurtosis 0, not NaN.
const KURTOSIS_EPS: f32 = 1e-12;

/// Per-row central moments `(c = x − μ, m2, m4)`, accumulated in f64.
fn moments(row: &[f32]) -> (f32, f32, f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut m2, mut m4) = (0f64, 0f64);
    for &v in row {
        let c = v as f64 - mean;
        let c2 = c * c;
        m2 += c2;
        m4 += c2 * c2;
    }
    (mean as f32, (m2 / n) as f32, (m4 / n) as f32)
}

struct RowKurtosis;

impl CustomOp1 for RowKurtosis {
    fn name(&self) -> &'static str {
        "row-kurtosis"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let k: Vec<f32> = x
            .par_chunks(n)
            .map(|row| {
                let (_, m2, m4) = moments(row);
                m4 / (m2 * m2 + KURTOSIS_EPS)
            })
            .collect();
        Ok((CpuStorage::F32(k), Shape::from(x.len() / n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &RowKurtosisBackward)?))
    }
}

struct RowKurtosisBackward;

impl CustomOp2 for RowKurtosisBackward {
    fn name(&self) -> &'static str {
        "row-kurtosis-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        // k = m4 / d with d = m2² + ε; since Σc = 0: ∂m2/∂x_j = 2c_j/n and
        // ∂m4/∂x_j = 4(c_j³ − mean(c³))/n, so
        // ∂k/∂x_j = [4(c_j³ − mean(c³)) / d − m4 · 2m2 · 2c_j / d²] / n.
        out.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_iter())).for_each(|(o, (row, &g))| {
            let (mean, m2, m4) = moments(row);
            let d = m2 * m2 + KURTOSIS_EPS;
            let mean_c3 = row.iter().map(|&v| (v - mean).powi(3)).sum::<f32>() / n as f32;
            let scale = g / n as f32;
            for (o, &v) in o.iter_mut().zip(row) {
                let c = v - mean;
                *o = scale * (4.0 * (c * c * c - mean_c3) / d - 4.0 * m4 * m2 * c / (d * d));
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The 4-bit fake quantizer of [`super::fake_quant`] in one pass: `x` any shape, `clip` =
/// `[lo, hi]`. Gradient: straight through for `lo ≤ x ≤ hi`, summed into `lo` for
/// `x < lo` and into `hi` for `x > hi`.
pub fn fake_quantize(x: &Tensor, clip: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&clip.contiguous()?, FakeQuantize)
}

struct FakeQuantize;

fn clip_pair(s: &CpuStorage, l: &Layout) -> Result<(f32, f32)> {
    match f32_slice(s, l, "fake-quantize clip")? {
        &[lo, hi] if lo < hi => Ok((lo, hi)),
        other => candle_core::bail!("fake-quantize: clip must be [lo, hi] with lo < hi, got {other:?}"),
    }
}

impl CustomOp2 for FakeQuantize {
    fn name(&self) -> &'static str {
        "fake-quantize"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (lo, hi) = clip_pair(s2, l2)?;
        let step = (hi - lo) / super::fake_quant::LEVELS as f32;
        let out: Vec<f32> = x.par_iter().map(|&v| lo + step * ((v.clamp(lo, hi) - lo) / step).round()).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, clip: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op2_no_bwd(&clip.contiguous()?, &FakeQuantizeInputGrad(grad.contiguous()?))?;
        let dclip = x.apply_op2_no_bwd(&clip.contiguous()?, &FakeQuantizeClipGrad(grad.contiguous()?))?;
        Ok((Some(dx), Some(dclip)))
    }
}

/// `∂x`: the incoming gradient where `lo ≤ x ≤ hi`, 0 elsewhere.
struct FakeQuantizeInputGrad(Tensor);

fn grad_slice(t: &Tensor) -> Result<std::sync::Arc<Vec<f32>>> {
    // The incoming gradient is small next to the tensors these passes read; copying it
    // keeps the storage borrow short.
    Ok(std::sync::Arc::new(t.flatten_all()?.to_vec1::<f32>()?))
}

impl CustomOp2 for FakeQuantizeInputGrad {
    fn name(&self) -> &'static str {
        "fake-quantize-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (lo, hi) = clip_pair(s2, l2)?;
        let g = grad_slice(&self.0)?;
        if g.len() != x.len() {
            candle_core::bail!("fake-quantize: gradient of {} values for {} inputs", g.len(), x.len());
        }
        let out: Vec<f32> =
            x.par_iter().zip(g.par_iter()).map(|(&v, &g)| if v >= lo && v <= hi { g } else { 0.0 }).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `∂[lo, hi]`: the sums of the incoming gradient where `x < lo` and where `x > hi`.
struct FakeQuantizeClipGrad(Tensor);

impl CustomOp2 for FakeQuantizeClipGrad {
    fn name(&self) -> &'static str {
        "fake-quantize-clip-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (lo, hi) = clip_pair(s2, l2)?;
        let g = grad_slice(&self.0)?;
        let (below, above) = x.iter().zip(g.iter()).fold((0f64, 0f64), |(b, a), (&v, &g)| {
            (b + if v < lo { g as f64 } else { 0.0 }, a + if v > hi { g as f64 } else { 0.0 })
        });
        Ok((CpuStorage::F32(vec![below as f32, above as f32]), Shape::from(2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use petrel_quant::rng::SplitMix64;

    fn random(shape: &[usize], seed: u64, spread: f64) -> Tensor {
        let mut rng = SplitMix64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * spread) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar()).expect("same shapes")
    }

    #[test]
    fn causal_softmax_matches_masked_softmax_in_value_and_gradient() -> Result<()> {
        let (b, h, t) = (2, 3, 7);
        let x = Var::from_tensor(&random(&[b, h, t, t], 1, 4.0))?;
        let weights = random(&[b, h, t, t], 2, 1.0);
        let scale = 0.37f32;

        let fused = causal_softmax(x.as_tensor(), scale)?;
        let fused_grad = (&fused * &weights)?.sum_all()?.backward()?;

        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
        let scaled = (x.as_tensor() * scale as f64)?.broadcast_add(&mask)?;
        let e = scaled.broadcast_sub(&scaled.max_keepdim(D::Minus1)?.detach())?.exp()?;
        let composed = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let composed_grad = (&composed * &weights)?.sum_all()?.backward()?;

        assert!(max_diff(&fused, &composed) < 1e-6);
        let (gf, gc) = (fused_grad.get(&x).expect("grad"), composed_grad.get(&x).expect("grad"));
        assert!(max_diff(gf, gc) < 1e-6, "{}", max_diff(gf, gc));
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_log_softmax_in_value_and_gradient() -> Result<()> {
        let (rows, vocab) = (9, 13);
        let x = Var::from_tensor(&random(&[rows, vocab], 3, 5.0))?;
        let targets = Tensor::from_vec((0..rows as u32).map(|r| (r * 7) % vocab as u32).collect(), rows, &Device::Cpu)?;
        let fused = cross_entropy(x.as_tensor(), &targets)?;
        let fused_grad = fused.backward()?;

        let log_z = x.as_tensor().exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = x.as_tensor().gather(&targets.unsqueeze(1)?, 1)?;
        let composed = (log_z - picked)?.mean_all()?;
        let composed_grad = composed.backward()?;

        assert!((fused.to_scalar::<f32>()? - composed.to_scalar::<f32>()?).abs() < 1e-5);
        let (gf, gc) = (fused_grad.get(&x).expect("grad"), composed_grad.get(&x).expect("grad"));
        assert!(max_diff(gf, gc) < 1e-6, "{}", max_diff(gf, gc));
        Ok(())
    }

    #[test]
    fn kurtosis_matches_the_composed_formula_in_value_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&random(&[3, 5, 24], 6, 2.0))?;
        // One outlier channel, as in real activations.
        let x =
            Var::from_tensor(&x.as_tensor().slice_assign(&[0..3, 0..5, 7..8], &(random(&[3, 5, 1], 7, 1.0) + 9.0)?)?)?;
        let fused = mean_kurtosis(x.as_tensor())?;
        let fused_grad = fused.backward()?;

        let c = x.as_tensor().broadcast_sub(&x.as_tensor().mean_keepdim(D::Minus1)?)?;
        let m2 = c.sqr()?.mean_keepdim(D::Minus1)?;
        let m4 = c.sqr()?.sqr()?.mean_keepdim(D::Minus1)?;
        let composed = (m4 / (m2.sqr()? + 1e-12)?)?.mean_all()?;
        let composed_grad = composed.backward()?;

        let (a, b) = (fused.to_scalar::<f32>()?, composed.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-4 * b, "{a} vs {b}");
        let (gf, gc) = (fused_grad.get(&x).expect("grad"), composed_grad.get(&x).expect("grad"));
        let scale = gc.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max_diff(gf, gc) < 1e-4 * scale, "{} vs scale {scale}", max_diff(gf, gc));
        Ok(())
    }

    #[test]
    fn fake_quantize_matches_the_composed_quantizer_in_value_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&random(&[4, 33], 8, 3.0))?;
        let clip = Var::new(&[-1.5f32, 2.0], &Device::Cpu)?;
        let weights = random(&[4, 33], 9, 1.0);
        let fused = fake_quantize(x.as_tensor(), clip.as_tensor())?;
        let fused_grad = (&fused * &weights)?.sum_all()?.backward()?;
        let composed = super::super::fake_quant::fake_quantize(x.as_tensor(), clip.as_tensor())?;
        let composed_grad = (&composed * &weights)?.sum_all()?.backward()?;
        assert!(max_diff(&fused, &composed) < 1e-6);
        for v in [&x, &clip] {
            let (gf, gc) = (fused_grad.get(v).expect("grad"), composed_grad.get(v).expect("grad"));
            assert!(max_diff(gf, gc) < 1e-5, "{}", max_diff(gf, gc));
        }
        Ok(())
    }

    #[test]
    fn cross_entropy_rejects_targets_outside_the_vocabulary() -> Result<()> {
        let x = random(&[2, 4], 5, 1.0);
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu)?;
        assert!(cross_entropy(&x, &targets).is_err());
        Ok(())
    }
}
