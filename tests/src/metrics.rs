//! Scraping a runtime's metrics endpoint over a real TCP socket, and
//! reading samples out of the OpenMetrics text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An HTTP answer: status code, head (lower-cased header names) and body.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Sends `request` (raw bytes) to `addr` and reads the answer until the
/// server closes (one request per connection).
pub fn http(addr: SocketAddr, request: &[u8]) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may answer (and close) before it read all of a huge head.
    let _ = stream.write_all(request);
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8(bytes).expect("an UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpAnswer { status, headers, body: body.to_owned() }
}

/// `GET /metrics`: the text, asserting a 200 in the OpenMetrics format.
pub fn scrape(addr: SocketAddr) -> Samples {
    let answer = http(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(answer.body.ends_with("# EOF\n"), "{}", answer.body);
    Samples::parse(&answer.body)
}

/// The samples of one scrape, by name and labels.
#[derive(Debug)]
pub struct Samples(Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    /// Parses `name{label="value",...} number` lines; comments skipped.
    pub fn parse(text: &str) -> Samples {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("not a label: {p:?}"));
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value.parse().unwrap_or_else(|_| panic!("not a number: {line:?}"))));
        }
        Samples(samples)
    }

    /// The value of `name` with exactly `labels`; 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.0.iter().find(|(n, l, _)| n == name && *l == wanted).map_or(0.0, |(_, _, v)| *v)
    }

    /// The values of every sample of `name`, whatever its labels.
    pub fn values(&self, name: &str) -> Vec<f64> {
        self.0.iter().filter(|(n, _, _)| n == name).map(|(_, _, v)| *v).collect()
    }
}
