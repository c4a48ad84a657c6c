//! KV-prediction prefill in the runtime, on SmolLM2 with a predictor added to its file: an
//! exact predictor (the auxiliary model is the whole base, identity maps) reproduces the
//! base's prefill; predicted rows equal a direct computation from the auxiliary model's
//! cache; the predicted cache has the base's shapes and positions (also with mixture of
//! depths); the feature off leaves outputs bit-identical; malformed predictors are
//! rejected at load.

mod common;

use common::model_file;
use petrel_runtime::gguf::{GgufFile, TensorType};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::kv_predict::{KEY_BLOCK_COUNT, KEY_LAYER_MAP, KEY_SOURCE_LAYERS};
use petrel_runtime::ops;
use petrel_runtime::routing;
use petrel_runtime::sampler::argmax;
use petrel_runtime::{Model, ModelError, Session, SessionError, SessionOptions};

const LAYERS: usize = 30;
const KV: usize = 192;

fn noise(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A predictor to add to a file.
struct Predictor<'p> {
    source_layers: &'p [usize],
    layer_map: Vec<usize>,
    /// Identity maps with zero bias, or random ones (`I + noise`, bias ±0.1).
    identity: bool,
}

/// `source` with `p` added; `edit` may then break it.
fn with_predictor(source: &GgufFile<'_>, p: &Predictor<'_>, edit: impl Fn(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::copy_of(source, |_| true);
    w.metadata(KEY_BLOCK_COUNT, MetadataValue::U32(p.source_layers.len() as u32))
        .metadata(KEY_LAYER_MAP, MetadataValue::I32Array(p.layer_map.iter().map(|&a| a as i32).collect()))
        .metadata(KEY_SOURCE_LAYERS, MetadataValue::I32Array(p.source_layers.iter().map(|&l| l as i32).collect()));
    let mut seed = 5u64;
    for l in 0..p.layer_map.len() {
        for which in ["k", "v"] {
            let weight: Vec<f32> = (0..KV * KV)
                .map(|i| {
                    let diagonal = if i / KV == i % KV { 1.0 } else { 0.0 };
                    if p.identity {
                        diagonal
                    } else {
                        diagonal + 0.02 * noise(&mut seed)
                    }
                })
                .collect();
            let bias: Vec<f32> = (0..KV).map(|_| if p.identity { 0.0 } else { 0.1 * noise(&mut seed) }).collect();
            w.tensor(&format!("kvp.pred.{l}.{which}.weight"), &[KV as u64, KV as u64], TensorType::F32, bytes(&weight));
            w.tensor(&format!("kvp.pred.{l}.{which}.bias"), &[KV as u64], TensorType::F32, bytes(&bias));
        }
    }
    edit(&mut w);
    w.to_bytes()
}

fn every_block() -> Predictor<'static> {
    const ALL: [usize; LAYERS] = {
        let mut a = [0; LAYERS];
        let mut i = 0;
        while i < LAYERS {
            a[i] = i;
            i += 1;
        }
        a
    };
    Predictor { source_layers: &ALL, layer_map: (0..LAYERS).collect(), identity: true }
}

fn prompt(model: &Model<'_>) -> Vec<u32> {
    model.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest, where the owls live.",
        true,
    )
}

fn session<'m, 'a>(model: &'m Model<'a>, kv_prediction: bool, threads: usize) -> Session<'m, 'a> {
    let options = SessionOptions { capacity: 96, threads, kv_prediction, max_batch: 16, ..SessionOptions::default() };
    Session::new(model, options).expect("session")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Logits after the prompt and greedy tokens for 6 steps.
fn greedy(session: &mut Session<'_, '_>, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let first = session.prefill(prompt).expect("prefill").to_vec();
    let mut tokens = vec![argmax(&first) as u32];
    for _ in 0..5 {
        let logits = session.step(tokens[tokens.len() - 1]).expect("step");
        tokens.push(argmax(logits) as u32);
    }
    (first, tokens)
}

#[test]
fn an_exact_predictor_reproduces_the_base_prefill() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("parses");
    let bytes = with_predictor(&source, &every_block(), |_| {});
    let gguf = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&gguf).expect("loads");
    let prompt = prompt(&model);
    let (base_logits, base_tokens) = greedy(&mut session(&model, false, 1), &prompt);
    let mut predicted = session(&model, true, 1);
    assert!(predicted.predicts_prefill(&prompt));
    let (logits, tokens) = greedy(&mut predicted, &prompt);
    let scale = base_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = base_logits.iter().zip(&logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // Un-rotating, mapping by I and rotating again changes keys by float rounding only;
    // the 8-bit activation quantization downstream may flip an occasional rounding.
    assert!(diff < 1e-2 * scale, "max difference {diff} at scale {scale}");
    assert_eq!(tokens, base_tokens);
}

#[test]
fn predicted_rows_are_the_mapped_auxiliary_rows_at_the_base_positions() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("parses");
    let keep = [0usize, 10, 20];
    let p = Predictor { source_layers: &keep, layer_map: (0..LAYERS).map(|l| l / 10).collect(), identity: false };
    let bytes = with_predictor(&source, &p, |_| {});
    let gguf = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&gguf).expect("loads");
    let predictor = model.kv_predictor.as_ref().expect("has a predictor");
    assert_eq!(predictor.aux.layers.len(), 3);
    assert!(predictor.aux.layers[1].wq.same_data(&model.layers[10].wq), "the auxiliary model reuses base blocks");
    let prompt = prompt(&model);
    let n = prompt.len() - 1;

    let mut aux = session(&predictor.aux, false, 1);
    aux.prefill(&prompt[..n]).expect("aux prefill");
    let mut predicted = session(&model, true, 2);
    predicted.prefill(&prompt).expect("predicted prefill");
    assert_eq!(predicted.position(), prompt.len());

    let c = &model.config;
    let mut table = vec![0f32; c.rope_dim];
    for l in 0..LAYERS {
        // Every base layer has a row per prompt position: n predicted, then the last token's.
        assert_eq!(predicted.tokens_through(l), prompt.len());
        assert_eq!(predicted.positions_through(l), (0..prompt.len() as u32).collect::<Vec<_>>());
        let (aux_keys, aux_values) = aux.kv_rows(l / 10);
        let (keys, values) = predicted.kv_rows(l);
        let (key_map, value_map) = (&predictor.keys[l], &predictor.values[l]);
        let weight = |m: &petrel_runtime::kv_predict::AffineMap<'_>, r: usize| {
            let mut row = vec![0f32; KV];
            m.weight.dequantize_row(r, &mut row);
            row
        };
        let (wk, wv): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (0..KV).map(|r| (weight(key_map, r), weight(value_map, r))).unzip();
        for t in 0..n {
            ops::rope_table(&mut table, t, c.rope_dim, c.rope_bases[0]);
            let mut x = aux_keys[t * KV..(t + 1) * KV].to_vec();
            ops::unapply_rope(&mut x, c.head_dim, &table);
            let mut expected_k: Vec<f32> = (0..KV)
                .map(|r| {
                    (wk[r].iter().zip(&x).map(|(w, v)| *w as f64 * *v as f64).sum::<f64>()) as f32 + key_map.bias[r]
                })
                .collect();
            ops::apply_rope(&mut expected_k, c.head_dim, &table);
            let xv = &aux_values[t * KV..(t + 1) * KV];
            let expected_v: Vec<f32> = (0..KV)
                .map(|r| {
                    (wv[r].iter().zip(xv).map(|(w, v)| *w as f64 * *v as f64).sum::<f64>()) as f32 + value_map.bias[r]
                })
                .collect();
            for (got, want) in keys[t * KV..(t + 1) * KV].iter().zip(&expected_k) {
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "layer {l} row {t}: key {got} vs {want}");
            }
            for (got, want) in values[t * KV..(t + 1) * KV].iter().zip(&expected_v) {
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "layer {l} row {t}: value {got} vs {want}");
            }
        }
    }

    // One and two threads, prefill + steps and generate: the same results.
    let (one, tokens_one) = greedy(&mut session(&model, true, 1), &prompt);
    let (two, tokens_two) = greedy(&mut session(&model, true, 2), &prompt);
    assert_eq!(bits(&one), bits(&two));
    assert_eq!(tokens_one, tokens_two);
    let mut generated = Vec::new();
    let mut sampler = petrel_runtime::sampler::Sampler::new(
        petrel_runtime::sampler::SamplerConfig { temperature: 0.0, ..Default::default() },
        c.vocab_size,
    );
    session(&model, true, 2)
        .generate(&prompt, &mut sampler, 6, |t| {
            generated.push(t);
            true
        })
        .expect("generate");
    assert_eq!(generated, tokens_one);

    // A later turn runs the base: only a fresh conversation is predicted.
    let mut s = session(&model, true, 1);
    s.prefill(&prompt).expect("first turn");
    assert!(!s.predicts_prefill(&prompt[..4]));
    s.reset();
    assert!(s.predicts_prefill(&prompt));
    assert!(!s.predicts_prefill(&prompt[..1]), "a one-token prompt has nothing to predict");
}

#[test]
fn with_the_feature_off_outputs_are_the_plain_base_bit_for_bit() {
    let file = model_file();
    let plain = GgufFile::parse(file.bytes()).expect("parses");
    let base = Model::load(&plain).expect("loads");
    let bytes = with_predictor(&plain, &every_block(), |_| {});
    let gguf = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&gguf).expect("loads");
    let prompt = prompt(&base);
    let (a, ta) = greedy(&mut session(&base, false, 2), &prompt);
    let (b, tb) = greedy(&mut session(&model, false, 2), &prompt);
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(ta, tb);
    let options = SessionOptions { kv_prediction: true, ..SessionOptions::default() };
    assert_eq!(Session::new(&base, options).err(), Some(SessionError::NoKvPredictor));
}

#[test]
fn mixture_of_depths_blocks_receive_predicted_rows_for_every_prompt_position() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("parses");
    let routed = [5usize, 9];
    let bytes = with_predictor(&source, &every_block(), |w| {
        w.metadata(routing::KEY_LAYERS, MetadataValue::I32Array(routed.iter().map(|&l| l as i32).collect()))
            .metadata(routing::KEY_CAPACITY, MetadataValue::F32(0.5))
            .metadata(routing::KEY_GATE, MetadataValue::String("none".into()))
            .metadata(routing::KEY_DECISION, MetadataValue::String("router".into()));
        for &l in &routed {
            // A router that never routes: decode skips these blocks entirely.
            w.tensor(&format!("blk.{l}.mod_router.weight"), &[576], TensorType::F32, bytes(&[0.0; 576]));
            w.tensor(&format!("blk.{l}.mod_router.bias"), &[1], TensorType::F32, bytes(&[-1.0]));
        }
    });
    let gguf = GgufFile::parse(&bytes).expect("parses");
    let model = Model::load(&gguf).expect("loads");
    let prompt = prompt(&model);
    let n = prompt.len() - 1;
    let mut s = session(&model, true, 1);
    let logits = s.prefill(&prompt).expect("prefill").to_vec();
    assert!(logits.iter().all(|v| v.is_finite()));
    for l in 0..LAYERS {
        let expected: Vec<u32> = if routed.contains(&l) { (0..n as u32).collect() } else { (0..=n as u32).collect() };
        assert_eq!(s.positions_through(l), expected, "block {l}");
    }
    let next = argmax(&logits) as u32;
    s.step(next).expect("step");
    assert_eq!(s.tokens_through(5), n, "the router skips decoded tokens");
    assert_eq!(s.tokens_through(0), n + 2);
}

#[test]
fn malformed_predictors_are_rejected_at_load() {
    let file = model_file();
    let source = GgufFile::parse(file.bytes()).expect("parses");
    let keep = [0usize, 15];
    let good = || Predictor { source_layers: &keep, layer_map: (0..LAYERS).map(|l| l / 15).collect(), identity: true };
    let load = |p: &Predictor<'_>, edit: &dyn Fn(&mut GgufWriter)| {
        let bytes = with_predictor(&source, p, edit);
        let gguf = GgufFile::parse(&bytes).expect("parses");
        Model::load(&gguf).map(|m| m.kv_predictor.is_some())
    };
    assert_eq!(load(&good(), &|_| {}), Ok(true));
    let bad_metadata = |r: Result<bool, ModelError>, key: &str| match r {
        Err(ModelError::BadMetadata { key: k, .. }) => assert_eq!(k, key),
        other => panic!("expected bad {key}, got {other:?}"),
    };
    let mut outside = good();
    outside.layer_map[7] = 2;
    bad_metadata(load(&outside, &|_| {}), KEY_LAYER_MAP);
    let mut short = good();
    short.layer_map.pop();
    bad_metadata(load(&short, &|_| {}), KEY_LAYER_MAP);
    bad_metadata(
        load(&good(), &|w| {
            w.metadata(KEY_SOURCE_LAYERS, MetadataValue::I32Array(vec![0, 30]));
        }),
        KEY_SOURCE_LAYERS,
    );
    bad_metadata(
        load(&good(), &|w| {
            w.metadata(KEY_BLOCK_COUNT, MetadataValue::U32(0));
        }),
        KEY_BLOCK_COUNT,
    );
    // A map of the wrong shape, a missing bias, a non-finite bias.
    let shape = load(&good(), &|w| {
        w.remove_tensor("kvp.pred.3.v.weight").tensor(
            "kvp.pred.3.v.weight",
            &[KV as u64, 96],
            TensorType::F32,
            bytes(&vec![0.0; KV * 96]),
        );
    });
    assert!(
        matches!(shape, Err(ModelError::BadTensorShape { ref tensor, .. }) if tensor == "kvp.pred.3.v.weight"),
        "{shape:?}"
    );
    let without = |drop: &dyn Fn(&str) -> bool| {
        let full = with_predictor(&source, &good(), |_| {});
        let bytes = GgufWriter::copy_of(&GgufFile::parse(&full).expect("parses"), |n| !drop(n)).to_bytes();
        Model::load(&GgufFile::parse(&bytes).expect("parses")).map(|_| ())
    };
    assert_eq!(without(&|n| n == "kvp.pred.29.k.bias"), Err(ModelError::MissingTensor("kvp.pred.29.k.bias".into())));
    let nan = load(&good(), &|w| {
        w.remove_tensor("kvp.pred.0.k.bias").tensor(
            "kvp.pred.0.k.bias",
            &[KV as u64],
            TensorType::F32,
            bytes(&[f32::NAN; KV]),
        );
    });
    assert!(matches!(nan, Err(ModelError::BadTensorValues { .. })), "{nan:?}");
    // Auxiliary blocks that are neither stored nor named by source_layers.
    let no_blocks = without(&|n| n == KEY_SOURCE_LAYERS);
    assert!(matches!(no_blocks, Err(ModelError::MissingTensor(_))), "{no_blocks:?}");
    // Predictor tensors without the metadata that says what they are.
    let stray = without(&|n| n.starts_with("petrel.kvp."));
    assert!(matches!(stray, Err(ModelError::BadTensorValues { .. })), "{stray:?}");
}
