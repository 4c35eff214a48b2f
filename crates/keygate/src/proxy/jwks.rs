//! [`JwksFetcher`]: an identity provider's key set (JWKS), fetched over `https://` with the
//! same rustls roots as the upstreams, and kept current in a [`SharedKeySet`] for an
//! [`OidcVerifier`](keygate_jwt::OidcVerifier).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use keygate_jwt::{KeySet, SharedKeySet};

use super::{Roots, UpstreamError, tls};

/// The most bytes of a JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a key set could not be fetched; the previous set stays in use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The request failed (connection, TLS, timeout).
    #[error("fetching the key set failed: {0}")]
    Fetch(String),
    /// The provider answered with another status than 200.
    #[error("the key set URL answered {0}")]
    Status(StatusCode),
    /// The document is larger than 1 MiB, or not UTF-8.
    #[error("the key set document is too large or not text")]
    Body,
    /// The document is not a usable JWKS.
    #[error(transparent)]
    Keys(#[from] keygate_jwt::ConfigError),
}

/// Fetches a JWKS from an `https://` (or `http://`) URL.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use keygate::jwt::SharedKeySet;
/// use keygate::proxy::{JwksFetcher, Roots};
///
/// let fetcher = JwksFetcher::new("https://idp.example/.well-known/jwks.json", Roots::Webpki, &[])?;
/// let keys = SharedKeySet::new(fetcher.fetch().await?);
/// // Refresh every 10 minutes; a failed refresh keeps the keys it has.
/// fetcher.spawn_refresh(keys.clone(), std::time::Duration::from_secs(600));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct JwksFetcher {
    uri: Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for JwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksFetcher")
            .field("uri", &self.uri)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl JwksFetcher {
    /// A fetcher for `url`, verifying the server against `roots` and `extra_ca` (PEM).
    ///
    /// # Errors
    ///
    /// [`UpstreamError::InvalidUrl`] for anything but an absolute http(s) URL; TLS errors as
    /// for the proxy.
    pub fn new(url: &str, roots: Roots, extra_ca: &[Vec<u8>]) -> Result<Self, UpstreamError> {
        let uri: Uri = url.parse().map_err(|_| UpstreamError::InvalidUrl)?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.authority().is_some() => {}
            _ => return Err(UpstreamError::InvalidUrl),
        }
        let timeout = Duration::from_secs(10);
        Ok(JwksFetcher {
            uri,
            client: tls::client(roots, extra_ca, Some(timeout))?,
            timeout,
        })
    }

    /// Sets how long one fetch may take (default 10 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Fetches and parses the key set once.
    ///
    /// # Errors
    ///
    /// [`JwksError`] when it cannot be fetched or is not a usable key set.
    pub async fn fetch(&self) -> Result<KeySet, JwksError> {
        let request = Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| JwksError::Fetch(e.to_string()))?;
        let response = tokio::time::timeout(self.timeout, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| JwksError::Fetch(e.to_string()))?;
            if response.status() != StatusCode::OK {
                return Err(JwksError::Status(response.status()));
            }
            Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|_| JwksError::Body)
        })
        .await
        .map_err(|_| JwksError::Fetch("timed out".to_owned()))??;
        let text = std::str::from_utf8(&response).map_err(|_| JwksError::Body)?;
        Ok(KeySet::from_jwks(text)?)
    }

    /// Refreshes `keys` every `every` (at least one second apart) on the tokio runtime; a
    /// failed fetch is logged and keeps the previous keys. Abort the handle to stop.
    pub fn spawn_refresh(self, keys: SharedKeySet, every: Duration) -> tokio::task::JoinHandle<()> {
        let every = every.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match self.fetch().await {
                    Ok(set) => keys.replace(set),
                    Err(error) => {
                        tracing::error!(%error, uri = %self.uri, "key set refresh failed; the previous keys stay in use");
                    }
                }
            }
        })
    }
}
