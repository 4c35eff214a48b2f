//! The path check never panics, and a path it accepts is its own canonical form: the decision
//! made on the raw path is the decision on the path a normalizing server acts on.
#![no_main]

use keygate_scope::{canonical_path, check_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if check_path(path).is_ok() {
        assert_eq!(canonical_path(path).as_deref(), Some(path), "{path:?}");
    }
});
