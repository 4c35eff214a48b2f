//! The request scanner agrees with serde_json: what it accepts serde_json accepts (with the
//! same model), what serde_json refuses it refuses; it never panics.
#![no_main]

use keygate_core::facts::{JsonEdit, JsonError, edit_json, scan_json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let ours = scan_json(data);
    let theirs = serde_json::from_slice::<Value>(data);
    match (&ours, &theirs) {
        (Ok(fields), Ok(v)) => {
            let obj = v.as_object().expect("the scanner accepts objects only");
            assert_eq!(
                fields.model.as_deref(),
                obj.get("model").and_then(Value::as_str)
            );
            // Every edit keeps the body valid JSON.
            let edit = JsonEdit {
                include_usage: true,
                max_output: Some((7, "max_tokens")),
            };
            if let Some(edited) = edit_json(data, fields, edit) {
                let v: Value = serde_json::from_slice(&edited).expect("an edit keeps JSON valid");
                assert_eq!(v["stream_options"]["include_usage"], true);
            }
        }
        (Ok(_), Err(e)) => panic!("accepted what serde_json refuses: {e}"),
        (Err(JsonError::Invalid | JsonError::NotUtf8), Ok(_)) => {
            // Only nesting deeper than both limits may differ; serde_json's is the same.
            panic!("refused valid JSON as invalid");
        }
        _ => {}
    }
});
