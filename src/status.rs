//! gRPC statuses with the standard rich error model (`google.rpc` details in
//! `grpc-status-details-bin`): every error carries an `ErrorInfo` with a stable
//! reason in the `docsidecar.dev` domain, INVALID_ARGUMENT a `BadRequest`
//! naming the field, UNAVAILABLE a `RetryInfo` where a retry helps. Every layer
//! (API, auth, deadlines, codec) builds its statuses here, so the list of
//! reasons is declared once.

use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every docsidecar error.
pub const DOMAIN: &str = "docsidecar.dev";

/// The contract's error reasons ("Errors with details"), each with its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    DocumentNotFound,
    DocumentExists,
    RevMismatch,
    InvalidArgument,
    PageTokenInvalid,
    ResumeTokenInvalid,
    Unauthenticated,
    CollectionNotAllowed,
    CollectionReadOnly,
    ScopeNotAllowed,
    FieldReadOnly,
    FieldHidden,
    IndexRequired,
    DatabaseReadOnly,
    TableMissing,
    MessageTooLarge,
    DiskFull,
    ResumeTokenExpired,
    WatchTooSlow,
    DatabaseUnavailable,
    PoolExhausted,
    CommitUnknown,
    ShuttingDown,
    DeadlineExceeded,
    Internal,
    /// Not in the contract's list: a part of the API not served yet.
    Unimplemented,
    /// Not in the contract's list yet (proposed): the sidecar serves as many
    /// Watch streams as it may.
    WatchStreamsExhausted,
}

impl Reason {
    pub fn code(self) -> Code {
        use Reason::*;
        match self {
            DocumentNotFound => Code::NotFound,
            DocumentExists => Code::AlreadyExists,
            RevMismatch | WatchTooSlow => Code::Aborted,
            InvalidArgument | PageTokenInvalid | ResumeTokenInvalid => Code::InvalidArgument,
            Unauthenticated => Code::Unauthenticated,
            CollectionNotAllowed | CollectionReadOnly | ScopeNotAllowed | FieldReadOnly
            | FieldHidden => Code::PermissionDenied,
            IndexRequired | DatabaseReadOnly | TableMissing => Code::FailedPrecondition,
            MessageTooLarge | DiskFull | WatchStreamsExhausted => Code::ResourceExhausted,
            ResumeTokenExpired => Code::OutOfRange,
            DatabaseUnavailable | PoolExhausted | CommitUnknown | ShuttingDown => Code::Unavailable,
            DeadlineExceeded => Code::DeadlineExceeded,
            Internal => Code::Internal,
            Unimplemented => Code::Unimplemented,
        }
    }

    pub fn as_str(self) -> &'static str {
        use Reason::*;
        match self {
            DocumentNotFound => "DOCUMENT_NOT_FOUND",
            DocumentExists => "DOCUMENT_EXISTS",
            RevMismatch => "REV_MISMATCH",
            InvalidArgument => "INVALID_ARGUMENT",
            PageTokenInvalid => "PAGE_TOKEN_INVALID",
            ResumeTokenInvalid => "RESUME_TOKEN_INVALID",
            Unauthenticated => "UNAUTHENTICATED",
            CollectionNotAllowed => "COLLECTION_NOT_ALLOWED",
            CollectionReadOnly => "COLLECTION_READ_ONLY",
            ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
            FieldReadOnly => "FIELD_READ_ONLY",
            FieldHidden => "FIELD_HIDDEN",
            IndexRequired => "INDEX_REQUIRED",
            DatabaseReadOnly => "DATABASE_READ_ONLY",
            TableMissing => "TABLE_MISSING",
            MessageTooLarge => "MESSAGE_TOO_LARGE",
            DiskFull => "DISK_FULL",
            ResumeTokenExpired => "RESUME_TOKEN_EXPIRED",
            WatchTooSlow => "WATCH_TOO_SLOW",
            DatabaseUnavailable => "DATABASE_UNAVAILABLE",
            PoolExhausted => "POOL_EXHAUSTED",
            CommitUnknown => "COMMIT_UNKNOWN",
            ShuttingDown => "SHUTTING_DOWN",
            DeadlineExceeded => "DEADLINE_EXCEEDED",
            Internal => "INTERNAL",
            Unimplemented => "UNIMPLEMENTED",
            WatchStreamsExhausted => "WATCH_STREAMS_EXHAUSTED",
        }
    }

    /// How long a client should wait before retrying the same call, where a
    /// plain retry can succeed.
    fn retry_after(self) -> Option<Duration> {
        match self {
            Reason::DatabaseUnavailable => Some(Duration::from_secs(1)),
            Reason::PoolExhausted => Some(Duration::from_millis(100)),
            Reason::ShuttingDown => Some(Duration::ZERO),
            _ => None,
        }
    }
}

/// An error to send: reason, message, and the details that go with them.
#[derive(Debug)]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
    /// `ErrorInfo.metadata`.
    pub metadata: Vec<(&'static str, String)>,
    /// The request field at fault (INVALID_ARGUMENT), for `BadRequest`.
    pub field: Option<String>,
}

impl Failure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
            metadata: Vec::new(),
            field: None,
        }
    }

    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Failure {
        self.metadata.push((key, value.into()));
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Failure {
        self.field = Some(field.into());
        self
    }

    pub fn into_status(self) -> Status {
        let Failure {
            reason,
            message,
            metadata,
            field,
        } = self;
        let mut details = ErrorDetails::with_error_info(
            reason.as_str(),
            DOMAIN,
            metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<std::collections::HashMap<_, _>>(),
        );
        if let Some(field) = field {
            details.add_bad_request_violation(field, message.clone());
        }
        if let Some(delay) = reason.retry_after() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(reason.code(), message, details)
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Status {
        f.into_status()
    }
}

/// A status with just a reason and a message.
pub fn status(reason: Reason, message: impl Into<String>) -> Status {
    Failure::new(reason, message).into_status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_error_info_bad_request_and_retry_info() {
        let status = Failure::new(Reason::InvalidArgument, "data is required")
            .field("mutations[3].save.data")
            .into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.domain, DOMAIN);
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "mutations[3].save.data");

        let status = status_with_rev();
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata["current_rev"], "r2");
        let status = super::status(Reason::PoolExhausted, "busy");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.get_error_details().retry_info().is_some());
    }

    fn status_with_rev() -> Status {
        Failure::new(Reason::RevMismatch, "stale")
            .with("current_rev", "r2")
            .into_status()
    }
}
