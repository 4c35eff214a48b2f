//! keygate in front of an axum Router: one `.layer(...)`.
//!
//! ```sh
//! cargo run --example axum_app        # prints a key, serves on 127.0.0.1:3000
//! curl -s http://127.0.0.1:3000/v1/chat/completions -H "Authorization: Bearer <key>" \
//!      -H 'content-type: application/json' -d '{"model":"gpt-4o-mini","messages":[]}'
//! ```

use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use keygate::{
    KeyFormat, KeyId, KeyRecord, KeyStore, Keygate, MemoryStore, Permissions, Principal,
    ProjectRecord, SecretKey, Timestamp,
};
use serde_json::{Value, json};

/// Your routes, then the whole keygate stack as one layer.
pub fn app<K: KeyStore>(store: K) -> Router {
    let keygate = Keygate::builder(store)
        .build()
        .expect("the default stack is valid");
    Router::new()
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}))
            }),
        )
        .route("/v1/chat/completions", post(chat))
        .layer(keygate)
}

/// A handler sees who called: the `Principal` the layer put in the request.
async fn chat(Extension(caller): Extension<Principal>, Json(request): Json<Value>) -> Json<Value> {
    let model = request["model"]
        .as_str()
        .unwrap_or("gpt-4o-mini")
        .to_owned();
    Json(json!({
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("hello, {}", caller.key_id())}, "finish_reason": "stop"}],
        // The token layer settles limits and budgets from this.
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }))
}

/// A store with one key that may do everything.
pub fn demo_store() -> (MemoryStore, SecretKey) {
    let secret = KeyFormat::default().generate().expect("OS randomness");
    let mut key = KeyRecord::new(
        KeyId::new("key_axum_demo"),
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!(
        "axum app on http://{}; key: {}",
        listener.local_addr()?,
        secret.expose()
    );
    axum::serve(listener, app(store)).await
}
