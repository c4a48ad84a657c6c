//! Finding special tokens in input text before pre-tokenization, as llama.cpp's
//! `tokenizer_st_partition`.
//!
//! The special tokens — types unknown, control and user-defined — are tried one after
//! another, longest text first. Each one splits every still-unmatched text fragment at
//! all its (non-overlapping, leftmost-first) occurrences. Control and unknown tokens take
//! part only when special tokens are parsed; user-defined tokens always do (llama.cpp
//! follows Hugging Face `tokenizers` there).

use super::vocab::{TokenType, Vocab};
use alloc::vec::Vec;
use core::ops::Range;

/// A piece of the input: text still to be tokenized, or a special token already found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// A byte range of the input text.
    Text(Range<usize>),
    /// A special token's id.
    Token(u32),
}

/// One special token and how it is matched.
#[derive(Clone, Copy, Debug)]
struct Special {
    id: u32,
    /// Matched even when special tokens are not parsed (user-defined tokens).
    always: bool,
    /// llama.cpp's `LLAMA_TOKEN_ATTR_RSTRIP`: ASCII whitespace right after a match is
    /// dropped.
    rstrip: bool,
}

/// The vocabulary's special tokens, in the order they are matched.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    /// Longest text first (a stable sort: equal lengths keep id order, as llama.cpp's
    /// `std::sort` does in practice for the vocabularies tested).
    tokens: Vec<Special>,
}

impl SpecialTokens {
    /// Collects the special tokens of `vocab`. Tokens with empty text are left out: they
    /// would match everywhere.
    pub fn new(vocab: &Vocab) -> Self {
        Self::with_rstrip(vocab, |_| false)
    }

    /// [`SpecialTokens::new`], with `rstrip(id)` telling which tokens swallow the ASCII
    /// whitespace after them.
    pub fn with_rstrip(vocab: &Vocab, rstrip: impl Fn(u32) -> bool) -> Self {
        let mut tokens: Vec<Special> = (0..vocab.len())
            .filter_map(|id| {
                let ty = vocab.token_type(id)?;
                let text = vocab.text(id)?;
                (ty.is_special() && !text.is_empty()).then(|| Special {
                    id,
                    always: ty == TokenType::UserDefined,
                    rstrip: rstrip(id),
                })
            })
            .collect();
        tokens.sort_by_key(|s| core::cmp::Reverse(vocab.text(s.id).map_or(0, str::len)));
        SpecialTokens { tokens }
    }

    /// Number of special tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Splits `text` into `fragments` (cleared first). `scratch` is a reusable buffer.
    pub fn partition(
        &self,
        vocab: &Vocab,
        text: &str,
        parse_special: bool,
        fragments: &mut Vec<Fragment>,
        scratch: &mut Vec<Fragment>,
    ) {
        fragments.clear();
        if text.is_empty() {
            return;
        }
        fragments.push(Fragment::Text(0..text.len()));
        // A cheap filter before the substring search: the bytes the text contains.
        let mut present = [false; 256];
        for &b in text.as_bytes() {
            present[b as usize] = true;
        }
        for &Special { id, always, rstrip } in &self.tokens {
            if !(parse_special || always) {
                continue;
            }
            let Some(special) = vocab.text(id) else { continue };
            if !special.bytes().all(|b| present[b as usize]) || !text.contains(special) {
                continue;
            }
            scratch.clear();
            for fragment in fragments.drain(..) {
                let Fragment::Text(range) = fragment else {
                    scratch.push(fragment);
                    continue;
                };
                let mut start = range.start;
                while let Some(found) = text[start..range.end].find(special) {
                    let at = start + found;
                    if at > start {
                        scratch.push(Fragment::Text(start..at));
                    }
                    scratch.push(Fragment::Token(id));
                    start = at + special.len();
                    if rstrip {
                        while start < range.end && c_isspace(text.as_bytes()[start]) {
                            start += 1;
                        }
                    }
                }
                if start < range.end {
                    scratch.push(Fragment::Text(start..range.end));
                }
            }
            core::mem::swap(fragments, scratch);
        }
    }
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for stripping.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Vocab {
        let texts = ["<|im_start|>", "<|im_end|>", "<|im", "a", "<tool>", ""];
        let types = [
            TokenType::Control,
            TokenType::Control,
            TokenType::Control,
            TokenType::Normal,
            TokenType::UserDefined,
            TokenType::Control,
        ];
        Vocab::new(texts.iter().copied(), Some(&types), texts.len()).unwrap()
    }

    fn run(text: &str, parse_special: bool) -> Vec<Fragment> {
        let v = setup();
        let s = SpecialTokens::new(&v);
        let (mut f, mut scratch) = (Vec::new(), Vec::new());
        s.partition(&v, text, parse_special, &mut f, &mut scratch);
        f
    }

    #[test]
    fn longest_first() {
        use Fragment::*;
        let text = "<|im_start|>user\nhi<|im_end|><|im<|im_start|>";
        assert_eq!(run(text, true), [Token(0), Text(12..19), Token(1), Token(2), Token(0)]);
        assert_eq!(run("", true), []);
        assert_eq!(run("plain", true), [Text(0..5)]);
    }

    #[test]
    fn control_tokens_need_parse_special_but_user_defined_do_not() {
        use Fragment::*;
        let text = "<|im_end|> <tool>";
        assert_eq!(run(text, false), [Text(0..11), Token(4)]);
        assert_eq!(run(text, true), [Token(1), Text(10..11), Token(4)]);
    }
}
