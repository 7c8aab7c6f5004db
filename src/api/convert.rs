//! Protobuf to store types and back. Each request is destructured in full, so
//! a new field breaks the build here instead of being ignored.

use super::{json, validate, ApiError, Limits};
use crate::policy::{Need, Scope};
use crate::proto::{self, mutation::Op};
use crate::store::{self, Micros, StoreError};
use prost_types::Timestamp;

/// A request as the API accepts it: the collection it names (for the log span,
/// before anything is checked) and its validated form.
pub(super) trait Accept: Sized {
    type Valid;

    fn collection(&self) -> &str;

    fn accept(self, limits: &Limits) -> Result<Self::Valid, ApiError>;
}

/// A validated point read.
pub(super) struct Get {
    pub collection: String,
    pub id: String,
}

impl Accept for proto::GetRequest {
    type Valid = Get;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<Get, ApiError> {
        let proto::GetRequest {
            collection,
            id,
            scope,
        } = self;
        validate::collection(&collection)?;
        validate::id(&id, "id")?;
        validate::no_scope(&collection, &scope)?;
        Ok(Get { collection, id })
    }
}

impl Accept for proto::SaveRequest {
    type Valid = store::SaveOp;

    fn collection(&self) -> &str {
        &self.collection
    }

    /// Validates a save and turns it into a store operation (generating the id).
    fn accept(self, limits: &Limits) -> Result<store::SaveOp, ApiError> {
        let proto::SaveRequest {
            collection,
            id,
            data,
            expected_rev,
            create_only,
            scope,
            expiration,
        } = self;
        validate::collection(&collection)?;
        validate::no_scope(&collection, &scope)?;
        if expiration.is_some() {
            return Err(ApiError::unimplemented("expiry (expire_time, ttl)"));
        }
        let id = if id.is_empty() {
            store::new_id()
        } else {
            validate::id(&id, "id")?;
            id
        };
        if create_only && !expected_rev.is_empty() {
            return Err(ApiError::invalid(
                "create_only and expected_rev exclude each other: create_only requires that the document does not exist, expected_rev that it does",
            ));
        }
        let data = data.ok_or_else(|| {
            ApiError::invalid("data is required: give the document as a JSON object (Struct)")
        })?;
        json::validate(&data).map_err(ApiError::invalid)?;
        let data = json::to_json(&data);
        if data.len() > limits.max_document_bytes {
            return Err(ApiError::invalid(format!(
                "data is {} bytes as JSON, over the limit of {} bytes per document",
                data.len(),
                limits.max_document_bytes
            )));
        }
        Ok(store::SaveOp {
            collection,
            id,
            data,
            expected_rev: non_empty(expected_rev),
            create_only,
        })
    }
}

impl Accept for proto::DeleteRequest {
    type Valid = store::DeleteOp;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<store::DeleteOp, ApiError> {
        let proto::DeleteRequest {
            collection,
            id,
            expected_rev,
            allow_missing,
            scope,
        } = self;
        validate::collection(&collection)?;
        validate::id(&id, "id")?;
        validate::no_scope(&collection, &scope)?;
        if allow_missing {
            return Err(ApiError::unimplemented("allow_missing on Delete"));
        }
        Ok(store::DeleteOp {
            collection,
            id,
            expected_rev: non_empty(expected_rev),
        })
    }
}

/// A validated List call.
pub(super) struct List {
    pub collection: String,
    pub limit: usize,
    /// The last id of the previous page.
    pub after: Option<String>,
}

impl Accept for proto::ListRequest {
    type Valid = List;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<List, ApiError> {
        let proto::ListRequest {
            collection,
            page_size,
            page_token,
            scope,
        } = self;
        validate::collection(&collection)?;
        validate::no_scope(&collection, &scope)?;
        let limit = validate::page_size(page_size)?;
        let after = match page_token.as_str() {
            "" => None,
            token => {
                Some(super::page_token::decode(token, &collection).map_err(ApiError::invalid)?)
            }
        };
        Ok(List {
            collection,
            limit,
            after,
        })
    }
}

/// A validated BatchGet call.
pub(super) struct BatchGet {
    pub collection: String,
    pub ids: Vec<String>,
}

impl Accept for proto::BatchGetRequest {
    type Valid = BatchGet;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<BatchGet, ApiError> {
        let proto::BatchGetRequest {
            collection,
            ids,
            scope,
        } = self;
        validate::collection(&collection)?;
        validate::no_scope(&collection, &scope)?;
        validate::count("ids", ids.len(), validate::MAX_BATCH_GET_IDS)?;
        for (i, id) in ids.iter().enumerate() {
            validate::id(id, &format!("ids[{i}]"))?;
        }
        Ok(BatchGet { collection, ids })
    }
}

/// Validates and authorizes every mutation of a Write, in order: the first
/// failing one names the error (`mutation N: …`).
pub(super) fn mutations(
    mutations: Vec<proto::Mutation>,
    limits: &Limits,
    caller: &Scope,
) -> Result<Vec<store::Mutation>, ApiError> {
    validate::count("mutations", mutations.len(), validate::MAX_WRITE_MUTATIONS)?;
    let mut ops = Vec::with_capacity(mutations.len());
    for (index, mutation) in mutations.into_iter().enumerate() {
        let proto::Mutation { op } = mutation;
        let op = match op {
            Some(Op::Save(save)) => save.accept(limits).map(store::Mutation::Save),
            Some(Op::Delete(delete)) => delete.accept(limits).map(store::Mutation::Delete),
            Some(Op::Update(_)) => Err(ApiError::unimplemented("Update")),
            None => Err(ApiError::invalid("op is not set: give a save or a delete")),
        }
        .and_then(|op| {
            caller.check(op.collection(), Need::Write)?;
            Ok(op)
        });
        ops.push(op.map_err(|e| e.in_mutation(index))?);
    }
    Ok(ops)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn timestamp(micros: Micros) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub(super) fn document(doc: store::Document) -> Result<proto::Document, ApiError> {
    let store::Document {
        collection,
        id,
        rev,
        data,
        create_time,
        update_time,
    } = doc;
    let data = json::from_json(&data).map_err(|e| {
        StoreError::Internal(format!(
            "document `{id}` in collection `{collection}` holds invalid JSON: {e}"
        ))
    })?;
    Ok(proto::Document {
        collection,
        id,
        rev,
        data: Some(data),
        create_time: Some(timestamp(create_time)),
        update_time: Some(timestamp(update_time)),
        expire_time: None,
        scope: String::new(),
    })
}
