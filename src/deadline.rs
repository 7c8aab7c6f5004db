//! Ends calls that must not go on: past the client's deadline (`grpc-timeout`)
//! with DEADLINE_EXCEEDED, and past the shutdown grace period with UNAVAILABLE
//! (safe to retry elsewhere) rather than a dropped connection.
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
                result = future => result,
                timeout = expired => Ok(status(Reason::DeadlineExceeded, format!(
                    "the call's deadline of {timeout:?} passed before it completed; its work was abandoned"
                ))
                .into_http()),
                _ = abandon.wait_for(|over| *over) => Ok(status(
                    Reason::ShuttingDown,
                    "the sidecar shut down before this call completed; it was abandoned, retry",
                )
                .into_http()),
            }
        })
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
