//! Range permissions as etcd computes them (`auth/range_perm_cache.go`): each user's READ and
//! WRITE permissions merged into sets of half-open key intervals, and checks that a
//! requested key or range lies wholly inside one.
//!
//! A permission or request names a key the way a Range does: an empty `range_end` is the
//! single key (the interval `[key, key + "\0")`), `range_end = "\0"` is every key from `key`
//! on, anything else is `[key, range_end)`. Worked example: a role with READ on `[/a, /b)`
//! and on the key `/b`, and READ on `--from-key z`:
//!
//! ```text
//! merged READ set: [/a, /b\0)  [z, ∞)
//! get /a /b        -> [/a, /b)       inside [/a, /b\0)  permitted
//! get --prefix /a  -> [/a, /b)       permitted
//! get /a /c        -> [/a, /c)       not inside one interval: denied
//! get --from-key y -> [y, ∞)         denied (y < z)
//! ```

use std::collections::BTreeMap;

use metastore_proto::authpb::{permission::Type as PermType, Role};

/// The end of an interval: `None` is past every key.
type End = Option<Vec<u8>>;

/// The interval a `(key, range_end)` pair names (see the module docs).
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    match range_end {
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), Some(end))
        }
        [0] => (key.to_vec(), None),
        end if end <= key => {
            // An empty range reads nothing; it is permitted where its first key is.
            let mut point = key.to_vec();
            point.push(0);
            (key.to_vec(), Some(point))
        }
        end => (key.to_vec(), Some(end.to_vec())),
    }
}

/// Disjoint, non-adjacent intervals sorted by start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeySet {
    intervals: Vec<(Vec<u8>, End)>,
}

impl KeySet {
    fn from_intervals(mut v: Vec<(Vec<u8>, End)>) -> Self {
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Vec<u8>, End)> = Vec::with_capacity(v.len());
        for (start, end) in v {
            if let Some((_, last_end)) = out.last_mut() {
                let joins = match last_end {
                    None => true,
                    Some(e) => start.as_slice() <= e.as_slice(),
                };
                if joins {
                    let longer = match (&last_end, &end) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(a), Some(b)) => b > a,
                    };
                    if longer {
                        *last_end = end;
                    }
                    continue;
                }
            }
            out.push((start, end));
        }
        Self { intervals: out }
    }

    /// Whether the key or range `(key, range_end)` lies wholly inside the set.
    pub fn covers(&self, key: &[u8], range_end: &[u8]) -> bool {
        let (start, end) = interval(key, range_end);
        let i = self
            .intervals
            .partition_point(|(s, _)| s.as_slice() <= start.as_slice());
        let Some((_, have)) = i.checked_sub(1).map(|i| &self.intervals[i]) else {
            return false;
        };
        match (have, end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(have), Some(end)) => end.as_slice() <= have.as_slice(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }
}

/// What one user may do: computed from its roles whenever users or roles change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserPerms {
    /// Holds the `root` role: may do everything.
    pub root: bool,
    /// The user's roles, sorted.
    pub roles: Vec<String>,
    pub read: KeySet,
    pub write: KeySet,
}

impl UserPerms {
    /// Merges the permissions of `roles` (names of roles that do not exist are skipped).
    pub fn compute(roles: &[String], all: &BTreeMap<String, Role>) -> Self {
        let mut read = Vec::new();
        let mut write = Vec::new();
        for name in roles {
            let Some(role) = all.get(name) else { continue };
            for p in &role.key_permission {
                let iv = interval(&p.key, &p.range_end);
                match PermType::try_from(p.perm_type) {
                    Ok(PermType::Read) => read.push(iv),
                    Ok(PermType::Write) => write.push(iv),
                    Ok(PermType::Readwrite) => {
                        read.push(iv.clone());
                        write.push(iv);
                    }
                    Err(_) => {}
                }
            }
        }
        Self {
            root: roles.iter().any(|r| r == super::ROOT),
            roles: roles.to_vec(),
            read: KeySet::from_intervals(read),
            write: KeySet::from_intervals(write),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::authpb::Permission;

    fn set(ivs: &[(&str, &str)]) -> KeySet {
        KeySet::from_intervals(
            ivs.iter()
                .map(|(k, e)| interval(k.as_bytes(), e.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn points_ranges_and_open_ends() {
        let s = set(&[("/a", "/b"), ("/b", ""), ("z", "\0")]);
        assert!(s.covers(b"/a", b""));
        assert!(s.covers(b"/a", b"/b"));
        assert!(s.covers(b"/a", b"/b\0"), "the point /b joins [/a, /b)");
        assert!(!s.covers(b"/a", b"/c"));
        assert!(!s.covers(b"/", b"/b"));
        assert!(s.covers(b"/b", b""));
        assert!(!s.covers(b"/b0", b""));
        assert!(s.covers(b"z", b"\0"));
        assert!(s.covers(b"zz", b""));
        assert!(!s.covers(b"y", b"\0"));
        assert!(!s.covers(b"y", b""));
        assert!(!KeySet::default().covers(b"a", b""));
    }

    #[test]
    fn adjacent_and_overlapping_intervals_merge() {
        let s = set(&[("c", "e"), ("a", "c"), ("d", "f"), ("x", "\0"), ("y", "z")]);
        assert_eq!(s.intervals.len(), 2);
        assert!(s.covers(b"a", b"f"));
        assert!(!s.covers(b"a", b"f\0"));
        assert!(s.covers(b"x", b"\0"));
        // The whole key space: etcdctl's `--prefix ""` permission is ("", "\0").
        assert!(set(&[("", "\0")]).covers(b"\0", b"\0"));
    }

    #[test]
    fn roles_merge_per_type() {
        let perm = |t: PermType, k: &str, e: &str| Permission {
            perm_type: t as i32,
            key: k.as_bytes().to_vec().into(),
            range_end: e.as_bytes().to_vec().into(),
        };
        let mut all = BTreeMap::new();
        all.insert(
            "r1".to_string(),
            Role {
                name: "r1".into(),
                key_permission: vec![
                    perm(PermType::Read, "a", "b"),
                    perm(PermType::Write, "w", ""),
                ],
            },
        );
        all.insert(
            "r2".to_string(),
            Role {
                name: "r2".into(),
                key_permission: vec![perm(PermType::Readwrite, "b", "c")],
            },
        );
        let p = UserPerms::compute(&["r1".into(), "r2".into(), "gone".into()], &all);
        assert!(!p.root);
        assert!(p.read.covers(b"a", b"c"));
        assert!(!p.write.covers(b"a", b""));
        assert!(p.write.covers(b"w", b""));
        assert!(p.write.covers(b"b", b"c"));
        assert!(UserPerms::compute(&["root".into()], &all).root);
    }
}
