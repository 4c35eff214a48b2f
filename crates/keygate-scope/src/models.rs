//! [`ModelListLayer`]: the models list answers only with the models the caller may use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::Collect;
use keygate_core::{Denial, Principal, Stage};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// Filters the JSON answer of `GET /v1/models` (`{"object":"list","data":[{"id":..},..]}`)
/// down to the entries whose `id` the caller's model rules allow. Callers without model
/// rules get the answer untouched, unread.
///
/// Retrieving one model (`GET /v1/models/{model}`) needs no filter: the scope layer refuses
/// a disallowed model there with 403 `model_not_allowed` before it is forwarded.
///
/// Place it inside the extract layer (it reads the [`Principal`]). A 200 answer that is not
/// a plain (uncompressed) JSON object with a `data` array is replaced by a 502 (fail closed).
#[derive(Debug, Clone)]
#[must_use]
pub struct ModelListLayer {
    path: Arc<str>,
}

impl Default for ModelListLayer {
    fn default() -> Self {
        ModelListLayer {
            path: "/v1/models".into(),
        }
    }
}

impl ModelListLayer {
    /// Filters `GET /v1/models`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Filters `GET path` instead.
    pub fn with_path(mut self, path: &str) -> Self {
        self.path = path.into();
        self
    }
}

impl<S> Layer<S> for ModelListLayer {
    type Service = ModelList<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ModelList {
            inner,
            path: self.path.clone(),
        }
    }
}

/// The service made by [`ModelListLayer`].
#[derive(Debug, Clone)]
pub struct ModelList<S> {
    inner: S,
    path: Arc<str>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ModelList<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ListBody<ResBody>>;
    type Error = S::Error;
    type Future = ListFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let principal = (req.method() == Method::GET && req.uri().path() == &*self.path)
            .then(|| req.extensions().get::<Principal>())
            .flatten()
            .filter(|p| p.has_model_rules())
            .cloned();
        ListFuture {
            state: ListState::Inner {
                future: self.inner.call(req),
                principal,
            },
        }
    }
}

pin_project! {
    /// Response future of [`ModelList`].
    pub struct ListFuture<F, B> where B: Body {
        #[pin]
        state: ListState<F, B>,
    }
}

pin_project! {
    #[project = ListStateProj]
    enum ListState<F, B> where B: Body {
        Inner { #[pin] future: F, principal: Option<Principal> },
        Collecting {
            #[pin] collect: Collect<B>,
            parts: Option<http::response::Parts>,
            principal: Option<Principal>,
        },
    }
}

/// 502: the upstream's list could not be filtered.
fn unreadable_list<B>() -> Response<ListBody<B>> {
    list_refusal(Denial::new(
        Stage::Scope,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "The models list could not be read.",
    ))
}

/// `denial` as the answer of a list layer.
pub(crate) fn list_refusal<B>(denial: Denial) -> Response<ListBody<B>> {
    let data = Some(denial.json_body());
    let mut response = Response::new(ListBody::Full { data });
    *response.status_mut() = denial.status();
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.extensions_mut().insert(denial);
    response
}

fn filter(bytes: &[u8], principal: &Principal) -> Option<Bytes> {
    let mut doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let data = doc.get_mut("data")?.as_array_mut()?;
    data.retain(|entry| {
        entry
            .get("id")
            .and_then(|id| id.as_str())
            .is_some_and(|id| principal.allows_model(id))
    });
    serde_json::to_vec(&doc).ok().map(Bytes::from)
}

impl<F, B, E> Future for ListFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ListBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                ListStateProj::Inner { future, principal } => {
                    let response = ready!(future.poll(cx))?;
                    let Some(p) = principal
                        .take()
                        .filter(|_| response.status() == StatusCode::OK)
                    else {
                        return Poll::Ready(Ok(response.map(|body| ListBody::Inner { body })));
                    };
                    let headers = response.headers();
                    let plain_json = headers
                        .get(CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
                        && headers
                            .get_all(CONTENT_ENCODING)
                            .iter()
                            .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
                    if !plain_json {
                        // A list this layer cannot read must not reach a restricted caller.
                        drop(response);
                        return Poll::Ready(Ok(unreadable_list()));
                    }
                    let (parts, body) = response.into_parts();
                    let next = ListState::Collecting {
                        collect: body.collect(),
                        parts: Some(parts),
                        principal: Some(p),
                    };
                    self.as_mut().project().state.set(next);
                }
                ListStateProj::Collecting {
                    collect,
                    parts,
                    principal,
                } => {
                    let collected = ready!(collect.poll(cx));
                    let mut parts = parts.take().expect("polled after completion");
                    let principal = principal.take().expect("polled after completion");
                    let filtered = collected
                        .ok()
                        .and_then(|c| filter(&c.to_bytes(), &principal));
                    let Some(bytes) = filtered else {
                        return Poll::Ready(Ok(unreadable_list()));
                    };
                    parts.headers.insert(CONTENT_LENGTH, bytes.len().into());
                    return Poll::Ready(Ok(Response::from_parts(
                        parts,
                        ListBody::Full { data: Some(bytes) },
                    )));
                }
            }
        }
    }
}

pin_project! {
    /// Response body of [`ModelList`] and [`ObjectList`](crate::ObjectList): the inner body,
    /// or the filtered list.
    #[allow(missing_docs)]
    #[project = ListBodyProj]
    pub enum ListBody<B> {
        /// The inner service's body, untouched.
        Inner { #[pin] body: B },
        /// The filtered list (or a refusal).
        Full { data: Option<Bytes> },
    }
}

impl<B: Body<Data = Bytes>> Body for ListBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ListBodyProj::Inner { body } => body.poll_frame(cx),
            ListBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ListBody::Inner { body } => body.is_end_stream(),
            ListBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ListBody::Inner { body } => body.size_hint(),
            ListBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
