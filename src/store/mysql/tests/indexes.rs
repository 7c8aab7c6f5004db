//! Query indexes on MariaDB: declared by `migrate`, used through a scoped
//! account's view, converged across services; strings compared as bytes.

use super::*;
use crate::store::key::encode;
use crate::store::query::{Condition, Field, Filter, Index, Order, Query};
use crate::store::{FieldPath, Grant, MigratePlan};
use serde_json::json;
use std::collections::BTreeMap;
use std::ops::Bound;

fn path(p: &str) -> Field {
    Field::Path(FieldPath::parse(p).unwrap())
}

fn index(fields: &[&str]) -> Index {
    Index::parse(&fields.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

fn eq(field: &str, value: serde_json::Value) -> Filter {
    Filter {
        field: path(field),
        condition: Condition::In(vec![encode(&value)]),
    }
}

fn query(collection: &str, scope: &str, filters: Vec<Filter>, order: Vec<(&str, bool)>) -> Query {
    Query {
        collection: collection.into(),
        scopes: Scopes::One(scope.into()),
        filters,
        order: order
            .into_iter()
            .map(|(f, descending)| Order {
                field: path(f),
                descending,
            })
            .collect(),
        after: None,
        limit: 10,
    }
}

async fn run(s: &MysqlStore, q: &Query) -> Vec<String> {
    let page = s.query(q, Budget::unlimited()).await.unwrap();
    page.documents.into_iter().map(|d| d.key.id).collect()
}

/// Our indexes on `table`, by name.
async fn indexes_of(c: &mut mysql_async::Conn, table: &str) -> Vec<String> {
    let names: Vec<String> = c
        .exec(
            "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME LIKE 'q%'
             ORDER BY INDEX_NAME",
            (table,),
        )
        .await
        .unwrap();
    names
}

/// The session's handler and sort counters.
async fn session_counters(c: &mut mysql_async::Conn) -> BTreeMap<String, i64> {
    let rows: Vec<(String, String)> = c
        .query("SHOW SESSION STATUS WHERE Variable_name LIKE 'Handler_read%' OR Variable_name LIKE 'Sort%'")
        .await
        .unwrap();
    rows.into_iter()
        .map(|(k, v)| (k, v.parse().unwrap_or(0)))
        .collect()
}

async fn show_table(c: &mut mysql_async::Conn) -> String {
    let shown: Option<(String, String)> = c.query_first("SHOW CREATE TABLE orders").await.unwrap();
    shown.unwrap().1
}

fn plan(service: &str, account: Option<&str>, indexes: Vec<Index>) -> MigratePlan {
    MigratePlan {
        collections: BTreeMap::from([("orders".to_string(), Grant::ReadWrite)]),
        grant_to: account.map(str::to_string),
        service: service.into(),
        scopes: if account.is_some() {
            BTreeMap::from([("orders".to_string(), "twitch".to_string())])
        } else {
            BTreeMap::new()
        },
        indexes: BTreeMap::from([("orders".to_string(), indexes)]),
        ..MigratePlan::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_indexes_serve_a_scoped_account_through_its_view() {
    let Some(db) = database().await else {
        return;
    };
    let mut a = admin(&db).await;
    let user = format!("u{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    a.query_drop(format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'"
    ))
    .await
    .unwrap();
    struct DropUser(String);
    impl Drop for DropUser {
        fn drop(&mut self) {
            let user = self.0.clone();
            testing::clean_up(move || async move {
                if let Ok(mut c) = mysql_async::Conn::new(server_opts()).await {
                    let _ = c
                        .query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
                        .await;
                    let _ = c.disconnect().await;
                }
            });
        }
    }
    let _user = DropUser(user.clone());
    let account = format!("'{user}'@'%'");
    let declared = index(&["status", "created desc"]);
    migrate::migrate(
        &target(&db),
        &plan("shop", Some(&account), vec![declared.clone()]),
    )
    .await
    .unwrap();
    // 12,000 rows, half of them in scope twitch; 100 statuses.
    a.query_drop(
        "INSERT INTO orders (scope, id, rev, data, create_time, update_time)
         SELECT IF(seq % 2 = 0, 'twitch', 'discord'), LPAD(seq, 6, '0'), 'r',
                CONCAT('{\"status\":\"s', seq % 100, '\",\"created\":', seq, '}'), 0, 0
         FROM seq_1_to_12000",
    )
    .await
    .unwrap();
    a.query_drop("ANALYZE TABLE orders").await.unwrap();

    // The runtime account, confined to the view orders$twitch.
    let mut t = target(&db);
    t.user = user.clone();
    t.password = Some(format!("pw-{user}"));
    t.auto_create = false;
    let s = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
        .await
        .unwrap();
    let q = query(
        "orders",
        "twitch",
        vec![eq("status", json!("s8"))],
        vec![("created", true)],
    );
    let relation = s.pushdown(&q).await.unwrap();
    assert_eq!(
        relation.as_deref(),
        Some("`orders$twitch`"),
        "served by the key columns"
    );
    let expected: Vec<String> = (0..10).map(|i| format!("{:06}", 11908 - 100 * i)).collect();
    assert_eq!(run(&s, &q).await, expected);
    let mut second = q.clone();
    let first = s.query(&q, Budget::unlimited()).await.unwrap();
    let last = first.documents.last().unwrap();
    second.after = Some(crate::store::query::Cursor {
        keys: vec![encode(&json!(11008))],
        id: last.key.id.clone(),
        scope: last.key.scope.clone(),
    });
    assert_eq!(run(&s, &second).await[0], "010908", "the next page");
    // The scan gives the same page, reading every row of the scope.
    let timed = Instant::now();
    let indexed = s.query(&q, Budget::unlimited()).await.unwrap();
    let indexed_took = timed.elapsed();
    let timed = Instant::now();
    let scanned = s.scanned_page(&q, Budget::unlimited()).await.unwrap();
    let scanned_took = timed.elapsed();
    let page_ids = |p: &Page| {
        p.documents
            .iter()
            .map(|d| d.key.id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(page_ids(&indexed), page_ids(&scanned));
    assert_eq!(indexed.more, scanned.more);
    println!("a page of 10 of 6,000 rows: {indexed_took:?} through the index, {scanned_took:?} by the scan");
    let count = s
        .count(&Query {
            order: vec![],
            ..q.clone()
        })
        .await
        .unwrap();
    assert_eq!(count, 120);

    // The statement the store runs, through the view the runtime account
    // reads. MariaDB refuses EXPLAIN of a view to an account without
    // privileges on the table behind it (that is the point of the view), so
    // the plan is EXPLAINed by the admin, on that view, and the runtime
    // account's own run is measured by its session's handler counters.
    let sql = super::keys::query_sql(&q, None).unwrap();
    let statement = super::queries::page_statement("`orders$twitch`", &sql, 11);
    let mut params = vec![Value::from(0i64)];
    params.extend(sql.params.iter().cloned());
    let plan_rows: Vec<mysql_async::Row> = a
        .exec(format!("EXPLAIN {statement}"), params.clone())
        .await
        .unwrap();
    assert_eq!(plan_rows.len(), 1, "{plan_rows:?}");
    let row = &plan_rows[0];
    let get = |name: &str| -> String {
        match row.get_opt::<mysql_async::Value, _>(name) {
            Some(Ok(mysql_async::Value::Bytes(b))) => String::from_utf8_lossy(&b).into_owned(),
            Some(Ok(mysql_async::Value::Int(n))) => n.to_string(),
            Some(Ok(mysql_async::Value::UInt(n))) => n.to_string(),
            other => format!("{other:?}"),
        }
    };
    let line = ["table", "type", "key", "key_len", "rows", "Extra"]
        .map(|c| format!("{c}={}", get(c)))
        .join(" ");
    println!("EXPLAIN (view orders$twitch): {line}");
    assert_eq!(get("key"), super::keys::index_name(&declared), "{line}");
    assert!(!get("Extra").contains("filesort"), "{line}");
    assert!(get("rows").parse::<u64>().unwrap() <= 500, "{line}");

    // With a range on the ordered field too: one index range, no sort.
    let mut ranged = q.clone();
    ranged.filters.push(Filter {
        field: path("created"),
        condition: Condition::Range(
            Bound::Excluded(encode(&json!(11008))),
            Bound::Excluded(vec![crate::store::key::NUMBER + 1]),
        ),
    });
    let sql = super::keys::query_sql(&ranged, None).unwrap();
    let statement = super::queries::page_statement("`orders$twitch`", &sql, 11);
    let mut ranged_params = vec![Value::from(0i64)];
    ranged_params.extend(sql.params.iter().cloned());
    let row: mysql_async::Row = a
        .exec_first(format!("EXPLAIN {statement}"), ranged_params)
        .await
        .unwrap()
        .unwrap();
    let key: Option<String> = row.get("key");
    let extra: Option<String> = row.get("Extra");
    let rows: Option<u64> = row.get("rows");
    println!("EXPLAIN with a range: key={key:?} rows={rows:?} Extra={extra:?}");
    assert_eq!(key, Some(super::keys::index_name(&declared)));
    assert!(!extra.unwrap_or_default().contains("filesort"));
    assert!(rows.unwrap() <= 20, "{rows:?}");
    assert_eq!(run(&s, &ranged).await, expected[..9]);

    let sql = super::keys::query_sql(&q, None).unwrap();
    let statement = super::queries::page_statement("`orders$twitch`", &sql, 11);
    let mut runtime = mysql_async::Conn::new(
        server_opts()
            .db_name(Some(&db.name))
            .user(Some(&user))
            .pass(Some(format!("pw-{user}"))),
    )
    .await
    .unwrap();
    let denied = runtime
        .exec_drop(format!("EXPLAIN {statement}"), params.clone())
        .await;
    assert!(
        denied.is_err(),
        "EXPLAIN as the runtime account: {denied:?}"
    );
    let before = session_counters(&mut runtime).await;
    let rows: Vec<mysql_async::Row> = runtime.exec(&statement, params).await.unwrap();
    let after = session_counters(&mut runtime).await;
    assert_eq!(rows.len(), 11);
    let diff = |name: &str| after[name] - before[name];
    let read = diff("Handler_read_key") + diff("Handler_read_next") + diff("Handler_read_prev");
    println!(
        "runtime account, through its view: Handler_read_key+next+prev = {read}, Sort_rows = {}, Sort_scan = {}, Handler_read_rnd_next = {}",
        diff("Sort_rows"),
        diff("Sort_scan"),
        diff("Handler_read_rnd_next")
    );
    assert!(read <= 50, "{read} index reads for 11 rows");
    assert_eq!(
        diff("Sort_rows") + diff("Sort_scan") + diff("Sort_range"),
        0,
        "a filesort"
    );
    runtime.disconnect().await.unwrap();

    // A second run changes nothing.
    let before = show_table(&mut a).await;
    migrate::migrate(
        &target(&db),
        &plan("shop", Some(&account), vec![declared.clone()]),
    )
    .await
    .unwrap();
    assert_eq!(
        show_table(&mut a).await,
        before,
        "a rerun changed the table"
    );

    // Another service declares an index; the first one no longer declares
    // its own: that one goes, the other's stays.
    let by_created = index(&["created"]);
    let by_status = index(&["status"]);
    migrate::migrate(&target(&db), &plan("audit", None, vec![by_created.clone()]))
        .await
        .unwrap();
    let mut names = vec![
        super::keys::index_name(&declared),
        super::keys::index_name(&by_created),
    ];
    names.sort();
    assert_eq!(indexes_of(&mut a, "orders").await, names);
    migrate::migrate(
        &target(&db),
        &plan("shop", Some(&account), vec![by_status.clone()]),
    )
    .await
    .unwrap();
    let mut names = vec![
        super::keys::index_name(&by_status),
        super::keys::index_name(&by_created),
    ];
    names.sort();
    assert_eq!(indexes_of(&mut a, "orders").await, names);
    migrate::migrate(&target(&db), &plan("audit", None, vec![]))
        .await
        .unwrap();
    assert_eq!(
        indexes_of(&mut a, "orders").await,
        [super::keys::index_name(&by_status)]
    );
    // The store still answers (the dropped index's shape now scans in SQL).
    assert_eq!(run(&s, &q).await, expected);
    a.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_stay_distinct_through_the_index_path() {
    let Some(db) = database().await else {
        return;
    };
    let s = store(&db, Clock::default()).await;
    let long = "x".repeat(300);
    let docs = [
        ("abc", json!("abc")),
        ("ABC", json!("ABC")),
        ("e_acute", json!("é")),
        ("e", json!("e")),
        ("e_space", json!("e ")),
        ("long", json!(long)),
        ("long_a", json!(format!("{long}a"))),
        ("long_b", json!(format!("{long}b"))),
        ("n1", json!(1)),
        ("n1_5", json!(1.5)),
        ("arr", json!(["abc"])),
        ("obj", json!({"a": 1})),
        ("none", json!(null)),
    ];
    for (id, value) in &docs {
        let data = json!({ "name": value }).to_string();
        s.save_doc(save("words", id, &data)).await.unwrap();
    }
    let ids = |q: Query| {
        let s = &s;
        async move { run(s, &Query { limit: 100, ..q }).await }
    };
    let by = |v: serde_json::Value| query("words", "", vec![eq("name", v)], vec![]);
    assert_eq!(ids(by(json!("abc"))).await, ["abc"]);
    assert_eq!(ids(by(json!("ABC"))).await, ["ABC"]);
    assert_eq!(ids(by(json!("é"))).await, ["e_acute"]);
    assert_eq!(ids(by(json!("e"))).await, ["e"]);
    assert_eq!(ids(by(json!(format!("{long}a")))).await, ["long_a"]);
    assert_eq!(ids(by(json!(1.0))).await, ["n1"]);
    assert_eq!(ids(by(json!(["abc"]))).await, ["arr"]);
    // The index was made on first use (no policy), and serves these.
    let mut a = admin(&db).await;
    assert_eq!(indexes_of(&mut a, "words").await.len(), 1);
    a.disconnect().await.unwrap();

    // Ordered by bytes, long strings included; in pages too.
    let mut want: Vec<(Vec<u8>, &str)> = docs.iter().map(|(id, v)| (encode(v), *id)).collect();
    want.sort();
    let want: Vec<&str> = want.into_iter().map(|(_, id)| id).collect();
    let ordered = query("words", "", vec![], vec![("name", false)]);
    assert_eq!(ids(ordered.clone()).await, want);
    let mut walked = Vec::new();
    let mut q = Query {
        limit: 2,
        ..ordered
    };
    loop {
        let page = s.query(&q, Budget::unlimited()).await.unwrap();
        let last = page.documents.last().cloned();
        walked.extend(page.documents.into_iter().map(|d| d.key.id));
        let Some(last) = last.filter(|_| page.more) else {
            break;
        };
        let data: serde_json::Value = serde_json::from_str(&last.data).unwrap();
        q.after = Some(crate::store::query::Cursor {
            keys: vec![encode(&data["name"])],
            id: last.key.id,
            scope: last.key.scope,
        });
    }
    assert_eq!(walked, want);
    // A range on strings: from "e" (included) to long + "a" (excluded); "é"
    // is above "x" in bytes.
    let range = Filter {
        field: path("name"),
        condition: Condition::Range(
            Bound::Included(encode(&json!("e"))),
            Bound::Excluded(encode(&json!(format!("{long}a")))),
        ),
    };
    let q = query("words", "", vec![range.clone()], vec![("name", true)]);
    assert_eq!(ids(q).await, ["long", "e_space", "e"]);
    let q = query("words", "", vec![range], vec![]);
    assert_eq!(s.count(&q).await.unwrap(), 3);
}

/// Every id of `q`, page by page, through `page` (the index path or the scan).
async fn walk<'s, F, Fut>(q: &Query, page: F) -> Vec<String>
where
    F: Fn(Query) -> Fut,
    Fut: std::future::Future<Output = Page> + 's,
{
    let mut q = q.clone();
    let mut ids = Vec::new();
    loop {
        let got = page(q.clone()).await;
        let last = got.documents.last().cloned();
        ids.extend(got.documents.into_iter().map(|d| d.key.id));
        let Some(last) = last.filter(|_| got.more) else {
            return ids;
        };
        let data: serde_json::Value = serde_json::from_str(&last.data).unwrap();
        q.after = Some(crate::store::query::Cursor {
            keys: crate::store::query::order_keys(&q.order, &last, &data).unwrap(),
            id: last.key.id,
            scope: last.key.scope,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_path_agrees_with_the_scan_on_random_queries() {
    let Some(db) = database().await else {
        return;
    };
    let s = store(&db, Clock::default()).await;
    let mut seed = 7u64;
    let mut below = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let long = "y".repeat(260);
    let pool = [
        json!(null),
        json!(true),
        json!(false),
        json!(-0.0),
        json!(0),
        json!(0.1),
        json!(-2.5),
        json!(1e300),
        json!("a"),
        json!("A"),
        json!("é"),
        json!("e"),
        json!(""),
        json!(long.clone()),
        json!(format!("{long}a")),
        json!(format!("{long}b")),
        json!([1]),
        json!([]),
        json!({"k": 1}),
    ];
    for i in 0..80 {
        let mut doc = serde_json::Map::new();
        for f in ["a", "b"] {
            if below(6) > 0 {
                doc.insert(f.into(), pool[below(pool.len() as u64) as usize].clone());
            }
        }
        let id = format!("d{:02}", (i * 37) % 83);
        let data = serde_json::Value::Object(doc).to_string();
        s.save_doc(save("r", &id, &data)).await.unwrap();
    }
    for round in 0..60 {
        let mut filters = Vec::new();
        for _ in 0..below(3) {
            let field = path(["a", "b"][below(2) as usize]);
            let value = pool[below(pool.len() as u64) as usize].clone();
            let other = pool[below(pool.len() as u64) as usize].clone();
            let (low, high) = crate::store::key::type_range(&value);
            let condition = match below(6) {
                0 => Condition::In(vec![encode(&value)]),
                1 => Condition::In(vec![encode(&value), encode(&other)]),
                2 => Condition::NotIn(vec![encode(&value)]),
                3 => Condition::Range(Bound::Excluded(encode(&value)), Bound::Excluded(high)),
                4 => Condition::Range(Bound::Included(low), Bound::Included(encode(&value))),
                _ => Condition::Exists(below(2) == 0),
            };
            filters.push(Filter { field, condition });
        }
        let mut order = Vec::new();
        for f in ["a", "b"] {
            if below(2) == 0 {
                order.push((f, below(2) == 0));
            }
        }
        if below(2) == 0 {
            order.reverse();
        }
        let q = Query {
            limit: 1 + below(6) as usize,
            ..query("r", "", filters, order)
        };
        let indexed = walk(&q, |q| {
            let s = &s;
            async move { s.query(&q, Budget::unlimited()).await.unwrap() }
        })
        .await;
        let scanned = walk(&q, |q| {
            let s = &s;
            async move { s.scanned_page(&q, Budget::unlimited()).await.unwrap() }
        })
        .await;
        assert_eq!(indexed, scanned, "round {round}: {q:?}");
        let counted = s
            .count(&Query {
                order: vec![],
                ..q.clone()
            })
            .await
            .unwrap();
        let mut all = q.clone();
        all.order.clear();
        let every = walk(&all, |q| {
            let s = &s;
            async move { s.scanned_page(&q, Budget::unlimited()).await.unwrap() }
        })
        .await;
        assert_eq!(counted as usize, every.len(), "round {round}: {q:?}");
    }
}
