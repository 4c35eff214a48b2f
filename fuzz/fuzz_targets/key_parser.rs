//! The key parser never panics, and decides the same way twice; a generated key parses back to
//! its own digest.
#![no_main]

use keygate_core::KeyFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let format = KeyFormat::default();
    let first = format.parse(text);
    let second = format.parse(text);
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Ok(a), Ok(b)) = (&first, &second) {
        assert_eq!(a, b);
    }
});
