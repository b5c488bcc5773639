//! Record codecs, one per storage format version.
//!
//! Every stored record starts with one tag byte, the number of the format that wrote it, so a
//! data directory in the middle of a migration stays readable record by record.
//!
//! Format 2, the compact fixed binary record (all integers little endian):
//!
//! ```text
//! [tag u8 = 2][keyLen u32][key][valueLen u32][value][createRev i64][modRev i64][version i64][lease i64]
//! ```
//!
//! A tombstone (the record a delete leaves) has `version == 0` and `create_revision == 0`.
//! Decoding checks every length against the buffer: a truncated, over-long or unknown record is
//! a [`CodecError`], never a panic.

use bytes::Bytes;
use metastore_proto::mvccpb::KeyValue;

/// The format version numbers this binary knows.
pub const FORMAT_V2: u8 = 2;
/// Formats this binary reads.
pub const READABLE_FORMATS: &[u8] = &[FORMAT_V2];
/// The format written unless configured otherwise.
pub const DEFAULT_FORMAT: u8 = FORMAT_V2;

const TAIL: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("record written by unknown storage format {0}")]
    UnknownFormat(u8),
    #[error("record truncated: need {need} bytes at offset {at}, have {have}")]
    Truncated { at: usize, need: usize, have: usize },
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
}

/// Appends `kv` encoded in format `format` to `out`.
pub fn encode(format: u8, kv: &KeyValue, out: &mut Vec<u8>) -> Result<(), CodecError> {
    match format {
        FORMAT_V2 => {
            encode_v2(kv, out);
            Ok(())
        }
        other => Err(CodecError::UnknownFormat(other)),
    }
}

/// Appends `kv` in format 2 to `out`.
pub fn encode_v2(kv: &KeyValue, out: &mut Vec<u8>) {
    out.reserve(1 + 4 + kv.key.len() + 4 + kv.value.len() + TAIL);
    out.push(FORMAT_V2);
    out.extend_from_slice(&len_u32(kv.key.len()).to_le_bytes());
    out.extend_from_slice(&kv.key);
    out.extend_from_slice(&len_u32(kv.value.len()).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
}

// Keys and values are bounded by the request size limit, far below 4 GiB; saturate rather than
// wrap so that an impossible length can never alias a valid one.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Decodes a record written by any readable format.
pub fn decode(buf: &[u8]) -> Result<KeyValue, CodecError> {
    match buf.first() {
        None => Err(CodecError::Empty),
        Some(&FORMAT_V2) => decode_v2(&buf[1..]),
        Some(&other) => Err(CodecError::UnknownFormat(other)),
    }
}

/// The format that wrote `buf`.
pub fn format_of(buf: &[u8]) -> Result<u8, CodecError> {
    match buf.first() {
        None => Err(CodecError::Empty),
        Some(&f) if READABLE_FORMATS.contains(&f) => Ok(f),
        Some(&f) => Err(CodecError::UnknownFormat(f)),
    }
}

/// `(mod_revision, version)` of a record without decoding key and value; `version == 0` is a
/// tombstone. Used on scan paths that only need to know whether a key is live.
pub fn peek_mod_version(buf: &[u8]) -> Result<(i64, i64), CodecError> {
    match buf.first() {
        None => Err(CodecError::Empty),
        Some(&FORMAT_V2) => {
            if buf.len() < 1 + 4 + 4 + TAIL {
                return Err(CodecError::Truncated {
                    at: 0,
                    need: 1 + 4 + 4 + TAIL,
                    have: buf.len(),
                });
            }
            let t = buf.len() - TAIL;
            Ok((read_i64(buf, t + 8)?, read_i64(buf, t + 16)?))
        }
        Some(&other) => Err(CodecError::UnknownFormat(other)),
    }
}

fn take(buf: &[u8], at: usize, need: usize) -> Result<&[u8], CodecError> {
    at.checked_add(need)
        .and_then(|end| buf.get(at..end))
        .ok_or(CodecError::Truncated {
            at,
            need,
            have: buf.len().saturating_sub(at),
        })
}

fn read_u32(buf: &[u8], at: usize) -> Result<u32, CodecError> {
    let b = take(buf, at, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_i64(buf: &[u8], at: usize) -> Result<i64, CodecError> {
    let b = take(buf, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(i64::from_le_bytes(a))
}

fn decode_v2(buf: &[u8]) -> Result<KeyValue, CodecError> {
    let mut at = 0;
    let klen = read_u32(buf, at)? as usize;
    at += 4;
    let key = take(buf, at, klen)?;
    at += klen;
    let vlen = read_u32(buf, at)? as usize;
    at += 4;
    let value = take(buf, at, vlen)?;
    at += vlen;
    let create_revision = read_i64(buf, at)?;
    let mod_revision = read_i64(buf, at + 8)?;
    let version = read_i64(buf, at + 16)?;
    let lease = read_i64(buf, at + 24)?;
    at += TAIL;
    if at != buf.len() {
        return Err(CodecError::Trailing(buf.len() - at));
    }
    Ok(KeyValue {
        key: Bytes::copy_from_slice(key),
        create_revision,
        mod_revision,
        version,
        value: Bytes::copy_from_slice(value),
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv(key: &[u8], value: &[u8], c: i64, m: i64, v: i64, l: i64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key),
            create_revision: c,
            mod_revision: m,
            version: v,
            value: Bytes::copy_from_slice(value),
            lease: l,
        }
    }

    #[test]
    fn layout_is_the_documented_fixed_record() {
        let mut out = Vec::new();
        encode_v2(&kv(b"ab", b"xyz", 2, 5, 3, 7), &mut out);
        let mut want = vec![2u8];
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(b"ab");
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(b"xyz");
        for n in [2i64, 5, 3, 7] {
            want.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(out, want);
        assert_eq!(peek_mod_version(&out), Ok((5, 3)));
    }

    #[test]
    fn unknown_format_and_empty_are_errors() {
        assert_eq!(decode(&[]), Err(CodecError::Empty));
        assert_eq!(decode(&[9, 0, 0]), Err(CodecError::UnknownFormat(9)));
        assert_eq!(format_of(&[1]), Err(CodecError::UnknownFormat(1)));
        assert!(encode(7, &KeyValue::default(), &mut Vec::new()).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut out = Vec::new();
        encode_v2(&kv(b"key", b"value", 1, 2, 1, 0), &mut out);
        for n in 0..out.len() {
            assert!(decode(&out[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(CodecError::Trailing(1)));
    }

    #[test]
    fn huge_length_field_does_not_overflow() {
        let mut buf = vec![2u8];
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&buf), Err(CodecError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn roundtrip(key in proptest::collection::vec(any::<u8>(), 0..64),
                     value in proptest::collection::vec(any::<u8>(), 0..256),
                     c in any::<i64>(), m in any::<i64>(), v in any::<i64>(), l in any::<i64>()) {
            let kv = kv(&key, &value, c, m, v, l);
            let mut out = Vec::new();
            encode_v2(&kv, &mut out);
            prop_assert_eq!(decode(&out), Ok(kv));
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&buf);
            let _ = peek_mod_version(&buf);
        }

        #[test]
        fn corrupted_byte_never_panics(idx in 0usize..64, byte in any::<u8>()) {
            let mut out = Vec::new();
            encode_v2(&kv(b"some-key", b"some-value", 3, 4, 2, 9), &mut out);
            let i = idx % out.len();
            out[i] = byte;
            let _ = decode(&out);
        }
    }
}
