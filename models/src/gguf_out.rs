//! Writing model files so that a reader never sees a broken one: the bytes are checked to
//! parse and load in the runtime, written under a temporary name, then renamed.

use std::path::Path;

use anyhow::{Context, Result};
use petrel_runtime::{GgufFile, Model};

/// Writes the GGUF `bytes` to `path` if the runtime loads them: to `path` + `.partial`
/// first, renamed into place once complete.
pub fn write_loadable(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = GgufFile::parse(bytes).map_err(|e| anyhow::anyhow!("the file to write does not parse: {e}"))?;
    Model::load(&file).map_err(|e| anyhow::anyhow!("the runtime rejects the file to write: {e}"))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    Ok(())
}
