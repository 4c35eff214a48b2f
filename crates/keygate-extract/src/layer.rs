//! [`KeyExtractLayer`]: the configuration, shared by every service it makes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use keygate_core::{Clock, KeyFormat, KeyStore, NoTokens, TokenVerifier};
use tower_layer::Layer;

use crate::service::KeyExtract;
use crate::source::{ConfigError, CredentialSource, validate_sources};

/// Authenticates every request by its API key (or a token), failing closed; see the
/// [crate docs](crate).
///
/// Cheap to clone: all state is shared.
#[must_use]
pub struct KeyExtractLayer<K, T = NoTokens> {
    shared: Arc<Shared<K, T>>,
}

pub(crate) struct Shared<K, T> {
    pub(crate) store: Arc<K>,
    pub(crate) verifier: Arc<T>,
    pub(crate) format: KeyFormat,
    pub(crate) sources: Arc<[CredentialSource]>,
    pub(crate) clock: Clock,
    pub(crate) keep_headers: bool,
    /// Set once the store has made a request wait: from then on lookups go straight to a
    /// boxed future instead of being tried at once first (and started twice).
    pub(crate) store_waits: AtomicBool,
    /// The same for the token verifier.
    pub(crate) verifier_waits: AtomicBool,
}

impl<K, T> Clone for Shared<K, T> {
    fn clone(&self) -> Self {
        Shared {
            store: self.store.clone(),
            verifier: self.verifier.clone(),
            format: self.format.clone(),
            sources: self.sources.clone(),
            clock: self.clock.clone(),
            keep_headers: self.keep_headers,
            store_waits: AtomicBool::new(false),
            verifier_waits: AtomicBool::new(false),
        }
    }
}

impl<K: KeyStore> KeyExtractLayer<K, NoTokens> {
    /// Authenticates with API keys found in `store`; no tokens; the default key format and
    /// sources; the system clock; credential headers removed from the request handed inward.
    pub fn new(store: K) -> Self {
        KeyExtractLayer {
            shared: Arc::new(Shared {
                store: Arc::new(store),
                verifier: Arc::new(NoTokens),
                format: KeyFormat::default(),
                sources: Arc::from(CredentialSource::defaults()),
                clock: Clock::system(),
                keep_headers: false,
                store_waits: AtomicBool::new(false),
                verifier_waits: AtomicBool::new(false),
            }),
        }
    }
}

impl<K, T> KeyExtractLayer<K, T> {
    fn edit(self, f: impl FnOnce(&mut Shared<K, T>)) -> Self {
        let mut shared = Shared::clone(&self.shared);
        f(&mut shared);
        KeyExtractLayer {
            shared: Arc::new(shared),
        }
    }

    /// Also accepts tokens: a credential that `verifier` [accepts](TokenVerifier::accepts) is
    /// verified by it instead of being looked up as an API key.
    pub fn with_token_verifier<T2: TokenVerifier>(self, verifier: T2) -> KeyExtractLayer<K, T2> {
        let s = Shared::clone(&self.shared);
        KeyExtractLayer {
            shared: Arc::new(Shared {
                store: s.store,
                verifier: Arc::new(verifier),
                format: s.format,
                sources: s.sources,
                clock: s.clock,
                keep_headers: s.keep_headers,
                store_waits: AtomicBool::new(false),
                verifier_waits: AtomicBool::new(false),
            }),
        }
    }

    /// The key format (prefix) keys are parsed with.
    pub fn with_key_format(self, format: KeyFormat) -> Self {
        self.edit(|s| s.format = format)
    }

    /// Where credentials are looked for, replacing the defaults
    /// ([`CredentialSource::defaults`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for an empty list, a header listed twice, or `Authorization` as a plain
    /// header.
    pub fn with_sources(
        self,
        sources: impl IntoIterator<Item = CredentialSource>,
    ) -> Result<Self, ConfigError> {
        let sources = validate_sources(sources)?;
        Ok(self.edit(|s| s.sources = Arc::from(sources)))
    }

    /// The clock expiry, not-before and rotation grace are checked against.
    pub fn with_clock(self, clock: Clock) -> Self {
        self.edit(|s| s.clock = clock)
    }

    /// Whether the credential headers stay on the request handed inward (default `false`:
    /// they are removed, so an upstream behind a proxy never sees the client's key). Kept
    /// headers are marked [sensitive](http::HeaderValue::set_sensitive).
    ///
    /// # Security
    ///
    /// Keeping them lets the inner service (and anything it forwards to or logs) see the
    /// client's secret.
    pub fn keep_credential_headers(self, keep: bool) -> Self {
        self.edit(|s| s.keep_headers = keep)
    }

    /// The credential sources in use.
    pub fn sources(&self) -> &[CredentialSource] {
        &self.shared.sources
    }
}

impl<K, T> Clone for KeyExtractLayer<K, T> {
    fn clone(&self) -> Self {
        KeyExtractLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<K, T> fmt::Debug for KeyExtractLayer<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl<K, T> fmt::Debug for Shared<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyExtractLayer")
            .field("store", &std::any::type_name::<K>())
            .field("verifier", &std::any::type_name::<T>())
            .field("format", &self.format)
            .field("sources", &self.sources)
            .field("clock", &self.clock)
            .field("keep_credential_headers", &self.keep_headers)
            .finish()
    }
}

impl<S, K, T> Layer<S> for KeyExtractLayer<K, T> {
    type Service = KeyExtract<S, K, T>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyExtract::new(inner, self.shared.clone())
    }
}
