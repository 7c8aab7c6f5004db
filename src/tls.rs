//! Optional TLS, and mutual TLS, on the gRPC port (rustls with the ring
//! provider). Certificate, key and client CA files are re-read when they change
//! (cert-manager or a Secret update renews them), and new connections use the new
//! ones; established connections keep theirs. Rejected handshakes are counted
//! (`docsidecar_tls_handshake_failures_total{reason}`) and logged, rate-limited.

use crate::background::FileWatcher;
use crate::telemetry::RateLimited;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// The PEM files that make up the server's TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::secret::read_bytes(path, "a TLS file").map_err(|e| TlsError(e.to_string()))
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{} holds no valid PEM certificate: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

impl TlsFiles {
    /// The files, in the order [`TlsFiles::server_config`] reads their contents.
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// The files' current bytes.
    fn contents(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        self.paths().iter().map(|p| read(p)).collect()
    }

    fn server_config(&self, contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = match (&self.client_ca, contents.get(2)) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                let cas = certs(path, pem)?;
                crate::x509::record_expiry("client_ca", &cas);
                for cert in cas {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| {
            TlsError(format!(
                "{} holds no valid PEM private key: {e}",
                self.key.display()
            ))
        })?;
        let chain = certs(&self.cert, &contents[0])?;
        // The leaf's expiry: the one that stops clients connecting.
        crate::x509::record_expiry("server", &chain[..1]);
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError(format!(
                "{} and {}: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        // gRPC is HTTP/2: clients negotiate it with ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The current TLS configuration, replaced when the files change.
pub struct TlsReloader {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    /// Rejected handshakes are logged at most this often.
    failures: RateLimited,
}

impl TlsReloader {
    /// Loads the files once: unusable files stop start-up.
    pub fn new(files: TlsFiles) -> Result<TlsReloader, TlsError> {
        let config = Arc::new(files.server_config(&files.contents()?)?);
        Ok(TlsReloader {
            files,
            config: RwLock::new(config),
            failures: RateLimited::new(Duration::from_secs(10)),
        })
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs renewed files; a broken renewal keeps the previous configuration.
    fn apply(&self, contents: &[Vec<u8>]) -> bool {
        match self.files.server_config(contents) {
            Ok(config) => {
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                info!("TLS certificate reloaded: new connections use it");
                true
            }
            // Files are often written one after the other: try again next tick.
            Err(e) => {
                warn!(error = %e, "keeping the previous TLS certificate");
                false
            }
        }
    }

    /// Reloads the files whenever they change; run it in the server's tasks.
    pub fn watch(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send {
        FileWatcher::new(self.files.paths()).run(move |contents| {
            let this = self.clone();
            async move { this.apply(&contents) }
        })
    }

    /// Completes the TLS handshake of an accepted connection by `deadline`. A
    /// rejected handshake (no client certificate, one the CA did not sign, not
    /// TLS at all) is counted by reason and logged at warn with the peer, at
    /// most one line per 10 s; a client that leaves or stalls is only counted.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        let error = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(e)) => e,
            Err(_) => {
                crate::metrics::tls_handshake_failed("timeout");
                debug!(%peer, "TLS handshake timed out");
                return None;
            }
        };
        let reason = failure_reason(&error);
        crate::metrics::tls_handshake_failed(reason);
        if reason == "closed" {
            // Health checkers and port scanners connect and leave: routine.
            debug!(%peer, error = %error, "connection closed during the TLS handshake");
        } else if let Some(suppressed) = self.failures.allow() {
            warn!(%peer, reason, error = %error, suppressed, "TLS handshake rejected");
        }
        None
    }
}

/// Why a TLS handshake failed, as a bounded metric label.
fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(_)) => "bad_certificate",
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::AlertReceived(_)) => "client_alert",
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::PeerMisbehaved(_)) => {
            "protocol"
        }
        Some(_) => "other",
        None => match e.kind() {
            std::io::ErrorKind::InvalidData => "protocol",
            _ => "closed",
        },
    }
}
