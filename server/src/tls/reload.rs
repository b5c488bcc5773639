//! [`ReloadingCert`]: a certificate and key read from files, reread when the files change, so
//! that rotating them on disk needs no restart.
//!
//! Every TLS handshake asks for the current key pair (as server certificate, or as the client
//! certificate of an outgoing peer connection). At most once per [`CHECK_INTERVAL`] that asks
//! the file system for both files' modification time, size and inode (two `stat` calls); the
//! files are read and parsed again only when one of those changed. A pair that does not load
//! (a half-written file, a key that does not match the certificate) is logged and the previous
//! pair stays in use; its files are looked at again after the next interval, so a rotation
//! written in two steps is picked up once both are in place. Kubernetes' Secret volumes swap a
//! symlink: `stat` follows it, so the swap shows as a new inode.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::TlsError;

/// How often the files are checked for changes, at most.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A certificate chain and private key from PEM files, reread when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    /// A std mutex: held for two `stat` calls (and, after a change, reading two small files),
    /// never across an `.await`.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    current: Arc<CertifiedKey>,
    /// The files as they were when `current` was read from them.
    stamp: Option<Stamp>,
    checked: Instant,
}

/// What tells that a file changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    cert: FileStamp,
    key: FileStamp,
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

fn stamp(cert: &Path, key: &Path) -> Option<Stamp> {
    Some(Stamp {
        cert: file_stamp(cert)?,
        key: file_stamp(key)?,
    })
}

/// Reads a PEM certificate chain (leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("no usable PEM private key: {e}"),
    })
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let der = read_key(key)?;
    CertifiedKey::from_der(chain, der, provider).map_err(|source| TlsError::KeyPair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

impl ReloadingCert {
    /// Reads the pair once; an unreadable or mismatched pair is an error here (at start-up),
    /// and only a warning on later reloads.
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let stamp = stamp(cert_file, key_file);
        let current = Arc::new(load(cert_file, key_file, &provider)?);
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            state: Mutex::new(State {
                current,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The pair to use now, after rereading the files if they changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.checked.elapsed() < CHECK_INTERVAL {
            return state.current.clone();
        }
        state.checked = Instant::now();
        // The stamp is taken before reading: a write that lands while we read shows as a
        // change at the next check.
        let now = stamp(&self.cert_file, &self.key_file);
        if now.is_none() || now == state.stamp {
            return state.current.clone();
        }
        match load(&self.cert_file, &self.key_file, &self.provider) {
            Ok(pair) => {
                tracing::info!(
                    cert = %self.cert_file.display(),
                    key = %self.key_file.display(),
                    "TLS certificate reloaded"
                );
                state.current = Arc::new(pair);
                state.stamp = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed on disk but cannot be loaded; keeping the previous one");
            }
        }
        state.current.clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
