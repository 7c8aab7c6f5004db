//! Client authentication: bearer tokens read from files (Kubernetes Secrets),
//! re-read when they change, compared in constant time. A tower layer in front
//! of the DocumentService turns the token into the caller's [`Permissions`].
//!
//! Health and reflection stay unauthenticated: probes and grpcurl carry no token
//! and reveal no data.

use crate::background::FileWatcher;
use crate::metrics::SharedLabel;
use crate::policy::{ClientSpec, Permissions};
use crate::proto::document_service_server::SERVICE_NAME;
use crate::secret::{self, SecretError};
use crate::status::{status, Reason};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};
use tracing::{info, warn};

/// A client token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("the client token in {} is {len} bytes: tokens must be at least {MIN_TOKEN_BYTES} bytes (for example `openssl rand -hex 32`)", path.display())]
    TooShort { path: PathBuf, len: usize },
}

/// The shortest client token accepted: guessing one must be hopeless.
pub const MIN_TOKEN_BYTES: usize = 16;

struct Client {
    spec: ClientSpec,
    token: Vec<u8>,
    /// `spec.name`, as the metrics label it.
    label: SharedLabel,
}

/// The configured clients and their current tokens.
pub struct Authenticator {
    clients: RwLock<Vec<Client>>,
    /// The permissions of an unauthenticated deployment (no clients configured).
    service_permissions: Arc<Permissions>,
}

fn read_token(path: &Path) -> Result<Vec<u8>, AuthError> {
    let token = secret::read_text(path, "the client token")?.into_bytes();
    if token.len() < MIN_TOKEN_BYTES {
        return Err(AuthError::TooShort {
            path: path.to_path_buf(),
            len: token.len(),
        });
    }
    Ok(token)
}

impl Authenticator {
    /// Reads every token file once: a missing or empty one stops start-up.
    pub fn new(
        specs: Vec<ClientSpec>,
        service_permissions: Arc<Permissions>,
    ) -> Result<Authenticator, AuthError> {
        let clients = specs
            .into_iter()
            .map(|spec| {
                Ok(Client {
                    token: read_token(&spec.token_file)?,
                    label: SharedLabel::from(Arc::<str>::from(spec.name.as_str())),
                    spec,
                })
            })
            .collect::<Result<Vec<_>, AuthError>>()?;
        Ok(Authenticator {
            clients: RwLock::new(clients),
            service_permissions,
        })
    }

    pub fn enabled(&self) -> bool {
        !self
            .clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Installs rotated tokens: `contents` holds every token file, in the order
    /// of the clients. An empty file keeps its client's previous token.
    fn apply(&self, contents: &[Vec<u8>]) -> bool {
        let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
        for (client, bytes) in clients.iter_mut().zip(contents) {
            let token = bytes.trim_ascii();
            if token.len() < MIN_TOKEN_BYTES {
                warn!(file = %client.spec.token_file.display(), bytes = token.len(), min_bytes = MIN_TOKEN_BYTES, "the rotated client token is empty or too short; keeping the previous token");
            } else if token != client.token.as_slice() {
                client.token = token.to_vec();
                info!(file = %client.spec.token_file.display(), "client token rotated");
            }
        }
        true
    }

    /// Re-reads the token files whenever they change; run it in the server's tasks.
    pub fn watch(self: Arc<Self>) -> impl Future<Output = ()> + Send {
        let files = self
            .clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.spec.token_file.clone())
            .collect();
        FileWatcher::new(files).run(move |contents| {
            let this = self.clone();
            async move { this.apply(&contents) }
        })
    }

    /// The caller's permissions from its `authorization` metadata.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Permissions>, Status> {
        let clients = self.clients.read().unwrap_or_else(|e| e.into_inner());
        if clients.is_empty() {
            return Ok(self.service_permissions.clone());
        }
        let Some(header) = authorization else {
            return Err(status(
                Reason::Unauthenticated,
                "missing `authorization` metadata: send `authorization: Bearer <token>`",
            ));
        };
        let Some(presented) = strip_bearer(header) else {
            return Err(status(
                Reason::Unauthenticated,
                "the `authorization` metadata must be `Bearer <token>`",
            ));
        };
        // Compare with every token, without stopping early: no timing hint of
        // which token, or how much of one, matched.
        let mut found = None;
        for client in clients.iter() {
            if bool::from(client.token.as_slice().ct_eq(presented)) && found.is_none() {
                found = Some(client);
            }
        }
        if let Some(client) = found {
            crate::telemetry::record_client(&client.label);
        }
        found.map(|c| c.spec.permissions.clone()).ok_or_else(|| {
            status(
                Reason::Unauthenticated,
                "the bearer token is not valid for this sidecar",
            )
        })
    }
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Tower layer that authenticates DocumentService calls; see [`Authenticator`].
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let guarded = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(SERVICE_NAME))
            .is_some_and(|rest| rest.starts_with('/'));
        if guarded {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            match self.auth.authenticate(header) {
                Ok(permissions) => {
                    request.extensions_mut().insert(permissions);
                }
                Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Access, Need, Rights, Rows};
    use proptest::prelude::*;
    use tonic::Code;

    fn authenticator(dir: &Path, tokens: &[&str]) -> Authenticator {
        let specs = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let path = dir.join(format!("token{i}"));
                std::fs::write(&path, format!("{t}\n")).unwrap();
                let access = if i == 0 {
                    Access::ReadWrite
                } else {
                    Access::ReadOnly
                };
                let rights = Rights {
                    access,
                    rows: Rows::Unscoped,
                    protected: Default::default(),
                };
                ClientSpec {
                    name: format!("client{i}"),
                    token_file: path,
                    permissions: Arc::new(Permissions::of([("a".to_string(), rights)].into())),
                }
            })
            .collect();
        Authenticator::new(specs, Arc::new(Permissions::open())).unwrap()
    }

    #[test]
    fn tokens_select_their_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), &["writer-token-0123", "reader-token-0123"]);
        let writer = auth
            .authenticate(Some(b"Bearer writer-token-0123"))
            .unwrap();
        assert!(writer.check("a", Need::Write).is_ok());
        let reader = auth
            .authenticate(Some(b"bearer reader-token-0123"))
            .unwrap();
        assert!(reader.check("a", Need::Write).is_err());
        for bad in [
            None,
            Some(&b"Bearer nope"[..]),
            Some(b"writer-token-0123"),
            Some(b"Basic d3JpdGVy"),
            Some(b"Bearer "),
        ] {
            assert_eq!(
                auth.authenticate(bad).unwrap_err().code(),
                Code::Unauthenticated
            );
        }
    }

    impl Authenticator {
        /// Re-reads every token file now, as the watcher does on a change.
        fn reload(&self) {
            let files: Vec<_> = self
                .clients
                .read()
                .unwrap()
                .iter()
                .map(|c| std::fs::read(&c.spec.token_file).unwrap_or_default())
                .collect();
            self.apply(&files);
        }
    }

    #[test]
    fn rotation_replaces_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), &["old-token-0123456"]);
        std::fs::write(dir.path().join("token0"), "new-token-0123456").unwrap();
        auth.reload();
        assert!(auth
            .authenticate(Some(b"Bearer old-token-0123456"))
            .is_err());
        assert!(auth.authenticate(Some(b"Bearer new-token-0123456")).is_ok());
        // A rotation to a token too short to be safe keeps the last good one.
        std::fs::write(dir.path().join("token0"), "short").unwrap();
        auth.reload();
        assert!(auth.authenticate(Some(b"Bearer new-token-0123456")).is_ok());
        assert!(auth.authenticate(Some(b"Bearer short")).is_err());
        // An unreadable file keeps the last good token.
        std::fs::remove_file(dir.path().join("token0")).unwrap();
        auth.reload();
        assert!(auth.authenticate(Some(b"Bearer new-token-0123456")).is_ok());
    }

    #[test]
    fn short_tokens_are_refused_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "12345\n").unwrap();
        let spec = ClientSpec {
            name: "t".into(),
            token_file: path,
            permissions: Arc::new(Permissions::open()),
        };
        let err = Authenticator::new(vec![spec], Arc::new(Permissions::open()))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("5 bytes") && err.contains("at least 16"),
            "{err}"
        );
        assert!(
            !err.contains("12345"),
            "the token itself is never shown: {err}"
        );
    }

    #[test]
    fn no_clients_means_the_service_permissions() {
        let auth = Authenticator::new(vec![], Arc::new(Permissions::open())).unwrap();
        assert!(!auth.enabled());
        assert_eq!(*auth.authenticate(None).unwrap(), Permissions::open());
    }

    proptest! {
        #[test]
        fn only_the_exact_token_passes(presented in "\\PC{0,40}") {
            let dir = tempfile::tempdir().unwrap();
            let auth = authenticator(dir.path(), &["s3cret-token-0123"]);
            let header = format!("Bearer {presented}");
            let ok = auth.authenticate(Some(header.as_bytes())).is_ok();
            prop_assert_eq!(ok, presented.trim_ascii() == "s3cret-token-0123");
        }
    }
}
