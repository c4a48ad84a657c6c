//! Picks the linker script for the target's QEMU machine, links defmt's script when defmt
//! logs, and puts the model (or, for the fault drill, a truncated copy) in OUT_DIR for
//! `include_bytes!`.

use std::{env, fs, path::PathBuf};

/// The model the firmware runs, relative to this crate.
const MODEL: &str = "../models/petrel-tiny/petrel-tiny-w4a4.gguf";

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = env::var("TARGET").expect("cargo sets TARGET");
    // A `memory.x` next to Cargo.toml would shadow this one: the scripts are named per machine.
    // PETREL_MEMORY_X names another (a board's, see boards/).
    let memory = match env::var("PETREL_MEMORY_X") {
        Ok(path) => path,
        Err(_) if target.starts_with("thumbv8m.main") => "memory-an547.x".to_string(),
        Err(_) => "memory-an386.x".to_string(),
    };
    println!("cargo:rerun-if-env-changed=PETREL_MEMORY_X");
    fs::copy(&memory, out.join("memory.x")).unwrap_or_else(|e| panic!("copy the linker script {memory}: {e}"));
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed={memory}");
    if env::var_os("CARGO_FEATURE_DEFMT_LOG").is_some() && env::var_os("CARGO_FEATURE_SEMIHOSTING_LOG").is_none() {
        println!("cargo:rustc-link-arg=-Tdefmt.x");
    }

    let mut model = fs::read(MODEL).unwrap_or_else(|e| panic!("read {MODEL}: {e}"));
    if env::var_os("CARGO_FEATURE_FAULT_CORRUPT_MODEL").is_some() {
        // The drill: the last tensor's bytes cut short, as a failed flash write would leave them.
        model.truncate(model.len() - 4096);
    }
    fs::write(out.join("model.gguf"), &model).expect("write the model copy");
    println!("cargo:rerun-if-changed={MODEL}");
}
