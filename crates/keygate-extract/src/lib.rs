//! A tower layer that lets through only requests carrying a valid, live keygate API key (or a
//! token a [`TokenVerifier`](keygate_core::TokenVerifier) accepts), and tells the service
//! behind it who is calling: a [`Principal`](keygate_core::Principal) in the request's
//! extensions.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use keygate_core::{KeyFormat, KeyId, KeyRecord, Principal, ProjectRecord, Snapshot, Timestamp};
//! use keygate_extract::KeyExtractLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = KeyFormat::default().generate()?;
//! let key = KeyRecord::new(KeyId::new("key_demo"), "default", secret.digest(), Timestamp::UNIX_EPOCH);
//! // A fixed set of keys; keygate-store has stores that change while serving.
//! let store = Arc::new(Snapshot::new([ProjectRecord::new("default")], [key])?);
//!
//! let service = ServiceBuilder::new()
//!     .layer(KeyExtractLayer::new(store))
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         let caller = req.extensions().get::<Principal>().expect("put by the layer");
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(caller.key_id().to_string())))
//!     }));
//!
//! let request = Request::get("/v1/models")
//!     .header("authorization", format!("Bearer {}", secret.expose()))
//!     .body(Full::default())?;
//! let response = service.clone().oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! let anonymous = Request::get("/v1/models").body(Full::default())?;
//! let response = service.oneshot(anonymous).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(response.headers()["www-authenticate"], "Bearer");
//! # Ok(())
//! # }
//! ```
//!
//! # With axum
//!
//! ```
//! use axum::{Extension, Router, routing::get};
//! use keygate_core::{Principal, Snapshot};
//! use keygate_extract::KeyExtractLayer;
//!
//! async fn whoami(Extension(caller): Extension<Principal>) -> String {
//!     format!("hello, {}", caller.key_id())
//! }
//!
//! // Or keygate-store's MemoryStore, FileStore or SqliteStore, or your own KeyStore.
//! let store = std::sync::Arc::new(Snapshot::default());
//! let app: Router = Router::new()
//!     .route("/whoami", get(whoami))
//!     .layer(KeyExtractLayer::new(store));
//! ```
//!
//! With the `axum` feature, handlers can take `keygate_extract::Authenticated` instead of
//! `Extension<Principal>` (a 401 in the OpenAI format when the layer is missing).
//!
//! # What is refused, and how
//!
//! | request | answer |
//! | --- | --- |
//! | no credential in any [source](CredentialSource) | 401 `missing_api_key`, `WWW-Authenticate: Bearer` |
//! | malformed, bad checksum, unknown, disabled, not yet valid, expired, revoked, previous secret after its grace, project disabled, invalid token | 401 `invalid_api_key`: byte-identical for every cause |
//! | two different credentials (in two sources, or one header repeated) | 400 `conflicting_credentials` |
//! | a credential in the query string, next to one in a header | 400 `credential_in_query` |
//! | the store (or token verifier) cannot answer | 503 `service_unavailable`: never a pass |
//!
//! The cause a client cannot see is in the refusal's [`Denial`](keygate_core::Denial)
//! (response extensions), as its `detail`, for the audit layer. gRPC requests
//! (`content-type: application/grpc…`) get a trailers-only status instead (UNAUTHENTICATED,
//! INVALID_ARGUMENT, UNAVAILABLE).
//!
//! Notes on the choices:
//!
//! - The same value in several sources is one credential; an empty header counts as absent.
//! - `Authorization` with a scheme other than `Bearer` is a malformed credential (401), so a
//!   client sending Basic credentials learns at once that they do not work here.
//! - Keys in the query string are never read. A request whose only credential is in the query
//!   gets the 401 for a missing credential; one that also carries a header gets 400
//!   `credential_in_query`, so the client notices that its key is ending up in URLs (and
//!   access logs). Parameters named `api_key`, `api-key`, `apikey`, `x-api-key`,
//!   `access_token`, `auth_token` always count; `key` and `token` count when the value has the
//!   key prefix or the token verifier accepts it.
//! - On success the credential headers are removed from the request handed inward (configure
//!   with [`KeyExtractLayer::keep_credential_headers`]), so an upstream never sees the
//!   client's key. Kept headers are marked sensitive (never indexed by HTTP/2 header
//!   compression, redacted in `Debug`).
//! - The presented credential appears in no error, log line or `Debug` output.
//!
//! # Cost
//!
//! With a store that answers at once (a [`Snapshot`](keygate_core::Snapshot), or
//! keygate-store's memory, file and SQLite stores, which all serve from one) nothing is
//! boxed: the lookup future is polled once in `call` and the decision is made there. The first time a store (or token verifier) makes a request wait, that lookup
//! is dropped and started again from a boxed future that owns its inputs; from then on every
//! lookup of that layer goes to a boxed future directly (one small allocation), so no lookup
//! is ever started twice after the first.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
mod axum;
mod future;
mod layer;
mod service;
mod source;

#[cfg(feature = "axum")]
pub use crate::axum::{Authenticated, MissingPrincipal};
pub use future::ResponseFuture;
pub use layer::KeyExtractLayer;
pub use service::KeyExtract;
pub use source::{ConfigError, CredentialSource};

#[cfg(test)]
mod tests;
