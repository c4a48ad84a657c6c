//! What a training run is: the model's shape and the optimization settings. Both are
//! stored in every checkpoint (as JSON) so that a resumed run can refuse a mismatch.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Shape of a Llama-style decoder trained here (tied embedding and head, SwiGLU MLP,
/// RMSNorm, interleaved-pair RoPE as the runtime applies it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Vocabulary size (rows of the embedding table).
    pub vocab: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads; `dim / heads` is the head width.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Hidden width of the SwiGLU MLP.
    pub ffn_dim: usize,
    /// Training sequence length and the exported context length, in tokens.
    pub context: usize,
    /// RoPE base frequency θ.
    pub rope_base: f32,
    /// RMSNorm ε.
    pub norm_eps: f32,
    /// Mixture-of-depths routing of some blocks; `None` (the default, and what checkpoints
    /// written before routing existed read as) is a dense model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingShape>,
}

/// Mixture-of-depths routing (Raposo et al., 2024) as `petrel_runtime::routing` defines
/// it: in each routed block only the top `⌈capacity · T⌉` tokens of a sequence by router
/// score go through attention and the MLP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingShape {
    /// Indices of the routed blocks, strictly increasing, each below `layers`.
    pub layers: Vec<usize>,
    /// Fraction of a sequence's tokens each routed block processes, in (0, 1].
    pub capacity: f32,
    /// Hidden width of each routed block's causal predictor MLP (0 = no predictor).
    pub predictor_hidden: usize,
}

impl RoutingShape {
    /// Tensors per routed block: router weight and bias, plus the predictor's four.
    pub fn tensors_per_layer(&self) -> usize {
        if self.predictor_hidden > 0 {
            6
        } else {
            2
        }
    }

    /// Parameters of one routed block's router (`dim + 1`) and predictor
    /// (`hidden · dim + 2 · hidden + 1`).
    pub fn parameters_per_layer(&self, dim: usize) -> usize {
        let h = self.predictor_hidden;
        let predictor = if h > 0 { h * dim + 2 * h + 1 } else { 0 };
        dim + 1 + predictor
    }
}

impl ModelShape {
    /// Petrel-tiny: about 1.2 M block parameters and a 1024-token vocabulary, so that its
    /// W4A4 file (Q8_0 embedding) stays under 1 MB.
    pub fn tiny() -> Self {
        ModelShape {
            vocab: 1024,
            dim: 128,
            layers: 6,
            heads: 4,
            kv_heads: 2,
            ffn_dim: 384,
            context: 256,
            rope_base: 10_000.0,
            norm_eps: 1e-5,
            routing: None,
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// Checks that the shape can be built, trained and run in W4 by the runtime.
    pub fn validate(&self) -> Result<()> {
        if self.vocab == 0 || self.dim == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            bail!("model sizes must be positive: {self:?}");
        }
        if !self.dim.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "heads ({}) must divide dim ({}) and be a multiple of kv heads ({})",
                self.heads,
                self.dim,
                self.kv_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("the head width {} must be even for RoPE", self.head_dim());
        }
        // W4 panels hold 16 rows and groups of 32 inputs.
        for (what, n) in [("dim", self.dim), ("ffn_dim", self.ffn_dim), ("kv dim", self.kv_dim())] {
            if n % 32 != 0 {
                bail!("{what} = {n} must be a multiple of 32 (W4 panels and groups)");
            }
        }
        if self.context < 2 {
            bail!("the context must be at least 2 tokens");
        }
        if !(self.rope_base > 1.0 && self.norm_eps > 0.0) {
            bail!("rope base must exceed 1 and the norm epsilon be positive");
        }
        if let Some(r) = &self.routing {
            if r.layers.is_empty() {
                bail!("mixture-of-depths routing must name at least one block");
            }
            if let Some(&l) = r.layers.iter().find(|&&l| l >= self.layers) {
                bail!("routed block {l} does not exist (the model has {} blocks)", self.layers);
            }
            if r.layers.windows(2).any(|w| w[0] >= w[1]) {
                bail!("routed blocks must be strictly increasing, got {:?}", r.layers);
            }
            if !(r.capacity > 0.0 && r.capacity <= 1.0) {
                bail!("the routing capacity {} must lie in (0, 1]", r.capacity);
            }
        }
        Ok(())
    }

    /// Parameters of the model (embedding counted once; it is tied to the head), routers
    /// and predictors included.
    pub fn parameters(&self) -> usize {
        let per_block =
            2 * self.dim * self.dim + 2 * self.dim * self.kv_dim() + 3 * self.dim * self.ffn_dim + 2 * self.dim;
        let routing = self.routing.as_ref().map_or(0, |r| r.layers.len() * r.parameters_per_layer(self.dim));
        self.vocab * self.dim + self.layers * per_block + self.dim + routing
    }

    /// Multiply-accumulates ×2 of one training token's forward pass, the matmuls only
    /// (projections, attention over a full context, head): the `6·N` rule's `2·N` term.
    /// A routed block's projections and attention count at `capacity` of their dense cost
    /// (the other tokens skip it; attention runs over the routed tokens only), plus its
    /// router (`2·dim`) and predictor (`2·(hidden·dim + hidden)`) on every token.
    pub fn forward_flops_per_token(&self) -> f64 {
        let projections = (2 * self.dim * self.dim + 2 * self.dim * self.kv_dim() + 3 * self.dim * self.ffn_dim) as f64;
        let attention = (2 * self.context * self.dim) as f64;
        let mut blocks = 0f64;
        for l in 0..self.layers {
            match &self.routing {
                Some(r) if r.layers.contains(&l) => {
                    let c = r.capacity as f64;
                    // Attention over `c·context` keys for `c` of the queries.
                    blocks += c * projections + c * c * attention;
                    blocks += (self.dim + r.predictor_hidden * self.dim + r.predictor_hidden) as f64;
                }
                _ => blocks += projections + attention,
            }
        }
        2.0 * (blocks + (self.vocab * self.dim) as f64)
    }

    /// [`Self::forward_flops_per_token`] of the same shape without routing (every block
    /// dense): the baseline a routed model's compute is compared with.
    pub fn dense_forward_flops_per_token(&self) -> f64 {
        ModelShape { routing: None, ..self.clone() }.forward_flops_per_token()
    }
}

/// Optimization and recipe settings of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Seed of the initialization and of the batch order.
    pub seed: u64,
    /// Optimizer steps of the whole run (the cosine schedule ends here).
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup: usize,
    /// AdamW decoupled weight decay, applied to matrices only.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Global gradient-norm clip (0 = none).
    pub grad_clip: f64,
    /// 4-bit fake quantization of every linear layer's input, learned clips (the recipe).
    pub qat: bool,
    /// Weight of the kurtosis penalty on linear layers' outputs (0 = none).
    pub kurtosis_weight: f64,
    /// Which causal decision mechanisms a routed model trains (ignored when dense).
    #[serde(default)]
    pub mod_causal: ModCausal,
    /// Weight of the routing auxiliary loss (the causal mechanisms' binary cross-entropy)
    /// in the optimized loss.
    #[serde(default = "default_mod_aux_weight")]
    pub mod_aux_weight: f64,
}

fn default_mod_aux_weight() -> f64 {
    1.0
}

/// The causal stand-ins for top-k a routed model learns (Raposo et al. §3.5), each trained
/// with binary cross-entropy (with logits) against top-k membership on the block input
/// with its gradient stopped, so that neither changes the language model.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModCausal {
    /// The router's own logit (`> 0` means routed): trains the router weights only.
    Bce,
    /// A separate predictor MLP's logit: trains the predictor only.
    Predictor,
    /// Both losses.
    #[default]
    Both,
}

impl ModCausal {
    /// Whether the router's logit is trained as a causal decision.
    pub fn trains_router(self) -> bool {
        matches!(self, ModCausal::Bce | ModCausal::Both)
    }

    /// Whether a predictor MLP is trained.
    pub fn trains_predictor(self) -> bool {
        matches!(self, ModCausal::Predictor | ModCausal::Both)
    }
}

impl TrainSettings {
    /// Learning rate at `step` (0-based): linear warm-up, then cosine decay to
    /// `lr · min_lr_ratio` at `steps`.
    pub fn learning_rate(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (core::f64::consts::PI * progress).cos())
    }
}
