//! The ChatML conversation format (`<|im_start|>role\ncontent<|im_end|>\n`).
//!
//! SmolLM2-Instruct (and Qwen, and most small chat models) are trained on ChatML. The
//! file's Jinja template also inserts a default system prompt when the first message is
//! not a system message; [`format_chat`] does not — pass a system message to have one.
//! With `std`, [`Tokenizer::render_chat`](super::Tokenizer::render_chat) runs the file's
//! template instead when there is one (module `template`); ChatML stays the no_std format
//! and the fallback for files without a template.

use alloc::string::String;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks: `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// What is said, as plain text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// A `"system"` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `"user"` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `"assistant"` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Formats `messages` as ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message,
/// then `<|im_start|>assistant\n` if `add_generation_prompt`. Encode the result with
/// special tokens parsed.
pub fn format_chat(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    format_chat_into(messages, add_generation_prompt, &mut out);
    out
}

/// [`format_chat`], appending to `out`.
pub fn format_chat_into(messages: &[ChatMessage], add_generation_prompt: bool, out: &mut String) {
    for m in messages {
        for part in ["<|im_start|>", &m.role, "\n", &m.content, "<|im_end|>\n"] {
            out.push_str(part);
        }
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml() {
        let messages = [ChatMessage::user("What is the capital of France?")];
        assert_eq!(
            format_chat(&messages, true),
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let messages = [ChatMessage::system("Be brief."), ChatMessage::user("Hi"), ChatMessage::assistant("Hello!")];
        assert_eq!(
            format_chat(&messages, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
        assert_eq!(format_chat(&[], true), "<|im_start|>assistant\n");
    }
}
