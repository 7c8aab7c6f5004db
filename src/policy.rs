//! Scoped access: which collections this service may touch, how, and which
//! clients may call it (`DOCSIDECAR_POLICY`, a TOML file).
//!
//! Without a policy the sidecar runs open (development): every collection, read
//! and write. With one, only the declared collections exist for callers; a client
//! token may narrow that further.

use crate::store::query::Index;
use crate::store::{is_valid_name, NAME_RULE};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What may be done to a collection. `ReadWrite` includes reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    service: String,
    #[serde(default)]
    auto_create: Option<bool>,
    #[serde(default)]
    collections: BTreeMap<String, CollectionEntry>,
    #[serde(default)]
    clients: Vec<ClientEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectionEntry {
    access: Access,
    /// Query indexes: each a list of fields, `"field"` or `"field desc"`.
    #[serde(default)]
    indexes: Vec<Vec<String>>,
    /// Queries no declared index serves run anyway, as scans.
    #[serde(default)]
    allow_scans: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    token_file: PathBuf,
    collections: Option<Vec<String>>,
    access: Option<Access>,
}

/// A loaded, checked policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Names this service in logs.
    pub service: String,
    /// Whether the sidecar may create collections' tables itself (development).
    pub auto_create: bool,
    /// The declared collections and their access.
    pub collections: BTreeMap<String, Access>,
    /// Each collection's declared query indexes.
    pub indexes: BTreeMap<String, Vec<Index>>,
    /// The collections whose queries may scan.
    pub allow_scans: BTreeSet<String>,
    pub clients: Vec<ClientSpec>,
}

/// A client authenticated by the token in a file.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub token_file: PathBuf,
    pub scope: Scope,
}

/// What a caller may touch: `None` is the open (no policy) scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    collections: Option<BTreeMap<String, Access>>,
}

/// Why a call is outside the caller's scope.
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

impl Scope {
    /// Everything: the development default without a policy.
    pub fn open() -> Scope {
        Scope { collections: None }
    }

    pub fn of(collections: BTreeMap<String, Access>) -> Scope {
        Scope {
            collections: Some(collections),
        }
    }

    /// Allows or refuses `need` on `collection`, before any database work.
    pub fn check(&self, collection: &str, need: Need) -> Result<(), Denied> {
        let Some(collections) = &self.collections else {
            return Ok(());
        };
        match (collections.get(collection), need) {
            (None, _) => Err(Denied {
                kind: DenyKind::CollectionNotAllowed,
                message: format!(
                    "collection `{collection}` is not in this caller's scope (allowed: {})",
                    names(collections)
                ),
            }),
            (Some(Access::ReadOnly), Need::Write) => Err(Denied {
                kind: DenyKind::CollectionReadOnly,
                message: format!("collection `{collection}` is read-only for this caller"),
            }),
            (Some(_), _) => Ok(()),
        }
    }

    /// The declared collections this scope may read, sorted; `None` when open.
    pub fn collections(&self) -> Option<Vec<String>> {
        self.collections
            .as_ref()
            .map(|c| c.keys().cloned().collect())
    }
}

fn names(collections: &BTreeMap<String, Access>) -> String {
    if collections.is_empty() {
        return "none".into();
    }
    collections
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A policy file that cannot be used; the message points at the line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The policy at `path`, if one is configured; without one the sidecar runs
/// open, which is for development only (said once, at start-up).
pub fn load(path: Option<&Path>) -> Result<Option<Policy>, PolicyError> {
    let Some(path) = path else {
        tracing::warn!("no policy (DOCSIDECAR_POLICY): running open, every collection readable and writable; development only");
        return Ok(None);
    };
    let policy = Policy::load(path)?;
    tracing::info!(
        service = %policy.service,
        collections = policy.collections.len(),
        clients = policy.clients.len(),
        auto_create = policy.auto_create,
        "policy loaded"
    );
    Ok(Some(policy))
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and checks a policy; errors carry the line and column.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        let at = |needle: &str| {
            text.lines()
                .position(|l| l.contains(needle))
                .map_or(String::new(), |i| format!("line {}: ", i + 1))
        };
        if file.service.trim().is_empty() {
            return Err(format!("{}`service` must name this service", at("service")));
        }
        for name in file.collections.keys() {
            if !is_valid_name(name) {
                return Err(format!(
                    "{}collection `{name}` is not a valid name: collection {NAME_RULE}",
                    at(&format!("collections.{name}"))
                ));
            }
        }
        let mut indexes = BTreeMap::new();
        let mut allow_scans = BTreeSet::new();
        for (name, entry) in &file.collections {
            let parsed = entry
                .indexes
                .iter()
                .map(|fields| Index::parse(fields))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!(
                        "{}collection `{name}`: {e}",
                        at(&format!("collections.{name}"))
                    )
                })?;
            if !parsed.is_empty() {
                indexes.insert(name.clone(), parsed);
            }
            if entry.allow_scans {
                allow_scans.insert(name.clone());
            }
        }
        let declared: BTreeMap<String, Access> = file
            .collections
            .into_iter()
            .map(|(k, v)| (k, v.access))
            .collect();
        let mut clients = Vec::with_capacity(file.clients.len());
        for (i, client) in file.clients.into_iter().enumerate() {
            let mut scope = declared.clone();
            if let Some(only) = &client.collections {
                for name in only {
                    if !declared.contains_key(name) {
                        return Err(format!(
                            "{}clients[{i}] names collection `{name}`, which is not declared under [collections]",
                            at(&format!("\"{name}\""))
                        ));
                    }
                }
                scope.retain(|name, _| only.contains(name));
            }
            if let Some(limit) = client.access {
                for access in scope.values_mut() {
                    *access = (*access).min(limit);
                }
            }
            clients.push(ClientSpec {
                token_file: client.token_file,
                scope: Scope::of(scope),
            });
        }
        Ok(Policy {
            service: file.service,
            // Production default: tables come from `docsidecar migrate` only.
            auto_create: file.auto_create.unwrap_or(false),
            collections: declared,
            indexes,
            allow_scans,
            clients,
        })
    }

    /// The service's own scope: every declared collection.
    pub fn scope(&self) -> Scope {
        Scope::of(self.collections.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
service = "backend-api"
auto_create = false

[collections.agents]
access = "read-write"

[collections.reports]
access = "read-only"

[[clients]]
token_file = "/var/run/secrets/app-token"

[[clients]]
token_file = "/var/run/secrets/reporting-token"
collections = ["agents"]
access = "read-only"
"#;

    #[test]
    fn parses_the_contract_example() {
        let p = Policy::parse(EXAMPLE).unwrap();
        assert_eq!(p.service, "backend-api");
        assert!(!p.auto_create);
        assert_eq!(p.collections["agents"], Access::ReadWrite);
        assert_eq!(p.collections["reports"], Access::ReadOnly);
        let app = &p.clients[0].scope;
        assert!(app.check("agents", Need::Write).is_ok());
        assert!(app.check("reports", Need::Read).is_ok());
        assert!(app
            .check("reports", Need::Write)
            .unwrap_err()
            .message
            .contains("read-only"));
        assert!(app
            .check("other", Need::Read)
            .unwrap_err()
            .message
            .contains("not in this caller's scope"));
        let reporting = &p.clients[1].scope;
        assert!(reporting.check("agents", Need::Read).is_ok());
        assert!(reporting.check("agents", Need::Write).is_err());
        assert!(reporting.check("reports", Need::Read).is_err());
        assert_eq!(reporting.collections(), Some(vec!["agents".to_string()]));
    }

    #[test]
    fn errors_point_at_the_line() {
        let cases = [
            (
                "service = \"x\"\n[collections.a]\naccess = \"write-only\"\n",
                "line 3",
            ),
            (
                "service = \"x\"\n\n[collections.Bad]\naccess = \"read-only\"\n",
                "line 3",
            ),
            ("service = \"x\"\nunknown = 1\n", "line 2"),
            (
                "service = \"x\"\n[[clients]]\ntoken_file = \"/t\"\ncollections = [\"nope\"]\n",
                "line 4",
            ),
            ("[collections.a]\naccess = \"read-only\"\n", "service"),
            ("service = \n", "line 1"),
        ];
        for (text, expected) in cases {
            let err = Policy::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn open_scope_allows_everything() {
        assert!(Scope::open().check("anything", Need::Write).is_ok());
        assert_eq!(Scope::open().collections(), None);
    }
}
