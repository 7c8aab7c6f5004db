//! Declared query indexes on PostgreSQL, against a real server: `migrate`
//! builds them on key columns, a runtime role under row-level security gets
//! an index scan (EXPLAIN of the statement the store runs), and indexes no
//! service declares any more are dropped.

use super::tests::{admin, url, SchemaGuard};
use super::*;
use crate::store::key::encode;
use crate::store::query::{Condition, Field, Filter, Index, Order, Query};
use serde_json::json;

fn path(p: &str) -> Field {
    Field::Path(FieldPath::parse(p).unwrap())
}

fn index(fields: &[&str]) -> Index {
    Index::parse(&fields.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

fn plan(role: &str, scope: &str, indexes: Vec<Index>) -> migrate::MigratePlan {
    migrate::MigratePlan {
        collections: [("orders".to_string(), Grant::ReadWrite)].into(),
        grant_to: Some(role.into()),
        service: role.into(),
        scopes: [("orders".to_string(), scope.to_string())].into(),
        indexes: [("orders".to_string(), indexes)].into(),
        ..Default::default()
    }
}

/// `rows` orders in scopes s1 (even n) and s2 (odd n), inserted by the admin.
async fn load(admin: &tokio_postgres::Client, schema: &str, from: i32, to: i32) {
    admin
        .execute(
            &format!(
                "INSERT INTO \"{schema}\".orders (scope, id, rev, data, create_time, update_time)
                 SELECT CASE WHEN g % 2 = 0 THEN 's1' ELSE 's2' END, 'o' || lpad(g::text, 6, '0'), 'r1',
                        jsonb_build_object('customer', 'c' || (g % 100),
                            'status', (ARRAY['open','paid','sent','done','void'])[1 + g % 5],
                            'at', g * 10),
                        0, 0
                 FROM generate_series($1::int, $2::int) g"
            ),
            &[&from, &to],
        )
        .await
        .unwrap();
}

async fn query_indexes(admin: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    admin
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 AND indexname LIKE 'orders$k%' ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_indexes_serve_a_scoped_role_and_only_undeclared_ones_are_dropped() {
    let Some(admin) = admin().await else {
        return;
    };
    let u = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let schema = format!("idx_{u}");
    let _guard = SchemaGuard {
        name: schema.clone(),
    };
    let (a, b) = (format!("a_{u}"), format!("b_{u}"));
    for role in [&a, &b] {
        admin
            .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'"))
            .await
            .unwrap();
    }
    let mut cfg: tokio_postgres::Config = url().parse().unwrap();
    cfg.application_name(&schema);
    let target = PgTarget {
        schema: schema.clone(),
        auto_create: false,
        max_retries: 1,
        ..PgTarget::new(cfg.clone())
    };
    let by_customer = index(&["customer", "at desc"]);
    let by_status = index(&["status"]);

    // Rows before the indexes (the backfill fills them) and after (the trigger).
    migrate::migrate(&target, &plan(&a, "s1", vec![]))
        .await
        .unwrap();
    load(&admin, &schema, 1, 6000).await;
    migrate::migrate(
        &target,
        &plan(&a, "s1", vec![by_customer.clone(), by_status.clone()]),
    )
    .await
    .unwrap();
    migrate::migrate(&target, &plan(&b, "s2", vec![by_status.clone()]))
        .await
        .unwrap();
    load(&admin, &schema, 6001, 12000).await;
    admin
        .batch_execute(&format!("ANALYZE \"{schema}\".orders"))
        .await
        .unwrap();
    let names = query_indexes(&admin, &schema).await;
    assert_eq!(names.len(), 2, "{names:?}");

    // The runtime role of service a: row-level security applies to it.
    let mut cfg_a = cfg.clone();
    cfg_a.user(&a).password("pw");
    let store = PostgresStore::connect(
        &PgTarget {
            schema: schema.clone(),
            auto_create: false,
            max_retries: 1,
            ..PgTarget::new(cfg_a.clone())
        },
        &Tasks::new(),
        Clock::default(),
    )
    .await
    .unwrap();
    let q = Query {
        collection: "orders".into(),
        scopes: Scopes::One("s1".into()),
        filters: vec![Filter {
            field: path("customer"),
            condition: Condition::In(vec![encode(&json!("c8"))]),
        }],
        order: vec![Order {
            field: path("at"),
            descending: true,
        }],
        after: None,
        limit: 50,
    };
    let page = store.run_query(&q, Budget::unlimited()).await.unwrap();
    let want: Vec<String> = (0..50)
        .map(|i| format!("o{:06}", 11908 - 100 * i))
        .collect();
    let got: Vec<String> = page.documents.iter().map(|d| d.key.id.clone()).collect();
    assert_eq!(got, want);
    // The rest of the walk, a page at a time from each page's last document.
    let mut walked = got.clone();
    let mut last = page.documents.last().cloned();
    while let Some(doc) = last {
        let data: serde_json::Value = serde_json::from_str(&doc.data).unwrap();
        let next = Query {
            after: Some(crate::store::query::Cursor {
                keys: vec![encode(&data["at"])],
                id: doc.key.id.clone(),
                scope: doc.key.scope.clone(),
            }),
            ..q.clone()
        };
        let page = store.run_query(&next, Budget::unlimited()).await.unwrap();
        walked.extend(page.documents.iter().map(|d| d.key.id.clone()));
        last = page.documents.last().cloned();
    }
    let all: Vec<String> = (0..120)
        .map(|i| format!("o{:06}", 11908 - 100 * i))
        .collect();
    assert_eq!(walked, all);
    let count = Query {
        filters: vec![Filter {
            field: path("status"),
            condition: Condition::In(vec![encode(&json!("open"))]),
        }],
        order: vec![],
        ..q.clone()
    };
    assert_eq!(store.run_count(&count).await.unwrap(), 1200);

    // EXPLAIN, as that role, of the very statements the store ran.
    let (role, connection) = cfg_a.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    for (q, count, name) in [
        (&q, false, index_name_of(&by_customer)),
        (&count, true, index_name_of(&by_status)),
    ] {
        let (sql, params) = store.prepared(q, count).await.unwrap();
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let plan: String = role
            .query(&format!("EXPLAIN (FORMAT TEXT) {sql}"), &args)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0) + "\n")
            .collect();
        let column =
            keys::key_column(&FieldPath::parse(if count { "status" } else { "customer" }).unwrap());
        assert!(plan.contains(&name), "{sql}\n{plan}");
        let cond = plan
            .lines()
            .find(|l| l.contains("Index Cond"))
            .unwrap_or_default();
        assert!(
            cond.contains(&column),
            "the key is in the index condition:\n{plan}"
        );
        eprintln!("EXPLAIN as the runtime role:\n{plan}");
    }

    // Values of every type, written through the store (the trigger) as the
    // runtime role: each key column holds exactly the key of its field.
    for (i, value) in [
        "null",
        "true",
        "false",
        "-0.0",
        "1e300",
        "-2.5",
        "\"Ab\u{e9}\"",
        "[1,[2]]",
        "{\"b\":1,\"a\":[null]}",
    ]
    .iter()
    .enumerate()
    {
        let mut op = crate::store::testing::save("orders", &format!("t{i}"), "");
        op.key.scope = "s1".into();
        op.data = format!("{{\"customer\":{value},\"at\":{value}}}");
        let m = crate::store::Mutation::Save(op);
        store.write(vec![m]).await.unwrap();
    }
    for field in ["customer", "at", "status"] {
        let column = keys::key_column(&FieldPath::parse(field).unwrap());
        let wrong: i64 = admin
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{schema}\".orders
                     WHERE \"{column}\" IS DISTINCT FROM \"{schema}\".docsidecar_key(data #> ARRAY['{field}'])"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(wrong, 0, "rows whose {field} key column is not its key");
    }

    // The key-column path against the memory store (the reference): values
    // of every type, equality, IN, ranges and NOT_EQUAL with the declared
    // order, page by page through cursors. Every query keeps to customer
    // values the bulk rows above never hold.
    differential(&store).await;

    // Converging: an index another service still declares stays; one no
    // service declares goes; a rerun changes nothing.
    migrate::migrate(&target, &plan(&a, "s1", vec![by_customer.clone()]))
        .await
        .unwrap();
    assert_eq!(query_indexes(&admin, &schema).await, names);
    migrate::migrate(&target, &plan(&b, "s2", vec![]))
        .await
        .unwrap();
    let left = query_indexes(&admin, &schema).await;
    assert_eq!(left, vec![index_name_of(&by_customer)]);
    migrate::migrate(&target, &plan(&b, "s2", vec![]))
        .await
        .unwrap();
    assert_eq!(query_indexes(&admin, &schema).await, left);
    drop(store);
    for role in [&a, &b] {
        let _ = admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; DROP OWNED BY \"{role}\"; DROP ROLE IF EXISTS \"{role}\""
            ))
            .await;
    }
}

fn index_name_of(index: &Index) -> String {
    keys::index_name("orders", index)
}

/// Writes the same documents to `store` and a memory store and compares
/// every page of a set of queries on the declared `["customer", "at desc"]`.
async fn differential(store: &PostgresStore) {
    use crate::store::memory::MemoryStore;
    use crate::store::query::{order_keys, Cursor};
    use crate::store::{DocumentStore, Mutation};
    use std::ops::Bound;
    // None of them is a customer of the rows written before (bulk or typed).
    let customers = [
        "[true]",
        "7",
        "0.5",
        "-3",
        "\"x\"",
        "\"X\"",
        "\"\u{e9}\"",
        "[1]",
        "{\"k\":1}",
        "[]",
    ];
    let ats = [
        "null",
        "false",
        "true",
        "-1e10",
        "0",
        "3",
        "3.0",
        "7.25",
        "\"a\"",
        "\"b\u{1F600}\"",
        "[]",
        "[null,2]",
        "{}",
    ];
    let memory = MemoryStore::new(Clock::default());
    let mut seed = 7u64;
    for i in 0..150 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let c = customers[(seed >> 33) as usize % customers.len()];
        let a = ats[(seed >> 45) as usize % ats.len()];
        let data = if i % 11 == 0 {
            format!("{{\"customer\":{c}}}")
        } else {
            format!("{{\"customer\":{c},\"at\":{a}}}")
        };
        let mut op = crate::store::testing::save("orders", &format!("m{i:03}"), &data);
        op.key.scope = "s1".into();
        store.write(vec![Mutation::Save(op.clone())]).await.unwrap();
        memory.write(vec![Mutation::Save(op)]).await.unwrap();
    }
    let key = |v: &str| encode(&serde_json::from_str(v).unwrap());
    let pool: Vec<Vec<u8>> = customers.iter().map(|c| key(c)).collect();
    let conditions = |c: &str| {
        vec![
            vec![Filter {
                field: path("customer"),
                condition: Condition::In(vec![key(c)]),
            }],
            vec![
                Filter {
                    field: path("customer"),
                    condition: Condition::In(pool.clone()),
                },
                Filter {
                    field: path("at"),
                    condition: Condition::Range(
                        Bound::Excluded(key("0")),
                        Bound::Excluded(vec![crate::store::key::NUMBER + 1]),
                    ),
                },
            ],
            vec![
                Filter {
                    field: path("customer"),
                    condition: Condition::In(vec![key(c)]),
                },
                Filter {
                    field: path("at"),
                    condition: Condition::NotIn(vec![key("3")]),
                },
            ],
        ]
    };
    let mut pages = 0;
    for c in customers {
        for filters in conditions(c) {
            let mut q = Query {
                collection: "orders".into(),
                scopes: Scopes::One("s1".into()),
                filters,
                order: vec![Order {
                    field: path("at"),
                    descending: true,
                }],
                after: None,
                limit: 3,
            };
            loop {
                let ours = store.run_query(&q, Budget::unlimited()).await.unwrap();
                let want = memory.query(&q, Budget::unlimited()).await.unwrap();
                let ids = |p: &Page| {
                    p.documents
                        .iter()
                        .map(|d| d.key.id.clone())
                        .collect::<Vec<_>>()
                };
                assert_eq!(ids(&ours), ids(&want), "{q:?}");
                pages += 1;
                let Some(last) = want.documents.last().filter(|_| want.documents.len() == 3) else {
                    break;
                };
                let data: serde_json::Value = serde_json::from_str(&last.data).unwrap();
                q.after = Some(Cursor {
                    keys: order_keys(&q.order, last, &data).unwrap(),
                    id: last.key.id.clone(),
                    scope: last.key.scope.clone(),
                });
            }
            let count = Query {
                order: vec![],
                after: None,
                ..q.clone()
            };
            assert_eq!(
                store.run_count(&count).await.unwrap(),
                memory.count(&count).await.unwrap(),
                "{count:?}"
            );
        }
    }
    eprintln!("key-column path agrees with the memory store on {pages} pages");
}
