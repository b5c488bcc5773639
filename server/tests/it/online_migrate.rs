//! Online storage-format migration with the real binaries: `metastore-ctl migrate` against
//! running `metastore` processes (a single member with history, a 3-member cluster under
//! write load with a member restarted mid-way, and a member whose binary lacks the format).

use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use metastore::migrate::count;
use metastore::storage::data_dir::read_stamp;
use metastore::storage::{codec, Table};
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{StatusRequest, StatusResponse};
use metastore_proto::mvccpb::KeyValue;

use crate::cluster::Member;
use crate::common::{free_port, Proc};
use crate::migrate::{build_dir, fingerprint_dir, open_engine};

const CTL: &str = env!("CARGO_BIN_EXE_metastore-ctl");

/// Runs `metastore-ctl migrate --endpoints=... --to=N` with `extra` flags (on a blocking
/// thread: the servers under test keep being polled meanwhile).
async fn ctl_migrate(endpoints: &[String], to: u8, extra: &[&str]) -> anyhow::Result<Output> {
    let mut c = Command::new(CTL);
    c.arg("migrate")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!("--to={to}"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(tokio::task::spawn_blocking(move || c.output()).await??)
}

async fn status(url: &str) -> anyhow::Result<StatusResponse> {
    let mut c = MaintenanceClient::connect(url.to_string()).await?;
    Ok(c.status(StatusRequest {}).await?.into_inner())
}

/// Every `kv` record decoded (with its table key), and the raw `rev` and `lease` tables.
type Tables = (Vec<(Vec<u8>, KeyValue)>, Vec<(Vec<u8>, Vec<u8>)>);

fn tables(path: &std::path::Path) -> anyhow::Result<Tables> {
    let engine = open_engine(path)?;
    let snap = engine.snapshot();
    let mut kvs = Vec::new();
    let mut it = snap.iter(Table::Kv);
    it.seek(&[]);
    while it.valid() {
        kvs.push((it.key().to_vec(), codec::decode(it.value())?));
        it.next();
    }
    let mut raw = Vec::new();
    for t in [Table::Rev, Table::Lease] {
        let mut it = snap.iter(t);
        it.seek(&[]);
        while it.valid() {
            raw.push((it.key().to_vec(), it.value().to_vec()));
            it.next();
        }
    }
    Ok((kvs, raw))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_directory_with_history_migrates_online_unchanged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("data");
    tokio::task::block_in_place(|| build_dir(&path, 1, 3000))?;
    let before = fingerprint_dir(&path)?;
    let tables_before = tables(&path)?;
    assert_eq!(
        count(open_engine(&path)?.as_ref(), None, false)?.not_in(1),
        0
    );

    // Restarted with a binary that writes format 2 by default: it keeps format 1 (the stamp).
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let env = [("METASTORE_ADVERTISE_CLIENT_URLS", url.as_str())];
    let mut p = tokio::task::block_in_place(|| Proc::spawn(&path, port, &env))?;
    assert_eq!(status(&url).await?.storage_format, 1);
    let out = ctl_migrate(
        std::slice::from_ref(&url),
        2,
        &["--wait", "--poll-interval=100ms", "--timeout=50s"],
    )
    .await?;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("every member writes storage format 2"),
        "{}",
        text(&out.stdout)
    );
    let s = status(&url).await?;
    assert_eq!((s.storage_format, s.storage_migration_pending), (2, false));
    assert!(s.storage_migration_rewritten > 0, "{s:?}");
    let (_, metrics) = crate::common::http_get(p.addr, "/metrics")?;
    assert!(metrics.contains("metastore_storage_format 2"), "{metrics}");
    assert!(metrics.contains("metastore_storage_migration_pending 0"));
    tokio::task::block_in_place(|| p.signal("TERM"))?;

    // Every key at every retained revision, every lease, the revisions: unchanged. (Meta
    // changed: the switch went through Raft as an entry of its own.)
    let after = fingerprint_dir(&path)?;
    assert_eq!(
        (
            before.current_rev,
            before.compact_rev,
            before.versions,
            before.leases
        ),
        (
            after.current_rev,
            after.compact_rev,
            after.versions,
            after.leases
        )
    );
    assert_eq!(before.hash_kv, after.hash_kv);
    assert!(before.hash_kv.len() >= 4, "{:?}", before.hash_kv);
    assert!(tables_before == tables(&path)?, "the decoded tables differ");
    assert_eq!(
        count(open_engine(&path)?.as_ref(), None, false)?.not_in(2),
        0
    );
    assert_eq!(read_stamp(&path)?.map(|s| s.storage_format), Some(2));
    Ok(())
}

/// A cluster of real processes on loopback.
struct ProcCluster {
    members: Vec<Member>,
    procs: Vec<Option<Proc>>,
    _dir: tempfile::TempDir,
}

impl ProcCluster {
    /// `extra[i]`: member i's extra flags (at the first start).
    fn start(extra: &[&[&str]]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut members = Vec::new();
        for i in 0..extra.len() {
            members.push(Member {
                name: format!("m{i}"),
                peer: free_port()?,
                client: free_port()?,
                dir: dir.path().join(format!("m{i}")),
                server: None,
            });
        }
        let mut c = Self {
            members,
            procs: Vec::new(),
            _dir: dir,
        };
        for (i, e) in extra.iter().enumerate() {
            let p = c.spawn(i, e)?;
            c.procs.push(Some(p));
        }
        for p in c.procs.iter().flatten() {
            p.wait_healthy(Duration::from_secs(20))?;
        }
        Ok(c)
    }

    fn spawn(&self, i: usize, extra: &[&str]) -> anyhow::Result<Proc> {
        let ic = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let m = &self.members[i];
        let args = m.args(&ic, "new", &extra);
        Proc::spawn_args(&args[1..], format!("127.0.0.1:{}", m.client).parse()?)
    }

    fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_the_target_format_refuses_the_switch() -> anyhow::Result<()> {
    let old: &[&str] = &["--storage-format", "1", "--max-storage-format", "1"];
    let new: &[&str] = &["--storage-format", "1"];
    let c = tokio::task::block_in_place(|| ProcCluster::start(&[new, new, old]))?;
    let out = ctl_migrate(&c.urls()[..1], 2, &["--wait", "--timeout=20s"]).await?;
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "the switch succeeded: {}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains("member m2 (") && stderr.contains("does not support storage format 2"),
        "{stderr}"
    );
    assert!(stderr.contains("supports [1]"), "{stderr}");
    for url in c.urls() {
        let s = status(&url).await?;
        assert_eq!(
            (s.storage_format, s.storage_migration_pending),
            (1, false),
            "{url}"
        );
    }
    assert_eq!(status(&c.urls()[2]).await?.supported_storage_formats, [1]);
    assert_eq!(
        status(&c.urls()[0]).await?.supported_storage_formats,
        [1, 2]
    );
    Ok(())
}

/// What a load writer saw: its acknowledged keys, and its failed and slow puts.
#[derive(Default)]
struct WriterLog {
    acked: BTreeSet<String>,
    failed: usize,
    /// The first failures and slow puts: (ms since the test's start, ms taken, outcome).
    notable: Vec<(u128, u128, String)>,
}

impl WriterLog {
    const SLOW: Duration = Duration::from_millis(200);
    const KEPT: usize = 40;

    fn record(&mut self, t0: Instant, sent: Instant, err: Option<&etcd_client::Error>) {
        let took = sent.elapsed();
        if err.is_some() {
            self.failed += 1;
        }
        if (err.is_some() || took >= Self::SLOW) && self.notable.len() < Self::KEPT {
            let outcome = err.map_or_else(|| "ok (slow)".to_string(), |e| e.to_string());
            let at = sent.duration_since(t0).as_millis();
            self.notable.push((at, took.as_millis(), outcome));
        }
    }

    fn summary(&self) -> String {
        let mut out = format!(
            "{} acknowledged, {} failed; failed or slower than {:?} (first {}):",
            self.acked.len(),
            self.failed,
            Self::SLOW,
            Self::KEPT
        );
        for (at, took, outcome) in &self.notable {
            out.push_str(&format!("\n{at:>6} ms +{took} ms: {outcome}"));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_migrate_online_under_load_with_a_restart() -> anyhow::Result<()> {
    // Slow re-encoding so the restart falls in the middle of it.
    let flags: &[&str] = &[
        "--storage-format",
        "1",
        "--experimental-storage-migration-rate",
        "4000",
        "--unsafe-no-fsync",
    ];
    let mut c = tokio::task::block_in_place(|| ProcCluster::start(&[flags, flags, flags]))?;
    let urls = c.urls();
    let mut client = Client::connect([urls[0].clone()], None).await?;
    for start in (0..8000).step_by(100) {
        let ops: Vec<TxnOp> = (start..start + 100)
            .map(|i| TxnOp::put(format!("pre/{i:05}"), format!("v{i}"), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    // pre/00000 to pre/00999.
    client
        .delete(
            "pre/00",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;

    // Write load through m0 for the whole migration; only acknowledged writes count. The
    // writer keeps its failed and slow puts, and a watcher each member's leader, so that a
    // stalled load says where it waited.
    let t0 = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut log = WriterLog::default();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load/{i:06}");
                let sent = Instant::now();
                let res = client.put(key.as_str(), "x", None).await;
                log.record(t0, sent, res.as_ref().err());
                if res.is_ok() {
                    log.acked.insert(key);
                }
                i += 1;
            }
            log
        })
    };
    let leaders = {
        let stop = stop.clone();
        let urls = urls.clone();
        tokio::spawn(async move {
            let mut seen: Vec<Option<String>> = vec![None; urls.len()];
            let mut clients: Vec<Option<MaintenanceClient<_>>> = vec![None; urls.len()];
            let mut changes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, url) in urls.iter().enumerate() {
                    let asked = tokio::time::timeout(Duration::from_secs(1), async {
                        if clients[i].is_none() {
                            clients[i] = Some(MaintenanceClient::connect(url.clone()).await?);
                        }
                        let c = clients[i].as_mut().expect("connected above");
                        anyhow::Ok(c.status(StatusRequest {}).await?.into_inner())
                    });
                    let now = match asked.await {
                        Ok(Ok(s)) => format!("leader {:x} term {}", s.leader, s.raft_term),
                        Ok(Err(e)) => format!("status failed: {e}"),
                        Err(_) => "status timed out".to_string(),
                    };
                    if seen[i].as_ref() != Some(&now) {
                        changes.push(format!("{:>6} ms m{i}: {now}", t0.elapsed().as_millis()));
                        seen[i] = Some(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            changes
        })
    };
    let mut marks = Vec::new();
    let mut mark = |what: &str| marks.push(format!("{:>6} ms {what}", t0.elapsed().as_millis()));

    let out = ctl_migrate(&urls[..1], 2, &["--timeout=20s"]).await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    mark("switched to format 2");
    // Restart m1 once its re-encoding is under way (about 2 s of work at 4000 records/s).
    let victim = 1;
    let start = Instant::now();
    loop {
        let s = status(&urls[victim]).await?;
        if s.storage_format == 2 && s.storage_migration_pending && s.storage_migration_visited > 0 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "never mid-way: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mark("m1 mid-way");
    if let Some(mut p) = c.procs[victim].take() {
        tokio::task::block_in_place(|| p.signal("TERM"))?;
    }
    mark("m1 stopped");
    let stamp = read_stamp(&c.members[victim].dir)?.map(|s| s.storage_format);
    assert_eq!(stamp, Some(2), "the stamp was raised at the switch");
    // Restarted without --storage-format: the directory (and the replicated switch) decide.
    let p = c.spawn(victim, &["--experimental-storage-migration-rate", "4000"])?;
    tokio::task::block_in_place(|| p.wait_healthy(Duration::from_secs(20)))?;
    c.procs[victim] = Some(p);
    mark("m1 restarted and healthy");

    let out = ctl_migrate(
        &urls,
        2,
        &["--wait", "--poll-interval=100ms", "--timeout=40s"],
    )
    .await?;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    mark("migration done");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.await?;
    let leaders = leaders.await?;
    assert!(
        log.acked.len() > 10,
        "the load ran: {} writes\n{}\nmarks:\n{}\nleaders:\n{}",
        log.acked.len(),
        log.summary(),
        marks.join("\n"),
        leaders.join("\n")
    );
    let acked = log.acked;

    // Everyone has applied the last write: compare at the same revisions.
    let last = client.put("last", "1", None).await?;
    let rev = last.header().map_or(0, |h| h.revision());
    let mut hashes = Vec::new();
    for url in &urls {
        let mut cl = Client::connect([url.clone()], None).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while cl
            .get("last", Some(GetOptions::new().with_serializable()))
            .await?
            .kvs()
            .is_empty()
        {
            anyhow::ensure!(Instant::now() < deadline, "{url} never applied {rev}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut at = Vec::new();
        for r in [rev / 4, rev / 2, rev - 50, rev] {
            at.push((r, cl.maintenance_client().hash_kv(r).await?.hash()));
        }
        hashes.push(at);
        let s = status(url).await?;
        assert_eq!(
            (s.storage_format, s.storage_migration_pending),
            (2, false),
            "{url}"
        );
        let keys = cl
            .get(
                "load/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_serializable(),
                ),
            )
            .await?;
        let present: BTreeSet<String> = keys.kvs().iter().map(|kv| text(kv.key())).collect();
        let lost: Vec<_> = acked.difference(&present).collect();
        assert!(lost.is_empty(), "{url} lost acknowledged writes: {lost:?}");
        let pre = cl
            .get(
                "pre/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_count_only()
                        .with_serializable(),
                ),
            )
            .await?;
        assert_eq!(pre.count(), 8000 - 1000, "{url}");
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    for m in &c.members {
        assert_eq!(
            read_stamp(&m.dir)?.map(|s| s.storage_format),
            Some(2),
            "{}",
            m.name
        );
    }
    Ok(())
}
