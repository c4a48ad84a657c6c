//! Model files mapped into memory (`std` only), so the GGUF reader borrows the page cache
//! instead of copying a model into the heap.

use std::fs::File;
use std::path::Path;

/// A read-only memory map of a model file.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private to this process. The remaining hazard is
        // another process truncating or rewriting the file while it is mapped, which would
        // change bytes under a `&[u8]`; like llama.cpp, Petrel documents that model files
        // must not be modified while in use (`petrel pull` writes to a temporary name and
        // renames, so it never rewrites a file in place).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile { map })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
