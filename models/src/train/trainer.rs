//! One optimization step at a time: batch, forward, loss (cross-entropy plus the weighted
//! kurtosis penalty and, for routed models, the weighted routing loss), backward, AdamW. Everything a step depends on lives in [`Trainer`]
//! and in a checkpoint, so a resumed run takes exactly the steps the uninterrupted run
//! would have taken.

use anyhow::Result;

use super::config::TrainSettings;
use super::data::{training_batch, Batch};
use super::model::{cross_entropy, Decoder, ForwardOptions, LayerRouting};
use super::optim::AdamW;

/// What one step measured.
#[derive(Clone, Debug, PartialEq)]
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
    /// The routing auxiliary loss, unweighted (routed models only).
    pub mod_aux: Option<f64>,
    /// Per routed block, how its causal decisions agreed with top-k (empty when dense).
    pub routing: Vec<LayerRouting>,
}

/// A held-out evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy, nats per token.
    pub loss: f64,
    /// Mean routing auxiliary loss (routed models only).
    pub mod_aux: Option<f64>,
    /// Per routed block, the decision agreements averaged over the batches.
    pub routing: Vec<LayerRouting>,
}

/// Mean router and predictor agreement over routed blocks: `(router, predictor)`.
pub fn mean_agreement(layers: &[LayerRouting]) -> Option<(f64, Option<f64>)> {
    if layers.is_empty() {
        return None;
    }
    let n = layers.len() as f64;
    let router = layers.iter().map(|l| l.router_agreement).sum::<f64>() / n;
    let predictor: Option<Vec<f64>> = layers.iter().map(|l| l.predictor_agreement).collect();
    Some((router, predictor.map(|p| p.iter().sum::<f64>() / n)))
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
        ForwardOptions {
            fake_quant: self.settings.qat,
            kurtosis: self.settings.kurtosis_weight > 0.0,
            clamp: false,
            mod_causal: self.settings.mod_causal,
            causal_routing: None,
        }
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
        let (loss, mod_aux, routing) = match out.routing {
            Some(r) => {
                let aux = r.aux_loss.to_scalar::<f32>()? as f64;
                ((loss + (r.aux_loss * s.mod_aux_weight)?)?, Some(aux), r.layers)
            }
            None => (loss, None, Vec::new()),
        };
        let grads = loss.backward()?;
        let lr = s.learning_rate(self.step);
        let qat = s.qat;
        let grad_norm =
            self.optimizer.step(&self.decoder.params, &grads, s, lr, |p| qat || !p.name.contains(".clip."))?;
        if qat {
            self.decoder.project_clips()?;
        }
        let report = StepReport {
            step: self.step,
            loss: loss.to_scalar::<f32>()? as f64,
            cross_entropy: ce.to_scalar::<f32>()? as f64,
            kurtosis,
            lr,
            grad_norm,
            mod_aux,
            routing,
        };
        self.step += 1;
        Ok(report)
    }

    /// Mean cross-entropy (nats per token) over `batches`, in the training mode (fake
    /// quantization on for QAT runs, top-k routing), without gradients; for routed models
    /// also the routing loss and the causal decisions' agreement with top-k.
    pub fn evaluate(&self, batches: &[Batch]) -> Result<Evaluation> {
        let options = ForwardOptions {
            fake_quant: self.settings.qat,
            mod_causal: self.settings.mod_causal,
            ..Default::default()
        };
        let mut sum = 0f64;
        let mut aux_sum = 0f64;
        let mut routing: Vec<LayerRouting> = Vec::new();
        for b in batches {
            let out = self.decoder.forward(&b.inputs, options)?;
            sum += cross_entropy(&out.logits.detach(), &b.targets)?.to_scalar::<f32>()? as f64;
            if let Some(r) = out.routing {
                aux_sum += r.aux_loss.to_scalar::<f32>()? as f64;
                if routing.is_empty() {
                    routing = r.layers;
                } else {
                    for (total, l) in routing.iter_mut().zip(&r.layers) {
                        total.router_agreement += l.router_agreement;
                        if let (Some(t), Some(p)) = (total.predictor_agreement.as_mut(), l.predictor_agreement) {
                            *t += p;
                        }
                    }
                }
            }
        }
        let n = batches.len().max(1) as f64;
        for l in &mut routing {
            l.router_agreement /= n;
            if let Some(p) = l.predictor_agreement.as_mut() {
                *p /= n;
            }
        }
        let mod_aux = (!routing.is_empty()).then_some(aux_sum / n);
        Ok(Evaluation { loss: sum / n, mod_aux, routing })
    }
}
