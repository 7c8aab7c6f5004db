//! TLS to PostgreSQL (rustls with the ring provider, no C crypto), with
//! libpq's `sslmode` semantics:
//!
//! | mode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (PostgreSQL's default) | when the server offers it | not checked |
//! | `require` | always | not checked (checked against the CA when `sslrootcert` is given, as libpq does) |
//! | `verify-ca` | always | signed by the CA in `sslrootcert` |
//! | `verify-full` | always | signed by that CA and issued for the host connected to |

use crate::secret;
use crate::store::{StoreError, StoreResult};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS connector every PostgreSQL connection of a store uses.
pub type Connector = MakeRustlsConnect;

/// libpq's `sslmode` values (the ones that mean something to a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// PostgreSQL's own default.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The names `sslmode` takes, for messages.
pub const SSL_MODES: &str = "disable, prefer, require, verify-ca, verify-full";

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "`{}` is not an sslmode: use one of {SSL_MODES}",
                    crate::quote::shown(other).trim_matches('"')
                ))
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// How a store's connections use TLS: the mode and the PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// CA certificates that sign the server's certificate (`sslrootcert`).
    pub root_cert: Option<PathBuf>,
    /// A client certificate and its key (`sslcert`, `sslkey`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl PgTls {
    /// Whether the server's certificate is checked against the CA, and its name.
    fn verification(&self) -> Verification {
        match self.mode {
            SslMode::VerifyFull => Verification::Full,
            SslMode::VerifyCa => Verification::Ca,
            // libpq: with a root certificate, `require` verifies the chain.
            SslMode::Require if self.root_cert.is_some() => Verification::Ca,
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Verification::None,
        }
    }

    /// Sets the mode tokio-postgres knows (whether TLS is tried, and required).
    pub(super) fn apply(&self, config: &mut tokio_postgres::Config) {
        use tokio_postgres::config::SslMode as Pg;
        config.ssl_mode(match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        });
    }

    /// The connector: reads the PEM files now, so unusable ones stop start-up.
    pub(super) fn connector(&self) -> StoreResult<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(format!("TLS set-up: {e}")))?;
        let builder = match self.verification() {
            Verification::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
            verification => {
                let Some(path) = &self.root_cert else {
                    return Err(tls_error(format!(
                        "sslmode {} checks the server's certificate against a CA: set the CA file (DB_SSLROOTCERT or ?sslrootcert=)",
                        self.mode
                    )));
                };
                let mut roots = RootCertStore::empty();
                for cert in certificates(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| tls_error(format!("{}: {e}", path.display())))?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| tls_error(format!("{}: {e}", path.display())))?;
                match verification {
                    Verification::Full => builder.with_webpki_verifier(webpki),
                    _ => builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyName(webpki))),
                }
            }
        };
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let pem = secret::read_bytes(key, "the database client key")
                    .map_err(|e| tls_error(e.to_string()))?;
                let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    tls_error(format!(
                        "{} holds no valid PEM private key: {e}",
                        key.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    tls_error(format!("{} and {}: {e}", cert.display(), key.display()))
                })?
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }
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

/// `prefer` and `require`: encryption without authentication of the server,
/// as libpq does; the handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the name may be another host's.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_libpq_spells_them() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.to_string().parse::<SslMode>(), Ok(mode));
        }
        let err = "allow-ish".parse::<SslMode>().unwrap_err();
        assert!(err.contains(SSL_MODES), "{err}");
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }

    #[test]
    fn verifying_modes_need_a_ca() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let tls = PgTls {
                mode,
                ..PgTls::default()
            };
            let err = tls.connector().err().unwrap().to_string();
            assert!(err.contains("DB_SSLROOTCERT"), "{err}");
        }
        assert!(PgTls::default().connector().is_ok());
    }
}
