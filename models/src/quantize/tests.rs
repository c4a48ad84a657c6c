//! The pipeline on the first two blocks of SmolLM2-135M (the model the CI pulls): QuaRot's
//! rotations leave the function unchanged, and GPTQ's Hessians reach the right layers.

use petrel_runtime::gguf::GgufFile;
use petrel_runtime::gguf_writer::MetadataValue;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::{Model, Session, SessionOptions};

use super::master::MasterWeights;
use super::{calibrate, write_model, Layout, Scheme, TableFormat};
use petrel_quant::w4::GroupSize;

const BLOCKS: usize = 2;

fn model_file() -> MappedFile {
    let model = crate::registry::known_model("smollm2-135m").expect("a known model");
    let path = crate::registry::cached_path(model).expect("a cache directory");
    assert!(path.exists(), "{} is missing: run `petrel pull smollm2-135m` first", path.display());
    MappedFile::open(path).expect("model maps")
}

fn dense(rotated: bool) -> Layout {
    Layout {
        scheme: Scheme::F32,
        group: GroupSize::PerChannel,
        act_clip: 1.0,
        rotated,
        act_order: false,
        embedding: TableFormat::F32,
        head: TableFormat::F32,
        dense_linears: TableFormat::F32,
        a8_sites: Vec::new(),
    }
}

/// Serializes the first [`BLOCKS`] blocks of `master`.
fn truncated_file(
    source: &GgufFile<'_>,
    master: &MasterWeights,
    layout: &Layout,
    h: Option<&calibrate::Hessians>,
) -> Vec<u8> {
    let mut w = write_model(source, master, layout, h).expect("serializes");
    w.metadata("llama.block_count", MetadataValue::U32(BLOCKS as u32));
    w.to_bytes()
}

/// Logits after every token of a fixed text.
fn logits(bytes: &[u8], text: &str) -> Vec<f32> {
    logits_with(bytes, text, 2, 64)
}

fn logits_with(bytes: &[u8], text: &str, threads: usize, max_batch: usize) -> Vec<f32> {
    let file = GgufFile::parse(bytes).expect("parses");
    let model = Model::load(&file).expect("loads");
    let tokens = model.tokenizer.encode(text, false);
    let options = SessionOptions { capacity: 64, threads, max_batch, ..SessionOptions::default() };
    let mut session = Session::new(&model, options).expect("session");
    let mut out = vec![0f32; tokens.len() * model.config.vocab_size];
    session.prefill_all_logits(&tokens, &mut out).expect("runs");
    out
}

fn mean_squared_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog, and the dog, being lazy, does nothing at all.";

#[test]
fn rotations_leave_the_function_unchanged() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&source).expect("loads");
    let mut master = MasterWeights::from_model(&model);
    master.layers.truncate(BLOCKS);
    let plain = logits(&truncated_file(&source, &master, &dense(false), None), TEXT);
    master.rotate(7).expect("SmolLM2's sizes have Hadamard matrices");
    assert!(master.layers.iter().all(|l| l.attn_norm.iter().chain(&l.ffn_norm).all(|&g| g == 1.0)));
    let rotated = logits(&truncated_file(&source, &master, &dense(true), None), TEXT);
    let worst = plain.iter().zip(&rotated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = plain.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(worst <= 2e-4 * scale.max(1.0), "rotation changed the logits by up to {worst} (max |logit| {scale})");
}

/// W4A4 with the online Hadamard (split across the team by tokens): bit-identical logits
/// for any thread count and batch size.
#[test]
fn rotated_w4a4_is_bit_identical_across_threads_and_batches() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&source).expect("loads");
    let mut master = MasterWeights::from_model(&model);
    master.layers.truncate(BLOCKS);
    master.rotate(3).expect("rotates");
    let w4a4 = Layout {
        scheme: Scheme::W4a4,
        act_clip: 0.8,
        group: GroupSize::G32,
        embedding: TableFormat::Q8_0,
        head: TableFormat::Q8_0,
        ..dense(true)
    };
    let bytes = truncated_file(&source, &master, &w4a4, None);
    let reference = logits_with(&bytes, TEXT, 1, 64);
    for (threads, max_batch) in [(2, 64), (3, 64), (2, 5), (1, 3)] {
        let other = logits_with(&bytes, TEXT, threads, max_batch);
        assert!(
            reference.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()),
            "threads {threads}, batch {max_batch} changed the logits"
        );
    }
}

#[test]
fn gptq_beats_round_to_nearest_on_the_rotated_blocks() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&source).expect("loads");
    let mut master = MasterWeights::from_model(&model);
    master.layers.truncate(BLOCKS);
    master.rotate(1).expect("rotates");
    let reference = logits(&truncated_file(&source, &master, &dense(true), None), TEXT);

    // Calibrate on other text with the truncated model at 8 bits, as the pipeline does.
    let calib_bytes = truncated_file(&source, &master, &Layout::calibration(true), None);
    let calib_file = GgufFile::parse(&calib_bytes).expect("parses");
    let calib_model = Model::load(&calib_file).expect("loads");
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of \
                foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, \
                it was the season of Darkness, it was the spring of hope, it was the winter of despair.";
    let tokens = calib_model.tokenizer.encode(&text.repeat(6), false);
    let sequences: Vec<Vec<u32>> = tokens.chunks_exact(64).map(<[u32]>::to_vec).collect();
    let hessians = calibrate::collect(&calib_model, &sequences, 2).expect("calibrates");
    assert_eq!(hessians.tokens, sequences.len() * 64);

    let w4 = Layout { scheme: Scheme::W4a16, embedding: TableFormat::Q8_0, head: TableFormat::Q8_0, ..dense(true) };
    let rtn = logits(&truncated_file(&source, &master, &w4, None), TEXT);
    let gptq = logits(&truncated_file(&source, &master, &w4, Some(&hessians)), TEXT);
    let (e_rtn, e_gptq) = (mean_squared_difference(&rtn, &reference), mean_squared_difference(&gptq, &reference));
    assert!(e_gptq < 0.9 * e_rtn, "GPTQ logit error {e_gptq} is not below round-to-nearest's {e_rtn}");
}

/// A KV predictor survives QuaRot: with its own auxiliary block and random maps, the
/// predicted prefill's logits are unchanged by the rotation (the value maps are
/// conjugated by the per-head Hadamard, the auxiliary block rotated like a base block).
#[test]
fn rotations_leave_kv_predicted_prefill_unchanged() {
    use petrel_runtime::kv_predict::{KEY_BLOCK_COUNT, KEY_LAYER_MAP};

    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&source).expect("loads");
    let mut master = MasterWeights::from_model(&model);
    master.layers.truncate(BLOCKS);
    let kv = model.config.kv_dim();
    let mut seed = 3u64;
    let mut noise = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut map = || {
        let data = (0..kv * kv).map(|i| if i / kv == i % kv { 1.0 } else { 0.0 } + 0.05 * noise()).collect();
        (super::master::Matrix { rows: kv, cols: kv, data }, (0..kv).map(|_| 0.1 * noise()).collect::<Vec<f32>>())
    };
    let keys = (0..BLOCKS).map(|_| map()).collect();
    let values = (0..BLOCKS).map(|_| map()).collect();
    master.kvp = Some(super::master::MasterKvp { aux_layers: vec![master.layers[1].clone()], keys, values });
    let predicted_logits = |master: &MasterWeights, rotated: bool| {
        let mut w = write_model(&source, master, &dense(rotated), None).expect("serializes");
        w.metadata("llama.block_count", MetadataValue::U32(BLOCKS as u32))
            .metadata(KEY_BLOCK_COUNT, MetadataValue::U32(1))
            .metadata(KEY_LAYER_MAP, MetadataValue::I32Array(vec![0; BLOCKS]));
        let bytes = w.to_bytes();
        let file = GgufFile::parse(&bytes).expect("parses");
        let model = Model::load(&file).expect("loads");
        assert!(model.kv_predictor.as_ref().is_some_and(|p| p.own_blocks));
        let tokens = model.tokenizer.encode(TEXT, false);
        let options = SessionOptions { capacity: 64, kv_prediction: true, ..SessionOptions::default() };
        let mut session = Session::new(&model, options).expect("session");
        session.prefill(&tokens).expect("runs").to_vec()
    };
    let plain = predicted_logits(&master, false);
    master.rotate(7).expect("rotates");
    let rotated = predicted_logits(&master, true);
    let worst = plain.iter().zip(&rotated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = plain.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(worst <= 2e-4 * scale.max(1.0), "rotation changed the logits by up to {worst} (max |logit| {scale})");
}
