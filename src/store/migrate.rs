//! What `docsidecar migrate` applies, whatever the database: the declared
//! collections and the runtime account's access to each.

use std::collections::BTreeMap;

/// What the runtime account may do to a collection's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// SELECT, INSERT, UPDATE, DELETE.
    ReadWrite,
    /// SELECT.
    ReadOnly,
}

/// What to migrate.
#[derive(Debug, Clone)]
pub struct MigratePlan {
    /// The declared collections (from the policy); their tables are created.
    pub collections: BTreeMap<String, Grant>,
    /// The runtime account that receives the grants: a PostgreSQL role, or a
    /// MySQL account (`'user'@'host'`).
    pub grant_to: Option<String>,
}
