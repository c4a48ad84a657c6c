//! Text corpora for training tiny models: reading them, and tokenizing them in parallel.
//!
//! Large texts are cut into chunks at line breaks where cutting provably does not change
//! how the GPT-2 and SmolLM pre-tokenizers split the text into words, so that work done
//! per chunk — encoding, or counting words to train a vocabulary — gives exactly what the
//! whole text would.

use anyhow::{bail, Context};
use indicatif::ProgressBar;
use petrel_runtime::Tokenizer;
use rayon::prelude::*;
use std::path::Path;

/// Chunk size aimed at when encoding in parallel (chunks end at the next safe line break).
const ENCODE_CHUNK_BYTES: usize = 64 * 1024;

/// Reads the corpus file at `path` as UTF-8 text.
///
/// A file that is not valid UTF-8 is an error naming the file, the byte offset of the
/// first bad byte, its line number (1-based) and the byte itself.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read corpus {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let error = e.utf8_error();
            let bytes = e.as_bytes();
            let offset = error.valid_up_to();
            let line = 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count();
            let column = 1 + offset - bytes[..offset].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let what = match error.error_len() {
                Some(_) => format!("invalid byte 0x{:02X}", bytes[offset]),
                None => "an incomplete character at the end of the file".to_string(),
            };
            bail!(
                "corpus {} is not valid UTF-8: {what} at byte offset {offset} (line {line}, byte {column} of the line)",
                path.display()
            )
        }
    }
}

/// Encodes all of `text` with `tokenizer`, in parallel, without parsing special tokens:
/// the result equals `tokenizer.encode(text, false)`.
///
/// The text is cut into chunks of about 64 KiB at line breaks (inside blank lines —
/// paragraph boundaries — and at other line breaks between non-space characters) where
/// the pre-tokenizer splits the text identically whether it sees the whole text or the
/// chunks one by one. This assumes the vocabulary has no user-defined token
/// containing a line break (user-defined tokens are matched even without special-token
/// parsing, and one could span a cut); byte-level BPE vocabularies such as the ones
/// [`crate::bpe_train`] makes have none. `progress`, if given, gets its length set to the
/// text's size in bytes and advances as chunks are done.
pub fn tokenize(tokenizer: &Tokenizer, text: &str, progress: Option<&ProgressBar>) -> Vec<u32> {
    tokenize_chunked(tokenizer, text, ENCODE_CHUNK_BYTES, progress)
}

fn tokenize_chunked(tokenizer: &Tokenizer, text: &str, chunk_bytes: usize, progress: Option<&ProgressBar>) -> Vec<u32> {
    if let Some(pb) = progress {
        pb.set_length(text.len() as u64);
        pb.set_position(0);
    }
    let chunks = split_chunks(text, chunk_bytes);
    let encoded: Vec<Vec<u32>> = chunks
        .par_iter()
        .map(|chunk| {
            let ids = tokenizer.encode(chunk, false);
            if let Some(pb) = progress {
                pb.inc(chunk.len() as u64);
            }
            ids
        })
        .collect();
    let mut out = Vec::with_capacity(encoded.iter().map(Vec::len).sum());
    for ids in encoded {
        out.extend_from_slice(&ids);
    }
    out
}

/// Cuts `text` into consecutive pieces that cover it exactly, each at least
/// `target_bytes` long (except the last, and every piece is one line-break-bounded run):
/// a piece ends at the first safe cut at or after `target_bytes` from its start.
///
/// A cut at byte `p` is safe when `text[p - 1]` is `\n`, the character before it is not
/// whitespace, and after `p` comes either a non-whitespace character, or a `\n` followed
/// by a printable ASCII character other than a digit. That is, the cut goes after a single
/// line break (`a\n|b`) or between the two line breaks of a blank line (`a\n|\nb`). For
/// the GPT-2 pattern, and SmolLM's (which isolates each digit first, then applies the
/// GPT-2 pattern between them), such a `\n` is always a word of its own in the whole text
/// — a whitespace run of one, or the first of a run of two that leaves its last character
/// to the next word — and the text after the cut is split the same way alone, so the
/// words of the pieces are the words of the whole text. Not safe, and never used:
/// - right after a blank line (`a\n\n|b`): alone, the first piece would end in the word
///   `"\n\n"`, while the whole text has `"\n"`, `"\n"`;
/// - inside a blank line before a digit (`a\n|\n1`): SmolLM makes `"\n\n"` one word there;
/// - inside a blank line at the very end (`a\n|\n`): a final whitespace run is one word;
/// - next to other whitespace (`a \n|b`, `\r\n|b`): the run would be split differently.
pub(crate) fn split_chunks(text: &str, target_bytes: usize) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let end = next_safe_cut(text, start.saturating_add(target_bytes.max(1))).unwrap_or(text.len());
        chunks.push(&text[start..end]);
        start = end;
    }
    chunks
}

/// The first safe cut (see [`split_chunks`]) at or after byte `from`, if any.
fn next_safe_cut(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let is_space = |c: Option<char>| c.is_none_or(char::is_whitespace);
    // A cut is after a `\n`, so search for the `\n` at or after `from - 1`.
    let mut newline = from.saturating_sub(1);
    while newline < bytes.len() {
        newline += bytes[newline..].iter().position(|&b| b == b'\n')?;
        let p = newline + 1;
        // `\n` is ASCII, so `newline` and `p` are character boundaries.
        let before = text[..newline].chars().next_back();
        let mut after = text[p..].chars();
        let first = after.next();
        let safe = !is_space(before)
            && match first {
                // Not a digit: SmolLM isolates digits first, and a whitespace run that ends
                // right before one is a word of its own, whole.
                Some('\n') => after.next().is_some_and(|c| c.is_ascii_graphic() && !c.is_ascii_digit()),
                other => !is_space(other),
            };
        if safe && p >= from {
            return Some(p);
        }
        newline = p;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpe_train::{tests::ENGLISH, train_bpe};
    use petrel_runtime::tokenizer::PreTokenizer;
    use std::io::Write;

    fn words(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        PreTokenizer::SmolLm.split(text, |r| out.push(&text[r]));
        out
    }

    #[test]
    fn reports_invalid_utf8_with_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::File::create(&path).unwrap().write_all(b"hello\nw\xC3\xA9r\xFFld\n").unwrap();
        let message = format!("{:#}", read_text(&path).unwrap_err());
        assert!(message.contains("bad.txt"), "{message}");
        assert!(message.contains("byte offset 10"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("0xFF"), "{message}");

        std::fs::write(&path, b"ok\n\xE6\x97").unwrap();
        let message = format!("{:#}", read_text(&path).unwrap_err());
        assert!(message.contains("byte offset 3") && message.contains("incomplete"), "{message}");

        std::fs::write(&path, "fine é 日本\n").unwrap();
        assert_eq!(read_text(&path).unwrap(), "fine é 日本\n");
        assert!(read_text(&dir.path().join("missing.txt")).is_err());
    }

    /// Paragraphs with every kind of whitespace around the line breaks.
    fn tricky_text() -> String {
        let mut text = String::new();
        let pieces = [
            "First paragraph, one line.\n\nSecond one\nhas two lines.\n\n\nThree breaks.\n\n",
            " Leading space.\n \nspace-line\n\n 12 numbers 3.14\n\n42 starts\n1\n\n2\n",
            "tab\t\n\ttabbed\n\n\u{3000}ideographic space\u{3000}\n\ncafé\n\n日本\n\nwindows\r\n\r\nlines\r\n",
            "it's\n'll\n\n're\n-- dash\n\n!!\n\n",
            "trailing spaces   \n\nend",
        ];
        for i in 0..6 {
            for p in pieces {
                text.push_str(p);
            }
            text.push_str(&ENGLISH[i * 300..i * 300 + 400]);
        }
        text.push_str("\n\n");
        text
    }

    #[test]
    fn safe_cuts_do_not_change_words() {
        let text = tricky_text();
        let whole = words(&text);
        for target in [1, 2, 7, 50, 1000, usize::MAX] {
            let chunks = split_chunks(&text, target);
            assert_eq!(chunks.concat(), text);
            let pieces: Vec<&str> = chunks.iter().flat_map(|c| words(c)).collect();
            assert_eq!(pieces, whole, "target {target}");
            if target == 1 {
                assert!(chunks.len() > 50, "{} chunks", chunks.len());
                // Both kinds of cut are used.
                assert!(chunks.iter().zip(&chunks[1..]).any(|(a, b)| a.ends_with(".\n") && b.starts_with("\nSecond")));
                assert!(chunks.iter().zip(&chunks[1..]).any(|(a, b)| a.ends_with("s\n") && b.starts_with("'ll")));
            }
        }
        // An unsafe cut really would change them.
        let text = "a\n\nb";
        assert_ne!([words("a\n\n"), words("b")].concat(), words(text));
        assert_eq!([words("a\n"), words("\nb")].concat(), words(text));
        assert_eq!(split_chunks("", 1), Vec::<&str>::new());
        assert_eq!(split_chunks("x\n\n", 1), ["x\n\n"], "a run at the very end is one word");
        assert_eq!(split_chunks("x\ny\n\nz\n\n1", 1), ["x\n", "y\n", "\nz\n\n1"]);
    }

    #[test]
    fn parallel_tokenize_equals_whole_encode() {
        let tokenizer = train_bpe(ENGLISH, 3 + 256 + 120, &["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
            .unwrap()
            .runtime_tokenizer()
            .unwrap();
        let mut text = tricky_text();
        text.push_str("<|im_start|> special texts stay plain <|endoftext|>\n\n");
        let whole = tokenizer.encode(&text, false);
        for target in [1, 3, 64, 4096] {
            assert_eq!(tokenize_chunked(&tokenizer, &text, target, None), whole, "target {target}");
        }
        let pb = ProgressBar::hidden();
        assert_eq!(tokenize(&tokenizer, &text, Some(&pb)), whole);
        assert_eq!(pb.position(), text.len() as u64);
        assert_eq!(tokenizer.decode(&whole), text);
        assert!(tokenize(&tokenizer, "", None).is_empty());
    }
}
