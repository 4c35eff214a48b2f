//! The request-facts scanner over ordinary and adversarial bodies, 1 KiB to 8 MiB: its cost
//! must stay linear in the body (adversarial shapes within a small factor of ordinary ones).
//!
//! `cargo bench -p keygate-core --bench facts`
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keygate_core::facts::scan_json;

/// A chat request of about `size` bytes: messages of ordinary text.
fn ordinary(size: usize) -> Vec<u8> {
    let sentence = "The quick brown fox jumps over the lazy dog, again and again. ";
    let mut messages = Vec::new();
    let mut len = 0;
    while len + 200 < size {
        let text = sentence.repeat(3);
        len += text.len() + 40;
        messages.push(format!(r#"{{"role":"user","content":"{text}"}}"#));
    }
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":256,"stream":true,"messages":[{}]}}"#,
        messages.join(",")
    )
    .into_bytes()
}

/// A chat request whose text quotes now and then (an escaped quote every ~40 bytes): the
/// body of the stack benchmarks.
fn quoting(size: usize) -> Vec<u8> {
    let content =
        r#"Explain \"tower\" middleware in Rust: layers, services, and back-pressure. "#.repeat(4);
    let mut messages = Vec::new();
    let mut len = 0;
    while len + content.len() + 80 < size {
        len += content.len() + 30;
        messages.push(format!(r#"{{"role":"user","content":"{content}"}}"#));
    }
    format!(
        r#"{{"messages":[{}],"max_tokens":64,"model":"gpt-4o-mini"}}"#,
        messages.join(",")
    )
    .into_bytes()
}

/// Many distinct keys in the top-level object (quadratic for a naive duplicate check).
fn many_keys(size: usize) -> Vec<u8> {
    let mut out = String::from(r#"{"model":"gpt-4o-mini""#);
    let mut i = 0u64;
    while out.len() + 16 < size {
        out.push_str(&format!(r#","k{i}":1"#));
        i += 1;
    }
    out.push('}');
    out.into_bytes()
}

/// Nesting as deep as allowed, again and again.
fn deep(size: usize) -> Vec<u8> {
    let unit = format!("{}{}", "[".repeat(120), "]".repeat(120));
    let mut items = Vec::new();
    let mut len = 0;
    while len + unit.len() + 40 < size {
        len += unit.len() + 1;
        items.push(unit.clone());
    }
    format!(r#"{{"model":"gpt-4o-mini","x":[{}]}}"#, items.join(",")).into_bytes()
}

/// One long string.
fn long_string(size: usize) -> Vec<u8> {
    format!(
        r#"{{"model":"gpt-4o-mini","input":"{}"}}"#,
        "a".repeat(size.saturating_sub(40))
    )
    .into_bytes()
}

/// Escapes everywhere: `\"`, `\\` and `\u` sequences.
fn escapes(size: usize) -> Vec<u8> {
    let unit = r#"\"\\\u00e9\n"#;
    format!(
        r#"{{"model":"gpt-4o-mini","input":"{}"}}"#,
        unit.repeat(size.saturating_sub(40) / unit.len())
    )
    .into_bytes()
}

/// Many keys that all need decoding (escaped), in nested objects.
fn escaped_keys(size: usize) -> Vec<u8> {
    let mut out = String::from(r#"{"model":"gpt-4o-mini","x":{"#);
    let mut i = 0u64;
    while out.len() + 24 < size {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#""\u006b{i}":1"#));
        i += 1;
    }
    out.push_str("}}");
    out.into_bytes()
}

fn facts(c: &mut Criterion) {
    type Shape = fn(usize) -> Vec<u8>;
    let shapes: [(&str, Shape); 7] = [
        ("ordinary", ordinary),
        ("quoting", quoting),
        ("many_keys", many_keys),
        ("deep", deep),
        ("long_string", long_string),
        ("escapes", escapes),
        ("escaped_keys", escaped_keys),
    ];
    let mut g = c.benchmark_group("facts_scan");
    for size in [1 << 10, 4 << 10, 1 << 20, 8 << 20] {
        if size >= 1 << 20 {
            g.sample_size(10);
        }
        for (name, make) in shapes {
            let body = make(size);
            let fields = scan_json(&body).expect("the bench bodies are valid");
            assert_eq!(fields.model.as_deref(), Some("gpt-4o-mini"), "{name}");
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_with_input(BenchmarkId::new(name, size), &body, |b, body| {
                b.iter(|| black_box(scan_json(black_box(body)).is_ok()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, facts);
criterion_main!(benches);
