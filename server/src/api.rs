//! The OpenAI wire format: requests parsed and checked, responses and errors built.

use petrel::{ChatMessage, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error as OpenAI's API answers it: an HTTP status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, `server_error`, …).
    pub kind: &'static str,
    /// The offending request field, if one.
    pub param: Option<&'static str>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param, code: None }
    }

    /// With a machine-readable `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }

    /// From a library error met while generating.
    pub fn from_petrel(e: &petrel::Error) -> Self {
        use petrel::ErrorKind;
        match e.kind() {
            ErrorKind::ContextFull => {
                ApiError::invalid(e.message(), Some("messages")).with_code("context_length_exceeded")
            }
            ErrorKind::InvalidArgument | ErrorKind::Template => ApiError::invalid(e.message(), None),
            _ => ApiError { status: 500, message: e.message().into(), kind: "server_error", param: None, code: None },
        }
    }
}

/// Limits the server enforces on every request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest `max_tokens` a request may ask for (also the default for chat).
    pub max_tokens: usize,
}

/// What a request asks the model to do.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `/v1/chat/completions`: a conversation rendered with the model's template.
    Chat(Vec<ChatMessage>),
    /// `/v1/completions`: plain text continued.
    Text(String),
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling and stopping.
    pub sampling: SamplingParams,
    /// Whether the reply streams as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk carrying `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// The fields both endpoints share (unknown fields are ignored, as OpenAI-compatible
/// servers do, since clients send many).
#[derive(Deserialize)]
struct Common {
    model: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    seed: Option<Value>,
    stop: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    n: Option<Value>,
    frequency_penalty: Option<Value>,
    presence_penalty: Option<Value>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

/// Parses a `/v1/chat/completions` body for the model `served`.
pub fn parse_chat(body: &[u8], served: &str, limits: &Limits) -> Result<Request, ApiError> {
    let parsed: ChatBody = parse_json(body)?;
    let messages = parse_messages(parsed.messages)?;
    finish(Prompt::Chat(messages), &parsed.common, served, limits, limits.max_tokens)
}

/// Parses a `/v1/completions` body for the model `served`.
pub fn parse_completion(body: &[u8], served: &str, limits: &Limits) -> Result<Request, ApiError> {
    let parsed: CompletionBody = parse_json(body)?;
    let prompt = match parsed.prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt must be one string (batches of prompts are not served)",
                Some("prompt"),
            ))
        }
        Some(_) => return Err(ApiError::invalid("prompt must be a string", Some("prompt"))),
        None => return Err(ApiError::invalid("missing required parameter: prompt", Some("prompt"))),
    };
    // OpenAI's default for completions is 16 tokens.
    finish(Prompt::Text(prompt), &parsed.common, served, limits, 16.min(limits.max_tokens))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("malformed request: {e}"), None))
}

fn parse_messages(messages: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let param = Some("messages");
    let Some(Value::Array(items)) = messages else {
        return Err(ApiError::invalid("messages must be an array of {role, content} objects", param));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", param));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid(format!("messages[{i}].role must be a string"), param))?;
            if !matches!(role, "system" | "developer" | "user" | "assistant") {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role {role:?} is not system, user or assistant"),
                    param,
                ));
            }
            // A `developer` message is OpenAI's newer name for a system message.
            let role = if role == "developer" { "system" } else { role };
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => {
                            Err(ApiError::invalid(format!("messages[{i}].content: only text parts are served"), param))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                _ => return Err(ApiError::invalid(format!("messages[{i}].content must be a string"), param)),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn finish(
    prompt: Prompt,
    common: &Common,
    served: &str,
    limits: &Limits,
    default_max: usize,
) -> Result<Request, ApiError> {
    match &common.model {
        Some(Value::String(m)) if m == served => {}
        Some(Value::String(m)) => {
            return Err(ApiError::invalid(
                format!("the model {m:?} does not exist here; this server serves {served:?}"),
                Some("model"),
            )
            .with_code("model_not_found"))
        }
        _ => return Err(ApiError::invalid("missing required parameter: model (a string)", Some("model"))),
    }
    let mut sampling =
        SamplingParams { max_tokens: default_max, temperature: 1.0, top_p: 1.0, top_k: 0, ..SamplingParams::default() };
    let max = common.max_completion_tokens.as_ref().or(common.max_tokens.as_ref());
    if let Some(v) = max.filter(|v| !v.is_null()) {
        let n = v
            .as_u64()
            .filter(|&n| n >= 1)
            .ok_or_else(|| ApiError::invalid("max_tokens must be an integer ≥ 1", Some("max_tokens")))?;
        if n > limits.max_tokens as u64 {
            return Err(ApiError::invalid(
                format!("max_tokens is {n}; this server allows at most {}", limits.max_tokens),
                Some("max_tokens"),
            ));
        }
        sampling.max_tokens = n as usize;
    }
    if let Some(v) = common.temperature.as_ref().filter(|v| !v.is_null()) {
        let t = v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| ApiError::invalid("temperature must be a number in [0, 2]", Some("temperature")))?;
        sampling.temperature = t as f32;
    }
    if let Some(v) = common.top_p.as_ref().filter(|v| !v.is_null()) {
        let p = v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| ApiError::invalid("top_p must be a number in (0, 1]", Some("top_p")))?;
        sampling.top_p = p as f32;
    }
    if let Some(v) = common.seed.as_ref().filter(|v| !v.is_null()) {
        sampling.seed = v.as_i64().ok_or_else(|| ApiError::invalid("seed must be an integer", Some("seed")))? as u64;
    }
    for (v, name) in [(&common.frequency_penalty, "frequency_penalty"), (&common.presence_penalty, "presence_penalty")]
    {
        if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
            if v.as_f64().is_none_or(|x| x != 0.0) {
                return Err(ApiError::invalid(format!("{name} is not supported (only 0)"), None));
            }
        }
    }
    match &common.n {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => return Err(ApiError::invalid("n must be 1 (one choice per request)", Some("n"))),
    }
    sampling.stop = match &common.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop must be a string or up to 4 strings", Some("stop")))?,
        Some(_) => return Err(ApiError::invalid("stop must be a string or up to 4 strings", Some("stop"))),
    };
    sampling.stop.retain(|s| !s.is_empty());
    let stream = match &common.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream must be a boolean", Some("stream"))),
    };
    let include_usage =
        common.stream_options.as_ref().and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    Ok(Request { prompt, sampling, stream, include_usage })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_tokens: 512 }
    }

    #[test]
    fn well_formed_requests_parse_with_openai_defaults() {
        let body = br#"{"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"temperature":0,"stop":"\n","stream":true,"stream_options":{"include_usage":true},"logit_bias":{}}"#;
        let r = parse_chat(body, "m", &limits()).expect("parses");
        let Prompt::Chat(messages) = &r.prompt else { panic!("a chat") };
        assert_eq!((messages[0].role.as_str(), messages[1].content.as_str()), ("system", "hi"));
        assert_eq!((r.sampling.temperature, r.sampling.max_tokens, r.stream, r.include_usage), (0.0, 512, true, true));
        assert_eq!(r.sampling.stop, vec!["\n".to_string()]);
        let r = parse_completion(br#"{"model":"m","prompt":["Once"]}"#, "m", &limits()).expect("parses");
        assert_eq!((r.sampling.max_tokens, r.sampling.temperature, r.stream), (16, 1.0, false));
    }

    #[test]
    fn malformed_requests_are_400_with_the_offending_parameter() {
        let cases: [(&[u8], Option<&str>, Option<&str>); 12] = [
            (b"{not json", None, None),
            (b"[1,2]", None, None),
            (br#"{"model":"m"}"#, Some("messages"), None),
            (br#"{"model":"m","messages":[]}"#, Some("messages"), None),
            (br#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#, Some("messages"), None),
            (br#"{"model":"m","messages":[{"role":"user","content":7}]}"#, Some("messages"), None),
            (
                br#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
                Some("model_not_found"),
            ),
            (br#"{"messages":[{"role":"user","content":"x"}]}"#, Some("model"), None),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":100000}"#,
                Some("max_tokens"),
                None,
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
                Some("max_tokens"),
                None,
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
                Some("temperature"),
                None,
            ),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":3}"#, Some("n"), None),
        ];
        for (body, param, code) in cases {
            let e = parse_chat(body, "m", &limits()).expect_err(&String::from_utf8_lossy(body));
            assert_eq!((e.status, e.param, e.code), (400, param, code), "{}", String::from_utf8_lossy(body));
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        let e = parse_completion(br#"{"model":"m","prompt":["a","b"]}"#, "m", &limits()).expect_err("a batch");
        assert_eq!(e.param, Some("prompt"));
    }
}
