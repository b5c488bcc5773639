//! Test support shared by the workspace's integration tests.
//!
//! [`noise`] makes values that compression cannot shrink, for tests about sizes on disk.
//!
//! [`free_port`] hands out loopback ports for test servers that are started later, as
//! separate processes, by name (`--listen-client-urls http://127.0.0.1:<port>`). The usual
//! trick, bind port 0 and close, hands out a port from the kernel's ephemeral range, where
//! any outgoing connection of any process may take it before the server binds it: with
//! thousands of client connections in a test run, a member then fails to start, now and then.
//! Here ports come from below the ephemeral range, which `connect()` never uses, through a
//! counter shared by every test process of the machine (a file under a lock), so two tests
//! running at once are never handed the same port; each port is checked to be free.
//! `e2e/harness.py` shares the same counter file and range.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;

/// The lowest port handed out.
pub const FIRST_PORT: u16 = 15000;
/// The ports handed out stay this far below the ephemeral range.
const MARGIN: u16 = 100;

/// The kernel's ephemeral port range (Linux); the IANA range elsewhere.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((49152, 65535))
}

/// The file holding the next port to try, shared by every test process.
fn counter_path() -> PathBuf {
    std::env::temp_dir().join("metastore-test-ports")
}

/// A loopback TCP port that is free now and handed out to no other caller of this function
/// (in any process) until the range wraps around. Falls back to a kernel-chosen port when the
/// ephemeral range leaves no room below it.
pub fn free_port() -> io::Result<u16> {
    let (ephemeral_low, _) = ephemeral_range();
    let end = ephemeral_low.saturating_sub(MARGIN);
    if end <= FIRST_PORT + 1000 {
        return kernel_port();
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(counter_path())?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    let port = next_free(&mut file, end);
    // The lock goes with the file.
    drop(file);
    port
}

/// Reads the counter, finds the next free port from it, stores the one after.
fn next_free(file: &mut File, end: u16) -> io::Result<u16> {
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let mut port = text
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| (FIRST_PORT..end).contains(p))
        .unwrap_or(FIRST_PORT);
    for _ in FIRST_PORT..end {
        let candidate = port;
        port = if port + 1 >= end {
            FIRST_PORT
        } else {
            port + 1
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, candidate)).is_ok() {
            file.seek(SeekFrom::Start(0))?;
            file.set_len(0)?;
            write!(file, "{port}")?;
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free loopback port in {FIRST_PORT}..{end}"),
    ))
}

/// `len` pseudo-random bytes (xorshift from `seed`): values LZ4 cannot shrink much, and a
/// different run of them for every seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn kernel_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let (low, _) = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a port")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in &ports {
            if low > FIRST_PORT + 1000 + MARGIN {
                assert!((FIRST_PORT..low).contains(p), "{p} (ephemeral from {low})");
            }
            TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).expect("the port is free");
        }
    }

    #[test]
    fn a_port_in_use_is_skipped_and_the_counter_moves_past_it() {
        let (low, _) = ephemeral_range();
        let end = low.saturating_sub(MARGIN);
        if end <= FIRST_PORT + 1000 {
            return; // no room below the ephemeral range: free_port falls back to the kernel
        }
        let taken = free_port().expect("a port");
        let _held = TcpListener::bind((Ipv4Addr::LOCALHOST, taken)).expect("bind");
        // A private counter pointing at the held port (the shared one serves other tests).
        let path =
            std::env::temp_dir().join(format!("metastore-test-ports-{}", std::process::id()));
        std::fs::write(&path, taken.to_string()).expect("write");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("counter");
        let next = next_free(&mut file, end).expect("a port");
        assert_ne!(next, taken);
        assert!(next > taken || next == FIRST_PORT, "{next} after {taken}");
        let stored: u16 = std::fs::read_to_string(&path)
            .expect("read")
            .parse()
            .expect("a number");
        assert_eq!(
            stored,
            if next + 1 >= end {
                FIRST_PORT
            } else {
                next + 1
            }
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn noise_has_its_length_and_differs_by_seed() {
        assert_eq!(noise(7, 1024).len(), 1024);
        assert_eq!(noise(7, 64), noise(7, 64));
        assert_ne!(noise(7, 64), noise(8, 64));
        assert_ne!(noise(0, 64), vec![0u8; 64]);
    }
}
