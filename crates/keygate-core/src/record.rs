//! Key and project records: everything a key carries, defined once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::conditions::Condition;
use crate::key::{KeyDigest, KeyId};
use crate::limits::Limits;
use crate::rights::{ModelRules, Permissions};

/// The digest of a key's previous secret, still accepted until `valid_until` (rotation grace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousSecret {
    /// SHA-256 of the previous secret.
    pub digest: KeyDigest,
    /// The instant from which the previous secret no longer works.
    pub valid_until: Timestamp,
}

/// A key as stored: everything about it but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Public id (`key_…`).
    pub id: KeyId,
    /// Human name.
    #[serde(default)]
    pub name: String,
    /// Id of the owning project.
    pub project: String,
    /// SHA-256 of the current secret.
    pub digest: KeyDigest,
    /// What the key may do per endpoint group.
    #[serde(default)]
    pub permissions: Permissions,
    /// Which models the key may use (intersected with its project's).
    #[serde(default, skip_serializing_if = "ModelRules::is_unrestricted")]
    pub models: ModelRules,
    /// Rate limits and budgets of this key (its project's apply too).
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Client address ranges the key may be used from; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// Free key/value tags, for policies and reports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Groups the key's holder belongs to, for policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Conditions every request with the key must meet (after its project's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Condition>,
    /// When the key was made.
    pub created_at: Timestamp,
    /// The key does not work before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// The key does not work from this instant on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// A disabled key does not work until enabled again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// A revoked key never works again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    /// The previous secret during a rotation grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousSecret>,
}

impl KeyRecord {
    /// A record with the given identity and no rights (deny by default): set `permissions`
    /// and the rest before storing it.
    pub fn new(
        id: KeyId,
        project: impl Into<String>,
        digest: KeyDigest,
        created_at: Timestamp,
    ) -> Self {
        KeyRecord {
            id,
            name: String::new(),
            project: project.into(),
            digest,
            permissions: Permissions::default(),
            models: ModelRules::default(),
            limits: Limits::default(),
            allowed_ips: Vec::new(),
            labels: BTreeMap::new(),
            groups: Vec::new(),
            policies: Vec::new(),
            created_at,
            not_before: None,
            expires_at: None,
            disabled: false,
            revoked_at: None,
            previous: None,
        }
    }

    /// Whether the key, presented through `secret`, works at `now`.
    ///
    /// # Errors
    ///
    /// Why it does not: for logs and audit only, never for the client.
    pub fn check_live(&self, secret: Secret, now: Timestamp) -> Result<(), Rejection> {
        if self.revoked_at.is_some() {
            return Err(Rejection::Revoked);
        }
        if self.disabled {
            return Err(Rejection::Disabled);
        }
        if self.not_before.is_some_and(|nb| now < nb) {
            return Err(Rejection::NotYetValid);
        }
        if self.expires_at.is_some_and(|exp| now >= exp) {
            return Err(Rejection::Expired);
        }
        if secret == Secret::Previous {
            match &self.previous {
                Some(prev) if now < prev.valid_until => {}
                _ => return Err(Rejection::GraceEnded),
            }
        }
        Ok(())
    }

    /// Checks the record's own consistency (patterns parse, times are ordered).
    ///
    /// # Errors
    ///
    /// A message naming the field at fault (never anything secret).
    pub fn validate(&self) -> Result<(), String> {
        if !self.id.as_str().bytes().all(|b| b.is_ascii_graphic()) || self.id.as_str().is_empty() {
            return Err(format!(
                "key id {:?} must be printable ASCII",
                self.id.as_str()
            ));
        }
        if let (Some(nb), Some(exp)) = (self.not_before, self.expires_at)
            && exp <= nb
        {
            return Err(format!(
                "key {}: expires_at must be after not_before",
                self.id
            ));
        }
        for c in &self.policies {
            c.validate()
                .map_err(|e| format!("key {}: policy {c}: {e}", self.id))?;
        }
        self.limits
            .validate()
            .map_err(|e| format!("key {}: {e}", self.id))
    }
}

/// Which of a key's secrets was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Secret {
    /// The current secret.
    Current,
    /// The previous secret, during rotation grace.
    Previous,
}

/// Why a known key does not work now. For audit and logs; clients all see the same 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Revoked.
    #[error("key revoked")]
    Revoked,
    /// Disabled.
    #[error("key disabled")]
    Disabled,
    /// Before its `not_before`.
    #[error("key not yet valid")]
    NotYetValid,
    /// At or after its `expires_at`.
    #[error("key expired")]
    Expired,
    /// A previous secret whose grace period has ended.
    #[error("rotation grace period ended")]
    GraceEnded,
    /// The key's project is disabled.
    #[error("project disabled")]
    ProjectDisabled,
}

impl Rejection {
    /// A short code for audit records (`revoked`, `expired`, ...).
    pub fn code(self) -> &'static str {
        match self {
            Rejection::Revoked => "revoked",
            Rejection::Disabled => "disabled",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::Expired => "expired",
            Rejection::GraceEnded => "grace_ended",
            Rejection::ProjectDisabled => "project_disabled",
        }
    }
}

/// A project: owner of keys; its model rules, limits and address ranges bound every key in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectRecord {
    /// Project id (`default`, `proj_acme`): ASCII letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// Human name.
    #[serde(default)]
    pub name: String,
    /// Models any key of the project may use.
    #[serde(default, skip_serializing_if = "ModelRules::is_unrestricted")]
    pub models: ModelRules,
    /// Limits over all keys of the project together.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Client address ranges any key of the project may be used from; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// Free key/value tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Conditions every request with a key of the project must meet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Condition>,
    /// A disabled project's keys do not work.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

impl ProjectRecord {
    /// A project with no restrictions of its own.
    pub fn new(id: impl Into<String>) -> Self {
        ProjectRecord {
            id: id.into(),
            name: String::new(),
            models: ModelRules::default(),
            limits: Limits::default(),
            allowed_ips: Vec::new(),
            labels: BTreeMap::new(),
            policies: Vec::new(),
            disabled: false,
        }
    }

    /// Checks the record's own consistency.
    ///
    /// # Errors
    ///
    /// A message naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let ok_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok_id {
            return Err(format!(
                "project id {:?} must be 1 to 64 ASCII letters, digits, '-', '_' or '.'",
                self.id
            ));
        }
        for c in &self.policies {
            c.validate()
                .map_err(|e| format!("project {}: policy {c}: {e}", self.id))?;
        }
        self.limits
            .validate()
            .map_err(|e| format!("project {}: {e}", self.id))
    }
}

/// Rights a derived credential (a short-lived token) carries: each field can only narrow the
/// key it came from, never widen it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restriction {
    /// When set, access per group is the lower of this and the key's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    /// Models, intersected with the key's and project's rules.
    #[serde(default, skip_serializing_if = "ModelRules::is_unrestricted")]
    pub models: ModelRules,
    /// Address ranges, intersected with the key's and project's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// Limits that apply on top of the key's and project's.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
}

/// Whether `ip` falls in one of `ranges` (empty means any). IPv4-mapped IPv6 addresses are
/// compared as the IPv4 address they carry.
pub fn ip_in_ranges(ranges: &[IpNet], ip: IpAddr) -> bool {
    if ranges.is_empty() {
        return true;
    }
    let ip = canonical_ip(ip);
    ranges.iter().any(|net| net.contains(&ip))
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; any other address as it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record() -> KeyRecord {
        KeyRecord::new(
            KeyId::new("key_test"),
            "default",
            KeyDigest::of("x"),
            Timestamp::from_unix_secs(1_000),
        )
    }

    #[test]
    fn new_record_denies_everything() {
        let r = record();
        assert_eq!(
            r.permissions.access("chat.completions"),
            crate::Access::None
        );
    }

    #[test]
    fn lifetime_checks() {
        let now = Timestamp::from_unix_secs(2_000);
        let mut r = record();
        assert_eq!(r.check_live(Secret::Current, now), Ok(()));
        r.expires_at = Some(now);
        assert_eq!(r.check_live(Secret::Current, now), Err(Rejection::Expired));
        r.expires_at = None;
        r.not_before = Some(now.saturating_add(Duration::from_secs(1)));
        assert_eq!(
            r.check_live(Secret::Current, now),
            Err(Rejection::NotYetValid)
        );
        r.not_before = None;
        r.disabled = true;
        assert_eq!(r.check_live(Secret::Current, now), Err(Rejection::Disabled));
        r.revoked_at = Some(now);
        assert_eq!(r.check_live(Secret::Current, now), Err(Rejection::Revoked));
    }

    #[test]
    fn previous_secret_works_only_during_grace() {
        let now = Timestamp::from_unix_secs(2_000);
        let mut r = record();
        assert_eq!(
            r.check_live(Secret::Previous, now),
            Err(Rejection::GraceEnded)
        );
        r.previous = Some(PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: now.saturating_add(Duration::from_secs(60)),
        });
        assert_eq!(r.check_live(Secret::Previous, now), Ok(()));
        let later = now.saturating_add(Duration::from_secs(60));
        assert_eq!(
            r.check_live(Secret::Previous, later),
            Err(Rejection::GraceEnded)
        );
        assert_eq!(r.check_live(Secret::Current, later), Ok(()));
    }

    #[test]
    fn record_round_trips_through_toml() {
        let mut r = record();
        r.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
        r.labels.insert("team".into(), "ml".into());
        r.models = ModelRules::allow_only([crate::ModelPattern::new("gpt-4o-mini").unwrap()]);
        let text = toml::to_string(&r).unwrap();
        let back: KeyRecord = toml::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn ipv4_mapped_addresses_compare_as_ipv4() {
        let ranges: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(ip_in_ranges(&ranges, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!ip_in_ranges(&ranges, "::ffff:11.1.2.3".parse().unwrap()));
        assert!(ip_in_ranges(&[], "1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn bad_project_ids_are_rejected() {
        assert!(ProjectRecord::new("ok-id_1.x").validate().is_ok());
        assert!(ProjectRecord::new("").validate().is_err());
        assert!(ProjectRecord::new("a b").validate().is_err());
        assert!(ProjectRecord::new("a\r\nb").validate().is_err());
    }
}
