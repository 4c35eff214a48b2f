//! [`ObjectListLayer`]: lists of objects show only the caller's project's, page by page.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use keygate_core::{Denial, ObjectKind, ObjectRegistry, Principal, RequestFacts, Stage};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use crate::models::{ListBody, list_refusal};
use crate::objects::unavailable;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most upstream pages one list request reads (of [`UPSTREAM_PAGE`] objects each).
pub const MAX_LIST_PAGES: usize = 20;

/// Objects asked of the upstream per page.
pub const UPSTREAM_PAGE: usize = 100;

/// The most objects one page answers with (a larger `limit` is lowered to this; the rest
/// follow with `has_more`).
pub const MAX_LIMIT: usize = 100;

/// The largest upstream page read (16 MiB).
const PAGE_BYTES: usize = 16 << 20;

/// The routes the OpenAI preset lists objects on, with the kind each lists. Lists inside an
/// object (a thread's messages and runs, a vector store's files) need no filter: the scope
/// layer lets only the owner reach the object.
///
/// `GET /v1/models` is not paginated: its answer is passed on with the fine-tuned models
/// (`ft:…`) of other projects, and those keygate never recorded, taken out.
pub const OPENAI_LISTS: [(&str, ObjectKind); 7] = [
    ("/v1/models", ObjectKind::Model),
    ("/v1/files", ObjectKind::File),
    ("/v1/batches", ObjectKind::Batch),
    ("/v1/assistants", ObjectKind::Assistant),
    ("/v1/vector_stores", ObjectKind::VectorStore),
    ("/v1/fine_tuning/jobs", ObjectKind::FineTuningJob),
    ("/v1/chat/completions", ObjectKind::ChatCompletion),
];

/// Answers `GET` on a list route (`/v1/files`, `/v1/batches`, …) with only the objects of
/// the caller's project, as the object registry records them, with pagination that stays
/// truthful for the client: a page holds up to `limit` of the caller's objects (the
/// upstream is read page by page, with the client's filters and order, until the page is
/// full and one more is found, or the upstream has no more), `first_id` and `last_id` are
/// the caller's own objects (the next page starts after `last_id`), and `has_more` says
/// whether the caller has more. At most [`MAX_LIST_PAGES`] upstream pages are read per
/// request: a page that ends there says `has_more: true`, and a request that finds none of
/// the caller's objects within them is answered 503 `list_too_sparse`.
///
/// Place it innermost (inside the limit layers): the pages it reads go straight to the
/// inner service. It reads [`RequestFacts`] (the route) and the [`Principal`], so the
/// scope layer must be outside it.
#[derive(Clone)]
#[must_use]
pub struct ObjectListLayer {
    registry: Option<Arc<dyn ObjectRegistry>>,
    routes: Arc<[(Arc<str>, ObjectKind)]>,
}

impl std::fmt::Debug for ObjectListLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectListLayer")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl ObjectListLayer {
    /// Filters the OpenAI preset's lists ([`OPENAI_LISTS`]) with `registry`.
    pub fn new(registry: Arc<dyn ObjectRegistry>) -> Self {
        ObjectListLayer {
            registry: Some(registry),
            routes: OPENAI_LISTS
                .iter()
                .map(|(p, k)| (Arc::from(*p), *k))
                .collect(),
        }
    }

    /// A layer that filters nothing (for a stack without an object registry).
    pub fn off() -> Self {
        ObjectListLayer {
            registry: None,
            routes: Arc::new([]),
        }
    }

    /// Also filters the route `pattern` (as in the route table), which lists `kind`.
    pub fn with_list(mut self, pattern: &str, kind: ObjectKind) -> Self {
        let mut routes = self.routes.to_vec();
        routes.push((pattern.into(), kind));
        self.routes = routes.into();
        self
    }
}

impl<S> Layer<S> for ObjectListLayer {
    type Service = ObjectList<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObjectList {
            inner,
            registry: self.registry.clone(),
            routes: self.routes.clone(),
        }
    }
}

/// The service made by [`ObjectListLayer`].
#[derive(Clone)]
pub struct ObjectList<S> {
    inner: S,
    registry: Option<Arc<dyn ObjectRegistry>>,
    routes: Arc<[(Arc<str>, ObjectKind)]>,
}

impl<S> std::fmt::Debug for ObjectList<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectList").finish_non_exhaustive()
    }
}

type Listing<B, E> = Pin<Box<dyn Future<Output = Result<Response<ListBody<B>>, E>> + Send>>;

pin_project! {
    /// Response future of [`ObjectList`].
    pub struct ObjectListFuture<F, B, E> {
        #[pin]
        state: ListFutureState<F, B, E>,
    }
}

pin_project! {
    #[project = ListFutureProj]
    enum ListFutureState<F, B, E> {
        // Not a list: the inner future.
        Pass { #[pin] future: F },
        // A list, read page by page.
        Listing { future: Listing<B, E> },
    }
}

impl<F, B, E> Future for ObjectListFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ListBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ListFutureProj::Pass { future } => future
                .poll(cx)
                .map(|r| r.map(|res| res.map(|body| ListBody::Inner { body }))),
            ListFutureProj::Listing { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ObjectList<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ListBody<ResBody>>;
    type Error = S::Error;
    type Future = ObjectListFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let kind = (req.method() == Method::GET)
            .then(|| req.extensions().get::<RequestFacts>())
            .flatten()
            .and_then(|facts| {
                let route = &*facts.endpoint.route;
                self.routes.iter().find(|(p, _)| &**p == route).map(|r| r.1)
            });
        let project = req
            .extensions()
            .get::<Principal>()
            .map(|p| p.project().id.clone());
        let (Some(kind), Some(project), Some(registry)) = (kind, project, self.registry.clone())
        else {
            return ObjectListFuture {
                state: ListFutureState::Pass {
                    future: self.inner.call(req),
                },
            };
        };
        // The inner service was made ready for this call; later pages wait for readiness.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ObjectListFuture {
            state: ListFutureState::Listing {
                future: Box::pin(list(inner, registry, req, kind, project)),
            },
        }
    }
}

/// The models list, without the fine-tuned models that are not the caller's project's.
async fn models<S, ReqBody, ResBody>(
    mut inner: S,
    registry: Arc<dyn ObjectRegistry>,
    req: Request<ReqBody>,
    project: String,
) -> Result<Response<ListBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let unreadable = || {
        list_error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "The models list could not be read.",
        )
    };
    let response = inner.call(req).await?;
    if !response.status().is_success() {
        return Ok(response.map(|body| ListBody::Inner { body }));
    }
    if response.headers().get(CONTENT_ENCODING).is_some() {
        return Ok(unreadable());
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = Limited::new(body, PAGE_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
    else {
        return Ok(unreadable());
    };
    let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(unreadable());
    };
    let Some(Value::Array(data)) = doc.remove("data") else {
        return Ok(unreadable());
    };
    let mut kept = Vec::with_capacity(data.len());
    for item in data {
        let id = item.get("id").and_then(Value::as_str).unwrap_or("");
        if id.starts_with(crate::objects::FINE_TUNED_PREFIX) {
            match registry.get(id).await {
                Ok(Some(r)) if r.project == project && r.kind == ObjectKind::Model => {}
                Ok(_) => continue,
                Err(_) => {
                    return Ok(list_refusal(unavailable()));
                }
            }
        }
        kept.push(item);
    }
    doc.insert("data".into(), Value::Array(kept));
    let bytes = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
    parts.headers.insert(CONTENT_LENGTH, bytes.len().into());
    Ok(Response::from_parts(
        parts,
        ListBody::Full { data: Some(bytes) },
    ))
}

fn list_error<B>(
    status: StatusCode,
    code: &'static str,
    message: &'static str,
) -> Response<ListBody<B>> {
    list_refusal(Denial::new(Stage::Scope, status, code, message))
}

/// The client's query without `after` and `limit`, its `after`, and its `limit`.
fn split_query(query: Option<&str>) -> (Vec<(String, String)>, Option<String>, Option<String>) {
    let mut rest = Vec::new();
    let (mut after, mut limit) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        let (k, v) = (decode(k), decode(v));
        match k.as_str() {
            "after" => after = Some(v),
            "limit" => limit = Some(v),
            _ => rest.push((k, v)),
        }
    }
    (rest, after, limit)
}

/// What a query value keeps as it is: RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn page_uri(path: &str, rest: &[(String, String)], after: Option<&str>) -> Option<http::Uri> {
    let enc = |s: &str| utf8_percent_encode(s, QUERY_VALUE).to_string();
    let mut q: Vec<String> = rest
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    q.push(format!("limit={UPSTREAM_PAGE}"));
    if let Some(a) = after {
        q.push(format!("after={}", enc(a)));
    }
    format!("{path}?{}", q.join("&")).parse().ok()
}

async fn list<S, ReqBody, ResBody>(
    mut inner: S,
    registry: Arc<dyn ObjectRegistry>,
    req: Request<ReqBody>,
    kind: ObjectKind,
    project: String,
) -> Result<Response<ListBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Default,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    if kind == ObjectKind::Model {
        return models(inner, registry, req, project).await;
    }
    let (parts, _) = req.into_parts();
    let (rest, mut cursor, limit) = split_query(parts.uri.query());
    let wanted = match limit.as_deref().map(str::parse::<usize>) {
        None => 20,
        Some(Ok(n)) if n >= 1 => n.min(MAX_LIMIT),
        Some(_) => {
            return Ok(list_error(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                "limit must be a positive integer.",
            ));
        }
    };
    let path = parts.uri.path().to_owned();
    let mut kept: Vec<Value> = Vec::new();
    let mut head: Option<http::response::Parts> = None;
    let mut doc = serde_json::Map::new();
    let mut upstream_more = false;
    for page in 0..MAX_LIST_PAGES {
        let Some(uri) = page_uri(&path, &rest, cursor.as_deref()) else {
            return Ok(list_error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "The query is not valid.",
            ));
        };
        let mut next = Request::new(ReqBody::default());
        *next.method_mut() = Method::GET;
        *next.uri_mut() = uri;
        *next.headers_mut() = parts.headers.clone();
        *next.extensions_mut() = parts.extensions.clone();
        std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
        let response = inner.call(next).await?;
        if !response.status().is_success() {
            if page == 0 {
                // The upstream's refusal (a bad filter, say) is the client's answer.
                return Ok(response.map(|body| ListBody::Inner { body }));
            }
            return Ok(list_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "The upstream failed while the list was read.",
            ));
        }
        let plain_json = response
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
            && response.headers().get(CONTENT_ENCODING).is_none();
        if !plain_json {
            return Ok(list_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "The list could not be read.",
            ));
        }
        let (res_parts, body) = response.into_parts();
        let Ok(bytes) = Limited::new(body, PAGE_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
        else {
            return Ok(list_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "The list could not be read.",
            ));
        };
        let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&bytes) else {
            return Ok(list_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "The list could not be read.",
            ));
        };
        let Some(Value::Array(data)) = map.remove("data") else {
            return Ok(list_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "The list could not be read.",
            ));
        };
        upstream_more = map
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let last = data
            .last()
            .and_then(|o| o.get("id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        for item in data {
            let Some(id) = item.get("id").and_then(Value::as_str) else {
                continue;
            };
            let owned = match registry.get(id).await {
                Ok(Some(r)) => r.project == project && r.kind == kind,
                Ok(None) => false,
                Err(_) => {
                    return Ok(list_refusal(unavailable()));
                }
            };
            if owned && kept.len() <= wanted {
                kept.push(item);
            }
        }
        if head.is_none() {
            head = Some(res_parts);
            doc = map;
        }
        if kept.len() > wanted || !upstream_more {
            break;
        }
        match last {
            Some(id) => cursor = Some(id),
            None => break,
        }
    }
    if kept.is_empty() && upstream_more {
        return Ok(list_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "list_too_sparse",
            "Too few of this project's objects were found in the upstream's list to fill a page; try again with a filter.",
        ));
    }
    let has_more = kept.len() > wanted || upstream_more;
    kept.truncate(wanted);
    let id_of = |o: Option<&Value>| o.and_then(|o| o.get("id")).cloned().unwrap_or(Value::Null);
    let first = id_of(kept.first());
    let last = id_of(kept.last());
    if doc.contains_key("first_id") || doc.contains_key("last_id") {
        doc.insert("first_id".into(), first);
        doc.insert("last_id".into(), last);
    }
    doc.insert("object".into(), Value::String("list".into()));
    doc.insert("data".into(), Value::Array(kept));
    doc.insert("has_more".into(), Value::Bool(has_more));
    let bytes = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
    let mut head = head.expect("at least one page was read");
    head.headers.insert(CONTENT_LENGTH, bytes.len().into());
    Ok(Response::from_parts(
        head,
        ListBody::Full { data: Some(bytes) },
    ))
}
