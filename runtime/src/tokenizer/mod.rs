//! Byte-level BPE tokenization from a GGUF file's vocabulary, matching llama.cpp.
//!
//! [`Tokenizer::from_gguf`] reads a `tokenizer.ggml.model = "gpt2"` vocabulary (tokens,
//! token types, merges, special ids, pre-tokenizer name, chat template). Encoding runs,
//! in order:
//! 1. special tokens found literally in the text (module `special`), when asked for;
//! 2. the pre-tokenizer, which splits the remaining text into words ([`PreTokenizer`]);
//! 3. byte-pair merging within each word, lowest merge rank first (module `bpe`), over the
//!    GPT-2 byte-to-character mapping (module `byte_level`).
//!
//! No prefix space is ever added (GPT-2 BPE in llama.cpp ignores
//! `tokenizer.ggml.add_space_prefix`), and [`Tokenizer::encode`] never adds BOS: callers
//! that want it push [`Tokenizer::bos`] when [`Tokenizer::add_bos`] says so.
//!
//! Decoding maps ids back to bytes ([`Tokenizer::token_bytes`]); [`StreamDecoder`] does it
//! token by token. Chat prompts: [`format_chat`] builds ChatML (no_std, and the fallback);
//! with `std`, [`ChatTemplate`] renders a file's Jinja `tokenizer.chat_template` as
//! llama-cpp-python does, and [`Tokenizer::render_chat`] picks between the two.

mod bpe;
mod byte_level;
mod chat;
mod error;
mod pre_tokenizer;
mod special;
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
use vocab::Vocab;

/// Texts of tokens that end generation besides EOS, when the vocabulary has them.
const END_OF_GENERATION_TEXTS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// A byte-level BPE tokenizer built from a GGUF file. Token ids are `u32`, below
/// [`Tokenizer::vocab_size`].
#[derive(Clone)]
pub struct Tokenizer {
    vocab: Vocab,
    merges: Merges,
    special: SpecialTokens,
    pre_tokenizer: PreTokenizer,
    /// The id of each byte's single-byte token, or `u32::MAX` if the vocabulary lacks it.
    byte_tokens: [u32; 256],
    bos: u32,
    eos: u32,
    unknown: Option<u32>,
    padding: Option<u32>,
    add_bos: bool,
    /// Ids that end generation: EOS and the tokens of [`END_OF_GENERATION_TEXTS`].
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("special_tokens", &self.special.len())
            .field("pre_tokenizer", &self.pre_tokenizer)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("unknown", &self.unknown)
            .field("padding", &self.padding)
            .field("add_bos", &self.add_bos)
            .field("end_of_generation", &self.end_of_generation)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Metadata keys read by [`Tokenizer::from_gguf`] (and written by tokenizer exporters).
pub mod keys {
    /// `"gpt2"` for byte-level BPE.
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS: &str = "tokenizer.ggml.eos_token_id";
    pub const UNKNOWN: &str = "tokenizer.ggml.unknown_token_id";
    pub const PADDING: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

impl Tokenizer {
    /// Builds the tokenizer from `file`'s `tokenizer.*` metadata.
    ///
    /// Required: `tokenizer.ggml.model` (must be `"gpt2"`), `.tokens`, `.merges`,
    /// `.bos_token_id`, `.eos_token_id`. Optional: `.pre` (default `"default"`; `"smollm"`,
    /// `"gpt2"` and `"default"` are supported), `.token_type` (default: all normal),
    /// `.unknown_token_id`, `.padding_token_id`, `.add_bos_token` (default false),
    /// `tokenizer.chat_template`. Anything malformed is an error, never a panic.
    pub fn from_gguf(file: &GgufFile<'_>) -> Result<Self, TokenizerError> {
        let model = required(file, keys::MODEL)?.as_str().ok_or(wrong_type(keys::MODEL, "a string"))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre_name = match file.get(keys::PRE) {
            None => "default",
            Some(v) => v.as_str().ok_or(wrong_type(keys::PRE, "a string"))?,
        };
        let pre_tokenizer = PreTokenizer::from_name(pre_name)
            .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.to_string()))?;

        let tokens = required(file, keys::TOKENS)?.as_array().ok_or(wrong_type(keys::TOKENS, "an array of strings"))?;
        let texts = tokens.strings().ok_or(wrong_type(keys::TOKENS, "an array of strings"))?;
        let types = match file.get(keys::TOKEN_TYPE) {
            None => None,
            Some(v) => Some(token_types(v, tokens.len())?),
        };
        let vocab = Vocab::new(texts, types.as_deref(), tokens.len())?;

        let merges = required(file, keys::MERGES)?.as_array().ok_or(wrong_type(keys::MERGES, "an array of strings"))?;
        let merges = Merges::new(merges.strings().ok_or(wrong_type(keys::MERGES, "an array of strings"))?, &vocab)?;

        let bos = token_id(file, keys::BOS, &vocab)?.ok_or(TokenizerError::MissingKey(keys::BOS))?;
        let eos = token_id(file, keys::EOS, &vocab)?.ok_or(TokenizerError::MissingKey(keys::EOS))?;
        let unknown = token_id(file, keys::UNKNOWN, &vocab)?;
        let padding = token_id(file, keys::PADDING, &vocab)?;
        let add_bos = match file.get(keys::ADD_BOS) {
            None => false,
            Some(v) => v.as_bool().ok_or(wrong_type(keys::ADD_BOS, "a bool"))?,
        };
        let chat_template = match file.get(keys::CHAT_TEMPLATE) {
            None => None,
            Some(v) => Some(v.as_str().ok_or(wrong_type(keys::CHAT_TEMPLATE, "a string"))?.to_string()),
        };

        let mut byte_tokens = [u32::MAX; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let mut buf = [0u8; 4];
            let text = byte_level::byte_to_char(b as u8).encode_utf8(&mut buf);
            if let Some(id) = vocab.id(text) {
                *slot = id;
            }
        }
        let mut end_of_generation = Vec::from([eos]);
        end_of_generation.extend(END_OF_GENERATION_TEXTS.iter().filter_map(|t| vocab.id(t)));
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        let special = SpecialTokens::new(&vocab);
        Ok(Tokenizer {
            vocab,
            merges,
            special,
            pre_tokenizer,
            byte_tokens,
            bos,
            eos,
            unknown,
            padding,
            add_bos,
            end_of_generation,
            chat_template,
        })
    }

    /// Encodes `text` into token ids. With `parse_special`, the texts of control tokens
    /// (such as `<|im_start|>`) in `text` become those tokens; without it they are encoded
    /// as plain text. User-defined tokens are always matched, as in llama.cpp. No BOS is
    /// added.
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
        let mut scratch = bpe::Scratch::default();
        for fragment in fragments {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(range) => {
                    let piece = &text[range];
                    self.pre_tokenizer.split(piece, |word| {
                        self.merges.encode_word(&piece.as_bytes()[word], &self.byte_tokens, &mut scratch, out);
                    });
                }
            }
        }
    }

    /// The raw bytes token `id` stands for, or `None` if `id` is not below
    /// [`Tokenizer::vocab_size`]. Control and user-defined tokens give their text (e.g.
    /// `<|im_end|>`); other tokens may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.bytes(id)
    }

    /// Token `id`'s text as stored in the file (byte-level form: a space is `Ġ`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    /// Token `id`'s type.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.vocab.token_type(id)
    }

    /// The id of the token whose stored text is exactly `text` (byte-level form for
    /// ordinary tokens: `"Ġthe"`; literal for special ones: `"<|im_end|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    /// Appends the bytes of `ids` to `out`; ids outside the vocabulary are skipped.
    pub fn decode_bytes_into(&self, ids: &[u32], out: &mut Vec<u8>) {
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id).unwrap_or_default());
        }
    }

    /// Decodes `ids` to text. Bytes that are not valid UTF-8 become U+FFFD; ids outside
    /// the vocabulary are skipped; special tokens appear as their text.
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

    /// The beginning-of-sequence token id.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// The end-of-sequence token id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The unknown-token id, if the file names one.
    pub fn unknown(&self) -> Option<u32> {
        self.unknown
    }

    /// The padding-token id, if the file names one.
    pub fn padding(&self) -> Option<u32> {
        self.padding
    }

    /// Whether the model expects BOS at the start of a prompt (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// True if generating `id` ends the reply: EOS, and `<|im_end|>` and `<|endoftext|>`
    /// when the vocabulary has them.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The pre-tokenizer in use.
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

/// Reads an optional token id stored under `key`, checking it against the vocabulary.
fn token_id(file: &GgufFile<'_>, key: &'static str, vocab: &Vocab) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = file.get(key) else { return Ok(None) };
    let id = value.as_u64().ok_or(wrong_type(key, "a non-negative integer"))?;
    match u32::try_from(id) {
        Ok(id) if id < vocab.len() => Ok(Some(id)),
        _ => Err(TokenizerError::TokenIdOutOfRange { key, id, vocab_size: vocab.len() }),
    }
}

#[cfg(test)]
mod tests;
