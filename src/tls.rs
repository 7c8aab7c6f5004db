//! Optional TLS, and mutual TLS, on the gRPC port (rustls with the ring
//! provider). Certificate, key and client CA files are re-read when they change
//! (cert-manager or a Secret update renews them), and new connections use the new
//! ones; established connections keep theirs.

use crate::background::FileWatcher;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

/// A client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
                for cert in certs(path, pem)? {
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
        let mut config = builder
            .with_single_cert(certs(&self.cert, &contents[0])?, key)
            .map_err(|e| {
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
}

impl TlsReloader {
    /// Loads the files once: unusable files stop start-up.
    pub fn new(files: TlsFiles) -> Result<TlsReloader, TlsError> {
        let config = Arc::new(files.server_config(&files.contents()?)?);
        Ok(TlsReloader {
            files,
            config: RwLock::new(config),
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

    /// Accepts TCP connections and completes TLS handshakes off the accept loop,
    /// so that a slow client delays nobody. Ends when the receiver is dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let reloader = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    accepted = listener.accept() => {
                        let (tcp, peer) = match accepted {
                            Ok(a) => a,
                            Err(e) => {
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        let _ = tcp.set_nodelay(true);
                        let acceptor = tokio_rustls::TlsAcceptor::from(reloader.config());
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(stream)) => {
                                    let _ = tx.send(Ok(TlsConn(stream))).await;
                                }
                                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A server-side TLS connection that tonic can serve.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
