//! [`TlsSetup`]: the TLS configurations the flags ask for, built once at start-up so that a
//! missing or unusable file is a startup error naming it.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};

use super::config::Config;
use crate::tls::{ReloadingCert, TlsError, CLIENT_ALPN, PEER_ALPN};

/// TLS for the client listeners, the peer listeners and outgoing peer connections.
#[derive(Default, Clone)]
pub struct TlsSetup {
    /// For `https://` client URLs (`--cert-file`, `--key-file`, `--trusted-ca-file` with
    /// `--client-cert-auth`).
    pub client: Option<Arc<ServerConfig>>,
    /// For `https://` peer URLs (`--peer-cert-file`, `--peer-key-file`,
    /// `--peer-trusted-ca-file` with `--peer-client-cert-auth`).
    pub peer: Option<Arc<ServerConfig>>,
    /// For dialling `https://` peers: verifies them with `--peer-trusted-ca-file` and presents
    /// the peer certificate, if one is configured.
    pub peer_client: Option<Arc<ClientConfig>>,
}

impl TlsSetup {
    /// Reads what `config` names. Files are only read for what is used: the client
    /// certificate when a client URL is https, the peer files when a peer URL is.
    pub fn new(config: &Config) -> Result<Self, TlsError> {
        let policy = config.tls_policy()?;
        let provider = policy.provider();
        let mut setup = Self::default();
        if config
            .listen_client_urls
            .iter()
            .any(|u| u.scheme() == "https")
        {
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                let pair = Arc::new(ReloadingCert::load(cert, key, provider.clone())?);
                let ca = config
                    .trusted_ca_file
                    .as_deref()
                    .filter(|_| config.client_cert_auth);
                setup.client = Some(policy.server_config(pair, ca, CLIENT_ALPN)?);
            }
        }
        // The peer files are read only when some peer URL is https (a sample configuration
        // may name them for a cluster that does not use them).
        let peer_tls = config
            .listen_peer_urls
            .iter()
            .chain(&config.initial_advertise_peer_urls)
            .any(|u| u.scheme() == "https")
            || config
                .initial_cluster_members()
                .map_err(|e| TlsError::Invalid(e.to_string()))?
                .iter()
                .any(|(_, u)| u.scheme() == "https");
        if !peer_tls {
            return Ok(setup);
        }
        let peer_pair = match (&config.peer_cert_file, &config.peer_key_file) {
            (Some(cert), Some(key)) => {
                Some(Arc::new(ReloadingCert::load(cert, key, provider.clone())?))
            }
            _ => None,
        };
        if config
            .listen_peer_urls
            .iter()
            .any(|u| u.scheme() == "https")
        {
            if let Some(pair) = &peer_pair {
                let ca = config
                    .peer_trusted_ca_file
                    .as_deref()
                    .filter(|_| config.peer_client_cert_auth);
                setup.peer = Some(policy.server_config(pair.clone(), ca, PEER_ALPN)?);
            }
        }
        if let Some(ca) = &config.peer_trusted_ca_file {
            setup.peer_client = Some(policy.client_config(ca, peer_pair)?);
        }
        Ok(setup)
    }
}
