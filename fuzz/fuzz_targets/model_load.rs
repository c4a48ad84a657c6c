//! Fuzzes loading a model (metadata checks, tokenizer construction, tensor shapes) from
//! arbitrary GGUF bytes: loading must succeed or return an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_runtime::gguf::GgufFile;
use petrel_runtime::Model;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse(data) {
        let _ = Model::load(&file);
    }
});
