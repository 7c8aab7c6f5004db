//! MySQL/MariaDB errors in a caller's terms.

use crate::store::StoreError;
use mysql_async::{DriverError, Error};
use std::fmt;

/// Server error codes the store acts on (`include/mysqld_error.h`).
pub(super) mod code {
    pub const DB_ACCESS_DENIED: u16 = 1044;
    pub const ACCESS_DENIED: u16 = 1045;
    pub const BAD_DB: u16 = 1049;
    pub const TOO_MANY_CONNECTIONS: u16 = 1040;
    pub const DISK_FULL: u16 = 1021;
    pub const UNKNOWN_COM: u16 = 1047;
    pub const SERVER_SHUTDOWN: u16 = 1053;
    pub const DUP_ENTRY: u16 = 1062;
    pub const RECORD_FILE_FULL: u16 = 1114;
    pub const NO_SUCH_GRANT: u16 = 1147;
    pub const TABLE_ACCESS_DENIED: u16 = 1142;
    pub const COLUMN_ACCESS_DENIED: u16 = 1143;
    pub const NO_SUCH_TABLE: u16 = 1146;
    pub const PASSWORD_NO_MATCH: u16 = 1133;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    pub const TOO_MANY_USER_CONNECTIONS: u16 = 1203;
    pub const LOCK_DEADLOCK: u16 = 1213;
    pub const SPECIFIC_ACCESS_DENIED: u16 = 1227;
    pub const OPTION_PREVENTS_STATEMENT: u16 = 1290;
    pub const QUERY_INTERRUPTED: u16 = 1317;
    pub const CANT_EXECUTE_IN_READ_ONLY_TRANSACTION: u16 = 1792;
    pub const READ_ONLY_MODE: u16 = 1836;
    pub const CONNECTION_KILLED: u16 = 1927;
    pub const STATEMENT_TIMEOUT: u16 = 1969;
    pub const MYSQL_STATEMENT_TIMEOUT: u16 = 3024;
}

/// An error inside one operation, before it is put in a caller's terms: a
/// missing table means "not found" to a read and "create it" to a write.
#[derive(Debug)]
pub(super) enum OpError {
    My(Error),
    Store(StoreError),
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        OpError::My(e)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpError::My(e) => f.write_str(&describe(e)),
            OpError::Store(e) => e.fmt(f),
        }
    }
}

impl OpError {
    pub(super) fn code(&self) -> Option<u16> {
        match self {
            OpError::My(Error::Server(e)) => Some(e.code),
            _ => None,
        }
    }

    pub(super) fn is_missing_table(&self) -> bool {
        self.code() == Some(code::NO_SUCH_TABLE)
    }

    /// A conflict with a concurrent transaction that re-running the whole
    /// transaction resolves: a deadlock, a Galera certification failure or
    /// brute-force abort (both 1213, SQLSTATE 40001, also on COMMIT), or an
    /// insert that lost a race to a concurrent insert of the same key.
    pub(super) fn is_conflict(&self) -> bool {
        matches!(self.code(), Some(code::LOCK_DEADLOCK | code::DUP_ENTRY))
    }

    /// The connection broke, or its host cannot serve now (a Galera node
    /// outside the primary component, a server turned read-only): the pool
    /// must stop using that host's connections.
    pub(super) fn is_host_trouble(&self) -> bool {
        match self {
            OpError::My(e) => is_host_trouble(e),
            OpError::Store(_) => false,
        }
    }

    pub(super) fn is_permission_denied(&self) -> bool {
        matches!(
            self.code(),
            Some(code::TABLE_ACCESS_DENIED | code::COLUMN_ACCESS_DENIED | code::DB_ACCESS_DENIED)
        )
    }

    /// In a caller's terms, for cases where a missing table has no special meaning.
    pub(super) fn resolve(self, target: &str) -> StoreError {
        self.split(target).0
    }

    /// In a caller's terms, and the driver's error when there was one (it
    /// decides what becomes of the connection).
    pub(super) fn split(self, target: &str) -> (StoreError, Option<OpError>) {
        match self {
            OpError::My(e) => (map_error(&e, target), Some(OpError::My(e))),
            OpError::Store(e) => (e, None),
        }
    }
}

/// See [`OpError::is_host_trouble`].
pub(super) fn is_host_trouble(e: &Error) -> bool {
    match e {
        Error::Io(_) => true,
        Error::Driver(d) => matches!(
            d,
            DriverError::ConnectionClosed
                | DriverError::PacketOutOfOrder
                | DriverError::UnexpectedPacket { .. }
        ),
        Error::Server(s) => matches!(
            s.code,
            code::UNKNOWN_COM
                | code::SERVER_SHUTDOWN
                | code::CONNECTION_KILLED
                | code::OPTION_PREVENTS_STATEMENT
                | code::READ_ONLY_MODE
                | code::CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
        ),
        Error::Other(_) | Error::Url(_) => false,
    }
}

/// The connection itself broke (as opposed to the server answering with an
/// error): during COMMIT, the outcome is unknown.
pub(super) fn is_connection_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Io(_) | Error::Driver(DriverError::ConnectionClosed)
    ) || matches!(e, Error::Server(s) if s.code == code::SERVER_SHUTDOWN || s.code == code::CONNECTION_KILLED)
}

/// A mysql_async error: server errors as their message, code and SQLSTATE.
/// None of these parts carries the password or the connection settings.
pub(super) fn describe(e: &Error) -> String {
    match e {
        Error::Server(s) => format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state),
        Error::Driver(DriverError::UnexpectedPacket { .. }) => {
            "unexpected packet from the server".into()
        }
        Error::Driver(DriverError::FromValue { .. }) => "a value of an unexpected type".into(),
        Error::Driver(DriverError::FromRow { .. }) => "a row of an unexpected shape".into(),
        Error::Driver(d) => d.to_string(),
        Error::Io(io) => {
            let mut text = io.to_string();
            let mut source = std::error::Error::source(io);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
        Error::Other(o) => o.to_string(),
        Error::Url(_) => "invalid connection settings".into(),
    }
}

/// Maps a mysql_async error to what a caller can act on.
pub(super) fn map_error(e: &Error, target: &str) -> StoreError {
    let Error::Server(s) = e else {
        return if is_host_trouble(e) || matches!(e, Error::Driver(DriverError::PoolDisconnected)) {
            StoreError::unavailable(format!(
                "lost the connection to MySQL/MariaDB at {target}: {}; retry",
                describe(e)
            ))
        } else {
            StoreError::Internal(format!("MySQL/MariaDB client error: {}", describe(e)))
        };
    };
    match s.code {
        code::TABLE_ACCESS_DENIED
        | code::COLUMN_ACCESS_DENIED
        | code::DB_ACCESS_DENIED
        | code::SPECIFIC_ACCESS_DENIED => StoreError::PermissionDenied(format!(
            "the database account may not do this: {}; grant it with `docsidecar migrate --grant-to`",
            describe(e)
        )),
        code::DISK_FULL | code::RECORD_FILE_FULL => StoreError::DiskFull(format!(
            "MySQL/MariaDB at {target} has no room left: {}",
            describe(e)
        )),
        code::LOCK_DEADLOCK | code::LOCK_WAIT_TIMEOUT => StoreError::unavailable(format!(
            "the operation conflicted with a concurrent transaction: {}; retry",
            describe(e)
        )),
        code::ACCESS_DENIED
        | code::BAD_DB
        | code::TOO_MANY_CONNECTIONS
        | code::TOO_MANY_USER_CONNECTIONS
        | code::QUERY_INTERRUPTED
        | code::STATEMENT_TIMEOUT
        | code::MYSQL_STATEMENT_TIMEOUT => StoreError::unavailable(format!(
            "MySQL/MariaDB at {target} cannot serve this now: {}; retry",
            describe(e)
        )),
        _ if is_host_trouble(e) => StoreError::unavailable(format!(
            "MySQL/MariaDB at {target} is unavailable: {}; retry",
            describe(e)
        )),
        _ => StoreError::Internal(format!("MySQL/MariaDB error: {}", describe(e))),
    }
}
