//! Turning generated tokens into text one token at a time.

use super::Tokenizer;
use alloc::string::String;
use alloc::vec::Vec;

/// Decodes a stream of token ids into text, emitting only complete UTF-8 characters.
///
/// A character may be split across tokens (most emoji are, in byte-level BPE): its first
/// bytes are held back until the rest arrive. Bytes that can never form a character are
/// emitted as U+FFFD. After the first few tokens the decoder does not allocate.
///
/// A stream started with [`StreamDecoder::new`] yields exactly the bytes of
/// [`Tokenizer::decode`] over the same ids: with a space-prefixed (SentencePiece)
/// vocabulary the first token's leading space is dropped, as llama.cpp's detokenizer
/// does. [`StreamDecoder::continuing`] keeps it, for tokens that follow a prompt.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    /// A token was pushed since the stream began.
    started: bool,
    /// Bytes received but not yet emitted: at most an incomplete character's start.
    pending: Vec<u8>,
    /// The text emitted by the last call.
    out: String,
}

impl StreamDecoder {
    /// A decoder with nothing pending, at the start of a text.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for tokens that continue earlier text (generated after a prompt): the
    /// first token's leading space is kept.
    pub fn continuing() -> Self {
        StreamDecoder { started: true, ..Self::default() }
    }

    /// Adds token `id` and returns the text it completes (possibly empty). Ids outside
    /// the vocabulary add nothing. The returned text is valid until the next call.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> &str {
        let bytes = tokenizer.token_bytes(id).unwrap_or_default();
        let bytes = if self.started { bytes } else { tokenizer.strip_space_prefix(bytes) };
        self.started = true;
        self.push_bytes(bytes)
    }

    /// Adds raw bytes and returns the text they complete (possibly empty).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> &str {
        self.out.clear();
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while start < self.pending.len() {
            match core::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    self.out.push_str(text);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = &self.pending[start..start + e.valid_up_to()];
                    self.out.push_str(core::str::from_utf8(valid).unwrap_or_default());
                    start += e.valid_up_to();
                    match e.error_len() {
                        Some(bad) => {
                            self.out.push(char::REPLACEMENT_CHARACTER);
                            start += bad;
                        }
                        None => break, // an incomplete character at the end: wait for more
                    }
                }
            }
        }
        self.pending.drain(..start);
        &self.out
    }

    /// Ends the stream: returns U+FFFD if an incomplete character was pending (else
    /// nothing) and leaves the decoder empty, ready for a new stream (at the start of a
    /// text, as [`StreamDecoder::new`]).
    pub fn finish(&mut self) -> &str {
        self.out.clear();
        self.started = false;
        if !self.pending.is_empty() {
            self.out.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        &self.out
    }

    /// Number of bytes held back, waiting for the rest of a character (0..=3).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_split_characters() {
        let mut d = StreamDecoder::new();
        let bytes = "a👋é".as_bytes();
        assert_eq!(d.push_bytes(&bytes[..2]), "a");
        assert_eq!(d.pending_len(), 1);
        assert_eq!(d.push_bytes(&bytes[2..4]), "");
        assert_eq!(d.push_bytes(&bytes[4..6]), "👋");
        assert_eq!(d.push_bytes(&bytes[6..]), "é");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push_bytes(b"x\xFFy"), "x\u{FFFD}y");
        assert_eq!(d.push_bytes(b"\xE2\x82"), "");
        assert_eq!(d.push_bytes(b"z"), "\u{FFFD}z");
        assert_eq!(d.push_bytes(b"\xF0\x9F"), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.pending_len(), 0);
    }
}
