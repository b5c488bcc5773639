//! Record codecs, one per storage format version.
//!
//! Every stored record (a value of the `kv` table) starts with one tag byte, the number of the
//! format that wrote it, and decoding dispatches on that byte: every binary reads every format
//! in [`READABLE_FORMATS`], so a data directory in the middle of a migration stays readable
//! record by record. Which format *new* writes use is a separate choice
//! (`StoreOptions::write_format`, fixed by the data directory's stamp).
//!
//! # Format 1: self-describing (CBOR)
//!
//! ```text
//! [tag u8 = 1][one CBOR data item (RFC 8949)]
//! ```
//!
//! The data item is a map with exactly these six entries, keyed by text strings:
//!
//! | key               | CBOR type                  | `KeyValue` field  |
//! |-------------------|----------------------------|-------------------|
//! | `key`             | byte string (major type 2) | `key`             |
//! | `lease`           | integer (major type 0/1)   | `lease`           |
//! | `value`           | byte string (major type 2) | `value`           |
//! | `version`         | integer                    | `version`         |
//! | `mod_revision`    | integer                    | `mod_revision`    |
//! | `create_revision` | integer                    | `create_revision` |
//!
//! Writers emit RFC 8949 §4.2.1 core deterministic encoding: a definite-length map, entries in
//! the order above (the bytewise order of the encoded keys), shortest integer and length
//! arguments, definite-length byte strings. So the same key-value always gives the same bytes.
//! For example `{key: "k", value: "v", create 2, mod 3, version 1, lease 0}` is
//!
//! ```text
//! 01                                  tag: format 1
//! a6                                  map(6)
//!   63 6b6579 41 6b                   "key": h'6b'
//!   65 6c65617365 00                  "lease": 0
//!   65 76616c7565 41 76               "value": h'76'
//!   67 76657273696f6e 01              "version": 1
//!   6c 6d6f645f7265766973696f6e 03    "mod_revision": 3
//!   6f 6372656174655f7265766973696f6e 02  "create_revision": 2
//! ```
//!
//! Readers accept any well-formed encoding of that map (any entry order, non-shortest
//! arguments, indefinite lengths) but require all six entries, each once, integers that fit an
//! `i64`, byte strings (not text or arrays) for `key` and `value`, no other entry, and nothing
//! after the data item. Anything else is a [`CodecError::Malformed`].
//!
//! # Format 2: compact fixed binary (the default)
//!
//! All integers little endian:
//!
//! ```text
//! [tag u8 = 2][keyLen u32][key][valueLen u32][value][createRev i64][modRev i64][version i64][lease i64]
//! ```
//!
//! # Both formats
//!
//! A tombstone (the record a delete leaves) has `version == 0` and `create_revision == 0`.
//! Decoding checks every length against the buffer: a truncated, over-long, malformed or
//! unknown record is a [`CodecError`], never a panic.
//!
//! [`limit_formats`] makes this binary treat formats above a bound as unknown, standing in for
//! an older binary in tests (the hidden `--max-storage-format` flag); nothing else calls it.

use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use metastore_proto::mvccpb::KeyValue;
use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Serialize};

/// The self-describing CBOR format (module docs).
pub const FORMAT_V1: u8 = 1;
/// The compact fixed binary format (module docs).
pub const FORMAT_V2: u8 = 2;
/// Formats this binary reads and writes.
pub const READABLE_FORMATS: &[u8] = &[FORMAT_V1, FORMAT_V2];
/// The format a new data directory is created with unless configured otherwise.
pub const DEFAULT_FORMAT: u8 = FORMAT_V2;

const TAIL: usize = 32;

/// The highest format this process accepts (see [`limit_formats`]).
static MAX_FORMAT: AtomicU8 = AtomicU8::new(FORMAT_V2);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error(
        "record written by storage format {0}, which this binary cannot read \
         (a newer MetaStore wrote it; upgrade this binary)"
    )]
    UnknownFormat(u8),
    #[error("record truncated: need {need} bytes at offset {at}, have {have}")]
    Truncated { at: usize, need: usize, have: usize },
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    #[error("malformed format-{format} record: {reason}")]
    Malformed { format: u8, reason: String },
}

/// Makes this process treat every format above `max` as unknown: such records fail to decode
/// and such data directories are refused. A stand-in for an older binary in tests, set once at
/// start-up by the hidden `--max-storage-format` flag; never lowered in library code.
pub fn limit_formats(max: u8) {
    MAX_FORMAT.store(max, Ordering::Relaxed);
}

/// Whether this process reads and writes `format` (known, and not above [`limit_formats`]).
pub fn is_supported(format: u8) -> bool {
    supported_under(format, MAX_FORMAT.load(Ordering::Relaxed))
}

/// The formats this process reads and writes, ascending.
pub fn supported_formats() -> Vec<u8> {
    READABLE_FORMATS
        .iter()
        .copied()
        .filter(|f| is_supported(*f))
        .collect()
}

fn supported_under(format: u8, max: u8) -> bool {
    format <= max && READABLE_FORMATS.contains(&format)
}

/// Appends `kv` encoded in format `format` to `out`.
pub fn encode(format: u8, kv: &KeyValue, out: &mut Vec<u8>) -> Result<(), CodecError> {
    match format {
        f if !is_supported(f) => Err(CodecError::UnknownFormat(f)),
        FORMAT_V1 => encode_v1(kv, out),
        FORMAT_V2 => {
            encode_v2(kv, out);
            Ok(())
        }
        other => Err(CodecError::UnknownFormat(other)),
    }
}

/// Format 1's map, with fields in the order of the deterministic encoding (module docs).
#[derive(Serialize)]
struct RecordV1Ref<'a> {
    key: ByteStr<'a>,
    lease: i64,
    value: ByteStr<'a>,
    version: i64,
    mod_revision: i64,
    create_revision: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordV1 {
    key: ByteBuf,
    lease: i64,
    value: ByteBuf,
    version: i64,
    mod_revision: i64,
    create_revision: i64,
}

/// What [`peek_mod_version`] needs of a format-1 record; the rest is skipped, not copied.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeekV1 {
    #[allow(dead_code)]
    key: IgnoredAny,
    #[allow(dead_code)]
    lease: IgnoredAny,
    #[allow(dead_code)]
    value: IgnoredAny,
    version: i64,
    mod_revision: i64,
    #[allow(dead_code)]
    create_revision: IgnoredAny,
}

/// Serializes as a CBOR byte string (serde's default for `&[u8]` is an array of integers).
struct ByteStr<'a>(&'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Deserializes from a CBOR byte string only.
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl de::Visitor<'_> for Visit {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
        }
        d.deserialize_byte_buf(Visit)
    }
}

/// Appends `kv` in format 1 to `out`.
pub fn encode_v1(kv: &KeyValue, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.reserve(1 + 80 + kv.key.len() + kv.value.len());
    out.push(FORMAT_V1);
    let rec = RecordV1Ref {
        key: ByteStr(&kv.key),
        lease: kv.lease,
        value: ByteStr(&kv.value),
        version: kv.version,
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
    };
    // Writing into a Vec cannot fail; map the error anyway rather than panic.
    ciborium::into_writer(&rec, out).map_err(|e| malformed_v1(e.to_string()))
}

fn malformed_v1(reason: String) -> CodecError {
    CodecError::Malformed {
        format: FORMAT_V1,
        reason,
    }
}

/// Decodes the one CBOR item of a format-1 body (after the tag), refusing trailing bytes.
fn from_cbor<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let mut rest = body;
    // Field names and small strings go through this buffer; larger strings are read in chunks
    // of it, so a huge length claim in a corrupt record never allocates up front.
    let mut scratch = [0u8; 256];
    let v =
        ciborium::de::from_reader_with_buffer(&mut rest, &mut scratch).map_err(|e| match e {
            ciborium::de::Error::Io(_) => malformed_v1("truncated".into()),
            other => malformed_v1(other.to_string()),
        })?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing(rest.len()));
    }
    Ok(v)
}

/// Parses the exact layout [`encode_v1`] writes (six entries in the documented order, each
/// argument in any length form) without the general CBOR decoder: several times faster. Any
/// deviation gives `None` and the general decoder decides, so both accept the same records
/// and agree on their values (a property test checks it).
fn canonical_v1(body: &[u8]) -> Option<KvRef<'_>> {
    struct Cursor<'a> {
        buf: &'a [u8],
        at: usize,
    }
    impl<'a> Cursor<'a> {
        /// The argument of a head of major type `major`.
        fn arg(&mut self, major: u8) -> Option<u64> {
            let head = *self.buf.get(self.at)?;
            if head >> 5 != major {
                return None;
            }
            self.at += 1;
            let width = match head & 0x1f {
                n @ 0..=23 => return Some(u64::from(n)),
                24 => 1,
                25 => 2,
                26 => 4,
                27 => 8,
                _ => return None,
            };
            let bytes = self.buf.get(self.at..self.at + width)?;
            self.at += width;
            Some(bytes.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
        }
        fn name(&mut self, name: &[u8]) -> Option<()> {
            (self.arg(3)? == name.len() as u64).then_some(())?;
            (self.bytes_of(name.len())? == name).then_some(())
        }
        fn bytes_of(&mut self, n: usize) -> Option<&'a [u8]> {
            let end = self.at.checked_add(n)?;
            let out = self.buf.get(self.at..end)?;
            self.at = end;
            Some(out)
        }
        fn bytes(&mut self) -> Option<&'a [u8]> {
            let n = usize::try_from(self.arg(2)?).ok()?;
            self.bytes_of(n)
        }
        fn int(&mut self) -> Option<i64> {
            match *self.buf.get(self.at)? >> 5 {
                0 => i64::try_from(self.arg(0)?).ok(),
                1 => Some(-1 - i64::try_from(self.arg(1)?).ok()?),
                _ => None,
            }
        }
    }
    let mut c = Cursor { buf: body, at: 0 };
    (c.arg(5)? == 6).then_some(())?;
    c.name(b"key")?;
    let key = c.bytes()?;
    c.name(b"lease")?;
    let lease = c.int()?;
    c.name(b"value")?;
    let value = c.bytes()?;
    c.name(b"version")?;
    let version = c.int()?;
    c.name(b"mod_revision")?;
    let mod_revision = c.int()?;
    c.name(b"create_revision")?;
    let create_revision = c.int()?;
    (c.at == body.len()).then_some(KvRef {
        key,
        create_revision,
        mod_revision,
        version,
        value,
        lease,
    })
}

fn decode_v1(body: &[u8]) -> Result<KeyValue, CodecError> {
    if let Some(r) = canonical_v1(body) {
        return Ok(r.to_owned());
    }
    let r: RecordV1 = from_cbor(body)?;
    Ok(KeyValue {
        key: Bytes::from(r.key.0),
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        version: r.version,
        value: Bytes::from(r.value.0),
        lease: r.lease,
    })
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

/// Decodes a record written by any supported format.
pub fn decode(buf: &[u8]) -> Result<KeyValue, CodecError> {
    decode_under(buf, MAX_FORMAT.load(Ordering::Relaxed))
}

fn decode_under(buf: &[u8], max: u8) -> Result<KeyValue, CodecError> {
    match buf.first() {
        None => Err(CodecError::Empty),
        Some(&f) if !supported_under(f, max) => Err(CodecError::UnknownFormat(f)),
        Some(&FORMAT_V1) => decode_v1(&buf[1..]),
        Some(&FORMAT_V2) => decode_v2(&buf[1..]),
        Some(&other) => Err(CodecError::UnknownFormat(other)),
    }
}

/// The format that wrote `buf` (from its tag alone; the rest is not checked).
pub fn format_of(buf: &[u8]) -> Result<u8, CodecError> {
    match buf.first() {
        None => Err(CodecError::Empty),
        Some(&f) if is_supported(f) => Ok(f),
        Some(&f) => Err(CodecError::UnknownFormat(f)),
    }
}

/// `(mod_revision, version)` of a record without decoding key and value; `version == 0` is a
/// tombstone. Used on scan paths that only need to know whether a key is live.
pub fn peek_mod_version(buf: &[u8]) -> Result<(i64, i64), CodecError> {
    match buf.first() {
        None => Err(CodecError::Empty),
        Some(&f) if !is_supported(f) => Err(CodecError::UnknownFormat(f)),
        Some(&FORMAT_V1) => {
            if let Some(r) = canonical_v1(&buf[1..]) {
                return Ok((r.mod_revision, r.version));
            }
            let p: PeekV1 = from_cbor(&buf[1..])?;
            Ok((p.mod_revision, p.version))
        }
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
    parse_v2(buf).map(|r| r.to_owned())
}

/// A format 2 body, borrowed.
fn parse_v2(buf: &[u8]) -> Result<KvRef<'_>, CodecError> {
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
    Ok(KvRef {
        key,
        create_revision,
        mod_revision,
        version,
        value,
        lease,
    })
}

/// A stored key-value borrowed from its record: for reads that only re-encode it (a Range
/// answer), without copying key and value into a [`KeyValue`] first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvRef<'a> {
    pub key: &'a [u8],
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: &'a [u8],
    pub lease: i64,
}

impl<'a> KvRef<'a> {
    /// Borrows an owned key-value.
    pub fn of(kv: &'a KeyValue) -> Self {
        Self {
            key: &kv.key,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: &kv.value,
            lease: kv.lease,
        }
    }

    /// An owned copy.
    pub fn to_owned(&self) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(self.key),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: Bytes::copy_from_slice(self.value),
            lease: self.lease,
        }
    }
}

/// Calls `f` with the key-value stored in `buf` (any supported format), borrowed from `buf`
/// where the format allows (format 2, and format 1 in the layout [`encode_v1`] writes);
/// otherwise decoded first.
pub fn with_ref<T>(buf: &[u8], f: impl FnOnce(KvRef<'_>) -> T) -> Result<T, CodecError> {
    let max = MAX_FORMAT.load(Ordering::Relaxed);
    match buf.first() {
        Some(&FORMAT_V2) if supported_under(FORMAT_V2, max) => Ok(f(parse_v2(&buf[1..])?)),
        Some(&FORMAT_V1) if supported_under(FORMAT_V1, max) => match canonical_v1(&buf[1..]) {
            Some(r) => Ok(f(r)),
            None => decode(buf).map(|kv| f(KvRef::of(&kv))),
        },
        _ => decode(buf).map(|kv| f(KvRef::of(&kv))),
    }
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
        assert_eq!(format_of(&[3]), Err(CodecError::UnknownFormat(3)));
        assert_eq!(format_of(&[1]), Ok(1));
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

    /// The example of the module docs, byte for byte.
    #[test]
    fn format1_layout_is_the_documented_cbor_map() -> anyhow::Result<()> {
        let mut out = Vec::new();
        encode(FORMAT_V1, &kv(b"k", b"v", 2, 3, 1, 0), &mut out)?;
        let want = hex::decode(concat!(
            "01",
            "a6",
            "636b6579416b",
            "656c6561736500",
            "6576616c75654176",
            "6776657273696f6e01",
            "6c6d6f645f7265766973696f6e03",
            "6f6372656174655f7265766973696f6e02",
        ))?;
        assert_eq!(out, want);
        assert_eq!(peek_mod_version(&out), Ok((3, 1)));
        assert_eq!(format_of(&out), Ok(FORMAT_V1));
        Ok(())
    }

    /// `[1] ++ cbor(value)`, for hand-built format-1 records.
    fn v1_of(value: &ciborium::Value) -> Vec<u8> {
        let mut out = vec![FORMAT_V1];
        ciborium::into_writer(value, &mut out).expect("cbor into a Vec");
        out
    }

    fn v1_map(entries: &[(&str, ciborium::Value)]) -> Vec<u8> {
        v1_of(&ciborium::Value::Map(
            entries
                .iter()
                .map(|(k, v)| (ciborium::Value::Text((*k).into()), v.clone()))
                .collect(),
        ))
    }

    #[test]
    fn format1_readers_accept_any_order_and_refuse_what_the_spec_refuses() {
        use ciborium::Value as V;
        let b = |s: &[u8]| V::Bytes(s.to_vec());
        let i = |n: i64| V::Integer(n.into());
        // Any entry order is fine.
        let reordered = v1_map(&[
            ("create_revision", i(2)),
            ("value", b(b"v")),
            ("mod_revision", i(3)),
            ("key", b(b"k")),
            ("version", i(1)),
            ("lease", i(-7)),
        ]);
        assert_eq!(decode(&reordered), Ok(kv(b"k", b"v", 2, 3, 1, -7)));

        let full = [
            ("key", b(b"k")),
            ("lease", i(0)),
            ("value", b(b"v")),
            ("version", i(1)),
            ("mod_revision", i(3)),
            ("create_revision", i(2)),
        ];
        let malformed =
            |rec: &[u8]| matches!(decode(rec), Err(CodecError::Malformed { format: 1, .. }));
        // A missing entry.
        assert!(malformed(&v1_map(&full[..5])));
        // An unknown entry.
        let mut extra = full.to_vec();
        extra.push(("ttl", i(5)));
        assert!(malformed(&v1_map(&extra)));
        // A duplicate entry.
        let mut dup = full.to_vec();
        dup.push(("version", i(2)));
        assert!(malformed(&v1_map(&dup)));
        // Text instead of bytes; an array of integers instead of bytes.
        let mut text = full.to_vec();
        text[0] = ("key", V::Text("k".into()));
        assert!(malformed(&v1_map(&text)));
        let mut arr = full.to_vec();
        arr[2] = ("value", V::Array(vec![i(118)]));
        assert!(malformed(&v1_map(&arr)));
        // An integer beyond i64.
        let mut big = full.to_vec();
        big[4] = ("mod_revision", V::Integer(u64::MAX.into()));
        assert!(malformed(&v1_map(&big)));
        // Not a map at all.
        assert!(malformed(&v1_of(&i(1))));
        // Two items.
        let mut two = v1_map(&full);
        two.push(0);
        assert_eq!(decode(&two), Err(CodecError::Trailing(1)));
        assert_eq!(peek_mod_version(&two), Err(CodecError::Trailing(1)));
    }

    #[test]
    fn a_capped_binary_refuses_newer_records() {
        let mut v2 = Vec::new();
        encode_v2(&kv(b"k", b"v", 1, 1, 1, 0), &mut v2);
        assert_eq!(decode_under(&v2, 1), Err(CodecError::UnknownFormat(2)));
        assert!(decode_under(&v2, 2).is_ok());
        assert!(!supported_under(2, 1));
        assert!(supported_under(1, 1));
        let e = decode_under(&v2, 1).map(|_| ()).expect_err("refused");
        assert!(e.to_string().contains("storage format 2"), "{e}");
    }

    #[test]
    fn format1_every_truncation_is_an_error() -> anyhow::Result<()> {
        let mut out = Vec::new();
        encode_v1(&kv(b"key", &[7u8; 300], 1, 2, 1, 5), &mut out)?;
        for n in 0..out.len() {
            assert!(decode(&out[..n]).is_err(), "prefix of {n} bytes decoded");
            assert!(
                peek_mod_version(&out[..n]).is_err(),
                "prefix of {n} bytes peeked"
            );
        }
        Ok(())
    }

    #[test]
    fn format1_huge_length_claim_does_not_allocate_or_panic() {
        // A byte string header claiming 2^63 bytes, then nothing.
        let mut buf = vec![FORMAT_V1, 0xa1, 0x63];
        buf.extend_from_slice(b"key");
        buf.push(0x5b);
        buf.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(matches!(decode(&buf), Err(CodecError::Malformed { .. })));
    }

    fn arb_kv() -> impl Strategy<Value = KeyValue> {
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..5000),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(|(k, v, c, m, ver, l)| kv(&k, &v, c, m, ver, l))
    }

    proptest! {
        #[test]
        fn format1_roundtrip(kv in arb_kv()) {
            let mut out = Vec::new();
            encode_v1(&kv, &mut out).expect("encode");
            prop_assert_eq!(out[0], FORMAT_V1);
            prop_assert_eq!(peek_mod_version(&out), Ok((kv.mod_revision, kv.version)));
            prop_assert_eq!(decode(&out), Ok(kv));
        }

        #[test]
        fn a_borrowed_read_sees_what_decode_sees_in_either_format(kv in arb_kv()) {
            for format in [FORMAT_V1, FORMAT_V2] {
                let mut out = Vec::new();
                encode(format, &kv, &mut out).expect("encode");
                prop_assert_eq!(with_ref(&out, |r| r.to_owned()), Ok(kv.clone()));
                prop_assert_eq!(with_ref(&out, |r| r == KvRef::of(&kv)), Ok(true));
            }
            // A damaged record is refused as decode refuses it.
            let mut two = Vec::new();
            encode_v2(&kv, &mut two);
            two.pop();
            prop_assert_eq!(with_ref(&two, |r| r.to_owned()), decode(&two));
        }

        #[test]
        fn formats_decode_to_the_same_key_value(kv in arb_kv()) {
            let (mut one, mut two) = (Vec::new(), Vec::new());
            encode(FORMAT_V1, &kv, &mut one).expect("encode 1");
            encode(FORMAT_V2, &kv, &mut two).expect("encode 2");
            prop_assert_ne!(&one, &two);
            prop_assert_eq!(decode(&one), decode(&two));
            prop_assert_eq!(peek_mod_version(&one), peek_mod_version(&two));
        }

        #[test]
        fn format1_truncations_are_errors(kv in arb_kv(), cut in any::<proptest::sample::Index>()) {
            let mut out = Vec::new();
            encode_v1(&kv, &mut out).expect("encode");
            let n = cut.index(out.len());
            prop_assert!(decode(&out[..n]).is_err());
        }

        #[test]
        fn format1_fast_path_agrees_with_the_general_decoder(
            kv in arb_kv(),
            idx in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut out = Vec::new();
            encode_v1(&kv, &mut out).expect("encode");
            prop_assert!(canonical_v1(&out[1..]).is_some(), "what we write is canonical");
            prop_assert_eq!(from_cbor::<RecordV1>(&out[1..]).map(|r| r.version), Ok(kv.version));
            // After any one-byte change: whenever the fast path accepts, the general decoder
            // accepts too, with the same values.
            let i = idx.index(out.len() - 1) + 1;
            out[i] = byte;
            if let Some(fast) = canonical_v1(&out[1..]) {
                let general: RecordV1 = from_cbor(&out[1..]).expect("general decoder accepts");
                prop_assert_eq!(fast.key, &general.key.0[..]);
                prop_assert_eq!(fast.value, &general.value.0[..]);
                prop_assert_eq!(
                    (fast.lease, fast.version, fast.mod_revision, fast.create_revision),
                    (general.lease, general.version, general.mod_revision, general.create_revision)
                );
            }
        }

        #[test]
        fn format1_arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = vec![FORMAT_V1];
            buf.extend_from_slice(&body);
            let _ = decode(&buf);
            let _ = peek_mod_version(&buf);
        }

        #[test]
        fn format1_corrupted_byte_never_panics(idx in any::<proptest::sample::Index>(), byte in any::<u8>()) {
            let mut out = Vec::new();
            encode_v1(&kv(b"some-key", b"some-value", 3, 4, 2, 9), &mut out).expect("encode");
            let i = idx.index(out.len());
            out[i] = byte;
            let _ = decode(&out);
            let _ = peek_mod_version(&out);
        }

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
