//! One client connection: the TLS handshake, then HTTP/2 until the client
//! leaves, the server drains, or the connection has carried no call for the
//! idle timeout (or never sent its HTTP/2 preface within the handshake
//! timeout). Either way it ends with a GOAWAY, so calls in flight finish.

use super::listener::Accepted;
use super::Limits;
use crate::metrics;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo, UdsConnectInfo};
use tower::ServiceExt;
use tracing::debug;

/// The client's HTTP/2 connection preface ("PRI * HTTP/2.0…"), in bytes.
const PREFACE_LEN: u64 = 24;

/// An accepted connection and what it needs to live.
pub(super) struct Connection {
    pub(super) stream: Accepted,
    pub(super) limits: Arc<Limits>,
    /// Turns true when the server drains.
    pub(super) draining: watch::Receiver<bool>,
    /// A place under the connection limit, held for the connection's life.
    pub(super) permit: OwnedSemaphorePermit,
}

impl Connection {
    pub(super) async fn serve<S>(self, service: S)
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Connection {
            stream,
            limits,
            mut draining,
            permit: _permit,
        } = self;
        let _open = metrics::OpenConnection::start();
        let handshake_deadline = Instant::now() + limits.handshake_timeout;
        let peer = stream.peer();
        let (stream, info) = match stream {
            Accepted::Tcp(tcp, _) => {
                let info = Info::Tcp(tcp.connect_info());
                (Stream::Tcp(tcp), info)
            }
            Accepted::Unix(unix) => {
                let info = Info::Unix(unix.connect_info());
                (Stream::Unix(unix), info)
            }
            Accepted::Tls(tcp, peer, tls) => {
                let info = Info::Tcp(tcp.connect_info());
                match tls.handshake(tcp, peer, handshake_deadline).await {
                    Some(tls) => (Stream::Tls(Box::new(tls)), info),
                    None => return,
                }
            }
        };
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Counted {
            inner: stream,
            activity: activity.clone(),
        });
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_timeout)
            .max_header_list_size(limits.http2_header_list_size());
        let calls = Calls {
            inner: service,
            info,
            activity: activity.clone(),
        };
        let conn = http2.serve_connection(io, calls);
        tokio::pin!(conn);
        let mut prefaced = false;
        let mut closing = false;
        // An idle connection asked to close gets this long to answer the
        // GOAWAY's PING; one that does not is dropped (nothing is in flight).
        let mut close_by: Option<Instant> = None;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(handshake_deadline), if !prefaced => {
                    prefaced = activity.prefaced();
                    if !prefaced {
                        metrics::connection_closed_idle();
                        debug!(%peer, "closing a connection that sent no HTTP/2 preface within the handshake timeout");
                        return;
                    }
                }
                () = activity.idle(limits.idle_timeout), if !closing => {
                    closing = true;
                    close_by = Some(Instant::now() + limits.keepalive_timeout);
                    metrics::connection_closed_idle();
                    debug!(%peer, "closing a connection idle for the idle timeout (GOAWAY)");
                    conn.as_mut().graceful_shutdown();
                }
                () = tokio::time::sleep_until(close_by.unwrap_or(handshake_deadline)), if close_by.is_some() => {
                    debug!(%peer, "an idle connection did not acknowledge its GOAWAY in time: closed");
                    return;
                }
                _ = draining.wait_for(|d| *d), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What a connection has done: bytes received, calls in flight, and since
/// when it has had none.
struct Activity {
    bytes_read: AtomicU64,
    calls: AtomicUsize,
    idle_since: Mutex<Instant>,
    changed: Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            bytes_read: AtomicU64::new(0),
            calls: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            changed: Notify::new(),
        }
    }
}

impl Activity {
    fn prefaced(&self) -> bool {
        self.bytes_read.load(Ordering::Relaxed) >= PREFACE_LEN
    }

    fn begin(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        CallGuard(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once no call has been in flight for `timeout`.
    async fn idle(&self, timeout: std::time::Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.calls.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            let since = self.idle_since();
            tokio::select! {
                () = tokio::time::sleep_until(since + timeout) => {
                    if self.calls.load(Ordering::SeqCst) == 0 && self.idle_since() == since {
                        return;
                    }
                }
                () = changed => {}
            }
        }
    }
}

/// One call in flight on a connection, from its request until its response
/// body is sent (a stream may outlive its handler).
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            *activity
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        activity.changed.notify_waiters();
    }
}

/// The connection's details that tonic puts in each request's extensions.
#[derive(Clone)]
enum Info {
    Tcp(TcpConnectInfo),
    Unix(UdsConnectInfo),
}

/// The connection's calls: each request goes to a clone of the service, with
/// the connection's details, and counts as activity until its response ends.
#[derive(Clone)]
struct Calls<S> {
    inner: S,
    info: Info,
    activity: Arc<Activity>,
}

impl<S> hyper::service::Service<http::Request<Incoming>> for Calls<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<CallBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let mut request = request.map(Body::new);
        match &self.info {
            Info::Tcp(info) => drop(request.extensions_mut().insert(info.clone())),
            Info::Unix(info) => drop(request.extensions_mut().insert(info.clone())),
        }
        let service = self.inner.clone();
        Box::pin(async move {
            let response = service.oneshot(request).await?;
            Ok(response.map(|body| CallBody {
                body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its call counted until it is sent or dropped.
pub(super) struct CallBody {
    body: Body,
    _guard: CallGuard,
}

impl http_body::Body for CallBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's byte stream, whichever kind it is.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $call
            }
            Stream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $call
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $call
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// Counts the bytes a connection receives (has it sent its preface yet?).
struct Counted {
    inner: Stream,
    activity: Arc<Activity>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before) as u64;
        if read > 0 {
            this.activity.bytes_read.fetch_add(read, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_call_for_the_whole_timeout() {
        let activity = Arc::new(Activity::default());
        let call = activity.begin();
        // A call in flight: never idle, however long it takes.
        assert!(tokio::time::timeout(
            Duration::from_secs(3600),
            activity.idle(Duration::from_secs(5))
        )
        .await
        .is_err());
        drop(call);
        let started = Instant::now();
        activity.idle(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
