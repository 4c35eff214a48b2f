//! Values the layers hand each other in `http::Extensions`.
//!
//! Request extensions: [`Principal`](crate::Principal) (extraction layer), [`EndpointMatch`],
//! [`RequestedModel`] and [`ClientIp`] (scope layer), [`UsageMeter`] (audit layer, or whoever
//! is outermost). Response extensions: [`Denial`](crate::Denial) (any layer that refuses) and
//! [`Usage`] (a handler that knows what it used).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::key::KeyId;
use crate::limits::Money;
use crate::rights::{Access, EndpointGroup};

/// The endpoint group a request belongs to and the access it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMatch {
    /// The group.
    pub group: EndpointGroup,
    /// The access the request needs.
    pub access: Access,
    /// The route pattern that matched (`/v1/chat/completions`, `/v1/files/{id}`).
    pub route: Arc<str>,
}

/// The model a request asks for, wherever the API put it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestedModel(Arc<str>);

impl RequestedModel {
    /// Wraps a model name.
    pub fn new(model: impl Into<Arc<str>>) -> Self {
        RequestedModel(model.into())
    }

    /// The model name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client's address as keygate decided it (after trusted proxies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

/// Tokens a request used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub completion_tokens: u64,
    /// All tokens (usually the sum; kept as reported).
    pub total_tokens: u64,
}

impl Usage {
    /// Usage with the total computed from its parts.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

const HAS_USAGE: u8 = 1;
const HAS_COST: u8 = 2;
const REPORTED: u8 = 4;
const ESTIMATED: u8 = 8;
const OVER_RESERVATION: u8 = 16;

/// Where a request's settled usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UsageSource {
    /// The upstream (or the handler) reported it.
    Reported,
    /// Nothing was reported: the reservation (keygate's worst case) was charged.
    Estimated,
}

/// Where the final usage and cost of a request are reported, so an outer layer can read
/// what an inner one measured (even after a streamed body ends).
///
/// The outermost keygate layer puts one in request extensions; the token limit layer reports
/// the settled usage and cost into it; a handler may report usage into it too. Cheap to clone
/// (shared cell); lock-free.
#[derive(Debug, Clone, Default)]
pub struct UsageMeter(Arc<MeterCell>);

#[derive(Debug, Default)]
struct MeterCell {
    flags: AtomicU8,
    prompt: AtomicU64,
    completion: AtomicU64,
    total: AtomicU64,
    cost_nanos: AtomicU64,
}

impl UsageMeter {
    /// An empty meter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the request's usage (the last report wins).
    pub fn report_usage(&self, usage: Usage) {
        let c = &self.0;
        c.prompt.store(usage.prompt_tokens, Ordering::Relaxed);
        c.completion
            .store(usage.completion_tokens, Ordering::Relaxed);
        c.total.store(usage.total_tokens, Ordering::Relaxed);
        c.flags.fetch_or(HAS_USAGE, Ordering::Release);
    }

    /// Records the request's cost (the last report wins).
    pub fn report_cost(&self, cost: Money) {
        self.0.cost_nanos.store(cost.as_nanos(), Ordering::Relaxed);
        self.0.flags.fetch_or(HAS_COST, Ordering::Release);
    }

    /// Records where the usage came from (the last report wins).
    pub fn report_source(&self, source: UsageSource) {
        let (set, clear) = match source {
            UsageSource::Reported => (REPORTED, ESTIMATED),
            UsageSource::Estimated => (ESTIMATED, REPORTED),
        };
        self.0.flags.fetch_and(!clear, Ordering::Relaxed);
        self.0.flags.fetch_or(set, Ordering::Release);
    }

    /// Records that the usage reported was more than was reserved for the request.
    pub fn flag_over_reservation(&self) {
        self.0.flags.fetch_or(OVER_RESERVATION, Ordering::Release);
    }

    /// Where the usage came from, if that was reported.
    pub fn source(&self) -> Option<UsageSource> {
        let flags = self.0.flags.load(Ordering::Acquire);
        if flags & REPORTED != 0 {
            Some(UsageSource::Reported)
        } else if flags & ESTIMATED != 0 {
            Some(UsageSource::Estimated)
        } else {
            None
        }
    }

    /// Whether the usage reported was more than was reserved.
    pub fn over_reservation(&self) -> bool {
        self.0.flags.load(Ordering::Acquire) & OVER_RESERVATION != 0
    }

    /// The usage reported, if any.
    pub fn usage(&self) -> Option<Usage> {
        let c = &self.0;
        (c.flags.load(Ordering::Acquire) & HAS_USAGE != 0).then(|| Usage {
            prompt_tokens: c.prompt.load(Ordering::Relaxed),
            completion_tokens: c.completion.load(Ordering::Relaxed),
            total_tokens: c.total.load(Ordering::Relaxed),
        })
    }

    /// The cost reported, if any.
    pub fn cost(&self) -> Option<Money> {
        let c = &self.0;
        (c.flags.load(Ordering::Acquire) & HAS_COST != 0)
            .then(|| Money::from_nanos(c.cost_nanos.load(Ordering::Relaxed)))
    }
}

/// What kind of alert a layer raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// A key was suspended (for example by the denial-of-wallet guard).
    KeySuspended,
    /// A suspended key was reinstated.
    KeyReinstated,
}

/// An event a layer raises outside any one request's outcome (a key suspended for a spend
/// spike). The audit layer records these as events of their own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// When.
    pub at: Timestamp,
    /// What.
    pub kind: AlertKind,
    /// Which key.
    pub key_id: KeyId,
    /// The key's project.
    pub project: String,
    /// A short machine-readable reason (`spend_spike`, `token_spike`).
    pub reason: String,
    /// A human explanation (never anything secret).
    pub message: String,
}

/// Receives alerts. Implemented for closures `Fn(Alert)`.
pub trait AlertSink: Send + Sync + 'static {
    /// Takes one alert; must not block.
    fn alert(&self, alert: Alert);
}

impl<F> AlertSink for F
where
    F: Fn(Alert) + Send + Sync + 'static,
{
    fn alert(&self, alert: Alert) {
        self(alert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_reports_are_seen_by_clones() {
        let meter = UsageMeter::new();
        assert_eq!(meter.usage(), None);
        assert_eq!(meter.cost(), None);
        let clone = meter.clone();
        clone.report_usage(Usage::new(10, 5));
        clone.report_cost(Money::from_nanos(42));
        assert_eq!(meter.usage(), Some(Usage::new(10, 5)));
        assert_eq!(meter.usage().unwrap().total_tokens, 15);
        assert_eq!(meter.cost(), Some(Money::from_nanos(42)));
        assert_eq!(meter.source(), None);
        assert!(!meter.over_reservation());
        clone.report_source(UsageSource::Estimated);
        clone.report_source(UsageSource::Reported);
        clone.flag_over_reservation();
        assert_eq!(meter.source(), Some(UsageSource::Reported));
        assert!(meter.over_reservation());
    }

    #[test]
    fn closures_are_alert_sinks() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let sink = move |a: Alert| seen2.lock().unwrap().push(a.reason);
        fn deliver(sink: &dyn AlertSink, alert: Alert) {
            sink.alert(alert);
        }
        deliver(
            &sink,
            Alert {
                at: Timestamp::UNIX_EPOCH,
                kind: AlertKind::KeySuspended,
                key_id: KeyId::new("key_x"),
                project: "p".into(),
                reason: "spend_spike".into(),
                message: String::new(),
            },
        );
        assert_eq!(seen.lock().unwrap().as_slice(), ["spend_spike"]);
    }
}
