//! [`AuditBody`]: the response body that emits the audit event when it ends or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use keygate_core::ResponseBody;
use pin_project_lite::pin_project;

use crate::event::Completion;
use crate::future::Pending;

pin_project! {
    /// The response body of [`Audit`](crate::Audit): the inner body (or the layer's own refusal),
    /// which emits the request's audit event when it ends, fails or is dropped.
    pub struct AuditBody<B> {
        #[pin]
        inner: Option<ResponseBody<B>>,
        pending: Option<Pending>,
    }

    impl<B> PinnedDrop for AuditBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if let Some(pending) = this.pending.take() {
                // Drop the inner body first, so a wrapper inside it (the token limit layer's)
                // has reported its usage into the meter before the event is built.
                this.inner.set(None);
                let ended = pending.head.as_ref().is_some_and(|h| h.ended);
                pending.emit(if ended { Completion::Complete } else { Completion::Aborted });
            }
        }
    }
}

impl<B> AuditBody<B> {
    pub(crate) fn new(inner: ResponseBody<B>, pending: Pending) -> Self {
        AuditBody {
            inner: Some(inner),
            pending: Some(pending),
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for AuditBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B> Body for AuditBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let polled = inner.as_mut().poll_frame(cx);
        let finished = match &polled {
            Poll::Pending => return polled,
            Poll::Ready(Some(Ok(_))) => {
                // Seen at its end: if the body is dropped now without another poll (hyper
                // does that), it was still sent completely.
                if inner.is_end_stream()
                    && let Some(head) = this.pending.as_mut().and_then(|p| p.head.as_mut())
                {
                    head.ended = true;
                }
                None
            }
            Poll::Ready(None) => Some(Completion::Complete),
            Poll::Ready(Some(Err(_))) => Some(Completion::BodyError),
        };
        if let Some(completion) = finished {
            // Drop the inner body before reading the meter, as on drop.
            this.inner.set(None);
            if let Some(p) = this.pending.take() {
                p.emit(completion);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
