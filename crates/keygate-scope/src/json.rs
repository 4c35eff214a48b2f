//! A validating scanner that finds the top-level `model` of a JSON object without building a
//! tree: strings are skipped with `memchr`, everything else is checked against the JSON
//! grammar so the scanner and any strict parser agree on where the top-level keys are.

use std::borrow::Cow;

/// Why a JSON body's model could not be read unambiguously.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonModelError {
    /// Not valid JSON (or nested deeper than the limit).
    #[error("not valid JSON")]
    Invalid,
    /// Valid JSON, but not an object.
    #[error("the JSON is not an object")]
    NotObject,
    /// A top-level key appears twice.
    #[error("a top-level key appears twice")]
    DuplicateKey,
    /// `model` twice, or a key equal to `model` apart from letter case.
    #[error("the model is named more than once")]
    AmbiguousModel,
    /// `model` is not a string.
    #[error("the model is not a string")]
    ModelNotString,
}

const MAX_DEPTH: u32 = 128;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

/// The decoded value of the top-level `model` key of the JSON object `body`, if present,
/// found without building a tree: strings are skipped with `memchr`, everything else is
/// checked against the JSON grammar (nesting up to 128 levels), so the scanner and a strict
/// parser agree on which keys are at the top level.
///
/// # Errors
///
/// The body is not a JSON object; a top-level key appears twice; `model` appears twice or
/// under another letter case (escapes decoded as JSON decodes them); `model` is not a string.
pub fn find_json_model(body: &[u8]) -> Result<Option<Cow<'_, str>>, JsonModelError> {
    let mut s = Scanner { b: body, i: 0 };
    s.ws();
    if s.peek() != Some(b'{') {
        // Tell "not an object" from "not JSON".
        s.value(0)?;
        s.ws();
        return Err(if s.i == s.b.len() {
            JsonModelError::NotObject
        } else {
            JsonModelError::Invalid
        });
    }
    s.i += 1;
    let mut model: Option<Cow<'_, str>> = None;
    let mut keys = Keys::default();
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.ws();
            if s.peek() != Some(b'"') {
                return Err(JsonModelError::Invalid);
            }
            let key = s.string()?;
            let is_model = key.eq_ignore_ascii_case("model");
            if is_model && (key != "model" || model.is_some()) {
                return Err(JsonModelError::AmbiguousModel);
            }
            if !keys.insert(key) {
                return Err(JsonModelError::DuplicateKey);
            }
            s.ws();
            if s.peek() != Some(b':') {
                return Err(JsonModelError::Invalid);
            }
            s.i += 1;
            s.ws();
            if is_model {
                if s.peek() != Some(b'"') {
                    s.value(1)?;
                    return Err(JsonModelError::ModelNotString);
                }
                model = Some(s.string()?);
            } else {
                s.value(1)?;
            }
            s.ws();
            match s.peek() {
                Some(b',') => s.i += 1,
                Some(b'}') => {
                    s.i += 1;
                    break;
                }
                _ => return Err(JsonModelError::Invalid),
            }
        }
    }
    s.ws();
    if s.i != s.b.len() {
        return Err(JsonModelError::Invalid);
    }
    Ok(model)
}

/// The top-level keys seen so far: a short list while there are few (no hashing, no
/// allocation for the usual handful), a hash set past that, so a body of many keys costs
/// linear time, not quadratic.
#[derive(Default)]
struct Keys<'a> {
    few: Vec<Cow<'a, str>>,
    many: Option<std::collections::HashSet<Cow<'a, str>>>,
}

impl<'a> Keys<'a> {
    const FEW: usize = 16;

    /// Adds `key`; false if it was already there.
    fn insert(&mut self, key: Cow<'a, str>) -> bool {
        if let Some(set) = &mut self.many {
            return set.insert(key);
        }
        if self.few.contains(&key) {
            return false;
        }
        if self.few.len() < Self::FEW {
            self.few.push(key);
        } else {
            let mut set: std::collections::HashSet<Cow<'a, str>> = self.few.drain(..).collect();
            set.insert(key);
            self.many = Some(set);
        }
        true
    }
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

    /// Skips one value of any kind.
    fn value(&mut self, depth: u32) -> Result<(), JsonModelError> {
        match self.peek().ok_or(JsonModelError::Invalid)? {
            b'"' => self.skip_string(),
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(JsonModelError::Invalid),
        }
    }

    fn object(&mut self, depth: u32) -> Result<(), JsonModelError> {
        if depth > MAX_DEPTH {
            return Err(JsonModelError::Invalid);
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
                return Err(JsonModelError::Invalid);
            }
            self.skip_string()?;
            self.ws();
            if self.peek() != Some(b':') {
                return Err(JsonModelError::Invalid);
            }
            self.i += 1;
            self.ws();
            self.value(depth)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(JsonModelError::Invalid),
            }
        }
    }

    fn array(&mut self, depth: u32) -> Result<(), JsonModelError> {
        if depth > MAX_DEPTH {
            return Err(JsonModelError::Invalid);
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            self.value(depth)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(JsonModelError::Invalid),
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), JsonModelError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(JsonModelError::Invalid)
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), JsonModelError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(JsonModelError::Invalid),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(JsonModelError::Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(JsonModelError::Invalid);
            }
        }
        Ok(())
    }

    /// Skips a string (at its opening quote). Only where it ends matters here: a quote ends
    /// it unless an odd run of backslashes precedes it. Escapes and control characters inside
    /// skipped strings are left to the parser behind (they cannot move a string's end).
    #[inline]
    fn skip_string(&mut self) -> Result<(), JsonModelError> {
        let start = self.i + 1;
        let mut from = start;
        loop {
            let at = from + memchr::memchr(b'"', &self.b[from..]).ok_or(JsonModelError::Invalid)?;
            let mut k = at;
            while k > start && self.b[k - 1] == b'\\' {
                k -= 1;
            }
            if (at - k).is_multiple_of(2) {
                self.i = at + 1;
                return Ok(());
            }
            from = at + 1;
        }
    }

    /// Reads a string (at its opening quote) and decodes it as JSON does.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonModelError> {
        self.i += 1;
        let start = self.i;
        let rest = &self.b[start..];
        let at = memchr::memchr2(b'"', b'\\', rest).ok_or(JsonModelError::Invalid)?;
        if rest[at] == b'"' {
            self.i += at + 1;
            let raw = &rest[..at];
            if raw.iter().any(|&c| c < 0x20) {
                return Err(JsonModelError::Invalid);
            }
            return std::str::from_utf8(raw)
                .map(Cow::Borrowed)
                .map_err(|_| JsonModelError::Invalid);
        }
        // Escapes: decode into an owned buffer.
        let mut out = Vec::with_capacity(at + 16);
        loop {
            let rest = &self.b[self.i..];
            let at = memchr::memchr2(b'"', b'\\', rest).ok_or(JsonModelError::Invalid)?;
            out.extend_from_slice(&rest[..at]);
            self.i += at;
            if self.b[self.i] == b'"' {
                self.i += 1;
                break;
            }
            self.escape(Some(&mut out))?;
        }
        if self.b[start..self.i].iter().any(|&c| c < 0x20) {
            return Err(JsonModelError::Invalid);
        }
        String::from_utf8(out)
            .map(Cow::Owned)
            .map_err(|_| JsonModelError::Invalid)
    }

    fn hex4(&mut self) -> Result<u16, JsonModelError> {
        let digits = self
            .b
            .get(self.i..self.i + 4)
            .ok_or(JsonModelError::Invalid)?;
        let mut v = 0u16;
        for &d in digits {
            let n = (d as char).to_digit(16).ok_or(JsonModelError::Invalid)?;
            v = v << 4 | n as u16;
        }
        self.i += 4;
        Ok(v)
    }

    /// Handles one escape at `self.i` (a backslash); appends its decoding to `out` if given.
    fn escape(&mut self, out: Option<&mut Vec<u8>>) -> Result<(), JsonModelError> {
        let c = *self.b.get(self.i + 1).ok_or(JsonModelError::Invalid)?;
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
                        return Err(JsonModelError::Invalid);
                    }
                    self.i += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(JsonModelError::Invalid);
                    }
                    0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
                } else if (0xDC00..0xE000).contains(&hi) {
                    return Err(JsonModelError::Invalid);
                } else {
                    u32::from(hi)
                };
                char::from_u32(code).ok_or(JsonModelError::Invalid)?
            }
            _ => return Err(JsonModelError::Invalid),
        };
        if let Some(out) = out {
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(s: &str) -> Result<Option<String>, JsonModelError> {
        find_json_model(s.as_bytes()).map(|m| m.map(Cow::into_owned))
    }

    #[test]
    fn finds_the_top_level_model() {
        assert_eq!(
            model(
                r#"{"messages":[{"role":"user","content":"hi \"model\": x"}],"model":"gpt-4o-mini"}"#
            ),
            Ok(Some("gpt-4o-mini".into()))
        );
        assert_eq!(model(r#" { "model" : "a" } "#), Ok(Some("a".into())));
        assert_eq!(model(r#"{}"#), Ok(None));
    }

    #[test]
    fn backslash_runs_before_quotes_are_counted() {
        assert_eq!(model(r#"{"x":"a\\","model":"m"}"#), Ok(Some("m".into())));
        assert_eq!(
            model(r#"{"x":"a\\\",\"model\":\"evil","model":"m"}"#),
            Ok(Some("m".into()))
        );
        assert_eq!(model(r#"{"x":"\"","model":"m"}"#), Ok(Some("m".into())));
    }

    #[test]
    fn nested_model_keys_are_not_the_model() {
        assert_eq!(
            model(r#"{"x":{"model":"evil"},"model":"good"}"#),
            Ok(Some("good".into()))
        );
        assert_eq!(model(r#"{"x":[{"model":"evil"}]}"#), Ok(None));
    }

    #[test]
    fn escaped_keys_and_values_are_decoded() {
        assert_eq!(
            model(r#"{"mod\u0065l":"gpt\u002d4"}"#),
            Ok(Some("gpt-4".into()))
        );
        assert_eq!(
            model(r#"{"model":"a","mod\u0065l":"b"}"#),
            Err(JsonModelError::AmbiguousModel)
        );
        assert_eq!(
            model(r#"{"\ud83d\ude00":1,"model":"m"}"#),
            Ok(Some("m".into()))
        );
    }

    #[test]
    fn ambiguous_shapes_are_errors() {
        assert_eq!(
            model(r#"{"model":"a","model":"b"}"#),
            Err(JsonModelError::AmbiguousModel)
        );
        assert_eq!(
            model(r#"{"model":"a","model":"a"}"#),
            Err(JsonModelError::AmbiguousModel)
        );
        assert_eq!(
            model(r#"{"Model":"a"}"#),
            Err(JsonModelError::AmbiguousModel)
        );
        assert_eq!(
            model(r#"{"model":"a","MODEL":"b"}"#),
            Err(JsonModelError::AmbiguousModel)
        );
        assert_eq!(
            model(r#"{"model":["a"]}"#),
            Err(JsonModelError::ModelNotString)
        );
        assert_eq!(
            model(r#"{"model":null}"#),
            Err(JsonModelError::ModelNotString)
        );
        assert_eq!(
            model(r#"{"stream":true,"stream":false}"#),
            Err(JsonModelError::DuplicateKey)
        );
        assert_eq!(model(r#"["model","a"]"#), Err(JsonModelError::NotObject));
    }

    #[test]
    fn invalid_json_is_an_error() {
        for bad in [
            r#"{"model":"a""#,
            r#"{"model":"a",}"#,
            r#"{"model":"a"} x"#,
            r#"{"model":"a", /* "model":"b" */ "x":1}"#,
            r#"{'model':'a'}"#,
            r#"{"x":NaN,"model":"a"}"#,
            r#"{"x":01}"#,
            r#"{"\ud800":1}"#,
            r#"{"x\q":1}"#,
            "{\"model\":\"a\nb\"}",
            "",
        ] {
            assert!(model(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agrees_with_serde_json_on_valid_objects() {
        let doc = serde_json::json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "a \"quoted\" \\ thing {\"model\":1}"}],
            "temperature": -1.5e-3,
            "n": 0,
            "stop": null,
            "tools": [true, false, {"a": [[], {}]}],
        });
        let text = serde_json::to_string_pretty(&doc).unwrap();
        assert_eq!(model(&text), Ok(Some("gpt-4o".into())));
    }

    #[test]
    fn duplicate_keys_are_found_among_many_keys() {
        let keys: Vec<String> = (0..1000).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let body = format!(r#"{{{},"model":"m"}}"#, keys.join(","));
        assert_eq!(model(&body), Ok(Some("m".into())));
        let body = format!(r#"{{{},"model":"m","k999":0}}"#, keys.join(","));
        assert_eq!(model(&body), Err(JsonModelError::DuplicateKey));
        let body = format!(r#"{{{},"k\u0030":0}}"#, keys.join(","));
        assert_eq!(model(&body), Err(JsonModelError::DuplicateKey));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(model(&deep), Err(JsonModelError::Invalid));
    }
}
