//! `docsidecar migrate` on PostgreSQL, run with the admin account (an init
//! container or a Job): the schema, its migration history, the declared
//! collections' tables, and the runtime role's grants, converged to exactly
//! the policy: DML on the read-write tables, SELECT on the read-only ones,
//! nothing on any other table of the schema, each change logged. The serving
//! sidecar then needs no DDL rights at all.

use super::ddl::{
    history_ddl, quote_ident, record_versions, schema_objects_ddl, table_ddl, upgrade_ddl, Tables,
    SCHEMA_VERSION,
};
use super::error::{describe, is_transient_connect};
use super::PgTarget;
use crate::background::Backoff;
use crate::store::{is_valid_name, StoreError, StoreResult, NAME_RULE};
use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::Transaction;
use tracing::{info, warn};

pub use crate::store::migrate::{Grant, MigratePlan};

/// What the runtime role needs of the schema's own objects: to read the
/// schema version in the migration history, and the change feed's.
fn internal_privileges(relation: &str) -> &'static [&'static str] {
    match relation {
        "_migrations" => &["SELECT"],
        other => super::feed::RUNTIME_PRIVILEGES
            .iter()
            .find(|(name, _)| *name == other)
            .map_or(&[], |(_, privileges)| *privileges),
    }
}

/// The rule of [`is_valid_role`], for messages.
pub const ROLE_RULE: &str =
    "a plain role name: a letter or `_`, then letters, digits, `_` and `-`, at most 63 in all";

/// Role names are identifiers we quote ourselves: keep them to a plain alphabet.
pub fn is_valid_role(role: &str) -> bool {
    let bytes = role.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

pub(super) fn pg_error(context: &str, e: tokio_postgres::Error) -> StoreError {
    let detail = e
        .as_db_error()
        .map_or_else(|| describe(&e), |db| db.message().to_string());
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

/// Connects with the admin account, retrying only what can heal (see
/// [`is_transient_connect`]): a wrong password or a missing database fails at once.
async fn connect(target: &PgTarget) -> StoreResult<tokio_postgres::Client> {
    let mut config = target.config.clone();
    super::tls::apply(&target.tls, &mut config);
    let tls = super::tls::connector(&target.tls)?;
    let mut backoff = Backoff::new(target.max_retries, target.retry_delay);
    let (client, connection) = backoff
        .retry(
            || config.connect(tls.clone()),
            is_transient_connect,
            |e, attempt, delay| {
                warn!(%target, attempt, error = %describe(e), "PostgreSQL not reachable for migrate; retrying in {delay:?}");
            },
        )
        .await
        .map_err(|e| {
            if is_transient_connect(&e) {
                StoreError::unavailable(format!(
                    "cannot connect to PostgreSQL at {target} after {} attempt(s): {}",
                    backoff.attempts_made(),
                    describe(&e)
                ))
            } else {
                StoreError::unavailable(format!(
                    "PostgreSQL at {target} refused the connection: {} (not retried: fix the role, password, database or TLS settings)",
                    describe(&e)
                ))
            }
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %describe(&e), "migrate connection ended");
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
                "--grant-to {} is not {ROLE_RULE}",
                crate::quote::shown(role)
            )));
        }
    }
    if !is_valid_name(&target.schema) {
        return Err(StoreError::Internal(format!(
            "PostgreSQL schema {} is invalid: DOCSIDECAR_SCHEMA {NAME_RULE}",
            crate::quote::shown(&target.schema)
        )));
    }
    // table_ddl validates and quotes the collection names.
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

    super::scopes::converge(&tx, &target.schema, plan).await?;
    if let Some(role) = &plan.grant_to {
        converge_grants(&tx, &target.schema, role, &plan.collections).await?;
    }
    temp_tables(&tx, plan).await?;
    let indexes = super::keys::record(&tx, &target.schema, &plan.service, &plan.indexes).await?;
    tx.commit().await.map_err(|e| pg_error("COMMIT", e))?;
    // CONCURRENTLY cannot run in a transaction: indexes are built after it.
    super::keys::build(&client, &target.schema, &indexes).await?;
    info!(schema = %target.schema, collections = plan.collections.len(), "PostgreSQL schema migrated");
    Ok(())
}

/// A privilege held by the role on an object, as `aclexplode` names it.
type Held = BTreeMap<String, BTreeSet<String>>;

/// Makes the runtime role's privileges in `schema` exactly the plan's: USAGE on
/// the schema and nothing more there, the declared access on each declared
/// collection, what the schema's own objects need (the migration history, the
/// change feed), nothing on any other table
/// (collections dropped from the policy lose their grants). Only differences
/// are applied, and each is logged.
async fn converge_grants(
    tx: &Transaction<'_>,
    schema: &str,
    role: &str,
    collections: &BTreeMap<String, Grant>,
) -> StoreResult<()> {
    let exists = tx
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .map_err(|e| pg_error("looking up the runtime role", e))?
        .is_some();
    if !exists {
        return Err(StoreError::Internal(format!(
            "role `{role}` does not exist: create it first (CREATE ROLE \"{role}\" LOGIN PASSWORD '…')"
        )));
    }
    let role_q = quote_ident(role);
    let schema_q = quote_ident(schema);
    let mut changes = 0;

    // The schema: USAGE, never CREATE.
    let on_schema: BTreeSet<String> = tx
        .query(
            "SELECT a.privilege_type FROM pg_catalog.pg_namespace n, aclexplode(n.nspacl) a
             WHERE n.nspname = $1 AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $2)",
            &[&schema, &role],
        )
        .await
        .map_err(|e| pg_error("reading the schema's grants", e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !on_schema.contains("USAGE") {
        apply(
            tx,
            &format!("GRANT USAGE ON SCHEMA {schema_q} TO {role_q}"),
            "granted",
            "USAGE",
            &format!("schema {schema}"),
            role,
        )
        .await?;
        changes += 1;
    }
    let extra: Vec<&str> = on_schema
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "USAGE")
        .collect();
    if !extra.is_empty() {
        let privileges = extra.join(", ");
        apply(
            tx,
            &format!("REVOKE {privileges} ON SCHEMA {schema_q} FROM {role_q}"),
            "revoked",
            &privileges,
            &format!("schema {schema}"),
            role,
        )
        .await?;
        changes += 1;
    }

    // Every relation of the schema, declared or not.
    // Every table, view and sequence of the schema, with what the role holds.
    let mut held: Held = BTreeMap::new();
    let mut sequences = BTreeSet::new();
    for row in tx
        .query(
            "SELECT c.relname::text, c.relkind::text, a.privilege_type
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN LATERAL (
                 SELECT privilege_type FROM aclexplode(c.relacl)
                 WHERE grantee = (SELECT oid FROM pg_roles WHERE rolname = $2)
             ) a ON true
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')",
            &[&schema, &role],
        )
        .await
        .map_err(|e| pg_error("reading the tables' grants", e))?
    {
        let name: String = row.get(0);
        if row.get::<_, String>(1) == "S" {
            sequences.insert(name.clone());
        }
        let privileges = held.entry(name).or_default();
        if let Some(privilege) = row.get::<_, Option<String>>(2) {
            privileges.insert(privilege);
        }
    }
    for (relation, has) in &held {
        let want: BTreeSet<String> = match collections.get(relation) {
            Some(grant) => grant.privileges().iter().map(|p| p.to_string()).collect(),
            None => internal_privileges(relation)
                .iter()
                .map(|p| p.to_string())
                .collect(),
        };
        let object = format!("{schema_q}.{}", quote_ident(relation));
        let shown = format!("{schema}.{relation}");
        let kind = if sequences.contains(relation) {
            "SEQUENCE"
        } else {
            "TABLE"
        };
        let revoke: Vec<&str> = has.difference(&want).map(String::as_str).collect();
        if !revoke.is_empty() {
            let privileges = revoke.join(", ");
            apply(
                tx,
                &format!("REVOKE {privileges} ON {kind} {object} FROM {role_q}"),
                "revoked",
                &privileges,
                &shown,
                role,
            )
            .await?;
            changes += 1;
        }
        let grant: Vec<&str> = want.difference(has).map(String::as_str).collect();
        if !grant.is_empty() {
            let privileges = grant.join(", ");
            apply(
                tx,
                &format!("GRANT {privileges} ON {kind} {object} TO {role_q}"),
                "granted",
                &privileges,
                &shown,
                role,
            )
            .await?;
            changes += 1;
        }
    }
    info!(
        role,
        collections = collections.len(),
        changes,
        "the runtime role's grants match the policy"
    );
    Ok(())
}

/// Runs one GRANT or REVOKE and reports it.
async fn apply(
    tx: &Transaction<'_>,
    sql: &str,
    what: &'static str,
    privileges: &str,
    on: &str,
    role: &str,
) -> StoreResult<()> {
    tx.batch_execute(sql)
        .await
        .map_err(|e| pg_error(&format!("{what} {privileges} on {on}"), e))?;
    info!(
        role,
        privileges, on, "{what} {privileges} on {on} (role {role})"
    );
    Ok(())
}

/// PUBLIC holds TEMPORARY on every database by default, so any role, the
/// runtime role included, can create temporary tables; revoking it from one
/// role does nothing. With the plan's option, revoke it from PUBLIC (and from
/// the runtime role itself); without it, say that it is held.
async fn temp_tables(tx: &Transaction<'_>, plan: &MigratePlan) -> StoreResult<()> {
    if plan.grant_to.is_none() && !plan.revoke_public_temp {
        return Ok(());
    }
    let row = tx
        .query_one(
            "SELECT current_database()::text,
                    EXISTS (SELECT 1 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                            WHERE a.grantee = 0 AND a.privilege_type = 'TEMPORARY'),
                    EXISTS (SELECT 1 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                            WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)
                              AND a.privilege_type = 'TEMPORARY')
             FROM pg_catalog.pg_database d WHERE d.datname = current_database()",
            &[&plan.grant_to],
        )
        .await
        .map_err(|e| pg_error("reading the database's grants", e))?;
    let database: String = row.get(0);
    let (public, role_has) = (row.get::<_, bool>(1), row.get::<_, bool>(2));
    let db_q = quote_ident(&database);
    if plan.revoke_public_temp {
        if public {
            tx.batch_execute(&format!("REVOKE TEMPORARY ON DATABASE {db_q} FROM PUBLIC"))
                .await
                .map_err(|e| pg_error("revoking TEMPORARY from PUBLIC", e))?;
            warn!(
                database,
                "revoked TEMPORARY on database {database} from PUBLIC: no role there can create temporary tables any more unless granted TEMPORARY itself (this affects every role of the database)"
            );
        }
        if let (Some(role), true) = (&plan.grant_to, role_has) {
            apply(
                tx,
                &format!(
                    "REVOKE TEMPORARY ON DATABASE {db_q} FROM {}",
                    quote_ident(role)
                ),
                "revoked",
                "TEMPORARY",
                &format!("database {database}"),
                role,
            )
            .await?;
        }
    } else if public && plan.grant_to.is_some() {
        warn!(
            database,
            "PUBLIC holds TEMPORARY on database {database}, so the runtime role can create temporary tables; `docsidecar migrate --revoke-public-temp` revokes it from PUBLIC (affects every role of the database)"
        );
    }
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
