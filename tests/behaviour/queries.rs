//! Query and Count: operators, typed comparisons, the cross-type order, keyset
//! pages; and a random comparison with the memory store, page by page.

use super::differential::Lcg;
use super::support::*;
use crate::common::*;
use docsidecar::proto::{
    filter::Operator, order::Direction, CountRequest, Filter, Order, QueryRequest,
};
use prost_types::{Struct, Value};
use tonic::Code;

pub fn filter(field: &str, op: Operator, value: Value) -> Filter {
    Filter {
        field: field.into(),
        op: op.into(),
        value: Some(value),
    }
}

pub fn order(field: &str, direction: Direction) -> Order {
    Order {
        field: field.into(),
        direction: direction.into(),
    }
}

/// Every id a query returns, walking pages of `page_size`.
pub async fn query_ids(
    client: &mut Client,
    mut request: QueryRequest,
    page_size: i32,
) -> Vec<String> {
    request.page_size = page_size;
    let mut ids = Vec::new();
    loop {
        let page = client.query(request.clone()).await.unwrap().into_inner();
        ids.extend(page.documents.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
}

fn q(filters: Vec<Filter>, order_by: Vec<Order>) -> QueryRequest {
    QueryRequest {
        collection: "orders".into(),
        filters,
        order_by,
        ..Default::default()
    }
}

async fn seed(client: &mut Client) {
    let docs: Vec<(&str, Struct)> = vec![
        (
            "o1",
            object(vec![
                ("status", string("open")),
                ("total", num(10.0)),
                ("customer", nested(object(vec![("id", num(42.0))]))),
                ("tags", list(vec![string("a"), string("b")])),
            ]),
        ),
        (
            "o2",
            object(vec![
                ("status", string("open")),
                ("total", num(2.5)),
                ("customer", nested(object(vec![("id", num(42.0))]))),
            ]),
        ),
        (
            "o3",
            object(vec![
                ("status", string("closed")),
                ("total", num(99.0)),
                ("customer", nested(object(vec![("id", num(7.0))]))),
                ("tags", list(vec![string("b")])),
            ]),
        ),
        (
            "o4",
            object(vec![
                ("status", string("Open")),
                ("total", string("12")),
                ("tags", string("a")),
            ]),
        ),
        (
            "o5",
            object(vec![("status", null()), ("total", boolean(true))]),
        ),
        (
            "o6",
            object(vec![
                ("status", string("open")),
                ("total", num(-1.0)),
                ("customer", nested(object(vec![("id", num(42.0))]))),
            ]),
        ),
    ];
    for (id, data) in docs {
        client.save(save("orders", id, data)).await.unwrap();
    }
}

pub async fn queries_filter_with_typed_comparisons(mut t: TestServer) {
    let c = &mut t.client;
    seed(c).await;
    let cases: Vec<(Vec<Filter>, Vec<&str>)> = vec![
        (
            vec![filter("status", Operator::Equal, string("open"))],
            vec!["o1", "o2", "o6"],
        ),
        // Byte comparison: no case folding.
        (
            vec![filter("status", Operator::Equal, string("OPEN"))],
            vec![],
        ),
        (vec![filter("status", Operator::Equal, null())], vec!["o5"]),
        // NOT_EQUAL matches only documents that have the field.
        (
            vec![filter("customer.id", Operator::NotEqual, num(42.0))],
            vec!["o3"],
        ),
        // Typed: "12" (a string) is not greater than 5; true is no number.
        (
            vec![filter("total", Operator::GreaterThan, num(5.0))],
            vec!["o1", "o3"],
        ),
        (
            vec![filter("total", Operator::LessThanOrEqual, num(2.5))],
            vec!["o2", "o6"],
        ),
        (
            vec![filter("total", Operator::GreaterThanOrEqual, string(""))],
            vec!["o4"],
        ),
        (
            vec![filter("total", Operator::LessThan, boolean(true))],
            vec![],
        ),
        (
            vec![filter("total", Operator::Equal, num(10.0))],
            vec!["o1"],
        ),
        (
            vec![filter(
                "status",
                Operator::In,
                list(vec![string("closed"), null()]),
            )],
            vec!["o3", "o5"],
        ),
        (
            vec![filter(
                "status",
                Operator::NotIn,
                list(vec![string("open"), null()]),
            )],
            vec!["o3", "o4"],
        ),
        (
            vec![filter("tags", Operator::ArrayContains, string("a"))],
            vec!["o1"],
        ),
        (
            vec![filter(
                "tags",
                Operator::ArrayContainsAny,
                list(vec![string("b"), num(1.0)]),
            )],
            vec!["o1", "o3"],
        ),
        (
            vec![filter("customer", Operator::Exists, boolean(false))],
            vec!["o4", "o5"],
        ),
        (
            vec![
                filter("status", Operator::Equal, string("open")),
                filter("customer.id", Operator::Equal, num(42.0)),
                filter("total", Operator::GreaterThan, num(0.0)),
            ],
            vec!["o1", "o2"],
        ),
        (
            vec![filter("__id__", Operator::GreaterThan, string("o4"))],
            vec!["o5", "o6"],
        ),
        (
            vec![filter(
                "__id__",
                Operator::In,
                list(vec![string("o2"), num(1.0)]),
            )],
            vec!["o2"],
        ),
    ];
    for (filters, expected) in cases {
        let request = q(filters.clone(), vec![]);
        let ids = query_ids(c, request.clone(), 2).await;
        assert_eq!(ids, expected, "{filters:?}");
        let count = c
            .count(CountRequest {
                collection: "orders".into(),
                filters,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .count;
        assert_eq!(count as usize, expected.len());
    }
}

pub async fn queries_order_across_types(mut t: TestServer) {
    let c = &mut t.client;
    seed(c).await;
    // null < false < true < numbers < strings; a document without the field is left out.
    let asc = query_ids(c, q(vec![], vec![order("total", Direction::Ascending)]), 2).await;
    assert_eq!(asc, ["o5", "o6", "o2", "o1", "o3", "o4"]);
    let desc = query_ids(c, q(vec![], vec![order("total", Direction::Descending)]), 4).await;
    assert_eq!(desc, ["o4", "o3", "o1", "o2", "o6", "o5"]);
    // Ties broken by id; several keys in either direction.
    let by = query_ids(
        c,
        q(
            vec![],
            vec![
                order("status", Direction::Descending),
                order("total", Direction::Ascending),
            ],
        ),
        1,
    )
    .await;
    assert_eq!(by, ["o6", "o2", "o1", "o3", "o4", "o5"]);
    let none = query_ids(c, q(vec![], vec![]), 5).await;
    assert_eq!(
        none,
        ["o1", "o2", "o3", "o4", "o5", "o6"],
        "id order without order_by"
    );
    let arrays = query_ids(c, q(vec![], vec![order("tags", Direction::Ascending)]), 5).await;
    assert_eq!(
        arrays,
        ["o4", "o1", "o3"],
        "a string sorts before arrays; [a, b] < [b], element by element"
    );
}

pub async fn query_requests_are_validated(mut t: TestServer) {
    let c = &mut t.client;
    seed(c).await;
    let bad = [
        (
            q(
                vec![filter("total", Operator::Unspecified, num(1.0))],
                vec![],
            ),
            "filters[0].op",
        ),
        (
            q(vec![filter("total", Operator::LessThan, null())], vec![]),
            "ordering filters",
        ),
        (
            q(vec![filter("a..b", Operator::Equal, num(1.0))], vec![]),
            "filters[0].field",
        ),
        (
            q(
                vec![filter("tags", Operator::In, list(vec![num(1.0); 31]))],
                vec![],
            ),
            "at most 30",
        ),
        (
            q(vec![filter("tags", Operator::In, num(1.0))], vec![]),
            "must be a list",
        ),
        (
            q(vec![filter("tags", Operator::Exists, num(1.0))], vec![]),
            "EXISTS takes a bool",
        ),
        (
            q(
                vec![],
                vec![
                    order("total", Direction::Ascending),
                    order("total", Direction::Descending),
                ],
            ),
            "twice",
        ),
        (
            QueryRequest {
                page_token: "forged".into(),
                ..q(vec![], vec![])
            },
            "page_token",
        ),
    ];
    for (request, message) in bad {
        assert_status(c.query(request).await, Code::InvalidArgument, message);
    }
    // A token belongs to its query.
    let page = c
        .query(QueryRequest {
            page_size: 1,
            ..q(vec![], vec![order("total", Direction::Ascending)])
        })
        .await
        .unwrap()
        .into_inner();
    let other = QueryRequest {
        page_token: page.next_page_token,
        ..q(vec![], vec![order("total", Direction::Descending)])
    };
    assert_status(c.query(other).await, Code::InvalidArgument, "page_token");
}

/// Random documents (mixed types, missing fields, nested objects, arrays,
/// unicode) and random queries: every store returns the memory store's ids in
/// the same order, page by page.
pub async fn queries_agree_with_the_memory_store(mut t: TestServer) {
    let Some(mut reference) = TestServer::start(Backend::Memory, &[]).await else {
        return;
    };
    let mut rng = Lcg(11);
    let values = |rng: &mut Lcg| -> Value {
        match rng.below(9) {
            0 => null(),
            1 => boolean(rng.below(2) == 0),
            2 | 3 => num(rng.below(7) as f64 - 3.0 + if rng.below(3) == 0 { 0.5 } else { 0.0 }),
            4 | 5 => string(["", "a", "B", "ab", "é", "z\u{1F600}"][rng.below(6) as usize]),
            6 => list((0..rng.below(3)).map(|i| num(i as f64)).collect()),
            7 => nested(object(vec![("k", num(rng.below(2) as f64))])),
            _ => string("a"),
        }
    };
    let fields = ["a", "b", "n.x"];
    for i in 0..60 {
        let mut data = Vec::new();
        for f in ["a", "b"] {
            if rng.below(5) > 0 {
                data.push((f, values(&mut rng)));
            }
        }
        if rng.below(2) == 0 {
            data.push(("n", nested(object(vec![("x", values(&mut rng))]))));
        }
        let doc = object(data);
        let id = format!("d{:02}", (i * 37) % 61);
        reference
            .client
            .save(save("r", &id, doc.clone()))
            .await
            .unwrap();
        t.client.save(save("r", &id, doc)).await.unwrap();
    }
    let ops = [
        Operator::Equal,
        Operator::NotEqual,
        Operator::LessThan,
        Operator::LessThanOrEqual,
        Operator::GreaterThan,
        Operator::GreaterThanOrEqual,
        Operator::In,
        Operator::NotIn,
        Operator::ArrayContains,
        Operator::Exists,
    ];
    for round in 0..80 {
        let mut filters = Vec::new();
        for _ in 0..rng.below(3) {
            let field = fields[rng.below(3) as usize];
            let op = ops[rng.below(ops.len() as u64) as usize];
            let value = match op {
                Operator::In | Operator::NotIn => list(vec![values(&mut rng), values(&mut rng)]),
                Operator::Exists => boolean(rng.below(2) == 0),
                Operator::LessThan
                | Operator::LessThanOrEqual
                | Operator::GreaterThan
                | Operator::GreaterThanOrEqual => match rng.below(3) {
                    0 => num(rng.below(5) as f64 - 2.0),
                    1 => string(["a", "b", ""][rng.below(3) as usize]),
                    _ => boolean(rng.below(2) == 0),
                },
                _ => values(&mut rng),
            };
            filters.push(filter(field, op, value));
        }
        let mut order_by = Vec::new();
        for _ in 0..rng.below(3) {
            let field = fields[rng.below(3) as usize];
            if order_by.iter().any(|o: &Order| o.field == field) {
                continue;
            }
            let dir = if rng.below(2) == 0 {
                Direction::Ascending
            } else {
                Direction::Descending
            };
            order_by.push(order(field, dir));
        }
        let request = QueryRequest {
            collection: "r".into(),
            filters: filters.clone(),
            order_by,
            ..Default::default()
        };
        let size = 1 + rng.below(7) as i32;
        let expected = query_ids(&mut reference.client, request.clone(), size).await;
        let actual = query_ids(&mut t.client, request.clone(), size).await;
        assert_eq!(actual, expected, "round {round}: {request:?}");
        let count = |client: &mut Client| {
            let mut client = client.clone();
            let filters = filters.clone();
            async move {
                client
                    .count(CountRequest {
                        collection: "r".into(),
                        filters,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .count
            }
        };
        assert_eq!(
            count(&mut t.client).await,
            count(&mut reference.client).await,
            "round {round}"
        );
    }
}
