//! One optimization step at a time: batch, forward, loss (cross-entropy plus the weighted
//! kurtosis penalty), backward, AdamW. Everything a step depends on lives in [`Trainer`]
//! and in a checkpoint, so a resumed run takes exactly the steps the uninterrupted run
//! would have taken.

use anyhow::Result;

use super::config::TrainSettings;
use super::data::{training_batch, Batch};
use super::model::{cross_entropy, Decoder, ForwardOptions};
use super::optim::AdamW;

/// What one step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The step's index (0-based).
    pub step: usize,
    /// Total loss optimized.
    pub loss: f64,
    /// Cross-entropy part, nats per token.
    pub cross_entropy: f64,
    /// Mean kurtosis of the linear outputs (measured when the penalty is on).
    pub kurtosis: Option<f64>,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A training run in progress.
pub struct Trainer {
    /// The model being trained.
    pub decoder: Decoder,
    /// The optimizer's state.
    pub optimizer: AdamW,
    /// The run's settings.
    pub settings: TrainSettings,
    /// Steps completed.
    pub step: usize,
}

impl Trainer {
    /// A new run: the decoder initialized from the settings' seed; with QAT the clips are
    /// set from the first batch.
    pub fn new(decoder: Decoder, settings: TrainSettings, tokens: &[u32]) -> Result<Self> {
        if settings.qat {
            let first = training_batch(tokens, settings.seed, 0, settings.batch, decoder.shape.context)?;
            decoder.calibrate_clips(&first.inputs, 1.0)?;
        }
        let optimizer = AdamW::new(&decoder.params)?;
        Ok(Trainer { decoder, optimizer, settings, step: 0 })
    }

    fn options(&self) -> ForwardOptions {
        ForwardOptions { fake_quant: self.settings.qat, kurtosis: self.settings.kurtosis_weight > 0.0, clamp: false }
    }

    /// Takes the next step on `tokens` (the training stream).
    pub fn step(&mut self, tokens: &[u32]) -> Result<StepReport> {
        let s = &self.settings;
        let batch = training_batch(tokens, s.seed, self.step, s.batch, self.decoder.shape.context)?;
        let out = self.decoder.forward(&batch.inputs, self.options())?;
        let ce = cross_entropy(&out.logits, &batch.targets)?;
        let (loss, kurtosis) = match &out.kurtosis {
            Some(k) => ((&ce + (k * s.kurtosis_weight)?)?, Some(k.to_scalar::<f32>()? as f64)),
            None => (ce.clone(), None),
        };
        let grads = loss.backward()?;
        let lr = s.learning_rate(self.step);
        let qat = s.qat;
        let grad_norm =
            self.optimizer.step(&self.decoder.params, &grads, s, lr, |p| qat || !p.name.contains(".clip."))?;
        let report = StepReport {
            step: self.step,
            loss: loss.to_scalar::<f32>()? as f64,
            cross_entropy: ce.to_scalar::<f32>()? as f64,
            kurtosis,
            lr,
            grad_norm,
        };
        self.step += 1;
        Ok(report)
    }

    /// Mean cross-entropy (nats per token) over `batches`, in the training mode (fake
    /// quantization on for QAT runs), without gradients.
    pub fn evaluate(&self, batches: &[Batch]) -> Result<f64> {
        let options = ForwardOptions { fake_quant: self.settings.qat, ..ForwardOptions::default() };
        let mut sum = 0f64;
        for b in batches {
            let out = self.decoder.forward(&b.inputs, options)?;
            sum += cross_entropy(&out.logits.detach(), &b.targets)?.to_scalar::<f32>()? as f64;
        }
        Ok(sum / batches.len().max(1) as f64)
    }
}
