//! Byte-pair merging within one word, as llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! A word starts as one symbol per byte (the id of that byte's token). Repeatedly, the
//! adjacent pair with the lowest merge rank is merged — ties go to the leftmost pair —
//! until no adjacent pair has a merge. Symbols are token ids rather than strings: every
//! merge's two halves and its result are checked to be tokens when the merge table is
//! built, so the id of a merged symbol is known in advance.

use super::error::TokenizerError;
use super::vocab::Vocab;
use alloc::collections::BinaryHeap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cmp::Reverse;
use hashbrown::HashMap;

/// Marks a symbol whose byte has no token (only in malformed vocabularies), and the
/// absence of a neighbour.
const NONE: u32 = u32::MAX;

/// The merge table: `(left id, right id)` → `(rank, merged id)`; lower ranks merge first.
#[derive(Clone, Debug, Default)]
pub struct Merges {
    table: HashMap<(u32, u32), (u32, u32)>,
}

impl Merges {
    /// Builds the table from GGUF `tokenizer.ggml.merges` entries (`"left right"`, rank =
    /// position). The split is at the first space after the first byte, as in llama.cpp;
    /// when a pair appears twice its first rank counts.
    pub fn new<'a>(merges: impl Iterator<Item = &'a str>, vocab: &Vocab) -> Result<Self, TokenizerError> {
        let mut table = HashMap::with_capacity(merges.size_hint().0);
        let mut joined = String::new();
        for (index, merge) in merges.enumerate() {
            let malformed = || TokenizerError::MalformedMerge { index, merge: merge.to_string() };
            let space = merge.as_bytes().iter().skip(1).position(|&b| b == b' ').ok_or_else(malformed)? + 1;
            let (left, right) = (&merge[..space], &merge[space + 1..]);
            let rank = u32::try_from(index).map_err(|_| malformed())?;
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            let id = |text: &str| {
                vocab.id(text).ok_or_else(|| TokenizerError::UnknownMergeToken { index, token: text.to_string() })
            };
            let (left_id, right_id, merged_id) = (id(left)?, id(right)?, id(&joined)?);
            table.entry((left_id, right_id)).or_insert((rank, merged_id));
        }
        Ok(Merges { table })
    }

    /// Number of distinct merges.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    fn get(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.table.get(&(left, right)).copied()
    }
}

/// One symbol of the word being merged, in a doubly linked list over `Scratch::symbols`.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    /// Token id, or [`NONE`] for a byte without a token.
    id: u32,
    prev: u32,
    next: u32,
    /// Merged into its left neighbour.
    gone: bool,
}

/// A possible merge of the adjacent symbols `left` and `right`. Ordered by rank, then
/// position, so that a min-heap pops what llama.cpp's queue pops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    rank: u32,
    left: u32,
    right: u32,
    left_id: u32,
    right_id: u32,
    merged_id: u32,
}

/// Buffers reused from one word to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Reverse<Candidate>>,
}

impl Merges {
    /// Merges the bytes of `word` and appends the resulting token ids to `out`.
    /// `byte_tokens[b]` is the id of byte `b`'s token, or `u32::MAX` if it has none (such
    /// a byte yields no token, as in llama.cpp).
    pub fn encode_word(&self, word: &[u8], byte_tokens: &[u32; 256], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if let [b] = word {
            let id = byte_tokens[*b as usize];
            if id != NONE {
                out.push(id);
            }
            return;
        }
        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        let n = word.len() as u32;
        symbols.extend(word.iter().enumerate().map(|(i, &b)| Symbol {
            id: byte_tokens[b as usize],
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            next: if i as u32 + 1 == n { NONE } else { i as u32 + 1 },
            gone: false,
        }));
        for left in 1..n {
            self.push_candidate(symbols, queue, left - 1, left);
        }
        while let Some(Reverse(c)) = queue.pop() {
            let (l, r) = (&symbols[c.left as usize], &symbols[c.right as usize]);
            if l.gone || r.gone || l.id != c.left_id || r.id != c.right_id || l.next != c.right {
                continue; // stale: one side has merged since
            }
            let after = r.next;
            symbols[c.right as usize].gone = true;
            let left = &mut symbols[c.left as usize];
            left.id = c.merged_id;
            left.next = after;
            let before = left.prev;
            if after != NONE {
                symbols[after as usize].prev = c.left;
            }
            self.push_candidate(symbols, queue, before, c.left);
            self.push_candidate(symbols, queue, c.left, after);
        }
        out.extend(symbols.iter().filter(|s| !s.gone && s.id != NONE).map(|s| s.id));
    }

    fn push_candidate(&self, symbols: &[Symbol], queue: &mut BinaryHeap<Reverse<Candidate>>, left: u32, right: u32) {
        if left == NONE || right == NONE {
            return;
        }
        let (left_id, right_id) = (symbols[left as usize].id, symbols[right as usize].id);
        if let Some((rank, merged_id)) = self.get(left_id, right_id) {
            queue.push(Reverse(Candidate { rank, left, right, left_id, right_id, merged_id }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::byte_level::byte_to_char;
    use alloc::string::String;

    /// A vocabulary of all 256 byte tokens plus `extra`.
    fn vocab(extra: &[&str]) -> (Vocab, [u32; 256]) {
        let mut texts: Vec<String> = (0..=255u8).map(|b| String::from(byte_to_char(b))).collect();
        texts.extend(extra.iter().map(|s| String::from(*s)));
        let v = Vocab::new(texts.iter().map(String::as_str), None, texts.len()).unwrap();
        let mut bytes = [NONE; 256];
        for b in 0..=255u8 {
            bytes[b as usize] = v.id(byte_to_char(b).encode_utf8(&mut [0; 4])).unwrap();
        }
        (v, bytes)
    }

    fn encode(merges: &Merges, v: &Vocab, bytes: &[u32; 256], word: &str) -> Vec<String> {
        let mut out = Vec::new();
        merges.encode_word(word.as_bytes(), bytes, &mut Scratch::default(), &mut out);
        out.iter().map(|&id| String::from(v.text(id).unwrap())).collect()
    }

    #[test]
    fn lowest_rank_first() {
        let (v, bytes) = vocab(&["ab", "bc", "abc", "Ġa"]);
        let m = Merges::new(["b c", "a b", "a bc", "Ġ a"].into_iter(), &v).unwrap();
        assert_eq!(encode(&m, &v, &bytes, "abc"), ["abc"]);
        assert_eq!(encode(&m, &v, &bytes, "abab"), ["ab", "ab"]);
        assert_eq!(encode(&m, &v, &bytes, " abd"), ["Ġ", "ab", "d"], "\"a b\" outranks \"Ġ a\"");
        assert_eq!(encode(&m, &v, &bytes, "x"), ["x"]);
        assert_eq!(encode(&m, &v, &bytes, ""), Vec::<String>::new());
    }

    #[test]
    fn ties_go_left() {
        let (v, bytes) = vocab(&["aa", "aaa"]);
        let m = Merges::new(["a a", "aa a"].into_iter(), &v).unwrap();
        assert_eq!(encode(&m, &v, &bytes, "aaa"), ["aaa"]);
        // All four "a a" pairs rank 0: (0,1) then (2,3) merge before any "aa a".
        assert_eq!(encode(&m, &v, &bytes, "aaaaa"), ["aa", "aaa"]);
    }

    #[test]
    fn bad_merges_are_errors() {
        let (v, _) = vocab(&["ab"]);
        assert!(matches!(Merges::new(["ab"].into_iter(), &v), Err(TokenizerError::MalformedMerge { index: 0, .. })));
        assert!(matches!(
            Merges::new(["a b", "a c"].into_iter(), &v),
            Err(TokenizerError::UnknownMergeToken { index: 1, .. })
        ));
        assert!(matches!(Merges::new(["a zz"].into_iter(), &v), Err(TokenizerError::UnknownMergeToken { .. })));
        assert!(matches!(Merges::new([""].into_iter(), &v), Err(TokenizerError::MalformedMerge { .. })));
    }

    #[test]
    fn first_rank_of_a_duplicate_counts() {
        let (v, _) = vocab(&["ab"]);
        let m = Merges::new(["a b", "a b"].into_iter(), &v).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(v.id("a").unwrap(), v.id("b").unwrap()), Some((0, v.id("ab").unwrap())));
    }
}
