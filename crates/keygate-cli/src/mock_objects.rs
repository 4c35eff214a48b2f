//! The mock upstream's objects: files, uploads, batches, assistants, threads (their messages
//! and runs), vector stores (their files and file batches), fine-tuning jobs, and the stored
//! responses and chat completions. They are created, retrieved, listed (paginated as OpenAI
//! does) and deleted for real, so the gateway's object isolation can be tested against them.
//!
//! Each [`router`] has a store of its own. Ids carry OpenAI's prefixes and a counter, unique per
//! router; creation times count up from the same counter (no clock). Every kind is one
//! [`Kind`] in one generic collection: the handlers for reading, updating, deleting and listing
//! are the same for all of them, and only creation is written per kind.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, delete, get, on, post};
use axum::{Json, Router};
use futures_util::stream;
use serde_json::{Map, Value, json};

use crate::mock_upstream::{self, error};

/// One kind of object: its type string, its id prefix, its name in errors, its creation-time
/// field, the field naming its parent (messages and runs live in a thread, files in a vector
/// store; the parent's id is the path parameter before the object's), and whether its lists
/// carry `first_id` and `last_id` (fine-tuning jobs' do not).
#[derive(Clone, Copy)]
struct Kind {
    object: &'static str,
    prefix: &'static str,
    name: &'static str,
    created: &'static str,
    parent: Option<(&'static str, &'static Kind)>,
    list_ids: bool,
}

const fn kind(object: &'static str, prefix: &'static str, name: &'static str) -> Kind {
    let (created, parent, list_ids) = ("created_at", None, true);
    Kind {
        object,
        prefix,
        name,
        created,
        parent,
        list_ids,
    }
}

const fn child(kind: Kind, field: &'static str, parent: &'static Kind) -> Kind {
    Kind {
        parent: Some((field, parent)),
        ..kind
    }
}

const FILE: Kind = kind("file", "file-", "File");
const UPLOAD: Kind = kind("upload", "upload_", "Upload");
const PART: Kind = child(kind("upload.part", "part_", "Part"), "upload_id", &UPLOAD);
const BATCH: Kind = kind("batch", "batch_", "Batch");
const ASSISTANT: Kind = kind("assistant", "asst_", "Assistant");
const THREAD: Kind = kind("thread", "thread_", "Thread");
const MESSAGE: Kind = child(
    kind("thread.message", "msg_", "Message"),
    "thread_id",
    &THREAD,
);
const RUN: Kind = child(kind("thread.run", "run_", "Run"), "thread_id", &THREAD);
const STEP: Kind = kind("thread.run.step", "step_", "Run step");
const VECTOR_STORE: Kind = kind("vector_store", "vs_", "Vector store");
const VS_FILE: Kind = child(
    kind("vector_store.file", "", "Vector store file"),
    "vector_store_id",
    &VECTOR_STORE,
);
const VS_BATCH: Kind = child(
    kind(
        "vector_store.file_batch",
        "vsfb_",
        "Vector store file batch",
    ),
    "vector_store_id",
    &VECTOR_STORE,
);
const FT_JOB: Kind = Kind {
    list_ids: false,
    ..kind("fine_tuning.job", "ftjob-", "Fine-tuning job")
};
const RESPONSE: Kind = kind("response", "resp_", "Response");
const CHAT: Kind = Kind {
    created: "created",
    ..kind("chat.completion", "chatcmpl-", "Chat completion")
};

/// A request that fails: answered in OpenAI's error shape.
struct Fail(StatusCode, &'static str, String);

impl Fail {
    /// The same failure as a 400: an id in the body names nothing.
    fn refused(self) -> Self {
        Self(StatusCode::BAD_REQUEST, self.1, self.2)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        error(self.0, self.1, &self.2)
    }
}

fn not_found(kind: Kind, id: &str) -> Fail {
    let message = format!("No such {} object: {id}", kind.name);
    Fail(StatusCode::NOT_FOUND, "not_found", message)
}

fn invalid(code: &'static str, message: impl Into<String>) -> Fail {
    Fail(StatusCode::BAD_REQUEST, code, message.into())
}

fn missing(field: &str) -> Fail {
    let message = format!("Missing required parameter: '{field}'.");
    invalid("missing_required_parameter", message)
}

type Reply = Result<Json<Value>, Fail>;
type Shared = Arc<Mutex<Store>>;
/// The store, in a handler.
type Db = State<Shared>;
/// The path's parameters: a parent's id (if any), then the object's.
type Ids = Path<Vec<String>>;
type Query = HashMap<String, String>;

/// Every object by kind, in creation order, and the bytes of files and upload parts by id.
/// Fields whose names start with `_` are kept for the mock (a response's input, a file
/// batch's files) and never shown.
#[derive(Default)]
struct Store {
    counter: u64,
    objects: HashMap<&'static str, Vec<Value>>,
    blobs: HashMap<String, Bytes>,
}

impl Store {
    /// A new id of `kind` and its creation time.
    fn next(&mut self, kind: Kind) -> (String, u64) {
        self.counter += 1;
        let id = format!("{}mock{:04}", kind.prefix, self.counter);
        (id, 1_700_000_000 + self.counter)
    }

    fn insert(&mut self, kind: Kind, object: Value) -> Value {
        let shown = public(&object);
        self.objects.entry(kind.object).or_default().push(object);
        shown
    }

    /// Stores a new object of `kind`: its id, type and creation time, then `fields` (which may
    /// set the id: a vector store file's is its file's).
    fn create(&mut self, kind: Kind, fields: Value) -> Value {
        let (id, created) = self.next(kind);
        let mut object = Map::new();
        object.insert("id".into(), id.into());
        object.insert("object".into(), kind.object.into());
        object.insert(kind.created.into(), created.into());
        if let Value::Object(fields) = fields {
            object.extend(fields);
        }
        self.insert(kind, Value::Object(object))
    }

    /// Where the object named by `path` is: its id is the last parameter, its parent's (for a
    /// kind that has one) the one before, and the parent must exist (a deleted thread's
    /// messages are gone with it).
    fn index(&self, kind: Kind, path: &[String]) -> Result<usize, Fail> {
        if let Some((_, parent_kind)) = kind.parent
            && path.len() > 1
        {
            self.index(*parent_kind, &path[..path.len() - 1])?;
        }
        let id = path.last().map_or("", String::as_str);
        let parent = kind.parent.zip(path.len().checked_sub(2).map(|i| &path[i]));
        self.objects
            .get(kind.object)
            .and_then(|items| {
                items.iter().position(|v| {
                    v["id"] == id && parent.is_none_or(|((field, _), p)| v[field] == *p)
                })
            })
            .ok_or_else(|| not_found(kind, id))
    }

    fn get(&self, kind: Kind, path: &[String]) -> Result<&Value, Fail> {
        let i = self.index(kind, path)?;
        self.objects
            .get(kind.object)
            .and_then(|items| items.get(i))
            .ok_or_else(|| not_found(kind, path.last().map_or("", String::as_str)))
    }

    /// The objects of `kind`, and where in them the one at `path` is.
    fn items_mut(&mut self, kind: Kind, path: &[String]) -> Result<(&mut Vec<Value>, usize), Fail> {
        let i = self.index(kind, path)?;
        self.objects
            .get_mut(kind.object)
            .filter(|items| i < items.len())
            .map(|items| (items, i))
            .ok_or_else(|| not_found(kind, path.last().map_or("", String::as_str)))
    }

    /// Sets the given top-level fields (not the id, type, creation time or parent).
    fn update(&mut self, kind: Kind, path: &[String], fields: Value) -> Result<Value, Fail> {
        let (items, i) = self.items_mut(kind, path)?;
        let object = &mut items[i];
        merge(object, fields, kind);
        Ok(public(object))
    }

    fn remove(&mut self, kind: Kind, path: &[String]) -> Result<Value, Fail> {
        let (items, i) = self.items_mut(kind, path)?;
        let gone = items.remove(i);
        if kind.object == FILE.object {
            self.blobs.remove(gone["id"].as_str().unwrap_or_default());
        } else if kind.object == VS_FILE.object {
            self.recount(gone["vector_store_id"].as_str().unwrap_or_default());
        }
        Ok(gone)
    }

    /// A page of the objects of `kind` under the parent named by `parents` that `keep` keeps.
    fn list(
        &self,
        kind: Kind,
        parents: &[String],
        q: &Query,
        keep: impl Fn(&Value) -> bool,
    ) -> Reply {
        let parent = match (kind.parent, parents.last()) {
            (Some((field, parent_kind)), Some(id)) => {
                self.get(*parent_kind, parents)?;
                Some((field, id))
            }
            _ => None,
        };
        let items = self.objects.get(kind.object).into_iter().flatten();
        let items = items.filter(|v| parent.is_none_or(|(f, id)| v[f] == *id) && keep(v));
        page(items.collect(), q, kind.list_ids)
    }

    fn add_file(&mut self, filename: &str, purpose: &str, data: Bytes) -> Value {
        let file = self.create(
            FILE,
            json!({"bytes": data.len(), "filename": filename, "purpose": purpose,
                   "status": "processed", "status_details": null, "expires_at": null}),
        );
        self.blobs.insert(id_of(&file), data);
        file
    }

    fn add_thread(&mut self, req: &Value) -> Result<Value, Fail> {
        let messages = message_list(req, "messages")?;
        let fields = json!({"metadata": or(req, "metadata", json!({})),
                            "tool_resources": or(req, "tool_resources", json!({}))});
        let thread = self.create(THREAD, fields);
        self.add_messages(&id_of(&thread), messages);
        Ok(thread)
    }

    fn add_messages(&mut self, thread_id: &str, messages: Vec<Value>) {
        for mut message in messages {
            message["thread_id"] = thread_id.into();
            self.create(MESSAGE, message);
        }
    }

    /// A run of the request's assistant in the thread (which exists), queued.
    fn add_run(&mut self, thread_id: &str, req: &Value) -> Result<Value, Fail> {
        let assistant = self.get(ASSISTANT, &[need(req, "assistant_id")?.to_owned()])?;
        let fields = json!({
            "thread_id": thread_id, "assistant_id": assistant["id"],
            "model": or(req, "model", assistant["model"].clone()),
            "instructions": or(req, "instructions", assistant["instructions"].clone()),
            "tools": or(req, "tools", assistant["tools"].clone()),
            "metadata": or(req, "metadata", json!({})), "status": "queued", "usage": null,
            "required_action": null, "last_error": null, "started_at": null, "completed_at": null,
        });
        let extra = message_list(req, "additional_messages")?;
        self.add_messages(thread_id, extra);
        Ok(self.create(RUN, fields))
    }

    /// The run, or (asked to stream) its events: created, then completed with usage (which it
    /// then is), then done.
    fn run_reply(&mut self, run: Value, req: &Value) -> Result<Response, Fail> {
        if req.get("stream") != Some(&Value::Bool(true)) {
            return Ok(Json(run).into_response());
        }
        let thread = run["thread_id"].as_str().unwrap_or_default().to_owned();
        let messages = self.objects.get(MESSAGE.object).into_iter().flatten();
        let mut text = String::new();
        for message in messages.filter(|m| m["thread_id"] == thread.as_str()) {
            for part in message["content"].as_array().into_iter().flatten() {
                text.push_str(part["text"]["value"].as_str().unwrap_or_default());
            }
        }
        let prompt = mock_upstream::prompt_tokens_for(&text);
        let completion = req["max_completion_tokens"]
            .as_u64()
            .unwrap_or(mock_upstream::DEFAULT_COMPLETION_TOKENS);
        let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion});
        let done =
            json!({"status": "completed", "usage": usage, "completed_at": run["created_at"]});
        let done = self.update(RUN, &[thread, id_of(&run)], done)?;
        let events = [
            ("thread.run.created", run.to_string()),
            ("thread.run.completed", done.to_string()),
            ("done", "[DONE]".to_owned()),
        ];
        let events = events
            .into_iter()
            .map(|(name, data)| Ok::<_, Infallible>(Event::default().event(name).data(data)));
        Ok(Sse::new(stream::iter(events)).into_response())
    }

    /// Puts the file in the vector store (both exist), once.
    fn add_vs_file(&mut self, vs: &str, file_id: &str, req: &Value) -> Result<Value, Fail> {
        let path = [vs.to_owned(), file_id.to_owned()];
        let bytes = self.get(FILE, &path[1..])?["bytes"].clone();
        if let Ok(existing) = self.get(VS_FILE, &path) {
            return Ok(public(existing));
        }
        let fields = json!({"id": file_id, "vector_store_id": vs, "status": "completed",
                            "usage_bytes": bytes, "last_error": null,
                            "attributes": or(req, "attributes", json!({}))});
        let file = self.create(VS_FILE, fields);
        self.recount(vs);
        Ok(file)
    }

    /// Sets a vector store's file counts and size from its files.
    fn recount(&mut self, vs: &str) {
        let files = self.objects.get(VS_FILE.object).into_iter().flatten();
        let (n, bytes) = files
            .filter(|f| f["vector_store_id"] == vs)
            .fold((0, 0), |(n, b), f| {
                (n + 1, b + f["usage_bytes"].as_u64().unwrap_or(0))
            });
        let fields = json!({"file_counts": counts(n), "usage_bytes": bytes});
        let _ = self.update(VECTOR_STORE, &[vs.to_owned()], fields);
    }

    /// A response's input as items, each with an id.
    fn input_items(&mut self, input: Option<&Value>) -> Vec<Value> {
        let items = match input {
            Some(Value::String(text)) => vec![json!({"role": "user", "content": text})],
            Some(Value::Array(items)) => items.clone(),
            _ => Vec::new(),
        };
        let items = items.into_iter().filter(Value::is_object);
        items
            .map(|mut item| {
                if item.get("id").is_none() {
                    item["id"] = self.next(MESSAGE).0.into();
                }
                if item.get("type").is_none() {
                    item["type"] = "message".into();
                }
                if let Some(Value::String(text)) = item.get("content") {
                    item["content"] = json!([{"type": "input_text", "text": text}]);
                }
                item
            })
            .collect()
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, Store> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The object without the mock's own fields.
fn public(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let shown = map.iter().filter(|(k, _)| !k.starts_with('_'));
            Value::Object(shown.map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        other => other.clone(),
    }
}

/// Sets `fields` on `object`, but not the fields a client may not set.
fn merge(object: &mut Value, fields: Value, kind: Kind) {
    let Value::Object(fields) = fields else {
        return;
    };
    for (k, v) in fields {
        let fixed = ["id", "object", kind.created].contains(&k.as_str())
            || k.starts_with('_')
            || kind.parent.is_some_and(|(field, _)| field == k);
        if !fixed {
            object[k] = v;
        }
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_owned()
}

/// `req[field]` unless absent or null.
fn or(req: &Value, field: &str, default: Value) -> Value {
    req.get(field)
        .filter(|v| !v.is_null())
        .cloned()
        .unwrap_or(default)
}

fn need<'a>(req: &'a Value, field: &str) -> Result<&'a str, Fail> {
    req.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| missing(field))
}

/// The strings of `req[field]` (an array of ids).
fn strings(req: &Value, field: &str) -> Vec<String> {
    let items = req
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    items.filter_map(Value::as_str).map(str::to_owned).collect()
}

fn counts(n: u64) -> Value {
    json!({"in_progress": 0, "completed": n, "failed": 0, "cancelled": 0, "total": n})
}

/// The messages of `req[field]`, as thread messages (without their thread).
fn message_list(req: &Value, field: &str) -> Result<Vec<Value>, Fail> {
    let messages = req
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    messages.map(message_fields).collect()
}

fn message_fields(m: &Value) -> Result<Value, Fail> {
    let role = need(m, "role")?;
    let content = match m.get("content") {
        Some(Value::String(text)) => {
            json!([{"type": "text", "text": {"value": text, "annotations": []}}])
        }
        Some(parts @ Value::Array(_)) => parts.clone(),
        _ => return Err(missing("content")),
    };
    Ok(
        json!({"role": role, "content": content, "assistant_id": null, "run_id": null,
              "attachments": or(m, "attachments", json!([])), "metadata": or(m, "metadata", json!({}))}),
    )
}

/// A JSON body; an empty one is `{}`.
fn body_json(body: &Bytes) -> Result<Value, Fail> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|_| invalid("invalid_json", "The body is not valid JSON."))
}

/// The query's parameters (not percent-decoded: ids, orders and limits need none).
fn query(uri: &Uri) -> Query {
    let pairs = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty());
    pairs
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A page of `items` (in creation order), as the query's `order`, `after` and `limit` ask.
fn page(mut items: Vec<&Value>, q: &Query, list_ids: bool) -> Reply {
    let limit = match q.get("limit") {
        None => 20,
        Some(limit) => limit
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| invalid("invalid_limit", "limit must be an integer from 1 to 100."))?,
    };
    match q.get("order").map(String::as_str) {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(_) => return Err(invalid("invalid_order", "order must be 'asc' or 'desc'.")),
    }
    let start = match q.get("after") {
        None => 0,
        Some(after) => {
            let at = items.iter().position(|v| v["id"] == after.as_str());
            1 + at.ok_or_else(|| {
                invalid(
                    "invalid_after",
                    format!("No object with id '{after}' to list after."),
                )
            })?
        }
    };
    let rest = &items[start..];
    let data: Vec<Value> = rest.iter().take(limit).map(|v| public(v)).collect();
    let mut list = json!({"object": "list", "has_more": rest.len() > limit});
    if list_ids {
        list["first_id"] = data.first().map_or(Value::Null, |v| v["id"].clone());
        list["last_id"] = data.last().map_or(Value::Null, |v| v["id"].clone());
    }
    list["data"] = data.into();
    Ok(Json(list))
}

/// A multipart body's parts by name: file name (if any) and contents.
async fn form(
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<HashMap<String, (Option<String>, Bytes)>, Fail> {
    let mut multipart = multipart.map_err(|e| invalid("invalid_multipart", e.body_text()))?;
    let mut parts = HashMap::new();
    let bad =
        |e: axum::extract::multipart::MultipartError| invalid("invalid_multipart", e.body_text());
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        parts.insert(name, (filename, field.bytes().await.map_err(bad)?));
    }
    Ok(parts)
}

// The generic handlers: `GET`, update, delete, status changes and lists for any kind.

fn read(kind: Kind) -> MethodRouter<Shared> {
    get(
        move |State(s): Db, Path(p): Ids| async move { lock(&s).get(kind, &p).map(|v| Json(public(v))) },
    )
}

fn modify(kind: Kind) -> MethodRouter<Shared> {
    post(move |State(s): Db, Path(p): Ids, body: Bytes| async move {
        let fields = body_json(&body)?;
        lock(&s).update(kind, &p, fields).map(Json)
    })
}

fn remove(kind: Kind, deleted: &'static str) -> MethodRouter<Shared> {
    delete(move |State(s): Db, Path(p): Ids| async move {
        let gone = lock(&s).remove(kind, &p)?;
        Ok::<_, Fail>(Json(
            json!({"id": gone["id"], "object": deleted, "deleted": true}),
        ))
    })
}

/// Read, update and delete.
fn rud(kind: Kind, deleted: &'static str) -> MethodRouter<Shared> {
    read(kind).merge(modify(kind)).merge(remove(kind, deleted))
}

/// `POST` sets the status.
fn act(kind: Kind, status: &'static str) -> MethodRouter<Shared> {
    post(move |State(s): Db, Path(p): Ids| async move {
        lock(&s)
            .update(kind, &p, json!({"status": status}))
            .map(Json)
    })
}

/// The list of a kind, filtered by the query's values of `filters`.
fn listing(kind: Kind, filters: &'static [&'static str]) -> MethodRouter<Shared> {
    get(move |State(s): Db, Path(p): Ids, uri: Uri| async move {
        let q = query(&uri);
        let keep = |v: &Value| {
            filters
                .iter()
                .all(|f| q.get(*f).is_none_or(|want| v[f] == *want))
        };
        lock(&s).list(kind, &p, &q, keep)
    })
}

/// The list kept in an object's `field` (a response's input, a completion's messages), or
/// an empty one (a run's steps).
fn items_of(kind: Kind, field: &'static str) -> MethodRouter<Shared> {
    get(move |State(s): Db, Path(p): Ids, uri: Uri| async move {
        let store = lock(&s);
        let object = store.get(kind, &p)?;
        let items = object[field]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        page(items, &query(&uri), kind.list_ids)
    })
}

/// A page of search results or file content: always empty.
fn empty_page(kind: Kind, object: &'static str, method: MethodFilter) -> MethodRouter<Shared> {
    let reply = move |State(s): Db, Path(p): Ids| async move {
        lock(&s).get(kind, &p)?;
        Ok::<_, Fail>(Json(
            json!({"object": object, "data": [], "has_more": false, "next_page": null}),
        ))
    };
    on(method, reply)
}

/// The routes of the objects, on a store of their own.
pub(crate) fn router() -> Router {
    Router::new()
        .route(
            "/v1/files",
            post(create_file).merge(listing(FILE, &["purpose"])),
        )
        .route("/v1/files/{file}", read(FILE).merge(remove(FILE, "file")))
        .route("/v1/files/{file}/content", get(file_content))
        .route("/v1/uploads", post(create_upload))
        .route("/v1/uploads/{upload}/parts", post(add_part))
        .route("/v1/uploads/{upload}/complete", post(complete_upload))
        .route("/v1/uploads/{upload}/cancel", act(UPLOAD, "cancelled"))
        .route("/v1/batches", post(create_batch).merge(listing(BATCH, &[])))
        .route("/v1/batches/{batch}", read(BATCH))
        .route("/v1/batches/{batch}/cancel", act(BATCH, "cancelling"))
        .route(
            "/v1/assistants",
            post(create_assistant).merge(listing(ASSISTANT, &[])),
        )
        .route(
            "/v1/assistants/{assistant}",
            rud(ASSISTANT, "assistant.deleted"),
        )
        .route("/v1/threads", post(create_thread))
        .route("/v1/threads/runs", post(create_thread_and_run))
        .route("/v1/threads/{thread}", rud(THREAD, "thread.deleted"))
        .route(
            "/v1/threads/{thread}/messages",
            post(create_message).merge(listing(MESSAGE, &[])),
        )
        .route(
            "/v1/threads/{thread}/messages/{message}",
            rud(MESSAGE, "thread.message.deleted"),
        )
        .route(
            "/v1/threads/{thread}/runs",
            post(create_run).merge(listing(RUN, &[])),
        )
        .route(
            "/v1/threads/{thread}/runs/{run}",
            read(RUN).merge(modify(RUN)),
        )
        .route(
            "/v1/threads/{thread}/runs/{run}/cancel",
            act(RUN, "cancelling"),
        )
        .route(
            "/v1/threads/{thread}/runs/{run}/submit_tool_outputs",
            act(RUN, "queued"),
        )
        .route(
            "/v1/threads/{thread}/runs/{run}/steps",
            items_of(RUN, "_steps"),
        )
        .route(
            "/v1/threads/{thread}/runs/{run}/steps/{step}",
            get(|Path(p): Ids| async move { not_found(STEP, &p[2]) }),
        )
        .route(
            "/v1/vector_stores",
            post(create_vector_store).merge(listing(VECTOR_STORE, &[])),
        )
        .route(
            "/v1/vector_stores/{vs}",
            rud(VECTOR_STORE, "vector_store.deleted"),
        )
        .route(
            "/v1/vector_stores/{vs}/search",
            empty_page(
                VECTOR_STORE,
                "vector_store.search_results.page",
                MethodFilter::POST,
            ),
        )
        .route(
            "/v1/vector_stores/{vs}/files",
            post(create_vs_file).merge(listing(VS_FILE, &[])),
        )
        .route(
            "/v1/vector_stores/{vs}/files/{file}",
            rud(VS_FILE, "vector_store.file.deleted"),
        )
        .route(
            "/v1/vector_stores/{vs}/files/{file}/content",
            empty_page(VS_FILE, "vector_store.file_content.page", MethodFilter::GET),
        )
        .route("/v1/vector_stores/{vs}/file_batches", post(create_vs_batch))
        .route(
            "/v1/vector_stores/{vs}/file_batches/{batch}",
            read(VS_BATCH),
        )
        .route(
            "/v1/vector_stores/{vs}/file_batches/{batch}/cancel",
            act(VS_BATCH, "cancelled"),
        )
        .route(
            "/v1/vector_stores/{vs}/file_batches/{batch}/files",
            get(vs_batch_files),
        )
        .route(
            "/v1/fine_tuning/jobs",
            post(create_fine_tune).merge(listing(FT_JOB, &[])),
        )
        .route("/v1/fine_tuning/jobs/{job}", read(FT_JOB))
        .route(
            "/v1/fine_tuning/jobs/{job}/cancel",
            act(FT_JOB, "cancelled"),
        )
        .route("/v1/fine_tuning/jobs/{job}/pause", act(FT_JOB, "paused"))
        .route("/v1/fine_tuning/jobs/{job}/resume", act(FT_JOB, "running"))
        .route(
            "/v1/fine_tuning/jobs/{job}/events",
            items_of(FT_JOB, "_events"),
        )
        .route(
            "/v1/fine_tuning/jobs/{job}/checkpoints",
            items_of(FT_JOB, "_checkpoints"),
        )
        .route("/v1/responses", post(create_response))
        .route(
            "/v1/responses/{response}",
            read(RESPONSE).merge(remove(RESPONSE, "response")),
        )
        .route(
            "/v1/responses/{response}/cancel",
            act(RESPONSE, "cancelled"),
        )
        .route(
            "/v1/responses/{response}/input_items",
            items_of(RESPONSE, "_input"),
        )
        .route(
            "/v1/chat/completions",
            post(create_chat).merge(listing(CHAT, &["model"])),
        )
        .route(
            "/v1/chat/completions/{completion}",
            rud(CHAT, "chat.completion.deleted"),
        )
        .route(
            "/v1/chat/completions/{completion}/messages",
            items_of(CHAT, "_messages"),
        )
        .with_state(Shared::default())
}

// Creation, per kind.

async fn create_file(State(s): Db, multipart: Result<Multipart, MultipartRejection>) -> Reply {
    let mut parts = form(multipart).await?;
    let (filename, data) = match parts.remove("file") {
        Some((Some(filename), data)) => (filename, data),
        _ => return Err(missing("file")),
    };
    let purpose = parts.remove("purpose").ok_or_else(|| missing("purpose"))?.1;
    let purpose = String::from_utf8_lossy(&purpose);
    Ok(Json(lock(&s).add_file(&filename, &purpose, data)))
}

async fn file_content(State(s): Db, Path(p): Ids) -> Result<Response, Fail> {
    let store = lock(&s);
    store.get(FILE, &p)?;
    let data = store.blobs.get(&p[0]).cloned().unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn create_upload(State(s): Db, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let (filename, purpose, mime_type) = (
        need(&req, "filename")?,
        need(&req, "purpose")?,
        need(&req, "mime_type")?,
    );
    let bytes = req["bytes"].as_u64().ok_or_else(|| missing("bytes"))?;
    let fields = json!({"filename": filename, "purpose": purpose, "bytes": bytes, "mime_type": mime_type,
                        "status": "pending", "expires_at": null, "file": null});
    Ok(Json(lock(&s).create(UPLOAD, fields)))
}

fn pending(upload: &Value) -> Result<(), Fail> {
    match upload["status"].as_str() {
        Some("pending") => Ok(()),
        status => Err(invalid(
            "invalid_upload",
            format!("The upload is {}.", status.unwrap_or("gone")),
        )),
    }
}

async fn add_part(
    State(s): Db,
    Path(p): Ids,
    multipart: Result<Multipart, MultipartRejection>,
) -> Reply {
    let mut parts = form(multipart).await?;
    let (_, data) = parts.remove("data").ok_or_else(|| missing("data"))?;
    let mut store = lock(&s);
    pending(store.get(UPLOAD, &p)?)?;
    let part = store.create(PART, json!({"upload_id": p[0]}));
    store.blobs.insert(id_of(&part), data);
    Ok(Json(part))
}

/// The upload completed: its parts, in the order given, are a new file.
async fn complete_upload(State(s): Db, Path(p): Ids, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let mut store = lock(&s);
    let upload = store.get(UPLOAD, &p)?;
    pending(upload)?;
    let filename = upload["filename"].as_str().unwrap_or_default().to_owned();
    let purpose = upload["purpose"].as_str().unwrap_or_default().to_owned();
    let mut data = Vec::new();
    for part in strings(&req, "part_ids") {
        store
            .get(PART, &[p[0].clone(), part.clone()])
            .map_err(Fail::refused)?;
        data.extend_from_slice(&store.blobs[&part]);
    }
    let file = store.add_file(&filename, &purpose, data.into());
    store
        .update(UPLOAD, &p, json!({"status": "completed", "file": file}))
        .map(Json)
}

async fn create_batch(State(s): Db, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let (file, endpoint, window) = (
        need(&req, "input_file_id")?,
        need(&req, "endpoint")?,
        need(&req, "completion_window")?,
    );
    let mut store = lock(&s);
    store.get(FILE, &[file.to_owned()]).map_err(Fail::refused)?;
    let fields = json!({"endpoint": endpoint, "input_file_id": file, "completion_window": window,
                        "status": "validating", "output_file_id": null, "error_file_id": null, "errors": null,
                        "request_counts": {"total": 0, "completed": 0, "failed": 0},
                        "metadata": req["metadata"]});
    Ok(Json(store.create(BATCH, fields)))
}

async fn create_assistant(State(s): Db, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    need(&req, "model")?;
    let mut fields = json!({"name": null, "description": null, "instructions": null, "tools": [],
                            "tool_resources": {}, "metadata": {}, "response_format": "auto"});
    merge(&mut fields, req, ASSISTANT);
    Ok(Json(lock(&s).create(ASSISTANT, fields)))
}

async fn create_thread(State(s): Db, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    lock(&s).add_thread(&req).map(Json)
}

async fn create_message(State(s): Db, Path(p): Ids, body: Bytes) -> Reply {
    let mut message = message_fields(&body_json(&body)?)?;
    let mut store = lock(&s);
    store.get(THREAD, &p)?;
    message["thread_id"] = p[0].clone().into();
    Ok(Json(store.create(MESSAGE, message)))
}

async fn create_run(State(s): Db, Path(p): Ids, body: Bytes) -> Result<Response, Fail> {
    let req = body_json(&body)?;
    let mut store = lock(&s);
    store.get(THREAD, &p)?;
    let run = store.add_run(&p[0], &req)?;
    store.run_reply(run, &req)
}

async fn create_thread_and_run(State(s): Db, body: Bytes) -> Result<Response, Fail> {
    let req = body_json(&body)?;
    let mut store = lock(&s);
    store.get(ASSISTANT, &[need(&req, "assistant_id")?.to_owned()])?;
    let thread = store.add_thread(req.get("thread").unwrap_or(&json!({})))?;
    let run = store.add_run(&id_of(&thread), &req)?;
    store.run_reply(run, &req)
}

async fn create_vector_store(State(s): Db, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let mut store = lock(&s);
    let files = strings(&req, "file_ids");
    for file in &files {
        store.get(FILE, std::slice::from_ref(file))?;
    }
    let fields = json!({"name": req["name"], "status": "completed", "usage_bytes": 0,
                        "file_counts": counts(0), "metadata": or(&req, "metadata", json!({})),
                        "expires_after": req["expires_after"], "expires_at": null,
                        "last_active_at": null});
    let vs = id_of(&store.create(VECTOR_STORE, fields));
    for file in &files {
        store.add_vs_file(&vs, file, &json!({}))?;
    }
    store.get(VECTOR_STORE, &[vs]).map(|v| Json(public(v)))
}

async fn create_vs_file(State(s): Db, Path(p): Ids, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let mut store = lock(&s);
    store.get(VECTOR_STORE, &p)?;
    store
        .add_vs_file(&p[0], need(&req, "file_id")?, &req)
        .map(Json)
}

async fn create_vs_batch(State(s): Db, Path(p): Ids, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let files = strings(&req, "file_ids");
    if files.is_empty() {
        return Err(missing("file_ids"));
    }
    let mut store = lock(&s);
    store.get(VECTOR_STORE, &p)?;
    for file in &files {
        store.get(FILE, std::slice::from_ref(file))?;
    }
    for file in &files {
        store.add_vs_file(&p[0], file, &req)?;
    }
    let fields = json!({"vector_store_id": p[0], "status": "completed",
                        "file_counts": counts(files.len() as u64), "_file_ids": files});
    Ok(Json(store.create(VS_BATCH, fields)))
}

async fn vs_batch_files(State(s): Db, Path(p): Ids, uri: Uri) -> Reply {
    let store = lock(&s);
    let files = store.get(VS_BATCH, &p)?["_file_ids"].clone();
    let in_batch = |f: &Value| files.as_array().is_some_and(|ids| ids.contains(&f["id"]));
    store.list(VS_FILE, &p[..1], &query(&uri), in_batch)
}

async fn create_fine_tune(State(s): Db, body: Bytes) -> Reply {
    let req = body_json(&body)?;
    let (model, training) = (need(&req, "model")?, need(&req, "training_file")?);
    let mut store = lock(&s);
    let files = [Some(training), req["validation_file"].as_str()];
    for file in files.into_iter().flatten() {
        store.get(FILE, &[file.to_owned()]).map_err(Fail::refused)?;
    }
    let fields = json!({"model": model, "training_file": training,
                        "validation_file": req["validation_file"],
                        "status": "queued", "fine_tuned_model": null, "organization_id": "org-mock",
                        "result_files": [], "trained_tokens": null, "error": null, "finished_at": null,
                        "hyperparameters": or(&req, "hyperparameters", json!({})),
                        "suffix": req["suffix"], "metadata": req["metadata"]});
    Ok(Json(store.create(FT_JOB, fields)))
}

/// The mock's response, kept (with its input) unless the request says `"store": false`.
async fn create_response(State(s): Db, body: Bytes) -> Response {
    let req = match mock_upstream::parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut store = lock(&s);
    if let Some(previous) = req["previous_response_id"].as_str()
        && store.get(RESPONSE, &[previous.to_owned()]).is_err()
    {
        let message = format!("Previous response with id '{previous}' not found.");
        return Fail(
            StatusCode::NOT_FOUND,
            "previous_response_not_found",
            message,
        )
        .into_response();
    }
    let (id, created) = store.next(RESPONSE);
    let mut response = mock_upstream::response_object(&req, &id, created);
    let kept = req.get("store") != Some(&Value::Bool(false));
    response["previous_response_id"] = req["previous_response_id"].clone();
    response["store"] = kept.into();
    if kept {
        let mut object = response.clone();
        object["_input"] = store.input_items(req.get("input")).into();
        store.insert(RESPONSE, object);
    }
    drop(store);
    mock_upstream::responses_reply(&req, response)
}

/// The mock's chat completion, kept (with its messages) when the request says `"store": true`.
async fn create_chat(State(s): Db, body: Bytes) -> Response {
    let req = match mock_upstream::parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (id, created) = lock(&s).next(CHAT);
    if req.get("store") == Some(&Value::Bool(true)) {
        let mut object = mock_upstream::chat_completion(&req, &id, created);
        object["metadata"] = or(&req, "metadata", json!({}));
        let messages = req["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m.is_object());
        let messages = messages.enumerate().map(|(i, m)| {
            let mut m = m.clone();
            m["id"] = format!("{id}-{i}").into();
            m
        });
        object["_messages"] = messages.collect::<Vec<_>>().into();
        lock(&s).insert(CHAT, object);
    }
    mock_upstream::chat_reply(&req, &id, created)
}

#[cfg(test)]
mod tests;
