//! Writing GGUF files: metadata and tensors into one byte buffer that [`crate::gguf`]
//! reads back. Used by exporters and by tests that need small, exact model files.

use alloc::string::String;
use alloc::vec::Vec;

use crate::gguf::{GgufFile, TensorType, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// An owned metadata value to write.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array of i32.
    I32Array(Vec<i32>),
    /// An array of f32.
    F32Array(Vec<f32>),
    /// An array of strings.
    StringArray(Vec<String>),
}

impl MetadataValue {
    /// The writable form of a value read from a file: integers widen to 32 or 64 bits,
    /// f64 narrows to f32; `None` for an i64 beyond i32 or an array of mixed or
    /// unsupported elements.
    pub fn from_value(value: &Value<'_>) -> Option<Self> {
        Some(match value {
            Value::U8(v) => MetadataValue::U32(*v as u32),
            Value::U16(v) => MetadataValue::U32(*v as u32),
            Value::U32(v) => MetadataValue::U32(*v),
            Value::U64(v) => MetadataValue::U64(*v),
            Value::I8(v) => MetadataValue::I32(*v as i32),
            Value::I16(v) => MetadataValue::I32(*v as i32),
            Value::I32(v) => MetadataValue::I32(*v),
            Value::I64(v) => MetadataValue::I32(i32::try_from(*v).ok()?),
            Value::F32(v) => MetadataValue::F32(*v),
            Value::F64(v) => MetadataValue::F32(*v as f32),
            Value::Bool(v) => MetadataValue::Bool(*v),
            Value::String(s) => MetadataValue::String((*s).into()),
            Value::Array(a) => {
                if let Some(strings) = a.strings() {
                    MetadataValue::StringArray(strings.map(String::from).collect())
                } else if let Some(ints) = a.integers() {
                    MetadataValue::I32Array(ints.map(|i| i32::try_from(i).ok()).collect::<Option<Vec<i32>>>()?)
                } else {
                    MetadataValue::F32Array(a.iter().map(|v| v.as_f32()).collect::<Option<Vec<f32>>>()?)
                }
            }
        })
    }
}

/// Collects metadata and tensors, then serializes them as GGUF version 3.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<(String, Vec<u64>, TensorType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) metadata `key`.
    pub fn metadata(&mut self, key: &str, value: MetadataValue) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.into(), value));
        self
    }

    /// A writer holding every metadata entry and tensor of `file` (tensor bytes copied as
    /// stored) except those `keep` refuses, given the key or tensor name. Entries whose
    /// values cannot be written (see [`MetadataValue::from_value`]) are dropped.
    pub fn copy_of(file: &GgufFile<'_>, keep: impl Fn(&str) -> bool) -> Self {
        let mut w = GgufWriter::new();
        for (key, value) in file.metadata() {
            if let (true, Some(v)) = (keep(key), MetadataValue::from_value(value)) {
                w.metadata(key, v);
            }
        }
        for t in file.tensors().iter().filter(|t| keep(t.name)) {
            w.tensor(t.name, t.shape(), t.ty, t.data.to_vec());
        }
        w
    }

    /// Removes tensor `name`, if present (to replace it, remove it first: adding a name
    /// twice writes a file with a duplicate tensor, which readers reject).
    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|(n, ..)| n != name);
        self
    }

    /// Adds a tensor with ggml dims (innermost first) and its raw little-endian bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: TensorType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    /// The serialized file (alignment 32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&tensor_type_id(*ty).to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += data.len().div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetadataValue) {
    let (type_id, body): (u32, Vec<u8>) = match value {
        MetadataValue::U32(v) => (4, v.to_le_bytes().to_vec()),
        MetadataValue::I32(v) => (5, v.to_le_bytes().to_vec()),
        MetadataValue::F32(v) => (6, v.to_le_bytes().to_vec()),
        MetadataValue::Bool(v) => (7, alloc::vec![*v as u8]),
        MetadataValue::U64(v) => (10, v.to_le_bytes().to_vec()),
        MetadataValue::String(s) => {
            let mut b = Vec::new();
            put_string(&mut b, s);
            (8, b)
        }
        MetadataValue::I32Array(items) => (9, array(5, items.len(), items.iter().flat_map(|v| v.to_le_bytes()))),
        MetadataValue::F32Array(items) => (9, array(6, items.len(), items.iter().flat_map(|v| v.to_le_bytes()))),
        MetadataValue::StringArray(items) => {
            let mut b = Vec::new();
            for s in items {
                put_string(&mut b, s);
            }
            (9, array(8, items.len(), b))
        }
    };
    out.extend_from_slice(&type_id.to_le_bytes());
    out.extend_from_slice(&body);
}

fn array(elem_type: u32, len: usize, body: impl IntoIterator<Item = u8>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&elem_type.to_le_bytes());
    b.extend_from_slice(&(len as u64).to_le_bytes());
    b.extend(body);
    b
}

/// ggml's id for `ty`.
pub fn tensor_type_id(ty: TensorType) -> u32 {
    (0..64).find(|&id| TensorType::from_id(id) == Some(ty)).unwrap_or(0)
}
