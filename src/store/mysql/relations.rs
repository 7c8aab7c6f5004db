//! Which relation each statement of the serving sidecar uses: a
//! collection's table when this account may see it, else the view of the
//! request's scope that `migrate` confined it to (see `scopes`), and the
//! change feed's table or this account's view of it. What the account may
//! see is loaded once and again after a statement was refused: a `migrate`
//! that moved the account to views is followed at the next call (a refused
//! call is run once more when the relations changed under it).

use super::error::OpError;
use super::scopes::{is_plain, view_name, FEED};
use super::MysqlStore;
use crate::store::{StoreError, StoreResult};
use mysql_async::prelude::*;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, RwLock};

/// The tables and views the serving account may see, loaded on first use
/// and again after a statement was refused (a `migrate` changed the grants).
#[derive(Default)]
pub(super) struct Relations {
    visible: RwLock<Option<Arc<BTreeSet<String>>>>,
}

impl Relations {
    /// Forgets what was loaded: the next statement looks again.
    pub(super) fn invalidate(&self) {
        *self.visible.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn get(&self) -> Option<Arc<BTreeSet<String>>> {
        self.visible
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, visible: Arc<BTreeSet<String>>) {
        *self.visible.write().unwrap_or_else(|e| e.into_inner()) = Some(visible);
    }
}

impl MysqlStore {
    /// The tables and views this account may see (information_schema lists
    /// only those it holds a privilege on).
    async fn visible(&self) -> StoreResult<Arc<BTreeSet<String>>> {
        if let Some(visible) = self.relations.get() {
            return Ok(visible);
        }
        let mut c = self.pools.acquire().await?;
        let result = c
            .conn()
            .query::<Vec<u8>, _>(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
            )
            .await
            .map_err(OpError::from);
        c.done(&result);
        let visible: BTreeSet<String> = result
            .map_err(|e| e.resolve(&self.target))?
            .into_iter()
            .filter_map(|n| String::from_utf8(n).ok())
            .collect();
        let visible = Arc::new(visible);
        self.relations.set(visible.clone());
        Ok(visible)
    }

    /// Runs `op`, once more when it was refused and what this account may
    /// see changed meanwhile (a refused call applied nothing).
    pub(super) async fn retried<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: Fn() -> Fut + Send + Sync,
        Fut: Future<Output = StoreResult<T>> + Send,
        T: Send,
    {
        let before = self.visible().await?;
        match op().await {
            Err(StoreError::PermissionDenied(message)) => {
                if self.visible().await? != before {
                    return op().await;
                }
                Err(StoreError::PermissionDenied(message))
            }
            other => other,
        }
    }

    /// Notes a refused statement: the grants may have changed.
    pub(super) fn refused(&self, e: &OpError) {
        if e.is_permission_denied() {
            self.relations.invalidate();
        }
    }

    /// What the DML of one scope of a collection reads and writes, quoted:
    /// its table when this account may see it, else the scope's view
    /// (`migrate` confines a scoped account to it), else the table.
    pub(super) async fn relation(&self, collection: &str, scope: &str) -> StoreResult<String> {
        let table = super::ddl::table(collection)?;
        let visible = self.visible().await?;
        if visible.contains(collection) {
            return Ok(table);
        }
        match view_name(collection, scope) {
            Some(view) if visible.contains(&view) => Ok(format!("`{view}`")),
            _ => Ok(table),
        }
    }

    /// Every relation of a collection this account writes (the reaper's):
    /// its table, or the views of its scopes.
    pub(super) async fn relations_of(&self, collection: &str) -> StoreResult<Vec<String>> {
        let table = super::ddl::table(collection)?;
        let visible = self.visible().await?;
        if visible.contains(collection) {
            return Ok(vec![table]);
        }
        let views: Vec<String> = visible
            .iter()
            .filter(|v| {
                is_plain(v)
                    && v.split_once('$')
                        .is_some_and(|(base, _)| base == collection)
            })
            .map(|v| format!("`{v}`"))
            .collect();
        Ok(if views.is_empty() { vec![table] } else { views })
    }

    /// The change feed this account reads and writes: `_changes`, or the
    /// view `migrate` confines it to.
    pub(super) async fn feed_relation(&self) -> StoreResult<String> {
        let visible = self.visible().await?;
        if visible.contains(FEED) {
            return Ok(format!("`{FEED}`"));
        }
        Ok(visible
            .iter()
            .find(|v| is_plain(v) && v.split_once('$').is_some_and(|(base, _)| base == FEED))
            .map_or_else(|| format!("`{FEED}`"), |v| format!("`{v}`")))
    }
}
