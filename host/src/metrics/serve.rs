//! `GET /metrics` over HTTP/1.1 (RFC 9112): the runtime's [`Metrics`] in
//! the OpenMetrics text format, for a Prometheus server to scrape.
//!
//! Bounded like the gateway's plain HTTP, whose head reader it uses
//! (`crate::http`, httparse): one request per connection (`Connection:
//! close`), a head of at most [`MAX_HEAD_BYTES`], at most
//! [`MAX_CONNECTIONS`] connections at once (more are answered 503 and
//! closed), [`TIMEOUT`] for the whole exchange. Anything but `GET` or `HEAD`
//! of `/metrics` is refused with 405 or 404 and a line saying why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::http::StatusCode;

use super::Metrics;
use crate::http::{read_head, refuse, write_response};

/// The largest request head read, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest a connection may take, from accept to the last byte.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The path served.
pub const PATH: &str = "/metrics";
/// The path of the status (JSON, see [`super::status`]).
pub const STATUS_PATH: &str = "/status";
/// The Content-Type of the status.
pub const STATUS_CONTENT_TYPE: &str = "application/json";
/// The Content-Type of the answer (OpenMetrics 1.0 text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The answer over [`MAX_CONNECTIONS`].
const OVER_LIMIT: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 56\r\nConnection: close\r\n\r\ntoo many connections to the metrics endpoint; try later\n";

/// Called before each scrape, to read gauges that are cheaper to read than
/// to keep (the pending requests).
pub(crate) type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The metrics endpoint; serving stops when it is dropped.
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `metrics` on a thread of its own (a
    /// single-threaded tokio runtime). Errors: `addr` cannot be bound.
    /// `runtime`: the runtime's address, in the status.
    pub(crate) fn serve(addr: SocketAddr, metrics: Arc<Metrics>, refresh: Refresh, runtime: String) -> Result<MetricsServer> {
        if !addr.ip().is_loopback() {
            tracing::warn!("metrics served on {addr}, not a loopback address: anyone who reaches it sees them");
        }
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot bind the metrics endpoint to {addr}"))?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let served = Arc::new(Served { metrics, refresh, runtime });
        let thread = std::thread::Builder::new().name("hyperty-metrics".into()).spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(served, listener, stopped).await,
                    Err(e) => tracing::error!("metrics: {e}"),
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        tracing::info!("metrics on http://{local_addr}{PATH}");
        Ok(MetricsServer { local_addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The address it listens on (with the port chosen, if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the endpoint serves from.
struct Served {
    metrics: Arc<Metrics>,
    refresh: Refresh,
    runtime: String,
}

async fn accept_loop(served: Arc<Served>, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("metrics: accept: {e}");
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Refused without a task of its own: the answer is written if
            // the socket takes it at once, and the connection closed.
            tracing::debug!(%peer, "metrics: over {MAX_CONNECTIONS} connections");
            let _ = stream.try_write(OVER_LIMIT.as_bytes());
            continue;
        };
        let served = served.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(TIMEOUT, answer(&served, &mut stream)).await.is_err() {
                tracing::debug!(%peer, "metrics: no request within {} s", TIMEOUT.as_secs());
            }
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(served: &Served, stream: &mut TcpStream) {
    let head = match read_head(stream, MAX_HEAD_BYTES).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(refusal) => return refuse(stream, refusal, "").await,
    };
    let get = match head.method.as_str() {
        "GET" => true,
        "HEAD" => false,
        other => {
            let why = format!("{other} is not served here: only GET and HEAD of {PATH} and {STATUS_PATH}");
            return refuse(stream, (StatusCode::METHOD_NOT_ALLOWED, why), "Allow: GET, HEAD\r\n").await;
        }
    };
    let path = head.target.split_once('?').map_or(head.target.as_str(), |(path, _)| path);
    (served.refresh)(&served.metrics);
    let (body, content_type) = match path {
        PATH => (served.metrics.encode(), CONTENT_TYPE),
        STATUS_PATH => (served.metrics.status(&served.runtime).to_string(), STATUS_CONTENT_TYPE),
        _ => {
            let why = format!("nothing at {path:?}: the metrics are at {PATH}, the status at {STATUS_PATH}");
            return refuse(stream, (StatusCode::NOT_FOUND, why), "").await;
        }
    };
    if write_response(stream, StatusCode::OK, content_type, body.len() as u64, "").await.is_ok() && get {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}
