//! The audit layer's response future, and the record of a request in flight.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use keygate_core::{
    Cut, Denial, REDACTED, RequestTrace, ResponseBody, Timestamp, Usage, UsageMeter,
};
use pin_project_lite::pin_project;

use crate::body::AuditBody;
use crate::event::{AuditEvent, Completion, Decision, RequestEvent, RequestId};
use crate::layer::{Shared, X_REQUEST_ID};

/// What the audit layer knows about a request until its event is emitted.
///
/// Carried inline (not boxed) by the response future and then the response body: one
/// allocation fewer per request, and measured no slower than a box despite the copies on each
/// move (so keep it small). Holds only cheap clones; every `String` of the event is made in
/// [`Pending::emit`], when the response ends.
pub(crate) struct Pending {
    pub(crate) shared: Arc<Shared>,
    pub(crate) start: Timestamp,
    pub(crate) request_id: RequestId,
    pub(crate) method: Method,
    pub(crate) path: RequestPath,
    pub(crate) meter: UsageMeter,
    pub(crate) trace: RequestTrace,
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) head: Option<Head>,
    /// Whether the sink holds a place for this record ([`AuditSink::try_reserve`]).
    ///
    /// [`AuditSink::try_reserve`]: crate::AuditSink::try_reserve
    pub(crate) reserved: bool,
}

/// A request's path without copying it: the URI's path-and-query bytes are reference-counted
/// (shared with the connection's read buffer under hyper), so cloning them does not allocate.
pub(crate) enum RequestPath {
    Shared(PathAndQuery),
    Empty,
    /// Never expected (a URI whose path is not its path-and-query's); kept for exactness.
    Owned(Box<str>),
}

impl RequestPath {
    pub(crate) fn of(uri: &Uri) -> Self {
        let path = uri.path();
        if path.is_empty() {
            return RequestPath::Empty;
        }
        match uri.path_and_query() {
            Some(pq) if pq.path() == path => RequestPath::Shared(pq.clone()),
            _ => RequestPath::Owned(path.into()),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            RequestPath::Shared(pq) => pq.path(),
            RequestPath::Empty => "",
            RequestPath::Owned(p) => p,
        }
    }
}

pub(crate) struct Head {
    at: Timestamp,
    status: u16,
    /// Boxed: only denials pay for it, and it keeps `Pending` small to move.
    denial: Option<Box<Denial>>,
    usage: Option<Usage>,
    pub(crate) ended: bool,
}

impl Pending {
    fn on_head<B: Body>(&mut self, response: &mut Response<B>) {
        response
            .headers_mut()
            .insert(X_REQUEST_ID, self.request_id.header_value().clone());
        self.head = Some(Head {
            at: self.shared.clock.now(),
            status: response.status().as_u16(),
            denial: response.extensions().get::<Denial>().cloned().map(Box::new),
            usage: response.extensions().get::<Usage>().copied(),
            ended: response.body().is_end_stream(),
        });
    }

    /// Builds the event and hands it to the sink. Call only after the inner body or future is
    /// dropped or finished, so whatever it reports into the meter is in.
    pub(crate) fn emit(self, completion: Completion) {
        let Pending {
            shared,
            start,
            request_id,
            method,
            path,
            meter,
            trace,
            client_ip,
            head,
            reserved,
        } = self;
        let end = shared.clock.now();
        let (status, time_to_head, decision, usage_ext) = match head {
            Some(h) => (
                Some(h.status),
                Some(h.at.saturating_duration_since(start)),
                match h.denial {
                    Some(d) => Decision::Denied {
                        stage: d.stage(),
                        reason: d.code().to_owned(),
                        detail: d.detail(),
                    },
                    None => Decision::Allowed,
                },
                h.usage,
            ),
            None => (None, None, Decision::Unknown, None),
        };
        let cut = trace.cut().or_else(|| {
            (completion != Completion::Complete && shared.cut_in_flight.load(Ordering::Acquire))
                .then_some(Cut::Shutdown)
        });
        let key = trace.key();
        // A key pasted into the path or sent as the model must not reach the record.
        let model = trace.model().map(|m| {
            if shared.scanner.could_be_secret(m) {
                Arc::from(REDACTED)
            } else {
                m.clone()
            }
        });
        let event = RequestEvent {
            timestamp: start,
            request_id,
            method,
            path: shared.scanner.redact_path(path.as_str()).into_owned(),
            key_id: key.map(|k| k.id.clone()),
            key_name: key.filter(|k| !k.name.is_empty()).map(|k| k.name.clone()),
            project: trace.project().map(|p| p.id.clone()),
            client_ip: client_ip.or_else(|| trace.client_ip()),
            endpoint_group: trace.endpoint_group().cloned(),
            model,
            decision,
            status,
            completion,
            time_to_head,
            duration: end.saturating_duration_since(start),
            usage: meter.usage().or(usage_ext),
            cost: meter.cost(),
            usage_source: meter.source(),
            over_reservation: meter.over_reservation(),
            cut,
        };
        if shared.metrics {
            crate::metrics::request(&shared.handles, shared.key_metrics, &event);
        }
        if reserved {
            shared.sink.record_reserved(AuditEvent::Request(event));
        } else {
            shared.sink.record_owned(AuditEvent::Request(event));
        }
    }
}

pin_project! {
    /// Response future of [`Audit`](crate::Audit): the inner service's future (or the layer's own
    /// 503 when a required sink is full); emits the event if dropped before a response.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
        pending: Option<Pending>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if let Some(pending) = this.pending.take() {
                // Drop the inner future first: what it reports on drop is then in the meter.
                this.kind.set(Kind::Done);
                pending.emit(Completion::Cancelled);
            }
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Denied { response: Option<Response<Full<Bytes>>> },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(future: F, pending: Pending) -> Self {
        ResponseFuture {
            kind: Kind::Inner { future },
            pending: Some(pending),
        }
    }

    pub(crate) fn denied(response: Response<Full<Bytes>>, pending: Pending) -> Self {
        ResponseFuture {
            kind: Kind::Denied {
                response: Some(response),
            },
            pending: Some(pending),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<AuditBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = match this.kind.as_mut().project() {
            KindProj::Inner { future } => {
                ready!(future.poll(cx)).map(|r| r.map(ResponseBody::inner))
            }
            KindProj::Denied { response } => match response.take() {
                Some(r) => Ok(r.map(ResponseBody::denied)),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Done => panic!("ResponseFuture polled after completion"),
        };
        this.kind.set(Kind::Done);
        let Some(mut pending) = this.pending.take() else {
            panic!("ResponseFuture polled after completion");
        };
        Poll::Ready(match result {
            Ok(mut response) => {
                pending.on_head(&mut response);
                Ok(response.map(|body| AuditBody::new(body, pending)))
            }
            Err(e) => {
                pending.emit(Completion::Failed);
                Err(e)
            }
        })
    }
}
