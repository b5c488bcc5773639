//! [`MemoryEngine`]: every table a persistent ordered map; nothing touches the disk.
//!
//! Persistent maps (`imbl::OrdMap`) share structure between versions, so a snapshot is an O(1)
//! clone and a long range scan never blocks writers: the writer path-copies what it changes.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use imbl::OrdMap;

use super::engine::{Engine, EngineIter, Snapshot, Table, WriteBatch, WriteOp};
use super::{Error, Result};

type Map = OrdMap<Vec<u8>, Vec<u8>>;

#[derive(Clone, Default)]
struct Tables([Map; Table::ALL.len()]);

/// The in-memory engine (`--engine memory`).
#[derive(Default)]
pub struct MemoryEngine {
    // A std Mutex: held only to swap or clone the maps (no I/O, no await), so contention is a
    // few hundred nanoseconds at most.
    tables: Mutex<Tables>,
    bytes: AtomicU64,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tables>> {
        self.tables
            .lock()
            .map_err(|_| Error::Engine("memory engine lock poisoned".into()))
    }
}

impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.0[table.index()].get(key).cloned())
    }

    fn snapshot(&self) -> Box<dyn Snapshot + '_> {
        // A poisoned lock means a writer panicked mid-batch; the maps themselves are still
        // consistent (each insert is atomic), so reading them is safe.
        let tables = match self.tables.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Box::new(MemorySnapshot { tables })
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<()> {
        let mut t = self.lock()?;
        let mut delta: i64 = 0;
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { table, key, value } => {
                    delta += (key.len() + value.len()) as i64;
                    if let Some(old) = t.0[table.index()].insert(key.clone(), value) {
                        delta -= (key.len() + old.len()) as i64;
                    }
                }
                WriteOp::Delete { table, key } => {
                    if let Some(old) = t.0[table.index()].remove(&key) {
                        delta -= (key.len() + old.len()) as i64;
                    }
                }
                WriteOp::DeleteRange { table, start, end } => {
                    delta -= delete_range(&mut t.0[table.index()], &start, end.as_deref());
                }
            }
        }
        if delta >= 0 {
            self.bytes.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn size_in_use_bytes(&self) -> u64 {
        self.size_bytes()
    }

    fn defragment(&self) -> Result<()> {
        Ok(())
    }
}

/// Removes `[start, end)` from `map`; returns the bytes (keys and values) removed.
///
/// O(m log n) for m removed keys; emptying the whole table is O(n) and frees the old map in
/// one go. (imbl's `split` rebuilds the whole map, so it is not used here.)
fn delete_range(map: &mut Map, start: &[u8], end: Option<&[u8]>) -> i64 {
    let size = |k: &[u8], v: &[u8]| (k.len() + v.len()) as i64;
    if start.is_empty() && end.is_none() {
        return std::mem::take(map).iter().map(|(k, v)| size(k, v)).sum();
    }
    if end.is_some_and(|end| end <= start) {
        return 0;
    }
    let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
    let doomed: Vec<Vec<u8>> = map
        .range::<_, [u8]>((Bound::Included(start), upper))
        .map(|(k, _)| k.clone())
        .collect();
    doomed
        .into_iter()
        .filter_map(|k| map.remove(&k).map(|v| size(&k, &v)))
        .sum()
}

struct MemorySnapshot {
    tables: Tables,
}

impl Snapshot for MemorySnapshot {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tables.0[table.index()].get(key).cloned())
    }

    fn iter(&self, table: Table) -> Box<dyn EngineIter + '_> {
        Box::new(MemoryIter {
            map: &self.tables.0[table.index()],
            iter: None,
            cur: None,
        })
    }
}

struct MemoryIter<'a> {
    map: &'a Map,
    iter:
        Option<imbl::ordmap::RangedIter<'a, Vec<u8>, Vec<u8>, imbl::shared_ptr::DefaultSharedPtr>>,
    cur: Option<(&'a Vec<u8>, &'a Vec<u8>)>,
}

impl EngineIter for MemoryIter<'_> {
    fn seek(&mut self, key: &[u8]) {
        let mut it = self
            .map
            .range::<_, [u8]>((Bound::Included(key), Bound::Unbounded));
        self.cur = it.next();
        self.iter = Some(it);
    }

    fn valid(&self) -> bool {
        self.cur.is_some()
    }

    fn key(&self) -> &[u8] {
        self.cur.map(|(k, _)| k.as_slice()).unwrap_or_default()
    }

    fn value(&self) -> &[u8] {
        self.cur.map(|(_, v)| v.as_slice()).unwrap_or_default()
    }

    fn next(&mut self) {
        self.cur = self.iter.as_mut().and_then(|it| it.next());
    }

    fn status(&self) -> Result<()> {
        Ok(())
    }
}

/// What a [`HookedEngine`] shows its writes and syncs to before it makes them; an error fails
/// the write or sync. For tests of what callers ask of an engine.
#[cfg(test)]
pub(crate) trait EngineHook: Send + Sync + 'static {
    /// Before each write; `sync` tells whether it was asked to be durable.
    fn write(&self, _sync: bool) -> Result<()> {
        Ok(())
    }
    /// Before each [`Engine::sync`].
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Before each write, after [`write`](Self::write) let it through: the batch itself.
    fn batch(&self, _batch: &WriteBatch) {}
    /// Before a snapshot's cursor over `table` is made (it may wait: a reader held up).
    fn snapshot_iter(&self, _table: Table) {}
}

/// A [`HookedEngine`]'s snapshot: its cursors are made after [`EngineHook::snapshot_iter`].
#[cfg(test)]
struct HookedSnapshot<'a, H> {
    inner: Box<dyn Snapshot + 'a>,
    hook: &'a H,
}

#[cfg(test)]
impl<H: EngineHook> Snapshot for HookedSnapshot<'_, H> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(table, key)
    }
    fn iter(&self, table: Table) -> Box<dyn EngineIter + '_> {
        self.hook.snapshot_iter(table);
        self.inner.iter(table)
    }
    fn has_table(&self, table: Table) -> bool {
        self.inner.has_table(table)
    }
}

/// A [`MemoryEngine`] whose writes and syncs first go through `hook`.
#[cfg(test)]
pub(crate) struct HookedEngine<H> {
    pub inner: MemoryEngine,
    pub hook: H,
}

#[cfg(test)]
impl<H: EngineHook> HookedEngine<H> {
    pub fn new(hook: H) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            inner: MemoryEngine::new(),
            hook,
        })
    }
}

#[cfg(test)]
impl<H: EngineHook> Engine for HookedEngine<H> {
    fn name(&self) -> &'static str {
        "hooked"
    }
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(table, key)
    }
    fn snapshot(&self) -> Box<dyn Snapshot + '_> {
        Box::new(HookedSnapshot {
            inner: self.inner.snapshot(),
            hook: &self.hook,
        })
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        self.hook.write(sync)?;
        self.hook.batch(&batch);
        self.inner.write(batch, sync)
    }
    fn sync(&self) -> Result<()> {
        self.hook.sync()?;
        self.inner.sync()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn size_in_use_bytes(&self) -> u64 {
        self.inner.size_in_use_bytes()
    }
    fn defragment(&self) -> Result<()> {
        self.inner.defragment()
    }
}
