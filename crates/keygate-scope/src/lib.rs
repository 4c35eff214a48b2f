//! keygate-scope: checks each request against the caller's rights — the endpoint group and
//! access its route needs, the client address, the model it asks for, and policies — before
//! it goes inward.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use keygate_core::{
//!     Access, Credential, KeyDigest, KeyId, KeyRecord, ModelPattern, ModelRules, Permissions,
//!     Principal, ProjectRecord, Secret, Timestamp,
//! };
//! use keygate_scope::ScopeLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A key that may write chat completions with gpt-4o-mini only.
//! let mut key = KeyRecord::new(KeyId::new("key_1"), "p", KeyDigest::of("x"), Timestamp::UNIX_EPOCH);
//! key.permissions = Permissions::Restricted([("chat.completions".to_owned(), Access::Write)].into());
//! key.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini")?]);
//! let principal = Principal::new(
//!     Arc::new(key),
//!     Arc::new(ProjectRecord::new("p")),
//!     Credential::ApiKey(Secret::Current),
//! );
//!
//! let service = ServiceBuilder::new()
//!     .layer(ScopeLayer::openai())
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//!     }));
//!
//! let request = |model: &str| {
//!     let mut req = Request::post("/v1/chat/completions")
//!         .header("content-type", "application/json")
//!         .body(Full::new(Bytes::from(format!(r#"{{"model":"{model}","messages":[]}}"#))))
//!         .unwrap();
//!     // The extract layer puts the principal here.
//!     req.extensions_mut().insert(principal.clone());
//!     req
//! };
//! let ok = service.clone().oneshot(request("gpt-4o-mini")).await?;
//! assert_eq!(ok.status(), StatusCode::OK);
//! let denied = service.oneshot(request("gpt-4o")).await?;
//! assert_eq!(denied.status(), StatusCode::FORBIDDEN);
//! # Ok(())
//! # }
//! ```
//!
//! # What is checked, in order
//!
//! 1. A [`Principal`](keygate_core::Principal) must be in request extensions (put there by
//!    the extract layer); without one the request is refused with 401 (fail closed).
//! 2. Method-override headers ([`METHOD_OVERRIDE_HEADERS`]) are removed, never believed.
//! 3. The path must be unambiguous ([`check_path`]), else 400 `ambiguous_path`.
//! 4. Method + path must match a route of the [`RouteTable`], else **404 `unknown_route`**
//!    (also for a known path with a method it does not serve). Paths are case-sensitive and
//!    a trailing `/` is significant, exactly as in axum's router. `HEAD` uses the `GET` route
//!    and needs Read.
//! 5. The principal's access to the route's endpoint group must grant the route's access,
//!    else 403 `insufficient_permissions` naming the group and the access missing.
//! 6. With address rules on the key, project or token, the client address
//!    ([`TrustedProxies`]) must be known and allowed, else 403 `ip_not_allowed`.
//! 7. On routes that carry a model: the model is read from the path, query or body (JSON or
//!    multipart, read up to the body limit: 413 `request_too_large` past it); ambiguity is
//!    400; a disallowed model is 403 `model_not_allowed` with `param: "model"`. Routes
//!    without a model never read the body; gRPC requests are never buffered (they are
//!    refused with 415 on routes that need a JSON or form body). A compressed body is
//!    refused with 415 `unsupported_content_encoding` unless decompression is configured
//!    (see [Compressed bodies](#compressed-bodies)).
//! 8. With an object registry ([`ScopeLayer::with_objects`]): every object the request names
//!    (path parameters such as `{file_id}`, body fields such as `input_file_id` at any
//!    depth, a fine-tuned `ft:` model) must belong to the caller's project, else 404
//!    `object_not_found`; runs and batches that name no model are checked as the model their
//!    assistant or input file recorded. Objects a successful response creates are recorded
//!    as the caller's project's. See [`objects`]; lists are filtered by [`ObjectListLayer`].
//! 9. Policies, each of which must allow; a refusal carries the policy's code and stage
//!    `policy`: first the [`Condition`](keygate_core::Condition)s in the caller's project
//!    record and key record (`policies`, set by an operator in the store, the key file, the
//!    admin API or the console), then the layer's own ([`ScopeLayer::with_policy`]: a
//!    built-in condition or any [`Policy`] in code).
//!
//! On success the request goes inward with its [`RequestFacts`](keygate_core::RequestFacts)
//! (route, endpoint group and access, body framing, model and where it came from, output cap,
//! `n`, stream, usage requested, prompt size: decided here once, read by every later layer)
//! and [`ClientIp`](keygate_core::ClientIp) (when known) in its extensions, and a body
//! byte-identical to the one sent (decoded, when it came compressed and decompression is
//! configured: the inner service acts on exactly the bytes that were checked).
//!
//! # Configuration
//!
//! Routes: [`RouteTable::builder`], [`RouteTable::openai`], or [`RouteConfig`] / [`RouteSpec`]
//! from config. The whole layer: [`ScopeLayer::from_config`] with a [`ScopeConfig`] (routes,
//! body limit, [`TrustedProxies`], built-in [`PolicyConfig`]s). Models list filtering is a
//! separate layer, [`ModelListLayer`], placed inside the extract layer.
//!
//! # Bodies
//!
//! A body read to find the model is handed on rebuilt from the exact bytes, in the request's
//! own body type ([`BodyFromBytes`]: `Full<Bytes>`, boxed bodies, and with the default
//! features `axum::body::Body` and `tonic::body::Body`). Map hyper's `Incoming` into one of
//! these before this layer.
//!
//! # Compressed bodies
//!
//! By default a model-carrying body with a `Content-Encoding` other than `identity` is
//! refused with 415 `unsupported_content_encoding`: the layer cannot read the model in it.
//! With the `decompression` feature (on by default; pure Rust, `flate2` with `miniz_oxide`)
//! and [`ScopeLayer::with_decompression`] (or `[decompression]` in [`ScopeConfig`]), bodies
//! in the accepted codings (`gzip`, `deflate`; not `br` or `zstd`) are read instead:
//!
//! - the compressed body is read under the body limit (413 past it, chunked or not);
//! - it is decoded only to be inspected, into a buffer that stops at the cap
//!   ([`Decompression::with_max_decompressed`], default the body limit): a body that
//!   decodes to more is 413 `request_too_large` once the cap is reached, so a "zip bomb"
//!   never costs more memory than the cap plus the decoder's fixed state;
//! - corrupt or truncated data, raw deflate sent as `deflate`, and bytes past the end of the
//!   stream (a second gzip member included) are 400 `invalid_body_encoding`; a coding not
//!   accepted, or codings stacked (`gzip, gzip`, two header lines, `identity, gzip`), stay
//!   415;
//! - the model is found in the decoded bytes with every rule of an uncompressed body;
//! - the inner service gets the **decoded** bytes, exactly what was checked, with
//!   `Content-Encoding` removed and `Content-Length` set to their length, so nothing behind
//!   the layer decodes the body a second way of its own.
//!
//! # Client address
//!
//! Read by [`default_peer_addr`]: a [`ClientIp`](keygate_core::ClientIp) the host inserted,
//! axum's `ConnectInfo<SocketAddr>` (feature `axum`), or a `SocketAddr` extension. For tonic,
//! pass a reader of `tonic::transport::server::TcpConnectInfo` to
//! [`ScopeLayer::with_peer_addr`].
//!
//! # Deployment caveats
//!
//! - Compressed request bodies (`Content-Encoding` other than `identity`) on model routes
//!   are refused with 415 unless [decompression](#compressed-bodies) is configured; then
//!   the service behind must decode them as RFC 9110 says (one gzip member; `deflate` as
//!   zlib), and each one costs a decode of up to the cap on the request's task.
//! - Put this layer where the path it sees is the path the inner service routes on (no
//!   path rewriting between them).
//! - On routes where the model is optional ([`RouteSpec::model_required`] false: moderations,
//!   image edits), a request without a model is not model-checked; runs that inherit their
//!   assistant's model are checked as it only with an object registry (without one, a key
//!   with model rules must name the model).
//! - Strings the JSON scanner skips are checked only for where they end (escapes and control
//!   characters inside them are left to the parser behind, which cannot read a different
//!   structure from them).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod batch;
mod body;
#[cfg(feature = "decompression")]
mod decompress;
mod ip;
mod layer;
mod lists;
mod models;
mod multipart;
pub mod objects;
mod path;
mod policy;
mod route;
mod service;
#[cfg(feature = "tokenizer")]
mod tokenizer;

pub use body::BodyFromBytes;
#[cfg(feature = "decompression")]
#[cfg_attr(docsrs, doc(cfg(feature = "decompression")))]
pub use decompress::{ContentCoding, Decompression};
pub use ip::{ForwardedHeader, TrustedProxies};
pub use layer::{
    DEFAULT_BODY_LIMIT, DEFAULT_MAX_TOKENIZED, PeerAddrFn, ScopeConfig, ScopeConfigError,
    ScopeLayer, default_peer_addr,
};
pub use lists::{
    MAX_LIMIT, MAX_LIST_PAGES, OPENAI_LISTS, ObjectList, ObjectListFuture, ObjectListLayer,
    UPSTREAM_PAGE,
};
pub use models::{ListBody, ModelList, ModelListLayer};
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub use path::canonical_path;
pub use path::{PathError, check_path};
pub use policy::{
    MembersOnly, Policy, PolicyConfig, PolicyContext, PolicyDenial, RequireGroup, RequireLabel,
    TimeWindow,
};
pub use route::{ModelIn, RouteConfig, RouteError, RouteSpec, RouteTable, RouteTableBuilder};
pub use service::{METHOD_OVERRIDE_HEADERS, ResponseFuture, Scope};
#[cfg(feature = "tokenizer")]
pub use tokenizer::OpenAiTokenizer;

#[cfg(test)]
mod objects_tests;
#[cfg(test)]
mod tests;
