//! Helpers shared by the CLI tests that run on SmolLM2.

use std::path::PathBuf;
use std::process::Output;

/// The cached SmolLM2 file (`petrel pull smollm2-135m` puts it there).
// Each test crate compiles this module anew; not all of them use every helper.
#[allow(dead_code)]
pub fn model_path() -> PathBuf {
    let path = petrel_models::registry::cache_dir().expect("cache dir").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `petrel pull smollm2-135m` first", path.display());
    path
}

/// Asserts a clean failure whose message contains `needle`.
pub fn assert_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
