//! Metrics through the `metrics` facade; install any recorder (Prometheus exporter) to see them.
//!
//! Every label has a bounded set of values, so the number of time series does not grow with
//! keys, projects, models or paths: usage by key belongs in the audit records and the store.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `keygate_requests_total` | counter | `decision` (`allowed`, `denied`, `unknown`), and for denials `stage`, `reason` |
//! | `keygate_tokens_total` | counter | `kind` (`prompt`, `completion`) |
//! | `keygate_cost_nanodollars_total` | counter | none |
//! | `keygate_request_duration_seconds` | histogram | `decision` |
//! | `keygate_response_head_seconds` | histogram | `decision` |
//! | `keygate_audit_events_dropped_total` | counter | `sink` (`jsonl`, `channel`) |
//! | `keygate_audit_events_fallback_total` | counter | `sink` (`jsonl`) |
//! | `keygate_audit_write_errors_total` | counter | `sink` |
//! | `keygate_alerts_total` | counter | `kind`, `reason` |
//!
//! Denial reasons are the layers' fixed codes. Endpoint groups and models are not labels:
//! models are named by clients, and a per-group split is in the audit records.
//!
//! Only with [`AuditLayer::with_key_metrics`](crate::AuditLayer::with_key_metrics) (off by
//! default; one series per key, unbounded):
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `keygate_key_requests_total` | counter | `key_id`, `project`, `endpoint_group`, `decision` |
//! | `keygate_key_tokens_total` | counter | `key_id`, `kind` |
//! | `keygate_key_cost_nanodollars_total` | counter | `key_id` |
//!
//! The layer keeps the handles of its fixed series, made at its first request: the request
//! path does not look them up in the recorder's registry (denials, with their reason, do).

use std::sync::Arc;

use keygate_core::{Alert, AlertKind};
use metrics::{
    Counter, Histogram, SharedString, Unit, counter, describe_counter, describe_histogram,
    histogram,
};

use crate::event::{Decision, RequestEvent};

/// Requests seen, by decision (and stage and reason for denials).
pub const REQUESTS_TOTAL: &str = "keygate_requests_total";
/// Tokens used, by kind.
pub const TOKENS_TOTAL: &str = "keygate_tokens_total";
/// Cost in nano-dollars.
pub const COST_TOTAL: &str = "keygate_cost_nanodollars_total";
/// Requests whose upstream reported more than was reserved for their worst case.
pub const OVER_RESERVATION_TOTAL: &str = "keygate_usage_over_reservation_total";
/// Requests by key, project and endpoint group (only with per-key metrics on).
pub const KEY_REQUESTS_TOTAL: &str = "keygate_key_requests_total";
/// Tokens used, by key and kind (only with per-key metrics on).
pub const KEY_TOKENS_TOTAL: &str = "keygate_key_tokens_total";
/// Cost in nano-dollars, by key (only with per-key metrics on).
pub const KEY_COST_TOTAL: &str = "keygate_key_cost_nanodollars_total";
/// Time from arrival to the end of the response body.
pub const REQUEST_DURATION: &str = "keygate_request_duration_seconds";
/// Time from arrival to the response head.
pub const RESPONSE_HEAD: &str = "keygate_response_head_seconds";
/// Audit events dropped by a sink (queue full, sink shut down, or output and fallback failed).
pub const DROPPED_TOTAL: &str = "keygate_audit_events_dropped_total";
/// Audit events written to a sink's fallback writer because its output kept failing.
pub const FALLBACK_TOTAL: &str = "keygate_audit_events_fallback_total";
/// Failed writes of a sink (their events are retried or go to the fallback).
pub const WRITE_ERRORS_TOTAL: &str = "keygate_audit_write_errors_total";
/// Alerts raised by layers.
pub const ALERTS_TOTAL: &str = "keygate_alerts_total";

/// Registers the descriptions and units of keygate's metrics with the installed recorder.
pub fn describe_metrics() {
    describe_counter!(REQUESTS_TOTAL, "Requests seen by keygate, by decision.");
    describe_counter!(TOKENS_TOTAL, "Tokens used, by kind.");
    describe_counter!(COST_TOTAL, "Cost in nano-dollars.");
    describe_counter!(
        OVER_RESERVATION_TOTAL,
        "Requests whose upstream reported more usage than keygate reserved for their worst case."
    );
    describe_counter!(KEY_REQUESTS_TOTAL, "Requests by key and endpoint group.");
    describe_counter!(KEY_TOKENS_TOTAL, "Tokens used, by key.");
    describe_counter!(KEY_COST_TOTAL, "Cost in nano-dollars, by key.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request to end of response body."
    );
    describe_histogram!(
        RESPONSE_HEAD,
        Unit::Seconds,
        "Time from request to response head."
    );
    describe_counter!(DROPPED_TOTAL, "Audit events a sink could not record.");
    describe_counter!(
        FALLBACK_TOTAL,
        "Audit events written to a sink's fallback writer."
    );
    describe_counter!(WRITE_ERRORS_TOTAL, "Failed writes of an audit sink.");
    describe_counter!(ALERTS_TOTAL, "Alerts raised by keygate layers.");
}

/// The handles of the fixed series, by decision where they have one.
pub(crate) struct Handles {
    allowed: Counter,
    unknown: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    cost: Counter,
    over_reservation: Counter,
    /// Indexed by [`decision_index`].
    duration: [Histogram; 3],
    head: [Histogram; 3],
}

const DECISIONS: [&str; 3] = ["allowed", "denied", "unknown"];

fn decision_index(decision: &Decision) -> usize {
    match decision {
        Decision::Allowed => 0,
        Decision::Denied { .. } => 1,
        Decision::Unknown => 2,
    }
}

impl Handles {
    pub(crate) fn new() -> Self {
        Handles {
            allowed: counter!(REQUESTS_TOTAL, "decision" => "allowed"),
            unknown: counter!(REQUESTS_TOTAL, "decision" => "unknown"),
            prompt_tokens: counter!(TOKENS_TOTAL, "kind" => "prompt"),
            completion_tokens: counter!(TOKENS_TOTAL, "kind" => "completion"),
            cost: counter!(COST_TOTAL),
            over_reservation: counter!(OVER_RESERVATION_TOTAL),
            duration: DECISIONS.map(|d| histogram!(REQUEST_DURATION, "decision" => d)),
            head: DECISIONS.map(|d| histogram!(RESPONSE_HEAD, "decision" => d)),
        }
    }
}

pub(crate) fn request(
    handles: &std::sync::OnceLock<Handles>,
    key_metrics: bool,
    event: &RequestEvent,
) {
    let h = handles.get_or_init(Handles::new);
    match &event.decision {
        Decision::Allowed => h.allowed.increment(1),
        Decision::Unknown => h.unknown.increment(1),
        Decision::Denied { stage, reason, .. } => counter!(
            REQUESTS_TOTAL,
            "decision" => "denied",
            "stage" => stage.as_str(),
            "reason" => reason.clone()
        )
        .increment(1),
    }
    if let Some(usage) = event.usage {
        h.prompt_tokens.increment(usage.prompt_tokens);
        h.completion_tokens.increment(usage.completion_tokens);
    }
    if let Some(cost) = event.cost {
        h.cost.increment(cost.as_nanos());
    }
    if event.over_reservation {
        h.over_reservation.increment(1);
    }
    let i = decision_index(&event.decision);
    h.duration[i].record(event.duration.as_secs_f64());
    if let Some(head) = event.time_to_head {
        h.head[i].record(head.as_secs_f64());
    }
    if key_metrics {
        per_key(event);
    }
}

/// The opt-in per-key series: a registry lookup per request and one series per key.
fn per_key(event: &RequestEvent) {
    let Some(key) = &event.key_id else {
        return;
    };
    // Shared strings: a label costs a reference count, not a copy of the text.
    let key: Arc<str> = key.clone().into();
    let group = match &event.endpoint_group {
        Some(g) => SharedString::from_shared(Arc::<str>::from(g.clone())),
        None => SharedString::const_str(""),
    };
    counter!(
        KEY_REQUESTS_TOTAL,
        "key_id" => key.clone(),
        "project" => event.project.clone().unwrap_or_default(),
        "endpoint_group" => group,
        "decision" => event.decision.as_str()
    )
    .increment(1);
    if let Some(usage) = event.usage {
        counter!(KEY_TOKENS_TOTAL, "key_id" => key.clone(), "kind" => "prompt")
            .increment(usage.prompt_tokens);
        counter!(KEY_TOKENS_TOTAL, "key_id" => key.clone(), "kind" => "completion")
            .increment(usage.completion_tokens);
    }
    if let Some(cost) = event.cost {
        counter!(KEY_COST_TOTAL, "key_id" => key).increment(cost.as_nanos());
    }
}

pub(crate) fn alert(alert: &Alert) {
    let kind = alert_kind(alert.kind);
    counter!(ALERTS_TOTAL, "kind" => kind, "reason" => alert.reason.clone()).increment(1);
}

pub(crate) fn dropped(sink: &'static str, n: u64) {
    counter!(DROPPED_TOTAL, "sink" => sink).increment(n);
}

pub(crate) fn fallback(sink: &'static str, n: u64) {
    counter!(FALLBACK_TOTAL, "sink" => sink).increment(n);
}

pub(crate) fn write_error(sink: &'static str) {
    counter!(WRITE_ERRORS_TOTAL, "sink" => sink).increment(1);
}

pub(crate) fn alert_kind(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::KeySuspended => "key_suspended",
        AlertKind::KeyReinstated => "key_reinstated",
        _ => "other",
    }
}
