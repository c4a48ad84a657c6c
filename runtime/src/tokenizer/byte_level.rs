//! GPT-2's byte-to-unicode mapping.
//!
//! Byte-level BPE vocabularies do not store raw bytes: every byte is written as one
//! printable character. Bytes that are already printable and not whitespace
//! (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves; the other 68 bytes, in
//! increasing order, become `U+0100`, `U+0101`, … — so a space is `Ġ` (`U+0120`) and a
//! newline `Ċ` (`U+010A`). A token's text in the file is its bytes written this way.

/// Number of bytes that are not printable as themselves (they map to `U+0100 + n`).
const REMAPPED: u32 = 68;

/// True if byte `b` is written as the character with the same code point.
const fn is_printable(b: u32) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character that stands for each byte, indexed by byte.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut next_remapped = 0u32;
    let mut b = 0u32;
    while b < 256 {
        let cp = if is_printable(b) {
            b
        } else {
            next_remapped += 1;
            0x100 + next_remapped - 1
        };
        table[b as usize] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
};

/// For code points below `0x100 + REMAPPED`: the byte each stands for, or -1.
const CHAR_TO_BYTE: [i16; (0x100 + REMAPPED) as usize] = {
    let mut table = [-1i16; (0x100 + REMAPPED) as usize];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    table
};

/// The character that stands for byte `b` in a byte-level vocabulary.
pub fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[b as usize]
}

/// The byte that character `c` stands for, or `None` if `c` is not one of the 256.
pub fn char_to_byte(c: char) -> Option<u8> {
    match CHAR_TO_BYTE.get(c as usize) {
        Some(&b) if b >= 0 => Some(b as u8),
        _ => None,
    }
}

/// Appends the raw bytes that the byte-level `text` stands for to `out`.
///
/// A character outside the mapping (only possible in a malformed vocabulary) is kept as
/// its own UTF-8 bytes.
pub fn decode_into(text: &str, out: &mut alloc::vec::Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn known_characters() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        assert_eq!(byte_to_char(0xFF), 'ÿ');
    }

    #[test]
    fn bijection() {
        let mut seen = Vec::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(!seen.contains(&c));
            seen.push(c);
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn decodes_text() {
        let mut out = Vec::new();
        decode_into("ĠhelloĊ€", &mut out);
        assert_eq!(out, b" hello\n\xE2\x82\xAC");
    }
}
