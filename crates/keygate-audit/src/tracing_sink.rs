//! [`TracingSink`]: audit events as structured `tracing` events.

use crate::event::{AuditEvent, Decision};
use crate::sink::AuditSink;

/// Emits every audit event as a `tracing` event with target `keygate::audit`: allowed requests
/// at `INFO`, denials and alerts at `WARN`.
///
/// Every value is its own field (`request_id`, `key_id`, `path`, `decision`, `stage`, `reason`,
/// `status`, `duration_us`, ...), never one formatted blob, so a subscriber escapes each one and a
/// key name or model with `\r\n` in it cannot forge a log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingSink;

impl TracingSink {
    /// The sink.
    pub fn new() -> Self {
        TracingSink
    }
}

impl AuditSink for TracingSink {
    fn record(&self, event: &AuditEvent) {
        match event {
            AuditEvent::Request(r) => {
                let (stage, reason, detail) = match &r.decision {
                    Decision::Allowed | Decision::Unknown => (None, None, None),
                    Decision::Denied {
                        stage,
                        reason,
                        detail,
                    } => (Some(stage.as_str()), Some(reason.as_str()), *detail),
                };
                let usage = r.usage.unwrap_or_default();
                macro_rules! emit {
                    ($level:expr) => {
                        tracing::event!(
                            target: "keygate::audit",
                            $level,
                            request_id = r.request_id.as_str(),
                            timestamp = r.timestamp.as_unix_nanos(),
                            method = r.method.as_str(),
                            path = r.path.as_str(),
                            key_id = r.key_id.as_ref().map(|k| k.as_str()),
                            key_name = r.key_name.as_deref(),
                            project = r.project.as_deref(),
                            client_ip = r.client_ip.map(tracing::field::display),
                            endpoint_group = r.endpoint_group.as_ref().map(|g| g.as_str()),
                            model = r.model.as_deref(),
                            decision = r.decision.as_str(),
                            stage,
                            reason,
                            detail,
                            status = r.status,
                            completion = r.completion.as_str(),
                            time_to_head_us = r.time_to_head.map(|d| d.as_micros() as u64),
                            duration_us = r.duration.as_micros() as u64,
                            prompt_tokens = r.usage.map(|_| usage.prompt_tokens),
                            completion_tokens = r.usage.map(|_| usage.completion_tokens),
                            cost_nanodollars = r.cost.map(|c| c.as_nanos()),
                            cut = r.cut.map(|c| c.as_str()),
                            "request"
                        )
                    };
                }
                if r.decision.is_allowed() {
                    emit!(tracing::Level::INFO)
                } else {
                    emit!(tracing::Level::WARN)
                }
            }
            AuditEvent::Alert(a) => tracing::warn!(
                target: "keygate::audit",
                timestamp = a.at.as_unix_nanos(),
                kind = crate::metrics::alert_kind(a.kind),
                key_id = a.key_id.as_str(),
                project = a.project.as_str(),
                reason = a.reason.as_str(),
                message = a.message.as_str(),
                "alert"
            ),
        }
    }
}
