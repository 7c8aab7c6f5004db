//! Command line and environment: every setting is a flag with an environment
//! variable (see `docsidecar --help`), resolved once into typed values.

mod mysql_url;

use crate::policy::{self, Policy, PolicyError};
use crate::secret::{self, SecretError};
use crate::store::mysql::{Flavor, MysqlTarget};
use crate::store::sqlite::SqlitePath;
use crate::store::tls::{DbTls, SslMode};
use crate::store::{PgTarget, SqliteTarget, Target};
use crate::tls::TlsFiles;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The sidecar's command line.
#[derive(Debug, Parser)]
#[command(
    name = "docsidecar",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving settings, for `docsidecar` without a subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the DocumentService (the default).
    Serve(ServeArgs),
    /// Apply the database schema with the admin credentials, then exit.
    Migrate(MigrateArgs),
    /// Wait until a sidecar is SERVING (for start-up ordering), then exit 0.
    Wait(WaitArgs),
    /// Ask a sidecar on this host to shut down (for Jobs whose work is done).
    Shutdown(ShutdownArgs),
    /// Check the configuration and the database connection, then exit.
    Check(ServeArgs),
}

/// Settings of `docsidecar wait`.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// The sidecar's gRPC address: HOST:PORT or unix:/path/to.sock.
    #[arg(long, env = "DOCSIDECAR_LISTEN", default_value = "127.0.0.1:50051")]
    pub address: ListenAddr,
    /// Give up after this many seconds (exit 1).
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub timeout: Duration,
}

/// Settings of `docsidecar shutdown`.
#[derive(Debug, Clone, Args)]
pub struct ShutdownArgs {
    /// The sidecar's admin address (HOST:PORT); shutdown is accepted from loopback only.
    #[arg(
        long,
        env = "DOCSIDECAR_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin: String,
}

/// Settings of `docsidecar serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on: HOST:PORT, or unix:/path/to.sock for a Unix socket.
    #[arg(long, env = "DOCSIDECAR_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: ListenAddr,

    #[command(flatten)]
    pub db: ServeDbArgs,

    #[command(flatten)]
    pub common: CommonArgs,

    /// A client token file: one client with the service's whole scope (shorthand
    /// for a [[clients]] entry). Without tokens, calls need no authentication.
    #[arg(long, env = "DOCSIDECAR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM certificate chain: serve gRPC over TLS (re-read when the file changes).
    #[arg(long, env = "DOCSIDECAR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the TLS certificate.
    #[arg(long, env = "DOCSIDECAR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "DOCSIDECAR_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest document accepted, in bytes of its JSON encoding.
    #[arg(long, env = "DOCSIDECAR_MAX_DOCUMENT_BYTES", default_value_t = 1024 * 1024)]
    pub max_document_bytes: usize,

    /// Address of the HTTP admin listener (/livez, /readyz, /startupz, /metrics);
    /// off when unset. Kubernetes manifests bind it on the pod IP, e.g. 0.0.0.0:9090.
    #[arg(long, env = "DOCSIDECAR_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// Seconds new calls are still served after SIGTERM, while the endpoints
    /// controller stops routing to the pod (readiness is false from the signal on).
    #[arg(long, env = "DOCSIDECAR_SHUTDOWN_DELAY", default_value = "5", value_parser = parse_seconds)]
    pub shutdown_delay: Duration,

    /// Largest gRPC request accepted, in bytes (a Write carries many documents).
    #[arg(long, env = "DOCSIDECAR_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Seconds between database health checks (the gRPC health service follows them).
    #[arg(long, env = "DOCSIDECAR_HEALTH_INTERVAL", default_value = "2", value_parser = parse_seconds)]
    pub health_interval: Duration,

    /// Seconds that in-flight calls get to finish once the server stops accepting
    /// (after the shutdown delay).
    #[arg(long, env = "DOCSIDECAR_SHUTDOWN_GRACE", default_value = "25", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,
}

/// Serving settings, resolved: the store to open, the policy, TLS files; what
/// [`crate::server::Server::bind`] needs and nothing it must interpret again.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: ListenAddr,
    pub target: Target,
    pub policy: Option<Policy>,
    pub token_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    pub max_document_bytes: usize,
    pub admin_listen: Option<String>,
    pub shutdown_delay: Duration,
    pub max_message_bytes: usize,
    pub health_interval: Duration,
    pub shutdown_grace: Duration,
}

/// A setting that cannot be used, or a policy file that cannot.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl ServeArgs {
    /// Reads the policy and resolves the database settings.
    pub fn resolve(self) -> Result<ServeConfig, ResolveError> {
        let policy = policy::load(self.common.policy.as_deref())?;
        // Without a policy (development) tables appear on first write; with one,
        // only if the policy says so.
        let auto_create = policy.as_ref().is_none_or(|p| p.auto_create);
        let db: DbArgs = self.db.into();
        let target = db.target(&self.common.schema, auto_create)?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            _ => None,
        };
        Ok(ServeConfig {
            listen: self.listen,
            target,
            policy,
            token_file: self.token_file,
            tls,
            max_document_bytes: self.max_document_bytes,
            admin_listen: self.admin_listen,
            shutdown_delay: self.shutdown_delay,
            max_message_bytes: self.max_message_bytes,
            health_interval: self.health_interval,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

/// Settings of `docsidecar migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: MigrateDbArgs,

    /// The runtime account (a PostgreSQL role, or a MySQL account 'user'@'host'): it
    /// gets SELECT, INSERT, UPDATE and DELETE on the policy's read-write collections
    /// and SELECT on its read-only ones.
    #[arg(long, env = "DOCSIDECAR_GRANT_TO")]
    pub grant_to: Option<String>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Settings shared by every command.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Log format: text for people, json for log collectors. Levels come from RUST_LOG.
    #[arg(long, env = "DOCSIDECAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Policy file (TOML): the service's collections and their access, and its
    /// clients' tokens. Without one the sidecar runs open (development).
    #[arg(long, env = "DOCSIDECAR_POLICY")]
    pub policy: Option<PathBuf>,

    /// PostgreSQL schema that holds one table per collection.
    #[arg(long, env = "DOCSIDECAR_SCHEMA", default_value = "docsidecar")]
    pub schema: String,
}

pub use crate::telemetry::LogFormat;

/// Where to listen: a TCP socket address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("a Unix socket address needs a path: unix:/path/to.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(format!(
                "`{s}` is not HOST:PORT (for example 127.0.0.1:50051) or unix:/path/to.sock"
            ));
        }
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => f.write_str(addr),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("`{s}` is not a non-negative number of seconds"))
}

/// Database settings: the same names for serving and, prefixed `MIGRATE_`, for
/// `docsidecar migrate`, which connects with the admin account.
macro_rules! db_args {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Args)]
        pub struct $name {
            /// Database URL: sqlite://relative.db, sqlite:///absolute.db, sqlite::memory:, memory://,
            /// postgres://user@host:port/db, mysql://user@host:port/db (or mariadb://); several
            /// hosts as host1:port,host2:port. Default: sqlite://docsidecar.db
            #[arg(long, env = concat!($prefix, "DATABASE_URL"), hide_env_values = true)]
            pub database_url: Option<String>,
            /// File holding the database URL (a mounted secret); used when the URL is not set.
            #[arg(long, env = concat!($prefix, "DATABASE_URL_FILE"))]
            pub database_url_file: Option<PathBuf>,
            /// Database type, with the discrete DB_* settings instead of a URL.
            #[arg(long, env = concat!($prefix, "DB_TYPE"), value_enum)]
            pub db_type: Option<DbType>,
            /// Database host; several separated by commas (db-0,db-1,db-2: a Galera
            /// cluster, a PostgreSQL primary and its standbys): only one that accepts
            /// writes serves.
            #[arg(long, env = concat!($prefix, "DB_HOST"))]
            pub db_host: Option<String>,
            /// Database port (PostgreSQL 5432, MySQL/MariaDB 3306).
            #[arg(long, env = concat!($prefix, "DB_PORT"))]
            pub db_port: Option<u16>,
            /// Database name (MySQL/MariaDB: docsidecar's own database), or the SQLite file path.
            #[arg(long, env = concat!($prefix, "DB_NAME"))]
            pub db_name: Option<String>,
            /// Database user.
            #[arg(long, env = concat!($prefix, "DB_USER"))]
            pub db_user: Option<String>,
            /// Database password. Prefer the password file.
            #[arg(long, env = concat!($prefix, "DB_PASS"), hide_env_values = true)]
            pub db_pass: Option<String>,
            /// File holding the database password (a mounted secret).
            #[arg(long, env = concat!($prefix, "DB_PASS_FILE"))]
            pub db_pass_file: Option<PathBuf>,
            /// TLS to the database: disable, prefer (the default), require, verify-ca, verify-full.
            #[arg(long, env = concat!($prefix, "DB_SSLMODE"))]
            pub db_sslmode: Option<SslMode>,
            /// PEM file of the CA the database server's certificate must chain to.
            #[arg(long, env = concat!($prefix, "DB_SSLROOTCERT"))]
            pub db_sslrootcert: Option<PathBuf>,
            /// PEM client certificate, for servers that require one (with DB_SSLKEY).
            #[arg(long, env = concat!($prefix, "DB_SSLCERT"), requires = "db_sslkey")]
            pub db_sslcert: Option<PathBuf>,
            /// PEM private key of the client certificate.
            #[arg(long, env = concat!($prefix, "DB_SSLKEY"), requires = "db_sslcert")]
            pub db_sslkey: Option<PathBuf>,
            /// Database connections to keep (SQLite: reader connections). Default: 2 x cores + 1.
            #[arg(long, env = concat!($prefix, "DB_POOL_SIZE"))]
            pub db_pool_size: Option<usize>,
            /// Connection attempts at start-up before giving up (0: retry forever).
            #[arg(long, env = concat!($prefix, "DB_MAX_RETRIES"), default_value_t = 10)]
            pub db_max_retries: u32,
            /// Seconds between start-up connection attempts (doubling, at most 30 s).
            #[arg(long, env = concat!($prefix, "DB_RETRY_DELAY"), default_value = "1", value_parser = parse_seconds)]
            pub db_retry_delay: Duration,
            /// Seconds a call may wait for a pooled connection before UNAVAILABLE.
            #[arg(long, env = concat!($prefix, "DB_ACQUIRE_TIMEOUT"), default_value = "5", value_parser = parse_seconds)]
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
    /// `schema` and `auto_create` come from the common settings and the policy.
    pub fn target(&self, schema: &str, auto_create: bool) -> Result<Target, ConfigError> {
        let pool_size = self.db_pool_size.unwrap_or_else(default_pool_size).max(1);
        let sqlite = |path| {
            Target::Sqlite(SqliteTarget {
                path,
                readers: pool_size,
                acquire_timeout: self.db_acquire_timeout,
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

    fn args(url: Option<&str>) -> DbArgs {
        let cli = Cli::parse_from(["docsidecar"]);
        let mut db: DbArgs = cli.serve.db.into();
        db.database_url = url.map(String::from);
        db
    }

    impl DbArgs {
        fn database(&self) -> Result<Target, ConfigError> {
            self.target("docsidecar", true)
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

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/tmp/s.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/s.sock".into()))
        );
        assert!("[::1]:50051".parse::<ListenAddr>().is_ok());
        assert!("localhost".parse::<ListenAddr>().is_err());
    }
}
