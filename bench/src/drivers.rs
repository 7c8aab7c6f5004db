//! The clients of every target: gRPC (the sidecar, the transport floor) and the raw
//! drivers (tokio-postgres behind deadpool, rusqlite on the blocking pool,
//! mysql_async with its pool), which issue the same SQL as `src/store/postgres`,
//! `src/store/sqlite` and `src/store/mysql`.

use crate::query;
use crate::workload::{doc_id, Op, Payload, COLLECTION, PAGE_SIZE};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use docsidecar::proto::{self, mutation};
use docsidecar::store::{new_rev, now_micros};
use docsidecar::DocumentServiceClient;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

/// One List page as each kind of target addresses it.
#[derive(Debug, Clone)]
pub struct PageRef {
    /// The sidecar's opaque token ("" for the first page).
    pub token: String,
    /// The raw driver's keyset: the last id of the previous page.
    pub after: Option<String>,
}

/// What every request needs besides its [`Op`].
pub struct Shared {
    pub payload: Payload,
    pub pages: Vec<PageRef>,
}

/// A connection (gRPC) or a handle on a pool (raw driver); cheap to clone.
#[derive(Clone)]
pub enum Client {
    Grpc(DocumentServiceClient<Channel>),
    Pg(Arc<RawPg>),
    Sqlite(Arc<RawSqlite>),
    Mysql(Arc<RawMysql>),
}

pub type OpResult = Result<(), String>;

impl Client {
    pub async fn run(&mut self, op: &Op, shared: &Shared) -> OpResult {
        if matches!(op, Op::Query(_) | Op::Count(_)) {
            return query_op(self, op).await;
        }
        match self {
            Client::Grpc(c) => grpc(c, op, shared).await,
            Client::Pg(p) => p.run(op, shared).await,
            Client::Sqlite(s) => s.run(op, shared).await,
            Client::Mysql(m) => m.run(op, shared).await,
        }
    }

    /// The ids of customer `k`'s first query page (`crate::query`).
    pub async fn query_ids(&mut self, k: u64) -> Result<Vec<String>, String> {
        match self {
            Client::Grpc(c) => Ok(c
                .query(query::query_request(k))
                .await
                .map_err(status)?
                .into_inner()
                .documents
                .into_iter()
                .map(|d| d.id)
                .collect()),
            Client::Pg(p) => p.query(k).await,
            Client::Sqlite(s) => s.query(k).await,
            Client::Mysql(m) => m.query(k).await,
        }
    }

    /// The database's plan of the raw query (customer 0) and count (status 0):
    /// its EXPLAIN lines.
    pub async fn explain(&self) -> Result<Vec<String>, String> {
        match self {
            Client::Grpc(_) => Ok(Vec::new()),
            Client::Pg(p) => p.explain().await,
            Client::Sqlite(s) => s.explain().await,
            Client::Mysql(m) => m.explain().await,
        }
    }

    /// The count of status `k`'s documents (`crate::query`).
    pub async fn count(&mut self, k: u64) -> Result<u64, String> {
        match self {
            Client::Grpc(c) => Ok(c
                .count(query::count_request(k))
                .await
                .map_err(status)?
                .into_inner()
                .count as u64),
            Client::Pg(p) => p.count(k).await,
            Client::Sqlite(s) => s.count(k).await,
            Client::Mysql(m) => m.count(k).await,
        }
    }
}

/// A query page must hold documents; a count is read and dropped.
async fn query_op(client: &mut Client, op: &Op) -> OpResult {
    match op {
        Op::Query(k) => {
            let ids = client.query_ids(*k).await?;
            if ids.is_empty() || ids.len() > query::PAGE {
                return Err(format!("a query page of {} documents", ids.len()));
            }
            black_box(ids);
        }
        Op::Count(k) => {
            black_box(client.count(*k).await?);
        }
        _ => unreachable!("query operations only"),
    }
    Ok(())
}

/// A gRPC channel: one HTTP/2 connection over TCP (`host:port`) or a Unix socket
/// (`unix:/path`).
pub async fn connect(address: &str) -> Result<Channel, String> {
    let result = match address.strip_prefix("unix:") {
        Some(path) => {
            let path = path.to_string();
            // The URI is required but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
        }
        None => {
            Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| e.to_string())?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
        }
    };
    result.map_err(|e| format!("cannot connect to {address}: {e}"))
}

/// `connections` independent connections to one address.
pub async fn grpc_clients(address: &str, connections: usize) -> Result<Vec<Client>, String> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let client = DocumentServiceClient::new(connect(address).await?)
            .max_decoding_message_size(64 * 1024 * 1024);
        clients.push(Client::Grpc(client));
    }
    Ok(clients)
}

fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

fn save_request(i: u64, shared: &Shared) -> proto::SaveRequest {
    proto::SaveRequest {
        collection: COLLECTION.into(),
        id: doc_id(i),
        data: Some(shared.payload.data.clone()),
        expected_rev: String::new(),
        create_only: false,
        ..Default::default()
    }
}

/// A Write of one upsert per id, as the preload and the Write workload send it.
pub fn write_request(ids: &[u64], shared: &Shared) -> proto::WriteRequest {
    proto::WriteRequest {
        mutations: ids
            .iter()
            .map(|&i| proto::Mutation {
                op: Some(mutation::Op::Save(save_request(i, shared))),
            })
            .collect(),
    }
}

async fn grpc(c: &mut DocumentServiceClient<Channel>, op: &Op, shared: &Shared) -> OpResult {
    match op {
        Op::Get(i) => {
            let doc = c
                .get(proto::GetRequest {
                    collection: COLLECTION.into(),
                    id: doc_id(*i),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if doc.data.is_none() {
                return Err("a document without data".into());
            }
            black_box(doc);
        }
        Op::Save(i) => {
            black_box(c.save(save_request(*i, shared)).await.map_err(status)?);
        }
        Op::List(page) => {
            let list = c
                .list(proto::ListRequest {
                    collection: COLLECTION.into(),
                    page_size: PAGE_SIZE as i32,
                    page_token: shared.pages[*page].token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if list.documents.len() != PAGE_SIZE {
                return Err(format!("a page of {} documents", list.documents.len()));
            }
            black_box(list);
        }
        Op::Write(ids) => {
            let written = c
                .write(write_request(ids, shared))
                .await
                .map_err(status)?
                .into_inner();
            if written.results.len() != ids.len() {
                return Err(format!("{} results", written.results.len()));
            }
        }
        Op::Query(_) | Op::Count(_) => unreachable!("served by query_op"),
    }
    Ok(())
}

/// What the stores build from a row.
#[allow(dead_code)] // read through black_box only
struct RawDoc {
    id: String,
    rev: String,
    data: String,
    create_time: i64,
    update_time: i64,
}

/// tokio-postgres behind a deadpool pool, with the sidecar's statements.
/// `ChangeKind::Saved`'s code in the PostgreSQL change table.
const PG_SAVED: i16 = 1;

pub struct RawPg {
    pool: Pool,
    get: String,
    upsert: String,
    first_page: String,
    next_page: String,
    /// The query workload's statements.
    query: query::RawSql,
}

impl RawPg {
    pub fn new(url: &str, schema: &str, pool_size: usize) -> Result<RawPg, String> {
        let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        cfg.application_name("docsidecar-bench-raw");
        let manager = Manager::from_config(
            cfg,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| e.to_string())?;
        let table = format!("\"{schema}\".\"{COLLECTION}\"");
        let columns = "id, rev, data::text, create_time, update_time";
        Ok(RawPg {
            pool,
            // The unscoped rows (scope ''), by primary key (scope, id), as the sidecar reads them.
            get: format!("SELECT {columns} FROM {table} WHERE scope = '' AND id = $1"),
            // The upsert and its change record (as every sidecar write records
            // one, `src/store/postgres/feed.rs`) in one statement: the least a
            // hand-written service with a change feed sends.
            upsert: format!(
                r#"WITH d AS (
                     INSERT INTO {table} AS d (id, rev, data, create_time, update_time)
                     VALUES ($1, $2, $3::text::jsonb, $4, $4)
                     ON CONFLICT (scope, id) DO UPDATE
                     SET rev = EXCLUDED.rev, data = EXCLUDED.data, update_time = EXCLUDED.update_time
                     RETURNING (d.xmax = 0) AS created, d.scope, d.id, d.rev, d.data, d.create_time, d.update_time, d.expire_time),
                 c AS (
                     INSERT INTO "{schema}"._changes (collection, scope, id, rev, kind, data, create_time, update_time, expire_time, commit_time)
                     SELECT '{COLLECTION}', scope, id, rev, {PG_SAVED}, data, create_time, update_time, expire_time, $4 FROM d)
                 SELECT created FROM d"#
            ),
            first_page: format!(
                "SELECT {columns} FROM {table} WHERE scope = '' ORDER BY id LIMIT $1"
            ),
            next_page: format!(
                "SELECT {columns} FROM {table} WHERE scope = '' AND id > $1 ORDER BY id LIMIT $2"
            ),
            query: query::pg_sql(schema),
        })
    }

    /// The query page of customer `k`: its ids, the rows read as the store reads them.
    async fn query(&self, k: u64) -> Result<Vec<String>, String> {
        let pg = |e: tokio_postgres::Error| e.to_string();
        let c = self.pool.get().await.map_err(|e| e.to_string())?;
        let stmt = c.prepare_cached(&self.query.query).await.map_err(pg)?;
        let key = query::string_key(&query::customer(k));
        let rows = c.query(&stmt, &[&0i64, &"", &key]).await.map_err(pg)?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in rows.iter().take(query::PAGE) {
            let doc: (String, String, String, String, i64, i64, Option<i64>) = (
                row.try_get(0).map_err(pg)?,
                row.try_get(1).map_err(pg)?,
                row.try_get(2).map_err(pg)?,
                row.try_get(3).map_err(pg)?,
                row.try_get(4).map_err(pg)?,
                row.try_get(5).map_err(pg)?,
                row.try_get(6).map_err(pg)?,
            );
            ids.push(black_box(doc).1);
        }
        Ok(ids)
    }

    async fn explain(&self) -> Result<Vec<String>, String> {
        let pg = |e: tokio_postgres::Error| e.to_string();
        let c = self.pool.get().await.map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        for (sql, key) in [
            (&self.query.query, query::string_key(&query::customer(0))),
            (&self.query.count, query::string_key(query::status(0))),
        ] {
            let rows = c
                .query(&format!("EXPLAIN {sql}"), &[&0i64, &"", &key])
                .await
                .map_err(pg)?;
            lines.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        Ok(lines)
    }

    async fn count(&self, k: u64) -> Result<u64, String> {
        let pg = |e: tokio_postgres::Error| e.to_string();
        let c = self.pool.get().await.map_err(|e| e.to_string())?;
        let stmt = c.prepare_cached(&self.query.count).await.map_err(pg)?;
        let key = query::string_key(query::status(k));
        let row = c.query_one(&stmt, &[&0i64, &"", &key]).await.map_err(pg)?;
        Ok(row.try_get::<_, i64>(0).map_err(pg)? as u64)
    }

    fn doc(row: &tokio_postgres::Row) -> Result<RawDoc, tokio_postgres::Error> {
        Ok(RawDoc {
            id: row.try_get(0)?,
            rev: row.try_get(1)?,
            data: row.try_get(2)?,
            create_time: row.try_get(3)?,
            update_time: row.try_get(4)?,
        })
    }

    async fn upsert(
        &self,
        c: &impl deadpool_postgres::GenericClient,
        i: u64,
        json: &str,
        now: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let stmt = c.prepare_cached(&self.upsert).await?;
        let row = c
            .query_one(&stmt, &[&doc_id(i), &new_rev(), &json, &now])
            .await?;
        row.try_get(0)
    }

    async fn run(&self, op: &Op, shared: &Shared) -> OpResult {
        let pg = |e: tokio_postgres::Error| e.to_string();
        let mut c = self.pool.get().await.map_err(|e| e.to_string())?;
        match op {
            Op::Get(i) => {
                let stmt = c.prepare_cached(&self.get).await.map_err(pg)?;
                let row = c
                    .query_opt(&stmt, &[&doc_id(*i)])
                    .await
                    .map_err(pg)?
                    .ok_or("not found")?;
                black_box(Self::doc(&row).map_err(pg)?);
            }
            Op::Save(i) => {
                black_box(
                    self.upsert(&c, *i, &shared.payload.json, now_micros())
                        .await
                        .map_err(pg)?,
                );
            }
            Op::List(page) => {
                let fetch = PAGE_SIZE as i64 + 1;
                let rows = match &shared.pages[*page].after {
                    Some(after) => {
                        let stmt = c.prepare_cached(&self.next_page).await.map_err(pg)?;
                        c.query(&stmt, &[after, &fetch]).await.map_err(pg)?
                    }
                    None => {
                        let stmt = c.prepare_cached(&self.first_page).await.map_err(pg)?;
                        c.query(&stmt, &[&fetch]).await.map_err(pg)?
                    }
                };
                let mut docs = rows.iter().map(Self::doc).collect::<Result<Vec<_>, _>>();
                if let Ok(docs) = &mut docs {
                    docs.truncate(PAGE_SIZE);
                }
                black_box(docs.map_err(pg)?);
            }
            Op::Query(_) | Op::Count(_) => unreachable!("served by Client::run"),
            Op::Write(ids) => {
                let tx = c
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
                    .start()
                    .await
                    .map_err(pg)?;
                let now = now_micros();
                for &i in ids {
                    black_box(
                        self.upsert(&tx, i, &shared.payload.json, now)
                            .await
                            .map_err(pg)?,
                    );
                }
                tx.commit().await.map_err(pg)?;
            }
        }
        Ok(())
    }
}

/// rusqlite: one writer connection and a pool of read-only connections, with the
/// sidecar's statements and pragmas; Gets on the calling task, everything else
/// on tokio's blocking pool, as the sidecar does.
pub struct RawSqlite {
    writer: Arc<tokio::sync::Mutex<Connection>>,
    readers: Arc<Readers>,
}

struct Readers {
    path: std::path::PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl Readers {
    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn give_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

const SQLITE_COLUMNS: &str = "id, rev, data, create_time, update_time";

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(32);
    // The query workload's indexes are on the sidecar's key function.
    query::register_key(conn)?;
    Ok(())
}

fn sqlite_doc(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawDoc> {
    Ok(RawDoc {
        id: row.get(0)?,
        rev: row.get(1)?,
        data: row.get(2)?,
        create_time: row.get(3)?,
        update_time: row.get(4)?,
    })
}

/// The sidecar's save: read the current rev, then update or insert, in the
/// caller's `BEGIN IMMEDIATE` transaction.
fn sqlite_save(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    json: &str,
    now: i64,
) -> rusqlite::Result<bool> {
    let existing: Option<(String, i64)> = tx
        .prepare_cached("SELECT rev, create_time FROM documents WHERE collection = ?1 AND id = ?2")?
        .query_row(params![COLLECTION, id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let rev = new_rev();
    if existing.is_some() {
        tx.prepare_cached(
            "UPDATE documents SET rev = ?3, data = ?4, update_time = ?5 WHERE collection = ?1 AND id = ?2",
        )?
        .execute(params![COLLECTION, id, rev, json, now])?;
    } else {
        tx.prepare_cached("INSERT OR IGNORE INTO collections (name, create_time) VALUES (?1, ?2)")?
            .execute(params![COLLECTION, now])?;
        tx.prepare_cached(
            "INSERT INTO documents (collection, id, rev, data, create_time, update_time) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        )?
        .execute(params![COLLECTION, id, rev, json, now])?;
    }
    Ok(existing.is_none())
}

impl RawSqlite {
    /// The query page of customer `k` on the blocking pool, as the sidecar reads it.
    async fn query(&self, k: u64) -> Result<Vec<String>, String> {
        let key = query::string_key(&query::customer(k));
        self.read(move |conn| {
            let now = now_micros();
            let mut stmt = conn.prepare_cached(&query::sqlite_sql().query)?;
            let rows = stmt.query_map(params![now, "", key], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })?;
            let mut ids = Vec::with_capacity(query::PAGE);
            for row in rows.take(query::PAGE) {
                ids.push(black_box(row?).1);
            }
            Ok(ids)
        })
        .await
    }

    async fn explain(&self) -> Result<Vec<String>, String> {
        self.read(move |conn| {
            let mut lines = Vec::new();
            let sql = query::sqlite_sql();
            for (sql, key) in [
                (sql.query, query::string_key(&query::customer(0))),
                (sql.count, query::string_key(query::status(0))),
            ] {
                let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let rows =
                    stmt.query_map(params![now_micros(), "", key], |r| r.get::<_, String>(3))?;
                for row in rows {
                    lines.push(row?);
                }
            }
            Ok(lines)
        })
        .await
    }

    async fn count(&self, k: u64) -> Result<u64, String> {
        let key = query::string_key(query::status(k));
        self.read(move |conn| {
            conn.prepare_cached(&query::sqlite_sql().count)?
                .query_row(params![now_micros(), "", key], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
        })
        .await
    }

    pub fn open(path: &std::path::Path, readers: usize) -> Result<RawSqlite, String> {
        let writer = Connection::open(path).map_err(|e| e.to_string())?;
        configure(&writer).map_err(|e| e.to_string())?;
        Ok(RawSqlite {
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            readers: Arc::new(Readers {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(readers.max(1))),
            }),
        })
    }

    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
        let permits = self.readers.permits.clone();
        permits.acquire_owned().await.map_err(|e| e.to_string())
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let permit = self.permit().await?;
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match readers.take_idle() {
                Some(conn) => conn,
                None => {
                    let conn = Connection::open_with_flags(
                        &readers.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY
                            | OpenFlags::SQLITE_OPEN_NO_MUTEX
                            | OpenFlags::SQLITE_OPEN_URI,
                    )?;
                    configure(&conn)?;
                    conn
                }
            };
            let result = f(&conn);
            readers.give_back(conn);
            drop(permit);
            result
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// A point read on the calling task, as the sidecar's Get does it (see
    /// `SqliteStore::read_point`); the first reads open the connections.
    async fn read_point<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let permit = self.permit().await?;
        let Some(conn) = self.readers.take_idle() else {
            drop(permit);
            return self.read(f).await;
        };
        let result = f(&conn);
        self.readers.give_back(conn);
        drop(permit);
        result.map_err(|e| e.to_string())
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let mut conn = self.writer.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn run(&self, op: &Op, shared: &Shared) -> OpResult {
        match op {
            Op::Get(i) => {
                let id = doc_id(*i);
                let doc = self
                    .read_point(move |conn| {
                        conn.prepare_cached(&format!(
                            "SELECT {SQLITE_COLUMNS} FROM documents WHERE collection = ?1 AND scope = '' AND id = ?2"
                        ))?
                        .query_row(params![COLLECTION, id], sqlite_doc)
                        .optional()
                    })
                    .await?;
                black_box(doc.ok_or("not found")?);
            }
            Op::Save(i) => {
                let (id, json) = (doc_id(*i), shared.payload.json.clone());
                let created = self
                    .write(move |conn| {
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let created = sqlite_save(&tx, &id, &json, now_micros())?;
                        tx.commit()?;
                        Ok(created)
                    })
                    .await?;
                black_box(created);
            }
            Op::List(page) => {
                let after = shared.pages[*page].after.clone();
                let docs = self
                    .read(move |conn| {
                        let limit = PAGE_SIZE as i64 + 1;
                        let mut docs = match &after {
                            Some(after) => conn
                                .prepare_cached(&format!(
                                    "SELECT {SQLITE_COLUMNS} FROM documents WHERE collection = ?1 AND scope = '' AND id > ?2 ORDER BY id LIMIT ?3"
                                ))?
                                .query_map(params![COLLECTION, after, limit], sqlite_doc)?
                                .collect::<rusqlite::Result<Vec<_>>>()?,
                            None => conn
                                .prepare_cached(&format!(
                                    "SELECT {SQLITE_COLUMNS} FROM documents WHERE collection = ?1 AND scope = '' ORDER BY id LIMIT ?2"
                                ))?
                                .query_map(params![COLLECTION, limit], sqlite_doc)?
                                .collect::<rusqlite::Result<Vec<_>>>()?,
                        };
                        docs.truncate(PAGE_SIZE);
                        Ok(docs)
                    })
                    .await?;
                black_box(docs);
            }
            Op::Query(_) | Op::Count(_) => unreachable!("served by Client::run"),
            Op::Write(ids) => {
                let ids: Vec<String> = ids.iter().map(|&i| doc_id(i)).collect();
                let json = shared.payload.json.clone();
                let created = self
                    .write(move |conn| {
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let now = now_micros();
                        let mut created = 0;
                        for id in &ids {
                            created += usize::from(sqlite_save(&tx, id, &json, now)?);
                        }
                        tx.commit()?;
                        Ok(created)
                    })
                    .await?;
                black_box(created);
            }
        }
        Ok(())
    }
}

/// The MariaDB/MySQL document columns, as `src/store/mysql` reads them.
const MYSQL_COLUMNS: &str = "scope, id, rev, data, create_time, update_time, expire_time";
/// The database's clock in microseconds plus the (test) clock offset: one `?`.
const MYSQL_NOW: &str = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) + ?)";
/// A row is live at the database's time: one `?`.
const MYSQL_LIVE: &str =
    "(expire_time IS NULL OR expire_time > (TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) + ?))";
/// The change record every Save writes in its transaction (`src/store/mysql/feed.rs`).
const MYSQL_CHANGE: &str = "INSERT INTO `_changes` (collection, scope, id, rev, kind, data, create_time, update_time, expire_time, commit_time)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
/// `ChangeKind::Saved`'s code in the change table.
const MYSQL_SAVED: i64 = 1;

/// mysql_async connections in a pool like the sidecar's (idle connections
/// reused as they are: no reset on return), the sidecar's session settings and
/// statements: a Save is the sidecar's transaction (the database's time, the
/// row read `FOR UPDATE`, insert or update, the change record), so the two
/// compare like with like.
pub struct RawMysql {
    opts: mysql_async::Opts,
    idle: Mutex<Vec<mysql_async::Conn>>,
    permits: Arc<Semaphore>,
    /// Write the change record with each Save (the sidecar always does); off
    /// only to measure what the change log costs.
    pub change_log: bool,
}

/// A pooled connection, back in the pool when dropped (closed instead by
/// [`MysqlConn::discard`] after an error, as the sidecar's pool does).
struct MysqlConn<'a> {
    conn: Option<mysql_async::Conn>,
    pool: &'a RawMysql,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl MysqlConn<'_> {
    fn get(&mut self) -> &mut mysql_async::Conn {
        self.conn.as_mut().expect("taken only on drop")
    }

    fn discard(mut self) {
        self.conn = None;
    }
}

impl Drop for MysqlConn<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }
}

#[allow(dead_code)] // read through black_box only
struct RawMysqlDoc {
    scope: Vec<u8>,
    id: Vec<u8>,
    rev: Vec<u8>,
    data: Vec<u8>,
    create_time: i64,
    update_time: i64,
    expire_time: Option<i64>,
}

type MysqlRow = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, i64, i64, Option<i64>);

fn mysql_doc(r: MysqlRow) -> RawMysqlDoc {
    RawMysqlDoc {
        scope: r.0,
        id: r.1,
        rev: r.2,
        data: r.3,
        create_time: r.4,
        update_time: r.5,
        expire_time: r.6,
    }
}

impl RawMysql {
    /// A pool of `pool_size` connections to `url` (its database must exist),
    /// opened on first use.
    pub fn new(url: &str, pool_size: usize) -> Result<RawMysql, String> {
        use mysql_async::{Opts, OptsBuilder};
        let opts = Opts::from_url(url).map_err(|e| e.to_string())?;
        let opts = OptsBuilder::from_opts(opts)
            .prefer_socket(false)
            .tcp_nodelay(true)
            .stmt_cache_size(256)
            .setup(vec![
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_string(),
                "SET NAMES utf8mb4, time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'".to_string(),
            ]);
        Ok(RawMysql {
            opts: opts.into(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(pool_size.max(1))),
            change_log: true,
        })
    }

    /// A connection of the pool: an idle one, else a new one (at most `pool_size`).
    async fn conn(&self) -> Result<MysqlConn<'_>, mysql_async::Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => mysql_async::Conn::new(self.opts.clone()).await?,
        };
        Ok(MysqlConn {
            conn: Some(conn),
            pool: self,
            _permit: permit,
        })
    }

    /// The sidecar's save of one document in the caller's transaction.
    async fn save(
        &self,
        conn: &mut mysql_async::Conn,
        id: &str,
        json: &str,
        now: i64,
    ) -> Result<bool, mysql_async::Error> {
        use mysql_async::prelude::*;
        use mysql_async::Value;
        let columns = MYSQL_COLUMNS.replace("data", "''");
        let existing: Option<MysqlRow> = conn
            .exec_first(
                format!(
                    "SELECT {columns} FROM `{COLLECTION}` WHERE scope = ? AND id = ? FOR UPDATE"
                ),
                (&b""[..], id.as_bytes()),
            )
            .await?;
        let rev = new_rev();
        let create_time = existing.as_ref().map_or(now, |r| r.4);
        let mut params: Vec<Value> = vec![
            Value::Bytes(Vec::new()),
            Value::Bytes(id.as_bytes().to_vec()),
            Value::Bytes(rev.as_bytes().to_vec()),
            Value::Bytes(json.as_bytes().to_vec()),
            create_time.into(),
            now.into(),
            Value::NULL,
        ];
        let sql = if existing.is_some() {
            params.extend([
                Value::Bytes(Vec::new()),
                Value::Bytes(id.as_bytes().to_vec()),
            ]);
            format!(
                "UPDATE `{COLLECTION}` SET scope = ?, id = ?, rev = ?, data = ?, create_time = ?, update_time = ?, expire_time = ?
                 WHERE scope = ? AND id = ?"
            )
        } else {
            format!(
                "INSERT INTO `{COLLECTION}` (scope, id, rev, data, create_time, update_time, expire_time)
                 VALUES (?, ?, ?, ?, ?, ?, ?)"
            )
        };
        conn.exec_drop(sql, params).await?;
        if self.change_log {
            conn.exec_drop(
                MYSQL_CHANGE,
                vec![
                    Value::Bytes(COLLECTION.as_bytes().to_vec()),
                    Value::Bytes(Vec::new()),
                    Value::Bytes(id.as_bytes().to_vec()),
                    Value::Bytes(rev.as_bytes().to_vec()),
                    Value::Int(MYSQL_SAVED),
                    Value::Bytes(json.as_bytes().to_vec()),
                    Value::Int(create_time),
                    Value::Int(now),
                    Value::NULL,
                    Value::Int(now),
                ],
            )
            .await?;
        }
        Ok(existing.is_none())
    }

    /// One transaction saving `ids`, as the sidecar's Write (and Save) runs it.
    async fn write(&self, ids: &[u64], json: &str) -> Result<usize, mysql_async::Error> {
        use mysql_async::prelude::*;
        let mut pooled = self.conn().await?;
        let conn = pooled.get();
        conn.query_drop("START TRANSACTION").await?;
        let result = async {
            let now: i64 = conn
                .exec_first(format!("SELECT {MYSQL_NOW}"), (0i64,))
                .await?
                .unwrap_or_default();
            let mut created = 0;
            for &i in ids {
                created += usize::from(self.save(conn, &doc_id(i), json, now).await?);
            }
            conn.query_drop("COMMIT").await?;
            Ok(created)
        }
        .await;
        if result.is_err() && conn.query_drop("ROLLBACK").await.is_err() {
            pooled.discard();
        }
        result
    }

    /// The query page of customer `k`: its ids, the rows read as the store reads them.
    async fn query(&self, k: u64) -> Result<Vec<String>, String> {
        use mysql_async::prelude::*;
        let my = |e: mysql_async::Error| e.to_string();
        let mut pooled = self.conn().await.map_err(my)?;
        let docs: Vec<RawMysqlDoc> = pooled
            .get()
            .exec_map(
                query::mysql_sql().query,
                (0i64, &b""[..], query::string_key(&query::customer(k))),
                mysql_doc,
            )
            .await
            .map_err(my)?;
        Ok(docs
            .into_iter()
            .take(query::PAGE)
            .map(|d| String::from_utf8_lossy(&black_box(d).id).into_owned())
            .collect())
    }

    async fn explain(&self) -> Result<Vec<String>, String> {
        use mysql_async::prelude::*;
        let my = |e: mysql_async::Error| e.to_string();
        let mut pooled = self.conn().await.map_err(my)?;
        let sql = query::mysql_sql();
        let mut lines = Vec::new();
        for (sql, key) in [
            (sql.query, query::string_key(&query::customer(0))),
            (sql.count, query::string_key(query::status(0))),
        ] {
            let rows: Vec<mysql_async::Row> = pooled
                .get()
                .exec(format!("EXPLAIN {sql}"), (0i64, &b""[..], key))
                .await
                .map_err(my)?;
            for row in rows {
                let cells: Vec<String> = (0..row.len())
                    .map(|i| match row.as_ref(i) {
                        Some(mysql_async::Value::Bytes(b)) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        Some(mysql_async::Value::NULL) | None => "NULL".into(),
                        Some(v) => v.as_sql(true),
                    })
                    .collect();
                lines.push(cells.join(" | "));
            }
        }
        Ok(lines)
    }

    async fn count(&self, k: u64) -> Result<u64, String> {
        use mysql_async::prelude::*;
        let my = |e: mysql_async::Error| e.to_string();
        let mut pooled = self.conn().await.map_err(my)?;
        let n: Option<u64> = pooled
            .get()
            .exec_first(
                query::mysql_sql().count,
                (0i64, &b""[..], query::string_key(query::status(k))),
            )
            .await
            .map_err(my)?;
        Ok(n.unwrap_or_default())
    }

    async fn run(&self, op: &Op, shared: &Shared) -> OpResult {
        use mysql_async::prelude::*;
        let my = |e: mysql_async::Error| e.to_string();
        match op {
            Op::Get(i) => {
                let mut pooled = self.conn().await.map_err(my)?;
                let row: Option<MysqlRow> = pooled
                    .get()
                    .exec_first(
                        format!("SELECT {MYSQL_COLUMNS} FROM `{COLLECTION}` WHERE scope = ? AND id = ? AND {MYSQL_LIVE}"),
                        (&b""[..], doc_id(*i).into_bytes(), 0i64),
                    )
                    .await
                    .map_err(my)?;
                black_box(mysql_doc(row.ok_or("not found")?));
            }
            Op::Save(i) => {
                black_box(self.write(&[*i], &shared.payload.json).await.map_err(my)?);
            }
            Op::List(page) => {
                let mut pooled = self.conn().await.map_err(my)?;
                let after = shared.pages[*page].after.clone().unwrap_or_default();
                let fetch = PAGE_SIZE as u64 + 1;
                let mut docs: Vec<RawMysqlDoc> = pooled
                    .get()
                    .exec_map(
                        format!("SELECT {MYSQL_COLUMNS} FROM `{COLLECTION}` WHERE scope = ? AND id > ? AND {MYSQL_LIVE} ORDER BY id LIMIT ?"),
                        (&b""[..], after.into_bytes(), 0i64, fetch),
                        mysql_doc,
                    )
                    .await
                    .map_err(my)?;
                docs.truncate(PAGE_SIZE);
                black_box(docs);
            }
            Op::Query(_) | Op::Count(_) => unreachable!("served by Client::run"),
            Op::Write(ids) => {
                black_box(self.write(ids, &shared.payload.json).await.map_err(my)?);
            }
        }
        Ok(())
    }
}
