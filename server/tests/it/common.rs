use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use metastore::server::{config::Config, Server};

/// A server running in this process on a free loopback port.
pub struct TestServer {
    pub server: Server,
    pub _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let mut args = vec![
            "metastore".to_string(),
            "--listen-client-urls".into(),
            "http://127.0.0.1:0".into(),
            // One member: its peer port is never dialled, but tests run in parallel.
            "--listen-peer-urls".into(),
            "http://127.0.0.1:0".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = Config::load(args)?;
        let server = metastore::server::start(&config).await?;
        wait_ready(&server).await?;
        Ok(Self { server, _dir: dir })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.client_addrs()[0]
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect([format!("http://{}", self.addr())], None).await?)
    }
}

/// Waits until the member leads or follows a leader and has published its name and client
/// URLs: what `/health` reports, and when etcd starts serving clients.
pub async fn wait_ready(server: &Server) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let node = server
            .node()
            .ok_or_else(|| anyhow::anyhow!("server stopped"))?;
        let published = node
            .replica
            .membership()
            .get_node(&node.member.id)
            .is_some_and(|m| m.name == node.member.name && !m.client_urls.is_empty());
        if published && node.replica.leader_id().is_some() {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "member not ready after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The real `metastore` binary, as a child process.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

/// A loopback port for a server started later (see `metastore_testkit::free_port`).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(metastore_testkit::free_port()?)
}

impl Proc {
    pub fn spawn(data_dir: &Path, port: u16, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_logging(data_dir, port, extra_env, Stdio::inherit())
    }

    /// [`spawn`](Self::spawn), with the server's log (its stderr) going to `log`.
    pub fn spawn_logging(
        data_dir: &Path,
        port: u16,
        extra_env: &[(&str, &str)],
        log: Stdio,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metastore"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .env(
                "METASTORE_LISTEN_CLIENT_URLS",
                format!("http://127.0.0.1:{port}"),
            )
            .env("METASTORE_LISTEN_PEER_URLS", "http://127.0.0.1:0")
            .env("METASTORE_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let p = Self { child, addr };
        p.wait_healthy(Duration::from_secs(20))?;
        Ok(p)
    }

    /// The binary with `args` (no program name), serving clients on `addr`; not waited for.
    pub fn spawn_args(args: &[String], addr: SocketAddr) -> anyhow::Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_metastore"))
            .args(args)
            .env("METASTORE_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self { child, addr })
    }

    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/health") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                anyhow::bail!("metastore on {} not healthy after {timeout:?}", self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect([format!("http://{}", self.addr)], None).await?)
    }

    pub fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} failed");
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad response: {buf}"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The gRPC status of a failed call.
pub fn status(e: etcd_client::Error) -> (tonic::Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

pub type Kv = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

/// Every key (with its revisions, version and lease) at `rev` (0: now), and the header
/// revision.
pub async fn everything(c: &mut Client, rev: i64) -> anyhow::Result<(i64, Vec<Kv>)> {
    let r = c
        .get(
            "\0",
            Some(GetOptions::new().with_from_key().with_revision(rev)),
        )
        .await?;
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect();
    Ok((r.header().map_or(0, |h| h.revision()), kvs))
}
