//! Saved sessions: a conversation's tokens and KV cache in one file.
//!
//! Layout, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `PETRELSS` |
//! | 4 | format version, [`VERSION`] |
//! | 32 | the model's [`Model::fingerprint`] |
//! | 1 + n | the KV-cache type's name (`f16`), length first |
//! | 8 + 4·t | the conversation's token count `t`, then the ids |
//! | 8 + c | the cache state's length `c`, then the state (`petrel_runtime::Session::save_state`) |
//! | 32 | SHA-256 of everything before it |
//!
//! A file is written under a temporary name and renamed into place, so an interrupted
//! save never leaves a partial file where a good one was.

use std::path::Path;

use petrel_runtime::KvType;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::model::Model;

/// The first bytes of every saved session.
pub const MAGIC: &[u8; 8] = b"PETRELSS";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Writes a saved session to `path`.
pub(crate) fn write(path: &Path, model: &Model, kv_type: KvType, tokens: &[u32], cache: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(cache.len() + 4 * tokens.len() + 128);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&model.fingerprint());
    out.push(kv_type.name().len() as u8);
    out.extend_from_slice(kv_type.name().as_bytes());
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    tokens.iter().for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
    out.extend_from_slice(&(cache.len() as u64).to_le_bytes());
    out.extend_from_slice(cache);
    let digest: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&digest);
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, &out).map_err(|e| Error::io("cannot write", &partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Error::io("cannot write", path, e)
    })
}

/// Reads a saved session of `model` with a `kv_type` cache from `path`: its tokens and
/// its cache state.
pub(crate) fn read(path: &Path, model: &Model, kv_type: KvType) -> Result<(Vec<u32>, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let invalid = |why: String| Error::new(ErrorKind::InvalidState, format!("{}: {why}", path.display()));
    if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(invalid("not a saved Petrel session".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(invalid(format!("saved in format version {version}; this build reads version {VERSION}")));
    }
    let Some(body_len) = bytes.len().checked_sub(32) else {
        return Err(invalid("truncated".into()));
    };
    let (body, digest) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != digest {
        return Err(invalid("truncated or altered (its checksum does not match)".into()));
    }
    let mut reader = Reader { rest: &body[12..] };
    let truncated = || invalid("truncated".into());
    if reader.take(32).ok_or_else(truncated)? != model.fingerprint() {
        return Err(invalid(format!("saved from another model than {}", model.path().display())));
    }
    let name_len = reader.take(1).ok_or_else(truncated)?[0] as usize;
    let name = reader.take(name_len).ok_or_else(truncated)?;
    if name != kv_type.name().as_bytes() {
        return Err(invalid(format!(
            "saved with a {} KV cache; this session's is {}",
            String::from_utf8_lossy(name),
            kv_type.name()
        )));
    }
    let count = reader.u64().ok_or_else(truncated)?;
    let ids = usize::try_from(count).ok().and_then(|n| n.checked_mul(4)).and_then(|n| reader.take(n));
    let tokens: Vec<u32> =
        ids.ok_or_else(truncated)?.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= model.vocab_size()) {
        return Err(invalid(format!("token id {bad} is outside the vocabulary")));
    }
    let cache_len = reader.u64().ok_or_else(truncated)?;
    let cache = usize::try_from(cache_len).ok().and_then(|n| reader.take(n)).ok_or_else(truncated)?;
    if !reader.rest.is_empty() {
        return Err(invalid("has bytes after the cache state".into()));
    }
    Ok((tokens, cache.to_vec()))
}

/// Reads fields off the front of a byte slice.
struct Reader<'b> {
    rest: &'b [u8],
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        let (head, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
}
