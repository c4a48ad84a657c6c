//! Splitting text into the words that BPE merges within, exactly as llama.cpp does.
//!
//! The GPT-2 pattern is
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
//! implemented by hand after llama.cpp's `unicode_regex_split_custom_gpt2`:
//! - contractions are matched case-sensitively (`'S` is punctuation followed by a letter);
//! - a run of several whitespace characters followed by a non-space keeps its last
//!   character back, so that it becomes the leading space of the next word
//!   (`"a   b"` → `"a"`, `"  "`, `" b"`); at the end of the text the whole run is one word;
//! - `\s` is the Unicode `White_Space` property, `\p{L}` and `\p{N}` the general
//!   category groups Letter and Number.
//!
//! `smollm` first isolates every `\p{N}` character (a first split on `\p{N}`, as
//! llama.cpp's `LLAMA_VOCAB_PRE_TYPE_SMOLLM`), then applies the GPT-2 pattern to the text
//! between numbers — so a whitespace run that ends right before a digit is a word of its
//! own, whole.
//!
//! `qwen2` and `llama3` (Llama 3's, with its aliases) follow llama.cpp's
//! `unicode_regex_split_custom_qwen2` / `_llama3` for
//! `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
//! (`qwen2`: `\p{N}` one at a time instead of `{1,3}`): contractions case-insensitive, one
//! optional non-letter, non-digit, non-newline character before a run of letters, and a
//! whitespace run split after its last `\r`/`\n`.
//!
//! [`PreTokenizer::Whole`] does not split: SentencePiece vocabularies merge over the whole
//! text fragment.

use core::ops::Range;
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// Which pre-tokenizer a vocabulary uses (GGUF `tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The GPT-2 pattern alone (`"gpt-2"`, `"mpt"`, and `"gpt2"`, `"default"`; llama.cpp's
    /// `"default"` adds further expressions, not implemented).
    Gpt2,
    /// Every number character alone, then the GPT-2 pattern (`"smollm"`, and llama.cpp's
    /// `"starcoder"`, `"refact"` and `"command-r"`, which use the same expressions).
    SmolLm,
    /// Llama 3's pattern, digits in groups of up to three (`"llama-bpe"`, `"llama3"`,
    /// `"llama-v3"` and the other names llama.cpp maps to `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
    Llama3,
    /// Qwen2's pattern, every digit alone (`"qwen2"`, `"deepseek-r1-qwen"`, `"kormo"`,
    /// `"f2llmv2"`, `"megrez"`).
    Qwen2,
    /// No split: the whole fragment is one word (SentencePiece vocabularies).
    Whole,
}

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` value, or `None` if unsupported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "gpt-2" | "default" | "mpt" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" => Some(PreTokenizer::SmolLm),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
            | "jina-v5-nano" => Some(PreTokenizer::Llama3),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(PreTokenizer::Qwen2),
            _ => None,
        }
    }

    /// Calls `word` with the byte range (within `text`) of each word of `text`, in order.
    /// The ranges are non-empty and cover `text` exactly.
    pub fn split(self, text: &str, mut word: impl FnMut(Range<usize>)) {
        match self {
            PreTokenizer::Gpt2 => split_gpt2(text, 0, text.len(), &mut word),
            PreTokenizer::SmolLm => {
                let mut start = 0;
                for (at, c) in text.char_indices() {
                    if class_of(c) == Class::Number {
                        split_gpt2(text, start, at, &mut word);
                        word(at..at + c.len_utf8());
                        start = at + c.len_utf8();
                    }
                }
                split_gpt2(text, start, text.len(), &mut word);
            }
            PreTokenizer::Llama3 => split_llama3(text, 3, &mut word),
            PreTokenizer::Qwen2 => split_llama3(text, 1, &mut word),
            PreTokenizer::Whole => {
                if !text.is_empty() {
                    word(0..text.len());
                }
            }
        }
    }
}

/// The character classes the GPT-2 pattern distinguishes; they are disjoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\s`: Unicode `White_Space`.
    Whitespace,
    /// Anything else (`[^\s\p{L}\p{N}]`), unassigned code points included.
    Other,
}

fn class_of(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            '\t' | '\n' | '\x0B' | '\x0C' | '\r' | ' ' => Class::Whitespace,
            _ => Class::Other,
        };
    }
    if c.is_whitespace() {
        return Class::Whitespace;
    }
    match c.general_category_group() {
        GeneralCategoryGroup::Letter => Class::Letter,
        GeneralCategoryGroup::Number => Class::Number,
        _ => Class::Other,
    }
}

/// Applies the GPT-2 pattern to `text[start..end]`; positions outside it count as
/// "out of range" (no class), as in llama.cpp.
fn split_gpt2(text: &str, start: usize, end: usize, word: &mut impl FnMut(Range<usize>)) {
    let segment = &text[..end];
    let char_at = |pos: usize| -> Option<char> { segment.get(pos..).and_then(|s| s.chars().next()) };
    let class_at = |pos: usize| char_at(pos).map(class_of);
    // Position just past the character at `pos` (which must exist).
    let next = |pos: usize| pos + char_at(pos).map_or(1, char::len_utf8);

    let mut pos = start;
    while pos < end {
        let word_start = pos;
        let Some(c) = char_at(pos) else { break };
        let after = next(pos);

        // 's|'t|'re|'ve|'m|'ll|'d
        if c == '\'' {
            if let Some(c1) = char_at(after) {
                let after1 = next(after);
                if matches!(c1, 's' | 't' | 'm' | 'd') {
                    word(word_start..after1);
                    pos = after1;
                    continue;
                }
                if let Some(c2) = char_at(after1) {
                    if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                        let after2 = next(after1);
                        word(word_start..after2);
                        pos = after2;
                        continue;
                    }
                }
            }
        }

        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: the class after an optional space.
        let (body, body_class) = if c == ' ' { (after, class_at(after)) } else { (pos, Some(class_of(c))) };
        if let Some(class @ (Class::Letter | Class::Number | Class::Other)) = body_class {
            pos = body;
            while class_at(pos) == Some(class) {
                pos = next(pos);
            }
            word(word_start..pos);
            continue;
        }

        // `\s+(?!\S)` then `\s+`.
        let mut run_end = pos;
        let mut last = pos;
        let mut run_len = 0;
        while class_at(run_end) == Some(Class::Whitespace) {
            last = run_end;
            run_end = next(run_end);
            run_len += 1;
        }
        if run_len > 1 && run_end < end {
            // Followed by a non-space: leave the last whitespace to the next word.
            pos = last;
        } else if run_len > 0 {
            pos = run_end;
        } else {
            pos = after;
        }
        word(word_start..pos);
    }
}

/// llama.cpp's `unicode_regex_split_custom_llama3` (`max_digits` 3) and `_qwen2`
/// (`max_digits` 1) over all of `text`.
fn split_llama3(text: &str, max_digits: usize, word: &mut impl FnMut(Range<usize>)) {
    let end = text.len();
    let char_at = |pos: usize| -> Option<char> { text.get(pos..).and_then(|s| s.chars().next()) };
    let class_at = |pos: usize| char_at(pos).map(class_of);
    let next = |pos: usize| pos + char_at(pos).map_or(1, char::len_utf8);
    let is_newline = |c: char| c == '\r' || c == '\n';

    let mut pos = 0;
    let mut emit = |from: &mut usize, to: usize| {
        if to > *from {
            word(*from..to);
        }
        *from = to;
    };
    let mut prev_end = 0;
    while pos < end {
        let Some(c) = char_at(pos) else { break };
        let class = class_of(c);
        let after = next(pos);

        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == '\'' && after < end {
            if let Some(c1) = char_at(after).map(|c| c.to_ascii_lowercase()) {
                let after1 = next(after);
                if matches!(c1, 's' | 't' | 'm' | 'd') {
                    emit(&mut prev_end, after1);
                    pos = after1;
                    continue;
                }
                if after1 < end {
                    if let Some(c2) = char_at(after1).map(|c| c.to_ascii_lowercase()) {
                        if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                            let after2 = next(after1);
                            emit(&mut prev_end, after2);
                            pos = after2;
                            continue;
                        }
                    }
                }
            }
        }

        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(is_newline(c) || class == Class::Number)
            && (class == Class::Letter || class_at(after) == Some(Class::Letter))
        {
            pos = after;
            while class_at(pos) == Some(Class::Letter) {
                pos = next(pos);
            }
            emit(&mut prev_end, pos);
            continue;
        }

        // \p{N}{1,max_digits}
        if class == Class::Number {
            let mut run = 0;
            while class_at(pos) == Some(Class::Number) {
                pos = next(pos);
                run += 1;
                if run == max_digits {
                    emit(&mut prev_end, pos);
                    run = 0;
                }
            }
            emit(&mut prev_end, pos);
            continue;
        }

        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let class2 = if c == ' ' { class_at(after) } else { Some(class) };
        if matches!(class2, Some(Class::Other) | None) {
            if c == ' ' {
                pos = after;
            }
            while class_at(pos) == Some(Class::Other) {
                pos = next(pos);
            }
            while char_at(pos).is_some_and(is_newline) {
                pos = next(pos);
            }
            emit(&mut prev_end, pos);
            continue;
        }

        // `\s*[\r\n]+`, `\s+(?!\S)`, `\s+`
        let mut run_end = pos;
        let mut last = pos;
        let mut run_len = 0;
        let mut after_newline = None;
        while let Some(w) = char_at(run_end).filter(|&w| class_of(w) == Class::Whitespace) {
            last = run_end;
            run_end = next(run_end);
            run_len += 1;
            if is_newline(w) {
                after_newline = Some(run_end);
            }
        }
        if let Some(to) = after_newline {
            pos = to;
        } else if run_len > 1 && run_end < end {
            pos = last;
        } else if run_len > 0 {
            pos = run_end;
        } else {
            pos = after;
        }
        emit(&mut prev_end, pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        pre.split(text, |r| out.push(&text[r]));
        out
    }

    #[test]
    fn gpt2_words() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(words(g, "Hello world"), ["Hello", " world"]);
        assert_eq!(
            words(g, "What is the capital of France?"),
            ["What", " is", " the", " capital", " of", " France", "?"]
        );
        assert_eq!(words(g, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(g, "a   "), ["a", "   "]);
        assert_eq!(words(g, "a\nb"), ["a", "\n", "b"]);
        assert_eq!(words(g, "a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(words(g, " \n\nb"), [" \n", "\n", "b"]);
        assert_eq!(words(g, "x  !!?"), ["x", " ", " !!?"]);
        assert_eq!(words(g, "abc123 45"), ["abc", "123", " 45"]);
        assert_eq!(words(g, ""), Vec::<&str>::new());
    }

    #[test]
    fn gpt2_contractions_are_case_sensitive() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(words(g, "it's we'll I'M"), ["it", "'s", " we", "'ll", " I", "'", "M"]);
        assert_eq!(words(g, "don't 're 'x"), ["don", "'t", " '", "re", " '", "x"]);
        assert_eq!(words(g, "'''s"), ["'''", "s"]);
        assert_eq!(words(g, "'"), ["'"]);
    }

    #[test]
    fn gpt2_unicode_classes() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(words(g, "héllo wörld"), ["héllo", " wörld"]);
        assert_eq!(words(g, "日本語 テキスト"), ["日本語", " テキスト"]);
        // Only U+0020 attaches to the next word.
        assert_eq!(words(g, "a\u{3000}\u{3000}b"), ["a", "\u{3000}", "\u{3000}", "b"]);
        assert_eq!(words(g, "x ½⅓"), ["x", " ½⅓"]);
        assert_eq!(words(g, "hi 👋🏽!"), ["hi", " 👋🏽!"]);
    }

    #[test]
    fn smollm_isolates_digits() {
        let s = PreTokenizer::SmolLm;
        assert_eq!(words(s, "abc123 45"), ["abc", "1", "2", "3", " ", "4", "5"]);
        assert_eq!(words(s, "a   1"), ["a", "   ", "1"]);
        assert_eq!(words(s, "x ½"), ["x", " ", "½"]);
        assert_eq!(words(s, "2024-01-02"), ["2", "0", "2", "4", "-", "0", "1", "-", "0", "2"]);
        assert_eq!(words(s, "What is 3.14?"), ["What", " is", " ", "3", ".", "1", "4", "?"]);
    }

    #[test]
    fn llama3_and_qwen2_words() {
        let l = PreTokenizer::Llama3;
        let q = PreTokenizer::Qwen2;
        assert_eq!(words(l, "Hello world"), ["Hello", " world"]);
        assert_eq!(words(l, "1234567"), ["123", "456", "7"]);
        assert_eq!(words(q, "1234"), ["1", "2", "3", "4"]);
        assert_eq!(words(l, "IT'S we'LL"), ["IT", "'S", " we", "'LL"]);
        assert_eq!(words(l, "(hello) \tworld"), ["(hello", ")", " ", "\tworld"]);
        assert_eq!(words(l, "a\n\n  b"), ["a", "\n\n", " ", " b"]);
        assert_eq!(words(l, "a  \n b"), ["a", "  \n", " b"]);
        assert_eq!(words(l, "x ...\n\ny"), ["x", " ...\n\n", "y"]);
        assert_eq!(words(l, "a   "), ["a", "   "]);
        assert_eq!(words(l, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(l, "'x"), ["'x"]);
        assert_eq!(words(PreTokenizer::Whole, "a b"), ["a b"]);
    }

    #[test]
    fn words_cover_the_text() {
        let text = "  It's 12:30 — café's\t\tnaïve  \u{2028}x 👍👍 'LL 're\n\n";
        for pre in [PreTokenizer::Gpt2, PreTokenizer::SmolLm, PreTokenizer::Llama3, PreTokenizer::Qwen2] {
            let joined: alloc::string::String = words(pre, text).concat();
            assert_eq!(joined, text);
            assert!(words(pre, text).iter().all(|w| !w.is_empty()));
        }
    }
}
