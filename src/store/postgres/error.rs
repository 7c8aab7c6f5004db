//! PostgreSQL errors in a caller's terms.

use crate::store::StoreError;
use tokio_postgres::error::SqlState;

/// An error inside one operation, before it is put in a caller's terms: a missing
/// table means "not found" to a read and "create it" to a write.
#[derive(Debug)]
pub(super) enum OpError {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Pg(e)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

impl OpError {
    pub(super) fn is_missing_table(&self) -> bool {
        matches!(self, OpError::Pg(e) if is_missing_table(e))
    }

    /// In a caller's terms, for cases where a missing table has no special meaning.
    pub(super) fn resolve(self, target: &str) -> StoreError {
        match self {
            OpError::Pg(e) => map_pg_error(&e, target),
            OpError::Store(e) => e,
        }
    }
}

/// The table (or its whole schema) does not exist.
pub(super) fn is_missing_table(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME)
}

/// Lost a race against another session creating the same table or schema: the
/// object exists now, which is all the loser wanted. Depending on where the two
/// `CREATE ... IF NOT EXISTS` collide in the catalog, PostgreSQL reports a
/// unique violation, a duplicate table or a duplicate object (the row type).
pub(super) fn is_create_race(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION
        || *c == SqlState::DUPLICATE_TABLE
        || *c == SqlState::DUPLICATE_OBJECT
        || *c == SqlState::DUPLICATE_SCHEMA)
}

/// A conflict with a concurrent transaction that re-running the whole
/// transaction resolves: a deadlock, a serialization failure, or an insert
/// that lost a race to a concurrent insert of the same key.
pub(super) fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
        || *c == SqlState::T_R_SERIALIZATION_FAILURE
        || *c == SqlState::UNIQUE_VIOLATION)
}

pub(super) fn is_insufficient_privilege(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Whether a failure to connect can heal by itself, so that start-up retries
/// it: refused or timed out (the server is not up yet), starting up or shutting
/// down, too many clients. A wrong password, an unknown role or database, a
/// missing CONNECT privilege, a TLS refusal or an unverifiable certificate are
/// permanent: retrying them only delays the operator's fix.
pub(super) fn is_transient_connect(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        return *code == SqlState::CANNOT_CONNECT_NOW // starting up, in recovery
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || code.code().starts_with("08") // connection exception
            || code.code().starts_with("53"); // insufficient resources
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.is::<rustls::Error>() {
            return false;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            // A certificate the TLS layer refused travels inside an io::Error.
            return !io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
        }
        source = cause.source();
    }
    // No I/O underneath: configuration, authentication or TLS negotiation
    // ("server does not support TLS"), none of which heal; a closed
    // connection (the server went away mid-handshake) may.
    e.is_closed()
}

/// A failed readiness probe of the database.
#[derive(Debug)]
pub(super) enum ProbeError {
    Pg(tokio_postgres::Error),
    TimedOut(std::time::Duration),
}

impl ProbeError {
    /// See [`is_transient_connect`]; a slow answer may be faster next time.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            ProbeError::Pg(e) => is_transient_connect(e),
            ProbeError::TimedOut(_) => true,
        }
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Pg(e) => f.write_str(&describe(e)),
            ProbeError::TimedOut(limit) => write!(f, "no answer to SELECT 1 within {limit:?}"),
        }
    }
}

/// A tokio-postgres error with its causes; server errors as their message and
/// SQLSTATE. None of these parts carries the password or the connection string.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps a tokio-postgres error to what a caller can act on.
pub(super) fn map_pg_error(e: &tokio_postgres::Error, target: &str) -> StoreError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection broke or timed out, unless a value did not
        // convert (a bug, not the database's absence).
        let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
        return if e.is_closed() || io || e.to_string().starts_with("timeout") {
            StoreError::unavailable(format!(
                "lost the connection to PostgreSQL at {target}: {}; retry",
                describe(e)
            ))
        } else {
            StoreError::Internal(format!("PostgreSQL client error: {}", describe(e)))
        };
    };
    let sqlstate = code.code();
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        StoreError::PermissionDenied(format!(
            "the database role may not do this: {}; grant it with `docsidecar migrate --grant-to`",
            describe(e)
        ))
    } else if sqlstate.starts_with("08") // connection exception
        || sqlstate.starts_with("53") // insufficient resources, e.g. too many connections
        || sqlstate.starts_with("57P") // shutting down, starting up, session timeouts
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
    // a standby during failover
    {
        StoreError::unavailable(format!(
            "PostgreSQL at {target} is unavailable: {}; retry",
            describe(e)
        ))
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        StoreError::unavailable(format!(
            "the operation conflicted with a concurrent transaction: {}; retry",
            describe(e)
        ))
    } else if *code == SqlState::QUERY_CANCELED {
        StoreError::unavailable(format!(
            "PostgreSQL cancelled the statement: {}; retry",
            describe(e)
        ))
    } else if sqlstate.starts_with("22") {
        // Data exceptions, e.g. jsonb refuses the \u0000 escape in strings.
        StoreError::Internal(format!(
            "PostgreSQL cannot store this value: {}",
            describe(e)
        ))
    } else {
        StoreError::Internal(format!("PostgreSQL error: {}", describe(e)))
    }
}
