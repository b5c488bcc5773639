//! [`Direct`]: the log's writes with direct I/O, each synced one in the same system call.
//!
//! A buffered write and `fdatasync` copy the records into the page cache, then find the dirty
//! pages again, write them back and flush the disk's cache. A direct write (`O_DIRECT`) goes
//! from the buffer to the disk, and `RWF_DSYNC` on it asks for the flush in the same call: on
//! a virtual disk (virtio, ext4) a lone process's synced write of ~2.4 KB took 82-127 µs that
//! way against 117-162 µs (p50) with `pwrite` and `fdatasync` (docs/PERFORMANCE.md, session
//! 49). PostgreSQL offers the same for its log (`wal_sync_method = open_datasync` with direct
//! I/O).
//!
//! A direct write must start and end on block boundaries, from memory aligned the same way.
//! The log's records do not: each write covers the blocks from the one the last records end
//! in up to the end of its own records, rounded up with zeroes (a segment is zeroes past its
//! records already). The bytes of that first, partial block are kept here (`tail`) and written
//! again in front of the new records. The page cache writes back whole 4 KiB pages the same
//! way, so a torn write puts no more of the synced records at risk than a buffered one does.
//! Segments are made a multiple of [`BLOCK`] long, so a rounded-up write never grows one.
//!
//! `RWF_DSYNC` on a write that only overwrites written blocks may make just that write
//! durable (a FUA write, on a disk that has them) without flushing the disk's cache, where an
//! earlier unsynced write may still be. The log's unsynced writes are rare (a purge record that
//! deletes no segment, the records a move from RocksDB writes before its one sync), so the
//! first synced write after one is a plain direct write and a whole `fdatasync`.
//!
//! Reads go through the segment's ordinary handle and the page cache. The kernel drops the
//! cached pages of a direct write's range after the write, waiting for a read of them still in
//! flight; only a dirty or memory-mapped page could stay behind stale, and the log neither
//! maps a segment nor, once a segment is open for direct writes, writes it through the cache
//! (a refused direct write switches the segment over for good, and nothing was written).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rustix::io::ReadWriteFlags;

/// The alignment of a direct write's offset, length and memory: a multiple of every logical
/// block size a disk reports (512 B or 4 KiB), and the page size.
pub(super) const BLOCK: usize = 4096;

/// A write buffer larger than this (one write of a large batch) is not kept for the next.
const KEEP_OUT_BYTES: usize = 8 << 20;

/// A segment opened for direct writes (see the module docs).
#[derive(Debug)]
pub(super) struct Direct {
    file: File,
    /// Where the records written so far end.
    end: u64,
    /// The bytes of the segment's last partial block, from the block's start to where the
    /// records end (`end % BLOCK` of them).
    tail: Vec<u8>,
    /// The write's buffer, with a block's room to start at an aligned address.
    out: Vec<u8>,
    /// A write since the last sync was not synced.
    unsynced: bool,
}

impl Direct {
    /// Opens the segment at `path` for direct writes after its first `end` bytes, reading its
    /// last partial block through `file` (the segment's ordinary handle). Fails where the file
    /// system refuses `O_DIRECT` (the log then writes through the page cache).
    pub(super) fn open(path: &Path, file: &File, end: u64) -> io::Result<Self> {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let keep = (end % BLOCK as u64) as usize;
        let mut tail = vec![0; keep];
        file.read_exact_at(&mut tail, end - keep as u64)?;
        Ok(Self {
            file: direct,
            end,
            tail,
            out: Vec::new(),
            unsynced: false,
        })
    }

    /// Writes `records` at `at`, which must be where the records written so far end (else
    /// `InvalidInput`, and nothing is written), in one direct write of whole blocks; with
    /// `sync`, the same call returns once they are on stable storage (`RWF_DSYNC`). `EINVAL`
    /// means the file system or the disk refused the alignment and nothing was written.
    pub(super) fn write(&mut self, records: &[u8], at: u64, sync: bool) -> io::Result<()> {
        if at != self.end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a direct write at {at} where the segment's records end at {}",
                    self.end
                ),
            ));
        }
        let start = at - self.tail.len() as u64;
        let len = self.tail.len() + records.len();
        let padded = len.next_multiple_of(BLOCK);
        // Every byte of the aligned part is written below: the buffer is not zeroed first
        // (only the room it grows by is).
        self.out.resize(padded + BLOCK, 0);
        let skip = self.out.as_ptr().align_offset(BLOCK);
        let blocks = self
            .out
            .get_mut(skip..skip + padded)
            .ok_or_else(|| io::Error::other("cannot align a direct write's buffer"))?;
        blocks[..self.tail.len()].copy_from_slice(&self.tail);
        blocks[self.tail.len()..len].copy_from_slice(records);
        blocks[len..].fill(0);
        // `RWF_DSYNC` on a write that only overwrites written blocks may make just that
        // write durable (a FUA write, where the disk has it) and not flush the disk's cache,
        // which earlier unsynced writes may still be in: after one, the sync is a whole
        // `fdatasync`.
        let dsync = sync && !self.unsynced;
        let flags = if dsync {
            ReadWriteFlags::DSYNC
        } else {
            ReadWriteFlags::empty()
        };
        let n = rustix::io::pwritev2(&self.file, &[IoSlice::new(blocks)], start, flags)?;
        if n != padded {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("a direct write of {padded} bytes wrote {n}"),
            ));
        }
        if sync && !dsync {
            self.file.sync_data()?;
        }
        self.unsynced = !sync;
        self.end += records.len() as u64;
        let keep = len % BLOCK;
        self.tail.clear();
        self.tail.extend_from_slice(&blocks[len - keep..len]);
        if self.out.capacity() > KEEP_OUT_BYTES {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Records that the segment was synced as a whole (`fdatasync`) since the last write.
    pub(super) fn synced(&mut self) {
        self.unsynced = false;
    }

    /// Whether a write since the last sync was not synced (the next synced write then
    /// syncs the whole file).
    #[cfg(test)]
    pub(super) fn has_unsynced(&self) -> bool {
        self.unsynced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` zero bytes whose first `prefix.len()` bytes are `prefix`.
    fn file_with(path: &Path, prefix: &[u8], len: u64) -> anyhow::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.set_len(len)?;
        f.write_all_at(prefix, 0)?;
        f.sync_all()?;
        Ok(f)
    }

    #[test]
    fn writes_of_any_size_from_any_offset_land_exactly_as_written() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("segment");
        let len = 64 << 10;
        // Records already end mid-block: the first direct write must keep them.
        let mut expected: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let file = file_with(&path, &expected, len)?;
        let mut direct = Direct::open(&path, &file, expected.len() as u64)?;
        let sizes = [1usize, 300, 2795, 4096, 5000, 9000, 1, 4095, 2];
        for (n, size) in sizes.into_iter().enumerate() {
            let records: Vec<u8> = (0..size).map(|i| (i * 7 + n) as u8 | 1).collect();
            direct.write(&records, expected.len() as u64, n % 2 == 0)?;
            expected.extend_from_slice(&records);
            // Readable at once through the ordinary handle (whose page cache the direct
            // write bypassed).
            let mut back = vec![0; expected.len()];
            file.read_exact_at(&mut back, 0)?;
            assert!(back == expected, "after write {n} ({size} bytes)");
        }
        // Whole blocks were written, and nothing past the records but zeroes; the file kept
        // its length.
        let whole = std::fs::read(&path)?;
        assert_eq!(whole.len() as u64, len);
        assert_eq!(&whole[..expected.len()], &expected[..]);
        assert!(whole[expected.len()..].iter().all(|b| *b == 0));

        // Opened again where the records end, it carries on from there.
        drop(direct);
        let mut again = Direct::open(&path, &file, expected.len() as u64)?;
        again.write(b"more", expected.len() as u64, true)?;
        expected.extend_from_slice(b"more");
        assert_eq!(&std::fs::read(&path)?[..expected.len()], &expected[..]);
        Ok(())
    }

    #[test]
    fn a_write_where_the_records_do_not_end_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("segment");
        let file = file_with(&path, b"abc", 16 << 10)?;
        let mut direct = Direct::open(&path, &file, 3)?;
        // 4099 is not where the records end: the kept block would be written at the wrong
        // place, so nothing is written.
        let err = direct
            .write(b"xyz", 4099, true)
            .err()
            .ok_or_else(|| anyhow::anyhow!("a misplaced write was taken"))?;
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(&std::fs::read(&path)?[..8], b"abc\0\0\0\0\0");
        direct.write(b"xyz", 3, true)?;
        assert_eq!(&std::fs::read(&path)?[..8], b"abcxyz\0\0");
        Ok(())
    }

    #[test]
    fn a_synced_write_after_an_unsynced_one_syncs_the_whole_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("segment");
        let file = file_with(&path, b"", 64 << 10)?;
        let mut direct = Direct::open(&path, &file, 0)?;
        assert!(!direct.has_unsynced());
        // Spans a block boundary: the next write rewrites only the second block.
        direct.write(&[1; 5000], 0, false)?;
        assert!(direct.has_unsynced());
        direct.write(&[2; 100], 5000, true)?;
        assert!(
            !direct.has_unsynced(),
            "the synced write synced the first one too"
        );
        direct.write(&[3; 10], 5100, false)?;
        direct.synced();
        assert!(!direct.has_unsynced());
        let whole = std::fs::read(&path)?;
        assert!(whole[..5000].iter().all(|b| *b == 1));
        assert!(whole[5000..5100].iter().all(|b| *b == 2));
        assert!(whole[5100..5110].iter().all(|b| *b == 3));
        assert!(whole[5110..].iter().all(|b| *b == 0));
        Ok(())
    }
}
