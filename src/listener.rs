//! Connections of every listening port, bounded: how many may be open (beyond it a new one is
//! closed at once, counted and logged), how long a TLS handshake may take (in a task of its own,
//! never in the accept loop), and how long a connection may sit idle (no byte either way and no
//! request in progress). One client holding sockets open cannot take the ports from others.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ConnLabel, ListenerLabel, Metrics};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections open at most (TLS handshakes included).
    pub max_connections: usize,
    /// A connection with no byte either way and no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Time a TLS client has to complete its handshake.
    pub handshake_timeout: Duration,
}

/// What a connection is doing, shared with the requests it carries.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    in_flight: AtomicUsize,
}

impl ConnState {
    /// Marks a request in progress until the guard is dropped: the connection is not idle.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }
}

/// A request in progress on a connection (see [`ConnState::begin`]).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An accepted (and, with TLS, handshaken) connection. Reading from it fails with `TimedOut`
/// once it has been idle for the listener's `idle_timeout`, which ends the connection in hyper
/// and h2 alike.
pub(crate) struct Conn {
    io: Box<dyn Io>,
    state: Arc<ConnState>,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    closed: Closed,
    _slot: OwnedSemaphorePermit,
}

/// Counts the connection's close: the open gauge, and idle closes.
struct Closed {
    metrics: Arc<Metrics>,
    listener: &'static str,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .get_or_create(&ListenerLabel {
                listener: self.listener,
            })
            .dec();
    }
}

impl Conn {
    /// The state requests on this connection report to.
    pub(crate) fn state(&self) -> Arc<ConnState> {
        self.state.clone()
    }

    fn active(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Waiting for the client: past the idle deadline with nothing in progress, the
                // connection ends; with a request in progress, the deadline moves on.
                while self.idle.as_mut().poll(cx).is_ready() {
                    if !self.state.busy() {
                        self.closed
                            .metrics
                            .connections_closed
                            .get_or_create(&ConnLabel {
                                listener: self.closed.listener,
                                reason: "idle",
                            })
                            .inc();
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle",
                        )));
                    }
                    self.active();
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Arc<ConnState>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.state.clone()
    }
}

/// Accepts connections on `listener` until `stop`, within `limits`; hands them out handshaken.
pub(crate) fn accept(
    listener: TcpListener,
    name: &'static str,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut warned: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors (EMFILE) or an aborted handshake: try again shortly.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let count = |reason: &'static str| {
                metrics
                    .connections_closed
                    .get_or_create(&ConnLabel {
                        listener: name,
                        reason,
                    })
                    .inc();
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(tcp);
                count("limit");
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection limit reached; closing new connections"
                    );
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, tls, metrics) = (tx.clone(), tls.clone(), metrics.clone());
            tokio::spawn(async move {
                let io: Box<dyn Io> = match tls {
                    None => Box::new(tcp),
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => Box::new(s),
                            Ok(Err(e)) => {
                                tracing::debug!(listener = name, error = %e, "tls handshake failed");
                                count_closed(&metrics, name, "handshake_failed");
                                return;
                            }
                            Err(_) => {
                                count_closed(&metrics, name, "handshake_timeout");
                                return;
                            }
                        }
                    }
                };
                metrics
                    .connections_open
                    .get_or_create(&ListenerLabel { listener: name })
                    .inc();
                let conn = Conn {
                    io,
                    state: Arc::default(),
                    idle_timeout: limits.idle_timeout,
                    idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                    closed: Closed {
                        metrics,
                        listener: name,
                    },
                    _slot: slot,
                };
                let _ = tx.send(conn).await;
            });
        }
    });
    rx
}

fn count_closed(metrics: &Metrics, listener: &'static str, reason: &'static str) {
    metrics
        .connections_closed
        .get_or_create(&ConnLabel { listener, reason })
        .inc();
}

/// Connections open at most on the admin port (apart from the OTLP ports' bound).
pub(crate) const ADMIN_CONNECTIONS: usize = 256;

/// Descriptors kept beside the listeners' connections: the database pools, files, the process.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the process's open-file limit to its hard limit and returns the connections each OTLP
/// port may hold: `otlp.max_connections`, or less (said in a log line) when the descriptors
/// would not also cover the other OTLP port, the admin port and the database.
pub(crate) fn fit_descriptors(config: &crate::config::Config) -> usize {
    let wanted = config.otlp.max_connections as u64;
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return wanted as usize;
        }
    };
    let database = (config.ingest.writers + config.database.query_connections as usize + 4) as u64;
    let spare =
        limit.saturating_sub(ADMIN_CONNECTIONS as u64 + RESERVED_DESCRIPTORS + database) / 2;
    if wanted > spare {
        tracing::warn!(
            max_connections = wanted,
            open_file_limit = limit,
            using = spare.max(1),
            "otlp.max_connections lowered to fit the open-file limit (raise LimitNOFILE / ulimit -n)"
        );
    }
    wanted.min(spare).max(1) as usize
}

/// HTTP/2 streams one connection may have open at once.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 16;

/// Serves `router` over HTTP/1.1 and HTTP/2 on the connections of `conns` until `stop`; then
/// lets the connections finish their requests (the caller bounds how long).
pub(crate) async fn serve_http(
    mut conns: mpsc::Receiver<Conn>,
    router: axum::Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            c = conns.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        let state = conn.state();
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let guard = state.begin();
                let router = router.clone();
                async move {
                    let resp = router.oneshot(req.map(axum::body::Body::new)).await;
                    drop(guard);
                    resp
                }
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(conn), service)
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}
