//! Command line and environment: every setting is a flag with an environment
//! variable (see `docsidecar --help`), checked against its allowed range when
//! parsed, and resolved once into the lower layers' types.
//!
//! - [`db`]: the database settings (URL or `DB_*`, TLS, pool, retries);
//! - [`values`]: the ranged value parsers;
//! - [`cli`]: parsing the command line, with errors that name the environment
//!   variable a bad value came from.

pub mod cli;
mod db;
mod mysql_url;
pub mod values;

pub use crate::telemetry::LogFormat;
pub use crate::transport::ListenAddr;
pub use cli::parse;
pub use db::{ConfigError, DbArgs, DbType, DEFAULT_SQLITE_FILE};

use crate::api::WatchLimits;
use crate::policy::{self, Access, Policy, PolicyError};
use crate::reaper::Reaping;
use crate::store::tls::SslMode;
use crate::store::{Declared, Grant, Target};
use crate::tls::TlsFiles;
use crate::transport;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use values::{count, duration, seconds};

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
    /// Give up after this many seconds (exit 1); 0.1 to 86400.
    #[arg(long, default_value = "60", value_parser = seconds(0.1, 86_400.0))]
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

    #[command(flatten)]
    pub connections: ConnectionArgs,

    /// A client token file: one client with the service's whole scope (shorthand
    /// for a [[clients]] entry). Without tokens, calls need no authentication.
    /// Tokens are at least 16 bytes.
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

    /// Largest document accepted, in bytes of its JSON encoding; 16 to 67108864.
    #[arg(long, env = "DOCSIDECAR_MAX_DOCUMENT_BYTES", default_value_t = 1024 * 1024,
          value_parser = count(16usize, 64 << 20, "a number of bytes"))]
    pub max_document_bytes: usize,

    /// Reads of many documents (List, BatchGet, Query) served at once, 1 to
    /// 10000; more wait for their turn. Each may hold its ~3 MiB response
    /// budget, so this bounds the memory of large reads.
    #[arg(long, env = "DOCSIDECAR_MAX_CONCURRENT_READS", default_value_t = 8,
          value_parser = count(1usize, 10_000, "a number of reads"))]
    pub max_concurrent_reads: usize,

    /// Address of the HTTP admin listener (/livez, /readyz, /startupz, /metrics):
    /// HOST:PORT, off when unset. Kubernetes manifests bind it on the pod IP, e.g. 0.0.0.0:9090.
    #[arg(long, env = "DOCSIDECAR_ADMIN_LISTEN", value_parser = values::tcp_address)]
    pub admin_listen: Option<String>,

    /// Seconds new calls are still served after SIGTERM, while the endpoints
    /// controller stops routing to the pod (readiness is false from the signal on);
    /// 0 to 3600.
    #[arg(long, env = "DOCSIDECAR_SHUTDOWN_DELAY", default_value = "5", value_parser = seconds(0.0, 3600.0))]
    pub shutdown_delay: Duration,

    /// Largest gRPC request accepted, in bytes (a Write carries many documents);
    /// 4096 to 1073741824. A larger request is RESOURCE_EXHAUSTED.
    #[arg(long, env = "DOCSIDECAR_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = count(4096usize, 1 << 30, "a number of bytes"))]
    pub max_message_bytes: usize,

    /// How long the change feed keeps history for Watch resume tokens: a
    /// number with a unit, s, m, h or d (`24h`), from 1s to 365d. Older tokens
    /// are OUT_OF_RANGE.
    #[arg(long, env = "DOCSIDECAR_CHANGE_RETENTION", default_value = "24h",
          value_parser = duration(Duration::from_secs(1), Duration::from_secs(365 * 86_400)))]
    pub change_retention: Duration,

    /// Watch streams served at once, 1 to 100000; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "DOCSIDECAR_MAX_WATCH_STREAMS", default_value_t = 100,
          value_parser = count(1usize, 100_000, "a number of streams"))]
    pub max_watch_streams: usize,

    /// Seconds a watcher may leave its buffer full before its stream ends
    /// with ABORTED (WATCH_TOO_SLOW; it resumes from its last token); 0.1 to 3600.
    #[arg(long, env = "DOCSIDECAR_WATCH_SLOW_AFTER", default_value = "30", value_parser = seconds(0.1, 3600.0))]
    pub watch_slow_after: Duration,

    /// Seconds between PROGRESS events on a quiet Watch stream; 0.01 to 10.
    #[arg(long, env = "DOCSIDECAR_WATCH_PROGRESS", default_value = "10", value_parser = seconds(0.01, 10.0))]
    pub watch_progress: Duration,

    /// Seconds between a Watch stream's reads of the feed when nothing wakes
    /// it (writes through another sidecar without a notification); 0.001 to 60.
    #[arg(long, env = "DOCSIDECAR_WATCH_POLL", default_value = "0.5", value_parser = seconds(0.001, 60.0))]
    pub watch_poll: Duration,

    /// Seconds between rounds of the expiry reaper, which deletes expired
    /// documents (reads never return them either way); 0.001 to 86400.
    #[arg(long, env = "DOCSIDECAR_REAP_INTERVAL", default_value = "1", value_parser = seconds(0.001, 86_400.0))]
    pub reap_interval: Duration,

    /// Expired documents the reaper deletes per transaction (short transactions,
    /// no long locks); 1 to 100000.
    #[arg(long, env = "DOCSIDECAR_REAP_BATCH", default_value_t = 500,
          value_parser = count(1usize, 100_000, "a number of documents"))]
    pub reap_batch: usize,

    /// Seconds between database health checks (the gRPC health service and
    /// /readyz follow them); 0.1 to 3600.
    #[arg(long, env = "DOCSIDECAR_HEALTH_INTERVAL", default_value = "2", value_parser = seconds(0.1, 3600.0))]
    pub health_interval: Duration,

    /// Seconds that in-flight calls get to finish once the server stops accepting
    /// (after the shutdown delay); 0 to 3600.
    #[arg(long, env = "DOCSIDECAR_SHUTDOWN_GRACE", default_value = "25", value_parser = seconds(0.0, 3600.0))]
    pub shutdown_grace: Duration,
}

/// Limits of the gRPC port's connections (HTTP/2).
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Client connections open at once, 1 to 100000; a connection beyond is closed
    /// at once (docsidecar_connections_rejected_total) while the others keep working.
    #[arg(long, env = "DOCSIDECAR_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = count(1usize, 100_000, "a number of connections"))]
    pub max_connections: usize,

    /// Calls in flight on one connection (HTTP/2 concurrent streams), 1 to 10000;
    /// clients queue the others.
    #[arg(long, env = "DOCSIDECAR_MAX_CONCURRENT_STREAMS", default_value_t = 100,
          value_parser = count(1u32, 10_000, "a number of streams"))]
    pub max_concurrent_streams: u32,

    /// Seconds between HTTP/2 pings on each connection, to find dead peers; 1 to 86400.
    #[arg(long, env = "DOCSIDECAR_KEEPALIVE_INTERVAL", default_value = "60", value_parser = seconds(1.0, 86_400.0))]
    pub keepalive_interval: Duration,

    /// Seconds a ping may go unanswered before its connection is closed; 1 to 3600.
    #[arg(long, env = "DOCSIDECAR_KEEPALIVE_TIMEOUT", default_value = "20", value_parser = seconds(1.0, 3600.0))]
    pub keepalive_timeout: Duration,

    /// Seconds a new connection has to finish its TLS handshake and send the HTTP/2
    /// preface before it is closed; 0.1 to 600.
    #[arg(long, env = "DOCSIDECAR_HANDSHAKE_TIMEOUT", default_value = "10", value_parser = seconds(0.1, 600.0))]
    pub handshake_timeout: Duration,

    /// Seconds a connection may stay open with no call in flight before it is
    /// closed with a GOAWAY (clients reconnect on their next call); 1 to 86400.
    #[arg(long, env = "DOCSIDECAR_IDLE_TIMEOUT", default_value = "300", value_parser = seconds(1.0, 86_400.0))]
    pub idle_timeout: Duration,

    /// Largest request headers (metadata), in bytes as HTTP/2 counts them (names,
    /// values and 32 per field); 1024 to 1048576. Larger headers, up to sixteen
    /// times this, are answered RESOURCE_EXHAUSTED on a connection that stays
    /// open; see the README for beyond.
    #[arg(long, env = "DOCSIDECAR_MAX_HEADER_BYTES", default_value_t = 16 * 1024,
          value_parser = count(1024usize, 1 << 20, "a number of bytes"))]
    pub max_header_bytes: usize,
}

impl From<ConnectionArgs> for transport::Limits {
    fn from(a: ConnectionArgs) -> transport::Limits {
        transport::Limits {
            max_connections: a.max_connections,
            max_concurrent_streams: a.max_concurrent_streams,
            keepalive_interval: a.keepalive_interval,
            keepalive_timeout: a.keepalive_timeout,
            handshake_timeout: a.handshake_timeout,
            idle_timeout: a.idle_timeout,
            max_header_bytes: a.max_header_bytes,
        }
    }
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
    pub max_concurrent_reads: usize,
    pub admin_listen: Option<String>,
    pub shutdown_delay: Duration,
    pub max_message_bytes: usize,
    pub health_interval: Duration,
    pub shutdown_grace: Duration,
    pub reaping: Reaping,
    pub change_retention: Duration,
    pub watch: WatchLimits,
    pub connections: transport::Limits,
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
            max_concurrent_reads: self.max_concurrent_reads,
            admin_listen: self.admin_listen,
            shutdown_delay: self.shutdown_delay,
            max_message_bytes: self.max_message_bytes,
            health_interval: self.health_interval,
            shutdown_grace: self.shutdown_grace,
            reaping: Reaping {
                every: self.reap_interval,
                batch: self.reap_batch,
            },
            change_retention: self.change_retention,
            watch: WatchLimits {
                max_streams: self.max_watch_streams,
                slow_after: self.watch_slow_after,
                poll_every: self.watch_poll,
                progress_every: self.watch_progress,
            },
            connections: self.connections.into(),
        })
    }
}

/// The collections a policy declares, with what their access needs from the
/// database; any collection without a policy.
pub fn declared(policy: Option<&Policy>) -> Declared {
    match policy {
        None => Declared::Any,
        Some(p) => Declared::Only(
            p.collections
                .iter()
                .map(|(name, access)| {
                    let grant = match access {
                        Access::ReadWrite => Grant::ReadWrite,
                        Access::ReadOnly => Grant::ReadOnly,
                    };
                    (name.clone(), grant)
                })
                .collect(),
        ),
    }
}

/// Settings of `docsidecar migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: MigrateDbArgs,

    /// The runtime account (a PostgreSQL role, or a MySQL account 'user'@'host'): its
    /// privileges become exactly the policy's: SELECT, INSERT, UPDATE and DELETE on
    /// the read-write collections, SELECT on the read-only ones, nothing on any other
    /// table (a collection removed from the policy loses its grants). Each change is
    /// logged.
    #[arg(long, env = "DOCSIDECAR_GRANT_TO")]
    pub grant_to: Option<String>,

    /// PostgreSQL: also revoke TEMPORARY on the database from PUBLIC, so that the
    /// runtime role cannot create temporary tables. This affects EVERY role of the
    /// database: roles that need temporary tables must then be granted TEMPORARY
    /// themselves.
    #[arg(long, env = "DOCSIDECAR_REVOKE_PUBLIC_TEMP")]
    pub revoke_public_temp: bool,

    /// Moving from the hand-written row-level security recipe: rows of a scoped
    /// collection that have no scope yet and hold an account name in this
    /// document field (`owner`) get the scope that account's policy declares.
    #[arg(long, env = "DOCSIDECAR_ADOPT_OWNER_FIELD", value_name = "FIELD")]
    pub adopt_owner_field: Option<String>,

    /// Re-key tables made by releases before row scopes (primary key `id`) by
    /// `(scope, id)`, which a scoped collection needs. Sidecars of those
    /// releases can no longer write them afterwards: run it once none runs.
    #[arg(long, env = "DOCSIDECAR_CONTRACT")]
    pub contract: bool,

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

    /// PostgreSQL schema that holds one table per collection (lowercase letters,
    /// digits and `_`, starting with a letter, at most 63).
    #[arg(long, env = "DOCSIDECAR_SCHEMA", default_value = "docsidecar", value_parser = values::schema)]
    pub schema: String,
}

/// Database settings: the same names for serving and, prefixed `MIGRATE_`, for
/// `docsidecar migrate`, which connects with the admin account.
macro_rules! db_args {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Args)]
        pub struct $name {
            /// Database URL: sqlite://relative.db, sqlite:///absolute.db, sqlite::memory:, memory://,
            /// postgres://user@host:port/db[?sslmode=verify-full&sslrootcert=/ca.crt],
            /// mysql://user@host:port/db (or mariadb://); several hosts as host1:port,host2:port.
            /// It wins over the discrete DB_* settings. Default: sqlite://docsidecar.db
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
            /// Database port (PostgreSQL 5432, MySQL/MariaDB 3306), 1 to 65535.
            #[arg(long, env = concat!($prefix, "DB_PORT"), value_parser = count(1u16, u16::MAX, "a port number"))]
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
            /// File holding the database password (a mounted secret, re-read when it changes).
            #[arg(long, env = concat!($prefix, "DB_PASS_FILE"))]
            pub db_pass_file: Option<PathBuf>,
            /// TLS to the database: disable, prefer (the default: TLS when the server offers
            /// it, certificate not checked), require (always TLS), verify-ca (the certificate
            /// chains to DB_SSLROOTCERT, or to the public roots without it), verify-full (and
            /// names the host). It wins over a URL's sslmode.
            #[arg(long, env = concat!($prefix, "DB_SSLMODE"), value_parser = SslMode::from_str)]
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
            /// Database connections to keep, 1 to 1000 (SQLite: reader connections).
            /// Default: 2 x cores + 1. PostgreSQL also holds dedicated ones (health check,
            /// expiry reaper, change feed).
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
