//! Training batches: windows of `context + 1` tokens cut from one token stream at offsets
//! drawn from a generator seeded by `(seed, step)` — so the batch of any step is known
//! without replaying the ones before it, which makes resuming exact.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use petrel_quant::rng::SplitMix64;
use sha2::{Digest, Sha256};

/// A summary of a token stream that changes if any token does: its length and SHA-256.
pub fn fingerprint(tokens: &[u32]) -> String {
    let mut hasher = Sha256::new();
    for t in tokens {
        hasher.update(t.to_le_bytes());
    }
    let hex: String = hasher.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{} tokens, sha256 {hex}…", tokens.len())
}

/// Inputs and next-token targets, both `[batch, context]` u32.
pub struct Batch {
    /// Token ids fed to the model.
    pub inputs: Tensor,
    /// The token that follows each input.
    pub targets: Tensor,
}

fn window_batch(tokens: &[u32], starts: impl Iterator<Item = usize>, context: usize) -> Result<Batch> {
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut rows = 0;
    for start in starts {
        inputs.extend_from_slice(&tokens[start..start + context]);
        targets.extend_from_slice(&tokens[start + 1..start + context + 1]);
        rows += 1;
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (rows, context), &Device::Cpu)?,
        targets: Tensor::from_vec(targets, (rows, context), &Device::Cpu)?,
    })
}

/// The training batch of `step`: `batch` windows at offsets uniform over the stream.
pub fn training_batch(tokens: &[u32], seed: u64, step: usize, batch: usize, context: usize) -> Result<Batch> {
    if tokens.len() <= context {
        bail!("the training text has {} tokens; it needs more than the context ({context})", tokens.len());
    }
    let positions = (tokens.len() - context) as u64;
    // The step's stream starts at a hash of (seed, step): seeding with `seed ^ step·γ`
    // directly (γ being SplitMix64's own increment) would make step s+1 draw 15 of step
    // s's 16 windows again.
    let mut rng = SplitMix64(SplitMix64(seed ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next());
    let starts: Vec<usize> = (0..batch).map(|_| (rng.next() % positions) as usize).collect();
    window_batch(tokens, starts.into_iter(), context)
}

/// Held-out batches for the loss logged during training: `batches · batch` windows spread
/// evenly over the whole held-out stream (so that every corpus in it is represented).
pub fn heldout_batches(tokens: &[u32], batches: usize, batch: usize, context: usize) -> Result<Vec<Batch>> {
    let available = tokens.len().saturating_sub(context);
    let windows = (batches * batch).min(available / context.max(1));
    if windows == 0 {
        bail!("the held-out text has {} tokens; it needs more than the context ({context})", tokens.len());
    }
    let spacing = available / windows;
    let starts: Vec<usize> = (0..windows).map(|w| w * spacing).collect();
    starts.chunks(batch).map(|chunk| window_batch(tokens, chunk.iter().copied(), context)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_draw_fresh_windows() -> Result<()> {
        let tokens: Vec<u32> = (0..100_000).collect();
        let mut seen = std::collections::HashSet::new();
        let (steps, batch) = (50, 16);
        for step in 0..steps {
            let b = training_batch(&tokens, 0, step, batch, 8)?;
            let inputs: Vec<u32> = b.inputs.flatten_all()?.to_vec1()?;
            let targets: Vec<u32> = b.targets.flatten_all()?.to_vec1()?;
            for (row, (i, t)) in inputs.chunks(8).zip(targets.chunks(8)).enumerate() {
                assert!(i.windows(2).all(|w| w[1] == w[0] + 1), "step {step} row {row}: not a window");
                assert_eq!(t[0], i[0] + 1, "targets are the next tokens");
                seen.insert(i[0]);
            }
        }
        // 800 draws from 99,992 offsets: a handful of coincidences at most.
        assert!(seen.len() >= steps * batch - 10, "only {} distinct windows", seen.len());
        assert_eq!(
            training_batch(&tokens, 0, 7, batch, 8)?.inputs.to_vec2::<u32>()?,
            training_batch(&tokens, 0, 7, batch, 8)?.inputs.to_vec2::<u32>()?
        );
        Ok(())
    }
}
