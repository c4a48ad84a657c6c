//! Turning sampled tokens into a reply: text pieces on UTF-8 boundaries, stop sequences,
//! the reason a reply ended.

use std::time::Duration;

use petrel_runtime::tokenizer::StreamDecoder;

use crate::model::Model;
use crate::session::SamplingParams;

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The model ended its turn (EOS or end-of-turn token).
    EndOfGeneration,
    /// `max_tokens` were generated.
    MaxTokens,
    /// A stop sequence appeared (it is not part of the text).
    StopSequence,
    /// The context is full.
    ContextFull,
    /// A [`crate::CancelHandle`] cancelled it, or the text callback returned `false`.
    Cancelled,
}

impl StopReason {
    /// OpenAI's `finish_reason`: `stop`, `length` or (for a cancelled reply) `cancelled`.
    pub fn finish_reason(self) -> &'static str {
        match self {
            StopReason::EndOfGeneration | StopReason::StopSequence => "stop",
            StopReason::MaxTokens | StopReason::ContextFull => "length",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// A finished reply.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The reply's text (without a stop sequence or the end-of-turn token).
    pub text: String,
    /// The reply's token ids (without the end-of-turn token).
    pub tokens: Vec<u32>,
    /// Tokens fed before the reply (the new part of the prompt).
    pub prompt_tokens: usize,
    /// Why the reply ended.
    pub stop: StopReason,
    /// From the call to the first reply token (prefill and one sample).
    pub time_to_first_token: Duration,
    /// From the first reply token to the last.
    pub decode_time: Duration,
}

/// One accepted token's effect.
pub(crate) enum Step {
    /// Text now safe to show (possibly empty: an incomplete character, or text that may
    /// begin a stop sequence).
    Text(String),
    /// The reply has ended; the token adds nothing.
    Done,
}

/// The text side of one reply.
pub(crate) struct Decoding {
    decoder: StreamDecoder,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: Vec<String>,
    max_tokens: usize,
    accepted: usize,
    done: Option<StopReason>,
}

impl Decoding {
    pub(crate) fn new(params: &SamplingParams) -> Self {
        Decoding {
            decoder: StreamDecoder::continuing(),
            text: String::new(),
            emitted: 0,
            stop: params.stop.clone(),
            max_tokens: params.max_tokens,
            accepted: 0,
            done: None,
        }
    }

    /// Whether the reply has ended (a stop sequence, a cancel, `max_tokens`).
    pub(crate) fn is_done(&self) -> bool {
        self.done.is_some()
    }

    /// Why the reply ended, if this side decided it.
    pub(crate) fn done(&self) -> Option<StopReason> {
        self.done
    }

    /// Takes the sampled `token`.
    pub(crate) fn accept(&mut self, model: &Model, token: u32, cancelled: bool) -> Step {
        if self.done.is_some() {
            return Step::Done;
        }
        if cancelled {
            self.done = Some(StopReason::Cancelled);
            return Step::Done;
        }
        if model.is_end_of_generation(token) {
            self.done = Some(StopReason::EndOfGeneration);
            return Step::Done;
        }
        self.accepted += 1;
        let piece = self.decoder.push(&model.runtime().tokenizer, token);
        self.text.push_str(piece);
        if self.accepted >= self.max_tokens {
            self.done = Some(StopReason::MaxTokens);
        }
        Step::Text(self.release())
    }

    /// Hands out the text that cannot be part of a stop sequence any more; ends the reply
    /// at a stop sequence.
    fn release(&mut self) -> String {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        // A stop sequence not seen before ends at or after the first new byte.
        let mut from = self.emitted.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = found {
            self.text.truncate(at);
            self.done = Some(StopReason::StopSequence);
            let out = self.text[self.emitted.min(at)..].to_string();
            self.emitted = self.text.len();
            return out;
        }
        // Hold back the longest tail that begins some stop sequence.
        let held = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len().min(self.text.len() + 1)).filter(move |&n| s.is_char_boundary(n)).map(move |n| (s, n))
            })
            .filter(|(s, n)| self.text.ends_with(&s[..*n]))
            .map(|(_, n)| n)
            .max()
            .unwrap_or(0);
        let safe = (self.text.len() - held).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        out
    }

    /// Ends the text: bytes of an unfinished character become U+FFFD, held-back text is
    /// released (the reply did not stop there). Returns what was not handed out yet.
    pub(crate) fn flush(&mut self) -> String {
        if self.done != Some(StopReason::StopSequence) {
            let rest = self.decoder.finish().to_string();
            self.text.push_str(&rest);
        }
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// The reply's text so far.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` through the stop-sequence logic as if each were one token's text.
    fn run(pieces: &[&str], stop: &[&str]) -> (Vec<String>, String, Option<StopReason>) {
        let mut d = Decoding {
            decoder: StreamDecoder::continuing(),
            text: String::new(),
            emitted: 0,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            max_tokens: usize::MAX,
            accepted: 0,
            done: None,
        };
        let mut out = Vec::new();
        for p in pieces {
            if d.is_done() {
                break;
            }
            d.text.push_str(p);
            out.push(d.release());
        }
        out.push(d.flush());
        (out, d.text.clone(), d.done)
    }

    #[test]
    fn stop_sequences_end_the_text_and_partial_matches_are_held_back() {
        let (out, text, done) = run(&["Hello", " wor", "ld\n\nUs", "er: hi"], &["\n\nUser:"]);
        assert_eq!(text, "Hello world");
        assert_eq!(out.concat(), "Hello world");
        assert_eq!(done, Some(StopReason::StopSequence));
        // "\n\nUs" was held back, never handed out.
        assert_eq!(out[2], "ld");
        // A partial match that turns out not to be one is released.
        let (out, text, done) = run(&["a\n", "\nb"], &["\n\nUser:"]);
        assert_eq!((text.as_str(), done), ("a\n\nb", None));
        assert_eq!(out, vec!["a", "\n\nb", ""]);
        // Multi-byte characters and a stop sequence spanning three pieces.
        let (out, text, _) = run(&["é", "S", "T", "O", "Pz"], &["STOP"]);
        assert_eq!((out.concat().as_str(), text.as_str()), ("é", "é"));
        // No stop sequences: everything at once.
        let (out, _, done) = run(&["x", "y"], &[]);
        assert_eq!((out, done), (vec!["x".to_string(), "y".into(), String::new()], None));
    }
}
