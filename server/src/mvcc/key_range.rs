//! etcd's `(key, range_end)` pair as one type.

/// The keys a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: exactly `key`.
    Single(Vec<u8>),
    /// `[start, end)`; empty when `end <= start` (an inverted range matches nothing).
    Between(Vec<u8>, Vec<u8>),
    /// `range_end == "\0"`: every key `>= start` (with `start == "\0"`: every key).
    From(Vec<u8>),
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::From(key.to_vec()),
            end => KeyRange::Between(key.to_vec(), end.to_vec()),
        }
    }

    pub fn start(&self) -> &[u8] {
        match self {
            KeyRange::Single(k) | KeyRange::Between(k, _) | KeyRange::From(k) => k,
        }
    }

    /// The exclusive end, `None` when unbounded. For `Single`, `None` too: callers treat
    /// `Single` separately.
    pub fn end(&self) -> Option<&[u8]> {
        match self {
            KeyRange::Between(_, e) => Some(e),
            _ => None,
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => key == k.as_slice(),
            KeyRange::Between(s, e) => key >= s.as_slice() && key < e.as_slice(),
            KeyRange::From(s) => key >= s.as_slice(),
        }
    }

    /// Whether two ranges share at least one key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        match (self, other) {
            (KeyRange::Single(k), r) | (r, KeyRange::Single(k)) => r.contains(k),
            (a, b) => {
                let (a_s, b_s) = (a.start(), b.start());
                let a_e_after_b_s = a.end().is_none_or(|e| e > b_s);
                let b_e_after_a_s = b.end().is_none_or(|e| e > a_s);
                let non_empty = |r: &KeyRange| r.end().is_none_or(|e| e > r.start());
                non_empty(a) && non_empty(b) && a_e_after_b_s && b_e_after_a_s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KeyRange as R;

    #[test]
    fn forms() {
        assert_eq!(R::new(b"a", b""), R::Single(b"a".to_vec()));
        assert_eq!(R::new(b"a", b"\0"), R::From(b"a".to_vec()));
        assert!(R::new(b"\0", b"\0").contains(b"\0"));
        assert!(R::new(b"\0", b"\0").contains(b"a"));
        assert!(R::new(b"a", b"c").contains(b"b"));
        assert!(!R::new(b"a", b"c").contains(b"c"));
        assert!(
            !R::new(b"c", b"a").contains(b"b"),
            "inverted range is empty"
        );
    }

    #[test]
    fn overlaps() {
        let single = |k: &[u8]| R::new(k, b"");
        assert!(single(b"a").overlaps(&single(b"a")));
        assert!(!single(b"a").overlaps(&single(b"b")));
        assert!(single(b"b").overlaps(&R::new(b"a", b"c")));
        assert!(R::new(b"a", b"c").overlaps(&R::new(b"b", b"d")));
        assert!(!R::new(b"a", b"b").overlaps(&R::new(b"b", b"c")));
        assert!(R::new(b"x", b"\0").overlaps(&R::new(b"a", b"y")));
        assert!(!R::new(b"x", b"\0").overlaps(&R::new(b"a", b"x")));
        assert!(
            !R::new(b"c", b"a").overlaps(&R::new(b"a", b"z")),
            "inverted"
        );
    }
}
