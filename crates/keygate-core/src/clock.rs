//! Wall-clock time as every keygate layer sees it, injectable for tests.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An instant in UTC, in nanoseconds since the Unix epoch.
///
/// Serialized as an RFC 3339 string (`2026-01-31T12:00:00Z`). Comparisons and arithmetic are
/// plain integer operations, so checking an expiry on the hot path costs nothing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const UNIX_EPOCH: Timestamp = Timestamp(0);

    /// From nanoseconds since the Unix epoch.
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// From whole seconds since the Unix epoch.
    pub const fn from_unix_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_unix_nanos(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch (rounded down).
    pub const fn as_unix_secs(self) -> u64 {
        self.0 / 1_000_000_000
    }

    /// `self + d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_nanos(d)))
    }

    /// How long after `earlier` this instant is; zero if it is not after it.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This instant as a `time` date-time in UTC.
    pub fn to_offset_date_time(self) -> OffsetDateTime {
        // u64 nanoseconds end in year 2554, well inside `time`'s range.
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// From a `time` date-time; instants before the epoch clamp to it.
    pub fn from_offset_date_time(t: OffsetDateTime) -> Self {
        let nanos = t.unix_timestamp_nanos();
        Timestamp(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
    }

    /// Parses an RFC 3339 date-time (`2026-01-31T12:00:00Z`).
    ///
    /// # Errors
    ///
    /// When the text is not RFC 3339.
    pub fn parse_rfc3339(s: &str) -> Result<Self, time::error::Parse> {
        OffsetDateTime::parse(s, &Rfc3339).map(Self::from_offset_date_time)
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_offset_date_time().format(&Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "@{}ns", self.0),
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// The clock every keygate layer reads: the system clock, or a manual one that tests advance.
///
/// Cheap to clone; clones of a manual clock share its time. No layer reads the system time any
/// other way, so a test that injects a [`ManualClock`] never needs to sleep.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// The current instant.
    #[inline]
    pub fn now(&self) -> Timestamp {
        match &self.manual {
            None => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(duration_nanos)
                    .unwrap_or(0);
                Timestamp(nanos)
            }
            Some(t) => Timestamp(t.load(Ordering::Acquire)),
        }
    }

    /// Whether this is a manual (test) clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::System"),
            Some(_) => write!(f, "Clock::Manual({})", self.now()),
        }
    }
}

/// A clock that moves only when told to; hand [`ManualClock::clock`] to the layers under test.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// The [`Clock`] that reads this manual clock.
    pub fn clock(&self) -> Clock {
        Clock {
            manual: Some(self.now.clone()),
        }
    }

    /// The current reading.
    pub fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::Acquire))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_nanos(d), Ordering::AcqRel);
    }

    /// Sets the clock to `t` (it may move backwards, as real clocks sometimes do).
    pub fn set(&self, t: Timestamp) {
        self.now.store(t.0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(100));
        let clock = manual.clock();
        assert_eq!(clock.now(), Timestamp::from_unix_secs(100));
        manual.advance(Duration::from_millis(1500));
        assert_eq!(clock.now().as_unix_nanos(), 101_500_000_000);
        assert!(clock.is_manual());
    }

    #[test]
    fn timestamp_round_trips_through_rfc3339() {
        let t = Timestamp::parse_rfc3339("2026-03-01T00:00:00Z").unwrap();
        assert_eq!(t.as_unix_secs(), 1_772_323_200);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-03-01T00:00:00Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(Clock::system().now() > Timestamp::from_unix_secs(1_577_836_800));
    }
}
