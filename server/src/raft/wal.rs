//! The Raft log's own write-ahead log: segment files whose length is set when they are made,
//! written in place and synced with `fdatasync`.
//!
//! Why not RocksDB's log: RocksDB preallocates its write-ahead log with `FALLOC_FL_KEEP_SIZE`,
//! so every write makes the file longer and every sync commits the file's new length as well.
//! A write inside a file's existing length does not change it: on session 32's machine the
//! server's `fdatasync` went from 0.295 to 0.257 ms (p50, `strace`, one client), and a lone
//! process's from 0.19-0.26 to 0.13-0.18 ms (docs/PERFORMANCE.md). etcd's WAL gets the same
//! from its preallocated segments. The entries also stop going through RocksDB's memtables,
//! flushes and compactions, where they were written twice more: 8-13 % less server CPU per
//! put.
//!
//! # Format
//! A directory of segments `<seq:016x>.wal`, each made at [`WalOptions::segment_bytes`] with
//! `fallocate` (zeroes) under a temporary name and renamed into place. A segment is a sequence
//! of records, then zeroes:
//!
//! `[len u32 LE][crc32c(body) u32 LE][body: kind u8, index u64 LE, payload]`
//!
//! with `len` the body's length. Kinds: an entry (`index`, its bytes), a truncation (every
//! entry from `index` on is gone), a purge (every entry up to `index` is gone; the payload is
//! the purged id for the caller) and the committed id (payload, empty for none). One
//! [`write`](Wal::write) puts its records at the end of one segment, in one `pwrite`, and
//! syncs them; a batch that does not fit where the segment's length ends goes to a new segment,
//! the old one synced first. So a segment after a damaged record is never read past that
//! record: only the last segment may end in a torn write, which [`open`](Wal::open) cuts off
//! (and zeroes), and a damaged record anywhere else is reported, not skipped.
//!
//! Where the file system takes it, each write is one direct write of whole blocks, synced in
//! the same call (`direct`, [`WalOptions::direct_io`]); the bytes are the same.
//!
//! Segments are deleted once a purge covers every entry in them (the purge record is synced
//! first); the last segment is never deleted. Everything the log holds is indexed in memory
//! (24 bytes per entry); entries are read back with `pread`, adjacent ones together.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

mod direct;
use direct::{Direct, BLOCK};

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("raft log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log {path} is damaged at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("raft log: entry {got} appended where entry {expected} comes next")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("raft log: a record of {0} bytes is larger than a record may be")]
    TooLarge(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("raft log: an earlier write failed; the log takes no more writes")]
    Failed,
}

pub type Result<T> = std::result::Result<T, WalError>;

/// Where and how the log is kept.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// The length a segment is made with (etcd: 64 MiB). A batch larger than that gets a
    /// segment of its own, which grows to hold it.
    pub segment_bytes: u64,
    /// Sync every write before it returns (off only under `--unsafe-no-fsync`).
    pub fsync: bool,
    /// Write the segments with direct I/O (`O_DIRECT`, and `RWF_DSYNC` on each write that is
    /// synced) where the file system takes it, else through the page cache and `fdatasync`;
    /// the bytes on disk are the same (`raft/wal/direct.rs`). With `fsync` only.
    pub direct_io: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            fsync: true,
            direct_io: true,
        }
    }
}

/// Told how long each `fdatasync` of a write took (the server's
/// `metastore_disk_wal_fsync_duration_seconds`).
pub type SyncObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// An entry's bytes, put straight into the write's buffer (no copy of its own first).
pub trait EntryBody: std::fmt::Debug {
    /// Appends the entry's bytes to `buf`.
    fn encode_into(&self, buf: &mut Vec<u8>);
}

impl EntryBody for [u8] {
    fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(self);
    }
}

impl EntryBody for Vec<u8> {
    fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(self);
    }
}

/// One record to write.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    /// Entry `index` with its bytes; it must directly follow the last entry (or the purged
    /// index when there is none).
    Entry { index: u64, data: &'a dyn EntryBody },
    /// Every entry from `from` on is gone.
    Truncate { from: u64 },
    /// Every entry up to `upto` is gone; `meta` is kept as the purged id.
    Purge { upto: u64, meta: &'a [u8] },
    /// The committed id (`meta`; empty for none).
    Committed { meta: &'a [u8] },
}

const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_PURGE: u8 = 3;
const KIND_COMMITTED: u8 = 4;
/// `len` and `crc`.
const HEADER: usize = 8;
/// `kind` and `index`.
const BODY_PREFIX: usize = 9;
const SUFFIX: &str = ".wal";
const TEMP_SUFFIX: &str = ".wal.tmp";

/// The write buffer kept for the next write is dropped when a batch made it larger than this.
const KEEP_BUFFER_BYTES: usize = 8 << 20;

impl Record<'_> {
    /// The record's kind, index and payload (empty for an entry: its bytes are encoded
    /// straight into the write).
    fn parts(&self) -> (u8, u64, &[u8]) {
        match *self {
            Record::Entry { index, .. } => (KIND_ENTRY, index, &[]),
            Record::Truncate { from } => (KIND_TRUNCATE, from, &[]),
            Record::Purge { upto, meta } => (KIND_PURGE, upto, meta),
            Record::Committed { meta } => (KIND_COMMITTED, 0, meta),
        }
    }

    /// Appends the framed record to `buf`.
    fn encode(&self, buf: &mut Vec<u8>) -> Result<()> {
        let (kind, index, payload) = self.parts();
        let start = buf.len();
        buf.extend_from_slice(&[0; HEADER]);
        buf.push(kind);
        buf.extend_from_slice(&index.to_le_bytes());
        match self {
            Record::Entry { data, .. } => data.encode_into(buf),
            _ => buf.extend_from_slice(payload),
        }
        let body_len = buf.len() - start - HEADER;
        let Ok(len) = u32::try_from(body_len) else {
            buf.truncate(start);
            return Err(WalError::TooLarge(body_len));
        };
        let crc = crc32c::crc32c(&buf[start + HEADER..]);
        buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

/// Where an entry's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seq: u64,
    offset: u64,
    /// The whole record's length, header included.
    len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// The highest entry index written into it, if any.
    last_index: Option<u64>,
}

/// Which entries the log holds and what must come next: the one rule for the order of
/// records, used both to check a write before any of it reaches the file and to index
/// what was written or read.
#[derive(Debug, Default, Clone, Copy)]
struct Shape {
    /// The first entry held (meaningless while `len` is 0).
    first: u64,
    len: u64,
    /// The newest purged index.
    purged: Option<u64>,
}

impl Shape {
    fn last(&self) -> Option<u64> {
        (self.len > 0).then(|| self.first + self.len - 1)
    }

    /// The index the next entry must have, if it is fixed.
    fn next(&self) -> Option<u64> {
        self.last()
            .map(|l| l + 1)
            .or_else(|| self.purged.map(|p| p + 1))
    }

    /// Applies one record; an entry out of order is an error and changes nothing.
    fn step(&mut self, kind: u8, index: u64) -> Result<()> {
        match kind {
            KIND_ENTRY => {
                if let Some(expected) = self.next().filter(|e| *e != index) {
                    return Err(WalError::OutOfOrder {
                        expected,
                        got: index,
                    });
                }
                if self.len == 0 {
                    self.first = index;
                }
                self.len += 1;
            }
            KIND_TRUNCATE => {
                self.len = self.len.min(index.saturating_sub(self.first));
            }
            KIND_PURGE => {
                let gone = (index + 1).saturating_sub(self.first).min(self.len);
                self.first += gone;
                self.len -= gone;
                if self.len == 0 {
                    self.first = index + 1;
                }
                self.purged = Some(index);
            }
            KIND_COMMITTED => {}
            other => return Err(WalError::UnknownKind(other)),
        }
        Ok(())
    }
}

/// What the records say, as far as they have been read or written.
#[derive(Default)]
struct Index {
    shape: Shape,
    /// Where each held entry is, `shape.first` first.
    locs: VecDeque<Loc>,
    /// The newest purge's payload.
    purged_meta: Bytes,
    committed: Option<Bytes>,
    segments: BTreeMap<u64, Segment>,
}

impl Index {
    /// Applies one record found at `loc`; an entry out of order is an error.
    fn apply(&mut self, kind: u8, index: u64, payload: Bytes, loc: Loc) -> Result<()> {
        self.shape.step(kind, index)?;
        // The locations follow the shape: dropped at the front by a purge, at the back by a
        // truncation, one more at the back for an entry.
        let len = usize::try_from(self.shape.len).unwrap_or(usize::MAX);
        match kind {
            KIND_ENTRY => {
                self.locs.push_back(loc);
                if let Some(s) = self.segments.get_mut(&loc.seq) {
                    s.last_index = Some(s.last_index.map_or(index, |l| l.max(index)));
                }
            }
            KIND_TRUNCATE => self.locs.truncate(len),
            KIND_PURGE => {
                let gone = self.locs.len().saturating_sub(len);
                self.locs.drain(..gone);
                self.purged_meta = payload;
            }
            _ => self.committed = (!payload.is_empty()).then_some(payload),
        }
        debug_assert_eq!(self.locs.len(), len);
        Ok(())
    }
}

/// The segment being written.
struct Writer {
    seq: u64,
    file: Arc<File>,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// The segment's length: records past it would grow the file.
    capacity: u64,
    buf: Vec<u8>,
    /// The segment opened for direct I/O, unless the log writes through the page cache.
    direct: Option<Direct>,
    failed: bool,
}

impl Writer {
    /// The index's entry for the segment being written, with no entry in it yet.
    fn segment(&self) -> Segment {
        Segment {
            file: self.file.clone(),
            path: self.path.clone(),
            last_index: None,
        }
    }
}

/// The log. Writes are serialized (openraft's core is the only writer); reads may run beside
/// them and see every write that has returned.
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    writer: Mutex<Writer>,
    index: Mutex<Index>,
    on_sync: OnceLock<SyncObserver>,
}

/// The segments a [`Wal::purge`] deleted, still open. Closing a deleted file is when the
/// kernel frees its blocks (and, on a file system mounted with `discard`, trims them) and
/// drops its cached pages. For a 64 MiB segment at once that cost the Raft thread ~12 ms of
/// CPU, and the next log `fdatasync`s waited ~10 ms more behind the trim (docs/PERFORMANCE.md,
/// session 43), so the Raft thread hands this to a thread of its own, which calls
/// [`close_gradually`](Self::close_gradually). Dropped, the files close at once.
#[must_use = "dropping it closes the deleted segments at once, which can stall the disk"]
pub struct Removed(Vec<Segment>);

/// How much of a deleted segment [`Removed::close_gradually`] frees at a time.
pub const RELEASE_STEP: u64 = 4 << 20;

/// The pause between two of [`Removed::close_gradually`]'s steps.
pub const RELEASE_PAUSE: Duration = Duration::from_millis(5);

impl Removed {
    /// How many segments were deleted.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Closes the deleted segments after shrinking each by [`RELEASE_STEP`] at a time, with
    /// [`RELEASE_PAUSE`] between steps, so that the blocks are freed (and trimmed) in small
    /// pieces that a log sync meanwhile does not queue behind; RocksDB deletes its files in
    /// chunks for the same reason (`bytes_max_delete_chunk`). 64 MiB take ~100 ms. A failed
    /// step is logged and the file closed at once.
    pub fn close_gradually(self) {
        for s in self.0 {
            let mut len = match s.file.metadata() {
                Ok(m) => m.len(),
                Err(e) => {
                    tracing::debug!(segment = %s.path.display(), error = %e,
                        "closing a deleted raft log segment at once");
                    continue;
                }
            };
            while len > RELEASE_STEP {
                len -= RELEASE_STEP;
                if let Err(e) = s.file.set_len(len) {
                    tracing::debug!(segment = %s.path.display(), error = %e,
                        "closing a deleted raft log segment at once");
                    break;
                }
                std::thread::sleep(RELEASE_PAUSE);
            }
        }
    }
}

/// What [`Wal::state`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalState {
    /// The first and last entry held, if any.
    pub entries: Option<(u64, u64)>,
    /// The last purge: its index and the meta written with it.
    pub purged: Option<(u64, Bytes)>,
    /// The last committed meta written.
    pub committed: Option<Bytes>,
    /// Segment files.
    pub segments: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding either lock leaves consistent data behind (every change is made
    // after the write it describes succeeded), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}{SUFFIX}"))
}

/// Syncs the directory `dir` (its entries: names made, renamed or removed).
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    crate::storage::data_dir::sync_dir(dir).map_err(io_err(dir))
}

/// Makes segment `seq`, `bytes` long and zeroed, under a temporary name first so that a
/// segment file always has its full length.
fn create_segment(dir: &Path, seq: u64, bytes: u64, fsync: bool) -> Result<(File, PathBuf)> {
    let path = segment_path(dir, seq);
    let temp = dir.join(format!("{seq:016x}{TEMP_SUFFIX}"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(io_err(&temp))?;
    allocate(&file, 0, bytes).map_err(io_err(&temp))?;
    if fsync {
        file.sync_all().map_err(io_err(&temp))?;
    }
    fs::rename(&temp, &path).map_err(io_err(&path))?;
    if fsync {
        sync_dir(dir)?;
    }
    Ok((file, path))
}

/// Makes segment `seq` ([`create_segment`]), at least `capacity` long and a whole number of
/// blocks, and returns the writer for it, which keeps `buf` for its writes.
fn start_segment(
    dir: &Path,
    seq: u64,
    capacity: u64,
    opts: &WalOptions,
    buf: Vec<u8>,
) -> Result<Writer> {
    let capacity = capacity.next_multiple_of(BLOCK as u64);
    let (file, path) = create_segment(dir, seq, capacity, opts.fsync)?;
    let direct = open_direct(opts, &path, &file, 0);
    Ok(Writer {
        seq,
        file: Arc::new(file),
        path,
        offset: 0,
        capacity,
        buf,
        direct,
        failed: false,
    })
}

/// The segment at `path` (`file`) opened for direct writes after its first `end` bytes, when
/// `opts` asks for direct I/O and the file system takes it.
fn open_direct(opts: &WalOptions, path: &Path, file: &File, end: u64) -> Option<Direct> {
    if !(opts.direct_io && opts.fsync) {
        return None;
    }
    match Direct::open(path, file, end) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::debug!(segment = %path.display(), error = %e,
                "no direct I/O for this raft log segment; writing it through the page cache");
            None
        }
    }
}

/// Sets the file's length to at least `offset + len`, with the new part allocated and zero.
fn allocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
        Ok(()) => Ok(()),
        // A file system without fallocate: a sparse length does the same, a little slower.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let end = offset + len;
            if file.metadata()?.len() < end {
                file.set_len(end)?;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The records of one segment file, read in order until its end.
struct Scan {
    valid_end: u64,
    /// The first bad record's offset and why, if the segment ended in one.
    damage: Option<(u64, String)>,
}

/// A record's `len` and `crc`, from its first [`HEADER`] bytes.
fn header_fields(rec: &[u8]) -> (u32, u32) {
    let word = |at: usize| u32::from_le_bytes([rec[at], rec[at + 1], rec[at + 2], rec[at + 3]]);
    (word(0), word(4))
}

/// A record body's `kind` and `index` (a body is at least [`BODY_PREFIX`] bytes).
fn body_prefix(body: &[u8]) -> (u8, u64) {
    let mut idx = [0u8; 8];
    idx.copy_from_slice(&body[1..BODY_PREFIX]);
    (body[0], u64::from_le_bytes(idx))
}

fn scan_segment(path: &Path, file: &File, seq: u64, index: &mut Index) -> Result<Scan> {
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let mut header = [0u8; HEADER];
    loop {
        if offset + HEADER as u64 > len {
            return Ok(Scan {
                valid_end: offset,
                damage: None,
            });
        }
        reader.read_exact(&mut header).map_err(io_err(path))?;
        let (body_len, crc) = header_fields(&header);
        let body_len = u64::from(body_len);
        if body_len == 0 && crc == 0 {
            // The zeroes after the last record.
            return Ok(Scan {
                valid_end: offset,
                damage: None,
            });
        }
        let bad = |reason: &str| {
            Ok(Scan {
                valid_end: offset,
                damage: Some((offset, reason.to_string())),
            })
        };
        if body_len < BODY_PREFIX as u64 || offset + HEADER as u64 + body_len > len {
            return bad("a record's length runs past the segment");
        }
        let mut body = vec![0u8; body_len as usize];
        reader.read_exact(&mut body).map_err(io_err(path))?;
        if crc32c::crc32c(&body) != crc {
            return bad("checksum mismatch");
        }
        let (kind, rec_index) = body_prefix(&body);
        let payload = Bytes::from(body).slice(BODY_PREFIX..);
        let loc = Loc {
            seq,
            offset,
            len: (HEADER as u64 + body_len) as u32,
        };
        index
            .apply(kind, rec_index, payload, loc)
            .map_err(|e| WalError::Corrupt {
                path: path.to_path_buf(),
                offset,
                reason: e.to_string(),
            })?;
        offset += HEADER as u64 + body_len;
    }
}

impl Wal {
    /// Opens the log in `dir` (made if missing), reading every segment to index it.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut seqs = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err(dir))? {
            let item = item.map_err(io_err(dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TEMP_SUFFIX) {
                // A segment that was being made: never written to.
                fs::remove_file(item.path()).map_err(io_err(&item.path()))?;
            } else if let Some(hex) = name.strip_suffix(SUFFIX) {
                let seq = u64::from_str_radix(hex, 16).map_err(|_| WalError::Corrupt {
                    path: item.path(),
                    offset: 0,
                    reason: "not a segment name".into(),
                })?;
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut index = Index::default();
        let mut tail = None;
        let count = seqs.len();
        for (n, seq) in seqs.iter().copied().enumerate() {
            let path = segment_path(dir, seq);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let file = Arc::new(file);
            index.segments.insert(
                seq,
                Segment {
                    file: file.clone(),
                    path: path.clone(),
                    last_index: None,
                },
            );
            let last = n + 1 == count;
            if count > 8 && n % 8 == 0 {
                tracing::info!(segment = n + 1, of = count, "reading the raft log");
            }
            let scan = scan_segment(&path, &file, seq, &mut index)?;
            if let Some((offset, reason)) = scan.damage {
                if !last {
                    return Err(WalError::Corrupt {
                        path,
                        offset,
                        reason,
                    });
                }
                // A write that never completed, so never acknowledged: cut it off.
                tracing::warn!(segment = %path.display(), offset, %reason,
                    "the raft log ends in a torn write; dropping it");
            }
            if last {
                tail = Some((seq, file, path, scan.valid_end));
            }
        }
        let writer = match tail {
            Some((seq, file, path, end)) => {
                // Whatever lies past the last good record (a torn write) is zeroed, so that
                // records written over it can never run into an older one.
                let capacity = end.max(opts.segment_bytes).next_multiple_of(BLOCK as u64);
                file.set_len(end).map_err(io_err(&path))?;
                allocate(&file, end, capacity - end).map_err(io_err(&path))?;
                if opts.fsync {
                    file.sync_all().map_err(io_err(&path))?;
                }
                let direct = open_direct(&opts, &path, &file, end);
                Writer {
                    seq,
                    file,
                    path,
                    offset: end,
                    capacity,
                    buf: Vec::new(),
                    direct,
                    failed: false,
                }
            }
            None => {
                let w = start_segment(dir, 1, opts.segment_bytes, &opts, Vec::new())?;
                index.segments.insert(w.seq, w.segment());
                w
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
            writer: Mutex::new(writer),
            index: Mutex::new(index),
            on_sync: OnceLock::new(),
        })
    }

    /// Sets what is told the duration of every sync of a write (once; later calls are
    /// ignored).
    pub fn on_sync(&self, observer: SyncObserver) {
        let _ = self.on_sync.set(observer);
    }

    /// `fdatasync`s `file`, timed for the observer.
    fn sync_data(&self, file: &File) -> std::io::Result<()> {
        self.timed_sync(|| file.sync_data())
    }

    /// Runs `sync` (an `fdatasync`, or a write synced in the same call) and, if it succeeds,
    /// tells the observer how long it took.
    fn timed_sync<T>(&self, sync: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let start = Instant::now();
        let out = sync()?;
        if let Some(observe) = self.on_sync.get() {
            observe(start.elapsed());
        }
        Ok(out)
    }

    /// What the log holds.
    pub fn state(&self) -> WalState {
        let index = lock(&self.index);
        WalState {
            entries: index.shape.last().map(|l| (index.shape.first, l)),
            purged: index.shape.purged.map(|p| (p, index.purged_meta.clone())),
            committed: index.committed.clone(),
            segments: index.segments.len(),
        }
    }

    /// Writes `records` in order at the end of the log, synced (with
    /// [`WalOptions::fsync`]) when `sync` is set, before they take effect. An empty
    /// `records` with `sync` syncs what was written before.
    pub fn write(&self, records: &[Record<'_>], sync: bool) -> Result<()> {
        let mut w = lock(&self.writer);
        if w.failed {
            return Err(WalError::Failed);
        }
        let sync = sync && self.opts.fsync;
        if records.is_empty() {
            if sync {
                let path = w.path.clone();
                self.sync_data(&w.file).map_err(io_err(&path))?;
                if let Some(d) = w.direct.as_mut() {
                    d.synced();
                }
            }
            return Ok(());
        }
        // Entries must follow on from what the log holds, given the records before them:
        // checked in full before anything is written.
        let mut shape = lock(&self.index).shape;
        for r in records {
            let (kind, index, _) = r.parts();
            shape.step(kind, index)?;
        }
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        let mut ends = Vec::with_capacity(records.len());
        for r in records {
            r.encode(&mut buf)?;
            ends.push(buf.len());
        }
        if w.offset > 0 && w.offset + buf.len() as u64 > w.capacity {
            self.roll(&mut w, buf.len() as u64)?;
        }
        let at = w.offset;
        let written = self.write_at(&mut w, &buf, at, sync);
        if let Err(e) = written {
            // What reached the file is unknown: take no more writes (etcd stops on a failed
            // WAL sync too).
            w.failed = true;
            return Err(WalError::Io {
                path: w.path.clone(),
                source: e,
            });
        }
        w.offset = at + buf.len() as u64;
        w.capacity = w.capacity.max(w.offset);
        let seq = w.seq;
        {
            let mut index = lock(&self.index);
            let mut start = 0usize;
            for (r, end) in records.iter().zip(&ends) {
                let (kind, rec_index, payload) = r.parts();
                let loc = Loc {
                    seq,
                    offset: at + start as u64,
                    len: (end - start) as u32,
                };
                index.apply(kind, rec_index, Bytes::copy_from_slice(payload), loc)?;
                start = *end;
            }
        }
        if buf.capacity() <= KEEP_BUFFER_BYTES {
            w.buf = buf;
        }
        Ok(())
    }

    /// Writes `buf` at `at` in the writer's segment, synced with `sync`: directly where the
    /// segment was opened so, else through the page cache and `fdatasync`. A file system that
    /// refuses the direct write's alignment (`EINVAL`, nothing written) gets the page cache
    /// for the rest of the segment.
    fn write_at(&self, w: &mut Writer, buf: &[u8], at: u64, sync: bool) -> std::io::Result<()> {
        if let Some(direct) = w.direct.as_mut() {
            let written = if sync {
                self.timed_sync(|| direct.write(buf, at, true))
            } else {
                direct.write(buf, at, false)
            };
            match written {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(segment = %w.path.display(), error = %e,
                        "direct I/O refused; writing the raft log through the page cache");
                    w.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        w.file.write_all_at(buf, at)?;
        if sync {
            self.sync_data(&w.file)?;
        }
        Ok(())
    }

    /// Starts a new segment able to hold `need` bytes; the current one is synced first, so
    /// that no segment is ever read past a torn record.
    fn roll(&self, w: &mut Writer, need: u64) -> Result<()> {
        if self.opts.fsync {
            w.file.sync_data().map_err(io_err(&w.path))?;
        }
        // Made before the index is locked: readers go on meanwhile.
        let next = start_segment(
            &self.dir,
            w.seq + 1,
            need.max(self.opts.segment_bytes),
            &self.opts,
            std::mem::take(&mut w.buf),
        )?;
        lock(&self.index).segments.insert(next.seq, next.segment());
        tracing::debug!(segment = %next.path.display(), "new raft log segment");
        *w = next;
        Ok(())
    }

    /// Drops every entry from `from` on: the record is synced before it takes effect.
    pub fn truncate(&self, from: u64) -> Result<()> {
        self.write(&[Record::Truncate { from }], true)
    }

    /// Drops every entry up to `upto` and keeps `meta` as the purged id. Segments holding
    /// nothing newer are deleted, after the purge record is synced; they are closed when the
    /// returned [`Removed`] is dropped.
    pub fn purge(&self, upto: u64, meta: &[u8]) -> Result<Removed> {
        let doomed: Vec<u64> = {
            let w = lock(&self.writer);
            let index = lock(&self.index);
            index
                .segments
                .iter()
                .take_while(|(seq, s)| **seq != w.seq && s.last_index.is_none_or(|l| l <= upto))
                .map(|(seq, _)| *seq)
                .collect()
        };
        self.write(&[Record::Purge { upto, meta }], !doomed.is_empty())?;
        let removed: Vec<Segment> = {
            let mut index = lock(&self.index);
            doomed
                .iter()
                .filter_map(|seq| index.segments.remove(seq))
                .collect()
        };
        for s in &removed {
            match fs::remove_file(&s.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&s.path)(e)),
            }
        }
        Ok(Removed(removed))
    }

    /// The entries with index in `[from, to)` that the log holds, in order.
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<(u64, Bytes)>> {
        // Runs of records that lie next to each other in one file are read together.
        let mut runs: Vec<Run> = Vec::new();
        {
            let index = lock(&self.index);
            let Some(last) = index.shape.last() else {
                return Ok(Vec::new());
            };
            let first = index.shape.first;
            for i in from.max(first)..to.min(last + 1) {
                let loc = index.locs[(i - first) as usize];
                match runs.last_mut() {
                    Some(run) if run.extends_to(loc) => run.entries.push((i, loc)),
                    _ => {
                        let seg =
                            index
                                .segments
                                .get(&loc.seq)
                                .ok_or_else(|| WalError::Corrupt {
                                    path: segment_path(&self.dir, loc.seq),
                                    offset: loc.offset,
                                    reason: "the segment of a live entry is gone".into(),
                                })?;
                        runs.push(Run {
                            file: seg.file.clone(),
                            path: seg.path.clone(),
                            entries: vec![(i, loc)],
                        });
                    }
                }
            }
        }
        let mut out = Vec::new();
        for run in runs {
            run.read_into(&mut out)?;
        }
        Ok(out)
    }
}

/// Entries whose records lie next to each other in one segment, read with one `pread`.
struct Run {
    file: Arc<File>,
    path: PathBuf,
    entries: Vec<(u64, Loc)>,
}

impl Run {
    /// At most this many entries in one read.
    const MAX: usize = 4096;

    fn extends_to(&self, loc: Loc) -> bool {
        self.entries.len() < Self::MAX
            && self
                .entries
                .last()
                .is_some_and(|(_, p)| p.seq == loc.seq && p.offset + u64::from(p.len) == loc.offset)
    }

    /// Reads the run, checks every record and appends the entries to `out`.
    fn read_into(self, out: &mut Vec<(u64, Bytes)>) -> Result<()> {
        let (Some((_, first)), Some((_, last))) = (self.entries.first(), self.entries.last())
        else {
            return Ok(());
        };
        let start = first.offset;
        let mut buf = vec![0u8; (last.offset + u64::from(last.len) - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(io_err(&self.path))?;
        let buf = Bytes::from(buf);
        for (i, loc) in self.entries {
            let at = (loc.offset - start) as usize;
            let rec = buf.slice(at..at + loc.len as usize);
            let body = rec.slice(HEADER..);
            let (_, crc) = header_fields(&rec);
            if crc32c::crc32c(&body) != crc || body_prefix(&body) != (KIND_ENTRY, i) {
                return Err(WalError::Corrupt {
                    path: self.path,
                    offset: loc.offset,
                    reason: format!("entry {i} reads back wrong"),
                });
            }
            out.push((i, body.slice(BODY_PREFIX..)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
