//! Per-key request rates, token rates and money budgets for AI endpoints, enforced so that
//! concurrent and streamed requests can never overspend: capacity is **reserved before** a
//! request is forwarded and **settled after** its response ends, exactly once.
//!
//! - [`RateLimitLayer`]: requests per minute per key, project, derived token and model
//!   pattern (GCRA cells, lock-free; idle cells evicted).
//! - [`TokenLimitLayer`]: tokens per minute and money budgets (UTC day / week / month /
//!   lifetime) against a [`LimitBackend`] ([`MemoryBackend`] here; Redis or SQL backends
//!   implement the same trait); prices from a [`PriceTable`]; usage from JSON or SSE
//!   response bodies; the [`WalletGuard`] that suspends a key whose spend spikes (alerts
//!   through an [`AlertSink`](keygate_core::AlertSink), persists through a
//!   [`SuspensionHook`]).
//!
//! Both read the [`Principal`](keygate_core::Principal) the extraction layer put in the
//! request (and the scope layer's [`RequestFacts`](keygate_core::RequestFacts)); without
//! one they refuse with 401 (fail closed).
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use keygate_core::{Credential, KeyDigest, KeyId, KeyRecord, Money, Principal, ProjectRecord,
//!     Secret, Timestamp};
//! use keygate_limit::{Price, PriceTable, RateLimitLayer, TokenLimitLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let prices = PriceTable::new().with_price(
//!     "gpt-4o-mini",
//!     Price::per_million(Money::from_micros(150_000), Money::from_micros(600_000)),
//! )?;
//! let service = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new())
//!     .layer(TokenLimitLayer::default().with_prices(prices))
//!     .service_fn(|_req: Request<_>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     });
//!
//! // The extraction layer puts the caller's Principal in the request; here by hand.
//! let mut key = KeyRecord::new(KeyId::new("key_a"), "p", KeyDigest::of("x"), Timestamp::UNIX_EPOCH);
//! key.limits.requests_per_minute = std::num::NonZeroU32::new(1);
//! let principal = Principal::new(Arc::new(key), Arc::new(ProjectRecord::new("p")),
//!     Credential::ApiKey(Secret::Current));
//! let request = || {
//!     let mut r = Request::new(Full::new(Bytes::from_static(br#"{"model":"gpt-4o-mini"}"#)));
//!     r.extensions_mut().insert(principal.clone());
//!     r
//! };
//! assert_eq!(service.clone().oneshot(request()).await?.status(), StatusCode::OK);
//! let refused = service.oneshot(request()).await?;
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert!(refused.headers().contains_key("retry-after"));
//! # Ok(())
//! # }
//! ```
//!
//! # Counting
//!
//! Key-scoped counters are keyed by key id, project-scoped ones by project id; a derived
//! token's own limits (its `Restriction`) are counted per token id on top of its key's and
//! project's. Per-model limits (`Limits::models`) use one counter per matching pattern.
//!
//! # Deployment caveats
//!
//! - Spend is attributed to the budget period a request was admitted in.
//! - A response's actual usage may exceed its reservation (a prompt estimate below the real
//!   count): it is recorded, so later requests see it, but it is recorded after the fact.
//!   Admission itself never passes a limit.
//! - The in-memory state is per process: behind a load balancer, use a shared backend.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod body;
mod guard;
mod price;
mod rate;
pub mod rate_shared;
mod token;
mod usage;

/// Entry points for the fuzz targets (`fuzz/`): built only with `--cfg fuzzing`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    /// Runs `chunks` through the SSE usage observer (stripping the usage chunk or not): what
    /// the client receives, and the usage seen.
    pub fn sse(chunks: &[&[u8]], strip: bool) -> (Vec<u8>, Option<keygate_core::Usage>) {
        crate::usage::sse_pass(chunks, strip)
    }
}

pub use backend::{LimitBackend, MemoryBackend};
pub use body::{OnDisconnect, RequestBody, TokenBody};
pub use guard::{GuardConfigError, Suspension, SuspensionHook, WalletGuard};
pub use price::{
    DEFAULT_IMAGE_QUALITY, DEFAULT_IMAGE_SIZE, ImageKeyError, ImagePrices, Price, PriceTable,
};
pub use rate::{RateConfigError, RateLimit, RateLimitLayer, ResponseFuture as RateResponseFuture};
pub use rate_shared::{SharedCell, SharedOutcome, SharedRates};
pub use token::{
    ResponseFuture as TokenResponseFuture, TokenLimit, TokenLimitLayer, Unpriced, budget_counter,
};

#[cfg(test)]
pub(crate) mod test_support {
    use std::convert::Infallible;
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use keygate_core::{
        Credential, KeyDigest, KeyId, KeyRecord, Limits, Principal, ProjectRecord, Secret,
        Timestamp,
    };

    pub(crate) fn empty() -> Full<Bytes> {
        Full::new(Bytes::new())
    }

    pub(crate) fn principal_named(
        id: &str,
        project: &str,
        f: impl FnOnce(&mut Limits, &mut Limits),
    ) -> Principal {
        let mut key = KeyRecord::new(
            KeyId::new(id),
            project,
            KeyDigest::of(id),
            Timestamp::UNIX_EPOCH,
        );
        let mut p = ProjectRecord::new(project);
        f(&mut key.limits, &mut p.limits);
        Principal::new(
            Arc::new(key),
            Arc::new(p),
            Credential::ApiKey(Secret::Current),
        )
    }

    pub(crate) fn principal_with(f: impl FnOnce(&mut Limits, &mut Limits)) -> Principal {
        principal_named("key_a", "p", f)
    }

    pub(crate) fn request(p: &Principal) -> Request<Full<Bytes>> {
        let mut r = Request::new(empty());
        r.extensions_mut().insert(p.clone());
        r
    }

    pub(crate) async fn ok_handler<B>(
        _req: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
    }
}
