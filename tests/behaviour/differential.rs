//! The reference comparison: random operations against the memory store.

use super::support::*;
use super::updates::{transform, update};
use crate::common::*;
use docsidecar::proto::{
    field_transform::Op as T, mutation::Op, save_request, update_request, BatchGetRequest,
    DeleteRequest, ListCollectionsRequest, ListRequest, Mutation, SaveRequest, UpdateRequest,
    WriteRequest,
};
use prost_types::{ListValue, Struct};

/// A tiny deterministic generator: the same operations for both stores.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[derive(Clone, Copy)]
enum Rev {
    Unconditional,
    Current,
    Stale,
}

#[derive(Clone)]
enum RandomOp {
    /// collection, id, data, rev condition, create_only, TTL in seconds.
    Save(String, String, Struct, Rev, bool, Option<i64>),
    /// collection, id, rev condition, allow_missing, which update.
    Update(String, String, Rev, bool, u64),
    /// collection, id, rev condition, allow_missing.
    Delete(String, String, Rev, bool),
}

/// One of a few updates: a merge patch, transforms, both, a new TTL.
fn random_update(collection: &str, id: &str, kind: u64) -> UpdateRequest {
    let mut request = update(collection, id);
    match kind {
        0 => request.merge = Some(object(vec![("nested", null()), ("m", num(1.0))]).into()),
        1 => {
            request.transforms = vec![
                transform("count", T::Increment(num(1.5))),
                transform(
                    "tags",
                    T::AppendMissing(ListValue {
                        values: vec![string("t")],
                    }),
                ),
            ]
        }
        2 => {
            request.merge = Some(object(vec![("step", string("patched"))]).into());
            request.transforms = vec![transform(
                "nested.list",
                T::RemoveAll(ListValue {
                    values: vec![num(1.0)],
                }),
            )];
        }
        _ => {
            request.expiration = Some(update_request::Expiration::Ttl(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }))
        }
    }
    request
}

fn random_op(rng: &mut Lcg, step: usize) -> RandomOp {
    const COLLECTIONS: [&str; 3] = ["alpha", "beta", "c_3"];
    const IDS: [&str; 5] = ["a", "b", "Z", "é", "a b"];
    let collection = COLLECTIONS[rng.below(3) as usize].to_string();
    let id = IDS[rng.below(5) as usize].to_string();
    let rev = match rng.below(4) {
        0 | 1 => Rev::Unconditional,
        2 => Rev::Current,
        _ => Rev::Stale,
    };
    let choice = rng.below(6);
    if choice == 0 {
        RandomOp::Delete(collection, id, rev, rng.below(3) == 0)
    } else if choice == 1 {
        RandomOp::Update(collection, id, rev, rng.below(2) == 0, rng.below(4))
    } else {
        let data = object(vec![
            ("step", num(step as f64)),
            (
                "nested",
                nested(object(vec![(
                    "list",
                    list(vec![num(1.0), num(2.5), string("x"), null(), boolean(true)]),
                )])),
            ),
        ]);
        // TTLs in tens of seconds, the clock in steps of 7 s: an expiry never
        // falls between the two servers' handling of one step.
        let ttl = (rng.below(4) == 0).then(|| 10 * (1 + rng.below(3) as i64));
        RandomOp::Save(collection, id, data, rev, rng.below(4) == 0, ttl)
    }
}

async fn random_mutation(client: &mut Client, op: &RandomOp) -> Mutation {
    let mut rev = async |collection: &str, id: &str, rev: Rev| match rev {
        Rev::Unconditional => String::new(),
        Rev::Stale => "stale".to_string(),
        Rev::Current => client
            .get(get(collection, id))
            .await
            .map_or_else(|_| "absent".to_string(), |d| d.into_inner().rev),
    };
    let op = match op {
        RandomOp::Save(c, id, data, r, create_only, ttl) => Op::Save(SaveRequest {
            expected_rev: rev(c, id, *r).await,
            create_only: *create_only,
            expiration: ttl.map(|seconds| {
                save_request::Expiration::Ttl(prost_types::Duration { seconds, nanos: 0 })
            }),
            ..save(c, id, data.clone())
        }),
        RandomOp::Update(c, id, r, allow_missing, kind) => Op::Update(UpdateRequest {
            expected_rev: rev(c, id, *r).await,
            allow_missing: *allow_missing,
            ..random_update(c, id, *kind)
        }),
        RandomOp::Delete(c, id, r, allow_missing) => Op::Delete(DeleteRequest {
            allow_missing: *allow_missing,
            ..delete(c, id, &rev(c, id, *r).await)
        }),
    };
    Mutation { op: Some(op) }
}

/// What a failed call told the client, reduced to what every store must agree on.
fn outcome_of(status: &tonic::Status) -> String {
    let index = status
        .message()
        .strip_prefix("mutation ")
        .and_then(|m| m.split_once(':'))
        .map_or("", |(n, _)| n);
    // A rev mismatch on an absent document says so.
    let absent = status.message().contains("does not exist");
    format!("{:?} mutation={index} absent={absent}", status.code())
}

/// Runs one step on a server and describes its outcome.
async fn apply_ops(client: &mut Client, ops: &[RandomOp], batch: bool) -> String {
    let mut mutations = Vec::new();
    for op in ops {
        mutations.push(random_mutation(client, op).await);
    }
    if batch {
        match client.write(WriteRequest { mutations }).await {
            Ok(r) => format!(
                "ok {:?}",
                r.into_inner()
                    .results
                    .iter()
                    .map(|r| !r.rev.is_empty())
                    .collect::<Vec<_>>()
            ),
            Err(e) => outcome_of(&e),
        }
    } else {
        match mutations.pop().and_then(|m| m.op) {
            Some(Op::Save(op)) => match client.save(op).await {
                Ok(saved) => format!("ok created={}", saved.into_inner().created),
                Err(e) => outcome_of(&e),
            },
            Some(Op::Delete(op)) => match client.delete(op).await {
                Ok(_) => "ok deleted".into(),
                Err(e) => outcome_of(&e),
            },
            Some(Op::Update(op)) => match client.update(op).await {
                Ok(updated) => format!("ok created={}", updated.into_inner().created),
                Err(e) => outcome_of(&e),
            },
            None => "nothing".into(),
        }
    }
}

/// Everything observable, with revs and times reduced to what must agree.
async fn snapshot(client: &mut Client) -> Vec<String> {
    let collections = client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .collections;
    let mut out = vec![format!("collections {collections:?}")];
    for collection in ["alpha", "beta", "c_3", "never"] {
        // Walk in pages of two to exercise the keyset pagination.
        let mut page_token = String::new();
        loop {
            let page = client
                .list(ListRequest {
                    collection: collection.into(),
                    page_size: 2,
                    page_token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for d in &page.documents {
                let (created, updated) = (d.create_time.unwrap(), d.update_time.unwrap());
                assert!((created.seconds, created.nanos) <= (updated.seconds, updated.nanos));
                let expires = d.expire_time.is_some();
                out.push(format!(
                    "{collection}/{} {:?} expires={expires}",
                    d.id, d.data
                ));
            }
            page_token = page.next_page_token;
            if page_token.is_empty() {
                break;
            }
        }
        let ids: Vec<String> = ["a", "b", "Z", "é", "a b", "nope"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut found: Vec<String> = client
            .batch_get(BatchGetRequest {
                collection: collection.into(),
                ids,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .documents
            .into_iter()
            .map(|d| d.id)
            .collect();
        found.sort();
        out.push(format!("{collection} batch {found:?}"));
    }
    out
}

/// Random saves, updates, deletes and atomic writes, conditional or not, with
/// expiries and a moving clock, give the same answers and leave the same
/// documents as on the memory store, the reference.
pub async fn behaves_like_the_memory_store(mut t: TestServer) {
    let Some(mut reference) = TestServer::start(Backend::Memory, &[]).await else {
        return;
    };
    let mut rng = Lcg(7);
    for step in 0..400 {
        let batch = rng.below(4) == 0;
        let n = if batch { 1 + rng.below(3) as usize } else { 1 };
        let ops: Vec<RandomOp> = (0..n).map(|_| random_op(&mut rng, step)).collect();
        let expected = apply_ops(&mut reference.client, &ops, batch).await;
        let actual = apply_ops(&mut t.client, &ops, batch).await;
        assert_eq!(actual, expected, "step {step}");
        if step % 10 == 9 {
            for clock in [&reference.clock, &t.clock] {
                clock.advance(7_000_000);
            }
        }
        if step % 20 == 19 {
            assert_eq!(
                snapshot(&mut t.client).await,
                snapshot(&mut reference.client).await,
                "step {step}"
            );
        }
    }
}
