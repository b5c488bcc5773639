//! The real etcdctl 3.4 (Debian's `etcd-client`, installed by `make deps`) against an in-process
//! server, with endpoints written as URLs: its per-endpoint commands then send
//! `:authority: http://127.0.0.1:PORT`, which the server must accept (see
//! `metastore::server::h2_authority`). HTTP/1.1 on the same port must be unaffected.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::TestServer;

/// Runs `etcdctl --endpoints=<endpoint> <args>`; returns its stdout, failing on a non-zero exit.
async fn etcdctl(endpoint: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("etcdctl {args:?} did not finish"))?
        .map_err(|e| anyhow::anyhow!("cannot run etcdctl (apt-get install etcd-client): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success() && !stderr.contains("RST_STREAM"),
        "etcdctl {args:?} with {endpoint}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    Ok(stdout)
}

/// `POST path` over HTTP/1.1 on a raw socket; returns status and body.
fn http_post(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad response: {buf}"))?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((status, body.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_with_url_endpoints() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let addr = s.addr();
    let url = format!("http://{addr}");

    assert_eq!(etcdctl(&url, &["put", "foo", "bar"]).await?, "OK\n");
    assert_eq!(etcdctl(&url, &["get", "foo"]).await?, "foo\nbar\n");
    // A trailing slash, as in `--endpoints=http://host:port/`.
    assert_eq!(
        etcdctl(&format!("{url}/"), &["get", "foo"]).await?,
        "foo\nbar\n"
    );

    // The per-endpoint commands: these are the ones that send the URL as `:authority`.
    let status = etcdctl(&url, &["endpoint", "status", "-w", "json"]).await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(status[0]["Endpoint"], url.as_str(), "{status}");
    assert_eq!(status[0]["Status"]["header"]["revision"], 2, "{status}");
    let hashkv = etcdctl(&url, &["endpoint", "hashkv", "-w", "json"]).await?;
    let hashkv: serde_json::Value = serde_json::from_str(&hashkv)?;
    assert_eq!(hashkv[0]["Endpoint"], url.as_str(), "{hashkv}");
    assert!(hashkv[0]["HashKV"]["hash"].as_u64().is_some(), "{hashkv}");
    let health = etcdctl(&url, &["endpoint", "health"]).await;
    // etcdctl 3.4 prints the health line on stderr; success is the exit code.
    health?;

    let members = etcdctl(&url, &["member", "list"]).await?;
    assert!(members.contains(", started, default, "), "{members}");

    // A Rust (h2) client and HTTP/1.1 on the same port are unaffected.
    let mut c = s.client().await?;
    let got = c.get("foo", None).await?;
    assert_eq!(got.kvs()[0].value(), b"bar");
    let (code, body) = tokio::task::spawn_blocking(move || {
        http_post(addr, "/v3/kv/range", r#"{"key":"Zm9v"}"#) // "foo"
    })
    .await??;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""value":"YmFy""#), "{body}"); // "bar"
    Ok(())
}
