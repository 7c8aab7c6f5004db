//! The one place where errors become gRPC statuses.

use crate::policy::Denied;
use crate::store::StoreError;
use tonic::{Code, Status};

/// Why a call failed: the request broke a rule, or the store refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    /// Outside the caller's scope; decided before the database is touched.
    #[error(transparent)]
    PermissionDenied(#[from] Denied),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A part of the API this sidecar does not serve yet.
    #[error("{0} is not available in this docsidecar yet")]
    Unimplemented(&'static str),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidArgument(message.into())
    }

    pub fn unimplemented(what: &'static str) -> Self {
        ApiError::Unimplemented(what)
    }

    /// Prefixes the message with the failing mutation of a Write.
    pub fn in_mutation(self, index: usize) -> Self {
        match self {
            ApiError::InvalidArgument(m) => {
                ApiError::InvalidArgument(format!("mutation {index}: {m}"))
            }
            ApiError::PermissionDenied(Denied(m)) => {
                ApiError::PermissionDenied(Denied(format!("mutation {index}: {m}")))
            }
            ApiError::Store(e) => ApiError::Store(e.in_mutation(index)),
            e @ ApiError::Unimplemented(_) => e,
        }
    }
}

fn store_code(e: &StoreError) -> Code {
    // Exhaustive on purpose: a new kind of store error needs a decision here.
    match e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::AlreadyExists { .. } => Code::AlreadyExists,
        StoreError::RevMismatch { .. } => Code::Aborted,
        StoreError::PermissionDenied(_) => Code::PermissionDenied,
        StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::InMutation { source, .. } => store_code(source),
        StoreError::Internal(_) => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::PermissionDenied(Denied(m)) => Status::permission_denied(m),
            e @ ApiError::Unimplemented(_) => Status::unimplemented(e.to_string()),
            ApiError::Store(e) => {
                let code = store_code(&e);
                if code == Code::Internal {
                    tracing::error!(error = %e, "store fault");
                }
                // The database's own troubles, by kind; conflicts and misses are answers.
                let kind = match code {
                    Code::Unavailable => Some("unavailable"),
                    Code::PermissionDenied => Some("permission_denied"),
                    Code::Internal => Some("internal"),
                    _ => None,
                };
                if let Some(kind) = kind {
                    crate::metrics::database_error(kind);
                }
                Status::new(code, e.to_string())
            }
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        ApiError::Store(e).into()
    }
}
