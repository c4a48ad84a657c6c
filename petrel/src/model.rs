//! An owned model: the memory map and the model read from it, behind one shareable handle.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use petrel_runtime::gguf::{GgufFile, Value};
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::tokenizer::ChatMessage;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::session::{Session, SessionParams};

/// How a model is opened.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ModelParams {}

/// The model a map holds, and what else is read from its header once.
#[derive(Debug)]
pub(crate) struct Opened<'a> {
    pub(crate) model: petrel_runtime::Model<'a>,
    name: Option<String>,
    architecture: String,
}

self_cell::self_cell!(
    /// The map and the model borrowing from it, moved together.
    pub(crate) struct MappedModel {
        owner: MappedFile,
        #[covariant]
        dependent: Opened,
    }
    impl {Debug}
);

/// What every handle to a model shares.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) mapped: MappedModel,
    path: PathBuf,
    fingerprint: [u8; 32],
}

impl Loaded {
    pub(crate) fn runtime(&self) -> &petrel_runtime::Model<'_> {
        &self.mapped.borrow_dependent().model
    }
}

/// A model file opened for generation: the file stays memory-mapped (weights are read in
/// place, never copied) for as long as any clone of this handle or any [`Session`] made
/// from it lives. Cloning is cheap (a reference count); `Model` is `Send + Sync`, so one
/// model serves sessions on many threads.
///
/// The file must not be modified while it is open (as with llama.cpp): the map would
/// change under the running model.
#[derive(Clone, Debug)]
pub struct Model {
    pub(crate) loaded: Arc<Loaded>,
}

/// Bytes read from each end of a file for its [`Model::fingerprint`].
const FINGERPRINT_SPAN: usize = 1 << 20;

impl Model {
    /// Opens `spec`: a path to a GGUF file, or a model the registry knows
    /// (`"smollm2-135m"`, `"gemma3-270m"`, `"qwen2.5-coder-0.5b"`), downloaded into the
    /// cache (`$PETREL_HOME`, default `~/.cache/petrel`) on first use when the `registry`
    /// feature is on.
    pub fn open(spec: &str, params: &ModelParams) -> Result<Model> {
        let path = crate::registry::resolve(spec)?;
        Self::open_path(&path, params)
    }

    /// Opens the GGUF file at `path`.
    pub fn open_path(path: &Path, _params: &ModelParams) -> Result<Model> {
        let file = MappedFile::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        let fingerprint = fingerprint(file.bytes());
        let invalid = |e: &dyn std::fmt::Display| {
            Error::new(ErrorKind::InvalidModel, format!("cannot load the model {}: {e}", path.display()))
        };
        let mapped = MappedModel::try_new(file, |file| {
            let gguf = GgufFile::parse(file.bytes()).map_err(|e| invalid(&e))?;
            let text = |key: &str| match gguf.get(key) {
                Some(Value::String(s)) => Some(s.to_string()),
                _ => None,
            };
            let (name, architecture) = (text("general.name"), text("general.architecture").unwrap_or_default());
            let model = petrel_runtime::Model::load(&gguf).map_err(|e| invalid(&e))?;
            Ok::<_, Error>(Opened { model, name, architecture })
        })?;
        Ok(Model { loaded: Arc::new(Loaded { mapped, path: path.to_path_buf(), fingerprint }) })
    }

    pub(crate) fn runtime(&self) -> &petrel_runtime::Model<'_> {
        self.loaded.runtime()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.loaded.path
    }

    /// The model's name: the file's `general.name`, else the file name without its
    /// extension.
    pub fn name(&self) -> String {
        match &self.loaded.mapped.borrow_dependent().name {
            Some(name) => name.clone(),
            None => self.path().file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
        }
    }

    /// The file's `general.architecture` (`llama`, `qwen2`, `gemma3`).
    pub fn architecture(&self) -> &str {
        &self.loaded.mapped.borrow_dependent().architecture
    }

    /// The trained context length in tokens.
    pub fn context_length(&self) -> usize {
        self.runtime().config.context_length
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.runtime().config.vocab_size
    }

    /// A SHA-256 over the file's size and its first and last mebibyte (metadata,
    /// vocabulary and the last tensors' weights): what a saved session is matched
    /// against.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.loaded.fingerprint
    }

    /// The token ids of `text`: BOS first when the vocabulary asks for it and `add_bos`
    /// is set (unless the text already starts with it); special-token texts such as
    /// `<|im_start|>` become their ids when `parse_special` is set, and are otherwise
    /// encoded as plain text.
    pub fn tokenize(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let tokenizer = &self.runtime().tokenizer;
        let encoded = tokenizer.encode(text, parse_special);
        let mut ids = Vec::with_capacity(encoded.len() + 1);
        if add_bos && tokenizer.add_bos() && encoded.first() != Some(&tokenizer.bos()) {
            ids.push(tokenizer.bos());
        }
        ids.extend(encoded);
        ids
    }

    /// The text of `ids` (bytes that are not valid UTF-8 become U+FFFD). Ids outside the
    /// vocabulary are refused.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        let tokenizer = &self.runtime().tokenizer;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("token id {bad} is outside the vocabulary of {}", self.vocab_size()),
            ));
        }
        Ok(tokenizer.decode(ids))
    }

    /// Renders `messages` with the file's chat template (`tokenizer.chat_template`, run as
    /// llama.cpp `--jinja` and llama-cpp-python do; ChatML when the file has none), ending
    /// with the assistant's turn opened when `add_generation_prompt`.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.runtime()
            .tokenizer
            .render_chat(messages, add_generation_prompt)
            .map_err(|e| Error::new(ErrorKind::Template, format!("cannot render the chat template: {e}")))
    }

    /// Whether `id` ends a reply (EOS, end of turn).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.runtime().tokenizer.is_end_of_generation(id)
    }

    /// A new conversation with this model (see [`Session::new`]).
    pub fn session(&self, params: &SessionParams) -> Result<Session> {
        Session::new(self, params)
    }
}

/// SHA-256 of the length and the first and last [`FINGERPRINT_SPAN`] bytes.
fn fingerprint(bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(&bytes[..bytes.len().min(FINGERPRINT_SPAN)]);
    hasher.update(&bytes[bytes.len().saturating_sub(FINGERPRINT_SPAN)..]);
    hasher.finalize().into()
}
