//! [`Scope`]: the service, and its [`ResponseFuture`].

// Refusals are the cold path and are built once per request; boxing them would only add an
// allocation to it.
#![allow(clippy::result_large_err)]

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use keygate_core::facts::{count_prompt, scan_json, scan_json_text};
use keygate_core::{
    ClientIp, Denial, EndpointMatch, Generation, ModelSource, Principal, PromptSize, Protocol,
    RequestFacts, RequestTrace, RequestedModel, ResponseBody, Stage, is_grpc,
};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::batch::{BatchError, batch_models};
use crate::body::BodyFromBytes;
#[cfg(feature = "decompression")]
use crate::decompress::{self, DecodeError};
use crate::layer::Shared;
use crate::multipart::{self, FormError};
use crate::objects::{self, Action, ObjectBody, Owner};
use crate::path::{check_path, decode};
use crate::policy::PolicyContext;
use crate::route::{Route, path_param};

/// Headers that ask a server to act as if the method were another; never believed, always
/// removed before the request goes inward.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The scope-checking service made by [`ScopeLayer`](crate::ScopeLayer).
#[derive(Clone)]
pub struct Scope<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Scope<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Scope<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Scope { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn scope_denial(
    status: StatusCode,
    code: &'static str,
    message: impl Into<Cow<'static, str>>,
) -> Denial {
    Denial::new(Stage::Scope, status, code, message)
}

fn bad_model(code: &'static str, message: &'static str) -> Denial {
    scope_denial(StatusCode::BAD_REQUEST, code, message).with_param("model")
}

fn too_large() -> Denial {
    scope_denial(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        "The request body is too large.",
    )
}

/// `bytes` for a person: `8388608 bytes (8 MiB)`.
fn byte_size(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{bytes} bytes ({} MiB)", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// The 413 of an upload read only to verify it (a batch input file of a key with model
/// rules) that is larger than keygate reads (`what`: the limit it passed, `limit` bytes).
fn upload_too_large(what: &str, limit: usize) -> Denial {
    let size = byte_size(limit);
    scope_denial(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!(
            "The upload {what} {size}. This key may use only some models, so its uploads here are read to check every request of a batch input file (purpose=batch) against them: keys with model rules can upload files of up to {size}. Split the batch into smaller files."
        ),
    )
    .with_param("file")
}

fn unsupported(code: &'static str, message: &'static str) -> Denial {
    scope_denial(StatusCode::UNSUPPORTED_MEDIA_TYPE, code, message)
}

/// The content coding of a body the layer decodes to find its model.
#[cfg(feature = "decompression")]
type Coding = crate::decompress::ContentCoding;

/// Without the `decompression` feature no body is ever decoded.
#[cfg(not(feature = "decompression"))]
#[derive(Debug, Clone, Copy)]
enum Coding {}

/// The coding a model-carrying body must be decoded with: `None` for an absent or `identity`
/// `Content-Encoding`; with decompression configured, one accepted coding, alone; anything
/// else (another coding, codings stacked, an empty value) is refused with 415.
fn body_coding(shared: &Shared, headers: &HeaderMap) -> Result<Option<Coding>, Denial> {
    let mut found: Option<Coding> = None;
    let mut tokens = 0usize;
    for value in headers.get_all(CONTENT_ENCODING) {
        for token in value.as_bytes().split(|&b| b == b',') {
            tokens += 1;
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"identity") {
                continue;
            }
            found = Some(accepted_coding(shared, token)?);
        }
    }
    if found.is_some() && tokens > 1 {
        return Err(unsupported(
            "unsupported_content_encoding",
            "Only one content coding is accepted on request bodies.",
        ));
    }
    Ok(found)
}

#[cfg(feature = "decompression")]
fn accepted_coding(shared: &Shared, token: &[u8]) -> Result<Coding, Denial> {
    let Some(config) = &shared.decompression else {
        return Err(not_decoded());
    };
    match Coding::from_token(token) {
        Some(c) if config.accepts(c) => Ok(c),
        _ => Err(unsupported(
            "unsupported_content_encoding",
            "This content coding is not accepted on request bodies.",
        )),
    }
}

#[cfg(not(feature = "decompression"))]
fn accepted_coding(_: &Shared, _: &[u8]) -> Result<Coding, Denial> {
    Err(not_decoded())
}

fn not_decoded() -> Denial {
    unsupported(
        "unsupported_content_encoding",
        "Compressed request bodies are not accepted on this endpoint.",
    )
}

/// How a model-carrying body is to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyKind {
    Json,
    Multipart(Box<str>),
}

/// What the synchronous part of the check decided.
struct Checked<'r> {
    route_id: u32,
    route: &'r Route,
    client_ip: Option<IpAddr>,
    url_model: Option<(Cow<'r, str>, ModelSource)>,
    body: Option<(BodyKind, Option<Coding>)>,
    /// The body is read only to verify an upload (a batch input file).
    verifying: bool,
}

/// The value of query parameter `name`, percent-decoded; ambiguous if given twice or under
/// a name equal apart from case.
fn query_param<'q>(query: &'q str, name: &str) -> Result<Option<Cow<'q, str>>, Denial> {
    if query.contains(';') {
        // Some servers split the query on ';' as well as '&'.
        return Err(bad_model(
            "ambiguous_query",
            "The query string is ambiguous: ';' is refused.",
        ));
    }
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode_form(k)
            .ok_or_else(|| bad_model("invalid_query", "The query string is not valid."))?;
        if k.eq_ignore_ascii_case(name) {
            if k != name || found.is_some() {
                return Err(bad_model(
                    "ambiguous_model",
                    "The model is given more than once.",
                ));
            }
            found = Some(
                decode_form(v)
                    .ok_or_else(|| bad_model("invalid_query", "The query string is not valid."))?,
            );
        }
    }
    Ok(found)
}

fn decode_form(s: &str) -> Option<Cow<'_, str>> {
    if s.contains('+') {
        decode(&s.replace('+', " ")).map(|c| Cow::Owned(c.into_owned()))
    } else {
        decode(s)
    }
}

fn same_model(a: &str, b: &str) -> bool {
    a == b
}

impl<S> Scope<S> {
    /// Everything decided from the head of the request.
    fn check_head<'r>(
        shared: &'r Shared,
        principal: &Principal,
        method: &Method,
        uri: &'r http::Uri,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Checked<'r>, Denial> {
        let path = uri.path();
        if let Err(e) = check_path(path) {
            return Err(scope_denial(
                StatusCode::BAD_REQUEST,
                "ambiguous_path",
                "The request path is ambiguous: encoded slashes, backslashes, dot segments, empty segments, ';' and needless percent-encodings are refused.",
            )
            .with_detail(e.as_str()));
        }
        let Some(matched) = shared.routes.find(method, path) else {
            return Err(scope_denial(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!(
                    "Unknown request URL: {method} {}.",
                    truncate(&keygate_core::redact_path(path), 200)
                ),
            ));
        };
        let route = matched.route;
        let trace = extensions.get::<RequestTrace>();
        if let Some(trace) = trace {
            trace.set_endpoint_group(&route.group);
        }
        let have = principal.access(route.group.as_str());
        if !have.grants(route.access) {
            return Err(scope_denial(
                StatusCode::FORBIDDEN,
                "insufficient_permissions",
                format!(
                    "This key lacks {} access to the '{}' endpoint group.",
                    route.access, route.group
                ),
            ));
        }
        let client_ip = shared.proxies.client_ip((shared.peer)(extensions), headers);
        if let (Some(trace), Some(ip)) = (trace, client_ip) {
            trace.set_client_ip(ip);
        }
        if principal.has_ip_rules() {
            match client_ip {
                None => {
                    return Err(scope_denial(
                        StatusCode::FORBIDDEN,
                        "ip_not_allowed",
                        "This key may not be used from this address.",
                    )
                    .with_detail("client address unknown"));
                }
                Some(ip) if !principal.allows_ip(ip) => {
                    return Err(scope_denial(
                        StatusCode::FORBIDDEN,
                        "ip_not_allowed",
                        "This key may not be used from this address.",
                    ));
                }
                Some(_) => {}
            }
        }
        let sources = &route.model;
        let mut url_model: Option<(Cow<'r, str>, ModelSource)> = None;
        if let Some((index, suffix)) = sources.path {
            let raw = path_param(path, index, suffix).unwrap_or("");
            let value = decode(raw)
                .ok_or_else(|| bad_model("invalid_model", "The model name is not valid."))?;
            url_model = Some((value, ModelSource::Path));
        }
        // A model in the query counts wherever a route names or bills a model, declared or
        // not: the upstream may read it.
        let query_name = match &sources.query {
            Some(name) => Some(&**name),
            None if sources.carries() || route.generation.bills() => Some("model"),
            None => None,
        };
        if let (Some(name), Some(query)) = (query_name, uri.query())
            && let Some(value) = query_param(query, name)?
        {
            if url_model
                .as_ref()
                .is_some_and(|(m, _)| !same_model(m, &value))
            {
                return Err(bad_model(
                    "ambiguous_model",
                    "The model is given in two places with different values.",
                ));
            }
            url_model = Some((value, ModelSource::Query));
        }
        if let (Some(trace), Some((m, _))) = (trace, url_model.as_ref()) {
            trace.set_model(&**m);
        }
        let grpc = is_grpc(headers);
        if route.grpc && !grpc {
            return Err(unsupported(
                "unsupported_media_type",
                "This endpoint takes gRPC (Content-Type: application/grpc).",
            ));
        }
        let mut body = None;
        // An upload is read only where its content must be verified: a batch file of a
        // caller with model rules.
        let verifies_upload = route.batch_input && principal.has_model_rules();
        let names_objects = route.body_refs && shared.objects.is_some();
        if route.reads_body() || verifies_upload || names_objects {
            let coding = body_coding(shared, headers)?;
            let mut types = headers.get_all(CONTENT_TYPE).iter();
            let ct = types.next().and_then(|v| v.to_str().ok()).unwrap_or("");
            if types.next().is_some() {
                return Err(unsupported(
                    "unsupported_media_type",
                    "The request has more than one Content-Type.",
                ));
            }
            let takes_json = sources.json || !sources.multipart;
            let kind = if grpc {
                return Err(unsupported(
                    "unsupported_media_type",
                    "This endpoint does not take gRPC.",
                ));
            } else if let Some(b) =
                multipart::boundary(ct).filter(|_| sources.multipart || route.batch_input)
            {
                BodyKind::Multipart(b.into())
            } else if takes_json && (ct.is_empty() || keygate_core::is_json_media_type(ct)) {
                BodyKind::Json
            } else {
                return Err(unsupported(
                    "unsupported_media_type",
                    if takes_json {
                        "This endpoint takes a JSON body (Content-Type: application/json)."
                    } else {
                        "This endpoint takes a multipart/form-data body."
                    },
                ));
            };
            body = Some((kind, coding));
            if let Some(len) = headers.get(CONTENT_LENGTH) {
                let len: u64 = len
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        scope_denial(
                            StatusCode::BAD_REQUEST,
                            "invalid_content_length",
                            "Invalid Content-Length.",
                        )
                    })?;
                if len > shared.body_limit as u64 {
                    return Err(if route.reads_body() {
                        too_large()
                    } else {
                        upload_too_large("is larger than", shared.body_limit)
                    });
                }
            }
        }
        Ok(Checked {
            route_id: matched.id,
            route,
            client_ip,
            url_model,
            body,
            verifying: verifies_upload && !route.reads_body(),
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        s
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }
}

/// The model check and policies, on the facts gathered; on success, the facts to insert.
fn finish(
    shared: &Shared,
    principal: &Principal,
    route: &Route,
    client_ip: Option<IpAddr>,
    mut facts: RequestFacts,
    method: &Method,
    path: &str,
) -> Result<RequestFacts, Denial> {
    if facts.model.is_none()
        && let Some(default) = &route.default_model
    {
        facts.model = Some(default.clone());
        facts.model_source = Some(ModelSource::Default);
    }
    let rules = principal.has_model_rules();
    match facts.model() {
        Some(m) if rules && !principal.allows_model(m) => {
            return Err(scope_denial(
                StatusCode::FORBIDDEN,
                "model_not_allowed",
                "This key may not use the requested model.",
            )
            .with_param("model"));
        }
        None if rules && route.indirect && !facts.models_verified => {
            return Err(scope_denial(
                StatusCode::FORBIDDEN,
                "model_unverifiable",
                "This key may use only some models, and the model this request would use cannot be verified: name an allowed model in the request.",
            )
            .with_param("model"));
        }
        None if rules && route.model.required && route.model.carries() => {
            return Err(bad_model(
                "model_required",
                "This key may use only some models: name the model in the request.",
            ));
        }
        _ => {}
    }
    let records = !principal.key().policies.is_empty() || !principal.project().policies.is_empty();
    if records || !shared.policies.is_empty() {
        let ctx = PolicyContext::new(
            principal,
            &facts.endpoint,
            facts.model(),
            client_ip,
            shared.clock.now(),
            method,
            path,
        );
        let from_records = if records {
            crate::policy::check_records(&ctx)
        } else {
            Ok(())
        };
        for result in
            std::iter::once(from_records).chain(shared.policies.iter().map(|p| p.check(&ctx)))
        {
            if let Err(d) = result {
                return Err(Denial::new(Stage::Policy, d.status, d.code, d.message));
            }
        }
    }
    Ok(facts)
}

/// A request's facts, once the objects it names are checked (when it names any).
type Checking = Pin<Box<dyn Future<Output = Result<RequestFacts, Denial>> + Send>>;

/// What follows the facts: the request's objects checked against the registry (when it
/// names any: then later), and [`finish`].
// Returned and matched at once, never stored: boxing the large variant would only add an
// allocation to every request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Done(Result<RequestFacts, Denial>),
    Later(Checking),
}

fn after_facts(
    shared: &Arc<Shared>,
    principal: &Principal,
    route_id: u32,
    client_ip: Option<IpAddr>,
    mut facts: RequestFacts,
    method: &Method,
    path: &str,
) -> Next {
    let route = shared.routes.route(route_id);
    let Some(registry) = &shared.objects else {
        return Next::Done(finish(
            shared, principal, route, client_ip, facts, method, path,
        ));
    };
    objects::path_refs(route, path, &mut facts.objects);
    if let Some(model) = objects::model_ref(&facts) {
        facts.objects.push(model);
    }
    if facts.objects.is_empty() {
        return Next::Done(finish(
            shared, principal, route, client_ip, facts, method, path,
        ));
    }
    let (shared, registry, principal) = (shared.clone(), registry.clone(), principal.clone());
    let (method, path) = (method.clone(), path.to_owned());
    Next::Later(Box::pin(async move {
        let route = shared.routes.route(route_id);
        let facts = objects::check(&*registry, &principal, route.indirect, facts).await?;
        finish(&shared, &principal, route, client_ip, facts, &method, &path)
    }))
}

/// What the response to a request with `facts` does to the registry, if anything.
fn action_of(
    shared: &Shared,
    principal: &Principal,
    route: &Route,
    facts: &RequestFacts,
) -> Option<Action> {
    let registry = shared.objects.as_ref()?;
    if route.deletes {
        let id = facts
            .objects
            .iter()
            .rev()
            .find(|r| matches!(r.at, keygate_core::RefAt::Path(_)))?;
        return Some(Action::Delete(registry.clone(), id.id.clone()));
    }
    if !route.records {
        return None;
    }
    if let Some(default) = route.stored_by_default
        && !facts.store.unwrap_or(default)
    {
        return None;
    }
    Some(Action::Record(Owner {
        registry: registry.clone(),
        project: principal.project().id.clone(),
        key_id: principal.key_id().as_str().to_owned(),
        now: shared.clock.now().as_unix_secs(),
        batch_models: facts
            .batch_models
            .as_ref()
            .map(|m| m.iter().map(|m| m.to_string()).collect()),
    }))
}

/// The facts every request to `route` starts from.
fn facts_of(route: &Route) -> RequestFacts {
    let mut facts = RequestFacts::new(
        EndpointMatch {
            group: route.group.clone(),
            access: route.access,
            route: route.pattern.clone(),
        },
        route.generation,
    );
    facts.output_field.clone_from(&route.output_field);
    if route.grpc {
        facts.protocol = Protocol::Grpc;
    }
    facts
}

fn insert(ext: &mut http::Extensions, facts: RequestFacts, client_ip: Option<IpAddr>) {
    ext.insert(facts);
    if let Some(ip) = client_ip {
        ext.insert(ClientIp(ip));
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Scope<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: Body + BodyFromBytes,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    type Response = Response<ResponseBody<ObjectBody<ResBody>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        for name in METHOD_OVERRIDE_HEADERS {
            req.headers_mut().remove(HeaderName::from_static(name));
        }
        let shared = &*self.shared;
        let Some(principal) = req.extensions().get::<Principal>() else {
            return ResponseFuture::denied(
                Denial::missing_credential().with_detail("no principal reached the scope layer"),
                req.headers(),
            );
        };
        let checked = match Self::check_head(
            shared,
            principal,
            req.method(),
            req.uri(),
            req.headers(),
            req.extensions(),
        ) {
            Ok(c) => c,
            Err(d) => return ResponseFuture::denied(d, req.headers()),
        };
        if let Some((kind, coding)) = checked.body {
            let pending = Pending {
                principal: principal.clone(),
                route: checked.route_id,
                client_ip: checked.client_ip,
                url_model: checked.url_model.map(|(m, src)| (m.into_owned(), src)),
                kind,
                coding,
                verifying: checked.verifying,
            };
            let (parts, body) = req.into_parts();
            let clone = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, clone);
            return ResponseFuture {
                state: State::Reading {
                    collect: Limited::new(body, shared.body_limit).collect(),
                    rest: Some((parts, inner, self.shared.clone(), pending)),
                },
            };
        }
        let client_ip = checked.client_ip;
        let mut facts = facts_of(checked.route);
        if let Some((m, source)) = checked.url_model {
            facts.model = Some(RequestedModel::new(&*m));
            facts.model_source = Some(source);
        }
        let route_id = checked.route_id;
        let next = after_facts(
            &self.shared,
            principal,
            route_id,
            client_ip,
            facts,
            req.method(),
            req.uri().path(),
        );
        match next {
            Next::Done(Ok(facts)) => {
                let action = action_of(shared, principal, checked.route, &facts);
                insert(req.extensions_mut(), facts, client_ip);
                ResponseFuture::inner(self.inner.call(req), action)
            }
            Next::Done(Err(d)) => ResponseFuture::denied(d, req.headers()),
            Next::Later(check) => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture {
                    state: State::Checking {
                        check,
                        rest: Some((req, inner, self.shared.clone(), client_ip, route_id)),
                    },
                }
            }
        }
    }
}

/// What the body-reading state needs to finish the check.
struct Pending {
    principal: Principal,
    route: u32,
    client_ip: Option<IpAddr>,
    url_model: Option<(String, ModelSource)>,
    kind: BodyKind,
    coding: Option<Coding>,
    /// Read only to verify an upload: an over-limit body says so.
    verifying: bool,
}

pin_project! {
    /// Response future of [`Scope`]: a ready refusal, the inner service's future, or (on
    /// routes whose body names the model) reading the body first.
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        ReqBody: Body,
        ReqBody::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

type Rest<S> = (http::request::Parts, S, Arc<Shared>, Pending);

/// A request waiting for its objects to be checked.
type Waiting<S, ReqBody> = (Request<ReqBody>, S, Arc<Shared>, Option<IpAddr>, u32);

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        ReqBody: Body,
        ReqBody::Error: Into<BoxError>,
    {
        Denied { response: Option<Response<Full<Bytes>>> },
        Inner { #[pin] future: S::Future, action: Option<Action> },
        Reading { #[pin] collect: Collect<Limited<ReqBody>>, rest: Option<Rest<S>> },
        Checking { check: Checking, rest: Option<Waiting<S, ReqBody>> },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    fn denied(denial: Denial, headers: &HeaderMap) -> Self {
        ResponseFuture {
            state: State::Denied {
                response: Some(denial.into_response(headers)),
            },
        }
    }

    fn inner(future: S::Future, action: Option<Action>) -> Self {
        ResponseFuture {
            state: State::Inner { future, action },
        }
    }
}

/// The body as inspected: decoded if it was compressed (and then forwarded decoded, so the
/// inner service acts on exactly the bytes that were checked).
fn decoded_body(shared: &Shared, pending: &Pending, bytes: Bytes) -> Result<Bytes, Denial> {
    match pending.coding {
        None => Ok(bytes),
        #[cfg(feature = "decompression")]
        Some(coding) => {
            let cap = shared
                .decompression
                .as_ref()
                .and_then(|d| d.max_decompressed)
                .unwrap_or(shared.body_limit);
            let mut out = Vec::new();
            decompress::decode(coding, &bytes, cap, &mut out).map_err(|e| match e {
                DecodeError::TooLarge if pending.verifying => {
                    upload_too_large("decompresses to more than", cap)
                        .with_detail("decompressed body over the cap")
                }
                DecodeError::TooLarge => too_large().with_detail("decompressed body over the cap"),
                DecodeError::Corrupt => scope_denial(
                    StatusCode::BAD_REQUEST,
                    "invalid_body_encoding",
                    format!("The request body is not valid {coding} data."),
                ),
            })?;
            Ok(Bytes::from(out))
        }
        #[cfg(not(feature = "decompression"))]
        Some(never) => {
            let _ = (shared, bytes);
            match never {}
        }
    }
}

fn batch_unverifiable() -> Denial {
    scope_denial(
        StatusCode::FORBIDDEN,
        "model_unverifiable",
        "This key may use only some models, and a batch file uploaded in parts cannot be verified: upload it whole with POST /v1/files.",
    )
    .with_param("purpose")
}

/// The models a batch input file's requests name, each allowed for `principal`.
fn check_batch_file(
    principal: &Principal,
    parts: &[multipart::Part<'_>],
) -> Result<Vec<Arc<str>>, Denial> {
    let mut files = parts.iter().filter(|p| p.name == "file");
    let (Some(file), None) = (files.next(), files.next()) else {
        return Err(scope_denial(
            StatusCode::BAD_REQUEST,
            "invalid_form",
            "A batch upload takes exactly one file.",
        ));
    };
    let models = batch_models(file.content).map_err(|BatchError::BadLine(line)| {
        scope_denial(
            StatusCode::BAD_REQUEST,
            "invalid_batch_file",
            format!(
                "Line {line} of the batch file is not a request naming its model (body.model)."
            ),
        )
        .with_param("file")
    })?;
    if let Some(m) = models.iter().find(|m| !principal.allows_model(m)) {
        let shown = truncate(m, 100);
        return Err(scope_denial(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("This key may not use the model {shown:?}, which the batch file names."),
        )
        .with_param("file"));
    }
    Ok(models)
}

/// What an image form (an edit or a variation) asks for: `n`, `size` and `quality`, each
/// exactly once as plain text if given (the JSON scanner reads the same from a JSON body).
fn image_fields(facts: &mut RequestFacts, parts: &[multipart::Part<'_>]) -> Result<(), Denial> {
    let field = |name: &'static str| {
        multipart::text_field(parts, name).map_err(|_| {
            scope_denial(
                StatusCode::BAD_REQUEST,
                "invalid_form",
                format!("The form's {name} field is given more than once, or is not plain text."),
            )
            .with_param(name)
        })
    };
    if let Some(n) = field("n")? {
        // Digits only: what is billed is never guessed from a value the upstream may read
        // differently.
        let valid = !n.is_empty() && n.len() <= 19 && n.bytes().all(|b| b.is_ascii_digit());
        match n.parse::<u64>() {
            Ok(n) if valid && n >= 1 => facts.choices = n,
            _ => {
                return Err(scope_denial(
                    StatusCode::BAD_REQUEST,
                    "invalid_value",
                    "The number of images (n) must be a whole number of at least 1.",
                )
                .with_param("n"));
            }
        }
    }
    facts.image_size = field("size")?.map(Arc::from);
    facts.image_quality = field("quality")?.map(Arc::from);
    Ok(())
}

/// Analyses a collected body into the request's facts and runs the rest of the check.
/// The facts read from the body (not yet [`finish`]ed).
fn check_body(
    shared: &Shared,
    parts: &http::request::Parts,
    pending: &Pending,
    bytes: &[u8],
) -> Result<RequestFacts, Denial> {
    let route = shared.routes.route(pending.route);
    let mut facts = facts_of(route);
    let mut scanned = None;
    let body_model: Option<Cow<'_, str>> = match &pending.kind {
        // Read only for the objects it may name, and empty: it names none.
        BodyKind::Json if bytes.is_empty() && !route.reads_body() => None,
        BodyKind::Json => {
            let fields = if shared.tokens.is_some() && pending.principal.has_token_limits() {
                scan_json_text(bytes)
            } else {
                scan_json(bytes)
            }
            .map_err(|e| e.denial(Stage::Scope))?;
            facts.absorb_json(&fields);
            if shared.objects.is_some() {
                facts.absorb_refs(&fields, bytes);
            }
            if route.batch_input
                && fields.purpose.as_deref() == Some("batch")
                && pending.principal.has_model_rules()
            {
                return Err(batch_unverifiable());
            }
            let model = fields.model.clone();
            scanned = Some(fields);
            model
        }
        BodyKind::Multipart(boundary) => {
            facts.protocol = Protocol::Multipart;
            facts.prompt = PromptSize::default();
            let form_error = |e| match e {
                FormError::Invalid => scope_denial(
                    StatusCode::BAD_REQUEST,
                    "invalid_form",
                    "The multipart form is malformed.",
                ),
                FormError::AmbiguousModel => bad_model(
                    "ambiguous_model",
                    "The form names the model (or the file's purpose) more than once.",
                ),
                FormError::ModelNotText => bad_model("invalid_model", "The model must be text."),
            };
            let parts = multipart::parts(bytes, boundary).map_err(form_error)?;
            if route.batch_input
                && multipart::text_field(&parts, "purpose").map_err(form_error)? == Some("batch")
            {
                facts.batch_models = Some(check_batch_file(&pending.principal, &parts)?);
            }
            if route.generation == Generation::Images {
                image_fields(&mut facts, &parts)?;
            }
            multipart::text_field(&parts, "model")
                .map_err(form_error)?
                .map(Cow::Borrowed)
        }
    };
    let model = match (&pending.url_model, body_model) {
        (Some((a, _)), Some(b)) if !same_model(a, &b) => {
            return Err(bad_model(
                "ambiguous_model",
                "The model is given in two places with different values.",
            ));
        }
        (Some((a, source)), _) => Some((Cow::Borrowed(a.as_str()), *source)),
        (None, b) => b.map(|b| (b, ModelSource::Body)),
    };
    if let Some((m, source)) = model {
        if let Some(trace) = parts.extensions.get::<RequestTrace>() {
            trace.set_model(&*m);
        }
        facts.model = Some(RequestedModel::new(&*m));
        facts.model_source = Some(source);
    }
    let route_default = facts
        .model
        .is_none()
        .then(|| route.default_model.clone())
        .flatten();
    // Counted only where a token rate or budget makes the prompt's size matter.
    if let (Some(counter), Some(fields)) = (&shared.tokens, &scanned)
        && pending.principal.has_token_limits()
        && let Some(model) = facts.model().or(route_default.as_ref().map(|m| m.as_str()))
    {
        facts.prompt.tokens =
            count_prompt(fields, bytes, model, counter.as_ref(), shared.max_tokenized);
    }
    Ok(facts)
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + BodyFromBytes,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    type Output = Result<Response<ResponseBody<ObjectBody<ResBody>>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Denied { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::denied)));
                }
                StateProj::Inner { future, action } => {
                    let res = ready!(future.poll(cx))?;
                    let body = match action.take() {
                        Some(action) if res.status().is_success() => {
                            let events = res
                                .headers()
                                .get(CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|ct| ct.starts_with("text/event-stream"));
                            let (parts, body) = res.into_parts();
                            return Poll::Ready(Ok(Response::from_parts(
                                parts,
                                ResponseBody::inner(ObjectBody::new(body, action, events)),
                            )));
                        }
                        _ => res,
                    };
                    return Poll::Ready(Ok(body.map(|b| ResponseBody::inner(ObjectBody::pass(b)))));
                }
                StateProj::Checking { check, rest } => {
                    let checked = ready!(check.as_mut().poll(cx));
                    let (mut req, mut inner, shared, client_ip, route_id) =
                        rest.take().expect("ResponseFuture polled after completion");
                    match checked {
                        Ok(facts) => {
                            let route = shared.routes.route(route_id);
                            let action = req
                                .extensions()
                                .get::<Principal>()
                                .and_then(|p| action_of(&shared, p, route, &facts));
                            insert(req.extensions_mut(), facts, client_ip);
                            State::Inner {
                                future: inner.call(req),
                                action,
                            }
                        }
                        Err(d) => State::Denied {
                            response: Some(d.into_response(req.headers())),
                        },
                    }
                }
                StateProj::Reading { collect, rest } => {
                    let collected = ready!(collect.poll(cx));
                    let (mut parts, mut inner, shared, pending) =
                        rest.take().expect("ResponseFuture polled after completion");
                    let bytes = match collected {
                        Ok(c) => c.to_bytes(),
                        Err(e) => {
                            let denial = if e.is::<LengthLimitError>() {
                                if pending.verifying {
                                    upload_too_large("is larger than", shared.body_limit)
                                } else {
                                    too_large()
                                }
                            } else {
                                scope_denial(
                                    StatusCode::BAD_REQUEST,
                                    "body_unreadable",
                                    "The request body could not be read.",
                                )
                            };
                            let response = Some(denial.into_response(&parts.headers));
                            self.as_mut()
                                .project()
                                .state
                                .set(State::Denied { response });
                            continue;
                        }
                    };
                    let checked = decoded_body(&shared, &pending, bytes).and_then(|bytes| {
                        check_body(&shared, &parts, &pending, &bytes).map(|f| (f, bytes))
                    });
                    let (facts, bytes) = match checked {
                        Ok(checked) => checked,
                        Err(d) => {
                            let response = Some(d.into_response(&parts.headers));
                            self.as_mut()
                                .project()
                                .state
                                .set(State::Denied { response });
                            continue;
                        }
                    };
                    if pending.coding.is_some() {
                        // Forwarded as checked: decoded.
                        parts.headers.remove(CONTENT_ENCODING);
                        parts
                            .headers
                            .insert(CONTENT_LENGTH, http::HeaderValue::from(bytes.len()));
                    }
                    let next = after_facts(
                        &shared,
                        &pending.principal,
                        pending.route,
                        pending.client_ip,
                        facts,
                        &parts.method,
                        parts.uri.path(),
                    );
                    let req = Request::from_parts(parts, ReqBody::from_bytes(bytes));
                    match next {
                        Next::Done(Ok(facts)) => {
                            let route = shared.routes.route(pending.route);
                            let action = action_of(&shared, &pending.principal, route, &facts);
                            let mut req = req;
                            insert(req.extensions_mut(), facts, pending.client_ip);
                            State::Inner {
                                future: inner.call(req),
                                action,
                            }
                        }
                        Next::Done(Err(d)) => State::Denied {
                            response: Some(d.into_response(req.headers())),
                        },
                        Next::Later(check) => State::Checking {
                            check,
                            rest: Some((req, inner, shared, pending.client_ip, pending.route)),
                        },
                    }
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}
