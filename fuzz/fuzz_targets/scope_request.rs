//! The scope layer never panics on any body, JSON or multipart, on any route of the preset,
//! and always decides (passes or refuses) at once.
#![no_main]

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use keygate_core::{
    Credential, KeyDigest, KeyId, KeyRecord, ModelPattern, ModelRules, Principal, ProjectRecord,
    Secret, Timestamp,
};
use keygate_scope::ScopeLayer;
use libfuzzer_sys::fuzz_target;

const ROUTES: [(&str, &str, &str); 6] = [
    ("POST", "/v1/chat/completions", "application/json"),
    (
        "POST",
        "/v1/audio/transcriptions",
        "multipart/form-data; boundary=B0",
    ),
    (
        "POST",
        "/v1/images/edits",
        "multipart/form-data; boundary=B0",
    ),
    ("POST", "/v1/files", "multipart/form-data; boundary=B0"),
    ("POST", "/v1/uploads", "application/json"),
    ("POST", "/v1/threads/runs", "application/json"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let (method, path, ct) = ROUTES[usize::from(selector) % ROUTES.len()];
    let mut key = KeyRecord::new(
        KeyId::new("key_f"),
        "p",
        KeyDigest::of("f"),
        Timestamp::UNIX_EPOCH,
    );
    if selector & 0x80 != 0 {
        key.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").expect("a pattern")]);
    }
    let principal = Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new("p")),
        Credential::ApiKey(Secret::Current),
    );
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ct)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("a request");
    req.extensions_mut().insert(principal);
    static LAYER: std::sync::OnceLock<ScopeLayer> = std::sync::OnceLock::new();
    let layer = LAYER.get_or_init(ScopeLayer::openai);
    let mut svc = tower_layer::Layer::layer(
        layer,
        tower_service_fn(|_req: Request<Full<Bytes>>| Response::new(Full::new(Bytes::new()))),
    );
    let mut future = std::pin::pin!(tower_service::Service::call(&mut svc, req));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        matches!(future.as_mut().poll(&mut cx), Poll::Ready(Ok(_))),
        "the scope layer decides a buffered request at once"
    );
});

/// A service from a closure, answering at once.
#[derive(Clone)]
struct Answer<F>(F);

fn tower_service_fn<F>(f: F) -> Answer<F> {
    Answer(f)
}

impl<F> tower_service::Service<Request<Full<Bytes>>> for Answer<F>
where
    F: FnMut(Request<Full<Bytes>>) -> Response<Full<Bytes>> + Clone,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok((self.0)(req)))
    }
}
