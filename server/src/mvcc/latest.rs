//! [`Latest`]: the newest version of recently written keys, kept by the apply step so that a
//! put need not look its key up in the engine.
//!
//! Every put reads its key's newest version (for `create_revision`, `version`, the lease it
//! moves from and the event's `prev_kv`). In the engine that is a seek over every memtable
//! and level, and with many versions of a few keys in a 64 MiB memtable the skip-list search
//! alone was the largest item of a 3-member put profile (docs/PERFORMANCE.md, session 25).
//! etcd answers the same question from its in-memory key index.
//!
//! Only the apply step writes here, as each write transaction commits; so an entry is always
//! what a read of the engine at the applied revision would return. A key is kept from its
//! second version on: a key written once (a bulk load) never enters, so the memory goes to
//! keys that are updated. Creating or deleting a key drops what was kept of it (a lookup then
//! goes to the engine). Nothing else changes a key's newest version: compaction keeps a live
//! newest version, a storage-format migration re-encodes the same fields, and an installed
//! snapshot reloads the store, which [`clear`](Latest::clear)s this.
//!
//! Bounded by bytes: two generations, each of at most half the budget. Writes and hits go to
//! the young one; when it is full it becomes the old one and the previous old one is dropped,
//! so a key written or read within the last half-budget of writes stays. Values are copied,
//! so an entry never holds the Raft entry it was decoded from.

use std::collections::HashMap;

use bytes::Bytes;
use metastore_proto::mvccpb::KeyValue;

/// What an entry costs besides its key and value bytes: its map slot twice over (a hash
/// table is up to half empty after it grows) and the allocators' headers and rounding.
const ENTRY_OVERHEAD: usize = 2 * std::mem::size_of::<(Bytes, KeyValue)>() + 64;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Latest {
    /// Most bytes both generations hold together; 0 turns the cache off.
    budget: usize,
    young: HashMap<Bytes, KeyValue>,
    young_bytes: usize,
    old: HashMap<Bytes, KeyValue>,
}

fn cost(key: &[u8], kv: &KeyValue) -> usize {
    key.len() + kv.value.len() + ENTRY_OVERHEAD
}

impl Latest {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            young: HashMap::new(),
            young_bytes: 0,
            old: HashMap::new(),
        }
    }

    /// The newest version of `key`, if it is kept.
    pub(crate) fn get(&mut self, key: &[u8]) -> Option<KeyValue> {
        if let Some(kv) = self.young.get(key) {
            return Some(kv.clone());
        }
        let (k, kv) = self.old.remove_entry(key)?;
        self.insert(k, kv.clone());
        Some(kv)
    }

    /// Records `kv` as the newest version of `key` (`None`: deleted).
    pub(crate) fn set(&mut self, key: &[u8], kv: Option<&KeyValue>) {
        let keep = kv.filter(|kv| kv.version > 1 && cost(key, kv) <= self.budget / 8);
        let Some(kv) = keep else {
            // Created, deleted, too large to keep, or the cache is off: forget any older
            // version, so that a lookup goes to the engine.
            self.young.remove(key);
            self.old.remove(key);
            return;
        };
        let key = Bytes::copy_from_slice(key);
        let kv = KeyValue {
            key: key.clone(),
            value: Bytes::copy_from_slice(&kv.value),
            ..kv.clone()
        };
        self.old.remove(&key[..]);
        self.insert(key, kv);
    }

    fn insert(&mut self, key: Bytes, kv: KeyValue) {
        let add = cost(&key, &kv);
        if let Some(prev) = self.young.insert(key.clone(), kv) {
            self.young_bytes -= cost(&key, &prev);
        }
        self.young_bytes += add;
        if self.young_bytes > self.budget / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
    }

    /// Forgets everything (the engine's content was replaced).
    pub(crate) fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.young_bytes = 0;
    }

    /// Bytes held (by the accounting above), both generations.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.young_bytes + self.old.iter().map(|(k, kv)| cost(k, kv)).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Version `rev - 1` of `key` (so a `rev` of 2 is its first version).
    fn kv(key: &str, value: &[u8], rev: i64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            lease: 7,
        }
    }

    #[test]
    fn keeps_updated_keys_and_forgets_created_and_deleted_ones() {
        let mut l = Latest::new(1 << 20);
        assert_eq!(l.get(b"a"), None, "unknown before any write");
        l.set(b"a", Some(&kv("a", b"1", 2)));
        assert_eq!(l.get(b"a"), None, "a key's first version is not kept");
        l.set(b"a", Some(&kv("a", b"2", 3)));
        l.set(b"a", Some(&kv("a", b"3", 4)));
        assert_eq!(l.get(b"a"), Some(kv("a", b"3", 4)));
        l.set(b"a", None);
        assert_eq!(l.get(b"a"), None, "a deletion drops the kept version");
        l.set(b"a", Some(&kv("a", b"2", 3)));
        let mut created = kv("a", b"new", 9);
        created.version = 1;
        l.set(b"a", Some(&created));
        assert_eq!(l.get(b"a"), None, "a re-creation drops the kept version");
        l.set(b"a", Some(&kv("a", b"2", 3)));
        l.clear();
        assert_eq!(l.get(b"a"), None);
    }

    #[test]
    fn copies_values_out_of_the_buffer_they_came_from() {
        let mut l = Latest::new(1 << 20);
        let entry = Bytes::from(vec![9u8; 4096]);
        let mut put = kv("k", b"", 5);
        put.value = entry.slice(100..200);
        l.set(b"k", Some(&put));
        let got = l.get(b"k").expect("kept");
        assert_eq!(got, put);
        assert_ne!(
            got.value.as_ptr(),
            put.value.as_ptr(),
            "the kept value must not share (and keep alive) the entry's buffer"
        );
    }

    #[test]
    fn stays_within_its_budget_and_keeps_what_is_used() {
        let budget = 64 << 10;
        let mut l = Latest::new(budget);
        l.set(b"hot", Some(&kv("hot", &[1; 100], 3)));
        for i in 0..10_000 {
            let key = format!("key{i:05}");
            l.set(key.as_bytes(), Some(&kv(&key, &[0; 200], i + 3)));
            // A key read in every half-budget of writes stays.
            if i % 40 == 0 {
                assert!(l.get(b"hot").is_some(), "hot key evicted at {i}");
            }
            assert!(l.bytes() <= budget + 1024, "{} bytes at {i}", l.bytes());
        }
        assert!(l.get(b"key00000").is_none(), "the oldest keys are gone");
        assert!(l.get(b"key09999").is_some());
    }

    #[test]
    fn a_value_too_large_to_keep_drops_the_older_version() {
        let mut l = Latest::new(8 << 10);
        l.set(b"k", Some(&kv("k", b"small", 3)));
        assert!(l.get(b"k").is_some());
        l.set(b"k", Some(&kv("k", &[0; 4096], 4)));
        assert_eq!(l.get(b"k"), None, "a stale version must not survive");
        let mut off = Latest::new(0);
        off.set(b"k", Some(&kv("k", b"v", 3)));
        assert_eq!(off.get(b"k"), None, "budget 0 keeps nothing");
    }
}
