//! Policies (PBAC): conditions evaluated after the built-in checks.

use std::borrow::Cow;
use std::net::IpAddr;

use http::{Method, StatusCode};
pub use keygate_core::conditions::{MembersOnly, RequireGroup, RequireLabel, TimeWindow};
use keygate_core::conditions::{Refusal, Subject};
use keygate_core::{Condition, EndpointMatch, Principal, Timestamp};

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

/// A built-in condition as written in config (`type = "time_window"`, ...): the same data
/// keys and projects carry in their records ([`keygate_core::conditions`]).
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
pub type PolicyConfig = Condition;

fn subject<'a>(ctx: &PolicyContext<'a>) -> Subject<'a> {
    Subject {
        key: ctx.principal.key(),
        project: ctx.principal.project(),
        endpoint: ctx.endpoint.group.as_str(),
        model: ctx.model,
        now: ctx.now,
    }
}

impl From<Refusal> for PolicyDenial {
    fn from(r: Refusal) -> Self {
        PolicyDenial::new(r.code, r.message)
    }
}

macro_rules! built_in {
    ($($t:ty),*) => {$(
        impl Policy for $t {
            fn check(&self, ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
                <$t>::check(self, &subject(ctx)).map_err(PolicyDenial::from)
            }
        }
    )*};
}
built_in!(
    Condition,
    TimeWindow,
    RequireLabel,
    RequireGroup,
    MembersOnly
);

/// The conditions of the caller's key and project records: each must allow.
pub(crate) fn check_records(ctx: &PolicyContext<'_>) -> Result<(), PolicyDenial> {
    keygate_core::conditions::check_records(&subject(ctx)).map_err(PolicyDenial::from)
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

    // The conditions themselves are tested in keygate-core; here, that each built-in sees
    // the context's key, project, endpoint, model and time as a policy.
    #[test]
    fn built_ins_are_policies_over_the_context() {
        let p = principal(&["ml"], &[("env", "prod")]);
        let w = TimeWindow::weekdays(time!(9:00), time!(17:00));
        assert_eq!(check(&w, &p, "g", None, MONDAY_NOON), Ok(()));
        assert_eq!(
            check(&w, &p, "g", None, SATURDAY_NOON),
            Err("outside_time_window".into())
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
            check(&RequireGroup::new("ops"), &p, "g", None, MONDAY_NOON),
            Err("group_required".into())
        );
        let rule =
            MembersOnly::new("research").model(keygate_core::ModelPattern::new("o1*").unwrap());
        assert_eq!(
            check(&rule, &p, "chat.completions", Some("o1-mini"), MONDAY_NOON),
            Err("members_only".into())
        );
        assert_eq!(
            check(&rule, &p, "chat.completions", Some("gpt-4o"), MONDAY_NOON),
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
        let p = principal(&[], &[]);
        assert_eq!(check(&c.policies[0], &p, "g", None, MONDAY_NOON), Ok(()));
        assert!(check(&c.policies[0], &p, "g", None, SATURDAY_NOON).is_err());
        assert!(check(&c.policies[1], &p, "g", Some("o1"), MONDAY_NOON).is_err());
        for bad in [
            "[[policies]]\ntype = \"time_window\"\ndays = [\"funday\"]\nstart = \"09:00\"\nend = \"17:00\"",
            "[[policies]]\ntype = \"time_window\"\ndays = [\"mon\"]\nstart = \"9\"\nend = \"17:00\"",
        ] {
            assert!(toml::from_str::<C>(bad).is_err(), "{bad}");
        }
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
