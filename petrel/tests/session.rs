//! The owned API end to end: on Petrel-tiny (committed, fast) and SmolLM2-135M (pulled by CI).

use std::path::PathBuf;

use petrel::{ChatMessage, ErrorKind, KvType, Model, ModelParams, SamplingParams, Session, SessionParams, StopReason};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/petrel-tiny/petrel-tiny-w4a4.gguf");

fn tiny() -> Model {
    Model::open(TINY, &ModelParams::default()).expect("Petrel-tiny opens")
}

fn smollm2() -> Model {
    let known = petrel::registry::known_model("smollm2-135m").expect("a known model");
    let path: PathBuf = petrel::registry::cached_path(known).expect("a cache directory");
    assert!(path.exists(), "{} is missing: run `petrel pull smollm2-135m` first", path.display());
    Model::open_path(&path, &ModelParams::default()).expect("SmolLM2 opens")
}

fn params(kv_type: KvType) -> SessionParams {
    SessionParams { context: 256, threads: 1, kv_type, ..SessionParams::default() }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, ..SamplingParams::default() }
}

#[test]
fn models_and_sessions_are_owned_and_move_between_threads() {
    fn owned_and_send<T: Send + 'static>() {}
    owned_and_send::<Model>();
    owned_and_send::<Session>();
    let model = tiny();
    let mut session = model.session(&params(KvType::F32)).expect("a session");
    drop(model);
    let handle =
        std::thread::spawn(move || session.generate("Once upon a time", &greedy(8), |_| true).map(|c| c.tokens.len()));
    let generated = handle.join().expect("the thread finishes").expect("generates");
    assert!(generated >= 1);
}

#[test]
fn tokenize_detokenize_and_bad_ids() {
    let model = tiny();
    let ids = model.tokenize("hello world", false, false);
    assert_eq!(model.detokenize(&ids).expect("valid ids"), "hello world");
    let e = model.detokenize(&[u32::MAX]).expect_err("out of range");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = Model::open("/nonexistent.gguf", &ModelParams::default()).expect_err("no file");
    assert_eq!(e.kind(), ErrorKind::UnknownModel);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(TINY).expect("reads");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("writes");
    let e = Model::open_path(&truncated, &ModelParams::default()).expect_err("a truncated file");
    assert_eq!(e.kind(), ErrorKind::InvalidModel, "{e}");
    assert!(e.to_string().contains("truncated.gguf"), "{e}");
}

#[test]
fn the_callback_and_the_iterator_give_the_same_reply() {
    let model = tiny();
    let mut session = model.session(&params(KvType::F16)).expect("a session");
    let mut pieces = String::new();
    let called = session
        .generate("The little dog", &greedy(24), |piece| {
            pieces.push_str(piece);
            true
        })
        .expect("generates");
    assert_eq!(pieces, called.text);
    session.reset();
    let mut stream = session.stream("The little dog", &greedy(24)).expect("streams");
    let streamed: String = stream.by_ref().map(|p| p.expect("a piece")).collect();
    let completion = stream.completion().expect("ended").clone();
    assert_eq!(streamed, called.text);
    assert_eq!(completion.tokens, called.tokens);
    assert_eq!(completion.stop, called.stop);
    drop(stream);
    assert_eq!(session.tokens().len(), completion.prompt_tokens + completion.tokens.len());
}

#[test]
fn a_restored_session_continues_with_the_same_tokens() {
    let model = tiny();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let saved = dir.path().join("conversation.petrel");
    for kv_type in [KvType::F32, KvType::F16, KvType::Q8] {
        let mut first = model.session(&params(kv_type)).expect("a session");
        first.generate("Once upon a time", &greedy(10), |_| true).expect("generates");
        first.save_state(&saved).expect("saves");
        let went_on = first.generate(" Then", &greedy(16), |_| true).expect("continues");

        // A fresh session, another context size, the same continuation.
        let mut second = model.session(&SessionParams { context: 128, ..params(kv_type) }).expect("a session");
        second.load_state(&saved).expect("loads");
        let restored = second.generate(" Then", &greedy(16), |_| true).expect("continues");
        assert_eq!(restored.tokens, went_on.tokens, "{kv_type:?}");
        assert_eq!(second.tokens(), first.tokens());
    }
    // Refused: another cache type, a truncated file, an altered byte, another model.
    let mut other = model.session(&params(KvType::F32)).expect("a session");
    let e = other.load_state(&saved).expect_err("saved with q8");
    assert!(e.kind() == ErrorKind::InvalidState && e.to_string().contains("q8"), "{e}");
    let bytes = std::fs::read(&saved).expect("reads");
    let mut session = model.session(&params(KvType::Q8)).expect("a session");
    let broken = dir.path().join("broken.petrel");
    std::fs::write(&broken, &bytes[..bytes.len() - 7]).expect("writes");
    assert_eq!(session.load_state(&broken).expect_err("truncated").kind(), ErrorKind::InvalidState);
    let mut altered = bytes.clone();
    altered[bytes.len() / 2] ^= 1;
    std::fs::write(&broken, &altered).expect("writes");
    assert_eq!(session.load_state(&broken).expect_err("altered").kind(), ErrorKind::InvalidState);
    assert!(session.tokens().is_empty());
    let mut another = smollm2().session(&params(KvType::Q8)).expect("a session");
    let e = another.load_state(&saved).expect_err("another model");
    assert!(e.to_string().contains("another model"), "{e}");
}

#[test]
fn an_over_long_prompt_is_refused_and_the_session_is_untouched() {
    let model = tiny();
    let mut session = model.session(&SessionParams { context: 32, ..params(KvType::F32) }).expect("a session");
    session.generate("Hi", &greedy(4), |_| true).expect("fits");
    let before = session.tokens().to_vec();
    let long = "word ".repeat(100);
    let e = session.generate(&long, &greedy(4), |_| true).expect_err("too long");
    assert_eq!(e.kind(), ErrorKind::ContextFull);
    assert!(e.to_string().contains("context holds 32"), "{e}");
    assert_eq!(session.tokens(), &before[..]);
    let e = session.generate("x", &SamplingParams { temperature: f32::NAN, ..greedy(4) }, |_| true).expect_err("NaN");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn cancellation_and_stop_sequences_end_a_reply() {
    let model = tiny();
    let mut session = model.session(&params(KvType::F32)).expect("a session");
    let cancel = session.cancel_handle();
    let mut pieces = 0;
    let reply = session
        .generate("Once upon a time", &greedy(64), |_| {
            pieces += 1;
            if pieces == 3 {
                cancel.cancel();
            }
            true
        })
        .expect("generates");
    assert_eq!((reply.stop, reply.tokens.len()), (StopReason::Cancelled, 3));
    // The flag is spent: the next reply runs in full.
    session.reset();
    let full = session.generate("Once upon a time", &greedy(16), |_| true).expect("generates");
    assert_ne!(full.stop, StopReason::Cancelled);
    // A stop sequence taken from the reply itself cuts it there.
    let cut = full.text.trim_start().split(' ').nth(1).map(str::to_string);
    if let Some(word) = cut.filter(|w| !w.is_empty()) {
        session.reset();
        let stopped = session
            .generate("Once upon a time", &SamplingParams { stop: vec![word.clone()], ..greedy(16) }, |_| true)
            .expect("generates");
        assert_eq!(stopped.stop, StopReason::StopSequence);
        assert!(
            !stopped.text.contains(&word) && full.text.starts_with(&stopped.text),
            "{:?} / {:?}",
            stopped.text,
            full.text
        );
    }
}

#[test]
fn smollm2_answers_paris_and_a_second_turn_reuses_the_cached_prefix() {
    let model = smollm2();
    let mut session =
        model.session(&SessionParams { context: 512, threads: 2, ..SessionParams::default() }).expect("a session");
    let mut messages =
        vec![ChatMessage::system("You are a helpful assistant."), ChatMessage::user("What is the capital of France?")];
    let first = session.chat(&messages, &greedy(32), |_| true).expect("replies");
    assert!(first.text.contains("Paris"), "{:?}", first.text);
    let full_prompt = first.prompt_tokens;
    messages.push(ChatMessage::assistant(first.text.trim()));
    messages.push(ChatMessage::user("And of Italy?"));
    let second = session.chat(&messages, &greedy(32), |_| true).expect("replies");
    let rendered = model.tokenize(&model.render_chat(&messages, true).expect("renders"), true, true);
    assert!(
        second.prompt_tokens < rendered.len() - full_prompt / 2,
        "fed {} of {}",
        second.prompt_tokens,
        rendered.len()
    );
    assert!(second.text.contains("Rome"), "{:?}", second.text);
}
