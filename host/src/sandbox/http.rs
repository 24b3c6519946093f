//! Outbound HTTP for one run (`wasi:http`, through wasmtime-wasi-http): every request is checked
//! against the run's HTTP grants before any connection is made, counted against the run's
//! request limit, sent under the run's connect and read timeouts, and its response body counted
//! against the run's response-bytes limit as the guest reads it. A refused request reaches the
//! guest as an HTTP error it can handle (`http-request-denied`, `http-response-body-size`), and
//! the run's log says what was refused and why. Requests in flight belong to the run's store:
//! they stop when it is dropped (deadline, cancel, end of the run).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::capture::SharedSink;
use super::outcome::{LogLevel, LogSource};
use crate::grants::HttpGrant;

/// The HTTP limits of one run.
#[derive(Debug, Clone, Copy)]
pub(super) struct HttpLimits {
    pub(super) requests: u32,
    pub(super) response_bytes: u64,
    pub(super) connect_timeout: Duration,
    pub(super) read_timeout: Duration,
}

/// The run's `wasi:http` hooks: its grants, limits and counters.
pub(super) struct GrantHooks {
    grants: Arc<[HttpGrant]>,
    limits: HttpLimits,
    sent: u32,
    received: Arc<AtomicU64>,
    logs: SharedSink,
}

impl GrantHooks {
    pub(super) fn new(grants: Arc<[HttpGrant]>, limits: HttpLimits, logs: SharedSink) -> Self {
        Self {
            grants,
            limits,
            sent: 0,
            received: Arc::new(AtomicU64::new(0)),
            logs,
        }
    }

    fn log(&self, message: String) {
        super::capture::lock(&self.logs).push(LogSource::Sluice, LogLevel::Warn, message);
    }

    /// Why `request` may not be sent, if it may not.
    fn refusal(&self, request: &http::Request<WasiBody>) -> Option<String> {
        let uri = request.uri();
        let method = request.method().as_str();
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Some("the URL has no scheme or host".into());
        };
        let port = uri
            .port_u16()
            .unwrap_or(if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        if !self
            .grants
            .iter()
            .any(|g| g.allows(method, scheme, host, port, path))
        {
            return Some(if self.grants.is_empty() {
                "the task is granted no HTTP".into()
            } else {
                let list: Vec<String> = self.grants.iter().map(ToString::to_string).collect();
                format!("not granted (grants: {})", list.join(", "))
            });
        }
        if self.sent >= self.limits.requests {
            return Some(format!(
                "the run's limit of {} HTTP requests is reached (`http_requests`)",
                self.limits.requests
            ));
        }
        None
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for GrantHooks {
    /// A guest names its scheme: nothing defaults to a scheme it did not ask for.
    fn default_scheme(&mut self) -> Option<http::uri::Scheme> {
        None
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        if let Some(why) = self.refusal(&request) {
            self.log(format!(
                "HTTP request denied: {} {}: {why}",
                request.method(),
                request.uri()
            ));
            return Box::new(async move {
                // Read (and drop) what the guest sends, so it sees the refusal on the response
                // rather than a failed write; the run's deadline bounds this.
                let mut body = request.into_body();
                while let Some(Ok(_)) = body.frame().await {}
                Err(Error::HttpRequestDenied)
            });
        }
        self.sent += 1;
        let limits = self.limits;
        let guest = options.unwrap_or_default();
        let at_most =
            |asked: Option<Duration>, limit: Duration| Some(asked.map_or(limit, |a| a.min(limit)));
        let options = RequestOptions {
            connect_timeout: at_most(guest.connect_timeout, limits.connect_timeout),
            first_byte_timeout: at_most(guest.first_byte_timeout, limits.read_timeout),
            between_bytes_timeout: at_most(guest.between_bytes_timeout, limits.read_timeout),
        };
        let received = self.received.clone();
        let logs = self.logs.clone();
        let url = request.uri().to_string();
        let request = request.map(|body| {
            DrainOnDrop {
                inner: Some(Box::pin(body)),
            }
            .boxed_unsync()
        });
        Box::new(async move {
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let declared = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let cap = Cap {
                limit: limits.response_bytes,
                received,
                logs,
                url,
            };
            if let Some(n) = declared
                && cap.received.load(Ordering::Relaxed).saturating_add(n) > cap.limit
            {
                cap.refuse();
                return Err(Error::HttpResponseBodySize(Some(cap.limit)));
            }
            let response = response.map(|inner| {
                CappedBody {
                    inner: Box::pin(inner),
                    cap,
                    done: false,
                }
                .boxed_unsync()
            });
            Ok((
                response,
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

/// The run's response-bytes budget, shared by every response body of the run.
struct Cap {
    limit: u64,
    received: Arc<AtomicU64>,
    logs: SharedSink,
    url: String,
}

impl Cap {
    fn refuse(&self) {
        super::capture::lock(&self.logs).push(
            LogSource::Sluice,
            LogLevel::Warn,
            format!(
                "HTTP response refused: {}: the run's limit of {} response body bytes is reached \
                 (`http_response_bytes`)",
                self.url, self.limit
            ),
        );
    }
}

/// A response body that stops with `http-response-body-size` once the run's responses have
/// brought more than the limit. It reads one frame at a time as the guest reads, so a large
/// response never sits in host memory.
struct CappedBody<B> {
    inner: Pin<Box<B>>,
    cap: Cap,
    done: bool,
}

impl<B: Body<Data = Bytes, Error = Error>> Body for CappedBody<B> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            let total = self.cap.received.fetch_add(n, Ordering::Relaxed) + n;
            if total > self.cap.limit {
                self.done = true;
                self.cap.refuse();
                return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(self.cap.limit)))));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The guest's request body as hyper reads it. hyper may be done with a request before the guest
/// has finished writing its body: a request it sends without a body (a GET), or a server that
/// answers and closes early. Dropping the body then would close the guest's stream, and a guest
/// library that writes (even nothing) after that fails with "connection reset" although the
/// request succeeded. So what is left is read and dropped in the background; the run's end
/// stops that too (the guest's side of the stream goes with its store).
struct DrainOnDrop {
    inner: Option<Pin<Box<WasiBody>>>,
}

impl Body for DrainOnDrop {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.inner.as_mut() {
            Some(inner) => inner.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
        }
    }
}
