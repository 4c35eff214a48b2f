//! keygate around a tonic server: the generated gRPC health service of `tonic-health` (no
//! protobuf compiler needed). Denials reach gRPC clients as UNAUTHENTICATED,
//! PERMISSION_DENIED and RESOURCE_EXHAUSTED.
//!
//! ```sh
//! cargo run --example tonic_health    # prints a key, serves on 127.0.0.1:50051
//! ```

use http::Method;
use keygate::scope::RouteTable;
use keygate::{
    Access, KeyFormat, KeyId, KeyRecord, KeyStore, Keygate, MemoryStore, Permissions,
    ProjectRecord, SecretKey, Timestamp,
};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// gRPC methods are routes like any other: `/package.Service/Method`, here in the endpoint
/// group `health`, needing Read.
pub fn routes() -> RouteTable {
    RouteTable::builder()
        .route(Method::POST, "/grpc.health.v1.Health/Check", "health")
        .access(Access::Read)
        .route(Method::POST, "/grpc.health.v1.Health/Watch", "health")
        .access(Access::Read)
        .build()
        .expect("valid routes")
}

/// Serves the health service behind keygate on `listener`.
pub async fn serve<K: KeyStore>(
    listener: TcpListener,
    store: K,
) -> Result<(), tonic::transport::Error> {
    let keygate = Keygate::builder(store)
        .routes(routes())
        .model_list_path(None)
        .build()
        .expect("valid stack");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    Server::builder()
        .layer(keygate)
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}

/// A store with one key that may read the `health` group.
pub fn demo_store() -> (MemoryStore, SecretKey) {
    let secret = KeyFormat::default().generate().expect("OS randomness");
    let mut key = KeyRecord::new(
        KeyId::new("key_grpc_demo"),
        "demo",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::Restricted([("health".to_owned(), Access::Read)].into());
    let store =
        MemoryStore::from_records([ProjectRecord::new("demo")], [key]).expect("valid records");
    (store, secret)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (store, secret) = demo_store();
    let listener = TcpListener::bind("127.0.0.1:50051").await?;
    println!(
        "gRPC health on http://{}; key: {}",
        listener.local_addr()?,
        secret.expose()
    );
    serve(listener, store).await?;
    Ok(())
}
