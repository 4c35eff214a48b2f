//! The SSE usage observer never panics, hands an unstripped stream on byte for byte, and never
//! makes a stream longer by stripping, however the stream is cut into frames.
#![no_main]

use keygate_limit::fuzzing::sse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first bytes choose where the stream is cut.
    let Some((&cuts, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(cuts).max(1);
    let chunks: Vec<&[u8]> = stream.chunks(step).collect();
    let (plain, plain_usage) = sse(&chunks, false);
    assert_eq!(plain, stream);
    let (stripped, usage) = sse(&chunks, true);
    assert!(stripped.len() <= stream.len());
    assert_eq!(usage, plain_usage);
});
