//! What `docsidecar migrate` applies, whatever the database: the declared
//! collections and the runtime account's access to each.

use super::query::Index;
use std::collections::BTreeMap;

/// What the runtime account may do to a collection's table: resolved from a
/// policy's access by `config`, so that stores never import the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grant {
    /// SELECT, INSERT, UPDATE, DELETE.
    ReadWrite,
    /// SELECT.
    ReadOnly,
}

impl Grant {
    /// The SQL privileges this access needs, in a fixed order.
    pub fn privileges(self) -> &'static [&'static str] {
        match self {
            Grant::ReadWrite => &["SELECT", "INSERT", "UPDATE", "DELETE"],
            Grant::ReadOnly => &["SELECT"],
        }
    }
}

/// What to migrate.
#[derive(Debug, Clone, Default)]
pub struct MigratePlan {
    /// The declared collections (from the policy); their tables are created.
    pub collections: BTreeMap<String, Grant>,
    /// The runtime account that receives the grants: a PostgreSQL role, or a
    /// MySQL account (`'user'@'host'`).
    pub grant_to: Option<String>,
    /// PostgreSQL: revoke TEMPORARY on the database from PUBLIC, so that the
    /// runtime role cannot create temporary tables (affects every role there).
    pub revoke_public_temp: bool,
    /// The service whose policy this is (recorded with its declarations).
    pub service: String,
    /// The row scope of each collection the policy scopes.
    pub scopes: BTreeMap<String, String>,
    /// Rows of the old recipe (no scope, the owning account's name in this
    /// field of the document) get the scope their account declares.
    pub adopt_owner_field: Option<String>,
    /// Re-keys tables of earlier releases from `id` to `(scope, id)`: only
    /// once no sidecar of those releases runs.
    pub contract: bool,
    /// The query indexes each collection declares; `migrate` builds them
    /// online, records them as this service's, and drops the indexes no
    /// service declares any more.
    pub indexes: BTreeMap<String, Vec<Index>>,
}

impl MigratePlan {
    /// This run's declarations, recorded for the runtime account; `None`
    /// without one (nothing is recorded or enforced per account then).
    pub fn declarations(&self) -> Option<Vec<Declaration>> {
        let account = self.grant_to.as_ref()?;
        Some(
            self.collections
                .iter()
                .map(|(collection, &grant)| Declaration {
                    account: account.clone(),
                    service: self.service.clone(),
                    collection: collection.clone(),
                    grant,
                    scope: self.scopes.get(collection).cloned(),
                })
                .collect(),
        )
    }
}

/// One runtime account's declaration of one collection, as `migrate`
/// records it in the database, so that the runs of every service sharing it
/// converge on one set of row-level rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Declaration {
    /// The runtime account the database enforces it for.
    pub account: String,
    /// The service whose policy declared it (for messages).
    pub service: String,
    pub collection: String,
    pub grant: Grant,
    /// Its row scope. `None`: unscoped when read-write, every scope when
    /// read-only (a reporting reader).
    pub scope: Option<String>,
}

impl Declaration {
    /// As the policy would say it, for messages.
    fn shown(&self) -> String {
        let access = match self.grant {
            Grant::ReadWrite => "read-write",
            Grant::ReadOnly => "read-only",
        };
        match &self.scope {
            Some(scope) => format!(
                "service `{}` (account `{}`) declares `{}` {access} in scope `{scope}`",
                self.service, self.account, self.collection
            ),
            None => format!(
                "service `{}` (account `{}`) declares `{}` {access} without a scope",
                self.service, self.account, self.collection
            ),
        }
    }

    /// Writes rows of every scope at once: what a scoped collection forbids.
    fn writes_unscoped(&self) -> bool {
        self.grant == Grant::ReadWrite && self.scope.is_none()
    }
}

/// Refuses declarations that contradict those other accounts recorded: on a
/// collection with row scopes, every writer names its scope (a read-write
/// declaration without one would write across scopes). The other way round
/// is the moment a shared collection becomes scoped, one service at a time:
/// allowed, with a warning for each writer still unscoped.
pub fn check_declarations(
    ours: &[Declaration],
    others: &[Declaration],
) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for d in ours {
        for o in others.iter().filter(|o| o.collection == d.collection) {
            if d.writes_unscoped() && o.scope.is_some() {
                return Err(format!(
                    "{}, but {}: on a collection with row scopes every read-write declaration names its scope (a read-only one without a scope reads them all)",
                    d.shown(),
                    o.shown()
                ));
            }
            if d.scope.is_some() && o.writes_unscoped() {
                warnings.push(format!(
                    "{}, but {}: that service still reads and writes every row until its policy names a scope too and its `migrate` runs",
                    d.shown(),
                    o.shown()
                ));
            }
        }
    }
    Ok(warnings)
}

/// The collections some declaration gives a row scope.
pub fn scoped_collections(declarations: &[Declaration]) -> std::collections::BTreeSet<String> {
    declarations
        .iter()
        .filter(|d| d.scope.is_some())
        .map(|d| d.collection.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(account: &str, grant: Grant, scope: Option<&str>) -> Declaration {
        Declaration {
            account: account.into(),
            service: account.into(),
            collection: "shared".into(),
            grant,
            scope: scope.map(String::from),
        }
    }

    #[test]
    fn writers_of_a_scoped_collection_name_their_scope() {
        let twitch = d("twitch", Grant::ReadWrite, Some("twitch"));
        let discord = d("discord", Grant::ReadWrite, Some("discord"));
        let report = d("report", Grant::ReadOnly, None);
        let rogue = d("rogue", Grant::ReadWrite, None);
        let none: Vec<String> = Vec::new();
        let check = |ours: &Declaration, others: &[Declaration]| {
            check_declarations(std::slice::from_ref(ours), others)
        };
        assert_eq!(check(&twitch, &[discord, report.clone()]), Ok(none.clone()));
        assert_eq!(
            check(&report, std::slice::from_ref(&twitch)),
            Ok(none.clone())
        );
        let err = check(&rogue, std::slice::from_ref(&twitch)).unwrap_err();
        assert!(
            err.contains("`rogue`") && err.contains("scope `twitch`"),
            "{err}"
        );
        // Becoming scoped while another writer is not yet: a warning.
        let warnings = check(&twitch, &[rogue]).unwrap();
        assert!(
            warnings[0].contains("until its policy names a scope"),
            "{warnings:?}"
        );
        // Unscoped writers may share an unscoped collection.
        let a = d("a", Grant::ReadWrite, None);
        let b = d("b", Grant::ReadWrite, None);
        assert_eq!(check(&a, &[b]), Ok(none));
    }
}
