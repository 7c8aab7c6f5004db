//! TLS and mutual TLS on the gRPC port, and certificate renewal without a restart.

mod common;

use common::*;
use docsidecar::proto::SaveRequest;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A leaf certificate and its key, PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.0)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }
}

fn write_server_files(dir: &Path, ca: &Ca) {
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    // Write beside, then rename: a reader never sees half a file.
    std::fs::write(dir.join("tls.crt.new"), cert).unwrap();
    std::fs::write(dir.join("tls.key.new"), key).unwrap();
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

/// A channel over TLS that trusts `ca_pem`, optionally with a client identity.
fn tls_channel(addr: &str, ca_pem: &str, identity: Option<(String, String)>) -> Channel {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = addr.trim_start_matches("http://").to_string();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        },
    ))
}

async fn works(channel: Channel) -> bool {
    let request = SaveRequest {
        collection: "c".into(),
        id: "a".into(),
        data: Some(object(vec![]).into()),
        ..Default::default()
    };
    Client::new(channel).save(request).await.is_ok()
}

#[tokio::test]
async fn tls_serves_refuses_plaintext_and_follows_renewals() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    write_server_files(dir.path(), &ca);
    let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let t = TestServer::start(
        Backend::Memory,
        &[
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let addr = t.local_addr.clone();
    assert!(works(tls_channel(&addr, &ca.pem(), None)).await);
    assert!(!works(t.channel.clone()).await, "plaintext is refused");
    let other = Ca::new("someone else");
    assert!(
        !works(tls_channel(&addr, &other.pem(), None)).await,
        "an untrusted server is refused"
    );

    // Renewal: new files; new connections get the new certificate.
    let renewed = Ca::new("renewed ca");
    write_server_files(dir.path(), &renewed);
    let mut switched = false;
    for _ in 0..50 {
        if works(tls_channel(&addr, &renewed.pem(), None)).await {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        switched,
        "the renewed certificate was not served within 5 s"
    );
    assert!(!works(tls_channel(&addr, &ca.pem(), None)).await);
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    write_server_files(dir.path(), &ca);
    let client_ca = Ca::new("client ca");
    std::fs::write(dir.path().join("client-ca.crt"), client_ca.pem()).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let t = TestServer::start(
        Backend::Memory,
        &[
            "--tls-cert",
            &path("tls.crt"),
            "--tls-key",
            &path("tls.key"),
            "--tls-client-ca",
            &path("client-ca.crt"),
        ],
    )
    .await
    .unwrap();
    let addr = t.local_addr.clone();
    assert!(
        works(tls_channel(
            &addr,
            &ca.pem(),
            Some(client_ca.issue(&["app"]))
        ))
        .await
    );
    assert!(
        !works(tls_channel(&addr, &ca.pem(), None)).await,
        "no client certificate"
    );
    let stranger = Ca::new("stranger");
    assert!(
        !works(tls_channel(
            &addr,
            &ca.pem(),
            Some(stranger.issue(&["app"]))
        ))
        .await,
        "a client certificate from another CA"
    );
}

#[tokio::test]
async fn rejected_handshakes_are_logged_with_the_peer_and_counted_by_reason() {
    use common::sidecar::{metrics, sample, Sidecar};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    write_server_files(dir.path(), &ca);
    let client_ca = Ca::new("client ca");
    std::fs::write(dir.path().join("client-ca.crt"), client_ca.pem()).unwrap();
    let mut sidecar = Sidecar::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            "memory://",
            "--tls-cert",
            "tls.crt",
            "--tls-key",
            "tls.key",
            "--tls-client-ca",
            "client-ca.crt",
        ],
        dir.path(),
    );
    let addr = sidecar.listening();
    let admin = sidecar.admin.clone().unwrap();

    // No client certificate: refused, logged at warn with the peer and reason.
    assert!(!works(tls_channel(&addr, &ca.pem(), None)).await);
    let line = sidecar.wait_for_log("for the rejected handshake", |v| {
        v["message"] == "TLS handshake rejected"
    });
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["reason"], "no_client_certificate", "{line}");
    assert!(
        line["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );
    // A certificate from another CA, many times: counted each time, logged
    // once in a while.
    let stranger = Ca::new("stranger");
    for _ in 0..5 {
        assert!(
            !works(tls_channel(
                &addr,
                &ca.pem(),
                Some(stranger.issue(&["app"]))
            ))
            .await
        );
    }
    let started = std::time::Instant::now();
    let m = loop {
        let m = metrics(&admin).await;
        if sample(
            &m,
            r#"docsidecar_tls_handshake_failures_total{reason="bad_certificate"}"#,
        ) >= 5.0
        {
            break m;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{m:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        sample(
            &m,
            r#"docsidecar_tls_handshake_failures_total{reason="no_client_certificate"}"#
        ) >= 1.0,
        "{m:#?}"
    );
    // The certificates' expiry, behind the certificate-expiry alerts.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for certificate in ["server", "client_ca"] {
        let series = format!(
            r#"docsidecar_tls_certificate_expiry_timestamp_seconds{{certificate="{certificate}"}}"#
        );
        assert!(sample(&m, &series) > now, "{series}: {m:#?}");
    }
    sidecar.signal("TERM");
    let (_, logs) = sidecar.wait().await;
    let warned = logs
        .iter()
        .filter(|l| l.contains("TLS handshake rejected"))
        .count();
    assert!(
        (1..6).contains(&warned),
        "six rejections, rate-limited lines: {warned}"
    );
}
