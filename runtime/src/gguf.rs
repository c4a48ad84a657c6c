//! A zero-copy, validating GGUF reader.
//!
//! [`GgufFile::parse`] reads the header, the metadata and the tensor table of a GGUF
//! (version 2 or 3) file held in one byte slice — an mmap on desktop, a flash slice on a
//! microcontroller — and checks everything against the slice: the magic, the version,
//! counts, string and array lengths (and that strings are UTF-8), value types, tensor
//! types, shapes, offsets and their alignment. Values and tensor data borrow from the
//! slice; nothing is copied. Every failure is a [`GgufError`] naming what was wrong.
//!
//! Layout (all integers little-endian): `"GGUF"`, `version: u32`, `tensor_count: u64`,
//! `kv_count: u64`, then `kv_count` × (`key: string`, `type: u32`, `value`), then
//! `tensor_count` × (`name: string`, `n_dims: u32`, `dims: [u64; n_dims]`, `type: u32`,
//! `offset: u64`), padding to `general.alignment` (default 32), and the tensor data.
//! A string is `len: u64` followed by `len` bytes.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// The magic number at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of tensor offsets when the file does not set one.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (as in ggml).
pub const MAX_DIMS: usize = 4;

/// What went wrong while reading a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GgufError {
    /// The buffer ended while reading `what` at byte `offset` (`needed` bytes past it).
    Truncated { what: String, offset: usize, needed: u64 },
    /// The file does not start with `GGUF`.
    BadMagic([u8; 4]),
    /// A GGUF version other than 2 or 3.
    UnsupportedVersion(u32),
    /// A count (`what`) larger than the bytes left could hold.
    CountTooLarge { what: String, count: u64 },
    /// A string (`what`) that is not valid UTF-8.
    InvalidUtf8 { what: String, offset: usize },
    /// A metadata value type id that GGUF does not define.
    UnknownValueType { key: String, type_id: u32 },
    /// An array whose elements are arrays (GGUF readers do not accept nesting).
    NestedArray { key: String },
    /// The same metadata key twice.
    DuplicateKey(String),
    /// `general.alignment` that is not a non-zero power of two `u32`.
    BadAlignment { value: String },
    /// A tensor type id that ggml does not define (or that this reader does not know).
    UnknownTensorType { tensor: String, type_id: u32 },
    /// A tensor with zero or more than [`MAX_DIMS`] dimensions, a zero dimension, a
    /// first dimension not divisible by its type's block length, or a size that overflows.
    BadShape { tensor: String, dims: Vec<u64> },
    /// A tensor offset that is not a multiple of the file's alignment.
    MisalignedTensor { tensor: String, offset: u64, alignment: u64 },
    /// A tensor whose data would extend past the end of the buffer.
    TensorOutOfBounds { tensor: String, offset: u64, bytes: u64, data_bytes: u64 },
    /// The same tensor name twice.
    DuplicateTensor(String),
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufError::Truncated { what, offset, needed } => {
                write!(f, "file truncated: {what} at byte {offset} needs {needed} more bytes")
            }
            GgufError::BadMagic(m) => write!(f, "not a GGUF file (magic {m:02x?}, expected \"GGUF\")"),
            GgufError::UnsupportedVersion(v) => write!(f, "unsupported GGUF version {v} (2 and 3 are supported)"),
            GgufError::CountTooLarge { what, count } => {
                write!(f, "{what} count {count} is larger than the file could hold")
            }
            GgufError::InvalidUtf8 { what, offset } => write!(f, "{what} at byte {offset} is not valid UTF-8"),
            GgufError::UnknownValueType { key, type_id } => {
                write!(f, "metadata key {key:?} has unknown value type {type_id}")
            }
            GgufError::NestedArray { key } => write!(f, "metadata key {key:?} holds a nested array"),
            GgufError::DuplicateKey(k) => write!(f, "metadata key {k:?} appears twice"),
            GgufError::BadAlignment { value } => {
                write!(f, "general.alignment must be a non-zero power of two u32, found {value}")
            }
            GgufError::UnknownTensorType { tensor, type_id } => {
                write!(f, "tensor {tensor:?} has unknown tensor type {type_id}")
            }
            GgufError::BadShape { tensor, dims } => write!(f, "tensor {tensor:?} has an invalid shape {dims:?}"),
            GgufError::MisalignedTensor { tensor, offset, alignment } => {
                write!(f, "tensor {tensor:?} offset {offset} is not a multiple of the alignment {alignment}")
            }
            GgufError::TensorOutOfBounds { tensor, offset, bytes, data_bytes } => write!(
                f,
                "tensor {tensor:?} ({bytes} bytes at data offset {offset}) ends past the data section ({data_bytes} bytes)"
            ),
            GgufError::DuplicateTensor(t) => write!(f, "tensor {t:?} appears twice"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for GgufError {}

/// A ggml tensor type, with its block geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl TensorType {
    /// The type for a ggml type id, if this reader knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        use TensorType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`.
    pub const fn block_geometry(self) -> (u64, u64) {
        use TensorType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
        }
    }

    /// The name ggml uses (`"Q4_0"`, `"F32"`, …).
    pub fn name(self) -> &'static str {
        use TensorType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
        }
    }
}

/// The type of a metadata value (GGUF's `gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a fixed-size value, `None` for strings and arrays.
    const fn fixed_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

/// A metadata value, borrowing strings and array payloads from the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(&'a str),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(ArrayValue<'a>),
}

impl<'a> Value<'a> {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f32, if it is a float or an integer.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_u64().map(|v| v as f32),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<ArrayValue<'a>> {
        match *self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A validated metadata array: `len` elements of `elem_type` in `bytes`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArrayValue<'a> {
    elem_type: ValueType,
    len: usize,
    bytes: &'a [u8],
}

impl<'a> ArrayValue<'a> {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        self.elem_type
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Iterates the elements. Every element was validated at parse time.
    pub fn iter(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let (elem_type, mut rest, len) = (self.elem_type, self.bytes, self.len);
        (0..len).map(move |_| {
            let (value, used) = decode_validated(elem_type, rest);
            rest = &rest[used..];
            value
        })
    }

    /// Iterates the elements as strings, or `None` if this is not a string array.
    pub fn strings(&self) -> Option<impl Iterator<Item = &'a str> + 'a> {
        (self.elem_type == ValueType::String).then(|| self.iter().map(|v| v.as_str().unwrap_or_default()))
    }

    /// Iterates the elements as i64, or `None` if this is not an integer array.
    pub fn integers(&self) -> Option<impl Iterator<Item = i64> + 'a> {
        use ValueType::*;
        matches!(self.elem_type, U8 | I8 | U16 | I16 | U32 | I32 | I64 | U64).then(|| {
            self.iter().map(|v| match v {
                Value::I8(x) => x as i64,
                Value::I16(x) => x as i64,
                Value::I32(x) => x as i64,
                Value::I64(x) => x,
                other => other.as_u64().unwrap_or_default() as i64,
            })
        })
    }
}

/// Decodes one element that the parser already validated; returns it and its size.
fn decode_validated(ty: ValueType, bytes: &[u8]) -> (Value<'_>, usize) {
    let mut cursor = Cursor { buf: bytes, pos: 0 };
    // Validation at parse time guarantees success; the fallback is never taken.
    let value = cursor.value(ty, "array element").unwrap_or(Value::U8(0));
    (value, cursor.pos)
}

/// One entry of the tensor table, its data borrowed from the file.
#[derive(Clone, Copy, Debug)]
pub struct TensorInfo<'a> {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: &'a str,
    /// ggml dimensions, innermost (contiguous) first; unused trailing ones are 1.
    pub dims: [u64; MAX_DIMS],
    /// Number of meaningful dimensions.
    pub n_dims: usize,
    /// Element type.
    pub ty: TensorType,
    /// Offset of the data from the start of the data section, in bytes.
    pub offset: u64,
    /// The tensor's bytes (exactly its size).
    pub data: &'a [u8],
}

impl TensorInfo<'_> {
    /// The meaningful dimensions, innermost first.
    pub fn shape(&self) -> &[u64] {
        &self.dims[..self.n_dims]
    }

    /// Total number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor table, borrowing from the buffer.
#[derive(Debug)]
pub struct GgufFile<'a> {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Alignment of the data section and tensor offsets, in bytes.
    pub alignment: u64,
    /// Byte offset of the data section in the buffer.
    pub data_offset: usize,
    metadata: Vec<(&'a str, Value<'a>)>,
    tensors: Vec<TensorInfo<'a>>,
}

impl<'a> GgufFile<'a> {
    /// Parses and validates `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Self, GgufError> {
        let mut c = Cursor { buf, pos: 0 };
        let magic: [u8; 4] = c.take(4, "magic")?.try_into().unwrap_or([0; 4]);
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = c.u64("tensor count")?;
        let kv_count = c.u64("metadata count")?;
        // Each entry needs at least 8 (key length) + 4 (type) + 1 bytes; a tensor entry at
        // least 8 + 4 + 8 + 4 + 8. Larger counts cannot fit and would only waste memory.
        let kv_count = c.bounded_count(kv_count, 13, "metadata")?;
        let tensor_count = c.bounded_count(tensor_count, 32, "tensor")?;

        let mut metadata: Vec<(&'a str, Value<'a>)> = Vec::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            let type_id = c.u32("metadata value type")?;
            let ty = ValueType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownValueType { key: key.to_string(), type_id })?;
            let value = c.value(ty, key)?;
            if metadata.iter().any(|(k, _)| *k == key) {
                return Err(GgufError::DuplicateKey(key.to_string()));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| *k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
            Some((_, v)) => return Err(GgufError::BadAlignment { value: alloc::format!("{v:?}") }),
        };

        struct RawTensor<'a> {
            name: &'a str,
            dims: [u64; MAX_DIMS],
            n_dims: usize,
            ty: TensorType,
            offset: u64,
            bytes: u64,
        }
        let mut raw = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadShape { tensor: name.to_string(), dims: Vec::new() });
            }
            let mut dims = [1u64; MAX_DIMS];
            for d in dims.iter_mut().take(n_dims) {
                *d = c.u64("tensor dimension")?;
            }
            let bad_shape = || GgufError::BadShape { tensor: name.to_string(), dims: dims[..n_dims].to_vec() };
            if dims.contains(&0) {
                return Err(bad_shape());
            }
            let type_id = c.u32("tensor type")?;
            let ty = TensorType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownTensorType { tensor: name.to_string(), type_id })?;
            let offset = c.u64("tensor offset")?;
            let (block_len, block_bytes) = ty.block_geometry();
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(bad_shape)?;
            if dims[0] % block_len != 0 {
                return Err(bad_shape());
            }
            let bytes = (elements / block_len).checked_mul(block_bytes).ok_or_else(bad_shape)?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor { tensor: name.to_string(), offset, alignment });
            }
            if raw.iter().any(|t: &RawTensor<'_>| t.name == name) {
                return Err(GgufError::DuplicateTensor(name.to_string()));
            }
            raw.push(RawTensor { name, dims, n_dims, ty, offset, bytes });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_bytes = (buf.len() as u64).saturating_sub(data_offset);
        if tensor_count > 0 && data_offset > buf.len() as u64 {
            return Err(GgufError::Truncated {
                what: "data section padding".to_string(),
                offset: c.pos,
                needed: data_offset - c.pos as u64,
            });
        }
        let mut tensors = Vec::with_capacity(raw.len());
        for t in raw {
            let end = t.offset.checked_add(t.bytes);
            if end.is_none_or(|e| e > data_bytes) {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.to_string(),
                    offset: t.offset,
                    bytes: t.bytes,
                    data_bytes,
                });
            }
            let start = data_offset as usize + t.offset as usize;
            let data = &buf[start..start + t.bytes as usize];
            tensors.push(TensorInfo { name: t.name, dims: t.dims, n_dims: t.n_dims, ty: t.ty, offset: t.offset, data });
        }
        Ok(GgufFile { version, alignment, data_offset: data_offset as usize, metadata, tensors })
    }

    /// All metadata entries, in file order.
    pub fn metadata(&self) -> &[(&'a str, Value<'a>)] {
        &self.metadata
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.metadata.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo<'a>] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A bounds-checked reader over the buffer.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let available = (self.buf.len() - self.pos) as u64;
        if n > available {
            return Err(GgufError::Truncated { what: what.to_string(), offset: self.pos, needed: n - available });
        }
        let slice = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn bounded_count(&self, count: u64, min_entry_bytes: u64, what: &str) -> Result<usize, GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if count > remaining / min_entry_bytes {
            return Err(GgufError::CountTooLarge { what: what.to_string(), count });
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &str) -> Result<&'a str, GgufError> {
        let len = self.u64(what)?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        core::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what: what.to_string(), offset: at })
    }

    fn value(&mut self, ty: ValueType, key: &str) -> Result<Value<'a>, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(key)?[0] != 0),
            ValueType::String => Value::String(self.string(key)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                let type_id = self.u32(key)?;
                let elem_type = ValueType::from_id(type_id)
                    .ok_or_else(|| GgufError::UnknownValueType { key: key.to_string(), type_id })?;
                if elem_type == ValueType::Array {
                    return Err(GgufError::NestedArray { key: key.to_string() });
                }
                let len = self.u64(key)?;
                let start = self.pos;
                match elem_type.fixed_size() {
                    Some(size) => {
                        let bytes = len.checked_mul(size as u64).ok_or_else(|| GgufError::CountTooLarge {
                            what: alloc::format!("array {key}"),
                            count: len,
                        })?;
                        self.take(bytes, key)?;
                    }
                    None => {
                        let len = self.bounded_count(len, 8, key)?;
                        for _ in 0..len {
                            self.string(key)?;
                        }
                    }
                }
                Value::Array(ArrayValue { elem_type, len: len as usize, bytes: &self.buf[start..self.pos] })
            }
        })
    }
}
