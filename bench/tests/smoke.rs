//! Smoke test of `metastore-bench`: the built binary, run with `--json` against a MetaStore
//! started in this process (every workload) and against a real etcd when `/usr/bin/etcd`
//! exists (the watch and lease workloads and two KV ones). Each run is a few hundred requests;
//! the report must count every one of them and no error. (`e2e/test_bench_compare.py` runs
//! `bench/compare --quick`, which drives every workload against both servers end to end.)

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;

const ETCD: &str = "/usr/bin/etcd";

/// Runs the load tool against `addr` and returns its JSON report; fails on a non-zero exit.
async fn bench(addr: SocketAddr, args: &[&str]) -> anyhow::Result<Value> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_metastore-bench"))
        .arg(format!("--endpoints=http://{addr}"))
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "metastore-bench {args:?}: {stderr}");
    serde_json::from_slice(&out.stdout).with_context(|| format!("report of {args:?}"))
}

/// Checks that the report counts `n` operations of each kind and no error; returns the report.
fn expect(report: Value, kinds: &[(&str, u64)]) -> anyhow::Result<Value> {
    ensure!(
        report["errors"] == 0,
        "errors: {}",
        report["error_messages"]
    );
    let total: u64 = kinds.iter().map(|(_, n)| n).sum();
    ensure!(report["requests"] == total, "requests: {report}");
    for (kind, n) in kinds {
        let op = &report["ops"][kind];
        ensure!(op["count"] == *n, "{kind}: {op}");
        let bucketed: u64 = op["histogram"]
            .as_array()
            .context("histogram")?
            .iter()
            .filter_map(|b| b["count"].as_u64())
            .sum();
        ensure!(bucketed == *n, "{kind}: histogram holds {bucketed} of {n}");
        ensure!(op["latency_ms"]["p99"].as_f64() > Some(0.0), "{kind}: {op}");
    }
    Ok(report)
}

/// `txn-mixed` splits its requests between reads and writes at random: both must be there and
/// add up.
fn expect_mixed(report: Value, total: u64) -> anyhow::Result<()> {
    let reads = report["ops"]["read"]["count"].as_u64().unwrap_or(0);
    let writes = report["ops"]["write"]["count"].as_u64().unwrap_or(0);
    ensure!(reads > 0 && writes > 0, "{report}");
    expect(report, &[("read", reads), ("write", writes)])?;
    ensure!(reads + writes == total);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_workloads_against_metastore() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = common::metastore(&dir).await?;
    let addr = server.client_addrs()[0];
    let keys = ["--key-space-size", "100", "--key-size", "8"];
    let conc = ["--conns", "2", "--clients", "4"];

    let put = [
        &keys[..],
        &conc,
        &["--total", "300", "--sequential-keys", "put"],
    ]
    .concat();
    expect(bench(addr, &put).await?, &[("put", 300)])?;
    // The tool's own runtime on one thread (current-thread), then on three.
    let put = [
        &keys[..],
        &[
            "--total",
            "200",
            "--val-size",
            "100",
            "--threads",
            "1",
            "put",
        ],
    ]
    .concat();
    expect(bench(addr, &put).await?, &[("put", 200)])?;

    // An open-loop rate: 200 requests at 1000/s take at least 0.199 s.
    let paced = [
        "--total",
        "200",
        "--rate",
        "1000",
        "--clients",
        "4",
        "--threads",
        "3",
        "put",
    ];
    let report = expect(bench(addr, &paced).await?, &[("put", 200)])?;
    let secs = report["elapsed_secs"].as_f64().unwrap_or(0.0);
    ensure!(secs >= 0.199, "--rate 1000 ran 200 requests in {secs} s");

    let ranges: [&[&str]; 7] = [
        &[],
        &["--consistency", "s"],
        &["--prefix", "--limit", "10"],
        &["--prefix", "--count-only"],
        &["--prefix", "--keys-only", "--consistency", "s"],
        &["00000010", "00000020"],
        &["0000001", "--prefix"],
    ];
    for opts in ranges {
        let args = [&keys[..], &conc, &["--total", "200", "range"], opts].concat();
        expect(bench(addr, &args).await?, &[("range", 200)])?;
    }

    let txn = [
        &keys[..],
        &conc,
        &["--total", "200", "txn-put", "--txn-ops", "3"],
    ]
    .concat();
    expect(bench(addr, &txn).await?, &[("txn-put", 200)])?;
    for consistency in ["l", "s"] {
        let mixed = [
            &keys[..],
            &conc,
            &["--total", "300", "txn-mixed", "--rw-ratio", "2"],
            &["--consistency", consistency],
        ]
        .concat();
        expect_mixed(bench(addr, &mixed).await?, 300)?;
    }

    // Bad flags fail before any request.
    let tiny = ["--key-size", "2", "--key-space-size", "1000", "put"];
    ensure!(bench(addr, &tiny).await.is_err());

    stream_workloads(addr).await?;
    server.shutdown().await;
    Ok(())
}

/// `watch`, `watch-latency` and `lease-keepalive` against `addr`.
async fn stream_workloads(addr: SocketAddr) -> anyhow::Result<()> {
    let conc = ["--conns", "2", "--clients", "4", "--key-space-size", "50"];

    let watch = [&conc[..], &["--total", "200", "watch"]].concat();
    expect(bench(addr, &watch).await?, &[("create", 200)])?;

    // 100 puts at 500/s to 2 streams × 3 watchers: 600 events.
    let latency = [
        &conc[..],
        &["--total", "100", "--rate", "500", "watch-latency"],
        &["--streams", "2", "--watchers-per-stream", "3"],
    ]
    .concat();
    let report = expect(
        bench(addr, &latency).await?,
        &[("put", 100), ("event", 600)],
    )?;
    // The event rate counts until the last event, which comes about when the last put is
    // answered (maybe a little before: 10 % of slack).
    let events = report["ops"]["event"]["per_sec"].as_f64().unwrap_or(0.0);
    let puts = report["ops"]["put"]["per_sec"].as_f64().unwrap_or(0.0);
    ensure!(events > 0.0 && events <= puts * 6.0 * 1.1, "{report}");

    let keepalive = [&conc[..], &["--total", "300", "lease-keepalive"]].concat();
    expect(bench(addr, &keepalive).await?, &[("keepalive", 300)])?;
    Ok(())
}

/// A real etcd on free loopback ports, killed on drop.
struct Etcd {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn free_port() -> anyhow::Result<u16> {
        Ok(metastore_testkit::free_port()?)
    }

    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (Self::free_port()?, Self::free_port()?);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new(ETCD)
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let etcd = Self {
            child,
            addr: format!("127.0.0.1:{client}").parse()?,
            _dir: dir,
        };
        // Ready when a put succeeds.
        let start = Instant::now();
        while bench(etcd.addr, &["--total", "1", "put"]).await.is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("etcd did not start in 20 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_against_etcd() -> anyhow::Result<()> {
    if !Path::new(ETCD).exists() {
        eprintln!("skipped: {ETCD} not found");
        return Ok(());
    }
    let etcd = Etcd::start().await?;
    stream_workloads(etcd.addr).await?;

    // The KV workloads run against etcd too.
    let conc = ["--conns", "2", "--clients", "4", "--key-space-size", "50"];
    let put = [&conc[..], &["--total", "200", "put"]].concat();
    expect(bench(etcd.addr, &put).await?, &[("put", 200)])?;
    let mixed = [&conc[..], &["--total", "200", "txn-mixed"]].concat();
    expect_mixed(bench(etcd.addr, &mixed).await?, 200)?;
    Ok(())
}
