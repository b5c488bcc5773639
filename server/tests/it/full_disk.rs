//! A full disk: the real binary on a small tmpfs that the test fills. Writes are refused with a
//! clear error, reads go on, nothing is corrupted, and writes are accepted again once space is
//! freed, without a restart. Mounting needs root (CI runs as root); elsewhere the test says it
//! was skipped, unless `CI` is set.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use tonic::Code;

use crate::common::{free_port, status, Proc};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(Self { path, _dir: dir })),
            other if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {other:?}");
                Ok(None)
            }
            other => anyhow::bail!("cannot mount a tmpfs: {other:?}"),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Writes 1 MiB chunks into `path` until the file system refuses; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial page too.
    while let Ok(n) = f.write(&chunk[..4096]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = f.sync_all();
    Ok(written)
}

async fn everything(c: &mut Client) -> anyhow::Result<Vec<crate::common::Kv>> {
    Ok(crate::common::everything(c, 0).await?.1)
}

fn is_disk_full(e: etcd_client::Error) -> bool {
    let (code, msg) = status(e);
    code == Code::ResourceExhausted && msg.contains("no space left on device")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_and_recovers_when_space_is_freed(
) -> anyhow::Result<()> {
    let Some(fs) = Tmpfs::mount("256m")? else {
        return Ok(());
    };
    let data = fs.path.join("data");
    let port = free_port()?;
    let reserve = [("METASTORE_DISK_FREE_RESERVE_BYTES", "8388608")];
    let mut p = tokio::task::block_in_place(|| Proc::spawn(&data, port, &reserve))?;
    let mut c = p.client().await?;
    let lease = c.lease_grant(600, None).await?.id();
    for i in 0..300 {
        let opts = (i % 50 == 0).then(|| PutOptions::new().with_lease(lease));
        c.put(format!("k/{:03}", i % 100), vec![b'v'; 512], opts)
            .await?;
    }
    c.delete("k/042", None).await?;
    let rev = c
        .get("k/000", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let before = everything(&mut c).await?;
    let hash = c.hash_kv(rev).await?.hash();

    // Fill the disk (the server is idle), then give the guard time to look again.
    let filler = fs.path.join("filler");
    let filled = tokio::task::block_in_place(|| fill(&filler))?;
    assert!(filled > 100 << 20, "filled only {filled} bytes");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every kind of write is refused with the clear error...
    let e = c
        .put("new", "x", None)
        .await
        .expect_err("put on a full disk");
    assert!(is_disk_full(e));
    let e = c.delete("k/001", None).await.expect_err("delete");
    assert!(is_disk_full(e));
    let e = c.lease_grant(60, None).await.expect_err("lease grant");
    assert!(is_disk_full(e));
    // ...while reads, hashes and status go on, unchanged.
    assert_eq!(everything(&mut c).await?, before);
    assert_eq!(c.hash_kv(rev).await?.hash(), hash);
    assert_eq!(
        c.get("k/000", Some(GetOptions::new().with_serializable()))
            .await?
            .count(),
        1
    );
    c.status().await?;
    let (_, metrics) = crate::common::http_get(p.addr, "/metrics")?;
    assert!(
        metrics.contains("reason=\"disk_full\""),
        "refusals are counted"
    );

    // Space is freed: writes are accepted again, without a restart.
    std::fs::remove_file(&filler)?;
    let r = c.put("new", "x", None).await?;
    assert_eq!(r.header().map(|h| h.revision()), Some(rev + 1));
    c.delete("k/001", None).await?;
    assert_eq!(c.hash_kv(rev).await?.hash(), hash, "history unchanged");

    // Nothing on disk was hurt: a restart serves the same data.
    let after = everything(&mut c).await?;
    drop(c);
    tokio::task::block_in_place(|| p.signal("TERM"))?;
    let p = tokio::task::block_in_place(|| Proc::spawn(&data, port, &reserve))?;
    let mut c = p.client().await?;
    assert_eq!(everything(&mut c).await?, after);
    assert_eq!(c.hash_kv(rev).await?.hash(), hash);
    let leases: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
    assert_eq!(leases, vec![lease]);
    Ok(())
}
