//! Training a byte-level BPE vocabulary for tiny models, in the form the runtime's
//! [`Tokenizer`] loads from GGUF metadata.
//!
//! Training splits the text into words with the runtime's own SmolLM pre-tokenizer
//! ([`PreTokenizer::SmolLm`]), so that training and inference see the same words, counts
//! the distinct words, and then repeatedly merges the most frequent adjacent pair of
//! symbols, counted over all words weighted by how often each word occurs. Pair counts
//! are updated incrementally after each merge (only the words that contain the merged
//! pair are visited), so an 18 MB corpus trains to a 1024-token vocabulary in seconds.

use crate::corpus;
use anyhow::{anyhow, bail, ensure, Context};
use hashbrown::HashMap;
use indicatif::ProgressBar;
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use petrel_runtime::tokenizer::{byte_to_char, keys, PreTokenizer};
use petrel_runtime::{GgufFile, Tokenizer};
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::path::Path;

/// The special token that is both BOS and EOS.
const END_OF_TEXT: &str = "<|endoftext|>";
/// llama.cpp token types.
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
/// Chunk size aimed at when counting words in parallel.
const COUNT_CHUNK_BYTES: usize = 1 << 20;

/// A trained byte-level BPE vocabulary (a GPT-2-style `tokenizer.ggml.model = "gpt2"`
/// vocabulary with the `"smollm"` pre-tokenizer).
///
/// Layout of the ids, for `s` special tokens:
/// - `0..s`: the special tokens, in the order given to [`train_bpe`], as literal text
///   (e.g. `<|endoftext|>`), type 3 (control);
/// - `s..s + 256`: one token per byte value, in byte order (id `s + b` is byte `b`),
///   type 1 (normal);
/// - `s + 256..`: the merged tokens, in the order they were first created, type 1.
///
/// Every non-special token text is in GPT-2 byte-level character form: each byte is
/// written as one printable character (a space is `Ġ`, a newline `Ċ`; see
/// [`byte_to_char`]), so a token's text is the concatenation of its bytes' characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainedTokenizer {
    /// Token texts, indexed by id (GGUF `tokenizer.ggml.tokens`): special tokens
    /// literally, all others in byte-level character form.
    pub tokens: Vec<String>,
    /// llama.cpp token type per id (GGUF `tokenizer.ggml.token_type`): 3 (control) for the
    /// special tokens, 1 (normal) for all others.
    pub token_types: Vec<i32>,
    /// The merges in rank order, first learned first (GGUF `tokenizer.ggml.merges`): each
    /// is `"left right"`, the two byte-level token texts joined by one space (byte-level
    /// texts never contain a space, which is written `Ġ`). Merge `i` makes the token with
    /// text `left + right`. Usually there is exactly one merge per merged token; when two
    /// merges happen to produce the same text, the second reuses the first's token, so
    /// there may be more merges than merged tokens.
    pub merges: Vec<String>,
    /// Beginning-of-sequence id: the id of `<|endoftext|>`.
    pub bos: u32,
    /// End-of-sequence id: the id of `<|endoftext|>` (the same as [`Self::bos`]).
    pub eos: u32,
}

/// Trains a byte-level BPE vocabulary of exactly `vocab_size` tokens on `text`.
///
/// The vocabulary is laid out as [`TrainedTokenizer`] describes: `special_tokens` first
/// (ids `0..s`, which must include `<|endoftext|>`: it becomes BOS and EOS), then the 256
/// byte tokens, then one token per merge until there are `vocab_size` tokens.
///
/// `text` is split into words by [`PreTokenizer::SmolLm`], exactly as the runtime splits
/// it when encoding without special-token parsing (the texts of special tokens in `text`
/// are ordinary text here, as they are then). Words are counted in parallel over chunks of
/// the text cut at line breaks that do not change the split. Each step merges the most
/// frequent adjacent pair of symbols, counted over all words weighted by word frequency;
/// ties go to the pair with the smallest (left id, right id). Within a word, occurrences
/// of the pair are merged left to right (`a a a` becomes `aa a`). The result depends only
/// on `text`, `vocab_size` and `special_tokens`, never on thread count or timing.
///
/// `progress`, if given, has its length set to the number of merged tokens to learn and
/// advances by one per token.
///
/// Errors: `vocab_size` smaller than the special tokens plus 256; `<|endoftext|>`
/// missing from `special_tokens`; a special token empty, listed twice, or equal to the
/// text of a byte or merged token; and a text too small for `vocab_size` — one whose words
/// run out of adjacent pairs before the vocabulary is full (the message says how many
/// tokens the text supports).
pub fn train_bpe(
    text: &str,
    vocab_size: usize,
    special_tokens: &[&str],
    progress: Option<&ProgressBar>,
) -> anyhow::Result<TrainedTokenizer> {
    let n_special = special_tokens.len();
    let base = n_special + 256;
    ensure!(
        vocab_size >= base,
        "vocabulary size {vocab_size} is too small: the {n_special} special tokens and the 256 byte tokens alone \
         take {base}"
    );
    ensure!(u32::try_from(vocab_size).is_ok(), "vocabulary size {vocab_size} does not fit token ids (u32)");
    let mut tokens: Vec<String> = special_tokens.iter().map(|s| s.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    for (i, special) in special_tokens.iter().enumerate() {
        ensure!(!special.is_empty(), "special token {i} is empty");
        ensure!(!special_tokens[..i].contains(special), "special token {special:?} is listed twice");
        ensure!(!tokens[n_special..].iter().any(|t| t == special), "special token {special:?} is also a byte token");
    }
    let eos = special_tokens
        .iter()
        .position(|s| *s == END_OF_TEXT)
        .ok_or_else(|| anyhow!("the special tokens must include {END_OF_TEXT} (it is both BOS and EOS)"))?
        as u32;
    let mut token_types = vec![TYPE_CONTROL; n_special];
    token_types.resize(base, TYPE_NORMAL);
    let mut ids: HashMap<String, u32> =
        tokens.iter().enumerate().skip(n_special).map(|(id, t)| (t.clone(), id as u32)).collect();

    if let Some(pb) = progress {
        pb.set_message("counting words");
    }
    let words = count_words(text, COUNT_CHUNK_BYTES);
    let mut trainer = Trainer::new(&words, n_special as u32);
    drop(words);
    if let Some(pb) = progress {
        pb.set_message("merging");
        pb.set_length((vocab_size - base) as u64);
        pb.set_position(0);
    }

    let mut merges = Vec::with_capacity(vocab_size - base);
    while tokens.len() < vocab_size {
        let Some((left, right)) = trainer.best_pair() else {
            bail!(
                "the text is too small for {vocab_size} tokens: its words ran out of pairs to merge after {} \
                 merges, at {} tokens",
                merges.len(),
                tokens.len()
            );
        };
        let (left_text, right_text) = (&tokens[left as usize], &tokens[right as usize]);
        let merged = format!("{left_text}{right_text}");
        merges.push(format!("{left_text} {right_text}"));
        let id = match ids.get(&merged) {
            Some(&id) => id,
            None => {
                ensure!(
                    !special_tokens.contains(&merged.as_str()),
                    "special token {merged:?} is also learned as an ordinary token"
                );
                let id = tokens.len() as u32;
                ids.insert(merged.clone(), id);
                tokens.push(merged);
                token_types.push(TYPE_NORMAL);
                if let Some(pb) = progress {
                    pb.inc(1);
                }
                id
            }
        };
        trainer.merge((left, right), id);
    }
    Ok(TrainedTokenizer { tokens, token_types, merges, bos: eos, eos })
}

impl TrainedTokenizer {
    /// Writes the vocabulary into `w`'s metadata under the keys [`Tokenizer::from_gguf`]
    /// reads: `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "smollm"`,
    /// `tokenizer.ggml.tokens` (strings), `tokenizer.ggml.token_type` (i32s),
    /// `tokenizer.ggml.merges` (strings), `tokenizer.ggml.bos_token_id` and
    /// `tokenizer.ggml.eos_token_id` (u32s), and `tokenizer.ggml.add_bos_token = false`.
    /// Existing values of those keys are replaced.
    pub fn write_metadata(&self, w: &mut GgufWriter) {
        w.metadata(keys::MODEL, MetadataValue::String("gpt2".into()))
            .metadata(keys::PRE, MetadataValue::String("smollm".into()))
            .metadata(keys::TOKENS, MetadataValue::StringArray(self.tokens.clone()))
            .metadata(keys::TOKEN_TYPE, MetadataValue::I32Array(self.token_types.clone()))
            .metadata(keys::MERGES, MetadataValue::StringArray(self.merges.clone()))
            .metadata(keys::BOS, MetadataValue::U32(self.bos))
            .metadata(keys::EOS, MetadataValue::U32(self.eos))
            .metadata(keys::ADD_BOS, MetadataValue::Bool(false));
    }

    /// Saves the vocabulary as a tokenizer-only GGUF file at `path`: the metadata of
    /// [`Self::write_metadata`] and no tensors. The file is written to a temporary file in
    /// the same directory and then renamed over `path`, so `path` never holds half a file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut w = GgufWriter::new();
        self.write_metadata(&mut w);
        let bytes = w.to_bytes();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let context = || format!("cannot write tokenizer {}", path.display());
        let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(context)?;
        tmp.write_all(&bytes).with_context(context)?;
        tmp.as_file().sync_all().with_context(context)?;
        tmp.persist(path).map_err(|e| e.error).with_context(context)?;
        Ok(())
    }

    /// Loads a vocabulary from a GGUF file written by [`Self::save`] (or any GGUF file
    /// whose metadata [`Self::write_metadata`] wrote). The vocabulary is checked the way
    /// the runtime checks it (every merge's halves and result are tokens, ids in range),
    /// and must be a `"gpt2"` model with the `"smollm"` pre-tokenizer. Errors name the
    /// file and what is wrong.
    pub fn load(path: &Path) -> anyhow::Result<TrainedTokenizer> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        let file = GgufFile::parse(&bytes).with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        Self::from_gguf(&file).with_context(|| format!("{} does not hold a usable tokenizer", path.display()))
    }

    /// Reads the vocabulary back from `file`'s metadata.
    fn from_gguf(file: &GgufFile<'_>) -> anyhow::Result<TrainedTokenizer> {
        Tokenizer::from_gguf(file)?;
        let get = |key: &str| file.get(key).ok_or_else(|| anyhow!("missing metadata key {key}"));
        let string = |key: &str| get(key)?.as_str().ok_or_else(|| anyhow!("{key} is not a string"));
        let strings = |key: &str| -> anyhow::Result<Vec<String>> {
            let array = get(key)?.as_array().ok_or_else(|| anyhow!("{key} is not an array"))?;
            let items = array.strings().ok_or_else(|| anyhow!("{key} is not an array of strings"))?;
            Ok(items.map(str::to_string).collect())
        };
        let id = |key: &str| -> anyhow::Result<u32> {
            let value = get(key)?.as_u64().ok_or_else(|| anyhow!("{key} is not an unsigned integer"))?;
            u32::try_from(value).map_err(|_| anyhow!("{key} = {value} is out of range"))
        };
        let model = string(keys::MODEL)?;
        ensure!(model == "gpt2", "{} is {model:?}, not \"gpt2\"", keys::MODEL);
        let pre = string(keys::PRE)?;
        ensure!(pre == "smollm", "{} is {pre:?}, not \"smollm\"", keys::PRE);
        let tokens = strings(keys::TOKENS)?;
        let types = get(keys::TOKEN_TYPE)?.as_array().ok_or_else(|| anyhow!("{} is not an array", keys::TOKEN_TYPE))?;
        let token_types = types
            .integers()
            .ok_or_else(|| anyhow!("{} is not an array of integers", keys::TOKEN_TYPE))?
            .map(|t| i32::try_from(t).map_err(|_| anyhow!("token type {t} is out of range")))
            .collect::<anyhow::Result<Vec<i32>>>()?;
        let merges = strings(keys::MERGES)?;
        Ok(TrainedTokenizer { tokens, token_types, merges, bos: id(keys::BOS)?, eos: id(keys::EOS)? })
    }

    /// The runtime tokenizer for this vocabulary, built the way a model file's is: the
    /// metadata is written into an in-memory GGUF file and read back with
    /// [`Tokenizer::from_gguf`]. The tokenizer owns its data.
    pub fn runtime_tokenizer(&self) -> anyhow::Result<Tokenizer> {
        let mut w = GgufWriter::new();
        self.write_metadata(&mut w);
        let bytes = w.to_bytes();
        let file = GgufFile::parse(&bytes).context("the tokenizer's GGUF metadata does not parse")?;
        Tokenizer::from_gguf(&file).context("the runtime rejects the trained vocabulary")
    }
}

/// The distinct words of `text` (as [`PreTokenizer::SmolLm`] splits it) with their
/// counts, sorted by word. Counted in parallel over chunks of about `chunk_bytes`.
fn count_words(text: &str, chunk_bytes: usize) -> Vec<(&str, u64)> {
    let chunks = corpus::split_chunks(text, chunk_bytes);
    let counts = chunks
        .par_iter()
        .map(|&chunk| {
            let mut counts: HashMap<&str, u64> = HashMap::new();
            PreTokenizer::SmolLm.split(chunk, |range| *counts.entry(&chunk[range]).or_insert(0) += 1);
            counts
        })
        .reduce(HashMap::new, |a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (word, count) in small {
                *big.entry(word).or_insert(0) += count;
            }
            big
        });
    let mut words: Vec<(&str, u64)> = counts.into_iter().collect();
    words.sort_unstable();
    words
}

/// Two adjacent symbols (token ids).
type Pair = (u32, u32);

/// One distinct word during training.
struct Word {
    /// The word's current symbols (token ids).
    symbols: Vec<u32>,
    /// How often the word occurs in the text.
    count: i64,
}

/// The merge state: words as symbol sequences, and the weighted count of every adjacent
/// pair, kept up to date incrementally.
struct Trainer {
    words: Vec<Word>,
    /// Weighted occurrences of each pair with a positive count (others are absent).
    counts: HashMap<Pair, i64>,
    /// For each pair, the indices of the words that contain it — and possibly of some
    /// that no longer do, and duplicates; only ever a superset.
    containing: HashMap<Pair, Vec<u32>>,
    /// Max-heap of `(count, pair)`, smallest pair first among equal counts. Entries may be
    /// stale; for every pair with a positive count there is an entry whose count is at
    /// least the current one (counts only fall, except for pairs that gain occurrences in
    /// a merge, which get a fresh entry then).
    heap: BinaryHeap<(i64, Reverse<Pair>)>,
    /// Count changes of the merge in progress.
    delta: HashMap<Pair, i64>,
}

impl Trainer {
    /// Each word starts as its bytes; byte `b` is token `first_byte_id + b`.
    fn new(words: &[(&str, u64)], first_byte_id: u32) -> Self {
        let words: Vec<Word> = words
            .iter()
            .map(|&(word, count)| Word {
                symbols: word.bytes().map(|b| first_byte_id + u32::from(b)).collect(),
                count: i64::try_from(count).unwrap_or(i64::MAX),
            })
            .collect();
        let mut counts: HashMap<Pair, i64> = HashMap::new();
        let mut containing: HashMap<Pair, Vec<u32>> = HashMap::new();
        for (index, word) in words.iter().enumerate() {
            for pair in word.symbols.windows(2) {
                let pair = (pair[0], pair[1]);
                *counts.entry(pair).or_insert(0) += word.count;
                let list = containing.entry(pair).or_default();
                if list.last() != Some(&(index as u32)) {
                    list.push(index as u32);
                }
            }
        }
        let heap = counts.iter().map(|(&pair, &count)| (count, Reverse(pair))).collect();
        Trainer { words, counts, containing, heap, delta: HashMap::new() }
    }

    /// The most frequent pair (smallest pair among equals), or `None` if no word has two
    /// symbols left.
    fn best_pair(&mut self) -> Option<Pair> {
        while let Some((count, Reverse(pair))) = self.heap.pop() {
            let current = self.counts.get(&pair).copied().unwrap_or(0);
            if current == count {
                return Some(pair);
            }
            if current > 0 {
                self.heap.push((current, Reverse(pair)));
            }
        }
        None
    }

    /// Replaces every occurrence of `pair` (left to right, not overlapping) by `new`.
    fn merge(&mut self, pair: Pair, new: u32) {
        let (a, b) = pair;
        let mut list = self.containing.remove(&pair).unwrap_or_default();
        list.sort_unstable();
        list.dedup();
        let Trainer { words, containing, delta, .. } = self;
        for &index in &list {
            let word = &mut words[index as usize];
            let (s, count) = (&mut word.symbols, word.count);
            let mut bump = |p: Pair, d: i64| {
                *delta.entry(p).or_insert(0) += d;
                if d > 0 {
                    let list = containing.entry(p).or_default();
                    if list.last() != Some(&index) {
                        list.push(index);
                    }
                }
            };
            let n = s.len();
            let (mut read, mut write) = (0, 0);
            while read < n {
                if read + 1 < n && s[read] == a && s[read + 1] == b {
                    // `s[write - 1]` is the (possibly just merged) symbol before; `s[read + 2]`
                    // is still the original one after, as `write <= read`.
                    if write > 0 {
                        bump((s[write - 1], a), -count);
                        bump((s[write - 1], new), count);
                    }
                    if read + 2 < n {
                        bump((b, s[read + 2]), -count);
                        bump((new, s[read + 2]), count);
                    }
                    s[write] = new;
                    read += 2;
                } else {
                    s[write] = s[read];
                    read += 1;
                }
                write += 1;
            }
            s.truncate(write);
        }
        for (p, d) in self.delta.drain() {
            if p == pair || d == 0 {
                continue;
            }
            let count = self.counts.entry(p).or_insert(0);
            *count += d;
            let count = *count;
            if count <= 0 {
                self.counts.remove(&p);
                self.containing.remove(&p);
            } else if d > 0 {
                self.heap.push((count, Reverse(p)));
            }
        }
        self.counts.remove(&pair);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap as StdHashMap;

    /// A few KB of English prose (ASCII), for training small vocabularies.
    pub(crate) const ENGLISH: &str = "\
The storm petrel is a small seabird that spends most of its life far out at sea. It comes to land only \
to breed, and then only at night, on remote islands where there are no rats or cats to eat its eggs. \
Sailors used to call these birds Mother Carey's chickens, and they believed that the birds carried the \
souls of drowned seamen. The name petrel is said to come from Saint Peter, who walked on the water, \
because the birds seem to patter across the surface of the waves as they feed.

A petrel feeds on tiny animals that float near the surface: shrimp, the larvae of fish, and drops of \
oil from the carcasses of whales. It finds its food by smell, which is unusual among birds. Some kinds \
can smell a patch of oil from many miles away, and a ship that throws fish oil over the side will soon \
be followed by a flock of them. They fly low, close to the water, and in a strong wind they shelter in \
the troughs between the waves.

The young birds hatch in burrows, in holes in walls, or under rocks. Each pair raises a single chick \
each year. The parents take turns to sit on the egg, and each shift can last for several days while the \
other parent is away at sea, feeding. When the chick has hatched, both parents bring it food, which they \
carry in their stomachs as a rich, oily paste. The chick grows fat, and for a time it is heavier than \
either of its parents. Then the parents stop coming, and after a week or two of hunger the chick leaves \
the burrow and flies out to sea on its own.

A language model reads text as a sequence of tokens. A token may be a whole word, a part of a word, or a \
single byte. The tokenizer learns which pieces to use by counting: it starts from single bytes and \
repeatedly joins the pair of neighbours that occurs most often in the training text, until it has as \
many tokens as it was asked for. Common words such as the, and, of and to soon become single tokens, \
while rare words are spelled out from smaller pieces. Because every byte is a token, any text at all \
can be encoded, even text in a language the tokenizer has never seen.

The same rules that split the training text into words are used again when the model runs, so that the \
model sees the text cut into the same pieces as the tokenizer did. Numbers are split into single digits, \
so that the model can learn arithmetic one digit at a time. Spaces are attached to the start of the word \
that follows them, and a run of several spaces keeps its last space for the next word.

It was a dark and stormy night, and the rain fell in torrents, except at occasional intervals, when it \
was checked by a violent gust of wind which swept up the streets, rattling along the housetops, and \
fiercely agitating the scanty flame of the lamps that struggled against the darkness. The sea was rough \
and the petrels were out on the water, running across the crests of the waves as if nothing were wrong.
";

    const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

    fn words(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        PreTokenizer::SmolLm.split(text, |r| out.push(&text[r]));
        out
    }

    fn byte_level(word: &str) -> Vec<String> {
        word.bytes().map(|b| byte_to_char(b).to_string()).collect()
    }

    /// Applies the merges in rank order to each word, each merge left to right over the
    /// whole word, and looks the pieces up in the vocabulary.
    fn naive_encode(t: &TrainedTokenizer, text: &str) -> Vec<u32> {
        let ids: StdHashMap<&str, u32> = t.tokens.iter().enumerate().map(|(i, s)| (s.as_str(), i as u32)).collect();
        let mut out = Vec::new();
        for word in words(text) {
            let mut symbols = byte_level(word);
            for merge in &t.merges {
                let (left, right) = merge.split_once(' ').unwrap();
                let mut merged = Vec::with_capacity(symbols.len());
                let mut i = 0;
                while i < symbols.len() {
                    if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
                        merged.push(format!("{left}{right}"));
                        i += 2;
                    } else {
                        merged.push(symbols[i].clone());
                        i += 1;
                    }
                }
                symbols = merged;
            }
            out.extend(symbols.iter().map(|s| ids[s.as_str()]));
        }
        out
    }

    /// BPE training the slow way: every word occurrence separately, all pairs recounted
    /// before every merge. Returns the merges.
    fn naive_train(text: &str, n_special: usize, n_merges: usize) -> Vec<String> {
        let mut tokens: Vec<String> = vec![String::new(); n_special];
        tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
        let mut ids: StdHashMap<String, u32> =
            tokens.iter().enumerate().skip(n_special).map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut occurrences: Vec<Vec<u32>> =
            words(text).iter().map(|w| w.bytes().map(|b| n_special as u32 + b as u32).collect()).collect();
        let mut merges = Vec::new();
        while merges.len() < n_merges {
            let mut counts: StdHashMap<Pair, usize> = StdHashMap::new();
            for w in &occurrences {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += 1;
                }
            }
            let Some((&(a, b), _)) = counts.iter().max_by_key(|&(&pair, &count)| (count, Reverse(pair))) else {
                break;
            };
            let text = format!("{}{}", tokens[a as usize], tokens[b as usize]);
            merges.push(format!("{} {}", tokens[a as usize], tokens[b as usize]));
            let new = *ids.entry(text.clone()).or_insert_with(|| {
                tokens.push(text);
                tokens.len() as u32 - 1
            });
            for w in &mut occurrences {
                let mut out = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                        out.push(new);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
        }
        merges
    }

    fn train(vocab_size: usize) -> TrainedTokenizer {
        train_bpe(ENGLISH, vocab_size, &SPECIALS, None).unwrap()
    }

    #[test]
    fn layout_and_runtime_metadata() {
        let t = train(3 + 256 + 300);
        assert_eq!(t.tokens.len(), 559);
        assert_eq!(t.token_types.len(), 559);
        assert_eq!(t.merges.len(), 300);
        assert_eq!(&t.tokens[..3], SPECIALS);
        assert_eq!(t.tokens[3 + b' ' as usize], "Ġ");
        assert_eq!(t.tokens[3 + b'a' as usize], "a");
        assert_eq!(&t.token_types[..4], [3, 3, 3, 1]);
        assert!(t.token_types[3..].iter().all(|&ty| ty == 1));
        assert_eq!((t.bos, t.eos), (0, 0));
        for (i, merge) in t.merges.iter().enumerate() {
            assert_eq!(t.tokens[259 + i], merge.replacen(' ', "", 1), "one new token per merge here");
        }

        let r = t.runtime_tokenizer().unwrap();
        assert_eq!(r.vocab_size(), 559);
        assert_eq!((r.bos(), r.eos(), r.add_bos()), (0, 0, false));
        assert_eq!(r.pre_tokenizer(), PreTokenizer::SmolLm);
        assert_eq!(r.token_id("<|im_end|>"), Some(2));
        assert_eq!(r.encode("<|im_start|>", true), [1]);
        assert!(r.token_id("Ġthe").is_some(), "a common word is one token");

        let mut w = GgufWriter::new();
        t.write_metadata(&mut w);
        let bytes = w.to_bytes();
        let file = GgufFile::parse(&bytes).unwrap();
        assert_eq!(file.get("tokenizer.ggml.add_bos_token").unwrap().as_bool(), Some(false));
        assert_eq!(file.tensors().len(), 0);
    }

    #[test]
    fn round_trips_seen_and_unseen_text() {
        let r = train(3 + 256 + 300).runtime_tokenizer().unwrap();
        let unseen = "Café au lait, 日本語のテキスト, naïve résumé — 1234567890 and 3.14159!\n\n\
                      Multiple   spaces\t\ttabs\r\nCRLF\n\n\n  indented\n🙂 emoji 👋🏽 <|endoftext|> end  ";
        for text in [ENGLISH, unseen, "", " ", "\n", "é", "日本", "  x  "] {
            let ids = r.encode(text, false);
            assert_eq!(r.decode(&ids), text);
        }
        let n = r.encode(ENGLISH, false).len();
        assert!(n * 2 < ENGLISH.len(), "merges compress the training text: {n} tokens");
    }

    #[test]
    fn first_merge_is_the_most_frequent_pair() {
        let mut counts: StdHashMap<(u8, u8), usize> = StdHashMap::new();
        for word in words(ENGLISH) {
            for p in word.as_bytes().windows(2) {
                *counts.entry((p[0], p[1])).or_default() += 1;
            }
        }
        let (&(a, b), _) = counts.iter().max_by_key(|&(&pair, &count)| (count, Reverse(pair))).unwrap();
        let t = train(3 + 256 + 1);
        assert_eq!(t.merges, [format!("{} {}", byte_to_char(a), byte_to_char(b))]);
    }

    #[test]
    fn matches_naive_training() {
        for (text, n) in [(ENGLISH, 300), ("aaaa aaa abab ab ab ba aaaaa", 6), ("x 11 22 1212\n\n\n\n", 2)] {
            let t = train_bpe(text, 3 + 256 + n, &SPECIALS, None).unwrap();
            assert_eq!(t.merges, naive_train(text, 3, n), "text {:?}", &text[..10]);
        }
        // Word counting over chunks of any size gives the whole text's counts.
        let whole = count_words(ENGLISH, usize::MAX);
        for chunk in [1, 10, 333] {
            assert_eq!(count_words(ENGLISH, chunk), whole);
        }
    }

    #[test]
    fn runtime_encoding_matches_naive_merges() {
        let t = train(3 + 256 + 300);
        let r = t.runtime_tokenizer().unwrap();
        let texts = [
            &ENGLISH[..1500],
            "The petrels were feeding on the oily surface, and the sailors watched them.",
            "Tokens 42 and  spaces   here, aaaa, sea-birds' eggs\n\nthe end.",
        ];
        for text in texts {
            assert_eq!(r.encode(text, false), naive_encode(&t, text), "{text:?}");
        }
    }

    #[test]
    fn deterministic() {
        let a = train(3 + 256 + 200);
        let b = train(3 + 256 + 200);
        assert_eq!(a, b);
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let c = one_thread.install(|| train(3 + 256 + 200));
        assert_eq!(a, c);
        // A smaller vocabulary is a prefix of a larger one.
        let small = train(3 + 256 + 50);
        assert_eq!(small.merges[..], a.merges[..50]);
    }

    #[test]
    fn bad_requests_are_errors() {
        let err = |text: &str, size: usize, specials: &[&str]| {
            format!("{:#}", train_bpe(text, size, specials, None).unwrap_err())
        };
        assert!(err(ENGLISH, 258, &SPECIALS).contains("too small"));
        assert!(err(ENGLISH, 300, &["<|im_end|>"]).contains("<|endoftext|>"));
        assert!(err(ENGLISH, 300, &["<|endoftext|>", "<|endoftext|>"]).contains("twice"));
        assert!(err(ENGLISH, 300, &["<|endoftext|>", ""]).contains("empty"));
        assert!(err(ENGLISH, 300, &["<|endoftext|>", "a"]).contains("byte token"));
        let message = err("ab ab", 3 + 256 + 5, &SPECIALS);
        assert!(message.contains("ran out of pairs to merge after 2 merges, at 261 tokens"), "{message}");
        assert!(err("", 3 + 256 + 1, &SPECIALS).contains("ran out"));
        // Exactly the specials and the bytes needs no pairs.
        let bytes_only = train_bpe("", 257, &["<|endoftext|>"], None).unwrap();
        assert!(bytes_only.merges.is_empty());
        assert_eq!(bytes_only.runtime_tokenizer().unwrap().decode(&[1 + b'h' as u32, 1 + b'i' as u32]), "hi");
    }

    #[test]
    fn progress_counts_tokens() {
        let pb = ProgressBar::hidden();
        train_bpe(ENGLISH, 3 + 256 + 40, &SPECIALS, Some(&pb)).unwrap();
        assert_eq!((pb.position(), pb.length()), (40, Some(40)));
    }

    #[test]
    fn save_and_load() {
        let t = train(3 + 256 + 100);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.gguf");
        t.save(&path).unwrap();
        assert_eq!(TrainedTokenizer::load(&path).unwrap(), t);
        t.save(&path).unwrap(); // overwrites
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");

        let bytes = std::fs::read(&path).unwrap();
        let truncated = dir.path().join("truncated.gguf");
        for len in [0, 3, 20, bytes.len() / 2, bytes.len() - 32] {
            std::fs::write(&truncated, &bytes[..len]).unwrap();
            let message = format!("{:#}", TrainedTokenizer::load(&truncated).unwrap_err());
            assert!(message.contains("truncated.gguf") && message.contains("not a valid GGUF"), "{message}");
        }
        // A GGUF file without a tokenizer.
        let mut w = GgufWriter::new();
        w.metadata("general.name", MetadataValue::String("x".into()));
        std::fs::write(&truncated, w.to_bytes()).unwrap();
        let message = format!("{:#}", TrainedTokenizer::load(&truncated).unwrap_err());
        assert!(message.contains("tokenizer.ggml.model"), "{message}");
        // A different pre-tokenizer.
        let mut w = GgufWriter::new();
        t.write_metadata(&mut w);
        w.metadata("tokenizer.ggml.pre", MetadataValue::String("gpt2".into()));
        std::fs::write(&truncated, w.to_bytes()).unwrap();
        assert!(format!("{:#}", TrainedTokenizer::load(&truncated).unwrap_err()).contains("smollm"));
        assert!(TrainedTokenizer::load(&dir.path().join("missing.gguf")).is_err());
    }

    /// Trains a 1024-token vocabulary on the cached corpus and reports time, compression
    /// on the held-out text and sample merges:
    /// `cargo test -p petrel-models --release train_on_corpus -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs the corpus in ~/.cache/petrel/corpora"]
    fn train_on_corpus() {
        let dir = std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/petrel/corpora");
        let train_text = corpus::read_text(&dir.join("train.txt")).unwrap();
        let heldout = corpus::read_text(&dir.join("heldout.txt")).unwrap();
        let start = std::time::Instant::now();
        let t = train_bpe(&train_text, 1024, &SPECIALS, None).unwrap();
        let train_time = start.elapsed();
        let r = t.runtime_tokenizer().unwrap();
        let start = std::time::Instant::now();
        let ids = corpus::tokenize(&r, &heldout, None);
        let encode_time = start.elapsed();
        println!(
            "trained {} tokens ({} merges) on {} bytes in {:.2?} with {} threads",
            t.tokens.len(),
            t.merges.len(),
            train_text.len(),
            train_time,
            rayon::current_num_threads()
        );
        println!(
            "held-out: {} bytes -> {} tokens: {:.4} tokens/byte ({:.2} bytes/token), encoded in {:.2?}",
            heldout.len(),
            ids.len(),
            ids.len() as f64 / heldout.len() as f64,
            heldout.len() as f64 / ids.len() as f64,
            encode_time
        );
        assert_eq!(r.decode(&ids), heldout);
        println!("first merges: {:?}", &t.merges[..10]);
        let step = t.merges.len() / 10;
        println!("every {step}th merge: {:?}", t.merges.iter().step_by(step).skip(1).take(10).collect::<Vec<_>>());
        println!("last merges: {:?}", &t.merges[t.merges.len() - 10..]);

        // The incremental counts agree with full recounts on a slice of the real corpus.
        let cut = super::corpus::split_chunks(&train_text, 300_000)[0];
        let start = std::time::Instant::now();
        assert_eq!(train_bpe(cut, 3 + 256 + 200, &SPECIALS, None).unwrap().merges, naive_train(cut, 3, 200));
        println!("naive check on {} bytes: {:.2?}", cut.len(), start.elapsed());
    }
}
