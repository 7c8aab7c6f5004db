//! Command line and environment: every setting is a flag with an environment
//! variable (see `docsidecar --help`), resolved once into typed values.

mod db;
mod mysql_url;

pub use db::{ConfigError, DbArgs, DbType, DEFAULT_SQLITE_FILE};

use crate::api::WatchLimits;
use crate::policy::{self, Policy, PolicyError};
use crate::reaper::Reaping;
use crate::store::tls::SslMode;
use crate::store::Target;
use crate::tls::TlsFiles;
use clap::{Args, Parser, Subcommand};
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

    /// How long the change feed keeps history for Watch resume tokens: a
    /// number with a unit, s, m, h or d (`24h`). Older tokens are OUT_OF_RANGE.
    #[arg(long, env = "DOCSIDECAR_CHANGE_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub change_retention: Duration,

    /// Watch streams served at once; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "DOCSIDECAR_MAX_WATCH_STREAMS", default_value_t = 100)]
    pub max_watch_streams: usize,

    /// Seconds a watcher may leave its buffer full before its stream ends
    /// with ABORTED (WATCH_TOO_SLOW); it resumes from its last token.
    #[arg(long, env = "DOCSIDECAR_WATCH_SLOW_AFTER", default_value = "30", value_parser = parse_seconds)]
    pub watch_slow_after: Duration,

    /// Seconds between PROGRESS events on a quiet Watch stream (at most 10).
    #[arg(long, env = "DOCSIDECAR_WATCH_PROGRESS", default_value = "10", value_parser = parse_seconds)]
    pub watch_progress: Duration,

    /// Seconds between a Watch stream's reads of the feed when nothing wakes
    /// it (writes through another sidecar without a notification).
    #[arg(long, env = "DOCSIDECAR_WATCH_POLL", default_value = "0.5", value_parser = parse_seconds)]
    pub watch_poll: Duration,

    /// Seconds between rounds of the expiry reaper, which deletes expired
    /// documents (reads never return them either way).
    #[arg(long, env = "DOCSIDECAR_REAP_INTERVAL", default_value = "1", value_parser = parse_seconds)]
    pub reap_interval: Duration,

    /// Expired documents the reaper deletes per transaction (short transactions,
    /// no long locks).
    #[arg(long, env = "DOCSIDECAR_REAP_BATCH", default_value_t = 500)]
    pub reap_batch: usize,

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
    pub reaping: Reaping,
    pub change_retention: Duration,
    pub watch: WatchLimits,
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
        let db: DbArgs = self.db.into();
        let target = db.target(&self.common.schema, policy.as_ref())?;
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
            reaping: Reaping {
                every: self.reap_interval,
                batch: self.reap_batch.max(1),
            },
            change_retention: self.change_retention,
            watch: WatchLimits {
                max_streams: self.max_watch_streams,
                slow_after: self.watch_slow_after,
                poll_every: self.watch_poll,
                progress_every: self.watch_progress.min(Duration::from_secs(10)),
            },
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

/// A duration with a unit: `90s`, `30m`, `24h`, `7d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: a number with a unit s, m, h or d (24h)"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{s}` is not a duration: a number with a unit s, m, h or d (24h)"
            ))
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
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

#[cfg(test)]
mod tests {
    use super::*;

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
