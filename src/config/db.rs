//! Database settings, resolved once into the store to open ([`Target`]):
//! the URL or the discrete `DB_*` settings, for serving and (prefixed
//! `MIGRATE_`) for `docsidecar migrate`.

use super::mysql_url;
use crate::policy::Policy;
use crate::secret::{self, SecretError};
use crate::store::mysql::{Flavor, MysqlTarget};
use crate::store::sqlite::SqlitePath;
use crate::store::tls::{DbTls, SslMode};
use crate::store::{PgTarget, SqliteTarget, Target};

/// The URL schemes a database URL may use, for messages.
const SCHEMES: &str = "sqlite://relative/path.db, sqlite:///absolute/path.db, sqlite::memory:, memory://, postgres:// (or postgresql://), mysql:// or mariadb://";
use clap::ValueEnum;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DbType {
    Sqlite,
    #[value(alias = "postgres")]
    Postgresql,
    Mysql,
    Mariadb,
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

/// A configuration problem, stated so that an operator can fix it. Never holds a
/// credential.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The SQLite file used when no database is configured.
pub const DEFAULT_SQLITE_FILE: &str = "docsidecar.db";

/// Connections per pool when DB_POOL_SIZE is not set: enough to keep every
/// core busy while some calls wait on the database.
fn default_pool_size() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get()) + 1
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
        let postgres = |config, url_tls| {
            self.postgres(config, url_tls).map(|mut t| {
                t.schema = schema.to_string();
                t.auto_create = auto_create;
                t.pool_size = pool_size;
                t.declared = declared.clone();
                Target::Postgres(Box::new(t))
            })
        };
        let mysql = |flavor, url| {
            self.mysql(flavor, url).map(|mut t| {
                t.auto_create = auto_create;
                t.auto_index = policy.is_none();
                t.pool_size = pool_size;
                Target::Mysql(Box::new(t))
            })
        };
        if let Some(url) = self.url()? {
            return match self.parse_url(&url)? {
                Url::Memory => Ok(Target::Memory),
                Url::Sqlite(path) => Ok(sqlite(path)),
                Url::Postgres(config, tls) => postgres(*config, tls),
                Url::Mysql(flavor, url) => mysql(flavor, *url),
            };
        }
        match self.db_type {
            None if self.db_host.is_some() => Err(ConfigError::Invalid(format!(
                "{p}DB_HOST is set but {p}DB_TYPE is not: set {p}DB_TYPE=postgresql, mysql or mariadb"
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
                let hosts = self.db_host.as_deref().unwrap_or("localhost");
                let hosts = mysql_url::parse_hosts(hosts, self.db_port.unwrap_or(5432), &format!("{p}DB_HOST"))?;
                for host in &hosts {
                    cfg.host(&host.name).port(host.port);
                }
                cfg.user(self.db_user.as_deref().unwrap_or("postgres"))
                    .dbname(self.db_name.as_deref().unwrap_or("postgres"));
                postgres(cfg, UrlTls::default())
            }
            Some(flavor @ (DbType::Mysql | DbType::Mariadb)) => {
                let flavor = if flavor == DbType::Mariadb {
                    Flavor::Mariadb
                } else {
                    Flavor::Mysql
                };
                let hosts = self.db_host.as_deref().unwrap_or("localhost");
                let url = mysql_url::MysqlUrl {
                    hosts: mysql_url::parse_hosts(
                        hosts,
                        self.db_port.unwrap_or(mysql_url::DEFAULT_PORT),
                        &format!("{p}DB_HOST"),
                    )?,
                    user: self.db_user.clone(),
                    database: self.db_name.clone(),
                    ..Default::default()
                };
                mysql(flavor, url)
            }
        }
    }

    /// TLS as the settings say, over what a URL said (warned when both set
    /// one); a client certificate needs its key.
    fn tls(&self, url: DbTls, url_mode_set: bool) -> Result<DbTls, ConfigError> {
        let v = |name: &str| self.var(name);
        for (param, in_url, setting) in [
            ("sslmode", url_mode_set, self.db_sslmode.is_some()),
            (
                "sslrootcert",
                url.root_cert.is_some(),
                self.db_sslrootcert.is_some(),
            ),
            (
                "sslcert",
                url.client_cert.is_some(),
                self.db_sslcert.is_some(),
            ),
            ("sslkey", url.client_key.is_some(), self.db_sslkey.is_some()),
        ] {
            if in_url && setting {
                tracing::warn!(
                    "the database URL sets {param} and {} is set too: {} is used",
                    v(&format!("DB_{}", param.to_uppercase())),
                    v(&format!("DB_{}", param.to_uppercase()))
                );
            }
        }
        let tls = DbTls {
            mode: self.db_sslmode.unwrap_or(url.mode),
            root_cert: self.db_sslrootcert.clone().or(url.root_cert),
            client_cert: self.db_sslcert.clone().or(url.client_cert),
            client_key: self.db_sslkey.clone().or(url.client_key),
        };
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(ConfigError::Invalid(format!(
                "a client certificate needs both {} and {} (or sslcert and sslkey in the URL)",
                v("DB_SSLCERT"),
                v("DB_SSLKEY")
            )));
        }
        Ok(tls)
    }

    /// The MySQL/MariaDB target: a URL's parts, or the discrete settings in
    /// the same shape, with the password, TLS and start-up settings.
    fn mysql(&self, flavor: Flavor, url: mysql_url::MysqlUrl) -> Result<MysqlTarget, ConfigError> {
        let p = self.var_prefix;
        let mut target = MysqlTarget::new(
            url.hosts,
            url.user.as_deref().unwrap_or("root"),
            url.database.as_deref().unwrap_or("docsidecar"),
        );
        target.flavor = flavor;
        target.password = url.password;
        if let Some(pass) = &self.db_pass {
            target.password = Some(pass.clone());
        } else if let Some(path) = &self.db_pass_file {
            target.password = Some(secret::read_text(path, "the database password")?);
            // A URL's own password is fixed; a mounted password file may rotate.
            target.password_file = Some(path.clone());
        }
        let url_mode_set = url.sslmode.is_some();
        target.tls = self.tls(
            DbTls {
                mode: url.sslmode.unwrap_or_default(),
                root_cert: url.sslrootcert,
                client_cert: url.sslcert,
                client_key: url.sslkey,
            },
            url_mode_set,
        )?;
        if !crate::store::mysql::is_valid_database(&target.database) {
            return Err(ConfigError::Invalid(format!(
                "{p}DB_NAME (or the URL's database) must be ASCII letters, digits, `_`, `$` or `-`, at most 64"
            )));
        }
        target.acquire_timeout = self.db_acquire_timeout;
        target.max_retries = self.db_max_retries;
        target.retry_delay = self.db_retry_delay;
        Ok(target)
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
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let flavor = if url.starts_with("mariadb://") {
                Flavor::Mariadb
            } else {
                Flavor::Mysql
            };
            return Ok(Url::Mysql(
                flavor,
                Box::new(mysql_url::parse_url(url, &var)?),
            ));
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
        // Several hosts: a primary and its standbys; only the one that
        // accepts writes serves (a standby is skipped, and after a failover
        // new connections find the promoted one).
        if cfg.get_hosts().len() > 1 {
            cfg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        let url_mode_set = url_tls.sslmode.is_some();
        let tls = self.tls(
            DbTls {
                mode: url_tls.sslmode.unwrap_or_default(),
                root_cert: url_tls.sslrootcert,
                client_cert: url_tls.sslcert,
                client_key: url_tls.sslkey,
            },
            url_mode_set,
        )?;
        Ok(PgTarget {
            password_file,
            acquire_timeout: self.db_acquire_timeout,
            max_retries: self.db_max_retries,
            retry_delay: self.db_retry_delay,
            tls,
            ..PgTarget::new(cfg)
        })
    }
}

/// The TLS parameters a PostgreSQL URL may carry (libpq's names).
#[derive(Debug, Default)]
struct UrlTls {
    sslmode: Option<SslMode>,
    sslrootcert: Option<PathBuf>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
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

/// What a database URL names, before the settings around it are applied.
enum Url {
    Memory,
    Sqlite(SqlitePath),
    Postgres(Box<tokio_postgres::Config>, UrlTls),
    Mysql(Flavor, Box<mysql_url::MysqlUrl>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
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
        match db("postgresql://app@db:6432/orders").unwrap() {
            Target::Postgres(t) => assert_eq!(t.to_string(), "app@db:6432/orders"),
            other => panic!("{other:?}"),
        }
        assert!(db("sqlite://")
            .unwrap_err()
            .to_string()
            .contains("names no file"));
    }

    #[test]
    fn url_errors_never_echo_credentials() {
        for url in [
            "mongodb://root:hunter2@db/x",
            "postgres://u:hunter2@db:notaport/x",
            "mysql://u:hunter2@db:notaport/x",
            "mariadb://u:hunter2@db/x?sslmode=sometimes",
        ] {
            let err = args(Some(url)).database().unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("DATABASE_URL"), "{err}");
        }
        for url in ["postgres://u:hunter2@db/x", "mysql://u:hunter2@db/x"] {
            let db = args(Some(url)).database().unwrap();
            assert!(!format!("{db:?} {db}").contains("hunter2"));
        }
    }

    #[test]
    fn mysql_and_mariadb_from_a_url_or_the_discrete_settings() {
        let mysql = |target| match target {
            Ok(Target::Mysql(t)) => *t,
            other => panic!("{other:?}"),
        };
        let t = mysql(
            args(Some(
                "mysql://app:pw@db-0,db-1:3307/orders?sslmode=verify-ca",
            ))
            .database(),
        );
        assert_eq!(t.to_string(), "app@db-0:3306,db-1:3307/orders");
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert_eq!(t.tls.mode, SslMode::VerifyCa);
        assert_eq!(t.flavor, Flavor::Mysql);
        let mut db = args(None);
        db.db_type = Some(DbType::Mariadb);
        db.db_host = Some("g-0,g-1,g-2".into());
        db.db_user = Some("app".into());
        db.db_sslmode = Some(SslMode::VerifyFull);
        db.db_sslrootcert = Some("/ca.pem".into());
        let t = mysql(db.database());
        assert_eq!(t.to_string(), "app@g-0:3306,g-1:3306,g-2:3306/docsidecar");
        assert_eq!(
            (t.flavor, t.tls.mode),
            (Flavor::Mariadb, SslMode::VerifyFull)
        );
        assert_eq!(t.tls.root_cert, Some(PathBuf::from("/ca.pem")));
        db.db_name = Some("bad`name".into());
        assert!(db.database().unwrap_err().to_string().contains("DB_NAME"));
    }

    #[test]
    fn several_postgres_hosts_skip_standbys() {
        let pg = |target| match target {
            Ok(Target::Postgres(t)) => *t,
            other => panic!("{other:?}"),
        };
        let t = pg(args(Some("postgres://app@p-0:5432,p-1:5433/orders")).database());
        assert_eq!(t.to_string(), "app@p-0:5432,p-1:5433/orders");
        let read_write = tokio_postgres::config::TargetSessionAttrs::ReadWrite;
        assert_eq!(t.config.get_target_session_attrs(), read_write);
        let mut db = args(None);
        db.db_type = Some(DbType::Postgresql);
        db.db_host = Some("p-0,p-1".into());
        let t = pg(db.database());
        assert_eq!(t.to_string(), "postgres@p-0:5432,p-1:5432/postgres");
        assert_eq!(t.config.get_target_session_attrs(), read_write);
    }

    fn pg(target: Result<Target, ConfigError>) -> PgTarget {
        match target {
            Ok(Target::Postgres(t)) => *t,
            other => panic!("{other:?}"),
        }
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
    fn postgres_tls_from_the_url_or_the_settings() {
        let t = pg(args(Some(
            "postgres://app@db/x?sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.crt&application_name=x",
        ))
        .database());
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(t.tls.root_cert, Some(PathBuf::from("/ca dir/ca.crt")));
        assert_eq!(t.config.get_application_name(), Some("x"));

        let mut a = args(Some("postgres://app@db/x?sslmode=require"));
        assert_eq!(pg(a.database()).tls.mode, SslMode::Require);
        // The setting wins over the URL's parameter (and says so).
        a.db_sslmode = Some(SslMode::VerifyCa);
        assert_eq!(pg(a.database()).tls.mode, SslMode::VerifyCa);
        a.db_sslcert = Some("c.pem".into());
        let err = a.database().unwrap_err().to_string();
        assert!(err.contains("DB_SSLKEY"), "{err}");
        assert_eq!(
            pg(args(Some("postgres://app@db/x")).database()).tls.mode,
            SslMode::Prefer,
            "libpq's default"
        );
        let err = args(Some("postgres://app@db/x?sslmode=allow-ish"))
            .database()
            .unwrap_err()
            .to_string();
        assert!(err.contains(SslMode::NAMES), "{err}");
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
