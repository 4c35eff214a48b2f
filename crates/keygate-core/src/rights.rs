//! What a key may do: access per endpoint group, and which models it may ask for.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Access to an endpoint group. Ordered: `None < Read < Write`, and Write implies Read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// No access.
    None,
    /// List and retrieve.
    Read,
    /// Create, change, delete, and generate (which costs money). Implies Read.
    Write,
}

impl Access {
    /// Whether holding `self` grants `needed` (Write grants Read).
    #[inline]
    pub fn grants(self, needed: Access) -> bool {
        self >= needed
    }

    /// The name used in config and messages: `none`, `read`, `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of an endpoint group (`chat.completions`, `models`, `files`, ...).
///
/// Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointGroup(Arc<str>);

impl EndpointGroup {
    /// A group with the given name.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        EndpointGroup(name.into())
    }

    /// The group's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EndpointGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<EndpointGroup> for Arc<str> {
    /// The shared name, without copying it.
    fn from(group: EndpointGroup) -> Self {
        group.0
    }
}

impl std::borrow::Borrow<str> for EndpointGroup {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A key's permissions, as OpenAI scopes project keys.
///
/// In config: `permissions = "all"`, `permissions = "read_only"`, or
/// `permissions = { restricted = { "chat.completions" = "write", models = "read" } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permissions {
    /// Write on every group.
    All,
    /// Read on every group.
    ReadOnly,
    /// Per group; a group not listed has no access.
    Restricted(BTreeMap<String, Access>),
}

impl Default for Permissions {
    /// Deny by default: a key made without saying what it may do may do nothing.
    fn default() -> Self {
        Permissions::Restricted(BTreeMap::new())
    }
}

impl Permissions {
    /// The access these permissions give to `group`.
    #[inline]
    pub fn access(&self, group: &str) -> Access {
        match self {
            Permissions::All => Access::Write,
            Permissions::ReadOnly => Access::Read,
            Permissions::Restricted(map) => map.get(group).copied().unwrap_or(Access::None),
        }
    }

    /// Whether every access these give is also given by `wider`, so a token derived with
    /// these permissions can only narrow. `All` and `ReadOnly` reach groups nobody listed, so
    /// they fit inside a `Restricted` set of nothing.
    pub fn is_within(&self, wider: &Permissions) -> bool {
        match (self, wider) {
            (Permissions::Restricted(map), w) => map.iter().all(|(g, a)| w.access(g).grants(*a)),
            (_, Permissions::All) | (Permissions::ReadOnly, Permissions::ReadOnly) => true,
            _ => false,
        }
    }
}

/// A model name pattern: an exact name, or a prefix followed by a trailing `*`.
///
/// Matching ignores ASCII letter case, so a rule on `gpt-4*` also catches `GPT-4` (an upstream
/// that folds case must not be a way around a deny).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelPattern(Box<str>);

/// A model pattern that is empty, holds a `*` anywhere but at its end, or holds control
/// characters or spaces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid model pattern: only a trailing '*' is allowed, and no spaces or control characters"
)]
pub struct ModelPatternError;

impl ModelPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    ///
    /// [`ModelPatternError`] for an empty pattern, an interior `*`, or whitespace/control
    /// characters.
    pub fn new(pattern: &str) -> Result<Self, ModelPatternError> {
        let body = pattern.strip_suffix('*').unwrap_or(pattern);
        let bad = pattern.is_empty()
            || body.contains('*')
            || pattern.chars().any(|c| c.is_whitespace() || c.is_control());
        if bad {
            return Err(ModelPatternError);
        }
        Ok(ModelPattern(pattern.into()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `model` matches.
    #[inline]
    pub fn matches(&self, model: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => {
                model.len() >= prefix.len()
                    && model.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            }
            None => model.eq_ignore_ascii_case(&self.0),
        }
    }

    /// Whether every model this pattern matches is also matched by `wider`.
    pub fn is_within(&self, wider: &ModelPattern) -> bool {
        match (self.0.strip_suffix('*'), wider.0.strip_suffix('*')) {
            (_, Some(wp)) => {
                let mine = self.0.strip_suffix('*').unwrap_or(&self.0);
                mine.len() >= wp.len()
                    && mine.as_bytes()[..wp.len()].eq_ignore_ascii_case(wp.as_bytes())
            }
            (None, None) => self.0.eq_ignore_ascii_case(&wider.0),
            (Some(_), None) => false,
        }
    }
}

impl fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for ModelPattern {
    type Err = ModelPatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelPattern::new(s)
    }
}

impl Serialize for ModelPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ModelPattern::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Allow and deny patterns for models. Deny wins over allow; no allow list means any model
/// not denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRules {
    /// When set, only models matching one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<ModelPattern>>,
    /// Never models matching one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<ModelPattern>,
}

impl ModelRules {
    /// Rules that allow exactly the given patterns.
    pub fn allow_only(patterns: impl IntoIterator<Item = ModelPattern>) -> Self {
        ModelRules {
            allow: Some(patterns.into_iter().collect()),
            deny: Vec::new(),
        }
    }

    /// Whether these rules allow `model`.
    #[inline]
    pub fn allows(&self, model: &str) -> bool {
        if self.deny.iter().any(|p| p.matches(model)) {
            return false;
        }
        match &self.allow {
            None => true,
            Some(allow) => allow.iter().any(|p| p.matches(model)),
        }
    }

    /// Whether these rules place no restriction at all.
    pub fn is_unrestricted(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ModelPattern {
        ModelPattern::new(s).unwrap()
    }

    #[test]
    fn write_implies_read() {
        assert!(Access::Write.grants(Access::Read));
        assert!(Access::Read.grants(Access::Read));
        assert!(!Access::Read.grants(Access::Write));
        assert!(!Access::None.grants(Access::Read));
    }

    #[test]
    fn restricted_missing_group_is_none() {
        let perms = Permissions::Restricted(BTreeMap::from([(
            "chat.completions".to_owned(),
            Access::Write,
        )]));
        assert_eq!(perms.access("chat.completions"), Access::Write);
        assert_eq!(perms.access("files"), Access::None);
        assert_eq!(Permissions::ReadOnly.access("files"), Access::Read);
        assert_eq!(Permissions::All.access("anything"), Access::Write);
        assert_eq!(Permissions::default().access("models"), Access::None);
    }

    #[test]
    fn permissions_parse_from_toml() {
        #[derive(Deserialize)]
        struct W {
            permissions: Permissions,
        }
        let w: W = toml::from_str(r#"permissions = "read_only""#).unwrap();
        assert_eq!(w.permissions, Permissions::ReadOnly);
        let w: W = toml::from_str(
            r#"permissions = { restricted = { "chat.completions" = "write", models = "read" } }"#,
        )
        .unwrap();
        assert_eq!(w.permissions.access("models"), Access::Read);
        assert!(toml::from_str::<W>(r#"permissions = "god""#).is_err());
    }

    #[test]
    fn patterns_match_exact_and_prefix_ignoring_case() {
        assert!(p("gpt-4o-mini").matches("gpt-4o-mini"));
        assert!(p("gpt-4o-mini").matches("GPT-4o-Mini"));
        assert!(!p("gpt-4o-mini").matches("gpt-4o-mini-2024"));
        assert!(p("ft:gpt-3.5-turbo:acme:*").matches("ft:gpt-3.5-turbo:acme:x1"));
        assert!(!p("ft:gpt-3.5-turbo:acme:*").matches("ft:gpt-3.5-turbo:other:x1"));
        assert!(p("*").matches("anything"));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert!(ModelPattern::new("").is_err());
        assert!(ModelPattern::new("gpt-*-mini").is_err());
        assert!(ModelPattern::new("gpt 4").is_err());
        assert!(ModelPattern::new("gpt\n4").is_err());
    }

    #[test]
    fn deny_wins_over_allow() {
        let rules = ModelRules {
            allow: Some(vec![p("gpt-4*")]),
            deny: vec![p("gpt-4-32k")],
        };
        assert!(rules.allows("gpt-4o"));
        assert!(!rules.allows("gpt-4-32k"));
        assert!(!rules.allows("GPT-4-32K"));
        assert!(!rules.allows("claude-3"));
        assert!(ModelRules::default().allows("anything"));
    }

    #[test]
    fn pattern_containment() {
        assert!(p("gpt-4o-mini").is_within(&p("gpt-4*")));
        assert!(p("gpt-4o*").is_within(&p("gpt-4*")));
        assert!(!p("gpt-4*").is_within(&p("gpt-4o*")));
        assert!(!p("gpt-4*").is_within(&p("gpt-4o")));
        assert!(p("gpt-4o").is_within(&p("gpt-4o")));
    }

    #[test]
    fn permission_containment() {
        let narrow = Permissions::Restricted(BTreeMap::from([("models".to_owned(), Access::Read)]));
        assert!(narrow.is_within(&Permissions::ReadOnly));
        assert!(!Permissions::All.is_within(&Permissions::ReadOnly));
        assert!(Permissions::ReadOnly.is_within(&Permissions::All));
        let wide = Permissions::Restricted(BTreeMap::from([("models".to_owned(), Access::Write)]));
        assert!(!wide.is_within(&narrow));
        assert!(narrow.is_within(&wide));
        assert!(!Permissions::ReadOnly.is_within(&wide));
    }
}
