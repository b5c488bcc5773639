//! The free-space guard (`--disk-free-reserve-bytes`): every write goes through the Raft log
//! and the engine, and a disk that fills under them leaves RocksDB read-only until a restart.
//! So writes are refused, with a clear error, while the data directory's file system has less
//! than the reserve free; reads go on, and writes are accepted again as soon as space is freed
//! (nothing to restart, nothing to disarm).
//!
//! Checking costs one `statvfs`; it is done at most every [`RECHECK`] while space is plentiful,
//! and on every write while it is short.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How long a "plenty of space" answer is trusted.
pub const RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Refused: the file system holds `available` bytes, under the `reserve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "etcdserver: no space left on device: the data directory's file system has {available} \
     bytes free, under --disk-free-reserve-bytes ({reserve}); free space and retry"
)]
pub struct DiskFull {
    pub available: u64,
    pub reserve: u64,
}

/// Where the free space is read from.
pub trait SpaceSource: Send + Sync {
    fn available(&self) -> io::Result<u64>;
}

/// The file system holding a directory (`statvfs`: blocks available to unprivileged users).
pub struct FileSystem(pub PathBuf);

impl SpaceSource for FileSystem {
    fn available(&self) -> io::Result<u64> {
        let s = rustix::fs::statvfs(&self.0)?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }
}

pub struct DiskGuard {
    source: Box<dyn SpaceSource>,
    reserve: u64,
    started: Instant,
    /// When the last check found enough space (ms since `started`, +1; 0: never).
    ok_at: AtomicU64,
    short: AtomicBool,
}

impl DiskGuard {
    /// A guard over `source` refusing writes under `reserve` free bytes (0: never refuses).
    pub fn new(source: Box<dyn SpaceSource>, reserve: u64) -> Arc<Self> {
        Arc::new(Self {
            source,
            reserve,
            started: Instant::now(),
            ok_at: AtomicU64::new(0),
            short: AtomicBool::new(false),
        })
    }

    /// A guard that never refuses (the memory engine, or a reserve of 0).
    pub fn disabled() -> Arc<Self> {
        struct Unlimited;
        impl SpaceSource for Unlimited {
            fn available(&self) -> io::Result<u64> {
                Ok(u64::MAX)
            }
        }
        Self::new(Box::new(Unlimited), 0)
    }

    /// True while the last check found less than the reserve.
    pub fn is_short(&self) -> bool {
        self.short.load(Ordering::Relaxed)
    }

    /// Ok while at least the reserve is free. A file system that cannot be asked counts as
    /// having space (the write then fails, or not, on its own).
    pub fn check(&self) -> Result<(), DiskFull> {
        if self.reserve == 0 {
            return Ok(());
        }
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let ok_at = self.ok_at.load(Ordering::Relaxed);
        if ok_at != 0 && now.saturating_sub(ok_at) < RECHECK.as_millis() as u64 {
            return Ok(());
        }
        let available = match self.source.available() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the data directory's free space");
                return Ok(());
            }
        };
        if available >= self.reserve {
            if self.short.swap(false, Ordering::Relaxed) {
                tracing::info!(available, "disk space is back: accepting writes again");
            }
            self.ok_at.store(now, Ordering::Relaxed);
            return Ok(());
        }
        if !self.short.swap(true, Ordering::Relaxed) {
            tracing::error!(
                available,
                reserve = self.reserve,
                "the data directory's disk is (nearly) full: refusing writes until space is freed"
            );
        }
        self.ok_at.store(0, Ordering::Relaxed);
        Err(DiskFull {
            available,
            reserve: self.reserve,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Arc<AtomicU64>);
    impl SpaceSource for Fake {
        fn available(&self) -> io::Result<u64> {
            Ok(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn refuses_under_the_reserve_and_recovers_once_space_is_freed() {
        let free = Arc::new(AtomicU64::new(10 << 20));
        let g = DiskGuard::new(Box::new(Fake(free.clone())), 1 << 20);
        assert_eq!(g.check(), Ok(()));
        // A short disk is seen on the next check after RECHECK at the latest.
        free.store(4096, Ordering::SeqCst);
        std::thread::sleep(RECHECK + std::time::Duration::from_millis(10));
        let e = g.check().expect_err("short");
        assert_eq!(
            e,
            DiskFull {
                available: 4096,
                reserve: 1 << 20
            }
        );
        assert!(e.to_string().contains("--disk-free-reserve-bytes"), "{e}");
        assert!(g.is_short());
        // While short, every write checks again: freeing space is seen at once.
        assert!(g.check().is_err());
        free.store(2 << 20, Ordering::SeqCst);
        assert_eq!(g.check(), Ok(()));
        assert!(!g.is_short());
    }

    #[test]
    fn a_zero_reserve_never_refuses() {
        let g = DiskGuard::new(Box::new(Fake(Arc::new(AtomicU64::new(0)))), 0);
        assert_eq!(g.check(), Ok(()));
        assert_eq!(DiskGuard::disabled().check(), Ok(()));
    }

    #[test]
    fn a_real_directory_has_space() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(FileSystem(dir.path().to_path_buf()).available()? > 0);
        Ok(())
    }
}
