use super::*;
use proptest::prelude::*;
use serde_json::Value;

fn model(s: &str) -> Result<Option<String>, JsonError> {
    scan_json(s.as_bytes()).map(|f| f.model.map(Cow::into_owned))
}

#[test]
fn finds_the_top_level_model_only() {
    assert_eq!(
        model(
            r#"{"messages":[{"role":"user","content":"hi \"model\": x"}],"model":"gpt-4o-mini"}"#
        ),
        Ok(Some("gpt-4o-mini".into()))
    );
    assert_eq!(model(r#" { "model" : "a" } "#), Ok(Some("a".into())));
    assert_eq!(model(r#"{}"#), Ok(None));
    assert_eq!(
        model(r#"{"x":{"model":"evil"},"model":"good"}"#),
        Ok(Some("good".into()))
    );
    assert_eq!(model(r#"{"x":[{"model":"evil"}]}"#), Ok(None));
}

#[test]
fn backslash_runs_before_quotes_are_counted() {
    assert_eq!(model(r#"{"x":"a\\","model":"m"}"#), Ok(Some("m".into())));
    assert_eq!(
        model(r#"{"x":"a\\\",\"model\":\"evil","model":"m"}"#),
        Ok(Some("m".into()))
    );
}

#[test]
fn escaped_keys_and_values_are_decoded() {
    assert_eq!(
        model(r#"{"mod\u0065l":"gpt\u002d4"}"#),
        Ok(Some("gpt-4".into()))
    );
    assert_eq!(
        model(r#"{"model":"a","mod\u0065l":"b"}"#),
        Err(JsonError::AmbiguousModel)
    );
    assert_eq!(
        model(r#"{"\ud83d\ude00":1,"model":"m"}"#),
        Ok(Some("m".into()))
    );
}

#[test]
fn ambiguous_shapes_are_errors() {
    for (body, want) in [
        (r#"{"model":"a","model":"b"}"#, JsonError::AmbiguousModel),
        (r#"{"model":"a","model":"a"}"#, JsonError::AmbiguousModel),
        (r#"{"Model":"a"}"#, JsonError::AmbiguousModel),
        (r#"{"model":["a"]}"#, JsonError::BadField(JsonField::Model)),
        (r#"{"model":null}"#, JsonError::BadField(JsonField::Model)),
        (r#"{"stream":true,"stream":false}"#, JsonError::DuplicateKey),
        (r#"{"n":1,"\u006e":1}"#, JsonError::DuplicateKey),
        (
            r#"{"max_tokens":5,"max_tokens":5}"#,
            JsonError::DuplicateKey,
        ),
        (
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
            JsonError::DuplicateKey,
        ),
        (r#"["model","a"]"#, JsonError::NotObject),
        (
            r#"{"max_tokens":-1}"#,
            JsonError::BadField(JsonField::MaxTokens),
        ),
        (
            r#"{"max_tokens":1.5}"#,
            JsonError::BadField(JsonField::MaxTokens),
        ),
        (
            r#"{"max_tokens":"9"}"#,
            JsonError::BadField(JsonField::MaxTokens),
        ),
        (r#"{"n":0}"#, JsonError::BadField(JsonField::N)),
        (r#"{"best_of":"2"}"#, JsonError::BadField(JsonField::BestOf)),
        (
            r#"{"stream":"yes"}"#,
            JsonError::BadField(JsonField::Stream),
        ),
        (
            r#"{"stream_options":[]}"#,
            JsonError::BadField(JsonField::StreamOptions),
        ),
        (
            r#"{"stream_options":{"include_usage":1}}"#,
            JsonError::BadField(JsonField::IncludeUsage),
        ),
    ] {
        assert_eq!(scan_json(body.as_bytes()).map(|_| ()), Err(want), "{body}");
    }
}

#[test]
fn invalid_json_and_non_utf8_are_errors() {
    for bad in [
        &br#"{"model":"a""#[..],
        br#"{"model":"a",}"#,
        br#"{"model":"a"} x"#,
        br#"{"model":"a", /* "model":"b" */ "x":1}"#,
        br#"{'model':'a'}"#,
        br#"{"x":NaN,"model":"a"}"#,
        br#"{"x":01}"#,
        br#"{"x":1e400}"#,
        br#"{"\ud800":1}"#,
        br#"{"x":"\udc00"}"#,
        br#"{"x\q":1}"#,
        br#"{"x":"\q"}"#,
        b"{\"model\":\"a\nb\"}",
        b"{\"x\":\"a\x01b\"}",
        b"",
    ] {
        assert!(scan_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    assert_eq!(
        scan_json(b"{\"x\":\"\xff\"}").map(|_| ()),
        Err(JsonError::NotUtf8)
    );
    assert_eq!(
        scan_json(b"{\"model\":\"\xc3\"}").map(|_| ()),
        Err(JsonError::NotUtf8)
    );
}

#[test]
fn accounting_fields_are_read() {
    let f = scan_json(
        br#"{"model":"gpt-4o","messages":[{"role":"user","content":"max_tokens \"}"}],"max_tokens":50,"n":3,"stream":true,"stream_options":{"include_usage":false}}"#,
    )
    .unwrap();
    assert_eq!(f.model.as_deref(), Some("gpt-4o"));
    assert_eq!(f.max_output, Some(50));
    assert_eq!(f.n, Some(3));
    assert!(f.stream);
    assert_eq!(f.include_usage, Some(Some(false)));
    // "role", "user", "content" + `max_tokens \"}` as written: the text (and the keys of
    // nested objects), not the JSON around it.
    assert_eq!(f.text_bytes, 4 + 4 + 7 + 14);
    let body = br#"{"model":"m","messages":[{"role":"user","content":"a\nb"}]}"#;
    let f = scan_json_text(body).unwrap();
    let text: Vec<_> = f.text(body).collect();
    assert_eq!(text, ["role", "user", "content", "a\nb"]);
    assert!(scan_json(body).unwrap().text(body).next().is_none());
    assert_eq!(f.items, 1);
    let f = scan_json(
        br#"{"max_tokens":5,"max_output_tokens":null,"max_completion_tokens":9,"best_of":4}"#,
    )
    .unwrap();
    assert_eq!(f.max_output, Some(9));
    assert_eq!(f.best_of, Some(4));
    assert_eq!(f.numbers, 0);
    let f = scan_json(br#"{"prompt":[1,2,3],"stream_options":null}"#).unwrap();
    assert_eq!(f.numbers, 3);
    assert_eq!(f.include_usage, None);
}

fn edited(body: &str, edit: JsonEdit<'_>) -> Option<String> {
    let f = scan_json(body.as_bytes()).unwrap();
    edit_json(body.as_bytes(), &f, edit).map(|b| String::from_utf8(b).unwrap())
}

const USAGE: JsonEdit<'static> = JsonEdit {
    include_usage: true,
    max_output: None,
};

#[test]
fn include_usage_is_set_without_changing_anything_else() {
    assert_eq!(
        edited(r#"{"model":"m","stream":true}"#, USAGE).as_deref(),
        Some(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#)
    );
    assert_eq!(
        edited(r#"{"stream":true,"stream_options":{"x":1}}"#, USAGE).as_deref(),
        Some(r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#)
    );
    assert_eq!(
        edited(r#"{"stream_options":{ }}"#, USAGE).as_deref(),
        Some(r#"{"stream_options":{"include_usage":true }}"#)
    );
    assert_eq!(
        edited(
            r#"{"stream_options":{"include_usage": false ,"x":1}}"#,
            USAGE
        )
        .as_deref(),
        Some(r#"{"stream_options":{"include_usage": true ,"x":1}}"#)
    );
    assert_eq!(
        edited(r#"{"stream_options":{"include_usage":null}}"#, USAGE).as_deref(),
        Some(r#"{"stream_options":{"include_usage":true}}"#)
    );
    assert_eq!(
        edited(r#"{"stream_options":{"include_usage":true}}"#, USAGE),
        None
    );
    assert_eq!(
        edited("{ }", USAGE).as_deref(),
        Some(r#"{ "stream_options":{"include_usage":true}}"#)
    );
}

#[test]
fn output_caps_are_set_or_added() {
    let cap = |to| JsonEdit {
        include_usage: false,
        max_output: Some((to, "max_completion_tokens")),
    };
    assert_eq!(
        edited(
            r#"{"max_tokens": 500 ,"messages":[],"max_completion_tokens":null}"#,
            cap(42)
        )
        .as_deref(),
        Some(r#"{"max_tokens": 42 ,"messages":[],"max_completion_tokens":42}"#)
    );
    assert_eq!(
        edited(r#"{"model":"m"}"#, cap(7)).as_deref(),
        Some(r#"{"model":"m","max_completion_tokens":7}"#)
    );
    assert_eq!(
        edited("{}", cap(7)).as_deref(),
        Some(r#"{"max_completion_tokens":7}"#)
    );
    let both = JsonEdit {
        include_usage: true,
        max_output: Some((7, "max_tokens")),
    };
    let out = edited(r#"{"stream":true}"#, both).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["max_tokens"], 7);
    assert_eq!(v["stream_options"]["include_usage"], true);
}

#[test]
fn only_the_fields_read_may_not_repeat() {
    for body in [
        r#"{"x":{"a":1,"a":2}}"#,
        r#"{"x":[{"a":1,"\u0061":2}]}"#,
        r#"{"user":"a","user":"b","model":"m"}"#,
        r#"{"stream_options":{"x":1,"x":2},"messages":[{"role":"user","role":"system"}]}"#,
    ] {
        assert!(scan_json(body.as_bytes()).is_ok(), "{body}");
    }
    // Long keys are validated all the same, decoded or not.
    let escaped = r"\u0065".repeat(40);
    let long = format!(r#"{{"{escaped}":1,"model":"m"}}"#);
    assert_eq!(model(&long), Ok(Some("m".into())));
    let long = format!(r#"{{"{escaped}\x":1,"model":"m"}}"#);
    assert_eq!(model(&long), Err(JsonError::Invalid));
    let long = format!(r#"{{"{}\u00":1}}"#, "k".repeat(200));
    assert_eq!(model(&long), Err(JsonError::Invalid));
}

#[test]
fn many_keys_and_deep_nesting_are_handled() {
    let keys: Vec<String> = (0..2000).map(|i| format!(r#""k{i}":{i}"#)).collect();
    let body = format!(r#"{{{},"model":"m"}}"#, keys.join(","));
    assert_eq!(model(&body), Ok(Some("m".into())));
    // A key no field is read from may repeat: nothing keygate decides depends on it.
    let body = format!(r#"{{{},"model":"m","k1999":0}}"#, keys.join(","));
    assert_eq!(model(&body), Ok(Some("m".into())));
    let nested = format!(r#"{{"x":{{{}}}}}"#, keys.join(","));
    assert!(scan_json(nested.as_bytes()).is_ok());
    let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    assert_eq!(model(&deep), Err(JsonError::Invalid));
}

/// Whether serde_json and the scanner agree on nesting this deep.
#[test]
fn the_depth_limit_matches_serde_json() {
    for depth in 120..135 {
        let body = format!(r#"{{"x":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        let serde = serde_json::from_str::<Value>(&body).is_ok();
        let ours = scan_json(body.as_bytes()).is_ok();
        assert_eq!(ours, serde, "depth {depth}");
    }
}

// ---- differential: the scanner against serde_json ----

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("model".to_owned()),
        Just("Model".to_owned()),
        Just("max_tokens".to_owned()),
        Just("max_completion_tokens".to_owned()),
        Just("n".to_owned()),
        Just("best_of".to_owned()),
        Just("stream".to_owned()),
        Just("stream_options".to_owned()),
        Just("include_usage".to_owned()),
        Just("size".to_owned()),
        Just("quality".to_owned()),
        "[a-z\\\\\"\u{e9}\u{1F600}]{0,6}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn top_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), json_value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// What serde_json makes of the fields the scanner reads, for a body without duplicates.
fn expected(v: &Value) -> Result<(Option<String>, Option<u64>, bool), JsonError> {
    let obj = v.as_object().ok_or(JsonError::NotObject)?;
    if obj.contains_key("Model") {
        return Err(JsonError::AmbiguousModel);
    }
    let model = match obj.get("model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(JsonError::BadField(JsonField::Model)),
    };
    let mut max = None;
    for k in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        match obj.get(k) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v
                    .as_u64()
                    .ok_or(JsonError::BadField(JsonField::MaxTokens))?;
                max = Some(max.map_or(n, |m: u64| m.max(n)));
            }
        }
    }
    for k in ["n", "best_of"] {
        match obj.get(k) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {}
            Some(_) => {
                return Err(JsonError::BadField(if k == "n" {
                    JsonField::N
                } else {
                    JsonField::BestOf
                }));
            }
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(JsonError::BadField(JsonField::Stream)),
    };
    match obj.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null | Value::Bool(_)) => {}
            Some(_) => return Err(JsonError::BadField(JsonField::IncludeUsage)),
        },
        Some(_) => return Err(JsonError::BadField(JsonField::StreamOptions)),
    }
    Ok((model, max, stream))
}

fn check_against_serde(body: &[u8]) -> Result<(), TestCaseError> {
    let ours = scan_json(body);
    let theirs = serde_json::from_slice::<Value>(body);
    match (&ours, &theirs) {
        (Ok(f), Ok(v)) => {
            let (model, max, stream) = expected(v)
                .map_err(|e| TestCaseError::fail(format!("scanner accepted, serde says {e}")))?;
            prop_assert_eq!(f.model.as_deref(), model.as_deref());
            prop_assert_eq!(f.max_output, max);
            prop_assert_eq!(f.stream, stream);
            for (name, ours) in [("size", &f.size), ("quality", &f.quality)] {
                prop_assert_eq!(ours.as_deref(), v[name].as_str(), "{}", name);
            }
        }
        (Ok(_), Err(e)) => {
            return Err(TestCaseError::fail(format!(
                "scanner accepted invalid JSON: {e}"
            )));
        }
        (Err(JsonError::Invalid | JsonError::NotUtf8), Ok(_)) => {
            return Err(TestCaseError::fail("scanner refused valid JSON as invalid"));
        }
        (Err(JsonError::NotObject), Ok(v)) => prop_assert!(!v.is_object()),
        (Err(JsonError::DuplicateKey), Ok(_)) => {}
        (Err(e), Ok(v)) => {
            // Refused for a field's value: serde_json's view must show a problem too (the
            // scanner names the first in body order, the oracle its own first).
            prop_assert!(
                expected(v).is_err(),
                "scanner refused with {e}, serde sees none"
            );
        }
        (Err(_), Err(_)) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_serde_json_on_valid_objects(v in top_object(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            serde_json::to_string(&v).unwrap()
        };
        prop_assert!(scan_json(text.as_bytes()).is_ok() || expected(&v).is_err());
        check_against_serde(text.as_bytes())?;
    }

    #[test]
    fn agrees_with_serde_json_on_mutated_bodies(
        v in top_object(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let mut bytes = serde_json::to_vec(&v).unwrap();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 => bytes.insert(i, byte),
                1 if i < bytes.len() => { bytes.remove(i); }
                _ if i < bytes.len() => bytes[i] = byte,
                _ => bytes.push(byte),
            }
        }
        check_against_serde(&bytes)?;
    }

    #[test]
    fn agrees_with_serde_json_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        check_against_serde(&bytes)?;
    }

    #[test]
    fn agrees_with_serde_json_on_json_like_text(s in "[{}\\[\\]\":,0-9a-z.eE+\\- \\\\]{0,40}") {
        check_against_serde(s.as_bytes())?;
    }
}

#[test]
fn every_key_that_matters_passes_the_first_byte_filter() {
    for name in READ_FIELDS.iter().chain(&REF_KEYS) {
        assert!(may_matter(name.as_bytes()), "{name}");
        assert!(field(name.as_bytes()) != Field::Other, "{name}");
    }
    for name in ["Model", "MODEL", "mOdEl"] {
        assert!(may_matter(name.as_bytes()), "{name}");
    }
    for name in ["k1", "models", "", "x", "m123456", "nn"] {
        assert!(!may_matter(name.as_bytes()), "{name}");
    }
}

proptest! {
    /// The filter lets through every key that is a field read, names objects, or is
    /// `model` in another case; filtered out, a key is one the scanner ignores.
    #[test]
    fn the_first_byte_filter_never_drops_a_key_that_matters(key in "[a-zA-Z_]{0,24}") {
        let key = key.as_bytes();
        if field(key) != Field::Other || key.eq_ignore_ascii_case(b"model") {
            prop_assert!(may_matter(key));
        }
    }

    /// Compact members with keys ignored and scalar values (taken by the scanner's tight
    /// loop), around fields read and broken in places, agree with serde_json.
    #[test]
    fn compact_members_agree_with_serde_json(
        members in prop::collection::btree_map(
            "[a-z_]{0,8}|[a-z]{10,14}|k\\\\n|k\u{1}|model|Model|n|file_id",
            "-?[0-9]{1,3}([.eE][0-9]?)?|[0-9]{10,16}|\"[a-z\\\\]{0,4}\"|true|[}{,:]",
            0..12,
        ),
        tail in any::<bool>(),
    ) {
        let mut body: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        if tail {
            body.push(format!("\"tail\":\"{TAIL}\""));
        }
        check_against_serde(format!("{{{}}}", body.join(",")).as_bytes())?;
    }
}

/// The object ids `body` names, with the keys naming them.
fn refs_of(body: &[u8]) -> Vec<(&'static str, String)> {
    let fields = scan_json(body).unwrap();
    fields
        .object_refs(body)
        .map(|(k, v)| (k, v.into_owned()))
        .collect()
}

#[test]
fn object_ids_are_found_at_any_depth_but_not_in_metadata() {
    let body = br#"{"model":"m","input_file_id":"file-1","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-2"}}],"attachments":[{"file_id":"file-3","tools":[]}]}],
        "tool_resources":{"file_search":{"vector_store_ids":["vs_1","vs_2",3]},"code_interpreter":{"file_ids":[]}},
        "metadata":{"file_id":"mine","assistant_id":"asst_x"},"previous_response_id":null,"assistant_id":{"not":"an id"}}"#;
    let refs = refs_of(body);
    assert_eq!(
        refs,
        [
            ("input_file_id", "file-1".to_owned()),
            ("file_id", "file-2".to_owned()),
            ("file_id", "file-3".to_owned()),
            ("vector_store_ids", "vs_1".to_owned()),
            ("vector_store_ids", "vs_2".to_owned()),
        ]
    );
}

#[test]
fn escaped_keys_and_ids_are_decoded_as_the_upstream_reads_them() {
    // `\u005f` is `_`: the upstream reads `file_id`, so keygate must too.
    let body = br#"{"x":{"file\u005fid":"file-\u0031"},"assistant\u005fid":"asst_1"}"#;
    let refs = refs_of(body);
    assert_eq!(
        refs,
        [
            ("file_id", "file-1".to_owned()),
            ("assistant_id", "asst_1".to_owned())
        ]
    );
}

#[test]
fn a_body_naming_too_many_objects_is_refused() {
    let ids: Vec<String> = (0..=MAX_REFS).map(|i| format!("\"file-{i}\"")).collect();
    let body = format!(r#"{{"file_ids":[{}]}}"#, ids.join(","));
    assert_eq!(
        scan_json(body.as_bytes()).unwrap_err(),
        JsonError::TooManyRefs
    );
    let ok = format!(r#"{{"file_ids":[{}]}}"#, ids[..MAX_REFS].join(","));
    assert_eq!(scan_json(ok.as_bytes()).unwrap().refs.len(), MAX_REFS);
}

#[test]
fn every_ref_key_decodes_from_its_escaped_spelling() {
    for key in REF_KEYS {
        let escaped: String = key.bytes().map(|b| format!("\\u00{b:02x}")).collect();
        let body = format!(r#"{{"x":{{"{escaped}":"id-1"}}}}"#);
        assert_eq!(
            refs_of(body.as_bytes()),
            [(key, "id-1".to_owned())],
            "{key}"
        );
    }
}

/// What the scanner looked at for `body` ([`cost`]).
fn cost_of(body: &[u8], text: bool) -> u64 {
    cost::take();
    let _ = if text {
        scan_json_text(body)
    } else {
        scan_json(body)
    };
    cost::take()
}

/// A piece of a body repeated to make it long: a value of any kind (keys escaped or not,
/// strings with escapes), or one of the shapes that cost most per byte.
fn unit() -> impl Strategy<Value = String> {
    prop_oneof![
        json_value().prop_map(|v| v.to_string()),
        (1usize..127).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (1usize..60).prop_map(|d| format!("{}1{}", r#"{"a":["#.repeat(d), "]}".repeat(d))),
        "[a-z]{0,8}".prop_map(|k| format!(r#"{{"{k}":1}}"#)),
        r#"(\\u00[0-7][0-9a-f]|\\[nrt"\\/]|\\ud83d\\ude00|[a-z\u{e9}])*"#
            .prop_map(|s| format!("\"{s}\"")),
        r#"(\\u00[0-7][0-9a-f]|[a-z]){1,8}"#.prop_map(|k| format!(r#"{{"{k}":1}}"#)),
    ]
}

/// `count` copies of `unit`: as the elements of a nested array, and as the values of as
/// many top-level keys (the object the fields are read from).
fn repeated(unit: &str, count: usize) -> [Vec<u8>; 2] {
    let items = vec![unit; count].join(",");
    let members: Vec<String> = (0..count).map(|i| format!(r#""k{i}":{unit}"#)).collect();
    [
        format!(r#"{{"model":"m","x":[{items}]}}"#).into_bytes(),
        format!(r#"{{"model":"m",{}}}"#, members.join(",")).into_bytes(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The scanner's cost is linear in the body: what it looks at is a few times the bytes,
    /// whatever the shape, and four times the body costs no more per byte (a pass that went
    /// back over what it had read, or compared every key with every other, fails).
    #[test]
    fn cost_is_linear_in_the_body(unit in unit(), count in 1usize..120, text in any::<bool>()) {
        for (small, large) in repeated(&unit, count).into_iter().zip(repeated(&unit, 4 * count)) {
            let (c1, c4) = (cost_of(&small, text), cost_of(&large, text));
            prop_assert!(c1 <= 8 * small.len() as u64 + 64, "{c1} for {} bytes", small.len());
            prop_assert!(c4 <= 8 * large.len() as u64 + 64, "{c4} for {} bytes", large.len());
            // Per byte (the keys of the larger body are a digit or two longer).
            let per_byte = |cost: u64, body: &[u8]| cost as f64 / body.len() as f64;
            prop_assert!(
                per_byte(c4, &large) <= 1.25 * per_byte(c1, &small),
                "{c1} for {} bytes, then {c4} for {}", small.len(), large.len()
            );
        }
    }
}

#[test]
fn the_cost_of_a_body_is_counted() {
    // The counter the linear-cost property relies on sees every byte of a long string and
    // every key of many.
    let short = cost_of(br#"{"model":"m","x":"abc"}"#, false);
    let long = format!(r#"{{"model":"m","x":"{}"}}"#, "a".repeat(10_000));
    let long = cost_of(long.as_bytes(), false);
    assert!(long >= short + 10_000, "{short} then {long}");
    let [_, keys] = repeated("1", 1000);
    assert!(cost_of(&keys, false) >= keys.len() as u64);
}

/// `a` and `b`, the same JSON written two ways, give the same facts: the same fields, the
/// same text in the same order, the same counts and object ids, or the same refusal.
fn same_facts(a: &[u8], b: &[u8]) -> Result<(), TestCaseError> {
    match (scan_json_text(a), scan_json_text(b)) {
        (Ok(fa), Ok(fb)) => {
            prop_assert_eq!(&fa.model, &fb.model);
            prop_assert_eq!(fa.max_output, fb.max_output);
            prop_assert_eq!((fa.n, fa.best_of, fa.stream), (fb.n, fb.best_of, fb.stream));
            prop_assert_eq!(fa.text_bytes, fb.text_bytes);
            prop_assert_eq!(fa.numbers, fb.numbers);
            prop_assert_eq!(fa.items, fb.items);
            prop_assert_eq!(
                fa.text(a).collect::<Vec<_>>(),
                fb.text(b).collect::<Vec<_>>()
            );
            prop_assert_eq!(
                fa.object_refs(a).collect::<Vec<_>>(),
                fb.object_refs(b).collect::<Vec<_>>()
            );
        }
        (ea, eb) => prop_assert_eq!(ea.err(), eb.err()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Written compactly (members taken by the scanner's tight loops) or pretty (by its
    /// general loops), a body gives the same facts.
    #[test]
    fn compact_and_pretty_bodies_give_the_same_facts(v in top_object()) {
        let compact = serde_json::to_vec(&v).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        same_facts(&compact, &pretty)?;
    }

    /// So do nested keys written with escapes (valid, invalid, surrogate pairs, and keys
    /// naming objects spelled with an escape), compact and with spaces around every token.
    #[test]
    fn escaped_nested_keys_give_the_same_facts_compact_and_spaced(
        members in prop::collection::btree_map(
            "([a-z]|\\\\u00[46][1-9a-f]|\\\\n|\\\\x|\\\\ud83d\\\\ude00|\\\\ud83d){0,4}|file_id|\\\\u0066ile_id",
            "-?[0-9]{1,3}|\"[a-z\\\\]{0,3}\"|\\{\\}|\\[\\]|true",
            0..10,
        ),
    ) {
        let compact: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let spaced: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\" : {v}")).collect();
        same_facts(
            format!("{{\"x\":{{{}}},\"y\":[{{{}}}]}}", compact.join(","), compact.join(",")).as_bytes(),
            format!("{{\"x\" : {{ {} }} , \"y\" : [ {{ {} }} ] }}", spaced.join(" , "), spaced.join(" , ")).as_bytes(),
        )?;
    }
}

/// The pieces string values are made of below: plain text, every kind of escape, and what
/// a string may not hold (a bad escape, a lone surrogate, a raw control byte, a raw quote).
const STRING_PIECES: [&str; 16] = [
    "a",
    "plain text ",
    "0123456789abcdef",
    "\\\"",
    "\\\\",
    "\\n",
    "\\/",
    "\\u00e9",
    "\\ud83d\\ude00",
    "é",
    "\\x",
    "\\ud83d",
    "\\u12",
    "\n",
    "\"",
    "\\",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// String values looked at sixteen bytes at a time ([`long_rest`](Scanner::long_rest))
    /// agree with serde_json wherever their escapes, quotes and control bytes fall against
    /// the blocks, the switch to a search and the end of the body: the string is preceded
    /// by a pad of any length, and is the body's last field or not.
    #[test]
    fn long_strings_agree_with_serde_json_at_every_offset(
        pad in 0usize..70,
        pieces in prop::collection::vec(0..STRING_PIECES.len(), 0..16),
        last in any::<bool>(),
        nested in any::<bool>(),
    ) {
        let text: String = pieces.iter().map(|&k| STRING_PIECES[k]).collect();
        let value = format!("\"{}{text}\"", "p".repeat(pad));
        let body = match (nested, last) {
            (false, true) => format!(r#"{{"model":"m","input":{value}}}"#),
            (false, false) => format!(r#"{{"input":{value},"model":"m"}}"#),
            (true, true) => format!(r#"{{"model":"m","messages":[{{"content":{value}}}]}}"#),
            (true, false) => format!(r#"{{"messages":[{{"content":{value},"role":"user"}}],"model":"m"}}"#),
        };
        check_against_serde(body.as_bytes())?;
    }

    /// The ends of a run found in a block (SSE2 on x86-64) and from two words (elsewhere)
    /// are the bytes that end it, one by one.
    #[test]
    fn the_ends_of_a_run_are_found_in_a_block(
        block in prop::array::uniform16(prop::sample::select(vec![
            0u8, 0x1F, 0x20, b'"', b'\\', b'a', 0x7F, 0x80, 0xA2, 0xDC, 0xFF, 0x9F, 0x21, 0x5B,
        ])),
        controls in any::<bool>(),
    ) {
        let want = (0..16).fold(0u32, |m, k| {
            let c = block[k];
            m | u32::from(c == b'"' || c == b'\\' || (controls && c < 0x20)) << k
        });
        prop_assert_eq!(run_ends(&block, controls), want);
        prop_assert_eq!(run_ends_words(&block, controls), want);
    }
}

/// Text after the members a test is about, so that each of them fits in a block.
const TAIL: &str = "tail text after the members";

/// Top-level members taken a block at a time (`,"key":digits`) and those next to them that
/// are not (a leading zero, a fraction, an exponent, a key with an escape or a control byte,
/// a long key or number, the block's end) agree with serde_json.
#[test]
fn compact_top_level_members_agree_with_serde_json() {
    let values = [
        "1",
        "0",
        "01",
        "00",
        "-1",
        "10",
        "1.5",
        "1e5",
        "1E5",
        "1e",
        "1.",
        "0.5",
        "123456789012",
        "1234567890123456",
        "\"s\"",
        "true",
        "1x",
    ];
    let keys = [
        "k",
        "",
        "abcdefghijk",
        "abcdefghijklmnop",
        "k\\n",
        "k\u{1}",
        "model",
    ];
    for value in values {
        for key in keys {
            for pad in ["", "p", "pppppp"] {
                // A long last member, so that every member before it fits in a block.
                let body = format!(r#"{{"a{pad}":1,"{key}":{value},"z":2,"tail":"{TAIL}"}}"#);
                if let Err(e) = check_against_serde(body.as_bytes()) {
                    panic!("{body}: {e}");
                }
            }
        }
    }
}

/// Numbers at the edge of what an f64 holds agree with serde_json: one without an exponent
/// is parsed only past 300 characters (shorter ones always fit), one with an exponent always.
#[test]
fn numbers_at_the_edge_of_f64_agree_with_serde_json() {
    let digits = |n: usize| format!("1{}", "0".repeat(n - 1));
    let numbers = [
        "0.2".to_owned(),
        "-0.25".to_owned(),
        format!("{}.5", digits(300)),
        format!("{}.5", digits(308)),
        format!("{}.5", digits(309)),
        digits(308),
        digits(309),
        digits(310),
        format!("-{}", digits(310)),
        format!("{}.5", digits(310)),
        "1e308".to_owned(),
        "1e309".to_owned(),
        "1.7976931348623157e308".to_owned(),
        "1.7976931348623159e308".to_owned(),
        "-1e400".to_owned(),
        "1e-400".to_owned(),
        "0.5E+2".to_owned(),
    ];
    for n in numbers {
        let body = format!(r#"{{"temperature":{n},"x":[{n}],"model":"m"}}"#);
        if let Err(e) = check_against_serde(body.as_bytes()) {
            panic!("{n}: {e}");
        }
    }
}
