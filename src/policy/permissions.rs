//! What one caller may do: per collection, its access, the rows it reaches
//! and the fields protected from it. Checked before any database work.

use super::Access;
use crate::store::Protected;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
}

/// Which rows of a collection a caller reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    /// The collection has no row scopes (every row has the empty scope).
    Unscoped,
    /// The rows of one scope: the policy's `scope`, or a client's narrowing.
    Scope(String),
    /// The rows of every scope: a read-only declaration without a scope
    /// (reporting).
    Every,
}

/// How a caller may use one collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    pub access: Access,
    pub rows: Rows,
    pub protected: Arc<Protected>,
}

/// Everything, unprotected: no policy.
static OPEN: LazyLock<Rights> = LazyLock::new(|| Rights {
    access: Access::ReadWrite,
    rows: Rows::Unscoped,
    protected: Arc::default(),
});

/// What a caller may touch: `None` is open (no policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    collections: Option<BTreeMap<String, Rights>>,
}

/// Why a call is refused by the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    /// The collection is not declared for this caller.
    CollectionNotAllowed,
    /// The collection is read-only for this caller.
    CollectionReadOnly,
    /// The row scope asked for is not this caller's.
    ScopeNotAllowed,
}

/// A refusal, with a message that says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub kind: DenyKind,
    pub message: String,
}

impl Permissions {
    /// Everything: the development default without a policy.
    pub fn open() -> Permissions {
        Permissions { collections: None }
    }

    pub fn of(collections: BTreeMap<String, Rights>) -> Permissions {
        Permissions {
            collections: Some(collections),
        }
    }

    /// The caller's rights on `collection` if they allow `need`.
    pub fn check(&self, collection: &str, need: Need) -> Result<&Rights, Denied> {
        let Some(collections) = &self.collections else {
            return Ok(&OPEN);
        };
        match collections.get(collection) {
            None => Err(Denied {
                kind: DenyKind::CollectionNotAllowed,
                message: format!(
                    "collection `{collection}` is not in this caller's scope (allowed: {})",
                    names(collections)
                ),
            }),
            Some(rights) if rights.access == Access::ReadOnly && need == Need::Write => {
                Err(Denied {
                    kind: DenyKind::CollectionReadOnly,
                    message: format!("collection `{collection}` is read-only for this caller"),
                })
            }
            Some(rights) => Ok(rights),
        }
    }

    /// The declared collections this caller may read, sorted; `None` when open.
    pub fn collections(&self) -> Option<Vec<String>> {
        self.collections
            .as_ref()
            .map(|c| c.keys().cloned().collect())
    }

    /// Each readable collection's rights; `None` when open.
    pub fn rights(&self) -> Option<&BTreeMap<String, Rights>> {
        self.collections.as_ref()
    }
}

fn names(collections: &BTreeMap<String, Rights>) -> String {
    if collections.is_empty() {
        return "none".into();
    }
    collections
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Rights {
    /// The row scope a request about one document may touch: `requested`
    /// (possibly empty) checked against the rows this caller reaches. A
    /// multi-scope reader naming none gets [`ScopeError::Required`]: the
    /// empty scope, unless the collection has row scopes.
    pub fn document_scope(&self, requested: &str) -> Result<String, ScopeError> {
        match (&self.rows, requested) {
            (Rows::Unscoped, "") => Ok(String::new()),
            (Rows::Unscoped, _) => Err(ScopeError::Unscoped),
            (Rows::Scope(own), "") => Ok(own.clone()),
            (Rows::Scope(own), asked) if asked == own => Ok(own.clone()),
            (Rows::Scope(own), _) => Err(ScopeError::NotOwn(own.clone())),
            (Rows::Every, "") => Err(ScopeError::Required),
            (Rows::Every, asked) => Ok(asked.to_string()),
        }
    }

    /// The rows a read of many documents walks: one scope, or every scope for
    /// a multi-scope reader that names none.
    pub fn read_scopes(&self, requested: &str) -> Result<crate::store::Scopes, ScopeError> {
        use crate::store::Scopes;
        match (&self.rows, requested) {
            (Rows::Every, "") => Ok(Scopes::All),
            _ => self.document_scope(requested).map(Scopes::One),
        }
    }

    /// Whether a change of a document in `scope` is one this caller sees.
    pub fn sees(&self, scope: &str) -> bool {
        match &self.rows {
            Rows::Unscoped => scope.is_empty(),
            Rows::Scope(own) => scope == own,
            Rows::Every => true,
        }
    }
}

/// Why a request's `scope` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeError {
    /// A scope was named on a collection without row scopes.
    Unscoped,
    /// Another scope than the caller's own (named here).
    NotOwn(String),
    /// A multi-scope reader named no scope where one document is meant.
    Required,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Scopes;

    fn rights(rows: Rows) -> Rights {
        Rights {
            access: Access::ReadOnly,
            rows,
            protected: Arc::default(),
        }
    }

    #[test]
    fn requested_scopes_resolve_by_the_rows_reached() {
        let own = rights(Rows::Scope("twitch".into()));
        assert_eq!(own.document_scope("").unwrap(), "twitch");
        assert_eq!(own.document_scope("twitch").unwrap(), "twitch");
        assert_eq!(
            own.document_scope("discord"),
            Err(ScopeError::NotOwn("twitch".into()))
        );
        assert_eq!(own.read_scopes("").unwrap(), Scopes::One("twitch".into()));
        assert!(own.sees("twitch") && !own.sees("discord") && !own.sees(""));

        let every = rights(Rows::Every);
        assert_eq!(every.document_scope(""), Err(ScopeError::Required));
        assert_eq!(every.document_scope("x").unwrap(), "x");
        assert_eq!(every.read_scopes("").unwrap(), Scopes::All);
        assert_eq!(every.read_scopes("x").unwrap(), Scopes::One("x".into()));

        let plain = rights(Rows::Unscoped);
        assert_eq!(plain.document_scope("x"), Err(ScopeError::Unscoped));
        assert_eq!(plain.read_scopes("").unwrap(), Scopes::One(String::new()));
        assert!(plain.sees("") && !plain.sees("x"));
    }
}
