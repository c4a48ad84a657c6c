//! Jinja chat templates (`tokenizer.chat_template`), rendered as llama-cpp-python's
//! `Jinja2ChatFormatter` renders them (std only).
//!
//! The environment follows llama-cpp-python 0.3.36 (`llama_cpp/llama_chat_format.py`),
//! which itself follows HF transformers' `apply_chat_template`:
//! - Jinja2 with `trim_blocks=True`, `lstrip_blocks=True`, loop controls (`break`,
//!   `continue`), no autoescape, no kept trailing newline, lenient undefined values;
//! - HF's `{% generation %}…{% endgeneration %}` tag is a pass-through;
//! - `tojson` is Python's `json.dumps(x, ensure_ascii=False, indent=None,
//!   separators=None, sort_keys=False)` (so `", "` and `": "` separators, non-ASCII kept,
//!   `<`, `>` and `&` not escaped), with the same keyword arguments;
//! - the render context holds `messages` (a list of `{"role", "content"}` maps),
//!   `bos_token`, `eos_token`, `add_generation_prompt`, `functions`, `function_call`,
//!   `tools` and `tool_choice` (all `none`: defined, but false), the functions
//!   `raise_exception(msg)` and `strftime_now(fmt)`, and any extra variables of
//!   [`RenderOptions`] (e.g. `enable_thinking`);
//! - Python's string and dict methods (`.strip()`, `.startswith()`, `.split()`,
//!   `.items()`, `.get()`, …) through minijinja-contrib's `pycompat`; lists and dicts are
//!   immutable (`.append()` fails), as in Jinja2's `ImmutableSandboxedEnvironment`;
//! - printed values look like Python's: `None`, `True`, `False`, `['a', 1]`.
//!
//! `strftime_now(fmt)` formats [`RenderOptions::now`] (seconds since the Unix epoch,
//! in UTC), or the system clock in UTC when that is `None` (Python uses local time). It
//! supports `%Y %y %m %d %e %b %B %a %A %H %I %M %S %p %j %%`; other specifiers are
//! copied as written.

use super::ChatMessage;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::fmt::{self, Write as _};
use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

/// The name the template is stored under; error messages mention it.
const TEMPLATE_NAME: &str = "chat_template";

/// Why a chat template could not be compiled or rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    /// The template source does not compile (syntax error). `line` is 1-based.
    Syntax {
        /// Line of the template the error is on, if known.
        line: Option<usize>,
        /// What is wrong, as minijinja describes it.
        message: String,
    },
    /// The template called `raise_exception(message)`: it refuses the conversation
    /// (e.g. roles that do not alternate, a system message it does not support).
    Raised {
        /// The template's own message.
        message: String,
    },
    /// Rendering failed for another reason (an unknown filter, test or method, a type
    /// error, …). `line` is 1-based.
    Render {
        /// Line of the template the error is on, if known.
        line: Option<usize>,
        /// What is wrong, as minijinja describes it.
        message: String,
    },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |line: &Option<usize>| line.map(|l| format!(" at line {l}")).unwrap_or_default();
        match self {
            TemplateError::Syntax { line, message } => {
                write!(f, "chat template does not compile{}: {message}", at(line))
            }
            TemplateError::Raised { message } => write!(f, "chat template raised an exception: {message}"),
            TemplateError::Render { line, message } => {
                write!(f, "chat template failed to render{}: {message}", at(line))
            }
        }
    }
}

impl std::error::Error for TemplateError {}

/// The error `raise_exception` attaches to the minijinja error, so that
/// [`ChatTemplate::render`] can tell it from other failures.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A value of an extra template variable ([`RenderOptions::extra`]).
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateValue {
    /// `none`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
}

impl TemplateValue {
    fn to_value(&self) -> Value {
        match self {
            TemplateValue::None => Value::from(()),
            TemplateValue::Bool(b) => Value::from(*b),
            TemplateValue::Int(i) => Value::from(*i),
            TemplateValue::Str(s) => Value::from(s.as_str()),
        }
    }
}

/// What a chat template is rendered with besides the messages.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RenderOptions {
    /// End with the header of an assistant turn, so that the model writes the reply.
    pub add_generation_prompt: bool,
    /// The text of the BOS token (`bos_token`), from the vocabulary.
    pub bos_token: String,
    /// The text of the EOS token (`eos_token`), from the vocabulary.
    pub eos_token: String,
    /// The time `strftime_now` formats, in seconds since the Unix epoch (UTC); `None`
    /// reads the system clock. Set it to make a rendering reproducible.
    pub now: Option<i64>,
    /// More variables for the template, as extra keyword arguments to llama-cpp-python's
    /// formatter would be (e.g. `("enable_thinking", TemplateValue::Bool(false))`). They
    /// override the standard ones of the same name.
    pub extra: Vec<(String, TemplateValue)>,
}

impl RenderOptions {
    /// Options with `add_generation_prompt` and the BOS/EOS token texts; no fixed time and
    /// no extra variables.
    pub fn new(add_generation_prompt: bool, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        RenderOptions {
            add_generation_prompt,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            now: None,
            extra: Vec::new(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`, a Jinja chat template such as a file's `tokenizer.chat_template`.
    /// A template that does not compile is a [`TemplateError::Syntax`] naming the line.
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        // Python's `None` (and a number) is not iterable; minijinja iterates `none` as empty.
        env.add_test("iterable", |v: &Value| !v.is_none() && v.try_iter().is_ok());
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| TemplateError::Syntax { line: e.line(), message: describe(&e) })?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` with `options`. A template that calls `raise_exception` gives
    /// [`TemplateError::Raised`] with its message; other failures give
    /// [`TemplateError::Render`]. Never panics on a template's account.
    pub fn render(&self, messages: &[ChatMessage], options: &RenderOptions) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Syntax { line: e.line(), message: describe(&e) })?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))])
            })
            .collect();
        let now = options.now;
        let strftime = Value::from_function(move |fmt: &str| strftime_now(fmt, now));
        let mut ctx: Vec<(String, Value)> = Vec::from([
            ("messages".to_string(), Value::from(messages)),
            ("eos_token".to_string(), Value::from(options.eos_token.as_str())),
            ("bos_token".to_string(), Value::from(options.bos_token.as_str())),
            ("add_generation_prompt".to_string(), Value::from(options.add_generation_prompt)),
            ("functions".to_string(), Value::from(())),
            ("function_call".to_string(), Value::from(())),
            ("tools".to_string(), Value::from(())),
            ("tool_choice".to_string(), Value::from(())),
            ("strftime_now".to_string(), strftime),
        ]);
        for (name, value) in &options.extra {
            ctx.retain(|(n, _)| n != name);
            ctx.push((name.clone(), value.to_value()));
        }
        template.render(Value::from_iter(ctx)).map_err(|e| classify(&e))
    }
}

/// Turns a render error into a [`TemplateError`], recognising `raise_exception`.
fn classify(e: &Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<Raised>() {
            return TemplateError::Raised { message: raised.0.clone() };
        }
        source = err.source();
    }
    if e.kind() == ErrorKind::SyntaxError {
        return TemplateError::Syntax { line: e.line(), message: describe(e) };
    }
    TemplateError::Render { line: e.line(), message: describe(e) }
}

/// The kind and detail of a minijinja error, without its location (kept apart).
fn describe(e: &Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: &str) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {message}"))
        .with_source(Raised(message.to_string())))
}

/// Replaces HF's `{% generation %}` / `{% endgeneration %}` tags (which only mark the
/// assistant's tokens for training masks) with `{% if true %}` / `{% endif %}`, keeping
/// their whitespace-control marks, so that they render their body like Jinja2 with
/// llama-cpp-python's `IgnoreGenerationTags` extension.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body) = split_marker_front(inner);
        let (body, close) = split_marker_back(body);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(open);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(close);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn split_marker_front(s: &str) -> (&str, &str) {
    match s.as_bytes().first() {
        Some(b'-' | b'+') => (&s[..1], &s[1..]),
        _ => ("", s),
    }
}

fn split_marker_back(s: &str) -> (&str, &str) {
    match s.as_bytes().last() {
        Some(b'-' | b'+') => (&s[..s.len() - 1], &s[s.len() - 1..]),
        _ => (s, ""),
    }
}

/// Prints values as Python's `str()` does: strings as they are, `None`, `True`,
/// `False`, and containers in `repr` form.
fn python_formatter(out: &mut minijinja::Output, _state: &State, value: &Value) -> Result<(), Error> {
    if value.is_undefined() {
        return Ok(());
    }
    let mut text = String::new();
    match value.as_str() {
        Some(s) if value.kind() == ValueKind::String => text.push_str(s),
        _ => python_repr(value, &mut text)?,
    }
    out.write_str(&text).map_err(|_| Error::new(ErrorKind::WriteFailure, "could not write output"))
}

/// Python's `repr` of a value, appended to `out`.
fn python_repr(value: &Value, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => push_number(value, out),
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out)?;
                out.push_str(": ");
                python_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out)?;
            }
            out.push(']');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// A number as Python prints it: integers plainly, floats always with a `.` or exponent.
fn push_number(value: &Value, out: &mut String) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_nan() => out.push_str("nan"),
        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
        Ok(f) => {
            let _ = write!(out, "{f:?}");
        }
        Err(_) => {
            let _ = write!(out, "{value}");
        }
    }
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps` with those arguments (transformers' and llama-cpp-python's).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be strings")),
                },
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let dumper = JsonDumper {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps`, over minijinja values.
struct JsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonDumper {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn dump(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined => {
                return Err(Error::new(ErrorKind::InvalidOperation, "tojson: Undefined is not JSON serializable"))
            }
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if value.is_integer() {
                    let _ = write!(out, "{value}");
                } else {
                    match f64::try_from(value.clone()) {
                        Ok(f) if f.is_nan() => out.push_str("NaN"),
                        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
                        Ok(f) => {
                            let _ = write!(out, "{f:?}");
                        }
                        Err(_) => {
                            let _ = write!(out, "{value}");
                        }
                    }
                }
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    match key.kind() {
                        ValueKind::String => self.string(key.as_str().unwrap_or_default(), out),
                        ValueKind::None => out.push_str("\"null\""),
                        ValueKind::Bool | ValueKind::Number => {
                            let mut k = String::new();
                            self.dump(key, depth, &mut k)?;
                            self.string(&k, out);
                        }
                        _ => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                "tojson: keys must be str, int, float, bool or None",
                            ))
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.dump(&value.get_item(key)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.dump(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {} is not JSON serializable", value.kind()),
                ))
            }
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// `strftime_now(fmt)`: `now` (or the system clock), in UTC, formatted by `fmt`.
fn strftime_now(fmt: &str, now: Option<i64>) -> String {
    let secs = now.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    });
    strftime(fmt, secs)
}

/// Formats `secs` since the Unix epoch (UTC) by the C `strftime` specifiers listed in the
/// module documentation.
pub(crate) fn strftime(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (tod / 3600, tod % 3600 / 60, tod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3).
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Year, month (1..=12) and day (1..=31) of day `z` since 1970-01-01 (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        ChatTemplate::new(source)?.render(messages, &RenderOptions::new(true, "<s>", "</s>"))
    }

    #[test]
    fn strftime_matches_python() {
        // datetime(2024, 7, 26, 13, 5, 9)
        let t = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %A %j %%", t), "2024-07-26 13:25:09 Friday 208 %");
        assert_eq!(strftime("%B %d, %Y", 0), "January 01, 1970");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn python_printing_and_tojson() {
        let out = render(
            "{{ none }} {{ true }} {{ [1, 'a', none] }} {{ {'k': 'é<'}|tojson }} {{ [1, 2]|tojson(indent=2) }}",
            &[],
        );
        assert_eq!(out.as_deref(), Ok("None True [1, 'a', None] {\"k\": \"é<\"} [\n  1,\n  2\n]"));
    }

    #[test]
    fn tojson_and_printing_match_jinja2() {
        // Expected: jinja2 3.1.6 through llama-cpp-python's Jinja2ChatFormatter.
        let source = r#"{{ {'b': [1, 2.5, none, true], 'a': {'x': "q\"\n\t\u0001é"}}|tojson(indent=2, sort_keys=true) }}|{{ messages|tojson(separators=(',', ':')) }}|{{ 'é'|tojson(ensure_ascii=true) }}|{{ [] |tojson }}{{ {}|tojson(indent=4) }}|{{ 3.0 }}|{{ messages[0] }}|{{ "it's" ~ [ "it's" ] }}"#;
        let expected = "{\n  \"a\": {\n    \"x\": \"q\\\"\\n\\t\\u0001é\"\n  },\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}\
                        |[{\"role\":\"user\",\"content\":\"x\"}]|\"\\u00e9\"|[]{}|3.0|{'role': 'user', 'content': 'x'}|it's[\"it's\"]";
        assert_eq!(render(source, &[ChatMessage::user("x")]).as_deref(), Ok(expected));
    }

    #[test]
    fn generation_tags_pass_through() {
        let out = render("a{%- generation -%}  b  {%- endgeneration %}c", &[]);
        assert_eq!(out.as_deref(), Ok("abc"));
    }

    #[test]
    fn tools_are_none_but_defined() {
        let out = render("{{ tools is defined }} {{ tools is none }} {% if not tools %}x{% endif %}", &[]);
        assert_eq!(out.as_deref(), Ok("True True x"));
    }
}
