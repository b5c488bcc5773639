//! [`GrpcClusterApi`] against a real `metastore` whose client port serves TLS and requires
//! client certificates, as a cluster with `spec.tls.clientSecretName` runs: the member's
//! flags are the ones the operator renders (`--cert-file`, `--key-file`, `--trusted-ca-file`
//! from the mounted Secret, `--client-cert-auth`), and the operator's credentials come from
//! the same Secret ([`ClientTls::from_secret`]). Every key and certificate is generated here
//! with rcgen: a CA, one leaf for server and client use (etcd's usual member certificate), and
//! a second CA nobody trusts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use metastore_operator::controller::cluster_api::{ClientTls, ClusterApi, GrpcClusterApi};
use metastore_operator::plan::{ClusterView, HashCheck};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::real_cluster::binary_or_skip;

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
        Ok(Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf for server and client use, valid for `localhost` and 127.0.0.1: (cert, key) PEM.
    fn leaf(&self, cn: &str) -> anyhow::Result<(String, String)> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A Secret of type `kubernetes.io/tls` with `ca.crt`, as `spec.tls.clientSecretName` names.
fn tls_secret(ca: &str, cert: &str, key: &str) -> Secret {
    let data = [("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect::<BTreeMap<_, _>>();
    Secret {
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// A `metastore` process, killed when dropped.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One member serving `https://127.0.0.1:<port>` with the Secret's files mounted in `tls_dir`.
fn start(bin: &Path, dir: &Path, tls_dir: &Path) -> anyhow::Result<(Member, String)> {
    let ports = (0..3)
        .map(|_| metastore_testkit::free_port())
        .collect::<std::io::Result<Vec<_>>>()?;
    let (client, peer, metrics) = (ports[0], ports[1], ports[2]);
    let client_url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let tls = |f: &str| tls_dir.join(f).display().to_string();
    let log = std::fs::File::create(dir.join("member.log"))?;
    let child = Command::new(bin)
        .args([
            "--name=demo-0".to_string(),
            format!("--data-dir={}", dir.join("data").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=demo-0={peer_url}"),
            "--initial-cluster-state=new".to_string(),
            format!("--cert-file={}", tls("tls.crt")),
            format!("--key-file={}", tls("tls.key")),
            format!("--trusted-ca-file={}", tls("ca.crt")),
            "--client-cert-auth".to_string(),
            format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((Member(child), client_url))
}

/// Observes until the member answers as a healthy leader.
async fn observe_ready(api: &GrpcClusterApi, endpoints: &[String]) -> anyhow::Result<ClusterView> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(view) = api.observe(endpoints).await {
            if view.leader.is_some() && view.members.iter().all(|m| m.healthy) {
                return Ok(view);
            }
        }
        if Instant::now() > deadline {
            bail!("the member never answered over TLS");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn observes_over_tls_with_the_client_secret_and_fails_clearly_without_it(
) -> anyhow::Result<()> {
    let Some(bin) = binary_or_skip() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("metastore test CA")?;
    let other_ca = Ca::new("some other CA")?;
    let (cert, key) = ca.leaf("demo")?;
    let (stranger_cert, stranger_key) = other_ca.leaf("stranger")?;

    // The Secret as the pods mount it.
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir)?;
    std::fs::write(tls_dir.join("ca.crt"), &ca.pem)?;
    std::fs::write(tls_dir.join("tls.crt"), &cert)?;
    std::fs::write(tls_dir.join("tls.key"), &key)?;
    let (member, url) = start(&bin, dir.path(), &tls_dir)?;
    let endpoints = vec![url.clone()];

    // With the Secret's CA and identity: the full view, as over plain HTTP.
    let tls = ClientTls::from_secret(&tls_secret(&ca.pem, &cert, &key))?;
    let api = GrpcClusterApi::with_tls(&tls);
    let view = observe_ready(&api, &endpoints).await.with_context(|| {
        std::fs::read_to_string(dir.path().join("member.log")).unwrap_or_default()
    })?;
    assert_eq!(view.members.len(), 1);
    let m = &view.members[0];
    assert_eq!(m.name, "demo-0");
    assert!(m.healthy && m.applied_index > 0, "{m:?}");
    assert!(m.version.is_some(), "Status over TLS: {m:?}");
    assert_eq!(view.leader, Some(m.id));
    assert_eq!(view.hash, HashCheck::Agree, "HashKV over TLS");
    // The controller's path: the plain client turned into a TLS one for this cluster.
    let for_cluster = std::sync::Arc::new(GrpcClusterApi::default()).with_client_tls(&tls);
    let again = for_cluster
        .observe(&endpoints)
        .await
        .context("observe via with_client_tls")?;
    assert_eq!(again.leader, Some(m.id));

    // Without TLS configured: no view, and a call says why.
    let plain = GrpcClusterApi::default();
    assert!(plain.observe(&endpoints).await.is_none());
    let error = plain
        .promote(&endpoints, m.id)
        .await
        .expect_err("https without TLS")
        .to_string();
    assert!(
        error.contains(&url) && error.contains("no client TLS configured"),
        "{error}"
    );

    // A CA that did not sign the member's certificate: the handshake fails, and says so.
    let wrong_ca = GrpcClusterApi::with_tls(&ClientTls::from_secret(&tls_secret(
        &other_ca.pem,
        &cert,
        &key,
    ))?);
    assert!(wrong_ca.observe(&endpoints).await.is_none());
    let error = wrong_ca
        .promote(&endpoints, m.id)
        .await
        .expect_err("untrusted server certificate")
        .to_string();
    assert!(
        error.to_lowercase().contains("certificate"),
        "the cause is named: {error}"
    );

    // The right CA but a client certificate the member does not trust: refused.
    let stranger = GrpcClusterApi::with_tls(&ClientTls::from_secret(&tls_secret(
        &ca.pem,
        &stranger_cert,
        &stranger_key,
    ))?);
    assert!(stranger.observe(&endpoints).await.is_none());
    assert!(stranger.promote(&endpoints, m.id).await.is_err());

    drop(member);
    Ok(())
}

#[test]
fn a_secret_without_ca_crt_is_refused() {
    let mut secret = tls_secret("ca", "cert", "key");
    if let Some(data) = secret.data.as_mut() {
        data.remove("ca.crt");
    }
    let error = ClientTls::from_secret(&secret).expect_err("no ca.crt");
    assert!(error.to_string().contains("ca.crt"), "{error}");
    assert!(ClientTls::from_secret(&Secret::default()).is_err());
    let debug = format!(
        "{:?}",
        ClientTls::from_secret(&tls_secret("ca", "cert", "very secret key")).ok()
    );
    assert!(
        !debug.contains("very secret"),
        "the key is not printed: {debug}"
    );
}
