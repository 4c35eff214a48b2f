//! [`RequestFacts`]: what a request is and what it may cost, decided once (by the scope layer)
//! and read by every later layer, never re-derived.
//!
//! The one JSON scanner ([`scan_json`]) lives here too, with the one way to change a JSON body
//! by position ([`edit_json`]), so the layer that reads a body and the layer that forwards
//! it can never disagree on where a field is.

mod json;

use std::sync::Arc;

pub use json::{
    JsonEdit, JsonError, JsonField, JsonFields, MAX_DEPTH, MAX_REFS, REF_KEYS, edit_json,
    scan_json, scan_json_text,
};
use serde::{Deserialize, Serialize};

use crate::ext::{EndpointMatch, RequestedModel};
use crate::objects::ObjectKind;
use crate::rights::{Access, EndpointGroup};

/// How a request's body is framed, as its route and `Content-Type` decided together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// No body was read (a route that takes none, or one keygate need not look into).
    #[default]
    Unread,
    /// A JSON object, read and scanned.
    Json,
    /// A `multipart/form-data` form, read.
    Multipart,
    /// gRPC framing (only on routes declared gRPC): never buffered.
    Grpc,
}

/// Where a request's model was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelSource {
    /// The body (JSON `model`, or a form's `model` field).
    Body,
    /// A path parameter.
    Path,
    /// A query parameter.
    Query,
    /// Not named by the request: the route's default model (the one the API applies).
    Default,
    /// Not named by the request: the model of an object it names, as the object registry
    /// recorded it (a run's assistant's model).
    Object,
}

/// Where a request names an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefAt {
    /// The path parameter of this name (`file_id` in `/v1/files/{file_id}`).
    Path(Arc<str>),
    /// A body field of this name, at any depth ([`REF_KEYS`]).
    Body(&'static str),
}

impl RefAt {
    /// The parameter or field name.
    pub fn name(&self) -> &str {
        match self {
            RefAt::Path(name) => name,
            RefAt::Body(name) => name,
        }
    }
}

/// An object a request names, which the caller's project must own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ObjectRef {
    /// The id, as named.
    pub id: Box<str>,
    /// Where it was named.
    pub at: RefAt,
    /// The kind of object that place names.
    pub kind: ObjectKind,
}

impl ObjectRef {
    /// `id` named at `at`, an object of `kind`.
    pub fn new(id: impl Into<Box<str>>, at: RefAt, kind: ObjectKind) -> Self {
        ObjectRef {
            id: id.into(),
            at,
            kind,
        }
    }
}

/// The kind of object a body field of [`REF_KEYS`] names.
pub fn body_ref_kind(key: &str) -> Option<ObjectKind> {
    Some(match key {
        "file_id" | "file_ids" | "input_file_id" | "training_file" | "validation_file" => {
            ObjectKind::File
        }
        "assistant_id" => ObjectKind::Assistant,
        "previous_response_id" => ObjectKind::Response,
        "vector_store_id" | "vector_store_ids" => ObjectKind::VectorStore,
        _ => return None,
    })
}

/// What a route makes, which decides what a request to it reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Generation {
    /// Nothing billed (list, retrieve, delete, upload): never reserves tokens or money and
    /// never needs a price.
    Nothing,
    /// Text: the prompt plus up to the output cap, for each of `n` (or `best_of`) choices.
    #[default]
    Text,
    /// Embeddings: the input only.
    Embeddings,
    /// Images: `n` of them, each at the price of its size and quality (or, without a price
    /// per image, up to the output cap per image).
    Images,
    /// Audio (speech, transcription, translation): up to the output cap.
    Audio,
}

impl Generation {
    /// Whether requests of this kind are billed at all.
    pub fn bills(self) -> bool {
        self != Generation::Nothing
    }
}

/// The size of what the model will read, as measured from the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PromptSize {
    /// Bytes of text the model sees (string values, JSON syntax and keys excluded; for a
    /// body that is not JSON, the body's length).
    pub text_bytes: u64,
    /// Numbers in the body (token ids of a pre-tokenized prompt count one token each).
    pub numbers: u64,
    /// Nested items (messages, content parts, tools), each framed by a few tokens.
    pub items: u64,
    /// The exact token count, when a tokenizer for the model counted it.
    pub tokens: Option<u64>,
}

/// Tokens of framing the model reads around each nested item (a message's role markers, a
/// content part), and once around the whole prompt.
pub const TOKENS_PER_ITEM: u64 = 4;

impl PromptSize {
    /// The most tokens this prompt can be: the exact count when a tokenizer made one; else
    /// the text at `bytes_per_token` (1, the default of the token layer, is a bound for every
    /// byte-level tokenizer: no token is shorter than a byte), one token per number (token
    /// ids) and the framing of each item.
    pub fn tokens_at_most(&self, bytes_per_token: u64) -> u64 {
        if let Some(tokens) = self.tokens {
            return tokens;
        }
        self.text_bytes
            .div_ceil(bytes_per_token.max(1))
            .saturating_add(self.numbers)
            .saturating_add((self.items + 1).saturating_mul(TOKENS_PER_ITEM))
    }

    /// A prompt of `text_bytes` bytes and nothing else.
    pub fn bytes(text_bytes: u64) -> Self {
        PromptSize {
            text_bytes,
            ..PromptSize::default()
        }
    }
}

/// Counts the tokens of text for the models it knows (an OpenAI tokenizer for OpenAI's model
/// families): what makes the prompt side of a reservation tight instead of a byte bound.
pub trait TokenCounter: Send + Sync + 'static {
    /// Whether this counter knows how `model` tokenizes.
    fn knows(&self, model: &str) -> bool;

    /// The tokens of `text` for `model` (a model [`knows`](TokenCounter::knows) accepted).
    fn count(&self, model: &str, text: &str) -> u64;
}

/// The prompt tokens of a JSON body scanned with [`scan_json_text`], for `model`, when
/// `counter` knows it: every piece of text counted (up to `max_bytes` of it; text beyond
/// counts a token a byte), plus numbers and framing as in [`PromptSize::tokens_at_most`].
/// Each piece is counted apart, which never counts fewer tokens than the pieces joined.
pub fn count_prompt(
    fields: &JsonFields<'_>,
    body: &[u8],
    model: &str,
    counter: &dyn TokenCounter,
    max_bytes: usize,
) -> Option<u64> {
    if !counter.knows(model) {
        return None;
    }
    let mut counted = 0usize;
    let mut tokens = 0u64;
    for text in fields.text(body) {
        if counted + text.len() <= max_bytes {
            counted += text.len();
            tokens = tokens.saturating_add(counter.count(model, &text));
        } else {
            tokens = tokens.saturating_add(text.len() as u64);
        }
    }
    Some(
        tokens
            .saturating_add(fields.numbers)
            .saturating_add((fields.items + 1).saturating_mul(TOKENS_PER_ITEM)),
    )
}

/// Everything keygate decided about one request: route, endpoint group and access, body
/// framing, model and where it came from, and what the request may generate. Put in request
/// extensions by the scope layer (or, without one, by the first layer that needs it); read by
/// the rate and token layers, the proxy and the audit layer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestFacts {
    /// The matched route, its endpoint group and the access it needs.
    pub endpoint: EndpointMatch,
    /// How the body was framed.
    pub protocol: Protocol,
    /// The model the request is for (as named, or the route's default).
    pub model: Option<RequestedModel>,
    /// Where `model` came from.
    pub model_source: Option<ModelSource>,
    /// What the route makes.
    pub generation: Generation,
    /// The output cap the client asked for (the largest of the fields it gave).
    pub max_output: Option<u64>,
    /// How many outputs the request generates: `max(n, best_of)`, at least 1 (`best_of`
    /// candidates are generated and billed even when fewer are returned).
    pub choices: u64,
    /// Whether the response streams.
    pub stream: bool,
    /// `store` as the client sent it (`None`: not given): whether the upstream keeps the
    /// result (a stored chat completion or response is an object the caller owns).
    pub store: Option<bool>,
    /// `stream_options.include_usage` as the client sent it (`None`: not given).
    pub usage_requested: Option<bool>,
    /// The prompt's size.
    pub prompt: PromptSize,
    /// The body field that caps output on this route (`max_completion_tokens` for chat), if
    /// the API has one: where keygate writes a cap when the client names none.
    pub output_field: Option<Arc<str>>,
    /// The image size the request asks for (`size`: `1024x1024`, `auto`), as sent; `None`:
    /// not named (the API's default applies).
    pub image_size: Option<Arc<str>>,
    /// The image quality the request asks for (`quality`: `standard`, `hd`, `high`), as sent;
    /// `None`: not named.
    pub image_quality: Option<Arc<str>>,
    /// The models the requests of an uploaded batch input file name (sorted, each once), when
    /// keygate read the file: what a batch made from it will run, for the ownership registry
    /// to keep with the file.
    pub batch_models: Option<Vec<Arc<str>>>,
    /// The objects the request names, in its path and its body: the caller's project must
    /// own each (checked by the scope layer when it has an object registry).
    pub objects: Vec<ObjectRef>,
    /// The models an indirect route will use (a batch: its input file's requests') were all
    /// verified against the caller's rules from the objects the request names.
    pub models_verified: bool,
    /// The JSON body's layout, when it was scanned: where fields can be changed.
    pub(crate) layout: Option<json::Edits>,
}

impl RequestFacts {
    /// Facts of a request to `endpoint` that generates `generation`, with nothing read yet.
    pub fn new(endpoint: EndpointMatch, generation: Generation) -> Self {
        RequestFacts {
            endpoint,
            protocol: Protocol::Unread,
            model: None,
            model_source: None,
            generation,
            max_output: None,
            choices: 1,
            stream: false,
            store: None,
            usage_requested: None,
            prompt: PromptSize::default(),
            output_field: None,
            image_size: None,
            image_quality: None,
            batch_models: None,
            objects: Vec::new(),
            models_verified: false,
            layout: None,
        }
    }

    /// Facts of a request no route table classified (a layer used on its own): group `*`,
    /// Write access, generating text.
    pub fn unrouted() -> Self {
        Self::new(
            EndpointMatch {
                group: EndpointGroup::new("*"),
                access: Access::Write,
                route: Arc::from("*"),
            },
            Generation::Text,
        )
    }

    /// The model, if known.
    pub fn model(&self) -> Option<&str> {
        self.model.as_ref().map(RequestedModel::as_str)
    }

    /// Takes what a scan of the JSON body found (all but the model, which the caller
    /// reconciles with the other places a model can be named).
    pub fn absorb_json(&mut self, fields: &JsonFields<'_>) {
        self.protocol = Protocol::Json;
        self.max_output = fields.max_output;
        self.choices = fields
            .n
            .unwrap_or(1)
            .max(fields.best_of.unwrap_or(1))
            .max(1);
        self.stream = fields.stream;
        self.store = fields.store;
        self.usage_requested = fields.include_usage.flatten();
        self.prompt = PromptSize {
            text_bytes: fields.text_bytes,
            numbers: fields.numbers,
            items: fields.items,
            tokens: None,
        };
        self.image_size = fields.size.as_deref().map(Arc::from);
        self.image_quality = fields.quality.as_deref().map(Arc::from);
        self.layout = Some(fields.edits.clone());
    }

    /// Takes the object ids a scan of the JSON `body` found ([`JsonFields::object_refs`]).
    pub fn absorb_refs(&mut self, fields: &JsonFields<'_>, body: &[u8]) {
        for (key, id) in fields.object_refs(body) {
            if let Some(kind) = body_ref_kind(key) {
                self.objects
                    .push(ObjectRef::new(id.into_owned(), RefAt::Body(key), kind));
            }
        }
    }

    /// The JSON body (the one these facts were scanned from) with `edit` applied; `None` if
    /// nothing changes or the body was not scanned.
    pub fn edit_json(&self, body: &[u8], edit: JsonEdit<'_>) -> Option<Vec<u8>> {
        json::apply(body, self.layout.as_ref()?, edit)
    }

    /// Whether the JSON body's layout is known (it was scanned), so [`edit_json`] can work.
    ///
    /// [`edit_json`]: RequestFacts::edit_json
    pub fn has_layout(&self) -> bool {
        self.layout.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_size_and_quality_are_read_from_a_json_body() {
        let body =
            br#"{"model":"dall-e-3","prompt":"a cat","n":2,"size":"1792x1024","quality":"hd"}"#;
        let fields = scan_json(body).unwrap();
        assert_eq!(fields.size.as_deref(), Some("1792x1024"));
        assert_eq!(fields.quality.as_deref(), Some("hd"));
        let mut facts = RequestFacts::unrouted();
        facts.absorb_json(&fields);
        assert_eq!(facts.image_size.as_deref(), Some("1792x1024"));
        assert_eq!(facts.image_quality.as_deref(), Some("hd"));
        assert_eq!(facts.choices, 2);
        // Their values are not prompt text: only "a cat" is.
        assert_eq!(facts.prompt.text_bytes, 5);
    }

    #[test]
    fn image_fields_that_are_not_strings_or_are_escaped_are_read_as_json_does() {
        // Escapes are decoded; a value that is not a string (or null) is not a size.
        let fields = scan_json(br#"{"size":"1024\u00781024","quality":null}"#).unwrap();
        assert_eq!(fields.size.as_deref(), Some("1024x1024"));
        assert_eq!(fields.quality, None);
        let fields = scan_json(br#"{"size":1024,"quality":["hd"]}"#).unwrap();
        assert_eq!((fields.size, fields.quality), (None, None));
        // Nested ones are not the request's.
        let fields = scan_json(br#"{"x":{"size":"256x256"}}"#).unwrap();
        assert_eq!(fields.size, None);
        // Twice is a duplicate key, as everywhere.
        assert_eq!(
            scan_json(br#"{"size":"256x256","size":"1024x1024"}"#).unwrap_err(),
            JsonError::DuplicateKey
        );
    }
}
