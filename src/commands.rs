//! The command line's verbs: serve (the default), migrate, wait, shutdown, check.

use crate::background::Tasks;
use crate::config::{
    self, Cli, Command, ConfigError, DbArgs, ListenAddr, LogFormat, MigrateArgs, ServeArgs,
    ShutdownArgs, WaitArgs,
};
use crate::policy;
use crate::server::{self, StartError};
use crate::store::{self, Declared, MigratePlan, Target};
use crate::telemetry;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tracing::{error, info, warn};

/// Runs one command; the exit code says whether it succeeded.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::Wait(args)) => wait(args).await,
        Some(Command::Shutdown(args)) => shutdown(args).await,
        Some(Command::Check(args)) => check(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), StartError> {
    telemetry::init(args.common.log_format);
    server::serve(args.resolve()?).await
}

async fn migrate(args: MigrateArgs) -> Result<(), StartError> {
    telemetry::init(args.common.log_format);
    let db: DbArgs = args.db.into();
    // Never guess: the serving settings or the default SQLite file would
    // migrate a database the operator did not name.
    if !db.any_database_setting() {
        return Err(ConfigError::Invalid(
            "migrate connects with the admin account and reads only the MIGRATE_ settings: set MIGRATE_DATABASE_URL (or MIGRATE_DATABASE_URL_FILE, or MIGRATE_DB_TYPE with MIGRATE_DB_HOST, MIGRATE_DB_NAME, …); it never uses DATABASE_URL or a default database".into(),
        )
        .into());
    }
    let policy = policy::load(args.common.policy.as_deref())?;
    let plan = MigratePlan {
        collections: match config::declared(policy.as_ref()) {
            Declared::Only(collections) => collections,
            Declared::Any => Default::default(),
        },
        grant_to: args.grant_to.clone(),
        revoke_public_temp: args.revoke_public_temp,
        service: policy
            .as_ref()
            .map(|p| p.service.clone())
            .unwrap_or_default(),
        scopes: policy
            .as_ref()
            .map(|p| p.scopes.clone())
            .unwrap_or_default(),
        adopt_owner_field: args.adopt_owner_field.clone(),
        contract: args.contract,
        indexes: policy
            .as_ref()
            .map(|p| p.indexes.clone())
            .unwrap_or_default(),
    };
    match db.target(&args.common.schema, policy.as_ref())? {
        Target::Postgres(target) => {
            info!(database = %target, schema = %target.schema, "migrating");
            store::postgres::migrate::migrate(&target, &plan).await?;
        }
        Target::Mysql(target) => {
            if args.revoke_public_temp {
                warn!("--revoke-public-temp applies to PostgreSQL only; ignored");
            }
            info!(database = %target, "migrating");
            store::mysql::migrate::migrate(&target, &plan).await?;
        }
        target => {
            if args.grant_to.is_some() || args.revoke_public_temp {
                warn!("--grant-to and --revoke-public-temp apply to networked databases only; ignored");
            }
            // Opening an embedded store applies its pending migrations.
            let tasks = Tasks::new();
            store::open(&target, &tasks, store::Clock::default())
                .await?
                .close()
                .await;
            tasks.stop().await;
            info!("migrations applied");
        }
    }
    Ok(())
}

/// A channel to a sidecar's gRPC address, TCP or Unix socket.
fn channel(address: &ListenAddr) -> Result<Channel, StartError> {
    match address {
        ListenAddr::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| e.connect_timeout(Duration::from_secs(1)).connect_lazy())
            .map_err(|e| StartError::Client(e.to_string())),
        ListenAddr::Unix(path) => {
            let path = path.clone();
            // The URI is required but unused: the connector dials the socket.
            Ok(
                Endpoint::from_static("http://localhost").connect_with_connector_lazy(
                    tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }),
                ),
            )
        }
    }
}

async fn wait(args: WaitArgs) -> Result<(), StartError> {
    telemetry::init(LogFormat::Text);
    let mut health = HealthClient::new(channel(&args.address)?);
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let request = HealthCheckRequest {
            service: crate::proto::document_service_server::SERVICE_NAME.into(),
        };
        let status = tokio::time::timeout(Duration::from_secs(2), health.check(request)).await;
        let now = match status {
            Ok(Ok(resp)) if resp.get_ref().status() == ServingStatus::Serving => {
                info!(address = %args.address, "sidecar is SERVING");
                return Ok(());
            }
            Ok(Ok(resp)) => format!("{:?}", resp.get_ref().status()),
            Ok(Err(e)) => e.message().to_string(),
            Err(_) => "no answer".into(),
        };
        if now != last {
            info!(address = %args.address, state = %now, "waiting for the sidecar");
            last = now;
        }
        if started.elapsed() >= args.timeout {
            return Err(StartError::Client(format!(
                "{} was not SERVING within {:?} (last: {last})",
                args.address, args.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn shutdown(args: ShutdownArgs) -> Result<(), StartError> {
    telemetry::init(LogFormat::Text);
    let fail = |e: std::io::Error| StartError::Client(format!("{}: {e}", args.admin));
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&args.admin),
    )
    .await
    .map_err(|_| StartError::Client(format!("{}: connection timed out", args.admin)))?
    .map_err(fail)?;
    let request = format!(
        "POST /shutdown HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        args.admin
    );
    stream.write_all(request.as_bytes()).await.map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.map_err(fail)?;
    let status_line = response.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("202") {
        info!(admin = %args.admin, "the sidecar is shutting down");
        Ok(())
    } else {
        Err(StartError::Client(format!("{}: {status_line}", args.admin)))
    }
}

/// Validates the configuration (policy, tokens, TLS files) and the database
/// connection as `serve` would, without serving.
async fn check(mut args: ServeArgs) -> Result<(), StartError> {
    telemetry::init(args.common.log_format);
    // One attempt: a check answers now, it does not wait for the database.
    args.db.db_max_retries = 1;
    args.admin_listen = None;
    args.listen = ListenAddr::Tcp("127.0.0.1:0".into());
    let server = server::Server::bind(args.resolve()?).await?;
    server.check().await?;
    info!("configuration and database OK");
    Ok(())
}
