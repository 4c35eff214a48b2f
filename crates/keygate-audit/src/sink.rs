//! Where audit events go: the [`AuditSink`] trait, and the small sinks (no-op, fan-out, channel).

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::event::AuditEvent;

/// Receives audit events. Implemented for closures `Fn(&AuditEvent)`.
///
/// Called on the request path (when a response body ends or is dropped): must not block. A sink
/// that does I/O hands events to a background writer through a bounded queue, like
/// [`JsonlSink`](crate::JsonlSink).
///
/// # Reservations
///
/// With [`Backpressure::FailClosed`](crate::Backpressure::FailClosed) the audit layer takes a
/// place for a request's record when it admits the request ([`AuditSink::try_reserve`]), and
/// later hands the record over with [`AuditSink::record_reserved`], or gives the place back
/// with [`AuditSink::release_reservation`] if no record comes. Every `true` from `try_reserve`
/// is followed by exactly one of the two. A sink that queues makes the reservation take a queue
/// slot, so a burst of requests cannot overrun the queue between admission and record. The
/// defaults suit sinks that never refuse (closures, [`TracingSink`](crate::TracingSink)).
pub trait AuditSink: Send + Sync + 'static {
    /// Takes one event.
    fn record(&self, event: &AuditEvent);

    /// Takes one event by value (sinks that queue events override this to avoid a copy).
    fn record_owned(&self, event: AuditEvent) {
        self.record(&event);
    }

    /// Whether the sink can take an event now. With
    /// [`Backpressure::FailClosed`](crate::Backpressure::FailClosed) the audit layer refuses
    /// requests with 503 while this is `false`.
    fn can_accept(&self) -> bool {
        true
    }

    /// Takes a place for one record to be given later with [`AuditSink::record_reserved`];
    /// `false` when the sink cannot promise to keep it (full, or failing to write).
    ///
    /// The default is [`AuditSink::can_accept`], which reserves nothing: sinks with a bounded
    /// queue override all three reservation methods.
    fn try_reserve(&self) -> bool {
        self.can_accept()
    }

    /// Takes the record a [`AuditSink::try_reserve`] made room for.
    fn record_reserved(&self, event: AuditEvent) {
        self.record_owned(event);
    }

    /// Gives back a place taken by [`AuditSink::try_reserve`] that no record will use.
    fn release_reservation(&self) {}
}

impl<F> AuditSink for F
where
    F: Fn(&AuditEvent) + Send + Sync + 'static,
{
    fn record(&self, event: &AuditEvent) {
        self(event)
    }
}

/// A sink that discards every event (metrics are still recorded by the layer).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopSink;

impl AuditSink for NoopSink {
    fn record(&self, _event: &AuditEvent) {}
    fn record_owned(&self, _event: AuditEvent) {}
}

/// Sends every event to several sinks.
///
/// Sinks added with [`FanOut::with`] are *required*: the fan-out can accept an event only when
/// all of them can. Sinks added with [`FanOut::with_optional`] never hold requests back.
#[derive(Default)]
pub struct FanOut {
    sinks: Vec<(Box<dyn AuditSink>, bool)>,
}

impl FanOut {
    /// A fan-out to no sink yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a required sink.
    #[must_use]
    pub fn with(mut self, sink: impl AuditSink) -> Self {
        self.sinks.push((Box::new(sink), true));
        self
    }

    /// Adds a sink whose backpressure is ignored (it drops and counts on its own).
    #[must_use]
    pub fn with_optional(mut self, sink: impl AuditSink) -> Self {
        self.sinks.push((Box::new(sink), false));
        self
    }

    /// How many sinks there are.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// Whether there is no sink.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }
}

impl std::fmt::Debug for FanOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanOut")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl AuditSink for FanOut {
    fn record(&self, event: &AuditEvent) {
        for (sink, _) in &self.sinks {
            sink.record(event);
        }
    }

    fn record_owned(&self, event: AuditEvent) {
        if let Some(((last, _), rest)) = self.sinks.split_last() {
            for (sink, _) in rest {
                sink.record(&event);
            }
            last.record_owned(event);
        }
    }

    fn can_accept(&self) -> bool {
        self.sinks
            .iter()
            .all(|(sink, required)| !required || sink.can_accept())
    }

    fn try_reserve(&self) -> bool {
        for (i, (sink, required)) in self.sinks.iter().enumerate() {
            if *required && !sink.try_reserve() {
                for (taken, required) in &self.sinks[..i] {
                    if *required {
                        taken.release_reservation();
                    }
                }
                return false;
            }
        }
        true
    }

    fn record_reserved(&self, event: AuditEvent) {
        let give = |sink: &dyn AuditSink, required: bool, event: AuditEvent| {
            if required {
                sink.record_reserved(event);
            } else {
                sink.record_owned(event);
            }
        };
        if let Some(((last, last_required), rest)) = self.sinks.split_last() {
            for (sink, required) in rest {
                give(&**sink, *required, event.clone());
            }
            give(&**last, *last_required, event);
        }
    }

    fn release_reservation(&self) {
        for (sink, required) in &self.sinks {
            if *required {
                sink.release_reservation();
            }
        }
    }
}

/// Counters of a queueing sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkStats {
    /// Events taken into the queue.
    pub accepted: u64,
    /// Events not recorded anywhere: the queue was full, the sink had shut down, or (file
    /// sinks) the output and the fallback both failed.
    pub dropped: u64,
    /// Events written out (file sinks: the write to the output succeeded) or received (channel
    /// sinks: accepted minus queued).
    pub written: u64,
    /// Events written to the fallback writer because the output kept failing (file sinks).
    pub fallback: u64,
    /// Failed attempts to write to the output (a rotation failure is one too). The lines of a
    /// failed attempt are kept and written again, or go to the fallback: an error alone loses
    /// nothing.
    pub write_errors: u64,
    /// Events waiting now: queued, reserved, or (file sinks) kept for a retry.
    pub queue_len: u64,
    /// The most events ever waiting in the queue.
    pub max_queue_len: u64,
    /// The queue's capacity.
    pub capacity: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) fallback: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) queued: AtomicI64,
    pub(crate) max_queued: AtomicI64,
}

impl Counters {
    /// Takes one of `capacity` slots; `false` when all are taken.
    pub(crate) fn take_slot(&self, capacity: usize) -> bool {
        let capacity = i64::try_from(capacity).unwrap_or(i64::MAX);
        match self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < capacity).then_some(q + 1)
            }) {
            Ok(before) => {
                self.max_queued.fetch_max(before + 1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Frees `n` slots (their events were written, diverted or dropped).
    pub(crate) fn free_slots(&self, n: usize) {
        self.queued
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    pub(crate) fn on_drop(&self, sink: &'static str) {
        self.on_drops(sink, 1);
    }

    pub(crate) fn on_drops(&self, sink: &'static str, n: u64) {
        if n > 0 {
            self.dropped.fetch_add(n, Ordering::Relaxed);
            crate::metrics::dropped(sink, n);
        }
    }

    pub(crate) fn stats(&self, capacity: usize) -> SinkStats {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        SinkStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            fallback: self.fallback.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            queue_len: n(self.queued.load(Ordering::Relaxed)),
            max_queue_len: n(self.max_queued.load(Ordering::Relaxed)),
            capacity: capacity as u64,
        }
    }
}

/// Hands events to user code through a bounded tokio channel.
///
/// A full (or closed) channel drops the event and counts it; [`AuditSink::can_accept`] is
/// `false` while the channel is full. A reservation ([`AuditSink::try_reserve`]) holds a free
/// place in the channel until its record comes: events sent without one do not take it.
#[derive(Debug, Clone)]
pub struct ChannelSink {
    tx: mpsc::Sender<AuditEvent>,
    counters: std::sync::Arc<Counters>,
    /// Places promised to reservations and not yet filled.
    reserved: std::sync::Arc<AtomicUsize>,
}

impl ChannelSink {
    /// A sink and the receiver of its events; the channel holds at most `capacity` events
    /// (at least 1).
    pub fn bounded(capacity: usize) -> (Self, mpsc::Receiver<AuditEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            ChannelSink {
                tx,
                counters: Default::default(),
                reserved: Default::default(),
            },
            rx,
        )
    }

    /// The sink's counters (`written` is events already taken off the channel).
    pub fn stats(&self) -> SinkStats {
        let capacity = self.tx.max_capacity();
        let queued = (capacity - self.tx.capacity()) as u64;
        let mut stats = self.counters.stats(capacity);
        stats.queue_len = queued + self.reserved.load(Ordering::Acquire) as u64;
        stats.written = stats.accepted.saturating_sub(queued);
        stats
    }

    fn send(&self, event: AuditEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                let queued = (self.tx.max_capacity() - self.tx.capacity()) as i64;
                self.counters
                    .max_queued
                    .fetch_max(queued, Ordering::Relaxed);
            }
            Err(_) => self.counters.on_drop("channel"),
        }
    }
}

impl AuditSink for ChannelSink {
    fn record(&self, event: &AuditEvent) {
        self.record_owned(event.clone());
    }

    fn record_owned(&self, event: AuditEvent) {
        if self.tx.capacity() > self.reserved.load(Ordering::Acquire) {
            self.send(event);
        } else {
            self.counters.on_drop("channel");
        }
    }

    fn can_accept(&self) -> bool {
        self.tx.capacity() > self.reserved.load(Ordering::Acquire)
    }

    fn try_reserve(&self) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < self.tx.capacity()).then_some(r + 1)
            })
            .is_ok()
    }

    fn record_reserved(&self, event: AuditEvent) {
        // Send before giving the place back, so no unreserved event takes it in between.
        self.send(event);
        self.release_reservation();
    }

    fn release_reservation(&self) {
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{Alert, AlertKind, KeyId, Timestamp};
    use std::sync::{Arc, Mutex};

    fn alert(reason: &str) -> AuditEvent {
        AuditEvent::Alert(Alert {
            at: Timestamp::UNIX_EPOCH,
            kind: AlertKind::KeySuspended,
            key_id: KeyId::new("key_a"),
            project: "p".into(),
            reason: reason.into(),
            message: String::new(),
        })
    }

    #[test]
    fn closures_are_sinks_and_fan_out_reaches_all() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (seen.clone(), seen.clone());
        let fan = FanOut::new()
            .with(move |e: &AuditEvent| a.lock().unwrap().push(("a", e.clone())))
            .with(move |e: &AuditEvent| b.lock().unwrap().push(("b", e.clone())));
        fan.record_owned(alert("x"));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "a");
        assert_eq!(seen[1].0, "b");
        assert_eq!(seen[1].1, alert("x"));
    }

    #[test]
    fn full_channel_drops_and_counts_and_refuses() {
        let (sink, mut rx) = ChannelSink::bounded(2);
        assert!(sink.can_accept());
        sink.record_owned(alert("1"));
        sink.record_owned(alert("2"));
        assert!(!sink.can_accept());
        sink.record_owned(alert("3"));
        let stats = sink.stats();
        assert_eq!((stats.accepted, stats.dropped, stats.queue_len), (2, 1, 2));
        assert_eq!(rx.try_recv().unwrap(), alert("1"));
        assert!(sink.can_accept());
        assert_eq!(sink.stats().written, 1);
    }

    #[test]
    fn fan_out_accepts_only_when_required_sinks_do() {
        let (full, _rx) = ChannelSink::bounded(1);
        full.record_owned(alert("fill"));
        let optional = FanOut::new().with(NoopSink).with_optional(full.clone());
        assert!(optional.can_accept());
        let required = FanOut::new().with(NoopSink).with(full);
        assert!(!required.can_accept());
    }
}
