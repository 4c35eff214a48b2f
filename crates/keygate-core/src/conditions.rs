//! Policy conditions as data: time windows, required labels and groups, and endpoint groups
//! or models reserved to the members of a group.
//!
//! A [`Condition`] lives in a key's or a project's record (`policies`), in the gateway's
//! config (`[[policies]]`) or in code (`keygate_scope::ScopeLayer::with_policy`); the scope
//! layer checks every one that applies to a request, after the built-in checks. Each has
//! three equivalent spellings: JSON and TOML (`{"type": "members_only", "group": "research",
//! "models": ["o1*"]}`), and one line of text for the command line and the console
//! ([`Condition::from_str`], [`Display`](fmt::Display)):
//!
//! | line | means |
//! |---|---|
//! | `time_window mon-fri 09:00-17:30` | only on those days, between those times (UTC) |
//! | `time_window sat,sun 00:00-00:00 group=interns` | the same, for keys in group `interns` only (`00:00-00:00` is all day) |
//! | `require_label env=prod`, `require_label team` | the key (or its project) carries the label |
//! | `require_group ml` | the key is in the group |
//! | `members_only research models=o1*,gpt-4o endpoints=fine_tuning` | those models and endpoint groups only for members of `research` |
//!
//! ```
//! use keygate_core::Condition;
//!
//! let c: Condition = "members_only research models=o1*".parse()?;
//! assert_eq!(c.to_string(), "members_only research models=o1*");
//! assert_eq!(
//!     serde_json::to_string(&c)?,
//!     r#"{"type":"members_only","group":"research","models":["o1*"]}"#
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{Time, Weekday};

use crate::clock::Timestamp;
use crate::record::{KeyRecord, ProjectRecord};
use crate::rights::ModelPattern;

/// Why a condition refuses a request: a reason code and a message the client may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// `outside_time_window`, `label_required`, `group_required` or `members_only`.
    pub code: &'static str,
    /// Says nothing secret.
    pub message: &'static str,
}

/// What a condition looks at.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The key.
    pub key: &'a KeyRecord,
    /// Its project.
    pub project: &'a ProjectRecord,
    /// The endpoint group of the request's route.
    pub endpoint: &'a str,
    /// The model the request uses, if any.
    pub model: Option<&'a str>,
    /// Now.
    pub now: Timestamp,
}

impl Subject<'_> {
    fn in_group(&self, group: &str) -> bool {
        self.key.groups.iter().any(|g| g == group)
    }
}

/// One condition a request must meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Condition {
    /// [`TimeWindow`].
    TimeWindow(TimeWindow),
    /// [`RequireLabel`].
    RequireLabel(RequireLabel),
    /// [`RequireGroup`].
    RequireGroup(RequireGroup),
    /// [`MembersOnly`].
    MembersOnly(MembersOnly),
}

impl Condition {
    /// Allows (`Ok`) or refuses the request.
    ///
    /// # Errors
    ///
    /// The refusal, with the condition's reason code.
    pub fn check(&self, s: &Subject<'_>) -> Result<(), Refusal> {
        match self {
            Condition::TimeWindow(c) => c.check(s),
            Condition::RequireLabel(c) => c.check(s),
            Condition::RequireGroup(c) => c.check(s),
            Condition::MembersOnly(c) => c.check(s),
        }
    }

    /// Checks what serde cannot: names are not empty, a window has days, a members-only
    /// condition reserves something.
    ///
    /// # Errors
    ///
    /// A message naming the fault.
    pub fn validate(&self) -> Result<(), String> {
        let named = |what: &str, s: &str| {
            if s.trim().is_empty() || s.chars().any(char::is_whitespace) {
                Err(format!("{what} must be a name without spaces, not {s:?}"))
            } else {
                Ok(())
            }
        };
        match self {
            Condition::TimeWindow(w) => {
                if w.days.0 == 0 {
                    return Err("a time window needs at least one day".into());
                }
                w.group.as_deref().map_or(Ok(()), |g| named("group", g))
            }
            Condition::RequireLabel(l) => {
                named("label", &l.key)?;
                match &l.value {
                    Some(v) if v.chars().any(char::is_whitespace) || v.is_empty() => Err(format!(
                        "label value must be a word without spaces, not {v:?}"
                    )),
                    _ => Ok(()),
                }
            }
            Condition::RequireGroup(g) => named("group", &g.group),
            Condition::MembersOnly(m) => {
                named("group", &m.group)?;
                for e in &m.endpoints {
                    named("endpoint group", e)?;
                }
                if m.endpoints.is_empty() && m.models.is_empty() {
                    return Err(format!(
                        "members_only {} reserves nothing: give models or endpoints",
                        m.group
                    ));
                }
                Ok(())
            }
        }
    }

    /// The groups a model (or model pattern, as written in a rule) is reserved to by the
    /// members-only conditions in `conditions`: empty means everyone the rules allow.
    pub fn reserved_to<'a>(
        conditions: impl IntoIterator<Item = &'a Condition>,
        model: &str,
    ) -> Vec<&'a str> {
        let mut groups: Vec<&str> = conditions
            .into_iter()
            .filter_map(|c| match c {
                Condition::MembersOnly(m)
                    if m.models
                        .iter()
                        .any(|p| p.as_str() == model || p.matches(model)) =>
                {
                    Some(m.group.as_str())
                }
                _ => None,
            })
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }
}

impl From<TimeWindow> for Condition {
    fn from(c: TimeWindow) -> Self {
        Condition::TimeWindow(c)
    }
}
impl From<RequireLabel> for Condition {
    fn from(c: RequireLabel) -> Self {
        Condition::RequireLabel(c)
    }
}
impl From<RequireGroup> for Condition {
    fn from(c: RequireGroup) -> Self {
        Condition::RequireGroup(c)
    }
}
impl From<MembersOnly> for Condition {
    fn from(c: MembersOnly) -> Self {
        Condition::MembersOnly(c)
    }
}

/// A set of weekdays, written as a list of names (`["mon", "tue"]`; full English names are
/// read too).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Weekdays(u8);

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day_bit(d: Weekday) -> u8 {
    1 << d.number_days_from_monday()
}

impl Weekdays {
    /// Monday to Friday.
    pub const WORKDAYS: Weekdays = Weekdays(0b001_1111);
    /// Every day.
    pub const ALL: Weekdays = Weekdays(0b111_1111);

    /// Whether `day` is in the set.
    pub fn contains(self, day: Weekday) -> bool {
        self.0 & day_bit(day) != 0
    }

    fn parse_day(s: &str) -> Result<u8, String> {
        let lower = s.to_ascii_lowercase();
        let i = DAY_NAMES
            .iter()
            .position(|d| lower == *d)
            .or_else(|| {
                [
                    "monday",
                    "tuesday",
                    "wednesday",
                    "thursday",
                    "friday",
                    "saturday",
                    "sunday",
                ]
                .iter()
                .position(|d| lower == *d)
            })
            .ok_or_else(|| format!("unknown weekday {s:?}"))?;
        Ok(i as u8)
    }

    fn names(self) -> impl Iterator<Item = &'static str> {
        (0..7)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| DAY_NAMES[i])
    }
}

impl FromIterator<Weekday> for Weekdays {
    fn from_iter<I: IntoIterator<Item = Weekday>>(iter: I) -> Self {
        Weekdays(iter.into_iter().fold(0, |acc, d| acc | day_bit(d)))
    }
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`: runs of three or more days as ranges.
impl fmt::Display for Weekdays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < 7 {
            if self.0 & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let mut j = i;
            while j + 1 < 7 && self.0 & (1 << (j + 1)) != 0 {
                j += 1;
            }
            let sep = if first { "" } else { "," };
            first = false;
            if j >= i + 2 {
                write!(f, "{sep}{}-{}", DAY_NAMES[i], DAY_NAMES[j])?;
            } else {
                write!(f, "{sep}{}", DAY_NAMES[i])?;
                if j > i {
                    write!(f, ",{}", DAY_NAMES[j])?;
                }
            }
            i = j + 1;
        }
        Ok(())
    }
}

impl fmt::Debug for Weekdays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Weekdays({self})")
    }
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri` (a range runs forward: `fri-mon` is refused).
impl FromStr for Weekdays {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut bits = 0u8;
        for part in s.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (Self::parse_day(a)?, Self::parse_day(b)?);
                    if b < a {
                        return Err(format!("day range {part:?} runs backwards"));
                    }
                    for i in a..=b {
                        bits |= 1 << i;
                    }
                }
                None => bits |= 1 << Self::parse_day(part)?,
            }
        }
        Ok(Weekdays(bits))
    }
}

impl Serialize for Weekdays {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for Weekdays {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut bits = 0u8;
        for n in &names {
            bits |= 1 << Weekdays::parse_day(n).map_err(serde::de::Error::custom)?;
        }
        Ok(Weekdays(bits))
    }
}

/// A time of day, `HH:MM` (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(Time);

impl TimeOfDay {
    /// `hour`:`minute`, if both are in range.
    pub fn new(hour: u8, minute: u8) -> Option<Self> {
        Time::from_hms(hour, minute, 0).ok().map(TimeOfDay)
    }
}

impl From<Time> for TimeOfDay {
    fn from(t: Time) -> Self {
        TimeOfDay(t)
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0.hour(), self.0.minute())
    }
}

impl FromStr for TimeOfDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("time {s:?} is not HH:MM");
        let (h, m) = s.split_once(':').ok_or_else(err)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(err());
        }
        let (h, m): (u8, u8) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
        TimeOfDay::new(h, m).ok_or_else(err)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Allows requests only on some weekdays between two times of day (UTC). A window whose end
/// is before its start runs over midnight (its weekday is that of its start); equal start and
/// end is the whole day.
///
/// Code: `outside_time_window`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    /// The days.
    pub days: Weekdays,
    /// Start, inclusive.
    pub start: TimeOfDay,
    /// End, exclusive.
    pub end: TimeOfDay,
    /// Applies only to keys in this group (everyone if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl TimeWindow {
    /// Allows `days` from `start` (inclusive) to `end` (exclusive), UTC.
    pub fn new(days: impl IntoIterator<Item = Weekday>, start: Time, end: Time) -> Self {
        TimeWindow {
            days: days.into_iter().collect(),
            start: start.into(),
            end: end.into(),
            group: None,
        }
    }

    /// Monday to Friday, `start` to `end` UTC.
    pub fn weekdays(start: Time, end: Time) -> Self {
        TimeWindow {
            days: Weekdays::WORKDAYS,
            start: start.into(),
            end: end.into(),
            group: None,
        }
    }

    /// Applies only to keys in `group`.
    #[must_use]
    pub fn for_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Whether `now` is inside the window.
    pub fn contains(&self, now: Timestamp) -> bool {
        let t = now.to_offset_date_time();
        let (day, time) = (t.weekday(), TimeOfDay(t.time()));
        let (start, end) = (self.start, self.end);
        if start == end {
            self.days.contains(day)
        } else if start < end {
            self.days.contains(day) && time >= start && time < end
        } else {
            (self.days.contains(day) && time >= start)
                || (self.days.contains(day.previous()) && time < end)
        }
    }

    /// Allows (`Ok`) or refuses the request.
    ///
    /// # Errors
    ///
    /// The refusal.
    pub fn check(&self, s: &Subject<'_>) -> Result<(), Refusal> {
        let applies = self.group.as_deref().is_none_or(|g| s.in_group(g));
        if !applies || self.contains(s.now) {
            return Ok(());
        }
        Err(Refusal {
            code: "outside_time_window",
            message: "This key may not be used at this time.",
        })
    }
}

/// Requires the key (or, failing that, its project) to carry a label, optionally with a value.
///
/// Code: `label_required`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireLabel {
    /// The label.
    pub key: String,
    /// Its required value (any if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl RequireLabel {
    /// Requires label `key` with any value.
    pub fn present(key: impl Into<String>) -> Self {
        RequireLabel {
            key: key.into(),
            value: None,
        }
    }

    /// Requires label `key` = `value`.
    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Self {
        RequireLabel {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// Allows (`Ok`) or refuses the request.
    ///
    /// # Errors
    ///
    /// The refusal.
    pub fn check(&self, s: &Subject<'_>) -> Result<(), Refusal> {
        let found = s
            .key
            .labels
            .get(&self.key)
            .or_else(|| s.project.labels.get(&self.key));
        let ok = match (&self.value, found) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(want), Some(have)) => want == have,
        };
        if ok {
            Ok(())
        } else {
            Err(Refusal {
                code: "label_required",
                message: "This key lacks a label required for this request.",
            })
        }
    }
}

/// Requires the key to be in a group.
///
/// Code: `group_required`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireGroup {
    /// The group.
    pub group: String,
}

impl RequireGroup {
    /// Requires membership of `group`.
    pub fn new(group: impl Into<String>) -> Self {
        RequireGroup {
            group: group.into(),
        }
    }

    /// Allows (`Ok`) or refuses the request.
    ///
    /// # Errors
    ///
    /// The refusal.
    pub fn check(&self, s: &Subject<'_>) -> Result<(), Refusal> {
        if s.in_group(&self.group) {
            Ok(())
        } else {
            Err(Refusal {
                code: "group_required",
                message: "This key is not in a group required for this request.",
            })
        }
    }
}

/// Reserves endpoint groups and models to the members of a group: a request to one of
/// `endpoints` or using a model matching one of `models` is allowed only for keys in `group`.
///
/// Code: `members_only`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersOnly {
    /// The group.
    pub group: String,
    /// Endpoint groups reserved to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Model patterns reserved to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelPattern>,
}

impl MembersOnly {
    /// Reserves nothing yet to `group`.
    pub fn new(group: impl Into<String>) -> Self {
        MembersOnly {
            group: group.into(),
            endpoints: Vec::new(),
            models: Vec::new(),
        }
    }

    /// Reserves an endpoint group.
    #[must_use]
    pub fn endpoint(mut self, group: impl Into<String>) -> Self {
        self.endpoints.push(group.into());
        self
    }

    /// Reserves models matching `pattern`.
    #[must_use]
    pub fn model(mut self, pattern: ModelPattern) -> Self {
        self.models.push(pattern);
        self
    }

    /// Allows (`Ok`) or refuses the request.
    ///
    /// # Errors
    ///
    /// The refusal.
    pub fn check(&self, s: &Subject<'_>) -> Result<(), Refusal> {
        let reserved = self.endpoints.iter().any(|e| e == s.endpoint)
            || s.model
                .is_some_and(|m| self.models.iter().any(|p| p.matches(m)));
        if !reserved || s.in_group(&self.group) {
            Ok(())
        } else {
            Err(Refusal {
                code: "members_only",
                message: "This endpoint or model is reserved to members of a group this key is not in.",
            })
        }
    }
}

/// The one-line form (see the [module docs](self)).
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::TimeWindow(w) => {
                write!(f, "time_window {} {}-{}", w.days, w.start, w.end)?;
                if let Some(g) = &w.group {
                    write!(f, " group={g}")?;
                }
                Ok(())
            }
            Condition::RequireLabel(l) => match &l.value {
                Some(v) => write!(f, "require_label {}={v}", l.key),
                None => write!(f, "require_label {}", l.key),
            },
            Condition::RequireGroup(g) => write!(f, "require_group {}", g.group),
            Condition::MembersOnly(m) => {
                write!(f, "members_only {}", m.group)?;
                let join = |items: &mut dyn Iterator<Item = &str>| -> String {
                    items.collect::<Vec<_>>().join(",")
                };
                if !m.models.is_empty() {
                    write!(
                        f,
                        " models={}",
                        join(&mut m.models.iter().map(|p| p.as_str()))
                    )?;
                }
                if !m.endpoints.is_empty() {
                    write!(
                        f,
                        " endpoints={}",
                        join(&mut m.endpoints.iter().map(String::as_str))
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// The one-line form (see the [module docs](self)); the result is validated.
impl FromStr for Condition {
    type Err = String;
    fn from_str(line: &str) -> Result<Self, String> {
        let mut words = line.split_whitespace();
        let kind = words.next().ok_or("an empty condition")?;
        let words: Vec<&str> = words.collect();
        let options = |words: &[&str], known: &[&str]| -> Result<Vec<(String, String)>, String> {
            words
                .iter()
                .map(|w| {
                    let (k, v) = w
                        .split_once('=')
                        .ok_or_else(|| format!("{kind}: {w:?} is not NAME=VALUE"))?;
                    if !known.contains(&k) {
                        return Err(format!(
                            "{kind}: unknown option {k:?} (known: {})",
                            known.join(", ")
                        ));
                    }
                    Ok((k.to_owned(), v.to_owned()))
                })
                .collect()
        };
        let arity = |n: usize, usage: &str| {
            if words.len() < n {
                Err(format!("{kind} takes {usage}"))
            } else {
                Ok(())
            }
        };
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let c = match kind {
            "time_window" => {
                let usage = "DAYS HH:MM-HH:MM [group=GROUP] (time_window mon-fri 09:00-17:00)";
                arity(2, usage)?;
                let days: Weekdays = words[0].parse()?;
                let (start, end) = words[1]
                    .split_once('-')
                    .ok_or_else(|| format!("time_window: {:?} is not HH:MM-HH:MM", words[1]))?;
                let mut w = TimeWindow {
                    days,
                    start: start.parse()?,
                    end: end.parse()?,
                    group: None,
                };
                for (_, v) in options(&words[2..], &["group"])? {
                    w.group = Some(v);
                }
                Condition::TimeWindow(w)
            }
            "require_label" => {
                arity(1, "NAME or NAME=VALUE")?;
                if words.len() > 1 {
                    return Err("require_label takes one NAME or NAME=VALUE".into());
                }
                Condition::RequireLabel(match words[0].split_once('=') {
                    Some((k, v)) => RequireLabel::equals(k, v),
                    None => RequireLabel::present(words[0]),
                })
            }
            "require_group" => {
                arity(1, "GROUP")?;
                if words.len() > 1 {
                    return Err("require_group takes one GROUP".into());
                }
                Condition::RequireGroup(RequireGroup::new(words[0]))
            }
            "members_only" => {
                arity(
                    2,
                    "GROUP models=PATTERN,... and/or endpoints=GROUP,... (members_only research models=o1*)",
                )?;
                let mut m = MembersOnly::new(words[0]);
                for (k, v) in options(&words[1..], &["models", "endpoints"])? {
                    if k == "models" {
                        for p in list(&v) {
                            m.models.push(
                                ModelPattern::new(&p)
                                    .map_err(|e| format!("members_only: {p:?}: {e}"))?,
                            );
                        }
                    } else {
                        m.endpoints.extend(list(&v));
                    }
                }
                Condition::MembersOnly(m)
            }
            other => {
                return Err(format!(
                    "unknown condition {other:?} (one of time_window, require_label, require_group, members_only)"
                ));
            }
        };
        c.validate()?;
        Ok(c)
    }
}

/// Checks every condition of a key's project, then of the key, in order.
///
/// # Errors
///
/// The first refusal.
pub fn check_records(s: &Subject<'_>) -> Result<(), Refusal> {
    for c in s.project.policies.iter().chain(&s.key.policies) {
        c.check(s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyDigest, KeyId};
    use time::macros::{datetime, time};

    fn key(groups: &[&str], labels: &[(&str, &str)]) -> KeyRecord {
        let mut k = KeyRecord::new(
            KeyId::new("key_a"),
            "p",
            KeyDigest::of("a"),
            Timestamp::UNIX_EPOCH,
        );
        k.groups = groups.iter().map(|g| g.to_string()).collect();
        k.labels = labels
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        k
    }

    fn at(unix: i64) -> Timestamp {
        Timestamp::from_unix_secs(unix as u64)
    }

    fn run(
        c: &Condition,
        k: &KeyRecord,
        endpoint: &str,
        model: Option<&str>,
        now: Timestamp,
    ) -> Result<(), &'static str> {
        let p = ProjectRecord::new("p");
        c.check(&Subject {
            key: k,
            project: &p,
            endpoint,
            model,
            now,
        })
        .map_err(|r| r.code)
    }

    #[test]
    fn lines_round_trip_and_match_json() {
        for line in [
            "time_window mon-fri 09:00-17:30",
            "time_window sat,sun 22:00-06:00 group=interns",
            "time_window mon,wed-fri 00:00-00:00",
            "require_label env=prod",
            "require_label team",
            "require_group ml",
            "members_only research models=o1*,gpt-4o endpoints=fine_tuning",
            "members_only ops endpoints=images,audio",
        ] {
            let c: Condition = line.parse().unwrap();
            assert_eq!(c.to_string(), line);
            let json = serde_json::to_string(&c).unwrap();
            let back: Condition = serde_json::from_str(&json).unwrap();
            assert_eq!(back, c, "{json}");
        }
        let c: Condition = "time_window Monday,tue-thu 09:00-10:00".parse().unwrap();
        assert_eq!(c.to_string(), "time_window mon-thu 09:00-10:00");
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for (line, needle) in [
            ("", "empty"),
            ("sometimes", "unknown condition"),
            ("time_window funday 09:00-10:00", "weekday"),
            ("time_window fri-mon 09:00-10:00", "backwards"),
            ("time_window mon 9:00-10:00", "HH:MM"),
            ("time_window mon 09:00", "HH:MM-HH:MM"),
            ("time_window mon 09:00-10:00 team=x", "unknown option"),
            ("members_only research", "takes"),
            ("members_only research models=", "reserves nothing"),
            ("members_only research models=o*1", "only a trailing"),
            ("require_group a b", "one GROUP"),
        ] {
            let err = line.parse::<Condition>().unwrap_err();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
    }

    #[test]
    fn json_is_checked_too() {
        let bad = [
            r#"{"type":"time_window","days":["funday"],"start":"09:00","end":"10:00"}"#,
            r#"{"type":"time_window","days":["mon"],"start":"25:00","end":"10:00"}"#,
            r#"{"type":"require_group","group":"ml","extra":1}"#,
            r#"{"type":"never"}"#,
        ];
        for b in bad {
            assert!(serde_json::from_str::<Condition>(b).is_err(), "{b}");
        }
        let empty: Condition = serde_json::from_str(
            r#"{"type":"time_window","days":[],"start":"09:00","end":"10:00"}"#,
        )
        .unwrap();
        assert!(empty.validate().is_err());
    }

    #[test]
    fn windows_overnight_and_all_day() {
        // 2026-11-23 is a Monday.
        let mon_noon = at(datetime!(2026-11-23 12:00 UTC).unix_timestamp());
        let mon_2am = at(datetime!(2026-11-23 02:00 UTC).unix_timestamp());
        let sat_noon = at(datetime!(2026-11-28 12:00 UTC).unix_timestamp());
        let k = key(&[], &[]);
        let office: Condition = TimeWindow::weekdays(time!(9:00), time!(17:00)).into();
        assert_eq!(run(&office, &k, "g", None, mon_noon), Ok(()));
        assert_eq!(
            run(&office, &k, "g", None, sat_noon),
            Err("outside_time_window")
        );
        assert_eq!(
            run(&office, &k, "g", None, mon_2am),
            Err("outside_time_window")
        );
        let night: Condition = "time_window sun 22:00-06:00".parse().unwrap();
        assert_eq!(run(&night, &k, "g", None, mon_2am), Ok(()));
        assert!(run(&night, &k, "g", None, mon_noon).is_err());
        let weekend: Condition = "time_window sat,sun 00:00-00:00".parse().unwrap();
        assert_eq!(run(&weekend, &k, "g", None, sat_noon), Ok(()));
        assert!(run(&weekend, &k, "g", None, mon_noon).is_err());
        let interns: Condition = "time_window mon-fri 09:00-17:00 group=interns"
            .parse()
            .unwrap();
        assert_eq!(run(&interns, &k, "g", None, sat_noon), Ok(()));
        assert!(run(&interns, &key(&["interns"], &[]), "g", None, sat_noon).is_err());
    }

    #[test]
    fn members_only_and_requirements() {
        let now = Timestamp::UNIX_EPOCH;
        let rule: Condition = "members_only research models=o1* endpoints=fine_tuning"
            .parse()
            .unwrap();
        let (outsider, member) = (key(&[], &[]), key(&["research"], &[]));
        assert_eq!(
            run(&rule, &outsider, "fine_tuning", None, now),
            Err("members_only")
        );
        assert_eq!(
            run(&rule, &outsider, "chat.completions", Some("o1-mini"), now),
            Err("members_only")
        );
        assert_eq!(
            run(&rule, &outsider, "chat.completions", Some("gpt-4o"), now),
            Ok(())
        );
        assert_eq!(run(&rule, &member, "fine_tuning", Some("o1"), now), Ok(()));
        let labelled = key(&["ml"], &[("env", "prod")]);
        let ok = |line: &str| run(&line.parse().unwrap(), &labelled, "g", None, now);
        assert_eq!(ok("require_label env=prod"), Ok(()));
        assert_eq!(ok("require_label env=dev"), Err("label_required"));
        assert_eq!(ok("require_label team"), Err("label_required"));
        assert_eq!(ok("require_group ml"), Ok(()));
        assert_eq!(ok("require_group ops"), Err("group_required"));
    }

    #[test]
    fn reserved_to_names_the_groups_of_a_model_rule() {
        let cs: Vec<Condition> = [
            "members_only research models=o1*",
            "members_only ops models=gpt-4o,o1-mini",
            "members_only ops endpoints=images",
        ]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
        assert_eq!(Condition::reserved_to(&cs, "o1-mini"), ["ops", "research"]);
        assert_eq!(Condition::reserved_to(&cs, "o1*"), ["research"]);
        assert_eq!(Condition::reserved_to(&cs, "gpt-4o"), ["ops"]);
        assert!(Condition::reserved_to(&cs, "gpt-4o-mini").is_empty());
    }

    #[test]
    fn records_check_project_then_key() {
        let mut k = key(&[], &[]);
        let mut p = ProjectRecord::new("p");
        let s = |k: &KeyRecord, p: &ProjectRecord| {
            check_records(&Subject {
                key: k,
                project: p,
                endpoint: "chat.completions",
                model: Some("o1"),
                now: Timestamp::UNIX_EPOCH,
            })
            .map_err(|r| r.code)
        };
        assert_eq!(s(&k, &p), Ok(()));
        p.policies
            .push("members_only research models=o1*".parse().unwrap());
        assert_eq!(s(&k, &p), Err("members_only"));
        k.groups.push("research".into());
        assert_eq!(s(&k, &p), Ok(()));
        k.policies.push("require_label env".parse().unwrap());
        assert_eq!(s(&k, &p), Err("label_required"));
    }
}
