//! [`Decompression`]: reading the model from a compressed request body (feature
//! `decompression`).

use std::io::{self, Read};

/// A content coding ([RFC 9110 §8.4.1]) the scope layer can decode to find the model.
///
/// [RFC 9110 §8.4.1]: https://www.rfc-editor.org/rfc/rfc9110#section-8.4.1
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ContentCoding {
    /// `gzip` (also sent as `x-gzip`): one gzip member ([RFC 1952]).
    ///
    /// [RFC 1952]: https://www.rfc-editor.org/rfc/rfc1952
    Gzip,
    /// `deflate`: a zlib stream ([RFC 1950]), as HTTP defines it. Raw deflate data without
    /// the zlib wrapper (sent by some old clients) is refused as corrupt.
    ///
    /// [RFC 1950]: https://www.rfc-editor.org/rfc/rfc1950
    Deflate,
}

impl ContentCoding {
    /// The coding's name in `Content-Encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentCoding::Gzip => "gzip",
            ContentCoding::Deflate => "deflate",
        }
    }

    /// The coding named by one `Content-Encoding` token (case-insensitive).
    pub(crate) fn from_token(token: &[u8]) -> Option<Self> {
        if token.eq_ignore_ascii_case(b"gzip") || token.eq_ignore_ascii_case(b"x-gzip") {
            Some(ContentCoding::Gzip)
        } else if token.eq_ignore_ascii_case(b"deflate") {
            Some(ContentCoding::Deflate)
        } else {
            None
        }
    }
}

impl std::fmt::Display for ContentCoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn all_codings() -> Vec<ContentCoding> {
    vec![ContentCoding::Gzip, ContentCoding::Deflate]
}

/// Lets the scope layer read the model from compressed request bodies; see
/// [`ScopeLayer::with_decompression`](crate::ScopeLayer::with_decompression).
///
/// The compressed body is read under the layer's body limit, decoded into a buffer that
/// stops at [`max_decompressed`](Self::max_decompressed) bytes (413 past it), searched for
/// the model, and then dropped: the inner service gets the compressed bytes as sent, with
/// `Content-Encoding` untouched.
///
/// As config (a table of [`ScopeConfig`](crate::ScopeConfig)):
///
/// ```toml
/// [decompression]
/// encodings = ["gzip", "deflate"]  # default: both
/// max_decompressed = 8388608       # bytes; default: the body limit
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Decompression {
    /// The codings accepted; any other is refused with 415.
    #[serde(default = "all_codings")]
    pub encodings: Vec<ContentCoding>,
    /// The most bytes a body may decode to; `None` means the layer's body limit.
    #[serde(default)]
    pub max_decompressed: Option<usize>,
}

impl Default for Decompression {
    fn default() -> Self {
        Decompression::new()
    }
}

impl Decompression {
    /// Accepts `gzip` and `deflate`, decoding up to the layer's body limit.
    pub fn new() -> Self {
        Decompression {
            encodings: all_codings(),
            max_decompressed: None,
        }
    }

    /// Accepts only these codings.
    pub fn only(codings: impl IntoIterator<Item = ContentCoding>) -> Self {
        Decompression {
            encodings: codings.into_iter().collect(),
            max_decompressed: None,
        }
    }

    /// The most bytes a body may decode to (default: the layer's body limit); a body that
    /// decodes to more is refused with 413 once the limit is reached.
    #[must_use]
    pub fn with_max_decompressed(mut self, bytes: usize) -> Self {
        self.max_decompressed = Some(bytes);
        self
    }

    /// Whether `coding` is accepted.
    pub fn accepts(&self, coding: ContentCoding) -> bool {
        self.encodings.contains(&coding)
    }
}

/// Why a compressed body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// It decodes to more than the cap.
    TooLarge,
    /// It is not valid data of its coding, is truncated, or has bytes after its end.
    Corrupt,
}

/// Decodes `input` into `out` (cleared first), never letting `out` hold or reserve more than
/// `cap + 1` bytes: one byte past the cap is how a body over it is told from one exactly at it.
pub(crate) fn decode(
    coding: ContentCoding,
    input: &[u8],
    cap: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    out.clear();
    // `&[u8]` is a `BufRead` the decoders consume exactly as far as their stream goes, so
    // what is left afterwards is data past the end: refused, as a reader that stops at the
    // end and one that goes on (a second gzip member) would read different bodies.
    let rest = match coding {
        ContentCoding::Gzip => {
            let mut d = flate2::bufread::GzDecoder::new(input);
            read_capped(&mut d, cap, out)?;
            d.into_inner()
        }
        ContentCoding::Deflate => {
            let mut d = flate2::bufread::ZlibDecoder::new(input);
            read_capped(&mut d, cap, out)?;
            d.into_inner()
        }
    };
    if rest.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Corrupt)
    }
}

/// Smallest step by which the output grows.
const STEP: usize = 16 * 1024;

fn read_capped(reader: &mut impl Read, cap: usize, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let limit = cap.saturating_add(1);
    let mut len = 0;
    loop {
        if len == out.len() {
            if len >= limit {
                break;
            }
            // Double, but never past the limit: the buffer's capacity stays within it.
            let grow = len.max(STEP).min(limit - len);
            out.reserve_exact(grow);
            out.resize(len + grow, 0);
        }
        match reader.read(&mut out[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                out.truncate(len);
                return Err(DecodeError::Corrupt);
            }
        }
    }
    out.truncate(len);
    if len > cap {
        Err(DecodeError::TooLarge)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::{GzEncoder, ZlibEncoder};

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `n` zero bytes, gzipped without ever holding them.
    fn zeros_gzip(n: usize) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        let chunk = [0u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            e.write_all(&chunk[..k]).unwrap();
            left -= k;
        }
        e.finish().unwrap()
    }

    #[test]
    fn gzip_and_deflate_decode_exactly() {
        let data = b"{\"model\":\"gpt-4o-mini\"}".repeat(1000);
        let mut out = Vec::new();
        decode(ContentCoding::Gzip, &gzip(&data), usize::MAX, &mut out).unwrap();
        assert_eq!(out, data);
        decode(ContentCoding::Deflate, &zlib(&data), usize::MAX, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn a_body_exactly_at_the_cap_decodes_and_one_byte_more_does_not() {
        let data = vec![b'a'; 40_000];
        let mut out = Vec::new();
        assert_eq!(
            decode(ContentCoding::Gzip, &gzip(&data), 40_000, &mut out),
            Ok(())
        );
        assert_eq!(out.len(), 40_000);
        assert_eq!(
            decode(ContentCoding::Gzip, &gzip(&data), 39_999, &mut out),
            Err(DecodeError::TooLarge)
        );
    }

    #[test]
    fn bomb_stops_at_the_cap_without_allocating_past_it() {
        let bomb = zeros_gzip(10 * 1024 * 1024);
        assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
        let cap = 1024 * 1024;
        let mut out = Vec::new();
        assert_eq!(
            decode(ContentCoding::Gzip, &bomb, cap, &mut out),
            Err(DecodeError::TooLarge)
        );
        assert!(out.capacity() <= cap + 1, "capacity {}", out.capacity());
    }

    #[test]
    fn corrupt_truncated_and_trailing_data_are_corrupt() {
        let good = gzip(b"{\"model\":\"m\"}");
        let mut out = Vec::new();
        let mut flipped = good.clone();
        flipped[12] ^= 0xff;
        let truncated = &good[..good.len() - 3];
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"x");
        let mut two_members = good.clone();
        two_members.extend_from_slice(&gzip(b"{\"model\":\"n\"}"));
        for bad in [
            &b"not gzip"[..],
            &b""[..],
            &flipped,
            truncated,
            &trailing,
            &two_members,
        ] {
            assert_eq!(
                decode(ContentCoding::Gzip, bad, usize::MAX, &mut out),
                Err(DecodeError::Corrupt),
                "{bad:?}"
            );
        }
        let mut zl = zlib(b"{}");
        zl.push(0);
        assert_eq!(
            decode(ContentCoding::Deflate, &zl, usize::MAX, &mut out),
            Err(DecodeError::Corrupt)
        );
    }

    #[test]
    fn raw_deflate_without_zlib_wrapper_is_corrupt() {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(b"{\"model\":\"m\"}").unwrap();
        let raw = e.finish().unwrap();
        assert_eq!(
            decode(ContentCoding::Deflate, &raw, usize::MAX, &mut Vec::new()),
            Err(DecodeError::Corrupt)
        );
    }

    #[test]
    fn content_coding_tokens_are_case_insensitive() {
        assert_eq!(
            ContentCoding::from_token(b"GZip"),
            Some(ContentCoding::Gzip)
        );
        assert_eq!(
            ContentCoding::from_token(b"x-gzip"),
            Some(ContentCoding::Gzip)
        );
        assert_eq!(
            ContentCoding::from_token(b"Deflate"),
            Some(ContentCoding::Deflate)
        );
        assert_eq!(ContentCoding::from_token(b"br"), None);
    }
}
