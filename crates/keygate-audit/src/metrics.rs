//! Metrics through the `metrics` facade; install any recorder (Prometheus exporter) to see them.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `keygate_requests_total` | counter | `decision` (`allowed`, `denied`, `unknown`), and for denials `stage`, `reason` |
//! | `keygate_key_requests_total` | counter | `key_id`, `project`, `endpoint_group`, `decision` |
//! | `keygate_tokens_total` | counter | `key_id`, `kind` (`prompt`, `completion`) |
//! | `keygate_cost_nanodollars_total` | counter | `key_id` |
//! | `keygate_request_duration_seconds` | histogram | `decision` |
//! | `keygate_response_head_seconds` | histogram | `decision` |
//! | `keygate_audit_events_dropped_total` | counter | `sink` (`jsonl`, `channel`) |
//! | `keygate_audit_write_errors_total` | counter | `sink` |
//! | `keygate_alerts_total` | counter | `kind`, `reason` |

use std::sync::Arc;

use keygate_core::{Alert, AlertKind};
use metrics::{SharedString, Unit, counter, describe_counter, describe_histogram, histogram};

use crate::event::{Decision, RequestEvent};

/// Requests seen, by decision (and stage and reason for denials).
pub const REQUESTS_TOTAL: &str = "keygate_requests_total";
/// Requests by key, project and endpoint group.
pub const KEY_REQUESTS_TOTAL: &str = "keygate_key_requests_total";
/// Tokens used, by key and kind.
pub const TOKENS_TOTAL: &str = "keygate_tokens_total";
/// Cost in nano-dollars, by key.
pub const COST_TOTAL: &str = "keygate_cost_nanodollars_total";
/// Time from arrival to the end of the response body.
pub const REQUEST_DURATION: &str = "keygate_request_duration_seconds";
/// Time from arrival to the response head.
pub const RESPONSE_HEAD: &str = "keygate_response_head_seconds";
/// Audit events dropped by a sink (queue full or sink shut down).
pub const DROPPED_TOTAL: &str = "keygate_audit_events_dropped_total";
/// Audit events lost to write errors.
pub const WRITE_ERRORS_TOTAL: &str = "keygate_audit_write_errors_total";
/// Alerts raised by layers.
pub const ALERTS_TOTAL: &str = "keygate_alerts_total";

/// Registers the descriptions and units of keygate's metrics with the installed recorder.
pub fn describe_metrics() {
    describe_counter!(REQUESTS_TOTAL, "Requests seen by keygate, by decision.");
    describe_counter!(KEY_REQUESTS_TOTAL, "Requests by key and endpoint group.");
    describe_counter!(TOKENS_TOTAL, "Tokens used, by key.");
    describe_counter!(COST_TOTAL, "Cost in nano-dollars, by key.");
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
    describe_counter!(DROPPED_TOTAL, "Audit events dropped by a full sink.");
    describe_counter!(WRITE_ERRORS_TOTAL, "Audit events lost to write errors.");
    describe_counter!(ALERTS_TOTAL, "Alerts raised by keygate layers.");
}

pub(crate) fn request(event: &RequestEvent) {
    let decision = event.decision.as_str();
    match &event.decision {
        Decision::Allowed | Decision::Unknown => {
            counter!(REQUESTS_TOTAL, "decision" => decision).increment(1)
        }
        Decision::Denied { stage, reason, .. } => counter!(
            REQUESTS_TOTAL,
            "decision" => decision,
            "stage" => stage.as_str(),
            "reason" => reason.clone()
        )
        .increment(1),
    }
    if let Some(key) = &event.key_id {
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
            "decision" => decision
        )
        .increment(1);
        if let Some(usage) = event.usage {
            counter!(TOKENS_TOTAL, "key_id" => key.clone(), "kind" => "prompt")
                .increment(usage.prompt_tokens);
            counter!(TOKENS_TOTAL, "key_id" => key.clone(), "kind" => "completion")
                .increment(usage.completion_tokens);
        }
        if let Some(cost) = event.cost {
            counter!(COST_TOTAL, "key_id" => key).increment(cost.as_nanos());
        }
    }
    histogram!(REQUEST_DURATION, "decision" => decision).record(event.duration.as_secs_f64());
    if let Some(head) = event.time_to_head {
        histogram!(RESPONSE_HEAD, "decision" => decision).record(head.as_secs_f64());
    }
}

pub(crate) fn alert(alert: &Alert) {
    let kind = alert_kind(alert.kind);
    counter!(ALERTS_TOTAL, "kind" => kind, "reason" => alert.reason.clone()).increment(1);
}

pub(crate) fn dropped(sink: &'static str) {
    counter!(DROPPED_TOTAL, "sink" => sink).increment(1);
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
