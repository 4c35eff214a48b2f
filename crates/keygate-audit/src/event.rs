//! The audit record: one [`RequestEvent`] per request, and alerts.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method};
use keygate_core::{
    Alert, Cut, EndpointGroup, KeyId, Money, SecretScanner, Stage, Timestamp, Usage, UsageSource,
};
use serde::{Serialize, Serializer};

/// One audit record: the outcome of a request, or an alert a layer raised.
///
/// Serialized (JSON Lines sink) with a `"type"` tag: `"request"` or `"alert"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
// Requests are nearly all events: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum AuditEvent {
    /// What became of one request.
    Request(RequestEvent),
    /// An alert (a key suspended for a spend spike).
    Alert(Alert),
}

impl AuditEvent {
    /// The request event, if this is one.
    pub fn as_request(&self) -> Option<&RequestEvent> {
        match self {
            AuditEvent::Request(r) => Some(r),
            AuditEvent::Alert(_) => None,
        }
    }

    /// The alert, if this is one.
    pub fn as_alert(&self) -> Option<&Alert> {
        match self {
            AuditEvent::Alert(a) => Some(a),
            AuditEvent::Request(_) => None,
        }
    }
}

/// What became of one request: who, what, the decision, timings and usage.
///
/// Holds no secret: credential headers are never read, keys appear only by id and name, the
/// request id is never one a client sent that could be a credential, and credential-shaped
/// path segments and model names are redacted.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RequestEvent {
    /// When the request arrived (from the layer's clock).
    pub timestamp: Timestamp,
    /// The request id, also returned in the response's `x-request-id`.
    pub request_id: RequestId,
    /// The HTTP method.
    #[serde(serialize_with = "ser_method")]
    pub method: Method,
    /// The request path, without the query string, with every segment that could be a
    /// credential replaced by `[redacted]` ([`SecretScanner::redact_path`]).
    ///
    /// [`SecretScanner::redact_path`]: keygate_core::SecretScanner::redact_path
    pub path: String,
    /// The caller's key id, once the extraction layer knew it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
    /// The caller's key name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// The caller's project id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The client address, when a layer decided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// The endpoint group the request matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_group: Option<EndpointGroup>,
    /// The model the request asked for; `[redacted]` if the name could be a credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<Arc<str>>,
    /// Allowed, or denied by which layer and why.
    #[serde(flatten)]
    pub decision: Decision,
    /// The response status; `None` when no response was produced.
    pub status: Option<u16>,
    /// How the exchange ended.
    pub completion: Completion,
    /// Time from arrival to the response head.
    #[serde(rename = "time_to_head_us", serialize_with = "ser_opt_micros")]
    pub time_to_head: Option<Duration>,
    /// Time from arrival to the end of the response body (or to the point it was abandoned).
    #[serde(rename = "duration_us", serialize_with = "ser_micros")]
    pub duration: Duration,
    /// Tokens used, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Cost in dollars, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<Money>,
    /// Whether the usage was reported (by the upstream or the handler) or estimated (the
    /// reservation was charged), when a limit layer settled one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_source: Option<UsageSource>,
    /// The upstream reported more than keygate reserved for the request's worst case (it was
    /// charged what it reported).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub over_reservation: bool,
    /// Why keygate cut the request short (an upstream timeout, or the server's shutdown), if
    /// it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<Cut>,
}

/// Whether a request went through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Decision {
    /// No keygate layer refused it (the inner service may still have failed).
    Allowed,
    /// A keygate layer refused it.
    Denied {
        /// The layer that refused.
        stage: Stage,
        /// The machine-readable reason (`invalid_api_key`, `model_not_allowed`, ...).
        reason: String,
        /// The internal detail (which check failed), never sent to the client.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<&'static str>,
    },
    /// No response came back (the request was cancelled before its head, or the inner service
    /// failed), so no decision is known.
    Unknown,
}

impl Decision {
    /// `"allowed"` or `"denied"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied { .. } => "denied",
            Decision::Unknown => "unknown",
        }
    }

    /// Whether the request was allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed)
    }
}

/// How a request's exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Completion {
    /// The response body was sent to its end.
    Complete,
    /// The response body failed part way.
    BodyError,
    /// The response body was dropped before its end (the client went away).
    Aborted,
    /// The inner service returned an error instead of a response.
    Failed,
    /// The request was dropped before a response head (the client went away).
    Cancelled,
}

impl Completion {
    /// The name used in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Complete => "complete",
            Completion::BodyError => "body_error",
            Completion::Aborted => "aborted",
            Completion::Failed => "failed",
            Completion::Cancelled => "cancelled",
        }
    }
}

fn ser_method<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ser_micros<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(micros(*d))
}

fn ser_opt_micros<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(micros(*d)),
        None => s.serialize_none(),
    }
}

/// The longest `x-request-id` taken from a request.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A request id: taken from a valid incoming `x-request-id` that cannot be a credential, or
/// made up.
///
/// Always visible ASCII (`!`..=`~`), 1 to [`MAX_REQUEST_ID_LEN`] bytes, so it cannot break a log
/// line or a header. Put in request extensions by the audit layer. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// Takes an incoming header value if it is a valid request id and cannot be a credential
    /// by the default shapes and prefixes ([`SecretScanner::new`]).
    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        static DEFAULT: SecretScanner = SecretScanner::new();
        Self::from_header_with(value, &DEFAULT)
    }

    /// Takes an incoming header value if it is a valid request id and `scanner` says it cannot
    /// be a credential.
    pub fn from_header_with(value: &HeaderValue, scanner: &SecretScanner) -> Option<Self> {
        let bytes = value.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
        if !valid {
            return None;
        }
        // Visible ASCII, so the conversion cannot fail.
        let text = std::str::from_utf8(bytes).ok()?;
        (!scanner.could_be_secret(text)).then(|| RequestId(value.clone()))
    }

    /// A fresh id: a per-process random prefix and a counter (`kg3fz0q8m2c1x-1f`).
    ///
    /// One allocation, shared by every clone (request header, response header, extension and
    /// event all point at it).
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut id = IdBuf {
            buf: [0; ID_MAX_LEN],
            len: 0,
        };
        id.buf[..PREFIX_LEN].copy_from_slice(process_prefix());
        id.buf[PREFIX_LEN] = b'-';
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
            id.buf[PREFIX_LEN + 1 + i] = b"0123456789abcdef"[nibble as usize];
        }
        id.len = (PREFIX_LEN + 1 + digits) as u8;
        // `from_owner` puts the buffer and its reference count in one allocation, so clones
        // never copy or allocate (a `Vec`-backed `Bytes` allocates again on its first clone).
        // Only base32 letters, digits and '-': always a valid header value.
        RequestId(
            HeaderValue::from_maybe_shared(Bytes::from_owner(id))
                .unwrap_or_else(|_| HeaderValue::from_static("kg-invalid")),
        )
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        // Checked visible ASCII on construction.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or("")
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

const PREFIX_LEN: usize = 12;
/// Prefix, `-`, and up to 16 hex digits of the counter.
const ID_MAX_LEN: usize = PREFIX_LEN + 1 + 16;

/// A generated id, formatted on the stack and handed whole to [`Bytes::from_owner`].
struct IdBuf {
    buf: [u8; ID_MAX_LEN],
    len: u8,
}

impl AsRef<[u8]> for IdBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

fn process_prefix() -> &'static [u8; PREFIX_LEN] {
    static PREFIX: OnceLock<[u8; PREFIX_LEN]> = OnceLock::new();
    PREFIX.get_or_init(|| {
        const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
        let mut random = [0u8; PREFIX_LEN];
        if getrandom::fill(&mut random).is_err() {
            // No OS randomness: fall back to time and process id; ids stay unique per process.
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ u64::from(std::process::id()).rotate_left(32);
            for (i, b) in random.iter_mut().enumerate() {
                *b = (seed >> ((i % 8) * 8)) as u8 ^ (i as u8).wrapping_mul(37);
            }
        }
        let mut out = [0u8; PREFIX_LEN];
        out[0] = b'k';
        for (o, r) in out.iter_mut().zip(random.iter()).skip(1) {
            *o = ALPHABET[usize::from(*r) % 32];
        }
        out
    })
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for RequestId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_visible_ascii() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with('k'));
        assert!(a.as_str().len() > PREFIX_LEN + 1);
        assert!(RequestId::from_header(a.header_value()).is_some());
        assert_eq!(&a.as_str()[..PREFIX_LEN], &b.as_str()[..PREFIX_LEN]);
    }

    #[test]
    fn incoming_ids_must_be_short_visible_ascii() {
        let ok = HeaderValue::from_static("req-123_abc");
        assert_eq!(RequestId::from_header(&ok).unwrap().as_str(), "req-123_abc");
        assert!(RequestId::from_header(&HeaderValue::from_static("")).is_none());
        assert!(RequestId::from_header(&HeaderValue::from_static("a b")).is_none());
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(RequestId::from_header(&HeaderValue::from_str(&long).unwrap()).is_none());
        let max = "x".repeat(MAX_REQUEST_ID_LEN);
        assert!(RequestId::from_header(&HeaderValue::from_str(&max).unwrap()).is_some());
        let utf8 = HeaderValue::from_bytes("é".as_bytes()).unwrap();
        assert!(RequestId::from_header(&utf8).is_none());
    }

    #[test]
    fn denied_decision_serializes_flat_with_stage_and_reason() {
        let d = Decision::Denied {
            stage: Stage::Scope,
            reason: "model_not_allowed".into(),
            detail: Some("key_rules"),
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["decision"], "denied");
        assert_eq!(v["stage"], "scope");
        assert_eq!(v["reason"], "model_not_allowed");
        assert_eq!(v["detail"], "key_rules");
    }
}
