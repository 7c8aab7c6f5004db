//! TLS to PostgreSQL (rustls with the ring provider, no C crypto), with
//! libpq's `sslmode` semantics:
//!
//! | mode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (PostgreSQL's default) | when the server offers it | not checked |
//! | `require` | always | not checked (checked against the CA when `sslrootcert` is given, as libpq does) |
//! | `verify-ca` | always | chains to the CA in `sslrootcert` (the public roots without one) |
//! | `verify-full` | always | chains to that CA and is issued for the host connected to |
//!
//! The settings ([`DbTls`]) are the same for every networked store.

use crate::secret;
use crate::store::tls::{DbTls, SslMode};
use crate::store::{StoreError, StoreResult};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS connector every PostgreSQL connection of a store uses.
pub type Connector = MakeRustlsConnect;

/// Sets the mode tokio-postgres knows (whether TLS is tried, and required).
pub(super) fn apply(tls: &DbTls, config: &mut tokio_postgres::Config) {
    use tokio_postgres::config::SslMode as Pg;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => Pg::Disable,
        SslMode::Prefer => Pg::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
    });
}

/// Whether the server's certificate is checked against the CA, and its name.
fn verification(tls: &DbTls) -> Verification {
    match tls.mode {
        SslMode::VerifyFull => Verification::Full,
        _ if tls.verifies_ca() => Verification::Ca,
        _ => Verification::None,
    }
}

/// The connector: reads the PEM files now, so unusable ones stop start-up.
pub(super) fn connector(tls: &DbTls) -> StoreResult<Connector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(format!("TLS set-up: {e}")))?;
    let builder = match verification(tls) {
        Verification::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Relaxed {
                provider,
                chain: None,
            })),
        verification => {
            let mut roots = RootCertStore::empty();
            match &tls.root_cert {
                Some(path) => {
                    let cas = certificates(path)?;
                    crate::x509::record_expiry("database_ca", &cas);
                    for cert in cas {
                        roots
                            .add(cert)
                            .map_err(|e| tls_error(format!("{}: {e}", path.display())))?;
                    }
                }
                // As for MySQL: without a CA file, the usual public roots.
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| tls_error(format!("the CA certificates: {e}")))?;
            match verification {
                Verification::Full => builder.with_webpki_verifier(webpki),
                _ => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Relaxed {
                        provider,
                        chain: Some(webpki),
                    })),
            }
        }
    };
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert)?;
            let pem = secret::read_bytes(key, "the database client key")
                .map_err(|e| tls_error(e.to_string()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                tls_error(format!(
                    "{} holds no valid PEM private key: {e}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls_error(format!("{} and {}: {e}", cert.display(), key.display())))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

enum Verification {
    None,
    Ca,
    Full,
}

fn tls_error(message: String) -> StoreError {
    StoreError::Internal(format!("PostgreSQL TLS: {message}"))
}

fn certificates(path: &Path) -> StoreResult<Vec<CertificateDer<'static>>> {
    let pem = secret::read_bytes(path, "a database TLS certificate")
        .map_err(|e| tls_error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            tls_error(format!(
                "{} holds no valid PEM certificate: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// `prefer` and `require` (no `chain`): encryption without authentication of
/// the server, as libpq does. `verify-ca`: the chain must lead to the CA; the
/// name may be another host's. Either way the handshake's signatures are
/// checked, with the provider's algorithms as the webpki verifier does.
#[derive(Debug)]
struct Relaxed {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectors_for_every_mode() {
        for mode in SslMode::ALL {
            let tls = DbTls {
                mode,
                ..DbTls::default()
            };
            assert!(connector(&tls).is_ok(), "{mode}");
        }
        let missing = DbTls {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
            ..DbTls::default()
        };
        let err = connector(&missing).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
