//! `GET /status` on the metrics endpoint: what runs, as JSON, for
//! `hyperty status` (issue 20, "Seeing inside").
//!
//! Decision: served on the metrics listener rather than a local admin
//! socket. It is the same kind of read-only view (counts and statuses, no
//! control), so it gets the same exposure as the metrics, on a listener
//! already bounded (connections, head size, timeout) and loopback by
//! default; no second listener to secure, and no Unix socket, which
//! Windows runtimes would not have.
//!
//! Shape: `{"runtime": <address>, "domains": [{"name", "instances",
//! "memory_bytes", "inbox"}], "hyperties": [{"domain", "name", "address",
//! "status" (starting | live | restarting | stopped), "memory_bytes",
//! "messages_in", "messages_out"}], "stubs": [{"domain", "status" (created |
//! in-progress | live | disconnected | failed), "queue"}]}`, each list
//! sorted by name.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::Metrics;

impl Metrics {
    /// The status document (see the module doc) of runtime `runtime`.
    pub fn status(&self, runtime: &str) -> Value {
        self.refresh();
        let mut domains: Vec<(String, Value)> = self
            .domains
            .read()
            .unwrap()
            .iter()
            .filter(|(_, d)| d.instances.get() > 0)
            .map(|(name, d)| {
                let value = json!({ "name": name, "instances": d.instances.get(), "memory_bytes": d.memory.get(), "inbox": d.inbox.get() });
                (name.clone(), value)
            })
            .collect();
        domains.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hyperties: Vec<Value> = self
            .hyperties
            .lock()
            .unwrap()
            .iter()
            .map(|(address, h)| {
                let label = h.label.lock().unwrap().clone();
                let (domain, name) = label.split_once('/').unwrap_or((&label, ""));
                json!({
                    "domain": domain,
                    "name": name,
                    "address": address,
                    "status": h.status_name(),
                    "memory_bytes": h.memory.load(Ordering::Relaxed),
                    "messages_in": h.received.load(Ordering::Relaxed),
                    "messages_out": h.sent.load(Ordering::Relaxed),
                })
            })
            .collect();
        hyperties.sort_by(|a, b| (a["domain"].as_str(), a["name"].as_str()).cmp(&(b["domain"].as_str(), b["name"].as_str())));
        let mut stubs = self.stubs.lock().unwrap();
        stubs.retain(|_, read| read().is_some());
        let stubs: Vec<Value> = stubs
            .iter()
            .filter_map(|(domain, read)| {
                let queue = self.domains.read().unwrap().get(domain).map_or(0, |d| d.stub_queue.get());
                Some(json!({ "domain": domain, "status": read()?, "queue": queue }))
            })
            .collect();
        json!({ "runtime": runtime, "domains": domains.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "hyperties": hyperties, "stubs": stubs })
    }
}

/// The largest status document `hyperty status` reads, in bytes.
pub const MAX_STATUS_BYTES: u64 = 16 << 20;

/// `GET /status` from the metrics endpoint at `addr` (what `hyperty
/// status` shows). Errors: it cannot be reached (in 5 s), its answer is
/// not a 200 with a JSON body of at most [`MAX_STATUS_BYTES`].
pub fn fetch(addr: std::net::SocketAddr) -> anyhow::Result<Value> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("no runtime answers at {addr} ({e}): is it running with --metrics {addr}?"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n", super::serve::STATUS_PATH).as_bytes())?;
    let mut answer = Vec::new();
    stream.take(MAX_STATUS_BYTES).read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("{addr} did not answer HTTP"))?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{addr} answered {}", head.lines().next().unwrap_or_default());
    }
    crate::message::validate_value(body).map_err(|e| anyhow::anyhow!("{addr}: the status is not valid JSON: {e}"))?;
    Ok(serde_json::from_str(body)?)
}

/// The status as tables a person reads at a glance: domains, hyperties,
/// protostubs, columns aligned, memory in KiB.
pub fn table(status: &Value) -> String {
    let list = |key: &str| status[key].as_array().cloned().unwrap_or_default();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let kib = |v: &Value| v.as_u64().map_or("-".to_owned(), |b| format!("{} KiB", b.div_ceil(1024)));
    let mut out = format!("runtime {}\n", crate::sandbox::printable(&text(&status["runtime"])));
    let domains: Vec<Vec<String>> =
        list("domains").iter().map(|d| vec![text(&d["name"]), text(&d["instances"]), kib(&d["memory_bytes"]), text(&d["inbox"])]).collect();
    out += &render(&["DOMAIN", "INSTANCES", "MEMORY", "INBOX"], &domains);
    let hyperties: Vec<Vec<String>> = list("hyperties")
        .iter()
        .map(|h| {
            vec![
                format!("{}/{}", text(&h["domain"]), text(&h["name"])),
                text(&h["address"]),
                text(&h["status"]),
                kib(&h["memory_bytes"]),
                text(&h["messages_in"]),
                text(&h["messages_out"]),
            ]
        })
        .collect();
    out += &render(&["HYPERTY", "ADDRESS", "STATUS", "MEMORY", "IN", "OUT"], &hyperties);
    let stubs: Vec<Vec<String>> = list("stubs").iter().map(|s| vec![text(&s["domain"]), text(&s["status"]), text(&s["queue"])]).collect();
    out += &render(&["PROTOSTUB", "STATUS", "QUEUE"], &stubs);
    out
}

/// One table: a blank line, the header, the rows (or `(none)`), columns
/// padded to their widest cell. Control, bidi and invisible characters are
/// shown escaped (as guests' log lines are): the cells come from a process
/// at the other end of a socket, and from its guests' names and addresses.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| crate::sandbox::printable(c).into_owned()).collect()).collect();
    let widths: Vec<usize> =
        (0..header.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = format!("\n{}", line(header.to_vec()));
    if rows.is_empty() {
        out += "(none)\n";
    }
    for row in &rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// `hyperty status` prints what a process at the other end of a socket
    /// answered: a name with a terminal escape or a bidi override must not
    /// repaint the operator's terminal or read differently than it is.
    #[test]
    fn the_table_shows_control_bidi_and_invisible_characters_escaped() {
        let status = json!({
            "runtime": "runtime://x.example/\u{1b}[2J",
            "domains": [{ "name": "evil\u{202e}elpmaxe.", "instances": 1, "memory_bytes": 2048, "inbox": 0 }],
            "hyperties": [{ "domain": "a.example", "name": "b\u{200b}", "address": "hyperty://a.example/\u{7}", "status": "live" }],
            "stubs": [],
        });
        let table = super::table(&status);
        for hidden in ['\u{1b}', '\u{202e}', '\u{200b}', '\u{7}'] {
            assert!(!table.contains(hidden), "{hidden:?} shown raw in:\n{table}");
        }
        for shown in ["\\u{1b}[2J", "evil\\u{202e}elpmaxe.", "b\\u{200b}", "a.example/\\u{7}"] {
            assert!(table.contains(shown), "{shown} missing from:\n{table}");
        }
    }
}
