//! Limits a key or project carries: request and token rates, and money budgets per period.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{Date, Duration as TimeDuration, Month, Time};

use crate::clock::Timestamp;
use crate::rights::ModelPattern;

/// An amount of money in US dollars, held as whole nano-dollars so sums never drift.
///
/// A price of $0.15 per million tokens is 150 nano-dollars per token. In config, written as a
/// number (`50`, `12.5`) or a string (`"12.50"`, `"$12.50"`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(u64);

/// Text that is not an amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an amount of money: expected a non-negative decimal number of dollars")]
pub struct MoneyParseError;

impl Money {
    /// Nothing.
    pub const ZERO: Money = Money(0);

    /// From nano-dollars.
    pub const fn from_nanos(nanos: u64) -> Self {
        Money(nanos)
    }

    /// From micro-dollars.
    pub const fn from_micros(micros: u64) -> Self {
        Money(micros.saturating_mul(1_000))
    }

    /// From whole dollars.
    pub const fn from_dollars(dollars: u64) -> Self {
        Money(dollars.saturating_mul(1_000_000_000))
    }

    /// Nano-dollars.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Dollars as a float, for display and metrics.
    pub fn as_dollars_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// `self + other`, saturating.
    pub const fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// `self - other`, saturating at zero.
    pub const fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// Parses a decimal amount of dollars, with an optional leading `$`; at most 9 decimals.
    ///
    /// # Errors
    ///
    /// [`MoneyParseError`] for anything else (negative, exponent, too many decimals, overflow).
    pub fn parse(s: &str) -> Result<Self, MoneyParseError> {
        let s = s.trim();
        let s = s.strip_prefix('$').unwrap_or(s);
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty()
            || frac.len() > 9
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(MoneyParseError);
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| MoneyParseError)?
        };
        let mut frac_nanos: u64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_nanos += u64::from(b - b'0') * 10u64.pow(8 - i as u32);
        }
        whole
            .checked_mul(1_000_000_000)
            .and_then(|w| w.checked_add(frac_nanos))
            .map(Money)
            .ok_or(MoneyParseError)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000_000;
        let frac = self.0 % 1_000_000_000;
        if frac == 0 {
            write!(f, "${whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "${whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A string keeps the exact value; `Display` minus the dollar sign.
        let text = self.to_string();
        serializer.serialize_str(&text[1..])
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative amount of dollars")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Money, E> {
                v.checked_mul(1_000_000_000)
                    .map(Money)
                    .ok_or_else(|| E::custom(MoneyParseError))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Money, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(MoneyParseError))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Money, E> {
                if !(0.0..1.8e10).contains(&v) {
                    return Err(E::custom(MoneyParseError));
                }
                Ok(Money((v * 1e9).round() as u64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The period a budget covers. Periods reset at calendar boundaries in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// From 00:00 UTC to the next 00:00 UTC.
    Day,
    /// From Monday 00:00 UTC to the next Monday.
    Week,
    /// From the first of the month 00:00 UTC to the first of the next.
    Month,
    /// Never resets.
    Lifetime,
}

impl Period {
    /// The window `[start, end)` of this period that holds `now`; `end` is `None` for
    /// [`Period::Lifetime`].
    pub fn window(self, now: Timestamp) -> (Timestamp, Option<Timestamp>) {
        let t = now.to_offset_date_time();
        let date = t.date();
        let at_midnight =
            |d: Date| Timestamp::from_offset_date_time(d.with_time(Time::MIDNIGHT).assume_utc());
        match self {
            Period::Lifetime => (Timestamp::UNIX_EPOCH, None),
            Period::Day => {
                let start = at_midnight(date);
                let end = date.next_day().map(at_midnight);
                (start, end)
            }
            Period::Week => {
                let back = i64::from(date.weekday().number_days_from_monday());
                let monday = date.saturating_sub(TimeDuration::days(back));
                let next = monday.saturating_add(TimeDuration::days(7));
                (at_midnight(monday), Some(at_midnight(next)))
            }
            Period::Month => {
                let first = Date::from_calendar_date(date.year(), date.month(), 1).unwrap_or(date);
                let (y, m) = match date.month() {
                    Month::December => (date.year() + 1, Month::January),
                    m => (date.year(), m.next()),
                };
                let next = Date::from_calendar_date(y, m, 1).ok().map(at_midnight);
                (at_midnight(first), next)
            }
        }
    }

    /// The start of the window holding `now`: a stable identity for "this period".
    pub fn window_start(self, now: Timestamp) -> Timestamp {
        self.window(now).0
    }
}

/// A money budget over a period, for all models or for those matching a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The most that may be spent in one period.
    pub amount: Money,
    /// The period.
    pub period: Period,
    /// When set, the budget counts only spend on matching models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelPattern>,
}

/// Rate limits that apply to one model (or models matching a pattern).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Requests per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<NonZeroU64>,
}

/// Limits of a key or a project. Every limit that applies to a request must hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute, over all models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute, over all models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<NonZeroU64>,
    /// Money budgets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<Budget>,
    /// Rate limits per model pattern (`"gpt-4*" = { requests_per_minute = 10 }`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelLimits>,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.budgets.is_empty()
            && self.models.is_empty()
    }

    /// The per-model limits whose pattern matches `model` (patterns that fail to parse match
    /// nothing; records are validated when loaded).
    pub fn for_model<'a>(
        &'a self,
        model: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a ModelLimits)> + 'a {
        self.models.iter().filter_map(move |(pattern, limits)| {
            let matches = match pattern.strip_suffix('*') {
                Some(prefix) => {
                    model.len() >= prefix.len()
                        && model.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
                }
                None => model.eq_ignore_ascii_case(pattern),
            };
            matches.then_some((pattern.as_str(), limits))
        })
    }

    /// Checks that every per-model pattern parses.
    ///
    /// # Errors
    ///
    /// The first pattern that does not.
    pub fn validate(&self) -> Result<(), crate::rights::ModelPatternError> {
        for pattern in self.models.keys() {
            ModelPattern::new(pattern)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn money_parses_exactly() {
        assert_eq!(
            Money::parse("12.50").unwrap(),
            Money::from_micros(12_500_000)
        );
        assert_eq!(
            Money::parse("$0.000000150").unwrap(),
            Money::from_nanos(150)
        );
        assert_eq!(Money::parse(".5").unwrap(), Money::from_micros(500_000));
        assert!(Money::parse("-1").is_err());
        assert!(Money::parse("1e3").is_err());
        assert!(Money::parse("0.0000000001").is_err());
        assert!(Money::parse("").is_err());
        assert!(Money::parse("99999999999999999999").is_err());
        assert_eq!(Money::from_micros(12_500_000).to_string(), "$12.5");
    }

    #[test]
    fn money_deserializes_from_numbers_and_strings() {
        #[derive(Deserialize)]
        struct W {
            a: Money,
            b: Money,
            c: Money,
        }
        let w: W = toml::from_str("a = 50\nb = 0.45\nc = \"$1.25\"").unwrap();
        assert_eq!(w.a, Money::from_dollars(50));
        assert_eq!(w.b, Money::from_micros(450_000));
        assert_eq!(w.c, Money::from_micros(1_250_000));
        assert!(toml::from_str::<W>("a = -1\nb = 0\nc = 0").is_err());
        let json = serde_json::to_string(&Money::from_micros(450_000)).unwrap();
        assert_eq!(json, "\"0.45\"");
    }

    #[test]
    fn day_window_is_utc_midnight_to_midnight() {
        let (start, end) = Period::Day.window(ts("2026-11-23T23:59:59Z"));
        assert_eq!(start, ts("2026-11-23T00:00:00Z"));
        assert_eq!(end, Some(ts("2026-11-24T00:00:00Z")));
    }

    #[test]
    fn week_window_starts_monday() {
        // 2026-11-29 is a Sunday.
        let (start, end) = Period::Week.window(ts("2026-11-29T12:00:00Z"));
        assert_eq!(start, ts("2026-11-23T00:00:00Z"));
        assert_eq!(end, Some(ts("2026-11-30T00:00:00Z")));
    }

    #[test]
    fn month_window_rolls_over_the_year() {
        let (start, end) = Period::Month.window(ts("2026-12-31T23:00:00Z"));
        assert_eq!(start, ts("2026-12-01T00:00:00Z"));
        assert_eq!(end, Some(ts("2027-01-01T00:00:00Z")));
        let (start, _) = Period::Month.window(ts("2024-02-29T10:00:00Z"));
        assert_eq!(start, ts("2024-02-01T00:00:00Z"));
    }

    #[test]
    fn lifetime_never_ends() {
        assert_eq!(Period::Lifetime.window(ts("2026-01-01T00:00:00Z")).1, None);
    }

    #[test]
    fn per_model_limits_match_patterns() {
        let limits: Limits = toml::from_str(
            "requests_per_minute = 60\n[models.\"gpt-4*\"]\nrequests_per_minute = 5\n[models.\"gpt-4o-mini\"]\ntokens_per_minute = 1000",
        )
        .unwrap();
        let hits: Vec<_> = limits.for_model("gpt-4o-mini").map(|(p, _)| p).collect();
        assert_eq!(hits, ["gpt-4*", "gpt-4o-mini"]);
        assert_eq!(limits.for_model("o1").count(), 0);
        assert!(limits.validate().is_ok());
        assert!(toml::from_str::<Limits>("requests_per_minute = 0").is_err());
    }
}
