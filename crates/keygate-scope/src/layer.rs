//! [`ScopeLayer`]: configuration of the scope check.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use keygate_core::facts::TokenCounter;
use keygate_core::{ClientIp, Clock, ObjectRegistry};
use tower_layer::Layer;

#[cfg(feature = "decompression")]
use crate::decompress::Decompression;
use crate::ip::TrustedProxies;
use crate::policy::{Policy, PolicyConfig};
use crate::route::{RouteConfig, RouteError, RouteSpec, RouteTable};
use crate::service::Scope;

/// The default body limit for reading a request's model: 8 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// The most bytes of a body's text a token counter counts by default: 1 MiB (about 20 ms
/// with an OpenAI tokenizer); text beyond counts a token a byte.
pub const DEFAULT_MAX_TOKENIZED: usize = 1 << 20;

/// Reads the connection's peer address from request extensions.
pub type PeerAddrFn = fn(&http::Extensions) -> Option<IpAddr>;

/// The default peer reader: a [`ClientIp`] the host inserted, then (with the `axum` feature)
/// `axum::extract::ConnectInfo<SocketAddr>`, then a bare `SocketAddr` extension.
pub fn default_peer_addr(ext: &http::Extensions) -> Option<IpAddr> {
    if let Some(ClientIp(ip)) = ext.get::<ClientIp>() {
        return Some(*ip);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = ext.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        return Some(info.0.ip());
    }
    ext.get::<std::net::SocketAddr>().map(|a| a.ip())
}

#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) routes: RouteTable,
    pub(crate) body_limit: usize,
    pub(crate) proxies: TrustedProxies,
    pub(crate) peer: PeerAddrFn,
    pub(crate) policies: Vec<Arc<dyn Policy>>,
    pub(crate) clock: Clock,
    #[cfg(feature = "decompression")]
    pub(crate) decompression: Option<Decompression>,
    pub(crate) tokens: Option<Arc<dyn TokenCounter>>,
    pub(crate) max_tokenized: usize,
    pub(crate) objects: Option<Arc<dyn ObjectRegistry>>,
}

/// Checks every request against the caller's rights: route → endpoint group and access,
/// permission, client address, model, and policies. See the [crate docs](crate).
#[derive(Clone)]
#[must_use]
pub struct ScopeLayer {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for ScopeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ScopeLayer");
        d.field("routes", &self.shared.routes.len())
            .field("body_limit", &self.shared.body_limit)
            .field("trusted_proxies", &self.shared.proxies)
            .field("policies", &self.shared.policies.len())
            .field("objects", &self.shared.objects.is_some());
        #[cfg(feature = "decompression")]
        d.field("decompression", &self.shared.decompression);
        d.finish()
    }
}

impl ScopeLayer {
    /// Checks requests against `routes`.
    pub fn new(routes: RouteTable) -> Self {
        ScopeLayer {
            shared: Arc::new(Shared {
                routes,
                body_limit: DEFAULT_BODY_LIMIT,
                proxies: TrustedProxies::default(),
                peer: default_peer_addr,
                policies: Vec::new(),
                clock: Clock::system(),
                tokens: None,
                max_tokenized: DEFAULT_MAX_TOKENIZED,
                objects: None,
                #[cfg(feature = "decompression")]
                decompression: None,
            }),
        }
    }

    /// Checks requests against the [`RouteTable::openai`] preset.
    pub fn openai() -> Self {
        ScopeLayer::new(RouteTable::openai())
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.shared)
    }

    /// The most bytes of a body read to find its model (default [`DEFAULT_BODY_LIMIT`]);
    /// larger bodies on model routes get 413. The same limit bounds the batch input files a
    /// caller with model rules uploads (routes with `batch_input`), since each is read whole
    /// to verify its requests' models: a larger upload is 413 `request_too_large` naming the
    /// limit, refused once the read passes it (or at once, from its `Content-Length`), and
    /// never forwarded unverified.
    pub fn with_body_limit(mut self, limit: usize) -> Self {
        self.shared_mut().body_limit = limit;
        self
    }

    /// Believes the forwarding header from these proxies.
    ///
    /// # Security
    ///
    /// See [`TrustedProxies`]: a trusted address can claim to forward for any client.
    pub fn with_trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.shared_mut().proxies = proxies;
        self
    }

    /// Reads the connection's peer address with `peer` instead of [`default_peer_addr`]
    /// (for example from tonic's `TcpConnectInfo`, which tonic's server puts in request
    /// extensions):
    ///
    /// ```
    /// use keygate_scope::ScopeLayer;
    /// use tonic::transport::server::TcpConnectInfo;
    ///
    /// let layer = ScopeLayer::openai()
    ///     .with_peer_addr(|ext| ext.get::<TcpConnectInfo>()?.remote_addr().map(|a| a.ip()));
    /// # drop(layer);
    /// ```
    pub fn with_peer_addr(mut self, peer: PeerAddrFn) -> Self {
        self.shared_mut().peer = peer;
        self
    }

    /// Adds a policy, evaluated after the built-in checks; every policy must allow.
    pub fn with_policy(mut self, policy: impl Policy) -> Self {
        self.shared_mut().policies.push(Arc::new(policy));
        self
    }

    /// Reads the model from compressed bodies (`Content-Encoding`) of the codings
    /// `decompression` accepts, instead of refusing them with 415.
    ///
    /// Only on routes whose body carries the model. The compressed body is read under the
    /// body limit ([`ScopeLayer::with_body_limit`]; 413 past it), then decoded only to be
    /// inspected, into a buffer that stops at [`Decompression::max_decompressed`] (default:
    /// the body limit): a body that decodes to more is refused with 413 once the cap is
    /// reached, so a small "zip bomb" costs no more memory than the cap. Data that is not
    /// valid for its coding (corrupt, truncated, or with bytes after the end of the stream,
    /// such as a second gzip member) is refused with 400 `invalid_body_encoding`; a coding
    /// not accepted, or more than one coding stacked, stays 415
    /// `unsupported_content_encoding`. The model is then found in the decoded bytes exactly
    /// as in an uncompressed body, and the request goes inward with the **decoded** body,
    /// exactly the bytes that were checked, with `Content-Encoding` (and `Content-Length`)
    /// removed, so the layers and the upstream behind read what was checked, never a second
    /// decoding of their own.
    ///
    /// ```
    /// use keygate_scope::{ContentCoding, Decompression, ScopeLayer};
    ///
    /// let layer = ScopeLayer::openai().with_decompression(
    ///     Decompression::only([ContentCoding::Gzip]).with_max_decompressed(4 * 1024 * 1024),
    /// );
    /// # drop(layer);
    /// ```
    #[cfg(feature = "decompression")]
    #[cfg_attr(docsrs, doc(cfg(feature = "decompression")))]
    pub fn with_decompression(mut self, decompression: Decompression) -> Self {
        self.shared_mut().decompression = Some(decompression);
        self
    }

    /// Counts prompt tokens with `counter` for the models it knows (see
    /// [`OpenAiTokenizer`](crate::OpenAiTokenizer)), so the token layer reserves the prompt's
    /// exact size instead of a byte bound. Up to `max_bytes` of a body's text is counted
    /// (default [`DEFAULT_MAX_TOKENIZED`]); text beyond counts a token a byte.
    pub fn with_token_counter(mut self, counter: Arc<dyn TokenCounter>, max_bytes: usize) -> Self {
        let shared = self.shared_mut();
        shared.tokens = Some(counter);
        shared.max_tokenized = max_bytes;
        self
    }

    /// Keeps projects apart on a shared upstream: objects a response creates are recorded in
    /// `registry` as the caller's project's, and a request naming an object (in its path or
    /// body) that is not the caller's project's is answered 404 (see [`crate::objects`]).
    /// Runs and batches that name no model are then checked as the model their assistant or
    /// input file recorded, instead of being refused to keys with model rules.
    pub fn with_objects(mut self, registry: Arc<dyn ObjectRegistry>) -> Self {
        self.shared_mut().objects = Some(registry);
        self
    }

    /// The clock policies see.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.shared_mut().clock = clock;
        self
    }

    /// The route table.
    pub fn routes(&self) -> &RouteTable {
        &self.shared.routes
    }
}

/// The scope layer as written in config.
///
/// ```toml
/// openai_preset = true        # default true
/// body_limit = 8388608        # bytes; default 8 MiB
///
/// [trusted_proxies]
/// ranges = ["10.0.0.0/8"]
/// header = "x_forwarded_for"  # or "forwarded"
///
/// [[routes]]
/// method = "POST"
/// path = "/openai/deployments/{model}/chat/completions"
/// group = "chat.completions"
/// model = [{ path = "model" }, "json"]
///
/// [[policies]]
/// type = "require_group"
/// group = "ml"
///
/// [decompression]                 # feature `decompression`; absent = compressed bodies get 415
/// encodings = ["gzip", "deflate"] # default: both
/// max_decompressed = 8388608      # bytes; default: body_limit
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// Start from the OpenAI preset (default true).
    #[serde(default = "yes")]
    pub openai_preset: bool,
    /// Routes, added to the preset if it is on.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Body limit in bytes for reading a model.
    #[serde(default = "default_limit")]
    pub body_limit: usize,
    /// Proxies whose forwarding header is believed.
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
    /// Built-in policies.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// Reading the model from compressed bodies ([`ScopeLayer::with_decompression`]);
    /// absent, they are refused with 415.
    #[cfg(feature = "decompression")]
    #[cfg_attr(docsrs, doc(cfg(feature = "decompression")))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decompression: Option<Decompression>,
}

fn yes() -> bool {
    true
}

fn default_limit() -> usize {
    DEFAULT_BODY_LIMIT
}

impl Default for ScopeConfig {
    fn default() -> Self {
        ScopeConfig {
            openai_preset: true,
            routes: Vec::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            trusted_proxies: TrustedProxies::default(),
            policies: Vec::new(),
            #[cfg(feature = "decompression")]
            decompression: None,
        }
    }
}

/// Why a [`ScopeConfig`] is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeConfigError {
    /// A bad route.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A bad policy.
    #[error("policy {policy}: {message}")]
    Policy {
        /// The policy, in its one-line form.
        policy: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ScopeLayer {
    /// A layer from config (the clock is the system clock; see [`ScopeLayer::with_clock`]).
    ///
    /// # Errors
    ///
    /// A bad route or policy.
    pub fn from_config(config: &ScopeConfig) -> Result<Self, ScopeConfigError> {
        let routes = RouteTable::from_config(&RouteConfig {
            openai_preset: config.openai_preset,
            routes: config.routes.clone(),
        })?;
        let mut layer = ScopeLayer::new(routes)
            .with_body_limit(config.body_limit)
            .with_trusted_proxies(config.trusted_proxies.clone());
        #[cfg(feature = "decompression")]
        if let Some(d) = &config.decompression {
            layer = layer.with_decompression(d.clone());
        }
        for p in &config.policies {
            p.validate().map_err(|message| ScopeConfigError::Policy {
                policy: p.to_string(),
                message,
            })?;
            layer.shared_mut().policies.push(Arc::new(p.clone()));
        }
        Ok(layer)
    }
}

impl<S> Layer<S> for ScopeLayer {
    type Service = Scope<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Scope::new(inner, self.shared.clone())
    }
}
