//! TLS on the client and peer ports, with etcd's flags; rustls with the *ring* provider.
//!
//! # Layout
//! - [`TlsPolicy`]: `--tls-min-version`, `--tls-max-version`, `--cipher-suites` (Go's names,
//!   as etcd takes them) → the protocol versions and cipher suites rustls may use.
//! - [`reload`]: [`ReloadingCert`], a certificate and key reread when their files change (the
//!   server certificate, and the client certificate of outgoing peer connections).
//! - [`listener`]: handshakes in front of an accept loop; [`ClientIdentity`], the verified
//!   client certificate's common name, on every request of the connection.
//! - [`connector`]: client channels that speak TLS to `https://` URLs.
//! - [`cert_name`]: the subject common name from a certificate's DER.
//!
//! The scheme of a URL decides, as in etcd: an `https://` listen URL serves TLS (and only
//! TLS), an `https://` peer URL is dialled with TLS. The client port offers ALPN `h2` and
//! `http/1.1`, so gRPC, the JSON gateway, `/health`, `/version` and `/metrics` all work over
//! it. The trusted CA files are read at start-up; certificates and keys are reread when they
//! change on disk.

pub mod cert_name;
pub mod connector;
pub mod listener;
pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring::cipher_suite as cs;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite};

pub use connector::lazy_channel;
pub use listener::{incoming, ClientIdentity, TlsConn, TlsConnectInfo};
pub use reload::ReloadingCert;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{cert} and {key} are not a usable certificate and key: {source}")]
    KeyPair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("trusted CA file {path}: {reason}")]
    TrustedCa { path: PathBuf, reason: String },
    #[error(
        "unknown cipher suite {0:?} (expected Go's names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
    )]
    UnknownCipherSuite(String),
    #[error(
        "cipher suite {0} is not supported: MetaStore (rustls) implements only ECDHE with \
         AES-GCM or ChaCha20-Poly1305: {SUPPORTED_TLS12_NAMES}"
    )]
    UnsupportedCipherSuite(String),
    #[error("{flag}: unsupported TLS version {value:?} (expected TLS1.2 or TLS1.3)")]
    Version { flag: &'static str, value: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: an https URL needs a trusted CA to verify the server (--peer-trusted-ca-file for peers, --cacert for clients)")]
    NoClientTls { url: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS 1.2 suites rustls implements, by Go's names (for error messages).
const SUPPORTED_TLS12_NAMES: &str = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, \
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, \
    TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, \
    TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256";

/// Go's cipher suite names (`tls.CipherSuites()` and `tls.InsecureCipherSuites()`, which etcd
/// accepts) → the rustls suite, `None` for the ones rustls does not implement (CBC, RC4, 3DES,
/// static RSA key exchange). The TLS 1.3 suites are listed too: Go, and so etcd, accepts their
/// names but always enables all three; so does MetaStore.
fn go_cipher_suite(name: &str) -> Option<Option<SupportedCipherSuite>> {
    Some(match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
            Some(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        }
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
            Some(cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
        }
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            Some(cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => Some(cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => Some(cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            Some(cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)
        }
        "TLS_AES_128_GCM_SHA256" => Some(cs::TLS13_AES_128_GCM_SHA256),
        "TLS_AES_256_GCM_SHA384" => Some(cs::TLS13_AES_256_GCM_SHA384),
        "TLS_CHACHA20_POLY1305_SHA256" => Some(cs::TLS13_CHACHA20_POLY1305_SHA256),
        "TLS_RSA_WITH_RC4_128_SHA"
        | "TLS_RSA_WITH_3DES_EDE_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA256"
        | "TLS_RSA_WITH_AES_128_GCM_SHA256"
        | "TLS_RSA_WITH_AES_256_GCM_SHA384"
        | "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_RC4_128_SHA"
        | "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256" => None,
        _ => return None,
    })
}

/// A TLS protocol version as etcd's flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// Parses `TLS1.2` / `TLS1.3`; etcd's `TLS1.0` and `TLS1.1` are refused (rustls has
    /// neither).
    fn parse(flag: &'static str, value: &str) -> Result<Self, TlsError> {
        match value {
            "TLS1.2" => Ok(Self::Tls12),
            "TLS1.3" => Ok(Self::Tls13),
            _ => Err(TlsError::Version {
                flag,
                value: value.to_string(),
            }),
        }
    }
}

/// Protocol versions and cipher suites, shared by every TLS listener and peer client.
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// The TLS 1.2 suites allowed (all of rustls' when `--cipher-suites` is not given).
    tls12_suites: Vec<SupportedCipherSuite>,
}

impl Default for TlsPolicy {
    fn default() -> Self {
        Self {
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            tls12_suites: Vec::new(),
        }
    }
}

impl TlsPolicy {
    /// From etcd's flags: `--cipher-suites` (Go names; empty: rustls' defaults),
    /// `--tls-min-version` and `--tls-max-version` (empty: TLS1.3).
    pub fn parse(cipher_suites: &[String], min: &str, max: &str) -> Result<Self, TlsError> {
        let min_version = TlsVersion::parse("--tls-min-version", min)?;
        let max_version = if max.is_empty() {
            TlsVersion::Tls13
        } else {
            TlsVersion::parse("--tls-max-version", max)?
        };
        if max_version < min_version {
            return Err(TlsError::Invalid(format!(
                "--tls-max-version {max} is lower than --tls-min-version {min}"
            )));
        }
        let mut tls12_suites = Vec::new();
        for name in cipher_suites
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            match go_cipher_suite(name) {
                None => return Err(TlsError::UnknownCipherSuite(name.to_string())),
                Some(None) => return Err(TlsError::UnsupportedCipherSuite(name.to_string())),
                // TLS 1.3 suites are always on.
                Some(Some(s)) if s.tls13().is_some() => {}
                Some(Some(s)) => {
                    if !tls12_suites.contains(&s) {
                        tls12_suites.push(s);
                    }
                }
            }
        }
        let named = cipher_suites.iter().any(|s| !s.trim().is_empty());
        if named && min_version == TlsVersion::Tls13 {
            // etcd's rule: Go cannot configure TLS 1.3 suites.
            return Err(TlsError::Invalid(
                "--cipher-suites cannot be given when --tls-min-version is TLS1.3 (TLS 1.3 \
                 cipher suites are not configurable)"
                    .into(),
            ));
        }
        if named && tls12_suites.is_empty() && min_version == TlsVersion::Tls12 {
            return Err(TlsError::Invalid(
                "--cipher-suites names no TLS 1.2 cipher suite; TLS 1.2 clients could not connect"
                    .into(),
            ));
        }
        Ok(Self {
            min_version,
            max_version,
            tls12_suites,
        })
    }

    /// The ring provider restricted to the allowed suites.
    pub fn provider(&self) -> Arc<CryptoProvider> {
        let mut provider = rustls::crypto::ring::default_provider();
        if !self.tls12_suites.is_empty() {
            provider
                .cipher_suites
                .retain(|s| s.tls13().is_some() || self.tls12_suites.contains(s));
        }
        Arc::new(provider)
    }

    fn versions(&self) -> Vec<&'static rustls::SupportedProtocolVersion> {
        let mut v = Vec::new();
        if self.min_version <= TlsVersion::Tls12 {
            v.push(&rustls::version::TLS12);
        }
        if self.max_version >= TlsVersion::Tls13 {
            v.push(&rustls::version::TLS13);
        }
        v
    }

    /// A server configuration: `cert` presented, client certificates required and verified
    /// against `client_ca` when given. ALPN offers `alpn` in order.
    pub fn server_config(
        &self,
        cert: Arc<ReloadingCert>,
        client_ca: Option<&Path>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = self.provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions())?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = Arc::new(read_roots(path)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| TlsError::TrustedCa {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(cert);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A client configuration that verifies servers against `ca` and presents `cert`, if
    /// given. ALPN offers `h2` (gRPC).
    pub fn client_config(
        &self,
        ca: &Path,
        cert: Option<Arc<ReloadingCert>>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(self.provider())
            .with_protocol_versions(&self.versions())?
            .with_root_certificates(read_roots(ca)?);
        let mut config = match cert {
            Some(cert) => builder.with_client_cert_resolver(cert),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The certificates of a PEM CA bundle.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = reload::read_certs(path)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| TlsError::TrustedCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// ALPN of the client port: gRPC (HTTP/2) and the gateway and HTTP endpoints over HTTP/1.1.
pub const CLIENT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of the peer port: gRPC only.
pub const PEER_ALPN: &[&[u8]] = &[b"h2"];

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn policy_maps_etcd_flags() -> anyhow::Result<()> {
        let p = TlsPolicy::parse(&[], "TLS1.2", "")?;
        assert_eq!(p.versions().len(), 2);
        assert_eq!(
            p.provider().cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );

        let p = TlsPolicy::parse(
            &names(&[
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            ]),
            "TLS1.2",
            "TLS1.2",
        )?;
        assert_eq!(p.versions(), vec![&rustls::version::TLS12]);
        let suites: Vec<_> = p
            .provider()
            .cipher_suites
            .iter()
            .filter(|s| s.tls13().is_none())
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites,
            vec![
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );

        let p = TlsPolicy::parse(&[], "TLS1.3", "")?;
        assert_eq!(p.versions(), vec![&rustls::version::TLS13]);
        Ok(())
    }

    #[test]
    fn bad_policy_flags_are_clear_errors() {
        let err = |suites: &[&str], min: &str, max: &str| {
            TlsPolicy::parse(&names(suites), min, max)
                .map(|_| ())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(&["TLS_BOGUS"], "TLS1.2", "").contains("unknown cipher suite \"TLS_BOGUS\""));
        assert!(err(&["TLS_RSA_WITH_AES_128_CBC_SHA"], "TLS1.2", "").contains("not supported"));
        assert!(err(&[], "TLS1.0", "").contains("--tls-min-version"));
        assert!(err(&[], "tls12", "").contains("unsupported TLS version"));
        assert!(err(&[], "TLS1.3", "TLS1.2").contains("lower than"));
        assert!(
            err(&["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"], "TLS1.3", "")
                .contains("cannot be given")
        );
        assert!(err(&["TLS_AES_128_GCM_SHA256"], "TLS1.2", "").contains("no TLS 1.2"));
    }
}
