//! Everything that can go wrong in a store, in terms a caller can act on.

/// Why the database cannot serve a call right now; each is safe to retry
/// except [`Unavailable::CommitUnknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Unreachable, refusing, starting up, failing over, a conflict to retry.
    Database,
    /// No pooled connection became free within the acquire timeout.
    PoolExhausted,
    /// The connection died during COMMIT: the write may or may not be applied.
    CommitUnknown,
    /// The sidecar is stopping.
    ShuttingDown,
}

/// Why an operator must act before a call can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// The collection has no table and this sidecar may not create it.
    TableMissing,
    /// The database (file) cannot be written.
    DatabaseReadOnly,
}

/// A protected field, as the policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    ReadOnly,
    Hidden,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("document `{id}` not found in collection `{collection}`")]
    NotFound { collection: String, id: String },
    #[error("document `{id}` already exists in collection `{collection}`")]
    AlreadyExists { collection: String, id: String },
    /// A conditional write whose `expected_rev` did not match (or the document is absent).
    #[error("{}", rev_mismatch(.collection, .id, .expected, .actual.as_deref()))]
    RevMismatch {
        collection: String,
        id: String,
        expected: String,
        actual: Option<String>,
    },
    /// The request's content breaks a rule that only the stored document
    /// could reveal (a transform on a value of the wrong type, an update whose
    /// result is too large). `field` is the request field at fault.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A write that would set or change a protected field.
    #[error("{}", protected(.field, *.protection))]
    Protected {
        field: String,
        protection: Protection,
    },
    /// The database account may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// An operator must act (run `migrate`, free the file system's read-only flag).
    #[error("{message}")]
    Precondition {
        precondition: Precondition,
        message: String,
    },
    /// The volume holding the database is full.
    #[error("{0}")]
    DiskFull(String),
    /// The database cannot serve now; see [`Unavailable`].
    #[error("{message}")]
    Unavailable {
        reason: Unavailable,
        message: String,
    },
    /// A failure inside one mutation of an atomic write; nothing was applied.
    #[error("mutation {index}: {source}")]
    InMutation {
        index: usize,
        #[source]
        source: Box<StoreError>,
    },
    /// A fault of the store itself (corruption, a bug); not the caller's doing.
    #[error("{0}")]
    Internal(String),
}

fn rev_mismatch(collection: &str, id: &str, expected: &str, actual: Option<&str>) -> String {
    let expected = crate::quote::shown(expected);
    match actual {
        Some(actual) => format!(
            "document `{id}` in collection `{collection}` has rev `{actual}`, not the expected {expected}: read it again and retry"
        ),
        None => format!(
            "document `{id}` in collection `{collection}` does not exist, so it cannot have the expected rev {expected}"
        ),
    }
}

fn protected(field: &str, protection: Protection) -> String {
    match protection {
        Protection::ReadOnly => format!(
            "field `{field}` is read-only for this service: leave it out (its stored value is kept) or send it unchanged"
        ),
        Protection::Hidden => format!(
            "field `{field}` is hidden from this service: it may not be set, changed or queried"
        ),
    }
}

impl StoreError {
    pub fn not_found(collection: &str, id: &str) -> StoreError {
        StoreError::NotFound {
            collection: collection.into(),
            id: id.into(),
        }
    }

    pub fn already_exists(collection: &str, id: &str) -> StoreError {
        StoreError::AlreadyExists {
            collection: collection.into(),
            id: id.into(),
        }
    }

    /// The database cannot serve now; retrying is safe.
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            reason: Unavailable::Database,
            message: message.into(),
        }
    }

    pub fn pool_exhausted(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            reason: Unavailable::PoolExhausted,
            message: message.into(),
        }
    }

    pub fn commit_unknown(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            reason: Unavailable::CommitUnknown,
            message: message.into(),
        }
    }

    pub fn shutting_down(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            reason: Unavailable::ShuttingDown,
            message: message.into(),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn table_missing(message: impl Into<String>) -> StoreError {
        StoreError::Precondition {
            precondition: Precondition::TableMissing,
            message: message.into(),
        }
    }

    pub fn in_mutation(self, index: usize) -> StoreError {
        StoreError::InMutation {
            index,
            source: Box::new(self),
        }
    }

    /// The error of a one-mutation write run on behalf of a plain call.
    pub fn outside_mutation(self) -> StoreError {
        match self {
            StoreError::InMutation { source, .. } => *source,
            e => e,
        }
    }

    /// Whether retrying the whole operation may succeed (a dead connection, a
    /// conflict); never for a commit whose outcome is unknown.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable { reason, .. } => *reason != Unavailable::CommitUnknown,
            StoreError::InMutation { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
