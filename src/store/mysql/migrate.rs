//! `docsidecar migrate` on MySQL/MariaDB, run with the admin account (an
//! init container or a Job): the database, the catalog and schema version,
//! the declared collections' tables, and the runtime account's grants:
//! exactly `SELECT, INSERT, UPDATE, DELETE` on the read-write collections,
//! `SELECT` on the read-only ones and on the catalog and version tables,
//! nothing else; grants on collections the policy no longer declares are
//! revoked. The serving sidecar then needs no DDL rights at all. The
//! declared query indexes (and their key columns) are added online, before
//! the scope views are replaced (see `indexes`).
//!
//! Several replicas may run it at once. `GET_LOCK` does not work across a
//! Galera cluster, and neither do row locks (each node has its own), so runs
//! are serialized by a lease: a row of `_lock` taken by a committed UPDATE
//! (which Galera certifies cluster-wide: of two nodes taking it at once, one
//! fails and tries again), renewed while the run lasts and released at the
//! end; a lease left by a crashed run expires.

use super::ddl::{record_versions, table_ddl, CATALOG_DDL, SCHEMA_VERSION};
use super::error::{code, OpError};
use super::pool::{Conn, Pools};
use super::{MysqlTarget, NOW};
use crate::background::Backoff;
use crate::store::{is_valid_name, Grant, MigratePlan, StoreError, StoreResult, NAME_RULE};
use mysql_async::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a lease lasts unless renewed, and how often it is renewed.
const LEASE: Duration = Duration::from_secs(60);
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// How long a run waits for another one to finish.
const WAIT_AT_MOST: Duration = Duration::from_secs(600);

/// Table privileges other than the four DML ones (MySQL 8 and MariaDB);
/// MariaDB adds `DELETE HISTORY`.
const OTHER_PRIVILEGES: &str =
    "ALTER, CREATE, CREATE VIEW, DROP, GRANT OPTION, INDEX, REFERENCES, SHOW VIEW, TRIGGER";

/// A MySQL account, `'user'@'host'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub host: String,
}

impl Account {
    /// `'user'@'host'`, `user@host` or `user` (any host, `%`). Both parts
    /// keep to a plain alphabet: they are quoted here, not bound.
    pub fn parse(s: &str) -> StoreResult<Account> {
        let unquote = |p: &str| {
            let p = p.trim();
            for q in ['\'', '"', '`'] {
                if let Some(inner) = p.strip_prefix(q).and_then(|p| p.strip_suffix(q)) {
                    return inner.to_string();
                }
            }
            p.to_string()
        };
        let (user, host) = match s.rsplit_once('@') {
            Some((user, host)) => (unquote(user), unquote(host)),
            None => (unquote(s), "%".to_string()),
        };
        let plain = |v: &str, max: usize, extra: &[u8]| {
            !v.is_empty()
                && v.len() <= max
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b) || extra.contains(&b))
        };
        if !plain(&user, 80, b"") || !plain(&host, 255, b"%:/") {
            return Err(StoreError::Internal(format!(
                "--grant-to `{s}` is not a plain MySQL account: 'user'@'host' with letters, digits, `_`, `.` and `-` (the host may use `%`, `:` and `/`)"
            )));
        }
        Ok(Account { user, host })
    }

    pub(super) fn sql(&self) -> String {
        format!("'{}'@'{}'", self.user, self.host)
    }
}

/// Runs a statement, again when it loses a Galera certification race.
async fn exec(c: &mut Conn, sql: &str, params: mysql_async::Params) -> Result<u64, OpError> {
    let mut attempt = 0;
    loop {
        match c.conn().exec_drop(sql, params.clone()).await {
            Ok(()) => return Ok(c.conn().affected_rows()),
            Err(mysql_async::Error::Server(s)) if s.code == code::LOCK_DEADLOCK && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A statement that may find nothing to revoke.
pub(super) async fn revoke(c: &mut Conn, sql: &str) -> Result<(), OpError> {
    match c.conn().query_drop(sql).await {
        Err(mysql_async::Error::Server(s)) if s.code == code::NO_SUCH_GRANT => Ok(()),
        other => Ok(other?),
    }
}

fn fail(context: &str, e: OpError, target: &str) -> StoreError {
    match e {
        OpError::My(mysql_async::Error::Server(s))
            if matches!(s.code, code::TABLE_ACCESS_DENIED | code::DB_ACCESS_DENIED | code::SPECIFIC_ACCESS_DENIED | code::ACCESS_DENIED) =>
        {
            StoreError::PermissionDenied(format!(
                "{context}: {} (error {}; migrate needs the admin account)",
                s.message, s.code
            ))
        }
        OpError::My(mysql_async::Error::Server(s)) if s.code == code::PASSWORD_NO_MATCH => {
            StoreError::Internal(format!(
                "{context}: the account does not exist: create it first (CREATE USER … IDENTIFIED BY …)"
            ))
        }
        e => {
            let message = format!("{context}: {e}");
            match e.resolve(target) {
                StoreError::Unavailable { .. } => StoreError::unavailable(message),
                _ => StoreError::Internal(message),
            }
        }
    }
}

async fn connect(pools: &Pools, target: &MysqlTarget) -> StoreResult<Conn> {
    let mut backoff = Backoff::new(target.max_retries, target.retry_delay);
    backoff
        .retry(
            || pools.acquire(),
            |e| e.is_retryable(),
            |e, attempt, delay| {
                warn!(%target, attempt, error = %e, "MySQL/MariaDB not reachable for migrate; retrying in {delay:?}");
            },
        )
        .await
}

/// Applies `plan`, serialized across concurrent runs by the lease.
/// Idempotent.
pub async fn migrate(target: &MysqlTarget, plan: &MigratePlan) -> StoreResult<()> {
    let account = plan.grant_to.as_deref().map(Account::parse).transpose()?;
    for collection in plan.collections.keys() {
        if !is_valid_name(collection) {
            return Err(StoreError::Internal(format!(
                "collection {collection:?} cannot be migrated: collection {NAME_RULE}"
            )));
        }
    }
    let database = &target.database;
    super::ddl::Tables::new(database)?;
    let target = &MysqlTarget {
        pool_size: 2,
        ..target.clone()
    };
    let name = target.to_string();

    // The database first, through a connection without a default one.
    let admin = Pools::new(target, false)?;
    let mut c = connect(&admin, target).await?;
    let exists: Result<Option<String>, _> = c
        .conn()
        .exec_first(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (database,),
        )
        .await;
    let created = match exists {
        Ok(Some(_)) => Ok(()),
        Ok(None) => c
            .conn()
            .query_drop(format!(
                "CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            ))
            .await
            .map_err(OpError::from),
        Err(e) => Err(e.into()),
    };
    c.done(&created);
    admin.close();
    created.map_err(|e| fail(&format!("creating database `{database}`"), e, &name))?;

    let pools = Pools::new(target, true)?;
    let mut c = connect(&pools, target).await?;
    let holder = uuid::Uuid::now_v7().simple().to_string();
    let result = async {
        take_lease(&mut c, &holder, &name).await?;
        let renewing = renew(pools.clone(), target, holder.clone());
        let applied = tokio::select! {
            applied = apply(&mut c, plan, account.as_ref(), database, &name) => applied,
            () = renewing => unreachable!("renewing a lease never ends"),
        };
        let released = exec(
            &mut c,
            "UPDATE `_lock` SET holder = NULL, expires = 0 WHERE name = 'migrate' AND holder = ?",
            (holder.as_bytes(),).into(),
        )
        .await
        .map_err(|e| fail("releasing the migration lease", e, &name));
        applied.and(released.map(drop))
    }
    .await;
    c.done(&Ok::<_, OpError>(()));
    pools.close();
    result?;
    info!(database = %database, collections = plan.collections.len(), "MySQL/MariaDB schema migrated");
    Ok(())
}

/// Takes the lease, waiting while another run holds it.
async fn take_lease(c: &mut Conn, holder: &str, name: &str) -> StoreResult<()> {
    let setup = async {
        c.conn()
            .query_drop(
                "CREATE TABLE IF NOT EXISTS `_lock` (
                    name    VARBINARY(64) NOT NULL PRIMARY KEY,
                    holder  VARBINARY(64) NULL,
                    expires BIGINT NOT NULL
                ) ENGINE=InnoDB",
            )
            .await?;
        exec(
            c,
            "INSERT IGNORE INTO `_lock` (name, holder, expires) VALUES ('migrate', NULL, 0)",
            mysql_async::Params::Empty,
        )
        .await
    };
    setup
        .await
        .map_err(|e| fail("creating the migration lock", e, name))?;
    let sql = format!(
        "UPDATE `_lock` SET holder = ?, expires = {NOW} + ?
         WHERE name = 'migrate' AND (holder IS NULL OR expires < {NOW})"
    );
    let lease = LEASE.as_micros() as i64;
    let started = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let taken = exec(c, &sql, (holder.as_bytes(), 0i64, lease, 0i64).into())
            .await
            .map_err(|e| fail("taking the migration lease", e, name))?;
        if taken == 1 {
            return Ok(());
        }
        if started.elapsed() > WAIT_AT_MOST {
            return Err(StoreError::unavailable(format!(
                "another `docsidecar migrate` has held the lease for over {WAIT_AT_MOST:?}; retry"
            )));
        }
        if wait == Duration::from_millis(100) {
            info!("another `docsidecar migrate` is running: waiting for it to finish");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Renews the lease until dropped.
async fn renew(pools: Arc<Pools>, target: &MysqlTarget, holder: String) {
    let sql =
        format!("UPDATE `_lock` SET expires = {NOW} + ? WHERE name = 'migrate' AND holder = ?");
    let lease = LEASE.as_micros() as i64;
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let renewed = match pools.acquire().await {
            Ok(mut c) => {
                let r = exec(&mut c, &sql, (0i64, lease, holder.as_bytes()).into()).await;
                let renewed = r.as_ref().map(|n| *n == 1).unwrap_or(false);
                c.done(&r);
                renewed
            }
            Err(_) => false,
        };
        if !renewed {
            warn!(%target, "could not renew the migration lease; another run may start when it expires");
        }
    }
}

/// Everything a run does under the lease.
async fn apply(
    c: &mut Conn,
    plan: &MigratePlan,
    account: Option<&Account>,
    database: &str,
    name: &str,
) -> StoreResult<()> {
    for sql in CATALOG_DDL.iter().chain(&super::feed::FEED_DDL) {
        c.conn()
            .query_drop(*sql)
            .await
            .map_err(|e| fail("creating the catalog", e.into(), name))?;
    }
    let current: Option<i32> = c
        .conn()
        .query_first("SELECT COALESCE(MAX(version), 0) FROM `_migrations`")
        .await
        .map_err(|e| fail("reading the schema version", e.into(), name))?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "database `{database}` is at docsidecar schema version {current}, newer than this docsidecar supports ({SCHEMA_VERSION}): run a newer docsidecar"
        )));
    }
    record_versions(c.conn(), current)
        .await
        .map_err(|e| fail("recording the schema version", e, name))?;
    let mariadb = c.mariadb();
    for collection in plan.collections.keys() {
        let ddl = table_ddl(collection, mariadb)?;
        let created = async {
            c.conn().query_drop(ddl).await?;
            exec(
                c,
                "INSERT IGNORE INTO `_collections` (name, create_time)
                 VALUES (?, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)))",
                (collection.as_bytes(),).into(),
            )
            .await
        };
        created
            .await
            .map_err(|e| fail(&format!("creating the table of `{collection}`"), e, name))?;
    }
    // Before the scope views, which select the key columns added here.
    super::indexes::converge(c, plan)
        .await
        .map_err(|e| fail("converging the query indexes", e, name))?;
    let scoping = super::scopes::prepare(c, plan, account).await?;
    if let Some(scoping) = &scoping {
        super::scopes::converge(c, database, scoping)
            .await
            .map_err(|e| fail("converging the scope views", e, name))?;
    }
    if let Some(account) = account {
        grant(c, plan, account, database, mariadb, scoping.as_ref())
            .await
            .map_err(|e| fail(&format!("granting {}", account.sql()), e, name))?;
        info!(account = %account.sql(), collections = plan.collections.len(), "granted the runtime account");
    }
    Ok(())
}

/// Gives `account` exactly the access `plan` declares: each grant first, then
/// the revocation of everything else on that table, so that a serving
/// sidecar never lacks a privilege it keeps. Tables it reaches through a
/// scope's view (see `scopes`) are among the everything else.
async fn grant(
    c: &mut Conn,
    plan: &MigratePlan,
    account: &Account,
    database: &str,
    mariadb: bool,
    scoping: Option<&super::scopes::Scoping>,
) -> Result<(), OpError> {
    let to = account.sql();
    let viewed = |table: &str| {
        scoping.is_some_and(|s| {
            if table == "_changes" {
                !s.scoped.is_empty()
            } else {
                s.through_view(&to, table)
            }
        })
    };
    let mut tables: Vec<(String, &str)> = vec![
        ("_collections".into(), "SELECT"),
        ("_migrations".into(), "SELECT"),
    ];
    tables.extend(
        super::feed::FEED_GRANTS
            .iter()
            .filter(|(t, _)| !viewed(t))
            .map(|(t, p)| (t.to_string(), *p)),
    );
    for (collection, access) in plan.collections.iter().filter(|(c, _)| !viewed(c)) {
        let privileges = match access {
            Grant::ReadWrite => "SELECT, INSERT, UPDATE, DELETE",
            Grant::ReadOnly => "SELECT",
        };
        tables.push((collection.clone(), privileges));
    }
    for (table, privileges) in &tables {
        let on = format!("`{database}`.`{table}`");
        c.conn()
            .query_drop(format!("GRANT {privileges} ON {on} TO {to}"))
            .await?;
        let others = if *privileges == "SELECT" {
            format!("INSERT, UPDATE, DELETE, {OTHER_PRIVILEGES}")
        } else {
            OTHER_PRIVILEGES.to_string()
        };
        revoke(c, &format!("REVOKE {others} ON {on} FROM {to}")).await?;
        if mariadb {
            revoke(c, &format!("REVOKE DELETE HISTORY ON {on} FROM {to}")).await?;
        }
    }
    // Collections no longer declared, and the lease: nothing at all.
    let cataloged: Vec<Vec<u8>> = c.conn().query("SELECT name FROM `_collections`").await?;
    let declared = |name: &str| tables.iter().any(|(t, _)| t == name);
    let undeclared = cataloged
        .into_iter()
        .filter_map(|n| String::from_utf8(n).ok())
        .filter(|n| is_valid_name(n) && !declared(n))
        .chain(["_lock", "_declarations", "_indexes"].map(String::from));
    for table in undeclared {
        let on = format!("`{database}`.`{table}`");
        revoke(c, &format!("REVOKE ALL PRIVILEGES ON {on} FROM {to}")).await?;
        revoke(c, &format!("REVOKE GRANT OPTION ON {on} FROM {to}")).await?;
    }
    warn_about_wider_grants(c, account, database).await;
    Ok(())
}

/// Grants on the whole database (or server) would defeat the table grants:
/// say so, when the admin account may read them.
async fn warn_about_wider_grants(c: &mut Conn, account: &Account, database: &str) {
    let Ok(grants) = c
        .conn()
        .query::<String, _>(format!("SHOW GRANTS FOR {}", account.sql()))
        .await
    else {
        return;
    };
    for line in grants {
        let wide = line.contains(" ON *.* ") || line.contains(&format!(" ON `{database}`.* "));
        if wide && !line.starts_with("GRANT USAGE ON ") {
            warn!(
                account = %account.sql(),
                "the runtime account holds privileges on the whole database or server, beyond its table grants: revoke them for least privilege ({})",
                line.split(" IDENTIFIED").next().unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_plain() {
        let a = Account::parse("'docsidecar_app'@'%'").unwrap();
        assert_eq!(a.sql(), "'docsidecar_app'@'%'");
        assert_eq!(Account::parse("app").unwrap().host, "%");
        assert_eq!(
            Account::parse("app@10.0.%").unwrap().sql(),
            "'app'@'10.0.%'"
        );
        assert_eq!(
            Account::parse("`app`@`localhost`").unwrap().host,
            "localhost"
        );
        for bad in [
            "",
            "'a'@''",
            "a'; DROP USER x; --@%",
            "a b@%",
            "a@h'x",
            &"u".repeat(81),
        ] {
            assert!(Account::parse(bad).is_err(), "{bad}");
        }
    }
}
