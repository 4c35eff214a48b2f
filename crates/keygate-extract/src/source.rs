//! Where a credential may come from, and finding exactly one in a request.

use std::fmt;

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};
use percent_encoding::percent_decode_str;

/// A place in a request that may carry the credential.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialSource {
    /// `Authorization: Bearer <credential>`. Any other scheme in `Authorization` counts as a
    /// malformed credential (401), never as "no credential".
    Bearer,
    /// A header whose whole value is the credential (`x-api-key`, `api-key`).
    Header(HeaderName),
}

impl CredentialSource {
    /// A header whose whole value is the credential.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid, lowercase header name (it is a `'static` literal: a typo is
    /// a programming error, found by the first test).
    pub fn header(name: &'static str) -> Self {
        CredentialSource::Header(HeaderName::from_static(name))
    }

    /// The default sources: `Authorization: Bearer`, `x-api-key`, `api-key` (OpenAI, Anthropic
    /// and Azure OpenAI clients).
    pub fn defaults() -> [CredentialSource; 3] {
        [
            CredentialSource::Bearer,
            CredentialSource::header("x-api-key"),
            CredentialSource::header("api-key"),
        ]
    }

    /// The header this source reads.
    pub fn header_name(&self) -> &HeaderName {
        match self {
            CredentialSource::Bearer => &AUTHORIZATION,
            CredentialSource::Header(name) => name,
        }
    }
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Bearer => f.write_str("Authorization: Bearer"),
            CredentialSource::Header(name) => write!(f, "{name}"),
        }
    }
}

/// Why a [`KeyExtractLayer`](crate::KeyExtractLayer) configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No credential source: every request would be refused.
    #[error("at least one credential source is required")]
    NoSources,
    /// The same header is listed twice.
    #[error("credential source {0:?} is listed twice")]
    DuplicateSource(String),
    /// `Authorization` given as a plain header: its value is `<scheme> <credential>`, so use
    /// [`CredentialSource::Bearer`].
    #[error("use CredentialSource::Bearer for the Authorization header")]
    AuthorizationAsHeader,
}

/// Checks a list of sources.
pub(crate) fn validate_sources(
    sources: impl IntoIterator<Item = CredentialSource>,
) -> Result<Vec<CredentialSource>, ConfigError> {
    let mut out: Vec<CredentialSource> = Vec::new();
    for source in sources {
        if matches!(&source, CredentialSource::Header(n) if n == AUTHORIZATION) {
            return Err(ConfigError::AuthorizationAsHeader);
        }
        if out.iter().any(|s| s.header_name() == source.header_name()) {
            return Err(ConfigError::DuplicateSource(
                source.header_name().as_str().to_owned(),
            ));
        }
        out.push(source);
    }
    if out.is_empty() {
        return Err(ConfigError::NoSources);
    }
    Ok(out)
}

/// What the credential sources of a request hold.
#[derive(PartialEq, Eq)]
pub(crate) enum Found<'a> {
    /// Nothing (an empty header counts as absent).
    Nothing,
    /// One credential, possibly repeated with the same value.
    One(&'a str),
    /// Two different credentials.
    Conflict,
    /// A value that cannot be a credential (not visible ASCII, inner whitespace, a scheme
    /// other than Bearer, `Bearer` with nothing after it).
    Malformed,
}

// Deliberately no Debug: a `Found` holds the presented credential.

/// Finds the request's credential in `sources`.
pub(crate) fn find_credential<'a>(
    headers: &'a HeaderMap,
    sources: &[CredentialSource],
) -> Found<'a> {
    let mut found: Option<&'a str> = None;
    let mut malformed = false;
    for source in sources {
        let bearer = matches!(source, CredentialSource::Bearer);
        for value in headers.get_all(source.header_name()) {
            let Ok(text) = value.to_str() else {
                malformed = true;
                continue;
            };
            let text = text.trim_matches([' ', '\t']);
            if text.is_empty() {
                continue;
            }
            let credential = if bearer {
                bearer_token(text)
            } else {
                Some(text)
            };
            match credential {
                Some(c) if !c.contains([' ', '\t']) => match found {
                    None => found = Some(c),
                    Some(f) if f == c => {}
                    Some(_) => return Found::Conflict,
                },
                _ => malformed = true,
            }
        }
    }
    match found {
        _ if malformed => Found::Malformed,
        Some(c) => Found::One(c),
        None => Found::Nothing,
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 9110), or `None`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches([' ', '\t']);
    (!token.is_empty()).then_some(token)
}

/// Query parameter names that only ever carry credentials.
const QUERY_NAMES: &[&str] = &[
    "api_key",
    "api-key",
    "apikey",
    "x-api-key",
    "access_token",
    "auth_token",
];
/// Generic names that carry a credential only if the value looks like one.
const QUERY_NAMES_GENERIC: &[&str] = &["key", "token"];

/// Whether the query string carries something that is, or looks like, a credential.
pub(crate) fn query_has_credential(
    query: &str,
    looks_like_credential: impl Fn(&str) -> bool,
) -> bool {
    query.split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if value.is_empty() {
            return false;
        }
        let name = percent_decode_str(name).decode_utf8_lossy();
        let is = |list: &[&str]| list.iter().any(|n| n.eq_ignore_ascii_case(&name));
        if is(QUERY_NAMES) {
            return true;
        }
        is(QUERY_NAMES_GENERIC)
            && looks_like_credential(&percent_decode_str(value).decode_utf8_lossy())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        h
    }

    fn find(pairs: &[(&'static str, &[u8])]) -> Found<'static> {
        let h: &'static HeaderMap = Box::leak(Box::new(headers(pairs)));
        find_credential(h, &CredentialSource::defaults())
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_allows_extra_spaces() {
        assert!(find(&[("authorization", b"Bearer abc")]) == Found::One("abc"));
        assert!(find(&[("authorization", b"bearer   abc")]) == Found::One("abc"));
        assert!(find(&[("authorization", b"BEARER abc")]) == Found::One("abc"));
    }

    #[test]
    fn other_authorization_schemes_are_malformed() {
        assert!(find(&[("authorization", b"Basic YTpi")]) == Found::Malformed);
        assert!(find(&[("authorization", b"Bearer")]) == Found::Malformed);
        assert!(find(&[("authorization", b"Bearerabc")]) == Found::Malformed);
        assert!(find(&[("authorization", b"Bearer a b")]) == Found::Malformed);
    }

    #[test]
    fn non_ascii_and_inner_whitespace_are_malformed() {
        assert!(find(&[("x-api-key", b"k\xffey")]) == Found::Malformed);
        assert!(find(&[("x-api-key", b"a b")]) == Found::Malformed);
    }

    #[test]
    fn empty_headers_count_as_absent() {
        assert!(find(&[("x-api-key", b"")]) == Found::Nothing);
        assert!(find(&[]) == Found::Nothing);
        assert!(find(&[("x-api-key", b""), ("api-key", b"k")]) == Found::One("k"));
    }

    #[test]
    fn same_value_in_several_sources_is_one_credential() {
        let f = find(&[
            ("authorization", b"Bearer k"),
            ("x-api-key", b"k"),
            ("api-key", b"k"),
            ("api-key", b"k"),
        ]);
        assert!(f == Found::One("k"));
    }

    #[test]
    fn different_values_conflict_across_sources_and_within_one() {
        assert!(find(&[("authorization", b"Bearer a"), ("x-api-key", b"b")]) == Found::Conflict);
        assert!(find(&[("x-api-key", b"a"), ("x-api-key", b"b")]) == Found::Conflict);
        assert!(
            find(&[
                ("authorization", b"Bearer a"),
                ("authorization", b"Bearer b")
            ]) == Found::Conflict
        );
    }

    #[test]
    fn unlisted_headers_are_ignored() {
        let h = headers(&[("x-api-key", b"k")]);
        assert!(find_credential(&h, &[CredentialSource::Bearer]) == Found::Nothing);
    }

    #[test]
    fn source_lists_are_validated() {
        assert_eq!(validate_sources([]), Err(ConfigError::NoSources));
        assert_eq!(
            validate_sources([CredentialSource::header("authorization")]),
            Err(ConfigError::AuthorizationAsHeader)
        );
        assert_eq!(
            validate_sources([
                CredentialSource::header("x-key"),
                CredentialSource::header("x-key")
            ]),
            Err(ConfigError::DuplicateSource("x-key".into()))
        );
        assert_eq!(
            validate_sources(CredentialSource::defaults())
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn query_credentials_are_recognised_by_name_or_shape() {
        let sk = |v: &str| v.starts_with("sk-kg-");
        assert!(query_has_credential("api_key=x", sk));
        assert!(query_has_credential("a=1&API-KEY=x", sk));
        assert!(query_has_credential("api%5Fkey=x", sk));
        assert!(query_has_credential("access_token=x", sk));
        assert!(query_has_credential("key=sk-kg-abc", sk));
        assert!(query_has_credential("token=sk%2Dkg-abc", sk));
        assert!(!query_has_credential("key=bucket/object", sk));
        assert!(!query_has_credential("api_key=", sk));
        assert!(!query_has_credential("limit=10&order=desc", sk));
    }
}
