//! The GGUF reader against truncated, corrupted and random input: every case must return
//! a typed error (or parse consistently), never panic or read out of bounds.

use petrel_runtime::gguf::{GgufError, GgufFile, TensorType, Value};
use petrel_runtime::gguf_writer::{GgufWriter, MetadataValue};
use proptest::prelude::*;

/// A small but complete file: every value kind the writer has, and three tensors.
fn sample_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", MetadataValue::String("llama".into()))
        .metadata("llama.block_count", MetadataValue::U32(2))
        .metadata("llama.rope.freq_base", MetadataValue::F32(10000.0))
        .metadata("tokenizer.ggml.tokens", MetadataValue::StringArray(vec!["a".into(), "bc".into(), "ünï".into()]))
        .metadata("tokenizer.ggml.token_type", MetadataValue::I32Array(vec![1, 1, 3]))
        .metadata("flag", MetadataValue::Bool(true));
    w.tensor("norm.weight", &[4], TensorType::F32, (0..16).collect())
        .tensor("q4.weight", &[64, 2], TensorType::Q4_0, vec![7; 4 * 18])
        .tensor("q8.weight", &[32, 3], TensorType::Q8_0, vec![9; 3 * 34]);
    w.to_bytes()
}

/// Offset of the first occurrence of `needle`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

/// Offset of the u32 type id that follows tensor `name`'s dims (`n_dims` of them).
fn tensor_field(file: &[u8], name: &str, n_dims: usize) -> (usize, usize, usize) {
    let name_at = find(file, name.as_bytes());
    let n_dims_at = name_at + name.len();
    let type_at = n_dims_at + 4 + 8 * n_dims;
    (n_dims_at, type_at, type_at + 4)
}

#[test]
fn sample_file_parses_exactly() {
    let bytes = sample_file();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
    assert_eq!(f.get("llama.block_count").and_then(|v| v.as_u64()), Some(2));
    assert_eq!(f.get("flag"), Some(Value::Bool(true)));
    let tokens: Vec<&str> = f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().strings().unwrap().collect();
    assert_eq!(tokens, ["a", "bc", "ünï"]);
    let types: Vec<i64> = f.get("tokenizer.ggml.token_type").unwrap().as_array().unwrap().integers().unwrap().collect();
    assert_eq!(types, [1, 1, 3]);
    let q4 = f.tensor("q4.weight").unwrap();
    assert_eq!((q4.ty, q4.shape(), q4.data.len()), (TensorType::Q4_0, &[64u64, 2][..], 72));
    assert!(q4.data.iter().all(|&b| b == 7));
    assert_eq!(f.tensor("norm.weight").unwrap().data, &(0..16).collect::<Vec<u8>>()[..]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample_file();
    // The writer pads the last tensor to the alignment; those trailing bytes are not needed.
    let file = GgufFile::parse(&bytes).unwrap();
    let last = file.tensors().last().unwrap();
    let end = file.data_offset + last.offset as usize + last.data.len();
    assert!(end <= bytes.len() && end + 32 > bytes.len());
    for len in 0..end {
        let result = GgufFile::parse(&bytes[..len]);
        assert!(result.is_err(), "truncated to {len} bytes parsed");
    }
    assert!(GgufFile::parse(&bytes[..end]).is_ok());
}

#[test]
fn bad_magic_and_versions() {
    let mut bytes = sample_file();
    bytes[0] = b'X';
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::BadMagic(_))));
    for version in [0u32, 1, 4, u32::MAX] {
        let mut bytes = sample_file();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        assert_eq!(GgufFile::parse(&bytes).unwrap_err(), GgufError::UnsupportedVersion(version));
    }
}

#[test]
fn corrupt_counts_are_rejected_without_huge_allocations() {
    for (at, what) in [(8usize, "tensor"), (16, "metadata")] {
        for count in [u64::MAX, 1 << 40, 100_000] {
            let mut bytes = sample_file();
            bytes[at..at + 8].copy_from_slice(&count.to_le_bytes());
            match GgufFile::parse(&bytes) {
                Err(GgufError::CountTooLarge { what: w, count: c }) => assert_eq!((w.as_str(), c), (what, count)),
                other => panic!("{what} count {count}: {other:?}"),
            }
        }
    }
    // One metadata entry more than present: the reader runs into the tensor table.
    let mut bytes = sample_file();
    bytes[16..24].copy_from_slice(&7u64.to_le_bytes());
    assert!(GgufFile::parse(&bytes).is_err());
}

#[test]
fn corrupt_string_lengths_are_rejected() {
    let bytes = sample_file();
    // The first key's length sits right after the 24-byte header.
    for len in [u64::MAX, 1 << 33, bytes.len() as u64] {
        let mut b = bytes.clone();
        b[24..32].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(GgufFile::parse(&b), Err(GgufError::Truncated { .. })), "length {len}");
    }
    // A string array element length.
    let mut b = bytes.clone();
    let at = find(&b, b"bc") - 8;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(GgufFile::parse(&b).is_err());
    // Invalid UTF-8 in a key.
    let mut b = bytes;
    let at = find(&b, b"flag");
    b[at] = 0xFF;
    assert!(matches!(GgufFile::parse(&b), Err(GgufError::InvalidUtf8 { .. })));
}

#[test]
fn corrupt_value_and_tensor_types_are_named() {
    let bytes = sample_file();
    let mut b = bytes.clone();
    let at = find(&b, b"flag") + 4;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert_eq!(GgufFile::parse(&b).unwrap_err(), GgufError::UnknownValueType { key: "flag".into(), type_id: 99 });

    let mut b = bytes.clone();
    let at = find(&b, b"tokenizer.ggml.token_type") + "tokenizer.ggml.token_type".len() + 4;
    b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(GgufFile::parse(&b), Err(GgufError::NestedArray { .. })));

    for id in [4u32, 5, 31, 1000] {
        let mut b = bytes.clone();
        let (_, type_at, _) = tensor_field(&b, "q4.weight", 2);
        b[type_at..type_at + 4].copy_from_slice(&id.to_le_bytes());
        assert_eq!(
            GgufFile::parse(&b).unwrap_err(),
            GgufError::UnknownTensorType { tensor: "q4.weight".into(), type_id: id }
        );
    }
}

#[test]
fn corrupt_shapes_and_offsets_are_named() {
    let bytes = sample_file();
    let (n_dims_at, _, offset_at) = tensor_field(&bytes, "q8.weight", 2);
    for n_dims in [0u32, 5, u32::MAX] {
        let mut b = bytes.clone();
        b[n_dims_at..n_dims_at + 4].copy_from_slice(&n_dims.to_le_bytes());
        assert!(GgufFile::parse(&b).is_err(), "n_dims {n_dims}");
    }
    for (dim0, dim1) in [(0u64, 3u64), (33, 3), (32, 0), (32, u64::MAX), (1 << 40, 1 << 40)] {
        let mut b = bytes.clone();
        b[n_dims_at + 4..n_dims_at + 12].copy_from_slice(&dim0.to_le_bytes());
        b[n_dims_at + 12..n_dims_at + 20].copy_from_slice(&dim1.to_le_bytes());
        match GgufFile::parse(&b) {
            Err(GgufError::BadShape { tensor, .. }) | Err(GgufError::TensorOutOfBounds { tensor, .. }) => {
                assert_eq!(tensor, "q8.weight")
            }
            other => panic!("dims {dim0}×{dim1}: {other:?}"),
        }
    }
    for offset in [1u64, 31, 33] {
        let mut b = bytes.clone();
        b[offset_at..offset_at + 8].copy_from_slice(&offset.to_le_bytes());
        assert!(matches!(GgufFile::parse(&b), Err(GgufError::MisalignedTensor { .. })), "offset {offset}");
    }
    for offset in [1u64 << 20, u64::MAX - 31] {
        let mut b = bytes.clone();
        b[offset_at..offset_at + 8].copy_from_slice(&offset.to_le_bytes());
        assert!(matches!(GgufFile::parse(&b), Err(GgufError::TensorOutOfBounds { .. })), "offset {offset}");
    }
}

#[test]
fn duplicates_and_bad_alignment_are_rejected() {
    let mut w = GgufWriter::new();
    w.tensor("t", &[4], TensorType::F32, vec![0; 16]).tensor("t", &[4], TensorType::F32, vec![0; 16]);
    assert_eq!(GgufFile::parse(&w.to_bytes()).unwrap_err(), GgufError::DuplicateTensor("t".into()));
    for alignment in [0u32, 3, 48] {
        let mut w = GgufWriter::new();
        w.metadata("general.alignment", MetadataValue::U32(alignment));
        assert!(matches!(GgufFile::parse(&w.to_bytes()), Err(GgufError::BadAlignment { .. })));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Random byte edits and truncations: parsing either fails with an error or yields
    /// tensors that lie inside the buffer; it never panics.
    #[test]
    fn random_corruption_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = sample_file();
        for (index, value) in edits {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(file) = GgufFile::parse(&bytes) {
            for t in file.tensors() {
                let start = t.data.as_ptr() as usize - bytes.as_ptr() as usize;
                prop_assert!(start + t.data.len() <= bytes.len());
            }
            for (_, v) in file.metadata() {
                if let Some(a) = v.as_array() {
                    prop_assert_eq!(a.iter().count(), a.len());
                }
            }
        }
    }
}

/// Inputs the fuzzer found, kept as regressions (see `fuzz/README.md`): loading must fail
/// with a typed error, not abort on an allocation sized by the file.
#[test]
fn fuzzer_findings_load_as_errors() {
    let huge_block_count = include_bytes!("../../fuzz/regressions/model_load_huge_block_count.gguf");
    let file = GgufFile::parse(huge_block_count).expect("the header itself is valid");
    match petrel_runtime::Model::load(&file) {
        Err(petrel_runtime::ModelError::BadMetadata { key, .. }) => assert_eq!(key, "llama.block_count"),
        other => panic!("expected a block_count error, got {other:?}"),
    }
}
