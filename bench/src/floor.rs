//! The transport floor: a no-op `DocumentService` that answers every call with
//! canned messages of the benchmark's sizes (the same document, pages of 100, one
//! result per mutation), so that what gRPC itself costs is known. It runs in its
//! own process (`docsidecar-bench floor-server`), like the sidecar.

use crate::workload::{Payload, COLLECTION, PAGE_SIZE};
use docsidecar::proto::document_service_server::{DocumentService, DocumentServiceServer};
use docsidecar::proto::{self, mutation::Op};
use prost_types::Timestamp;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// `floor-server` arguments (internal: the harness starts it).
#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// TCP address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub tcp: String,
    /// Also listen on this Unix socket.
    #[arg(long)]
    pub uds: Option<std::path::PathBuf>,
    /// JSON size of the canned document, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
}

struct Floor {
    doc: proto::Document,
    rev: String,
    time: Timestamp,
}

impl Floor {
    fn doc(&self, collection: String, id: String) -> proto::Document {
        proto::Document {
            collection,
            id,
            ..self.doc.clone()
        }
    }
}

#[tonic::async_trait]
impl DocumentService for Floor {
    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::Document>, Status> {
        let proto::GetRequest { collection, id, .. } = request.into_inner();
        Ok(Response::new(self.doc(collection, id)))
    }

    async fn save(
        &self,
        request: Request<proto::SaveRequest>,
    ) -> Result<Response<proto::SaveResponse>, Status> {
        Ok(Response::new(proto::SaveResponse {
            id: request.into_inner().id,
            rev: self.rev.clone(),
            update_time: Some(self.time),
            created: false,
        }))
    }

    async fn delete(
        &self,
        _request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        Ok(Response::new(proto::DeleteResponse {}))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let req = request.into_inner();
        let size = match req.page_size {
            n if n <= 0 => PAGE_SIZE,
            n => (n as usize).min(1000),
        };
        let documents = (0..size)
            .map(|i| self.doc(req.collection.clone(), crate::workload::doc_id(i as u64)))
            .collect();
        Ok(Response::new(proto::ListResponse {
            documents,
            next_page_token: "floor-next-page".into(),
            ..Default::default()
        }))
    }

    async fn batch_get(
        &self,
        request: Request<proto::BatchGetRequest>,
    ) -> Result<Response<proto::BatchGetResponse>, Status> {
        let req = request.into_inner();
        let documents = req
            .ids
            .into_iter()
            .map(|id| self.doc(req.collection.clone(), id))
            .collect();
        Ok(Response::new(proto::BatchGetResponse {
            documents,
            missing_ids: Vec::new(),
            ..Default::default()
        }))
    }

    async fn write(
        &self,
        request: Request<proto::WriteRequest>,
    ) -> Result<Response<proto::WriteResponse>, Status> {
        let results = request
            .into_inner()
            .mutations
            .into_iter()
            .map(|m| match m.op {
                Some(Op::Save(s)) => proto::MutationResult {
                    id: s.id,
                    rev: self.rev.clone(),
                },
                Some(Op::Delete(d)) => proto::MutationResult {
                    id: d.id,
                    rev: String::new(),
                },
                Some(Op::Update(u)) => proto::MutationResult {
                    id: u.id,
                    rev: self.rev.clone(),
                },
                None => proto::MutationResult::default(),
            })
            .collect();
        Ok(Response::new(proto::WriteResponse { results }))
    }

    async fn update(
        &self,
        request: Request<proto::UpdateRequest>,
    ) -> Result<Response<proto::UpdateResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(proto::UpdateResponse {
            document: Some(self.doc(req.collection, req.id.clone())),
            id: req.id,
            rev: self.rev.clone(),
            update_time: Some(self.time),
            created: false,
        }))
    }

    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<proto::QueryResponse>, Status> {
        let req = request.into_inner();
        let size = match req.page_size {
            n if n <= 0 => PAGE_SIZE,
            n => (n as usize).min(1000),
        };
        let documents = (0..size)
            .map(|i| self.doc(req.collection.clone(), crate::workload::doc_id(i as u64)))
            .collect();
        Ok(Response::new(proto::QueryResponse {
            documents,
            next_page_token: "floor-next-page".into(),
            ..Default::default()
        }))
    }

    async fn count(
        &self,
        _request: Request<proto::CountRequest>,
    ) -> Result<Response<proto::CountResponse>, Status> {
        Ok(Response::new(proto::CountResponse { count: 0 }))
    }

    type WatchStream = futures_util::stream::BoxStream<'static, Result<proto::ChangeEvent, Status>>;

    async fn watch(
        &self,
        _request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(futures_util::stream::pending())))
    }

    async fn list_collections(
        &self,
        _request: Request<proto::ListCollectionsRequest>,
    ) -> Result<Response<proto::ListCollectionsResponse>, Status> {
        Ok(Response::new(proto::ListCollectionsResponse {
            collections: vec![COLLECTION.into()],
        }))
    }
}

/// Serves until killed. Prints `floor listening tcp=ADDR` once bound.
pub async fn serve(args: FloorArgs) -> Result<(), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let time = Timestamp {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos() as i32,
    };
    let rev = docsidecar::store::new_rev();
    let floor = Floor {
        doc: proto::Document {
            collection: COLLECTION.into(),
            id: String::new(),
            rev: rev.clone(),
            data: Some(Payload::new(args.payload).data),
            create_time: Some(time),
            update_time: Some(time),
            ..Default::default()
        },
        rev,
        time,
    };
    let shared = std::sync::Arc::new(floor);
    let service = || {
        DocumentServiceServer::from_arc(std::sync::Arc::clone(&shared))
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(usize::MAX)
    };
    let tcp = tokio::net::TcpListener::bind(&args.tcp)
        .await
        .map_err(|e| format!("floor: cannot listen on {}: {e}", args.tcp))?;
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let uds = match &args.uds {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            Some(
                tokio::net::UnixListener::bind(path)
                    .map_err(|e| format!("floor: cannot listen on {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    // The sidecar sets TCP_NODELAY on every connection; so does the floor.
    let incoming = TcpListenerStream::new(tcp).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let tcp_server = tonic::transport::Server::builder()
        .add_service(service())
        .serve_with_incoming(incoming);
    println!("floor listening tcp={local}");
    match uds {
        Some(uds) => {
            let uds_server = tonic::transport::Server::builder()
                .add_service(service())
                .serve_with_incoming(UnixListenerStream::new(uds));
            let (a, b) = tokio::join!(tcp_server, uds_server);
            a.and(b).map_err(|e| e.to_string())
        }
        None => tcp_server.await.map_err(|e| e.to_string()),
    }
}
