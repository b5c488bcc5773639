//! The JSON gRPC-gateway (`POST /v3/kv/*`, `/v3/maintenance/status`): answers and error bodies
//! as etcd's grpc-gateway writes them (checked against etcd 3.4.23).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use metastore_proto::etcdserverpb::watch_request::RequestUnion;
use metastore_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use prost::Message;
use serde_json::{json, Value};

use crate::common::TestServer;

/// A minimal HTTP/1.1 request with a body: (status, raw response head, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    http_with(addr, method, path, "", body)
}

/// [`http`] with extra header lines (`headers`, each ending in `\r\n`).
fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         {headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad response: {buf}"))?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    Ok((status, head.to_string(), body.to_string()))
}

/// POSTs raw bytes to the gateway: (HTTP status, parsed JSON answer).
async fn post_raw(addr: SocketAddr, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    let path = path.to_string();
    let (code, _, body) =
        tokio::task::spawn_blocking(move || http(addr, "POST", &path, &body)).await??;
    let v = serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{e}: {body}"))?;
    Ok((code, v))
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    post_raw(addr, path, serde_json::to_vec(&body)?).await
}

/// Standard base64 with padding, as the gateway spells bytes.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// etcd's gateway error body for a gRPC code and message.
fn grpc_error(code: i32, msg: &str) -> Value {
    json!({"error": msg, "code": code, "message": msg})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_range_delete() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let a = s.addr();
    let (code, put) = post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"a"), "value": b64(b"1")}),
    )
    .await?;
    assert_eq!(code, 200, "{put}");
    // Defaults are omitted, 64-bit integers are strings.
    assert_eq!(put["header"]["revision"], "2");
    assert!(put["header"]["member_id"].is_string());
    assert_eq!(put.as_object().map(|o| o.len()), Some(1), "{put}");
    post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"a/1"), "value": b64(b"x")}),
    )
    .await?;
    let (_, put) = post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"a"), "value": b64(b"2"), "prev_kv": true}),
    )
    .await?;
    assert_eq!(put["prev_kv"]["value"], b64(b"1"));

    let (code, r) = post(a, "/v3/kv/range", json!({"key": b64(b"a")})).await?;
    assert_eq!(code, 200);
    assert_eq!(
        r["kvs"],
        json!([{"key": "YQ==", "create_revision": "2", "mod_revision": "4", "version": "2",
                "value": b64(b"2")}])
    );
    assert_eq!(r["count"], "1");
    assert!(r.get("more").is_none(), "false is omitted: {r}");

    // Options by proto name or lowerCamelCase; enums by name or number; numbers as strings.
    let (_, r) = post(
        a,
        "/v3/kv/range",
        json!({"key": b64(b"a"), "range_end": b64(b"b"), "keysOnly": true, "limit": "1",
               "sort_order": "DESCEND", "sort_target": 0}),
    )
    .await?;
    assert_eq!(r["kvs"][0]["key"], b64(b"a/1"));
    assert!(r["kvs"][0].get("value").is_none());
    assert_eq!(
        (r["count"].clone(), r["more"].clone()),
        (json!("2"), json!(true))
    );
    let (_, r) = post(
        a,
        "/v3/kv/range",
        json!({"key": b64(b"a"), "range_end": b64(b"b"), "count_only": true, "unknown": 1}),
    )
    .await?;
    assert!(r.get("kvs").is_none());
    assert_eq!(r["count"], "2");

    let (code, d) = post(
        a,
        "/v3/kv/deleterange",
        json!({"key": b64(b"a"), "range_end": b64(b"b"), "prev_kv": true}),
    )
    .await?;
    assert_eq!(code, 200);
    assert_eq!(d["deleted"], "2");
    assert_eq!(d["prev_kvs"].as_array().map(Vec::len), Some(2));
    assert_eq!(d["header"]["revision"], "5");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let a = s.addr();
    post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"a"), "value": b64(b"1")}),
    )
    .await?;
    let body = json!({
        "compare": [{"key": b64(b"a"), "target": "VALUE", "result": "EQUAL", "value": b64(b"1")},
                    {"key": b64(b"a"), "target": 4, "result": "EQUAL", "lease": "0"}],
        "success": [{"request_put": {"key": b64(b"b"), "value": b64(b"2")}},
                    {"request_range": {"key": b64(b"b")}}],
        "failure": [{"request_range": {"key": b64(b"a")}}],
    });
    let (code, t) = post(a, "/v3/kv/txn", body).await?;
    assert_eq!(code, 200, "{t}");
    assert_eq!(t["succeeded"], true);
    assert_eq!(t["header"]["revision"], "3");
    assert_eq!(t["responses"][0]["response_put"]["header"]["revision"], "3");
    assert_eq!(
        t["responses"][1]["response_range"]["kvs"][0]["value"],
        b64(b"2")
    );

    let (code, t) = post(
        a,
        "/v3/kv/txn",
        json!({"compare": [{"key": b64(b"a"), "target": "VERSION", "result": "GREATER",
                            "version": "5"}],
               "failure": [{"request_range": {"key": b64(b"a"), "count_only": true}}]}),
    )
    .await?;
    assert_eq!(code, 200);
    assert!(t.get("succeeded").is_none(), "false is omitted: {t}");
    assert_eq!(t["responses"][0]["response_range"]["count"], "1");

    let (code, e) = post(
        a,
        "/v3/kv/txn",
        json!({"success": [{"request_put": {"key": b64(b"k")}}, {"request_put": {"key": b64(b"k")}}]}),
    )
    .await?;
    assert_eq!(
        (code, e),
        (
            400,
            grpc_error(3, "etcdserver: duplicate key given in txn request")
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_status() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let a = s.addr();
    for v in ["1", "2", "3"] {
        post(
            a,
            "/v3/kv/put",
            json!({"key": b64(b"a"), "value": b64(v.as_bytes())}),
        )
        .await?;
    }
    let (code, c) = post(
        a,
        "/v3/kv/compaction",
        json!({"revision": "3", "physical": true}),
    )
    .await?;
    assert_eq!((code, c["header"]["revision"].clone()), (200, json!("4")));
    let compacted = grpc_error(11, "etcdserver: mvcc: required revision has been compacted");
    assert_eq!(
        post(a, "/v3/kv/compaction", json!({"revision": "3"})).await?,
        (400, compacted.clone())
    );
    assert_eq!(
        post(a, "/v3/kv/range", json!({"key": b64(b"a"), "revision": 2})).await?,
        (400, compacted)
    );
    let (_, r) = post(
        a,
        "/v3/kv/range",
        json!({"key": b64(b"a"), "revision": "3"}),
    )
    .await?;
    assert_eq!(r["kvs"][0]["value"], b64(b"2"));

    let (code, st) = post(a, "/v3/maintenance/status", json!({})).await?;
    assert_eq!(code, 200, "{st}");
    assert!(
        st["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.5.")),
        "{st}"
    );
    // etcd's own spellings: `dbSize`, `raftIndex`, ... (the .proto's names), as strings.
    assert!(
        st["dbSize"]
            .as_str()
            .is_some_and(|v| v.parse::<u64>().is_ok()),
        "{st}"
    );
    assert!(st["dbSizeInUse"].is_string(), "{st}");
    assert_eq!(st["leader"], st["header"]["member_id"]);
    assert!(
        st["raftIndex"].is_string() && st["raftAppliedIndex"].is_string(),
        "{st}"
    );
    assert!(
        st.get("isLearner").is_none() && st.get("errors").is_none(),
        "{st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_as_etcd_writes_them() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-request-bytes", "1024"]).await?;
    let a = s.addr();
    let empty_key = grpc_error(3, "etcdserver: key is not provided");
    assert_eq!(
        post(a, "/v3/kv/range", json!({"key": ""})).await?,
        (400, empty_key.clone())
    );
    // No body, `{}` and `null` are the empty request.
    for body in ["", "{}", "null"] {
        assert_eq!(
            post_raw(a, "/v3/kv/range", body.into()).await?,
            (400, empty_key.clone())
        );
    }
    assert_eq!(
        post(a, "/v3/kv/put", json!({"value": b64(b"v")})).await?,
        (400, empty_key)
    );
    assert_eq!(
        post(
            a,
            "/v3/kv/range",
            json!({"key": b64(b"a"), "revision": "100"})
        )
        .await?,
        (
            400,
            grpc_error(
                11,
                "etcdserver: mvcc: required revision is a future revision"
            )
        )
    );
    assert_eq!(
        post(
            a,
            "/v3/kv/put",
            json!({"key": b64(b"a"), "value": b64(b"1"), "lease": "123"})
        )
        .await?,
        (404, grpc_error(5, "etcdserver: requested lease not found"))
    );
    assert_eq!(
        post_raw(a, "/v3/kv/range", b"[]".to_vec()).await?,
        (
            400,
            grpc_error(
                3,
                "json: cannot unmarshal array into Go value of type map[string]json.RawMessage"
            )
        )
    );
    // Malformed JSON, wrong types, unknown enum names: InvalidArgument with the decoder's
    // message (etcd's text comes from Go's encoding/json and differs).
    for body in [
        &b"{bad"[..],
        br#"{"key": 5}"#,
        br#"{"key": "YQ==", "count_only": "true"}"#,
        br#"{"key": "YQ==", "limit": "x"}"#,
        br#"{"key": "YQ==", "sort_order": "FOO"}"#,
    ] {
        let (code, e) = post_raw(a, "/v3/kv/range", body.to_vec()).await?;
        assert_eq!((code, e["code"].clone()), (400, json!(3)), "{e}");
        assert_eq!(e["error"], e["message"]);
        assert_eq!(e.as_object().map(|o| o.len()), Some(3), "{e}");
    }

    // Over --max-request-bytes: the service's own error, as over gRPC.
    let (code, e) = post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"a"), "value": b64(&[b'x'; 2000])}),
    )
    .await?;
    assert_eq!(
        (code, e),
        (400, grpc_error(3, "etcdserver: request is too large"))
    );
    // Over the gRPC receive limit (+512 KiB): grpc-go's ResourceExhausted, HTTP 429.
    let (code, e) = post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"a"), "value": b64(&vec![b'x'; 600 * 1024])}),
    )
    .await?;
    assert_eq!((code, e["code"].clone()), (429, json!(8)), "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("grpc: received message larger than max (")),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_and_cors() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let a = s.addr();
    let (get, options) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Ok((
            http(a, "GET", "/v3/kv/range", b"")?,
            http(a, "OPTIONS", "/v3/kv/put", b"")?,
        ))
    })
    .await??;
    assert_eq!((get.0, get.2.as_str()), (405, "Method Not Allowed\n"));
    assert_eq!(options.0, 200);
    let head = options.1.to_ascii_lowercase();
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("access-control-allow-methods: post, get, options, put, delete"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_and_maintenance_routes() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let addr = s.addr();
    let (code, v) = post(addr, "/v3/lease/grant", json!({"TTL": 30, "ID": 4660})).await?;
    assert_eq!(
        (code, &v["ID"], &v["TTL"]),
        (200, &json!("4660"), &json!("30"))
    );
    let (code, _) = post(
        addr,
        "/v3/kv/put",
        json!({"key": b64(b"a"), "value": b64(b"1"), "lease": 4660}),
    )
    .await?;
    assert_eq!(code, 200);
    let (code, v) = post(
        addr,
        "/v3/lease/timetolive",
        json!({"ID": 4660, "keys": true}),
    )
    .await?;
    assert_eq!(
        (code, &v["grantedTTL"], &v["keys"]),
        (200, &json!("30"), &json!([b64(b"a")]))
    );
    let (code, v) = post(addr, "/v3/kv/lease/leases", json!({})).await?;
    assert_eq!((code, &v["leases"]), (200, &json!([{"ID": "4660"}])));
    let (code, v) = post(addr, "/v3/lease/grant", json!({"TTL": 30, "ID": 4660})).await?;
    assert_eq!(
        (code, v),
        (412, grpc_error(9, "etcdserver: lease already exists"))
    );
    let (code, _) = post(addr, "/v3/lease/revoke", json!({"ID": 4660})).await?;
    assert_eq!(code, 200);
    let (code, v) = post(addr, "/v3/kv/lease/revoke", json!({"ID": 4660})).await?;
    assert_eq!(
        (code, v),
        (404, grpc_error(5, "etcdserver: requested lease not found"))
    );
    let (code, v) = post(addr, "/v3/lease/timetolive", json!({"ID": 4660})).await?;
    assert_eq!((code, &v["TTL"]), (200, &json!("-1")));
    let (code, v) = post(addr, "/v3/kv/range", json!({"key": b64(b"a")})).await?;
    assert_eq!(
        (code, v.get("kvs")),
        (200, None),
        "revoking deleted the attached key"
    );
    // etcd answers these two without a header.
    assert_eq!(
        post(addr, "/v3/maintenance/alarm", json!({})).await?,
        (200, json!({}))
    );
    assert_eq!(
        post(addr, "/v3/maintenance/defragment", json!({})).await?,
        (200, json!({}))
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Streaming routes: `POST /v3/watch`, `POST /v3/lease/keepalive` (checked against etcd 3.4.23
// with `curl -N --raw`).
// ---------------------------------------------------------------------------------------------

/// A streaming gateway call over one connection: the response head, then one HTTP chunk at a
/// time. The request body is sent whole, or chunk by chunk with [`send`](Self::send).
struct HttpStream {
    writer: TcpStream,
    reader: std::io::BufReader<TcpStream>,
    status: u16,
    head: String,
}

impl HttpStream {
    /// POSTs `body` whole and reads the response head.
    fn post(addr: SocketAddr, path: &str, body: &[u8]) -> anyhow::Result<Self> {
        let mut s = Self::connect(addr)?;
        write!(
            s.writer,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )?;
        s.writer.write_all(body)?;
        s.read_head()?;
        Ok(s)
    }

    /// Starts a POST with a chunked body; send requests with [`send`](Self::send), then read
    /// the head with [`read_head`](Self::read_head).
    fn post_chunked(addr: SocketAddr, path: &str) -> anyhow::Result<Self> {
        let mut s = Self::connect(addr)?;
        write!(
            s.writer,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        )?;
        Ok(s)
    }

    fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let writer = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        writer.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = std::io::BufReader::new(writer.try_clone()?);
        Ok(Self {
            writer,
            reader,
            status: 0,
            head: String::new(),
        })
    }

    /// Sends one chunk of the request body.
    fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        write!(self.writer, "{:x}\r\n", data.len())?;
        self.writer.write_all(data)?;
        self.writer.write_all(b"\r\n")?;
        Ok(())
    }

    /// Ends a chunked request body.
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(self.writer.write_all(b"0\r\n\r\n")?)
    }

    fn read_head(&mut self) -> anyhow::Result<()> {
        use std::io::BufRead;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            anyhow::ensure!(self.reader.read_line(&mut line)? > 0, "eof in head: {head}");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        self.status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad response: {head}"))?;
        self.head = head.to_ascii_lowercase();
        Ok(())
    }

    /// The next chunk of a chunked answer; `None` at the end of the body.
    fn chunk(&mut self) -> anyhow::Result<Option<String>> {
        use std::io::BufRead;
        anyhow::ensure!(
            self.head.contains("transfer-encoding: chunked"),
            "not chunked: {}",
            self.head
        );
        let mut size = String::new();
        self.reader.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        let mut data = vec![0; n + 2];
        self.reader.read_exact(&mut data)?;
        anyhow::ensure!(data.ends_with(b"\r\n"), "bad chunk");
        data.truncate(n);
        Ok((n > 0).then(|| String::from_utf8(data)).transpose()?)
    }

    /// The next line of a stream (each in its own chunk, as etcd writes them), parsed.
    fn line(&mut self) -> anyhow::Result<Value> {
        let chunk = self
            .chunk()?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        anyhow::ensure!(
            chunk.ends_with('\n') && chunk.matches('\n').count() == 1,
            "{chunk:?}"
        );
        Ok(serde_json::from_str(&chunk)?)
    }
}

/// Polls `f` until it is true (up to 5 s).
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> tokio::task::JoinHandle<anyhow::Result<T>> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let (a, node) = (s.addr(), s.server.node().cloned());
    let node = node.ok_or_else(|| anyhow::anyhow!("no node"))?;
    let (_, put) = post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"foo"), "value": b64(b"bar")}),
    )
    .await?;
    let ids = format!(
        r#""cluster_id":"{}","member_id":"{}""#,
        put["header"]["cluster_id"].as_str().unwrap_or_default(),
        put["header"]["member_id"].as_str().unwrap_or_default()
    );
    let term = put["header"]["raft_term"].clone();
    let header = |rev: i64| format!(r#"{{{ids},"revision":"{rev}","raft_term":{term}}}"#);

    let body = json!({"create_request": {"key": b64(b"foo"), "prev_kv": true}}).to_string();
    let mut w = blocking(move || HttpStream::post(a, "/v3/watch", body.as_bytes())).await??;
    assert_eq!(w.status, 200);
    assert!(
        w.head.contains("content-type: application/json"),
        "{}",
        w.head
    );
    assert!(w
        .head
        .contains("grpc-metadata-content-type: application/grpc"));
    assert!(w.head.contains("access-control-allow-origin: *"));
    // Byte for byte as etcd writes it: proto names, int64 as strings, defaults omitted.
    let (created, w) = blocking(move || Ok((w.chunk()?, w))).await??;
    assert_eq!(
        created.as_deref(),
        Some(format!(r#"{{"result":{{"header":{},"created":true}}}}"#, header(2)) + "\n")
            .as_deref()
    );
    assert_eq!(node.watch.watcher_count(), 1);

    post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"foo"), "value": b64(b"baz")}),
    )
    .await?;
    post(a, "/v3/kv/deleterange", json!({"key": b64(b"foo")})).await?;
    let (put_ev, del_ev, w) = blocking(move || {
        let mut w = w;
        Ok((w.chunk()?, w.chunk()?, w))
    })
    .await??;
    let kv2 =
        r#"{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}"#;
    let kv3 =
        r#"{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmF6"}"#;
    assert_eq!(
        put_ev.as_deref(),
        Some(
            format!(
                r#"{{"result":{{"header":{},"events":[{{"kv":{kv3},"prev_kv":{kv2}}}]}}}}"#,
                header(3)
            ) + "\n"
        )
        .as_deref()
    );
    assert_eq!(
        del_ev.as_deref(),
        Some(
            format!(
                r#"{{"result":{{"header":{},"events":[{{"type":"DELETE","kv":{{"key":"Zm9v","mod_revision":"4"}},"prev_kv":{kv3}}}]}}}}"#,
                header(4)
            ) + "\n"
        )
        .as_deref()
    );

    // The client goes away: its watcher is released.
    drop(w);
    assert!(eventually(|| node.watch.watcher_count() == 0).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_requests_in_one_body() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let a = s.addr();
    let node = s
        .server
        .node()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no node"))?;
    for v in [b"1", b"2"] {
        post(a, "/v3/kv/put", json!({"key": b64(b"a"), "value": b64(v)})).await?;
    }
    // Requests sent one at a time on a chunked body, as grpc-gateway reads them.
    let mut w = blocking(move || {
        let mut w = HttpStream::post_chunked(a, "/v3/watch")?;
        w.send(br#"{"create_request":{"key":"YQ==","start_revision":"2","watch_id":"7"}}"#)?;
        w.read_head()?;
        Ok(w)
    })
    .await??;
    assert_eq!(w.status, 200);
    let (created, history, w) = blocking(move || Ok((w.line()?, w.line()?, w))).await??;
    assert_eq!(
        (
            &created["result"]["watch_id"],
            &created["result"]["created"]
        ),
        (&json!("7"), &json!(true))
    );
    let revs: Vec<_> = history["result"]["events"]
        .as_array()
        .map(|e| e.iter().map(|e| e["kv"]["mod_revision"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(revs, [json!("2"), json!("3")]);

    // Then a progress request, a create with an inverted range and a cancel, in one chunk.
    let (progress, refused, canceled, w) = blocking(move || {
        let mut w = w;
        w.send(
            br#"{"progress_request":{}}
{"create_request":{"key":"Yg==","range_end":"YQ=="}} {"cancel_request":{"watch_id":"7"}}"#,
        )?;
        Ok((w.line()?, w.line()?, w.line()?, w))
    })
    .await??;
    assert_eq!(progress["result"]["watch_id"], json!("-1"));
    assert_eq!(progress["result"]["header"]["revision"], json!("3"));
    assert_eq!(progress["result"].as_object().map(|o| o.len()), Some(2));
    let r = &refused["result"];
    assert_eq!(
        (
            &r["watch_id"],
            &r["created"],
            &r["canceled"],
            &r["cancel_reason"]
        ),
        (
            &json!("-1"),
            &json!(true),
            &json!(true),
            &json!("mvcc: watcher range is empty")
        )
    );
    assert_eq!(
        (
            &canceled["result"]["watch_id"],
            &canceled["result"]["canceled"]
        ),
        (&json!("7"), &json!(true))
    );
    assert_eq!(node.watch.watcher_count(), 0);

    // An undecodable later request ends the client half only: the stream stays open and a
    // new watcher created before it keeps working.
    let w = blocking(move || {
        let mut w = w;
        w.send(br#"{"create_request":{"key":"Yg=="}}{bad"#)?;
        w.finish()?;
        let created = w.line()?;
        anyhow::ensure!(created["result"]["created"] == json!(true), "{created}");
        Ok(w)
    })
    .await??;
    post(
        a,
        "/v3/kv/put",
        json!({"key": b64(b"b"), "value": b64(b"x")}),
    )
    .await?;
    let (ev, w) = blocking(move || {
        let mut w = w;
        Ok((w.line()?, w))
    })
    .await??;
    assert_eq!(ev["result"]["events"][0]["kv"]["key"], json!(b64(b"b")));
    assert_eq!(node.watch.watcher_count(), 1);
    drop(w);
    assert!(eventually(|| node.watch.watcher_count() == 0).await);

    // A client that goes away in the middle of its body releases its watchers too.
    let w = blocking(move || {
        let mut w = HttpStream::post_chunked(a, "/v3/watch")?;
        w.send(br#"{"create_request":{"key":"YQ=="}} {"create_request":"#)?;
        w.read_head()?;
        w.line()?;
        Ok(w)
    })
    .await??;
    assert_eq!(node.watch.watcher_count(), 1);
    drop(w);
    assert!(eventually(|| node.watch.watcher_count() == 0).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_errors() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-request-bytes", "1024"]).await?;
    let a = s.addr();
    let node = s
        .server
        .node()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no node"))?;
    // A first request that does not decode: the plain error body, code 2 (Unknown), HTTP 500.
    let (code, e) = post_raw(a, "/v3/watch", b"[]".to_vec()).await?;
    assert_eq!(
        (code, e),
        (
            500,
            grpc_error(
                2,
                "json: cannot unmarshal array into Go value of type map[string]json.RawMessage"
            )
        )
    );
    // (Unknown fields are ignored: `{"ID":"x"}` is an empty watch request, a create request
    // an empty keepalive request.)
    for (path, body) in [
        ("/v3/watch", &b"{bad"[..]),
        ("/v3/watch", br#"{"create_request":{"key":5}}"#),
        ("/v3/lease/keepalive", b"{bad"),
        ("/v3/lease/keepalive", br#"{"ID":"x"}"#),
    ] {
        let (code, e) = post_raw(a, path, body.to_vec()).await?;
        assert_eq!((code, e["code"].clone()), (500, json!(2)), "{path} {e}");
        assert_eq!(e["error"], e["message"]);
    }
    // Over --max-request-bytes is fine for a watch (etcd checks it on writes only)...
    let key = b64(&[b'k'; 2000]);
    let body = json!({"create_request": {"key": key}}).to_string();
    let mut w = blocking(move || HttpStream::post(a, "/v3/watch", body.as_bytes())).await??;
    let (created, w) = blocking(move || Ok((w.line()?, w))).await??;
    assert_eq!(created["result"]["created"], json!(true));
    drop(w);
    // ...but over the gRPC receive limit the stream fails: grpc-gateway's stream error, 429.
    let key = vec![b'k'; 600 * 1024];
    let big = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.clone().into(),
            ..Default::default()
        })),
    };
    let body = json!({"create_request": {"key": b64(&key)}}).to_string();
    let mut w = blocking(move || HttpStream::post(a, "/v3/watch", body.as_bytes())).await??;
    assert_eq!(w.status, 429);
    assert!(!w.head.contains("grpc-metadata"), "{}", w.head);
    let (line, end, _w) = blocking(move || Ok((w.chunk()?, w.chunk()?, w))).await??;
    // The error line has no newline after it (grpc-gateway writes one after results only).
    let line: Value = serde_json::from_str(line.as_deref().unwrap_or_default())?;
    assert_eq!(
        line,
        json!({"error": {"grpc_code": 8, "http_code": 429, "http_status": "Too Many Requests",
            "message": format!("grpc: received message larger than max ({} vs. {})",
                big.encoded_len(), 1024 + 512 * 1024)}})
    );
    assert_eq!(end, None, "the stream ends after the error");

    // A watch with no request answers nothing (no status line) until the client goes away.
    let pending = blocking(move || {
        let mut w = HttpStream::connect(a)?;
        w.writer
            .set_read_timeout(Some(Duration::from_millis(500)))?;
        write!(
            w.writer,
            "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut b = [0u8; 1];
        Ok(matches!(
            w.reader.read(&mut b),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut
        ))
    })
    .await??;
    assert!(pending, "an empty watch body answers nothing");
    assert!(eventually(|| node.watch.watcher_count() == 0).await);

    // Wrong method, unknown route, as etcd answers them.
    let (get, nope, nope_root) = blocking(move || {
        Ok((
            http(a, "GET", "/v3/watch", b"")?,
            http(a, "POST", "/v3/nope", b"{}")?,
            http(a, "POST", "/v3/kv/lease/keepalive", b"{}")?,
        ))
    })
    .await??;
    assert_eq!((get.0, get.2.as_str()), (405, "Method Not Allowed\n"));
    for r in [nope, nope_root] {
        assert_eq!((r.0, r.2.as_str()), (404, "Not Found\n"));
        assert!(r
            .1
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: *"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_stream() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let a = s.addr();
    post(a, "/v3/lease/grant", json!({"TTL": 30, "ID": 4660})).await?;
    // One answer per request, then the stream ends (etcd's server returns when the client
    // half ends).
    let (w, lines, end) = blocking(move || {
        let mut w = HttpStream::post(a, "/v3/lease/keepalive", br#"{"ID":4660} {"ID":"999"}{}"#)?;
        let lines = [w.chunk()?, w.chunk()?, w.chunk()?];
        let end = w.chunk()?;
        Ok((w, lines, end))
    })
    .await??;
    assert_eq!(w.status, 200);
    assert!(w
        .head
        .contains("grpc-metadata-content-type: application/grpc"));
    assert_eq!(end, None);
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l.as_deref().unwrap_or("null")))
        .collect::<Result<_, _>>()?;
    let result = |i: usize| {
        let mut r = lines[i]["result"].clone();
        r.as_object_mut().map(|o| o.remove("header"));
        r
    };
    assert_eq!(result(0), json!({"ID": "4660", "TTL": "30"}));
    // An unknown lease: TTL 0, omitted (etcd3gw's refresh() then returns -1).
    assert_eq!(result(1), json!({"ID": "999"}));
    assert_eq!(result(2), json!({}));
    assert!(lines[2]["result"]["header"]["revision"].is_string());

    // No request: 200 with an empty body and no gRPC metadata.
    let (w, end) = blocking(move || {
        let mut w = HttpStream::post(a, "/v3/lease/keepalive", b"")?;
        let end = w.chunk()?;
        Ok((w, end))
    })
    .await??;
    assert_eq!((w.status, end), (200, None));
    assert!(!w.head.contains("grpc-metadata"), "{}", w.head);
    Ok(())
}

/// `POST path` with `token` in the `Authorization` header, as etcd's gateway takes it.
async fn post_as(
    addr: SocketAddr,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<(u16, Value)> {
    let (path, body) = (path.to_string(), serde_json::to_vec(&body)?);
    let headers = format!("Authorization: {token}\r\n");
    let (code, _, body) =
        tokio::task::spawn_blocking(move || http_with(addr, "POST", &path, &headers, &body))
            .await??;
    Ok((code, serde_json::from_str(&body)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_routes_and_authorization_header() -> anyhow::Result<()> {
    let s = TestServer::start(&["--bcrypt-cost", "4"]).await?;
    let a = s.addr();
    for (path, body) in [
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "rootpw"}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/role/add", json!({"name": "r1"})),
        (
            "/v3/auth/role/grant",
            json!({"name": "r1", "perm": {"permType": "READ", "key": b64(b"k")}}),
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "alice", "password": "pw"}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "alice", "role": "r1"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        let (code, v) = post(a, path, body).await?;
        assert_eq!(code, 200, "{path}: {v}");
    }
    let (code, v) = post(a, "/v3/auth/status", json!({})).await?;
    assert_eq!((code, &v["enabled"]), (200, &json!(true)), "{v}");
    let (code, v) = post(a, "/v3/kv/range", json!({"key": b64(b"k")})).await?;
    assert_eq!(
        (code, v),
        (400, grpc_error(3, "etcdserver: user name is empty"))
    );
    let token = |name: &str, password: &str| {
        let body = json!({"name": name, "password": password});
        async move {
            let (code, v) = post(a, "/v3/auth/authenticate", body).await?;
            anyhow::ensure!(code == 200, "{v}");
            Ok::<_, anyhow::Error>(v["token"].as_str().unwrap_or_default().to_string())
        }
    };
    let root = token("root", "rootpw").await?;
    let alice = token("alice", "pw").await?;
    let (code, _) = post_as(
        a,
        &root,
        "/v3/kv/put",
        json!({"key": b64(b"k"), "value": b64(b"v")}),
    )
    .await?;
    assert_eq!(code, 200);
    let (code, v) = post_as(a, &alice, "/v3/kv/range", json!({"key": b64(b"k")})).await?;
    assert_eq!((code, &v["count"]), (200, &json!("1")), "{v}");
    let (code, v) = post_as(
        a,
        &alice,
        "/v3/kv/put",
        json!({"key": b64(b"k"), "value": b64(b"x")}),
    )
    .await?;
    assert_eq!(
        (code, v),
        (403, grpc_error(7, "etcdserver: permission denied"))
    );
    let (code, v) = post_as(a, "forged.7", "/v3/kv/range", json!({"key": b64(b"k")})).await?;
    assert_eq!(
        (code, v),
        (401, grpc_error(16, "etcdserver: invalid auth token"))
    );
    let (code, v) = post_as(a, &alice, "/v3/auth/user/list", json!({})).await?;
    assert_eq!(
        (code, v),
        (403, grpc_error(7, "etcdserver: permission denied"))
    );
    let (code, v) = post_as(a, &root, "/v3/auth/user/list", json!({})).await?;
    assert_eq!((code, &v["users"]), (200, &json!(["alice", "root"])), "{v}");
    Ok(())
}
