//! Plain HTTP/1.1 on the gateway's listener (RFC 9110, RFC 9112): the
//! request head is read by [`crate::http`] (bounded in size and time); a
//! WebSocket upgrade goes on to tungstenite with the head replayed,
//! anything else is a `GET`/`HEAD` of a static file or of the JavaScript
//! client, answered here once and closed (`Connection: close`).
//!
//! Static files are opened with `cap-std` inside the directory the bundle
//! or `--gateway-static` names: `..` past its root, absolute paths and
//! symlinks leading out of it fail to open (404), whatever the request
//! path says.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::http::StatusCode;

use super::Shared;
use crate::http::{Head, refuse, write_response};

/// Where the JavaScript client is served (whatever the static directory
/// holds).
pub const CLIENT_PATH: &str = "/.hyperty/client.js";

/// The JavaScript client (ES module).
const CLIENT_JS: &str = include_str!("client.js");

/// Answers a plain (non-upgrade) request: the JavaScript client, a static
/// file, or the refusal (400, 404, 405).
pub(super) async fn respond(shared: &Arc<Shared>, stream: &mut TcpStream, head: &Head) {
    let get = match head.method.as_str() {
        "GET" => true,
        "HEAD" => false,
        other => {
            let why = format!("{other} is not served here: only GET and HEAD (and WebSocket upgrades)");
            return refuse(stream, (StatusCode::METHOD_NOT_ALLOWED, why), "Allow: GET, HEAD\r\n").await;
        }
    };
    let path = head.target.split_once('?').map_or(head.target.as_str(), |(path, _)| path);
    if !path.starts_with('/') {
        return refuse(stream, (StatusCode::BAD_REQUEST, format!("the request target {path:?} is not a path")), "").await;
    }
    if path == CLIENT_PATH {
        if write_response(stream, StatusCode::OK, "text/javascript; charset=utf-8", CLIENT_JS.len() as u64, "").await.is_ok() && get {
            let _ = stream.write_all(CLIENT_JS.as_bytes()).await;
        }
        let _ = stream.shutdown().await;
        return;
    }
    let decoded = match percent_decode(path) {
        Ok(decoded) => decoded,
        Err(why) => return refuse(stream, (StatusCode::BAD_REQUEST, format!("the path {path:?} {why}")), "").await,
    };
    let opened = match shared.static_dir.clone() {
        None => None,
        Some(dir) => {
            let relative = decoded.strip_prefix('/').unwrap_or(&decoded).to_owned();
            tokio::task::spawn_blocking(move || open_file(&dir, &relative)).await.ok().flatten()
        }
    };
    let Some((file, length, content_type)) = opened else {
        return refuse(stream, (StatusCode::NOT_FOUND, format!("nothing at {path}")), "").await;
    };
    if write_response(stream, StatusCode::OK, content_type, length, "").await.is_ok() && get {
        let mut file = tokio::fs::File::from_std(file).take(length);
        let _ = tokio::io::copy(&mut file, stream).await;
    }
    let _ = stream.shutdown().await;
}

/// Opens `relative` inside `dir` (its `index.html` if it is a directory):
/// the file, its length and its Content-Type; `None` if there is no such
/// file inside `dir` (including a path that would lead out of it).
fn open_file(dir: &cap_std::fs::Dir, relative: &str) -> Option<(std::fs::File, u64, &'static str)> {
    let mut path = if relative.is_empty() { Path::new(".").to_owned() } else { Path::new(relative).to_owned() };
    let mut file = dir.open(&path).map_err(|e| tracing::debug!("gateway: static {relative:?}: {e}")).ok()?;
    if file.metadata().ok()?.is_dir() {
        path.push("index.html");
        file = dir.open(&path).ok()?;
    }
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() {
        return None;
    }
    Some((file.into_std(), metadata.len(), content_type(&path)))
}

/// The Content-Type of a file by its extension (the types a web app
/// serves; anything else is `application/octet-stream`).
pub(super) fn content_type(path: &Path) -> &'static str {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match extension.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        _ => "application/octet-stream",
    }
}

/// Decodes the `%XX` escapes of a request path (RFC 3986 §2.1); refuses a
/// broken escape, NUL and what is not UTF-8.
fn percent_decode(path: &str) -> Result<String, &'static str> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or("has a broken %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err("contains NUL");
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_or_are_refused() {
        assert_eq!(percent_decode("/a%20b/%C3%A9.html"), Ok("/a b/é.html".to_owned()));
        assert_eq!(percent_decode("/%2e%2e/x"), Ok("/../x".to_owned()));
        assert_eq!(percent_decode("/a%2"), Err("has a broken %-escape"));
        assert_eq!(percent_decode("/a%zz"), Err("has a broken %-escape"));
        assert_eq!(percent_decode("/a%00"), Err("contains NUL"));
        assert_eq!(percent_decode("/%ff"), Err("is not UTF-8"));
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type(Path::new("index.HTML")), "text/html; charset=utf-8");
        assert_eq!(content_type(Path::new("app/main.mjs")), "text/javascript; charset=utf-8");
        assert_eq!(content_type(Path::new("a.wasm")), "application/wasm");
        assert_eq!(content_type(Path::new("Makefile")), "application/octet-stream");
    }
}
