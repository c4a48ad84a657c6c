//! The end-of-generation set and the token-type corrections llama.cpp derives from token
//! texts at load time (`llama_vocab::impl::load`, "auto-detect special tokens by text"
//! and `special_eog_ids`).

use super::vocab::TokenType;
use alloc::vec::Vec;
use hashbrown::HashMap;

/// End-of-turn texts, tried when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts that end generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss tokens llama.cpp always renders (made user-defined).
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];
/// Other texts whose ids the derivation needs.
const OTHER_TEXTS: &[&str] = &["<|plamo:eos|>"];

/// Ids given by metadata keys.
#[derive(Clone, Copy, Debug)]
pub struct ExplicitIds {
    /// `tokenizer.ggml.eos_token_id` (or its default).
    pub eos: u32,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom: Option<u32>,
    /// `tokenizer.ggml.fim_pad_token_id`.
    pub fim_pad: Option<u32>,
    /// `tokenizer.ggml.fim_rep_token_id`.
    pub fim_rep: Option<u32>,
    /// `tokenizer.ggml.fim_sep_token_id`.
    pub fim_sep: Option<u32>,
}

/// What [`derive`] finds.
#[derive(Clone, Debug, Default)]
pub struct Derived {
    /// The end-of-turn id.
    pub eot: Option<u32>,
    /// llama.cpp's `special_eog_ids`, ascending.
    pub end_of_generation: Vec<u32>,
    /// Type corrections to apply in order: `(id, new type)`.
    pub type_changes: Vec<(u32, TokenType)>,
}

/// Derives the end-of-generation set from the token texts (in id order) and the ids the
/// metadata names, as llama.cpp does.
pub fn derive<'a>(texts: impl Iterator<Item = &'a str>, explicit: &ExplicitIds) -> Derived {
    let wanted = |t: &str| {
        [EOT_TEXTS, EOM_TEXTS, FIM_PAD_TEXTS, FIM_REP_TEXTS, FIM_SEP_TEXTS, EOG_TEXTS, ALWAYS_RENDERED, OTHER_TEXTS]
            .iter()
            .any(|list| list.contains(&t))
    };
    // Text → id of the last token with that text (llama.cpp's token_to_id).
    let mut found: HashMap<&'a str, u32> = HashMap::new();
    let mut texts_by_id: HashMap<u32, &'a str> = HashMap::new();
    for (id, text) in texts.enumerate() {
        if wanted(text) {
            if let Some(old) = found.insert(text, id as u32) {
                texts_by_id.remove(&old);
            }
            texts_by_id.insert(id as u32, text);
        }
    }
    let id_of = |t: &str| found.get(t).copied();
    let text_of = |id: u32| texts_by_id.get(&id).copied();
    let mut make_control = Vec::new();
    // An id from the key, else the first text of `list` present (then made control).
    let mut detect = |key: Option<u32>, list: &[&str]| -> Option<u32> {
        key.or_else(|| {
            let id = list.iter().find_map(|t| id_of(t))?;
            make_control.push(id);
            Some(id)
        })
    };
    let eot = detect(explicit.eot, EOT_TEXTS);
    let eom = detect(explicit.eom, EOM_TEXTS);
    let fim_pad = detect(explicit.fim_pad, FIM_PAD_TEXTS);
    let fim_rep = detect(explicit.fim_rep, FIM_REP_TEXTS);
    let fim_sep = detect(explicit.fim_sep, FIM_SEP_TEXTS);

    let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
    for t in EOG_TEXTS {
        if let Some(id) = id_of(t) {
            eog.push(id);
            make_control.push(id);
        }
    }
    eog.push(explicit.eos);
    eog.extend(eot);
    eog.extend(eom);
    eog.sort_unstable();
    eog.dedup();

    let mut type_changes: Vec<(u32, TokenType)> = make_control.into_iter().map(|id| (id, TokenType::Control)).collect();
    type_changes.extend(ALWAYS_RENDERED.iter().filter_map(|t| id_of(t)).map(|id| (id, TokenType::UserDefined)));

    let has = |eog: &[u32], text: &str| eog.iter().any(|&id| text_of(id) == Some(text));
    let has_call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
    if has(&eog, "<|end|>") && has_call && (has(&eog, "<|return|>") || has(&eog, "<|flush|>")) {
        if let Some(end) = eog.iter().copied().find(|&id| text_of(id) == Some("<|end|>")) {
            eog.retain(|&id| id != end);
            type_changes.push((end, TokenType::UserDefined));
        }
    }
    if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
        if let Some(s) = eog.iter().copied().find(|&id| text_of(id) == Some("</s>")) {
            eog.retain(|&id| id != s);
            type_changes.push((s, TokenType::Normal));
        }
    }
    Derived { eot, end_of_generation: eog, type_changes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(texts: &[&str], eos: u32) -> Derived {
        let explicit = ExplicitIds { eos, eot: None, eom: None, fim_pad: None, fim_rep: None, fim_sep: None };
        derive(texts.iter().copied(), &explicit)
    }

    #[test]
    fn chatml_vocabulary() {
        let d = ids(&["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_pad>", "a"], 2);
        assert_eq!(d.end_of_generation, [0, 2, 3]);
        assert_eq!(d.eot, Some(2));
        assert!(d.type_changes.contains(&(0, TokenType::Control)));
    }

    #[test]
    fn harmony_end_is_not_eog() {
        let d = ids(&["<|return|>", "<|call|>", "<|end|>", "x"], 0);
        assert_eq!(d.end_of_generation, [0, 1]);
        assert_eq!(d.type_changes.last(), Some(&(2, TokenType::UserDefined)));
        let d = ids(&["<eos>", "</s>", "<|tool_response>"], 0);
        assert_eq!(d.end_of_generation, [0, 2]);
    }
}
