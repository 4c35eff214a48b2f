//! [`RequestTrace`]: what inner layers learned about a request, for the outermost layer to read
//! after the request has gone inward.
//!
//! The audit layer puts a `RequestTrace` in request extensions before calling inward; it keeps a
//! clone. Request extensions travel inward and are gone once the inner service has the request, so
//! inner layers that learn who the caller is (extract), what it asks for (scope) or from where,
//! record it here as well as in their own extensions. Every slot is set once: the first value wins.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use crate::principal::Principal;
use crate::record::{KeyRecord, ProjectRecord};
use crate::rights::EndpointGroup;

/// A shared, set-once record of what inner layers decided about a request.
///
/// Cheap to clone (one `Arc`); lock-free to read and write. Holds no secret: the principal slot
/// keeps only the key and project records (which hold digests, never secrets), not the credential.
#[derive(Clone, Default)]
pub struct RequestTrace(Arc<TraceCell>);

#[derive(Default)]
struct TraceCell {
    principal: OnceLock<(Arc<KeyRecord>, Arc<ProjectRecord>)>,
    endpoint_group: OnceLock<EndpointGroup>,
    model: OnceLock<Arc<str>>,
    client_ip: OnceLock<IpAddr>,
    cut: OnceLock<Cut>,
}

/// Why keygate cut a request short: a timeout of the upstream exchange, or the server shutting
/// down past its drain deadline.
///
/// Recorded in the [`RequestTrace`] by whoever cut the request (the upstream proxy, the
/// server), and put in the extensions of a response keygate made in place of the upstream's
/// (a 504 after a timeout), so the token layer charges the reservation instead of giving it
/// back: the upstream may have done the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Cut {
    /// No connection to the upstream within the connect timeout.
    UpstreamConnect,
    /// The upstream sent no response head within its timeout.
    UpstreamHead,
    /// The upstream's response body paused longer than the idle timeout between chunks.
    UpstreamIdle,
    /// The whole exchange took longer than the total timeout.
    UpstreamTotal,
    /// The server was shutting down and its drain deadline passed.
    Shutdown,
}

impl Cut {
    /// The name used in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Cut::UpstreamConnect => "upstream_connect",
            Cut::UpstreamHead => "upstream_head",
            Cut::UpstreamIdle => "upstream_idle",
            Cut::UpstreamTotal => "upstream_total",
            Cut::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RequestTrace {
    /// An empty trace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the caller's key and project. Returns `false` if a principal was already recorded
    /// (the first one stays).
    pub fn set_principal(&self, principal: &Principal) -> bool {
        self.0
            .principal
            .set((principal.key_arc().clone(), principal.project_arc().clone()))
            .is_ok()
    }

    /// Records the endpoint group the request matched. Returns `false` if one was already set.
    pub fn set_endpoint_group(&self, group: &EndpointGroup) -> bool {
        self.0.endpoint_group.set(group.clone()).is_ok()
    }

    /// Records the model the request asks for. Returns `false` if one was already set.
    pub fn set_model(&self, model: impl Into<Arc<str>>) -> bool {
        self.0.model.set(model.into()).is_ok()
    }

    /// Records the client's address as keygate decided it. Returns `false` if one was already set.
    pub fn set_client_ip(&self, ip: IpAddr) -> bool {
        self.0.client_ip.set(ip).is_ok()
    }

    /// Records why the request was cut short. Returns `false` if a cut was already recorded.
    pub fn set_cut(&self, cut: Cut) -> bool {
        self.0.cut.set(cut).is_ok()
    }

    /// Why the request was cut short, if it was.
    pub fn cut(&self) -> Option<Cut> {
        self.0.cut.get().copied()
    }

    /// The caller's key record, if recorded.
    pub fn key(&self) -> Option<&KeyRecord> {
        self.0.principal.get().map(|(k, _)| &**k)
    }

    /// The caller's project record, if recorded.
    pub fn project(&self) -> Option<&ProjectRecord> {
        self.0.principal.get().map(|(_, p)| &**p)
    }

    /// The endpoint group, if recorded.
    pub fn endpoint_group(&self) -> Option<&EndpointGroup> {
        self.0.endpoint_group.get()
    }

    /// The requested model, if recorded.
    pub fn model(&self) -> Option<&Arc<str>> {
        self.0.model.get()
    }

    /// The client address, if recorded.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.0.client_ip.get().copied()
    }
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace")
            .field("key_id", &self.key().map(|k| k.id.as_str()))
            .field("project", &self.project().map(|p| p.id.as_str()))
            .field("endpoint_group", &self.endpoint_group())
            .field("model", &self.model())
            .field("client_ip", &self.client_ip())
            .field("cut", &self.cut())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::key::{KeyDigest, KeyId};
    use crate::principal::Credential;
    use crate::record::Secret;

    fn principal(name: &str) -> Principal {
        let key = KeyRecord::new(
            KeyId::new("key_a"),
            "proj",
            KeyDigest::of("sk-not-a-real-secret"),
            Timestamp::UNIX_EPOCH,
        );
        let mut key = key;
        key.name = name.into();
        Principal::new(
            Arc::new(key),
            Arc::new(ProjectRecord::new("proj")),
            Credential::ApiKey(Secret::Current),
        )
    }

    #[test]
    fn clones_share_what_inner_layers_record() {
        let trace = RequestTrace::new();
        let inner = trace.clone();
        assert!(trace.key().is_none());
        assert!(inner.set_principal(&principal("first")));
        assert!(inner.set_endpoint_group(&EndpointGroup::new("chat.completions")));
        assert!(inner.set_model("gpt-4o-mini"));
        assert!(inner.set_client_ip("127.0.0.1".parse().unwrap()));
        assert_eq!(trace.key().unwrap().id.as_str(), "key_a");
        assert_eq!(trace.key().unwrap().name, "first");
        assert_eq!(trace.project().unwrap().id, "proj");
        assert_eq!(trace.endpoint_group().unwrap().as_str(), "chat.completions");
        assert_eq!(trace.model().map(|m| &**m), Some("gpt-4o-mini"));
        assert_eq!(trace.client_ip(), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(trace.cut(), None);
        assert!(inner.set_cut(Cut::UpstreamIdle));
        assert!(!inner.set_cut(Cut::Shutdown));
        assert_eq!(trace.cut(), Some(Cut::UpstreamIdle));
        assert_eq!(Cut::UpstreamIdle.as_str(), "upstream_idle");
    }

    #[test]
    fn first_value_wins() {
        let trace = RequestTrace::new();
        assert!(trace.set_principal(&principal("first")));
        assert!(!trace.set_principal(&principal("second")));
        assert!(trace.set_model("a"));
        assert!(!trace.set_model("b"));
        assert_eq!(trace.key().unwrap().name, "first");
        assert_eq!(trace.model().map(|m| &**m), Some("a"));
    }
}
