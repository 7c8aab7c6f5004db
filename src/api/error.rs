//! The one place where errors become gRPC statuses, with their reasons and
//! details (see `crate::status`).

use crate::metrics;
use crate::policy::{Denied, DenyKind};
use crate::status::{Failure, Reason};
use crate::store::{Precondition, Protection, StoreError, Unavailable};
use tonic::Status;

/// Why a call failed: the request broke a rule, the caller may not, or the
/// store refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field of the request breaks a rule; the message states it.
    #[error("{message}")]
    Invalid {
        /// The request field at fault (`id`, `ids[3]`, `mutations[3].save.data`).
        field: String,
        message: String,
        reason: Reason,
    },
    /// Outside the caller's scope; decided before the database is touched.
    #[error(transparent)]
    PermissionDenied(#[from] Denied),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A part of the API this sidecar does not serve yet.
    #[error("{0} is not available in this docsidecar yet")]
    Unimplemented(&'static str),
    /// Refused by a rule of this sidecar's configuration (an index the query
    /// needs, say), with the reason to report.
    #[error("{message}")]
    Refused {
        reason: Reason,
        message: String,
        metadata: Vec<(&'static str, String)>,
    },
}

impl ApiError {
    /// `field` breaks a rule: INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
            reason: Reason::InvalidArgument,
        }
    }

    /// A page token the server did not issue for this request.
    pub fn page_token(message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: "page_token".into(),
            message: message.into(),
            reason: Reason::PageTokenInvalid,
        }
    }

    pub fn unimplemented(what: &'static str) -> Self {
        ApiError::Unimplemented(what)
    }

    /// Names the failing mutation of a Write (`op`: save, update, delete):
    /// the message starts `mutation N:` and the field is `mutations[N].op.…`.
    pub fn in_mutation(self, index: usize, op: &str) -> Self {
        match self {
            ApiError::Invalid {
                field,
                message,
                reason,
            } => ApiError::Invalid {
                field: format!("mutations[{index}].{op}.{field}"),
                message: format!("mutation {index}: {message}"),
                reason,
            },
            ApiError::PermissionDenied(Denied { kind, message }) => {
                ApiError::PermissionDenied(Denied {
                    kind,
                    message: format!("mutation {index}: {message}"),
                })
            }
            ApiError::Store(e) => ApiError::Store(e.in_mutation(index)),
            e @ (ApiError::Unimplemented(_) | ApiError::Refused { .. }) => e,
        }
    }
}

/// The failure a store error means to the caller. Exhaustive on purpose: a new
/// kind of store error needs a decision here.
fn store_failure(e: StoreError, mutation: Option<(usize, &str)>) -> Failure {
    let message = e.to_string();
    match e {
        StoreError::NotFound { collection, id } => Failure::new(Reason::DocumentNotFound, message)
            .with("collection", collection)
            .with("id", id),
        StoreError::AlreadyExists { collection, id } => {
            Failure::new(Reason::DocumentExists, message)
                .with("collection", collection)
                .with("id", id)
        }
        StoreError::RevMismatch { actual, .. } => {
            let failure = Failure::new(Reason::RevMismatch, message);
            match actual {
                Some(rev) => failure.with("current_rev", rev),
                None => failure,
            }
        }
        StoreError::Invalid { field, .. } => {
            let field = match mutation {
                Some((index, op)) => format!("mutations[{index}].{op}.{field}"),
                None => field,
            };
            Failure::new(Reason::InvalidArgument, message).field(field)
        }
        StoreError::Protected { field, protection } => {
            let reason = match protection {
                Protection::ReadOnly => Reason::FieldReadOnly,
                Protection::Hidden => Reason::FieldHidden,
            };
            Failure::new(reason, message).with("field", field)
        }
        StoreError::PermissionDenied(_) => Failure::new(Reason::CollectionNotAllowed, message),
        StoreError::Precondition { precondition, .. } => Failure::new(
            match precondition {
                Precondition::TableMissing => Reason::TableMissing,
                Precondition::DatabaseReadOnly => Reason::DatabaseReadOnly,
            },
            message,
        ),
        StoreError::DiskFull(_) => Failure::new(Reason::DiskFull, message),
        StoreError::Unavailable { reason, .. } => Failure::new(
            match reason {
                Unavailable::Database => Reason::DatabaseUnavailable,
                Unavailable::PoolExhausted => Reason::PoolExhausted,
                Unavailable::CommitUnknown => Reason::CommitUnknown,
                Unavailable::ShuttingDown => Reason::ShuttingDown,
            },
            message,
        ),
        StoreError::InMutation { index, source } => {
            let inner = store_failure(*source, mutation.map(|(_, op)| (index, op)));
            Failure { message, ..inner }
        }
        StoreError::Internal(_) => Failure::new(Reason::Internal, message),
    }
}

/// Counts and logs what the database's troubles are; conflicts and misses are
/// answers, not troubles.
fn observe(failure: &Failure) {
    let kind = match failure.reason {
        Reason::DatabaseUnavailable | Reason::PoolExhausted | Reason::CommitUnknown => {
            Some("unavailable")
        }
        Reason::CollectionNotAllowed | Reason::TableMissing | Reason::DatabaseReadOnly => {
            Some("permission_denied")
        }
        Reason::DiskFull => Some("disk_full"),
        Reason::Internal => {
            tracing::error!(error = %failure.message, "store fault");
            Some("internal")
        }
        _ => None,
    };
    if let Some(kind) = kind {
        metrics::database_error(kind);
    }
}

impl ApiError {
    /// The status of a failed Write whose mutations are of kinds `ops`.
    pub fn into_status_for(self, ops: &[&str]) -> Status {
        match self {
            ApiError::Store(e) => {
                let mutation = match &e {
                    StoreError::InMutation { index, .. } => ops.get(*index).map(|op| (*index, *op)),
                    _ => None,
                };
                let failure = store_failure(e, mutation);
                observe(&failure);
                failure.into_status()
            }
            other => other.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Invalid {
                field,
                message,
                reason,
            } => Failure::new(reason, message).field(field).into_status(),
            ApiError::PermissionDenied(Denied { kind, message }) => Failure::new(
                match kind {
                    DenyKind::CollectionNotAllowed => Reason::CollectionNotAllowed,
                    DenyKind::CollectionReadOnly => Reason::CollectionReadOnly,
                    DenyKind::ScopeNotAllowed => Reason::ScopeNotAllowed,
                },
                message,
            )
            .into_status(),
            ApiError::Store(e) => {
                let failure = store_failure(e, None);
                observe(&failure);
                failure.into_status()
            }
            e @ ApiError::Unimplemented(_) => {
                Failure::new(Reason::Unimplemented, e.to_string()).into_status()
            }
            ApiError::Refused {
                reason,
                message,
                metadata,
            } => {
                let mut failure = Failure::new(reason, message);
                failure.metadata = metadata;
                failure.into_status()
            }
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        ApiError::Store(e).into()
    }
}
