//! What is measured: the documents, the operations and the workloads that mix them.

use prost_types::{value::Kind, ListValue, Struct, Value};
use serde::Serialize;
use std::collections::BTreeMap;

/// The one collection every target reads and writes.
pub const COLLECTION: &str = "bench";
/// Documents per `List` page.
pub const PAGE_SIZE: usize = 100;
/// Mutations per `Write`.
pub const WRITE_MUTATIONS: usize = 10;

/// The id of the `i`th preloaded document; ids sort in the order of `i`.
pub fn doc_id(i: u64) -> String {
    format!("doc-{i:07}")
}

/// The benchmark document: a few typed fields and a padding string, sized so that
/// its JSON text (as the sidecar stores it) is `payload` bytes.
pub struct Payload {
    /// The document as the API's `Struct` field, already encoded (as the
    /// sidecar encodes documents it reads), so clones and sends cost a copy.
    pub data: docsidecar::proto::Data,
    /// JSON text of `data`, as the sidecar writes it to the database.
    pub json: String,
}

impl Payload {
    pub fn new(payload: usize) -> Payload {
        let build = |pad: usize| {
            let mut fields = BTreeMap::new();
            let string = |s: &str| Value {
                kind: Some(Kind::StringValue(s.to_string())),
            };
            let number = |n: f64| Value {
                kind: Some(Kind::NumberValue(n)),
            };
            fields.insert("name".into(), string("Ada Lovelace"));
            fields.insert("email".into(), string("ada@example.com"));
            fields.insert("age".into(), number(36.0));
            fields.insert("score".into(), number(0.875));
            fields.insert(
                "active".into(),
                Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            );
            fields.insert(
                "tags".into(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![string("math"), string("engines"), string("poetry")],
                    })),
                },
            );
            fields.insert("pad".into(), string(&"x".repeat(pad)));
            Struct { fields }
        };
        let base = docsidecar::api::json::to_json(&build(0)).len();
        let data = build(payload.saturating_sub(base));
        let json = docsidecar::api::json::to_json(&data);
        let data = docsidecar::proto::Data::from_json(&json).expect("the payload is a JSON object");
        Payload { data, json }
    }
}

/// One request of a workload.
#[derive(Debug, Clone)]
pub enum Op {
    /// Read the document with this index.
    Get(u64),
    /// Upsert the document with this index.
    Save(u64),
    /// Read the page with this index (of [`PAGE_SIZE`] documents).
    List(usize),
    /// Upsert these documents in one transaction (sorted, distinct: no deadlocks
    /// between concurrent writes).
    Write(Vec<u64>),
    /// The first page of a customer's documents, newest first (`crate::query`).
    Query(u64),
    /// Count the documents of a status (`crate::query`).
    Count(u64),
}

/// The workloads of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Get of a random preloaded document.
    Get,
    /// Save (upsert) of a random preloaded document.
    Save,
    /// 90 % Get, 10 % Save.
    Mix,
    /// List of a random 100-document page.
    List,
    /// Write of 10 upserts in one transaction.
    Write,
    /// Save at a fixed rate with watchers streaming the changes: the latency from
    /// each Save's answer to its event at the watchers (`crate::watch`). Not in
    /// the default set.
    Watch,
    /// Gets at a fixed rate while the expiry reaper deletes expired documents
    /// (`crate::reap`). Not in the default set.
    Reap,
    /// Query (equality on a customer, newest first, a page of 50) and Count (an
    /// indexed status) on their own collection of up to a million documents
    /// loaded in bulk (`crate::query`). Not in the default set.
    Query,
    /// The Count half of `query`, measured by its module.
    #[value(skip)]
    Count,
}

impl Workload {
    /// The request workloads, run against every target: the default set.
    pub const ALL: [Workload; 5] = [
        Workload::Get,
        Workload::Save,
        Workload::Mix,
        Workload::List,
        Workload::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Get => "get",
            Workload::Save => "save",
            Workload::Mix => "mix",
            Workload::List => "list",
            Workload::Write => "write",
            Workload::Watch => "watch",
            Workload::Reap => "reap",
            Workload::Query => "query",
            Workload::Count => "count",
        }
    }

    /// Measured by its own module against sidecars only, not as requests
    /// against every target.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Workload::Watch | Workload::Reap | Workload::Query | Workload::Count
        )
    }

    /// The next request, drawn from `rng` over `docs` documents and `pages` full pages
    /// (`query` and `count`: `docs` customers or statuses).
    pub fn next(self, rng: &mut Rng, docs: u64, pages: usize) -> Op {
        match self {
            Workload::Get => Op::Get(rng.below(docs)),
            // The foreground load of the special workloads.
            Workload::Save | Workload::Watch => Op::Save(rng.below(docs)),
            Workload::Reap => Op::Get(rng.below(docs)),
            Workload::Mix => {
                if rng.below(10) == 0 {
                    Op::Save(rng.below(docs))
                } else {
                    Op::Get(rng.below(docs))
                }
            }
            Workload::List => Op::List(rng.below(pages as u64) as usize),
            // `docs` is the number of customers (statuses) to draw from.
            Workload::Query => Op::Query(rng.below(docs)),
            Workload::Count => Op::Count(rng.below(docs)),
            Workload::Write => {
                let mut ids = Vec::with_capacity(WRITE_MUTATIONS);
                while ids.len() < WRITE_MUTATIONS.min(docs as usize) {
                    let id = rng.below(docs);
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                ids.sort_unstable();
                Op::Write(ids)
            }
        }
    }
}

/// SplitMix64: fast, seedable, good enough to pick documents.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n.max(1) as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_has_the_asked_size() {
        for size in [256, 1024, 4096] {
            assert_eq!(Payload::new(size).json.len(), size);
        }
    }

    #[test]
    fn writes_are_sorted_and_distinct() {
        let mut rng = Rng::new(1);
        for _ in 0..100 {
            let Op::Write(ids) = Workload::Write.next(&mut rng, 50, 1) else {
                panic!()
            };
            assert_eq!(ids.len(), WRITE_MUTATIONS);
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
