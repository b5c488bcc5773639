//! Server memory of a large Range: a real `metastore` process loaded with 200,000 keys of
//! 1 KiB answers a full-range Range (one 200 MB gRPC message) and a RangeStream while its
//! peak RSS (`VmHWM`, reset through `/proc/PID/clear_refs` before each) is sampled; the
//! growth must stay within `--max-range-memory-bytes` plus a small constant. The figures
//! are printed; nothing is timed.
//!
//! `range_memory_figures` (ignored) measures any server command the same way, for
//! docs/PERFORMANCE.md: `RANGE_MEMORY_CMD` is the command line with `{dir}`, `{port}` and
//! `{peer}` placeholders, `RANGE_MEMORY_KEYS` the number of keys.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::RangeRequest;

use crate::common::{free_port, http_get, Proc};
use crate::range_stream::{kv_client, load_many, range_stream};

const MIB: u64 = 1 << 20;
/// What grows outside the budget: the RocksDB block cache (128 MiB, fixed), which the reading
/// thread refills through its own allocator arena while the blocks it evicts stay in the
/// warming thread's, plus 32 MiB for the connection's buffers and allocator slack. Measured:
/// about +100 MiB for a 200 MB result, whatever the result size; before the change a Range
/// grew by about twice the result.
const SLACK: u64 = 160 * MIB;

/// A `/proc/PID/status` field, in bytes.
fn proc_status(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("bad line {line:?}"))?
        .parse()?;
    Ok(kib * 1024)
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    Ok(())
}

#[derive(Debug)]
struct Figures {
    /// RSS before the reads (after the load and a warming count of the whole range).
    baseline: u64,
    /// Peak RSS during the unary Range, and its duration.
    range_peak: u64,
    range_secs: f64,
    /// RSS before the RangeStream, its peak (None against a server without it), and its
    /// duration.
    stream_baseline: u64,
    stream_peak: Option<u64>,
    stream_secs: f64,
}

/// Loads `keys` keys of 1 KiB with 4 concurrent clients.
async fn load(addr: SocketAddr, keys: usize) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let per = keys.div_ceil(4);
    for t in 0..4 {
        tasks.spawn(async move {
            let mut c = etcd_client::Client::connect([format!("http://{addr}")], None).await?;
            load_many(
                &mut c,
                &format!("m/{t}"),
                per.min(keys.saturating_sub(t * per)),
                1024,
            )
            .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn measure(addr: SocketAddr, pid: u32, keys: usize, stream: bool) -> anyhow::Result<Figures> {
    let mut kv = kv_client(addr).await?;
    let all = RangeRequest {
        key: "m/".into(),
        range_end: "m0".into(),
        ..Default::default()
    };
    // Warm the block cache (a fixed, separately configured amount) with a count of the
    // whole range, so that what grows next is the response alone.
    let count = kv
        .range(RangeRequest {
            count_only: true,
            ..all.clone()
        })
        .await?
        .into_inner()
        .count;
    anyhow::ensure!(count as usize == keys, "count {count}, expected {keys}");
    let baseline = proc_status(pid, "VmRSS")?;
    reset_peak(pid)?;
    let start = Instant::now();
    let resp = kv.range(all.clone()).await?.into_inner();
    let range_secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(resp.kvs.len() == keys, "{} keys", resp.kvs.len());
    drop(resp);
    let range_peak = proc_status(pid, "VmHWM")?;
    let (mut stream_peak, mut stream_secs) = (None, 0.0);
    let stream_baseline = proc_status(pid, "VmRSS")?;
    if stream {
        reset_peak(pid)?;
        let start = Instant::now();
        let (merged, _) = range_stream(&mut kv, all).await?;
        stream_secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(merged.kvs.len() == keys, "{} keys", merged.kvs.len());
        stream_peak = Some(proc_status(pid, "VmHWM")?);
    }
    Ok(Figures {
        baseline,
        range_peak,
        range_secs,
        stream_baseline,
        stream_peak,
        stream_secs,
    })
}

fn report(what: &str, keys: usize, f: &Figures) {
    let mb = keys as f64 * 1024.0 / 1e6;
    println!(
        "{what}: {keys} keys x 1 KiB; RSS before {} MiB; Range peak {} MiB (+{} MiB), {:.2} s \
         ({:.0} MB/s of values)",
        f.baseline / MIB,
        f.range_peak / MIB,
        f.range_peak.saturating_sub(f.baseline) / MIB,
        f.range_secs,
        mb / f.range_secs
    );
    if let Some(p) = f.stream_peak {
        println!(
            "{what}: RSS before {} MiB; RangeStream peak {} MiB (+{} MiB), {:.2} s ({:.0} MB/s)",
            f.stream_baseline / MIB,
            p / MIB,
            p.saturating_sub(f.stream_baseline) / MIB,
            f.stream_secs,
            mb / f.stream_secs
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_range_memory_stays_within_the_budget() -> anyhow::Result<()> {
    let budget = 64 * MIB;
    let keys = 200_000;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let budget_env = budget.to_string();
    let p = Proc::spawn(
        &dir.path().join("data"),
        port,
        &[
            ("METASTORE_MAX_RANGE_MEMORY_BYTES", budget_env.as_str()),
            ("METASTORE_UNSAFE_NO_FSYNC", "true"),
        ],
    )?;
    load(p.addr, keys).await?;
    let f = measure(p.addr, p.child.id(), keys, true).await?;
    report("metastore", keys, &f);
    let limit = f.baseline + budget + SLACK;
    assert!(f.range_peak <= limit, "Range peak {f:?} over {limit}");
    let stream_peak = f.stream_peak.unwrap_or(u64::MAX);
    let limit = f.stream_baseline + budget + SLACK;
    assert!(stream_peak <= limit, "RangeStream peak {f:?} over {limit}");
    Ok(())
}

/// A server started from `RANGE_MEMORY_CMD` (see the module documentation).
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measures for docs/PERFORMANCE.md; set RANGE_MEMORY_CMD"]
async fn range_memory_figures() -> anyhow::Result<()> {
    let cmd = std::env::var("RANGE_MEMORY_CMD")?;
    let keys: usize = std::env::var("RANGE_MEMORY_KEYS")
        .unwrap_or_else(|_| "1000000".into())
        .parse()?;
    let dir = tempfile::tempdir()?;
    let (port, peer) = (free_port()?, free_port()?);
    let line = cmd
        .replace("{dir}", &dir.path().join("data").display().to_string())
        .replace("{port}", &port.to_string())
        .replace("{peer}", &peer.to_string());
    let mut words = line.split_whitespace();
    let program = words
        .next()
        .ok_or_else(|| anyhow::anyhow!("empty command"))?;
    let child = Command::new(program)
        .args(words)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let s = Server {
        child,
        addr: format!("127.0.0.1:{port}").parse()?,
    };
    let start = Instant::now();
    while !matches!(http_get(s.addr, "/health"), Ok((200, _))) {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "not healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let start = Instant::now();
    load(s.addr, keys).await?;
    println!("loaded in {:.1} s", start.elapsed().as_secs_f64());
    let stream = program.contains("metastore") && std::env::var("RANGE_MEMORY_NO_STREAM").is_err();
    let f = measure(s.addr, s.child.id(), keys, stream).await?;
    report(program, keys, &f);
    Ok(())
}
