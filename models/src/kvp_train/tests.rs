//! KV-prediction training on a tiny random model: the predicted-cache attention against a
//! per-query reference, gradients reaching exactly the trained parameters, an exact
//! predictor reproducing the base's own cross-entropy, the loss falling, and the CLI path
//! writing a file that reads back.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use petrel_quant::rng::SplitMix64;
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};

use super::model::{predicted_attention, prefix_mask, BLOCK_TENSORS};
use super::weights::{self, Origin};
use super::{sample_positions, KvpTrainArgs};
use crate::train::config::{ModCausal, ModelShape, TrainSettings};
use crate::train::data::{training_batch, Batch};
use crate::train::model::{cross_entropy, Decoder, ForwardOptions};
use crate::train::optim::AdamW;
use crate::train::tests::{toy_tokenizer, toy_tokens};

/// Four blocks of the trainer's toy shape (vocab 300, dim 64, 4 heads, 2 KV heads).
fn shape() -> ModelShape {
    ModelShape { vocab: 300, dim: 64, layers: 4, heads: 4, kv_heads: 2, ffn_dim: 96, context: 32, ..ModelShape::tiny() }
}

/// A random base model (weights scaled up so that attention is far from uniform) written
/// to `dir/base.gguf`, without `petrel.kvp.*` metadata.
fn write_base(dir: &Path) -> anyhow::Result<(std::path::PathBuf, Decoder)> {
    let decoder = Decoder::new(shape(), 5)?;
    for p in decoder.params.iter().filter(|p| p.decay) {
        p.var.set(&(p.var.as_tensor() * 6.0)?)?;
    }
    let path = dir.join("base.gguf");
    crate::train::export::write_gguf(&path, &decoder, &toy_tokenizer()?, false, &[])?;
    Ok((path, decoder))
}

fn load(path: &Path, every: Option<usize>, context: usize) -> anyhow::Result<weights::Loaded> {
    let bytes = std::fs::read(path)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    weights::load(&file, every, context)
}

fn batch(seed: u64, rows: usize, t: usize) -> anyhow::Result<Batch> {
    training_batch(&toy_tokens(shape().vocab as u32), seed, 0, rows, t)
}

/// Deterministic normal-ish values (sum of uniforms), `[dims]`.
fn random(dims: &[usize], seed: u64) -> anyhow::Result<Var> {
    let mut rng = SplitMix64(seed);
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| ((0..4).map(|_| rng.uniform()).sum::<f64>() - 2.0) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(values, dims, &Device::Cpu)?)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn kvp_predicted_attention_matches_a_per_query_reference() -> anyhow::Result<()> {
    let (b, h, m, t, hd) = (2, 3, 3, 5, 4);
    let q = random(&[b, h, m, hd], 1)?;
    let k_own = random(&[b, h, m, hd], 2)?;
    let v_own = random(&[b, h, m, hd], 3)?;
    let k_pred = random(&[b, h, t, hd], 4)?;
    let v_pred = random(&[b, h, t, hd], 5)?;
    // Edge cases included: a query that sees no predicted row and one that sees them all.
    let positions = [0u32, 2, 5, 1, 3, 4];
    let scale = 0.7;
    let mask = prefix_mask(&positions, b, t)?;
    let fast = predicted_attention(&q, &k_own, &v_own, &k_pred, &v_pred, &mask, scale)?;

    // The reference: per query, the visible keys gathered explicitly, a textbook softmax.
    let mut rows = Vec::new();
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..m {
                let p = positions[bi * m + i] as usize;
                let at = |x: &Var, row: usize, n: usize| -> candle_core::Result<Tensor> {
                    x.as_tensor().get(bi)?.get(hi)?.narrow(0, row, n)
                };
                let (keys, values) = if p == 0 {
                    (at(&k_own, i, 1)?, at(&v_own, i, 1)?)
                } else {
                    (
                        Tensor::cat(&[at(&k_pred, 0, p)?, at(&k_own, i, 1)?], 0)?,
                        Tensor::cat(&[at(&v_pred, 0, p)?, at(&v_own, i, 1)?], 0)?,
                    )
                };
                let scores = (keys.matmul(&at(&q, i, 1)?.t()?)? * scale)?.squeeze(1)?;
                let e = scores.exp()?;
                let weights = e.broadcast_div(&e.sum_all()?)?;
                rows.push(weights.unsqueeze(0)?.matmul(&values)?.squeeze(0)?);
            }
        }
    }
    let reference = Tensor::stack(&rows, 0)?.reshape((b, h, m, hd))?;
    assert!(max_diff(&fast, &reference)? < 1e-5, "values differ by {}", max_diff(&fast, &reference)?);

    let probe = random(&[b, h, m, hd], 6)?;
    let g_fast = (&fast * probe.as_tensor())?.sum_all()?.backward()?;
    let g_ref = (&reference * probe.as_tensor())?.sum_all()?.backward()?;
    for (name, v) in [("q", &q), ("k_own", &k_own), ("v_own", &v_own), ("k_pred", &k_pred), ("v_pred", &v_pred)] {
        let (a, r) = (g_fast.get(v.as_tensor()), g_ref.get(v.as_tensor()));
        let (Some(a), Some(r)) = (a, r) else { panic!("{name}: no gradient") };
        assert!(max_diff(a, r)? < 1e-5, "{name}: gradients differ by {}", max_diff(a, r)?);
    }
    // A predicted row no query sees gets no gradient: in sequence 1 (positions 1, 3, 4)
    // nobody sees row 4.
    let dk = g_fast.get(k_pred.as_tensor()).expect("checked above");
    let hidden_row = dk.get(1)?.narrow(1, 4, 1)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(hidden_row, 0.0, "a key no query sees must get no gradient");
    Ok(())
}

#[test]
fn kvp_gradients_reach_every_trained_parameter_and_no_base_weight() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, _) = write_base(dir.path())?;
    let loaded = load(&path, Some(2), 16)?;
    let model = &loaded.model;
    assert_eq!((model.aux_blocks(), loaded.origin), (2, Origin::Created));
    assert_eq!(loaded.layout.layer_map, vec![0, 0, 1, 1]);
    // Perturb the predictor so that it is not the identity (every term then moves).
    for p in model.params.iter().filter(|p| p.name.starts_with("kvp.pred.")) {
        let noise = random(p.var.as_tensor().dims(), p.name.len() as u64)?;
        p.var.set(&(p.var.as_tensor() + (noise.as_tensor() * 0.05)?)?)?;
    }
    let b = batch(1, 2, 16)?;
    let positions = sample_positions(0, 0, 2, 16, 4);
    let losses = model.losses(&b, &positions, 1.0, true)?;
    let grads = losses.total.backward()?;
    assert_eq!(model.params.len(), 2 * 9 + 4 * 4);
    for p in &model.params {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{} has no gradient", p.name));
        let size = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(size > 0.0 && size.is_finite(), "{}: gradient norm² {size}", p.name);
    }
    let mut frozen = vec![&model.embedding, &model.head, &model.output_norm];
    frozen.extend(model.base.iter().flatten());
    for t in frozen {
        assert!(!t.is_variable(), "a base tensor is a variable");
    }
    // The base matrices take the frozen linear: no weight gradient is even computed.
    for (i, name) in BLOCK_TENSORS.iter().enumerate().filter(|(_, n)| !n.ends_with("norm")) {
        for block in &model.base {
            assert!(grads.get(&block[i]).is_none(), "base {name} got a weight gradient");
        }
    }
    assert!(grads.get(&model.embedding).is_none(), "the embedding got a gradient");
    Ok(())
}

#[test]
fn kvp_exact_predictor_reproduces_the_true_cache_cross_entropy() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, decoder) = write_base(dir.path())?;
    // Every base block is its own aux block and the maps are identities: the predicted
    // cache is the true one.
    let loaded = load(&path, Some(1), 16)?;
    let model = &loaded.model;
    let b = batch(2, 3, 16)?;

    // The teacher is the trainer's decoder (itself checked against the runtime).
    let theirs = decoder.forward(&b.inputs, ForwardOptions::default())?.logits;
    let ours = model.base_logits(&b.inputs)?;
    let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(scale > 1.0 && max_diff(&ours, &theirs)? < 1e-4 * scale, "the teacher differs from the trainer's decoder");

    let positions = sample_positions(3, 0, 3, 16, 6);
    let l = model.losses(&b, &positions, 1.0, false)?;
    assert!(l.l1 < 1e-6, "L1 {}", l.l1);
    assert!((l.ce_base - l.ce_true).abs() < 1e-4, "CE on the predicted cache {} vs true {}", l.ce_base, l.ce_true);
    // The reference CE computed independently from the full logits at those positions.
    let t = 16;
    let rows: Vec<u32> = positions.iter().enumerate().map(|(i, &p)| (i / 6 * t) as u32 + p).collect();
    let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
    let logits = theirs.reshape((3 * t, shape().vocab))?.index_select(&rows, 0)?.unsqueeze(0)?;
    let targets = b.targets.flatten_all()?.index_select(&rows, 0)?.unsqueeze(0)?;
    let reference = cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
    assert!((l.ce_true - reference).abs() < 1e-4, "true-cache CE {} vs reference {reference}", l.ce_true);
    // The aux model is the base: its CE over all positions is the base's.
    let full = cross_entropy(&theirs, &b.targets)?.to_scalar::<f32>()? as f64;
    assert!((l.ce_aux - full).abs() < 1e-4, "CE_aux {} vs the base's {full}", l.ce_aux);

    // A wrong bias in one layer's value map must show in CE_base (the test is sensitive).
    let bias = model.params.iter().find(|p| p.name == "kvp.pred.1.v.bias").expect("predictor bias");
    bias.var.set(&(bias.var.as_tensor() + 0.5)?)?;
    let perturbed = model.losses(&b, &positions, 1.0, false)?;
    assert!((perturbed.ce_base - perturbed.ce_true).abs() > 1e-3, "CE_base ignores the predictor");
    assert!(perturbed.l1 > 0.4, "L1 {}", perturbed.l1);
    Ok(())
}

#[test]
fn kvp_a_few_steps_reduce_the_training_loss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, _) = write_base(dir.path())?;
    let loaded = load(&path, Some(2), 16)?;
    let model = &loaded.model;
    let b = batch(4, 2, 16)?;
    let positions = sample_positions(1, 0, 2, 16, 5);
    let settings = TrainSettings {
        seed: 0,
        steps: 0,
        batch: 2,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 0,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
        qat: false,
        kurtosis_weight: 0.0,
        mod_causal: ModCausal::default(),
        mod_aux_weight: 0.0,
    };
    let mut optimizer = AdamW::new(&model.params)?;
    let mut totals = Vec::new();
    for _ in 0..12 {
        let l = model.losses(&b, &positions, 1.0, true)?;
        totals.push((l.total.to_scalar::<f32>()?, l.ce_base, l.ce_aux, l.l1));
        let grads = l.total.backward()?;
        optimizer.step_with(&model.params, &grads, &settings, |_| Some(3e-3))?;
    }
    let (first, last) = (totals[0], totals[totals.len() - 1]);
    assert!(last.0 < 0.8 * first.0, "the loss went from {first:?} to {last:?}");
    assert!(last.2 < first.2 && last.3 < first.3, "CE_aux and L1 must fall: {first:?} → {last:?}");
    Ok(())
}

#[test]
fn kvp_train_cli_writes_a_file_that_reads_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, _) = write_base(dir.path())?;
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness. 1234 times over.\n"
        .repeat(30);
    std::fs::write(dir.path().join("train.txt"), &text)?;
    std::fs::write(dir.path().join("heldout.txt"), &text)?;
    let out = dir.path().join("trained.gguf");
    let args = KvpTrainArgs {
        model: path.clone(),
        out: out.clone(),
        minutes: 1.0,
        seq_len: 12,
        batch: 2,
        base_positions: 3,
        lr_aux: 1e-3,
        lr_pred: 1e-2,
        l1_weight: 1.0,
        grad_clip: 1.0,
        warmup: 1,
        max_steps: Some(3),
        threads: None,
        train_text: Some(dir.path().join("train.txt")),
        heldout_text: Some(dir.path().join("heldout.txt")),
        seed: 1,
        log: None,
        eval_minutes: 10.0,
        eval_batches: 2,
        init_aux: Some("every:2".into()),
    };
    super::run(&args)?;

    let bytes = std::fs::read(&out)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ints = |key: &str| -> Vec<i64> {
        file.get(key).and_then(|v| v.as_array()).and_then(|a| a.integers()).map(|i| i.collect()).unwrap_or_default()
    };
    assert_eq!(file.get(weights::KEY_BLOCK_COUNT).and_then(|v| v.as_u64()), Some(2));
    assert_eq!(ints(weights::KEY_LAYER_MAP), vec![0, 0, 1, 1]);
    assert_eq!(ints(weights::KEY_SOURCE_LAYERS), vec![0, 2]);
    let kv = shape().kv_dim() as u64;
    for a in 0..2 {
        for name in BLOCK_TENSORS {
            let aux = file.tensor(&format!("kvp.blk.{a}.{name}.weight")).expect("aux tensor written");
            let base = file.tensor(&format!("blk.0.{name}.weight")).expect("base tensor kept");
            assert_eq!((aux.ty, aux.shape()), (TensorType::F32, base.shape()), "kvp.blk.{a}.{name}");
        }
    }
    for l in 0..4 {
        for (suffix, dims) in
            [("k.weight", vec![kv, kv]), ("v.weight", vec![kv, kv]), ("k.bias", vec![kv]), ("v.bias", vec![kv])]
        {
            let t = file.tensor(&format!("kvp.pred.{l}.{suffix}")).expect("predictor tensor written");
            assert_eq!((t.ty, t.shape()), (TensorType::F32, dims.as_slice()), "kvp.pred.{l}.{suffix}");
        }
    }
    // The file reads back as a trained one, and training moved the predictor.
    let again = weights::load(&file, None, 12)?;
    assert_eq!(again.origin, Origin::FileTensors);
    let identity = Tensor::eye(kv as usize, candle_core::DType::F32, &Device::Cpu)?;
    let wk = again.model.params.iter().find(|p| p.name == "kvp.pred.0.k.weight").expect("read back");
    assert!(max_diff(wk.var.as_tensor(), &identity)? > 1e-4, "the predictor did not change");

    runtime_predicted_cache_matches_candle(&file, &again)?;

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("json"))?)?;
    assert_eq!(summary["steps"], 3);
    assert!(summary["end"]["ce_base"].as_f64().is_some_and(f64::is_finite));
    let log = std::fs::read_to_string(out.with_extension("jsonl"))?;
    assert_eq!(log.lines().filter(|l| l.contains("\"event\":\"step\"")).count(), 3);
    Ok(())
}

#[test]
fn kvp_quantized_or_unlaid_out_inputs_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, _) = write_base(dir.path())?;
    let message = |r: anyhow::Result<weights::Loaded>| r.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(message(load(&path, None, 16)).contains("--init-aux"));

    let bytes = std::fs::read(&path)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut w = GgufWriter::copy_of(&file, |name| name != "blk.1.ffn_up.weight");
    let (f, d) = (shape().ffn_dim as u64, shape().dim as u64);
    w.tensor("blk.1.ffn_up.weight", &[d, f], TensorType::Q8_0, vec![0; (d * f / 32 * 34) as usize]);
    let quantized = w.to_bytes();
    let file = GgufFile::parse(&quantized).map_err(|e| anyhow::anyhow!("{e}"))?;
    let e = message(weights::load(&file, Some(2), 16));
    assert!(e.contains("Q8_0") && e.contains("f32"), "{e}");

    let mut w = GgufWriter::copy_of(&file, |_| true);
    w.metadata("petrel.quant.scheme", MetadataValue::String("w4a4".into()));
    let tagged = w.to_bytes();
    let file = GgufFile::parse(&tagged).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(message(weights::load(&file, Some(2), 16)).contains("quantized"));

    // A layout naming a missing aux block's source is refused.
    let bytes = std::fs::read(&path)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut w = GgufWriter::copy_of(&file, |_| true);
    w.metadata(weights::KEY_BLOCK_COUNT, MetadataValue::U32(2))
        .metadata(weights::KEY_LAYER_MAP, MetadataValue::I32Array(vec![0, 0, 1, 2]));
    let bad = w.to_bytes();
    let file = GgufFile::parse(&bad).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(message(weights::load(&file, None, 16)).contains("aux block 2"));
    Ok(())
}

#[test]
fn kvp_ridge_style_files_start_from_their_source_blocks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, _) = write_base(dir.path())?;
    // A ridge-fit-like file: the layout and a (non-identity) predictor, no aux blocks.
    let bytes = std::fs::read(&path)?;
    let file = GgufFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let made = weights::load(&file, Some(2), 16)?;
    let wk = made.model.params.iter().find(|p| p.name == "kvp.pred.3.k.weight").expect("predictor");
    wk.var.set(&(wk.var.as_tensor() * 0.5)?)?;
    let mut w = GgufWriter::copy_of(&file, |_| true);
    made.layout.write_metadata(&mut w)?;
    for p in made.model.params.iter().filter(|p| p.name.starts_with("kvp.pred.")) {
        let t = p.var.as_tensor();
        let dims: Vec<u64> = t.dims().iter().rev().map(|&d| d as u64).collect();
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        w.tensor(&p.name, &dims, TensorType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    let ridge = w.to_bytes();
    let file = GgufFile::parse(&ridge).map_err(|e| anyhow::anyhow!("{e}"))?;
    let loaded = weights::load(&file, None, 16)?;
    assert_eq!(loaded.origin, Origin::SourceLayers);
    // Aux block 1 is base block 2; the predictor is the file's.
    for (i, name) in BLOCK_TENSORS.iter().enumerate() {
        let aux = &loaded.model.params[9 + i];
        assert_eq!(aux.name, format!("kvp.blk.1.{name}.weight"));
        assert_eq!(max_diff(aux.var.as_tensor(), &loaded.model.base[2][i])?, 0.0, "{name}");
    }
    let read = loaded.model.params.iter().find(|p| p.name == "kvp.pred.3.k.weight").expect("predictor");
    assert_eq!(max_diff(read.var.as_tensor(), wk.var.as_tensor())?, 0.0);

    // Training an aux block copy leaves the base block alone.
    let aux = &loaded.model.params[9 + 1];
    aux.var.set(&(aux.var.as_tensor() * 2.0)?)?;
    assert!(max_diff(aux.var.as_tensor(), &loaded.model.base[2][1])? > 0.0);

    // Some aux block tensors but not all: refused.
    let mut w = GgufWriter::copy_of(&file, |_| true);
    let q = file.tensor("blk.0.attn_q.weight").expect("base tensor");
    w.tensor("kvp.blk.0.attn_q.weight", q.shape(), q.ty, q.data.to_vec());
    let partial = w.to_bytes();
    let file = GgufFile::parse(&partial).map_err(|e| anyhow::anyhow!("{e}"))?;
    let e = weights::load(&file, None, 16).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(e.contains("all nine or none"), "{e}");
    Ok(())
}

/// The runtime's KV-prediction prefill of a trained file writes, for every base layer, the
/// rows the candle model computes from the same weights (auxiliary blocks, maps, RoPE).
fn runtime_predicted_cache_matches_candle(file: &GgufFile<'_>, loaded: &weights::Loaded) -> anyhow::Result<()> {
    use petrel_runtime::{Model, Session, SessionOptions};
    let model = Model::load(file)?;
    let predictor = model.kv_predictor.as_ref().expect("the runtime reads the predictor");
    assert!(predictor.own_blocks);
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 37 + 5) % shape().vocab as u32).collect();
    let options = SessionOptions { capacity: 16, kv_prediction: true, max_batch: 5, ..SessionOptions::default() };
    let mut session = Session::new(&model, options)?;
    session.prefill(&prompt)?;
    let n = prompt.len() - 1;
    let tokens = Tensor::from_vec(prompt[..n].to_vec(), (1, n), &Device::Cpu)?;
    let reference = loaded.model.predicted_cache(&tokens)?;
    let kv = shape().kv_dim();
    for (l, (keys, values)) in reference.iter().enumerate() {
        let (rk, rv) = session.kv_rows(l);
        assert_eq!(session.positions_through(l), (0..=n as u32).collect::<Vec<_>>());
        for (name, ours, theirs) in [("keys", &rk[..n * kv], keys), ("values", &rv[..n * kv], values)] {
            let theirs: Vec<f32> = theirs.flatten_all()?.to_vec1()?;
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 1e-4 * scale.max(1.0), "layer {l} {name}: off by {worst} at scale {scale}");
        }
    }
    Ok(())
}
