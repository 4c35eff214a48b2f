//! Bytes per key: resident memory (`VmRSS`) grown by holding N keys in a `MemoryStore`, and
//! by N keys active in the rate and token limit layers. Each case runs in a fresh child
//! process (this binary re-run with `KEYGATE_MEM_CASE`), so memory freed by one case cannot
//! hide the next one's. A counting global allocator would be more exact, but needs `unsafe`,
//! which the workspace forbids.
//!
//! `cargo bench -p keygate-benches --bench memory` (under `cargo test --benches`: 1k keys only)

use std::hint::black_box;
use std::num::NonZeroU64;
use std::process::Command;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, StatusCode};
use keygate_benches::{
    PROJECT, call, key_record, measuring, models_request, rss_bytes, rt_current_thread, upstream,
};
use keygate_core::{Credential, KeyDigest, Principal, ProjectRecord, Secret};
use keygate_limit::{RateLimitLayer, TokenLimitLayer};
use keygate_store::MemoryStore;
use tower::Layer;

const CASE_VAR: &str = "KEYGATE_MEM_CASE";
const SMALL_CHAT: &[u8] =
    br#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;

fn digest(i: usize) -> KeyDigest {
    KeyDigest::of(&format!("sk-kg-bench-{i}"))
}

fn principals(n: usize, token_limited: bool) -> Vec<Principal> {
    let project = Arc::new(ProjectRecord::new(PROJECT));
    (0..n)
        .map(|i| {
            let mut record = key_record(i, digest(i));
            if token_limited {
                record.limits.tokens_per_minute = NonZeroU64::new(u64::MAX / 4);
            }
            Principal::new(
                Arc::new(record),
                project.clone(),
                Credential::ApiKey(Secret::Current),
            )
        })
        .collect()
}

/// Runs one case in this process; returns the bytes its state grew resident memory by.
fn run_case(case: &str, n: usize) -> u64 {
    let rss = || rss_bytes().expect("/proc/self/status is readable");
    match case {
        "store" => {
            let before = rss();
            let store = MemoryStore::from_records(
                [ProjectRecord::new(PROJECT)],
                (0..n).map(|i| key_record(i, digest(i))),
            )
            .expect("valid records");
            let after = rss();
            black_box(&store);
            after.saturating_sub(before)
        }
        "rate" | "token" => {
            let token = case == "token";
            let principals = principals(n, token);
            let rt = rt_current_thread();
            let before = rss();
            let grown = rt.block_on(async {
                if token {
                    let mut svc = TokenLimitLayer::default().layer(upstream());
                    for p in &principals {
                        let mut req = Request::post("/v1/chat/completions")
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .body(Body::from(Bytes::from_static(SMALL_CHAT)))
                            .expect("a request");
                        req.extensions_mut().insert(p.clone());
                        assert_eq!(call(&mut svc, req).await, StatusCode::OK);
                    }
                    let after = rss();
                    black_box(&svc);
                    after
                } else {
                    let mut svc = RateLimitLayer::new().layer(upstream());
                    for p in &principals {
                        let mut req = models_request();
                        req.extensions_mut().insert(p.clone());
                        assert_eq!(call(&mut svc, req).await, StatusCode::OK);
                    }
                    let after = rss();
                    black_box(&svc);
                    after
                }
            });
            grown.saturating_sub(before)
        }
        other => panic!("unknown case {other}"),
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CASE_VAR) {
        let (case, n) = spec.split_once(':').expect("case:n");
        let n: usize = n.parse().expect("a count");
        println!("{}", run_case(case, n));
        return;
    }
    let sizes: &[usize] = if measuring() {
        &[1_000, 100_000, 1_000_000]
    } else {
        &[1_000]
    };
    let exe = std::env::current_exe().expect("own path");
    println!("\n## keygate memory per key (resident memory grown / keys)\n");
    println!(
        "| what | {} |",
        sizes
            .iter()
            .map(|n| format!("{n} keys"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("| --- |{}", " --- |".repeat(sizes.len()));
    for (label, case) in [
        ("MemoryStore (records + indexes)", "store"),
        ("rate limit layer, keys active", "rate"),
        ("token limit layer, keys active (token rate)", "token"),
    ] {
        let mut cells = Vec::new();
        for &n in sizes {
            let out = Command::new(&exe)
                .env(CASE_VAR, format!("{case}:{n}"))
                .output()
                .expect("run a case");
            assert!(
                out.status.success(),
                "case {case}:{n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bytes: u64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("bytes");
            cells.push(format!("{:.0} B", bytes as f64 / n as f64));
        }
        println!("| {label} | {} |", cells.join(" | "));
    }
    println!("\n(at 1k keys the figure is dominated by allocator and page granularity)");
}
