//! Trainer tests on a toy shape: gradients reach every parameter, a resumed run repeats
//! the uninterrupted one bit for bit, damaged checkpoints are refused, and the exported
//! file runs in the runtime with the trainer's logits.

use candle_core::{Device, Tensor};
use petrel_quant::rng::SplitMix64;

use super::checkpoint;
use super::config::{ModelShape, TrainSettings};
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
    }
}

/// A 300-token BPE vocabulary (the toy shape's) trained on a repeated sentence.
fn toy_tokenizer() -> anyhow::Result<crate::bpe_train::TrainedTokenizer> {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness. 1234 times over.\n"
        .repeat(20);
    crate::bpe_train::train_bpe(&text, 300, &super::SPECIAL_TOKENS, None)
}

fn toy_tokens(vocab: u32) -> Vec<u32> {
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
    let out = decoder.forward(&inputs, ForwardOptions { fake_quant: true, kurtosis: true, clamp: false })?;
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
    let shape = toy_shape();
    let settings = toy_settings(true, 0.01);
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
    for options in [ForwardOptions::default(), ForwardOptions { fake_quant: true, kurtosis: true, clamp: false }] {
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
