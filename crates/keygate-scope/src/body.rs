//! [`BodyFromBytes`]: how the scope layer hands on a body it had to read.

use bytes::Bytes;
use http_body_util::Full;

/// A request body type that can be rebuilt from the exact bytes the scope layer read to find
/// the model, so the inner service sees a byte-identical body of its own type.
///
/// Implemented for `Full<Bytes>`, the boxed bodies of `http-body-util`, and (with their
/// features, on by default) `axum::body::Body` and `tonic::body::Body`. For hyper's
/// `Incoming`, map the body first (`tower_http::map_request_body` or `Request::map`) into
/// one of these.
pub trait BodyFromBytes: Sized {
    /// The body holding `bytes`.
    fn from_bytes(bytes: Bytes) -> Self;
}

impl BodyFromBytes for Full<Bytes> {
    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes)
    }
}

impl<E: 'static> BodyFromBytes for http_body_util::combinators::BoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        Full::new(bytes).map_err(|never| match never {}).boxed()
    }
}

impl<E: 'static> BodyFromBytes for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

#[cfg(feature = "axum")]
impl BodyFromBytes for axum::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        axum::body::Body::from(bytes)
    }
}

#[cfg(feature = "tonic")]
impl BodyFromBytes for tonic::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        tonic::body::Body::new(Full::new(bytes))
    }
}
