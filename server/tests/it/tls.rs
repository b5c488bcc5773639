//! TLS on the client and peer ports with etcd's flags. Every key and certificate is generated
//! here, at test time, with rcgen: a CA, server and client certificates it signs, a second CA
//! nobody trusts, and an expired client certificate.
//!
//! Clients: the `etcd-client` crate (tonic + rustls), the real `etcdctl` 3.4 (Go's TLS), and raw
//! rustls connections that look at the handshake itself (presented certificate, ALPN, alerts).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use metastore::server::{config::Config, Server};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{free_port, http_get, wait_ready};

/// A certificate authority of the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf for server and client use (etcd's usual single cert per member), valid for
    /// `localhost` and 127.0.0.1 plus `extra_sans`.
    fn leaf(&self, cn: &str, serial: u64, extra_sans: &[&str]) -> anyhow::Result<Leaf> {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(extra_sans.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(serial.into());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params)
    }

    /// A client certificate that expired in 2020.
    fn expired(&self, cn: &str) -> anyhow::Result<Leaf> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

/// PEM files on disk, as the flags want them.
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Leaf {
    fn write(&self, dir: &Path, name: &str) -> anyhow::Result<Files> {
        let files = Files {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        replace_file(&files.cert, &self.cert_pem)?;
        replace_file(&files.key, &self.key_pem)?;
        Ok(files)
    }
}

/// Writes `path` atomically (a temporary file renamed over it), as rotation tools do.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The PKI of one test: a trusted CA, a CA nobody trusts, and their files.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    other_ca: Ca,
    other_ca_file: PathBuf,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("metastore test CA")?;
        let other_ca = Ca::new("some other CA")?;
        let ca_file = dir.path().join("ca.crt");
        let other_ca_file = dir.path().join("other-ca.crt");
        std::fs::write(&ca_file, &ca.pem)?;
        std::fs::write(&other_ca_file, &other_ca.pem)?;
        Ok(Self {
            dir,
            ca,
            ca_file,
            other_ca,
            other_ca_file,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// One in-process member serving clients on `https://127.0.0.1:PORT` with `server` as its
/// certificate; `--client-cert-auth` with the PKI's CA when `client_auth`.
async fn start_tls_server(
    pki: &Pki,
    server: &Files,
    client_auth: bool,
    extra: &[String],
) -> anyhow::Result<(Server, SocketAddr)> {
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}");
    let mut args = vec![
        "metastore".to_string(),
        "--data-dir".into(),
        s(&pki.path().join(format!("data-{port}"))),
        "--listen-client-urls".into(),
        url.clone(),
        "--advertise-client-urls".into(),
        url,
        "--listen-peer-urls".into(),
        "http://127.0.0.1:0".into(),
        "--cert-file".into(),
        s(&server.cert),
        "--key-file".into(),
        s(&server.key),
    ];
    if client_auth {
        args.extend([
            "--trusted-ca-file".to_string(),
            s(&pki.ca_file),
            "--client-cert-auth".into(),
        ]);
    }
    args.extend(extra.iter().cloned());
    let server = metastore::server::start(&Config::load(args)?).await?;
    wait_ready(&server).await?;
    let addr = server.client_addrs()[0];
    Ok((server, addr))
}

/// An etcd-client over TLS: trusts `ca_pem`, presents `identity` if given.
async fn tls_client(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&Leaf>,
) -> anyhow::Result<Client> {
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    let options = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    Ok(Client::connect([format!("https://{addr}")], Some(options)).await?)
}

/// A rustls client configuration: trusts `ca_pem`, presents `identity` if given, offers `alpn`.
fn rustls_client(
    ca_pem: &str,
    identity: Option<&Leaf>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every probe does a full handshake: a resumed TLS 1.3 session shows the certificate of
    // the session it resumes, not the one the server would present now.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// What a raw TLS connection saw.
struct Probe {
    /// The server's leaf certificate (DER).
    server_cert: Vec<u8>,
    alpn: Option<Vec<u8>>,
    /// `GET /health` over HTTP/1.1 on the connection: the whole response.
    response: String,
}

/// Connects to `addr` with `config` (server name `localhost`), completes the handshake and
/// sends `GET /health` over HTTP/1.1. An error names the failure (a TLS alert from the server
/// shows as "received fatal alert: ...").
async fn probe(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> anyhow::Result<Probe> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tls = connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (_, conn) = tls.get_ref();
        let server_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let alpn = conn.alpn_protocol().map(|p| p.to_vec());
        tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        anyhow::Ok(Probe {
            server_cert,
            alpn,
            response: String::from_utf8_lossy(&buf).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow::anyhow!("TLS probe of {addr} timed out"))?
}

/// The protocol ALPN chose for a connection with `config`.
async fn negotiated_alpn(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Option<Vec<u8>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from("localhost")?, tcp),
    )
    .await??;
    Ok(tls.get_ref().1.alpn_protocol().map(|p| p.to_vec()))
}

/// Runs the real etcdctl with `args`; `Ok(stdout)` on success, `Err(stderr)` on failure.
async fn etcdctl(args: &[String]) -> anyhow::Result<Result<String, String>> {
    let mut cmd = tokio::process::Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .args(["--dial-timeout=2s", "--command-timeout=3s"])
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("etcdctl {args:?} did not finish"))?
        .map_err(|e| anyhow::anyhow!("cannot run etcdctl (apt-get install etcd-client): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok(if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}: {stderr}", out.status))
    })
}

fn tls_args(endpoint: &str, ca: &Path, client: Option<&Files>) -> Vec<String> {
    let mut a = vec![
        format!("--endpoints={endpoint}"),
        format!("--cacert={}", s(ca)),
    ];
    if let Some(f) = client {
        a.push(format!("--cert={}", s(&f.cert)));
        a.push(format!("--key={}", s(&f.key)));
    }
    a
}

fn with(mut base: Vec<String>, more: &[&str]) -> Vec<String> {
    base.extend(more.iter().map(|s| s.to_string()));
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_right_ca_and_cert_work() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_files = pki.ca.leaf("server", 1, &[])?.write(pki.path(), "server")?;
    let client = pki.ca.leaf("alice", 2, &[])?;
    let client_files = client.write(pki.path(), "client")?;
    let (_server, addr) = start_tls_server(&pki, &server_files, true, &[]).await?;

    // The etcd-client crate (tonic with rustls).
    let mut c = tls_client(addr, &pki.ca.pem, Some(&client)).await?;
    c.put("k", "from-crate", None).await?;
    let got = c.get("k", None).await?;
    assert_eq!(got.kvs()[0].value(), b"from-crate");

    // The real etcdctl (Go's TLS), including a per-endpoint command whose `:authority` is a
    // URL (rewritten inside TLS).
    let endpoint = format!("https://127.0.0.1:{}", addr.port());
    let args = tls_args(&endpoint, &pki.ca_file, Some(&client_files));
    let out = etcdctl(&with(args.clone(), &["put", "k2", "from-etcdctl"])).await?;
    assert_eq!(out.map_err(anyhow::Error::msg)?.trim(), "OK");
    let out = etcdctl(&with(args.clone(), &["get", "k", "--print-value-only"])).await?;
    assert_eq!(out.map_err(anyhow::Error::msg)?.trim(), "from-crate");
    let out = etcdctl(&with(args.clone(), &["endpoint", "status", "-w", "json"])).await?;
    assert!(out.map_err(anyhow::Error::msg)?.contains("\"leader\""));
    let got = c.get("k2", None).await?;
    assert_eq!(got.kvs()[0].value(), b"from-etcdctl");

    // /health over HTTPS (HTTP/1.1 by ALPN); a gRPC client gets h2.
    let p = probe(
        addr,
        rustls_client(&pki.ca.pem, Some(&client), &[b"http/1.1"])?,
    )
    .await?;
    assert!(p.response.starts_with("HTTP/1.1 200"), "{}", p.response);
    assert!(
        p.response.contains(r#"{"health":"true","reason":""}"#),
        "{}",
        p.response
    );
    assert_eq!(p.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let alpn = negotiated_alpn(
        addr,
        rustls_client(&pki.ca.pem, Some(&client), &[b"h2", b"http/1.1"])?,
    )
    .await?;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_clients_and_plain_tcp_are_refused() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_files = pki.ca.leaf("server", 1, &[])?.write(pki.path(), "server")?;
    let good = pki.ca.leaf("alice", 2, &[])?;
    let untrusted = pki.other_ca.leaf("mallory", 3, &[])?;
    let untrusted_files = untrusted.write(pki.path(), "untrusted")?;
    let expired = pki.ca.expired("old")?;
    let expired_files = expired.write(pki.path(), "expired")?;
    let good_files = good.write(pki.path(), "good")?;
    let (_server, addr) = start_tls_server(&pki, &server_files, true, &[]).await?;

    // The control: the right CA and a valid client certificate.
    let ok = probe(addr, rustls_client(&pki.ca.pem, Some(&good), &[])?).await?;
    assert!(ok.response.starts_with("HTTP/1.1 200"), "{}", ok.response);

    // A client trusting another CA refuses the server's certificate.
    let e = probe(addr, rustls_client(&pki.other_ca.pem, Some(&good), &[])?)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("UnknownIssuer"), "wrong CA: {e}");

    // The server refuses a client certificate from an untrusted CA, an expired one, and none.
    for (what, identity, alert) in [
        ("untrusted client cert", Some(&untrusted), "UnknownCA"),
        ("expired client cert", Some(&expired), "CertificateExpired"),
        ("no client cert", None, "CertificateRequired"),
    ] {
        let r = probe(addr, rustls_client(&pki.ca.pem, identity, &[])?).await;
        let e = match r {
            Ok(p) => panic!("{what}: served: {}", p.response),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(alert), "{what}: expected alert {alert}: {e}");
    }

    // The same with the real etcdctl: only the right CA and a valid certificate get through.
    let endpoint = format!("https://127.0.0.1:{}", addr.port());
    let get = ["get", "k"];
    let ok = etcdctl(&with(
        tls_args(&endpoint, &pki.ca_file, Some(&good_files)),
        &get,
    ))
    .await?;
    assert!(ok.is_ok(), "{ok:?}");
    for (what, args) in [
        (
            "wrong CA",
            tls_args(&endpoint, &pki.other_ca_file, Some(&good_files)),
        ),
        (
            "untrusted client cert",
            tls_args(&endpoint, &pki.ca_file, Some(&untrusted_files)),
        ),
        (
            "expired client cert",
            tls_args(&endpoint, &pki.ca_file, Some(&expired_files)),
        ),
        ("no client cert", tls_args(&endpoint, &pki.ca_file, None)),
        (
            "plain HTTP/2 to the TLS port",
            vec![format!("--endpoints=http://127.0.0.1:{}", addr.port())],
        ),
    ] {
        let r = etcdctl(&with(args, &get)).await?;
        assert!(r.is_err(), "{what}: etcdctl succeeded: {r:?}");
    }

    // Plain HTTP/1.1 to the TLS port gets no HTTP answer.
    let plain = http_get(addr, "/health");
    assert!(
        !matches!(plain, Ok((200, _))),
        "plain TCP served: {plain:?}"
    );
    // And the etcd-client crate over plain TCP cannot use it.
    let plain_client = async {
        let mut c = Client::connect(
            [format!("http://{addr}")],
            Some(
                ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(3)),
            ),
        )
        .await?;
        c.get("k", None).await?;
        anyhow::Ok(())
    };
    let r = tokio::time::timeout(Duration::from_secs(5), plain_client).await;
    assert!(!matches!(r, Ok(Ok(()))), "plain gRPC served");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_common_name_reaches_the_connection() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server = pki.ca.leaf("server", 1, &[])?.write(pki.path(), "server")?;
    let client = pki.ca.leaf("alice", 2, &[])?;
    let policy = metastore::tls::TlsPolicy::default();
    let pair = Arc::new(metastore::tls::ReloadingCert::load(
        &server.cert,
        &server.key,
        policy.provider(),
    )?);
    let config = policy.server_config(pair, Some(&pki.ca_file), metastore::tls::CLIENT_ALPN)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut incoming = metastore::tls::incoming(listener, config);

    // A plain TCP connection first: it never shows up, and does not stop the next one.
    let mut plain = tokio::net::TcpStream::connect(addr).await?;
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let client_task = tokio::spawn(probe(addr, rustls_client(&pki.ca.pem, Some(&client), &[])?));
    let conn = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio_stream::StreamExt;
        incoming.next().await
    })
    .await?
    .ok_or_else(|| anyhow::anyhow!("listener ended"))??;
    let info = tonic::transport::server::Connected::connect_info(&conn);
    assert_eq!(
        info.client,
        Some(metastore::tls::ClientIdentity {
            common_name: "alice".into()
        })
    );
    assert!(info.remote_addr.is_some());
    let mut ext = http::Extensions::new();
    ext.insert(info);
    assert_eq!(
        metastore::tls::ClientIdentity::of(&ext).map(|c| c.common_name.as_str()),
        Some("alice")
    );
    drop(conn);
    client_task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_server_certificate_is_served_without_restart() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let first = pki.ca.leaf("server", 100, &[])?;
    let files = first.write(pki.path(), "server")?;
    let client = pki.ca.leaf("alice", 2, &[])?;
    let (_server, addr) = start_tls_server(&pki, &files, true, &[]).await?;
    let config = rustls_client(&pki.ca.pem, Some(&client), &[])?;
    assert_eq!(probe(addr, config.clone()).await?.server_cert, first.der);
    let mut c = tls_client(addr, &pki.ca.pem, Some(&client)).await?;
    c.put("before", "1", None).await?;

    // Rotate: a new key pair with another serial and another SAN, written over the old files.
    let second = pki.ca.leaf("server", 200, &["rotated.example"])?;
    assert_ne!(first.der, second.der);
    second.write(pki.path(), "server")?;
    let start = Instant::now();
    loop {
        let p = probe(addr, config.clone()).await?;
        if p.server_cert == second.der {
            assert!(p.response.starts_with("HTTP/1.1 200"), "{}", p.response);
            break;
        }
        assert_eq!(
            p.server_cert, first.der,
            "neither the old nor the new certificate"
        );
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the rotated certificate was not served after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the rotation still works; so does a new one.
    c.put("after", "2", None).await?;
    let mut fresh = tls_client(addr, &pki.ca.pem, Some(&client)).await?;
    assert_eq!(fresh.get("after", None).await?.kvs()[0].value(), b"2");

    // A broken pair on disk (a key that does not match) keeps the last good one in service.
    std::fs::write(&files.key, KeyPair::generate()?.serialize_pem())?;
    tokio::time::sleep(metastore::tls::reload::CHECK_INTERVAL + Duration::from_millis(200)).await;
    let p = probe(addr, config.clone()).await?;
    assert_eq!(p.server_cert, second.der);
    Ok(())
}

/// A member of a TLS cluster: https peer URLs, peer certificates signed by `peer_ca`.
struct PeerMember {
    name: String,
    peer: u16,
    client: u16,
    files: Files,
}

fn peer_args(pki: &Pki, m: &PeerMember, initial_cluster: &str, trusted_ca: &Path) -> Vec<String> {
    [
        "metastore",
        "--name",
        &m.name,
        "--data-dir",
        &s(&pki.path().join(&m.name)),
        "--listen-client-urls",
        &format!("http://127.0.0.1:{}", m.client),
        "--advertise-client-urls",
        &format!("http://127.0.0.1:{}", m.client),
        "--listen-peer-urls",
        &format!("https://127.0.0.1:{}", m.peer),
        "--initial-advertise-peer-urls",
        &format!("https://127.0.0.1:{}", m.peer),
        "--initial-cluster",
        initial_cluster,
        "--peer-cert-file",
        &s(&m.files.cert),
        "--peer-key-file",
        &s(&m.files.key),
        "--peer-trusted-ca-file",
        &s(trusted_ca),
        "--peer-client-cert-auth",
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
        "--cipher-suites",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Three members; the last one's peer certificate comes from `last_ca` (and it trusts only
/// that CA) when given.
async fn peer_cluster(pki: &Pki, bad_last: bool) -> anyhow::Result<(Vec<PeerMember>, Vec<Server>)> {
    let mut members = Vec::new();
    for i in 0..3 {
        let name = format!("m{i}");
        let ca = if bad_last && i == 2 {
            &pki.other_ca
        } else {
            &pki.ca
        };
        let files = ca.leaf(&name, 10 + i, &[])?.write(pki.path(), &name)?;
        members.push(PeerMember {
            name,
            peer: free_port()?,
            client: free_port()?,
            files,
        });
    }
    let ic = members
        .iter()
        .map(|m| format!("{}=https://127.0.0.1:{}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    let mut starts = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let ca = if bad_last && i == 2 {
            &pki.other_ca_file
        } else {
            &pki.ca_file
        };
        let config = Config::load(peer_args(pki, m, &ic, ca))?;
        starts.push(tokio::spawn(async move {
            metastore::server::start(&config).await
        }));
    }
    let mut servers = Vec::new();
    for s in starts {
        servers.push(s.await??);
    }
    Ok((members, servers))
}

/// Polls until `f` holds, for at most `limit`.
async fn eventually(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f() {
        anyhow::ensure!(start.elapsed() < limit, "{what}: not after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn local_value(server: &Server, key: &str) -> Option<Vec<u8>> {
    let node = server.node()?;
    let r = node
        .store
        .range(
            &metastore::mvcc::KeyRange::Single(key.as_bytes().to_vec()),
            metastore::mvcc::RangeOptions::default(),
        )
        .ok()?;
    r.kvs.first().map(|kv| kv.value.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_over_https_peer_urls_replicates() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let (members, servers) = peer_cluster(&pki, false).await?;
    for s in &servers {
        wait_ready(s).await?;
    }
    let mut c = Client::connect([format!("http://127.0.0.1:{}", members[0].client)], None).await?;
    c.put("replicated", "over-tls", None).await?;
    for (m, s) in members.iter().zip(&servers) {
        eventually(Duration::from_secs(10), &m.name, || {
            local_value(s, "replicated").as_deref() == Some(&b"over-tls"[..])
        })
        .await?;
    }
    let list = c.member_list().await?;
    assert_eq!(list.members().len(), 3);
    for m in list.members() {
        assert!(
            m.peer_urls().iter().all(|u| u.starts_with("https://")),
            "{:?}",
            m.peer_urls()
        );
    }
    // The peer port speaks only TLS: plain TCP gets nothing from it.
    let peer: SocketAddr = format!("127.0.0.1:{}", members[1].peer).parse()?;
    assert!(!matches!(http_get(peer, "/"), Ok((200, _))));

    // A fourth member joins over TLS: `member add`, then `--initial-cluster-state existing`,
    // which asks the others for the membership over the peer port (and then gets the data).
    let m3 = PeerMember {
        name: "m3".into(),
        peer: free_port()?,
        client: free_port()?,
        files: pki.ca.leaf("m3", 13, &[])?.write(pki.path(), "m3")?,
    };
    let peer_url = format!("https://127.0.0.1:{}", m3.peer);
    c.member_add([peer_url.clone()], None).await?;
    let ic = members
        .iter()
        .chain(std::iter::once(&m3))
        .map(|m| format!("{}=https://127.0.0.1:{}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = peer_args(&pki, &m3, &ic, &pki.ca_file);
    args.extend(["--initial-cluster-state".to_string(), "existing".into()]);
    let joined = metastore::server::start(&Config::load(args)?).await?;
    eventually(Duration::from_secs(15), "m3 catches up", || {
        local_value(&joined, "replicated").as_deref() == Some(&b"over-tls"[..])
    })
    .await?;
    joined.shutdown().await;
    for s in servers {
        s.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_with_a_peer_cert_from_another_ca_cannot_join() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let (members, servers) = peer_cluster(&pki, true).await?;
    // m0 and m1 form a quorum and serve writes.
    wait_ready(&servers[0]).await?;
    wait_ready(&servers[1]).await?;
    let mut c = Client::connect([format!("http://127.0.0.1:{}", members[0].client)], None).await?;
    c.put("k", "v", None).await?;
    eventually(Duration::from_secs(10), "m1 replicates", || {
        local_value(&servers[1], "k").is_some()
    })
    .await?;
    // m2 never hears from them: no leader, no data, for a couple of election timeouts more.
    let bad = &servers[2];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let node = bad.node().ok_or_else(|| anyhow::anyhow!("m2 stopped"))?;
        assert_eq!(node.replica.leader_id(), None, "m2 found a leader");
        assert_eq!(local_value(bad, "k"), None, "m2 received data");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.put("k2", "v2", None).await?;
    for s in servers {
        s.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metastore_ctl_speaks_tls() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_files = pki.ca.leaf("server", 1, &[])?.write(pki.path(), "server")?;
    let client_files = pki.ca.leaf("ops", 2, &[])?.write(pki.path(), "client")?;
    let (_server, addr) = start_tls_server(&pki, &server_files, true, &[]).await?;
    let endpoint = format!("--endpoints=https://127.0.0.1:{}", addr.port());
    let run = |extra: Vec<String>| {
        let endpoint = endpoint.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_metastore-ctl"))
                .args(["migrate", &endpoint, "--to=1", "--wait", "--timeout=20s"])
                .args(["--poll-interval=200ms"])
                .args(extra)
                .output()
        })
    };
    let ok = run(vec![
        format!("--cacert={}", s(&pki.ca_file)),
        format!("--cert={}", s(&client_files.cert)),
        format!("--key={}", s(&client_files.key)),
    ])
    .await??;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("format 1"));
    let no_ca = run(vec![]).await??;
    assert!(!no_ca.status.success());
    assert!(
        String::from_utf8_lossy(&no_ca.stderr).contains("trusted CA"),
        "{}",
        String::from_utf8_lossy(&no_ca.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_are_clear_startup_errors() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server = pki.ca.leaf("server", 1, &[])?.write(pki.path(), "server")?;
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "metastore",
            "--engine",
            "memory",
            "--listen-client-urls",
            "https://127.0.0.1:0",
            "--listen-peer-urls",
            "http://127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let config_err = |args: Vec<String>| {
        Config::load(args)
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = config_err(base(&[]));
    assert!(e.contains("--cert-file, --key-file"), "{e}");
    let cert = s(&server.cert);
    let key = s(&server.key);
    let e = config_err(base(&[
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--client-cert-auth",
    ]));
    assert!(e.contains("--trusted-ca-file"), "{e}");
    let e = config_err(base(&[
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--cipher-suites",
        "TLS_NOT_A_SUITE",
    ]));
    assert!(
        e.contains("unknown cipher suite \"TLS_NOT_A_SUITE\""),
        "{e}"
    );
    let e = config_err(base(&[
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--tls-min-version",
        "TLS1.1",
    ]));
    assert!(e.contains("--tls-min-version"), "{e}");

    let start_err = |args: Vec<String>| async move {
        match metastore::server::start(&Config::load(args)?).await {
            Ok(_) => anyhow::bail!("started"),
            Err(e) => anyhow::Ok(e.to_string()),
        }
    };
    let missing = s(&pki.path().join("missing.crt"));
    let e = start_err(base(&["--cert-file", &missing, "--key-file", &key])).await?;
    assert!(
        e.contains("cannot read") && e.contains("missing.crt"),
        "{e}"
    );
    // A key that is not the certificate's.
    let other = pki.ca.leaf("other", 5, &[])?.write(pki.path(), "other")?;
    let other_key = s(&other.key);
    let e = start_err(base(&["--cert-file", &cert, "--key-file", &other_key])).await?;
    assert!(e.contains("not a usable certificate and key"), "{e}");
    // A PEM file that is not a certificate.
    let e = start_err(base(&["--cert-file", &key, "--key-file", &key])).await?;
    assert!(e.contains("no PEM certificate"), "{e}");
    Ok(())
}

/// With `--client-cert-auth` and auth on, a request without a token is the user its
/// certificate names (etcd's `AuthInfoFromTLS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_client_certificate_common_name_is_the_user() -> anyhow::Result<()> {
    use etcd_client::Permission;
    let pki = Pki::new()?;
    let server_files = pki.ca.leaf("server", 1, &[])?.write(pki.path(), "server")?;
    let root_cert = pki.ca.leaf("root", 2, &[])?;
    let alice_cert = pki.ca.leaf("alice", 3, &[])?;
    let mallory_cert = pki.ca.leaf("mallory", 4, &[])?;
    let extra = ["--bcrypt-cost".to_string(), "4".into()];
    let (_server, addr) = start_tls_server(&pki, &server_files, true, &extra).await?;
    let mut root = tls_client(addr, &pki.ca.pem, Some(&root_cert)).await?;
    root.user_add("root", "rootpw", None).await?;
    root.user_grant_role("root", "root").await?;
    root.role_add("r1").await?;
    root.role_grant_permission("r1", Permission::read("k").with_prefix())
        .await?;
    root.user_add("alice", "pw", None).await?;
    root.user_grant_role("alice", "r1").await?;
    root.put("k1", "v", None).await?;
    root.auth_enable().await?;

    assert_eq!(root.user_list().await?.users(), ["alice", "root"]);
    let mut alice = tls_client(addr, &pki.ca.pem, Some(&alice_cert)).await?;
    assert_eq!(alice.get("k1", None).await?.kvs().len(), 1);
    let e = alice.put("k1", "x", None).await.expect_err("read only");
    assert_eq!(crate::common::status(e).0, tonic::Code::PermissionDenied);
    let e = alice.user_list().await.expect_err("not root");
    assert_eq!(crate::common::status(e).0, tonic::Code::PermissionDenied);
    let mut mallory = tls_client(addr, &pki.ca.pem, Some(&mallory_cert)).await?;
    let e = mallory.get("k1", None).await.expect_err("no such user");
    assert_eq!(crate::common::status(e).0, tonic::Code::PermissionDenied);
    Ok(())
}
