//! Row scopes enforced by MySQL/MariaDB, converged by `migrate` from the
//! declarations of every service sharing the database.
//!
//! Each run records its runtime account's declarations in `_declarations`
//! (replacing that account's earlier ones), refuses one that contradicts
//! another account's (see [`check_declarations`]), and then converges the
//! database from all of them. MySQL has no row-level security: a scoped
//! account reaches its rows through a view of the collection's table,
//! `<collection>$<scope>`, filtered to its scope `WITH CASCADED CHECK
//! OPTION` (a row written or moved through it must stay in the scope), and
//! holds privileges on that view only, none on the table. A reader of every
//! scope keeps `SELECT` on the table. Once any collection is scoped, each
//! account reads, writes and numbers the change feed through a view of
//! `_changes` limited to the (collection, scope) pairs it reads. Views are
//! replaced on every run (`SELECT *` is frozen when a view is made); grants
//! on views no declaration wants any more are revoked and such views dropped.
//!
//! The serving sidecar picks the relation per statement (see
//! `relations`): the table when its account may see it, else the view of
//! the request's scope.

use super::error::OpError;
use super::migrate::{revoke, Account};
use super::pool::Conn;
use crate::store::migrate::{check_declarations, scoped_collections, Declaration};
use crate::store::{is_valid_name, Grant, MigratePlan, StoreError, StoreResult};
use mysql_async::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tracing::{info, warn};

/// The change feed's table; its views are `_changes$<hash of the account>`.
pub(super) const FEED: &str = "_changes";

pub(super) const DECLARATIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS `_declarations` (
        account    VARBINARY(400) NOT NULL,
        collection VARBINARY(64) NOT NULL,
        service    VARBINARY(200) NOT NULL,
        access     VARBINARY(16) NOT NULL,
        scope      VARBINARY(512) NULL,
        PRIMARY KEY (account, collection)
    ) ENGINE=InnoDB";

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The view of `collection`'s rows in `scope`: `<collection>$<scope>`, or
/// `<collection>$$<hash of the scope>` when that is longer than MySQL's 64
/// characters (or the scope not a plain name). Collection names never hold
/// a `$`, so a view never takes a collection's name and names its
/// collection before the first `$`. `None`: the collection's name is too
/// long to leave room.
pub(super) fn view_name(collection: &str, scope: &str) -> Option<String> {
    if collection.len() + 1 + scope.len() <= 64 && is_valid_name(scope) {
        return Some(format!("{collection}${scope}"));
    }
    let room = 62usize.checked_sub(collection.len())?.min(16);
    if room < 8 {
        return None;
    }
    let hash = format!("{:016x}", fnv(scope));
    Some(format!("{collection}$${}", &hash[..room]))
}

/// The view of the change feed of `account` (`'user'@'host'`).
pub(super) fn feed_view_name(account: &str) -> String {
    format!("{FEED}${:016x}", fnv(account))
}

/// A name of ours as MySQL lists it: what we quote with backticks.
pub(super) fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'$')
}

/// Bytes as a hex literal: values spliced into a view's definition.
fn hex(text: &str) -> String {
    let mut out = String::with_capacity(3 + 2 * text.len());
    out.push_str("X'");
    for b in text.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('\'');
    out
}

/// What the declarations make of the database, computed before any grant.
pub(super) struct Scoping {
    /// The declarations of the accounts that exist, this run's included.
    all: Vec<Declaration>,
    /// The collections some declaration scopes.
    pub(super) scoped: BTreeSet<String>,
}

impl Scoping {
    /// Whether `account` reaches `collection` through a view, not the table.
    pub(super) fn through_view(&self, account: &str, collection: &str) -> bool {
        self.scoped.contains(collection)
            && self
                .all
                .iter()
                .any(|d| d.account == account && d.collection == collection && d.scope.is_some())
    }
}

fn access_text(grant: Grant) -> &'static str {
    match grant {
        Grant::ReadWrite => "read-write",
        Grant::ReadOnly => "read-only",
    }
}

fn privileges(grant: Grant) -> &'static str {
    match grant {
        Grant::ReadWrite => "SELECT, INSERT, UPDATE, DELETE",
        Grant::ReadOnly => "SELECT",
    }
}

/// Records this run's declarations (for `account`, in its `'user'@'host'`
/// form) after checking them against the others'.
pub(super) async fn prepare(
    c: &mut Conn,
    plan: &MigratePlan,
    account: Option<&Account>,
) -> StoreResult<Option<Scoping>> {
    if plan.contract || plan.adopt_owner_field.is_some() {
        warn!("--contract and --adopt-owner-field apply to PostgreSQL only: MySQL/MariaDB tables are keyed by (scope, id) from the start; ignored");
    }
    let (Some(account), Some(ours)) = (account, plan.declarations()) else {
        if let Some(collection) = plan.scopes.keys().next() {
            return Err(StoreError::Internal(format!(
                "collection `{collection}` has a row scope, which the database enforces per runtime account: give the account with --grant-to (DOCSIDECAR_GRANT_TO)"
            )));
        }
        return Ok(None);
    };
    let me = account.sql();
    let ours: Vec<Declaration> = ours
        .into_iter()
        .map(|d| Declaration {
            account: me.clone(),
            ..d
        })
        .collect();
    for d in ours.iter().filter(|d| d.scope.is_some()) {
        if view_name(&d.collection, d.scope.as_deref().unwrap_or_default()).is_none() {
            return Err(StoreError::Internal(format!(
                "collection `{}` has a row scope, but its name is too long for MySQL to name its views (at most 54 characters)",
                d.collection
            )));
        }
    }
    let result = async {
        c.conn().query_drop(DECLARATIONS_DDL).await?;
        let recorded = recorded(c).await?;
        let others: Vec<Declaration> = recorded
            .iter()
            .filter(|d| d.account != me)
            .cloned()
            .collect();
        let warnings = match check_declarations(&ours, &others) {
            Ok(w) => w,
            Err(e) => return Err(OpError::Store(StoreError::Internal(e))),
        };
        for warning in warnings {
            warn!("{warning}");
        }
        record(c, &me, &ours, &recorded).await?;
        let all = existing_accounts(c, others.into_iter().chain(ours).collect()).await?;
        Ok(all)
    }
    .await;
    let all = result.map_err(|e| match e {
        OpError::Store(e) => e,
        e => StoreError::Internal(format!("recording the declarations: {e}")),
    })?;
    let scoped = scoped_collections(&all);
    Ok(Some(Scoping { all, scoped }))
}

async fn recorded(c: &mut Conn) -> Result<Vec<Declaration>, OpError> {
    type Row = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, Option<Vec<u8>>);
    let rows: Vec<Row> = c
        .conn()
        .query("SELECT account, collection, service, access, scope FROM `_declarations` ORDER BY account, collection")
        .await?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(rows
        .into_iter()
        .map(
            |(account, collection, service, access, scope)| Declaration {
                account: text(account),
                collection: text(collection),
                service: text(service),
                grant: if access == b"read-write" {
                    Grant::ReadWrite
                } else {
                    Grant::ReadOnly
                },
                scope: scope.map(text),
            },
        )
        .collect())
}

/// Replaces `account`'s recorded declarations by `ours`, logging changes.
async fn record(
    c: &mut Conn,
    account: &str,
    ours: &[Declaration],
    recorded: &[Declaration],
) -> Result<(), OpError> {
    let before: BTreeSet<_> = recorded.iter().filter(|d| d.account == account).collect();
    let after: BTreeSet<_> = ours.iter().collect();
    if before == after {
        return Ok(());
    }
    let conn = c.conn();
    conn.query_drop("START TRANSACTION").await?;
    conn.exec_drop(
        "DELETE FROM `_declarations` WHERE account = ?",
        (account.as_bytes(),),
    )
    .await?;
    for d in ours {
        conn.exec_drop(
            "INSERT INTO `_declarations` (account, collection, service, access, scope) VALUES (?, ?, ?, ?, ?)",
            (
                d.account.as_bytes(),
                d.collection.as_bytes(),
                d.service.as_bytes(),
                access_text(d.grant).as_bytes(),
                d.scope.as_ref().map(|s| s.as_bytes().to_vec()),
            ),
        )
        .await?;
    }
    conn.query_drop("COMMIT").await?;
    info!(
        account,
        declarations = ours.len(),
        "recorded the declarations of account {account}"
    );
    Ok(())
}

/// The declarations whose account still exists; the others are skipped (a
/// grant cannot name a dropped account), with a warning. When the admin
/// account may not read the account list, all are kept.
async fn existing_accounts(
    c: &mut Conn,
    all: Vec<Declaration>,
) -> Result<Vec<Declaration>, OpError> {
    let mut kept = Vec::with_capacity(all.len());
    for mut d in all {
        let Ok(account) = Account::parse(&d.account) else {
            warn!(account = %d.account, "recorded account {} is not a plain MySQL account: skipped", d.account);
            continue;
        };
        if !is_valid_name(&d.collection) {
            continue;
        }
        d.account = account.sql();
        let found: Result<Option<i64>, _> = c
            .conn()
            .exec_first(
                "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = ?",
                (&account.user, &account.host),
            )
            .await;
        if matches!(found, Ok(Some(0))) {
            warn!(account = %d.account, collection = %d.collection, "account {} recorded for `{}` no longer exists: skipped (its service's next `migrate` replaces the record)", d.account, d.collection);
            continue;
        }
        kept.push(d);
    }
    Ok(kept)
}

/// The tables that exist in the database.
async fn base_tables(c: &mut Conn) -> Result<BTreeSet<String>, OpError> {
    let names: Vec<Vec<u8>> = c
        .conn()
        .query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE'")
        .await?;
    Ok(names
        .into_iter()
        .filter_map(|n| String::from_utf8(n).ok())
        .collect())
}

/// Makes the views and their grants what the declarations say: see the
/// module's documentation.
pub(super) async fn converge(
    c: &mut Conn,
    database: &str,
    scoping: &Scoping,
) -> Result<(), OpError> {
    let tables = base_tables(c).await?;
    // View name → (definition, account → privileges).
    let mut views: BTreeMap<String, (String, BTreeMap<String, &str>)> = BTreeMap::new();
    let mut confined: BTreeSet<(String, String)> = BTreeSet::new();
    for d in &scoping.all {
        let Some(scope) = &d.scope else { continue };
        if !scoping.scoped.contains(&d.collection) || !tables.contains(&d.collection) {
            continue;
        }
        let Some(name) = view_name(&d.collection, scope) else {
            continue;
        };
        let definition = format!(
            "SELECT * FROM `{database}`.`{}` WHERE scope = {}",
            d.collection,
            hex(scope)
        );
        let entry = views.entry(name).or_insert((definition, BTreeMap::new()));
        entry.1.insert(d.account.clone(), privileges(d.grant));
        confined.insert((d.collection.clone(), d.account.clone()));
    }
    if !scoping.scoped.is_empty() {
        let mut by_account: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for d in &scoping.all {
            let rows = match &d.scope {
                Some(scope) => format!(
                    "(collection = {} AND scope = {})",
                    hex(&d.collection),
                    hex(scope)
                ),
                None => format!("collection = {}", hex(&d.collection)),
            };
            by_account.entry(&d.account).or_default().push(rows);
        }
        for (account, mut rows) in by_account {
            rows.sort();
            let definition = format!(
                "SELECT * FROM `{database}`.`{FEED}` WHERE {}",
                rows.join(" OR ")
            );
            let grants = BTreeMap::from([(account.to_string(), privileges(Grant::ReadWrite))]);
            views.insert(feed_view_name(account), (definition, grants));
            confined.insert((FEED.to_string(), account.to_string()));
        }
    }
    if scoping.scoped.is_empty() {
        // No scopes (any more): every account reads the feed's table again.
        let accounts: BTreeSet<&str> = scoping.all.iter().map(|d| d.account.as_str()).collect();
        for account in accounts {
            c.conn()
                .query_drop(format!(
                    "GRANT {} ON `{database}`.`{FEED}` TO {account}",
                    privileges(Grant::ReadWrite)
                ))
                .await?;
        }
    }
    for collection in scoping.scoped.iter().filter(|c| tables.contains(*c)) {
        let unscoped: Option<i64> = c
            .conn()
            .query_first(format!(
                "SELECT EXISTS (SELECT 1 FROM `{database}`.`{collection}` WHERE scope = '')"
            ))
            .await?;
        if unscoped == Some(1) {
            warn!(collection = %collection, "`{collection}` has rows without a scope, which no scoped service sees");
        }
    }
    let existing = existing_views(c).await?;
    for (name, (definition, grants)) in &views {
        c.conn()
            .query_drop(format!(
                "CREATE OR REPLACE SQL SECURITY DEFINER VIEW `{database}`.`{name}` AS {definition} WITH CASCADED CHECK OPTION"
            ))
            .await?;
        if !existing.contains(name) {
            info!(view = %name, "created view {name}: {definition}");
        }
        for (account, privileges) in grants {
            let on = format!("`{database}`.`{name}`");
            c.conn()
                .query_drop(format!("GRANT {privileges} ON {on} TO {account}"))
                .await?;
            if *privileges == "SELECT" {
                revoke(
                    c,
                    &format!("REVOKE INSERT, UPDATE, DELETE ON {on} FROM {account}"),
                )
                .await?;
            }
        }
    }
    // The tables behind the views: nothing for the accounts confined to them.
    for (table, account) in &confined {
        let on = format!("`{database}`.`{table}`");
        revoke(c, &format!("REVOKE ALL PRIVILEGES ON {on} FROM {account}")).await?;
        revoke(c, &format!("REVOKE GRANT OPTION ON {on} FROM {account}")).await?;
    }
    unwanted(c, database, &views, &existing).await?;
    info!(
        views = views.len(),
        scoped = scoping.scoped.len(),
        "the scope views match the declarations"
    );
    Ok(())
}

/// Our views (a `$` in the name, a collection's or the feed's before it).
async fn existing_views(c: &mut Conn) -> Result<BTreeSet<String>, OpError> {
    let names: Vec<Vec<u8>> = c
        .conn()
        .query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'VIEW'")
        .await?;
    Ok(names
        .into_iter()
        .filter_map(|n| String::from_utf8(n).ok())
        .filter(|n| {
            is_plain(n)
                && n.split_once('$')
                    .is_some_and(|(base, _)| base == FEED || is_valid_name(base))
        })
        .collect())
}

/// Revokes the grants on our views that no declaration wants, and drops
/// the views nobody needs.
async fn unwanted(
    c: &mut Conn,
    database: &str,
    views: &BTreeMap<String, (String, BTreeMap<String, &str>)>,
    existing: &BTreeSet<String>,
) -> Result<(), OpError> {
    let granted: Vec<(String, Vec<u8>)> = c
        .conn()
        .exec(
            "SELECT DISTINCT GRANTEE, TABLE_NAME FROM information_schema.TABLE_PRIVILEGES
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME LIKE '%$%'",
            (database,),
        )
        .await?;
    for (grantee, view) in granted {
        let Ok(view) = String::from_utf8(view) else {
            continue;
        };
        let wanted = views
            .get(&view)
            .is_some_and(|(_, g)| g.contains_key(&grantee));
        if wanted || !existing.contains(&view) {
            continue;
        }
        let Ok(account) = Account::parse(&grantee) else {
            continue;
        };
        let on = format!("`{database}`.`{view}`");
        revoke(
            c,
            &format!("REVOKE ALL PRIVILEGES ON {on} FROM {}", account.sql()),
        )
        .await?;
        revoke(
            c,
            &format!("REVOKE GRANT OPTION ON {on} FROM {}", account.sql()),
        )
        .await?;
        info!(view = %view, account = %grantee, "revoked {grantee}'s access to view {view}: no declaration wants it");
    }
    for view in existing.iter().filter(|v| !views.contains_key(*v)) {
        c.conn()
            .query_drop(format!("DROP VIEW IF EXISTS `{database}`.`{view}`"))
            .await?;
        info!(view = %view, "dropped view {view}: no declaration wants it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_named_after_their_collection_and_scope() {
        assert_eq!(
            view_name("platform_integrations", "twitch").unwrap(),
            "platform_integrations$twitch"
        );
        let long = "s".repeat(60);
        let hashed = view_name("integrations", &long).unwrap();
        assert!(
            hashed.starts_with("integrations$$") && hashed.len() == 30,
            "{hashed}"
        );
        assert_ne!(hashed, view_name("integrations", &"t".repeat(60)).unwrap());
        let c54 = "c".repeat(54);
        assert_eq!(view_name(&c54, &long).unwrap().len(), 64);
        assert!(view_name(&"c".repeat(55), &long).is_none());
        assert_eq!(view_name("a", "not a name").unwrap().len(), 19);
        assert!(feed_view_name("'a'@'%'").starts_with("_changes$"));
        assert_ne!(feed_view_name("'a'@'%'"), feed_view_name("'b'@'%'"));
        assert_eq!(hex("a'"), "X'6127'");
    }
}
