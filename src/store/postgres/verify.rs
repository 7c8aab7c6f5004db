//! The start-up check of a policy's collections: each has its table, and the
//! runtime role holds the privileges its access needs. Without it a missing
//! `docsidecar migrate` shows up as the first call's PERMISSION_DENIED.

use super::ddl::Tables;
use crate::store::{Grant, StoreError};
use deadpool_postgres::GenericClient;
use std::collections::BTreeMap;

/// What the database says about the declared collections.
#[derive(Debug, Default)]
pub(super) struct Verified {
    /// The database role the store connects as.
    role: String,
    /// Collections whose table exists.
    pub(super) present: Vec<String>,
    /// Collections without a table.
    missing_tables: Vec<String>,
    /// Collections whose table the role may not use as declared, with the
    /// privileges it lacks.
    missing_privileges: Vec<(String, Vec<&'static str>)>,
    /// The schema exists but the role may not use it (no USAGE).
    no_schema_usage: bool,
    /// Whether a missing table is made on the first write (development).
    auto_create: bool,
}

/// Looks up the tables of `declared` and the privileges of the current role
/// on them, in one statement.
pub(super) async fn declared(
    client: &impl GenericClient,
    tables: &Tables,
    declared: &BTreeMap<String, Grant>,
    auto_create: bool,
) -> Result<Verified, tokio_postgres::Error> {
    let names: Vec<&str> = declared.keys().map(String::as_str).collect();
    let no_schema_usage: bool = client
        .query_one(
            "SELECT coalesce(NOT has_schema_privilege(n.oid, 'USAGE'), false)
             FROM (SELECT 1) AS one
             LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = $1",
            &[&tables.schema],
        )
        .await?
        .try_get(0)?;
    let rows = client
        .query(
            "SELECT d.name, c.oid IS NOT NULL, current_user::text,
                    coalesce(has_table_privilege(c.oid, 'SELECT'), false),
                    coalesce(has_table_privilege(c.oid, 'INSERT'), false),
                    coalesce(has_table_privilege(c.oid, 'UPDATE'), false),
                    coalesce(has_table_privilege(c.oid, 'DELETE'), false)
             FROM unnest($2::text[]) AS d(name)
             LEFT JOIN pg_catalog.pg_class c
               ON c.relname = d.name AND c.relkind IN ('r', 'p')
              AND c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
             ORDER BY d.name",
            &[&tables.schema, &names],
        )
        .await?;
    let mut verified = Verified {
        auto_create,
        no_schema_usage,
        ..Verified::default()
    };
    for row in rows {
        let name: String = row.try_get(0)?;
        verified.role = row.try_get(2)?;
        if !row.try_get::<_, bool>(1)? {
            verified.missing_tables.push(name);
            continue;
        }
        let held = [
            ("SELECT", row.try_get::<_, bool>(3)?),
            ("INSERT", row.try_get(4)?),
            ("UPDATE", row.try_get(5)?),
            ("DELETE", row.try_get(6)?),
        ];
        let lacking: Vec<&'static str> = declared[&name]
            .privileges()
            .iter()
            .filter(|p| held.iter().any(|(name, has)| name == *p && !has))
            .copied()
            .collect();
        if !lacking.is_empty() {
            verified.missing_privileges.push((name.clone(), lacking));
        }
        verified.present.push(name);
    }
    // The schema's own objects every write touches (the change feed); absent
    // ones are the schema version check's to report.
    let (objects, privileges): (Vec<&str>, Vec<&str>) = super::feed::RUNTIME_PRIVILEGES
        .iter()
        .flat_map(|(object, privileges)| privileges.iter().map(move |p| (*object, *p)))
        .unzip();
    let rows = client
        .query(
            "SELECT o.name, o.privilege,
                    CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, o.privilege)
                         ELSE has_table_privilege(c.oid, o.privilege) END
             FROM unnest($2::text[], $3::text[]) AS o(name, privilege)
             JOIN pg_catalog.pg_class c ON c.relname = o.name
              AND c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            &[&tables.schema, &objects, &privileges],
        )
        .await?;
    for row in rows {
        if !row.try_get::<_, bool>(2)? {
            let (object, privilege): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let privilege = privileges
                .iter()
                .copied()
                .find(|p| *p == privilege)
                .unwrap_or("ALL");
            match verified
                .missing_privileges
                .iter_mut()
                .find(|(o, _)| *o == object)
            {
                Some((_, lacking)) => lacking.push(privilege),
                None => verified.missing_privileges.push((object, vec![privilege])),
            }
        }
    }
    Ok(verified)
}

impl Verified {
    /// Why the store cannot serve the declared collections, if it cannot.
    pub(super) fn problem(&self, schema: &str) -> Option<StoreError> {
        let mut problems = Vec::new();
        if !self.missing_tables.is_empty() && !self.auto_create {
            problems.push(format!(
                "the policy declares {} but schema `{schema}` has no table for {}: run `docsidecar migrate` with the admin account (it creates them and grants the runtime role)",
                list(&self.missing_tables),
                if self.missing_tables.len() == 1 { "it" } else { "them" },
            ));
        }
        if !self.missing_privileges.is_empty() || self.no_schema_usage {
            let mut lacking: Vec<String> = self
                .missing_privileges
                .iter()
                .map(|(table, privileges)| format!("{} on `{table}`", privileges.join(", ")))
                .collect();
            if self.no_schema_usage {
                lacking.insert(0, format!("USAGE on schema `{schema}`"));
            }
            problems.push(format!(
                "the database role `{}` lacks {} that the policy's access needs: run `docsidecar migrate --grant-to {}`",
                self.role,
                lacking.join("; "),
                self.role
            ));
        }
        if problems.is_empty() {
            None
        } else if !self.missing_tables.is_empty() && !self.auto_create {
            Some(StoreError::table_missing(problems.join("; ")))
        } else {
            Some(StoreError::PermissionDenied(problems.join("; ")))
        }
    }
}

fn list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.len() {
        1 => format!("collection {}", quoted[0]),
        _ => format!("collections {}", quoted.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_the_collections_and_the_fix() {
        let verified = Verified {
            role: "app".into(),
            present: vec!["orders".into()],
            missing_tables: vec!["audit".into(), "carts".into()],
            missing_privileges: vec![("orders".into(), vec!["INSERT", "DELETE"])],
            no_schema_usage: true,
            auto_create: false,
        };
        let message = verified.problem("docsidecar").unwrap().to_string();
        assert!(
            message.contains("collections `audit`, `carts`"),
            "{message}"
        );
        assert!(message.contains("run `docsidecar migrate`"), "{message}");
        assert!(message.contains("INSERT, DELETE on `orders`"), "{message}");
        assert!(
            message.contains("USAGE on schema `docsidecar`"),
            "{message}"
        );
        assert!(message.contains("--grant-to app"), "{message}");

        // Development: missing tables appear on the first write.
        let dev = Verified {
            missing_tables: vec!["audit".into()],
            auto_create: true,
            ..Verified::default()
        };
        assert!(dev.problem("docsidecar").is_none());
    }
}
