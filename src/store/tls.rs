//! TLS to a networked database, as the settings name it (`DB_SSLMODE`,
//! `DB_SSLROOTCERT`, `DB_SSLCERT`, `DB_SSLKEY`): what to require of the
//! connection, resolved once by `config` and applied by each store.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// How much TLS a database connection needs (libpq's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not
    /// checked (so this protects against eavesdropping only).
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is checked against the root
    /// certificate when one is given (as libpq does), not otherwise.
    Require,
    /// TLS, the server's certificate signed by a trusted CA; any host name.
    VerifyCa,
    /// TLS, a trusted certificate that names the host connected to.
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static str = "disable, prefer, require, verify-ca, verify-full";
    /// Every mode, loosest first.
    pub const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "disable" | "disabled" => SslMode::Disable,
            "prefer" | "preferred" => SslMode::Prefer,
            "require" | "required" => SslMode::Require,
            "verify-ca" | "verify_ca" => SslMode::VerifyCa,
            "verify-full" | "verify_identity" => SslMode::VerifyFull,
            _ => {
                return Err(format!(
                    "`{s}` is not an SSL mode: use one of {}",
                    SslMode::NAMES
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

/// TLS settings of a database connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbTls {
    pub mode: SslMode,
    /// PEM CA bundle the server's certificate must chain to; without one the
    /// verifying modes trust the usual public roots.
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate (chain) and its key, for servers that ask.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl DbTls {
    /// Whether the server's certificate is checked against a CA.
    pub fn verifies_ca(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_libpq_and_mysql_names() {
        assert_eq!("verify-full".parse(), Ok(SslMode::VerifyFull));
        assert_eq!("VERIFY_IDENTITY".parse(), Ok(SslMode::VerifyFull));
        assert_eq!("required".parse(), Ok(SslMode::Require));
        assert!("yes".parse::<SslMode>().unwrap_err().contains("verify-ca"));
        for mode in SslMode::ALL {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
    }
}
