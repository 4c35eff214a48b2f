//! keygate around a plain hyper service (`tower::service_fn`), served with hyper's http1.
//!
//! ```sh
//! cargo run --example hyper_service   # prints a key, serves on 127.0.0.1:3001
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use keygate::{
    KeyFormat, KeyId, KeyRecord, KeyStore, Keygate, MemoryStore, Permissions, Principal,
    ProjectRecord, SecretKey, Timestamp,
};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, service_fn};

/// The handler: any body type (keygate hands on the body it read).
async fn handle<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let caller = request
        .extensions()
        .get::<Principal>()
        .map(|p| p.key_id().to_string());
    let body = format!(
        "{{\"caller\":{:?},\"path\":{:?}}}",
        caller.unwrap_or_default(),
        request.uri().path()
    );
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// Serves connections from `listener` with the keygate stack over `store` around [`handle`].
pub async fn serve<K: KeyStore>(listener: TcpListener, store: K) -> std::io::Result<()> {
    let keygate = Keygate::builder(store)
        .build()
        .expect("the default stack is valid");
    loop {
        let (stream, peer) = listener.accept().await?;
        let service = ServiceBuilder::new()
            // hyper's `Incoming` into a body keygate can rebuild after reading the model, and
            // the peer address for IP rules.
            .map_request(move |request: Request<Incoming>| {
                let mut request = request.map(BodyExt::boxed);
                request.extensions_mut().insert::<SocketAddr>(peer);
                request
            })
            .layer(keygate.clone())
            .service(service_fn(handle));
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .await;
        });
    }
}

/// A store with one key that may do everything.
pub fn demo_store() -> (MemoryStore, SecretKey) {
    let secret = KeyFormat::default().generate().expect("OS randomness");
    let mut key = KeyRecord::new(
        KeyId::new("key_hyper_demo"),
        "demo",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    let store =
        MemoryStore::from_records([ProjectRecord::new("demo")], [key]).expect("valid records");
    (store, secret)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let (store, secret) = demo_store();
    let listener = TcpListener::bind("127.0.0.1:3001").await?;
    println!(
        "hyper service on http://{}; key: {}",
        listener.local_addr()?,
        secret.expose()
    );
    serve(listener, store).await
}
