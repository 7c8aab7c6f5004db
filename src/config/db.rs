//! Database settings: the URL or the discrete `DB_*` settings, TLS, the pool
//! and start-up retries, resolved once into the store's [`Target`]. The same
//! names serve `docsidecar migrate` with the `MIGRATE_` prefix.

use super::values::{count, seconds};
use super::ConfigError;
use crate::policy::Policy;
use crate::secret;
use crate::store::sqlite::SqlitePath;
use crate::store::{PgTarget, PgTls, SqliteTarget, SslMode, Target};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Database settings: the same names for serving and, prefixed `MIGRATE_`, for
/// `docsidecar migrate`, which connects with the admin account.
macro_rules! db_args {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Args)]
        pub struct $name {
            /// Database URL: sqlite://relative.db, sqlite:///absolute.db, sqlite::memory:, memory://,
            /// postgres://user@host:port/db[?sslmode=verify-full&sslrootcert=/ca.crt]. It wins over the
            /// discrete DB_* settings. Default: sqlite://docsidecar.db
            #[arg(long, env = concat!($prefix, "DATABASE_URL"), hide_env_values = true)]
            pub database_url: Option<String>,
            /// File holding the database URL (a mounted secret); used when the URL is not set.
            #[arg(long, env = concat!($prefix, "DATABASE_URL_FILE"))]
            pub database_url_file: Option<PathBuf>,
            /// Database type, with the discrete DB_* settings instead of a URL.
            #[arg(long, env = concat!($prefix, "DB_TYPE"), value_enum)]
            pub db_type: Option<DbType>,
            /// Database host (PostgreSQL).
            #[arg(long, env = concat!($prefix, "DB_HOST"))]
            pub db_host: Option<String>,
            /// Database port (PostgreSQL), 1 to 65535.
            #[arg(long, env = concat!($prefix, "DB_PORT"), value_parser = count(1u16, u16::MAX, "a port number"))]
            pub db_port: Option<u16>,
            /// Database name (PostgreSQL), or the SQLite file path.
            #[arg(long, env = concat!($prefix, "DB_NAME"))]
            pub db_name: Option<String>,
            /// Database user (PostgreSQL).
            #[arg(long, env = concat!($prefix, "DB_USER"))]
            pub db_user: Option<String>,
            /// Database password (PostgreSQL). Prefer the password file.
            #[arg(long, env = concat!($prefix, "DB_PASS"), hide_env_values = true)]
            pub db_pass: Option<String>,
            /// File holding the database password (a mounted secret, re-read when it changes).
            #[arg(long, env = concat!($prefix, "DB_PASS_FILE"))]
            pub db_pass_file: Option<PathBuf>,
            /// TLS to PostgreSQL: disable, prefer (PostgreSQL's default: TLS when the server
            /// offers it, certificate not checked), require (always TLS), verify-ca (the
            /// certificate is signed by DB_SSLROOTCERT), verify-full (and issued for DB_HOST).
            #[arg(long, env = concat!($prefix, "DB_SSLMODE"), value_parser = SslMode::from_str)]
            pub db_sslmode: Option<SslMode>,
            /// PEM file of the CA certificates that sign the database server's certificate.
            #[arg(long, env = concat!($prefix, "DB_SSLROOTCERT"))]
            pub db_sslrootcert: Option<PathBuf>,
            /// PEM client certificate for TLS to the database (with DB_SSLKEY).
            #[arg(long, env = concat!($prefix, "DB_SSLCERT"), requires = "db_sslkey")]
            pub db_sslcert: Option<PathBuf>,
            /// PEM private key of the database client certificate.
            #[arg(long, env = concat!($prefix, "DB_SSLKEY"), requires = "db_sslcert")]
            pub db_sslkey: Option<PathBuf>,
            /// Database connections to keep, 1 to 1000 (SQLite: reader connections).
            /// Default: 2 x cores + 1. PostgreSQL also holds two more (health check, expiry reaper).
            #[arg(long, env = concat!($prefix, "DB_POOL_SIZE"), value_parser = count(1usize, 1000, "a number of connections"))]
            pub db_pool_size: Option<usize>,
            /// Connection attempts at start-up before giving up (0: retry forever).
            /// Only failures that can heal are retried (refused, timed out, starting up).
            #[arg(long, env = concat!($prefix, "DB_MAX_RETRIES"), default_value_t = 10)]
            pub db_max_retries: u32,
            /// Seconds before the second start-up connection attempt (then doubling, at most
            /// 30 s); 0.01 to 3600.
            #[arg(long, env = concat!($prefix, "DB_RETRY_DELAY"), default_value = "1", value_parser = seconds(0.01, 3600.0))]
            pub db_retry_delay: Duration,
            /// Seconds a call may wait for a pooled connection before UNAVAILABLE; 0.01 to 3600.
            #[arg(long, env = concat!($prefix, "DB_ACQUIRE_TIMEOUT"), default_value = "5", value_parser = seconds(0.01, 3600.0))]
            pub db_acquire_timeout: Duration,
        }

        impl From<$name> for DbArgs {
            fn from(a: $name) -> DbArgs {
                DbArgs {
                    var_prefix: $prefix,
                    database_url: a.database_url,
                    database_url_file: a.database_url_file,
                    db_type: a.db_type,
                    db_host: a.db_host,
                    db_port: a.db_port,
                    db_name: a.db_name,
                    db_user: a.db_user,
                    db_pass: a.db_pass,
                    db_pass_file: a.db_pass_file,
                    db_sslmode: a.db_sslmode,
                    db_sslrootcert: a.db_sslrootcert,
                    db_sslcert: a.db_sslcert,
                    db_sslkey: a.db_sslkey,
                    db_pool_size: a.db_pool_size,
                    db_max_retries: a.db_max_retries,
                    db_retry_delay: a.db_retry_delay,
                    db_acquire_timeout: a.db_acquire_timeout,
                }
            }
        }
    };
}

db_args!(
    /// Runtime database settings.
    ServeDbArgs,
    ""
);
db_args!(
    /// Admin database settings for `docsidecar migrate`.
    MigrateDbArgs,
    "MIGRATE_"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DbType {
    Sqlite,
    #[value(alias = "postgres")]
    Postgresql,
    Memory,
}

/// Database settings as given, before resolution.
#[derive(Debug, Clone)]
pub struct DbArgs {
    /// `""` for serving, `"MIGRATE_"` for migrate: error messages name the variables.
    pub var_prefix: &'static str,
    pub database_url: Option<String>,
    pub database_url_file: Option<PathBuf>,
    pub db_type: Option<DbType>,
    pub db_host: Option<String>,
    pub db_port: Option<u16>,
    pub db_name: Option<String>,
    pub db_user: Option<String>,
    pub db_pass: Option<String>,
    pub db_pass_file: Option<PathBuf>,
    pub db_sslmode: Option<SslMode>,
    pub db_sslrootcert: Option<PathBuf>,
    pub db_sslcert: Option<PathBuf>,
    pub db_sslkey: Option<PathBuf>,
    pub db_pool_size: Option<usize>,
    pub db_max_retries: u32,
    pub db_retry_delay: Duration,
    pub db_acquire_timeout: Duration,
}

/// The SQLite file used when no database is configured.
pub const DEFAULT_SQLITE_FILE: &str = "docsidecar.db";

/// The URL schemes a database URL may use, for messages.
const SCHEMES: &str =
    "sqlite://relative/path.db, sqlite:///absolute/path.db, sqlite::memory:, memory://, postgres:// (or postgresql://)";

/// Connections per pool when DB_POOL_SIZE is not set: enough to keep every
/// core busy while some calls wait on the database.
fn default_pool_size() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get()) + 1
}

/// The TLS parameters a PostgreSQL URL may carry (libpq's names).
#[derive(Debug, Default)]
struct UrlTls {
    sslmode: Option<SslMode>,
    sslrootcert: Option<PathBuf>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
}

/// What a database URL names, before the settings around it are applied.
enum Url {
    Memory,
    Sqlite(SqlitePath),
    Postgres(Box<tokio_postgres::Config>, UrlTls),
}

impl DbArgs {
    /// Whether any database setting is given (migrate refuses to guess).
    pub fn any_database_setting(&self) -> bool {
        self.database_url.is_some()
            || self.database_url_file.is_some()
            || self.db_type.is_some()
            || self.db_host.is_some()
            || self.db_name.is_some()
    }

    fn var(&self, name: &str) -> String {
        format!("{}{name}", self.var_prefix)
    }

    /// Settings given together where one silently wins: each as a sentence
    /// naming both (never their values).
    pub fn overridden(&self) -> Vec<String> {
        let v = |name: &str| self.var(name);
        let mut notes = Vec::new();
        if self.database_url.is_some() && self.database_url_file.is_some() {
            notes.push(format!(
                "{} and {} are both set: {} is used, the file is ignored",
                v("DATABASE_URL"),
                v("DATABASE_URL_FILE"),
                v("DATABASE_URL")
            ));
        }
        let url_var = if self.database_url.is_some() {
            Some(v("DATABASE_URL"))
        } else {
            self.database_url_file
                .as_ref()
                .map(|_| v("DATABASE_URL_FILE"))
        };
        if let Some(url_var) = url_var {
            let ignored: Vec<String> = [
                ("DB_TYPE", self.db_type.is_some()),
                ("DB_HOST", self.db_host.is_some()),
                ("DB_PORT", self.db_port.is_some()),
                ("DB_NAME", self.db_name.is_some()),
                ("DB_USER", self.db_user.is_some()),
            ]
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| v(name))
            .collect();
            if !ignored.is_empty() {
                notes.push(format!(
                    "{url_var} is set, so {} {} ignored: the URL names the database",
                    ignored.join(", "),
                    if ignored.len() == 1 { "is" } else { "are" }
                ));
            }
        }
        if self.db_pass.is_some() && self.db_pass_file.is_some() {
            notes.push(format!(
                "{} and {} are both set: {} is used and the file ignored (prefer the file, which may rotate)",
                v("DB_PASS"),
                v("DB_PASS_FILE"),
                v("DB_PASS")
            ));
        }
        notes
    }

    /// Resolves the URL or the discrete settings into the store to open, with
    /// the `schema` and what the `policy` declares. Settings that another one
    /// overrides are logged as warnings.
    pub fn target(&self, schema: &str, policy: Option<&Policy>) -> Result<Target, ConfigError> {
        for note in self.overridden() {
            tracing::warn!("{note}");
        }
        // Without a policy (development) tables and indexes appear on first
        // use; with one, only if the policy says so.
        let auto_create = policy.is_none_or(|p| p.auto_create);
        let declared = super::declared(policy);
        let pool_size = self.db_pool_size.unwrap_or_else(default_pool_size);
        let sqlite = |path| {
            Target::Sqlite(SqliteTarget {
                path,
                readers: pool_size,
                acquire_timeout: self.db_acquire_timeout,
                indexes: policy.map(|p| p.indexes.clone()).unwrap_or_default(),
                auto_index: policy.is_none(),
            })
        };
        let p = self.var_prefix;
        let postgres = |config, url_tls: UrlTls| {
            self.postgres(config, url_tls).map(|mut t| {
                t.schema = schema.to_string();
                t.auto_create = auto_create;
                t.pool_size = pool_size;
                t.declared = declared.clone();
                Target::Postgres(Box::new(t))
            })
        };
        if let Some(url) = self.url()? {
            return match self.parse_url(&url)? {
                Url::Memory => Ok(Target::Memory),
                Url::Sqlite(path) => Ok(sqlite(path)),
                Url::Postgres(config, url_tls) => postgres(*config, url_tls),
            };
        }
        match self.db_type {
            None if self.db_host.is_some() => Err(ConfigError::Invalid(format!(
                "{p}DB_HOST is set but {p}DB_TYPE is not: set {p}DB_TYPE=postgresql"
            ))),
            None => Ok(sqlite(SqlitePath::File(
                self.db_name
                    .as_deref()
                    .unwrap_or(DEFAULT_SQLITE_FILE)
                    .into(),
            ))),
            Some(DbType::Memory) => Ok(Target::Memory),
            Some(DbType::Sqlite) => Ok(sqlite(match self.db_name.as_deref() {
                Some(":memory:") => SqlitePath::Memory,
                name => SqlitePath::File(name.unwrap_or(DEFAULT_SQLITE_FILE).into()),
            })),
            Some(DbType::Postgresql) => {
                let mut cfg = tokio_postgres::Config::new();
                cfg.host(self.db_host.as_deref().unwrap_or("localhost"))
                    .port(self.db_port.unwrap_or(5432))
                    .user(self.db_user.as_deref().unwrap_or("postgres"))
                    .dbname(self.db_name.as_deref().unwrap_or("postgres"));
                postgres(cfg, UrlTls::default())
            }
        }
    }

    fn url(&self) -> Result<Option<String>, ConfigError> {
        if let Some(url) = &self.database_url {
            return Ok(Some(url.trim().to_string()));
        }
        match &self.database_url_file {
            Some(path) => Ok(Some(secret::read_text(path, "the database URL")?)),
            None => Ok(None),
        }
    }

    fn parse_url(&self, url: &str) -> Result<Url, ConfigError> {
        let var = self.var("DATABASE_URL");
        if url == "memory://" || url == "memory:" {
            return Ok(Url::Memory);
        }
        if url == "sqlite::memory:" || url == "sqlite://:memory:" {
            return Ok(Url::Sqlite(SqlitePath::Memory));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            if path.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{var} `sqlite://` names no file: use sqlite://relative/path.db, sqlite:///absolute/path.db or sqlite::memory:"
                )));
            }
            return Ok(Url::Sqlite(SqlitePath::File(PathBuf::from(path))));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (url, tls) = split_tls_params(url, &var)?;
            let cfg = tokio_postgres::Config::from_str(&url).map_err(|e| {
                ConfigError::Invalid(format!("{var} is not a valid PostgreSQL URL: {e}"))
            })?;
            return Ok(Url::Postgres(Box::new(cfg), tls));
        }
        // Only the scheme is quoted: the rest may hold a password.
        match url.split_once(':') {
            Some((scheme, _)) if !scheme.contains('@') && !scheme.contains('/') => {
                Err(ConfigError::Invalid(format!(
                    "{var} has an unsupported scheme `{}`: expected {SCHEMES}",
                    crate::quote::shown(scheme).trim_matches('"')
                )))
            }
            // No scheme at all, e.g. a bare file name: nothing secret to hide.
            None if !url.contains('@') => Err(ConfigError::Invalid(format!(
                "{var} {} has no scheme: for a SQLite file write sqlite://{}; the schemes are {SCHEMES}",
                crate::quote::shown(url),
                url
            ))),
            _ => Err(ConfigError::Invalid(format!(
                "{var} has no recognised scheme: expected {SCHEMES}"
            ))),
        }
    }

    /// The PostgreSQL target: the password settings, TLS, the application
    /// name and the start-up settings applied to `cfg`.
    fn postgres(
        &self,
        mut cfg: tokio_postgres::Config,
        url_tls: UrlTls,
    ) -> Result<PgTarget, ConfigError> {
        let mut password_file = None;
        if let Some(pass) = &self.db_pass {
            cfg.password(pass.as_str());
        } else if let Some(path) = &self.db_pass_file {
            cfg.password(secret::read_text(path, "the database password")?);
            // A URL's own password is fixed; a mounted password file may rotate.
            password_file = Some(path.clone());
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("docsidecar");
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(5));
        }
        Ok(PgTarget {
            password_file,
            acquire_timeout: self.db_acquire_timeout,
            max_retries: self.db_max_retries,
            retry_delay: self.db_retry_delay,
            tls: self.tls(url_tls)?,
            ..PgTarget::new(cfg)
        })
    }

    /// TLS: the URL's parameters win over the DB_SSL* settings (warned).
    fn tls(&self, url: UrlTls) -> Result<PgTls, ConfigError> {
        let v = |name: &str| self.var(name);
        fn pick<T>(from_url: Option<T>, setting: Option<T>, param: &str, var: String) -> Option<T> {
            if from_url.is_some() && setting.is_some() {
                tracing::warn!(
                    "the database URL sets {param} and {var} is set too: the URL's {param} is used"
                );
            }
            from_url.or(setting)
        }
        let mode = pick(url.sslmode, self.db_sslmode, "sslmode", v("DB_SSLMODE"));
        let root_cert = pick(
            url.sslrootcert,
            self.db_sslrootcert.clone(),
            "sslrootcert",
            v("DB_SSLROOTCERT"),
        );
        let cert = pick(
            url.sslcert,
            self.db_sslcert.clone(),
            "sslcert",
            v("DB_SSLCERT"),
        );
        let key = pick(url.sslkey, self.db_sslkey.clone(), "sslkey", v("DB_SSLKEY"));
        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "a database client certificate needs both {} and {} (or sslcert and sslkey in the URL)",
                    v("DB_SSLCERT"),
                    v("DB_SSLKEY")
                )))
            }
        };
        let mode = mode.unwrap_or_default();
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            return Err(ConfigError::Invalid(format!(
                "{}={mode} checks the server's certificate against a CA: set {} (or sslrootcert in the URL) to the CA's PEM file",
                v("DB_SSLMODE"),
                v("DB_SSLROOTCERT")
            )));
        }
        Ok(PgTls {
            mode,
            root_cert,
            client_cert,
        })
    }
}

/// Takes libpq's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`) out of a PostgreSQL URL; tokio-postgres knows only some of them.
fn split_tls_params(url: &str, var: &str) -> Result<(String, UrlTls), ConfigError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), UrlTls::default()));
    };
    let mut tls = UrlTls::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        match key {
            "sslmode" => {
                tls.sslmode =
                    Some(value.parse().map_err(|e: String| {
                        ConfigError::Invalid(format!("{var}: sslmode: {e}"))
                    })?)
            }
            "sslrootcert" => tls.sslrootcert = Some(PathBuf::from(value)),
            "sslcert" => tls.sslcert = Some(PathBuf::from(value)),
            "sslkey" => tls.sslkey = Some(PathBuf::from(value)),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use crate::store::postgres::tls::SSL_MODES;
    use clap::Parser;

    fn args(url: Option<&str>) -> DbArgs {
        let cli = Cli::parse_from(["docsidecar"]);
        let mut db: DbArgs = cli.serve.db.into();
        db.database_url = url.map(String::from);
        db
    }

    impl DbArgs {
        fn database(&self) -> Result<Target, ConfigError> {
            self.target("docsidecar", None)
        }
    }

    fn sqlite_path(target: Target) -> SqlitePath {
        match target {
            Target::Sqlite(t) => t.path,
            other => panic!("{other:?}"),
        }
    }

    fn pg(target: Result<Target, ConfigError>) -> PgTarget {
        match target {
            Ok(Target::Postgres(t)) => *t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_database_urls() {
        let db = |u: &str| args(Some(u)).database();
        assert!(matches!(db("memory://"), Ok(Target::Memory)));
        assert_eq!(
            sqlite_path(db("sqlite::memory:").unwrap()),
            SqlitePath::Memory
        );
        assert_eq!(
            sqlite_path(db("sqlite://data/x.db").unwrap()),
            SqlitePath::File(PathBuf::from("data/x.db"))
        );
        assert_eq!(
            sqlite_path(db("sqlite:///var/lib/x.db").unwrap()),
            SqlitePath::File(PathBuf::from("/var/lib/x.db"))
        );
        assert_eq!(
            pg(db("postgresql://app@db:6432/orders")).to_string(),
            "app@db:6432/orders"
        );
        assert!(db("sqlite://")
            .unwrap_err()
            .to_string()
            .contains("names no file"));
    }

    #[test]
    fn a_url_without_a_scheme_lists_the_schemes() {
        let err = args(Some("rel3.db")).database().unwrap_err().to_string();
        assert!(err.contains("sqlite://rel3.db"), "{err}");
        assert!(err.contains("postgres://"), "{err}");
        assert!(err.contains("memory://"), "{err}");
        let err = args(Some("app:hunter2@db/x"))
            .database()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("sqlite://"), "{err}");
    }

    #[test]
    fn url_errors_never_echo_credentials() {
        for url in [
            "mysql://root:hunter2@db/x",
            "postgres://u:hunter2@db:notaport/x",
            "postgres://u:hunter2@db/x?sslmode=hunter2",
        ] {
            let err = args(Some(url)).database().unwrap_err().to_string();
            assert!(!err.contains("hunter2@"), "{err}");
            assert!(err.contains("DATABASE_URL"), "{err}");
        }
        let db = args(Some("postgres://u:hunter2@db/x")).database().unwrap();
        assert!(!format!("{db:?}").contains("hunter2"));
    }

    #[test]
    fn tls_from_the_url_or_the_settings() {
        let t = pg(args(Some(
            "postgres://app@db/x?sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.crt&application_name=x",
        ))
        .database());
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(t.tls.root_cert, Some(PathBuf::from("/ca dir/ca.crt")));
        assert_eq!(t.config.get_application_name(), Some("x"));

        let mut a = args(Some("postgres://app@db/x"));
        assert_eq!(
            pg(a.database()).tls.mode,
            SslMode::Prefer,
            "libpq's default"
        );
        a.db_sslmode = Some(SslMode::Require);
        assert_eq!(pg(a.database()).tls.mode, SslMode::Require);
        a.db_sslmode = Some(SslMode::VerifyCa);
        let err = a.database().unwrap_err().to_string();
        assert!(err.contains("DB_SSLROOTCERT"), "{err}");
        a.db_sslcert = Some("c.pem".into());
        a.db_sslrootcert = Some("ca.pem".into());
        let err = a.database().unwrap_err().to_string();
        assert!(err.contains("DB_SSLKEY"), "{err}");

        let err = args(Some("postgres://app@db/x?sslmode=allow-ish"))
            .database()
            .unwrap_err()
            .to_string();
        assert!(err.contains(SSL_MODES), "{err}");
    }

    #[test]
    fn overridden_settings_are_named_without_values() {
        let mut a = args(Some("postgres://app:s3cret@db/x"));
        a.db_host = Some("other-host".into());
        a.db_name = Some("other-db".into());
        a.db_pass = Some("p4ss".into());
        a.db_pass_file = Some("/secrets/p".into());
        let notes = a.overridden().join("\n");
        assert!(
            notes.contains("DATABASE_URL is set, so DB_HOST, DB_NAME are ignored"),
            "{notes}"
        );
        assert!(notes.contains("DB_PASS and DB_PASS_FILE"), "{notes}");
        for secret in ["s3cret", "p4ss", "other-host", "other-db"] {
            assert!(!notes.contains(secret), "{notes}");
        }
        assert!(args(None).overridden().is_empty());
    }

    #[test]
    fn default_is_a_sqlite_file() {
        assert_eq!(
            sqlite_path(args(None).database().unwrap()),
            SqlitePath::File(PathBuf::from(DEFAULT_SQLITE_FILE))
        );
    }
}
