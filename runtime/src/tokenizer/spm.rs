//! SentencePiece BPE, as llama.cpp's `llm_tokenizer_spm_session`.
//!
//! The (already `▁`-escaped) text starts as one symbol per UTF-8 character. Every adjacent
//! pair whose concatenation is a token is queued with that token's score; the best score
//! merges first (ties: the leftmost pair), and the new symbol's neighbours are queued in
//! turn. A queued pair is stale once either side has changed, which llama.cpp (and this
//! code) detects by the pair's combined length. At the end each symbol is its token, or —
//! when it is not one (a single character outside the vocabulary) — its bytes as `<0xXX>`
//! byte tokens ("byte fallback"), or the unknown token if the vocabulary lacks those.

use super::vocab::Vocab;
use alloc::collections::BinaryHeap;
use alloc::vec::Vec;
use core::cmp::Ordering;

/// No neighbour.
const NONE: u32 = u32::MAX;

/// One symbol: `len` bytes of the text from `start`; `len == 0` once merged away.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
}

/// A possible merge of the adjacent symbols `left` and `right` into a token of `score`.
#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Greater pops first: higher score, then the smaller `left`, as llama.cpp's comparator.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

/// Buffers reused from one fragment to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

/// What SentencePiece merging needs besides the vocabulary.
#[derive(Clone, Debug)]
pub struct Spm {
    /// Each token's score (`tokenizer.ggml.scores`), `-0.0` normalised to `0.0`.
    scores: Vec<f32>,
    /// The id for each byte: its `<0xXX>` token, else the token whose text is that single
    /// byte, else the unknown token, else `u32::MAX` (the byte is dropped).
    byte_tokens: [u32; 256],
}

impl Spm {
    /// Builds the tables; `scores` has one entry per token.
    pub fn new(vocab: &Vocab, scores: Vec<f32>, unknown: Option<u32>) -> Self {
        let mut byte_tokens = [u32::MAX; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let name = [b'<', b'0', b'x', HEX[b >> 4], HEX[b & 15], b'>'];
            let name = core::str::from_utf8(&name).unwrap_or_default();
            let single = [b as u8];
            let single = core::str::from_utf8(&single).ok();
            *slot = vocab.id(name).or_else(|| single.and_then(|s| vocab.id(s))).or(unknown).unwrap_or(u32::MAX);
        }
        let scores = scores.into_iter().map(|s| if s == 0.0 { 0.0 } else { s }).collect();
        Spm { scores, byte_tokens }
    }

    /// Merges `text` (spaces already `▁`) and appends its token ids to `out`.
    pub fn encode(&self, vocab: &Vocab, text: &str, scratch: &mut Scratch, out: &mut Vec<u32>) {
        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        if text.is_empty() {
            return;
        }
        for (i, (at, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8() as u32;
            let end = at + c.len_utf8();
            symbols.push(Symbol {
                start: at as u32,
                len,
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: if end == text.len() { NONE } else { i as u32 + 1 },
            });
        }
        for right in 1..symbols.len() as u32 {
            self.try_add(vocab, text, symbols, queue, right - 1, right);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left as usize], symbols[bigram.right as usize]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue; // stale
            }
            symbols[bigram.right as usize].len = 0;
            let left = &mut symbols[bigram.left as usize];
            left.len += r.len;
            left.next = r.next;
            let prev = left.prev;
            if r.next != NONE {
                symbols[r.next as usize].prev = bigram.left;
            }
            self.try_add(vocab, text, symbols, queue, prev, bigram.left);
            self.try_add(vocab, text, symbols, queue, bigram.left, r.next);
        }
        let mut i = 0;
        while i != NONE {
            let s = symbols[i as usize];
            let piece = &text.as_bytes()[s.start as usize..(s.start + s.len) as usize];
            match core::str::from_utf8(piece).ok().and_then(|p| vocab.id(p)) {
                Some(id) => out.push(id),
                None => out.extend(piece.iter().map(|&b| self.byte_tokens[b as usize]).filter(|&id| id != u32::MAX)),
            }
            i = s.next;
        }
    }

    fn try_add(
        &self,
        vocab: &Vocab,
        text: &str,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Bigram>,
        left: u32,
        right: u32,
    ) {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let size = l.len + r.len;
        let Some(joined) = text.get(l.start as usize..(l.start + size) as usize) else { return };
        let Some(id) = vocab.id(joined) else { return };
        let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
        queue.push(Bigram { score, left, right, size });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::vocab::{TextForm, TokenType};
    use alloc::string::String;

    fn setup(tokens: &[(&str, f32)]) -> (Vocab, Spm) {
        let mut texts: Vec<String> = Vec::from([String::from("<unk>")]);
        let mut types = Vec::from([TokenType::Unknown]);
        let mut scores = Vec::from([0.0]);
        for b in 0..=255u8 {
            texts.push(alloc::format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
        for (t, s) in tokens {
            texts.push(String::from(*t));
            types.push(TokenType::Normal);
            scores.push(*s);
        }
        let v = Vocab::with_form(texts.iter().map(String::as_str), Some(&types), texts.len(), TextForm::SentencePiece)
            .unwrap();
        let spm = Spm::new(&v, scores, Some(0));
        (v, spm)
    }

    fn encode(v: &Vocab, spm: &Spm, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        spm.encode(v, text, &mut Scratch::default(), &mut out);
        out.iter().map(|&id| String::from(v.text(id).unwrap())).collect()
    }

    #[test]
    fn best_score_first_and_byte_fallback() {
        let (v, spm) = setup(&[("▁", -1.0), ("a", -1.0), ("b", -1.0), ("ab", -2.0), ("▁a", -3.0), ("▁ab", -4.0)]);
        assert_eq!(encode(&v, &spm, "▁ab"), ["▁ab"]);
        // "ab" (-2) beats "▁a" (-3); then "▁" + "ab" = "▁ab".
        assert_eq!(encode(&v, &spm, "▁abb"), ["▁ab", "b"]);
        assert_eq!(encode(&v, &spm, "é"), ["<0xC3>", "<0xA9>"]);
        assert_eq!(encode(&v, &spm, ""), Vec::<String>::new());
        assert_eq!(v.bytes(v.id("▁ab").unwrap()), Some(&b" ab"[..]));
        assert_eq!(v.bytes(v.id("<0xC3>").unwrap()), Some(&[0xC3][..]));
    }

    #[test]
    fn ties_go_left() {
        let (v, spm) = setup(&[("a", 0.0), ("aa", -1.0)]);
        assert_eq!(encode(&v, &spm, "aaa"), ["aa", "a"]);
    }
}
