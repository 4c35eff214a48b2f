//! Usage in responses: the `usage` object of a JSON body or of one SSE event, and the SSE
//! scanner that finds it as a stream passes (and removes the usage chunk a client did not ask
//! for). Request bodies are scanned once, by `keygate_core::facts`.

use bytes::{Bytes, BytesMut};
use keygate_core::Usage;
use serde::Deserialize;

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

/// What a response says was made: its token usage, and (for an images response,
/// `{"data":[…],"usage":{…}}`) how many images its `data` array holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reading {
    pub(crate) usage: Option<Usage>,
    pub(crate) images: Option<u64>,
}

/// The number of elements of a JSON array, each skipped unread.
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Elements;
        impl<'de> serde::de::Visitor<'de> for Elements {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Count, A::Error> {
                let mut n = 0u64;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Elements)
    }
}

/// The images and usage of an images API response body; `None` when it is not one object
/// whose `data` (if any) is an array (a key twice included: then nothing is believed).
pub(crate) fn images_of(json: &[u8]) -> Option<Reading> {
    #[derive(Deserialize)]
    struct Images {
        data: Option<Count>,
        usage: Option<UsageShape>,
    }
    let v: Images = serde_json::from_slice(json).ok()?;
    Some(Reading {
        usage: v.usage.and_then(UsageShape::into_usage),
        images: v.data.map(|c| c.0),
    })
}

/// Scans an SSE stream as its frames pass, keeping only an unfinished line, and remembers the
/// last usage any `data:` line carried. In stripping mode it also removes the usage-only chunk
/// (`"choices":[]` with a `usage`) from the stream: it then hands on whole events only.
#[derive(Debug, Default)]
pub(crate) struct SseScanner {
    partial: Vec<u8>,
    pub(crate) usage: Option<Usage>,
    /// Stripping: the bytes of the event not yet complete.
    strip: Option<BytesMut>,
}

/// Lines (and, when stripping, events) longer than this are not scanned (an event with usage
/// is small); a stream with a longer event is handed on as it is from there.
const MAX_LINE: usize = 1 << 20;

impl SseScanner {
    /// A scanner that also removes the usage chunk from the stream.
    pub(crate) fn stripping() -> Self {
        SseScanner {
            strip: Some(BytesMut::new()),
            ..SseScanner::default()
        }
    }

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

    /// Scans `data` and returns what to hand on: `data` itself unless stripping; when
    /// stripping, the whole events completed so far, less the usage chunk.
    pub(crate) fn pass(&mut self, data: Bytes) -> Bytes {
        self.feed(&data);
        let Some(held) = &mut self.strip else {
            return data;
        };
        if held.is_empty()
            && ends_an_event(&data)
            && memchr::memmem::find(&data, b"\"usage\":{").is_none()
        {
            // Whole events and no usage chunk among them: as it came, no copy.
            return data;
        }
        held.extend_from_slice(&data);
        let mut out = BytesMut::with_capacity(held.len());
        while let Some(end) = event_end(held) {
            let event = held.split_to(end);
            if !is_usage_chunk(&event) {
                out.extend_from_slice(&event);
            }
        }
        if held.len() > MAX_LINE {
            // An event too long to hold: hand everything on from here.
            out.extend_from_slice(held);
            self.strip = None;
        }
        out.freeze()
    }

    /// What is left at the end of the stream (an unfinished event), handed on as it is.
    pub(crate) fn rest(&mut self) -> Option<Bytes> {
        let held = self.strip.as_mut()?;
        (!held.is_empty()).then(|| {
            let event = held.split();
            if is_usage_chunk(&event) {
                Bytes::new()
            } else {
                event.freeze()
            }
        })
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

/// Runs `chunks` through an SSE scanner (stripping or not) as the response body does: what
/// the client receives, and the usage seen. For the fuzz target and the property test.
#[cfg_attr(not(any(test, fuzzing)), allow(dead_code))]
pub(crate) fn sse_pass(chunks: &[&[u8]], strip: bool) -> (Vec<u8>, Option<Usage>) {
    let mut s = if strip {
        SseScanner::stripping()
    } else {
        SseScanner::default()
    };
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&s.pass(Bytes::copy_from_slice(chunk)));
    }
    if let Some(rest) = s.rest() {
        out.extend_from_slice(&rest);
    }
    s.finish();
    (out, s.usage)
}

/// Whether `data` ends with the blank line that ends an SSE event.
fn ends_an_event(data: &[u8]) -> bool {
    data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n")
}

/// Where the first complete event of `buf` ends (after its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether an event is the usage-only chunk of a stream that carries usage: its data is an
/// object with `"choices": []` and a non-null `usage`.
fn is_usage_chunk(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    if memchr::memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    serde_json::from_slice::<Chunk>(&data)
        .is_ok_and(|c| c.usage.is_some() && c.choices.is_some_and(|c| c.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn an_images_response_is_read_for_its_images_and_usage() {
        let dalle = br#"{"created":1,"data":[{"url":"https://x/1.png","revised_prompt":"a [cat]"},{"url":"https://x/2.png"}]}"#;
        assert_eq!(
            images_of(dalle),
            Some(Reading {
                usage: None,
                images: Some(2)
            })
        );
        let gpt = br#"{"created":1,"data":[{"b64_json":"AAAA"}],"usage":{"total_tokens":4210,"input_tokens":50,"output_tokens":4160,"input_tokens_details":{"text_tokens":50,"image_tokens":0}}}"#;
        assert_eq!(
            images_of(gpt),
            Some(Reading {
                usage: Some(Usage::new(50, 4160)),
                images: Some(1)
            })
        );
        assert_eq!(images_of(br#"{"data":[]}"#).unwrap().images, Some(0));
        // Not an array, a key twice, not JSON: nothing is believed.
        assert_eq!(images_of(br#"{"data":{"a":1}}"#), None);
        assert_eq!(images_of(br#"{"data":[1],"data":[1,2,3]}"#), None);
        assert_eq!(images_of(b"{\"data\":[1,"), None);
        assert_eq!(images_of(br#"{"error":{}}"#), Some(Reading::default()));
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

#[cfg(test)]
mod strip_tests {
    use super::*;

    const STREAM: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\ndata: [DONE]\n\n";
    const WITHOUT: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";

    #[test]
    fn the_usage_chunk_is_removed_across_every_split_and_usage_still_read() {
        for split in 0..STREAM.len() {
            let mut s = SseScanner::stripping();
            let mut out = Vec::new();
            out.extend_from_slice(&s.pass(Bytes::copy_from_slice(&STREAM[..split])));
            out.extend_from_slice(&s.pass(Bytes::copy_from_slice(&STREAM[split..])));
            if let Some(rest) = s.rest() {
                out.extend_from_slice(&rest);
            }
            s.finish();
            assert_eq!(out, WITHOUT, "split at {split}");
            assert_eq!(s.usage, Some(Usage::new(5, 6)), "split at {split}");
        }
    }

    #[test]
    fn whole_events_without_usage_pass_uncopied_and_an_unstripped_scanner_changes_nothing() {
        let mut s = SseScanner::stripping();
        let data = Bytes::from_static(WITHOUT);
        let out = s.pass(data.clone());
        assert_eq!(out.as_ptr(), data.as_ptr());
        let mut plain = SseScanner::default();
        assert_eq!(plain.pass(Bytes::from_static(STREAM)), STREAM);
        assert_eq!(plain.usage, Some(Usage::new(5, 6)));
    }

    #[test]
    fn an_event_too_long_to_hold_is_handed_on_and_stripping_stops() {
        let mut s = SseScanner::stripping();
        let long = vec![b'x'; MAX_LINE + 10];
        let mut out = s.pass(Bytes::from(long.clone())).to_vec();
        out.extend_from_slice(&s.pass(Bytes::from_static(b"\n\n")));
        assert_eq!(out.len(), long.len() + 2);
        assert!(s.strip.is_none());
    }
}

#[cfg(test)]
mod sse_properties {
    use super::*;
    use proptest::prelude::*;

    /// The events of a stream, as the upstream framed them.
    fn event() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z ]{0,12}".prop_map(|t| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}],\"usage\":null}}\n\n")),
            (0u64..1000, 0u64..1000).prop_map(|(p, c)| format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}\n\n")),
            Just(": keep-alive\n\n".to_owned()),
            Just("event: ping\r\ndata: {}\r\n\r\n".to_owned()),
            Just("data: [DONE]\n\n".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn stripping_removes_exactly_the_usage_chunks_however_the_stream_is_cut(
            events in prop::collection::vec(event(), 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let stream = events.concat();
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in at {
                chunks.push(&stream.as_bytes()[from..cut]);
                from = cut;
            }
            chunks.push(&stream.as_bytes()[from..]);
            let want: String = events
                .iter()
                .filter(|e| !e.contains("\"choices\":[],\"usage\":{"))
                .cloned()
                .collect();
            let last_usage = events.iter().rev().find_map(|e| {
                e.strip_prefix("data: ").filter(|d| d.contains("\"usage\":{")).and_then(|d| usage_of(d.trim().as_bytes()))
            });
            let (out, usage) = sse_pass(&chunks, true);
            prop_assert_eq!(String::from_utf8(out).unwrap(), want);
            prop_assert_eq!(usage, last_usage);
            let (plain, plain_usage) = sse_pass(&chunks, false);
            prop_assert_eq!(plain, stream.as_bytes());
            prop_assert_eq!(plain_usage, last_usage);
        }

        #[test]
        fn any_bytes_pass_without_panic_and_unstripped_untouched(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..6),
        ) {
            let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let (plain, _) = sse_pass(&chunks, false);
            prop_assert_eq!(&plain, &chunks.concat());
            let (stripped, _) = sse_pass(&chunks, true);
            prop_assert!(stripped.len() <= plain.len());
        }
    }
}
