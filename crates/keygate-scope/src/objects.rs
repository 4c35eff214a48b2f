//! Object ownership: every object a request names must belong to the caller's project, and
//! every object a response creates is recorded as the caller's project's.
//!
//! With an [`ObjectRegistry`] ([`ScopeLayer::with_objects`](crate::ScopeLayer::with_objects)):
//!
//! - **Named objects are checked.** The ids in a route's path (`{file_id}`, `{thread_id}`, …)
//!   and in its JSON body (any of [`REF_KEYS`](keygate_core::facts::REF_KEYS), at any depth)
//!   are looked up; one that is not recorded, belongs to another project, or is of another
//!   kind than its place names, is answered 404 `object_not_found`, the same answer in every
//!   case, and the request goes no further.
//! - **Indirect models become checks.** A run that names no model is checked (and priced) as
//!   its assistant's recorded model; a batch as the models its input file's requests name
//!   (read at upload); a response continuing another must be allowed that one's model too.
//! - **Created objects are recorded** from the upstream's successful response: a JSON body
//!   (read whole, up to [`RECORD_LIMIT`], before the client sees its end, so an id the client
//!   has is always recorded) or, for a stream, each event as it passes (the event that
//!   creates an object is held until the object is recorded). A delete forgets its object.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use keygate_core::facts::ObjectRef;
use keygate_core::{
    Denial, ModelSource, ObjectKind, ObjectRecord, ObjectRegistry, Principal, RefAt,
    RegistryFuture, RequestFacts, RequestedModel, Stage, could_be_secret,
};
use pin_project_lite::pin_project;
use serde_json::Value;

use crate::path::decode;
use crate::route::{Route, path_param};

/// The largest JSON response read to record the objects it creates (4 MiB): a larger one is
/// passed on unread, and its objects stay unrecorded (so refused to everyone).
pub const RECORD_LIMIT: usize = 4 << 20;

/// The longest line of an event stream read for objects (1 MiB); longer ones are passed on
/// unread.
const LINE_LIMIT: usize = 1 << 20;

/// The prefix of fine-tuned models' names: such a model is an object its project owns.
pub const FINE_TUNED_PREFIX: &str = "ft:";

/// The fine-tuned model a request names (in its body, path or query), as an object to check.
pub(crate) fn model_ref(facts: &RequestFacts) -> Option<ObjectRef> {
    let model = facts.model().filter(|m| m.starts_with(FINE_TUNED_PREFIX))?;
    let at = match facts.model_source {
        Some(ModelSource::Path) => RefAt::Path(Arc::from("model")),
        _ => RefAt::Body("model"),
    };
    Some(ObjectRef::new(model, at, ObjectKind::Model))
}

/// The objects named in `path` by `route`'s parameters.
pub(crate) fn path_refs(route: &Route, path: &str, out: &mut Vec<ObjectRef>) {
    for o in &*route.objects {
        if let Some(raw) = path_param(path, o.index, o.suffix) {
            let id = decode(raw).unwrap_or(std::borrow::Cow::Borrowed(raw));
            out.push(ObjectRef::new(&*id, RefAt::Path(o.name.clone()), o.kind));
        }
    }
}

/// The answer to a request naming an object the caller may not reach: the same whether it
/// does not exist, is another project's, or is of another kind.
pub(crate) fn not_found(r: &ObjectRef) -> Denial {
    let message = if could_be_secret(&r.id) || r.id.len() > 128 {
        "No such object.".to_owned()
    } else {
        format!("No such object: {}.", r.id)
    };
    let denial = Denial::new(
        Stage::Scope,
        StatusCode::NOT_FOUND,
        "object_not_found",
        message,
    );
    match r.at {
        RefAt::Body(field) => denial.with_param(field),
        _ => denial,
    }
}

pub(crate) fn unavailable() -> Denial {
    Denial::new(
        Stage::Scope,
        StatusCode::SERVICE_UNAVAILABLE,
        "objects_unavailable",
        "The object registry is unavailable; try again shortly.",
    )
    .with_retry_after(std::time::Duration::from_secs(1))
}

fn model_not_allowed(param: &'static str) -> Denial {
    Denial::new(
        Stage::Scope,
        StatusCode::FORBIDDEN,
        "model_not_allowed",
        "This key may not use the model this request would use.",
    )
    .with_param(param)
}

/// Checks every object `facts` names against `registry`, for `principal`.
pub(crate) async fn check(
    registry: &dyn ObjectRegistry,
    principal: &Principal,
    indirect: bool,
    mut facts: RequestFacts,
) -> Result<RequestFacts, Denial> {
    let project = &principal.project().id;
    let rules = principal.has_model_rules();
    let mut inherited: Option<String> = None;
    for r in &facts.objects {
        let record = registry.get(&r.id).await.map_err(|_| unavailable())?;
        let Some(record) = record.filter(|o| &o.project == project && o.kind == r.kind) else {
            return Err(not_found(r));
        };
        match record.kind {
            // A response continued: the caller must be allowed its model too.
            ObjectKind::Response => {
                if let Some(m) = &record.model
                    && rules
                    && !principal.allows_model(m)
                {
                    return Err(model_not_allowed("previous_response_id"));
                }
            }
            // The assistant of a run, the run whose tool outputs are submitted.
            ObjectKind::Assistant | ObjectKind::Run if indirect && inherited.is_none() => {
                inherited.clone_from(&record.model);
            }
            // The input file of a batch: the models its requests name.
            ObjectKind::File if indirect && r.at == RefAt::Body("input_file_id") => {
                if let Some(models) = &record.models {
                    if rules && models.iter().any(|m| !principal.allows_model(m)) {
                        return Err(model_not_allowed("input_file_id"));
                    }
                    facts.models_verified = true;
                }
            }
            _ => {}
        }
    }
    if facts.model.is_none()
        && let Some(model) = inherited
    {
        facts.model = Some(RequestedModel::new(model.as_str()));
        facts.model_source = Some(ModelSource::Object);
    }
    Ok(facts)
}

/// What recording a response needs to know about the request.
pub(crate) struct Owner {
    pub(crate) registry: Arc<dyn ObjectRegistry>,
    pub(crate) project: String,
    pub(crate) key_id: String,
    pub(crate) now: u64,
    /// The verified models of an uploaded batch input file.
    pub(crate) batch_models: Option<Vec<String>>,
}

/// What to do with a response.
pub(crate) enum Action {
    /// Record the objects it returns.
    Record(Owner),
    /// Forget this object once deleted.
    Delete(Arc<dyn ObjectRegistry>, Box<str>),
}

/// The records of the objects `v` (a response body, or a stream event's data) returns.
pub(crate) fn objects_of(v: &Value, owner: &Owner, out: &mut Vec<ObjectRecord>) {
    let Some(map) = v.as_object() else { return };
    // A Responses stream event: `{"type":"response.created","response":{...}}`.
    if let Some(inner) = map.get("response").filter(|r| r.is_object()) {
        objects_of(inner, owner, out);
        return;
    }
    let (Some(id), Some(object)) = (
        map.get("id").and_then(Value::as_str),
        map.get("object").and_then(Value::as_str),
    ) else {
        return;
    };
    let kind = match object {
        // A stored chat completion, streamed.
        "chat.completion.chunk" => Some(ObjectKind::ChatCompletion),
        other => ObjectKind::from_object_type(other),
    };
    let Some(kind) = kind else { return };
    let mut record = ObjectRecord::new(id, kind, &*owner.project, &*owner.key_id, owner.now);
    if let Some(model) = map.get("model").and_then(Value::as_str) {
        record = record.with_model(model);
    }
    if kind == ObjectKind::File
        && let Some(models) = &owner.batch_models
    {
        record = record.with_models(models.clone());
    }
    out.push(record);
    // A run made with a new thread (`POST /v1/threads/runs`): the thread is the caller's.
    if kind == ObjectKind::Run
        && let Some(thread) = map.get("thread_id").and_then(Value::as_str)
    {
        out.push(ObjectRecord::new(
            thread,
            ObjectKind::Thread,
            &*owner.project,
            &*owner.key_id,
            owner.now,
        ));
    }
    // A fine-tuning job that made a model: the model is the caller's.
    if kind == ObjectKind::FineTuningJob
        && let Some(model) = map.get("fine_tuned_model").and_then(Value::as_str)
    {
        out.push(ObjectRecord::new(
            model,
            ObjectKind::Model,
            &*owner.project,
            &*owner.key_id,
            owner.now,
        ));
    }
    // A completed upload: its file.
    if let Some(file) = map.get("file") {
        objects_of(file, owner, out);
    }
}

fn record_future(
    registry: Arc<dyn ObjectRegistry>,
    objects: Vec<ObjectRecord>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        if let Err(e) = registry.record(objects).await {
            tracing::error!(error = %e, "objects created by a request could not be recorded; they are refused to everyone");
        }
    })
}

fn remove_future(
    registry: Arc<dyn ObjectRegistry>,
    id: Box<str>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let done: RegistryFuture<'_, ()> = registry.remove(&id);
        if let Err(e) = done.await {
            tracing::error!(error = %e, "a deleted object could not be forgotten");
        }
    })
}

enum Mode {
    /// A JSON body: read whole (held back), then recorded, then released.
    Json { over: bool },
    /// An event stream: each line read as it passes.
    Events { line: Vec<u8>, skipping: bool },
    /// Nothing to read (a delete, once its object is forgotten).
    Pass,
}

struct Recorder<D> {
    owner: Option<Owner>,
    mode: Mode,
    copy: BytesMut,
    held: VecDeque<Frame<D>>,
    pending: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    ended: bool,
    seen: Vec<String>,
}

impl<D: Buf> Recorder<D> {
    /// Whether frames are being held until the body ends.
    fn holding(&self) -> bool {
        matches!(self.mode, Mode::Json { over: false }) && !self.ended
    }

    fn take(&mut self, data: &D) {
        match &mut self.mode {
            Mode::Json { over: true } | Mode::Pass => {}
            Mode::Json { over } => {
                let copy = &mut self.copy;
                let fits = copy.len() + data.remaining() <= RECORD_LIMIT
                    && each_chunk(data, |c| copy.extend_from_slice(c));
                if !fits {
                    *over = true;
                    self.copy = BytesMut::new();
                    tracing::warn!(
                        "a response creating objects is larger than the record limit; its objects stay unrecorded"
                    );
                }
            }
            Mode::Events { line, skipping } => {
                let mut found = Vec::new();
                let owner = self.owner.as_ref();
                each_chunk(data, |mut chunk| {
                    // Line by line: each piece up to a newline appended at once.
                    loop {
                        let end = memchr::memchr(b'\n', chunk);
                        let piece = &chunk[..end.unwrap_or(chunk.len())];
                        if !*skipping {
                            if line.len() + piece.len() > LINE_LIMIT {
                                line.clear();
                                *skipping = true;
                            } else {
                                line.extend_from_slice(piece);
                            }
                        }
                        let Some(end) = end else { break };
                        if !*skipping && let Some(owner) = owner {
                            event_objects(line, owner, &mut found);
                        }
                        line.clear();
                        *skipping = false;
                        chunk = &chunk[end + 1..];
                    }
                });
                let seen = &mut self.seen;
                found.retain(|o| {
                    let new = !seen.contains(&o.id);
                    if new {
                        seen.push(o.id.clone());
                    }
                    new
                });
                if !found.is_empty()
                    && let Some(owner) = &self.owner
                {
                    let registry = owner.registry.clone();
                    self.start(registry, found);
                }
            }
        }
    }

    fn start(&mut self, registry: Arc<dyn ObjectRegistry>, objects: Vec<ObjectRecord>) {
        let next = record_future(registry, objects);
        self.pending = Some(match self.pending.take() {
            Some(before) => Box::pin(async move {
                before.await;
                next.await;
            }),
            None => next,
        });
    }

    /// The whole JSON body has been read: record what it creates.
    fn finish_json(&mut self) {
        if !matches!(self.mode, Mode::Json { over: false }) {
            return;
        }
        let Some(owner) = &self.owner else { return };
        let mut found = Vec::new();
        if let Ok(v) = serde_json::from_slice::<Value>(&self.copy) {
            objects_of(&v, owner, &mut found);
        }
        self.copy = BytesMut::new();
        if !found.is_empty() {
            let registry = owner.registry.clone();
            self.start(registry, found);
        }
    }
}

/// The objects one line of an event stream creates (a `data:` line of JSON).
fn event_objects(line: &[u8], owner: &Owner, out: &mut Vec<ObjectRecord>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    // Only an event naming an id can create an object.
    if memchr::memmem::find(data, b"\"id\"").is_none() {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        objects_of(&v, owner, out);
    }
}

/// Calls `f` with each piece of `data`, without consuming it; false (and no call) if it
/// comes in more pieces than can be seen at once.
fn each_chunk<D: Buf>(data: &D, mut f: impl FnMut(&[u8])) -> bool {
    let chunk = data.chunk();
    if chunk.len() == data.remaining() {
        f(chunk);
        return true;
    }
    let mut slices = [std::io::IoSlice::new(&[]); 64];
    let n = data.chunks_vectored(&mut slices);
    if slices[..n].iter().map(|s| s.len()).sum::<usize>() != data.remaining() {
        return false;
    }
    for s in &slices[..n] {
        f(s);
    }
    true
}

pin_project! {
    /// The response body of [`Scope`](crate::Scope): the inner service's, passed through
    /// unchanged, and on routes that create or delete objects, read on the way to record
    /// them (see the [module docs](self)).
    pub struct ObjectBody<B: Body> {
        #[pin]
        inner: B,
        rec: Option<Box<Recorder<B::Data>>>,
    }
}

impl<B: Body> ObjectBody<B> {
    /// `inner`, passed through.
    pub(crate) fn pass(inner: B) -> Self {
        ObjectBody { inner, rec: None }
    }

    /// `inner`, a successful response whose objects `action` records or forgets.
    pub(crate) fn new(inner: B, action: Action, event_stream: bool) -> Self {
        let rec = match action {
            Action::Record(owner) => Recorder {
                owner: Some(owner),
                mode: if event_stream {
                    Mode::Events {
                        line: Vec::new(),
                        skipping: false,
                    }
                } else {
                    Mode::Json { over: false }
                },
                copy: BytesMut::new(),
                held: VecDeque::new(),
                pending: None,
                ended: false,
                seen: Vec::new(),
            },
            Action::Delete(registry, id) => Recorder {
                owner: None,
                mode: Mode::Pass,
                copy: BytesMut::new(),
                held: VecDeque::new(),
                pending: Some(remove_future(registry, id)),
                ended: false,
                seen: Vec::new(),
            },
        };
        ObjectBody {
            inner,
            rec: Some(Box::new(rec)),
        }
    }
}

impl<B: Body> Body for ObjectBody<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(rec) = this.rec.as_mut() else {
            return this.inner.poll_frame(cx);
        };
        loop {
            if let Some(p) = rec.pending.as_mut() {
                ready!(p.as_mut().poll(cx));
                rec.pending = None;
            }
            if !rec.holding()
                && let Some(frame) = rec.held.pop_front()
            {
                return Poll::Ready(Some(Ok(frame)));
            }
            if rec.ended {
                return Poll::Ready(None);
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                None => {
                    rec.ended = true;
                    rec.finish_json();
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        rec.take(data);
                    }
                    rec.held.push_back(frame);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.rec {
            None => self.inner.is_end_stream(),
            Some(rec) => rec.ended && rec.held.is_empty() && rec.pending.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
