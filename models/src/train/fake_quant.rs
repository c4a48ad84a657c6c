//! Quantization-aware training of activations, after Nrusimha et al. (2024): each linear
//! layer's input passes through an asymmetric uniform 4-bit quantizer whose two clip values
//! `lo < hi` are learned, static and per tensor.
//!
//! Forward: `x̂ = lo + s · round((clamp(x, lo, hi) − lo) / s)` with `s = (hi − lo) / 15`.
//! Backward (straight-through): the gradient passes unchanged for `lo ≤ x ≤ hi`, is zero
//! outside, and the out-of-range gradient goes to the clip values (`∂x̂/∂lo = 1` where
//! `x < lo`, `∂x̂/∂hi = 1` where `x > hi`).

use candle_core::{Result, Tensor};

/// Quantization levels of a 4-bit quantizer.
pub const LEVELS: f64 = 15.0;

/// Fake-quantizes `x` with the clip pair `clip = [lo, hi]` (a 2-element tensor), composed
/// from candle operations: the definition. The trainer runs the fused equivalent
/// ([`super::fused::fake_quantize`]), which a test checks against this one.
pub fn fake_quantize(x: &Tensor, clip: &Tensor) -> Result<Tensor> {
    let lo = clip.narrow(0, 0, 1)?;
    let hi = clip.narrow(0, 1, 1)?;
    // Through min/max the gradient reaches x in range and lo/hi out of range.
    let clamped = x.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?;
    let (lo_d, hi_d) = (lo.detach(), hi.detach());
    let step = ((&hi_d - &lo_d)? / LEVELS)?;
    let codes = clamped.detach().broadcast_sub(&lo_d)?.broadcast_div(&step)?.round()?;
    let quantized = codes.broadcast_mul(&step)?.broadcast_add(&lo_d)?;
    // x̂ equals `quantized` in value and `clamped` in gradient.
    let residual = (quantized - clamped.detach())?;
    clamped + residual
}

/// Initial clips for an activation: its observed minimum and maximum (widened to at
/// least ±1e-3 so that the step is never zero).
pub fn initial_clip(x: &Tensor) -> Result<[f32; 2]> {
    let lo = x.min_all()?.to_scalar::<f32>()?.min(-1e-3);
    let hi = x.max_all()?.to_scalar::<f32>()?.max(1e-3);
    Ok([lo, hi])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_rounds_to_sixteen_levels_and_clamps() -> Result<()> {
        let x = Tensor::new(&[-3.0f32, -1.0, -0.2, 0.0, 0.33, 1.0, 5.0], &Device::Cpu)?;
        let clip = Tensor::new(&[-1.0f32, 2.0], &Device::Cpu)?;
        let y: Vec<f32> = fake_quantize(&x, &clip)?.to_vec1()?;
        let s = 3.0f32 / 15.0;
        let expect: Vec<f32> = [-3.0f32, -1.0, -0.2, 0.0, 0.33, 1.0, 5.0]
            .iter()
            .map(|&v| {
                let c = v.clamp(-1.0, 2.0);
                -1.0 + s * ((c + 1.0) / s).round()
            })
            .collect();
        for (a, b) in y.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {expect:?}");
        }
        Ok(())
    }

    #[test]
    fn gradient_is_straight_through_in_range_and_goes_to_clips_outside() -> Result<()> {
        let x = Var::new(&[-3.0f32, -0.5, 0.4, 1.9, 7.0], &Device::Cpu)?;
        let clip = Var::new(&[-1.0f32, 2.0], &Device::Cpu)?;
        let weights = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0, 5.0], &Device::Cpu)?;
        let loss = (fake_quantize(x.as_tensor(), clip.as_tensor())? * weights)?.sum_all()?;
        let grads = loss.backward()?;
        let gx: Vec<f32> = grads.get(&x).expect("x has a gradient").to_vec1()?;
        assert_eq!(gx, vec![0.0, 2.0, 3.0, 4.0, 0.0]);
        let gc: Vec<f32> = grads.get(&clip).expect("clip has a gradient").to_vec1()?;
        assert_eq!(gc, vec![1.0, 5.0]);
        Ok(())
    }
}
