//! Finds the `model` field of a `multipart/form-data` body (RFC 7578), strictly.

use memchr::memmem;

/// Why the form's model could not be read unambiguously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FormError {
    /// Malformed multipart body or content type.
    Invalid,
    /// Two `model` fields, or one named like `model` apart from case, or an encoded name.
    AmbiguousModel,
    /// The `model` field is not UTF-8 text.
    ModelNotText,
}

/// The boundary of a `multipart/form-data` content type.
pub(crate) fn boundary(content_type: &str) -> Option<&str> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let mut found = None;
    for param in params.split(';') {
        let (k, v) = param.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            if found.is_some() {
                return None;
            }
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            found = Some(v);
        }
    }
    found.filter(|b| !b.is_empty() && b.len() <= 70)
}

/// One part of a form: its name, whether parsers may disagree on it as a text field, and its
/// contents.
pub(crate) struct Part<'a> {
    pub(crate) name: &'a str,
    pub(crate) unusual: bool,
    pub(crate) content: &'a [u8],
}

/// The parts of the form `body` with `boundary`, strictly delimited.
pub(crate) fn parts<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, FormError> {
    let dash = format!("--{boundary}");
    let delim = format!("\r\n--{boundary}");
    if !body.starts_with(dash.as_bytes()) {
        return Err(FormError::Invalid);
    }
    let finder = memmem::Finder::new(delim.as_bytes());
    let mut pos = dash.len();
    let mut out = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            // Close delimiter; an epilogue after it is ignored by every parser.
            return Ok(out);
        }
        if !rest.starts_with(b"\r\n") {
            return Err(FormError::Invalid);
        }
        pos += 2;
        let head_end = memmem::find(&body[pos..], b"\r\n\r\n").ok_or(FormError::Invalid)?;
        let headers = &body[pos..pos + head_end];
        let content_start = pos + head_end + 4;
        let content_len = finder
            .find(&body[content_start..])
            .ok_or(FormError::Invalid)?;
        let content = &body[content_start..content_start + content_len];
        pos = content_start + content_len + delim.len();
        let head = part_head(headers)?;
        out.push(Part {
            name: head.name,
            unusual: head.unusual,
            content,
        });
    }
}

/// The text field `field` of a form's parts, if present: exactly one part of that name (no
/// case variant), a plain text part.
pub(crate) fn text_field<'a>(
    parts: &[Part<'a>],
    field: &str,
) -> Result<Option<&'a str>, FormError> {
    let mut found = None;
    for part in parts {
        if part.name.eq_ignore_ascii_case(field) {
            if part.name != field || found.is_some() || part.unusual {
                return Err(FormError::AmbiguousModel);
            }
            found = Some(std::str::from_utf8(part.content).map_err(|_| FormError::ModelNotText)?);
        }
    }
    Ok(found)
}

/// The value of the `model` field of the form `body` with `boundary`, if present.
#[cfg(test)]
pub(crate) fn find_model<'a>(
    body: &'a [u8],
    boundary: &str,
) -> Result<Option<std::borrow::Cow<'a, str>>, FormError> {
    let parts = parts(body, boundary)?;
    Ok(text_field(&parts, "model")?.map(std::borrow::Cow::Borrowed))
}

/// What matters of a part's headers.
struct PartHead<'a> {
    /// The `name` of `Content-Disposition: form-data; name="..."`.
    name: &'a str,
    /// A file name, a transfer encoding, or a content type other than plain UTF-8 text:
    /// parsers disagree on whether (and how) such a part is a text field.
    unusual: bool,
}

fn part_head(headers: &[u8]) -> Result<PartHead<'_>, FormError> {
    let headers = std::str::from_utf8(headers).map_err(|_| FormError::Invalid)?;
    let mut name = None;
    let mut unusual = false;
    for line in headers.split("\r\n") {
        let (k, v) = line.split_once(':').ok_or(FormError::Invalid)?;
        let k = k.trim();
        if k.eq_ignore_ascii_case("content-transfer-encoding") {
            unusual = true;
            continue;
        }
        if k.eq_ignore_ascii_case("content-type") {
            let v = v.trim().to_ascii_lowercase();
            unusual |= !(v == "text/plain"
                || v == "text/plain; charset=utf-8"
                || v == "text/plain;charset=utf-8");
            continue;
        }
        if !k.eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        if name.is_some() {
            return Err(FormError::AmbiguousModel);
        }
        let mut params = v.split(';');
        if !params
            .next()
            .is_some_and(|d| d.trim().eq_ignore_ascii_case("form-data"))
        {
            return Err(FormError::Invalid);
        }
        for p in params {
            let (pk, pv) = p.trim().split_once('=').ok_or(FormError::Invalid)?;
            let pk = pk.trim();
            if pk.eq_ignore_ascii_case("name*") {
                // RFC 5987 encoded names are read by some parsers only.
                return Err(FormError::AmbiguousModel);
            }
            if pk.eq_ignore_ascii_case("filename") || pk.eq_ignore_ascii_case("filename*") {
                unusual = true;
            }
            if pk.eq_ignore_ascii_case("name") {
                if name.is_some() {
                    return Err(FormError::AmbiguousModel);
                }
                let pv = pv.trim();
                let unquoted = pv
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(pv);
                if unquoted.contains(['\\', '"', '%']) {
                    return Err(FormError::AmbiguousModel);
                }
                name = Some(unquoted);
            }
        }
        if name.is_none() {
            return Err(FormError::Invalid);
        }
    }
    Ok(PartHead {
        name: name.ok_or(FormError::Invalid)?,
        unusual,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn form(parts: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (headers, body) in parts {
            out.extend_from_slice(format!("--XyZ\r\n{headers}\r\n\r\n{body}\r\n").as_bytes());
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn boundary_is_read_from_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=XyZ"), Some("XyZ"));
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
        assert_eq!(
            boundary("multipart/form-data; boundary=a; boundary=b"),
            None
        );
    }

    #[test]
    fn finds_the_model_field_among_files() {
        let body = form(&[
            (
                "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav",
                "RIFF\r\n--Xy not a boundary",
            ),
            (
                "Content-Disposition: form-data; name=\"model\"",
                "whisper-1",
            ),
        ]);
        assert_eq!(
            find_model(&body, "XyZ"),
            Ok(Some(Cow::Borrowed("whisper-1")))
        );
    }

    #[test]
    fn two_model_fields_are_ambiguous() {
        let body = form(&[
            ("Content-Disposition: form-data; name=\"model\"", "a"),
            ("Content-Disposition: form-data; name=model", "b"),
        ]);
        assert_eq!(find_model(&body, "XyZ"), Err(FormError::AmbiguousModel));
    }

    #[test]
    fn case_variant_or_encoded_names_are_ambiguous() {
        let body = form(&[("Content-Disposition: form-data; name=\"Model\"", "a")]);
        assert_eq!(find_model(&body, "XyZ"), Err(FormError::AmbiguousModel));
        let body = form(&[("Content-Disposition: form-data; name*=utf-8''model", "a")]);
        assert_eq!(find_model(&body, "XyZ"), Err(FormError::AmbiguousModel));
    }

    #[test]
    fn model_parts_that_parsers_read_differently_are_ambiguous() {
        for headers in [
            "Content-Disposition: form-data; name=\"model\"; filename=\"m.txt\"",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain; charset=utf-16",
        ] {
            let body = form(&[(headers, "whisper-1")]);
            assert_eq!(
                find_model(&body, "XyZ"),
                Err(FormError::AmbiguousModel),
                "{headers}"
            );
        }
        let body = form(&[(
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain",
            "w",
        )]);
        assert_eq!(find_model(&body, "XyZ"), Ok(Some(Cow::Borrowed("w"))));
    }

    #[test]
    fn malformed_forms_are_invalid() {
        assert_eq!(find_model(b"garbage", "XyZ"), Err(FormError::Invalid));
        assert_eq!(
            find_model(
                b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nabc",
                "XyZ"
            ),
            Err(FormError::Invalid)
        );
    }
}
