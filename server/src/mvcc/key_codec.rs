//! How user keys and revisions become engine keys.
//!
//! `Kv` table keys are `enc(user_key) ++ be64(!rev)`:
//! - `enc` is an order-preserving, prefix-free escape: every `0x00` byte becomes `0x00 0xff`
//!   and the key ends with `0x00 0x01`. For user keys `a < b` (bytewise), `enc(a) < enc(b)`,
//!   and no `enc(a)` is a prefix of another, so the revision suffix never disturbs key order.
//! - `!rev` (bitwise not, big endian) sorts the newest version of a key first, so seeking to
//!   `enc(k) ++ be64(!R)` lands on the newest version of `k` at or below revision `R`.
//!
//! Example: `put a` at 2, `put a` at 5, `del a` at 7 gives, in table order,
//! `a\0\1 !7` (tombstone), `a\0\1 !5`, `a\0\1 !2`. A read at revision 6 seeks `a\0\1 !6` and
//! lands on the version written at 5.
//!
//! `Rev` table keys are `be64(main) ++ be64(sub)`: the revision log in commit order.

/// Appends the escaped, terminated form of `key` to `out`.
pub fn encode_key(key: &[u8], out: &mut Vec<u8>) {
    out.reserve(key.len() + 2 + 8);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// The `Kv` table key of `key` at revision `rev`.
pub fn kv_key(key: &[u8], rev: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    encode_key(key, &mut out);
    out.extend_from_slice(&(!(rev as u64)).to_be_bytes());
    out
}

/// The `Kv` table prefix shared by every version of `key`.
pub fn kv_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    encode_key(key, &mut out);
    out
}

/// Splits a `Kv` table key into `(encoded prefix length, revision)`.
/// Returns `None` for a malformed key.
pub fn split_kv_key(raw: &[u8]) -> Option<(usize, i64)> {
    let plen = raw.len().checked_sub(8)?;
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&raw[plen..]);
    Some((plen, !u64::from_be_bytes(rev) as i64))
}

/// Decodes an escaped key prefix (as produced by [`encode_key`]) back to the user key.
pub fn decode_key(enc: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(enc.len().saturating_sub(2));
    let mut i = 0;
    while i < enc.len() {
        let b = enc[i];
        if b == 0 {
            match enc.get(i + 1) {
                Some(0xff) => {
                    out.push(0);
                    i += 2;
                }
                Some(0x01) if i + 2 == enc.len() => return Some(out),
                _ => return None,
            }
        } else {
            out.push(b);
            i += 1;
        }
    }
    None
}

/// The `Rev` table key of revision `(main, sub)`.
pub fn rev_key(main: i64, sub: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&(main as u64).to_be_bytes());
    out.extend_from_slice(&(sub as u64).to_be_bytes());
    out
}

/// The `Lease` table key of lease `id` (its header when `key` is empty, else an attachment).
pub fn lease_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&(id as u64).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Splits a `Rev` table key into `(main, sub)`.
pub fn split_rev_key(raw: &[u8]) -> Option<(i64, i64)> {
    if raw.len() != 16 {
        return None;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[..8]);
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[8..]);
    Some((u64::from_be_bytes(a) as i64, u64::from_be_bytes(b) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_version_sorts_first() {
        assert!(kv_key(b"a", 7) < kv_key(b"a", 5));
        assert!(kv_key(b"a", 5) < kv_key(b"a", 2));
        assert!(kv_key(b"a", 1) < kv_key(b"a\0", 9));
        assert!(kv_key(b"a", 1) < kv_key(b"ab", 9));
        assert!(kv_key(b"a\0", 1) < kv_key(b"a\x01", 9));
    }

    #[test]
    fn split_and_decode() {
        let k = kv_key(b"x\0y", 42);
        let (plen, rev) = split_kv_key(&k).expect("split");
        assert_eq!(rev, 42);
        assert_eq!(decode_key(&k[..plen]), Some(b"x\0y".to_vec()));
        assert_eq!(decode_key(b"x\0"), None);
        assert_eq!(decode_key(b"x"), None);
        assert_eq!(split_rev_key(&rev_key(3, 4)), Some((3, 4)));
        assert_eq!(split_rev_key(b"short"), None);
    }

    proptest! {
        #[test]
        fn encoding_preserves_order(a in proptest::collection::vec(any::<u8>(), 0..12),
                                    b in proptest::collection::vec(any::<u8>(), 0..12),
                                    ra in 0i64..1000, rb in 0i64..1000) {
            let (ka, kb) = (kv_key(&a, ra), kv_key(&b, rb));
            if a != b {
                prop_assert_eq!(a < b, ka < kb);
            } else {
                prop_assert_eq!(ra > rb, ka < kb);
            }
            let (plen, rev) = split_kv_key(&ka).expect("split");
            prop_assert_eq!(rev, ra);
            prop_assert_eq!(decode_key(&ka[..plen]), Some(a));
        }
    }
}
