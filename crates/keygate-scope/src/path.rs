//! The path check: a path is accepted only when every router and upstream reads it the same.

/// Why a path was refused as ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with '/'")]
    NotAbsolute,
    /// A `\` (raw or percent-encoded).
    #[error("the path contains a backslash")]
    Backslash,
    /// A percent-encoded `/`.
    #[error("the path contains an encoded slash")]
    EncodedSlash,
    /// A percent-encoded character that needs no encoding (`%2e`, `%61`), an encoded `%`, or
    /// an encoded control or non-ASCII byte: each is read differently by different servers.
    #[error("the path contains an ambiguous percent-encoding")]
    EncodedUnreserved,
    /// A `%` not followed by two hex digits.
    #[error("the path contains an invalid percent-encoding")]
    BadPercent,
    /// A `.` or `..` segment (or any segment of dots only).
    #[error("the path contains a dot segment")]
    DotSegment,
    /// An empty segment inside the path (`//`).
    #[error("the path contains an empty segment")]
    EmptySegment,
    /// A `;` (path parameters, read by some servers only).
    #[error("the path contains ';'")]
    Semicolon,
    /// A byte outside printable ASCII.
    #[error("the path contains a byte outside printable ASCII")]
    NonAscii,
}

impl PathError {
    /// A short machine-readable name, for audit details.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "path_not_absolute",
            PathError::Backslash => "path_backslash",
            PathError::EncodedSlash => "path_encoded_slash",
            PathError::EncodedUnreserved => "path_ambiguous_encoding",
            PathError::BadPercent => "path_bad_percent_encoding",
            PathError::DotSegment => "path_dot_segment",
            PathError::EmptySegment => "path_empty_segment",
            PathError::Semicolon => "path_semicolon",
            PathError::NonAscii => "path_non_ascii",
        }
    }
}

#[inline]
fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Checks that `path` (the raw path of the request URI, without the query) is unambiguous.
///
/// Accepted: `/` followed by segments of printable ASCII, where a percent-encoding is allowed
/// only for characters that must be encoded anyway (reserved or unsafe punctuation such as
/// `%20`, `%3A`). A trailing `/` is allowed here (it simply matches no route that lacks it,
/// as in axum). Everything else is an error.
///
/// # Errors
///
/// The first ambiguity found.
pub fn check_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() == Some(&b'/') && only_plain_segments(bytes) {
        return Ok(());
    }
    check_path_slow(bytes)
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The high bit of each byte of `w` that equals `c`, exactly (no borrow between bytes).
#[inline]
fn eq_mask(w: u64, c: u8) -> u64 {
    let x = w ^ (ONES * u64::from(c));
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// Whether `bytes` holds only [`PLAIN`] bytes and `/`, with no `//`: such a path is
/// unambiguous, and this covers nearly every real request eight bytes at a time. Anything
/// else goes to the byte-by-byte check, which names the problem.
#[inline]
fn only_plain_segments(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut prev_slash = false;
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if w & HIGH != 0 {
            return false;
        }
        // With every byte below 0x80, adding cannot carry from one byte into the next.
        let control = !w.wrapping_add(ONES * (0x80 - 0x21)) & HIGH;
        let del = w.wrapping_add(ONES) & HIGH;
        let special = control
            | del
            | eq_mask(w, b'.')
            | eq_mask(w, b'\\')
            | eq_mask(w, b';')
            | eq_mask(w, b'%');
        let slash = eq_mask(w, b'/');
        if special != 0 || slash & (slash >> 8) != 0 || (prev_slash && slash & 0x80 != 0) {
            return false;
        }
        prev_slash = slash >> 63 != 0;
    }
    for &b in chunks.remainder() {
        let is_slash = b == b'/';
        if !(PLAIN[b as usize] || is_slash) || (prev_slash && is_slash) {
            return false;
        }
        prev_slash = is_slash;
    }
    true
}

/// The byte-by-byte check: exact about which ambiguity it found.
fn check_path_slow(bytes: &[u8]) -> Result<(), PathError> {
    let n = bytes.len();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut seg_start = 1;
    let mut only_dots = true;
    let mut i = 1;
    loop {
        let run = i;
        while i < n && PLAIN[bytes[i] as usize] {
            i += 1;
        }
        if i > run {
            only_dots = false;
        }
        if i == n {
            // The end: an empty last segment is a trailing slash (allowed).
            if i > seg_start && only_dots {
                return Err(PathError::DotSegment);
            }
            return Ok(());
        }
        match bytes[i] {
            b'/' => {
                if i == seg_start {
                    return Err(PathError::EmptySegment);
                }
                if only_dots {
                    return Err(PathError::DotSegment);
                }
                i += 1;
                seg_start = i;
                only_dots = true;
            }
            b'.' => i += 1,
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Semicolon),
            b'%' => {
                only_dots = false;
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadPercent);
                };
                match (h << 4) | l {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    c if c.is_ascii_alphanumeric()
                        || matches!(c, b'-' | b'.' | b'_' | b'~' | b'%')
                        || !(0x20..0x7f).contains(&c) =>
                    {
                        return Err(PathError::EncodedUnreserved);
                    }
                    _ => {}
                }
                i += 3;
            }
            _ => return Err(PathError::NonAscii),
        }
    }
}

/// Printable ASCII that needs no further look: not `/`, `.`, `\\`, `;` or `%`.
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = !matches!(b as u8, b'/' | b'.' | b'\\' | b';' | b'%');
        b += 1;
    }
    t
};

/// Percent-decodes a path segment or query value that [`check_path`] (or the query parser)
/// accepted. `None` if the result is not UTF-8.
pub(crate) fn decode(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok()
}

/// The path as a server that normalizes it (RFC 3986 section 6.2.2, plus merged empty
/// segments) would act on it: unreserved characters decoded, other escapes kept (their hex
/// digits decode alike in either case), `.` and `..` segments resolved, empty segments dropped; `None` for a malformed escape. A
/// path [`check_path`] accepts is its own canonical form: the decision made on the raw path is
/// the decision on the path every server acts on. For the property test and the fuzz target.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub fn canonical_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = hex(*bytes.get(i + 1)?)?;
            let l = hex(*bytes.get(i + 2)?)?;
            let c = h << 4 | l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                decoded.push(char::from(c));
            } else {
                // Hex digits of either case decode alike: kept as written.
                decoded.push_str(&path[i..i + 3]);
            }
            i += 3;
        } else {
            let ch = path[i..].chars().next()?;
            decoded.push(ch);
            i += ch.len_utf8();
        }
    }
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') && decoded.len() > 1;
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut canonical = format!("/{}", out.join("/"));
    if trailing && !out.is_empty() {
        canonical.push('/');
    }
    Some(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_pass() {
        for p in [
            "/v1/chat/completions",
            "/v1/models/gpt-4o",
            "/v1/models/ft:gpt-4o:acme:x",
            "/v1/models/",
            "/",
            "/v1/files/a%20b",
            "/a/.b/c..d",
        ] {
            assert_eq!(check_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn encoded_slash_is_rejected_in_any_case() {
        assert_eq!(check_path("/v1/models/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(check_path("/v1/models/a%2Fb"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn backslash_raw_or_encoded_is_rejected() {
        assert_eq!(check_path("/v1\\models"), Err(PathError::Backslash));
        assert_eq!(check_path("/v1/%5cmodels"), Err(PathError::Backslash));
        assert_eq!(check_path("/v1/%5Cmodels"), Err(PathError::Backslash));
    }

    #[test]
    fn encoded_dot_and_unreserved_are_rejected() {
        assert_eq!(
            check_path("/v1/%2e%2e/x"),
            Err(PathError::EncodedUnreserved)
        );
        assert_eq!(check_path("/v1/%2E/x"), Err(PathError::EncodedUnreserved));
        assert_eq!(check_path("/v1/%63hat"), Err(PathError::EncodedUnreserved));
        assert_eq!(check_path("/v1/%252e"), Err(PathError::EncodedUnreserved));
        assert_eq!(check_path("/v1/%00"), Err(PathError::EncodedUnreserved));
        assert_eq!(check_path("/v1/%C3%A9"), Err(PathError::EncodedUnreserved));
    }

    #[test]
    fn dot_segments_are_rejected() {
        assert_eq!(check_path("/v1/../admin"), Err(PathError::DotSegment));
        assert_eq!(check_path("/v1/./models"), Err(PathError::DotSegment));
        assert_eq!(check_path("/v1/models/.."), Err(PathError::DotSegment));
        assert_eq!(check_path("/v1/models/."), Err(PathError::DotSegment));
        assert_eq!(check_path("/v1/.../x"), Err(PathError::DotSegment));
    }

    #[test]
    fn empty_interior_segments_are_rejected() {
        // At every offset, including across the eight-byte words of the fast path.
        for k in 1..20 {
            let p = format!("/{}//{}", "a".repeat(k), "b".repeat(16));
            assert_eq!(check_path(&p), Err(PathError::EmptySegment), "{p}");
        }
        assert_eq!(check_path("//v1/models"), Err(PathError::EmptySegment));
        assert_eq!(check_path("/v1//models"), Err(PathError::EmptySegment));
        assert_eq!(check_path("/v1/models//"), Err(PathError::EmptySegment));
    }

    #[test]
    fn semicolon_and_bad_percent_are_rejected() {
        assert_eq!(check_path("/v1/models;x=1"), Err(PathError::Semicolon));
        assert_eq!(check_path("/v1/a%zz"), Err(PathError::BadPercent));
        assert_eq!(check_path("/v1/a%2"), Err(PathError::BadPercent));
        assert_eq!(check_path("v1/models"), Err(PathError::NotAbsolute));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        #[test]
        fn fast_path_agrees_with_the_byte_by_byte_check(
            plain in proptest::collection::vec(
                proptest::sample::select(vec![
                    "/", "/", "/", "a", "v1", "models", "-", "_", "~", "{", "\"", "abcdefgh",
                    "Zz9", "thread_abc", "x.y", "",
                ]),
                0..16,
            ),
            // At most one fault, anywhere in an otherwise plain path.
            fault in proptest::sample::select(vec![
                "", "/", "//", ".", "..", "/.", "/./", "/../", "\\", ";", "%", "%2f", "%20",
                " ", "\u{7f}", "\u{1}", "\u{e9}",
            ]),
            at in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut parts = plain;
            parts.insert(at.index(parts.len() + 1), fault);
            let path: String = parts.concat();
            proptest::prop_assert_eq!(
                check_path(&path),
                check_path_slow(path.as_bytes()),
                "{:?}", path
            );
        }
    }

    #[test]
    fn long_plain_paths_pass_and_faults_are_found_at_any_offset() {
        let plain = "/v1/threads/thread_abc/runs/run_abc/submit_tool_outputs";
        assert_eq!(check_path(plain), Ok(()));
        for i in 1..plain.len() {
            for (insert, want) in [
                ("/", PathError::EmptySegment),
                (";", PathError::Semicolon),
                ("\\", PathError::Backslash),
                ("\u{7f}", PathError::NonAscii),
            ] {
                let mut p = plain.to_owned();
                p.insert_str(i, insert);
                if insert == "/" && (plain.as_bytes()[i] != b'/' && plain.as_bytes()[i - 1] != b'/')
                {
                    // A new segment boundary, not an empty segment.
                    assert_eq!(check_path(&p), Ok(()), "{p:?}");
                    continue;
                }
                assert_eq!(check_path(&p), Err(want), "{p:?}");
            }
        }
    }

    #[test]
    fn non_ascii_is_rejected() {
        assert_eq!(check_path("/v1/mod\u{e9}ls"), Err(PathError::NonAscii));
        assert_eq!(check_path("/v1/a b"), Err(PathError::NonAscii));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// Raw decision == canonical decision: a path the check accepts is exactly the path
        /// a normalizing server acts on.
        #[test]
        fn an_accepted_path_is_its_own_canonical_form(
            segs in proptest::collection::vec(
                proptest::sample::select(vec![
                    "v1", "models", "a", ".", "..", "", "%2e", "%2E", "%2f", "%41", "%7e",
                    "%zz", "%", "x%20y", "a.b", "~", ";", "\\", "%5c", "é",
                ]),
                0..6,
            ),
            trailing in proptest::prelude::any::<bool>(),
        ) {
            let mut path = format!("/{}", segs.join("/"));
            if trailing {
                path.push('/');
            }
            if check_path(&path).is_ok() {
                let canonical = canonical_path(&path);
                proptest::prop_assert_eq!(canonical.as_deref(), Some(path.as_str()));
            }
        }
    }
}
