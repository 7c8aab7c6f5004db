//! Scoped access: which collections this service may touch, how, and which
//! clients may call it (`DOCSIDECAR_POLICY`, a TOML file).
//!
//! Without a policy the sidecar runs open (development): every collection, read
//! and write. With one, only the declared collections exist for callers; a client
//! token may narrow that further.

mod permissions;

pub use permissions::{Denied, DenyKind, Need, Permissions, Rights, Rows, ScopeError};

use crate::store::query::Index;
use crate::store::{is_valid_name, FieldPath, Protected, NAME_RULE};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What may be done to a collection. `ReadWrite` includes reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    ReadOnly,
    ReadWrite,
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
    /// The row scope this service reads and writes (shared collections).
    scope: Option<String>,
    /// Fields this service may not set or change.
    #[serde(default)]
    read_only_fields: Vec<String>,
    /// Fields this service never sees.
    #[serde(default)]
    hidden_fields: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    /// Names the client in metrics; the token file's name when absent.
    name: Option<String>,
    token_file: PathBuf,
    collections: Option<Vec<String>>,
    access: Option<Access>,
    /// Narrows a multi-scope reader to one row scope.
    scope: Option<String>,
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
    /// The row scope of each collection this service declares with one.
    pub scopes: BTreeMap<String, String>,
    /// Each collection's read-only and hidden fields (absent: none).
    pub protected: BTreeMap<String, Arc<Protected>>,
    pub clients: Vec<ClientSpec>,
}

/// A client authenticated by the token in a file.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Names the client in metrics (the `client` label).
    pub name: String,
    pub token_file: PathBuf,
    pub permissions: Arc<Permissions>,
}

impl ClientSpec {
    /// A client's default name: its token file's (`report-token`).
    pub fn name_of(token_file: &Path) -> String {
        token_file
            .file_name()
            .map_or_else(|| "client".into(), |n| n.to_string_lossy().into_owned())
    }
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
        let mut policy = Policy {
            service: file.service,
            // Production default: tables come from `docsidecar migrate` only.
            auto_create: file.auto_create.unwrap_or(false),
            collections: BTreeMap::new(),
            indexes: BTreeMap::new(),
            allow_scans: BTreeSet::new(),
            scopes: BTreeMap::new(),
            protected: BTreeMap::new(),
            clients: Vec::new(),
        };
        for (name, entry) in file.collections {
            let here = at(&format!("collections.{name}"));
            if !is_valid_name(&name) {
                return Err(format!(
                    "{here}collection `{name}` is not a valid name: collection {NAME_RULE}"
                ));
            }
            let fail = |e: String| format!("{here}collection `{name}`: {e}");
            if let Some(scope) = entry.scope {
                if !is_valid_name(&scope) {
                    return Err(fail(format!(
                        "scope `{scope}` is not a valid scope: scope {NAME_RULE}"
                    )));
                }
                policy.scopes.insert(name.clone(), scope);
            }
            let protected =
                protected(&entry.read_only_fields, &entry.hidden_fields).map_err(fail)?;
            let indexes = entry
                .indexes
                .iter()
                .map(|fields| Index::parse(fields))
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            for index in &indexes {
                let covered = index.fields.iter().find_map(|o| match &o.field {
                    crate::store::query::Field::Path(p) => protected.hidden_overlap(p),
                    crate::store::query::Field::Id => None,
                });
                if let Some(hidden) = covered {
                    return Err(fail(format!(
                        "index [{index}] covers hidden field `{hidden}`, which may not be queried"
                    )));
                }
            }
            if !indexes.is_empty() {
                policy.indexes.insert(name.clone(), indexes);
            }
            if entry.allow_scans {
                policy.allow_scans.insert(name.clone());
            }
            if !protected.is_empty() {
                policy.protected.insert(name.clone(), Arc::new(protected));
            }
            policy.collections.insert(name, entry.access);
        }
        let declared = policy.rights();
        // Explicit client names: each names one client.
        let mut named = BTreeMap::<String, usize>::new();
        for (i, client) in file.clients.into_iter().enumerate() {
            let mut rights = declared.clone();
            if let Some(only) = &client.collections {
                for name in only {
                    if !declared.contains_key(name) {
                        return Err(format!(
                            "{}clients[{i}] names collection `{name}`, which is not declared under [collections]",
                            at(&format!("\"{name}\""))
                        ));
                    }
                }
                rights.retain(|name, _| only.contains(name));
            }
            if let Some(limit) = client.access {
                for r in rights.values_mut() {
                    r.access = r.access.min(limit);
                }
            }
            if let Some(scope) = &client.scope {
                narrow(&mut rights, scope)
                    .map_err(|e| format!("{}clients[{i}]: {e}", at("scope = ")))?;
            }
            if let Some(name) = &client.name {
                if name.is_empty() || named.insert(name.clone(), i).is_some() {
                    return Err(format!(
                        "{}clients[{i}]: `name` must be non-empty and name one client only",
                        at("name = ")
                    ));
                }
            }
            policy.clients.push(ClientSpec {
                name: client
                    .name
                    .unwrap_or_else(|| ClientSpec::name_of(&client.token_file)),
                token_file: client.token_file,
                permissions: Arc::new(Permissions::of(rights)),
            });
        }
        // Unnamed clients whose token files share a name (`…/app/token`,
        // `…/report/token`) are told apart by the whole path.
        let mut count = BTreeMap::<String, usize>::new();
        for client in &policy.clients {
            *count.entry(client.name.clone()).or_default() += 1;
        }
        for (i, client) in policy.clients.iter_mut().enumerate() {
            if count[&client.name] > 1 && !named.values().any(|&n| n == i) {
                client.name = client.token_file.display().to_string();
            }
        }
        Ok(policy)
    }

    /// Each declared collection's rights for this service.
    fn rights(&self) -> BTreeMap<String, Rights> {
        self.collections
            .iter()
            .map(|(name, &access)| {
                let rows = match (self.scopes.get(name), access) {
                    (Some(scope), _) => Rows::Scope(scope.clone()),
                    (None, Access::ReadOnly) => Rows::Every,
                    (None, Access::ReadWrite) => Rows::Unscoped,
                };
                let protected = self.protected.get(name).cloned().unwrap_or_default();
                (
                    name.clone(),
                    Rights {
                        access,
                        rows,
                        protected,
                    },
                )
            })
            .collect()
    }

    /// The service's own permissions: every declared collection.
    pub fn permissions(&self) -> Permissions {
        Permissions::of(self.rights())
    }
}

/// The protected fields of one collection, checked.
fn protected(read_only: &[String], hidden: &[String]) -> Result<Protected, String> {
    let parse = |list: &[String], what: &str| {
        list.iter()
            .map(|text| {
                let path = FieldPath::parse(text).map_err(|e| format!("{what} `{text}`: {e}"))?;
                if path.is_id() {
                    return Err(format!("{what}: `__id__` is the document id, not a field"));
                }
                Ok(path)
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let protected = Protected {
        read_only: parse(read_only, "read_only_fields")?,
        hidden: parse(hidden, "hidden_fields")?,
    };
    if let Some(both) = protected
        .read_only
        .iter()
        .find(|p| protected.hidden.contains(p))
    {
        return Err(format!(
            "field `{both}` is both read-only and hidden: list it once"
        ));
    }
    Ok(protected)
}

/// Narrows a client to one row scope: the collections its service reads
/// across scopes become that scope's; a scoped one must be that scope.
fn narrow(rights: &mut BTreeMap<String, Rights>, scope: &str) -> Result<(), String> {
    if !is_valid_name(scope) {
        return Err(format!(
            "scope `{scope}` is not a valid scope: scope {NAME_RULE}"
        ));
    }
    let mut narrowed = false;
    for (name, r) in rights.iter_mut() {
        match &r.rows {
            Rows::Every => {
                r.rows = Rows::Scope(scope.to_string());
                narrowed = true;
            }
            Rows::Scope(own) if own == scope => narrowed = true,
            Rows::Scope(own) => {
                return Err(format!(
                    "scope `{scope}` contradicts collection `{name}`, which this service reaches in scope `{own}` only"
                ))
            }
            Rows::Unscoped => {}
        }
    }
    if !narrowed {
        return Err(format!(
            "scope `{scope}` narrows nothing: none of its collections is read across scopes (read-only without a scope)"
        ));
    }
    Ok(())
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
    fn clients_are_named_by_name_else_by_token_file() {
        let p = Policy::parse(
            r#"service = "x"
[collections.a]
access = "read-write"
[[clients]]
name = "app"
token_file = "/s/app/token"
[[clients]]
token_file = "/s/report-token"
[[clients]]
token_file = "/s/one/token"
[[clients]]
token_file = "/s/two/token"
[[clients]]
token_file = "/s/x/app"
"#,
        )
        .unwrap();
        let names: Vec<&str> = p.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "app",
                "report-token",
                "/s/one/token",
                "/s/two/token",
                "/s/x/app"
            ]
        );
        let twice = "service = \"x\"\n[[clients]]\nname = \"a\"\ntoken_file = \"/t\"\n[[clients]]\nname = \"a\"\ntoken_file = \"/u\"\n";
        let err = Policy::parse(twice).unwrap_err();
        assert!(err.contains("clients[1]") && err.contains("name"), "{err}");
    }

    #[test]
    fn parses_the_contract_example() {
        let p = Policy::parse(EXAMPLE).unwrap();
        assert_eq!(p.service, "backend-api");
        assert!(!p.auto_create);
        assert_eq!(p.collections["agents"], Access::ReadWrite);
        assert_eq!(p.collections["reports"], Access::ReadOnly);
        let app = &p.clients[0].permissions;
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
        let reporting = &p.clients[1].permissions;
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
    fn open_permissions_allow_everything() {
        let open = Permissions::open();
        let rights = open.check("anything", Need::Write).unwrap();
        assert_eq!(rights.rows, Rows::Unscoped);
        assert!(rights.protected.is_empty());
        assert_eq!(open.collections(), None);
    }

    const SHARED: &str = r#"
service = "twitch-bot"

[collections.platform_integrations]
access = "read-write"
scope = "twitch"
read_only_fields = ["status"]
hidden_fields = ["credentials.token"]

[collections.audit]
access = "read-only"

[collections.notes]
access = "read-write"

[[clients]]
token_file = "/t/app"

[[clients]]
token_file = "/t/auditor"
collections = ["audit"]
scope = "discord"
"#;

    #[test]
    fn row_scopes_and_protected_fields() {
        let p = Policy::parse(SHARED).unwrap();
        assert_eq!(p.scopes["platform_integrations"], "twitch");
        let protected = &p.protected["platform_integrations"];
        assert_eq!(protected.read_only[0].to_string(), "status");
        assert_eq!(protected.hidden[0].to_string(), "credentials.token");
        let service = p.permissions();
        let rows = |perms: &Permissions, c: &str| perms.check(c, Need::Read).unwrap().rows.clone();
        assert_eq!(
            rows(&service, "platform_integrations"),
            Rows::Scope("twitch".into())
        );
        assert_eq!(rows(&service, "audit"), Rows::Every);
        assert_eq!(rows(&service, "notes"), Rows::Unscoped);
        // A client narrowed to one scope reads that scope only.
        let auditor = &p.clients[1].permissions;
        assert_eq!(rows(auditor, "audit"), Rows::Scope("discord".into()));
        assert!(auditor.check("notes", Need::Read).is_err());
    }

    #[test]
    fn scope_and_field_mistakes_are_refused() {
        let cases = [
            ("[collections.a]\naccess = \"read-write\"\nscope = \"Twitch!\"\n", "not a valid scope"),
            ("[collections.a]\naccess = \"read-write\"\nhidden_fields = [\"a..b\"]\n", "hidden_fields"),
            ("[collections.a]\naccess = \"read-write\"\nread_only_fields = [\"__id__\"]\n", "document id"),
            ("[collections.a]\naccess = \"read-write\"\nread_only_fields = [\"x\"]\nhidden_fields = [\"x\"]\n", "both read-only and hidden"),
            ("[collections.a]\naccess = \"read-write\"\nhidden_fields = [\"s.t\"]\nindexes = [[\"s\"]]\n", "covers hidden field"),
            ("[collections.a]\naccess = \"read-write\"\n[[clients]]\ntoken_file = \"/t\"\nscope = \"x\"\n", "narrows nothing"),
            ("[collections.a]\naccess = \"read-only\"\nscope = \"y\"\n[[clients]]\ntoken_file = \"/t\"\nscope = \"x\"\n", "contradicts"),
        ];
        for (body, expected) in cases {
            let text = format!("service = \"s\"\n{body}");
            let err = Policy::parse(&text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.starts_with("line "), "{err}");
        }
    }
}
