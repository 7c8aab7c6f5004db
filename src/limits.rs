//! Requests that cannot be served as sent, answered with the status that says
//! why: headers over `DOCSIDECAR_MAX_HEADER_BYTES` and messages over
//! `DOCSIDECAR_MAX_MESSAGE_BYTES` are RESOURCE_EXHAUSTED naming the setting
//! (the connection carries on), and a request the client abandoned before
//! sending a whole message is CANCELLED, not INTERNAL.
//!
//! Headers: HTTP/2 itself is configured to accept sixteen times the budget (see
//! [`crate::transport::Limits::http2_header_list_size`]) so that oversized
//! headers reach this layer instead of hyper's bare HTTP 431. Messages: tonic
//! refuses an oversized message as OUT_OF_RANGE "decoded message length too
//! large"; this layer gives that refusal its proper code and an actionable text.

use crate::status::{Failure, Reason};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// The start of tonic's message for a message over the decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// tonic's messages (INTERNAL) for a request body that ended before one whole
/// message. hyper ends the body so when the client resets the stream (a
/// cancelled call, the rapid-reset pattern): the client's doing, and counting
/// it as INTERNAL would let any client fire server-fault alerts.
const TONIC_EARLY_EOF: [&str; 2] = ["Missing request message", "Unexpected EOF decoding stream"];

/// tonic's messages (INTERNAL) for a message frame whose compressed flag is
/// not 0: the sidecar accepts no `grpc-encoding`, so the client sent a
/// malformed frame (found by the fuzz probe, `examples/fuzz.rs`).
const TONIC_BAD_FLAG: [&str; 2] = [
    "protocol error: received message with invalid compression flag",
    "protocol error: received message with compressed-flag but no grpc-encoding",
];

/// The size of a request's headers as HTTP/2 counts it (RFC 9113 §6.5.2):
/// each field's name and value plus 32, the pseudo-headers included.
pub fn header_list_size<B>(request: &http::Request<B>) -> usize {
    let field = |name: usize, value: usize| name + value + 32;
    let uri = request.uri();
    let pseudo = field(":method".len(), request.method().as_str().len())
        + field(
            ":path".len(),
            uri.path_and_query().map_or(1, |p| p.as_str().len()),
        )
        + field(":scheme".len(), uri.scheme_str().map_or(4, str::len))
        + uri
            .authority()
            .map_or(0, |a| field(":authority".len(), a.as_str().len()));
    pseudo
        + request
            .headers()
            .iter()
            .map(|(name, value)| field(name.as_str().len(), value.len()))
            .sum::<usize>()
}

#[derive(Debug, Clone, Copy)]
pub struct RequestLimitsLayer {
    max_header_bytes: usize,
    max_message_bytes: usize,
}

impl RequestLimitsLayer {
    pub fn new(max_header_bytes: usize, max_message_bytes: usize) -> Self {
        RequestLimitsLayer {
            max_header_bytes,
            max_message_bytes,
        }
    }
}

impl<S> Layer<S> for RequestLimitsLayer {
    type Service = RequestLimits<S>;

    fn layer(&self, inner: S) -> RequestLimits<S> {
        RequestLimits {
            inner,
            limits: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLimits<S> {
    inner: S,
    limits: RequestLimitsLayer,
}

impl<S, B> Service<http::Request<B>> for RequestLimits<S>
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
        let RequestLimitsLayer {
            max_header_bytes,
            max_message_bytes,
        } = self.limits;
        let size = header_list_size(&request);
        if size > max_header_bytes {
            let status = Failure::new(
                Reason::MessageTooLarge,
                format!(
                    "the request's headers (metadata) are {size} bytes, over the sidecar's limit of {max_header_bytes} (DOCSIDECAR_MAX_HEADER_BYTES): send less metadata"
                ),
            )
            .with("setting", "DOCSIDECAR_MAX_HEADER_BYTES")
            .with("limit", max_header_bytes.to_string())
            .into_status();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(match refusal(&response) {
                Some(Refusal::TooLarge) => Failure::new(
                    Reason::MessageTooLarge,
                    format!(
                        "the request message is larger than the sidecar accepts ({max_message_bytes} bytes, DOCSIDECAR_MAX_MESSAGE_BYTES): send fewer or smaller documents per call"
                    ),
                )
                .with("setting", "DOCSIDECAR_MAX_MESSAGE_BYTES")
                .with("limit", max_message_bytes.to_string())
                .into_status()
                .into_http(),
                // No reason in the contract's list names a cancellation (nobody
                // is left to read it when the stream was reset): a bare status.
                Some(Refusal::Abandoned) => Status::cancelled(
                    "the request ended before a whole message arrived: the client cancelled the call or reset its stream",
                )
                .into_http(),
                Some(Refusal::Malformed(detail)) => Failure::new(
                    Reason::InvalidArgument,
                    format!(
                        "the request's gRPC message frame is malformed ({detail}): its compressed flag must be 0, since the sidecar accepts no grpc-encoding"
                    ),
                )
                .into_status()
                .into_http(),
                None => response,
            })
        })
    }
}

/// A request tonic refused while decoding it.
enum Refusal {
    TooLarge,
    Abandoned,
    /// tonic's own description of the bad frame.
    Malformed(String),
}

/// tonic's refusals while decoding a request, told by their status and text
/// (trailers-only responses: the status is in the headers).
fn refusal<B>(response: &http::Response<B>) -> Option<Refusal> {
    let headers = response.headers();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)?;
    let message = headers.get("grpc-message").map(|m| {
        percent_encoding::percent_decode(m.as_bytes())
            .decode_utf8_lossy()
            .into_owned()
    })?;
    match code {
        Code::OutOfRange if message.starts_with(TONIC_TOO_LARGE) => Some(Refusal::TooLarge),
        Code::Internal if TONIC_EARLY_EOF.iter().any(|m| message.starts_with(m)) => {
            Some(Refusal::Abandoned)
        }
        Code::Internal if TONIC_BAD_FLAG.iter().any(|m| message.starts_with(m)) => {
            let detail = message.split(", while").next().unwrap_or_default();
            Some(Refusal::Malformed(detail.to_string()))
        }
        _ => None,
    }
}

/// Paths of the calls that may answer a whole response budget of documents.
const LARGE_READS: [&str; 3] = [
    "/docsidecar.v1.DocumentService/List",
    "/docsidecar.v1.DocumentService/BatchGet",
    "/docsidecar.v1.DocumentService/Query",
];

/// Serves at most `DOCSIDECAR_MAX_CONCURRENT_READS` reads of many documents
/// at once; the others wait their turn (under their deadline). A turn lasts
/// until the response has been sent, since each such response may hold its
/// ~3 MiB budget several times over (rows, protobuf, encoded bytes): their
/// number is what bounds the process's memory (README, Memory).
#[derive(Debug, Clone)]
pub struct ReadLimitLayer {
    turns: Arc<Semaphore>,
}

impl ReadLimitLayer {
    pub fn new(max_concurrent_reads: usize) -> Self {
        ReadLimitLayer {
            turns: Arc::new(Semaphore::new(max_concurrent_reads)),
        }
    }
}

impl<S> Layer<S> for ReadLimitLayer {
    type Service = ReadLimit<S>;

    fn layer(&self, inner: S) -> ReadLimit<S> {
        ReadLimit {
            inner,
            turns: self.turns.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadLimit<S> {
    inner: S,
    turns: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for ReadLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !LARGE_READS.contains(&request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        // The service made ready is the one that must be called.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let turns = self.turns.clone();
        Box::pin(async move {
            // The semaphore is never closed: acquiring only waits.
            let turn = turns.acquire_owned().await.ok();
            let response = inner.call(request).await?;
            Ok(response.map(|body| {
                Body::new(WithTurn {
                    body,
                    rest: bytes::Bytes::new(),
                    _turn: turn,
                })
            }))
        })
    }
}

/// Pieces a response is handed to HTTP/2 in. The HTTP/2 layer asks for the
/// next piece only when the client's flow-control window has room, so a slow
/// reader leaves the response here, under its turn, instead of in send
/// buffers that no turn bounds.
const PIECE: usize = 64 * 1024;

/// A response body that holds its read's turn until it is sent or dropped.
struct WithTurn {
    body: Body,
    /// The rest of a data frame not yet handed on.
    rest: bytes::Bytes,
    _turn: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for WithTurn {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.rest.is_empty() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
        let n = self.rest.len().min(PIECE);
        let piece = self.rest.split_to(n);
        Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_large_read_holds_its_turn_until_its_response_is_gone() {
        let inner = tower::service_fn(|_request: http::Request<()>| async {
            let page = http_body_util::Full::new(bytes::Bytes::from_static(b"documents"));
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(page)))
        });
        let layer = ReadLimitLayer::new(1);
        let turns = layer.turns.clone();
        let service = layer.layer(inner);
        let list = || {
            http::Request::builder()
                .uri("/docsidecar.v1.DocumentService/List")
                .body(())
                .unwrap()
        };
        let first = service.clone().oneshot(list()).await.unwrap();
        assert_eq!(turns.available_permits(), 0, "the response holds the turn");
        // Other calls do not wait; another large read does.
        let get = http::Request::builder()
            .uri("/docsidecar.v1.DocumentService/Get")
            .body(())
            .unwrap();
        service.clone().oneshot(get).await.unwrap();
        let waiting = tokio::spawn(service.clone().oneshot(list()));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a second List waits for the turn");
        drop(first);
        let second = waiting.await.unwrap().unwrap();
        drop(second);
        assert_eq!(turns.available_permits(), 1);
    }

    #[test]
    fn header_size_counts_as_http2_does() {
        let request = http::Request::builder()
            .uri("http://localhost:50051/docsidecar.v1.DocumentService/Get")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let expected = (7 + 3 + 32)
            + (5 + "/docsidecar.v1.DocumentService/Get".len() + 32)
            + (7 + 4 + 32)
            + (10 + "localhost:50051".len() + 32)
            + (2 + 8 + 32);
        assert_eq!(header_list_size(&request), expected);
    }

    #[tokio::test]
    async fn oversized_headers_and_messages_are_resource_exhausted() {
        let inner = tower::service_fn(|request: http::Request<()>| async move {
            let status = match request.uri().path() {
                "/too-large" => Status::out_of_range(format!(
                    "{TONIC_TOO_LARGE}: found 99 bytes, the limit is: 10 bytes"
                )),
                "/reset" => Status::internal("Missing request message."),
                "/bad-flag" => Status::internal(
                    "protocol error: received message with invalid compression flag: 157 (valid flags are 0 and 1), while sending request",
                ),
                _ => Status::not_found("absent"),
            };
            Ok::<_, std::convert::Infallible>(status.into_http())
        });
        let service = RequestLimitsLayer::new(1024, 4096).layer(inner);
        let status_of = |response: http::Response<Body>| {
            Status::from_header_map(response.headers()).expect("a status")
        };

        let big = http::Request::builder()
            .uri("/x")
            .header("x-big", "a".repeat(2000))
            .body(())
            .unwrap();
        let status = status_of(service.clone().oneshot(big).await.unwrap());
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("DOCSIDECAR_MAX_HEADER_BYTES"));
        use tonic_types::StatusExt;
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
        assert_eq!(info.metadata["setting"], "DOCSIDECAR_MAX_HEADER_BYTES");

        let request = http::Request::builder().uri("/too-large").body(()).unwrap();
        let status = status_of(service.clone().oneshot(request).await.unwrap());
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("DOCSIDECAR_MAX_MESSAGE_BYTES"));

        let request = http::Request::builder().uri("/reset").body(()).unwrap();
        let status = status_of(service.clone().oneshot(request).await.unwrap());
        assert_eq!(status.code(), Code::Cancelled);

        let request = http::Request::builder().uri("/bad-flag").body(()).unwrap();
        let status = status_of(service.clone().oneshot(request).await.unwrap());
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "a client's malformed frame"
        );
        assert!(status.message().contains("compressed flag must be 0"));

        let request = http::Request::builder().uri("/other").body(()).unwrap();
        let status = status_of(service.oneshot(request).await.unwrap());
        assert_eq!(status.code(), Code::NotFound, "other statuses pass through");
    }
}
