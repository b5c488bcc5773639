//! Backup snapshots: one self-checking file holding every entry of the state-machine tables.
//!
//! The file is what `Maintenance.Snapshot` streams (and so what `etcdctl snapshot save`
//! writes) and what `metastore snapshot restore` reads. It is *not* a bbolt file: etcd's
//! `etcdctl snapshot status/restore` cannot read it.
//!
//! # Format, version 1
//! Integers are little endian.
//! ```text
//! header, 48 bytes
//!    0  magic             8 bytes  "MSTSNAP\n"
//!    8  format version    u32      1
//!   12  storage format    u8       the record format of the kv table (0: unknown)
//!   13  reserved          3 bytes  zero
//!   16  revision          i64      the store's current revision (display only)
//!   24  compact revision  i64      the store's compacted revision (display only)
//!   32  body length       u64      bytes before the checksum (header, records, padding)
//!   40  entries           u64      entries of all tables together
//! records, one table after the other
//!   0x01 table            u8 name length, name   the entries up to the next table record
//!                                                belong to this table (each table once)
//!   0x02 entry            u32 key length, u32 value length, key, value
//!                                                keys strictly ascending within a table
//!   0x03 end
//! padding                 zero bytes up to a multiple of 512
//! checksum                SHA-256 of the body (everything above), 32 bytes
//! ```
//!
//! Why the padding: `etcdctl snapshot save` (3.4 and 3.5) only accepts a stream whose length
//! is 32 more than a multiple of 512 (a bbolt file of whole pages plus its SHA-256), and the
//! Snapshot RPC sends the body in chunks and the checksum as its last message, as etcd does.
//! So the stream etcdctl saves is this file byte for byte.
//!
//! Only the tables in [`STATE_MACHINE_TABLES`] are written, and only they are replaced by
//! [`load`]: tables added later for node-local state (a Raft log) are never part of a
//! snapshot. The writer sizes the snapshot first (one extra pass over the engine snapshot, no
//! copy), so the header knows the body length and the RPC can report `remaining_bytes`
//! exactly. Writing is deterministic: the same data gives the same file.
//!
//! # Reading
//! [`verify`] and [`load`] parse the file as it streams by and check the checksum at the end.
//! Any damage is a typed [`SnapshotError`], never a panic: a file that ends early is
//! [`Truncated`](SnapshotError::Truncated); one whose bytes changed is
//! [`Checksum`](SnapshotError::Checksum) (when the damage also breaks the structure, the rest
//! of the file is read to tell corruption from a malformed but intact file).

use std::io::{self, BufReader, BufWriter, Read, Write};

use sha2::{Digest, Sha256};

use super::engine::{Engine, Snapshot, Table, WriteBatch};
use super::{Error, Result};

/// The tables a snapshot holds: the state machine (MVCC key space, leases, store metadata).
pub const STATE_MACHINE_TABLES: [Table; 5] = [
    Table::Kv,
    Table::Rev,
    Table::Meta,
    Table::Lease,
    Table::Auth,
];
/// State-machine tables written only when they hold something: a store that never used
/// authentication gives the same file as before the `auth` table existed, which older
/// binaries still read. Loading clears them like every state-machine table.
const OPTIONAL_TABLES: [Table; 1] = [Table::Auth];

/// The state-machine tables `snap` contributes to a file, in file order.
fn written_tables(snap: &dyn Snapshot) -> Result<Vec<Table>> {
    let mut out = Vec::new();
    for table in STATE_MACHINE_TABLES {
        if OPTIONAL_TABLES.contains(&table) {
            let mut it = snap.iter(table);
            it.seek(&[]);
            let empty = !it.valid();
            it.status()?;
            if empty {
                continue;
            }
        }
        out.push(table);
    }
    Ok(out)
}
/// The file format version this binary writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The first bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"MSTSNAP\n";
/// The body is padded to a multiple of this (see the module docs).
pub const ALIGN: u64 = 512;
/// The SHA-256 trailer's length.
pub const CHECKSUM_LEN: usize = 32;

const HEADER_LEN: u64 = 48;
const TAG_TABLE: u8 = 1;
const TAG_ENTRY: u8 = 2;
const TAG_END: u8 = 3;
/// Record overhead of an entry: tag, key length, value length.
const ENTRY_OVERHEAD: u64 = 9;
/// [`load`] writes batches of about this many bytes.
const LOAD_BATCH_BYTES: usize = 4 << 20;
/// Progress callbacks fire after about this many bytes.
const PROGRESS_STEP: u64 = 1 << 20;

// Store metadata shown in the header. The names belong to `mvcc::store` (the storage layer
// does not depend on it); a test checks that they agree.
const META_CURRENT_REV: &[u8] = b"current_rev";
const META_COMPACT_REV: &[u8] = b"compact_scheduled";
const META_STORAGE_FORMAT: &[u8] = b"storage_format";

/// What is wrong with a snapshot file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(
        "not a MetaStore snapshot (bad magic bytes); etcd's own snapshot files (bbolt) \
         cannot be restored by MetaStore"
    )]
    NotASnapshot,
    #[error(
        "snapshot format version {found} is not supported (this binary reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("snapshot is truncated: it ends early (inside the item at byte {offset})")]
    Truncated { offset: u64 },
    #[error("snapshot checksum mismatch: the file is corrupted (SHA-256 recorded {recorded}, computed {computed})")]
    Checksum { recorded: String, computed: String },
    #[error("malformed snapshot at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("snapshot I/O: {0}")]
    Io(#[source] io::Error),
}

/// The header of a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    /// The storage (record) format of the kv table; 0 when the store did not record it.
    pub storage_format: u8,
    /// The store's current revision when the snapshot was taken.
    pub revision: i64,
    /// The store's compacted revision when the snapshot was taken.
    pub compact_revision: i64,
    /// Bytes before the checksum.
    pub body_len: u64,
    pub entries: u64,
}

impl Header {
    /// The file's full length (body and checksum).
    pub fn file_len(&self) -> u64 {
        self.body_len + CHECKSUM_LEN as u64
    }
}

/// Entries and bytes (keys and values) of one table in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableInfo {
    pub table: Table,
    pub entries: u64,
    pub bytes: u64,
}

/// A snapshot written, verified or loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub header: Header,
    /// Per table, in file order.
    pub tables: Vec<TableInfo>,
    /// The file's SHA-256 trailer.
    pub sha256: [u8; CHECKSUM_LEN],
}

impl SnapshotInfo {
    pub fn entries(&self, table: Table) -> u64 {
        self.tables
            .iter()
            .find(|t| t.table == table)
            .map_or(0, |t| t.entries)
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

fn malformed(offset: u64, reason: impl Into<String>) -> Error {
    Error::Snapshot(SnapshotError::Malformed {
        offset,
        reason: reason.into(),
    })
}

fn io_err(e: io::Error) -> Error {
    Error::Snapshot(SnapshotError::Io(e))
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// A planned snapshot of one engine [`Snapshot`]: the header is known (the tables were sized)
/// before anything is written.
pub struct SnapshotWriter<'a> {
    snap: &'a dyn Snapshot,
    header: Header,
}

impl<'a> SnapshotWriter<'a> {
    /// Reads the header fields and sizes every state-machine table (one pass over `snap`).
    pub fn new(snap: &'a dyn Snapshot) -> Result<Self> {
        let mut len = HEADER_LEN;
        let mut entries = 0u64;
        for table in written_tables(snap)? {
            len += 2 + table.name().len() as u64;
            for_each(snap, table, |k, v| {
                entries += 1;
                len += ENTRY_OVERHEAD + k.len() as u64 + v.len() as u64;
                Ok(())
            })?;
        }
        len += 1; // the end record
        let meta_i64 = |key| -> Result<i64> {
            Ok(match snap.get(Table::Meta, key)? {
                Some(v) => <[u8; 8]>::try_from(v.as_slice())
                    .map(i64::from_be_bytes)
                    .map_err(|_| Error::Engine(format!("meta {:?} is not an i64", key)))?,
                None => 0,
            })
        };
        let header = Header {
            format_version: FORMAT_VERSION,
            storage_format: snap
                .get(Table::Meta, META_STORAGE_FORMAT)?
                .and_then(|v| v.first().copied())
                .unwrap_or(0),
            revision: meta_i64(META_CURRENT_REV)?.max(1),
            compact_revision: meta_i64(META_COMPACT_REV)?,
            body_len: len.div_ceil(ALIGN) * ALIGN,
            entries,
        };
        Ok(Self { snap, header })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Streams the file to `out` (buffered here; `out` need not be). `progress` gets the bytes
    /// written so far, about every MiB and at the end.
    pub fn write_to(
        self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SnapshotInfo> {
        let mut w = HashingWriter {
            out: BufWriter::with_capacity(64 << 10, out),
            hasher: Sha256::new(),
            written: 0,
            reported: 0,
            progress,
        };
        let h = &self.header;
        let mut head = Vec::with_capacity(HEADER_LEN as usize);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&h.format_version.to_le_bytes());
        head.push(h.storage_format);
        head.extend_from_slice(&[0; 3]);
        head.extend_from_slice(&h.revision.to_le_bytes());
        head.extend_from_slice(&h.compact_revision.to_le_bytes());
        head.extend_from_slice(&h.body_len.to_le_bytes());
        head.extend_from_slice(&h.entries.to_le_bytes());
        w.put(&head)?;

        let mut tables = Vec::new();
        for table in written_tables(self.snap)? {
            let name = table.name().as_bytes();
            w.put(&[TAG_TABLE, name.len() as u8])?;
            w.put(name)?;
            let mut info = TableInfo {
                table,
                entries: 0,
                bytes: 0,
            };
            for_each(self.snap, table, |k, v| {
                let len = |b: &[u8]| {
                    u32::try_from(b.len())
                        .map_err(|_| Error::Engine(format!("a {}-byte entry", b.len())))
                };
                let mut rec = [0u8; ENTRY_OVERHEAD as usize];
                rec[0] = TAG_ENTRY;
                rec[1..5].copy_from_slice(&len(k)?.to_le_bytes());
                rec[5..9].copy_from_slice(&len(v)?.to_le_bytes());
                w.put(&rec)?;
                w.put(k)?;
                w.put(v)?;
                info.entries += 1;
                info.bytes += (k.len() + v.len()) as u64;
                Ok(())
            })?;
            tables.push(info);
        }
        w.put(&[TAG_END])?;
        let total: u64 = tables.iter().map(|t| t.entries).sum();
        let pad = h.body_len.checked_sub(w.written).filter(|p| *p < ALIGN);
        let (Some(pad), true) = (pad, total == h.entries) else {
            // A snapshot is immutable, so two passes over it must agree.
            return Err(Error::Engine(
                "the engine snapshot changed between sizing and writing".into(),
            ));
        };
        w.put(&vec![0u8; pad as usize])?;
        let sha: [u8; CHECKSUM_LEN] = w.hasher.finalize_reset().into();
        w.out.write_all(&sha).map_err(io_err)?;
        w.out.flush().map_err(io_err)?;
        (w.progress)(h.file_len());
        Ok(SnapshotInfo {
            header: self.header,
            tables,
            sha256: sha,
        })
    }
}

/// Writes a snapshot of `snap` to `out`: [`SnapshotWriter::new`] then
/// [`write_to`](SnapshotWriter::write_to). Streams; memory use does not depend on the data.
pub fn write_snapshot(
    snap: &dyn Snapshot,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<SnapshotInfo> {
    SnapshotWriter::new(snap)?.write_to(out, progress)
}

/// One message of the Snapshot RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    /// Body bytes still to come after this chunk; 0 for the last body chunk and for the
    /// checksum (etcd's `remaining_bytes`).
    pub remaining: u64,
}

/// Writes a snapshot of `snap` the way etcd's Snapshot RPC sends one: the body in chunks of
/// `chunk_size` bytes (the last one shorter), each with the body bytes remaining after it,
/// then the 32-byte checksum alone with `remaining: 0`. The chunks, concatenated, are the
/// snapshot file. Stops at the first error `send` returns.
pub fn write_chunks(
    snap: &dyn Snapshot,
    chunk_size: usize,
    send: &mut dyn FnMut(Chunk) -> io::Result<()>,
) -> Result<SnapshotInfo> {
    let writer = SnapshotWriter::new(snap)?;
    let mut chunker = Chunker {
        body_len: writer.header().body_len,
        chunk_size: chunk_size.max(1),
        written: 0,
        buf: Vec::with_capacity(chunk_size),
        send,
    };
    let info = writer.write_to(&mut chunker, &mut |_| {})?;
    if chunker.buf.len() != CHECKSUM_LEN {
        return Err(Error::Engine("snapshot body length mismatch".into()));
    }
    let data = std::mem::take(&mut chunker.buf);
    (chunker.send)(Chunk { data, remaining: 0 }).map_err(io_err)?;
    Ok(info)
}

/// Cuts the written stream into [`Chunk`]s; a chunk never spans the end of the body, and
/// whatever follows the body (the checksum) is kept for the caller.
struct Chunker<'s> {
    body_len: u64,
    chunk_size: usize,
    written: u64,
    buf: Vec<u8>,
    send: &'s mut dyn FnMut(Chunk) -> io::Result<()>,
}

impl Write for Chunker<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let in_body = self.body_len.saturating_sub(self.written);
        let n = if in_body == 0 {
            data.len()
        } else {
            data.len()
                .min(self.chunk_size - self.buf.len())
                .min(usize::try_from(in_body).unwrap_or(usize::MAX))
        };
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if in_body > 0 && (self.buf.len() == self.chunk_size || self.written == self.body_len) {
            let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size));
            (self.send)(Chunk {
                data,
                remaining: self.body_len - self.written,
            })?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct HashingWriter<'p, W: Write> {
    out: BufWriter<W>,
    hasher: Sha256,
    written: u64,
    reported: u64,
    progress: &'p mut dyn FnMut(u64),
}

impl<W: Write> HashingWriter<'_, W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).map_err(io_err)?;
        self.hasher.update(b);
        self.written += b.len() as u64;
        if self.written - self.reported >= PROGRESS_STEP {
            self.reported = self.written;
            (self.progress)(self.written);
        }
        Ok(())
    }
}

fn for_each(
    snap: &dyn Snapshot,
    table: Table,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut it = snap.iter(table);
    it.seek(&[]);
    while it.valid() {
        f(it.key(), it.value())?;
        it.next();
    }
    it.status()
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Checks a snapshot file end to end (structure and checksum) without loading it.
pub fn verify(input: impl Read) -> Result<SnapshotInfo> {
    verify_with_progress(input, &mut |_| {})
}

/// [`verify`], reporting the bytes read so far about every MiB.
pub fn verify_with_progress(
    input: impl Read,
    progress: &mut dyn FnMut(u64),
) -> Result<SnapshotInfo> {
    read_snapshot(input, &mut Verify, progress)
}

/// Replaces the whole content of the state-machine tables of `engine` with the snapshot's, in
/// write batches of a few MiB, then syncs. Other tables are not touched. `progress` gets the
/// bytes read so far about every MiB.
///
/// The tables are cleared once the header has been read, and entries are written as they
/// arrive; the checksum is checked at the end, and only an `Ok` means the content can be
/// trusted.
///
/// # Crash semantics
/// Loading is not atomic: after an error or a crash, the tables hold part of the snapshot
/// (or nothing). A caller must either load into a fresh data directory and move it into
/// place only once `load` returned `Ok` (what `metastore snapshot restore` does: a temporary
/// directory renamed at the end), or record an "install in progress" mark *outside* the
/// replaced tables before loading and clear it after, redoing the install when it finds the
/// mark at start-up (the shape of a Raft snapshot install).
pub fn load(
    input: impl Read,
    engine: &dyn Engine,
    progress: &mut dyn FnMut(u64),
) -> Result<SnapshotInfo> {
    let mut sink = Load {
        engine,
        batch: WriteBatch::new(),
    };
    let info = read_snapshot(input, &mut sink, progress)?;
    engine.write(sink.batch, false)?;
    engine.sync()?;
    Ok(info)
}

/// Where parsed entries go.
trait Sink {
    /// The header was read and is sound; entries follow.
    fn begin(&mut self, header: &Header) -> Result<()>;
    fn entry(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) -> Result<()>;
}

struct Verify;

impl Sink for Verify {
    fn begin(&mut self, _: &Header) -> Result<()> {
        Ok(())
    }
    fn entry(&mut self, _: Table, _: Vec<u8>, _: Vec<u8>) -> Result<()> {
        Ok(())
    }
}

struct Load<'e> {
    engine: &'e dyn Engine,
    batch: WriteBatch,
}

impl Sink for Load<'_> {
    fn begin(&mut self, _: &Header) -> Result<()> {
        let mut clear = WriteBatch::new();
        for t in STATE_MACHINE_TABLES {
            clear.clear_table(t);
        }
        self.engine.write(clear, false)
    }

    fn entry(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.batch.put(table, key, value);
        if self.batch.size_bytes() >= LOAD_BATCH_BYTES {
            self.engine.write(std::mem::take(&mut self.batch), false)?;
        }
        Ok(())
    }
}

/// Reads the input, hashing what the body consists of.
struct Reader<'p, R: Read> {
    inner: BufReader<R>,
    hasher: Sha256,
    pos: u64,
    reported: u64,
    progress: &'p mut dyn FnMut(u64),
}

impl<R: Read> Reader<'_, R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| self.eof(e))?;
        self.consumed(buf);
        Ok(())
    }

    /// Reads `len` bytes, growing the buffer as data arrives (a corrupted length cannot make
    /// it allocate more than the input holds).
    fn bytes(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(len.min(64 << 10));
        (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut v)
            .map_err(io_err)?;
        if v.len() < len {
            return Err(Error::Snapshot(SnapshotError::Truncated {
                offset: self.pos,
            }));
        }
        self.consumed(&v);
        Ok(v)
    }

    fn consumed(&mut self, buf: &[u8]) {
        self.hasher.update(buf);
        self.pos += buf.len() as u64;
        if self.pos - self.reported >= PROGRESS_STEP {
            self.reported = self.pos;
            (self.progress)(self.pos);
        }
    }

    fn eof(&self, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Snapshot(SnapshotError::Truncated { offset: self.pos })
        } else {
            io_err(e)
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        self.fill(&mut a)?;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// After a structural error in the body: reads the rest of the input to decide whether
    /// the file was damaged (the checksum does not match, or the file is too short to hold
    /// one) or is intact but malformed (then `err` stands).
    fn explain(mut self, err: Error) -> Error {
        let mut tail: Vec<u8> = Vec::with_capacity(2 * CHECKSUM_LEN);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.inner.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > CHECKSUM_LEN {
                        let spill = tail.len() - CHECKSUM_LEN;
                        self.hasher.update(&tail[..spill]);
                        tail.drain(..spill);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return io_err(e),
            }
        }
        if tail.len() < CHECKSUM_LEN {
            return Error::Snapshot(SnapshotError::Truncated { offset: self.pos });
        }
        let computed: [u8; CHECKSUM_LEN] = self.hasher.finalize().into();
        if computed[..] != tail[..] {
            return Error::Snapshot(SnapshotError::Checksum {
                recorded: hex::encode(&tail),
                computed: hex::encode(computed),
            });
        }
        err
    }
}

fn read_snapshot<R: Read>(
    input: R,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64),
) -> Result<SnapshotInfo> {
    let mut r = Reader {
        inner: BufReader::with_capacity(64 << 10, input),
        hasher: Sha256::new(),
        pos: 0,
        reported: 0,
        progress,
    };
    if r.array::<8>()? != MAGIC {
        return Err(Error::Snapshot(SnapshotError::NotASnapshot));
    }
    let format_version = r.u32()?;
    if format_version != FORMAT_VERSION {
        return Err(Error::Snapshot(SnapshotError::UnsupportedVersion {
            found: format_version,
            supported: FORMAT_VERSION,
        }));
    }
    let body = match read_body(&mut r, format_version, sink) {
        Ok(b) => b,
        // Damage shows up as a structural error more often than not: find out which it is.
        Err(e @ Error::Snapshot(SnapshotError::Malformed { .. })) => return Err(r.explain(e)),
        Err(e) => return Err(e),
    };
    let (header, tables) = body;
    let computed: [u8; CHECKSUM_LEN] = std::mem::take(&mut r.hasher).finalize().into();
    let mut recorded = [0u8; CHECKSUM_LEN];
    r.inner.read_exact(&mut recorded).map_err(|e| r.eof(e))?;
    if recorded != computed {
        return Err(Error::Snapshot(SnapshotError::Checksum {
            recorded: hex::encode(recorded),
            computed: hex::encode(computed),
        }));
    }
    let mut extra = [0u8; 1];
    if r.inner.read(&mut extra).map_err(io_err)? != 0 {
        return Err(malformed(header.file_len(), "data after the checksum"));
    }
    (r.progress)(header.file_len());
    Ok(SnapshotInfo {
        header,
        tables,
        sha256: recorded,
    })
}

fn read_body<R: Read>(
    r: &mut Reader<'_, R>,
    format_version: u32,
    sink: &mut dyn Sink,
) -> Result<(Header, Vec<TableInfo>)> {
    let storage_format = r.u8()?;
    if r.array::<3>()? != [0; 3] {
        return Err(malformed(13, "reserved header bytes are not zero"));
    }
    let header = Header {
        format_version,
        storage_format,
        revision: r.i64()?,
        compact_revision: r.i64()?,
        body_len: r.u64()?,
        entries: r.u64()?,
    };
    if !header.body_len.is_multiple_of(ALIGN) || header.body_len < HEADER_LEN {
        return Err(malformed(32, "bad body length"));
    }
    sink.begin(&header)?;

    let mut tables: Vec<TableInfo> = Vec::new();
    let mut last_key: Option<Vec<u8>> = None;
    loop {
        let at = r.pos;
        match r.u8()? {
            TAG_TABLE => {
                let len = r.u8()?;
                if r.pos + len as u64 > header.body_len {
                    return Err(malformed(at, "table name runs past the body length"));
                }
                let name = r.bytes(len as usize)?;
                let table = STATE_MACHINE_TABLES
                    .into_iter()
                    .find(|t| t.name().as_bytes() == name.as_slice())
                    .ok_or_else(|| {
                        malformed(
                            at,
                            format!(
                                "table {:?} is not a state-machine table of this binary",
                                String::from_utf8_lossy(&name)
                            ),
                        )
                    })?;
                if tables.iter().any(|t| t.table == table) {
                    return Err(malformed(
                        at,
                        format!("table {} appears twice", table.name()),
                    ));
                }
                tables.push(TableInfo {
                    table,
                    entries: 0,
                    bytes: 0,
                });
                last_key = None;
            }
            TAG_ENTRY => {
                let klen = r.u32()? as u64;
                let vlen = r.u32()? as u64;
                if r.pos + klen + vlen > header.body_len {
                    return Err(malformed(at, "entry runs past the body length"));
                }
                let Some(info) = tables.last_mut() else {
                    return Err(malformed(at, "entry before any table record"));
                };
                let key = r.bytes(klen as usize)?;
                if last_key.as_ref().is_some_and(|last| *last >= key) {
                    return Err(malformed(at, "keys out of order"));
                }
                let value = r.bytes(vlen as usize)?;
                info.entries += 1;
                info.bytes += klen + vlen;
                last_key = Some(key.clone());
                sink.entry(info.table, key, value)?;
            }
            TAG_END => break,
            tag => return Err(malformed(at, format!("unknown record tag {tag:#04x}"))),
        }
    }
    let at = r.pos;
    let pad = header
        .body_len
        .checked_sub(at)
        .filter(|p| *p < ALIGN)
        .ok_or_else(|| malformed(at, "records do not end where the header says"))?;
    if r.bytes(pad as usize)?.iter().any(|b| *b != 0) {
        return Err(malformed(at, "padding is not zero"));
    }
    let total: u64 = tables.iter().map(|t| t.entries).sum();
    if total != header.entries {
        return Err(malformed(
            40,
            format!("header says {} entries, found {total}", header.entries),
        ));
    }
    Ok((header, tables))
}

#[cfg(test)]
mod tests;
