//! The JSON gRPC-gateway (`POST /v3/kv/*`, `/v3/maintenance/status`): answers and error bodies
//! as etcd's grpc-gateway writes them (checked against etcd 3.4.23).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::TestServer;

/// A minimal HTTP/1.1 request with a body: (status, raw response head, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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
