//! The one JSON scanner: validates a request body as strictly as `serde_json` does, in one
//! pass and in time linear in its length, and picks up the few top-level fields accounting
//! needs (with their byte positions, so a field can be set without re-encoding the body).
//!
//! No tree is built. Nested values are walked in a loop, one bit per open level (only an
//! array of object ids is read by a call of its own). Keys are looked at a word at a time;
//! string values sixteen bytes at a time (SSE2 masks on x86-64, through `safe_arch`), the
//! escapes in a block taken without looking at it again, and runs longer than a block
//! searched with `memchr`; a top-level member `,"key":digits` is read from one block; runs of
//! brackets are taken a word at a time. The whole body is looked at once beforehand, for
//! bytes that are not ASCII (then checked as UTF-8) or below 0x20. Only the keys of the objects whose fields are read (the top level and
//! `stream_options`) are decoded, and a field read that appears twice is refused (as the
//! scanner and an upstream parser could take different ones); other duplicate keys are
//! passed on, since nothing keygate decides depends on them. So a body of many keys, escaped
//! or not, costs what its bytes cost (a property test holds the bytes looked at to a
//! multiple of the body's length, counted under `cargo test`).

use std::borrow::Cow;
use std::ops::Range;

use smallvec::SmallVec;

/// A byte of ones in each lane of a word, and the high bit of each lane.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// What the scanner looks at, counted under `cargo test`: every primitive adds the bytes it
/// read (a search, the bytes up to where it stopped), so a test can hold the cost of a body
/// to a multiple of its length without timing anything. Nothing is counted otherwise.
#[cfg(test)]
pub(crate) mod cost {
    use std::cell::Cell;

    thread_local! {
        static LOOKED: Cell<u64> = const { Cell::new(0) };
    }

    /// Counts `n` bytes looked at.
    pub(crate) fn add(n: usize) {
        LOOKED.with(|c| c.set(c.get() + n as u64));
    }

    /// What was counted on this thread since the last call.
    pub(crate) fn take() -> u64 {
        LOOKED.with(|c| c.replace(0))
    }
}

#[cfg(not(test))]
mod cost {
    #[inline(always)]
    pub(crate) fn add(_: usize) {}
}

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
    BadField(JsonField),
    /// More than [`MAX_REFS`] values naming objects (`file_id`, `file_ids`, …).
    #[error("the body names too many objects")]
    TooManyRefs,
}

/// A field keygate reads, as an error names it (its `param`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JsonField {
    /// `model`.
    Model,
    /// An output cap: `max_tokens`, `max_completion_tokens` or `max_output_tokens`.
    MaxTokens,
    /// `n`.
    N,
    /// `best_of`.
    BestOf,
    /// `stream`.
    Stream,
    /// `stream_options`.
    StreamOptions,
    /// `stream_options.include_usage`.
    IncludeUsage,
    /// `store`.
    Store,
}

impl JsonField {
    /// The field's name, as the API spells it (`stream_options.include_usage` for the
    /// nested one; `max_tokens` for any output cap).
    pub fn name(self) -> &'static str {
        match self {
            JsonField::Model => "model",
            JsonField::MaxTokens => "max_tokens",
            JsonField::N => "n",
            JsonField::BestOf => "best_of",
            JsonField::Stream => "stream",
            JsonField::StreamOptions => "stream_options",
            JsonField::IncludeUsage => "stream_options.include_usage",
            JsonField::Store => "store",
        }
    }
}

impl std::fmt::Display for JsonField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
        cost::add(1);
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

/// The first letters of the names in [`REF_KEYS`].
static REF_FIRST: [bool; 256] = {
    let mut t = [false; 256];
    let mut k = 0;
    while k < REF_KEYS.len() {
        t[REF_KEYS[k].as_bytes()[0] as usize] = true;
        k += 1;
    }
    t
};

/// Whether `raw`, a key as written (its escapes validated), can be a name in [`REF_KEYS`],
/// by its first character alone (decoded when written `\u00XX`): most keys are ruled out
/// before anything is decoded.
#[inline(always)]
fn may_name_objects(raw: &[u8]) -> bool {
    let first = match *raw {
        [b'\\', b'u', b'0', b'0', hi, lo, ..] => match (nibble(hi), nibble(lo)) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return false,
        },
        [b'\\', ..] | [] => return false,
        [c, ..] => c,
    };
    REF_FIRST[usize::from(first)]
}

/// The value of a hexadecimal digit.
#[inline]
fn nibble(d: u8) -> Option<u8> {
    Some(HEX[usize::from(d)]).filter(|&v| v < 16)
}

/// The name in [`REF_KEYS`] that `key` (decoded) is.
#[inline]
fn ref_key(key: &[u8]) -> Option<&'static str> {
    // Most keys are ruled out by their length alone.
    cost::add(1);
    if !matches!(key.len(), 7 | 8 | 12 | 13 | 15 | 16 | 20) {
        return None;
    }
    cost::add(REF_KEYS.len());
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
            JsonError::BadField(JsonField::Model) => (
                "invalid_model",
                "The model must be a string.",
                Some("model"),
            ),
            JsonError::BadField(field) => (
                "invalid_value",
                "A field of the request has a value of the wrong type or range.",
                Some(field.name()),
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
    // Most bodies are ASCII, which needs no UTF-8 check; only a body with a byte below 0x20
    // needs the control checks of long string runs.
    cost::add(body.len());
    let (any, least) = byte_range(body);
    if any >= 0x80 {
        cost::add(body.len());
        std::str::from_utf8(body).map_err(|_| JsonError::NotUtf8)?;
    }
    let mut s = Scanner {
        b: body,
        i: 0,
        f: JsonFields::default(),
        collect,
        refs: true,
        escaped: false,
        controls: least < 0x20,
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

/// All the bytes of `body` or-ed together (`0x80` or more: not ASCII) and the least of
/// them (below `0x20`: a control byte somewhere), in one pass the compiler vectorises.
fn byte_range(body: &[u8]) -> (u8, u8) {
    body.iter()
        .fold((0, u8::MAX), |(any, least), &c| (any | c, least.min(c)))
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
        cost::add(self.seen.len() + 1);
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

/// The names of the top-level fields read (those [`field`] tells apart).
const READ_FIELDS: [&str; 13] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "purpose",
    "size",
    "quality",
    "metadata",
    "store",
];

/// For each first byte, the lengths (bit `len`) of the top-level keys starting with it that
/// can matter: a field read, a key naming objects, or `model` in any case (refused unless
/// written as `model`). Any other key is told to be none of them by one lookup, without
/// being compared with a name.
static MATTERS: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut k = 0;
    while k < READ_FIELDS.len() + REF_KEYS.len() {
        let name = if k < READ_FIELDS.len() {
            READ_FIELDS[k].as_bytes()
        } else {
            REF_KEYS[k - READ_FIELDS.len()].as_bytes()
        };
        t[name[0] as usize] |= 1 << name.len();
        k += 1;
    }
    // `Model`, `MODEL`, … (the other letters' case does not change the first byte).
    t[b'M' as usize] |= 1 << 5;
    t
};

/// Whether `key` (decoded) can be a field read, a key naming objects, or `model` in another
/// case; when not, it is [`Field::Other`] and needs no comparison with a name.
#[inline(always)]
fn may_matter(key: &[u8]) -> bool {
    match key.first() {
        Some(&c) => key.len() < 32 && MATTERS[usize::from(c)] >> key.len() & 1 == 1,
        None => false,
    }
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
    /// Whether the body has a byte below 0x20 anywhere (whitespace included): only then
    /// can a string hold one, and long runs are checked for them.
    controls: bool,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        cost::add(1);
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    #[inline(always)]
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
    #[inline(always)]
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
            let key = self.top_key()?.filter(|key| may_matter(key));
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
                        return Err(JsonError::BadField(JsonField::Model));
                    }
                    self.f.model = Some(self.string()?);
                }
                Field::MaxOutput => {
                    if let Some(v) = self.count_or_null(JsonField::MaxTokens, 0)? {
                        self.f.max_output = Some(self.f.max_output.map_or(v, |m| m.max(v)));
                    }
                    self.f.edits.max_output_at.push(start..self.i);
                }
                Field::N => self.f.n = self.count_or_null(JsonField::N, 1)?,
                Field::BestOf => self.f.best_of = self.count_or_null(JsonField::BestOf, 1)?,
                Field::Stream => {
                    self.f.stream = self.bool_or_null(JsonField::Stream)? == Some(true);
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
                Field::Store => self.f.store = self.bool_or_null(JsonField::Store)?,
                Field::Metadata => {
                    self.refs = false;
                    let read = self.value(1);
                    self.refs = true;
                    read?;
                }
                Field::Purpose | Field::Size | Field::Quality | Field::Other => self.value(1)?,
            }
            self.other_members()?;
            if !self.more(b'}')? {
                self.f.edits.close = self.i - 1;
                return Ok(());
            }
        }
    }

    /// After a top-level member: the members after it that are written compactly
    /// (`,"key":value`), with a short plain key naming no field read and a number or a
    /// string as value, taken in one tight loop, so that a body of many keys costs what its
    /// bytes cost rather than a round of the general loop per member. Stops at the comma of
    /// the first member unlike that, which the loop in [`top`](Self::top) reads.
    #[inline(always)]
    fn other_members(&mut self) -> Result<(), JsonError> {
        let b = self.b;
        loop {
            let i = self.i;
            if let Some(end) = block_member(b, i) {
                cost::add(end - i + 1);
                self.f.numbers += 1;
                self.i = end;
                continue;
            }
            if b.get(i) != Some(&b',') || b.get(i + 1) != Some(&b'"') {
                return Ok(());
            }
            let Some(at) = plain_short(&b[i + 2..]) else {
                return Ok(());
            };
            if may_matter(&b[i + 2..i + 2 + at]) {
                return Ok(());
            }
            let value = i + 2 + at + 2;
            if b.get(value - 1) != Some(&b':') {
                return Ok(());
            }
            if !self.compact_value(value)? {
                return Ok(());
            }
        }
    }

    /// The value at `value` of a member taken by a compact loop: a number or a string, read
    /// and counted; `false`, nothing read, for any other value.
    #[inline(always)]
    fn compact_value(&mut self, value: usize) -> Result<bool, JsonError> {
        match self.b.get(value) {
            Some(b'-' | b'0'..=b'9') => {
                self.i = value;
                self.f.numbers += 1;
                self.number()?;
            }
            Some(b'"') => {
                self.i = value;
                self.text_string()?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `stream_options`: null or an object, of which `include_usage` is read.
    fn stream_options(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'n') => return self.literal(b"null"),
            Some(b'{') => {}
            _ => {
                self.value(1)?;
                return Err(JsonError::BadField(JsonField::StreamOptions));
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
                include = self.bool_or_null(JsonField::IncludeUsage)?;
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
    fn count_or_null(&mut self, name: JsonField, min: u64) -> Result<Option<u64>, JsonError> {
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

    fn bool_or_null(&mut self, name: JsonField) -> Result<Option<bool>, JsonError> {
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
    #[inline]
    fn value(&mut self, depth: u32) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'{' | b'[') => self.nested(depth),
            _ => self.scalar(),
        }
    }

    /// A string, number or literal, counted towards the prompt size.
    #[inline(always)]
    fn scalar(&mut self) -> Result<(), JsonError> {
        match self.peek().ok_or(JsonError::Invalid)? {
            b'"' => self.text_string(),
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

    /// An object or an array (at its opening bracket) inside one at nesting `depth`, with
    /// everything in it, walked without recursion: bit `k` of `objects` tells whether the
    /// level `k` below the innermost open one is an object (at most [`MAX_DEPTH`] levels,
    /// so 128 bits hold them all).
    fn nested(&mut self, depth: u32) -> Result<(), JsonError> {
        let mut objects: u128 = 0;
        let mut open: u32 = 0;
        loop {
            // At a value, whitespace skipped. `true`: a value was read whole.
            let done = match self.peek() {
                Some(c @ (b'{' | b'[')) => {
                    let object = c == b'{';
                    // A run of `[` is opened at once (up to eight, all arrays).
                    let run = if object {
                        1
                    } else {
                        run_of(self.b, self.i, b'[')
                    };
                    let level = depth + open + run;
                    if level >= MAX_DEPTH {
                        return Err(JsonError::Invalid);
                    }
                    if object && level >= 2 {
                        self.f.items += 1;
                    }
                    objects = objects << run | u128::from(object);
                    open += run;
                    self.i += run as usize;
                    self.ws();
                    if self.peek() == Some(if object { b'}' } else { b']' }) {
                        self.i += 1;
                        objects >>= 1;
                        open -= 1;
                        true
                    } else {
                        object && self.member(level)?
                    }
                }
                _ => {
                    self.scalar()?;
                    true
                }
            };
            if !done {
                continue;
            }
            // After a value: a comma and the next one, or the end of its container.
            loop {
                if open == 0 {
                    return Ok(());
                }
                let object = objects & 1 == 1;
                if object {
                    self.compact_members()?;
                }
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        self.ws();
                        if !object {
                            break;
                        }
                        if self.member(depth + open)? {
                            continue;
                        }
                        // A member's scalar value is read here, and what follows it next:
                        // a body of many members costs no round of the outer loop each.
                        if !matches!(self.peek(), Some(b'{' | b'[')) {
                            self.scalar()?;
                            continue;
                        }
                        break;
                    }
                    Some(b'}') if object => {
                        self.i += 1;
                        objects >>= 1;
                        open -= 1;
                    }
                    Some(b']') if !object => {
                        // A run of `]` closes as many arrays at once as are open on top.
                        let run = run_of(self.b, self.i, b']')
                            .min(open)
                            .min(objects.trailing_zeros());
                        self.i += run as usize;
                        objects >>= run;
                        open -= run;
                    }
                    _ => return Err(JsonError::Invalid),
                }
            }
        }
    }

    /// In a nested object, after a value: the members after it that are written compactly
    /// (`,"key":value`), with a short key (plain, or with escapes) that
    /// cannot name objects and a number or a string as value, taken in one loop that keeps
    /// its place in a local. A body of many such members costs what its bytes cost rather
    /// than a round of [`nested`](Self::nested) and its checks per member. Stops at the comma
    /// of the first member unlike that, which `nested` reads; refuses what `nested` would
    /// refuse at the same place (a bad escape in a key).
    #[inline(always)]
    fn compact_members(&mut self) -> Result<(), JsonError> {
        let b = self.b;
        loop {
            let i = self.i;
            if b.get(i) != Some(&b',') || b.get(i + 1) != Some(&b'"') {
                return Ok(());
            }
            let start = i + 2;
            // The key's first character, decoded at once when written `\u00XX` (such an
            // escape is whole and valid once its two digits are): whether the key may name
            // objects is told from it (as `may_name_objects` tells).
            let (first, mut end) = match b.get(start..start + 6) {
                Some(&[b'\\', b'u', b'0', b'0', hi, lo]) => match (nibble(hi), nibble(lo)) {
                    (Some(hi), Some(lo)) => (hi << 4 | lo, start + 6),
                    // A bad escape: refused by the general loop.
                    _ => return Ok(()),
                },
                Some(&[c, ..]) => (c, start),
                _ => return Ok(()),
            };
            // The key's runs and escapes, each run looked at a word at a time.
            loop {
                match short_run(&b[end..]) {
                    Run::Quote(at) => {
                        end += at;
                        break;
                    }
                    Run::Special(at) if b[end + at] == b'\\' => {
                        // Validated as everywhere else (an error is the general loop's too).
                        self.i = end + at;
                        let escape = self.skip_escape();
                        end = std::mem::replace(&mut self.i, i);
                        escape?;
                    }
                    // A control byte (refused by `nested`), or a long key.
                    Run::Special(_) | Run::Long => return Ok(()),
                }
            }
            // `first` is a backslash for a key starting with another escape, and the quote
            // for an empty key: neither starts a name.
            if b.get(end + 1) != Some(&b':') || (self.refs && REF_FIRST[usize::from(first)]) {
                return Ok(());
            }
            let value = end + 2;
            let number = match b.get(value) {
                Some(b'-' | b'0'..=b'9') => true,
                Some(b'"') => false,
                _ => return Ok(()),
            };
            // The key's text before the value's (the text is noted in body order).
            self.note_text(start..end);
            self.i = value;
            if number {
                self.f.numbers += 1;
                self.number()?;
            } else {
                self.text_string()?;
            }
        }
    }

    /// The key and colon of a member of a nested object at nesting `depth` (at the key's
    /// quote, whitespace skipped), with the whitespace after them. A key of a nested object
    /// is text the model may read: validated and counted, never decoded (nothing read lies
    /// below here but `stream_options`). `true` if the value was read too: that of a key
    /// naming objects.
    #[inline(always)]
    fn member(&mut self, depth: u32) -> Result<bool, JsonError> {
        if self.peek() != Some(b'"') {
            return Err(JsonError::Invalid);
        }
        let at = self.i;
        self.skip_short_string()?;
        let key = at + 1..self.i - 1;
        self.note_text(key.clone());
        let names = if self.refs { self.ref_name(key) } else { None };
        self.expect(b':')?;
        self.ws();
        match names {
            Some(name) => self.ref_value(name, depth).map(|()| true),
            None => Ok(false),
        }
    }

    /// Whether the key at `key` (a nested object's, skipped) names objects ([`REF_KEYS`]);
    /// an escaped one is decoded to tell, without allocating.
    #[inline(always)]
    fn ref_name(&self, key: Range<usize>) -> Option<&'static str> {
        let raw = &self.b[key];
        if !may_name_objects(raw) {
            return None;
        }
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
            Some(b'[') => self.ref_array(depth + 1, name),
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

    /// An array (at its `[`) at nesting `depth`, the value of a key naming objects: its
    /// strings are noted as object ids.
    fn ref_array(&mut self, depth: u32, name: &'static str) -> Result<(), JsonError> {
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
            if self.peek() == Some(b'"') {
                self.ref_string(name)?;
            } else {
                self.value(depth)?;
            }
            if !self.more(b']')? {
                return Ok(());
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), JsonError> {
        cost::add(word.len());
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
    #[inline(always)]
    fn number(&mut self) -> Result<(), JsonError> {
        // The usual integer: digits, then neither a fraction nor an exponent.
        let b = self.b;
        let mut i = self.i + usize::from(b.get(self.i) == Some(&b'-'));
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                i += 1;
                while let Some(b'0'..=b'9') = b.get(i) {
                    i += 1;
                }
            }
            _ => return Err(JsonError::Invalid),
        }
        cost::add(i - self.i + 1);
        if !matches!(b.get(i), Some(b'.' | b'e' | b'E')) && i - self.i <= 300 {
            self.i = i;
            return Ok(());
        }
        self.full_number()
    }

    /// [`number`](Self::number), every form.
    fn full_number(&mut self) -> Result<(), JsonError> {
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
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(JsonError::Invalid);
            }
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            exponent = true;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(JsonError::Invalid);
            }
        }
        let raw = &self.b[start..self.i];
        cost::add(raw.len());
        // A number of up to 308 digits without an exponent always fits (a fraction only
        // makes it smaller): only a longer one, or one with an exponent, is parsed to check.
        if exponent || raw.len() > 300 {
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
            cost::add(range.len());
            let escaped = memchr::memchr(b'\\', &self.b[range.clone()]).is_some();
            self.f.text.push(Span { range, escaped });
        }
    }

    /// Skips a string (at its opening quote), validating its escapes and refusing control
    /// characters; returns its length as written, quotes excluded.
    #[inline(never)]
    fn skip_string(&mut self) -> Result<usize, JsonError> {
        self.skip_string_from::<true>()
    }

    /// [`skip_string`](Self::skip_string) of a string usually short (a key): its first run
    /// looked at a word at a time, not searched.
    #[inline(always)]
    fn skip_short_string(&mut self) -> Result<usize, JsonError> {
        self.skip_string_from::<false>()
    }

    /// Skips a string (at its opening quote); `LONG`: looked at in blocks of sixteen bytes
    /// ([`long_rest`](Self::long_rest)).
    #[inline(always)]
    fn skip_string_from<const LONG: bool>(&mut self) -> Result<usize, JsonError> {
        self.i += 1;
        let start = self.i;
        if LONG {
            self.escaped = self.long_rest()?;
            let len = self.i - start;
            self.i += 1;
            return Ok(len);
        }
        let rest = &self.b[self.i..];
        self.i += match short_run(rest) {
            Run::Quote(at) => {
                self.i += at + 1;
                self.escaped = false;
                return Ok(at);
            }
            Run::Special(at) => plain_up_to(rest, at)?,
            Run::Long => span_end(rest)?,
        };
        self.escaped = self.b[self.i] != b'"';
        loop {
            match self.b.get(self.i) {
                Some(b'"') => {
                    let len = self.i - start;
                    self.i += 1;
                    return Ok(len);
                }
                // Escapes tend to come together: the next one is taken at once.
                Some(b'\\') => self.skip_escape()?,
                // The run after an escape, looked at a word at a time, out of line so that
                // this loop stays small.
                _ => {
                    let rest = &self.b[self.i..];
                    self.i += match short_run(rest) {
                        Run::Quote(at) => at,
                        Run::Special(at) => plain_up_to(rest, at)?,
                        Run::Long => run_after_escape(rest)?,
                    };
                }
            }
        }
    }

    /// The rest of a string usually long (a value), from `self.i` inside it to its closing
    /// quote, where `self.i` is left; `true` if it holds an escape. Validated as everywhere
    /// (its escapes, and with `self.controls` no control byte), sixteen bytes at a time: the
    /// bytes of a block that end a run are found at once ([`run_ends`]), and the escapes
    /// among them taken one after the other without looking at the block again, so text
    /// with a quote every few words costs a block, not a search, per run. Past a plain block
    /// the run is searched instead, which costs less on long text (fewer instructions on
    /// both ordinary and quoting text than searching after two or four blocks).
    #[inline(always)]
    fn long_rest(&mut self) -> Result<bool, JsonError> {
        let b = self.b;
        let controls = self.controls;
        let mut escaped = false;
        loop {
            let base = self.i;
            let Some(block) = b.get(base..).and_then(<[u8]>::first_chunk::<16>) else {
                return self.short_rest(escaped);
            };
            let mut ends = run_ends(block, controls);
            if ends == 0 {
                cost::add(16);
                self.i = base + 16;
                self.i += long_span_end(&b[self.i..], controls)?;
                continue;
            }
            loop {
                let at = base + ends.trailing_zeros() as usize;
                match b[at] {
                    b'"' => {
                        // What was looked at: the block up to where it stopped.
                        cost::add(at - base + 1);
                        self.i = at;
                        return Ok(escaped);
                    }
                    b'\\' => {
                        escaped = true;
                        let mut i = escape_end(b, at)?;
                        // Escapes tend to come together: the next one is taken at once.
                        while b.get(i) == Some(&b'\\') {
                            i = escape_end(b, i)?;
                        }
                        self.i = i;
                        // The bytes the escapes took are not looked at again: what is left
                        // of the block is still known.
                        let past = self.i - base;
                        if past >= 16 {
                            cost::add(16);
                            break;
                        }
                        ends &= u32::MAX << past;
                        if ends == 0 {
                            cost::add(16);
                            self.i = base + 16;
                            break;
                        }
                    }
                    // A control byte.
                    _ => return Err(JsonError::Invalid),
                }
            }
        }
    }

    /// [`long_rest`](Self::long_rest) of the last bytes of the body (fewer than a block),
    /// byte by byte.
    #[cold]
    fn short_rest(&mut self, mut escaped: bool) -> Result<bool, JsonError> {
        loop {
            cost::add(1);
            match self.b.get(self.i) {
                Some(b'"') => return Ok(escaped),
                Some(b'\\') => {
                    escaped = true;
                    self.skip_escape()?;
                }
                Some(&c) if c >= 0x20 => self.i += 1,
                _ => return Err(JsonError::Invalid),
            }
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
    #[inline(always)]
    fn top_key(&mut self) -> Result<Option<Cow<'a, [u8]>>, JsonError> {
        let start = self.i;
        let rest = &self.b[start + 1..];
        // The usual short, plain key: found and taken at once.
        if let Some(at) = plain_short(rest) {
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
            self.escape(&mut out)?;
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

    /// One escape at `self.i` (a backslash), validated ([`escape_end`]), not decoded.
    #[inline(always)]
    fn skip_escape(&mut self) -> Result<(), JsonError> {
        self.i = escape_end(self.b, self.i)?;
        Ok(())
    }

    /// One escape at `self.i` (a backslash), validated as [`skip_escape`](Self::skip_escape)
    /// validates it, and its decoding appended to `out`.
    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), JsonError> {
        let at = self.i;
        self.skip_escape()?;
        let ch = match self.b[at + 1] {
            b'u' => {
                let hi = u32::from(hex4_at(self.b, at + 2)?);
                // Twelve bytes: a surrogate pair, checked by `skip_escape`.
                let code = if self.i - at == 12 {
                    let lo = u32::from(hex4_at(self.b, at + 8)?);
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                char::from_u32(code).ok_or(JsonError::Invalid)?
            }
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            // `"`, `\\` and `/` stand for themselves.
            c => char::from(c),
        };
        out.extend_from_slice(ch.encode_utf8(&mut [0u8; 4]).as_bytes());
        Ok(())
    }
}

/// The bytes that make a two-byte escape after a backslash (`\\"`, `\\n`, …).
static SHORT_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let short = *b"\"\\/bfnrt";
    let mut k = 0;
    while k < short.len() {
        t[short[k] as usize] = true;
        k += 1;
    }
    t
};

/// Where the escape at `at` in `b` (a backslash) ends, validated as JSON has them (a high
/// surrogate only with a low one after it). A free function of positions, so that a run of
/// escapes keeps its place in a register.
#[inline(always)]
fn escape_end(b: &[u8], at: usize) -> Result<usize, JsonError> {
    let c = b.get(at + 1).copied().unwrap_or(0);
    cost::add(2);
    if SHORT_ESCAPE[usize::from(c)] {
        return Ok(at + 2);
    }
    if c != b'u' {
        return Err(JsonError::Invalid);
    }
    let hi = hex4_at(b, at + 2)?;
    cost::add(4);
    if (0xD800..0xE000).contains(&hi) {
        return low_surrogate(b, at + 6, hi);
    }
    Ok(at + 6)
}

/// After `\uD8xx`–`\uDFxx` (`hi`, ending at `at`): a high surrogate must be followed by the
/// escape of a low one, which is taken; a low one alone is an error.
#[cold]
fn low_surrogate(b: &[u8], at: usize, hi: u16) -> Result<usize, JsonError> {
    cost::add(6);
    if hi >= 0xDC00 || b.get(at..at + 2) != Some(b"\\u") {
        return Err(JsonError::Invalid);
    }
    if !(0xDC00..0xE000).contains(&hex4_at(b, at + 2)?) {
        return Err(JsonError::Invalid);
    }
    Ok(at + 6)
}

/// The value of each byte as a hexadecimal digit, or `0xFF`.
static HEX: [u8; 256] = {
    let mut t = [0xFF; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            d @ b'A'..=b'F' => d - b'A' + 10,
            _ => 0xFF,
        };
        c += 1;
    }
    t
};

/// The four hexadecimal digits of `b` from `at`, as a number.
#[inline]
fn hex4_at(b: &[u8], at: usize) -> Result<u16, JsonError> {
    let &[a, b, c, d] = b.get(at..at + 4).ok_or(JsonError::Invalid)? else {
        return Err(JsonError::Invalid);
    };
    // Four lookups, written out (`array::map` was left as a call).
    let (a, b, c, d) = (
        HEX[usize::from(a)],
        HEX[usize::from(b)],
        HEX[usize::from(c)],
        HEX[usize::from(d)],
    );
    if (a | b | c | d) & 0xF0 != 0 {
        return Err(JsonError::Invalid);
    }
    Ok(u16::from(a) << 12 | u16::from(b) << 8 | u16::from(c) << 4 | u16::from(d))
}

/// Where the run of plain string bytes at the start of `rest` ends (at a quote or a
/// backslash); a control byte before it is an error. The first eight bytes are looked at as
/// one word (keys and the text between two escapes are short), then sixteen at a time (a
/// fold the compiler turns into vector compares), then, past a few hundred bytes, the rest
/// is searched.
#[inline(always)]
fn span_end(rest: &[u8]) -> Result<usize, JsonError> {
    /// Past this many bytes, a search costs less than its setting up.
    const SEARCH_FROM: usize = 256;
    let mut k = 0;
    if rest.len() >= 8 {
        let mask = special_bytes(word_at(rest, 0));
        cost::add(8);
        if mask != 0 {
            return plain_up_to(rest, (mask.trailing_zeros() / 8) as usize);
        }
        k = 8;
        while k + 16 <= rest.len() {
            if k >= SEARCH_FROM {
                return long_span_end(&rest[k..], true).map(|at| k + at);
            }
            cost::add(16);
            let chunk = &rest[k..k + 16];
            if chunk.iter().fold(false, |any, &c| any | ends_run(c)) {
                let low = special_bytes(word_at(chunk, 0));
                let at = if low != 0 {
                    low.trailing_zeros() / 8
                } else {
                    8 + special_bytes(word_at(chunk, 8)).trailing_zeros() / 8
                };
                return plain_up_to(rest, k + at as usize);
            }
            k += 16;
        }
    }
    cost::add(rest.len() - k);
    match rest[k..].iter().position(|&c| ends_run(c)) {
        Some(at) => plain_up_to(rest, k + at),
        None => Err(JsonError::Invalid),
    }
}

/// [`span_end`], not inlined: for the run after an escape in a short string (a key).
#[inline(never)]
fn run_after_escape(rest: &[u8]) -> Result<usize, JsonError> {
    span_end(rest)
}

/// Whether `c` ends a run of plain string bytes: a quote, a backslash, or a control byte
/// (which is an error). Branch-free, so that folds over it vectorise.
#[inline(always)]
fn ends_run(c: u8) -> bool {
    (c == b'"') | (c == b'\\') | (c < 0x20)
}

/// `at`, the first byte of `rest` that is not plain string text, if it ends the run (a
/// quote or a backslash) rather than being a control byte.
#[inline]
fn plain_up_to(rest: &[u8], at: usize) -> Result<usize, JsonError> {
    if rest[at] < 0x20 {
        Err(JsonError::Invalid)
    } else {
        Ok(at)
    }
}

/// How many bytes from `at` on are `c`, counting up to eight (at least one: `b[at]` is `c`).
#[inline]
fn run_of(b: &[u8], at: usize, c: u8) -> u32 {
    cost::add(8);
    if at + 8 <= b.len() {
        let other = word_at(b, at) ^ (0x0101_0101_0101_0101 * u64::from(c));
        other.trailing_zeros() / 8
    } else {
        b[at..].iter().take_while(|&&x| x == c).count() as u32
    }
}

/// The eight bytes of `b` from `at`, as one little-endian word.
#[inline]
fn word_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// How a run of plain string bytes at the start of `rest` ends, if it is short: at its
/// closing quote, or at another byte that ends a run (a backslash, or a control byte), within
/// the first 32 bytes. Which byte ends the run is told from the masks, not by reading it
/// again, so the position after a plain string is known as soon as the word is looked at.
#[derive(Clone, Copy)]
enum Run {
    /// The quote closing the string is at this position.
    Quote(usize),
    /// A backslash or a control byte is at this position.
    Special(usize),
    /// Nothing that ends the run in the first 32 bytes, or fewer than eight bytes left.
    Long,
}

#[inline(always)]
fn short_run(rest: &[u8]) -> Run {
    let mut k = 0;
    while k < 32 && k + 8 <= rest.len() {
        let w = word_at(rest, k);
        cost::add(8);
        let quote = w ^ (ONES * u64::from(b'"'));
        let quotes = quote.wrapping_sub(ONES) & !quote & HIGH;
        let all = special_bytes(w);
        if all != 0 {
            let first = all & all.wrapping_neg();
            let at = k + (first.trailing_zeros() / 8) as usize;
            return if first & quotes != 0 {
                Run::Quote(at)
            } else {
                Run::Special(at)
            };
        }
        k += 8;
    }
    Run::Long
}

/// Where the string at the start of `rest` ends, if it is short and plain: its closing
/// quote within the first 32 bytes, with no escape or control byte before it.
#[inline(always)]
fn plain_short(rest: &[u8]) -> Option<usize> {
    match short_run(rest) {
        Run::Quote(at) => Some(at),
        Run::Special(_) | Run::Long => None,
    }
}

/// The high bit of every byte of `w` that is a quote, a backslash or below 0x20, or lies
/// after one: the lowest bit set marks the first such byte (a borrow only carries upwards
/// from a byte that matched).
#[inline]
fn special_bytes(w: u64) -> u64 {
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    (zero(quote) | zero(backslash) | (w.wrapping_sub(ONES * 0x20) & !w)) & HIGH
}

/// [`span_end`] for runs that are usually long (string values): searched at once. Without
/// `controls` (the body has no byte below 0x20 at all), the run is not checked for them.
#[inline]
fn long_span_end(rest: &[u8], controls: bool) -> Result<usize, JsonError> {
    let found = memchr::memchr2(b'"', b'\\', rest);
    // The search, then the check for control bytes.
    cost::add(2 * found.map_or(rest.len(), |at| at + 1));
    let at = found.ok_or(JsonError::Invalid)?;
    if controls && has_control(&rest[..at]) {
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

/// Bit `k` set where byte `k` of `block` ends a run of plain string bytes: a quote, a
/// backslash, or (with `controls`) a byte below 0x20. Four vector compares and a mask on
/// x86-64 (SSE2, which every x86-64 has), two words elsewhere.
#[inline(always)]
fn run_ends(block: &[u8; 16], controls: bool) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use safe_arch::{
            cmp_eq_mask_i8_m128i, load_unaligned_m128i, min_u8_m128i, move_mask_i8_m128i,
            set_splat_i8_m128i,
        };
        let v = load_unaligned_m128i(block);
        let quote = cmp_eq_mask_i8_m128i(v, set_splat_i8_m128i(b'"' as i8));
        let backslash = cmp_eq_mask_i8_m128i(v, set_splat_i8_m128i(b'\\' as i8));
        let mut ends = quote | backslash;
        if controls {
            // `min(c, 0x1F) == c` exactly when `c` is below 0x20 (unsigned).
            ends |= cmp_eq_mask_i8_m128i(min_u8_m128i(v, set_splat_i8_m128i(0x1F)), v);
        }
        move_mask_i8_m128i(ends) as u32
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        run_ends_words(block, controls)
    }
}

/// A top-level member written `,"key":digits` at `i`, read from one block of sixteen bytes
/// when it fits in one: where it ends, if its key is short and plain and names no field
/// read ([`may_matter`]), and its value an integer that ends in the block. The key, the
/// colon and the digits are told from masks of the block, so a body of many such members
/// costs a block per member, not a chain of byte reads. `None` for anything else (other
/// targets too), which [`other_members`](Scanner::other_members) reads as before.
#[inline(always)]
fn block_member(b: &[u8], i: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use safe_arch::{
            cmp_eq_mask_i8_m128i, load_unaligned_m128i, m128i, min_u8_m128i, move_mask_i8_m128i,
            set_splat_i8_m128i, sub_i8_m128i,
        };
        let block = b.get(i..)?.first_chunk::<16>()?;
        // Most calls end here: at the end of the object, or before whitespace.
        if block[..2] != *b",\"" {
            return None;
        }
        let v = load_unaligned_m128i(block);
        let mask = |m: m128i| move_mask_i8_m128i(m) as u32;
        let eq = |c: u8| mask(cmp_eq_mask_i8_m128i(v, set_splat_i8_m128i(c as i8)));
        let quotes = eq(b'"');
        // `min(c, 0x1F) == c`: below 0x20.
        let controls = mask(cmp_eq_mask_i8_m128i(
            min_u8_m128i(v, set_splat_i8_m128i(0x1F)),
            v,
        ));
        // The key ends at the first quote, backslash or control byte after its opening
        // quote, which must be a quote followed by a colon.
        let close = ((quotes | eq(b'\\') | controls) & !3).trailing_zeros();
        if close >= 14 || quotes >> close & 1 == 0 || eq(b':') >> (close + 1) & 1 == 0 {
            return None;
        }
        let close = close as usize;
        if may_matter(&block[2..close]) {
            return None;
        }
        // `min(c - '0', 9) == c - '0'`: a digit.
        let shifted = sub_i8_m128i(v, set_splat_i8_m128i(b'0' as i8));
        let digits = mask(cmp_eq_mask_i8_m128i(
            min_u8_m128i(shifted, set_splat_i8_m128i(9)),
            shifted,
        ));
        let start = close + 2;
        let run = (!(digits >> start)).trailing_zeros() as usize;
        let end = start + run;
        // An integer: at least one digit, no leading zero, and neither a fraction nor an
        // exponent after it (all of which `number` reads, or refuses).
        if run == 0 || end >= 16 || (run > 1 && block[start] == b'0') {
            return None;
        }
        if matches!(block[end], b'.' | b'e' | b'E') {
            return None;
        }
        Some(i + end)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (b, i);
        None
    }
}

/// [`run_ends`] from two words, exactly (every lane on its own, no borrow between lanes).
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
#[inline(always)]
fn run_ends_words(block: &[u8; 16], controls: bool) -> u32 {
    /// The high bit of each lane of `w` that is zero.
    fn zero(w: u64) -> u64 {
        !(((w & !HIGH) + !HIGH) | w) & HIGH
    }
    /// The high bits of the lanes of `m` (only high bits set), as eight bits.
    fn gather(m: u64) -> u32 {
        ((m >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32
    }
    let half = |w: u64| {
        let mut m = zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')));
        if controls {
            // Below 0x20: the high bit clear, and clear still after adding 0x60 to the rest.
            m |= !(((w & !HIGH) + ONES * 0x60) | w) & HIGH;
        }
        gather(m)
    };
    let (lo, hi) = block.split_at(8);
    half(word_at(lo, 0)) | half(word_at(hi, 0)) << 8
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
