//! The committed Petrel-tiny model (models/petrel-tiny/): within its size budget, a W4A4
//! file the runtime loads, and a language model of English — its perplexity on a passage
//! written for this test (not from the training corpora) is far below the vocabulary's
//! 1,024 and close to what the release measured.

use petrel_runtime::{GgufFile, Model, Session, SessionOptions};

const MODEL: &[u8] = include_bytes!("../petrel-tiny/petrel-tiny-w4a4.gguf");

const PASSAGE: &str = "The old house stood at the end of the lane, and the children were \
afraid to go near it after dark. Their mother told them that there was nothing to fear, \
but the wind in the trees made strange sounds at night, and the windows were dark. One \
evening the eldest boy said that he would walk to the gate and back, and his sisters \
watched him from the door.";

/// Perplexity of the W4A4 file on [`PASSAGE`] when the model was committed (a uniform
/// guess over the vocabulary scores 1,024); the ±5% bound leaves room for a change of
/// float order, not of model.
const MEASURED_PPL: f64 = 21.97;

#[test]
fn petrel_tiny_fits_one_megabyte_and_models_english() {
    assert!(MODEL.len() <= 1_000_000, "{} bytes", MODEL.len());
    let file = GgufFile::parse(MODEL).expect("parses");
    assert_eq!(file.get("petrel.quant.scheme").and_then(|v| v.as_str()), Some("w4a4"));
    let model = Model::load(&file).expect("loads");
    let tokenizer = petrel_runtime::Tokenizer::from_gguf(&file).expect("tokenizer");
    let tokens = tokenizer.encode(PASSAGE, false);
    assert!(tokens.len() < model.config.context_length);
    let vocab = model.config.vocab_size;
    let mut session =
        Session::new(&model, SessionOptions { capacity: tokens.len(), threads: 1, ..SessionOptions::default() })
            .expect("session");
    let mut logits = vec![0f32; tokens.len() * vocab];
    session.prefill_all_logits(&tokens, &mut logits).expect("prefill");
    let mut nll = 0f64;
    for (row, &next) in logits.chunks(vocab).zip(&tokens[1..]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let log_z = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        nll += log_z - row[next as usize] as f64;
    }
    let ppl = (nll / (tokens.len() - 1) as f64).exp();
    println!("perplexity {ppl:.3} over {} tokens", tokens.len() - 1);
    assert!(ppl < 1.05 * MEASURED_PPL && ppl > 0.95 * MEASURED_PPL, "perplexity {ppl}, measured {MEASURED_PPL}");
}
