//! The gRPC port's socket: TCP (optionally with TLS) or a Unix socket.

use crate::tls::TlsReloader;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tracing::info;

/// Where to listen: a TCP socket address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("a Unix socket address needs a path: unix:/path/to.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(format!(
                "`{s}` is not HOST:PORT (for example 127.0.0.1:50051) or unix:/path/to.sock"
            ));
        }
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => f.write_str(addr),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound gRPC socket.
pub enum Listener {
    Tcp(TcpListener),
    Tls(TcpListener, Arc<TlsReloader>),
    Unix(UnixSocket),
}

/// A Unix socket whose file is removed when the listener closes.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An accepted connection, before any handshake.
pub enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Tls(TcpStream, SocketAddr, Arc<TlsReloader>),
    Unix(UnixStream),
}

impl Accepted {
    /// The peer, for log lines.
    pub fn peer(&self) -> String {
        match self {
            Accepted::Tcp(_, peer) | Accepted::Tls(_, peer, _) => peer.to_string(),
            Accepted::Unix(_) => "unix".into(),
        }
    }
}

impl Listener {
    pub(super) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Small request/response pairs: do not let Nagle delay them.
                let _ = stream.set_nodelay(true);
                Ok(Accepted::Tcp(stream, peer))
            }
            Listener::Tls(l, tls) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Accepted::Tls(stream, peer, tls.clone()))
            }
            Listener::Unix(s) => Ok(Accepted::Unix(s.listener.accept().await?.0)),
        }
    }

    /// Where it listens (the real port when 0 was asked for).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => {
                ListenAddr::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default())
            }
            Listener::Unix(s) => ListenAddr::Unix(s.path.clone()),
        }
    }

    /// Serves TLS on a TCP listener; a Unix socket is already private to the pod.
    pub fn with_tls(self, tls: Arc<TlsReloader>) -> Result<Listener, Listener> {
        match self {
            Listener::Tcp(l) => Ok(Listener::Tls(l, tls)),
            other => Err(other),
        }
    }
}

/// Binds `addr`. A Unix socket file left by a process that is gone is
/// replaced; one that something still answers on is refused, never taken over.
pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
    match addr {
        ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a.as_str()).await?)),
        ListenAddr::Unix(path) => {
            remove_stale_socket(path)?;
            Ok(Listener::Unix(UnixSocket {
                listener: UnixListener::bind(path)?,
                path: path.clone(),
            }))
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        // Not ours to remove: bind reports the path as taken.
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is serving on this socket: stop it first, or listen on another path",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)?;
            info!(socket = %path.display(), "removed a stale socket file (nothing was listening on it)");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/tmp/s.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/s.sock".into()))
        );
        assert!("[::1]:50051".parse::<ListenAddr>().is_ok());
        assert!("localhost".parse::<ListenAddr>().is_err());
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = ListenAddr::Unix(path.clone());
        let first = bind(&addr).await.unwrap();
        let err = bind(&addr).await.err().expect("a live socket is refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists(), "the live socket's file is left alone");

        // A file left behind by a process that is gone: bind replaces it.
        drop(first);
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let second = bind(&addr).await.unwrap();
        drop(second);
        assert!(!path.exists(), "the socket file goes with the listener");

        // Not a socket: left alone, and bind says the path is taken.
        std::fs::write(&path, "data").unwrap();
        assert!(bind(&addr).await.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
