//! What the server-backed stores' unit tests share: reaching the test server
//! (or skipping), cleaning up from `Drop`, and the plain calls.

use super::*;
use std::future::Future;

/// The connection `connect` makes within five seconds, or `None` to skip the
/// test; `DOCSIDECAR_REQUIRE_DB=1` turns a skip into a failure.
pub async fn reach<T, E: std::fmt::Display>(
    server: &str,
    connect: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    let require = std::env::var("DOCSIDECAR_REQUIRE_DB").is_ok_and(|v| v == "1");
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(connected)) => Some(connected),
        Ok(Err(e)) if require => {
            panic!("DOCSIDECAR_REQUIRE_DB=1 but {server} is unreachable: {e}")
        }
        Err(_) if require => panic!("DOCSIDECAR_REQUIRE_DB=1 but {server} did not answer"),
        _ => {
            println!("skipped: no {server}");
            None
        }
    }
}

/// Runs `cleanup` to its end from `Drop`, which cannot await: on a thread
/// with its own runtime.
pub fn clean_up<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(cleanup());
    })
    .join();
}

/// An unconditional save of `data` in the default scope.
pub fn save(collection: &str, id: &str, data: &str) -> SaveOp {
    SaveOp {
        key: Key::new(collection, "", id),
        data: data.into(),
        expected_rev: None,
        create_only: false,
        expiry: Expiry::Never,
        protected: Arc::default(),
    }
}

/// One transaction across collections; the same id twice: insert, then
/// update. `first` and `second` are the data, as the store gives it back.
pub async fn one_write_spans_collections(s: &dyn DocumentStore, first: &str, second: &str) {
    let results = s
        .write(vec![
            Mutation::Save(save("alpha", "a", first)),
            Mutation::Save(save("beta", "b", "{}")),
            Mutation::Save(save("alpha", "a", second)),
        ])
        .await
        .unwrap();
    let created: Vec<bool> = results
        .iter()
        .map(|r| matches!(r, Written::Saved(s) if s.created))
        .collect();
    assert_eq!(created, [true, true, false]);
    assert_eq!(s.get_doc("alpha", "a").await.unwrap().data, second);
    assert_eq!(s.list_collections().await.unwrap(), ["alpha", "beta"]);
}

/// The plain calls, as the API makes them of the store's operations.
#[async_trait]
pub trait Calls: DocumentStore {
    async fn save_doc(&self, op: SaveOp) -> StoreResult<Saved> {
        match self
            .write(vec![Mutation::Save(op)])
            .await
            .map_err(StoreError::outside_mutation)?
            .pop()
        {
            Some(Written::Saved(saved)) => Ok(saved),
            other => panic!("{other:?}"),
        }
    }

    async fn get_doc(&self, collection: &str, id: &str) -> StoreResult<Document> {
        self.get(&Key::new(collection, "", id)).await
    }

    async fn list_docs(&self, collection: &str, limit: usize) -> StoreResult<Page> {
        let op = ListOp {
            collection: collection.into(),
            scopes: Scopes::One(String::new()),
            after: None,
            limit,
        };
        self.list(&op, Budget::unlimited()).await
    }
}

impl<S: DocumentStore + ?Sized> Calls for S {}
