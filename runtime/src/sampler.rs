//! Choosing the next token from logits: greedy, or temperature with top-k / top-p, with
//! an optional repetition penalty, from a seeded generator. Buffers are allocated once.

use alloc::vec::Vec;

/// Sampling settings. The default is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`0` keeps all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (`1.0` keeps all).
    pub top_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this
    /// (`1.0` disables), as llama.cpp's repetition penalty does.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repetition_window: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0x5EED,
        }
    }
}

/// A stateful sampler: settings, the generator, and the recent-token window.
#[derive(Debug)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Pcg32,
    candidates: Vec<(f32, u32)>,
    recent: Vec<u32>,
    recent_next: usize,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab_size` tokens.
    pub fn new(config: SamplerConfig, vocab_size: usize) -> Self {
        let window = config.repetition_window;
        Sampler {
            rng: Pcg32::new(config.seed),
            config,
            candidates: Vec::with_capacity(vocab_size),
            recent: Vec::with_capacity(window),
            recent_next: 0,
        }
    }

    /// Records `token` as generated or prompted, for the repetition penalty.
    pub fn observe(&mut self, token: u32) {
        let window = self.config.repetition_window;
        if window == 0 {
            return;
        }
        if self.recent.len() < window {
            self.recent.push(token);
        } else {
            self.recent[self.recent_next] = token;
            self.recent_next = (self.recent_next + 1) % window;
        }
    }

    /// Picks the next token from `logits` (one per vocabulary entry). Modifies `logits`
    /// when a repetition penalty is set.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let penalty = self.config.repetition_penalty;
        if penalty != 1.0 {
            for &t in &self.recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
        }
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (l / self.config.temperature, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let k = self.config.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        let max = self.candidates[0].0;
        let mut total = 0f32;
        for c in self.candidates.iter_mut() {
            c.0 = libm::expf(c.0 - max);
            total += c.0;
        }
        let mut kept = self.candidates.len();
        if self.config.top_p < 1.0 {
            let mut cumulative = 0f32;
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += c.0 / total;
                if cumulative >= self.config.top_p {
                    kept = i + 1;
                    break;
                }
            }
        }
        let kept_total: f32 = self.candidates[..kept].iter().map(|c| c.0).sum();
        let mut r = self.rng.next_f32() * kept_total;
        for c in &self.candidates[..kept] {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.candidates[kept - 1].1
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// PCG-XSH-RR 32-bit generator (O'Neill, 2014): small, seedable, reproducible everywhere.
#[derive(Clone, Debug)]
pub struct Pcg32 {
    state: u64,
}

impl Pcg32 {
    const MULTIPLIER: u64 = 6364136223846793005;
    const INCREMENT: u64 = 1442695040888963407;

    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let mut g = Pcg32 { state: 0 };
        g.next_u32();
        g.state = g.state.wrapping_add(seed);
        g.next_u32();
        g
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MULTIPLIER).wrapping_add(Self::INCREMENT);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        xorshifted.rotate_right((old >> 59) as u32)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplerConfig::default(), 4);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let config = SamplerConfig { temperature: 0.8, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(config, 4);
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]), 1);
        }
        let config = SamplerConfig { temperature: 1.0, seed: 7, ..Default::default() };
        let draws = |c: SamplerConfig| {
            let mut s = Sampler::new(c, 4);
            (0..32).map(|_| s.sample(&mut [0.0, 0.1, 0.2, 0.3])).collect::<Vec<_>>()
        };
        assert_eq!(draws(config.clone()), draws(config.clone()));
        assert!(draws(config).iter().any(|&t| t != 3));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let config = SamplerConfig { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let mut s = Sampler::new(config, 3);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [5.0, 0.0, 0.0]), 0);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let config = SamplerConfig { repetition_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(config, 3);
        s.observe(0);
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0]), 1);
    }
}
