//! Ends calls that must not go on: past the client's deadline (`grpc-timeout`)
//! with DEADLINE_EXCEEDED, and past the shutdown grace period with UNAVAILABLE
//! (safe to retry elsewhere) rather than a dropped connection.
//!
//! A streaming response (Watch) outlives its headers: its body carries the same
//! deadline and ends with DEADLINE_EXCEEDED trailers when it passes, so a
//! stream never runs past the caller's deadline even if the client does not
//! reset it.
//!
//! tonic's server enforces the header too, but answers CANCELLED; this layer sits
//! inside it with a deadline a hair earlier, so callers get the status the gRPC
//! spec names. Ending a call drops the handler's future: the store's work is
//! abandoned (a PostgreSQL query is cancelled on the server).

use crate::status::{status, Reason};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tonic::body::Body;
use tower::{Layer, Service};

/// Fires before tonic's own timer for the same header, which started earlier.
const MARGIN: Duration = Duration::from_millis(2);

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    /// Turns true when the grace period is over: calls still running are ended.
    abandon: watch::Receiver<bool>,
}

impl DeadlineLayer {
    pub fn new(abandon: watch::Receiver<bool>) -> Self {
        DeadlineLayer { abandon }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            abandon: self.abandon.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    abandon: watch::Receiver<bool>,
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        // The deadline is fixed now, before tonic's timer for the same header
        // (created once this call returns), so ours always expires first.
        let deadline = timeout.map(|t| (t, tokio::time::Instant::now() + t.saturating_sub(MARGIN)));
        let future = self.inner.call(request);
        let mut abandon = self.abandon.clone();
        Box::pin(async move {
            let expired = async {
                match deadline {
                    Some((timeout, at)) => {
                        tokio::time::sleep_until(at).await;
                        timeout
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                result = future => result.map(|response| match deadline {
                    Some((timeout, at)) => response.map(|body| {
                        Body::new(DeadlineBody {
                            inner: body,
                            expired: Box::pin(tokio::time::sleep_until(at)),
                            timeout,
                            done: false,
                        })
                    }),
                    None => response,
                }),
                timeout = expired => Ok(expired_status(timeout).into_http()),
                _ = abandon.wait_for(|over| *over) => Ok(status(
                    Reason::ShuttingDown,
                    "the sidecar shut down before this call completed; it was abandoned, retry",
                )
                .into_http()),
            }
        })
    }
}

fn expired_status(timeout: Duration) -> tonic::Status {
    status(
        Reason::DeadlineExceeded,
        format!(
            "the call's deadline of {timeout:?} passed before it completed; its work was abandoned"
        ),
    )
}

/// A response body that ends with DEADLINE_EXCEEDED trailers at the deadline
/// (dropping the rest of the stream, and with it the handler's work).
struct DeadlineBody {
    inner: Body,
    expired: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    done: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.expired.as_mut().poll(cx).is_ready() {
            self.done = true;
            // The status's headers as a trailers-only response carries them.
            let mut trailers = expired_status(self.timeout)
                .into_http::<Body>()
                .into_parts()
                .0
                .headers;
            trailers.remove(http::header::CONTENT_TYPE);
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) {
            self.done = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn an_expired_deadline_answers_deadline_exceeded_and_drops_the_work() {
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct SetOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = dropped.clone();
        let never = tower::service_fn(move |_req: http::Request<()>| {
            let guard = SetOnDrop(flag.clone());
            async move {
                let _guard = guard;
                std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
                    .await
            }
        });
        let request = http::Request::builder()
            .header("grpc-timeout", "50m")
            .body(())
            .unwrap();
        let started = std::time::Instant::now();
        let (_abandon, abandoned) = watch::channel(false);
        let response = DeadlineLayer::new(abandoned)
            .layer(never)
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
        assert!(started.elapsed() >= Duration::from_millis(45));
        assert!(
            dropped.load(std::sync::atomic::Ordering::SeqCst),
            "the handler's work is dropped"
        );
    }

    #[tokio::test]
    async fn a_stream_ends_with_deadline_exceeded_trailers_at_its_deadline() {
        use futures_util::StreamExt;
        use http_body_util::BodyExt;
        // A stream that sends one message and then nothing, forever.
        let endless = tower::service_fn(|_req: http::Request<()>| async {
            let once = futures_util::stream::iter([Ok::<_, tonic::Status>(
                http_body::Frame::data(bytes::Bytes::from_static(b"event")),
            )]);
            let body = http_body_util::StreamBody::new(once.chain(futures_util::stream::pending()));
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(body)))
        });
        let request = http::Request::builder()
            .header("grpc-timeout", "50m")
            .body(())
            .unwrap();
        let (_abandon, abandoned) = watch::channel(false);
        let response = DeadlineLayer::new(abandoned)
            .layer(endless)
            .oneshot(request)
            .await
            .unwrap();
        let collected =
            tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
                .await
                .expect("the stream ends by itself")
                .unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "4", "DEADLINE_EXCEEDED");
        assert_eq!(collected.to_bytes(), "event");
    }

    #[test]
    fn parses_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "100x", "-1m", "123456789m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
