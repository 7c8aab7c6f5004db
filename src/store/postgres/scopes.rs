//! Row scopes enforced by PostgreSQL, converged by `migrate` from the
//! declarations of every service sharing the schema.
//!
//! Each run records its runtime role's declarations in `_declarations`
//! (replacing that role's earlier ones), refuses one that contradicts
//! another role's (see [`check_declarations`]), and then converges the
//! row-level security of every scoped collection from all of them: RLS
//! enabled and forced (the owner is subject too), one policy per role,
//! `scope = '…'` for a scoped role and `true` for a reader of every scope,
//! `FOR ALL` when it writes and `FOR SELECT` when it reads. The change feed
//! (`_changes`) gets one policy per role limited to the (collection, scope)
//! pairs it reads, so a direct connection with a runtime role cannot read
//! another scope's changes either. Each policy carries a comment stating
//! its rule: a rerun compares comments and changes only what differs.

use super::ddl::{object_name, qualified_table, quote_ident};
use super::migrate::pg_error;
use crate::store::migrate::{check_declarations, scoped_collections, Declaration};
use crate::store::{Grant, MigratePlan, StoreError, StoreResult};
use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::Transaction;
use tracing::{info, warn};

/// Marks the policies this module manages (their comment starts with it).
const MARK: &str = "docsidecar:";

pub(super) fn declarations_ddl(schema: &str) -> String {
    format!(
        r#"CREATE TABLE IF NOT EXISTS "{schema}"._declarations (
            account    text COLLATE "C" NOT NULL,
            collection text COLLATE "C" NOT NULL,
            service    text NOT NULL,
            access     text NOT NULL,
            scope      text COLLATE "C",
            PRIMARY KEY (account, collection)
        )"#
    )
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A policy's name for `account`: at most 63 bytes, unique per account.
fn policy_name(account: &str) -> String {
    if account.len() <= 48 {
        return quote_ident(&format!("docsidecar${account}"));
    }
    let hash = account.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    quote_ident(&format!(
        "docsidecar${}${:08x}",
        &account[..40],
        hash as u32
    ))
}

/// One policy as it should be: whom, for what, which rows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    account: String,
    command: &'static str,
    rows: String,
}

impl Rule {
    /// The comment that records it (compared on the next run).
    fn comment(&self) -> String {
        format!("{MARK} {} {} {}", self.account, self.command, self.rows)
    }

    fn create(&self, table: &str) -> String {
        let check = if self.command == "SELECT" {
            String::new()
        } else {
            format!(" WITH CHECK ({})", self.rows)
        };
        format!(
            "CREATE POLICY {name} ON {table} AS PERMISSIVE FOR {} TO {} USING ({}){check};
             COMMENT ON POLICY {name} ON {table} IS {}",
            self.command,
            quote_ident(&self.account),
            self.rows,
            literal(&self.comment()),
            name = policy_name(&self.account),
        )
    }
}

/// The rule of a declaration on its collection's table.
fn table_rule(d: &Declaration) -> Rule {
    Rule {
        account: d.account.clone(),
        command: match d.grant {
            Grant::ReadWrite => "ALL",
            Grant::ReadOnly => "SELECT",
        },
        rows: match &d.scope {
            Some(scope) => format!("scope = {}", literal(scope)),
            None => "true".into(),
        },
    }
}

/// The rule of an account on the change feed: the changes of what it reads.
fn feed_rule(account: &str, declarations: &[&Declaration]) -> Rule {
    let mut rows: Vec<String> = declarations
        .iter()
        .map(|d| match &d.scope {
            Some(scope) => format!(
                "(collection = {} AND scope = {})",
                literal(&d.collection),
                literal(scope)
            ),
            None => format!("collection = {}", literal(&d.collection)),
        })
        .collect();
    rows.sort();
    Rule {
        account: account.into(),
        command: "ALL",
        rows: rows.join(" OR "),
    }
}

/// Records this run's declarations and converges row-level security.
pub(super) async fn converge(
    tx: &Transaction<'_>,
    schema: &str,
    plan: &MigratePlan,
) -> StoreResult<()> {
    let Some(ours) = plan.declarations() else {
        if let Some(collection) = plan.scopes.keys().next() {
            return Err(StoreError::Internal(format!(
                "collection `{collection}` has a row scope, which the database enforces per runtime role: give the role with --grant-to (DOCSIDECAR_GRANT_TO)"
            )));
        }
        return Ok(());
    };
    tx.batch_execute(&declarations_ddl(schema))
        .await
        .map_err(|e| pg_error("creating the declarations table", e))?;
    let account = plan.grant_to.clone().unwrap_or_default();
    let recorded = recorded(tx, schema).await?;
    let others: Vec<Declaration> = recorded
        .iter()
        .filter(|d| d.account != account)
        .cloned()
        .collect();
    for warning in check_declarations(&ours, &others).map_err(StoreError::Internal)? {
        warn!("{warning}");
    }
    record(tx, schema, &account, &ours, &recorded).await?;

    let all = existing_roles(tx, others.into_iter().chain(ours).collect()).await?;
    let scoped = scoped_collections(&all);
    for collection in &scoped {
        let on: Vec<&Declaration> = all.iter().filter(|d| &d.collection == collection).collect();
        scope_table(tx, schema, collection, &on, plan).await?;
    }
    unscope_others(tx, schema, &scoped).await?;
    scope_feed(tx, schema, &all, !scoped.is_empty()).await
}

/// The declarations whose role still exists; the others are skipped (a
/// policy cannot name a dropped role), with a warning.
async fn existing_roles(
    tx: &Transaction<'_>,
    all: Vec<Declaration>,
) -> StoreResult<Vec<Declaration>> {
    let accounts: Vec<&str> = all.iter().map(|d| d.account.as_str()).collect();
    let existing: BTreeSet<String> = tx
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)",
            &[&accounts],
        )
        .await
        .map_err(|e| pg_error("looking up the recorded roles", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (kept, gone): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|d| existing.contains(&d.account));
    for d in gone {
        warn!(role = %d.account, collection = %d.collection, "role {} recorded for `{}` no longer exists: skipped (its service's next `migrate` replaces the record)", d.account, d.collection);
    }
    Ok(kept)
}

async fn recorded(tx: &Transaction<'_>, schema: &str) -> StoreResult<Vec<Declaration>> {
    let rows = tx
        .query(
            &format!(
                r#"SELECT account, collection, service, access, scope FROM "{schema}"._declarations ORDER BY account, collection"#
            ),
            &[],
        )
        .await
        .map_err(|e| pg_error("reading the recorded declarations", e))?;
    Ok(rows
        .iter()
        .map(|r| Declaration {
            account: r.get(0),
            collection: r.get(1),
            service: r.get(2),
            grant: if r.get::<_, String>(3) == "read-write" {
                Grant::ReadWrite
            } else {
                Grant::ReadOnly
            },
            scope: r.get(4),
        })
        .collect())
}

/// Replaces `account`'s recorded declarations by `ours`, logging changes.
async fn record(
    tx: &Transaction<'_>,
    schema: &str,
    account: &str,
    ours: &[Declaration],
    recorded: &[Declaration],
) -> StoreResult<()> {
    let before: BTreeSet<_> = recorded.iter().filter(|d| d.account == account).collect();
    let after: BTreeSet<_> = ours.iter().collect();
    if before == after {
        return Ok(());
    }
    tx.execute(
        &format!(r#"DELETE FROM "{schema}"._declarations WHERE account = $1"#),
        &[&account],
    )
    .await
    .map_err(|e| pg_error("replacing the recorded declarations", e))?;
    for d in ours {
        let access = match d.grant {
            Grant::ReadWrite => "read-write",
            Grant::ReadOnly => "read-only",
        };
        tx.execute(
            &format!(
                r#"INSERT INTO "{schema}"._declarations (account, collection, service, access, scope) VALUES ($1, $2, $3, $4, $5)"#
            ),
            &[&d.account, &d.collection, &d.service, &access, &d.scope],
        )
        .await
        .map_err(|e| pg_error("recording a declaration", e))?;
    }
    info!(
        account,
        declarations = ours.len(),
        "recorded the declarations of account {account}"
    );
    Ok(())
}

/// The policies on a table: name, and comment (ours start with [`MARK`]).
async fn policies(
    tx: &Transaction<'_>,
    schema: &str,
    table: &str,
) -> StoreResult<BTreeMap<String, Option<String>>> {
    let rows = tx
        .query(
            "SELECT p.polname::text, obj_description(p.oid, 'pg_policy')
             FROM pg_catalog.pg_policy p
             JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(|e| pg_error("reading the row-level security policies", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Makes `table`'s policies exactly `rules` (ours only; others' are left,
/// with a warning since permissive policies add access), RLS enabled and
/// forced.
async fn converge_policies(
    tx: &Transaction<'_>,
    schema: &str,
    table: &str,
    rules: &[Rule],
) -> StoreResult<usize> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let existing = policies(tx, schema, table).await?;
    let mut changes = 0;
    let wanted: BTreeMap<String, &Rule> = rules
        .iter()
        .map(|r| (policy_name(&r.account).trim_matches('"').to_string(), r))
        .collect();
    for (name, comment) in &existing {
        let ours = comment.as_deref().is_some_and(|c| c.starts_with(MARK));
        if !ours {
            warn!(table = %qualified, policy = %name, "policy {name} on {schema}.{table} is not docsidecar's: permissive policies add access to each other's rows, so it may let a role cross scopes; drop it once its rows are scoped (see `migrate --adopt-owner-field`)");
            continue;
        }
        let keep = wanted
            .get(name)
            .is_some_and(|r| comment.as_deref() == Some(r.comment().as_str()));
        if !keep {
            tx.batch_execute(&format!("DROP POLICY {} ON {qualified}", quote_ident(name)))
                .await
                .map_err(|e| pg_error(&format!("dropping policy {name} on {schema}.{table}"), e))?;
            if !wanted.contains_key(name) {
                info!(table = %qualified, policy = %name, "dropped row-level security policy {name} on {schema}.{table}");
                changes += 1;
            }
        }
    }
    for (name, rule) in &wanted {
        let current = existing.get(name).cloned().flatten();
        if current.as_deref() == Some(rule.comment().as_str()) {
            continue;
        }
        tx.batch_execute(&rule.create(&qualified))
            .await
            .map_err(|e| pg_error(&format!("creating policy {name} on {schema}.{table}"), e))?;
        info!(table = %qualified, policy = %name, role = %rule.account, rows = %rule.rows, "row-level security on {schema}.{table}: role {} reaches {} ({})", rule.account, rule.rows, rule.command);
        changes += 1;
    }
    if rules.is_empty() {
        return Ok(changes);
    }
    let state = tx
        .query_one(
            "SELECT c.relrowsecurity, c.relforcerowsecurity FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(|e| pg_error("reading the row-level security state", e))?;
    if !(state.get::<_, bool>(0) && state.get::<_, bool>(1)) {
        tx.batch_execute(&format!(
            "ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY; ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY"
        ))
        .await
        .map_err(|e| pg_error(&format!("enabling row-level security on {schema}.{table}"), e))?;
        info!(table = %qualified, "row-level security enabled and forced on {schema}.{table}");
        changes += 1;
    }
    Ok(changes)
}

/// The columns of a table's primary key, in order.
async fn primary_key(tx: &Transaction<'_>, table: &str) -> StoreResult<(String, Vec<String>)> {
    let row = tx
        .query_opt(
            "SELECT con.conname::text,
                    array_agg(a.attname::text ORDER BY k.n)
             FROM pg_catalog.pg_constraint con
             CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
             WHERE con.conrelid = $1::text::regclass AND con.contype = 'p'
             GROUP BY con.conname",
            &[&table],
        )
        .await
        .map_err(|e| pg_error("reading a primary key", e))?;
    Ok(row.map_or_else(Default::default, |r| (r.get(0), r.get(1))))
}

/// Re-keys a table of an earlier release from `id` to `(scope, id)`.
async fn contract(tx: &Transaction<'_>, schema: &str, collection: &str) -> StoreResult<()> {
    let table = qualified_table(schema, collection)?;
    let (constraint, columns) = primary_key(tx, &table).await?;
    if columns != ["id"] {
        return Ok(());
    }
    let index = object_name(collection, "scope_id");
    tx.batch_execute(&format!(
        "CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {table} (scope, id);
         ALTER TABLE {table} DROP CONSTRAINT {constraint_q};
         ALTER TABLE {table} ADD CONSTRAINT {constraint_q} PRIMARY KEY USING INDEX {index}",
        constraint_q = quote_ident(&constraint),
    ))
    .await
    .map_err(|e| {
        pg_error(
            &format!("re-keying {schema}.{collection} by (scope, id)"),
            e,
        )
    })?;
    info!(
        collection,
        "{schema}.{collection} is now keyed by (scope, id)"
    );
    Ok(())
}

/// One scoped collection's table: keyed by (scope, id), old-recipe rows
/// adopted if asked, the walk index of every-scope readers, the policies.
async fn scope_table(
    tx: &Transaction<'_>,
    schema: &str,
    collection: &str,
    declarations: &[&Declaration],
    plan: &MigratePlan,
) -> StoreResult<()> {
    let table = qualified_table(schema, collection)?;
    if plan.contract {
        contract(tx, schema, collection).await?;
    }
    let (_, key) = primary_key(tx, &table).await?;
    if key == ["id"] {
        return Err(StoreError::Internal(format!(
            "collection `{collection}` has row scopes, but its table was made by a release before them and is keyed by id alone (ids would collide across scopes): once no sidecar of that release runs, run `docsidecar migrate --contract` to key it by (scope, id)"
        )));
    }
    if let Some(field) = &plan.adopt_owner_field {
        // The owner is subject to forced RLS: lift it for this transaction.
        tx.batch_execute(&format!("ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY"))
            .await
            .map_err(|e| pg_error("lifting row-level security to adopt rows", e))?;
        for d in declarations {
            let Some(scope) = &d.scope else { continue };
            let adopted = tx
                .execute(
                    &format!("UPDATE {table} SET scope = $1 WHERE scope = '' AND data->>$2 = $3"),
                    &[scope, field, &d.account],
                )
                .await
                .map_err(|e| pg_error(&format!("adopting the rows of `{collection}`"), e))?;
            if adopted > 0 {
                info!(collection, scope, account = %d.account, rows = adopted, "adopted {adopted} row(s) of `{collection}` whose `{field}` is {} into scope `{scope}`", d.account);
            }
        }
    }
    let unadopted: bool = tx
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE scope = '')"),
            &[],
        )
        .await
        .map_err(|e| pg_error("looking for rows without a scope", e))?
        .get(0);
    if unadopted {
        warn!(collection, "`{collection}` has rows without a scope, which no scoped service sees; `docsidecar migrate --adopt-owner-field owner` moves old-recipe rows into their owner's scope");
    }
    if declarations.iter().any(|d| d.scope.is_none()) {
        // Readers of every scope walk (id, scope).
        tx.batch_execute(&format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {table} (id, scope)",
            object_name(collection, "id_scope")
        ))
        .await
        .map_err(|e| pg_error(&format!("indexing `{collection}` by (id, scope)"), e))?;
    }
    let rules: Vec<Rule> = declarations.iter().map(|d| table_rule(d)).collect();
    let changes = converge_policies(tx, schema, collection, &rules).await?;
    info!(
        collection,
        roles = rules.len(),
        changes,
        "row-level security of `{collection}` matches the declarations"
    );
    Ok(())
}

/// Tables with our policies that no declaration scopes any more: the
/// policies go, and RLS too unless someone else's policies remain.
async fn unscope_others(
    tx: &Transaction<'_>,
    schema: &str,
    scoped: &BTreeSet<String>,
) -> StoreResult<()> {
    let rows = tx
        .query(
            "SELECT DISTINCT c.relname::text FROM pg_catalog.pg_policy p
             JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname <> '_changes'
               AND obj_description(p.oid, 'pg_policy') LIKE 'docsidecar:%'",
            &[&schema],
        )
        .await
        .map_err(|e| pg_error("reading the row-level security policies", e))?;
    for row in rows {
        let table: String = row.get(0);
        if scoped.contains(&table) {
            continue;
        }
        converge_policies(tx, schema, &table, &[]).await?;
        let foreign = policies(tx, schema, &table).await?;
        if foreign.is_empty() {
            let qualified = qualified_table(schema, &table)?;
            tx.batch_execute(&format!(
                "ALTER TABLE {qualified} NO FORCE ROW LEVEL SECURITY; ALTER TABLE {qualified} DISABLE ROW LEVEL SECURITY"
            ))
            .await
            .map_err(|e| pg_error("disabling row-level security", e))?;
            info!(collection = %table, "`{table}` has no row scopes any more: row-level security disabled");
        }
    }
    Ok(())
}

/// The change feed: once any collection is scoped, each account reads (and
/// numbers, and prunes) the changes of what it reads, nothing else.
async fn scope_feed(
    tx: &Transaction<'_>,
    schema: &str,
    all: &[Declaration],
    any_scoped: bool,
) -> StoreResult<()> {
    if !any_scoped {
        return Ok(());
    }
    let mut by_account: BTreeMap<&str, Vec<&Declaration>> = BTreeMap::new();
    for d in all {
        by_account.entry(&d.account).or_default().push(d);
    }
    let rules: Vec<Rule> = by_account
        .iter()
        .map(|(account, declarations)| feed_rule(account, declarations))
        .collect();
    let changes = converge_policies(tx, schema, "_changes", &rules).await?;
    info!(
        roles = rules.len(),
        changes, "row-level security of the change feed matches the declarations"
    );
    Ok(())
}
