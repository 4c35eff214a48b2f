//! The route table: method + path → endpoint group, needed access, and where the model is.

use std::sync::Arc;

use http::Method;
use keygate_core::{Access, EndpointGroup, Generation, ObjectKind, RequestedModel};
use serde::{Deserialize, Serialize};

/// Where a route's request names its model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelIn {
    /// The top-level `model` of a JSON object body.
    Json,
    /// The `model` field of a `multipart/form-data` body.
    Multipart,
    /// A JSON or multipart body, told apart by `Content-Type`.
    Body,
    /// The path parameter of this name (`{model}` in the route pattern).
    Path(String),
    /// The query parameter of this name.
    Query(String),
}

/// One route as written in code or config.
///
/// ```toml
/// [[routes]]
/// method = "POST"
/// path = "/v1/chat/completions"
/// group = "chat.completions"
/// model = ["json"]
///
/// [[routes]]
/// method = "GET"
/// path = "/v1/models/{model}"
/// group = "models"
/// model = [{ path = "model" }]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// HTTP method (`GET`, `POST`, ...). A `GET` route also serves `HEAD`, as in axum.
    pub method: String,
    /// Path pattern: literal segments, `{name}` segments (optionally followed by a literal
    /// suffix such as `{model}:generateContent`), and a trailing `{*name}` wildcard.
    pub path: String,
    /// The endpoint group the route belongs to.
    pub group: String,
    /// The access needed; by default Read for GET/HEAD/OPTIONS and Write otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// Where the route's requests name their model (empty: the route carries none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model: Vec<ModelIn>,
    /// Whether a request to this route must name a model when the caller has model rules
    /// (default true). Set false where the API has a default or inherits one (moderations,
    /// runs inheriting the assistant's model).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub model_required: bool,
    /// What the route makes, which decides what its requests reserve (`nothing` never
    /// reserves tokens or money and never needs a price). By default `text` for routes that
    /// need Write access and `nothing` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generates: Option<Generation>,
    /// The body field that caps the output (`max_completion_tokens`, `max_tokens`,
    /// `max_output_tokens`): where keygate writes a cap when the client names none. Without
    /// one, a request naming no cap reserves the default cap but is forwarded as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_field: Option<String>,
    /// The model the API applies when a request names none (`dall-e-2` for image
    /// generation): checked against the caller's model rules and priced as if named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_model: Option<String>,
    /// The model that does the work may be one the request does not name (a run inherits
    /// its assistant's model; a batch runs the requests of a file): a caller with model rules
    /// is refused (403 `model_unverifiable`) unless the request names the model itself.
    #[serde(default, skip_serializing_if = "is_false")]
    pub model_indirect: bool,
    /// The route speaks gRPC: its bodies are gRPC frames (`application/grpc…`), never
    /// buffered; any other `Content-Type` is refused with 415. On every other route that
    /// reads its body, a gRPC `Content-Type` is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub grpc: bool,
    /// The route uploads files, and a file with `purpose=batch` is a list of requests: for a
    /// caller with model rules, the upload is read (up to the body limit) and refused unless
    /// every request in it names an allowed model (`POST /v1/files`); an upload in parts
    /// (`POST /v1/uploads` with `purpose: batch`) cannot be read whole and is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub batch_input: bool,
    /// A successful response creates (or changes) objects: with an object registry, the
    /// scope layer records each object the response returns (`id` and `object` of a known
    /// kind, at the top level, as a run's `thread_id`, as an upload's `file`, or in the events
    /// of a stream) as owned by the caller's project.
    #[serde(default, skip_serializing_if = "is_false")]
    pub records: bool,
    /// For a route that records only what the request asks to be stored: whether it is
    /// stored when the body has no `store` (chat completions: false; responses: true).
    /// `None`: always recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_by_default: Option<bool>,
    /// A successful response deletes the object named by the route's last path parameter:
    /// with an object registry, it is forgotten.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deletes: bool,
    /// The JSON body can name objects (`input_file_id`, `file_ids`, attachments): with an
    /// object registry, it is read even when nothing else needs it, and every object it names
    /// must belong to the caller's project. (Bodies read for other reasons are always
    /// searched.)
    #[serde(default, skip_serializing_if = "is_false")]
    pub body_refs: bool,
}

/// The kind of object a path parameter names, by the parameter's name (`file_id`,
/// `assistant_id`, …; `batch_id` after `file_batches` is a vector store's file batch).
/// Parameters of other names (`model`, `step_id`, `permission_id`) name no object keygate
/// records.
pub(crate) fn path_object_kind(name: &str, previous_segment: &str) -> Option<ObjectKind> {
    Some(match name {
        "file_id" => ObjectKind::File,
        "upload_id" => ObjectKind::Upload,
        "batch_id" if previous_segment == "file_batches" => ObjectKind::VectorStoreFileBatch,
        "batch_id" => ObjectKind::Batch,
        "assistant_id" => ObjectKind::Assistant,
        "thread_id" => ObjectKind::Thread,
        "message_id" => ObjectKind::Message,
        "run_id" => ObjectKind::Run,
        "vector_store_id" => ObjectKind::VectorStore,
        "job_id" => ObjectKind::FineTuningJob,
        "checkpoint" => ObjectKind::FineTuningCheckpoint,
        "response_id" => ObjectKind::Response,
        "completion_id" => ObjectKind::ChatCompletion,
        _ => return None,
    })
}

impl RouteSpec {
    /// A route with the default access for its method, no model and the default of every
    /// other setting.
    pub fn new(method: &str, path: &str, group: &str) -> Self {
        RouteSpec {
            method: method.to_owned(),
            path: path.to_owned(),
            group: group.to_owned(),
            access: None,
            model: Vec::new(),
            model_required: true,
            generates: None,
            output_field: None,
            default_model: None,
            model_indirect: false,
            grpc: false,
            batch_input: false,
            records: false,
            stored_by_default: None,
            deletes: false,
            body_refs: false,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A route table as written in config: `routes = [...]`, optionally on top of the OpenAI preset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Start from [`RouteTable::openai`] and add `routes` to it.
    #[serde(default)]
    pub openai_preset: bool,
    /// The routes.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

/// Why a route table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The method is not a valid HTTP method.
    #[error("route {path}: invalid method {method:?}")]
    BadMethod {
        /// The route's path.
        path: String,
        /// The method as given.
        method: String,
    },
    /// The pattern is malformed.
    #[error("route {path}: {reason}")]
    BadPattern {
        /// The route's path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two routes with the same method and the same pattern shape.
    #[error("route {method} {path} is defined twice")]
    Duplicate {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A `model = { path = .. }` that names no parameter of the pattern.
    #[error("route {path}: no path parameter named {name:?}")]
    UnknownParam {
        /// The route's path.
        path: String,
        /// The parameter named.
        name: String,
    },
}

/// Where, compiled, a route's model is to be found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ModelSources {
    pub(crate) json: bool,
    pub(crate) multipart: bool,
    /// (segment index, suffix length) of the path parameter.
    pub(crate) path: Option<(usize, usize)>,
    pub(crate) query: Option<Box<str>>,
    pub(crate) required: bool,
}

impl ModelSources {
    /// Whether requests to the route name a model anywhere.
    pub(crate) fn carries(&self) -> bool {
        self.body() || self.path.is_some() || self.query.is_some()
    }

    pub(crate) fn body(&self) -> bool {
        self.json || self.multipart
    }
}

/// A path parameter that names an object.
#[derive(Debug, Clone)]
pub(crate) struct PathObject {
    /// The segment's index.
    pub(crate) index: usize,
    /// The length of the segment's literal suffix.
    pub(crate) suffix: usize,
    pub(crate) name: Arc<str>,
    pub(crate) kind: ObjectKind,
}

/// A compiled route.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) pattern: Arc<str>,
    pub(crate) group: EndpointGroup,
    pub(crate) access: Access,
    pub(crate) model: ModelSources,
    pub(crate) generation: Generation,
    pub(crate) output_field: Option<Arc<str>>,
    pub(crate) default_model: Option<RequestedModel>,
    pub(crate) indirect: bool,
    pub(crate) grpc: bool,
    pub(crate) batch_input: bool,
    /// The path parameters that name objects.
    pub(crate) objects: Box<[PathObject]>,
    pub(crate) records: bool,
    pub(crate) stored_by_default: Option<bool>,
    pub(crate) deletes: bool,
    pub(crate) body_refs: bool,
}

impl Route {
    /// Whether the request body is read: the model is in it, or the route bills (what a
    /// request may cost is in the body), unless the route speaks gRPC.
    pub(crate) fn reads_body(&self) -> bool {
        !self.grpc && (self.model.body() || self.generation.bills())
    }
}

#[derive(Debug, Clone, Default)]
struct MethodMap {
    get: Option<u32>,
    post: Option<u32>,
    put: Option<u32>,
    patch: Option<u32>,
    delete: Option<u32>,
    other: Vec<(Method, u32)>,
}

impl MethodMap {
    fn slot(&mut self, method: &Method) -> Option<&mut Option<u32>> {
        Some(match *method {
            Method::GET => &mut self.get,
            Method::POST => &mut self.post,
            Method::PUT => &mut self.put,
            Method::PATCH => &mut self.patch,
            Method::DELETE => &mut self.delete,
            _ => return None,
        })
    }

    fn insert(&mut self, method: Method, id: u32) -> bool {
        match self.slot(&method) {
            Some(slot) => slot.replace(id).is_none(),
            None => {
                if self.other.iter().any(|(m, _)| *m == method) {
                    return false;
                }
                self.other.push((method, id));
                true
            }
        }
    }

    #[inline]
    fn get(&self, method: &Method) -> Option<u32> {
        match *method {
            Method::GET => self.get,
            Method::POST => self.post,
            Method::PUT => self.put,
            Method::PATCH => self.patch,
            Method::DELETE => self.delete,
            // axum answers HEAD with the GET route unless HEAD has its own.
            Method::HEAD => self
                .other
                .iter()
                .find(|(m, _)| m == method)
                .map(|(_, id)| *id)
                .or(self.get),
            _ => self
                .other
                .iter()
                .find(|(m, _)| m == method)
                .map(|(_, id)| *id),
        }
    }

    fn is_empty(&self) -> bool {
        self.get.is_none()
            && self.post.is_none()
            && self.put.is_none()
            && self.patch.is_none()
            && self.delete.is_none()
            && self.other.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
struct Node {
    literals: Vec<(Box<str>, usize)>,
    /// Parameter children: (literal suffix, child). An empty suffix is a plain `{name}`.
    params: Vec<(Box<str>, usize)>,
    wildcard: MethodMap,
    end: MethodMap,
}

/// Method + path → route. Literal segments win over parameters, parameters over a wildcard;
/// the match backtracks like axum's router. Case-sensitive; a trailing `/` is part of the
/// path (`/v1/models/` is not `/v1/models`), as in axum.
///
/// Build one in code with [`RouteTable::builder`], from config with
/// [`RouteTable::from_config`], or take the [`RouteTable::openai`] preset.
#[derive(Debug, Clone)]
pub struct RouteTable {
    nodes: Vec<Node>,
    routes: Vec<Route>,
}

/// A matched route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Matched<'a> {
    pub(crate) id: u32,
    pub(crate) route: &'a Route,
}

enum Seg<'a> {
    Literal(&'a str),
    Param { name: &'a str, suffix: &'a str },
    Wildcard,
}

fn parse_segment<'a>(seg: &'a str, path: &str, last: bool) -> Result<Seg<'a>, RouteError> {
    let bad = |reason| RouteError::BadPattern {
        path: path.to_owned(),
        reason,
    };
    if seg.is_empty() {
        return Err(bad("empty segment"));
    }
    if let Some(rest) = seg.strip_prefix('{') {
        let Some(close) = rest.find('}') else {
            return Err(bad("unclosed '{'"));
        };
        let (name, suffix) = (&rest[..close], &rest[close + 1..]);
        if let Some(wild) = name.strip_prefix('*') {
            if !last || !suffix.is_empty() || wild.is_empty() {
                return Err(bad("a wildcard must be the whole last segment"));
            }
            return Ok(Seg::Wildcard);
        }
        if name.is_empty() || suffix.contains(['{', '}']) {
            return Err(bad("bad parameter"));
        }
        return Ok(Seg::Param { name, suffix });
    }
    if seg.contains(['{', '}']) {
        return Err(bad("a parameter must start its segment"));
    }
    if crate::path::check_path(&format!("/{seg}")).is_err() {
        return Err(bad("literal segments must be plain printable ASCII"));
    }
    Ok(Seg::Literal(seg))
}

/// Builds a [`RouteTable`] in code.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RouteTableBuilder {
    specs: Vec<RouteSpec>,
}

impl RouteTableBuilder {
    /// Adds a route with the default access for its method and no model.
    pub fn route(mut self, method: Method, path: &str, group: &str) -> Self {
        self.specs
            .push(RouteSpec::new(method.as_str(), path, group));
        self
    }

    /// Adds a route whose requests name a model in `model`.
    pub fn model_route(mut self, method: Method, path: &str, group: &str, model: ModelIn) -> Self {
        self = self.route(method, path, group);
        if let Some(last) = self.specs.last_mut() {
            last.model.push(model);
        }
        self
    }

    /// Adds a route as written in config.
    pub fn spec(mut self, spec: RouteSpec) -> Self {
        self.specs.push(spec);
        self
    }

    /// Overrides the access of the route added last.
    pub fn access(mut self, access: Access) -> Self {
        if let Some(last) = self.specs.last_mut() {
            last.access = Some(access);
        }
        self
    }

    /// Sets what the route added last makes.
    pub fn generates(mut self, generation: Generation) -> Self {
        if let Some(last) = self.specs.last_mut() {
            last.generates = Some(generation);
        }
        self
    }

    /// Declares the route added last a gRPC route.
    pub fn grpc(mut self) -> Self {
        if let Some(last) = self.specs.last_mut() {
            last.grpc = true;
        }
        self
    }

    /// Compiles the table.
    ///
    /// # Errors
    ///
    /// A bad method, a malformed pattern, a route defined twice, or a model parameter that
    /// the pattern lacks.
    pub fn build(self) -> Result<RouteTable, RouteError> {
        let mut table = RouteTable {
            nodes: vec![Node::default()],
            routes: Vec::with_capacity(self.specs.len()),
        };
        for spec in self.specs {
            table.add(spec)?;
        }
        Ok(table)
    }
}

impl RouteTable {
    /// An empty builder.
    pub fn builder() -> RouteTableBuilder {
        RouteTableBuilder::default()
    }

    /// A table from config.
    ///
    /// # Errors
    ///
    /// As [`RouteTableBuilder::build`].
    pub fn from_config(config: &RouteConfig) -> Result<RouteTable, RouteError> {
        let mut builder = if config.openai_preset {
            RouteTableBuilder {
                specs: openai_specs(),
            }
        } else {
            RouteTable::builder()
        };
        builder.specs.extend(config.routes.iter().cloned());
        builder.build()
    }

    /// The OpenAI API (`/v1/...`) with the endpoint groups of OpenAI's restricted keys:
    /// `chat.completions`, `completions`, `responses`, `embeddings`, `images`,
    /// `audio.transcriptions`, `audio.translations`, `audio.speech`, `moderations`,
    /// `fine_tuning`, `files`, `uploads`, `batches`, `assistants`, `threads`,
    /// `vector_stores`, `models`.
    pub fn openai() -> RouteTable {
        RouteTableBuilder {
            specs: openai_specs(),
        }
        .build()
        .expect("the OpenAI preset is valid")
    }

    /// The route specs of the OpenAI preset, to extend or edit before building.
    pub fn openai_specs() -> Vec<RouteSpec> {
        openai_specs()
    }

    fn add(&mut self, spec: RouteSpec) -> Result<(), RouteError> {
        let method =
            Method::from_bytes(spec.method.as_bytes()).map_err(|_| RouteError::BadMethod {
                path: spec.path.clone(),
                method: spec.method.clone(),
            })?;
        let Some(rest) = spec.path.strip_prefix('/') else {
            return Err(RouteError::BadPattern {
                path: spec.path.clone(),
                reason: "a pattern must start with '/'",
            });
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let mut node = 0usize;
        let mut params = Vec::new();
        let mut objects = Vec::new();
        let mut wildcard = false;
        for (i, raw) in segs.iter().enumerate() {
            match parse_segment(raw, &spec.path, i + 1 == segs.len())? {
                Seg::Literal(lit) => {
                    node = match self.nodes[node].literals.iter().find(|(l, _)| &**l == lit) {
                        Some(&(_, child)) => child,
                        None => {
                            let child = self.nodes.len();
                            self.nodes.push(Node::default());
                            self.nodes[node].literals.push((lit.into(), child));
                            child
                        }
                    };
                }
                Seg::Param { name, suffix } => {
                    let previous = if i == 0 { "" } else { segs[i - 1] };
                    if let Some(kind) = path_object_kind(name, previous) {
                        objects.push(PathObject {
                            index: i,
                            suffix: suffix.len(),
                            name: Arc::from(name),
                            kind,
                        });
                    }
                    params.push((name, i, suffix.len()));
                    node = match self.nodes[node].params.iter().find(|(s, _)| &**s == suffix) {
                        Some(&(_, child)) => child,
                        None => {
                            let child = self.nodes.len();
                            self.nodes.push(Node::default());
                            // Longer suffixes first: the most specific wins.
                            let list = &mut self.nodes[node].params;
                            list.push((suffix.into(), child));
                            list.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
                            child
                        }
                    };
                }
                Seg::Wildcard => wildcard = true,
            }
        }
        let mut sources = ModelSources {
            required: spec.model_required,
            ..ModelSources::default()
        };
        for m in &spec.model {
            match m {
                ModelIn::Json => sources.json = true,
                ModelIn::Multipart => sources.multipart = true,
                ModelIn::Body => {
                    sources.json = true;
                    sources.multipart = true;
                }
                ModelIn::Path(name) => {
                    let Some(&(_, i, suffix)) = params.iter().find(|(n, _, _)| n == name) else {
                        return Err(RouteError::UnknownParam {
                            path: spec.path.clone(),
                            name: name.clone(),
                        });
                    };
                    sources.path = Some((i, suffix));
                }
                ModelIn::Query(name) => sources.query = Some(name.as_str().into()),
            }
        }
        let access = spec.access.unwrap_or(match method {
            Method::GET | Method::HEAD | Method::OPTIONS => Access::Read,
            _ => Access::Write,
        });
        let id = u32::try_from(self.routes.len()).expect("fewer than 2^32 routes");
        let generation = spec.generates.unwrap_or(if access == Access::Write {
            Generation::Text
        } else {
            Generation::Nothing
        });
        self.routes.push(Route {
            pattern: spec.path.as_str().into(),
            group: EndpointGroup::new(spec.group.as_str()),
            access,
            model: sources,
            generation,
            output_field: spec.output_field.as_deref().map(Arc::from),
            default_model: spec.default_model.as_deref().map(RequestedModel::new),
            indirect: spec.model_indirect,
            grpc: spec.grpc,
            batch_input: spec.batch_input,
            objects: objects.into(),
            records: spec.records,
            stored_by_default: spec.stored_by_default,
            deletes: spec.deletes,
            body_refs: spec.body_refs,
        });
        let map = if wildcard {
            &mut self.nodes[node].wildcard
        } else {
            &mut self.nodes[node].end
        };
        if !map.insert(method, id) {
            return Err(RouteError::Duplicate {
                method: spec.method,
                path: spec.path,
            });
        }
        Ok(())
    }

    /// Finds the route for `method` and `path` (a path [`check_path`](crate::check_path)
    /// accepted). No allocation.
    #[inline]
    pub(crate) fn find(&self, method: &Method, path: &str) -> Option<Matched<'_>> {
        let rest = path.strip_prefix('/')?;
        let id = self.walk(0, rest.as_bytes(), method)?;
        Some(Matched {
            id,
            route: &self.routes[id as usize],
        })
    }

    fn walk(&self, node: usize, rest: &[u8], method: &Method) -> Option<u32> {
        let n = &self.nodes[node];
        let (seg, tail) = match rest.iter().position(|&b| b == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let next = |child: usize| match tail {
            Some(tail) => self.walk(child, tail, method),
            None => self.nodes[child].end.get(method),
        };
        if let Some((_, child)) = n.literals.iter().find(|(lit, _)| same(lit.as_bytes(), seg))
            && let Some(id) = next(*child)
        {
            return Some(id);
        }
        if !seg.is_empty() {
            for (suffix, child) in &n.params {
                if seg.len() > suffix.len()
                    && same(suffix.as_bytes(), &seg[seg.len() - suffix.len()..])
                    && let Some(id) = next(*child)
                {
                    return Some(id);
                }
            }
            if !n.wildcard.is_empty() {
                return n.wildcard.get(method);
            }
        }
        None
    }

    pub(crate) fn route(&self, id: u32) -> &Route {
        &self.routes[id as usize]
    }

    /// The route pattern, group and access for `method` and `path`, if any route matches.
    /// For inspection and tests; the layer itself also checks the path first.
    pub fn lookup(&self, method: &Method, path: &str) -> Option<(&str, &EndpointGroup, Access)> {
        self.find(method, path)
            .map(|m| (&*m.route.pattern, &m.route.group, m.route.access))
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Byte equality without a `memcmp` call: segments are short, and the call costs more than
/// the comparison.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Extracts the path parameter at segment `index` (with `suffix_len` bytes of literal suffix)
/// from `path`.
pub(crate) fn path_param(path: &str, index: usize, suffix_len: usize) -> Option<&str> {
    let seg = path.strip_prefix('/')?.split('/').nth(index)?;
    seg.get(..seg.len().checked_sub(suffix_len)?)
}

fn openai_specs() -> Vec<RouteSpec> {
    use Generation::{Audio, Embeddings, Images, Nothing, Text};
    use ModelIn::{Body, Json, Multipart};
    // (method, path, group, where the model is, required, what it makes, output cap field,
    // default model, indirect)
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a str,
        ModelIn,
        bool,
        Generation,
        Option<&'a str>,
        Option<&'a str>,
        bool,
    );
    let path = |name: &str| ModelIn::Path(name.into());
    #[rustfmt::skip]
    let rows: Vec<Row<'_>> = vec![
        ("POST", "/v1/chat/completions", "chat.completions", Json, true, Text, Some("max_completion_tokens"), None, false),
        ("POST", "/v1/completions", "completions", Json, true, Text, Some("max_tokens"), None, false),
        ("POST", "/v1/responses", "responses", Json, true, Text, Some("max_output_tokens"), None, false),
        ("POST", "/v1/responses/input_tokens", "responses", Json, true, Nothing, None, None, false),
        ("POST", "/v1/embeddings", "embeddings", Json, true, Embeddings, None, None, false),
        ("POST", "/v1/images/generations", "images", Json, false, Images, None, Some("dall-e-2"), false),
        ("POST", "/v1/images/edits", "images", Body, false, Images, None, Some("dall-e-2"), false),
        ("POST", "/v1/images/variations", "images", Multipart, false, Images, None, Some("dall-e-2"), false),
        ("POST", "/v1/audio/transcriptions", "audio.transcriptions", Multipart, true, Audio, None, None, false),
        ("POST", "/v1/audio/translations", "audio.translations", Multipart, true, Audio, None, None, false),
        ("POST", "/v1/audio/speech", "audio.speech", Json, true, Audio, None, None, false),
        ("POST", "/v1/moderations", "moderations", Json, false, Nothing, None, Some("omni-moderation-latest"), false),
        ("POST", "/v1/fine_tuning/jobs", "fine_tuning", Json, true, Nothing, None, None, false),
        ("POST", "/v1/assistants", "assistants", Json, true, Nothing, None, None, false),
        ("POST", "/v1/assistants/{assistant_id}", "assistants", Json, false, Nothing, None, None, false),
        ("POST", "/v1/threads/runs", "threads", Json, false, Text, Some("max_completion_tokens"), None, true),
        ("POST", "/v1/threads/{thread_id}/runs", "threads", Json, false, Text, Some("max_completion_tokens"), None, true),
        ("GET", "/v1/models/{model}", "models", path("model"), true, Nothing, None, None, false),
        ("DELETE", "/v1/models/{model}", "models", path("model"), true, Nothing, None, None, false),
    ];
    let mut specs: Vec<RouteSpec> = rows
        .into_iter()
        .map(
            |(method, path, group, model, required, makes, cap, default, indirect)| {
                let mut spec = RouteSpec::new(method, path, group);
                spec.model = vec![model];
                spec.model_required = required;
                spec.generates = Some(makes);
                spec.output_field = cap.map(str::to_owned);
                spec.default_model = default.map(str::to_owned);
                spec.model_indirect = indirect;
                spec
            },
        )
        .collect();
    // Routes whose work is done by a model the request does not name, and that carry none.
    for (method, path, group, makes) in [
        (
            "POST",
            "/v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs",
            "threads",
            Text,
        ),
        ("POST", "/v1/batches", "batches", Nothing),
    ] {
        let mut spec = RouteSpec::new(method, path, group);
        spec.generates = Some(makes);
        spec.model_indirect = true;
        specs.push(spec);
    }
    // Uploads: a batch input file is read for the models its requests name.
    for (path, group) in [("/v1/files", "files"), ("/v1/uploads", "uploads")] {
        let mut spec = RouteSpec::new("POST", path, group);
        spec.generates = Some(Nothing);
        spec.batch_input = true;
        specs.push(spec);
    }
    // Routes without a model that make nothing billed.
    let plain: &[(&str, &str, &str)] = &[
        ("GET", "/v1/models", "models"),
        ("GET", "/v1/chat/completions", "chat.completions"),
        (
            "GET",
            "/v1/chat/completions/{completion_id}",
            "chat.completions",
        ),
        (
            "POST",
            "/v1/chat/completions/{completion_id}",
            "chat.completions",
        ),
        (
            "DELETE",
            "/v1/chat/completions/{completion_id}",
            "chat.completions",
        ),
        (
            "GET",
            "/v1/chat/completions/{completion_id}/messages",
            "chat.completions",
        ),
        ("GET", "/v1/responses/{response_id}", "responses"),
        ("DELETE", "/v1/responses/{response_id}", "responses"),
        ("POST", "/v1/responses/{response_id}/cancel", "responses"),
        (
            "GET",
            "/v1/responses/{response_id}/input_items",
            "responses",
        ),
        ("GET", "/v1/fine_tuning/jobs", "fine_tuning"),
        ("GET", "/v1/fine_tuning/jobs/{job_id}", "fine_tuning"),
        ("GET", "/v1/fine_tuning/jobs/{job_id}/events", "fine_tuning"),
        (
            "GET",
            "/v1/fine_tuning/jobs/{job_id}/checkpoints",
            "fine_tuning",
        ),
        (
            "POST",
            "/v1/fine_tuning/jobs/{job_id}/cancel",
            "fine_tuning",
        ),
        ("POST", "/v1/fine_tuning/jobs/{job_id}/pause", "fine_tuning"),
        (
            "POST",
            "/v1/fine_tuning/jobs/{job_id}/resume",
            "fine_tuning",
        ),
        (
            "GET",
            "/v1/fine_tuning/checkpoints/{checkpoint}/permissions",
            "fine_tuning",
        ),
        (
            "POST",
            "/v1/fine_tuning/checkpoints/{checkpoint}/permissions",
            "fine_tuning",
        ),
        (
            "DELETE",
            "/v1/fine_tuning/checkpoints/{checkpoint}/permissions/{permission_id}",
            "fine_tuning",
        ),
        ("GET", "/v1/files", "files"),
        ("GET", "/v1/files/{file_id}", "files"),
        ("DELETE", "/v1/files/{file_id}", "files"),
        ("GET", "/v1/files/{file_id}/content", "files"),
        ("POST", "/v1/uploads/{upload_id}/parts", "uploads"),
        ("POST", "/v1/uploads/{upload_id}/complete", "uploads"),
        ("POST", "/v1/uploads/{upload_id}/cancel", "uploads"),
        ("GET", "/v1/batches", "batches"),
        ("GET", "/v1/batches/{batch_id}", "batches"),
        ("POST", "/v1/batches/{batch_id}/cancel", "batches"),
        ("GET", "/v1/assistants", "assistants"),
        ("GET", "/v1/assistants/{assistant_id}", "assistants"),
        ("DELETE", "/v1/assistants/{assistant_id}", "assistants"),
        ("POST", "/v1/threads", "threads"),
        ("GET", "/v1/threads/{thread_id}", "threads"),
        ("POST", "/v1/threads/{thread_id}", "threads"),
        ("DELETE", "/v1/threads/{thread_id}", "threads"),
        ("GET", "/v1/threads/{thread_id}/messages", "threads"),
        ("POST", "/v1/threads/{thread_id}/messages", "threads"),
        (
            "GET",
            "/v1/threads/{thread_id}/messages/{message_id}",
            "threads",
        ),
        (
            "POST",
            "/v1/threads/{thread_id}/messages/{message_id}",
            "threads",
        ),
        (
            "DELETE",
            "/v1/threads/{thread_id}/messages/{message_id}",
            "threads",
        ),
        ("GET", "/v1/threads/{thread_id}/runs", "threads"),
        ("GET", "/v1/threads/{thread_id}/runs/{run_id}", "threads"),
        ("POST", "/v1/threads/{thread_id}/runs/{run_id}", "threads"),
        (
            "POST",
            "/v1/threads/{thread_id}/runs/{run_id}/cancel",
            "threads",
        ),
        (
            "GET",
            "/v1/threads/{thread_id}/runs/{run_id}/steps",
            "threads",
        ),
        (
            "GET",
            "/v1/threads/{thread_id}/runs/{run_id}/steps/{step_id}",
            "threads",
        ),
        ("POST", "/v1/vector_stores", "vector_stores"),
        ("GET", "/v1/vector_stores", "vector_stores"),
        (
            "GET",
            "/v1/vector_stores/{vector_store_id}",
            "vector_stores",
        ),
        (
            "POST",
            "/v1/vector_stores/{vector_store_id}",
            "vector_stores",
        ),
        (
            "DELETE",
            "/v1/vector_stores/{vector_store_id}",
            "vector_stores",
        ),
        (
            "POST",
            "/v1/vector_stores/{vector_store_id}/search",
            "vector_stores",
        ),
        (
            "GET",
            "/v1/vector_stores/{vector_store_id}/files",
            "vector_stores",
        ),
        (
            "POST",
            "/v1/vector_stores/{vector_store_id}/files",
            "vector_stores",
        ),
        (
            "GET",
            "/v1/vector_stores/{vector_store_id}/files/{file_id}",
            "vector_stores",
        ),
        (
            "POST",
            "/v1/vector_stores/{vector_store_id}/files/{file_id}",
            "vector_stores",
        ),
        (
            "DELETE",
            "/v1/vector_stores/{vector_store_id}/files/{file_id}",
            "vector_stores",
        ),
        (
            "GET",
            "/v1/vector_stores/{vector_store_id}/files/{file_id}/content",
            "vector_stores",
        ),
        (
            "POST",
            "/v1/vector_stores/{vector_store_id}/file_batches",
            "vector_stores",
        ),
        (
            "GET",
            "/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}",
            "vector_stores",
        ),
        (
            "POST",
            "/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel",
            "vector_stores",
        ),
        (
            "GET",
            "/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/files",
            "vector_stores",
        ),
    ];
    for (method, path, group) in plain {
        let mut spec = RouteSpec::new(method, path, group);
        spec.generates = Some(Nothing);
        specs.push(spec);
    }
    mark_objects(&mut specs);
    specs
}

/// What the preset's routes do to objects: which create them (their responses are recorded),
/// which delete them, and which take bodies that name them.
fn mark_objects(specs: &mut [RouteSpec]) {
    const RECORDS: &[&str] = &[
        "/v1/files",
        "/v1/uploads",
        "/v1/uploads/{upload_id}/complete",
        "/v1/batches",
        "/v1/assistants",
        "/v1/assistants/{assistant_id}",
        "/v1/threads",
        "/v1/threads/{thread_id}/messages",
        "/v1/threads/runs",
        "/v1/threads/{thread_id}/runs",
        "/v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs",
        "/v1/vector_stores",
        "/v1/vector_stores/{vector_store_id}/file_batches",
        "/v1/fine_tuning/jobs",
        "/v1/responses",
        "/v1/chat/completions",
    ];
    // Retrieving a fine-tuning job shows the model it made, once done.
    const RECORDS_ON_GET: &[&str] = &["/v1/fine_tuning/jobs/{job_id}"];
    const DELETES: &[&str] = &[
        "/v1/files/{file_id}",
        "/v1/assistants/{assistant_id}",
        "/v1/threads/{thread_id}",
        "/v1/threads/{thread_id}/messages/{message_id}",
        "/v1/vector_stores/{vector_store_id}",
        "/v1/responses/{response_id}",
        "/v1/chat/completions/{completion_id}",
        "/v1/models/{model}",
    ];
    const BODY_REFS: &[&str] = &[
        "/v1/batches",
        "/v1/threads",
        "/v1/threads/{thread_id}",
        "/v1/threads/{thread_id}/messages",
        "/v1/threads/{thread_id}/messages/{message_id}",
        "/v1/vector_stores",
        "/v1/vector_stores/{vector_store_id}",
        "/v1/vector_stores/{vector_store_id}/files",
        "/v1/vector_stores/{vector_store_id}/file_batches",
    ];
    for spec in specs {
        let post = spec.method == "POST";
        spec.records = (post && RECORDS.contains(&spec.path.as_str()))
            || (spec.method == "GET" && RECORDS_ON_GET.contains(&spec.path.as_str()));
        spec.deletes = spec.method == "DELETE" && DELETES.contains(&spec.path.as_str());
        spec.body_refs = post && BODY_REFS.contains(&spec.path.as_str());
        spec.stored_by_default = match (post, spec.path.as_str()) {
            (true, "/v1/chat/completions") => Some(false),
            (true, "/v1/responses") => Some(true),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::openai()
    }

    #[test]
    fn literal_routes_match_with_method_access() {
        let t = table();
        let (pattern, group, access) = t.lookup(&Method::POST, "/v1/chat/completions").unwrap();
        assert_eq!(
            (pattern, group.as_str(), access),
            ("/v1/chat/completions", "chat.completions", Access::Write)
        );
        let (_, group, access) = t.lookup(&Method::GET, "/v1/models").unwrap();
        assert_eq!((group.as_str(), access), ("models", Access::Read));
    }

    #[test]
    fn param_routes_match_and_literals_win() {
        let t = table();
        let (pattern, _, access) = t
            .lookup(&Method::GET, "/v1/files/file-abc/content")
            .unwrap();
        assert_eq!(
            (pattern, access),
            ("/v1/files/{file_id}/content", Access::Read)
        );
        let (pattern, ..) = t.lookup(&Method::POST, "/v1/threads/runs").unwrap();
        assert_eq!(pattern, "/v1/threads/runs");
        let (pattern, ..) = t.lookup(&Method::POST, "/v1/threads/thread_1").unwrap();
        assert_eq!(pattern, "/v1/threads/{thread_id}");
        let (pattern, _, access) = t
            .lookup(&Method::POST, "/v1/fine_tuning/jobs/ftjob-1/cancel")
            .unwrap();
        assert_eq!(
            (pattern, access),
            ("/v1/fine_tuning/jobs/{job_id}/cancel", Access::Write)
        );
    }

    #[test]
    fn literal_miss_backtracks_to_param() {
        let t = RouteTable::builder()
            .route(Method::GET, "/a/fixed/x", "one")
            .route(Method::GET, "/a/{p}/y", "two")
            .build()
            .unwrap();
        assert_eq!(
            t.lookup(&Method::GET, "/a/fixed/y").unwrap().1.as_str(),
            "two"
        );
        assert_eq!(
            t.lookup(&Method::GET, "/a/fixed/x").unwrap().1.as_str(),
            "one"
        );
    }

    #[test]
    fn head_uses_the_get_route_and_needs_read() {
        let t = table();
        let (pattern, _, access) = t.lookup(&Method::HEAD, "/v1/files/f/content").unwrap();
        assert_eq!(
            (pattern, access),
            ("/v1/files/{file_id}/content", Access::Read)
        );
        assert!(
            t.lookup(&Method::HEAD, "/v1/chat/completions/x/messages")
                .is_some()
        );
        assert!(t.lookup(&Method::HEAD, "/v1/embeddings").is_none());
    }

    #[test]
    fn unknown_method_path_case_and_trailing_slash_do_not_match() {
        let t = table();
        assert!(t.lookup(&Method::PUT, "/v1/chat/completions").is_none());
        assert!(t.lookup(&Method::POST, "/V1/chat/completions").is_none());
        assert!(t.lookup(&Method::GET, "/v1/models/").is_none());
        assert!(t.lookup(&Method::POST, "/v1/chat/completions/").is_none());
        assert!(t.lookup(&Method::GET, "/v2/models").is_none());
        assert!(t.lookup(&Method::GET, "/").is_none());
    }

    #[test]
    fn delete_model_needs_write_and_access_can_be_overridden() {
        let t = table();
        assert_eq!(
            t.lookup(&Method::DELETE, "/v1/models/ft:x").unwrap().2,
            Access::Write
        );
        let t = RouteTable::builder()
            .route(Method::POST, "/v1/search", "search")
            .access(Access::Read)
            .build()
            .unwrap();
        assert_eq!(
            t.lookup(&Method::POST, "/v1/search").unwrap().2,
            Access::Read
        );
    }

    #[test]
    fn wildcard_and_suffix_params_match() {
        let t = RouteTable::builder()
            .model_route(
                Method::POST,
                "/v1beta/models/{model}:generateContent",
                "gemini",
                ModelIn::Path("model".into()),
            )
            .route(Method::GET, "/static/{*rest}", "static")
            .build()
            .unwrap();
        assert!(
            t.lookup(&Method::POST, "/v1beta/models/gemini-pro:generateContent")
                .is_some()
        );
        assert!(
            t.lookup(&Method::POST, "/v1beta/models/:generateContent")
                .is_none()
        );
        assert!(
            t.lookup(&Method::POST, "/v1beta/models/gemini-pro")
                .is_none()
        );
        assert!(t.lookup(&Method::GET, "/static/a/b/c").is_some());
        assert!(t.lookup(&Method::GET, "/static/").is_none());
        assert_eq!(
            path_param(
                "/v1beta/models/gemini-pro:generateContent",
                2,
                ":generateContent".len()
            ),
            Some("gemini-pro")
        );
    }

    #[test]
    fn bad_tables_fail_to_build() {
        assert!(matches!(
            RouteTable::builder()
                .route(Method::GET, "/a", "x")
                .route(Method::GET, "/a", "y")
                .build(),
            Err(RouteError::Duplicate { .. })
        ));
        assert!(matches!(
            RouteTable::builder().route(Method::GET, "a", "x").build(),
            Err(RouteError::BadPattern { .. })
        ));
        assert!(matches!(
            RouteTable::builder()
                .route(Method::GET, "/a/{*r}/b", "x")
                .build(),
            Err(RouteError::BadPattern { .. })
        ));
        assert!(matches!(
            RouteTable::builder()
                .model_route(Method::GET, "/a/{id}", "x", ModelIn::Path("model".into()))
                .build(),
            Err(RouteError::UnknownParam { .. })
        ));
    }

    #[test]
    fn table_loads_from_toml() {
        let config: RouteConfig = toml::from_str(
            r#"
            openai_preset = true
            [[routes]]
            method = "POST"
            path = "/openai/deployments/{model}/chat/completions"
            group = "chat.completions"
            model = [{ path = "model" }, "json"]
            "#,
        )
        .unwrap();
        let t = RouteTable::from_config(&config).unwrap();
        let m = t
            .find(&Method::POST, "/openai/deployments/gpt-4o/chat/completions")
            .unwrap();
        assert!(m.route.model.json);
        assert_eq!(m.route.model.path, Some((2, 0)));
        assert!(t.lookup(&Method::GET, "/v1/models").is_some());
    }

    #[test]
    fn preset_covers_every_group() {
        let t = table();
        let groups: std::collections::BTreeSet<&str> =
            t.routes.iter().map(|r| r.group.as_str()).collect();
        for g in [
            "chat.completions",
            "completions",
            "responses",
            "embeddings",
            "images",
            "audio.transcriptions",
            "audio.translations",
            "audio.speech",
            "moderations",
            "fine_tuning",
            "files",
            "uploads",
            "batches",
            "assistants",
            "threads",
            "vector_stores",
            "models",
        ] {
            assert!(groups.contains(g), "{g}");
        }
    }
}
