//! [`KeyExtract`]: the service, and the decision it makes on each request.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use http::header::Entry;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use keygate_core::{
    Credential, Denial, KeyFormatError, KeyStore, Lookup, Principal, RequestTrace, ResponseBody,
    Stage, StoreError, Timestamp, TokenError, TokenVerifier,
};
use tower_service::Service;
use zeroize::Zeroizing;

use crate::future::{Decision, ResponseFuture};
use crate::layer::Shared;
use crate::source::{Found, find_credential, query_has_credential};

/// The service made by [`KeyExtractLayer`](crate::KeyExtractLayer).
pub struct KeyExtract<S, K, T> {
    inner: S,
    shared: Arc<Shared<K, T>>,
}

impl<S, K, T> KeyExtract<S, K, T> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<K, T>>) -> Self {
        KeyExtract { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K, T> Clone for KeyExtract<S, K, T> {
    fn clone(&self) -> Self {
        KeyExtract {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, K, T> fmt::Debug for KeyExtract<S, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyExtract")
            .field("inner", &self.inner)
            .field("config", &*self.shared)
            .finish()
    }
}

impl<S, K, T, ReqBody, ResBody> Service<Request<ReqBody>> for KeyExtract<S, K, T>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    K: KeyStore,
    T: TokenVerifier,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match decide(&self.shared, req.headers(), req.uri()) {
            Outcome::Allow(principal) => {
                admit(&self.shared, &mut req, principal);
                // The inner service is ready and called right away: no clone needed.
                ResponseFuture::inner(self.inner.call(req))
            }
            Outcome::Deny(denial) => ResponseFuture::denied(denial, req.headers()),
            Outcome::Pending(decision) => {
                hide(&self.shared, req.headers_mut());
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::deciding(decision, req, inner)
            }
        }
    }
}

/// What `call` knows at once.
enum Outcome {
    Allow(Principal),
    Deny(Denial),
    /// The store or verifier has to wait; the request waits with it.
    Pending(Decision),
}

fn admit<K, T, B>(shared: &Shared<K, T>, req: &mut Request<B>, principal: Principal) {
    hide(shared, req.headers_mut());
    attach(req, principal);
}

/// Hands the principal inward, and tells an outer audit layer who the caller is.
pub(crate) fn attach<B>(req: &mut Request<B>, principal: Principal) {
    if let Some(trace) = req.extensions().get::<RequestTrace>() {
        trace.set_principal(&principal);
    }
    req.extensions_mut().insert(principal);
}

/// Removes the credential headers, or, when they are kept, marks them sensitive (HTTP/2 and
/// HTTP/3 never index them; `Debug` of the header map redacts them).
fn hide<K, T>(shared: &Shared<K, T>, headers: &mut HeaderMap) {
    for source in shared.sources.iter() {
        if !shared.keep_headers {
            // `remove` drops every value of a repeated header.
            headers.remove(source.header_name());
        } else if let Entry::Occupied(mut values) = headers.entry(source.header_name()) {
            for value in values.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

fn conflicting_credentials() -> Denial {
    Denial::new(
        Stage::Extract,
        StatusCode::BAD_REQUEST,
        "conflicting_credentials",
        "The request carries more than one different credential. Send exactly one.",
    )
}

fn credential_in_query() -> Denial {
    Denial::new(
        Stage::Extract,
        StatusCode::BAD_REQUEST,
        "credential_in_query",
        "Credentials are not accepted in the query string. Remove it from the URL and send the key in the Authorization header.",
    )
}

/// Polls the future `make` makes once, unless a future of this source has had to wait
/// before; `None` if it is not ready at once (and then never tries again).
#[inline]
fn try_now<F: Future>(waits: &AtomicBool, make: impl FnOnce() -> F) -> Option<F::Output> {
    if waits.load(Ordering::Relaxed) {
        return None;
    }
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(make()).poll(&mut cx) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => {
            waits.store(true, Ordering::Relaxed);
            None
        }
    }
}

fn decide<K: KeyStore, T: TokenVerifier>(
    shared: &Arc<Shared<K, T>>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Outcome {
    let credential = match find_credential(headers, &shared.sources) {
        Found::One(c) => c,
        Found::Nothing => return Outcome::Deny(Denial::missing_credential()),
        Found::Conflict => return Outcome::Deny(conflicting_credentials()),
        Found::Malformed => return Outcome::Deny(Denial::invalid_credential("malformed")),
    };
    if let Some(query) = uri.query()
        && query_has_credential(query, |v| {
            shared.format.has_prefix(v) || shared.verifier.accepts(v)
        })
    {
        return Outcome::Deny(credential_in_query());
    }

    if shared.verifier.accepts(credential) {
        let now = shared.clock.now();
        // Fast path: a verifier that answers at once costs no allocation. The first time it
        // makes a request wait, that attempt is dropped and asked again from an owned future;
        // from then on its requests go to the owned future directly.
        if let Some(result) = try_now(&shared.verifier_waits, || {
            shared.verifier.verify(credential, now)
        }) {
            return settle(token_result(result));
        }
        let shared = shared.clone();
        let token = Zeroizing::new(credential.to_owned());
        return Outcome::Pending(Box::pin(async move {
            token_result(shared.verifier.verify(&token, now).await)
        }));
    }

    let digest = match shared.format.parse(credential) {
        Ok(d) => d,
        Err(e) => return Outcome::Deny(Denial::invalid_credential(format_detail(e))),
    };
    if let Some(result) = try_now(&shared.store_waits, || shared.store.lookup(&digest)) {
        return settle(key_result(result, shared.clock.now()));
    }
    let shared = shared.clone();
    Outcome::Pending(Box::pin(async move {
        let result = shared.store.lookup(&digest).await;
        key_result(result, shared.clock.now())
    }))
}

fn settle(result: Result<Principal, Denial>) -> Outcome {
    match result {
        Ok(p) => Outcome::Allow(p),
        Err(d) => Outcome::Deny(d),
    }
}

fn format_detail(e: KeyFormatError) -> &'static str {
    match e {
        KeyFormatError::Prefix => "malformed_prefix",
        KeyFormatError::Length => "malformed_length",
        KeyFormatError::Charset => "malformed_charset",
        KeyFormatError::Checksum => "bad_checksum",
        _ => "malformed",
    }
}

fn token_result(result: Result<Principal, TokenError>) -> Result<Principal, Denial> {
    result.map_err(|e| match e {
        TokenError::Unavailable(_) => {
            Denial::unavailable(Stage::Extract, "token verification unavailable")
        }
        TokenError::Invalid(detail) => Denial::invalid_credential(detail),
        _ => Denial::invalid_credential("invalid_token"),
    })
}

/// The verdict on a key lookup at `now`.
pub(crate) fn key_result(
    result: Result<Option<Lookup>, StoreError>,
    now: Timestamp,
) -> Result<Principal, Denial> {
    let found = match result {
        Ok(Some(found)) => found,
        Ok(None) => return Err(Denial::invalid_credential("unknown")),
        Err(_) => return Err(Denial::unavailable(Stage::Extract, "key store unavailable")),
    };
    found
        .key
        .check_live(found.secret, now)
        .map_err(|r| Denial::invalid_credential(r.code()))?;
    if found.project.disabled {
        return Err(Denial::invalid_credential("project_disabled"));
    }
    Ok(Principal::new(
        found.key,
        found.project,
        Credential::ApiKey(found.secret),
    ))
}
