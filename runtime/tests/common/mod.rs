//! Helpers shared by the runtime's tests on SmolLM2.

use std::path::PathBuf;

use petrel_runtime::mapped::MappedFile;

/// The cached SmolLM2 Q4_1 file, mapped (`petrel pull smollm2-135m` puts it there).
pub fn model_file() -> MappedFile {
    let home = std::env::var_os("PETREL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/petrel"));
    let path = home.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `petrel pull smollm2-135m` first", path.display());
    MappedFile::open(path).expect("model maps")
}
