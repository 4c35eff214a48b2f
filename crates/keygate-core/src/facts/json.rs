//! The one JSON scanner: validates a request body as strictly as `serde_json` does, in one
//! pass and in time linear in its length, and picks up the few top-level fields accounting
//! needs (with their byte positions, so a field can be set without re-encoding the body).
//!
//! No tree is built. Strings are found with `memchr`; only the keys of the objects whose
//! fields are read (the top level and `stream_options`) are decoded, and a field read that
//! appears twice is refused (as the scanner and an upstream parser could take different
//! ones); other duplicate keys are passed on, since nothing keygate decides depends on them.
//! So a body of many keys, escaped or not, costs what its bytes cost.

use std::borrow::Cow;
use std::ops::Range;

use smallvec::SmallVec;

/// Objects and arrays nested deeper than this are refused (as `serde_json` refuses them).
pub const MAX_DEPTH: u32 = 128;

/// Why a JSON body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Not UTF-8.
    #[error("the body is not UTF-8")]
    NotUtf8,
    /// Not valid JSON, or nested deeper than [`MAX_DEPTH`].
    #[error("not valid JSON")]
    Invalid,
    /// Valid JSON, but not an object.
    #[error("the JSON is not an object")]
    NotObject,
    /// An object has a key twice (at any depth): the upstream might read the other copy.
    #[error("an object has a key more than once")]
    DuplicateKey,
    /// `model` twice, or a key equal to `model` apart from letter case.
    #[error("the model is named more than once")]
    AmbiguousModel,
    /// A field keygate reads has the wrong type or value (`model` not a string,
    /// `max_tokens` not a non-negative integer, `n` below 1, ...): its name.
    #[error("the field {0} has an invalid value")]
    BadField(&'static str),
    /// More than [`MAX_REFS`] values naming objects (`file_id`, `file_ids`, …).
    #[error("the body names too many objects")]
    TooManyRefs,
}

/// The most object ids (values of [`REF_KEYS`]) one body may name: each is checked
/// against the object registry.
pub const MAX_REFS: usize = 1000;

/// The keys whose values name objects, at any depth of a JSON body (outside the top-level
/// `metadata`, whose keys are the client's own): a string value, or an array of strings, is
/// an object id the caller must own (a file attached to a message, an assistant a run uses,
/// the input file of a batch, the response a response continues).
pub const REF_KEYS: [&str; 9] = [
    "file_id",
    "file_ids",
    "input_file_id",
    "training_file",
    "validation_file",
    "assistant_id",
    "previous_response_id",
    "vector_store_id",
    "vector_store_ids",
];

/// The longest name in [`REF_KEYS`] (`previous_response_id`).
const LONGEST_REF: usize = 20;

/// `raw`, a key as written (with escapes, already validated), decoded into `out` when it is
/// spelled as every name in [`REF_KEYS`] is: at most [`LONGEST_REF`] lowercase ASCII letters
/// and `_`, some perhaps written `\u00XX`; `None` as soon as it cannot be (no allocation, and
/// at most one step per byte).
fn plain_key(raw: &[u8], out: &mut [u8; LONGEST_REF]) -> Option<usize> {
    let (mut i, mut n) = (0, 0);
    while i < raw.len() {
        let c = if raw[i] == b'\\' {
            if raw.get(i + 1) != Some(&b'u') {
                return None;
            }
            // Only `\u00XX` can be an ASCII letter or `_`.
            let &[b'0', b'0', hi, lo] = raw.get(i + 2..i + 6)? else {
                return None;
            };
            i += 6;
            nibble(hi)? << 4 | nibble(lo)?
        } else {
            i += 1;
            raw[i - 1]
        };
        let first = n == 0;
        if n == LONGEST_REF
            || !(c.is_ascii_lowercase() || c == b'_')
            || (first && !matches!(c, b'a' | b'f' | b'i' | b'p' | b't' | b'v'))
        {
            return None;
        }
        out[n] = c;
        n += 1;
    }
    Some(n)
}

/// The value of a hexadecimal digit.
#[inline]
fn nibble(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

/// The name in [`REF_KEYS`] that `key` (decoded) is.
#[inline]
fn ref_key(key: &[u8]) -> Option<&'static str> {
    // Most keys are ruled out by their length alone.
    if !matches!(key.len(), 7 | 8 | 12 | 13 | 15 | 16 | 20) {
        return None;
    }
    REF_KEYS.into_iter().find(|k| k.as_bytes() == key)
}

impl JsonError {
    /// The 400 answering a body refused for this reason, from `stage` (in the OpenAI shape:
    /// `invalid_json`, `invalid_encoding`, `duplicate_key`, `ambiguous_model`,
    /// `invalid_model`, `invalid_value` with the field as `param`).
    pub fn denial(self, stage: crate::Stage) -> crate::Denial {
        let (code, message, param) = match self {
            JsonError::NotUtf8 => (
                "invalid_encoding",
                "The request body is not valid UTF-8.",
                None,
            ),
            JsonError::NotObject => (
                "invalid_json",
                "The request body must be a JSON object.",
                None,
            ),
            JsonError::DuplicateKey => (
                "duplicate_key",
                "The request body has a key more than once.",
                None,
            ),
            JsonError::AmbiguousModel => (
                "ambiguous_model",
                "The request body names the model more than once.",
                Some("model"),
            ),
            JsonError::BadField("model") => (
                "invalid_model",
                "The model must be a string.",
                Some("model"),
            ),
            JsonError::BadField(field) => (
                "invalid_value",
                "A field of the request has a value of the wrong type or range.",
                Some(field),
            ),
            JsonError::Invalid => ("invalid_json", "The request body is not valid JSON.", None),
            JsonError::TooManyRefs => (
                "too_many_objects",
                "The request body names more than 1000 objects.",
                None,
            ),
        };
        let denial = crate::Denial::new(stage, http::StatusCode::BAD_REQUEST, code, message);
        match param {
            Some(p) => denial.with_param(p),
            None => denial,
        }
    }
}

/// The top-level fields of a JSON request object that accounting reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JsonFields<'a> {
    /// The top-level `model`, decoded.
    pub model: Option<Cow<'a, str>>,
    /// The largest non-null `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    pub max_output: Option<u64>,
    /// `n`, if given and not null.
    pub n: Option<u64>,
    /// `best_of`, if given and not null.
    pub best_of: Option<u64>,
    /// `stream: true`.
    pub stream: bool,
    /// The top-level `store`, when a boolean (whether the result is kept upstream).
    pub store: Option<bool>,
    /// The top-level `purpose`, when a string (an upload's: `batch` files are requests).
    pub purpose: Option<Cow<'a, str>>,
    /// The top-level `size`, when a string (an image request's: `1024x1024`).
    pub size: Option<Cow<'a, str>>,
    /// The top-level `quality`, when a string (an image request's: `hd`, `high`).
    pub quality: Option<Cow<'a, str>>,
    /// `stream_options`: `None` absent or null; `Some(None)` an object without
    /// `include_usage` (or with it null); `Some(Some(b))` with it.
    pub include_usage: Option<Option<bool>>,
    /// Bytes of string values (at any depth, escapes counted as written) and of the keys of
    /// nested objects (a tool's parameter names reach the model), except the values of the
    /// fields above: an upper bound on the text the model sees.
    pub text_bytes: u64,
    /// Number values (at any depth) outside the fields above: token ids count one each.
    pub numbers: u64,
    /// Objects at depth two or more (messages, content parts, tools): each costs the model a
    /// few tokens of framing.
    pub items: u64,
    pub(crate) edits: Edits,
    /// Where the text counted in `text_bytes` is (quotes excluded), when collected.
    pub(crate) text: Vec<Span>,
    /// The object ids the body names ([`REF_KEYS`]): which key, and where the id is.
    pub(crate) refs: Vec<(&'static str, Span)>,
}

/// A string's contents in the body, and whether they hold escapes (then decoded to count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) range: Range<usize>,
    pub(crate) escaped: bool,
}

impl JsonFields<'_> {
    /// The object ids the body names, decoded, with the key that names each ([`REF_KEYS`]),
    /// in body order.
    pub fn object_refs<'b>(
        &'b self,
        body: &'b [u8],
    ) -> impl Iterator<Item = (&'static str, Cow<'b, str>)> + 'b {
        self.refs
            .iter()
            .filter_map(move |(key, span)| Some((*key, span_text(body, span)?)))
    }

    /// Each piece of text counted in [`text_bytes`](JsonFields::text_bytes), decoded (empty
    /// unless the scan collected text: [`scan_json_text`]).
    pub fn text<'b>(&'b self, body: &'b [u8]) -> impl Iterator<Item = Cow<'b, str>> + 'b {
        self.text
            .iter()
            .filter_map(move |span| span_text(body, span))
    }
}

/// The string at `span` of `body`, decoded.
fn span_text<'b>(body: &'b [u8], span: &Span) -> Option<Cow<'b, str>> {
    let raw = body.get(span.range.clone())?;
    if span.escaped {
        let quoted = body.get(span.range.start - 1..span.range.end + 1)?;
        serde_json::from_slice::<String>(quoted)
            .ok()
            .map(Cow::Owned)
    } else {
        std::str::from_utf8(raw).ok().map(Cow::Borrowed)
    }
}

/// Where the body can be changed without re-encoding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Edits {
    /// The top-level object's closing `}`.
    pub(crate) close: usize,
    /// Whether the top-level object has no members.
    pub(crate) empty: bool,
    /// The `stream_options` object's opening `{`, and whether it is empty.
    pub(crate) stream_options: Option<(usize, bool)>,
    /// The `stream_options.include_usage` value's range.
    pub(crate) include_usage_at: Option<Range<usize>>,
    /// The ranges of the output-cap values (`null` included), in body order.
    pub(crate) max_output_at: SmallVec<[Range<usize>; 2]>,
    /// Whether `stream_options.include_usage` is already `true`.
    pub(crate) usage_on: bool,
}

/// Scans `body`, which must be one JSON object.
///
/// # Errors
///
/// Not UTF-8, not JSON, not an object, a key twice in any object, `model` ambiguous, or a
/// field keygate reads with a value of the wrong type.
pub fn scan_json(body: &[u8]) -> Result<JsonFields<'_>, JsonError> {
    scan(body, false)
}

/// [`scan_json`], also noting where the text the model sees is, for a tokenizer to count
/// ([`JsonFields::text`]).
///
/// # Errors
///
/// As [`scan_json`].
pub fn scan_json_text(body: &[u8]) -> Result<JsonFields<'_>, JsonError> {
    scan(body, true)
}

fn scan(body: &[u8], collect: bool) -> Result<JsonFields<'_>, JsonError> {
    let text = std::str::from_utf8(body).map_err(|_| JsonError::NotUtf8)?;
    let mut s = Scanner {
        b: text.as_bytes(),
        i: 0,
        f: JsonFields::default(),
        collect,
        refs: true,
        escaped: false,
    };
    s.ws();
    if s.peek() != Some(b'{') {
        s.value(0)?;
        s.ws();
        return Err(if s.i == s.b.len() {
            JsonError::NotObject
        } else {
            JsonError::Invalid
        });
    }
    s.top()?;
    s.ws();
    if s.i != s.b.len() {
        return Err(JsonError::Invalid);
    }
    Ok(s.f)
}

/// The keys of the fields read that were seen in one object: a second of any is refused.
/// Only those: a duplicate of any other key changes nothing keygate decides (the fields it
/// reads are these; the text it counts, it counts in full, duplicates included), so no other
/// key is kept or compared, and a body of many keys costs what its bytes cost.
#[derive(Default)]
struct ReadKeys<'a> {
    seen: SmallVec<[Cow<'a, [u8]>; 8]>,
}

impl<'a> ReadKeys<'a> {
    /// Adds `key` (one of a handful of names: the list stays short); false if it was
    /// already there.
    fn insert(&mut self, key: Cow<'a, [u8]>) -> bool {
        if self.seen.contains(&key) {
            return false;
        }
        self.seen.push(key);
        true
    }
}

/// The longest name of a field read (`max_completion_tokens`): a key longer than six
/// times this as written (every byte an escape) cannot be one, and is not decoded.
const LONGEST_READ: usize = 21;

/// The top-level fields read, by name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Model,
    MaxOutput,
    N,
    BestOf,
    Stream,
    StreamOptions,
    Purpose,
    Size,
    Quality,
    Metadata,
    Store,
    Ref(&'static str),
    Other,
}

fn field(key: &[u8]) -> Field {
    match key {
        b"model" => Field::Model,
        b"max_tokens" | b"max_completion_tokens" | b"max_output_tokens" => Field::MaxOutput,
        b"n" => Field::N,
        b"best_of" => Field::BestOf,
        b"stream" => Field::Stream,
        b"stream_options" => Field::StreamOptions,
        b"purpose" => Field::Purpose,
        b"size" => Field::Size,
        b"quality" => Field::Quality,
        b"metadata" => Field::Metadata,
        b"store" => Field::Store,
        _ => ref_key(key).map_or(Field::Other, Field::Ref),
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    f: JsonFields<'a>,
    collect: bool,
    /// Whether object ids are collected here (not inside the top-level `metadata`).
    refs: bool,
    /// Whether the last string skipped held an escape.
    escaped: bool,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Result<(), JsonError> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(JsonError::Invalid)
        }
    }

    /// After `,` or `}` of a member: true if the object goes on.
    #[inline]
    fn more(&mut self, close: u8) -> Result<bool, JsonError> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.i += 1;
                Ok(true)
            }
            Some(c) if c == close => {
                self.i += 1;
                Ok(false)
            }
            _ => Err(JsonError::Invalid),
        }
    }

    /// The top-level object, at its `{`.
    fn top(&mut self) -> Result<(), JsonError> {
        self.i += 1;
        let mut keys = ReadKeys::default();
        let mut model_seen = false;
        self.ws();
        if self.peek() == Some(b'}') {
            self.f.edits.close = self.i;
            self.f.edits.empty = true;
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(JsonError::Invalid);
            }
            // `None`: too long to be a field read (validated, not decoded).
            let key = self.top_key()?;
            let which = key.as_deref().map_or(Field::Other, field);
            if let Some(key) = key {
                if key.eq_ignore_ascii_case(b"model") && (which != Field::Model || model_seen) {
                    return Err(JsonError::AmbiguousModel);
                }
                if which != Field::Other && !keys.insert(key) {
                    return Err(JsonError::DuplicateKey);
                }
            }
            self.expect(b':')?;
            self.ws();
            let start = self.i;
            match which {
                Field::Model => {
                    model_seen = true;
                    if self.peek() != Some(b'"') {
                        self.value(1)?;
                        return Err(JsonError::BadField("model"));
                    }
                    self.f.model = Some(self.string()?);
                }
                Field::MaxOutput => {
                    if let Some(v) = self.count_or_null("max_tokens", 0)? {
                        self.f.max_output = Some(self.f.max_output.map_or(v, |m| m.max(v)));
                    }
                    self.f.edits.max_output_at.push(start..self.i);
                }
                Field::N => self.f.n = self.count_or_null("n", 1)?,
                Field::BestOf => self.f.best_of = self.count_or_null("best_of", 1)?,
                Field::Stream => {
                    self.f.stream = self.bool_or_null("stream")? == Some(true);
                }
                Field::StreamOptions => self.stream_options()?,
                Field::Purpose if self.peek() == Some(b'"') => {
                    self.f.purpose = Some(self.string()?);
                }
                Field::Size if self.peek() == Some(b'"') => self.f.size = Some(self.string()?),
                Field::Quality if self.peek() == Some(b'"') => {
                    self.f.quality = Some(self.string()?);
                }
                Field::Ref(name) => self.ref_value(name, 1)?,
                Field::Store => self.f.store = self.bool_or_null("store")?,
                Field::Metadata => {
                    self.refs = false;
                    let read = self.value(1);
                    self.refs = true;
                    read?;
                }
                Field::Purpose | Field::Size | Field::Quality | Field::Other => self.value(1)?,
            }
            if !self.more(b'}')? {
                self.f.edits.close = self.i - 1;
                return Ok(());
            }
        }
    }

    /// `stream_options`: null or an object, of which `include_usage` is read.
    fn stream_options(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'n') => return self.literal(b"null"),
            Some(b'{') => {}
            _ => {
                self.value(1)?;
                return Err(JsonError::BadField("stream_options"));
            }
        }
        let open = self.i;
        self.i += 1;
        let mut include = None;
        let mut usage_seen = false;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            self.f.edits.stream_options = Some((open, true));
            self.f.include_usage = Some(None);
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(JsonError::Invalid);
            }
            let is_usage = self.top_key()?.is_some_and(|key| &*key == b"include_usage");
            if is_usage && std::mem::replace(&mut usage_seen, true) {
                return Err(JsonError::DuplicateKey);
            }
            self.expect(b':')?;
            self.ws();
            if is_usage {
                let at = self.i;
                include = self.bool_or_null("stream_options.include_usage")?;
                self.f.edits.include_usage_at = Some(at..self.i);
                self.f.edits.usage_on = include == Some(true);
            } else {
                self.value(2)?;
            }
            if !self.more(b'}')? {
                break;
            }
        }
        self.f.edits.stream_options = Some((open, false));
        self.f.include_usage = Some(include);
        Ok(())
    }

    /// `null` or an integer ≥ `min` (as a u64; larger ones saturate).
    fn count_or_null(&mut self, name: &'static str, min: u64) -> Result<Option<u64>, JsonError> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Ok(None);
        }
        if !matches!(self.peek(), Some(b'-' | b'0'..=b'9')) {
            self.value(1)?;
            return Err(JsonError::BadField(name));
        }
        let start = self.i;
        self.number()?;
        let raw = &self.b[start..self.i];
        let v = raw.iter().try_fold(0u64, |acc, &d| {
            let digit = d.checked_sub(b'0').filter(|d| *d <= 9)?;
            acc.checked_mul(10)?.checked_add(u64::from(digit))
        });
        match v {
            Some(v) if v >= min => Ok(Some(v)),
            _ => Err(JsonError::BadField(name)),
        }
    }

    fn bool_or_null(&mut self, name: &'static str) -> Result<Option<bool>, JsonError> {
        match self.peek() {
            Some(b't') => self.literal(b"true").map(|()| Some(true)),
            Some(b'f') => self.literal(b"false").map(|()| Some(false)),
            Some(b'n') => self.literal(b"null").map(|()| None),
            _ => {
                self.value(1)?;
                Err(JsonError::BadField(name))
            }
        }
    }

    /// One value of any kind at nesting `depth`, counted towards the prompt size.
    fn value(&mut self, depth: u32) -> Result<(), JsonError> {
        match self.peek().ok_or(JsonError::Invalid)? {
            b'"' => self.text_string(),
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1, None),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => {
                self.f.numbers += 1;
                self.number()
            }
            _ => Err(JsonError::Invalid),
        }
    }

    fn object(&mut self, depth: u32) -> Result<(), JsonError> {
        if depth >= MAX_DEPTH {
            return Err(JsonError::Invalid);
        }
        if depth >= 2 {
            self.f.items += 1;
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(JsonError::Invalid);
            }
            // A key of a nested object is text the model may read: validated and counted,
            // never decoded (nothing read lies below here but `stream_options`).
            let at = self.i;
            self.skip_short_string()?;
            let key = at + 1..self.i - 1;
            self.note_text(key.clone());
            let names = if self.refs { self.ref_name(key) } else { None };
            self.expect(b':')?;
            self.ws();
            match names {
                Some(name) => self.ref_value(name, depth)?,
                None => self.value(depth)?,
            }
            if !self.more(b'}')? {
                return Ok(());
            }
        }
    }

    /// Whether the key at `key` (a nested object's, skipped) names objects ([`REF_KEYS`]);
    /// an escaped one is decoded to tell, without allocating.
    #[inline]
    fn ref_name(&self, key: Range<usize>) -> Option<&'static str> {
        let raw = &self.b[key];
        if !self.escaped {
            return ref_key(raw);
        }
        let mut out = [0u8; LONGEST_REF];
        let n = plain_key(raw, &mut out)?;
        ref_key(&out[..n])
    }

    /// The value of a key that names objects, read as [`value`](Self::value) at `depth`
    /// reads it: a string, or each string of an array, is also noted as an object id.
    fn ref_value(&mut self, name: &'static str, depth: u32) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'"') => self.ref_string(name),
            Some(b'[') => self.array(depth + 1, Some(name)),
            _ => self.value(depth),
        }
    }

    /// A string naming an object (at its opening quote): noted, and counted as text.
    fn ref_string(&mut self, name: &'static str) -> Result<(), JsonError> {
        if self.f.refs.len() >= MAX_REFS {
            return Err(JsonError::TooManyRefs);
        }
        let at = self.i;
        self.skip_string()?;
        let range = at + 1..self.i - 1;
        self.note_text(range.clone());
        let escaped = self.escaped;
        self.f.refs.push((name, Span { range, escaped }));
        Ok(())
    }

    /// An array (at its `[`) at nesting `depth`; with `names`, the value of a key naming
    /// objects, whose strings are noted as object ids.
    fn array(&mut self, depth: u32, names: Option<&'static str>) -> Result<(), JsonError> {
        if depth >= MAX_DEPTH {
            return Err(JsonError::Invalid);
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            match names {
                Some(name) if self.peek() == Some(b'"') => self.ref_string(name)?,
                _ => self.value(depth)?,
            }
            if !self.more(b']')? {
                return Ok(());
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(JsonError::Invalid)
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// A number, as JSON writes them; one that does not fit an `f64` is refused, as
    /// `serde_json` refuses it.
    fn number(&mut self) -> Result<(), JsonError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(JsonError::Invalid),
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            float = true;
            if self.digits() == 0 {
                return Err(JsonError::Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            float = true;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(JsonError::Invalid);
            }
        }
        let raw = &self.b[start..self.i];
        // Integers of up to 308 digits always fit; beyond, and for any float, check.
        if float || raw.len() > 300 {
            let finite = std::str::from_utf8(raw)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .is_some_and(f64::is_finite);
            if !finite {
                return Err(JsonError::Invalid);
            }
        }
        Ok(())
    }

    /// A string value the model may read: skipped, and counted as text.
    fn text_string(&mut self) -> Result<(), JsonError> {
        let at = self.i;
        self.skip_string()?;
        self.note_text(at + 1..self.i - 1);
        Ok(())
    }

    /// Counts the string contents at `range` as text (and notes where they are).
    #[inline]
    fn note_text(&mut self, range: Range<usize>) {
        self.f.text_bytes += range.len() as u64;
        if self.collect && !range.is_empty() {
            let escaped = memchr::memchr(b'\\', &self.b[range.clone()]).is_some();
            self.f.text.push(Span { range, escaped });
        }
    }

    /// Skips a string (at its opening quote), validating its escapes and refusing control
    /// characters; returns its length as written, quotes excluded.
    fn skip_string(&mut self) -> Result<usize, JsonError> {
        self.skip_string_from(long_span_end)
    }

    /// [`skip_string`](Self::skip_string) of a string usually short (a key): its first run
    /// walked, not searched.
    fn skip_short_string(&mut self) -> Result<usize, JsonError> {
        self.skip_string_from(span_end)
    }

    #[inline]
    fn skip_string_from(
        &mut self,
        first: fn(&[u8]) -> Result<usize, JsonError>,
    ) -> Result<usize, JsonError> {
        self.i += 1;
        let start = self.i;
        // After an escape, the next few bytes are walked before a search (escapes tend to
        // come together, and a step costs less than setting up a search).
        self.i += first(&self.b[self.i..])?;
        self.escaped = self.b[self.i] != b'"';
        loop {
            if self.b[self.i] == b'"' {
                let len = self.i - start;
                self.i += 1;
                return Ok(len);
            }
            self.escape(None)?;
            self.i += walked_span_end::<4>(&self.b[self.i..])?;
        }
    }

    /// Reads a string (at its opening quote) and decodes it as JSON does.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        match self.key()? {
            // The body was checked to be UTF-8, and a quote or backslash is never inside a
            // character: a slice between them is UTF-8 too.
            Cow::Borrowed(raw) => std::str::from_utf8(raw)
                .map(Cow::Borrowed)
                .map_err(|_| JsonError::NotUtf8),
            Cow::Owned(out) => String::from_utf8(out)
                .map(Cow::Owned)
                .map_err(|_| JsonError::NotUtf8),
        }
    }

    /// A key of an object whose fields are read (at its opening quote), decoded; `None`
    /// (validated, not decoded) when it is too long to be the name of a field read.
    fn top_key(&mut self) -> Result<Option<Cow<'a, [u8]>>, JsonError> {
        let start = self.i;
        let rest = &self.b[start + 1..];
        // The usual short, plain key: found and taken at once.
        if let Ok(at) = span_end(rest)
            && rest[at] == b'"'
        {
            self.i = start + at + 2;
            return Ok((at <= LONGEST_READ).then_some(Cow::Borrowed(&rest[..at])));
        }
        let len = self.skip_short_string()?;
        if len > 6 * LONGEST_READ {
            return Ok(None);
        }
        self.i = start;
        self.key().map(Some)
    }

    /// Reads a string (at its opening quote), decoded as JSON does, as bytes: what keys are
    /// compared as (their UTF-8 was checked with the whole body).
    fn key(&mut self) -> Result<Cow<'a, [u8]>, JsonError> {
        self.i += 1;
        let b = self.b;
        let start = self.i;
        let rest = &b[start..];
        let at = span_end(rest)?;
        if rest[at] == b'"' {
            self.i += at + 1;
            return Ok(Cow::Borrowed(&rest[..at]));
        }
        let mut out = Vec::with_capacity(at + 16);
        out.extend_from_slice(&rest[..at]);
        self.i += at;
        loop {
            self.escape(Some(&mut out))?;
            let rest = &b[self.i..];
            let at = span_end(rest)?;
            out.extend_from_slice(&rest[..at]);
            self.i += at;
            if b[self.i] == b'"' {
                self.i += 1;
                return Ok(Cow::Owned(out));
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let digits = self.b.get(self.i..self.i + 4).ok_or(JsonError::Invalid)?;
        let mut v = 0u16;
        for &d in digits {
            let n = (d as char).to_digit(16).ok_or(JsonError::Invalid)?;
            v = v << 4 | n as u16;
        }
        self.i += 4;
        Ok(v)
    }

    /// One escape at `self.i` (a backslash); its decoding appended to `out` if given.
    fn escape(&mut self, out: Option<&mut Vec<u8>>) -> Result<(), JsonError> {
        let c = *self.b.get(self.i + 1).ok_or(JsonError::Invalid)?;
        self.i += 2;
        let ch: char = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                let code = if (0xD800..0xDC00).contains(&hi) {
                    // A surrogate pair must follow.
                    if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                        return Err(JsonError::Invalid);
                    }
                    self.i += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(JsonError::Invalid);
                    }
                    0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
                } else if (0xDC00..0xE000).contains(&hi) {
                    return Err(JsonError::Invalid);
                } else {
                    u32::from(hi)
                };
                char::from_u32(code).ok_or(JsonError::Invalid)?
            }
            _ => return Err(JsonError::Invalid),
        };
        if let Some(out) = out {
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        }
        Ok(())
    }
}

/// Where the run of plain string bytes at the start of `rest` ends (at a quote or a
/// backslash); a control byte before it is an error. Short runs (keys, the text between two
/// escapes) are walked byte by byte, which costs less than setting up a search; long ones
/// are searched.
#[inline]
fn span_end(rest: &[u8]) -> Result<usize, JsonError> {
    walked_span_end::<16>(rest)
}

/// [`span_end`], walking the first `SHORT` bytes before it searches.
#[inline]
fn walked_span_end<const SHORT: usize>(rest: &[u8]) -> Result<usize, JsonError> {
    for (k, &c) in rest.iter().take(SHORT).enumerate() {
        if c == b'"' || c == b'\\' {
            return Ok(k);
        }
        if c < 0x20 {
            return Err(JsonError::Invalid);
        }
    }
    if rest.len() <= SHORT {
        return Err(JsonError::Invalid);
    }
    let at = SHORT + memchr::memchr2(b'"', b'\\', &rest[SHORT..]).ok_or(JsonError::Invalid)?;
    if has_control(&rest[SHORT..at]) {
        return Err(JsonError::Invalid);
    }
    Ok(at)
}

/// [`span_end`] for runs that are usually long (string values): searched at once.
#[inline]
fn long_span_end(rest: &[u8]) -> Result<usize, JsonError> {
    let at = memchr::memchr2(b'"', b'\\', rest).ok_or(JsonError::Invalid)?;
    if has_control(&rest[..at]) {
        return Err(JsonError::Invalid);
    }
    Ok(at)
}

/// Whether `s` holds a byte below 0x20 (not allowed raw inside a JSON string).
#[inline]
fn has_control(s: &[u8]) -> bool {
    // A branch-free fold the compiler vectorises.
    s.iter().fold(false, |acc, &c| acc | (c < 0x20))
}

/// What to change in a JSON body, by position, keeping every other byte as it was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonEdit<'f> {
    /// Set `stream_options.include_usage` to `true`.
    pub include_usage: bool,
    /// Set every output cap the body has to this; if it has none, add one under the field
    /// name given.
    pub max_output: Option<(u64, &'f str)>,
}

/// One change to a body: at this position, insert these bytes in place of that many.
type Splice = (usize, Cow<'static, [u8]>, usize);

/// `body` (the body `fields` was scanned from) with `edit` applied; `None` if nothing changes.
pub fn edit_json(body: &[u8], fields: &JsonFields<'_>, edit: JsonEdit<'_>) -> Option<Vec<u8>> {
    apply(body, &fields.edits, edit)
}

pub(crate) fn apply(body: &[u8], e: &Edits, edit: JsonEdit<'_>) -> Option<Vec<u8>> {
    let mut ops: SmallVec<[Splice; 4]> = SmallVec::new();
    let mut appended: Vec<u8> = Vec::new();
    if edit.include_usage && !e.usage_on {
        match (&e.stream_options, &e.include_usage_at) {
            (Some(_), Some(at)) => {
                ops.push((at.start, Cow::Borrowed(b"true"), at.end - at.start));
            }
            (Some((open, empty)), None) => {
                let text: &'static [u8] = if *empty {
                    b"\"include_usage\":true"
                } else {
                    b"\"include_usage\":true,"
                };
                ops.push((open + 1, Cow::Borrowed(text), 0));
            }
            (None, _) => appended.extend_from_slice(b"\"stream_options\":{\"include_usage\":true}"),
        }
    }
    if let Some((to, name)) = edit.max_output {
        let value = to.to_string().into_bytes();
        if e.max_output_at.is_empty() {
            if !appended.is_empty() {
                appended.push(b',');
            }
            appended.push(b'"');
            appended.extend_from_slice(name.as_bytes());
            appended.extend_from_slice(b"\":");
            appended.extend_from_slice(&value);
        } else {
            for at in &e.max_output_at {
                ops.push((at.start, Cow::Owned(value.clone()), at.end - at.start));
            }
        }
    }
    if !appended.is_empty() {
        if !e.empty {
            appended.insert(0, b',');
        }
        ops.push((e.close, Cow::Owned(appended), 0));
    }
    if ops.is_empty() {
        return None;
    }
    ops.sort_by_key(|op| op.0);
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (pos, text, skip) in ops {
        out.extend_from_slice(&body[at..pos]);
        out.extend_from_slice(&text);
        at = pos + skip;
    }
    out.extend_from_slice(&body[at..]);
    Some(out)
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
