//! glibc's allocator, set for a server's buffers: fixed thresholds for when a block gets a
//! mapping of its own and when a heap's free top goes back to the kernel.
//!
//! glibc serves an allocation of at least `M_MMAP_THRESHOLD` bytes with a fresh `mmap`, and
//! returns a heap's free top to the kernel once it exceeds `M_TRIM_THRESHOLD` (`madvise` on
//! the heaps of the threads' arenas). Both start at 128 KiB and move with the program: each
//! time a mapped block is freed, the thresholds rise to its size and twice its size. A
//! server's blocking threads each encode a large Range result into a buffer of up to
//! [`KEEP_BYTES`](crate::server::range_stream::KEEP_BYTES) and free it once it is sent; with
//! the moving thresholds the free top of a thread's heap is given back after a response and
//! faulted in again (zeroed by the kernel) by the next one. At range-1000 that was 25–36 page
//! faults per response and ~13 % of the server's profile (`docs/PERFORMANCE.md`, session 48).
//!
//! [`tune`] fixes the thresholds at [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`]: every buffer
//! the server churns (Range chunks and results, HTTP/2 and watch buffers, a request of up to
//! `--max-request-bytes`) comes from the heaps and stays mapped for the next one, and a
//! heap keeps at most [`TRIM_THRESHOLD`] free at its top. RocksDB's large blocks (memtable
//! arenas of `write_buffer_size / 8`) still get mappings of their own.
//!
//! glibc's own settings win: if the environment sets either threshold (`GLIBC_TUNABLES`
//! with `glibc.malloc.mmap_threshold` or `glibc.malloc.trim_threshold`, or the older
//! `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`), [`tune`] leaves the allocator
//! alone. Other C libraries are left alone too.

use std::ffi::OsString;

/// Allocations of at least this many bytes get a mapping of their own.
pub const MMAP_THRESHOLD: usize = 4 << 20;
/// A heap's free top beyond this many bytes goes back to the kernel.
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// What [`tune`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuning {
    /// Both thresholds are fixed at these byte counts.
    Set { mmap: usize, trim: usize },
    /// The environment sets a threshold (named); glibc follows it.
    LeftToEnvironment(&'static str),
    /// glibc refused a setting (`mallopt` returned 0); the named one is not in effect.
    Refused(&'static str),
    /// Not glibc: nothing to do.
    Unsupported,
}

/// The setting in this process's environment that takes glibc's thresholds over, if any.
pub fn environment_setting() -> Option<&'static str> {
    environment_setting_in(|v| std::env::var_os(v))
}

/// [`environment_setting`] of the environment `var` reads.
fn environment_setting_in(var: impl Fn(&str) -> Option<OsString>) -> Option<&'static str> {
    if let Some(t) = var("GLIBC_TUNABLES") {
        let t = t.to_string_lossy();
        for name in ["glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold"] {
            if t.split(':').any(|s| s.split('=').next() == Some(name)) {
                return Some(name);
            }
        }
    }
    ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        .into_iter()
        .find(|&name| var(name).is_some())
}

/// Fixes glibc's thresholds (see the module documentation). Call it once, early in `main`,
/// before the threads that allocate most are started.
pub fn tune() -> Tuning {
    if let Some(name) = environment_setting() {
        return Tuning::LeftToEnvironment(name);
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> Tuning {
    // Both values fit an `int` (glibc's parameter type).
    let settings = [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
    ];
    for (param, value, name) in settings {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: `mallopt` takes two integers and only changes the allocator's parameters,
        // under the allocator's own lock; it may be called at any time from any thread.
        if unsafe { libc::mallopt(param, value) } == 0 {
            return Tuning::Refused(name);
        }
    }
    Tuning::Set {
        mmap: MMAP_THRESHOLD,
        trim: TRIM_THRESHOLD,
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Tuning {
    Tuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn a_threshold_the_environment_sets_is_left_to_glibc() {
        assert_eq!(environment_setting_in(env(&[])), None);
        assert_eq!(
            environment_setting_in(env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")])),
            None,
            "other tunables leave the thresholds to us"
        );
        assert_eq!(
            environment_setting_in(env(&[(
                "GLIBC_TUNABLES",
                "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0"
            )])),
            Some("glibc.malloc.trim_threshold")
        );
        assert_eq!(
            environment_setting_in(env(&[("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1")])),
            Some("glibc.malloc.mmap_threshold")
        );
        assert_eq!(
            environment_setting_in(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])),
            Some("MALLOC_TRIM_THRESHOLD_")
        );
        assert_eq!(
            environment_setting_in(env(&[("MALLOC_MMAP_THRESHOLD_", "0")])),
            Some("MALLOC_MMAP_THRESHOLD_")
        );
    }

    /// Minor page faults of the calling thread so far (`/proc/thread-self/stat`).
    #[cfg(target_os = "linux")]
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        // Fields after the name: state, ppid, pgrp, session, tty, tpgid, flags, minflt.
        after_name
            .split_whitespace()
            .nth(7)
            .and_then(|f| f.parse().ok())
            .unwrap_or(u64::MAX)
    }

    /// Allocates `bytes`, writes every page, frees it; returns the page faults that took.
    #[cfg(target_os = "linux")]
    fn fill_and_free(bytes: usize) -> u64 {
        let before = minor_faults();
        let mut buf: Vec<u8> = Vec::with_capacity(bytes);
        buf.resize(bytes, 1);
        std::hint::black_box(&buf);
        drop(buf);
        minor_faults().saturating_sub(before)
    }

    /// The server's pattern: a buffer of a few hundred KiB to a few MiB filled and freed
    /// again and again. Under glibc's moving thresholds the first rounds each take a fresh
    /// mapping or fresh heap pages, every page faulted in (513, 512, 0, 0 faults for 2 MiB);
    /// tuned, the heap keeps the pages after the first round.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn tuned_a_freed_buffer_s_pages_serve_the_next_one() {
        if environment_setting().is_some() {
            eprintln!("skipped: the environment sets glibc's thresholds");
            return;
        }
        assert_eq!(
            tune(),
            Tuning::Set {
                mmap: MMAP_THRESHOLD,
                trim: TRIM_THRESHOLD
            }
        );
        let faults =
            std::thread::spawn(|| (0..4).map(|_| fill_and_free(2 << 20)).collect::<Vec<_>>())
                .join()
                .unwrap_or_default();
        assert_eq!(faults.len(), 4);
        // The first round may map the pages (512 of 4 KiB, unless the thread's arena has
        // them already); the later ones reuse them.
        for (i, f) in faults.iter().enumerate().skip(1) {
            assert!(*f < 64, "round {i} faulted {f} pages: {faults:?}");
        }
    }
}
