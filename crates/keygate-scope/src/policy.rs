//! Policies (PBAC): conditions evaluated after the built-in checks.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, StatusCode};
use keygate_core::{EndpointMatch, ModelPattern, Principal, Timestamp};
use time::{Time, Weekday};

/// What a policy sees: the caller, the route, the model, the client and the time.
#[derive(Debug, Clone, Copy)]
pub struct PolicyContext<'a> {
    pub(crate) principal: &'a Principal,
    pub(crate) endpoint: &'a EndpointMatch,
    pub(crate) model: Option<&'a str>,
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) now: Timestamp,
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
}

impl<'a> PolicyContext<'a> {
    /// A context, for testing policies on their own.
    pub fn new(
        principal: &'a Principal,
        endpoint: &'a EndpointMatch,
        model: Option<&'a str>,
        client_ip: Option<IpAddr>,
        now: Timestamp,
        method: &'a Method,
        path: &'a str,
    ) -> Self {
        PolicyContext {
            principal,
            endpoint,
            model,
            client_ip,
            now,
            method,
            path,
        }
    }

    /// The caller.
    pub fn principal(&self) -> &'a Principal {
        self.principal
    }

    /// The matched route, its endpoint group and the access it needs.
    pub fn endpoint(&self) -> &'a EndpointMatch {
        self.endpoint
    }

    /// The model the request names, if any.
    pub fn model(&self) -> Option<&'a str> {
        self.model
    }

    /// The client's address, if known.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }

    /// Now, from the layer's clock.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request path.
    pub fn path(&self) -> &'a str {
        self.path
    }

    fn in_group(&self, group: &str) -> bool {
        self.principal.key().groups.iter().any(|g| g == group)
    }
}

/// A policy's refusal: its own reason code and message (403 unless set otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDenial {
    pub(crate) status: StatusCode,
    pub(crate) code: Cow<'static, str>,
    pub(crate) message: Cow<'static, str>,
}

impl PolicyDenial {
    /// A 403 with `code` and `message` (sent to the client: say nothing secret).
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        PolicyDenial {
            status: StatusCode::FORBIDDEN,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Another status.
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The reason code.
    pub fn code(&self) -> &str {
        &self.code
    }
}

/// A condition a request must meet. Implemented for closures
/// `Fn(&PolicyContext<'_>) -> Result<(), PolicyDenial>`.
pub trait Policy: Send + Sync + 'static {
    /// Allows (`Ok`) or refuses the request.
    ///
    /// # Errors
    ///
    /// The refusal, with the policy's reason code.
    fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial>;
}

impl<F> Policy for F
where
    F: Fn(&PolicyContext<'_>) -> Result<(), PolicyDenial> + Send + Sync + 'static,
{
    fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
        self(ctx)
    }
}

/// Who a built-in policy applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Subject {
    #[default]
    Everyone,
    Group(String),
}

impl Subject {
    fn applies(&self, ctx: &PolicyContext<'_>) -> bool {
        match self {
            Subject::Everyone => true,
            Subject::Group(g) => ctx.in_group(g),
        }
    }
}

/// Allows requests only on some weekdays between two times of day (UTC). A window whose
/// end is before its start runs over midnight (its weekday is that of its start).
///
/// Code: `outside_time_window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWindow {
    days: u8,
    start: Time,
    end: Time,
    subject: Subject,
}

fn day_bit(d: Weekday) -> u8 {
    1 << d.number_days_from_monday()
}

impl TimeWindow {
    /// Allows `days` from `start` (inclusive) to `end` (exclusive), UTC.
    pub fn new(days: impl IntoIterator<Item = Weekday>, start: Time, end: Time) -> Self {
        TimeWindow {
            days: days.into_iter().fold(0, |acc, d| acc | day_bit(d)),
            start,
            end,
            subject: Subject::Everyone,
        }
    }

    /// Monday to Friday, `start` to `end` UTC.
    pub fn weekdays(start: Time, end: Time) -> Self {
        use Weekday::*;
        TimeWindow::new([Monday, Tuesday, Wednesday, Thursday, Friday], start, end)
    }

    /// Applies only to keys in `group`.
    #[must_use]
    pub fn for_group(mut self, group: impl Into<String>) -> Self {
        self.subject = Subject::Group(group.into());
        self
    }

    fn contains(&self, now: Timestamp) -> bool {
        let t = now.to_offset_date_time();
        let (day, time) = (t.weekday(), t.time());
        if self.start <= self.end {
            self.days & day_bit(day) != 0 && time >= self.start && time < self.end
        } else {
            (self.days & day_bit(day) != 0 && time >= self.start)
                || (self.days & day_bit(day.previous()) != 0 && time < self.end)
        }
    }
}

impl Policy for TimeWindow {
    fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
        if !self.subject.applies(ctx) || self.contains(ctx.now) {
            return Ok(());
        }
        Err(PolicyDenial::new(
            "outside_time_window",
            "This key may not be used at this time.",
        ))
    }
}

/// Requires the key (or, failing that, its project) to carry a label, optionally with a value.
///
/// Code: `label_required`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequireLabel {
    key: String,
    value: Option<String>,
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
}

impl Policy for RequireLabel {
    fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
        let p = ctx.principal;
        let found = p
            .key()
            .labels
            .get(&self.key)
            .or_else(|| p.project().labels.get(&self.key));
        let ok = match (&self.value, found) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(want), Some(have)) => want == have,
        };
        if ok {
            Ok(())
        } else {
            Err(PolicyDenial::new(
                "label_required",
                "This key lacks a label required for this request.",
            ))
        }
    }
}

/// Requires the key to be in a group.
///
/// Code: `group_required`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequireGroup(String);

impl RequireGroup {
    /// Requires membership of `group`.
    pub fn new(group: impl Into<String>) -> Self {
        RequireGroup(group.into())
    }
}

impl Policy for RequireGroup {
    fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
        if ctx.in_group(&self.0) {
            Ok(())
        } else {
            Err(PolicyDenial::new(
                "group_required",
                "This key is not in a group required for this request.",
            ))
        }
    }
}

/// Reserves endpoint groups and models to the members of a group: a request to one of
/// `endpoints` or naming a model matching one of `models` is allowed only for keys in `group`.
///
/// Code: `members_only`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersOnly {
    group: String,
    endpoints: Vec<String>,
    models: Vec<ModelPattern>,
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
}

impl Policy for MembersOnly {
    fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
        let reserved = self
            .endpoints
            .iter()
            .any(|e| e == ctx.endpoint.group.as_str())
            || ctx
                .model
                .is_some_and(|m| self.models.iter().any(|p| p.matches(m)));
        if !reserved || ctx.in_group(&self.group) {
            Ok(())
        } else {
            Err(PolicyDenial::new(
                "members_only",
                "This endpoint or model is reserved to members of a group this key is not in.",
            ))
        }
    }
}

/// A built-in policy as written in config (`type = "time_window"`, ...).
///
/// ```toml
/// [[policies]]
/// type = "time_window"
/// days = ["mon", "tue", "wed", "thu", "fri"]
/// start = "09:00"
/// end = "17:30"
/// group = "interns"          # optional: applies only to keys in this group
///
/// [[policies]]
/// type = "require_label"
/// key = "env"
/// value = "prod"             # optional
///
/// [[policies]]
/// type = "require_group"
/// group = "ml"
///
/// [[policies]]
/// type = "members_only"
/// group = "research"
/// endpoints = ["fine_tuning"]
/// models = ["o1*"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum PolicyConfig {
    /// [`TimeWindow`].
    TimeWindow {
        /// Weekdays (`mon`..`sun` or full English names).
        days: Vec<String>,
        /// Start, `HH:MM` UTC (inclusive).
        start: String,
        /// End, `HH:MM` UTC (exclusive; before `start` runs over midnight).
        end: String,
        /// Only for keys in this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// [`RequireLabel`].
    RequireLabel {
        /// The label.
        key: String,
        /// Its required value (any if absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
    },
    /// [`RequireGroup`].
    RequireGroup {
        /// The group.
        group: String,
    },
    /// [`MembersOnly`].
    MembersOnly {
        /// The group.
        group: String,
        /// Endpoint groups reserved to it.
        #[serde(default)]
        endpoints: Vec<String>,
        /// Model patterns reserved to it.
        #[serde(default)]
        models: Vec<ModelPattern>,
    },
}

/// Why a [`PolicyConfig`] is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyConfigError {
    /// A weekday name that is not one.
    #[error("unknown weekday {0:?}")]
    Weekday(String),
    /// A time that is not `HH:MM`.
    #[error("time {0:?} is not HH:MM")]
    Time(String),
    /// A time window with no days.
    #[error("a time window needs at least one day")]
    NoDays,
}

fn parse_weekday(s: &str) -> Result<Weekday, PolicyConfigError> {
    use Weekday::*;
    Ok(match s.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Monday,
        "tue" | "tuesday" => Tuesday,
        "wed" | "wednesday" => Wednesday,
        "thu" | "thursday" => Thursday,
        "fri" | "friday" => Friday,
        "sat" | "saturday" => Saturday,
        "sun" | "sunday" => Sunday,
        _ => return Err(PolicyConfigError::Weekday(s.to_owned())),
    })
}

fn parse_time(s: &str) -> Result<Time, PolicyConfigError> {
    let err = || PolicyConfigError::Time(s.to_owned());
    let (h, m) = s.split_once(':').ok_or_else(err)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(err());
    }
    let (h, m): (u8, u8) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    Time::from_hms(h, m, 0).map_err(|_| err())
}

impl PolicyConfig {
    /// The policy this config describes.
    ///
    /// # Errors
    ///
    /// A bad weekday or time, or a window with no days.
    pub fn build(&self) -> Result<Arc<dyn Policy>, PolicyConfigError> {
        Ok(match self {
            PolicyConfig::TimeWindow {
                days,
                start,
                end,
                group,
            } => {
                if days.is_empty() {
                    return Err(PolicyConfigError::NoDays);
                }
                let days = days
                    .iter()
                    .map(|d| parse_weekday(d))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut w = TimeWindow::new(days, parse_time(start)?, parse_time(end)?);
                if let Some(g) = group {
                    w = w.for_group(g.clone());
                }
                Arc::new(w)
            }
            PolicyConfig::RequireLabel { key, value } => Arc::new(RequireLabel {
                key: key.clone(),
                value: value.clone(),
            }),
            PolicyConfig::RequireGroup { group } => Arc::new(RequireGroup::new(group.clone())),
            PolicyConfig::MembersOnly {
                group,
                endpoints,
                models,
            } => Arc::new(MembersOnly {
                group: group.clone(),
                endpoints: endpoints.clone(),
                models: models.clone(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{
        Access, Credential, EndpointGroup, KeyDigest, KeyId, KeyRecord, ProjectRecord, Secret,
    };
    use std::sync::Arc;
    use time::macros::{datetime, time};

    fn principal(groups: &[&str], labels: &[(&str, &str)]) -> Principal {
        let mut key = KeyRecord::new(
            KeyId::new("key_a"),
            "p",
            KeyDigest::of("a"),
            Timestamp::UNIX_EPOCH,
        );
        key.groups = groups.iter().map(|g| g.to_string()).collect();
        key.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Principal::new(
            Arc::new(key),
            Arc::new(ProjectRecord::new("p")),
            Credential::ApiKey(Secret::Current),
        )
    }

    fn endpoint(group: &str) -> EndpointMatch {
        EndpointMatch {
            group: EndpointGroup::new(group),
            access: Access::Write,
            route: "/x".into(),
        }
    }

    fn check(
        policy: &dyn Policy,
        p: &Principal,
        group: &str,
        model: Option<&str>,
        now: Timestamp,
    ) -> Result<(), String> {
        let e = endpoint(group);
        let ctx = PolicyContext::new(p, &e, model, None, now, &Method::POST, "/x");
        policy.check(&ctx).map_err(|d| d.code.into_owned())
    }

    // 2026-11-23 is a Monday.
    const MONDAY_NOON: Timestamp =
        Timestamp::from_unix_secs(datetime!(2026-11-23 12:00 UTC).unix_timestamp() as u64);
    const SATURDAY_NOON: Timestamp =
        Timestamp::from_unix_secs(datetime!(2026-11-28 12:00 UTC).unix_timestamp() as u64);
    const MONDAY_2AM: Timestamp =
        Timestamp::from_unix_secs(datetime!(2026-11-23 02:00 UTC).unix_timestamp() as u64);

    #[test]
    fn time_window_allows_inside_and_denies_outside() {
        let w = TimeWindow::weekdays(time!(9:00), time!(17:00));
        let p = principal(&[], &[]);
        assert_eq!(check(&w, &p, "g", None, MONDAY_NOON), Ok(()));
        assert_eq!(
            check(&w, &p, "g", None, SATURDAY_NOON),
            Err("outside_time_window".into())
        );
        assert_eq!(
            check(&w, &p, "g", None, MONDAY_2AM),
            Err("outside_time_window".into())
        );
    }

    #[test]
    fn overnight_window_belongs_to_its_start_day() {
        // Sunday 22:00 to Monday 06:00.
        let w = TimeWindow::new([Weekday::Sunday], time!(22:00), time!(6:00));
        let p = principal(&[], &[]);
        assert_eq!(check(&w, &p, "g", None, MONDAY_2AM), Ok(()));
        assert!(check(&w, &p, "g", None, MONDAY_NOON).is_err());
    }

    #[test]
    fn time_window_for_group_leaves_others_alone() {
        let w = TimeWindow::weekdays(time!(9:00), time!(17:00)).for_group("interns");
        assert_eq!(
            check(&w, &principal(&[], &[]), "g", None, SATURDAY_NOON),
            Ok(())
        );
        assert!(check(&w, &principal(&["interns"], &[]), "g", None, SATURDAY_NOON).is_err());
    }

    #[test]
    fn required_label_and_group() {
        let p = principal(&["ml"], &[("env", "prod")]);
        assert_eq!(
            check(
                &RequireLabel::equals("env", "prod"),
                &p,
                "g",
                None,
                MONDAY_NOON
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &RequireLabel::equals("env", "dev"),
                &p,
                "g",
                None,
                MONDAY_NOON
            ),
            Err("label_required".into())
        );
        assert_eq!(
            check(&RequireLabel::present("team"), &p, "g", None, MONDAY_NOON),
            Err("label_required".into())
        );
        assert_eq!(
            check(&RequireGroup::new("ml"), &p, "g", None, MONDAY_NOON),
            Ok(())
        );
        assert_eq!(
            check(&RequireGroup::new("ops"), &p, "g", None, MONDAY_NOON),
            Err("group_required".into())
        );
    }

    #[test]
    fn members_only_reserves_endpoints_and_models() {
        let rule = MembersOnly::new("research")
            .endpoint("fine_tuning")
            .model(ModelPattern::new("o1*").unwrap());
        let outsider = principal(&[], &[]);
        let member = principal(&["research"], &[]);
        assert_eq!(
            check(&rule, &outsider, "fine_tuning", None, MONDAY_NOON),
            Err("members_only".into())
        );
        assert_eq!(
            check(
                &rule,
                &outsider,
                "chat.completions",
                Some("o1-mini"),
                MONDAY_NOON
            ),
            Err("members_only".into())
        );
        assert_eq!(
            check(
                &rule,
                &outsider,
                "chat.completions",
                Some("gpt-4o"),
                MONDAY_NOON
            ),
            Ok(())
        );
        assert_eq!(
            check(&rule, &member, "fine_tuning", Some("o1"), MONDAY_NOON),
            Ok(())
        );
    }

    #[test]
    fn policies_load_from_toml() {
        #[derive(serde::Deserialize)]
        struct C {
            policies: Vec<PolicyConfig>,
        }
        let c: C = toml::from_str(
            r#"
            [[policies]]
            type = "time_window"
            days = ["mon", "Tuesday"]
            start = "09:00"
            end = "17:00"
            [[policies]]
            type = "members_only"
            group = "research"
            models = ["o1*"]
            "#,
        )
        .unwrap();
        let window = c.policies[0].build().unwrap();
        let p = principal(&[], &[]);
        assert_eq!(check(&*window, &p, "g", None, MONDAY_NOON), Ok(()));
        assert!(check(&*window, &p, "g", None, SATURDAY_NOON).is_err());
        let members = c.policies[1].build().unwrap();
        assert!(check(&*members, &p, "g", Some("o1"), MONDAY_NOON).is_err());
        let bad = PolicyConfig::TimeWindow {
            days: vec!["funday".into()],
            start: "09:00".into(),
            end: "17:00".into(),
            group: None,
        };
        assert!(matches!(bad.build(), Err(PolicyConfigError::Weekday(_))));
        let bad = PolicyConfig::TimeWindow {
            days: vec!["mon".into()],
            start: "9".into(),
            end: "17:00".into(),
            group: None,
        };
        assert!(matches!(bad.build(), Err(PolicyConfigError::Time(_))));
    }

    #[test]
    fn closures_are_policies() {
        let only_get = |ctx: &PolicyContext<'_>| {
            if ctx.method() == Method::GET {
                Ok(())
            } else {
                Err(PolicyDenial::new("get_only", "GET only"))
            }
        };
        assert_eq!(
            check(&only_get, &principal(&[], &[]), "g", None, MONDAY_NOON),
            Err("get_only".into())
        );
    }
}
