//! Telling text that could be a credential from text that cannot, and keeping it out of logs.
//!
//! Clients put secrets where they do not belong: a key pasted as `x-request-id`, into the
//! path, or as a query value. A [`SecretScanner`] says whether a string could be a credential
//! ([`SecretScanner::could_be_secret`]), and replaces credential-shaped path segments and
//! query values with [`REDACTED`] ([`SecretScanner::redact_path`],
//! [`SecretScanner::redact_query`]). It errs towards redacting: a false alarm costs a less
//! informative log line, a miss leaks a secret.
//!
//! Text could be a credential when any of these holds, anywhere in it (also after
//! percent-decoding, up to three times over):
//!
//! - **A keygate key** in any key format: a prefix of key characters followed by
//!   [`RANDOM_LEN`] base62 characters and a matching [`CHECKSUM_LEN`]-character checksum. No
//!   configuration needed, whatever prefix the keys were made with.
//! - **A JWT** (or JWE): `eyJ…` (a base64url JSON object) followed by `.` and at least one more
//!   base64url segment and `.`.
//! - **A known key prefix** at the start of the text or after a character that is not a letter
//!   or digit, followed by at least [`MIN_SECRET_TAIL`] key characters (letters, digits, `-`,
//!   `_`, `.`): the [`DEFAULT_SECRET_PREFIXES`] of common providers, plus any configured with
//!   [`SecretScanner::with_prefix`]. So `sk-proj-…` and `id-sk-proj-…` match, `task-1234abcd`
//!   does not.
//! - **A long random token**: a run of at least [`MIN_RANDOM_RUN`] letters and digits mixing
//!   upper case, lower case and digits. Ids that are one case or hex (UUIDs with or without
//!   dashes, SHA-256 hex, ULIDs, OpenAI's `resp_…`) and shorter base62 ids (`file-…`,
//!   `chatcmpl-…`, `msg_…`, nanoids) do not match; a base62 id of 32 characters or more does.
//!
//! One pass over the text, plus one per percent-decoding round when it holds `%`; nothing is
//! allocated unless it is decoded or something is redacted. A clean path costs about 20
//! instructions a byte (some 400 for `/v1/chat/completions`).
//!
//! Not recognised: secrets with none of these shapes (an AWS secret access key is base64 split
//! by `/` and `+` into short runs; a password). Keep those out of URLs and request ids.
//!
//! ```
//! use keygate_core::{KeyFormat, SecretScanner};
//!
//! let scanner = SecretScanner::new();
//! let key = KeyFormat::with_prefix("acme_")?.generate()?;
//! assert!(scanner.could_be_secret(key.expose()));
//! assert!(scanner.could_be_secret("sk-proj-Abc123def456ghi789"));
//! assert!(!scanner.could_be_secret("550e8400-e29b-41d4-a716-446655440000"));
//!
//! let path = format!("/v1/files/{}/content", key.expose());
//! assert_eq!(scanner.redact_path(&path), "/v1/files/[redacted]/content");
//! assert!(matches!(scanner.redact_path("/v1/models/gpt-4o"), std::borrow::Cow::Borrowed(_)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::key::{CHECKSUM_LEN, KeyFormat, RANDOM_LEN};

/// What replaces a credential-shaped path segment or query value.
pub const REDACTED: &str = "[redacted]";

/// Key characters that must follow a known prefix for the text to count as a credential: a
/// prefix alone (`sk-`), or with a short word after it (`sk-test`), is not a secret.
pub const MIN_SECRET_TAIL: usize = 8;

/// Length of the shortest run of letters and digits that counts as a random token (when it
/// mixes upper case, lower case and digits).
pub const MIN_RANDOM_RUN: usize = 32;

/// Prefixes of common providers' keys and tokens, recognised by [`SecretScanner::new`].
///
/// | prefix | whose |
/// | --- | --- |
/// | `sk-` | OpenAI (`sk-proj-`, `sk-svcacct-`, `sk-admin-`), Anthropic (`sk-ant-`), keygate's default `sk-kg-`, DeepSeek and most OpenAI-compatible providers |
/// | `sk_`, `rk_`, `pk_`, `whsec_` | Stripe secret, restricted, publishable keys and webhook secrets (`sk_` also ElevenLabs) |
/// | `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_` | GitHub tokens |
/// | `glpat-` | GitLab personal access tokens |
/// | `xoxb-`, `xoxp-`, `xoxa-`, `xoxr-`, `xoxs-`, `xapp-` | Slack tokens |
/// | `hf_` | Hugging Face |
/// | `gsk_` | Groq |
/// | `xai-` | xAI |
/// | `pplx-` | Perplexity |
/// | `r8_` | Replicate |
/// | `nvapi-` | NVIDIA |
/// | `AIza` | Google API keys |
/// | `ya29.` | Google OAuth access tokens |
/// | `AKIA`, `ASIA` | AWS access key ids |
pub const DEFAULT_SECRET_PREFIXES: &[&str] = &[
    "sk-",
    "sk_",
    "rk_",
    "pk_",
    "whsec_",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xoxr-",
    "xoxs-",
    "xapp-",
    "hf_",
    "gsk_",
    "xai-",
    "pplx-",
    "r8_",
    "nvapi-",
    "AIza",
    "ya29.",
    "AKIA",
    "ASIA",
];

/// The longest configurable secret prefix, in bytes.
pub const MAX_SECRET_PREFIX_LEN: usize = 32;

/// Percent-decoding rounds tried on text that holds `%` (double and triple encodings).
const DECODE_ROUNDS: usize = 3;

/// Why a secret prefix cannot be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretPrefixError {
    /// The prefix is empty, longer than [`MAX_SECRET_PREFIX_LEN`] bytes, or holds characters
    /// other than ASCII letters, digits, `-`, `_` and `.`.
    #[error(
        "a secret prefix must be 1 to 32 ASCII letters, digits, '-', '_' or '.' (got {len} bytes)"
    )]
    Invalid {
        /// The length of the refused prefix (the prefix itself is not repeated).
        len: usize,
    },
}

/// Recognises credential-shaped text and redacts it; see the [module docs](self) for the shapes.
///
/// Cheap to clone (the configured prefixes are shared). [`SecretScanner::new`] is a `const fn`
/// and allocates nothing; scanning allocates only to percent-decode text that holds `%`, and
/// redacting only when something is redacted.
#[derive(Clone)]
pub struct SecretScanner {
    extra: Option<Arc<[Box<str>]>>,
    /// Bit set of the first bytes of every prefix: most positions are skipped by one test.
    first: [u64; 4],
}

static DEFAULT_SCANNER: SecretScanner = SecretScanner::new();

/// Whether `text` could be a credential, by the default shapes and prefixes
/// ([`SecretScanner::new`]).
pub fn could_be_secret(text: &str) -> bool {
    DEFAULT_SCANNER.could_be_secret(text)
}

/// `path` with every credential-shaped segment replaced by [`REDACTED`], by the default shapes
/// and prefixes ([`SecretScanner::new`]); borrowed when nothing is.
pub fn redact_path(path: &str) -> Cow<'_, str> {
    DEFAULT_SCANNER.redact_path(path)
}

impl Default for SecretScanner {
    fn default() -> Self {
        SecretScanner::new()
    }
}

impl fmt::Debug for SecretScanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretScanner")
            .field("prefixes", &self.prefixes().collect::<Vec<_>>())
            .finish()
    }
}

impl PartialEq for SecretScanner {
    fn eq(&self, other: &Self) -> bool {
        self.prefixes().eq(other.prefixes())
    }
}

impl Eq for SecretScanner {}

const fn first_bytes(prefixes: &[&str]) -> [u64; 4] {
    let mut set = [0u64; 4];
    let mut i = 0;
    while i < prefixes.len() {
        let b = prefixes[i].as_bytes()[0];
        set[(b >> 6) as usize] |= 1 << (b & 63);
        i += 1;
    }
    set
}

fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty() && prefix.len() <= MAX_SECRET_PREFIX_LEN && prefix.bytes().all(is_key_char)
}

impl SecretScanner {
    /// A scanner for the built-in shapes and the [`DEFAULT_SECRET_PREFIXES`].
    pub const fn new() -> Self {
        SecretScanner {
            extra: None,
            first: first_bytes(DEFAULT_SECRET_PREFIXES),
        }
    }

    /// Also treats text carrying `prefix` as a credential (an operator's own key prefix, a
    /// provider missing from the defaults). A prefix that starts with a known one (`sk-acme-`
    /// after `sk-`) is covered already and not added.
    ///
    /// # Errors
    ///
    /// [`SecretPrefixError::Invalid`] for an empty or over-long prefix, or one with characters
    /// other than ASCII letters, digits, `-`, `_` and `.`.
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, SecretPrefixError> {
        if !valid_prefix(prefix) {
            return Err(SecretPrefixError::Invalid { len: prefix.len() });
        }
        self.push(prefix);
        Ok(self)
    }

    /// [`SecretScanner::with_prefix`] for each of `prefixes`.
    ///
    /// # Errors
    ///
    /// The first prefix that is not valid.
    pub fn with_prefixes<I>(mut self, prefixes: I) -> Result<Self, SecretPrefixError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        for p in prefixes {
            self = self.with_prefix(p.as_ref())?;
        }
        Ok(self)
    }

    /// Also treats text carrying `format`'s key prefix as a credential, even when it is not a
    /// whole, valid key (a truncated key, a key with a typo). Cannot fail: every key prefix
    /// is a valid secret prefix.
    pub fn with_key_format(mut self, format: &KeyFormat) -> Self {
        // Key prefixes are 1 to 32 letters, digits, '-' and '_': always valid here.
        if valid_prefix(format.prefix()) {
            self.push(format.prefix());
        }
        self
    }

    fn push(&mut self, prefix: &str) {
        // A prefix that starts with a known one adds nothing: whatever it matches, the
        // shorter one matches too (`sk-kg-` and `sk-`).
        if self.prefixes().any(|p| prefix.starts_with(p)) {
            return;
        }
        let mut all: Vec<Box<str>> = self.extra.as_deref().unwrap_or_default().to_vec();
        all.push(prefix.into());
        self.extra = Some(all.into());
        let b = prefix.as_bytes()[0];
        self.first[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    /// Every prefix this scanner recognises: the defaults, then the configured ones.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        DEFAULT_SECRET_PREFIXES
            .iter()
            .copied()
            .chain(self.extra.iter().flat_map(|e| e.iter().map(|p| &**p)))
    }

    /// Whether `text` could be a credential, or holds one.
    ///
    /// Linear in the length of `text`; allocates only to percent-decode text holding `%`.
    pub fn could_be_secret(&self, text: &str) -> bool {
        let bytes = text.as_bytes();
        match self.scan(bytes) {
            Scan::Secret => return true,
            Scan::Clean { percent: false } => return false,
            Scan::Clean { percent: true } => {}
        }
        let Some(mut decoded) = decode_once(bytes) else {
            return false;
        };
        for round in 1..=DECODE_ROUNDS {
            if self.scan(&decoded) == Scan::Secret {
                return true;
            }
            if round == DECODE_ROUNDS {
                break;
            }
            match decode_once(&decoded) {
                Some(next) => decoded = next,
                None => break,
            }
        }
        false
    }

    /// `path` with every segment that [could be a secret](SecretScanner::could_be_secret)
    /// replaced by [`REDACTED`]; borrowed when no segment is.
    pub fn redact_path<'a>(&self, path: &'a str) -> Cow<'a, str> {
        // `/` ends every shape, so a clean whole has clean segments: one pass when clean.
        if !self.could_be_secret(path) {
            return Cow::Borrowed(path);
        }
        redact_parts(path, b'/', |segment| {
            self.could_be_secret(segment)
                .then_some(Cow::Borrowed(REDACTED))
        })
    }

    /// A query string (without the `?`) with every value that
    /// [could be a secret](SecretScanner::could_be_secret) replaced by [`REDACTED`]
    /// (`key=[redacted]`), and every pair whose name could be one replaced whole; borrowed
    /// when nothing is.
    pub fn redact_query<'a>(&self, query: &'a str) -> Cow<'a, str> {
        // `&` and `=` end every shape, as `/` does in a path.
        if !self.could_be_secret(query) {
            return Cow::Borrowed(query);
        }
        redact_parts(query, b'&', |pair| match pair.split_once('=') {
            Some((name, _)) if self.could_be_secret(name) => Some(Cow::Borrowed(REDACTED)),
            Some((name, value)) if self.could_be_secret(value) => {
                Some(Cow::Owned(format!("{name}={REDACTED}")))
            }
            Some(_) => None,
            None => self
                .could_be_secret(pair)
                .then_some(Cow::Borrowed(REDACTED)),
        })
    }

    /// A request target's path and query (`/v1/files/x?limit=2`), each redacted as by
    /// [`SecretScanner::redact_path`] and [`SecretScanner::redact_query`].
    pub fn redact_path_and_query<'a>(&self, path_and_query: &'a str) -> Cow<'a, str> {
        let Some((path, query)) = path_and_query.split_once('?') else {
            return self.redact_path(path_and_query);
        };
        match (self.redact_path(path), self.redact_query(query)) {
            (Cow::Borrowed(_), Cow::Borrowed(_)) => Cow::Borrowed(path_and_query),
            (p, q) => Cow::Owned(format!("{p}?{q}")),
        }
    }

    /// One pass over raw bytes: prefixes and JWTs at word starts, runs of letters and digits
    /// judged at their end.
    fn scan(&self, b: &[u8]) -> Scan {
        let mut percent = false;
        let mut i = 0;
        // Every `i` at the top of the loop starts a word: the text's start, or just after a
        // byte that is not a letter or digit. Only there can a prefix or a JWT begin.
        while i < b.len() {
            let c = b[i];
            if b.len() - i > MIN_SECRET_TAIL
                && ((self.first[usize::from(c >> 6)] & (1 << (c & 63)) != 0
                    && self.prefix_at(&b[i..]))
                    || (c == b'e' && jwt_at(&b[i..])))
            {
                return Scan::Secret;
            }
            if CLASS[usize::from(c)] != 0 {
                let start = i;
                let mut classes = 0;
                while let Some(&k) = b.get(i).map(|&c| &CLASS[usize::from(c)]) {
                    if k == 0 {
                        break;
                    }
                    classes |= k;
                    i += 1;
                }
                if run_is_secret(b, start, i, classes) {
                    return Scan::Secret;
                }
                // `b[i]`, if any, ends the run: no word starts at it.
                if i == b.len() {
                    break;
                }
            }
            percent |= b[i] == b'%';
            i += 1;
        }
        Scan::Clean { percent }
    }

    fn prefix_at(&self, rest: &[u8]) -> bool {
        let first = usize::from(rest[0]);
        let (from, to) = (
            usize::from(DEFAULT_BY_FIRST.start[first]),
            usize::from(DEFAULT_BY_FIRST.start[first + 1]),
        );
        DEFAULT_BY_FIRST.order[from..to]
            .iter()
            .any(|&k| prefix_matches(DEFAULT_SECRET_PREFIXES[usize::from(k)], rest))
            || self
                .extra
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|p| p.as_bytes()[0] == rest[0] && prefix_matches(p, rest))
    }
}

/// What one pass over raw bytes found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    Secret,
    /// Nothing; `percent` if the text holds a `%` (and may hide something encoded).
    Clean {
        percent: bool,
    },
}

/// The default prefixes grouped by first byte (a counting sort done at compile time), so a
/// word start tries only the few prefixes that begin with its byte.
struct ByFirst {
    /// Indices into [`DEFAULT_SECRET_PREFIXES`], ordered by first byte.
    order: [u8; DEFAULT_SECRET_PREFIXES.len()],
    /// `order[start[b]..start[b + 1]]` are the prefixes beginning with byte `b`.
    start: [u8; 257],
}

static DEFAULT_BY_FIRST: ByFirst = by_first();

const fn by_first() -> ByFirst {
    const N: usize = DEFAULT_SECRET_PREFIXES.len();
    let mut start = [0u8; 257];
    let mut i = 0;
    while i < N {
        start[DEFAULT_SECRET_PREFIXES[i].as_bytes()[0] as usize + 1] += 1;
        i += 1;
    }
    let mut b = 0;
    while b < 256 {
        start[b + 1] += start[b];
        b += 1;
    }
    let mut next = start;
    let mut order = [0u8; N];
    i = 0;
    while i < N {
        let f = DEFAULT_SECRET_PREFIXES[i].as_bytes()[0] as usize;
        order[next[f] as usize] = i as u8;
        next[f] += 1;
        i += 1;
    }
    ByFirst { order, start }
}

/// `b` percent-decoded, if that changes it.
fn decode_once(b: &[u8]) -> Option<Vec<u8>> {
    match Cow::from(percent_encoding::percent_decode(b)) {
        Cow::Borrowed(_) => None,
        Cow::Owned(v) => Some(v),
    }
}

/// Splits `text` on the ASCII byte `sep` and replaces each part `f` gives a replacement for;
/// one pass, no allocation when nothing is replaced.
fn redact_parts<'a>(
    text: &'a str,
    sep: u8,
    f: impl Fn(&'a str) -> Option<Cow<'a, str>>,
) -> Cow<'a, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut done = 0;
    let mut start = 0;
    loop {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == sep)
            .map_or(bytes.len(), |p| start + p);
        // `sep` is ASCII, so both ends are character boundaries.
        if let Some(replacement) = f(&text[start..end]) {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(&text[done..start]);
            out.push_str(&replacement);
            done = end;
        }
        if end == bytes.len() {
            break;
        }
        start = end + 1;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut out) => {
            out.push_str(&text[done..]);
            Cow::Owned(out)
        }
    }
}

/// Whether `rest` starts with `prefix` and then [`MIN_SECRET_TAIL`] key characters. A plain
/// byte loop: prefixes are a few bytes, too short for a `memcmp` call to pay.
#[inline]
fn prefix_matches(prefix: &str, rest: &[u8]) -> bool {
    let p = prefix.as_bytes();
    rest.len() >= p.len() + MIN_SECRET_TAIL
        && p.iter().zip(rest).all(|(a, b)| a == b)
        && rest[p.len()..p.len() + MIN_SECRET_TAIL]
            .iter()
            .all(|&c| is_key_char(c))
}

const UPPER: u8 = 1;
const LOWER: u8 = 2;
const DIGIT: u8 = 4;

/// Each byte's class: [`UPPER`], [`LOWER`], [`DIGIT`], or 0 for anything else.
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = match c as u8 {
            b'A'..=b'Z' => UPPER,
            b'a'..=b'z' => LOWER,
            b'0'..=b'9' => DIGIT,
            _ => 0,
        };
        c += 1;
    }
    table
};

/// Letters, digits, `-`, `_` and `.`: what keys and tokens are spelt with.
fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.'
}

fn is_base64url(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// Whether `b[start..end]`, a maximal run of letters and digits, is a random token or ends a
/// keygate key.
#[inline]
fn run_is_secret(b: &[u8], start: usize, end: usize, classes: u8) -> bool {
    let len = end - start;
    (len >= MIN_RANDOM_RUN && classes == UPPER | LOWER | DIGIT)
        || (len >= RANDOM_LEN + CHECKSUM_LEN && keygate_key_ends_at(b, end))
}

/// Whether a keygate key (any prefix) ends at `end`, where `b[end - 38..end]` is base62. The
/// key starts at the start of its word (letters, digits, `-`, `_`) or just after a `-` or `_`
/// in it, at most 32 bytes before its random part: a few checksums at most.
fn keygate_key_ends_at(b: &[u8], end: usize) -> bool {
    let random_start = end - (RANDOM_LEN + CHECKSUM_LEN);
    let earliest = random_start.saturating_sub(crate::key::MAX_PREFIX_LEN);
    let checksum = &b[end - CHECKSUM_LEN..end];
    // A checksum is a CRC32: most base62 tails decode past `u32::MAX` (their first character
    // is not `0`..`4`), and then no checksum needs computing.
    let Some(expected) = crate::key::decode_base62(checksum).filter(|&v| v <= u64::from(u32::MAX))
    else {
        return false;
    };
    let mut start = random_start;
    // Walk back over the word; try the key starting at each word or `-`/`_` boundary.
    while start > earliest && is_base64url(b[start - 1]) {
        start -= 1;
        let boundary =
            start == 0 || !is_base64url(b[start - 1]) || matches!(b[start - 1], b'-' | b'_');
        if boundary && u64::from(crc32fast::hash(&b[start..end - CHECKSUM_LEN])) == expected {
            return true;
        }
    }
    false
}

/// Whether `b` starts with a JWT: `eyJ`, base64url, `.`, base64url (at least one), `.`.
fn jwt_at(b: &[u8]) -> bool {
    if !b.starts_with(b"eyJ") {
        return false;
    }
    let header = b.iter().take_while(|&&c| is_base64url(c)).count();
    // `{"alg":"none"}` encodes to 19 characters; nothing shorter is a JOSE header.
    if header < 16 || b.get(header) != Some(&b'.') {
        return false;
    }
    let rest = &b[header + 1..];
    let payload = rest.iter().take_while(|&&c| is_base64url(c)).count();
    payload > 0 && rest.get(payload) == Some(&b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const JWT: &str =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJrZXlfYWJjIn0.c2lnbmF0dXJlLWJ5dGVz";

    #[test]
    fn keygate_keys_of_any_prefix_are_secrets() {
        let scanner = SecretScanner::new();
        for prefix in ["sk-kg-", "acme_", "kg", "x", "team-a_live-"] {
            let format = KeyFormat::with_prefix(prefix).unwrap();
            for _ in 0..20 {
                let key = format.generate().unwrap();
                let k = key.expose();
                assert!(scanner.could_be_secret(k), "{k}");
                assert!(scanner.could_be_secret(&format!("req-{k}")), "{k}");
                assert!(scanner.could_be_secret(&format!("a.{k}.b")), "{k}");
            }
        }
    }

    #[test]
    fn keygate_key_is_found_by_its_checksum_alone() {
        // `acme_` is no default prefix and 32 `q`s are no random token: only the checksum
        // tells this key from any other 38 letters.
        let body = format!("acme_{}", "q".repeat(RANDOM_LEN));
        let mut key = body.clone();
        crate::key::push_fixed_base62(
            &mut key,
            u64::from(crc32fast::hash(body.as_bytes())),
            CHECKSUM_LEN,
        );
        assert!(KeyFormat::with_prefix("acme_").unwrap().parse(&key).is_ok());
        assert!(keygate_key_ends_at(key.as_bytes(), key.len()));
        let embedded = format!("trace-{key}");
        assert!(keygate_key_ends_at(embedded.as_bytes(), embedded.len()));
        assert!(SecretScanner::new().could_be_secret(&key));
        assert!(SecretScanner::new().could_be_secret(&embedded));
        let not_a_key = format!("{body}qqqqqq");
        assert!(!SecretScanner::new().could_be_secret(&not_a_key));
    }

    #[test]
    fn mutated_key_is_caught_by_its_prefix_even_with_a_bad_checksum() {
        let scanner = SecretScanner::new();
        let key = KeyFormat::default().generate().unwrap();
        let mut typo = key.expose().as_bytes().to_vec();
        let last = typo.len() - 1;
        typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert!(scanner.could_be_secret(&typo));
        assert!(scanner.could_be_secret(&key.expose()[..20]));
    }

    #[test]
    fn jwts_are_secrets_and_lone_base64_json_is_not() {
        let scanner = SecretScanner::new();
        assert!(scanner.could_be_secret(JWT));
        assert!(scanner.could_be_secret(&format!("id:{JWT}")));
        // Unsigned (`alg: none`) tokens end in an empty signature.
        assert!(scanner.could_be_secret("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."));
        assert!(!scanner.could_be_secret("eyJhbGciOiJub25lIn0"));
        assert!(!scanner.could_be_secret("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0"));
        assert!(!scanner.could_be_secret("eyJ.a.b"));
    }

    #[test]
    fn provider_prefixes_count_at_word_starts_only() {
        let scanner = SecretScanner::new();
        for secret in [
            "sk-proj-AbCdEf123456",
            "sk-ant-api03-abcdefgh",
            "sk_live_12345678",
            "rk_test_abcdefgh",
            "ghp_abcdefgh12345678",
            "github_pat_11ABCDEFG",
            "xoxb-1234-5678-abcd",
            "AKIAIOSFODNN7EXAMPLE",
            "AIzaSyA-abcdefgh",
            "ya29.a0AfH6SMBabc",
            "Bearer+sk-proj-abcdefgh",
            "trace-sk-proj-abcdefgh",
            "x_sk-abcdefgh",
        ] {
            assert!(scanner.could_be_secret(secret), "{secret}");
        }
        for harmless in [
            "task-12345678",
            "risk-assessment-model",
            "desk_12345678",
            "ask_anything_today",
            "sk-short",
            "sk-",
            "gpt-4o-mini",
            "ft:gpt-4o-mini:acme:task-xyz:abc123",
            "whisper-1",
        ] {
            assert!(!scanner.could_be_secret(harmless), "{harmless}");
        }
    }

    #[test]
    fn ordinary_ids_are_not_secrets() {
        let scanner = SecretScanner::new();
        for id in [
            "550e8400-e29b-41d4-a716-446655440000",
            "550e8400e29b41d4a716446655440000",
            "550E8400E29B41D4A716446655440000",
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
            "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            "file-AbCdEf1234567890GhIjKl",
            "msg_01XFDUDYJgAACzvnptvVoYEL",
            "V1StGXR8_Z5jdHi6B-myT",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "Root=1-5759e988-bd862e3fe1be46a994272793",
            "kg3fz0q8m2c1x-1f",
            "req_123",
            "",
        ] {
            assert!(!scanner.could_be_secret(id), "{id}");
        }
    }

    #[test]
    fn long_mixed_case_tokens_are_secrets() {
        let scanner = SecretScanner::new();
        assert!(scanner.could_be_secret("Xy7AbCdEfGhIjKlMnOpQrStUvWxYz012"));
        assert!(!scanner.could_be_secret("Xy7AbCdEfGhIjKlMnOpQrStUvWxYz01"));
        assert!(!scanner.could_be_secret("XYZABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"));
    }

    #[test]
    fn percent_encoding_does_not_hide_a_secret() {
        let scanner = SecretScanner::new();
        assert!(scanner.could_be_secret("sk%2Dproj%2Dabcdefgh1234"));
        assert!(scanner.could_be_secret("sk%252Dproj%252Dabcdefgh1234"));
        assert!(scanner.could_be_secret("Bearer%20sk-proj-abcdefgh1234"));
        let key = KeyFormat::with_prefix("acme_").unwrap().generate().unwrap();
        let encoded: String = key.expose().bytes().map(|b| format!("%{b:02X}")).collect();
        assert!(scanner.could_be_secret(&encoded));
        assert!(!scanner.could_be_secret("caf%C3%A9"));
        assert!(!scanner.could_be_secret("100%"));
    }

    #[test]
    fn configured_prefixes_are_validated_and_recognised() {
        assert!(SecretScanner::new().with_prefix("").is_err());
        assert!(SecretScanner::new().with_prefix("a b").is_err());
        assert!(SecretScanner::new().with_prefix(&"a".repeat(33)).is_err());
        let scanner = SecretScanner::new()
            .with_prefixes(["corp.", "tok_"])
            .unwrap();
        assert!(scanner.could_be_secret("corp.abcdefgh"));
        assert!(scanner.could_be_secret("x-tok_abcdefgh"));
        assert!(!SecretScanner::new().could_be_secret("tok_abcdefgh"));
        assert_eq!(scanner.prefixes().filter(|p| *p == "tok_").count(), 1);
        let again = scanner.clone().with_prefix("tok_").unwrap();
        assert_eq!(again, scanner);
        let covered = scanner.clone().with_prefix("sk-acme-").unwrap();
        assert_eq!(covered, scanner, "`sk-` covers it");
        let with_format =
            SecretScanner::new().with_key_format(&KeyFormat::with_prefix("acme_").unwrap());
        assert!(with_format.could_be_secret("acme_abcdefgh"));
    }

    #[test]
    fn path_segments_are_redacted_and_clean_paths_borrowed() {
        let scanner = SecretScanner::new();
        let key = KeyFormat::default().generate().unwrap();
        let k = key.expose();
        assert!(matches!(
            scanner.redact_path("/v1/chat/completions"),
            Cow::Borrowed("/v1/chat/completions")
        ));
        assert_eq!(
            scanner.redact_path(&format!("/{k}")),
            format!("/{REDACTED}")
        );
        assert_eq!(
            scanner.redact_path(&format!("/v1/{k}/x/{JWT}")),
            format!("/v1/{REDACTED}/x/{REDACTED}")
        );
        assert_eq!(scanner.redact_path(k), REDACTED);
        assert_eq!(scanner.redact_path(""), "");
        assert_eq!(scanner.redact_path("//"), "//");
    }

    #[test]
    fn query_values_and_names_are_redacted() {
        let scanner = SecretScanner::new();
        assert!(matches!(
            scanner.redact_query("limit=2&after=file-abc"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            scanner.redact_query("limit=2&key=sk-proj-abcdefgh1&x"),
            format!("limit=2&key={REDACTED}&x")
        );
        assert_eq!(
            scanner.redact_query("sk-proj-abcdefgh1=1&b"),
            format!("{REDACTED}&b")
        );
        assert_eq!(scanner.redact_query("sk-proj-abcdefgh1"), REDACTED);
        assert_eq!(
            scanner.redact_path_and_query(&format!("/v1/x?token={JWT}")),
            format!("/v1/x?token={REDACTED}")
        );
        assert!(matches!(
            scanner.redact_path_and_query("/v1/models?limit=2"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn default_functions_use_the_default_prefixes() {
        assert!(could_be_secret("sk-proj-abcdefgh"));
        assert_eq!(redact_path("/a/sk-proj-abcdefgh"), format!("/a/{REDACTED}"));
    }

    /// Pieces that are, or are nearly, credential shapes, and the separators around them.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,12}",
            Just("sk-proj-abcdefgh".to_owned()),
            Just("sk-proj".to_owned()),
            Just("%2D".to_owned()),
            Just("%25".to_owned()),
            Just(JWT.to_owned()),
            Just("eyJhbGciOiJub25lIn0.".to_owned()),
            Just("Xy7AbCdEfGhIjKlMnOpQrStU".to_owned()),
            Just("vWxYz012".to_owned()),
            Just("acme_".to_owned()),
            Just(
                KeyFormat::with_prefix("acme_")
                    .unwrap()
                    .generate()
                    .unwrap()
                    .expose()
                    .to_owned()
            ),
            Just("/".to_owned()),
            Just("&".to_owned()),
            Just("=".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn a_clean_whole_has_only_clean_parts(pieces in proptest::collection::vec(piece(), 0..12)) {
            // `redact_path` and `redact_query` skip the split when the whole is clean: that
            // must never skip a part that would be redacted.
            let text = pieces.concat();
            let scanner = SecretScanner::new();
            if !scanner.could_be_secret(&text) {
                for part in text.split(['/', '&', '=']) {
                    prop_assert!(!scanner.could_be_secret(part), "{part} in {text}");
                }
            }
        }

        #[test]
        fn redaction_never_panics_and_leaves_no_flagged_segment(s in "[ -~]{0,200}") {
            let scanner = SecretScanner::new();
            let redacted = scanner.redact_path(&s);
            for segment in redacted.split('/') {
                prop_assert!(segment == REDACTED || !scanner.could_be_secret(segment));
            }
            prop_assert_eq!(redacted.split('/').count(), s.split('/').count());
            let q = scanner.redact_query(&s);
            prop_assert_eq!(q.split('&').count(), s.split('&').count());
        }

        #[test]
        fn a_key_hidden_anywhere_in_a_path_is_redacted(
            before in "[a-z0-9/._-]{0,30}",
            after in "[a-z0-9/._-]{0,30}",
            prefix in "[a-zA-Z][a-zA-Z0-9_-]{0,12}",
        ) {
            let key = KeyFormat::with_prefix(&prefix).unwrap().generate().unwrap();
            let path = format!("/{before}/{}/{after}", key.expose());
            prop_assert!(!SecretScanner::new().redact_path(&path).contains(key.expose()));
        }
    }
}
