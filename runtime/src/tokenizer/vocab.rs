//! The token table: each token's text as stored in the file, the bytes it stands for,
//! its type, and the reverse lookup from text to id.

use super::byte_level;
use super::error::TokenizerError;
use alloc::string::String;
use alloc::vec::Vec;
use core::hash::BuildHasher;
use hashbrown::{DefaultHashBuilder, HashTable};

/// A token's type (GGUF `tokenizer.ggml.token_type`, llama.cpp's `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TokenType {
    /// 0: no type given.
    Undefined = 0,
    /// 1: an ordinary byte-level BPE token.
    Normal = 1,
    /// 2: the unknown-token marker.
    Unknown = 2,
    /// 3: a control token such as `<|im_start|>`; matched in input only when special
    /// tokens are parsed.
    Control = 3,
    /// 4: a user-defined token, matched literally in input.
    UserDefined = 4,
    /// 5: an unused slot.
    Unused = 5,
    /// 6: a byte token.
    Byte = 6,
}

impl TokenType {
    /// The type for a stored value, or `None` if it is not one of 0..=6.
    pub fn from_value(value: i64) -> Option<Self> {
        Some(match value {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }

    /// True for the types whose text is literal text rather than byte-level BPE text
    /// (unknown, control and user-defined tokens), as llama.cpp renders them.
    pub fn is_special(self) -> bool {
        matches!(self, TokenType::Unknown | TokenType::Control | TokenType::UserDefined)
    }
}

/// How a vocabulary writes ordinary tokens' bytes as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextForm {
    /// GPT-2 byte-level BPE: every byte is one printable character ([`byte_level`]).
    ByteLevel,
    /// SentencePiece: UTF-8 text with U+2581 `▁` for a space.
    SentencePiece,
}

/// The byte a `<0xXX>` token stands for, as llama.cpp's `token_to_byte`.
pub fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// All tokens of a vocabulary, stored in two arenas.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// Every token's text, concatenated in id order.
    text: String,
    /// `text_ends[i]` is the end of token `i`'s text in `text` (its start is `text_ends[i-1]`).
    text_ends: Vec<u32>,
    /// Every token's bytes (what it decodes to), concatenated in id order.
    bytes: Vec<u8>,
    /// `byte_ends[i]` is the end of token `i`'s bytes in `bytes`.
    byte_ends: Vec<u32>,
    types: Vec<TokenType>,
    /// Token ids, hashed by their text.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl Vocab {
    /// Builds a byte-level table from the tokens' texts and (optionally) their types.
    ///
    /// Duplicate texts are allowed; the lookup then finds the last one, as in llama.cpp.
    #[cfg(test)]
    pub fn new<'a>(
        texts: impl Iterator<Item = &'a str>,
        types: Option<&[TokenType]>,
        len: usize,
    ) -> Result<Self, TokenizerError> {
        Self::with_form(texts, types, len, TextForm::ByteLevel)
    }

    /// Builds the table for vocabularies of either text form. A token's bytes are what
    /// llama.cpp's `token_to_piece` gives with special tokens shown: the text itself for
    /// unknown, control and user-defined tokens; the byte of a `<0xXX>` byte token; the
    /// decoded text of a normal token; nothing for unused and undefined ones.
    pub fn with_form<'a>(
        texts: impl Iterator<Item = &'a str>,
        types: Option<&[TokenType]>,
        len: usize,
        form: TextForm,
    ) -> Result<Self, TokenizerError> {
        if len == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if u32::try_from(len).is_err() {
            return Err(TokenizerError::VocabularyTooLarge(len));
        }
        let mut vocab = Vocab {
            text: String::new(),
            text_ends: Vec::with_capacity(len),
            bytes: Vec::new(),
            byte_ends: Vec::with_capacity(len),
            types: Vec::with_capacity(len),
            index: HashTable::with_capacity(len),
            hasher: DefaultHashBuilder::default(),
        };
        for (id, token) in texts.take(len).enumerate() {
            let ty = types.and_then(|t| t.get(id).copied()).unwrap_or(TokenType::Normal);
            vocab.text.push_str(token);
            match ty {
                _ if ty.is_special() => vocab.bytes.extend_from_slice(token.as_bytes()),
                TokenType::Byte => vocab.bytes.extend(byte_token_value(token)),
                TokenType::Unused | TokenType::Undefined => {}
                _ => match form {
                    TextForm::ByteLevel => byte_level::decode_into(token, &mut vocab.bytes),
                    TextForm::SentencePiece => {
                        for (i, part) in token.split('\u{2581}').enumerate() {
                            if i > 0 {
                                vocab.bytes.push(b' ');
                            }
                            vocab.bytes.extend_from_slice(part.as_bytes());
                        }
                    }
                },
            }
            let text_end = u32::try_from(vocab.text.len()).map_err(|_| TokenizerError::VocabularyTooLarge(len))?;
            let byte_end = u32::try_from(vocab.bytes.len()).map_err(|_| TokenizerError::VocabularyTooLarge(len))?;
            vocab.text_ends.push(text_end);
            vocab.byte_ends.push(byte_end);
            vocab.types.push(ty);
            vocab.insert(id as u32);
        }
        Ok(vocab)
    }

    fn insert(&mut self, id: u32) {
        let Vocab { text, text_ends, index, hasher, .. } = self;
        let text_of = |i: u32| token_slice(text, text_ends, i);
        let key = text_of(id);
        let hash = hasher.hash_one(key);
        match index.find_mut(hash, |&other| text_of(other) == key) {
            Some(existing) => *existing = id,
            None => {
                index.insert_unique(hash, id, |&other| hasher.hash_one(text_of(other)));
            }
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> u32 {
        self.types.len() as u32
    }

    /// The id of the token whose stored text is `text`.
    pub fn id(&self, text: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(text);
        self.index.find(hash, |&id| self.text(id) == Some(text)).copied()
    }

    /// Token `id`'s text as stored in the file.
    pub fn text(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.text_ends.len()).then(|| token_slice(&self.text, &self.text_ends, id))
    }

    /// The bytes token `id` stands for.
    pub fn bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.byte_ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.byte_ends[i - 1] as usize };
        self.bytes.get(start..end)
    }

    /// Token `id`'s type.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
}

/// Token `id`'s text from the arena; `id` must be below `ends.len()`.
fn token_slice<'a>(text: &'a str, ends: &[u32], id: u32) -> &'a str {
    let i = id as usize;
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    text.get(start..ends[i] as usize).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_bytes() {
        let texts = ["<|endoftext|>", "Ġthe", "a", "Ċ", "a"];
        let types = [TokenType::Control, TokenType::Normal, TokenType::Normal, TokenType::Normal, TokenType::Normal];
        let v = Vocab::new(texts.iter().copied(), Some(&types), texts.len()).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v.id("Ġthe"), Some(1));
        assert_eq!(v.id("<|endoftext|>"), Some(0));
        assert_eq!(v.id("a"), Some(4), "the last duplicate wins");
        assert_eq!(v.id("the"), None);
        assert_eq!(v.bytes(1), Some(&b" the"[..]));
        assert_eq!(v.bytes(0), Some(&b"<|endoftext|>"[..]));
        assert_eq!(v.bytes(3), Some(&b"\n"[..]));
        assert_eq!(v.bytes(5), None);
        assert_eq!(v.text(3), Some("Ċ"));
        assert_eq!(v.token_type(0), Some(TokenType::Control));
    }

    #[test]
    fn empty_is_an_error() {
        assert_eq!(Vocab::new(core::iter::empty(), None, 0).unwrap_err(), TokenizerError::EmptyVocabulary);
    }
}
