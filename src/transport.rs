//! The HTTP/1.1 connection loop (R43): every connection gets a request-head timeout (which is also
//! the keep-alive idle timeout) and every request body a per-read timeout, so a client that sends
//! nothing, trickles a head, or stalls an upload cannot hold a connection (and a file descriptor)
//! forever. A slow upload that keeps delivering data is never cut.
//!
//! T1: the first [`SMALL_BODY_BYTES`] of every body (all of a smaller one) must arrive within the header
//! timeout of its head, whatever length it declares, so a body trickled a byte at a time cannot hold a
//! route that reads before it knows a credential (OTP exchange, dashboard sign-in). And an
//! answer the client does not take for `CONTROLLER_WRITE_TIMEOUT_SECS` is cut ([`WriteTimeout`]), so a
//! client that never reads cannot keep a connection and its buffers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::config::HttpConfig;

/// Serves `app` on `listener` until `stop` flips, then lets open connections finish their requests.
pub async fn serve(listener: TcpListener, app: Router, http: &HttpConfig, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_timeout())
        .keep_alive(true);
    let timeouts = Timeouts {
        head: http.header_timeout(),
        body_read: http.body_read_timeout(),
    };
    let write_timeout = http.write_timeout();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: wait, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = app
            .clone()
            .map_request(move |request: hyper::Request<Incoming>| prepare(request, remote, timeouts));
        let io = TokioIo::new(WriteTimeout::new(stream, write_timeout));
        let connection = builder.serve_connection(io, TowerToHyperService::new(service));
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, %remote, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The body timeouts of one request.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// The header timeout: also the time a small body has to arrive whole.
    head: Duration,
    /// The most a body may go without delivering data.
    body_read: Duration,
}

/// Drops an unsafe client request id, adds the peer address (for per-IP limits), the per-read body
/// timeout and the small-body deadline.
fn prepare(request: hyper::Request<Incoming>, remote: SocketAddr, timeouts: Timeouts) -> axum::extract::Request {
    let (mut parts, body) = request.into_parts();
    crate::api::drop_unsafe_request_id(&mut parts.headers);
    parts.extensions.insert(ConnectInfo(remote));
    // Armed for every body, whatever length it declares (declaring a large one must not buy a trickle
    // the whole body-read timeout per byte); disarmed only once more than SMALL_BODY_BYTES have arrived.
    let deadline = (!body.is_end_stream()).then(|| Box::pin(tokio::time::sleep(timeouts.head)));
    let body = SmallBodyDeadline {
        inner: body,
        deadline,
        received: 0,
    };
    axum::extract::Request::from_parts(parts, Body::new(TimeoutBody::new(timeouts.body_read, body)))
}

/// Bodies up to this size (and the first this many bytes of any larger body, declared or not) must arrive
/// within the header timeout of the request head.
pub const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// The error of a small body that did not arrive in time; handlers answer it 408.
#[derive(Debug)]
pub struct BodyDeadline;

impl std::fmt::Display for BodyDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body not received in time")
    }
}

impl std::error::Error for BodyDeadline {}

/// A request body that fails with [`BodyDeadline`] unless it has ended, or delivered
/// [`SMALL_BODY_BYTES`], when its deadline passes.
struct SmallBodyDeadline {
    inner: Incoming,
    /// `None` once more than [`SMALL_BODY_BYTES`] have arrived (or the body was empty).
    deadline: Option<Pin<Box<Sleep>>>,
    received: u64,
}

impl HttpBody for SmallBodyDeadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    this.received += data.map_or(0, |d| d.len() as u64);
                    if this.received > SMALL_BODY_BYTES {
                        this.deadline = None;
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.deadline.as_mut() {
                Some(deadline) => {
                    ready!(deadline.as_mut().poll(cx));
                    this.deadline = None;
                    Poll::Ready(Some(Err(Box::new(BodyDeadline))))
                }
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes must make progress: when the peer has not taken a byte for `timeout`
/// while an answer waits to be written, writing fails (`TimedOut`) and hyper closes the connection.
/// Reads are passed through; a connection that is idle (nothing to write) never times out here.
pub struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    stall: Pin<Box<Sleep>>,
    /// Whether `stall` runs (a write is waiting for the peer).
    stalled: bool,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            stall: Box::pin(tokio::time::sleep(timeout)),
            stalled: false,
        }
    }

    /// Passes a ready write result through (progress: the stall timer stops); on `Pending` starts
    /// or checks the stall timer.
    fn progress<T>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !self.stalled {
                    self.stalled = true;
                    self.stall.as_mut().reset(Instant::now() + self.timeout);
                }
                ready!(self.stall.as_mut().poll(cx));
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client took no data within CONTROLLER_WRITE_TIMEOUT_SECS",
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(cx, polled)
    }
}

/// Raises the soft limit of open file descriptors to the hard limit, so that the connection limit
/// is the system's, not a conservative default. Returns the limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read or write the struct passed by pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
        Some(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}
