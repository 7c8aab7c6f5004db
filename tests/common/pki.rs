//! A throwaway certificate authority for database TLS tests (rcgen), and the
//! rustls client configurations that trust it.

use super::procs;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The host names of a server certificate that verify-full accepts on loopback.
pub const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];
/// The host name of a certificate that verify-full must refuse on loopback.
pub const WRONG_NAME: &str = "wrong.example";

/// The certificate the server presents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerCert {
    /// Valid for `localhost`, `127.0.0.1` and `::1`: verify-full passes.
    #[default]
    Localhost,
    /// Valid only for `wrong.example` (same CA): verify-ca passes, verify-full fails.
    WrongHost,
}

impl ServerCert {
    /// The names in the certificate.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            ServerCert::Localhost => LOCAL_NAMES,
            ServerCert::WrongHost => &[WRONG_NAME],
        }
    }

    /// A file name stem for its certificate and key (`<stem>.crt`, `<stem>.key`).
    pub fn file_stem(self) -> &'static str {
        match self {
            ServerCert::Localhost => "localhost",
            ServerCert::WrongHost => "wrong",
        }
    }
}

pub struct TestCa(CertifiedIssuer<'static, KeyPair>);

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        TestCa(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) and its key, PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.0.pem()
    }
}

/// The TLS files of a server, all in one directory (its data directory):
/// a fresh CA, certificates for the local names and for the wrong name, and
/// the presented pair `server.crt`/`server.key` (a copy of one of them).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA certificate, PEM (what a client trusts).
    pub ca_pem: String,
    /// The same, as a file (`sslrootcert`).
    pub ca_file: PathBuf,
    /// The presented certificate and key (`ssl_cert_file`, `ssl_key_file`).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    data: PathBuf,
    user: Option<String>,
}

impl TlsFiles {
    /// Creates a CA and certificates for the local names and the wrong name,
    /// in `data` (owned by the server user, keys mode 0600), and presents `cert`.
    pub fn create(data: &Path, user: Option<&str>, cert: ServerCert) -> TlsFiles {
        use std::os::unix::fs::PermissionsExt;
        let ca = TestCa::new("docsidecar test CA");
        let files = TlsFiles {
            ca_pem: ca.pem(),
            ca_file: data.join("root.crt"),
            cert_file: data.join("server.crt"),
            key_file: data.join("server.key"),
            data: data.to_path_buf(),
            user: user.map(String::from),
        };
        std::fs::write(&files.ca_file, &files.ca_pem).unwrap();
        for which in [ServerCert::Localhost, ServerCert::WrongHost] {
            let name = which.file_stem();
            let (cert, key) = ca.issue(which.names());
            let key_file = data.join(format!("{name}.key"));
            std::fs::write(data.join(format!("{name}.crt")), cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if let Some(user) = user {
            for f in [
                "root.crt",
                "localhost.crt",
                "localhost.key",
                "wrong.crt",
                "wrong.key",
            ] {
                procs::chown_r(user, &data.join(f));
            }
        }
        files.present(cert);
        files
    }

    /// Copies the chosen certificate and key over the presented ones
    /// (atomically, by rename); the server reads them at start or reload.
    pub fn present(&self, cert: ServerCert) {
        let name = cert.file_stem();
        for (from, to) in [
            (format!("{name}.crt"), &self.cert_file),
            (format!("{name}.key"), &self.key_file),
        ] {
            let tmp = PathBuf::from(format!("{}.new", to.display()));
            std::fs::copy(self.data.join(from), &tmp).unwrap();
            if let Some(user) = &self.user {
                procs::chown_r(user, &tmp);
            }
            std::fs::rename(&tmp, to).unwrap();
        }
    }
}

/// The ring crypto provider, explicitly: the crate builds rustls with ring only.
pub fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client configuration that trusts only the CA certificates in
/// `ca_pem` and checks the server name (libpq's `verify-full`).
pub fn client_config(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Like [`client_config`], but without the host name check (libpq's
/// `verify-ca`): the chain must still lead to the CA.
pub fn client_config_verify_ca(ca_pem: &str) -> rustls::ClientConfig {
    let mut config = client_config(ca_pem);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring())
            .build()
            .unwrap();
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(AnyName(inner)));
    config
}

/// A verifier that accepts a certificate valid for another name.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A tokio-postgres TLS connector trusting `ca_pem` (verify-full).
pub fn pg_tls(ca_pem: &str) -> tokio_postgres_rustls::MakeRustlsConnect {
    tokio_postgres_rustls::MakeRustlsConnect::new(client_config(ca_pem))
}
