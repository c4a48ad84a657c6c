//! Mixture-of-depths routing in the runtime, on SmolLM2 with routers added to its file:
//! routing every token reproduces the dense model bit for bit, skipped tokens do no work
//! in a routed block and leave no cache rows there, results do not depend on the thread
//! count, truncation forgets routed rows correctly, and malformed routing metadata is
//! rejected at load.

mod common;

use std::sync::Mutex;

use common::model_file;
use petrel_runtime::forward::{ActivationTap, TapSite};
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::routing::{self, routed_count, PrefillRouting};
use petrel_runtime::sampler::argmax;
use petrel_runtime::{Model, ModelError, Session, SessionOptions};

/// Routing to add to a file: blocks, capacity, gate, and each router's bias.
struct Routing<'r> {
    layers: &'r [usize],
    capacity: f32,
    gate: &'r str,
    bias: f32,
    /// Length of each router's weight (the model's width, 576, unless testing bad input).
    router_len: usize,
}

fn noise(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// `source` with random routers (weights ±0.05) on `r.layers`.
fn with_routing(source: &GgufFile<'_>, r: &Routing<'_>, edit: impl Fn(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::copy_of(source, |_| true);
    w.metadata(routing::KEY_LAYERS, MetadataValue::I32Array(r.layers.iter().map(|&l| l as i32).collect()))
        .metadata(routing::KEY_CAPACITY, MetadataValue::F32(r.capacity))
        .metadata(routing::KEY_GATE, MetadataValue::String(r.gate.into()))
        .metadata(routing::KEY_DECISION, MetadataValue::String("router".into()));
    let dim = r.router_len;
    let mut seed = 11u64;
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for &l in r.layers {
        let weight: Vec<f32> = (0..dim).map(|_| 0.05 * noise(&mut seed)).collect();
        w.tensor(&format!("blk.{l}.mod_router.weight"), &[dim as u64], TensorType::F32, bytes(&weight));
        w.tensor(&format!("blk.{l}.mod_router.bias"), &[1], TensorType::F32, bytes(&[r.bias]));
    }
    edit(&mut w);
    w.to_bytes()
}

fn prompt(model: &Model<'_>) -> Vec<u32> {
    model.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs far away.", true)
}

/// Logits after the prompt and after each of 4 greedy steps.
fn run(model: &Model<'_>, threads: usize) -> Vec<f32> {
    let options = SessionOptions { capacity: 64, threads, ..SessionOptions::default() };
    let mut session = Session::new(model, options).expect("session");
    let mut all = session.prefill(&prompt(model)).expect("prefill").to_vec();
    let mut token = argmax(&all);
    for _ in 0..4 {
        let logits = session.step(token).expect("step");
        token = argmax(logits);
        all.extend_from_slice(logits);
    }
    all
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn routing_every_token_reproduces_the_dense_model_bit_for_bit() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let dense = Model::load(&source).expect("loads");
    let layers: Vec<usize> = (1..30).step_by(2).collect();
    // Capacity 1 takes every prefill token; a huge bias makes every decode decision positive.
    let bytes = with_routing(
        &source,
        &Routing { layers: &layers, capacity: 1.0, gate: "none", bias: 1e6, router_len: 576 },
        |_| {},
    );
    let file = GgufFile::parse(&bytes).expect("parses");
    let routed = Model::load(&file).expect("loads");
    assert_eq!(routed.routing.as_ref().map(|r| r.routed_layers().count()), Some(15));
    assert_eq!(bits(&run(&dense, 1)), bits(&run(&routed, 1)));
}

/// Counts the tokens each (layer, site) sees.
struct Counter(Mutex<Vec<[usize; 4]>>);

impl ActivationTap for Counter {
    fn observe(&self, layer: usize, site: TapSite, _rows: &[f32], tokens: usize, _cols: usize) {
        let i = TapSite::ALL.iter().position(|&s| s == site).expect("known site");
        self.0.lock().expect("not poisoned")[layer][i] += tokens;
    }
}

#[test]
fn skipped_tokens_do_no_work_and_leave_no_cache_rows() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let layers = [3usize, 10, 20];
    let bytes = with_routing(
        &source,
        &Routing { layers: &layers, capacity: 0.25, gate: "sigmoid", bias: 0.0, router_len: 576 },
        |_| {},
    );
    let file = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&file).expect("loads");
    let prompt = prompt(&model);
    let n = prompt.len();
    let counter = Counter(Mutex::new(vec![[0; 4]; 30]));
    let options = SessionOptions { capacity: 64, max_batch: 64, ..SessionOptions::default() };
    let mut session = Session::new(&model, options).expect("session");
    session.prefill_observed(&prompt, &counter).expect("prefill");
    let counts = counter.0.into_inner().expect("not poisoned");
    let k = routed_count(0.25, n);
    assert!(k < n);
    for (l, sites) in counts.iter().enumerate() {
        let expected = if layers.contains(&l) { k } else { n };
        assert_eq!(sites, &[expected; 4], "block {l}");
        assert_eq!(session.tokens_through(l), expected, "block {l}");
    }
    let dense_bytes = 30 * n * 2 * 64 * 3 * 4;
    assert_eq!(session.cache_bytes_in_use(), dense_bytes - 3 * (n - k) * 2 * 64 * 3 * 4);

    // Decoding: a routed block's rows grow only for tokens its router lets in, and every
    // dense block's grow by one per token.
    let mut token = argmax(session.prefill(&[prompt[0]]).expect("prefill"));
    let before: Vec<usize> = (0..30).map(|l| session.tokens_through(l)).collect();
    for _ in 0..12 {
        token = argmax(session.step(token).expect("step"));
    }
    for (l, &b) in before.iter().enumerate() {
        let grew = session.tokens_through(l) - b;
        if layers.contains(&l) {
            assert!(grew <= 12, "block {l}");
        } else {
            assert_eq!(grew, 12, "block {l}");
        }
    }
    let skipped: usize = layers.iter().map(|&l| 12 - (session.tokens_through(l) - before[l])).sum();
    assert!(skipped > 0 && skipped < 36, "random routers should route some decode tokens and skip some: {skipped}");
}

#[test]
fn routed_logits_are_bit_identical_across_threads_and_after_truncation() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let layers = [2usize, 5, 9, 14, 22];
    let bytes = with_routing(
        &source,
        &Routing { layers: &layers, capacity: 0.5, gate: "sigmoid", bias: 0.0, router_len: 576 },
        |_| {},
    );
    let file = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&file).expect("loads");
    let one = run(&model, 1);
    assert_eq!(bits(&one), bits(&run(&model, 2)));
    assert_eq!(bits(&one), bits(&run(&model, 3)));

    // Truncating back to the prompt and decoding again gives the same logits as before.
    let prompt = prompt(&model);
    let mut session = Session::new(&model, SessionOptions { capacity: 64, ..SessionOptions::default() }).expect("ok");
    let first = argmax(session.prefill(&prompt).expect("prefill"));
    let rows: Vec<usize> = (0..30).map(|l| session.tokens_through(l)).collect();
    let a = session.step(first).expect("step").to_vec();
    session.step(argmax(&a)).expect("step");
    session.truncate(prompt.len());
    assert_eq!(rows, (0..30).map(|l| session.tokens_through(l)).collect::<Vec<_>>());
    assert_eq!(bits(&a), bits(session.step(first).expect("step")));

    // Causal prefill routes each token by its own decision, independent of the batch.
    let causal = |max_batch: usize| {
        let options = SessionOptions {
            capacity: 64,
            max_batch,
            prefill_routing: PrefillRouting::Causal,
            ..SessionOptions::default()
        };
        let mut session = Session::new(&model, options).expect("session");
        session.prefill(&prompt).expect("prefill").to_vec()
    };
    assert_eq!(bits(&causal(64)), bits(&causal(5)));
}

#[test]
fn malformed_routing_is_rejected_at_load() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let load_error = |bytes: Vec<u8>| -> String {
        let file = GgufFile::parse(&bytes).expect("parses");
        let e: ModelError = Model::load(&file).expect_err("must be rejected");
        e.to_string()
    };
    let ok = Routing { layers: &[4, 8], capacity: 0.5, gate: "none", bias: 0.0, router_len: 576 };
    let missing_block = Routing { layers: &[4, 30], ..ok };
    let e = load_error(with_routing(&source, &missing_block, |_| {}));
    assert!(e.contains("petrel.mod.layers") && e.contains("does not have"), "{e}");
    for capacity in [0.0, -0.5, 1.5, f32::NAN] {
        let e = load_error(with_routing(&source, &Routing { capacity, ..ok }, |_| {}));
        assert!(e.contains("petrel.mod.capacity") && e.contains("(0, 1]"), "{capacity}: {e}");
    }
    let e = load_error(with_routing(&source, &Routing { layers: &[8, 4], ..ok }, |_| {}));
    assert!(e.contains("strictly increasing"), "{e}");
    let e = load_error(with_routing(&source, &Routing { gate: "tanh", ..ok }, |_| {}));
    assert!(e.contains("petrel.mod.gate"), "{e}");
    let e = load_error(with_routing(&source, &ok, |w| {
        w.metadata(routing::KEY_DECISION, MetadataValue::String("predictor".into()));
    }));
    assert!(e.contains("mod_pred_in.weight") && e.contains("missing"), "{e}");
    let e = load_error(with_routing(&source, &Routing { router_len: 575, ..ok }, |_| {}));
    assert!(e.contains("blk.4.mod_router.weight") && e.contains("shape"), "{e}");
    let e = load_error(with_routing(&source, &ok, |w| {
        w.metadata(routing::KEY_CAPACITY, MetadataValue::String("half".into()));
    }));
    assert!(e.contains("petrel.mod.capacity"), "{e}");
}
