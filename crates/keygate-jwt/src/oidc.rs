//! External identity tokens (OIDC): a person's SSO token goes through the same layers as a
//! service key, with rights from a [`ClaimsMapping`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::Algorithm;
use keygate_core::{
    Credential, KeyDigest, KeyId, KeyRecord, Limits, ModelRules, Permissions, Principal,
    ProjectRecord, Timestamp, TokenError, TokenVerifier,
};
use serde::Deserialize;

use crate::keys::{ConfigError, KeySet};
use crate::verify::{Checks, DEFAULT_LEEWAY, has_jws_shape};

/// Where an [`OidcVerifier`] gets the identity provider's current keys. The host implements it
/// and refreshes the keys itself (fetching the provider's `jwks_uri` on its own schedule);
/// keygate never touches the network.
///
/// A closure `Fn() -> Arc<KeySet>` is a source; so is [`SharedKeySet`].
pub trait KeySetSource: Send + Sync + 'static {
    /// The keys to verify with now.
    fn key_set(&self) -> Arc<KeySet>;
}

impl<F> KeySetSource for F
where
    F: Fn() -> Arc<KeySet> + Send + Sync + 'static,
{
    fn key_set(&self) -> Arc<KeySet> {
        self()
    }
}

/// A key set the host replaces when it refreshes it (lock-free reads).
#[derive(Debug, Clone)]
pub struct SharedKeySet {
    current: Arc<ArcSwap<KeySet>>,
}

impl SharedKeySet {
    /// Starts with `keys`.
    pub fn new(keys: KeySet) -> Self {
        SharedKeySet {
            current: Arc::new(ArcSwap::from_pointee(keys)),
        }
    }

    /// Replaces the keys (a refreshed JWKS parsed with [`KeySet::from_jwks`]); requests after
    /// this call see the new set.
    pub fn replace(&self, keys: KeySet) {
        self.current.store(Arc::new(keys));
    }
}

impl KeySetSource for SharedKeySet {
    fn key_set(&self) -> Arc<KeySet> {
        self.current.load_full()
    }
}

/// What members of one group get.
#[derive(Debug, Clone)]
pub struct GroupGrant {
    /// The project their requests count against (its model rules, limits, address ranges and
    /// `disabled` flag apply).
    pub project: Arc<ProjectRecord>,
    /// Access per endpoint group.
    pub permissions: Permissions,
    /// Models.
    pub models: ModelRules,
    /// Limits (per person: the limit layers key them by the synthesized key id).
    pub limits: Limits,
}

/// How an identity token's claims become rights: the first group (in mapping order) that the
/// token's groups claim names decides project, permissions, models and limits. A token naming
/// no mapped group is refused.
#[derive(Debug, Clone)]
pub struct ClaimsMapping {
    groups_claim: String,
    grants: Vec<(String, GroupGrant)>,
}

impl ClaimsMapping {
    /// A mapping reading groups from the claim named `groups_claim` (usually `groups`).
    pub fn new(groups_claim: impl Into<String>) -> Self {
        ClaimsMapping {
            groups_claim: groups_claim.into(),
            grants: Vec::new(),
        }
    }

    /// Members of `group` get `grant` (unless an earlier group matched first).
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>, grant: GroupGrant) -> Self {
        self.grants.push((group.into(), grant));
        self
    }

    fn grant_for<'a>(&'a self, groups: &[String]) -> Option<(&'a str, &'a GroupGrant)> {
        self.grants
            .iter()
            .find(|(g, _)| groups.iter().any(|t| t == g))
            .map(|(g, grant)| (g.as_str(), grant))
    }
}

/// Verifies identity-provider tokens (OIDC ID or access tokens) as a [`TokenVerifier`].
///
/// Checks as [`JwtVerifier`](crate::JwtVerifier) does (key by `kid` only from the source's
/// set, pinned algorithm, signature, `iss`, `aud`, numeric `exp`, `nbf`), then maps the
/// claims through a [`ClaimsMapping`]. The [`Principal`] it yields is for a synthesized key
/// record with id `oidc:<sub>` (`sub` percent-escaped outside a safe set, at most 128 bytes),
/// [`Credential::External`], the granted rights, and the token's groups as the key's groups.
#[derive(Clone)]
pub struct OidcVerifier<S> {
    inner: Arc<OidcInner<S>>,
}

struct OidcInner<S> {
    source: S,
    issuer: Arc<str>,
    checks: Checks,
    mapping: ClaimsMapping,
}

impl<S> std::fmt::Debug for OidcVerifier<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.inner.issuer)
            .field("mapping", &self.inner.mapping)
            .finish_non_exhaustive()
    }
}

impl<S: KeySetSource> OidcVerifier<S> {
    /// Verifies tokens from `issuer` for `audience` (the client id the provider issued to the
    /// host), with keys from `source`, algorithms pinned to `algorithms` (EdDSA, ES256,
    /// RS256), leeway [`DEFAULT_LEEWAY`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for an empty issuer, audience or algorithm list, or an unsupported
    /// algorithm (HS256 is refused: a provider's keys are public).
    pub fn new(
        source: S,
        issuer: &str,
        audience: &str,
        algorithms: &[Algorithm],
        mapping: ClaimsMapping,
    ) -> Result<Self, ConfigError> {
        crate::install_backend();
        if algorithms.contains(&Algorithm::HS256) {
            return Err(ConfigError::UnsupportedAlgorithm(
                "HS256 for an identity provider".into(),
            ));
        }
        let checks = Checks::new(issuer, audience, algorithms, DEFAULT_LEEWAY)?;
        Ok(OidcVerifier {
            inner: Arc::new(OidcInner {
                source,
                issuer: issuer.into(),
                checks,
                mapping,
            }),
        })
    }

    /// Sets the leeway for `exp` and `nbf`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Lifetime`] over 5 minutes.
    pub fn with_leeway(self, leeway: Duration) -> Result<Self, ConfigError> {
        if leeway > Duration::from_secs(300) {
            return Err(ConfigError::Lifetime("leeway over 5 minutes"));
        }
        let mut inner = Arc::try_unwrap(self.inner)
            .map_err(|_| ConfigError::Lifetime("set the leeway before cloning the verifier"))?;
        inner.checks = inner.checks.with_leeway(leeway);
        Ok(OidcVerifier {
            inner: Arc::new(inner),
        })
    }
}

#[derive(Deserialize)]
struct OidcClaims {
    sub: String,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// The most groups read from a token.
const MAX_GROUPS: usize = 64;

/// `oidc:` + `sub` with every byte outside `[A-Za-z0-9._~@|-]` percent-escaped, so an id never
/// carries separators, spaces or controls into logs, metrics or limit keys.
pub(crate) fn subject_key_id(sub: &str) -> Option<KeyId> {
    if sub.is_empty() || sub.len() > 128 {
        return None;
    }
    let mut id = String::with_capacity(5 + sub.len());
    id.push_str("oidc:");
    for b in sub.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'@' | b'|' | b'-') {
            id.push(char::from(b));
        } else {
            let _ = write!(id, "%{b:02X}");
        }
    }
    Some(KeyId::new(id))
}

/// Group names kept from a token: 1 to 256 bytes, no control characters (they end up in audit
/// records and policy input).
fn group_is_printable(group: &str) -> bool {
    !group.is_empty() && group.len() <= 256 && !group.chars().any(char::is_control)
}

impl<S: KeySetSource> TokenVerifier for OidcVerifier<S> {
    fn accepts(&self, credential: &str) -> bool {
        has_jws_shape(credential)
    }

    async fn verify(&self, token: &str, now: Timestamp) -> Result<Principal, TokenError> {
        let inner = &*self.inner;
        let keys = inner.source.key_set();
        let (claims, times) = inner.checks.decode::<OidcClaims>(&keys, token, now)?;
        let id = subject_key_id(&claims.sub).ok_or(TokenError::Invalid("malformed sub"))?;
        let groups: Vec<String> = match claims.rest.get(&inner.mapping.groups_claim) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|g| group_is_printable(g))
                .take(MAX_GROUPS)
                .map(str::to_owned)
                .collect(),
            Some(serde_json::Value::String(one)) if group_is_printable(one) => vec![one.clone()],
            _ => Vec::new(),
        };
        let (_, grant) = inner
            .mapping
            .grant_for(&groups)
            .ok_or(TokenError::Invalid("no mapped group"))?;
        if grant.project.disabled {
            return Err(TokenError::Invalid("project disabled"));
        }
        let created = claims.iat.map_or(now, Timestamp::from_unix_secs);
        // Never looked up: the digest only fills the field.
        let digest = KeyDigest::of(id.as_str());
        let mut key = KeyRecord::new(id, grant.project.id.clone(), digest, created);
        key.permissions = grant.permissions.clone();
        key.models = grant.models.clone();
        key.limits = grant.limits.clone();
        key.groups = groups;
        let expires_at = Timestamp::from_unix_secs(times.exp);
        key.expires_at = Some(expires_at);
        key.labels
            .insert("issuer".to_owned(), inner.issuer.to_string());
        Ok(Principal::new(
            Arc::new(key),
            grant.project.clone(),
            Credential::External {
                issuer: inner.issuer.clone(),
                expires_at,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::{AnyOf, UNKNOWN_KID};
    use jsonwebtoken::{EncodingKey, Header};
    use keygate_core::{Access, ModelPattern};
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    const IDP: &str = "https://idp.test";
    const CLIENT: &str = "gateway-client";

    fn project(id: &str) -> Arc<ProjectRecord> {
        Arc::new(ProjectRecord::new(id))
    }

    fn mapping() -> ClaimsMapping {
        ClaimsMapping::new("groups")
            .with_group(
                "ml-admins",
                GroupGrant {
                    project: project("ml"),
                    permissions: Permissions::All,
                    models: ModelRules::default(),
                    limits: Limits::default(),
                },
            )
            .with_group(
                "staff",
                GroupGrant {
                    project: project("staff"),
                    permissions: Permissions::Restricted(BTreeMap::from([(
                        "chat.completions".to_owned(),
                        Access::Write,
                    )])),
                    models: ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]),
                    limits: Limits::default(),
                },
            )
    }

    fn oidc() -> OidcVerifier<SharedKeySet> {
        let keys = SharedKeySet::new(KeySet::from_jwks(JWKS).unwrap());
        OidcVerifier::new(
            keys,
            IDP,
            CLIENT,
            &[Algorithm::EdDSA, Algorithm::RS256, Algorithm::ES256],
            mapping(),
        )
        .unwrap()
    }

    fn idp_claims(sub: &str, groups: Value) -> Value {
        json!({
            "iss": IDP, "aud": CLIENT, "sub": sub, "iat": NOW, "exp": NOW + 3600,
            "email": "ada@example.com", "groups": groups,
        })
    }

    fn idp_sign(alg: Algorithm, kid: &str, claims: &Value) -> String {
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_B_PRIV).unwrap(),
            Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIV).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIV).unwrap(),
            _ => unreachable!(),
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        crate::install_backend();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    #[tokio::test]
    async fn idp_token_maps_groups_to_rights() {
        for (alg, kid) in [
            (Algorithm::EdDSA, "idp-ed-1"),
            (Algorithm::RS256, "idp-rsa-1"),
            (Algorithm::ES256, "idp-ec-1"),
        ] {
            let t = idp_sign(alg, kid, &idp_claims("ada", json!(["eng", "staff"])));
            let p = oidc().verify(&t, now()).await.unwrap();
            assert_eq!(p.key_id().as_str(), "oidc:ada");
            assert_eq!(p.project().id, "staff");
            assert_eq!(p.access("chat.completions"), Access::Write);
            assert_eq!(p.access("files"), Access::None);
            assert!(p.allows_model("gpt-4o-mini") && !p.allows_model("gpt-4o"));
            assert_eq!(p.key().groups, ["eng", "staff"]);
            assert!(
                matches!(p.credential(), Credential::External { issuer, .. } if &**issuer == IDP)
            );
        }
    }

    #[tokio::test]
    async fn groups_with_control_characters_are_dropped() {
        let t = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff", "evil\r\nline", "", 7])),
        );
        let p = oidc().verify(&t, now()).await.unwrap();
        assert_eq!(p.key().groups, ["staff"]);
    }

    #[tokio::test]
    async fn first_mapped_group_wins() {
        let t = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff", "ml-admins"])),
        );
        let p = oidc().verify(&t, now()).await.unwrap();
        assert_eq!(p.project().id, "ml");
        assert_eq!(p.access("files"), Access::Write);
    }

    #[tokio::test]
    async fn token_without_a_mapped_group_is_refused() {
        for groups in [
            json!(["eng"]),
            json!([]),
            json!(null),
            json!({"staff": true}),
        ] {
            let t = idp_sign(
                Algorithm::EdDSA,
                "idp-ed-1",
                &idp_claims("ada", groups.clone()),
            );
            assert!(
                matches!(
                    oidc().verify(&t, now()).await,
                    Err(TokenError::Invalid("no mapped group"))
                ),
                "{groups}"
            );
        }
    }

    #[tokio::test]
    async fn idp_tokens_get_the_same_checks() {
        let v = oidc();
        let mut wrong_aud = idp_claims("ada", json!(["staff"]));
        wrong_aud["aud"] = json!("someone-else");
        let mut string_exp = idp_claims("ada", json!(["staff"]));
        string_exp["exp"] = json!((NOW + 3600).to_string());
        for claims in [wrong_aud, string_exp] {
            let t = idp_sign(Algorithm::EdDSA, "idp-ed-1", &claims);
            assert!(matches!(
                v.verify(&t, now()).await,
                Err(TokenError::Invalid(_))
            ));
        }
        let t = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff"])),
        );
        let late = Timestamp::from_unix_secs(NOW + 3600 + 30);
        assert!(matches!(
            v.verify(&t, late).await,
            Err(TokenError::Invalid("token expired"))
        ));
        // A keygate HS256 secret is no use against the provider's public keys.
        let forged = forge_hs256("idp-rsa-1", RSA_PUB, &idp_claims("ada", json!(["staff"])));
        assert!(v.verify(&forged, now()).await.is_err());
    }

    #[tokio::test]
    async fn refreshed_key_set_takes_effect_at_once() {
        let keys = SharedKeySet::new(KeySet::new());
        let v =
            OidcVerifier::new(keys.clone(), IDP, CLIENT, &[Algorithm::EdDSA], mapping()).unwrap();
        let t = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff"])),
        );
        assert!(matches!(
            v.verify(&t, now()).await,
            Err(TokenError::Invalid(UNKNOWN_KID))
        ));
        keys.replace(KeySet::from_jwks(JWKS).unwrap());
        assert!(v.verify(&t, now()).await.is_ok());
    }

    #[tokio::test]
    async fn closure_is_a_key_set_source() {
        let set = Arc::new(KeySet::from_jwks(JWKS).unwrap());
        let v = OidcVerifier::new(
            move || set.clone(),
            IDP,
            CLIENT,
            &[Algorithm::EdDSA],
            mapping(),
        )
        .unwrap();
        let t = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff"])),
        );
        assert!(v.verify(&t, now()).await.is_ok());
    }

    #[test]
    fn hmac_is_refused_for_an_identity_provider() {
        let keys = SharedKeySet::new(KeySet::new());
        assert!(OidcVerifier::new(keys, IDP, CLIENT, &[Algorithm::HS256], mapping()).is_err());
    }

    #[test]
    fn subjects_are_escaped_into_key_ids() {
        assert_eq!(
            subject_key_id("auth0|123").unwrap().as_str(),
            "oidc:auth0|123"
        );
        assert_eq!(
            subject_key_id("a b/../\r\nx").unwrap().as_str(),
            "oidc:a%20b%2F..%2F%0D%0Ax"
        );
        assert_eq!(subject_key_id("é").unwrap().as_str(), "oidc:%C3%A9");
        assert!(subject_key_id("").is_none());
        assert!(subject_key_id(&"x".repeat(129)).is_none());
    }

    #[tokio::test]
    async fn disabled_project_refuses_its_members() {
        let mut p = ProjectRecord::new("staff");
        p.disabled = true;
        let mapping = ClaimsMapping::new("groups").with_group(
            "staff",
            GroupGrant {
                project: Arc::new(p),
                permissions: Permissions::All,
                models: ModelRules::default(),
                limits: Limits::default(),
            },
        );
        let keys = SharedKeySet::new(KeySet::from_jwks(JWKS).unwrap());
        let v = OidcVerifier::new(keys, IDP, CLIENT, &[Algorithm::EdDSA], mapping).unwrap();
        let t = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff"])),
        );
        assert!(matches!(
            v.verify(&t, now()).await,
            Err(TokenError::Invalid("project disabled"))
        ));
    }

    #[tokio::test]
    async fn any_of_routes_keygate_and_idp_tokens() {
        let both = AnyOf::new(verifier(), oidc());
        let ours = sign(Algorithm::HS256, "hs", &claims());
        let theirs = idp_sign(
            Algorithm::EdDSA,
            "idp-ed-1",
            &idp_claims("ada", json!(["staff"])),
        );
        assert!(both.accepts(&ours) && both.accepts(&theirs));
        assert_eq!(
            both.verify(&ours, now()).await.unwrap().key_id().as_str(),
            "key_a"
        );
        assert_eq!(
            both.verify(&theirs, now()).await.unwrap().key_id().as_str(),
            "oidc:ada"
        );
        // Refused by ours for a real reason, unknown to theirs: ours' reason is reported.
        let expired = sign(Algorithm::HS256, "hs", &claims());
        let late = Timestamp::from_unix_secs(NOW + 3600);
        assert!(matches!(
            both.verify(&expired, late).await,
            Err(TokenError::Invalid("token expired"))
        ));
        let stranger = sign(Algorithm::HS256, "nobody", &claims());
        assert!(matches!(
            both.verify(&stranger, now()).await,
            Err(TokenError::Invalid(UNKNOWN_KID))
        ));
    }
}
