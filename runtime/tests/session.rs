//! The `Session` API on SmolLM2: thread counts change nothing, generation streams and
//! stops where it should, and a prompt that does not fit is an error, not a panic.

mod common;

use common::model_file;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::sampler::argmax;
use petrel_runtime::tokenizer::{format_chat, ChatMessage};
use petrel_runtime::{Model, Sampler, SamplerConfig, Session, SessionError, SessionOptions, StopReason};

fn chat_prompt(model: &Model<'_>) -> Vec<u32> {
    let messages = [ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }];
    model.tokenizer.encode(&format_chat(&messages, true), true)
}

#[test]
fn logits_are_bit_identical_for_every_thread_count_and_batch_size() {
    let file = model_file();
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&gguf).expect("model loads");
    let prompt = chat_prompt(&model);
    let run = |threads: usize, max_batch: usize| {
        let options = SessionOptions { capacity: 64, threads, max_batch, ..SessionOptions::default() };
        let mut session = Session::new(&model, options).expect("session");
        let mut all = session.prefill(&prompt).expect("prefill").to_vec();
        let mut token = argmax(&all);
        for _ in 0..4 {
            let logits = session.step(token).expect("step");
            token = argmax(logits);
            all.extend_from_slice(logits);
        }
        all
    };
    let reference = run(1, 64);
    for (threads, max_batch) in [(2, 64), (3, 64), (1, 5), (2, 3)] {
        let other = run(threads, max_batch);
        assert!(
            reference.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()),
            "threads {threads}, batch {max_batch} changed the logits"
        );
    }
}

#[test]
fn generate_streams_the_answer_and_stops_at_end_of_turn() {
    let file = model_file();
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&gguf).expect("model loads");
    let prompt = chat_prompt(&model);
    for threads in [1, 2] {
        let options = SessionOptions { capacity: 128, threads, ..Default::default() };
        let mut session = Session::new(&model, options).expect("session");
        let mut sampler = Sampler::new(SamplerConfig::default(), model.config.vocab_size);
        let mut tokens = Vec::new();
        let reason = session
            .generate(&prompt, &mut sampler, 64, |t| {
                tokens.push(t);
                true
            })
            .expect("generate");
        assert_eq!(reason, StopReason::EndOfGeneration);
        assert_eq!(model.tokenizer.decode(&tokens), "The capital of France is Paris.");
        // The cache holds the prompt and every token fed back (not the end-of-turn token).
        assert_eq!(session.position(), prompt.len() + tokens.len());

        // The callback can stop generation; zero tokens means none.
        session.reset();
        let mut count = 0;
        let reason = session.generate(&prompt, &mut sampler, 64, |_| {
            count += 1;
            count < 3
        });
        assert_eq!((reason, count), (Ok(StopReason::Callback), 3));
        session.reset();
        let reason = session.generate(&prompt, &mut sampler, 0, |_| panic!("no token expected"));
        assert_eq!(reason, Ok(StopReason::MaxTokens));
    }
}

#[test]
fn prompts_that_do_not_fit_are_errors() {
    let file = model_file();
    let gguf = GgufFile::parse(file.bytes()).expect("valid GGUF");
    let model = Model::load(&gguf).expect("model loads");
    let prompt = chat_prompt(&model);
    let options = SessionOptions { capacity: 8, threads: 2, ..Default::default() };
    let mut session = Session::new(&model, options).expect("session");
    let mut sampler = Sampler::new(SamplerConfig::default(), model.config.vocab_size);
    let needed = prompt.len();
    assert_eq!(session.prefill(&prompt).unwrap_err(), SessionError::ContextFull { needed, capacity: 8 });
    assert_eq!(
        session.generate(&prompt, &mut sampler, 4, |_| true).unwrap_err(),
        SessionError::ContextFull { needed, capacity: 8 }
    );
    assert_eq!(session.position(), 0, "a refused prompt leaves the cache untouched");
    assert_eq!(session.prefill(&[]).unwrap_err(), SessionError::EmptyPrompt);
    assert_eq!(
        session.step(60_000).unwrap_err(),
        SessionError::TokenOutOfRange { token: 60_000, vocab_size: model.config.vocab_size }
    );
    let too_big = SessionOptions { capacity: 1 << 20, ..Default::default() };
    assert!(matches!(Session::new(&model, too_big), Err(SessionError::CapacityTooLarge { .. })));
    // Generation that reaches the end of the cache stops cleanly.
    let options = SessionOptions { capacity: needed + 3, threads: 2, ..Default::default() };
    let mut session = Session::new(&model, options).expect("session");
    let mut produced = 0;
    let reason = session.generate(&prompt, &mut sampler, 64, |_| {
        produced += 1;
        true
    });
    assert_eq!(reason, Ok(StopReason::ContextFull));
    assert_eq!(session.position(), needed + 3);
    assert_eq!(produced, 4);
}
