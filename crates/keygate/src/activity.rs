//! [`Activity`]: what each key did, from the audit records: its usage per UTC day and model
//! (to be written to the store about once a second) and its last few decisions (in memory,
//! for the admin API and console).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use keygate_audit::{AuditEvent, AuditSink, Decision};
use keygate_core::{Money, Timestamp};
use keygate_store::UsageRow;
use serde::Serialize;

/// Decisions kept per key.
pub const RECENT_PER_KEY: usize = 20;

/// Keys whose recent decisions are kept; past it, the quarter seen longest ago is forgotten
/// (at once, so that forgetting costs a request nothing on average).
pub const RECENT_KEYS: usize = 10_000;

/// One decision on a request of a key, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentDecision {
    /// When the request came.
    pub at: Timestamp,
    /// Its request id.
    pub request_id: String,
    /// Its method.
    pub method: String,
    /// Its path (credential-shaped parts already redacted by the audit layer).
    pub path: String,
    /// The model it named.
    pub model: Option<String>,
    /// `allowed`, `denied` or `unknown`.
    pub decision: &'static str,
    /// Why it was denied (`model_not_allowed`, `budget_exceeded`, ...).
    pub reason: Option<String>,
    /// The response status.
    pub status: Option<u16>,
    /// What it cost.
    pub cost: Option<Money>,
}

#[derive(Default)]
struct State {
    usage: HashMap<(Arc<str>, u32, Arc<str>), UsageRow>,
    recent: HashMap<Arc<str>, (u64, VecDeque<RecentDecision>)>,
    /// Counts events, to tell which key was seen longest ago.
    tick: u64,
}

/// An [`AuditSink`] that keeps what each key did; cheap to clone (one shared state).
#[derive(Clone, Default)]
pub struct Activity {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

const NANOS_PER_DAY: u64 = 86_400 * 1_000_000_000;

impl Activity {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves counts, not broken invariants.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the usage counted since the last call (to add to the store).
    pub fn take_usage(&self) -> Vec<UsageRow> {
        let mut state = self.lock();
        std::mem::take(&mut state.usage).into_values().collect()
    }

    /// Gives back rows a write failed to store, to be tried again with the next ones.
    pub fn put_back(&self, rows: Vec<UsageRow>) {
        let mut state = self.lock();
        for row in rows {
            let key = (
                Arc::from(row.key_id.as_str()),
                row.day,
                Arc::from(row.model.as_str()),
            );
            match state.usage.get_mut(&key) {
                Some(have) => have.add(&row),
                None => {
                    state.usage.insert(key, row);
                }
            }
        }
    }

    /// The last decisions on `key_id`'s requests, newest first.
    pub fn recent(&self, key_id: &str) -> Vec<RecentDecision> {
        self.lock()
            .recent
            .get(key_id)
            .map(|(_, list)| list.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

impl AuditSink for Activity {
    fn record(&self, event: &AuditEvent) {
        let Some(e) = event.as_request() else {
            return;
        };
        let Some(key) = &e.key_id else {
            return;
        };
        let key: Arc<str> = key.clone().into();
        let day = u32::try_from(e.timestamp.as_unix_nanos() / NANOS_PER_DAY).unwrap_or(u32::MAX);
        let model: Arc<str> = e.model.clone().unwrap_or_else(|| Arc::from(""));
        let (decision, reason) = match &e.decision {
            Decision::Denied { reason, .. } => ("denied", Some(reason.clone())),
            other => (other.as_str(), None),
        };
        let recent = RecentDecision {
            at: e.timestamp,
            request_id: e.request_id.as_str().to_owned(),
            method: e.method.as_str().to_owned(),
            path: e.path.clone(),
            model: e.model.as_deref().map(str::to_owned),
            decision,
            reason,
            status: e.status,
            cost: e.cost,
        };
        let mut state = self.lock();
        let row = state
            .usage
            .entry((key.clone(), day, model.clone()))
            .or_insert_with(|| UsageRow {
                key_id: key.to_string(),
                day,
                model: model.to_string(),
                ..UsageRow::default()
            });
        row.requests += 1;
        row.denied += u64::from(decision == "denied");
        if let Some(u) = &e.usage {
            row.input_tokens += u.prompt_tokens;
            row.output_tokens += u.completion_tokens;
        }
        row.cost_nanos += e.cost.map_or(0, Money::as_nanos);
        state.tick += 1;
        let tick = state.tick;
        if !state.recent.contains_key(&key) {
            make_room(&mut state.recent, RECENT_KEYS);
        }
        let (seen, list) = state.recent.entry(key).or_default();
        *seen = tick;
        if list.len() == RECENT_PER_KEY {
            list.pop_front();
        }
        list.push_back(recent);
    }
}

/// Keys' recent decisions, each with the tick it was last seen at.
type Recent = HashMap<Arc<str>, (u64, VecDeque<RecentDecision>)>;

/// Room for one more key in `recent` (at most `capacity`): when full, forgets the quarter of
/// the keys seen longest ago, in one pass (the next quarter of new keys then costs nothing).
fn make_room(recent: &mut Recent, capacity: usize) {
    if recent.len() < capacity {
        return;
    }
    let mut seen: Vec<u64> = recent.values().map(|(tick, _)| *tick).collect();
    let cut = (seen.len() / 4).max(1) - 1;
    let (_, &mut threshold, _) = seen.select_nth_unstable(cut);
    recent.retain(|_, (tick, _)| *tick > threshold);
}

/// A sink whose events [`Activity`] sees first, by reference (no copy), whatever the sink
/// does with them; its backpressure is the sink's.
pub(crate) struct Watched {
    pub(crate) sink: Box<dyn AuditSink>,
    pub(crate) activity: Activity,
}

impl AuditSink for Watched {
    fn record(&self, event: &AuditEvent) {
        self.activity.record(event);
        self.sink.record(event);
    }
    fn record_owned(&self, event: AuditEvent) {
        self.activity.record(&event);
        self.sink.record_owned(event);
    }
    fn can_accept(&self) -> bool {
        self.sink.can_accept()
    }
    fn try_reserve(&self) -> bool {
        self.sink.try_reserve()
    }
    fn record_reserved(&self, event: AuditEvent) {
        self.activity.record(&event);
        self.sink.record_reserved(event);
    }
    fn release_reservation(&self) {
        self.sink.release_reservation();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_forgets_the_quarter_seen_longest_ago_at_once() {
        let mut recent = Recent::new();
        for tick in 0..8u64 {
            recent.insert(Arc::from(format!("k{tick}")), (tick, VecDeque::new()));
        }
        // k0 is seen again: it is now the newest.
        recent.get_mut("k0").unwrap().0 = 9;
        make_room(&mut recent, 10);
        assert_eq!(recent.len(), 8, "room enough: nothing forgotten");
        make_room(&mut recent, 8);
        let mut kept: Vec<&str> = recent.keys().map(|k| &**k).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["k0", "k3", "k4", "k5", "k6", "k7"]);
        // A table of one forgets that one.
        let mut one = Recent::new();
        one.insert(Arc::from("a"), (1, VecDeque::new()));
        make_room(&mut one, 1);
        assert!(one.is_empty());
    }
}
