//! [`ResponseFuture`]: waits for the decision if it could not be made at once, then for the
//! inner service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use keygate_core::{Denial, Principal, ResponseBody};
use pin_project_lite::pin_project;
use tower_service::Service;

/// A decision the store or verifier could not make at once.
pub(crate) type Decision = Pin<Box<dyn Future<Output = Result<Principal, Denial>> + Send>>;

pin_project! {
    /// Response future of [`KeyExtract`](crate::KeyExtract).
    ///
    /// With a store that answers at once (a [`Snapshot`](keygate_core::Snapshot), a cache
    /// hit) this is the inner service's future or a ready refusal, with nothing boxed; only a
    /// store or verifier that has to wait puts its lookup in a box.
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Deciding {
            decision: Decision,
            waiting: Option<(Request<ReqBody>, S)>,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
        Denied {
            response: Option<Response<Full<Bytes>>>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn inner(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Inner { future },
        }
    }

    pub(crate) fn denied(denial: Denial, headers: &HeaderMap) -> Self {
        ResponseFuture {
            state: State::Denied {
                response: Some(denial.into_response(headers)),
            },
        }
    }

    pub(crate) fn deciding(decision: Decision, req: Request<ReqBody>, inner: S) -> Self {
        ResponseFuture {
            state: State::Deciding {
                decision,
                waiting: Some((req, inner)),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Deciding { decision, waiting } => {
                    let verdict = ready!(decision.as_mut().poll(cx));
                    let (mut req, mut inner) = waiting
                        .take()
                        .expect("ResponseFuture polled after completion");
                    match verdict {
                        Ok(principal) => {
                            crate::service::attach(&mut req, principal);
                            let future = inner.call(req);
                            this.state.set(State::Inner { future });
                        }
                        Err(denial) => {
                            let response = denial.into_response(req.headers());
                            this.state.set(State::Denied { response: None });
                            return Poll::Ready(Ok(response.map(ResponseBody::denied)));
                        }
                    }
                }
                StateProj::Inner { future } => {
                    return future
                        .poll(cx)
                        .map(|r| r.map(|res| res.map(ResponseBody::inner)));
                }
                StateProj::Denied { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::denied)));
                }
            }
        }
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Deciding { .. } => "Deciding",
            State::Inner { .. } => "Inner",
            State::Denied { .. } => "Denied",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
