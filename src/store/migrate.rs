//! What `docsidecar migrate` applies, whatever the database: the declared
//! collections and the runtime account's access to each.

use std::collections::BTreeMap;

/// What the runtime account may do to a collection's table: resolved from a
/// policy's access by `config`, so that stores never import the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
pub struct MigratePlan {
    /// The declared collections (from the policy); their tables are created.
    pub collections: BTreeMap<String, Grant>,
    /// The runtime account that receives the grants: a PostgreSQL role, or a
    /// MySQL account (`'user'@'host'`).
    pub grant_to: Option<String>,
    /// PostgreSQL: revoke TEMPORARY on the database from PUBLIC, so that the
    /// runtime role cannot create temporary tables (affects every role there).
    pub revoke_public_temp: bool,
}
