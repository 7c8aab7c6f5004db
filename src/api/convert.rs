//! Protobuf to store types and back. Each request is destructured in full, so
//! a new field breaks the build here instead of being ignored.

use super::access::Caller;
use super::{json, validate, ApiError, Limits};
use crate::proto::{self, field_transform, mutation::Op};
use crate::store::{
    self, Expiry, FieldPath, Key, Micros, Protected, StoreError, Transform, TransformOp,
};
use prost_types::Timestamp;
use std::sync::Arc;

/// A request as the API accepts it: the collection it names (for the log span,
/// before anything is checked) and its validated form.
pub(super) trait Accept: Sized {
    type Valid;

    fn collection(&self) -> &str;

    fn accept(self, limits: &Limits) -> Result<Self::Valid, ApiError>;
}

/// The key of a document named by a request.
fn key(collection: String, scope: String, id: String) -> Result<Key, ApiError> {
    validate::collection(&collection)?;
    validate::id(&id, "id")?;
    validate::scope(&scope)?;
    Ok(Key::new(collection, scope, id))
}

impl Accept for proto::GetRequest {
    type Valid = Key;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<Key, ApiError> {
        let proto::GetRequest {
            collection,
            id,
            scope,
        } = self;
        key(collection, scope, id)
    }
}

/// An optional rev condition, validated like an id (it is echoed in messages).
fn expected_rev(rev: String) -> Result<Option<String>, ApiError> {
    if rev.is_empty() {
        return Ok(None);
    }
    validate::id(&rev, "expected_rev")?;
    Ok(Some(rev))
}

/// Microseconds of a Timestamp, rounded up (an expiry never comes early).
fn timestamp_micros(ts: &Timestamp, field: &str) -> Result<Micros, ApiError> {
    // The protobuf range: 0001-01-01 to 9999-12-31.
    const MIN: i64 = -62_135_596_800;
    const MAX: i64 = 253_402_300_799;
    if !(MIN..=MAX).contains(&ts.seconds) || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(ApiError::invalid(field, format!(
            "{field} is not a valid Timestamp: seconds must lie in 0001-01-01..9999-12-31 and nanos in 0..999999999"
        )));
    }
    Ok(ts.seconds * 1_000_000 + (i64::from(ts.nanos) + 999) / 1000)
}

/// The expiry a request sets; `unset` is what no expiration means.
fn expiry<E: Into<Expiration>>(expiration: Option<E>, unset: Expiry) -> Result<Expiry, ApiError> {
    /// The longest TTL: a century.
    const MAX_TTL: i64 = 100 * 366 * 24 * 3600;
    match expiration.map(Into::into) {
        None => Ok(unset),
        Some(Expiration::At(ts)) => Ok(Expiry::At(timestamp_micros(&ts, "expire_time")?)),
        Some(Expiration::Ttl(d)) => {
            let positive = d.seconds > 0 || (d.seconds == 0 && d.nanos > 0);
            if !positive || d.nanos < 0 || d.seconds > MAX_TTL {
                return Err(ApiError::invalid(
                    "ttl",
                    format!(
                    "ttl must be positive and at most {MAX_TTL} seconds (a century); got {}s {}ns",
                    d.seconds, d.nanos
                ),
                ));
            }
            Ok(Expiry::After(
                d.seconds * 1_000_000 + (i64::from(d.nanos) + 999) / 1000,
            ))
        }
    }
}

/// Both requests' `expiration` oneofs, as one.
enum Expiration {
    At(Timestamp),
    Ttl(prost_types::Duration),
}

impl From<proto::save_request::Expiration> for Expiration {
    fn from(e: proto::save_request::Expiration) -> Self {
        match e {
            proto::save_request::Expiration::ExpireTime(t) => Expiration::At(t),
            proto::save_request::Expiration::Ttl(d) => Expiration::Ttl(d),
        }
    }
}

impl From<proto::update_request::Expiration> for Expiration {
    fn from(e: proto::update_request::Expiration) -> Self {
        match e {
            proto::update_request::Expiration::ExpireTime(t) => Expiration::At(t),
            proto::update_request::Expiration::Ttl(d) => Expiration::Ttl(d),
        }
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
            expected_rev: rev,
            create_only,
            scope,
            expiration,
        } = self;
        let id = if id.is_empty() { store::new_id() } else { id };
        let key = key(collection, scope, id)?;
        if create_only && !rev.is_empty() {
            return Err(ApiError::invalid(
                "create_only",
                "create_only and expected_rev exclude each other: create_only requires that the document does not exist, expected_rev that it does",
            ));
        }
        let expected_rev = expected_rev(rev)?;
        let data = data.ok_or_else(|| {
            ApiError::invalid(
                "data",
                "data is required: give the document as a JSON object (Struct)",
            )
        })?;
        json::validate(&data).map_err(|m| ApiError::invalid("data", m))?;
        let data = json::to_json(&data);
        if data.len() > limits.max_document_bytes {
            return Err(ApiError::invalid(
                "data",
                format!(
                    "data is {} bytes as JSON, over the limit of {} bytes per document",
                    data.len(),
                    limits.max_document_bytes
                ),
            ));
        }
        Ok(store::SaveOp {
            key,
            data,
            expected_rev,
            create_only,
            expiry: expiry(expiration, Expiry::Never)?,
            protected: Arc::new(Protected::default()),
        })
    }
}

/// A transform's operand: a finite number.
fn number(value: Option<prost_types::Value>, field: &str) -> Result<f64, ApiError> {
    match value.and_then(|v| v.kind) {
        Some(prost_types::value::Kind::NumberValue(n)) if n.is_finite() => Ok(n),
        _ => Err(ApiError::invalid(
            field,
            format!("{field} must hold a finite number"),
        )),
    }
}

/// A transform's list operand, each value validated.
fn values(list: prost_types::ListValue, field: &str) -> Result<Vec<serde_json::Value>, ApiError> {
    list.values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json::validate_value(v, &format!("{field}[{i}]"))
                .map_err(|m| ApiError::invalid(field, m))?;
            Ok(json::to_json_value(v))
        })
        .collect()
}

fn transform(t: proto::FieldTransform, index: usize) -> Result<Transform, ApiError> {
    let proto::FieldTransform { field: path, op } = t;
    let at = |what: &str| format!("transforms[{index}].{what}");
    let field = FieldPath::parse(&path)
        .map_err(|e| ApiError::invalid(at("field"), format!("{}: {e}", at("field"))))?;
    if field.is_id() {
        return Err(ApiError::invalid(
            at("field"),
            format!(
                "{}: __id__ is the document id, not a field that can be transformed",
                at("field")
            ),
        ));
    }
    use field_transform::Op as P;
    let op = match op {
        Some(P::Increment(v)) => TransformOp::Increment(number(Some(v), &at("increment"))?),
        Some(P::Maximum(v)) => TransformOp::Maximum(number(Some(v), &at("maximum"))?),
        Some(P::Minimum(v)) => TransformOp::Minimum(number(Some(v), &at("minimum"))?),
        Some(P::AppendMissing(l)) => TransformOp::AppendMissing(values(l, &at("append_missing"))?),
        Some(P::RemoveAll(l)) => TransformOp::RemoveAll(values(l, &at("remove_all"))?),
        Some(P::SetToServerTime(true)) => TransformOp::ServerTime,
        Some(P::SetToServerTime(false)) => {
            return Err(ApiError::invalid(at("set_to_server_time"), format!(
                "{}: false does nothing; leave the transform out",
                at("set_to_server_time")
            )))
        }
        None => {
            return Err(ApiError::invalid(format!("transforms[{index}]"), format!(
                "transforms[{index}]: op is not set: give increment, maximum, minimum, append_missing, remove_all or set_to_server_time"
            )))
        }
    };
    Ok(Transform { field, op })
}

/// The most transforms in one Update.
const MAX_TRANSFORMS: usize = 100;

impl Accept for proto::UpdateRequest {
    type Valid = store::UpdateOp;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, limits: &Limits) -> Result<store::UpdateOp, ApiError> {
        let proto::UpdateRequest {
            collection,
            id,
            scope,
            merge,
            transforms,
            expected_rev: rev,
            allow_missing,
            expiration,
        } = self;
        let key = key(collection, scope, id)?;
        let merge = match merge {
            Some(patch) => {
                json::validate_as(&patch, "merge").map_err(|m| ApiError::invalid("merge", m))?;
                Some(json::to_json_object(&patch))
            }
            None => None,
        };
        validate::count("transforms", transforms.len(), MAX_TRANSFORMS)?;
        let transforms = transforms
            .into_iter()
            .enumerate()
            .map(|(i, t)| transform(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(store::UpdateOp {
            key,
            merge,
            transforms,
            expected_rev: expected_rev(rev)?,
            allow_missing,
            expiry: expiry(expiration, Expiry::Keep)?,
            protected: Arc::new(Protected::default()),
            max_bytes: limits.max_document_bytes,
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
            expected_rev: rev,
            allow_missing,
            scope,
        } = self;
        Ok(store::DeleteOp {
            key: key(collection, scope, id)?,
            expected_rev: expected_rev(rev)?,
            allow_missing,
        })
    }
}

impl Accept for proto::ListRequest {
    type Valid = store::ListOp;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<store::ListOp, ApiError> {
        let proto::ListRequest {
            collection,
            page_size,
            page_token,
            scope,
        } = self;
        validate::collection(&collection)?;
        validate::scope(&scope)?;
        let limit = validate::page_size(page_size)?;
        let after = match page_token.as_str() {
            "" => None,
            token => {
                Some(super::page_token::decode(token, &collection).map_err(ApiError::page_token)?)
            }
        };
        // The requested scope, until the caller's permissions resolve it.
        Ok(store::ListOp {
            collection,
            scopes: store::Scopes::One(scope),
            after,
            limit,
        })
    }
}

impl Accept for proto::BatchGetRequest {
    type Valid = store::BatchGetOp;

    fn collection(&self) -> &str {
        &self.collection
    }

    fn accept(self, _: &Limits) -> Result<store::BatchGetOp, ApiError> {
        let proto::BatchGetRequest {
            collection,
            ids,
            scope,
        } = self;
        validate::collection(&collection)?;
        validate::scope(&scope)?;
        validate::count("ids", ids.len(), validate::MAX_BATCH_GET_IDS)?;
        for (i, id) in ids.iter().enumerate() {
            validate::id(id, &format!("ids[{i}]"))?;
        }
        // An id asked for twice is answered once, at its first place.
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        let ids = ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        Ok(store::BatchGetOp {
            collection,
            scope,
            ids,
        })
    }
}

/// Validates and authorizes every mutation of a Write, in order: the first
/// failing one names the error (`mutation N: …`).
pub(super) async fn mutations(
    mutations: Vec<proto::Mutation>,
    limits: &Limits,
    caller: &Caller<'_>,
) -> Result<Vec<store::Mutation>, ApiError> {
    validate::count("mutations", mutations.len(), validate::MAX_WRITE_MUTATIONS)?;
    let mut ops = Vec::with_capacity(mutations.len());
    for (index, mutation) in mutations.into_iter().enumerate() {
        let proto::Mutation { op } = mutation;
        let kind = op.as_ref().map_or("op", op_name);
        let op = match op {
            Some(Op::Save(save)) => save.accept(limits).map(store::Mutation::Save),
            Some(Op::Update(update)) => update.accept(limits).map(store::Mutation::Update),
            Some(Op::Delete(delete)) => delete.accept(limits).map(store::Mutation::Delete),
            None => Err(ApiError::invalid(
                "op",
                "op is not set: give a save, an update or a delete",
            )),
        };
        let op = match op {
            Ok(mut op) => caller.mutation(&mut op).await.map(|()| op),
            Err(e) => Err(e),
        };
        ops.push(op.map_err(|e| e.in_mutation(index, kind))?);
    }
    Ok(ops)
}

/// The name of a mutation's op, as the request spells its field.
pub(super) fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Save(_) => "save",
        Op::Update(_) => "update",
        Op::Delete(_) => "delete",
    }
}

/// A Timestamp of microseconds, clamped to the protobuf range (0001-01-01 to
/// 9999-12-31): a row written outside the sidecar may hold anything.
pub(super) fn timestamp(micros: Micros) -> Timestamp {
    const MIN: Micros = -62_135_596_800_000_000;
    const MAX: Micros = 253_402_300_799_999_999;
    let micros = micros.clamp(MIN, MAX);
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// The documents of a page or batch. A stored row whose data is not a JSON
/// object (written outside the sidecar) does not hide the others: it is left
/// out, logged at error with its collection and id, and counted
/// (`docsidecar_malformed_documents_total`); a Get of it fails INTERNAL.
pub(super) fn documents(docs: Vec<store::Document>) -> Vec<proto::Document> {
    docs.into_iter()
        .filter_map(|doc| match document(doc) {
            Ok(doc) => Some(doc),
            Err(e) => {
                tracing::error!(error = %e, "left a malformed document out of a response");
                crate::metrics::malformed_document();
                None
            }
        })
        .collect()
}

pub(super) fn document(doc: store::Document) -> Result<proto::Document, ApiError> {
    let store::Document {
        key: Key {
            collection,
            scope,
            id,
        },
        rev,
        data,
        create_time,
        update_time,
        expire_time,
    } = doc;
    let data = crate::wire::Data::from_json(&data).map_err(|e| {
        StoreError::Internal(format!(
            "document `{id}` in collection `{collection}` does not hold a JSON object ({e}): it was written outside docsidecar; repair or delete it"
        ))
    })?;
    Ok(proto::Document {
        collection,
        id,
        rev,
        data: Some(data),
        create_time: Some(timestamp(create_time)),
        update_time: Some(timestamp(update_time)),
        expire_time: expire_time.map(timestamp),
        scope,
    })
}
