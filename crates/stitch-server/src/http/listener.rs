//! The accept loop under [`super::serve_with`]: hyper's HTTP/1 connections
//! with a timer, so that slow and idle clients cannot hold the server.
//!
//! - A connection has `http.header_read_timeout` to send a complete request
//!   head, counted from when it opened or its previous response was sent
//!   (hyper's header timer starts whenever it waits for a head), so the same
//!   limit ends idle keep-alive connections.
//! - A request has `http.body_read_timeout` from its head to its last body
//!   byte; late bodies answer 408 `request_timeout` and the connection closes.
//! - At most `http.max_connections` connections are open (upgraded
//!   WebSockets keep their slot until they close); one more is answered 503
//!   `too_many_connections` and closed. Refusals are logged at most once a
//!   minute, with their count, so a flood cannot flood the log too.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::error::ApiError;
use crate::config::HttpConfig;

/// How long a refused connection is read (and discarded) after its 503, so
/// that closing it does not reset it before the client read the answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// At most this much of a refused connection's request is read.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
/// Least time between two warnings about refused connections.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Accepts connections on `listener` until `stop` is cancelled, then lets
/// open connections finish (hyper's graceful shutdown: idle ones close at
/// once, busy ones after their response) and returns.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    limits: HttpConfig,
    stop: CancellationToken,
) -> io::Result<()> {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Refusals since the last warning, and when that was.
    let mut refused: u64 = 0;
    let mut warned_at: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: the listener is fine, and
                    // accepting again at once would spin on the same error.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            let due = match warned_at {
                None => true,
                Some(at) => at.elapsed() >= REFUSAL_LOG_INTERVAL,
            };
            if due {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused,
                    "refusing connections: http.max_connections are open; \
                     answering 503 too_many_connections until some close"
                );
                refused = 0;
                warned_at = Some(Instant::now());
            }
            connections.spawn(refuse(stream));
            continue;
        };
        let app = app.clone();
        let body_timeout = limits.body_read_timeout;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(app.clone(), body_timeout, req)
        });
        let io = TokioIo::new(Counted {
            stream,
            _slot: slot,
        });
        let conn = http1.serve_connection(io, service).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let served = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                // Timeouts, resets and malformed requests: the client's doing.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One request: its body gets the read deadline; a body that missed it
/// answers 408 and closes the connection, whatever the handler made of the
/// failed read.
async fn handle(
    app: Router,
    body_timeout: Duration,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let expired = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = DeadlineBody {
        inner: body,
        deadline: Instant::now() + body_timeout,
        sleep: None,
        expired: expired.clone(),
    };
    let resp = app
        .oneshot(Request::from_parts(parts, Body::new(body)))
        .await?;
    if !expired.load(Ordering::Acquire) {
        return Ok(resp);
    }
    let mut resp = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request body did not arrive within http.body_read_timeout",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(resp)
}

/// Answers a connection over the cap with 503 `too_many_connections`, then
/// closes it.
async fn refuse(mut stream: TcpStream) {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the server has http.max_connections connections open; retry shortly",
    )
    .body_json();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(answer.as_bytes()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    // Closing a socket with unread input resets it, and a reset can destroy
    // the answer before the client read it: read a little first.
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// A connection that holds one of the `max_connections` slots for as long
/// as it is open, also after an upgrade hands it to a WebSocket.
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Why a request body failed: it did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within http.body_read_timeout")]
struct BodyTimeout;

/// A request body that must arrive in full by `deadline`. The timer is
/// armed only when the body first has to wait, so requests without a body
/// (and bodies that are already buffered) cost no timer.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
