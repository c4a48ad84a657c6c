//! Trainer tests on a toy shape: gradients reach every parameter, a resumed run repeats
//! the uninterrupted one bit for bit, damaged checkpoints are refused, and the exported
//! file runs in the runtime with the trainer's logits. Routed (mixture-of-depths) models:
//! gradients reach routers and predictors, the routed forward pass equals a hand-made
//! reference, resume is exact, and the exported routers score as the runtime's do.

use candle_core::{Device, Tensor};
use petrel_quant::rng::SplitMix64;

use super::checkpoint;
use super::config::{ModCausal, ModelShape, RoutingShape, TrainSettings};
use super::model::{cross_entropy, Decoder, ForwardOptions};
use super::trainer::Trainer;

fn toy_shape() -> ModelShape {
    ModelShape { vocab: 300, dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn_dim: 96, context: 16, ..ModelShape::tiny() }
}

fn toy_settings(qat: bool, kurtosis_weight: f64) -> TrainSettings {
    TrainSettings {
        seed: 7,
        steps: 6,
        batch: 3,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 2,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
        qat,
        kurtosis_weight,
        mod_causal: ModCausal::Both,
        mod_aux_weight: 1.0,
    }
}

/// A 300-token BPE vocabulary (the toy shape's) trained on a repeated sentence.
pub(crate) fn toy_tokenizer() -> anyhow::Result<crate::bpe_train::TrainedTokenizer> {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness. 1234 times over.\n"
        .repeat(20);
    crate::bpe_train::train_bpe(&text, 300, &super::SPECIAL_TOKENS, None)
}

pub(crate) fn toy_tokens(vocab: u32) -> Vec<u32> {
    let mut rng = SplitMix64(99);
    // A stream with structure (runs of increasing ids) so the loss can fall.
    (0..4000).map(|i| ((i / 3) as u32 + (rng.next() % 3) as u32) % vocab).collect()
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() -> anyhow::Result<()> {
    let shape = toy_shape();
    let decoder = Decoder::new(shape.clone(), 1)?;
    let tokens = toy_tokens(shape.vocab as u32);
    let inputs = Tensor::from_vec(tokens[..32].to_vec(), (2, 16), &Device::Cpu)?;
    // Clips at half of each activation's range, so that every quantizer has values beyond
    // both ends (their gradient goes to the clips).
    decoder.calibrate_clips(&inputs, 0.5)?;
    let targets = Tensor::from_vec(tokens[1..33].to_vec(), (2, 16), &Device::Cpu)?;
    let out =
        decoder.forward(&inputs, ForwardOptions { fake_quant: true, kurtosis: true, ..ForwardOptions::default() })?;
    let kurtosis = out.kurtosis.expect("kurtosis was asked for");
    let loss = (cross_entropy(&out.logits, &targets)? + (kurtosis * 0.01)?)?;
    let grads = loss.backward()?;
    for p in &decoder.params {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{} has no gradient", p.name));
        let size = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(size > 0.0 && size.is_finite(), "{}: gradient norm² {size}", p.name);
    }
    Ok(())
}

#[test]
fn kurtosis_penalty_and_quantizers_change_the_gradient() -> anyhow::Result<()> {
    let shape = toy_shape();
    let decoder = Decoder::new(shape.clone(), 2)?;
    let tokens = toy_tokens(shape.vocab as u32);
    let inputs = Tensor::from_vec(tokens[..16].to_vec(), (1, 16), &Device::Cpu)?;
    let plain = decoder.forward(&inputs, ForwardOptions::default())?.logits;
    let quantized = decoder.forward(&inputs, ForwardOptions { fake_quant: true, ..ForwardOptions::default() })?.logits;
    let diff = (plain - quantized)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "fake quantization must change the logits");
    Ok(())
}

fn params_of(t: &Trainer) -> Vec<Vec<f32>> {
    t.decoder.params.iter().map(|p| p.var.as_tensor().flatten_all().and_then(|x| x.to_vec1()).expect("f32")).collect()
}

#[test]
fn resumed_run_repeats_the_uninterrupted_run_exactly() -> anyhow::Result<()> {
    resume_is_exact(toy_shape(), toy_settings(true, 0.01))
}

#[test]
fn routed_resumed_run_repeats_the_uninterrupted_run_exactly() -> anyhow::Result<()> {
    resume_is_exact(routed_shape(0.25, 8), toy_settings(true, 0.01))
}

fn resume_is_exact(shape: ModelShape, settings: TrainSettings) -> anyhow::Result<()> {
    let tokens = toy_tokens(shape.vocab as u32);

    let mut whole = Trainer::new(Decoder::new(shape.clone(), settings.seed)?, settings.clone(), &tokens)?;
    let mut whole_reports = Vec::new();
    for _ in 0..settings.steps {
        whole_reports.push(whole.step(&tokens)?);
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("checkpoint.gguf");
    let mut first = Trainer::new(Decoder::new(shape.clone(), settings.seed)?, settings.clone(), &tokens)?;
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(first.step(&tokens)?);
    }
    checkpoint::save(&path, first.step, &settings, "toy", &first.decoder, &first.optimizer)?;
    drop(first);
    let c = checkpoint::load(&path)?;
    assert_eq!((c.step, c.data.as_str(), &c.shape, &c.settings), (3, "toy", &shape, &settings));
    let mut resumed = Trainer { decoder: c.decoder, optimizer: c.optimizer, settings: c.settings, step: c.step };
    for _ in 3..settings.steps {
        reports.push(resumed.step(&tokens)?);
    }
    assert_eq!(reports, whole_reports, "losses, norms and rates of every step");
    assert_eq!(params_of(&resumed), params_of(&whole), "final parameters");
    assert!(whole_reports[settings.steps - 1].cross_entropy < whole_reports[0].cross_entropy);
    let routed = shape.routing.as_ref().map_or(0, |r| r.layers.len());
    assert!(whole_reports.iter().all(|r| r.routing.len() == routed && r.mod_aux.is_some() == (routed > 0)));
    Ok(())
}

#[test]
fn damaged_checkpoints_are_refused_with_a_clear_error() -> anyhow::Result<()> {
    let shape = toy_shape();
    let settings = toy_settings(false, 0.0);
    let tokens = toy_tokens(shape.vocab as u32);
    let trainer = Trainer::new(Decoder::new(shape, settings.seed)?, settings.clone(), &tokens)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("checkpoint.gguf");
    checkpoint::save(&path, 0, &settings, "toy", &trainer.decoder, &trainer.optimizer)?;
    let good = std::fs::read(&path)?;

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &good[..good.len() - 1000])?;
    let flipped = dir.path().join("flipped.gguf");
    let mut bad = good.clone();
    let at = bad.len() - 5;
    bad[at] ^= 0x40;
    std::fs::write(&flipped, &bad)?;
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a checkpoint at all")?;

    for (file, expect) in [(&truncated, "corrupt"), (&flipped, "checksum"), (&garbage, "corrupt")] {
        let message = match checkpoint::load(file) {
            Ok(_) => panic!("{} loaded", file.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(message.contains(expect), "{}: {message}", file.display());
    }
    assert!(checkpoint::load(&path).is_ok());
    Ok(())
}

#[test]
fn learning_rate_warms_up_then_decays_to_the_floor() {
    let s = TrainSettings { steps: 100, warmup: 10, ..toy_settings(false, 0.0) };
    assert!((s.learning_rate(0) - s.lr / 10.0).abs() < 1e-12);
    assert!((s.learning_rate(9) - s.lr).abs() < 1e-12);
    assert!((s.learning_rate(10) - s.lr).abs() < 1e-12);
    assert!((s.learning_rate(100) - s.lr * s.min_lr_ratio).abs() < 1e-12);
    assert!(s.learning_rate(50) < s.learning_rate(20));
}

#[test]
fn exported_file_runs_in_the_runtime_with_the_trainers_logits() -> anyhow::Result<()> {
    use petrel_runtime::{GgufFile, Model, Session, SessionOptions};

    let tokenizer = toy_tokenizer()?;
    let shape = toy_shape();
    let decoder = Decoder::new(shape.clone(), 3)?;
    // Weights well above the initial scale, so that attention is far from uniform and
    // any mismatch (RoPE pairing, head order, GQA mapping) shows in the logits.
    for p in decoder.params.iter().filter(|p| p.decay) {
        p.var.set(&(p.var.as_tensor() * 8.0)?)?;
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("toy.gguf");
    // Clips at 60% of each input's range, so that the runtime's clamping matters.
    let probe = Tensor::from_vec(toy_tokens(shape.vocab as u32)[..32].to_vec(), (2, 16), &Device::Cpu)?;
    decoder.calibrate_clips(&probe, 0.6)?;
    super::export::write_gguf(&path, &decoder, &tokenizer, true, &[("petrel.train.recipe", "test".into())])?;

    let bytes = std::fs::read(&path)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let model = Model::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime_tokenizer = tokenizer.runtime_tokenizer()?;
    let tokens = runtime_tokenizer.encode("it was the age of wisdom, 1234", false);
    assert!(tokens.len() > 4 && tokens.len() <= shape.context);
    let mut session =
        Session::new(&model, SessionOptions { capacity: shape.context, threads: 1, ..SessionOptions::default() })?;
    let mut runtime_logits = vec![0f32; tokens.len() * shape.vocab];
    session.prefill_all_logits(&tokens, &mut runtime_logits)?;

    let inputs = Tensor::from_vec(tokens.clone(), (1, tokens.len()), &Device::Cpu)?;
    let clamped = ForwardOptions { clamp: true, ..ForwardOptions::default() };
    let trainer_logits: Vec<f32> = decoder.forward(&inputs, clamped)?.logits.flatten_all()?.to_vec1()?;
    let unclamped: Vec<f32> = decoder.forward(&inputs, ForwardOptions::default())?.logits.flatten_all()?.to_vec1()?;
    assert_ne!(unclamped, trainer_logits, "the clips must be active in this test");
    let scale = trainer_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = runtime_logits.iter().zip(&trainer_logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 1.0 && worst <= 1e-4 * scale, "largest logit difference {worst} (scale {scale})");
    Ok(())
}

// For routed models this property does not hold: top-k over a sequence lets later tokens
// change which earlier tokens a block processes (the reason the causal mechanisms exist).
// Those mechanisms are per-token functions of the token's own residual (router: `w · x + b`,
// predictor: an MLP of `x`), so their decisions depend on the prefix only as much as the
// residual does; `exported_routers_score_as_the_runtimes_do` checks them token by token.
#[test]
fn later_tokens_do_not_change_earlier_logits() -> anyhow::Result<()> {
    let shape = toy_shape();
    let decoder = Decoder::new(shape.clone(), 4)?;
    for p in decoder.params.iter().filter(|p| p.decay) {
        p.var.set(&(p.var.as_tensor() * 8.0)?)?;
    }
    let tokens = toy_tokens(shape.vocab as u32);
    let (b, t) = (3, shape.context);
    let mut changed = tokens[..b * t].to_vec();
    for row in 0..b {
        changed[row * t + t - 1] = (changed[row * t + t - 1] + 1) % shape.vocab as u32;
        changed[row * t + t - 2] = (changed[row * t + t - 2] + 7) % shape.vocab as u32;
    }
    for options in
        [ForwardOptions::default(), ForwardOptions { fake_quant: true, kurtosis: true, ..ForwardOptions::default() }]
    {
        let logits = |ids: &[u32]| -> anyhow::Result<Tensor> {
            Ok(decoder.forward(&Tensor::from_vec(ids.to_vec(), (b, t), &Device::Cpu)?, options)?.logits)
        };
        let (a, c) = (logits(&tokens[..b * t])?, logits(&changed)?);
        let early = (a.narrow(1, 0, t - 2)? - c.narrow(1, 0, t - 2)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let late = (a.narrow(1, t - 2, 2)? - c.narrow(1, t - 2, 2)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(early, 0.0, "positions before the change must not see it ({options:?})");
        assert!(late > 0.0);
    }
    Ok(())
}

#[test]
fn bad_learned_clips_are_rejected_at_load_and_rotation_is_refused() -> anyhow::Result<()> {
    use petrel_runtime::{GgufFile, Model};

    let tokenizer = toy_tokenizer()?;
    let decoder = Decoder::new(toy_shape(), 5)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("clips.gguf");
    super::export::write_gguf(&path, &decoder, &tokenizer, true, &[])?;
    let good = std::fs::read(&path)?;
    let at = {
        let file = GgufFile::parse(&good).map_err(|e| anyhow::anyhow!("{e}"))?;
        let clips = file.tensor("blk.1.act_clip").expect("exported");
        file.data_offset + clips.offset as usize
    };
    for (lo, hi) in [(1.0f32, 0.5f32), (f32::NAN, 1.0), (-1.0, f32::INFINITY)] {
        let mut bad = good.clone();
        bad[at + 8..at + 12].copy_from_slice(&lo.to_le_bytes());
        bad[at + 12..at + 16].copy_from_slice(&hi.to_le_bytes());
        let file = GgufFile::parse(&bad).map_err(|e| anyhow::anyhow!("{e}"))?;
        let message = match Model::load(&file) {
            Ok(_) => panic!("clip pair ({lo}, {hi}) loaded"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains("blk.1.act_clip") && message.contains("lo < hi"), "{message}");
    }

    let args = crate::quantize::QuantizeArgs {
        input: path.clone(),
        output: dir.path().join("rotated.gguf"),
        scheme: crate::quantize::Scheme::W4a4,
        group: 32,
        rotate: true,
        seed: 0,
        gptq: false,
        act_order: false,
        calib: None,
        calib_tokens: 0,
        calib_seq_len: 16,
        act_clip: 1.0,
        a8: Vec::new(),
        embedding: crate::quantize::TableFormat::Q8_0,
        head: crate::quantize::TableFormat::Q8_0,
        threads: 1,
    };
    let message = format!("{:#}", crate::quantize::run(&args).expect_err("rotation refused"));
    assert!(message.contains("learned activation clips"), "{message}");
    // Unrotated, the clips pass into the W4A4 file.
    let plain = crate::quantize::QuantizeArgs { rotate: false, output: dir.path().join("w4a4.gguf"), ..args };
    crate::quantize::run(&plain)?;
    let bytes = std::fs::read(&plain.output)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let model = Model::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(model.layers.iter().all(|l| l.activation_clips.is_some()));
    Ok(())
}

/// The toy shape with three blocks, blocks 0 and 2 routed.
fn routed_shape(capacity: f32, predictor_hidden: usize) -> ModelShape {
    ModelShape {
        layers: 3,
        routing: Some(RoutingShape { layers: vec![0, 2], capacity, predictor_hidden }),
        ..toy_shape()
    }
}

fn max_abs(t: &Tensor) -> anyhow::Result<f32> {
    Ok(t.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn routed_every_parameter_receives_a_nonzero_gradient() -> anyhow::Result<()> {
    let shape = routed_shape(0.25, 8);
    let decoder = Decoder::new(shape.clone(), 1)?;
    let names: Vec<&str> = decoder.params.iter().map(|p| p.name.as_str()).collect();
    for name in ["blk.0.mod_router.weight", "blk.2.mod_pred_in.weight", "blk.2.mod_pred_out.bias"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert_eq!(
        decoder.params.iter().map(|p| p.var.as_tensor().elem_count()).sum::<usize>(),
        shape.parameters() + 3 * 4 * 2
    );
    let tokens = toy_tokens(shape.vocab as u32);
    let inputs = Tensor::from_vec(tokens[..32].to_vec(), (2, 16), &Device::Cpu)?;
    decoder.calibrate_clips(&inputs, 0.5)?;
    let targets = Tensor::from_vec(tokens[1..33].to_vec(), (2, 16), &Device::Cpu)?;
    let out =
        decoder.forward(&inputs, ForwardOptions { fake_quant: true, kurtosis: true, ..ForwardOptions::default() })?;
    let routing = out.routing.expect("a routed model reports its routing");
    assert_eq!(routing.layers.iter().map(|l| l.layer).collect::<Vec<_>>(), vec![0, 2]);
    for l in &routing.layers {
        assert!((0.0..=1.0).contains(&l.router_agreement));
        assert!(l.predictor_agreement.is_some_and(|p| (0.0..=1.0).contains(&p)));
    }
    let kurtosis = out.kurtosis.expect("kurtosis was asked for");
    let loss = ((cross_entropy(&out.logits, &targets)? + (kurtosis * 0.01)?)? + routing.aux_loss)?;
    let grads = loss.backward()?;
    for p in &decoder.params {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{} has no gradient", p.name));
        let size = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(size > 0.0 && size.is_finite(), "{}: gradient norm² {size}", p.name);
    }
    Ok(())
}

#[test]
fn causal_losses_train_only_their_own_mechanism() -> anyhow::Result<()> {
    let shape = routed_shape(0.25, 8);
    let decoder = Decoder::new(shape.clone(), 2)?;
    let inputs = Tensor::from_vec(toy_tokens(shape.vocab as u32)[..32].to_vec(), (2, 16), &Device::Cpu)?;
    for (causal, router, predictor) in
        [(ModCausal::Bce, true, false), (ModCausal::Predictor, false, true), (ModCausal::Both, true, true)]
    {
        let out = decoder.forward(&inputs, ForwardOptions { mod_causal: causal, ..ForwardOptions::default() })?;
        let grads = out.routing.expect("routed").aux_loss.backward()?;
        for p in &decoder.params {
            let reached = grads.get(p.var.as_tensor()).map(max_abs).transpose()?.is_some_and(|g| g > 0.0);
            let expected = (router && p.name.contains("mod_router")) || (predictor && p.name.contains("mod_pred"));
            assert_eq!(reached, expected, "{causal:?}: {}", p.name);
        }
    }
    Ok(())
}

/// The dense decoder over the routed one's non-routing parameters (shared variables).
fn dense_twin(decoder: &Decoder) -> anyhow::Result<Decoder> {
    let shape = ModelShape { routing: None, ..decoder.shape.clone() };
    let n = decoder.params.len() - decoder.params.iter().filter(|p| p.name.contains(".mod_")).count();
    let params = decoder.params[..n]
        .iter()
        .map(|p| super::model::Parameter { name: p.name.clone(), var: p.var.clone(), decay: p.decay })
        .collect();
    Ok(Decoder::from_params(shape, params)?)
}

#[test]
fn full_capacity_with_an_open_gate_is_the_dense_model() -> anyhow::Result<()> {
    let decoder = Decoder::new(routed_shape(1.0, 0), 3)?;
    for p in decoder.params.iter().filter(|p| p.decay) {
        p.var.set(&(p.var.as_tensor() * 8.0)?)?;
    }
    // σ(40) is 1 in f32: every routed token takes the block's output.
    for p in &decoder.params {
        if p.name.ends_with("mod_router.weight") {
            p.var.set(&p.var.as_tensor().zeros_like()?)?;
        } else if p.name.ends_with("mod_router.bias") {
            p.var.set(&Tensor::new(&[40f32], &Device::Cpu)?)?;
        }
    }
    let dense = dense_twin(&decoder)?;
    let inputs = Tensor::from_vec(toy_tokens(300)[..48].to_vec(), (3, 16), &Device::Cpu)?;
    for options in [ForwardOptions::default(), ForwardOptions { fake_quant: true, ..ForwardOptions::default() }] {
        let routed = decoder.forward(&inputs, options)?.logits;
        let plain = dense.forward(&inputs, options)?.logits;
        let (diff, scale) = (max_abs(&(&routed - &plain)?)?, max_abs(&plain)?);
        assert!(scale > 1.0 && diff <= 1e-5 * scale, "{options:?}: difference {diff} (scale {scale})");
    }
    Ok(())
}

#[test]
fn routed_forward_matches_a_hand_computed_top_k_reference() -> anyhow::Result<()> {
    // One routed block between the embedding and the head, so the reference is short.
    let shape = ModelShape {
        layers: 1,
        routing: Some(RoutingShape { layers: vec![0], capacity: 0.3, predictor_hidden: 4 }),
        ..toy_shape()
    };
    let decoder = Decoder::new(shape.clone(), 4)?;
    for p in decoder.params.iter().filter(|p| p.decay || p.name.ends_with("mod_router.weight")) {
        p.var.set(&(p.var.as_tensor() * 8.0)?)?;
    }
    let bias = 0.4f32;
    decoder
        .params
        .iter()
        .filter(|p| p.name == "blk.0.mod_router.bias")
        .try_for_each(|p| p.var.set(&Tensor::new(&[bias], &Device::Cpu)?))?;
    let param = |name: &str| -> anyhow::Result<Tensor> {
        let p = decoder.params.iter().find(|p| p.name == name).ok_or_else(|| anyhow::anyhow!("no {name}"))?;
        Ok(p.var.as_tensor().clone())
    };
    let (b, t, d) = (2, 16, shape.dim);
    let k = petrel_runtime::routing::routed_count(0.3, t);
    assert_eq!(k, 5);
    // Distinct tokens, so that no two scores tie.
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7 + 3) % shape.vocab as u32).collect();
    let logits =
        decoder.forward(&Tensor::from_vec(ids.clone(), (b, t), &Device::Cpu)?, ForwardOptions::default())?.logits;

    let embedding = param("token_embd.weight")?;
    let router: Vec<f32> = param("blk.0.mod_router.weight")?.to_vec1()?;
    let mut chosen_rows = Vec::new();
    for row in 0..b {
        let x: Vec<Vec<f32>> = ids[row * t..(row + 1) * t]
            .iter()
            .map(|&id| embedding.get(id as usize).and_then(|r| r.to_vec1()))
            .collect::<candle_core::Result<_>>()?;
        let scores: Vec<f64> = x
            .iter()
            .map(|v| v.iter().zip(&router).map(|(&a, &w)| a as f64 * w as f64).sum::<f64>() + bias as f64)
            .collect();
        let mut ranked: Vec<usize> = (0..t).collect();
        ranked.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
        assert!(scores[ranked[k - 1]] - scores[ranked[k]] > 1e-4, "no near-tie at the cut");
        let mut chosen = ranked[..k].to_vec();
        chosen.sort();
        chosen_rows.push(chosen.clone());
        // The block on the chosen tokens alone, at their original positions.
        let selected: Vec<f32> = chosen.iter().flat_map(|&i| x[i].clone()).collect();
        let positions: Vec<u32> = chosen.iter().map(|&i| i as u32).collect();
        let y: Vec<f32> = decoder
            .block_at_positions(
                0,
                &Tensor::from_vec(selected, (1, k, d), &Device::Cpu)?,
                &Tensor::from_vec(positions, (1, k), &Device::Cpu)?,
                ForwardOptions::default(),
            )?
            .flatten_all()?
            .to_vec1()?;
        let mut residual = x.clone();
        for (n, &i) in chosen.iter().enumerate() {
            let gate = 1.0 / (1.0 + (-scores[i]).exp());
            for (c, v) in residual[i].iter_mut().enumerate() {
                *v += (gate * (y[n * d + c] - *v) as f64) as f32;
            }
        }
        let gain: Vec<f32> = param("output_norm.weight")?.to_vec1()?;
        let normed: Vec<f32> = residual
            .iter()
            .flat_map(|v| {
                let inv = 1.0 / (v.iter().map(|&a| a * a).sum::<f32>() / d as f32 + shape.norm_eps).sqrt();
                v.iter().zip(&gain).map(move |(&a, &g)| a * inv * g).collect::<Vec<f32>>()
            })
            .collect();
        let reference = Tensor::from_vec(normed, (t, d), &Device::Cpu)?.matmul(&embedding.t()?)?;
        let got = logits.get(row)?;
        let (diff, scale) = (max_abs(&(&got - &reference)?)?, max_abs(&reference)?);
        assert!(scale > 0.1 && diff <= 1e-4 * scale, "row {row}: difference {diff} (scale {scale})");
    }
    assert_ne!(chosen_rows[0], chosen_rows[1], "rows must route different tokens for this test to mean much");
    Ok(())
}

#[test]
fn exported_routers_score_as_the_runtimes_do() -> anyhow::Result<()> {
    use petrel_runtime::gguf::TensorType;
    use petrel_runtime::routing::{Decision, MixtureOfDepths};
    use petrel_runtime::GgufFile;

    let tokenizer = toy_tokenizer()?;
    for (hidden, decision) in [(8, Decision::Predictor), (0, Decision::Router)] {
        let shape = routed_shape(0.25, hidden);
        let decoder = Decoder::new(shape.clone(), 5)?;
        for p in decoder.params.iter().filter(|p| p.name.contains(".mod_")) {
            p.var.set(&(p.var.as_tensor() * 3.0)?.affine(1.0, 0.05)?)?;
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("routed.gguf");
        super::export::write_gguf(&path, &decoder, &tokenizer, false, &[])?;
        let bytes = std::fs::read(&path)?;
        let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let layers: Vec<i64> = file
            .get("petrel.mod.layers")
            .and_then(|v| v.as_array())
            .and_then(|a| a.integers().map(|i| i.collect()))
            .expect("layers written");
        assert_eq!(layers, vec![0, 2]);
        assert_eq!(file.get("petrel.mod.capacity").and_then(|v| v.as_f32()), Some(0.25));
        assert_eq!(file.get("petrel.mod.gate").and_then(|v| v.as_str()), Some("sigmoid"));
        assert_eq!(file.get("petrel.mod.decision").and_then(|v| v.as_str()), Some(decision.name()));
        for p in decoder.params.iter().filter(|p| p.name.contains(".mod_")) {
            let info = file.tensor(&p.name).unwrap_or_else(|| panic!("{} not exported", p.name));
            let dims: Vec<u64> = p.var.as_tensor().dims().iter().rev().map(|&n| n as u64).collect();
            assert_eq!((info.ty, info.shape()), (TensorType::F32, dims.as_slice()), "{}", p.name);
        }
        assert_eq!(file.tensor("blk.2.mod_pred_in.weight").is_some(), hidden > 0);
        assert!(file.tensor("blk.1.mod_router.weight").is_none());

        let mod_ = MixtureOfDepths::from_gguf(&file, shape.layers, shape.dim)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .expect("routing read back");
        assert_eq!((mod_.decision, mod_.routed_layers().collect::<Vec<_>>()), (decision, vec![0, 2]));
        // Residual-like inputs: a few large channels, various scales.
        let mut rng = SplitMix64(11);
        let n = 20;
        let x: Vec<f32> = (0..n * shape.dim)
            .map(|i| {
                ((rng.uniform() * 2.0 - 1.0) * if i % 37 == 0 { 6.0 } else { 0.7 } * (1 + i / shape.dim) as f64) as f32
            })
            .collect();
        let xt = Tensor::from_vec(x.clone(), (n, shape.dim), &Device::Cpu)?;
        for layer in [0, 2] {
            let router = mod_.router(layer).expect("routed block");
            assert_eq!(router.predictor_hidden(), hidden);
            let trainer_scores: Vec<f32> = decoder.router_logits(layer, &xt)?.to_vec1()?;
            let trainer_predictions: Option<Vec<f32>> =
                decoder.predictor_logits(layer, &xt)?.map(|p| p.to_vec1()).transpose()?;
            for (i, row) in x.chunks_exact(shape.dim).enumerate() {
                let score = router.score(row);
                assert!(
                    (score - trainer_scores[i]).abs() <= 1e-5 * (1.0 + score.abs()),
                    "{score} vs {}",
                    trainer_scores[i]
                );
                match (router.predictor_logit(row, shape.norm_eps), &trainer_predictions) {
                    (Some(p), Some(t)) => assert!((p - t[i]).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {}", t[i]),
                    (None, None) => {}
                    other => panic!("predictor presence differs: {other:?}"),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn shapes_and_settings_written_before_routing_still_load() -> anyhow::Result<()> {
    let shape = toy_shape();
    let json = serde_json::to_string(&shape)?;
    assert!(!json.contains("routing"), "a dense shape serializes as before: {json}");
    let back: ModelShape = serde_json::from_str(&json)?;
    assert_eq!(back, shape);
    let mut settings = serde_json::to_value(toy_settings(false, 0.0))?;
    let map = settings.as_object_mut().expect("an object");
    map.remove("mod_causal");
    map.remove("mod_aux_weight");
    let old: TrainSettings = serde_json::from_value(settings)?;
    assert_eq!(old, toy_settings(false, 0.0));
    let routed = routed_shape(0.125, 4);
    assert_eq!(serde_json::from_str::<ModelShape>(&serde_json::to_string(&routed)?)?, routed);
    Ok(())
}

#[test]
fn bad_routing_shapes_are_refused_and_flops_shrink_with_capacity() -> anyhow::Result<()> {
    let with = |layers: Vec<usize>, capacity: f32| ModelShape {
        routing: Some(RoutingShape { layers, capacity, predictor_hidden: 0 }),
        ..routed_shape(0.5, 0)
    };
    assert!(with(vec![0, 2], 0.5).validate().is_ok());
    for (bad, why) in [
        (with(vec![], 0.5), "at least one"),
        (with(vec![3], 0.5), "does not exist"),
        (with(vec![2, 1], 0.5), "increasing"),
        (with(vec![1, 1], 0.5), "increasing"),
        (with(vec![1], 0.0), "(0, 1]"),
        (with(vec![1], 1.5), "(0, 1]"),
        (with(vec![1], f32::NAN), "(0, 1]"),
    ] {
        let message = bad.validate().expect_err("refused").to_string();
        assert!(message.contains(why), "{message}");
    }
    let dense = toy_shape();
    let full = ModelShape {
        routing: Some(RoutingShape { layers: vec![0, 1], capacity: 1.0, predictor_hidden: 0 }),
        ..dense.clone()
    };
    assert_eq!(full.forward_flops_per_token(), dense.forward_flops_per_token() + 2.0 * 2.0 * dense.dim as f64);
    assert_eq!(full.dense_forward_flops_per_token(), dense.forward_flops_per_token());
    let eighth = ModelShape {
        routing: Some(RoutingShape { capacity: 0.125, ..full.routing.clone().expect("set") }),
        ..dense.clone()
    };
    assert!(eighth.forward_flops_per_token() < 0.5 * dense.forward_flops_per_token());
    assert_eq!(full.parameters(), dense.parameters() + 2 * (dense.dim + 1));
    Ok(())
}

/// The runtime runs an exported routed model as the trainer does: with top-k over the whole
/// prompt (one prefill batch) and, decoding token by token, with the predictor's or the
/// router's causal decision — the same tokens through each routed block and the same
/// logits.
#[test]
fn routed_export_runs_in_the_runtime_as_in_the_trainer() -> anyhow::Result<()> {
    use petrel_runtime::routing::{Decision, PrefillRouting};
    use petrel_runtime::{GgufFile, Model, Session, SessionOptions};

    let tokenizer = toy_tokenizer()?;
    let shape = routed_shape(0.25, 8);
    let decoder = Decoder::new(shape.clone(), 22)?;
    for p in decoder.params.iter().filter(|p| p.decay) {
        p.var.set(&(p.var.as_tensor() * 8.0)?)?;
    }
    // Routers and predictors far from their initialization, biased so that the causal
    // decisions route some tokens and skip others.
    for p in decoder.params.iter().filter(|p| p.name.contains(".mod_")) {
        let factor = if p.name.ends_with("router.weight") { 20.0 } else { 3.0 };
        let scaled = (p.var.as_tensor() * factor)?;
        p.var.set(&scaled)?;
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("routed.gguf");
    super::export::write_gguf(&path, &decoder, &tokenizer, false, &[])?;
    let bytes = std::fs::read(&path)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut model = Model::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tokens = tokenizer.runtime_tokenizer()?.encode("it was the best of times, it was the worst of times", false);
    let n = tokens.len();
    assert!(n > 8 && n <= shape.context);
    let inputs = Tensor::from_vec(tokens.clone(), (1, n), &Device::Cpu)?;
    let vocab = shape.vocab;
    let close = |runtime: &[f32], trainer: &[f32], what: &str| {
        let scale = trainer.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = runtime.iter().zip(trainer).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 1.0 && worst <= 1e-4 * scale, "{what}: largest logit difference {worst} (scale {scale})");
    };

    // Prefill: top-k over the prompt.
    let trained = decoder.forward(&inputs, ForwardOptions::default())?;
    let routed = trained.routing.expect("routed model").routed_tokens;
    let options = SessionOptions { capacity: n, max_batch: n, threads: 2, ..SessionOptions::default() };
    let mut session = Session::new(&model, options)?;
    let mut runtime_logits = vec![0f32; n * vocab];
    session.prefill_all_logits(&tokens, &mut runtime_logits)?;
    for (chosen, layer) in routed.iter().zip([0, 2]) {
        assert_eq!(chosen.len(), petrel_runtime::routing::routed_count(0.25, n));
        assert_eq!(session.positions_through(layer), chosen.as_slice(), "top-k of block {layer}");
    }
    close(&runtime_logits, &trained.logits.flatten_all()?.to_vec1()?, "top-k prefill");

    // Decoding one token at a time: each token by the causal decision.
    for decision in [Decision::Predictor, Decision::Router] {
        model.routing.as_mut().expect("routed").decision = decision;
        let options = ForwardOptions { causal_routing: Some(decision), ..ForwardOptions::default() };
        let trained = decoder.forward(&inputs, options)?;
        let routed = trained.routing.expect("routed model").routed_tokens;
        let options = SessionOptions { capacity: n, threads: 1, ..SessionOptions::default() };
        let mut session = Session::new(&model, options)?;
        let mut decoded = Vec::with_capacity(n * vocab);
        for &token in &tokens {
            decoded.extend_from_slice(session.step(token)?);
        }
        for (chosen, layer) in routed.iter().zip([0, 2]) {
            assert!(
                !chosen.is_empty() && chosen.len() < n,
                "{decision:?}: block {layer} routes {} of {n}",
                chosen.len()
            );
            assert_eq!(session.positions_through(layer), chosen.as_slice(), "{decision:?} decisions of block {layer}");
        }
        close(&decoded, &trained.logits.flatten_all()?.to_vec1()?, "causal decode");

        // A causal prefill of the whole prompt routes exactly as decoding did.
        let options =
            SessionOptions { capacity: n, prefill_routing: PrefillRouting::Causal, ..SessionOptions::default() };
        let mut session = Session::new(&model, options)?;
        session.prefill(&tokens)?;
        for (chosen, layer) in routed.iter().zip([0, 2]) {
            assert_eq!(session.positions_through(layer), chosen.as_slice());
        }
    }
    Ok(())
}

#[test]
fn collapsed_clip_pairs_are_widened_and_others_left_alone() -> anyhow::Result<()> {
    let decoder = Decoder::new(toy_shape(), 1)?;
    let clip = |i: usize| decoder.params.iter().filter(|p| p.name.contains(".clip.")).nth(i).expect("clip pair");
    // A pair crossed by a gradient step (as a real run once left it), and a healthy one.
    clip(0).var.set(&Tensor::new(&[-0.000_164_7f32, -0.001_195_4], &Device::Cpu)?)?;
    clip(1).var.set(&Tensor::new(&[-2.5f32, 3.25], &Device::Cpu)?)?;
    decoder.project_clips()?;
    let crossed = clip(0).var.as_tensor().to_vec1::<f32>()?;
    assert!(crossed[1] - crossed[0] >= super::model::MIN_CLIP_WIDTH * 0.999, "{crossed:?}");
    assert!(((crossed[0] + crossed[1]) / 2.0 - (-0.000_680_05)).abs() < 1e-6, "centre kept: {crossed:?}");
    assert_eq!(clip(1).var.as_tensor().to_vec1::<f32>()?, vec![-2.5, 3.25]);
    Ok(())
}
