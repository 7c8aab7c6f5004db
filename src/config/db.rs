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
    /// Resolves the URL or the discrete settings into the store to open.
    /// `schema` comes from the common settings; `auto_create` and indexes from the policy.
    pub fn target(&self, schema: &str, policy: Option<&Policy>) -> Result<Target, ConfigError> {
        // Without a policy (development) tables and indexes appear on first
        // use; with one, only if the policy says so.
        let auto_create = policy.is_none_or(|p| p.auto_create);
        let pool_size = self.db_pool_size.unwrap_or_else(default_pool_size).max(1);
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
        let postgres = |config| {
            self.postgres(config).map(|mut t| {
                t.schema = schema.to_string();
                t.auto_create = auto_create;
                t.pool_size = pool_size;
                Target::Postgres(Box::new(t))
            })
        };
        let mysql = |flavor, url| {
            self.mysql(flavor, url).map(|mut t| {
                t.auto_create = auto_create;
                t.pool_size = pool_size;
                Target::Mysql(Box::new(t))
            })
        };
        if let Some(url) = self.url()? {
            return match self.parse_url(&url)? {
                Url::Memory => Ok(Target::Memory),
                Url::Sqlite(path) => Ok(sqlite(path)),
                Url::Postgres(config) => postgres(*config),
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
                postgres(cfg)
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

    /// TLS as the settings say, over what a URL said.
    fn tls(&self, url: DbTls) -> DbTls {
        DbTls {
            mode: self.db_sslmode.unwrap_or(url.mode),
            root_cert: self.db_sslrootcert.clone().or(url.root_cert),
            client_cert: self.db_sslcert.clone().or(url.client_cert),
            client_key: self.db_sslkey.clone().or(url.client_key),
        }
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
        target.tls = self.tls(DbTls {
            mode: url.sslmode.unwrap_or_default(),
            root_cert: url.sslrootcert,
            client_cert: url.sslcert,
            client_key: url.sslkey,
        });
        if target.tls.client_cert.is_some() != target.tls.client_key.is_some() {
            return Err(ConfigError::Invalid(format!(
                "a client certificate needs both {p}DB_SSLCERT and {p}DB_SSLKEY (or sslcert and sslkey in the URL)"
            )));
        }
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
        let var = format!("{}DATABASE_URL", self.var_prefix);
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
            let cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
                ConfigError::Invalid(format!("{var} is not a valid PostgreSQL URL: {e}"))
            })?;
            return Ok(Url::Postgres(Box::new(cfg)));
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
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        Err(ConfigError::Invalid(format!(
            "{var} has an unsupported scheme `{scheme}`: expected sqlite://, sqlite::memory:, memory://, postgres://, mysql:// or mariadb://"
        )))
    }

    /// The PostgreSQL target: the password settings, the application name and
    /// the start-up settings applied to `cfg`.
    fn postgres(&self, mut cfg: tokio_postgres::Config) -> Result<PgTarget, ConfigError> {
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
        let p = self.var_prefix;
        match self.db_sslmode {
            None => {}
            Some(SslMode::Disable) => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            }
            Some(SslMode::Prefer) => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
            }
            Some(SslMode::Require) => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            }
            Some(mode @ (SslMode::VerifyCa | SslMode::VerifyFull)) => {
                return Err(ConfigError::Invalid(format!(
                    "{p}DB_SSLMODE={mode} is not supported for PostgreSQL by this build (MySQL/MariaDB only)"
                )))
            }
        }
        if self.db_sslrootcert.is_some() || self.db_sslcert.is_some() {
            return Err(ConfigError::Invalid(format!(
                "{p}DB_SSLROOTCERT, {p}DB_SSLCERT and {p}DB_SSLKEY are not supported for PostgreSQL by this build (MySQL/MariaDB only)"
            )));
        }
        Ok(PgTarget {
            password_file,
            acquire_timeout: self.db_acquire_timeout,
            max_retries: self.db_max_retries,
            retry_delay: self.db_retry_delay,
            ..PgTarget::new(cfg)
        })
    }
}

/// What a database URL names, before the settings around it are applied.
enum Url {
    Memory,
    Sqlite(SqlitePath),
    Postgres(Box<tokio_postgres::Config>),
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

    #[test]
    fn default_is_a_sqlite_file() {
        assert_eq!(
            sqlite_path(args(None).database().unwrap()),
            SqlitePath::File(PathBuf::from(DEFAULT_SQLITE_FILE))
        );
    }
}
