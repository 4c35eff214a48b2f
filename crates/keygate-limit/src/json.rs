//! The little JSON the token layer needs: a few top-level fields of a request body (with
//! their positions, to add `stream_options.include_usage` without touching anything else), and
//! the `usage` object of a response or of one SSE event.

use std::ops::Range;

use keygate_core::Usage;
use serde::Deserialize;

/// What the token layer reads from a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestFields {
    pub(crate) model: Option<String>,
    pub(crate) max_output: Option<u64>,
    pub(crate) stream: bool,
    /// `stream_options`: `None` absent; `Some(None)` present without `include_usage`;
    /// `Some(Some(b))` with it.
    pub(crate) include_usage: Option<Option<bool>>,
    /// Where the object's closing `}` is.
    close: usize,
    /// Where the `stream_options` object's opening `{` is.
    stream_options_open: Option<usize>,
    /// The byte ranges of the non-null `max_tokens` / `max_completion_tokens` /
    /// `max_output_tokens` values, in body order.
    pub(crate) max_output_at: Vec<Range<usize>>,
}

/// A body that is not one JSON object, or that repeats a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadJson(pub(crate) &'static str);

/// Reads the top-level fields the layer needs. Duplicate top-level keys are refused: the
/// upstream might read the other copy.
pub(crate) fn request_fields(body: &[u8]) -> Result<RequestFields, BadJson> {
    let mut fields = RequestFields::default();
    let (members, close) = members(body)?;
    let mut seen: Vec<String> = Vec::with_capacity(members.len());
    for (key, value) in members {
        let key = decode_key(&body[key])?;
        if seen.contains(&key) {
            return Err(BadJson("duplicate_key"));
        }
        let raw = &body[value.clone()];
        match key.as_str() {
            "model" => {
                fields.model = Some(serde_json::from_slice(raw).map_err(|_| BadJson("model"))?)
            }
            "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                let v: Option<u64> =
                    serde_json::from_slice(raw).map_err(|_| BadJson("max_tokens"))?;
                if let Some(v) = v {
                    // Several given: the upstream uses one of them; reserve for the largest.
                    fields.max_output = Some(fields.max_output.map_or(v, |m| m.max(v)));
                    fields.max_output_at.push(value.clone());
                }
            }
            "stream" => {
                fields.stream = serde_json::from_slice::<Option<bool>>(raw)
                    .map_err(|_| BadJson("stream"))?
                    == Some(true)
            }
            "stream_options" => {
                #[derive(Deserialize)]
                struct StreamOptions {
                    include_usage: Option<bool>,
                }
                if raw != b"null" {
                    let so: StreamOptions =
                        serde_json::from_slice(raw).map_err(|_| BadJson("stream_options"))?;
                    fields.include_usage = Some(so.include_usage);
                    fields.stream_options_open = Some(value.start);
                }
            }
            _ => {}
        }
        seen.push(key);
    }
    fields.close = close;
    Ok(fields)
}

/// The body with `stream_options.include_usage = true` added, if it is a streaming request
/// that does not say `include_usage` either way. Every other byte stays as it was.
pub(crate) fn with_include_usage(body: &[u8], fields: &RequestFields) -> Option<Vec<u8>> {
    if !fields.stream {
        return None;
    }
    let (at, insert): (usize, &[u8]) = match (fields.include_usage, fields.stream_options_open) {
        (None, _) => (
            fields.close,
            b",\"stream_options\":{\"include_usage\":true}",
        ),
        (Some(None), Some(open)) => {
            let inner = &body[open + 1..];
            let empty = inner
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            if empty {
                (open + 1, b"\"include_usage\":true")
            } else {
                (open + 1, b"\"include_usage\":true,")
            }
        }
        _ => return None,
    };
    let mut out = Vec::with_capacity(body.len() + insert.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&body[at..]);
    Some(out)
}

/// The body with every `max_tokens` / `max_completion_tokens` / `max_output_tokens` value
/// replaced by `to`; every other byte stays as it was.
pub(crate) fn with_max_output(body: &[u8], fields: &RequestFields, to: u64) -> Vec<u8> {
    let value = to.to_string();
    let mut out = Vec::with_capacity(body.len() + 20);
    let mut at = 0;
    for range in &fields.max_output_at {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(value.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

fn decode_key(raw: &[u8]) -> Result<String, BadJson> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(&raw[1..raw.len() - 1])
            .map(str::to_owned)
            .map_err(|_| BadJson("utf8"));
    }
    serde_json::from_slice(raw).map_err(|_| BadJson("key"))
}

type Members = Vec<(Range<usize>, Range<usize>)>;

/// The (key, value) byte ranges of a top-level object's members, and where it closes.
fn members(b: &[u8]) -> Result<(Members, usize), BadJson> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Err(BadJson("not_an_object"));
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b'}') if out.is_empty() => break,
            Some(b'"') => {}
            _ => return Err(BadJson("syntax")),
        }
        let key_end = skip_string(b, i)?;
        let key = i..key_end;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return Err(BadJson("syntax"));
        }
        i = skip_ws(b, i + 1);
        let value_end = skip_value(b, i)?;
        out.push((key, i..value_end));
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => break,
            _ => return Err(BadJson("syntax")),
        }
    }
    let close = i;
    if skip_ws(b, close + 1) != b.len() {
        return Err(BadJson("trailing_data"));
    }
    Ok((out, close))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// `b[i]` is `"`; returns the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Result<usize, BadJson> {
    let mut j = i + 1;
    loop {
        let k = memchr::memchr2(b'"', b'\\', &b[j.min(b.len())..]).ok_or(BadJson("syntax"))?;
        j += k;
        if b[j] == b'\\' {
            j += 2;
        } else {
            return Ok(j + 1);
        }
    }
}

/// Skips one value (validated later by serde when it is one we read; otherwise only its
/// structure matters: strings and brackets).
fn skip_value(b: &[u8], i: usize) -> Result<usize, BadJson> {
    match b.get(i) {
        Some(b'"') => skip_string(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err(BadJson("syntax"))
        }
        Some(_) => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            if j == i {
                Err(BadJson("syntax"))
            } else {
                Ok(j)
            }
        }
        None => Err(BadJson("syntax")),
    }
}

/// The shapes of `usage` across OpenAI APIs.
#[derive(Debug, Deserialize)]
struct UsageShape {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl UsageShape {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let prompt = prompt.unwrap_or(0);
        let completion = completion.unwrap_or(0);
        let mut usage = Usage::new(prompt, completion);
        if let Some(total) = self.total_tokens {
            // Embeddings report only prompt and total; count what is billed.
            usage.total_tokens = total.max(usage.total_tokens);
            if completion == 0 && total > prompt {
                usage.completion_tokens = total - prompt;
            }
        }
        Some(usage)
    }
}

#[derive(Debug, Deserialize)]
struct WithUsage {
    usage: Option<UsageShape>,
    /// Responses API events carry it in `response.usage`.
    response: Option<Box<WithUsage>>,
}

/// The usage in a JSON response body or in one SSE event's data.
pub(crate) fn usage_of(json: &[u8]) -> Option<Usage> {
    let v: WithUsage = serde_json::from_slice(json).ok()?;
    v.usage
        .and_then(UsageShape::into_usage)
        .or_else(|| v.response?.usage?.into_usage())
}

/// Scans an SSE stream as its frames pass, keeping only an unfinished line, and remembers the
/// last usage any `data:` line carried.
#[derive(Debug, Default)]
pub(crate) struct SseScanner {
    partial: Vec<u8>,
    pub(crate) usage: Option<Usage>,
}

/// Lines longer than this are not scanned (an event with usage is small).
const MAX_LINE: usize = 1 << 20;

impl SseScanner {
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(nl) = memchr::memchr(b'\n', chunk) {
            let (line, rest) = chunk.split_at(nl);
            chunk = &rest[1..];
            if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut full = std::mem::take(&mut self.partial);
                full.extend_from_slice(line);
                self.line(&full);
                full.clear();
                self.partial = full;
            }
        }
        if !chunk.is_empty() && self.partial.len() + chunk.len() <= MAX_LINE {
            self.partial.extend_from_slice(chunk);
        }
    }

    pub(crate) fn finish(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if memchr::memmem::find(data, b"\"usage\"").is_none() {
            return;
        }
        if let Some(u) = usage_of(data) {
            self.usage = Some(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_top_level_fields_only() {
        let f = request_fields(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"max_tokens \"}"}],"max_tokens":50,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert_eq!(f.max_output, Some(50));
        assert!(f.stream);
        assert_eq!(f.include_usage, None);
    }

    #[test]
    fn duplicate_or_escaped_duplicate_keys_are_refused() {
        assert!(request_fields(br#"{"max_tokens":1,"max_tokens":9}"#).is_err());
        assert!(request_fields(br#"{"max_tokens":1,"max\u005ftokens":9}"#).is_err());
        assert!(request_fields(br#"{"a":1} x"#).is_err());
        assert!(request_fields(b"[1]").is_err());
    }

    #[test]
    fn include_usage_is_added_without_changing_anything_else() {
        let body = br#"{"model":"m","stream":true}"#;
        let out = with_include_usage(body, &request_fields(body).unwrap()).unwrap();
        assert_eq!(
            out,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        let body = br#"{"stream":true,"stream_options":{"x":1}}"#;
        let out = with_include_usage(body, &request_fields(body).unwrap()).unwrap();
        assert_eq!(
            out,
            br#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#
        );
        let body = br#"{"stream":true,"stream_options":{ }}"#;
        let out = with_include_usage(body, &request_fields(body).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        for body in [
            &br#"{"stream":false}"#[..],
            br#"{"stream":true,"stream_options":{"include_usage":false}}"#,
        ] {
            assert_eq!(
                with_include_usage(body, &request_fields(body).unwrap()),
                None
            );
        }
    }

    #[test]
    fn every_output_cap_field_is_read_and_the_largest_reserved() {
        for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            let body = format!(r#"{{"model":"m","{field}":77}}"#);
            assert_eq!(
                request_fields(body.as_bytes()).unwrap().max_output,
                Some(77)
            );
        }
        let body = br#"{"max_tokens":5,"max_output_tokens":null,"max_completion_tokens":9}"#;
        assert_eq!(request_fields(body).unwrap().max_output, Some(9));
        assert_eq!(
            request_fields(br#"{"model":"m"}"#).unwrap().max_output,
            None
        );
    }

    #[test]
    fn lowering_the_output_cap_rewrites_only_its_values() {
        let body = br#"{"max_tokens": 500 ,"messages":[],"max_completion_tokens":900}"#;
        let out = with_max_output(body, &request_fields(body).unwrap(), 42);
        assert_eq!(
            out,
            br#"{"max_tokens": 42 ,"messages":[],"max_completion_tokens":42}"#
        );
    }

    #[test]
    fn usage_shapes_of_every_api_are_read() {
        assert_eq!(
            usage_of(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#),
            Some(Usage::new(3, 4))
        );
        assert_eq!(
            usage_of(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#),
            Some(Usage::new(3, 4))
        );
        assert_eq!(
            usage_of(br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#),
            Some(Usage::new(8, 0))
        );
        assert_eq!(
            usage_of(br#"{"type":"response.completed","response":{"usage":{"input_tokens":1,"output_tokens":2}}}"#),
            Some(Usage::new(1, 2))
        );
        assert_eq!(usage_of(br#"{"usage":null}"#), None);
    }

    #[test]
    fn sse_usage_is_found_across_frame_boundaries() {
        let stream = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseScanner::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            s.finish();
            assert_eq!(s.usage, Some(Usage::new(5, 6)), "split at {split}");
        }
    }
}
