//! An axum extractor for the [`Principal`] the layer put in the request.

use std::convert::Infallible;
use std::ops::Deref;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use keygate_core::{Denial, Principal, is_grpc};

/// The authenticated caller, as an axum extractor.
///
/// ```
/// use axum::{Router, routing::get};
/// use keygate_core::Snapshot;
/// use keygate_extract::{Authenticated, KeyExtractLayer};
///
/// async fn whoami(Authenticated(caller): Authenticated) -> String {
///     format!("hello, {}", caller.key_id())
/// }
///
/// let app: Router = Router::new()
///     .route("/whoami", get(whoami))
///     .layer(KeyExtractLayer::new(std::sync::Arc::new(Snapshot::default())));
/// ```
///
/// Without [`KeyExtractLayer`](crate::KeyExtractLayer) in front, extraction fails with
/// [`MissingPrincipal`] (a 401), so a route mounted outside the layer by mistake refuses
/// instead of serving anonymously. `Option<Authenticated>` never fails.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

impl Deref for Authenticated {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.0
    }
}

/// Rejection of [`Authenticated`]: the request has no [`Principal`]. Answers like a request
/// without a credential (401 `missing_api_key`, or UNAUTHENTICATED for gRPC).
#[derive(Debug, Clone, Copy)]
pub struct MissingPrincipal {
    grpc: bool,
}

impl IntoResponse for MissingPrincipal {
    fn into_response(self) -> Response {
        let denial = Denial::missing_credential();
        let response = if self.grpc {
            denial.into_grpc_response()
        } else {
            denial.into_http_response()
        };
        response.map(axum::body::Body::new)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = MissingPrincipal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Principal>() {
            Some(p) => Ok(Authenticated(p.clone())),
            None => Err(MissingPrincipal {
                grpc: is_grpc(&parts.headers),
            }),
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Authenticated {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Authenticated))
    }
}
