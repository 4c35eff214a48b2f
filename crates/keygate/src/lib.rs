//! keygate: granular, scoped API keys for AI model endpoints, as tower middleware.
//!
//! This facade re-exports the layer crates ([`extract`], [`scope`], [`limit`], [`audit`],
//! [`jwt`]), the core types and the key stores ([`store`]: [`MemoryStore`], [`FileStore`],
//! [`SqliteStore`]), and offers one builder that stacks the layers in the right
//! order — audit → key extraction → scope → model-list filter → request rate → token rate and
//! budgets — plus a TOML [`Config`] that builds the same stack.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use keygate::{Keygate, KeyFormat, KeyId, KeyRecord, MemoryStore, Permissions, ProjectRecord, Timestamp};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = KeyFormat::default().generate()?;
//! let mut key = KeyRecord::new(KeyId::new("key_demo"), "default", secret.digest(), Timestamp::UNIX_EPOCH);
//! key.permissions = Permissions::ReadOnly;
//! let store = MemoryStore::from_records([ProjectRecord::new("default")], [key])?;
//!
//! let service = ServiceBuilder::new()
//!     .layer(Keygate::builder(store).build()?)
//!     .service_fn(|_req: Request<_>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     });
//!
//! let request = |method: &str, path: &str| {
//!     Request::builder()
//!         .method(method)
//!         .uri(path)
//!         .header("authorization", format!("Bearer {}", secret.expose()))
//!         .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o-mini"}"#)))
//! };
//! let read = service.clone().oneshot(request("GET", "/v1/models")?).await?;
//! assert_eq!(read.status(), StatusCode::OK);
//! assert!(read.headers().contains_key("x-request-id"));
//! let write = service.oneshot(request("POST", "/v1/chat/completions")?).await?;
//! assert_eq!(write.status(), StatusCode::FORBIDDEN); // a read-only key
//! # Ok(())
//! # }
//! ```
//!
//! With axum: `Router::new()....layer(Keygate::builder(store).build()?)`; with tonic:
//! `Server::builder().layer(layer)`; see the workspace's `examples/`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod activity;
mod builder;
mod config;
mod counters;
#[cfg(feature = "proxy")]
pub mod proxy;
mod source;
mod spend;

pub use keygate_audit as audit;
pub use keygate_core as core;
pub use keygate_core::*;
pub use keygate_extract as extract;
pub use keygate_jwt as jwt;
pub use keygate_limit as limit;
pub use keygate_scope as scope;
pub use keygate_store as store;
pub use keygate_store::{
    FileStore, FileStoreError, KEY_FILE_VERSION, KeyFile, MemoryStore, ReloadOutcome, SqliteStore,
};

pub use activity::{Activity, RECENT_KEYS, RECENT_PER_KEY, RecentDecision};
pub use builder::{BuildError, Keygate, KeygateBuilder, KeygateLayer, KeygateService, SharedSink};
pub use counters::CountersConfig;
pub use source::KeySource;
pub use spend::SpendBackend;
#[cfg(test)]
mod bounded_tests;
#[cfg(test)]
mod image_tests;
#[cfg(test)]
mod replica_tests;
#[cfg(test)]
mod tests;

pub use config::{
    AuditConfig, BackpressureConfig, Built, Config, ConfigError, ConfigTokens, JsonlConfig,
    JwtConfig, LimitsConfig, PriceConfig, ProxyConfig, Roots, RoutePreset, RoutesConfig,
    SUSPENDED_REASON, ServerConfig, UnpricedConfig, UpstreamConfig,
};
