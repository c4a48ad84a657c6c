//! Chat templates rendered by `tokenizer::ChatTemplate` against llama-cpp-python's
//! `Jinja2ChatFormatter` (goldens in `testdata/llama_cpp/chat/golden/`, written by
//! `scripts/make_golden_chat.py`; see its doc for how the reference is set up).
//!
//! - `smollm2_file_template_matches_python`, `qwen2_5_coder_file_template_matches_python`:
//!   the templates stored in the model files'
//!   `tokenizer.chat_template` (SmolLM2, Qwen2.5-Coder), read with Petrel's own GGUF reader
//!   from `$PETREL_HOME` (default `~/.cache/petrel`); a missing file fails the test.
//! - `committed_templates_match_python`: the template sources copied into
//!   `testdata/llama_cpp/chat/templates/` (no sdist or model file needed).
//! - `all_sdist_templates`: every `models/templates/*.jinja` of llama.cpp as vendored in the
//!   llama-cpp-python 0.3.36 sdist (`$PETREL_LLAMA_SRC` = that `vendor/llama.cpp`, else
//!   `$PETREL_HOME/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp`); each renders
//!   and matches python byte for byte, or fails as [`EXPECTED_FAILURES`] says, or is one
//!   of the [`PYTHON_ONLY_FAILURES`].
//! - `errors_name_the_problem`: `raise_exception`, syntax errors, unknown filters.

use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::tokenizer::{ChatMessage, ChatTemplate, RenderOptions, TemplateError, TemplateValue, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Templates for which conversation (a) fails, in python and in Petrel, and a piece of
/// Petrel's error message. They need what the plain chat API does not pass, or refuse the
/// conversation.
const EXPECTED_FAILURES: &[(&str, &str)] = &[
    // `functions + ...` with functions = None (python: "can only concatenate str (not
    // NoneType) to str").
    ("fireworks-ai-llama-3-firefunction-v2", "+ operator on unsupported types string and none"),
    // raise_exception('System role not supported').
    ("google-gemma-2-2b-it", "System role not supported"),
];

/// Templates that python refuses and Petrel renders: they loop over `tools`, which is
/// `None` without tools; Jinja2 raises "'NoneType' object is not iterable", minijinja
/// iterates `none` as an empty list (a fixed minijinja behaviour), so Petrel renders
/// the tool-use prompt with no tools. All three conversations; nothing to compare.
const PYTHON_ONLY_FAILURES: &[&str] = &[
    "CohereForAI-c4ai-command-r-plus-tool_use",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
];

/// Templates that render in both, but not to the same bytes (none today).
const KNOWN_MISMATCHES: &[&str] = &[];

fn petrel_home() -> PathBuf {
    match std::env::var_os("PETREL_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/petrel"),
    }
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/llama_cpp/chat")
}

fn golden(name: &str) -> Value {
    let path = testdata().join("golden").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): run scripts/make_golden_chat.py", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content")))
        .collect()
}

fn options(golden: &Value, case: &Value, bos: &str, eos: &str) -> RenderOptions {
    let mut options =
        RenderOptions::new(case["add_generation_prompt"].as_bool().expect("add_generation_prompt"), bos, eos);
    options.now = Some(golden["now_unix"].as_i64().expect("now_unix"));
    options
}

/// What comparing one template's cases with python gave.
#[derive(Debug, Default)]
struct Tally {
    matched: usize,
    mismatched: Vec<String>,
    both_failed: usize,
    /// Cases of [`PYTHON_ONLY_FAILURES`] (python fails, Petrel renders).
    python_only_failed: usize,
    /// Other cases where exactly one side failed.
    disagreements: Vec<String>,
}

/// Renders every golden case of `name` from `source` with the golden's bos/eos (or the
/// given ones), comparing with python's output.
fn compare(name: &str, source: &str, tokens: Option<(&str, &str)>, tally: &mut Tally) {
    let golden = golden(name);
    let (bos, eos) = tokens.unwrap_or((
        golden["bos_token"].as_str().expect("bos_token"),
        golden["eos_token"].as_str().expect("eos_token"),
    ));
    let template = ChatTemplate::new(source);
    for case in golden["cases"].as_array().expect("cases") {
        let label = format!("{name}/{}", case["name"].as_str().unwrap_or("?"));
        let ours = template
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|t| t.render(&messages(case), &options(&golden, case, bos, eos)));
        match (case["ok"].as_bool().expect("ok"), ours) {
            (true, Ok(out)) if out == case["output"].as_str().expect("output") => tally.matched += 1,
            (true, Ok(_)) if KNOWN_MISMATCHES.contains(&name) => {}
            (true, Ok(out)) => {
                tally.mismatched.push(format!("{label}:\n  python: {:?}\n  petrel: {out:?}", case["output"].as_str()))
            }
            (false, Err(_)) => tally.both_failed += 1,
            (true, Err(e)) => tally.disagreements.push(format!("{label}: python renders, petrel fails: {e}")),
            (false, Ok(_)) if PYTHON_ONLY_FAILURES.contains(&name) => tally.python_only_failed += 1,
            (false, Ok(_)) => tally
                .disagreements
                .push(format!("{label}: python fails ({}), petrel renders", case["error"].as_str().unwrap_or("?"))),
        }
    }
}

fn assert_clean(tally: &Tally, what: &str) {
    assert!(
        tally.mismatched.is_empty() && tally.disagreements.is_empty(),
        "{what}: {} cases differ from python:\n{}\n{}",
        tally.mismatched.len() + tally.disagreements.len(),
        tally.mismatched.join("\n"),
        tally.disagreements.join("\n")
    );
}

/// The template and the BOS/EOS token texts stored in a GGUF file.
fn gguf_template(path: &Path) -> (String, String, String) {
    let map = MappedFile::open(path).unwrap_or_else(|e| {
        panic!("cannot open {} ({e}): fetch the model files into $PETREL_HOME (see `petrel pull`)", path.display())
    });
    let file = GgufFile::parse(map.bytes()).expect("the model file parses");
    let source = file.get("tokenizer.chat_template").and_then(|v| v.as_str()).expect("the file has a chat template");
    let tokens: Vec<&str> = file
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .and_then(|a| a.strings())
        .expect("tokens")
        .collect();
    let token = |key: &str| {
        let id = file.get(key).and_then(|v| v.as_u64()).expect("token id") as usize;
        tokens[id].to_string()
    };
    (source.to_string(), token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))
}

/// Compares the template stored in model file `file` (in `$PETREL_HOME`) with golden
/// `name`, and with the copy committed in testdata.
fn check_model_file(name: &str, file: &str) {
    let (source, bos, eos) = gguf_template(&petrel_home().join(file));
    let committed = testdata().join("templates").join(format!("{name}.jinja"));
    assert_eq!(std::fs::read_to_string(&committed).ok().as_deref(), Some(source.as_str()), "{}", committed.display());
    let mut tally = Tally::default();
    compare(name, &source, Some((&bos, &eos)), &mut tally);
    assert_clean(&tally, file);
    assert_eq!(tally.matched, 3, "{file}: all three conversations render as in python");
}

#[test]
fn smollm2_file_template_matches_python() {
    check_model_file("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn qwen2_5_coder_file_template_matches_python() {
    check_model_file("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
}

#[test]
fn smollm2_render_chat_uses_the_file_template() {
    let path = petrel_home().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let map = MappedFile::open(&path)
        .unwrap_or_else(|e| panic!("cannot open {} ({e}): run `petrel pull smollm2-135m` first", path.display()));
    let file = GgufFile::parse(map.bytes()).expect("the model file parses");
    let tokenizer = Tokenizer::from_gguf(&file).expect("the tokenizer loads");
    assert!(tokenizer.uses_chat_template());
    let golden = golden("SmolLM2-135M-Instruct");
    for case in golden["cases"].as_array().expect("cases") {
        let ours = tokenizer.render_chat(&messages(case), true).expect("renders");
        assert_eq!(ours, case["output"].as_str().expect("output"));
    }
    // The template's own default system prompt appears when none is given.
    let ours = tokenizer.render_chat(&[ChatMessage::user("Hi")], true).expect("renders");
    assert!(ours.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{ours:?}");
}

#[test]
fn committed_templates_match_python() {
    let dir = testdata().join("templates");
    let mut tally = Tally::default();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {} ({e})", dir.display())) {
        let path = entry.expect("directory entry").path();
        let name = path.file_stem().and_then(|s| s.to_str()).expect("file name").to_string();
        let source = std::fs::read_to_string(&path).expect("template source");
        compare(&name, &source, None, &mut tally);
        count += 1;
    }
    println!("{count} committed templates: {} cases match python, {} fail in both", tally.matched, tally.both_failed);
    assert!(count >= 10, "expected the committed templates in {}", dir.display());
    assert_clean(&tally, "committed templates");
}

fn llama_src() -> PathBuf {
    let dir = match std::env::var_os("PETREL_LLAMA_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => petrel_home().join("llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"),
    };
    assert!(
        dir.join("models/templates").is_dir(),
        "{}/models/templates is missing: run scripts/fetch_llama_templates.sh (unpacks the \
         llama-cpp-python 0.3.36 sdist's templates into $PETREL_HOME/llama-sdist/), or set \
         PETREL_LLAMA_SRC to a vendor/llama.cpp",
        dir.display()
    );
    dir
}

#[test]
fn all_sdist_templates() {
    let dir = llama_src().join("models/templates");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {} ({e})", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 70, "expected the sdist's templates in {}, found {}", dir.display(), paths.len());

    let mut problems = Vec::new();
    let (mut rendered, mut failed, mut matched) = (0, 0, 0);
    let mut tally = Tally::default();
    for path in &paths {
        let name = path.file_stem().and_then(|s| s.to_str()).expect("file name");
        let source = std::fs::read_to_string(path).expect("template source");
        let golden = golden(name);
        let case = &golden["cases"][0];
        assert_eq!(case["name"], "a");
        let result = ChatTemplate::new(&source).and_then(|t| {
            t.render(
                &messages(case),
                &options(
                    &golden,
                    case,
                    golden["bos_token"].as_str().expect("bos"),
                    golden["eos_token"].as_str().expect("eos"),
                ),
            )
        });
        let expected_failure = EXPECTED_FAILURES.iter().find(|(n, _)| *n == name);
        match (result, expected_failure) {
            (Ok(out), None) => {
                rendered += 1;
                if case["ok"] == true && out == case["output"].as_str().expect("output") {
                    matched += 1;
                } else if !KNOWN_MISMATCHES.contains(&name) && !PYTHON_ONLY_FAILURES.contains(&name) {
                    problems.push(format!("{name}: differs from python ({:?})", case.get("error")));
                }
            }
            (Ok(_), Some((_, why))) => problems.push(format!("{name}: renders, but is listed to fail with {why:?}")),
            (Err(e), Some((_, why))) => {
                failed += 1;
                if !e.to_string().contains(why) {
                    problems.push(format!("{name}: fails with {e}, expected an error containing {why:?}"));
                }
                if case["ok"] == true {
                    problems.push(format!("{name}: python renders it"));
                }
            }
            (Err(e), None) => problems.push(format!("{name}: {e}")),
        }
        // All three conversations, for the numbers (asserted below).
        compare(name, &source, None, &mut tally);
    }
    println!(
        "{} templates: {rendered} render conversation (a) ({matched} identical to python), {failed} fail as expected; \
         all cases: {} identical, {} fail in both, {} python-only failures, {} differ",
        paths.len(),
        tally.matched,
        tally.both_failed,
        tally.python_only_failed,
        tally.mismatched.len() + tally.disagreements.len()
    );
    assert_eq!(failed, EXPECTED_FAILURES.len());
    assert_eq!(tally.python_only_failed, 3 * PYTHON_ONLY_FAILURES.len());
    assert_clean(&tally, "sdist templates, all conversations");
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

fn error_of(source: &str) -> TemplateError {
    match ChatTemplate::new(source).and_then(|t| t.render(&[ChatMessage::user("hi")], &RenderOptions::default())) {
        Ok(out) => panic!("{source:?} rendered {out:?}"),
        Err(e) => e,
    }
}

#[test]
fn errors_name_the_problem() {
    let e = error_of(
        "{% if messages[0].role == 'user' %}{{ raise_exception('Conversation must start with system') }}{% endif %}",
    );
    assert_eq!(e, TemplateError::Raised { message: "Conversation must start with system".into() });
    assert!(e.to_string().contains("Conversation must start with system"), "{e}");

    let e = error_of("line one\n{% for m in messages %}{{ m.content }}\n{% endfor");
    match &e {
        TemplateError::Syntax { line: Some(line), message } => {
            assert!(*line >= 2, "{e}");
            assert!(message.contains("syntax error"), "{e}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    assert!(e.to_string().contains("line"), "{e}");

    let e = error_of("\n\n{{ messages[0].content | no_such_filter }}");
    assert!(e.to_string().contains("no_such_filter") || e.to_string().contains("unknown filter"), "{e}");
    assert!(
        matches!(e, TemplateError::Syntax { line: Some(3), .. } | TemplateError::Render { line: Some(3), .. }),
        "{e:?}"
    );

    let e = error_of("{{ messages[0].content.no_such_method() }}");
    assert!(e.to_string().contains("no_such_method") || e.to_string().contains("unknown method"), "{e}");

    let e = error_of("{{ messages.nope.deeper }}");
    assert!(matches!(e, TemplateError::Render { .. }), "{e:?}");
}

#[test]
fn extra_variables_reach_the_template() {
    // Expected: llama-cpp-python's Jinja2ChatFormatter called with enable_thinking=False.
    let path = testdata().join("templates/Qwen-Qwen3-0.6B.jinja");
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{} ({e})", path.display()));
    let mut options = RenderOptions::new(true, "<|im_start|>", "<|im_end|>");
    options.extra.push(("enable_thinking".into(), TemplateValue::Bool(false)));
    let out = ChatTemplate::new(&source).and_then(|t| t.render(&[ChatMessage::user("Hi")], &options));
    assert_eq!(out.as_deref(), Ok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"));
}
