//! Short-lived keygate tokens: trade an API key for a narrower token that expires within the
//! hour, verify it on every request, and accept external identity (OIDC) tokens too.
//!
//! - [`TokenExchange`] is a tower service the host mounts behind `KeyExtractLayer` (the example
//!   gateway uses `POST /v1/tokens`): it signs a JWT for the calling key carrying a subset of
//!   the key's rights. Rights only narrow; asking for more is a 403.
//! - [`JwtVerifier`] is the [`TokenVerifier`](keygate_core::TokenVerifier) the extraction
//!   layer calls for bearer credentials that look like a JWT: it checks the token, loads the
//!   key it came from (revoking the key kills its tokens at once) and yields a
//!   [`Principal`](keygate_core::Principal) with the token's narrowed rights.
//! - [`OidcVerifier`] accepts tokens of an identity provider whose keys the host supplies
//!   ([`KeySetSource`]), mapped to rights by a [`ClaimsMapping`]; [`AnyOf`] combines both.
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use bytes::Bytes;
//! use keygate_core::{
//!     Access, Credential, KeyDigest, KeyId, KeyRecord, Permissions, Principal, ProjectRecord,
//!     Secret, Timestamp, TokenVerifier,
//! };
//! use keygate_store::MemoryStore;
//! use keygate_jwt::{JwtVerifier, KeySet, SigningKey, TokenExchange, TokenResponse};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let secret = [7u8; 32]; // use a random secret of 32 bytes or more
//! let exchange = TokenExchange::new("https://gw.example", "keygate", SigningKey::hs256("k1", &secret)?)?;
//!
//! // What KeyExtractLayer would put in the request for an API key with all rights:
//! let mut key = KeyRecord::new(KeyId::new("key_a"), "p", KeyDigest::of("x"), Timestamp::UNIX_EPOCH);
//! key.permissions = Permissions::All;
//! let store = MemoryStore::from_records([ProjectRecord::new("p")], [key.clone()])?;
//! let principal = Principal::new(Arc::new(key), Arc::new(ProjectRecord::new("p")), Credential::ApiKey(Secret::Current));
//!
//! let mut request = Request::post("/v1/tokens").body(Full::new(Bytes::from(
//!     r#"{"ttl_seconds": 600, "permissions": {"restricted": {"models": "read"}}}"#,
//! )))?;
//! request.extensions_mut().insert(principal);
//! let response = ServiceBuilder::new().service(exchange).oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! let issued: TokenResponse = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
//!
//! // The extraction layer verifies the token on every request.
//! let verifier = JwtVerifier::new(store, "https://gw.example", "keygate", KeySet::new().with_hs256("k1", &secret)?)?;
//! assert!(verifier.accepts(&issued.token));
//! let caller = verifier.verify(&issued.token, Timestamp::from_unix_secs(issued.expires_at.as_unix_secs() - 60)).await?;
//! assert_eq!(caller.access("models"), Access::Read);
//! assert_eq!(caller.access("chat.completions"), Access::None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Security
//!
//! - Keys are chosen only by `kid` from the configured set; `jku`, `x5u`, `x5c` and embedded
//!   `jwk` headers are never used. Each key verifies only its own algorithm, so an HS256 token
//!   "signed" with an RSA public key, or `alg: none`, is refused.
//! - `exp` is required and must be an integer; `exp` and `nbf` are checked against the `now`
//!   the extraction layer passes (its injectable `Clock`), with a small leeway (30 s default).
//! - The crypto backend is RustCrypto (pure Rust), installed as jsonwebtoken's process default
//!   when a key, verifier or exchange is built, so verification cannot fail at run time for lack
//!   of a backend. Its RSA signing is not constant-time (RUSTSEC-2023-0071): sign with EdDSA or
//!   HS256; verifying RS256 is fine.
//! - A token is a bearer secret: the exchange answers with `Cache-Control: no-store`, and no
//!   `Debug` output or error of this crate contains a token or key material.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod any;
mod cache;
mod exchange;
mod keys;
mod oidc;
mod verify;

pub use any::AnyOf;
pub use exchange::{
    DEFAULT_MAX_TTL, DEFAULT_TTL, ExchangeFuture, MAX_REQUEST_BODY, TokenExchange, TokenRequest,
    TokenResponse,
};
pub use jsonwebtoken::Algorithm;
pub use keys::{
    ConfigError, KeySet, MAX_KID_LEN, MIN_HMAC_SECRET_LEN, SUPPORTED_ALGORITHMS, SigningKey,
};
pub use oidc::{ClaimsMapping, GroupGrant, KeySetSource, OidcVerifier, SharedKeySet};
pub use verify::{DEFAULT_LEEWAY, JwtVerifier, MAX_TOKEN_LEN, UNKNOWN_KID, looks_like_jws};

/// Makes RustCrypto jsonwebtoken's process-wide backend, unless one is installed already
/// (a host may pick its own; with both backend features unified into one build, jsonwebtoken
/// would otherwise have none and fail at the first token).
pub(crate) fn install_backend() {
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
    );
}

#[cfg(test)]
mod testutil;
