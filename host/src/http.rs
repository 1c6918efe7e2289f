//! HTTP/1.1 request heads and plain answers on a TCP stream (RFC 9110,
//! RFC 9112), for the host's small listeners (the app gateway, the metrics
//! endpoint): the head is read bounded in size (the caller bounds the time)
//! and parsed with `httparse`; an answer is one response and `Connection:
//! close`. Below the modules that serve HTTP, above nothing of the host.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::http::StatusCode;

/// The most headers a request head may have.
const MAX_HEADERS: usize = 64;

/// A request head, parsed.
pub(crate) struct Head {
    /// Every byte read so far (the head and whatever followed it), to be
    /// replayed to the WebSocket handshake.
    pub bytes: Vec<u8>,
    pub method: String,
    /// The request target as sent (origin-form: path and query).
    pub target: String,
    /// `Upgrade: websocket` was asked.
    pub upgrade: bool,
}

/// Why a request is refused: the status and a line for the body.
pub(crate) type Refusal = (StatusCode, String);

/// Reads a request head of at most `max` bytes from `stream`. `Ok(None)`:
/// the client closed before sending one.
pub(crate) async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Option<Head>, Refusal> {
    let mut bytes = Vec::with_capacity(max.min(4096));
    let mut chunk = [0u8; 4096];
    loop {
        let room = (max - bytes.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await.map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&bytes) {
            Ok(httparse::Status::Complete(_)) => {
                let upgrade = request.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("upgrade") && String::from_utf8_lossy(h.value).split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"))
                });
                let method = request.method.unwrap_or_default().to_owned();
                let target = request.path.unwrap_or_default().to_owned();
                return Ok(Some(Head { bytes, method, target, upgrade }));
            }
            Ok(httparse::Status::Partial) if bytes.len() >= max => {
                return Err((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("the request head is over {max} bytes")));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("more than {MAX_HEADERS} headers")));
            }
            Err(e) => return Err((StatusCode::BAD_REQUEST, format!("not an HTTP/1.1 request: {e}"))),
        }
    }
}

/// Writes a whole response head (and `body`, unless `head_only`).
pub(crate) async fn write_response(stream: &mut TcpStream, status: StatusCode, content_type: &str, length: u64, extra: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-cache\r\n{extra}Connection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    stream.write_all(head.as_bytes()).await
}

/// Answers `refusal` as a plain-text response, then reads (and drops)
/// what the client still sends, up to [`DRAIN_BYTES`] within
/// [`DRAIN_TIME`]: closing with unread bytes would reset the connection
/// and could lose the answer before the client reads it.
pub(crate) async fn refuse(stream: &mut TcpStream, (status, why): Refusal, extra: &str) {
    let body = format!("{why}\n");
    if write_response(stream, status, "text/plain; charset=utf-8", body.len() as u64, extra).await.is_ok() {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while drained < DRAIN_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// What a refused client may still send before the connection closes.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);
