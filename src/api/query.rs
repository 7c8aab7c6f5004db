//! Query and Count requests: validated into a store query (filters as sort-key
//! conditions, see `store::key`), checked against the declared indexes.

use super::access::{self, Caller};
use super::{json, page_token, validate, ApiError};
use crate::proto::{self, filter::Operator, order::Direction};
use crate::status::Reason;
use crate::store::key::{encode, type_range};
use crate::store::query::{Condition, Field, Filter, Index, Order, Query};
use crate::store::{FieldPath, Protected, Scopes};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

/// At most this many values in an IN, NOT_IN or ARRAY_CONTAINS_ANY list.
const MAX_LIST: usize = 30;
/// At most this many filters and sort keys in one query.
const MAX_FILTERS: usize = 20;
const MAX_ORDER: usize = 8;

/// A validated query and the fingerprint its page tokens carry.
pub(super) struct Validated {
    pub query: Query,
    pub fingerprint: u64,
}

fn field(text: &str, at: &str) -> Result<Field, ApiError> {
    let path = FieldPath::parse(text).map_err(|e| ApiError::invalid(at, format!("{at}: {e}")))?;
    Ok(if path.is_id() {
        Field::Id
    } else {
        Field::Path(path)
    })
}

fn operand(value: Option<prost_types::Value>, at: &str) -> Result<Value, ApiError> {
    let value = value.ok_or_else(|| ApiError::invalid(at, format!("{at} is required")))?;
    json::validate_value(&value, at).map_err(|m| ApiError::invalid(at, m))?;
    Ok(json::to_json_value(&value))
}

fn list(value: Value, at: &str) -> Result<Vec<Value>, ApiError> {
    match value {
        Value::Array(items) if items.len() <= MAX_LIST => Ok(items),
        Value::Array(items) => Err(ApiError::invalid(
            at,
            format!("{at} holds {} values: at most {MAX_LIST}", items.len()),
        )),
        _ => Err(ApiError::invalid(
            at,
            format!("{at} must be a list of at most {MAX_LIST} values"),
        )),
    }
}

fn filter(f: proto::Filter, index: usize) -> Result<Filter, ApiError> {
    let proto::Filter {
        field: name,
        op,
        value,
    } = f;
    let at = |what: &str| format!("filters[{index}].{what}");
    let field = field(&name, &at("field"))?;
    let op = Operator::try_from(op).unwrap_or(Operator::Unspecified);
    let value = if op == Operator::Unspecified {
        return Err(ApiError::invalid(
            at("op"),
            format!("{}: set an operator", at("op")),
        ));
    } else {
        operand(value, &at("value"))?
    };
    let keys = |values: Vec<Value>| values.iter().map(encode).collect::<Vec<_>>();
    let condition = match op {
        Operator::Equal => Condition::In(vec![encode(&value)]),
        Operator::NotEqual => Condition::NotIn(vec![encode(&value)]),
        Operator::In => Condition::In(keys(list(value, &at("value"))?)),
        Operator::NotIn => Condition::NotIn(keys(list(value, &at("value"))?)),
        Operator::ArrayContains => Condition::ArrayContainsAny(vec![value]),
        Operator::ArrayContainsAny => Condition::ArrayContainsAny(list(value, &at("value"))?),
        Operator::Exists => match value {
            Value::Bool(b) => Condition::Exists(b),
            _ => {
                return Err(ApiError::invalid(
                    at("value"),
                    format!("{}: EXISTS takes a bool", at("value")),
                ))
            }
        },
        Operator::LessThan
        | Operator::LessThanOrEqual
        | Operator::GreaterThan
        | Operator::GreaterThanOrEqual => {
            if !matches!(value, Value::Number(_) | Value::String(_) | Value::Bool(_)) {
                return Err(ApiError::invalid(
                    at("value"),
                    format!(
                        "{}: ordering filters compare numbers, strings or bools",
                        at("value")
                    ),
                ));
            }
            // Typed: only values of the operand's type match.
            let (low, high) = type_range(&value);
            let k = encode(&value);
            match op {
                Operator::LessThan => Condition::Range(Bound::Included(low), Bound::Excluded(k)),
                Operator::LessThanOrEqual => {
                    Condition::Range(Bound::Included(low), Bound::Included(k))
                }
                Operator::GreaterThan => {
                    Condition::Range(Bound::Excluded(k), Bound::Excluded(high))
                }
                _ => Condition::Range(Bound::Included(k), Bound::Excluded(high)),
            }
        }
        Operator::Unspecified => unreachable!("refused above"),
    };
    Ok(Filter { field, condition })
}

/// A stable byte form of a query's shape and operands, for its fingerprint.
fn shape(collection: &str, scopes: &Scopes, filters: &[Filter], order: &[Order]) -> Vec<u8> {
    let text = format!("{collection}\u{0}{scopes:?}\u{0}{filters:?}\u{0}{order:?}");
    text.into_bytes()
}

/// A query field, refused when it would reveal a hidden field.
fn readable(field: &Field, protected: &Protected) -> Result<(), ApiError> {
    match field {
        Field::Path(path) => access::readable(protected, path),
        Field::Id => Ok(()),
    }
}

/// Converts and authorizes the parts every query request shares: the rows
/// the caller may read, and filters on fields it may see.
fn parts(
    collection: &str,
    scope: &str,
    filters: Vec<proto::Filter>,
    caller: &Caller<'_>,
) -> Result<(Scopes, Arc<Protected>, Vec<Filter>), ApiError> {
    validate::collection(collection)?;
    validate::scope(scope)?;
    let (scopes, protected) = caller.read(collection, scope)?;
    validate::count("filters", filters.len(), MAX_FILTERS)?;
    let filters = filters
        .into_iter()
        .enumerate()
        .map(|(i, f)| filter(f, i))
        .collect::<Result<Vec<_>, _>>()?;
    for f in &filters {
        readable(&f.field, &protected)?;
    }
    Ok((scopes, protected, filters))
}

/// Validates and authorizes a Query; also the fields hidden from the caller,
/// to strip from the results.
pub(super) fn query(
    req: proto::QueryRequest,
    caller: &Caller<'_>,
) -> Result<(Validated, Arc<Protected>), ApiError> {
    let proto::QueryRequest {
        collection,
        scope,
        filters,
        order_by,
        page_size,
        page_token,
    } = req;
    let (scopes, protected, filters) = parts(&collection, &scope, filters, caller)?;
    validate::count("order_by", order_by.len(), MAX_ORDER)?;
    let mut order: Vec<Order> = Vec::with_capacity(order_by.len());
    for (i, o) in order_by.into_iter().enumerate() {
        let proto::Order {
            field: name,
            direction,
        } = o;
        let at = format!("order_by[{i}].field");
        let field = field(&name, &at)?;
        if order.iter().any(|o| o.field == field) {
            return Err(ApiError::invalid(
                at,
                format!("order_by names `{name}` twice"),
            ));
        }
        readable(&field, &protected)?;
        let descending = Direction::try_from(direction) == Ok(Direction::Descending);
        order.push(Order { field, descending });
    }
    let limit = validate::page_size(page_size)?;
    let fingerprint = page_token::fingerprint(&shape(&collection, &scopes, &filters, &order));
    let after = match page_token.as_str() {
        "" => None,
        token => Some(
            page_token::decode_query(token, &collection, fingerprint, order.len())
                .map_err(ApiError::page_token)?,
        ),
    };
    let validated = Validated {
        query: Query {
            collection,
            scopes,
            filters,
            order,
            after,
            limit,
        },
        fingerprint,
    };
    Ok((validated, protected))
}

pub(super) fn count(req: proto::CountRequest, caller: &Caller<'_>) -> Result<Query, ApiError> {
    let proto::CountRequest {
        collection,
        scope,
        filters,
    } = req;
    let (scopes, _, filters) = parts(&collection, &scope, filters, caller)?;
    Ok(Query {
        collection,
        scopes,
        filters,
        order: Vec::new(),
        after: None,
        limit: 0,
    })
}

/// The declared indexes and scan permissions (the policy), or none at all
/// (development: every query runs).
#[derive(Debug, Clone, Default)]
pub struct Indexes {
    /// `None` without a policy.
    pub declared: Option<BTreeMap<String, Vec<Index>>>,
    pub allow_scans: BTreeSet<String>,
    /// Query shapes without a policy already logged with the index that
    /// would serve them (once each).
    pub logged: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl Indexes {
    /// Refuses a query no declared index serves, unless its collection may scan.
    pub(super) fn check(&self, q: &Query) -> Result<(), ApiError> {
        let Some(needed) = q.needed_index() else {
            return Ok(());
        };
        let Some(declared) = &self.declared else {
            let shape = format!("{} {needed}", q.collection);
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            if logged.len() < 1000 && logged.insert(shape) {
                tracing::info!(collection = %q.collection, index = %needed, "a query that no declared index serves ran (no policy: development); with a policy, declare indexes = [{needed}] for collection `{}`", q.collection);
            }
            return Ok(());
        };
        if self.allow_scans.contains(&q.collection) {
            return Ok(());
        }
        let indexes = declared.get(&q.collection).map_or(&[][..], Vec::as_slice);
        if indexes.iter().any(|i| q.is_served_by(i)) {
            return Ok(());
        }
        let array = q
            .filters
            .iter()
            .any(|f| matches!(f.condition, Condition::ArrayContainsAny(_)));
        let message = if array {
            format!(
                "no index serves array containment in collection `{}`: set allow_scans = true for it in the policy",
                q.collection
            )
        } else {
            format!(
                "no declared index serves this query of collection `{}`: declare indexes = [{needed}] for it in the policy and run `docsidecar migrate` (or set allow_scans = true)",
                q.collection
            )
        };
        Err(ApiError::Refused {
            reason: Reason::IndexRequired,
            message,
            metadata: vec![("index", needed.to_string())],
        })
    }
}
