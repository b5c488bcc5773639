//! Raft clusters of in-process members on loopback: replication, reads on every member,
//! failover, membership changes, and a follower catching up from a snapshot.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, MemberAddOptions};
use metastore::server::{config::Config, Server};

use crate::common::free_port;

pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) peer: u16,
    pub(crate) client: u16,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) server: Option<Server>,
}

pub(crate) struct Cluster {
    pub(crate) members: Vec<Member>,
    _dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Member {
    /// The member's command line (the program name first).
    pub(crate) fn args(&self, initial_cluster: &str, state: &str, extra: &[String]) -> Vec<String> {
        let mut a: Vec<String> = [
            "metastore",
            "--name",
            &self.name,
            "--data-dir",
            &self.dir.display().to_string(),
            "--listen-client-urls",
            &format!("http://127.0.0.1:{}", self.client),
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{}", self.client),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", self.peer),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{}", self.peer),
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            state,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().cloned());
        a
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }
}

impl Cluster {
    pub(crate) fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub(crate) async fn start(n: usize, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
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
            _dir: dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let ic = c.initial_cluster();
        let mut starts = Vec::new();
        for m in &c.members {
            let config = Config::load(m.args(&ic, "new", &c.extra))?;
            starts.push(tokio::spawn(async move {
                metastore::server::start(&config).await
            }));
        }
        for (m, s) in c.members.iter_mut().zip(starts) {
            m.server = Some(s.await??);
        }
        c.wait_leader().await?;
        c.wait_everyone_knows_the_leader().await?;
        Ok(c)
    }

    /// Waits until every running member knows a leader: a follower that has not heard from
    /// the new leader yet answers "no leader", so a test's first request waits for this.
    async fn wait_everyone_knows_the_leader(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let all = self
                .members
                .iter()
                .filter_map(|m| m.server.as_ref().and_then(|s| s.node()))
                .all(|n| n.replica.leader_id().is_some());
            if all {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "not every member knows the leader after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let ic = self.initial_cluster();
        let config = Config::load(self.members[i].args(&ic, "new", &self.extra))?;
        self.members[i].server = Some(metastore::server::start(&config).await?);
        Ok(())
    }

    async fn stop(&mut self, i: usize) {
        if let Some(s) = self.members[i].server.take() {
            let stopped = s.shutdown().await;
            tokio::task::spawn_blocking(move || stopped.wait())
                .await
                .expect("stopped");
        }
    }

    fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.server
                .as_ref()
                .and_then(|s| s.node())
                .is_some_and(|n| n.replica.is_leader())
        })
    }

    pub(crate) async fn wait_leader(&self) -> anyhow::Result<usize> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "no leader after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn client(&self, i: usize) -> anyhow::Result<Client> {
        Ok(Client::connect([self.members[i].url()], None).await?)
    }
}

async fn get(c: &mut Client, key: &str, serializable: bool) -> anyhow::Result<Option<String>> {
    let opts = if serializable {
        Some(GetOptions::new().with_serializable())
    } else {
        None
    };
    let r = c.get(key, opts).await?;
    Ok(r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

async fn hash_kv(c: &mut Client, rev: i64) -> anyhow::Result<u32> {
    Ok(c.maintenance_client().hash_kv(rev).await?.hash())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_replicate_and_serve_linearizable_reads_everywhere() -> anyhow::Result<()> {
    let c = Cluster::start(3, &[]).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.client(i).await?);
    }
    // Writes through every member (followers forward them); linearizable reads through every
    // member see each one at once.
    for round in 0..5 {
        for i in 0..3 {
            let key = format!("k{i}");
            let value = format!("v{round}-{i}");
            let put = clients[i].put(key.clone(), value.clone(), None).await?;
            let rev = put.header().map_or(0, |h| h.revision());
            for (j, reader) in clients.iter_mut().enumerate() {
                assert_eq!(
                    get(reader, &key, false).await?.as_deref(),
                    Some(value.as_str()),
                    "member {j} after a write through member {i} at revision {rev}"
                );
            }
        }
    }
    // Every member reports the same leader and term; HashKV agrees.
    let mut leaders = Vec::new();
    let mut hashes = Vec::new();
    let rev = clients[0]
        .get("k0", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    for cl in clients.iter_mut() {
        let s = cl.status().await?;
        leaders.push((s.leader(), s.raft_term()));
        hashes.push(hash_kv(cl, rev).await?);
    }
    assert!(
        leaders.iter().all(|l| *l == leaders[0] && l.0 != 0),
        "{leaders:?}"
    );
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    // MemberList shows three voters with their names and client URLs (each member publishes
    // its client URLs once it runs).
    let start = Instant::now();
    let list = loop {
        let list = clients[1].member_list().await?;
        if list.members().iter().all(|m| !m.client_urls().is_empty())
            || start.elapsed() > Duration::from_secs(5)
        {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut names: Vec<_> = list
        .members()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["m0", "m1", "m2"]);
    assert!(list
        .members()
        .iter()
        .all(|m| !m.is_learner() && !m.client_urls().is_empty()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_leader_elects_another_and_keeps_every_write() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, &[]).await?;
    let leader = c.wait_leader().await?;
    let other = (leader + 1) % 3;
    let mut cl = c.client(other).await?;
    for i in 0..50 {
        cl.put(format!("a{i}"), "x", None).await?;
    }
    // `metastore_server_leader_changes_seen_total`: the first election counts as a change.
    let seen = |c: &Cluster, i: usize| {
        c.members[i]
            .server
            .as_ref()
            .and_then(|s| s.node())
            .map_or(0, |n| n.metrics.leader_changes.get())
    };
    let before = seen(&c, other);
    assert!(before >= 1, "the first leader was not counted");
    c.stop(leader).await;
    let start = Instant::now();
    let new_leader = c.wait_leader().await?;
    assert_ne!(new_leader, leader);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "election took {:?}",
        start.elapsed()
    );
    while seen(&c, other) <= before {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the new leader was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 50..100 {
        cl.put(format!("a{i}"), "x", None).await?;
    }
    let r = cl
        .get("a", Some(GetOptions::new().with_prefix().with_count_only()))
        .await?;
    assert_eq!(r.count(), 100);
    // The old leader comes back as a follower and catches up.
    c.restart(leader).await?;
    let mut back = c.client(leader).await?;
    let r = back
        .get("a", Some(GetOptions::new().with_prefix().with_count_only()))
        .await?;
    assert_eq!(r.count(), 100);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_quorum_writes_fail_with_etcds_errors() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, &[]).await?;
    let leader = c.wait_leader().await?;
    let survivor = (leader + 1) % 3;
    for i in 0..3 {
        if i != survivor {
            c.stop(i).await;
        }
    }
    let mut cl = c.client(survivor).await?;
    let e = cl.put("k", "v", None).await.expect_err("no quorum");
    let (code, msg) = crate::common::status(e);
    assert_eq!(code, tonic::Code::Unavailable, "{msg}");
    assert!(
        msg == "etcdserver: no leader" || msg == "etcdserver: request timed out",
        "{msg}"
    );
    // Serializable reads are still served locally.
    assert!(get(&mut cl, "k", true).await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_are_added_promoted_and_removed() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, &[]).await?;
    let mut cl = c.client(0).await?;
    for i in 0..20 {
        cl.put(format!("m{i}"), "x", None).await?;
    }
    // Add a learner, start it with --initial-cluster-state existing.
    let peer = free_port()?;
    let client_port = free_port()?;
    let peer_url = format!("http://127.0.0.1:{peer}");
    let added = cl
        .member_add(
            [peer_url.clone()],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await?;
    let new_id = added.member().map(|m| m.id()).expect("added member");
    let dir = c._dir.path().join("m3");
    c.members.push(Member {
        name: "m3".into(),
        peer,
        client: client_port,
        dir,
        server: None,
    });
    let ic = c.initial_cluster();
    let config = Config::load(c.members[3].args(&ic, "existing", &[]))?;
    c.members[3].server = Some(metastore::server::start(&config).await?);
    let node = c.members[3]
        .server
        .as_ref()
        .and_then(|s| s.node())
        .expect("node");
    assert_eq!(
        node.member.id, new_id,
        "the joining member takes the id member add gave it"
    );
    // Promote once it caught up (etcd refuses while it lags).
    let start = Instant::now();
    loop {
        match cl.member_promote(new_id).await {
            Ok(_) => break,
            Err(e) => {
                let (_, msg) = crate::common::status(e);
                assert!(msg.contains("in sync with leader"), "{msg}");
                anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "never caught up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut newcomer = c.client(3).await?;
    assert_eq!(
        get(&mut newcomer, "m19", false).await?.as_deref(),
        Some("x")
    );
    // Promoting a voter, removing an unknown member: etcd's errors.
    let (_, msg) = crate::common::status(cl.member_promote(new_id).await.expect_err("voter"));
    assert_eq!(msg, "etcdserver: can only promote a learner member");
    let (code, msg) = crate::common::status(cl.member_remove(42).await.expect_err("unknown"));
    assert_eq!(
        (code, msg.as_str()),
        (tonic::Code::NotFound, "etcdserver: member not found")
    );
    // Remove an original member; the cluster keeps working with the other three.
    let victim_id = c.members[2]
        .server
        .as_ref()
        .and_then(|s| s.node())
        .expect("node")
        .member
        .id;
    cl.member_remove(victim_id).await?;
    c.stop(2).await;
    cl.put("after-remove", "y", None).await?;
    assert_eq!(
        get(&mut newcomer, "after-remove", false).await?.as_deref(),
        Some("y")
    );
    let list = cl.member_list().await?;
    assert_eq!(list.members().len(), 3);
    assert!(list
        .members()
        .iter()
        .all(|m| m.id() != victim_id && !m.is_learner()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_compacted_log_catches_up_from_a_snapshot() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, &["--snapshot-count", "50"]).await?;
    let leader = c.wait_leader().await?;
    let lagging = (leader + 1) % 3;
    let writer = (leader + 2) % 3;
    c.stop(lagging).await;
    let mut cl = c.client(writer).await?;
    let lease = cl.lease_grant(600, None).await?.id();
    for i in 0..400 {
        let opts = (i % 10 == 0).then(|| etcd_client::PutOptions::new().with_lease(lease));
        cl.put(format!("s{i:04}"), format!("v{i}"), opts).await?;
    }
    cl.delete("s0001", None).await?;
    let rev = cl
        .put("last", "1", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    // Every running member purged its log behind a snapshot recorded without a file: the
    // store is written to a file only for a follower that needs it.
    wait_purged(&c, &[leader, writer], 300).await?;
    for i in [leader, writer] {
        assert_eq!(
            snapshot_files(&c.members[i]),
            Vec::<std::path::PathBuf>::new()
        );
    }
    c.restart(lagging).await?;
    let mut back = c.client(lagging).await?;
    let start = Instant::now();
    loop {
        let r = back
            .get("last", Some(GetOptions::new().with_serializable()))
            .await?;
        if !r.kvs().is_empty() {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(15), "never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hash_kv(&mut back, rev).await?, hash_kv(&mut cl, rev).await?);
    let r = back
        .get("s", Some(GetOptions::new().with_prefix().with_count_only()))
        .await?;
    assert_eq!(r.count(), 399);
    // Leases came with the snapshot.
    let leases = back.leases().await?;
    assert!(leases.leases().iter().any(|l| l.id() == lease));
    // The lagging follower installed a snapshot: nothing else gets it past the purged log.
    let (installed, _) = raft_indexes(&c, lagging);
    assert!(
        installed >= 300,
        "lagging follower's snapshot at {installed}"
    );
    // Only the leader built a file, for the follower; the other follower has none. The
    // leader's is gone again if it was built while the follower was down (openraft's
    // replication keeps asking) and a newer recorded snapshot replaced it: the send in flight
    // still reads it, and the follower then catches up from the log. The follower's own file
    // goes the same way once it records a newer snapshot.
    let files: Vec<usize> = [leader, writer, lagging]
        .iter()
        .map(|&i| snapshot_files(&c.members[i]).len())
        .collect();
    assert!(
        files[0] <= 1 && files[1] == 0 && files[2] <= 1,
        "snapshot files of leader, other follower, lagging: {files:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hasleader_watch_streams_end_when_the_leader_is_gone() -> anyhow::Result<()> {
    use metastore_proto::etcdserverpb::watch_client::WatchClient;
    use metastore_proto::etcdserverpb::{
        watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
    };
    let mut c = Cluster::start(3, &[]).await?;
    let leader = c.wait_leader().await?;
    let survivor = (leader + 1) % 3;
    let url = c.members[survivor].url();
    let create = || WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: "k".into(),
            ..Default::default()
        })),
    };
    let open = |url: String| async move {
        let mut raw = WatchClient::connect(url).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(create()).await?;
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert("hasleader", "true".parse()?);
        let r = raw.watch(req).await;
        anyhow::Ok((r, tx))
    };
    let (r, _tx) = open(url.clone()).await?;
    let mut stream = r?.into_inner();
    let created = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("created");
    assert!(created.created);
    for i in 0..3 {
        if i != survivor {
            c.stop(i).await;
        }
    }
    // etcd's monitorLeader: the stream ends with "no leader" after three election timeouts
    // without a leader.
    let start = Instant::now();
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("the stream ended without an error"),
            Err(s) => break s,
        }
    };
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::Unavailable, "etcdserver: no leader")
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // A new stream that requires a leader is refused at once.
    let (r, _tx) = open(url).await?;
    let s = r.expect_err("no leader");
    assert_eq!(
        (s.code(), s.message()),
        (tonic::Code::Unavailable, "etcdserver: no leader")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_leader_hands_leadership_over_under_write_load() -> anyhow::Result<()> {
    let c = Cluster::start(3, &[]).await?;
    let leader = c.wait_leader().await?;
    let target = (leader + 1) % 3;
    let id = |i: usize| {
        c.members[i]
            .server
            .as_ref()
            .and_then(|s| s.node())
            .map(|n| n.member.id)
            .expect("running member")
    };
    let (leader_id, target_id) = (id(leader), id(target));
    // Writes through the third member keep coming while leadership moves; each one that was
    // acknowledged must be there afterwards.
    let writer = (leader + 2) % 3;
    let mut wc = c.client(writer).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = stop.clone();
    let load = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0u32;
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            let key = format!("ml{i:05}");
            if wc.put(key.clone(), "x", None).await.is_ok() {
                acked.push(key);
            }
            i += 1;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // etcd's refusals: a follower is not the leader; the transferee must be a voter.
    let follower = c.client(target).await?;
    let (code, msg) = crate::common::status(
        follower
            .maintenance_client()
            .move_leader(leader_id)
            .await
            .expect_err("served by a follower"),
    );
    assert_eq!(
        (code, msg.as_str()),
        (tonic::Code::FailedPrecondition, "etcdserver: not leader")
    );
    let mut lc = c.client(leader).await?;
    let (code, msg) = crate::common::status(
        lc.maintenance_client()
            .move_leader(0xdead)
            .await
            .expect_err("not a member"),
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: bad leader transferee"
        )
    );
    // To itself: nothing to do.
    lc.maintenance_client().move_leader(leader_id).await?;
    assert_eq!(c.leader(), Some(leader));

    let start = Instant::now();
    lc.maintenance_client().move_leader(target_id).await?;
    let took = start.elapsed();
    println!("move-leader took {took:?}");
    // Done means the old leader already follows the target.
    assert_eq!(c.leader(), Some(target));
    let s = lc.status().await?;
    assert_eq!(s.leader(), target_id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.await?;
    assert!(acked.len() > 10, "the load made progress: {}", acked.len());

    // Every acknowledged write is there, on every member, and HashKV agrees.
    let mut check = c.client(leader).await?;
    let rev = check
        .put("fence", "1", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let r = check
        .get("ml", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await?;
    let present: std::collections::BTreeSet<_> = r
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    let missing: Vec<_> = acked.iter().filter(|k| !present.contains(*k)).collect();
    assert!(missing.is_empty(), "lost acknowledged writes: {missing:?}");
    let mut hashes = Vec::new();
    for i in 0..3 {
        let mut cl = c.client(i).await?;
        get(&mut cl, "fence", false).await?;
        hashes.push(hash_kv(&mut cl, rev).await?);
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    // And back: the new leader can hand it on again.
    let tc = c.client(target).await?;
    tc.maintenance_client().move_leader(leader_id).await?;
    assert_eq!(c.leader(), Some(leader));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_lost_its_data_is_refused_until_removed_and_added_again() -> anyhow::Result<()>
{
    let mut c = Cluster::start(3, &[]).await?;
    let mut cl = c.client(0).await?;
    cl.put("before", "1", None).await?;
    // Member 2 has published its client URLs: it has run.
    let start = Instant::now();
    while cl
        .member_list()
        .await?
        .members()
        .iter()
        .any(|m| m.client_urls().is_empty())
    {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_id = c.members[2]
        .server
        .as_ref()
        .and_then(|s| s.node())
        .expect("node")
        .member
        .id;
    c.stop(2).await;
    std::fs::remove_dir_all(&c.members[2].dir)?;
    // An empty data directory under the old identity: refused, as etcd does.
    let ic = c.initial_cluster();
    let config = Config::load(c.members[2].args(&ic, "existing", &[]))?;
    let err = match metastore::server::start(&config).await {
        Ok(_) => anyhow::bail!("a member with an empty data directory rejoined under its old id"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("member {old_id:x} has already been bootstrapped")),
        "{err}"
    );
    // Removed and added again, it joins as a new member and gets the data.
    cl.member_remove(old_id).await?;
    let peer_url = format!("http://127.0.0.1:{}", c.members[2].peer);
    let added = cl.member_add([peer_url], None).await?;
    let new_id = added.member().map(|m| m.id()).expect("added member");
    assert_ne!(new_id, old_id);
    c.members[2].server = Some(metastore::server::start(&config).await?);
    let mut back = c.client(2).await?;
    assert_eq!(get(&mut back, "before", false).await?.as_deref(), Some("1"));
    Ok(())
}

/// Users, roles and the auth switch reach every member through Raft, and a member that was
/// down catches up on them from a snapshot (the `auth` table is in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_state_replicates_and_comes_with_snapshots() -> anyhow::Result<()> {
    use etcd_client::{ConnectOptions, Permission};
    let mut c = Cluster::start(3, &["--snapshot-count", "50", "--bcrypt-cost", "4"]).await?;
    let leader = c.wait_leader().await?;
    let lagging = (leader + 1) % 3;
    let writer = (leader + 2) % 3;
    c.stop(lagging).await;
    let mut cl = c.client(writer).await?;
    cl.user_add("root", "rootpw", None).await?;
    cl.user_grant_role("root", "root").await?;
    cl.role_add("r1").await?;
    cl.role_grant_permission("r1", Permission::read("s").with_prefix())
        .await?;
    cl.user_add("alice", "pw", None).await?;
    cl.user_grant_role("alice", "r1").await?;
    cl.auth_enable().await?;
    let urls: Vec<String> = c.members.iter().map(|m| m.url()).collect();
    let login = |i: usize, user: &str, pw: &str| {
        let url = urls[i].clone();
        let opts = ConnectOptions::new().with_user(user, pw);
        async move { Client::connect([url], Some(opts)).await }
    };
    let mut root = login(writer, "root", "rootpw").await?;
    for i in 0..300 {
        root.put(format!("s{i:04}"), format!("v{i}"), None).await?;
    }
    // The leader (another member than the one written to) enforces the same rules.
    let mut alice = login(leader, "alice", "pw").await?;
    assert_eq!(alice.get("s0001", None).await?.kvs().len(), 1);
    let e = alice.put("s0001", "x", None).await.expect_err("read only");
    assert_eq!(crate::common::status(e).0, tonic::Code::PermissionDenied);

    c.restart(lagging).await?;
    let start = Instant::now();
    loop {
        let node = c.members[lagging].server.as_ref().and_then(|s| s.node());
        if node.is_some_and(|n| n.auth.is_enabled() && n.store.current_revision() > 300) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(15), "never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = login(lagging, "alice", "pw").await?;
    assert_eq!(alice.get("s0299", None).await?.kvs().len(), 1);
    let e = alice.put("s0001", "x", None).await.expect_err("read only");
    assert_eq!(crate::common::status(e).0, tonic::Code::PermissionDenied);
    let mut root = login(lagging, "root", "rootpw").await?;
    assert_eq!(root.user_list().await?.users(), ["alice", "root"]);
    Ok(())
}

/// (snapshot index, purged index) of member `i`, as openraft reports them (0: none, or the
/// member is down).
fn raft_indexes(c: &Cluster, i: usize) -> (u64, u64) {
    let node = c.members[i].server.as_ref().and_then(|s| s.node());
    node.map_or((0, 0), |n| {
        let m = n.replica.raft.metrics().borrow().clone();
        (
            m.snapshot.map_or(0, |l| l.index),
            m.purged.map_or(0, |l| l.index),
        )
    })
}

/// Waits (up to 10 s) until each of `members` has purged its log up to at least `index`.
async fn wait_purged(c: &Cluster, members: &[usize], index: u64) -> anyhow::Result<()> {
    let state = || -> Vec<(u64, u64)> { members.iter().map(|&i| raft_indexes(c, i)).collect() };
    let start = Instant::now();
    while state().iter().any(|&(_, purged)| purged < index) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the log was never purged: (snapshot, purged) {:?}",
            state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The `.snap` files in a member's snapshot directory.
fn snapshot_files(member: &Member) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(member.dir.join("snap"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "snap"))
                .collect()
        })
        .unwrap_or_default()
}

/// A member alone records its Raft snapshots without writing the store to a file (as every
/// member does), starts again from its purged log, and builds the file when a member that
/// joins later needs it; that member catches up from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_alone_writes_no_snapshot_file_until_a_joining_member_needs_one(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1, &["--snapshot-count", "50"]).await?;
    let mut cl = c.client(0).await?;
    for i in 0..400 {
        cl.put(format!("a{i:04}"), format!("v{i}"), None).await?;
    }
    wait_purged(&c, &[0], 300).await?;
    assert_eq!(
        snapshot_files(&c.members[0]),
        Vec::<std::path::PathBuf>::new()
    );

    // A restart opens the purged log without a snapshot file, and removes what a build cut
    // short left.
    c.stop(0).await;
    let unfinished = c.members[0].dir.join("snap").join("1-1-350-1.tmp");
    std::fs::write(&unfinished, b"cut short")?;
    c.restart(0).await?;
    assert!(!unfinished.exists());
    c.wait_leader().await?;
    let mut cl = c.client(0).await?;
    assert_eq!(get(&mut cl, "a0007", false).await?.as_deref(), Some("v7"));
    let rev = cl
        .put("last", "1", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    assert_eq!(
        snapshot_files(&c.members[0]),
        Vec::<std::path::PathBuf>::new()
    );
    let spin = |c: &Cluster| {
        c.members[0]
            .server
            .as_ref()
            .and_then(|s| s.raft_idle_spin())
    };
    assert_eq!(
        spin(&c),
        Some(true),
        "alone, the Raft thread spins when idle"
    );

    // A learner joins: the entries it needs were purged, so it needs a snapshot.
    let peer = free_port()?;
    let added = cl
        .member_add(
            [format!("http://127.0.0.1:{peer}")],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await?;
    assert!(added.member().is_some());
    c.members.push(Member {
        name: "m1".into(),
        peer,
        client: free_port()?,
        dir: c._dir.path().join("m1"),
        server: None,
    });
    let ic = c.initial_cluster();
    let config = Config::load(c.members[1].args(&ic, "existing", &[]))?;
    c.members[1].server = Some(metastore::server::start(&config).await?);
    let start = Instant::now();
    loop {
        let node = c.members[1].server.as_ref().and_then(|s| s.node());
        if node.is_some_and(|n| n.store.current_revision() >= rev) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(15), "never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(snapshot_files(&c.members[0]).len(), 1, "built when needed");
    let mut learner = c.client(1).await?;
    for i in [0, 7, 399] {
        assert_eq!(
            get(&mut learner, &format!("a{i:04}"), true).await?,
            Some(format!("v{i}"))
        );
    }
    assert_eq!(get(&mut learner, "last", true).await?.as_deref(), Some("1"));
    // With a second member, whose replies do not ring the thread's bell, the spin is off.
    let start = Instant::now();
    while spin(&c) != Some(false) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the spin stayed on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A cluster that starts with one member runs Raft on a thread of its own (`raft::thread`),
/// and serves, stops and restarts on it as before; the members of a larger cluster share the
/// server's workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_cluster_started_with_one_member_runs_raft_on_its_own_thread() -> anyhow::Result<()>
{
    let own_thread = |c: &Cluster| -> Vec<bool> {
        c.members
            .iter()
            .map(|m| m.server.as_ref().is_some_and(|s| s.raft_on_own_thread()))
            .collect()
    };
    let three = Cluster::start(3, &[]).await?;
    assert_eq!(own_thread(&three), [false, false, false]);
    drop(three);

    let mut one = Cluster::start(1, &[]).await?;
    assert_eq!(own_thread(&one), [true]);
    let mut cl = one.client(0).await?;
    let mut rev = 0;
    for i in 0..50 {
        let put = cl.put(format!("k{i:02}"), format!("v{i}"), None).await?;
        rev = put.header().map_or(0, |h| h.revision());
    }
    assert_eq!(rev, 51);
    one.stop(0).await;
    one.restart(0).await?;
    one.wait_leader().await?;
    assert_eq!(own_thread(&one), [true]);
    let mut cl = one.client(0).await?;
    let all = cl
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await?;
    assert_eq!(all.count(), 50);
    assert_eq!(get(&mut cl, "k49", false).await?.as_deref(), Some("v49"));
    let put = cl.put("after", "restart", None).await?;
    assert_eq!(put.header().map_or(0, |h| h.revision()), 52);
    Ok(())
}
