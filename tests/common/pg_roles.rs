//! PostgreSQL roles for tests of least privilege: URLs as a role, the
//! `migrate` command as an init container runs it, a fixture that drops
//! what a test created.

use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_docsidecar");

/// A URL for `user` (password `password`) on the test server's host and database.
pub fn url_as(admin_url: &str, user: &str, password: &str) -> String {
    let cfg: tokio_postgres::Config = admin_url.parse().unwrap();
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(_) => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{user}:{password}@{host}:{port}/{}",
        cfg.get_dbname().unwrap_or("postgres")
    )
}

pub fn migrate(
    admin_url: &str,
    schema: &str,
    policy: &std::path::Path,
    role: &str,
) -> std::process::Output {
    migrate_with(admin_url, schema, policy, &["--grant-to", role])
}

pub fn migrate_with(
    admin_url: &str,
    schema: &str,
    policy: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    Command::new(BIN)
        .arg("migrate")
        .args(args)
        .env_clear()
        .env("MIGRATE_DATABASE_URL", admin_url)
        .env("DOCSIDECAR_SCHEMA", schema)
        .env("DOCSIDECAR_POLICY", policy)
        .output()
        .unwrap()
}

/// Runs a command to its end; (success, stdout + stderr).
pub fn outcome(out: std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `url` with another database.
pub fn url_of_database(url: &str, database: &str) -> String {
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(_) => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "postgres://{}{password}@{host}:{port}/{database}",
        cfg.get_user().unwrap_or("postgres")
    )
}

pub struct Fixture {
    pub admin: tokio_postgres::Client,
    pub schema: String,
    pub roles: Vec<String>,
}

impl Fixture {
    pub async fn cleanup(&self) {
        let _ = self
            .admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await;
        for role in &self.roles {
            let _ = self
                .admin
                .batch_execute(&format!(
                    "DROP OWNED BY \"{role}\"; DROP ROLE IF EXISTS \"{role}\""
                ))
                .await;
        }
    }
}
