//! [`Principal`]: who is calling and what they may do, as every later layer sees it.

use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::key::KeyId;
use crate::limits::Limits;
use crate::record::{KeyRecord, ProjectRecord, Restriction, Secret, ip_in_ranges};
use crate::rights::Access;

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credential {
    /// An API key (its current or, during rotation grace, previous secret).
    ApiKey(Secret),
    /// A short-lived token derived from a key.
    Token {
        /// The token's id (`jti`).
        id: Arc<str>,
        /// When the token expires.
        expires_at: Timestamp,
    },
    /// A token from an external identity provider.
    External {
        /// The provider (`iss`).
        issuer: Arc<str>,
        /// When the token expires.
        expires_at: Timestamp,
    },
}

/// Which record a set of limits belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitScope {
    /// The key's own limits.
    Key,
    /// The project's limits (shared by all its keys).
    Project,
    /// Limits a derived token adds on top of its key's.
    Token,
}

/// The authenticated caller, put in request extensions by the extraction layer.
///
/// Its rights are always the most restrictive of project, key and (for a derived token) the
/// token's [`Restriction`]. Cheap to clone (reference-counted records).
#[derive(Debug, Clone)]
pub struct Principal {
    key: Arc<KeyRecord>,
    project: Arc<ProjectRecord>,
    credential: Credential,
    restriction: Option<Arc<Restriction>>,
}

impl Principal {
    /// A principal for `key` of `project`, proven by `credential`.
    pub fn new(key: Arc<KeyRecord>, project: Arc<ProjectRecord>, credential: Credential) -> Self {
        Principal {
            key,
            project,
            credential,
            restriction: None,
        }
    }

    /// The same principal, narrowed further by `restriction`.
    #[must_use]
    pub fn with_restriction(mut self, restriction: Arc<Restriction>) -> Self {
        self.restriction = Some(restriction);
        self
    }

    /// The key's record.
    pub fn key(&self) -> &KeyRecord {
        &self.key
    }

    /// The key's record, shared.
    pub fn key_arc(&self) -> &Arc<KeyRecord> {
        &self.key
    }

    /// The key's public id.
    pub fn key_id(&self) -> &KeyId {
        &self.key.id
    }

    /// The project's record.
    pub fn project(&self) -> &ProjectRecord {
        &self.project
    }

    /// The project's record, shared.
    pub fn project_arc(&self) -> &Arc<ProjectRecord> {
        &self.project
    }

    /// How the caller authenticated.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The narrowing a derived token adds, if any.
    pub fn restriction(&self) -> Option<&Restriction> {
        self.restriction.as_deref()
    }

    /// The access this principal has to `group`.
    #[inline]
    pub fn access(&self, group: &str) -> Access {
        let key = self.key.permissions.access(group);
        match self
            .restriction
            .as_deref()
            .and_then(|r| r.permissions.as_ref())
        {
            Some(narrow) => key.min(narrow.access(group)),
            None => key,
        }
    }

    /// Whether this principal may use `model` (project ∩ key ∩ token).
    #[inline]
    pub fn allows_model(&self, model: &str) -> bool {
        self.project.models.allows(model)
            && self.key.models.allows(model)
            && self
                .restriction
                .as_deref()
                .is_none_or(|r| r.models.allows(model))
    }

    /// Whether any of project, key or token restricts models at all.
    pub fn has_model_rules(&self) -> bool {
        !self.project.models.is_unrestricted()
            || !self.key.models.is_unrestricted()
            || self
                .restriction
                .as_deref()
                .is_some_and(|r| !r.models.is_unrestricted())
    }

    /// Whether any of project, key or token restricts client addresses.
    pub fn has_ip_rules(&self) -> bool {
        !self.project.allowed_ips.is_empty()
            || !self.key.allowed_ips.is_empty()
            || self
                .restriction
                .as_deref()
                .is_some_and(|r| !r.allowed_ips.is_empty())
    }

    /// Whether `ip` is inside every address range of project, key and token.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        ip_in_ranges(&self.project.allowed_ips, ip)
            && ip_in_ranges(&self.key.allowed_ips, ip)
            && self
                .restriction
                .as_deref()
                .is_none_or(|r| ip_in_ranges(&r.allowed_ips, ip))
    }

    /// Whether any token rate or money budget applies to this caller (key, project or token):
    /// then what a request may cost must be known before it is forwarded.
    pub fn has_token_limits(&self) -> bool {
        self.limits().any(|(_, l)| {
            l.tokens_per_minute.is_some()
                || !l.budgets.is_empty()
                || l.models.values().any(|m| m.tokens_per_minute.is_some())
        })
    }

    /// Every set of limits that applies to this principal's requests, with whose it is.
    pub fn limits(&self) -> impl Iterator<Item = (LimitScope, &Limits)> {
        [
            Some((LimitScope::Key, &self.key.limits)),
            Some((LimitScope::Project, &self.project.limits)),
            self.restriction
                .as_deref()
                .map(|r| (LimitScope::Token, &r.limits)),
        ]
        .into_iter()
        .flatten()
        .filter(|(_, l)| !l.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyDigest;
    use crate::rights::{ModelPattern, ModelRules, Permissions};
    use std::collections::BTreeMap;

    fn principal() -> Principal {
        let mut key = KeyRecord::new(
            KeyId::new("key_a"),
            "p",
            KeyDigest::of("a"),
            Timestamp::UNIX_EPOCH,
        );
        key.permissions = Permissions::All;
        key.models = ModelRules::allow_only([ModelPattern::new("gpt-4o*").unwrap()]);
        key.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
        let mut project = ProjectRecord::new("p");
        project.models.deny = vec![ModelPattern::new("gpt-4o").unwrap()];
        Principal::new(
            Arc::new(key),
            Arc::new(project),
            Credential::ApiKey(Secret::Current),
        )
    }

    #[test]
    fn model_rules_are_the_intersection_of_project_and_key() {
        let p = principal();
        assert!(p.allows_model("gpt-4o-mini"));
        assert!(!p.allows_model("gpt-4o"), "project deny");
        assert!(!p.allows_model("o1"), "key allow list");
        assert!(p.has_model_rules());
    }

    #[test]
    fn restriction_only_narrows() {
        let restriction = Restriction {
            permissions: Some(Permissions::Restricted(BTreeMap::from([(
                "models".to_owned(),
                Access::Read,
            )]))),
            models: ModelRules::allow_only([ModelPattern::new("o1").unwrap()]),
            allowed_ips: vec!["10.1.0.0/16".parse().unwrap()],
            limits: Limits::default(),
        };
        let p = principal().with_restriction(Arc::new(restriction));
        assert_eq!(p.access("models"), Access::Read);
        assert_eq!(p.access("chat.completions"), Access::None);
        assert!(
            !p.allows_model("o1"),
            "token cannot add a model the key lacks"
        );
        assert!(!p.allows_model("gpt-4o-mini"));
        assert!(p.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(!p.allows_ip("10.2.2.3".parse().unwrap()));
    }

    #[test]
    fn ip_rules_apply_from_key() {
        let p = principal();
        assert!(p.has_ip_rules());
        assert!(p.allows_ip("10.9.9.9".parse().unwrap()));
        assert!(!p.allows_ip("192.168.0.1".parse().unwrap()));
    }
}
