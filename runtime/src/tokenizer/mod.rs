//! Tokenization from a GGUF file's vocabulary, matching llama.cpp.
//!
//! [`Tokenizer::from_gguf`] reads the `tokenizer.*` metadata of two kinds of vocabulary
//! ([`TokenizerKind`]):
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2, …).
//!   Encoding finds special tokens in the text (module `special`), splits the rest into
//!   words with the pre-tokenizer ([`PreTokenizer`]), and merges bytes within each word,
//!   lowest merge rank first (module `bpe`), over the GPT-2 byte-to-character mapping
//!   (module `byte_level`). No prefix space is added.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback (Llama 2,
//!   Phi-3, Gemma 3). Each text fragment gets a leading space when the vocabulary adds a
//!   space prefix (at the start of the text and after every special token), spaces become
//!   `▁`, and characters merge by highest token score (module `spm`); characters outside
//!   the vocabulary become `<0xXX>` byte tokens.
//!
//! [`Tokenizer::encode`] never adds BOS or EOS (llama.cpp's `add_special = false`):
//! callers that want them push [`Tokenizer::bos`] when [`Tokenizer::add_bos`] says so.
//!
//! Decoding maps ids back to bytes ([`Tokenizer::token_bytes`]); [`Tokenizer::decode`]
//! and [`StreamDecoder`] produce what llama.cpp's `llama_detokenize(remove_special =
//! false, unparse_special = true)` does, except its `clean_spaces` pass (see
//! [`Tokenizer::decode`]). Chat prompts: [`format_chat`] builds
//! ChatML (no_std, and the fallback); with `std`, [`ChatTemplate`] renders a file's Jinja
//! `tokenizer.chat_template` as llama-cpp-python does, and [`Tokenizer::render_chat`] picks
//! between the two.

mod bpe;
mod byte_level;
mod chat;
mod eog;
mod error;
mod pre_tokenizer;
mod special;
mod spm;
mod stream;
#[cfg(feature = "std")]
mod template;
mod vocab;

pub use byte_level::{byte_to_char, char_to_byte};
pub use chat::{format_chat, format_chat_into, ChatMessage};
pub use error::TokenizerError;
pub use pre_tokenizer::PreTokenizer;
pub use stream::StreamDecoder;
#[cfg(feature = "std")]
pub use template::{ChatTemplate, RenderOptions, TemplateError, TemplateValue};
pub use vocab::TokenType;

use crate::gguf::{GgufFile, Value};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use bpe::Merges;
use core::fmt;
use special::{Fragment, SpecialTokens};
use spm::Spm;
use vocab::{TextForm, Vocab};

/// The two vocabulary kinds (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `"gpt2"`: byte-level BPE with merges and a pre-tokenizer.
    ByteLevelBpe,
    /// `"llama"`: SentencePiece BPE over token scores, with `<0xXX>` byte fallback.
    SentencePiece,
}

/// The merging algorithm and its tables.
#[derive(Clone, Debug)]
enum Model {
    Bpe {
        merges: Merges,
        /// llama.cpp's `ignore_merges` (Llama 3): a word that is a token is that token.
        ignore_merges: bool,
    },
    Spm(alloc::boxed::Box<Spm>),
}

/// A tokenizer built from a GGUF file. Token ids are `u32`, below
/// [`Tokenizer::vocab_size`].
#[derive(Clone)]
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    special: SpecialTokens,
    pre_tokenizer: PreTokenizer,
    /// The id of each byte's single-byte token (byte-level BPE), or `u32::MAX`.
    byte_tokens: [u32; 256],
    bos: u32,
    eos: u32,
    eot: Option<u32>,
    unknown: Option<u32>,
    padding: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Ids that end generation, sorted (llama.cpp's `special_eog_ids`).
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let merges = match &self.model {
            Model::Bpe { merges, .. } => merges.len(),
            Model::Spm(_) => 0,
        };
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab.len())
            .field("merges", &merges)
            .field("special_tokens", &self.special.len())
            .field("pre_tokenizer", &self.pre_tokenizer)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("unknown", &self.unknown)
            .field("padding", &self.padding)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .field("end_of_generation", &self.end_of_generation)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Metadata keys read by [`Tokenizer::from_gguf`] (and written by tokenizer exporters).
pub mod keys {
    /// `"gpt2"` for byte-level BPE, `"llama"` for SentencePiece BPE.
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// The pre-tokenizer's name (byte-level BPE only).
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// The tokens' texts, in id order.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// One llama.cpp token type per token.
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// One score per token (SentencePiece).
    pub const SCORES: &str = "tokenizer.ggml.scores";
    /// `"left right"` merges, in rank order (byte-level BPE).
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// Beginning-of-sequence id.
    pub const BOS: &str = "tokenizer.ggml.bos_token_id";
    /// End-of-sequence id.
    pub const EOS: &str = "tokenizer.ggml.eos_token_id";
    /// End-of-turn id.
    pub const EOT: &str = "tokenizer.ggml.eot_token_id";
    /// End-of-message id.
    pub const EOM: &str = "tokenizer.ggml.eom_token_id";
    /// Fill-in-the-middle padding id.
    pub const FIM_PAD: &str = "tokenizer.ggml.fim_pad_token_id";
    /// Fill-in-the-middle repository id.
    pub const FIM_REP: &str = "tokenizer.ggml.fim_rep_token_id";
    /// Fill-in-the-middle file-separator id.
    pub const FIM_SEP: &str = "tokenizer.ggml.fim_sep_token_id";
    /// Unknown-token id.
    pub const UNKNOWN: &str = "tokenizer.ggml.unknown_token_id";
    /// Padding id.
    pub const PADDING: &str = "tokenizer.ggml.padding_token_id";
    /// Whether prompts start with BOS.
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether prompts end with EOS.
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// Whether a space is put before the text (SentencePiece).
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    /// The Jinja chat template.
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    /// The model's name; llama.cpp sets token attributes by it (Phi-3).
    pub const GENERAL_NAME: &str = "general.name";
}

impl Tokenizer {
    /// Builds the tokenizer from `file`'s `tokenizer.*` metadata. Only metadata is read:
    /// vocabulary-only files (no tensors) load.
    ///
    /// Required: `tokenizer.ggml.model` (`"gpt2"` or `"llama"`) and `.tokens`; for
    /// `"gpt2"` also `.merges`, `.bos_token_id` and `.eos_token_id` (for `"llama"` they
    /// default to 1 and 2, as in llama.cpp). Optional: `.pre` (byte-level BPE; default
    /// `"default"`, see [`PreTokenizer::from_name`]), `.token_type` (default: all normal),
    /// `.scores` (default 0), `.unknown_token_id` (`"llama"` default 0),
    /// `.padding_token_id`, `.eot_token_id`, `.eom_token_id`, `.fim_*_token_id`,
    /// `.add_bos_token` / `.add_eos_token` / `.add_space_prefix` (defaults as llama.cpp's:
    /// SentencePiece adds BOS and a space prefix; byte-level BPE adds BOS only for the
    /// Llama 3 pre-tokenizer), `tokenizer.chat_template`, `general.name`. Anything
    /// malformed is an error naming the key, never a panic.
    pub fn from_gguf(file: &GgufFile<'_>) -> Result<Self, TokenizerError> {
        let model = required(file, keys::MODEL)?.as_str().ok_or(wrong_type(keys::MODEL, "a string"))?;
        let kind = match model {
            "gpt2" => TokenizerKind::ByteLevelBpe,
            "llama" => TokenizerKind::SentencePiece,
            _ => return Err(TokenizerError::UnsupportedModel(model.to_string())),
        };
        let pre_tokenizer = match kind {
            TokenizerKind::SentencePiece => PreTokenizer::Whole,
            TokenizerKind::ByteLevelBpe => {
                let pre_name = match file.get(keys::PRE) {
                    None => "default",
                    Some(v) => v.as_str().ok_or(wrong_type(keys::PRE, "a string"))?,
                };
                PreTokenizer::from_name(pre_name)
                    .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.to_string()))?
            }
        };

        let tokens = required(file, keys::TOKENS)?.as_array().ok_or(wrong_type(keys::TOKENS, "an array of strings"))?;
        let texts = || tokens.strings().ok_or(wrong_type(keys::TOKENS, "an array of strings"));
        let _ = texts()?;
        let mut types = match file.get(keys::TOKEN_TYPE) {
            None => None,
            Some(v) => Some(token_types(v, tokens.len())?),
        };
        let n_tokens = u32::try_from(tokens.len()).map_err(|_| TokenizerError::VocabularyTooLarge(tokens.len()))?;
        let key_id = |key: &'static str| optional_id(file, key, n_tokens);

        // Special ids: the keys, else llama.cpp's per-model defaults.
        let spm = kind == TokenizerKind::SentencePiece;
        let default_id = |id: u32| (spm && id < n_tokens).then_some(id);
        let bos = key_id(keys::BOS)?.or(default_id(1)).ok_or(TokenizerError::MissingKey(keys::BOS))?;
        let eos = key_id(keys::EOS)?.or(default_id(2)).ok_or(TokenizerError::MissingKey(keys::EOS))?;
        let unknown = key_id(keys::UNKNOWN)?.or(default_id(0));
        let padding = key_id(keys::PADDING)?;
        let explicit = eog::ExplicitIds {
            eos,
            eot: key_id(keys::EOT)?,
            eom: key_id(keys::EOM)?,
            fim_pad: key_id(keys::FIM_PAD)?,
            fim_rep: key_id(keys::FIM_REP)?,
            fim_sep: key_id(keys::FIM_SEP)?,
        };
        let derived = eog::derive(texts()?, &explicit);
        if !derived.type_changes.is_empty() {
            let types = types.get_or_insert_with(|| alloc::vec![TokenType::Normal; tokens.len()]);
            for &(id, ty) in &derived.type_changes {
                if let Some(slot) = types.get_mut(id as usize) {
                    *slot = ty;
                }
            }
        }

        let form = if spm { TextForm::SentencePiece } else { TextForm::ByteLevel };
        let vocab = Vocab::with_form(texts()?, types.as_deref(), tokens.len(), form)?;

        let flag = |key: &'static str, default: bool| -> Result<bool, TokenizerError> {
            match file.get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or(wrong_type(key, "a bool")),
            }
        };
        let add_bos = flag(keys::ADD_BOS, spm || pre_tokenizer == PreTokenizer::Llama3)?;
        let add_eos = flag(keys::ADD_EOS, false)?;
        let add_space_prefix = flag(keys::ADD_SPACE_PREFIX, spm)?;
        let chat_template = match file.get(keys::CHAT_TEMPLATE) {
            None => None,
            Some(v) => Some(v.as_str().ok_or(wrong_type(keys::CHAT_TEMPLATE, "a string"))?.to_string()),
        };

        let model = match kind {
            TokenizerKind::ByteLevelBpe => {
                let merges =
                    required(file, keys::MERGES)?.as_array().ok_or(wrong_type(keys::MERGES, "an array of strings"))?;
                let merges =
                    Merges::new(merges.strings().ok_or(wrong_type(keys::MERGES, "an array of strings"))?, &vocab)?;
                Model::Bpe { merges, ignore_merges: pre_tokenizer == PreTokenizer::Llama3 }
            }
            TokenizerKind::SentencePiece => {
                let scores = match file.get(keys::SCORES) {
                    None => alloc::vec![0.0; tokens.len()],
                    Some(v) => scores(v, tokens.len())?,
                };
                Model::Spm(alloc::boxed::Box::new(Spm::new(&vocab, scores, unknown)))
            }
        };

        let mut byte_tokens = [u32::MAX; 256];
        if kind == TokenizerKind::ByteLevelBpe {
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                let mut buf = [0u8; 4];
                let text = byte_level::byte_to_char(b as u8).encode_utf8(&mut buf);
                if let Some(id) = vocab.id(text) {
                    *slot = id;
                }
            }
        }

        // llama.cpp gives every special token of a model named Phi-3 the RSTRIP
        // attribute (except <unk>, <s>, <|endoftext|>), and </s> too.
        let name = file.get(keys::GENERAL_NAME).and_then(|v| v.as_str()).unwrap_or_default().to_ascii_lowercase();
        let special = if name.contains("phi-3") || name.contains("phi3") {
            let keep = ["<unk>", "<s>", "<|endoftext|>"].map(|t| vocab.id(t));
            SpecialTokens::with_rstrip(&vocab, |id| !keep.contains(&Some(id)))
        } else {
            SpecialTokens::new(&vocab)
        };
        Ok(Tokenizer {
            vocab,
            model,
            special,
            pre_tokenizer,
            byte_tokens,
            bos,
            eos,
            eot: derived.eot,
            unknown,
            padding,
            add_bos,
            add_eos,
            add_space_prefix,
            end_of_generation: derived.end_of_generation,
            chat_template,
        })
    }

    /// Encodes `text` into token ids, as llama.cpp's `llama_tokenize(text, add_special =
    /// false, parse_special)`. With `parse_special`, the texts of control tokens (such as
    /// `<|im_start|>`) in `text` become those tokens; without it they are encoded as plain
    /// text. User-defined tokens are always matched, as in llama.cpp. No BOS is added.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_into(text, parse_special, &mut out);
        out
    }

    /// [`Tokenizer::encode`], appending the ids to `out` (which is not cleared, so a
    /// caller can push BOS first and reuse the vector's allocation).
    pub fn encode_into(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        let (mut fragments, mut fragment_scratch) = (Vec::new(), Vec::new());
        self.special.partition(&self.vocab, text, parse_special, &mut fragments, &mut fragment_scratch);
        match &self.model {
            Model::Bpe { merges, ignore_merges } => {
                let mut scratch = bpe::Scratch::default();
                let mut word_text = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(range) => {
                            let piece = &text[range];
                            self.pre_tokenizer.split(piece, |word| {
                                let word = &piece.as_bytes()[word];
                                if *ignore_merges && word.len() > 1 {
                                    word_text.clear();
                                    word_text.extend(word.iter().map(|&b| byte_level::byte_to_char(b)));
                                    if let Some(id) = self.vocab.id(&word_text) {
                                        out.push(id);
                                        return;
                                    }
                                }
                                merges.encode_word(word, &self.byte_tokens, &mut scratch, out);
                            });
                        }
                    }
                }
            }
            Model::Spm(spm) => {
                let mut scratch = spm::Scratch::default();
                let mut escaped = String::new();
                let mut prev_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(range) => {
                            escaped.clear();
                            if self.add_space_prefix && prev_special {
                                escaped.push('\u{2581}');
                            }
                            for c in text[range].chars() {
                                escaped.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm.encode(&self.vocab, &escaped, &mut scratch, out);
                            prev_special = false;
                        }
                    }
                }
            }
        }
    }

    /// The raw bytes token `id` stands for, or `None` if `id` is not below
    /// [`Tokenizer::vocab_size`]: llama.cpp's `token_to_piece(id, lstrip = 0, special =
    /// true)`. Control and user-defined tokens give their text (e.g. `<|im_end|>`), byte
    /// tokens their byte, unused tokens nothing; other tokens may hold part of a UTF-8
    /// character.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.bytes(id)
    }

    /// Token `id`'s text as stored in the file (byte-level form: a space is `Ġ`;
    /// SentencePiece: `▁`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    /// Token `id`'s type (after llama.cpp's corrections: end-of-generation tokens are
    /// control tokens).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.vocab.token_type(id)
    }

    /// The id of the token whose stored text is exactly `text` (byte-level form for
    /// ordinary tokens: `"Ġthe"`; literal for special ones: `"<|im_end|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    /// Appends the bytes of `ids` to `out`; ids outside the vocabulary are skipped. When
    /// the vocabulary adds a space prefix, one leading space of `ids[0]`'s piece is
    /// dropped, as llama.cpp's `llama_detokenize` does.
    pub fn decode_bytes_into(&self, ids: &[u32], out: &mut Vec<u8>) {
        for (i, &id) in ids.iter().enumerate() {
            let bytes = self.token_bytes(id).unwrap_or_default();
            out.extend_from_slice(if i == 0 { self.strip_space_prefix(bytes) } else { bytes });
        }
    }

    /// `bytes` without one leading space if the vocabulary adds a space prefix.
    pub(crate) fn strip_space_prefix<'b>(&self, bytes: &'b [u8]) -> &'b [u8] {
        match bytes {
            [b' ', rest @ ..] if self.add_space_prefix => rest,
            _ => bytes,
        }
    }

    /// Decodes `ids` to text, as llama.cpp's `llama_detokenize(remove_special = false,
    /// unparse_special = true)`: special tokens appear as their text, and the leading
    /// space of a space-prefixed vocabulary is dropped (see
    /// [`Tokenizer::decode_bytes_into`]). Bytes that are not valid UTF-8 become U+FFFD;
    /// ids outside the vocabulary are skipped. llama.cpp's `clean_spaces` pass (which
    /// some byte-level BPE vocabularies enable, removing the space in `" ,"` or `" 's"`)
    /// is not applied: the text is exactly the tokens' bytes.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        self.decode_bytes_into(ids, &mut bytes);
        match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Number of tokens; every id is below it.
    pub fn vocab_size(&self) -> u32 {
        self.vocab.len()
    }

    /// Which kind of vocabulary this is.
    pub fn kind(&self) -> TokenizerKind {
        match self.model {
            Model::Bpe { .. } => TokenizerKind::ByteLevelBpe,
            Model::Spm(_) => TokenizerKind::SentencePiece,
        }
    }

    /// The beginning-of-sequence token id.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// The end-of-sequence token id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The end-of-turn token id: `tokenizer.ggml.eot_token_id`, else the first of
    /// llama.cpp's end-of-turn texts (`<|eot_id|>`, `<|im_end|>`, `<|end|>`,
    /// `<end_of_turn>`, `<|endoftext|>`, …) in the vocabulary. (llama.cpp takes whichever
    /// its hash map yields first when several are present; the set of
    /// end-of-generation ids does not depend on the choice.)
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// The unknown-token id, if the file names one (SentencePiece: default 0).
    pub fn unknown(&self) -> Option<u32> {
        self.unknown
    }

    /// The padding-token id, if the file names one.
    pub fn padding(&self) -> Option<u32> {
        self.padding
    }

    /// Whether the model expects BOS at the start of a prompt
    /// (`tokenizer.ggml.add_bos_token`, else llama.cpp's default for the vocabulary).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether the model expects EOS at the end of a prompt (`tokenizer.ggml.add_eos_token`,
    /// default false).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether encoding puts a space before the text and after each special token
    /// (SentencePiece; `tokenizer.ggml.add_space_prefix`, default true there), and
    /// decoding drops the first token's leading space.
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// True if generating `id` ends the reply: llama.cpp's `llama_vocab_is_eog` (EOS,
    /// EOT, EOM, the fill-in-the-middle pad/repo/file-separator tokens, and tokens such
    /// as `<|im_end|>`, `<|endoftext|>`, `<end_of_turn>`, `<|eot_id|>`, `<|end|>`).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, ascending.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// The pre-tokenizer in use ([`PreTokenizer::Whole`] for SentencePiece).
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre_tokenizer
    }

    /// The file's Jinja chat template (`tokenizer.chat_template`), if any. With `std`,
    /// [`Tokenizer::render_chat`] runs it; without, only [`format_chat`] (ChatML) exists.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// [`RenderOptions`] for this vocabulary: `bos_token` and `eos_token` are the stored
    /// texts of [`Tokenizer::bos`] and [`Tokenizer::eos`] (as llama-cpp-python passes
    /// them), no fixed time, no extra variables.
    #[cfg(feature = "std")]
    pub fn render_options(&self, add_generation_prompt: bool) -> RenderOptions {
        RenderOptions::new(
            add_generation_prompt,
            self.token_text(self.bos).unwrap_or_default(),
            self.token_text(self.eos).unwrap_or_default(),
        )
    }

    /// Builds the prompt for `messages`: with the file's `tokenizer.chat_template` when it
    /// has one (rendered by [`ChatTemplate`] with [`Tokenizer::render_options`]), else
    /// ChatML ([`format_chat`]). Pass a `"system"` message first to set the system prompt;
    /// without one the template adds its own default, if it has one (ChatML adds none).
    ///
    /// Encode the result with special tokens parsed. A template may start the prompt with
    /// the BOS text itself (Llama 3, Gemma, ...): then do not push [`Tokenizer::bos`] too
    /// (llama-cpp-python adds no BOS to a template's prompt). Errors come only from the
    /// template (it does not compile, it raises, or it fails to render). The template is
    /// compiled on each call; see [`Tokenizer::compile_chat_template`] to keep it.
    #[cfg(feature = "std")]
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_chat_with(messages, &self.render_options(add_generation_prompt))
    }

    /// [`Tokenizer::render_chat`] with explicit options (e.g. a fixed time for
    /// `strftime_now`, or extra variables such as `enable_thinking`). Without a template,
    /// ChatML is used and only `options.add_generation_prompt` matters.
    #[cfg(feature = "std")]
    pub fn render_chat_with(&self, messages: &[ChatMessage], options: &RenderOptions) -> Result<String, TemplateError> {
        match &self.chat_template {
            Some(source) => ChatTemplate::new(source)?.render(messages, options),
            None => Ok(format_chat(messages, options.add_generation_prompt)),
        }
    }

    /// The file's template compiled once, for callers that render many prompts (a chat
    /// loop): `None` if the file has none (then use [`format_chat`]).
    #[cfg(feature = "std")]
    pub fn compile_chat_template(&self) -> Option<Result<ChatTemplate, TemplateError>> {
        self.chat_template.as_deref().map(ChatTemplate::new)
    }

    /// Whether [`Tokenizer::render_chat`] uses the file's template (`true`) or ChatML.
    #[cfg(feature = "std")]
    pub fn uses_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }
}

fn required<'a>(file: &GgufFile<'a>, key: &'static str) -> Result<Value<'a>, TokenizerError> {
    file.get(key).ok_or(TokenizerError::MissingKey(key))
}

fn wrong_type(key: &'static str, expected: &'static str) -> TokenizerError {
    TokenizerError::WrongType { key, expected }
}

/// Reads `tokenizer.ggml.token_type`: one llama.cpp token type per token.
fn token_types(value: Value<'_>, n_tokens: usize) -> Result<Vec<TokenType>, TokenizerError> {
    let expected = "an array of integers";
    let array = value.as_array().ok_or(wrong_type(keys::TOKEN_TYPE, expected))?;
    if array.len() != n_tokens {
        return Err(TokenizerError::LengthMismatch { key: keys::TOKEN_TYPE, expected: n_tokens, found: array.len() });
    }
    let values = array.integers().ok_or(wrong_type(keys::TOKEN_TYPE, expected))?;
    values
        .enumerate()
        .map(|(id, value)| TokenType::from_value(value).ok_or(TokenizerError::BadTokenType { id: id as u32, value }))
        .collect()
}

/// Reads an optional token id stored under `key`, checking it against the vocabulary size.
fn optional_id(file: &GgufFile<'_>, key: &'static str, vocab_size: u32) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = file.get(key) else { return Ok(None) };
    let id = value.as_u64().ok_or(wrong_type(key, "a non-negative integer"))?;
    match u32::try_from(id) {
        Ok(id) if id < vocab_size => Ok(Some(id)),
        _ => Err(TokenizerError::TokenIdOutOfRange { key, id, vocab_size }),
    }
}

/// Reads `tokenizer.ggml.scores`: one number per token.
fn scores(value: Value<'_>, n_tokens: usize) -> Result<Vec<f32>, TokenizerError> {
    let expected = "an array of numbers";
    let array = value.as_array().ok_or(wrong_type(keys::SCORES, expected))?;
    if array.len() != n_tokens {
        return Err(TokenizerError::LengthMismatch { key: keys::SCORES, expected: n_tokens, found: array.len() });
    }
    array.iter().map(|v| v.as_f32().ok_or(wrong_type(keys::SCORES, expected))).collect()
}

#[cfg(test)]
mod tests;
