//! Tokenizer tests on small vocabularies written into in-memory GGUF files.

use super::*;
use alloc::vec;

/// A metadata value for [`gguf`].
enum Meta<'a> {
    Str(&'a str),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    U32(u32),
    I32(i32),
    Bool(bool),
}

/// Writes a GGUF v3 file with no tensors and the given metadata.
fn gguf(entries: &[(&str, Meta<'_>)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (key, value) in entries {
        string(&mut out, key);
        match value {
            Meta::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::Strs(v) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for s in v {
                    string(&mut out, s);
                }
            }
            Meta::I32s(v) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            Meta::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Meta::I32(x) => {
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Bool(b) => {
                out.extend_from_slice(&7u32.to_le_bytes());
                out.push(*b as u8);
            }
        }
    }
    out
}

/// Control tokens, then the 256 byte tokens, then merged tokens.
const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 8] = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in", "Ġin g", "l l", "he ll"];

fn toy_tokens() -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIAL.iter().map(|s| String::from(*s)).collect();
    let mut types = vec![3; SPECIAL.len()];
    tokens.extend((0..=255u8).map(|b| String::from(byte_level::byte_to_char(b))));
    for m in MERGES {
        tokens.push(m.replacen(' ', "", 1));
    }
    types.resize(tokens.len(), 1);
    (tokens, types)
}

/// The toy vocabulary's metadata, with `pre` and with `change` applied to the entries.
fn toy_file(pre: &str, change: impl FnOnce(&mut Vec<(&'static str, Meta<'static>)>)) -> Vec<u8> {
    let (tokens, types) = toy_tokens();
    let pre: &'static str = match pre {
        "gpt2" => "gpt2",
        "smollm" => "smollm",
        _ => "falcon",
    };
    let mut entries: Vec<(&'static str, Meta<'static>)> = vec![
        (keys::MODEL, Meta::Str("gpt2")),
        (keys::PRE, Meta::Str(pre)),
        (keys::TOKENS, Meta::Strs(tokens)),
        (keys::TOKEN_TYPE, Meta::I32s(types)),
        (keys::MERGES, Meta::Strs(MERGES.iter().map(|s| String::from(*s)).collect())),
        (keys::BOS, Meta::U32(1)),
        (keys::EOS, Meta::U32(2)),
        (keys::UNKNOWN, Meta::U32(0)),
        (keys::ADD_BOS, Meta::Bool(false)),
        (keys::CHAT_TEMPLATE, Meta::Str("{{ messages }}")),
    ];
    change(&mut entries);
    gguf(&entries)
}

fn toy(pre: &str) -> Tokenizer {
    let bytes = toy_file(pre, |_| {});
    Tokenizer::from_gguf(&GgufFile::parse(&bytes).unwrap()).unwrap()
}

fn load(bytes: &[u8]) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&GgufFile::parse(bytes).unwrap())
}

fn texts(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| String::from(t.token_text(id).unwrap())).collect()
}

#[test]
fn reads_metadata() {
    let t = toy("smollm");
    assert_eq!(t.vocab_size(), 3 + 256 + MERGES.len() as u32);
    assert_eq!((t.bos(), t.eos(), t.unknown(), t.padding(), t.add_bos()), (1, 2, Some(0), None, false));
    assert_eq!(t.pre_tokenizer(), PreTokenizer::SmolLm);
    assert_eq!(t.chat_template(), Some("{{ messages }}"));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.token_type(2), Some(TokenType::Control));
    assert_eq!(t.token_type(3), Some(TokenType::Normal));
    assert!(t.is_end_of_generation(2) && t.is_end_of_generation(0) && !t.is_end_of_generation(1));
    assert_eq!(toy("gpt2").pre_tokenizer(), PreTokenizer::Gpt2);
}

#[test]
fn encodes_with_merges_and_special_tokens() {
    let t = toy("smollm");
    let ids = t.encode("<|im_start|>the hell in thing<|im_end|>", true);
    assert_eq!(
        texts(&t, &ids),
        ["<|im_start|>", "t", "he", "Ġ", "hell", "Ġin", "Ġt", "h", "in", "g", "<|im_end|>"].map(String::from)
    );
    assert_eq!(ids[0], 1);
    assert_eq!(texts(&t, &t.encode(" the hello", false)), ["Ġthe", "Ġ", "hell", "o"].map(String::from));

    let plain = t.encode("<|im_end|>", false);
    assert!(plain.len() > 1 && !plain.contains(&2));
    assert_eq!(t.decode(&plain), "<|im_end|>");
    assert!(t.encode("", true).is_empty());
}

#[test]
fn smollm_splits_digits_and_gpt2_does_not() {
    let smol = toy("smollm");
    let gpt2 = toy("gpt2");
    // With no digit merges in the toy vocabulary the ids agree; the words differ.
    assert_eq!(smol.encode("a 12", false), gpt2.encode("a 12", false));
    assert_eq!(smol.decode(&smol.encode("x 1 2", false)), "x 1 2");
}

#[test]
fn encode_into_appends() {
    let t = toy("smollm");
    let mut out = vec![t.bos()];
    t.encode_into("the", false, &mut out);
    t.encode_into("<|im_end|>", true, &mut out);
    assert_eq!(out[0], 1);
    assert_eq!(*out.last().unwrap(), 2);
    assert_eq!(t.decode(&out), "<|im_start|>the<|im_end|>");
}

#[test]
fn decodes_lossily_and_streams_whole_characters() {
    let t = toy("gpt2");
    let text = "héllo 👋🏽 wörld ∑ 日本";
    let ids = t.encode(text, true);
    assert_eq!(t.decode(&ids), text);
    let mut stream = StreamDecoder::new();
    let mut streamed = String::new();
    for &id in &ids {
        let piece = stream.push(&t, id);
        assert!(core::str::from_utf8(piece.as_bytes()).is_ok());
        streamed.push_str(piece);
    }
    streamed.push_str(stream.finish());
    assert_eq!(streamed, text);

    let lone = t.token_id(&String::from(byte_level::byte_to_char(0xF0))).unwrap();
    assert_eq!(t.decode(&[lone]), "\u{FFFD}");
    assert_eq!(t.decode(&[u32::MAX]), "");
    assert_eq!(t.token_bytes(u32::MAX), None);
}

#[test]
fn errors_are_typed() {
    let err = |change: fn(&mut Vec<(&'static str, Meta<'static>)>)| load(&toy_file("smollm", change)).unwrap_err();
    let remove = |key: &'static str| move |e: &mut Vec<(&'static str, Meta<'static>)>| e.retain(|(k, _)| *k != key);

    assert_eq!(load(&toy_file("smollm", remove(keys::MODEL))).unwrap_err(), TokenizerError::MissingKey(keys::MODEL));
    assert_eq!(load(&toy_file("smollm", remove(keys::TOKENS))).unwrap_err(), TokenizerError::MissingKey(keys::TOKENS));
    assert_eq!(load(&toy_file("smollm", remove(keys::MERGES))).unwrap_err(), TokenizerError::MissingKey(keys::MERGES));
    assert_eq!(load(&toy_file("smollm", remove(keys::EOS))).unwrap_err(), TokenizerError::MissingKey(keys::EOS));
    // Optional keys.
    assert!(load(&toy_file("smollm", remove(keys::TOKEN_TYPE))).is_ok());
    assert_eq!(load(&toy_file("smollm", remove(keys::PRE))).unwrap().pre_tokenizer(), PreTokenizer::Gpt2);

    assert_eq!(load(&toy_file("other", |_| {})).unwrap_err(), TokenizerError::UnsupportedPreTokenizer("falcon".into()));
    assert_eq!(err(|e| e[0].1 = Meta::Str("bert")), TokenizerError::UnsupportedModel("bert".into()));
    assert_eq!(err(|e| e[0].1 = Meta::U32(3)), TokenizerError::WrongType { key: keys::MODEL, expected: "a string" });
    assert!(matches!(err(|e| e[2].1 = Meta::I32s(vec![1])), TokenizerError::WrongType { key: keys::TOKENS, .. }));
    assert_eq!(
        err(|e| e[2].1 = Meta::Strs(Vec::new())),
        TokenizerError::LengthMismatch { key: keys::TOKEN_TYPE, expected: 0, found: 3 + 256 + MERGES.len() }
    );
    assert!(matches!(err(|e| e[3].1 = Meta::I32s(vec![1; 5])), TokenizerError::LengthMismatch { .. }));
    assert!(matches!(
        err(|e| {
            if let Meta::I32s(types) = &mut e[3].1 {
                types[7] = 9;
            }
        }),
        TokenizerError::BadTokenType { id: 7, value: 9 }
    ));
    assert!(matches!(
        err(|e| e[4].1 = Meta::Strs(vec![String::from("Ġ t"), String::from("q zz")])),
        TokenizerError::UnknownMergeToken { index: 1, .. }
    ));
    assert!(matches!(
        err(|e| e[4].1 = Meta::Strs(vec![String::from("nospace")])),
        TokenizerError::MalformedMerge { index: 0, .. }
    ));
    assert_eq!(
        err(|e| e[5].1 = Meta::U32(100_000)),
        TokenizerError::TokenIdOutOfRange { key: keys::BOS, id: 100_000, vocab_size: 3 + 256 + MERGES.len() as u32 }
    );
    assert!(matches!(err(|e| e[6].1 = Meta::I32(-1)), TokenizerError::WrongType { key: keys::EOS, .. }));
    assert!(matches!(err(|e| e[8].1 = Meta::U32(1)), TokenizerError::WrongType { key: keys::ADD_BOS, .. }));
    assert!(matches!(err(|e| e[9].1 = Meta::U32(1)), TokenizerError::WrongType { key: keys::CHAT_TEMPLATE, .. }));
    assert_eq!(
        alloc::format!("{}", TokenizerError::UnsupportedPreTokenizer("falcon".into())),
        "pre-tokenizer \"falcon\" is not supported (supported: \"smollm\", \"gpt2\", \"default\", \"qwen2\", \"llama-bpe\" and their llama.cpp aliases)"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every text survives encode → decode, special tokens parsed or not.
        #[test]
        fn round_trip(text in "(\\PC|[ \\n\\t0-9']|<\\|im_end\\|>|the|hell){0,40}", parse_special: bool) {
            let t = toy("smollm");
            prop_assert_eq!(t.decode(&t.encode(&text, parse_special)), text.clone());
            let t = toy("gpt2");
            prop_assert_eq!(t.decode(&t.encode(&text, parse_special)), text);
        }

        /// The pre-tokenizers cover any text with non-empty words.
        #[test]
        fn words_cover_text(text in "\\PC{0,60}|[ \\n\\t'a-z0-9]{0,60}") {
            for pre in [PreTokenizer::Gpt2, PreTokenizer::SmolLm, PreTokenizer::Llama3, PreTokenizer::Qwen2] {
                let mut joined = String::new();
                pre.split(&text, |w| {
                    assert!(!w.is_empty());
                    joined.push_str(&text[w]);
                });
                prop_assert_eq!(&joined, &text);
            }
        }

        /// Hostile metadata never panics: arbitrary tokens and merges give Ok or an error.
        #[test]
        fn arbitrary_vocabularies_do_not_panic(
            tokens in proptest::collection::vec("\\PC{0,4}", 0..40),
            merges in proptest::collection::vec("\\PC{0,6}", 0..20),
            types in proptest::collection::vec(-1i32..8, 0..40),
            bos in 0u32..50,
        ) {
            let bytes = gguf(&[
                (keys::MODEL, Meta::Str("gpt2")),
                (keys::TOKENS, Meta::Strs(tokens)),
                (keys::TOKEN_TYPE, Meta::I32s(types)),
                (keys::MERGES, Meta::Strs(merges)),
                (keys::BOS, Meta::U32(bos)),
                (keys::EOS, Meta::U32(0)),
            ]);
            if let Ok(t) = load(&bytes) {
                let ids = t.encode("hello <s> 123 world", true);
                let _ = t.decode(&ids);
            }
        }
    }
}

#[cfg(feature = "std")]
#[test]
fn render_chat_uses_the_file_template_else_chatml() {
    let template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}\
                    {% if add_generation_prompt %}[assistant]{% endif %}";
    let bytes = toy_file("smollm", |e| e[9].1 = Meta::Str(template));
    let t = load(&bytes).unwrap();
    assert!(t.uses_chat_template());
    let messages = [ChatMessage::system("S"), ChatMessage::user("U")];
    let bos = t.token_text(t.bos()).unwrap();
    let eos = t.token_text(t.eos()).unwrap();
    assert_eq!(t.render_chat(&messages, true).unwrap(), alloc::format!("{bos}[system]S{eos}[user]U{eos}[assistant]"));
    assert_eq!(t.render_chat(&messages, false).unwrap(), alloc::format!("{bos}[system]S{eos}[user]U{eos}"));

    let bytes = toy_file("smollm", |e| {
        e.remove(9);
    });
    let t = load(&bytes).unwrap();
    assert!(!t.uses_chat_template());
    assert_eq!(t.render_chat(&messages, true).unwrap(), format_chat(&messages, true));

    let bytes = toy_file("smollm", |e| e[9].1 = Meta::Str("{% if %}"));
    let err = load(&bytes).unwrap().render_chat(&messages, true).unwrap_err();
    assert!(matches!(err, TemplateError::Syntax { line: Some(1), .. }), "{err:?}");
}

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, a control `<ctl>`, the 256 byte
/// tokens, then scored pieces.
fn spm_file(change: impl FnOnce(&mut Vec<(&'static str, Meta<'static>)>)) -> Vec<u8> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<ctl>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3, 3];
    for b in 0..=255u8 {
        tokens.push(alloc::format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [("▁", -1.0f32), ("h", -2.0), ("i", -2.0), ("hi", -3.0), ("▁hi", -4.0), ("▁▁", -5.0), ("x", -2.0)];
    let mut scores = vec![0.0f32; tokens.len()];
    for (p, s) in pieces {
        tokens.push(String::from(p));
        types.push(1);
        scores.push(s);
    }
    let mut score_bytes = Vec::new();
    for s in &scores {
        score_bytes.extend_from_slice(&s.to_le_bytes());
    }
    let mut entries: Vec<(&'static str, Meta<'static>)> = vec![
        (keys::MODEL, Meta::Str("llama")),
        (keys::TOKENS, Meta::Strs(tokens)),
        (keys::TOKEN_TYPE, Meta::I32s(types)),
    ];
    change(&mut entries);
    let mut file = gguf(&entries);
    // Append the scores as an f32 array (type 6) and bump the metadata count.
    let key = keys::SCORES;
    file.extend_from_slice(&(key.len() as u64).to_le_bytes());
    file.extend_from_slice(key.as_bytes());
    file.extend_from_slice(&9u32.to_le_bytes());
    file.extend_from_slice(&6u32.to_le_bytes());
    file.extend_from_slice(&(scores.len() as u64).to_le_bytes());
    file.extend_from_slice(&score_bytes);
    let count = u64::from_le_bytes(file[16..24].try_into().unwrap()) + 1;
    file[16..24].copy_from_slice(&count.to_le_bytes());
    file
}

#[test]
fn sentencepiece_defaults_prefix_and_byte_fallback() {
    let t = load(&spm_file(|_| {})).unwrap();
    assert_eq!(t.kind(), TokenizerKind::SentencePiece);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Whole);
    // llama.cpp's defaults when the keys are absent.
    assert_eq!(
        (t.bos(), t.eos(), t.unknown(), t.add_bos(), t.add_eos(), t.add_space_prefix()),
        (1, 2, Some(0), true, false, true)
    );
    assert!(t.is_end_of_generation(2), "</s> ends generation");
    let ids = t.encode("hi", false);
    assert_eq!(texts(&t, &ids), ["▁hi"]);
    // Not in the vocabulary: bytes.
    assert_eq!(texts(&t, &t.encode("é", false)), ["▁", "<0xC3>", "<0xA9>"]);
    // A space prefix again after a special token (parsed), none inside the text.
    let ids = t.encode("hi<ctl>hi  x", true);
    assert_eq!(texts(&t, &ids), ["▁hi", "<ctl>", "▁hi", "▁▁", "x"]);
    assert_eq!(t.decode(&ids), "hi<ctl> hi  x", "the leading space is dropped, the one after <ctl> kept");
    let mut stream = StreamDecoder::new();
    let streamed: String = ids.iter().map(|&id| stream.push(&t, id).to_string()).collect();
    assert_eq!(streamed, t.decode(&ids));
    let mut stream = StreamDecoder::continuing();
    assert_eq!(stream.push(&t, ids[0]), " hi");
    // Unparsed, the control token's text is plain text.
    assert!(!t.encode("<ctl>", false).contains(&3));
    assert_eq!(t.decode(&[1, ids[0]]), "<s> hi", "after BOS nothing is stripped");
}

#[test]
fn sentencepiece_metadata_overrides() {
    let t = load(&spm_file(|e| {
        e.push((keys::ADD_SPACE_PREFIX, Meta::Bool(false)));
        e.push((keys::ADD_BOS, Meta::Bool(false)));
        e.push((keys::BOS, Meta::U32(3)));
    }))
    .unwrap();
    assert_eq!((t.bos(), t.add_bos(), t.add_space_prefix()), (3, false, false));
    assert_eq!(texts(&t, &t.encode("hi", false)), ["hi"]);
    assert_eq!(t.decode(&t.encode(" hi", false)), " hi");
    let err = load(&spm_file(|e| e.push((keys::ADD_SPACE_PREFIX, Meta::U32(1))))).unwrap_err();
    assert_eq!(err, TokenizerError::WrongType { key: keys::ADD_SPACE_PREFIX, expected: "a bool" });
    let err = load(&spm_file(|e| e.push((keys::EOT, Meta::U32(1_000_000))))).unwrap_err();
    assert!(matches!(err, TokenizerError::TokenIdOutOfRange { key: keys::EOT, .. }));
}

#[test]
fn eot_key_and_detected_tokens_end_generation() {
    let bytes = toy_file("smollm", |e| e.push((keys::EOT, Meta::U32(1))));
    let t = load(&bytes).unwrap();
    assert_eq!(t.eot(), Some(1));
    assert_eq!(t.end_of_generation_ids(), [0, 1, 2]);
    let t = toy("smollm");
    assert_eq!(t.eot(), Some(2), "<|im_end|> comes first among llama.cpp's end-of-turn texts");
    assert_eq!(t.end_of_generation_ids(), [0, 2]);
}

#[test]
fn qwen2_and_llama3_pre_tokenizers_load() {
    for (name, pre) in
        [("qwen2", PreTokenizer::Qwen2), ("llama-bpe", PreTokenizer::Llama3), ("llama3", PreTokenizer::Llama3)]
    {
        let t = load(&toy_file("smollm", |e| e[1].1 = Meta::Str(name))).unwrap();
        assert_eq!(t.pre_tokenizer(), pre);
        assert!(!t.add_bos(), "the file's add_bos_token = false wins");
        assert_eq!(t.decode(&t.encode("the hell 123 it's", false)), "the hell 123 it's");
    }
    let t = load(&toy_file("smollm", |e| {
        e[1].1 = Meta::Str("llama-bpe");
        e.retain(|(k, _)| *k != keys::ADD_BOS);
    }))
    .unwrap();
    assert!(t.add_bos(), "llama.cpp's default for llama3");
    // ignore_merges: a whole word that is a token is taken as is.
    assert_eq!(texts(&t, &t.encode(" thing", false)), ["Ġt", "h", "in", "g"]);
    assert_eq!(texts(&t, &t.encode(" the", false)), ["Ġthe"]);
}
