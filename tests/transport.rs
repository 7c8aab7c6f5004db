//! The gRPC port under hostile or careless clients: streams per connection,
//! idle and preface-only connections, the connection limit, accept errors
//! (out of file descriptors), oversized headers and messages, and streams the
//! client resets at once (rapid reset).

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::sidecar::{metrics, sample, Sidecar};
use common::*;
use docsidecar::proto::{GetRequest, SaveRequest};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A sidecar binary on memory with an admin listener: (sidecar, gRPC address, admin address).
fn sidecar(extra: &[&str]) -> (Sidecar, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--database-url",
        "memory://",
    ];
    args.extend(extra);
    let mut sidecar = Sidecar::spawn(&args, dir.path());
    let addr = sidecar.listening();
    let admin = sidecar.admin.clone().expect("admin address");
    (sidecar, addr, admin, dir)
}

/// Polls the admin metrics until `ok` holds (30 s at most).
async fn metrics_until(
    admin: &str,
    what: &str,
    ok: impl Fn(&std::collections::BTreeMap<String, f64>) -> bool,
) -> std::collections::BTreeMap<String, f64> {
    let started = Instant::now();
    loop {
        let m = metrics(admin).await;
        if ok(&m) {
            return m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: not reached; metrics: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the server closes the connection; fails the test after 30 s.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server did not close the connection"),
        }
    }
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(9 + payload.len());
    out.put_uint(payload.len() as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
    out.freeze()
}

/// HPACK: a literal header field without indexing, new name, no Huffman.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a gRPC Get request.
fn get_headers() -> Vec<u8> {
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(&mut block, ":path", "/docsidecar.v1.DocumentService/Get");
    literal(&mut block, ":authority", "localhost");
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    block
}

/// The frames of a connection as (type, flags, stream, payload), read until
/// `done` says enough.
async fn read_frames(stream: &mut TcpStream, mut done: impl FnMut(u8, u8, u32, &[u8]) -> bool) {
    let mut buf = BytesMut::new();
    loop {
        while buf.len() >= 9 {
            let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let head = buf.split_to(9);
            let payload = buf.split_to(len);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if done(head[3], head[4], id, &payload) {
                return;
            }
        }
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .expect("frames within 30 s")
            .expect("read");
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const REFUSED_STREAM: u32 = 0x7;

/// A raw HTTP/2 connection past the SETTINGS exchange (ours acknowledged).
async fn raw_http2(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    read_frames(&mut stream, |kind, flags, _, _| {
        kind == SETTINGS && flags & 1 == 0
    })
    .await;
    stream.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
    stream
}

#[tokio::test]
async fn streams_per_connection_are_limited() {
    let (_sidecar, addr, admin, _dir) = sidecar(&["--max-concurrent-streams", "10"]);
    let mut stream = raw_http2(&addr).await;
    // 200 calls opened at once, none sending its message: the server takes
    // ten and refuses the other 190 streams.
    let block = get_headers();
    let mut frames = BytesMut::new();
    for i in 0..200u32 {
        frames.extend_from_slice(&frame(HEADERS, 0x4, 2 * i + 1, &block));
    }
    stream.write_all(&frames).await.unwrap();
    let mut refused = 0;
    read_frames(&mut stream, |kind, _, _, payload| {
        if kind == RST_STREAM && payload == REFUSED_STREAM.to_be_bytes() {
            refused += 1;
        }
        refused == 190
    })
    .await;
    let m = metrics_until(&admin, "ten calls in flight", |m| {
        sample(m, "docsidecar_requests_in_flight") == 10.0
    })
    .await;
    assert_eq!(sample(&m, "docsidecar_requests_in_flight"), 10.0);
}

#[tokio::test]
async fn idle_and_silent_connections_are_closed_while_busy_ones_stay() {
    let (_sidecar, addr, admin, _dir) = sidecar(&[
        "--idle-timeout",
        "1",
        "--handshake-timeout",
        "1",
        "--keepalive-timeout",
        "1",
    ]);
    // A connection with a call in flight (its request not finished yet).
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/docsidecar.v1.DocumentService/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request.clone(), false).unwrap();
    metrics_until(&admin, "the call is in flight", |m| {
        sample(m, "docsidecar_requests_in_flight") == 1.0
    })
    .await;

    // A connection that sends nothing at all, and one that sends only the
    // HTTP/2 preface: both are closed, the second with a GOAWAY.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut prefaced = TcpStream::connect(&addr).await.unwrap();
    prefaced.write_all(PREFACE).await.unwrap();
    prefaced
        .write_all(&frame(SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    until_closed(&mut silent).await;
    let seen = until_closed(&mut prefaced).await;
    assert!(
        contains_frame(&seen, GOAWAY),
        "a GOAWAY before the close: {seen:?}"
    );

    // The busy connection outlived them and still works.
    let message = prost::Message::encode_to_vec(&GetRequest {
        collection: "c".into(),
        id: "absent".into(),
        ..Default::default()
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    body.send_data(Bytes::from(framed), true).unwrap();
    let mut response = response.await.unwrap();
    let trailers = response.body_mut().trailers().await.unwrap();
    let status = response
        .headers()
        .get("grpc-status")
        .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .cloned();
    assert_eq!(status.unwrap(), "5", "NOT_FOUND on the busy connection");
    let m = metrics(&admin).await;
    assert!(
        sample(&m, "docsidecar_connections_closed_idle_total") >= 2.0,
        "{m:#?}"
    );
}

fn contains_frame(bytes: &[u8], kind: u8) -> bool {
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = ((rest[0] as usize) << 16) | ((rest[1] as usize) << 8) | rest[2] as usize;
        if rest[3] == kind {
            return true;
        }
        rest = &rest[(9 + len).min(rest.len())..];
    }
    false
}

async fn connected_client(addr: &str) -> Client {
    Client::connect(format!("http://{addr}")).await.unwrap()
}

async fn get_absent(client: &mut Client) {
    let status = client
        .get(GetRequest {
            collection: "c".into(),
            id: "absent".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn at_the_connection_limit_new_connections_are_closed_and_open_ones_work() {
    let (_sidecar, addr, admin, _dir) = sidecar(&["--max-connections", "2"]);
    let mut a = connected_client(&addr).await;
    let mut b = connected_client(&addr).await;
    get_absent(&mut a).await;
    get_absent(&mut b).await;
    metrics_until(&admin, "two connections open", |m| {
        sample(m, "docsidecar_connections_open") == 2.0
    })
    .await;

    let mut third = TcpStream::connect(&addr).await.unwrap();
    let _ = third.write_all(PREFACE).await;
    until_closed(&mut third).await;
    let m = metrics(&admin).await;
    assert!(
        sample(&m, "docsidecar_connections_rejected_total") >= 1.0,
        "{m:#?}"
    );
    assert_eq!(sample(&m, "docsidecar_connections_open"), 2.0);
    get_absent(&mut a).await;
    get_absent(&mut b).await;

    // A place frees up: a new connection is served.
    drop(b);
    metrics_until(&admin, "one connection left", |m| {
        sample(m, "docsidecar_connections_open") == 1.0
    })
    .await;
    get_absent(&mut connected_client(&addr).await).await;
}

#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    // Few file descriptors: accept() fails with EMFILE once they are used.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 48 && exec \"$0\" \"$@\"")
        .arg(common::sidecar::BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            "memory://",
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("DOCSIDECAR_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut admin) = (String::new(), String::new());
    while addr.is_empty() {
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "admin listener up" {
            admin = v["admin"].as_str().unwrap().to_string();
        }
        if v["message"] == "serving docsidecar.v1.DocumentService" {
            addr = v["listen"].as_str().unwrap().to_string();
        }
    }
    tokio::spawn(async move {
        // Keep reading so the sidecar never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink).await;
    });

    // Hold more connections than the sidecar has descriptors for, a while.
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    let elapsed = started.elapsed().as_secs_f64();
    let m = metrics_until(&admin, "the descriptors are free again", |_| true).await;
    let errors = sample(&m, "docsidecar_accept_errors_total");
    assert!(errors > 0.0, "accept never failed: the test proves nothing");
    // Backing off from 5 ms, doubling to 1 s: about ten failures, then one a
    // second. A loop that retries at once fails thousands of times.
    let bound = 12.0 + elapsed;
    assert!(
        errors <= bound,
        "{errors} accept errors in {elapsed:.1} s (at most {bound:.0} when backing off)"
    );
    // And the sidecar serves again.
    get_absent(&mut connected_client(&addr).await).await;
    let _ = child.kill().await;
}

fn big_metadata<T>(message: T, bytes: usize) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-big", "a".repeat(bytes).parse().unwrap());
    request
}

fn get(id: &str) -> GetRequest {
    GetRequest {
        collection: "c".into(),
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn oversized_headers_are_resource_exhausted_and_the_connection_stays() {
    let t = TestServer::start(Backend::Memory, &[]).await.unwrap();
    let mut c = t.client.clone();
    // Over the 16 KiB budget: a gRPC status that names the setting.
    let status = c.get(big_metadata(get("a"), 20 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("DOCSIDECAR_MAX_HEADER_BYTES"),
        "{status:?}"
    );
    // The connection carries on: a call on the same channel succeeds.
    assert_eq!(c.get(get("a")).await.unwrap_err().code(), Code::NotFound);
    // Up to sixteen times the budget the answer is the same.
    let status = c.get(big_metadata(get("a"), 200 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(c.get(get("a")).await.unwrap_err().code(), Code::NotFound);
    // Beyond, the HTTP/2 library answers for itself, as the README states:
    // HTTP 431 (the connection stays), then, past its abuse limit, GOAWAY
    // (the connection closes; a tonic client reconnects for the next call).
    let status = c.get(big_metadata(get("a"), 300 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.message().contains("431"), "{status:?}");
    let status = c
        .get(big_metadata(get("a"), 1100 * 1024))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("h2 protocol error"), "{status:?}");
    assert_eq!(c.get(get("a")).await.unwrap_err().code(), Code::NotFound);
    // The budget is a setting.
    let t = TestServer::start(Backend::Memory, &["--max-header-bytes", "65536"])
        .await
        .unwrap();
    let mut c = t.client.clone();
    assert_eq!(
        c.get(big_metadata(get("a"), 40 * 1024))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_message_over_the_limit_is_resource_exhausted_naming_the_setting() {
    let t = TestServer::start(Backend::Memory, &["--max-message-bytes", "4096"])
        .await
        .unwrap();
    let mut c = t.client.clone();
    let status = c
        .save(SaveRequest {
            collection: "c".into(),
            id: "big".into(),
            data: Some(object(vec![("s", string(&"x".repeat(10_000)))]).into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("DOCSIDECAR_MAX_MESSAGE_BYTES"),
        "{status:?}"
    );
    assert!(status.message().contains("4096"), "{status:?}");
    assert_eq!(c.get(get("a")).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn streams_the_client_resets_are_cancelled_not_internal() {
    let (sidecar, addr, admin, _dir) = sidecar(&[]);
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/docsidecar.v1.DocumentService/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    for i in 0..60 {
        let (_response, mut body) = h2.send_request(request.clone(), false).unwrap();
        if i % 2 == 0 {
            // Half a message first, so the handler is reading the body.
            body.send_data(Bytes::from_static(&[0, 0, 0, 0, 10, 1]), false)
                .unwrap();
            ping.ping(h2::Ping::opaque()).await.unwrap();
        }
        let reason = if i % 3 == 0 {
            h2::Reason::NO_ERROR
        } else {
            h2::Reason::CANCEL
        };
        body.send_reset(reason);
        h2 = h2.ready().await.unwrap();
    }
    ping.ping(h2::Ping::opaque()).await.unwrap();
    // A normal call after them is served.
    get_absent(&mut connected_client(&addr).await).await;
    let m = metrics_until(&admin, "the reset calls are counted", |m| {
        sample(m, "docsidecar_requests_in_flight") == 0.0
            && sample(
                m,
                r#"docsidecar_requests_total{code="CANCELLED",method="Get"}"#,
            ) > 0.0
    })
    .await;
    let internal: Vec<_> = m
        .keys()
        .filter(|k| k.contains(r#"code="INTERNAL""#))
        .collect();
    sidecar.signal("TERM");
    let (_, logs) = sidecar.wait().await;
    assert!(internal.is_empty(), "{internal:?}: {logs:#?}");
    let errors: Vec<_> = logs
        .iter()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
