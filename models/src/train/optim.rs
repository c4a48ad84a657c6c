//! AdamW with decoupled weight decay and global gradient-norm clipping. The moments are
//! plain tensors owned here so that a checkpoint can store them and a resumed run
//! continue bit for bit (candle-nn's optimizer keeps its state private).

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::config::TrainSettings;
use super::model::Parameter;

/// AdamW state: first and second moments per parameter (same shapes), and the number of
/// updates done.
pub struct AdamW {
    /// First moments, in the parameters' order.
    pub m: Vec<Tensor>,
    /// Second moments, in the parameters' order.
    pub v: Vec<Tensor>,
    /// Updates applied so far (the bias-correction exponent of the next is `updates + 1`).
    pub updates: u64,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[Parameter]) -> Result<Self> {
        let zeros = |p: &Parameter| p.var.as_tensor().zeros_like();
        Ok(AdamW {
            m: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            updates: 0,
        })
    }

    /// Applies one update with learning rate `lr` to every parameter for which `trained`
    /// holds. Every trained parameter must have a gradient in `grads` (a missing one means
    /// the graph does not reach it, which is a bug, not something to skip silently).
    /// Returns the global gradient norm before clipping.
    pub fn step(
        &mut self,
        params: &[Parameter],
        grads: &GradStore,
        settings: &TrainSettings,
        lr: f64,
        trained: impl Fn(&Parameter) -> bool,
    ) -> Result<f64> {
        self.step_with(params, grads, settings, |p| trained(p).then_some(lr))
    }

    /// [`AdamW::step`] with a learning rate per parameter: `lr_of` gives it, or `None` for
    /// a parameter not trained. The gradient norm (and its clipping) is global over the
    /// trained parameters.
    pub fn step_with(
        &mut self,
        params: &[Parameter],
        grads: &GradStore,
        settings: &TrainSettings,
        lr_of: impl Fn(&Parameter) -> Option<f64>,
    ) -> Result<f64> {
        let mut selected = Vec::new();
        let mut square_sum = 0f64;
        for (i, p) in params.iter().enumerate() {
            let Some(lr) = lr_of(p) else {
                continue;
            };
            let Some(g) = grads.get(p.var.as_tensor()) else {
                bail!("parameter {} received no gradient", p.name);
            };
            square_sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            selected.push((i, lr, g.clone()));
        }
        let norm = square_sum.sqrt();
        if !norm.is_finite() {
            bail!("the gradient norm is {norm}: training diverged");
        }
        let scale = if settings.grad_clip > 0.0 && norm > settings.grad_clip { settings.grad_clip / norm } else { 1.0 };
        self.updates += 1;
        let t = self.updates as i32;
        let (b1, b2) = (settings.beta1, settings.beta2);
        let correction1 = 1.0 - b1.powi(t);
        let correction2 = 1.0 - b2.powi(t);
        for (i, lr, g) in selected {
            let g = (g * scale)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denominator = ((&v / correction2)?.sqrt()? + settings.eps)?;
            let update = ((&m / correction1)? / denominator)?;
            let p = &params[i];
            let decayed = if p.decay {
                (p.var.as_tensor() * (1.0 - lr * settings.weight_decay))?
            } else {
                p.var.as_tensor().clone()
            };
            p.var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }
}
