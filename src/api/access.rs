//! Authorization of each request against the caller's permissions (see
//! `crate::policy`): the collection and access, the row scope a request may
//! touch, the protected fields. The auth layer put the permissions in the
//! request; handlers ask here before the store is touched.

use super::ApiError;
use crate::policy::{Denied, DenyKind, Need, Permissions, Rights, ScopeError};
use crate::store::{DocumentStore, Key, Mutation, Protected, Protection, Scopes, StoreError};
use std::sync::Arc;

/// The caller of one request.
pub(super) struct Caller<'a> {
    pub permissions: Arc<Permissions>,
    /// Asked whether a collection has row scopes, when a multi-scope reader
    /// names none.
    pub store: &'a dyn DocumentStore,
}

fn scope_error(collection: &str, e: ScopeError) -> ApiError {
    match e {
        ScopeError::Unscoped => ApiError::invalid(
            "scope",
            format!("collection `{collection}` has no row scopes for this caller: leave scope empty"),
        ),
        ScopeError::NotOwn(own) => ApiError::PermissionDenied(Denied {
            kind: DenyKind::ScopeNotAllowed,
            message: format!(
                "this caller reaches only row scope `{own}` of collection `{collection}`: leave scope empty or name `{own}`"
            ),
        }),
        ScopeError::Required => ApiError::invalid(
            "scope",
            format!(
                "scope is required: collection `{collection}` has row scopes and this caller reads all of them; name the document's scope"
            ),
        ),
    }
}

impl Caller<'_> {
    /// The caller's rights on `collection`, if they allow `need`.
    pub fn rights(&self, collection: &str, need: Need) -> Result<&Rights, ApiError> {
        Ok(self.permissions.check(collection, need)?)
    }

    /// Authorizes a request about documents of one scope (`requested`,
    /// possibly empty): the row scope the caller may touch there, and the
    /// fields protected from it.
    pub async fn scope(
        &self,
        collection: &str,
        requested: &str,
        need: Need,
    ) -> Result<(String, Arc<Protected>), ApiError> {
        let rights = self.rights(collection, need)?;
        let scope = match rights.document_scope(requested) {
            // The empty scope is a scope too: an unscoped collection's rows.
            Err(ScopeError::Required) if !self.store.has_scopes(collection).await? => String::new(),
            scope => scope.map_err(|e| scope_error(collection, e))?,
        };
        Ok((scope, rights.protected.clone()))
    }

    /// Authorizes a request about one document: its key gets the row scope
    /// the caller may touch; the fields protected from it are returned.
    pub async fn document(&self, key: &mut Key, need: Need) -> Result<Arc<Protected>, ApiError> {
        let (scope, protected) = self.scope(&key.collection, &key.scope, need).await?;
        key.scope = scope;
        Ok(protected)
    }

    /// Authorizes one mutation of a write and gives it the caller's
    /// protected fields.
    pub async fn mutation(&self, mutation: &mut Mutation) -> Result<(), ApiError> {
        match mutation {
            Mutation::Save(op) => op.protected = self.document(&mut op.key, Need::Write).await?,
            Mutation::Update(op) => op.protected = self.document(&mut op.key, Need::Write).await?,
            Mutation::Delete(op) => {
                self.document(&mut op.key, Need::Write).await?;
            }
        }
        Ok(())
    }

    /// Authorizes a read of many documents: the scopes it walks and the
    /// fields hidden from the caller.
    pub fn read(
        &self,
        collection: &str,
        requested: &str,
    ) -> Result<(Scopes, Arc<Protected>), ApiError> {
        let rights = self.rights(collection, Need::Read)?;
        let scopes = rights
            .read_scopes(requested)
            .map_err(|e| scope_error(collection, e))?;
        Ok((scopes, rights.protected.clone()))
    }
}

/// A filter or order on a field hidden from the caller (or one holding or
/// inside such a field) would reveal it: PERMISSION_DENIED naming it.
pub(super) fn readable(
    protected: &Protected,
    field: &crate::store::FieldPath,
) -> Result<(), ApiError> {
    match protected.hidden_overlap(field) {
        Some(hidden) => Err(StoreError::Protected {
            field: hidden.to_string(),
            protection: Protection::Hidden,
        }
        .into()),
        None => Ok(()),
    }
}
