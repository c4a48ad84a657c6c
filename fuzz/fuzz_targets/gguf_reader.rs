//! Fuzzes the GGUF reader: any input must parse or fail with an error, and every value
//! and tensor of a parsed file must be readable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_runtime::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse(data) {
        for (_, value) in file.metadata() {
            if let Some(array) = value.as_array() {
                assert_eq!(array.iter().count(), array.len());
            }
        }
        for tensor in file.tensors() {
            let _ = tensor.data.iter().fold(0u8, |a, &b| a ^ b);
        }
    }
});
