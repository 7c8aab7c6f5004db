//! `docsidecar migrate` on PostgreSQL, run with the admin account (an init
//! container or a Job): the schema, its migration history, the declared
//! collections' tables, and the runtime role's grants — exactly DML on the
//! read-write tables and SELECT on the read-only ones, nothing else. The serving
//! sidecar then needs no DDL rights at all.

use super::ddl::{
    history_ddl, record_versions, schema_objects_ddl, table_ddl, upgrade_ddl, Tables,
    SCHEMA_VERSION,
};
use super::PgTarget;
use crate::background::Backoff;
use crate::store::{StoreError, StoreResult};
use tokio_postgres::NoTls;
use tracing::{info, warn};

pub use crate::store::migrate::{Grant, MigratePlan};

/// Role names are identifiers we quote ourselves: keep them to a plain alphabet.
fn is_valid_role(role: &str) -> bool {
    let bytes = role.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

fn pg_error(context: &str, e: tokio_postgres::Error) -> StoreError {
    let detail = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_string());
    match e.code() {
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            StoreError::PermissionDenied(format!(
                "{context}: {detail} (migrate needs the admin account)"
            ))
        }
        _ if e.as_db_error().is_none() => StoreError::unavailable(format!("{context}: {detail}")),
        _ => StoreError::Internal(format!("{context}: {detail}")),
    }
}

async fn connect(target: &PgTarget) -> StoreResult<tokio_postgres::Client> {
    let mut backoff = Backoff::new(target.max_retries, target.retry_delay);
    let (client, connection) = backoff
        .retry(
            || target.config.connect(NoTls),
            |_| true,
            |e, attempt, delay| {
                warn!(%target, attempt, error = %e, "PostgreSQL not reachable for migrate; retrying in {delay:?}");
            },
        )
        .await
        .map_err(|e| {
            StoreError::unavailable(format!(
                "cannot connect to PostgreSQL at {target} after {} attempts: {e}",
                backoff.attempts_made()
            ))
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "migrate connection ended");
        }
    });
    Ok(client)
}

/// Applies `plan` in one transaction, serialized across concurrent runs (several
/// replicas' init containers) by an advisory lock. Idempotent.
pub async fn migrate(target: &PgTarget, plan: &MigratePlan) -> StoreResult<()> {
    if let Some(role) = &plan.grant_to {
        if !is_valid_role(role) {
            return Err(StoreError::Internal(format!(
                "--grant-to `{role}` is not a plain role name (letters, digits, `_` and `-`, at most 63)"
            )));
        }
    }
    // table_ddl validates and quotes the schema and collection names.
    let ddl = plan
        .collections
        .keys()
        .map(|c| Ok((c.as_str(), table_ddl(&target.schema, c)?)))
        .collect::<StoreResult<Vec<_>>>()?;
    let schema = format!("\"{}\"", target.schema);

    let mut client = connect(target).await?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("BEGIN", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('docsidecar migrate ' || $1::text))",
        &[&target.schema],
    )
    .await
    .map_err(|e| pg_error("taking the migration lock", e))?;
    // `_migrations` records the schema version (collection names cannot
    // start with `_`, so it never collides with a collection).
    tx.batch_execute(&history_ddl(&target.schema))
        .await
        .map_err(|e| pg_error("creating the schema", e))?;
    let tables = Tables::new(target.schema.clone())?;
    let current = tables
        .version(&tx)
        .await
        .map_err(|e| pg_error("reading the migration history", e))?
        .unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "schema {schema} is at version {current}, newer than this docsidecar supports ({SCHEMA_VERSION}): run a newer docsidecar"
        )));
    }
    tx.batch_execute(&schema_objects_ddl(&target.schema))
        .await
        .map_err(|e| pg_error("creating the query key function and the change feed", e))?;
    if current < SCHEMA_VERSION {
        // Expand: tables of earlier releases gain the new columns.
        for collection in tables
            .collections(&tx)
            .await
            .map_err(|e| pg_error("listing the collections", e))?
        {
            tx.batch_execute(&upgrade_ddl(&target.schema, &collection)?)
                .await
                .map_err(|e| pg_error(&format!("upgrading the table of `{collection}`"), e))?;
        }
        record_versions(&tx, &target.schema, current)
            .await
            .map_err(|e| pg_error("recording a migration", e))?;
    }
    for (collection, sql) in &ddl {
        tx.batch_execute(sql)
            .await
            .map_err(|e| pg_error(&format!("creating the table of `{collection}`"), e))?;
    }

    if let Some(role) = &plan.grant_to {
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[role])
            .await
            .map_err(|e| pg_error("looking up the runtime role", e))?
            .is_some();
        if !exists {
            return Err(StoreError::Internal(format!(
                "role `{role}` does not exist: create it first (CREATE ROLE \"{role}\" LOGIN PASSWORD '…')"
            )));
        }
        let role_q = format!("\"{role}\"");
        let mut sql = format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role_q};
             REVOKE CREATE ON SCHEMA {schema} FROM {role_q};
             REVOKE ALL ON {schema}._migrations FROM {role_q};
             GRANT SELECT ON {schema}._migrations TO {role_q};
             {feed}",
            feed = super::feed::feed_grants(&target.schema, &role_q)
        );
        for (collection, access) in &plan.collections {
            let table = format!("{schema}.\"{collection}\"");
            let privileges = match access {
                Grant::ReadWrite => "SELECT, INSERT, UPDATE, DELETE",
                Grant::ReadOnly => "SELECT",
            };
            // Revoke first: a collection turned read-only loses its write grants.
            sql.push_str(&format!(
                "REVOKE ALL ON {table} FROM {role_q}; GRANT {privileges} ON {table} TO {role_q};"
            ));
        }
        tx.batch_execute(&sql)
            .await
            .map_err(|e| pg_error("granting the runtime role", e))?;
        info!(
            role,
            collections = plan.collections.len(),
            "granted the runtime role"
        );
    }
    tx.commit().await.map_err(|e| pg_error("COMMIT", e))?;
    info!(schema = %target.schema, collections = plan.collections.len(), "PostgreSQL schema migrated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_plain() {
        for ok in ["app", "orders_rw", "svc-a", "_x", "A1"] {
            assert!(is_valid_role(ok), "{ok}");
        }
        for bad in ["", "a\"; DROP ROLE x; --", "1a", "a b", &"r".repeat(64)] {
            assert!(!is_valid_role(bad), "{bad}");
        }
    }
}
