//! [`ProxyResponseBody`]: the upstream's body streamed to the client under the idle and total
//! timeouts, or a small body keygate made (an error).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use keygate_core::{Cut, Denial, RequestTrace, Stage};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::BoxError;

pin_project! {
    /// The response body of [`UpstreamProxy`](super::UpstreamProxy).
    ///
    /// The upstream's body is streamed as it arrives. When it pauses longer than the idle
    /// timeout between chunks, or the exchange passes its total timeout, the body is cut: a
    /// server-sent event stream (`text/event-stream`) ends with one `error` event in the
    /// OpenAI shape (code `upstream_timeout`), so streaming clients raise an error; any other
    /// body ends with an error (the connection is closed before its end, so the client cannot
    /// mistake it for a whole answer). The cut is recorded in the request's
    /// [`RequestTrace`] for the audit record.
    pub struct ProxyResponseBody {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Upstream {
            #[pin]
            body: hyper::body::Incoming,
            // Boxed (tower-http's `TimeoutBody` does the same) so the body stays `Unpin`, and
            // allocated only when the timeout is on.
            idle: Option<(Pin<Box<Sleep>>, std::time::Duration)>,
            total: Option<Pin<Box<Sleep>>>,
            sse: bool,
            trace: Option<RequestTrace>,
            done: bool,
        },
        Full { data: Option<Bytes> },
    }
}

impl ProxyResponseBody {
    pub(super) fn upstream(
        body: hyper::body::Incoming,
        idle: Option<std::time::Duration>,
        deadline: Option<Instant>,
        sse: bool,
        trace: Option<RequestTrace>,
    ) -> Self {
        ProxyResponseBody {
            kind: Kind::Upstream {
                body,
                idle: idle.map(|d| (Box::pin(tokio::time::sleep(d)), d)),
                total: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
                sse,
                trace,
                done: false,
            },
        }
    }

    pub(super) fn full(data: Bytes) -> Self {
        ProxyResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl std::fmt::Debug for ProxyResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Upstream { sse, .. } => f
                .debug_struct("ProxyResponseBody::Upstream")
                .field("sse", sse)
                .finish_non_exhaustive(),
            Kind::Full { data } => f
                .debug_struct("ProxyResponseBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

/// The error a cut non-streaming body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the model server timed out ({0})")]
pub struct UpstreamTimedOut(pub Cut);

/// The last event of a cut event stream.
pub(super) fn timeout_event(cut: Cut) -> Bytes {
    let message = match cut {
        Cut::UpstreamIdle => "The model server stopped sending (idle timeout).",
        _ => "The model server took too long (total timeout).",
    };
    // The same OpenAI error shape as every other error keygate answers with.
    let body = Denial::new(
        Stage::Audit,
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        message,
    )
    .json_body();
    let mut event = b"event: error\ndata: ".to_vec();
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

impl Body for ProxyResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Upstream {
                body,
                idle,
                total,
                sse,
                trace,
                done,
            } => {
                if *done {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(polled) = body.poll_frame(cx) {
                    if let (Some((sleep, after)), Some(Ok(_))) = (idle.as_mut(), &polled) {
                        sleep.as_mut().reset(Instant::now() + *after);
                    }
                    if polled.is_none() {
                        *done = true;
                    }
                    return Poll::Ready(polled.map(|r| r.map_err(Into::into)));
                }
                let cut = if total
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready())
                {
                    Cut::UpstreamTotal
                } else if idle
                    .as_mut()
                    .is_some_and(|(t, _)| t.as_mut().poll(cx).is_ready())
                {
                    Cut::UpstreamIdle
                } else {
                    return Poll::Pending;
                };
                *done = true;
                if let Some(trace) = trace {
                    trace.set_cut(cut);
                }
                tracing::warn!(cut = cut.as_str(), "upstream response cut by a timeout");
                if *sse {
                    Poll::Ready(Some(Ok(Frame::data(timeout_event(cut)))))
                } else {
                    Poll::Ready(Some(Err(Box::new(UpstreamTimedOut(cut)))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, done, .. } => *done || body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
