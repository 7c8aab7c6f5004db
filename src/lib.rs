//! docsidecar: a gRPC data-access sidecar for JSON documents.
//!
//! The application talks gRPC (`docsidecar.v1.DocumentService`) to the sidecar
//! beside it; the sidecar owns the database connections and credentials and
//! forwards each call to the configured store.
//!
//! # Layout
//!
//! - [`config`]: the command line and environment, one typed struct (clap),
//!   resolved once into what the lower layers take ([`store::Target`]).
//! - [`commands`]: the command line's verbs (serve, migrate, wait, shutdown, check).
//! - [`server`]: start-up, wiring of the gRPC services, graceful shutdown.
//! - [`transport`]: the gRPC port: accepting connections within limits, HTTP/2
//!   with timeouts, the drain; [`limits`]: oversized requests as statuses.
//! - [`admin`]: the HTTP admin listener: probes, metrics, shutdown requests.
//! - [`reaper`]: deletes expired documents in the background.
//! - [`background`]: the server's background tasks (one owner, one way to
//!   stop), the file watcher for rotated secrets, start-up retries.
//! - [`api`]: the gRPC layer: validates requests, converts protobuf to store
//!   types and maps every error to a `tonic::Status` in one place. No SQL.
//! - [`policy`] and [`auth`]: which collections the service and each client
//!   may touch, and the layer that authenticates bearer tokens.
//! - [`store`]: the [`store::DocumentStore`] trait and one module per backend
//!   (memory, SQLite, PostgreSQL, MySQL/MariaDB). No tonic.
//! - [`tls`]: optional TLS and mutual TLS, certificates reloaded on change.
//! - [`telemetry`]: logging setup, the per-request layer, OpenTelemetry
//!   tracing (off unless `OTEL_EXPORTER_OTLP_ENDPOINT`); [`metrics`]: every
//!   metric's name, declared once, and the bounded label values.
//! - [`secret`]: secrets mounted as files; [`quote`]: untrusted input in messages.
//! - [`status`]: gRPC statuses with the standard error details, for every layer.
//! - [`deadline`]: the layer that answers DEADLINE_EXCEEDED when a client's
//!   deadline passes.
//! - [`proto`]: the generated protobuf types, server and client; [`wire`]: their
//!   `Struct` fields, which encode documents straight from stored JSON.

pub mod admin;
pub mod api;
pub mod auth;
pub mod background;
pub mod codec;
pub mod commands;
pub mod config;
pub mod deadline;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod quote;
pub mod reaper;
pub mod secret;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;
pub mod x509;

/// Generated protobuf types, the `DocumentService` server and its client.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("docsidecar.v1");

    pub use crate::wire::Data;

    /// Encoded file descriptor set of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("docsidecar_descriptor");
}

pub use proto::document_service_client::DocumentServiceClient;
