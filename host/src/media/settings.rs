//! A domain's `media` table in the bundle: where its peer connections'
//! sockets bind, which remote addresses they may reach, and its limits.
//!
//! ```toml
//! [domains."alice.example"]
//! grants = ["clocks", "random", "media"]
//! media = { bind = "127.0.0.1", ports = "40000-40100", peers = ["127.0.0.0/8"], peer-connections = 8, stun = ["127.0.0.1:3478"] }
//! # A TURN relay (RFC 8656) with long-term credentials, and relayed candidates only:
//! # media = { ..., turn = [{ server = "127.0.0.1:3478", username = "u", credential = "p" }], ice-transport-policy = "relay" }
//! ```

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;
use serde::Deserialize;

/// The largest `message-bytes`: a received message travels to the hyperty
/// as base64 (4/3 of its size) inside one bus message, which must stay
/// under the bus's default limit (1 MiB).
pub const MAX_MESSAGE_BYTES: u32 = 256 << 10;

/// What a domain granted `media` may do with WebRTC (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaSettings {
    /// The local address every socket binds to (one host ICE candidate).
    pub bind: IpAddr,
    /// The UDP ports sockets may bind to, both ends included.
    pub ports: RangeInclusive<u16>,
    /// Remote addresses the domain's connections may reach (candidates
    /// outside are refused `not-granted`, packets from outside dropped).
    /// By default `127.0.0.0/8` for a loopback `bind`, else `bind` alone.
    pub peers: Vec<IpNet>,
    /// Peer connections the domain holds open at once.
    pub peer_connections: u32,
    /// Data channels per peer connection (opened by either side).
    pub channels: u32,
    /// Bytes a second the domain's hyperties may send on data channels
    /// together (also the burst).
    pub bytes_per_second: u32,
    /// The largest data-channel message, sent or received, in bytes
    /// (announced to the remote as SDP `max-message-size`, RFC 8841).
    pub message_bytes: u32,
    /// Events of one connection waiting for room in the hyperty's inbox;
    /// one more closes the connection ("the hyperty does not keep up").
    pub pending_events: u32,
    /// Media tracks per peer connection, added here or by the remote
    /// (a remote's beyond it are neither reported nor received).
    pub tracks: u32,
    /// Media bytes a second the domain's connections send together,
    /// written by hyperties or forwarded in the host (also the burst).
    pub media_bytes_per_second: u32,
    /// Received frames (`media` events) of one connection waiting in the
    /// hyperty's inbox; one more is dropped and counted.
    pub pending_frames: u32,
    /// Bytes of those frames' events (base64 JSON) waiting in the inbox
    /// for one connection, also charged to the domain's `total-memory-mb`.
    pub pending_frame_bytes: u32,
    /// Peer connections the domain may open a minute (also the burst):
    /// each may call the domain's IdP proxy once each way.
    pub opens_per_minute: u32,
    /// STUN servers (`ip:port`, at most [`MAX_STUN_SERVERS`]) each
    /// connection's socket asks for its server-reflexive address (RFC 8489
    /// Binding): host configuration, never shown to guests. Reachable
    /// whatever `peers` says.
    pub stun: Vec<SocketAddr>,
    /// TURN servers (at most [`MAX_TURN_SERVERS`]) each connection's socket
    /// allocates a relayed address on (RFC 8656, long-term credentials):
    /// host configuration, never shown to guests nor logged. Reachable
    /// whatever `peers` says.
    pub turn: Vec<TurnServer>,
    /// `ice-transport-policy` (W3C `RTCConfiguration.iceTransportPolicy`):
    /// `relay` gives str0m and the hyperty relayed candidates only (no host
    /// nor server-reflexive one), so every packet goes through a `turn`
    /// server and the host's addresses stay hidden.
    pub relay_only: bool,
}

/// The most STUN servers a domain's `stun` names (each connection sends a
/// Binding request to every one).
pub const MAX_STUN_SERVERS: usize = 4;
/// The most TURN servers a domain's `turn` names (each connection holds an
/// allocation on every one).
pub const MAX_TURN_SERVERS: usize = 4;
/// The longest TURN `username` and `credential`, in bytes (RFC 8489
/// §14.3: a USERNAME is under 513 bytes).
pub const MAX_TURN_SECRET_BYTES: usize = 512;

/// A TURN server of the domain's `turn` setting and its long-term
/// credentials (RFC 8489 §9.2). Its `Debug` hides the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnServer {
    /// `ip:port` (a name is not resolved).
    pub server: SocketAddr,
    pub username: String,
    pub credential: String,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer").field("server", &self.server).finish_non_exhaustive()
    }
}

/// The table as written, before its values are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawMedia {
    bind: String,
    ports: String,
    #[serde(default)]
    peers: Option<Vec<String>>,
    #[serde(default = "defaults::peer_connections")]
    peer_connections: u32,
    #[serde(default = "defaults::channels")]
    channels: u32,
    #[serde(default = "defaults::bytes_per_second")]
    bytes_per_second: u32,
    #[serde(default = "defaults::message_bytes")]
    message_bytes: u32,
    #[serde(default = "defaults::pending_events")]
    pending_events: u32,
    #[serde(default = "defaults::tracks")]
    tracks: u32,
    #[serde(default = "defaults::media_bytes_per_second")]
    media_bytes_per_second: u32,
    #[serde(default = "defaults::pending_frames")]
    pending_frames: u32,
    #[serde(default = "defaults::pending_frame_bytes")]
    pending_frame_bytes: u32,
    #[serde(default = "defaults::opens_per_minute")]
    opens_per_minute: u32,
    #[serde(default)]
    stun: Vec<String>,
    #[serde(default)]
    turn: Vec<RawTurn>,
    #[serde(default)]
    ice_transport_policy: Option<String>,
}

/// One `turn` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTurn {
    server: String,
    username: Option<String>,
    credential: Option<String>,
}

mod defaults {
    pub fn peer_connections() -> u32 {
        8
    }
    pub fn channels() -> u32 {
        16
    }
    pub fn bytes_per_second() -> u32 {
        8 << 20
    }
    pub fn message_bytes() -> u32 {
        64 << 10
    }
    pub fn pending_events() -> u32 {
        1024
    }
    pub fn tracks() -> u32 {
        8
    }
    pub fn media_bytes_per_second() -> u32 {
        4 << 20
    }
    pub fn pending_frames() -> u32 {
        64
    }
    pub fn pending_frame_bytes() -> u32 {
        4 << 20
    }
    pub fn opens_per_minute() -> u32 {
        120
    }
}

impl RawMedia {
    /// The checked settings; the error names the field.
    pub(crate) fn check(self) -> Result<MediaSettings, String> {
        let bind: IpAddr = self.bind.parse().map_err(|_| format!("bind: {:?} is not an IP address", self.bind))?;
        if bind.is_unspecified() || bind.is_multicast() {
            return Err(format!("bind: {bind} is not one interface's address (a host candidate needs one)"));
        }
        let ports = parse_ports(&self.ports).map_err(|e| format!("ports: {e}"))?;
        let peers = match self.peers {
            None if bind.is_loopback() => vec![IpNet::new(bind, if bind.is_ipv4() { 8 } else { 128 }).expect("valid prefix").trunc()],
            None => vec![IpNet::from(bind)],
            Some(list) => list
                .iter()
                .map(|p| {
                    p.parse::<IpNet>()
                        .ok()
                        .or_else(|| p.parse::<IpAddr>().ok().map(IpNet::from))
                        .ok_or_else(|| format!("peers: {p:?} is not a CIDR block or an IP address"))
                })
                .collect::<Result<_, _>>()?,
        };
        if self.stun.len() > MAX_STUN_SERVERS {
            return Err(format!("stun: {} servers, at most {MAX_STUN_SERVERS}", self.stun.len()));
        }
        let stun = self
            .stun
            .iter()
            .map(|s| {
                let server = s.parse::<SocketAddr>().map_err(|_| format!("stun: {s:?} is not an ip:port (names are not resolved)"))?;
                same_family(bind, server).map_err(|e| format!("stun: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.turn.len() > MAX_TURN_SERVERS {
            return Err(format!("turn: {} servers, at most {MAX_TURN_SERVERS}", self.turn.len()));
        }
        let mut turn: Vec<TurnServer> = Vec::new();
        for (i, t) in self.turn.into_iter().enumerate() {
            let server = t.check(i, bind, &turn)?;
            turn.push(server);
        }
        let relay_only = match self.ice_transport_policy.as_deref() {
            None | Some("all") => false,
            Some("relay") if turn.is_empty() => {
                return Err("ice-transport-policy: \"relay\" needs at least one `turn` server (it gathers relayed candidates only)".into());
            }
            Some("relay") => true,
            Some(other) => return Err(format!("ice-transport-policy: {other:?} is neither \"all\" nor \"relay\"")),
        };
        let check = |ok: bool, field: &str, range: String| if ok { Ok(()) } else { Err(format!("{field} must be in {range}")) };
        check((1..=1000).contains(&self.peer_connections), "peer-connections", "1..=1000".into())?;
        check((1..=1024).contains(&self.channels), "channels", "1..=1024".into())?;
        check(self.bytes_per_second >= 1024, "bytes-per-second", "1024..".into())?;
        check((1..=MAX_MESSAGE_BYTES).contains(&self.message_bytes), "message-bytes", format!("1..={MAX_MESSAGE_BYTES}"))?;
        check((1..=1_000_000).contains(&self.pending_events), "pending-events", "1..=1000000".into())?;
        check((1..=64).contains(&self.tracks), "tracks", "1..=64".into())?;
        check(self.media_bytes_per_second >= 1024, "media-bytes-per-second", "1024..".into())?;
        check((1..=100_000).contains(&self.pending_frames), "pending-frames", "1..=100000".into())?;
        check(self.pending_frame_bytes >= 1024, "pending-frame-bytes", "1024..".into())?;
        check((1..=1_000_000).contains(&self.opens_per_minute), "opens-per-minute", "1..=1000000".into())?;
        Ok(MediaSettings {
            bind,
            ports,
            peers,
            peer_connections: self.peer_connections,
            channels: self.channels,
            bytes_per_second: self.bytes_per_second,
            message_bytes: self.message_bytes,
            pending_events: self.pending_events,
            tracks: self.tracks,
            media_bytes_per_second: self.media_bytes_per_second,
            pending_frames: self.pending_frames,
            pending_frame_bytes: self.pending_frame_bytes,
            opens_per_minute: self.opens_per_minute,
            stun,
            turn,
            relay_only,
        })
    }
}

impl RawTurn {
    /// The checked entry `turn[i]`, for sockets on `bind` (the same
    /// address family), a server none of the entries `before` names; the
    /// error names the field, never the credentials' values.
    fn check(self, i: usize, bind: IpAddr, before: &[TurnServer]) -> Result<TurnServer, String> {
        let server = self
            .server
            .parse::<SocketAddr>()
            .map_err(|_| format!("turn[{i}].server: {:?} is not an ip:port (names are not resolved)", self.server))?;
        same_family(bind, server).map_err(|e| format!("turn[{i}].server: {e}"))?;
        if let Some(j) = before.iter().position(|t| t.server == server) {
            return Err(format!("turn[{i}].server: {server} is turn[{j}]'s already (one allocation per server)"));
        }
        let secret = |field: &str, value: Option<String>| match value {
            None => Err(format!("turn[{i}].{field}: missing (a TURN server takes long-term credentials)")),
            Some(v) if v.is_empty() || v.len() > MAX_TURN_SECRET_BYTES => {
                Err(format!("turn[{i}].{field}: {} bytes, it must have 1..={MAX_TURN_SECRET_BYTES}", v.len()))
            }
            Some(v) => Ok(v),
        };
        Ok(TurnServer { server, username: secret("username", self.username)?, credential: secret("credential", self.credential)? })
    }
}

/// `server`, if of `bind`'s address family (a socket on `bind` reaches
/// no other).
fn same_family(bind: IpAddr, server: SocketAddr) -> Result<SocketAddr, String> {
    let family = |ip: IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    if server.is_ipv4() == bind.is_ipv4() {
        return Ok(server);
    }
    Err(format!("{server} is {} but bind {bind} is {}: a socket on bind reaches its own address family only", family(server.ip()), family(bind)))
}

/// `"40000-40100"` or `"40000"`: a non-empty range of non-zero ports.
fn parse_ports(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| format!("{s:?} is not a port (1..=65535)"));
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(text)?, port(text)?),
    };
    if first > last {
        return Err(format!("{text:?} is an empty range"));
    }
    Ok(first..=last)
}

impl MediaSettings {
    /// Whether the connections may exchange packets with `ip`.
    pub fn allows_peer(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.peers.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml: &str) -> Result<MediaSettings, String> {
        toml::from_str::<RawMedia>(toml).map_err(|e| e.to_string())?.check()
    }

    #[test]
    fn the_table_is_checked_naming_the_field() {
        let ok = raw("bind = \"127.0.0.1\"\nports = \"40000-40002\"").unwrap();
        assert!(ok.stun.is_empty());
        let stun = raw("bind = \"127.0.0.1\"\nports = \"1-2\"\nstun = [\"127.0.0.1:3478\", \"127.0.0.2:3478\"]").unwrap();
        assert_eq!(stun.stun, ["127.0.0.1:3478".parse().unwrap(), "127.0.0.2:3478".parse().unwrap()]);
        let v6 = raw("bind = \"::1\"\nports = \"1-2\"\nstun = [\"[::1]:3478\"]\nturn = [{ server = \"[::1]:3478\", username = \"u\", credential = \"c\" }]").unwrap();
        assert_eq!((v6.stun.len(), v6.turn.len()), (1, 1));
        assert_eq!((ok.ports.clone(), ok.peers.len()), (40000..=40002, 1));
        assert!(ok.turn.is_empty() && !ok.relay_only);
        let relay = raw("bind = \"127.0.0.1\"\nports = \"1-2\"\nice-transport-policy = \"relay\"\nturn = [{ server = \"127.0.0.1:3478\", username = \"u\", credential = \"s3cret\" }]").unwrap();
        assert!(relay.relay_only);
        assert_eq!(relay.turn, [TurnServer { server: "127.0.0.1:3478".parse().unwrap(), username: "u".into(), credential: "s3cret".into() }]);
        // The credentials never reach a log line through `Debug`.
        let shown = format!("{relay:?}");
        assert!(shown.contains("127.0.0.1:3478") && !shown.contains("s3cret") && !shown.contains("\"u\""), "{shown}");
        let five = (0..5).map(|i| format!("{{ server = \"127.0.0.{i}:3478\", username = \"u\", credential = \"c\" }}")).collect::<Vec<_>>();
        let e = raw(&format!("bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{}]", five.join(", "))).unwrap_err();
        assert_eq!(e, "turn: 5 servers, at most 4");
        assert!(ok.allows_peer("127.9.9.9".parse().unwrap()) && !ok.allows_peer("10.0.0.1".parse().unwrap()));
        let lan = raw("bind = \"10.200.0.1\"\nports = \"5000\"").unwrap();
        assert!(lan.allows_peer("10.200.0.1".parse().unwrap()) && !lan.allows_peer("10.200.0.2".parse().unwrap()));
        let wide = raw("bind = \"10.200.0.1\"\nports = \"5000\"\npeers = [\"10.200.0.0/24\", \"::1\"]").unwrap();
        assert!(wide.allows_peer("10.200.0.9".parse().unwrap()) && wide.allows_peer("::1".parse().unwrap()));
        for (bad, why) in [
            ("bind = \"0.0.0.0\"\nports = \"1-2\"", "bind:"),
            ("bind = \"nowhere\"\nports = \"1-2\"", "bind:"),
            ("bind = \"127.0.0.1\"\nports = \"9-2\"", "ports:"),
            ("bind = \"127.0.0.1\"\nports = \"0-2\"", "ports:"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\npeers = [\"10/99\"]", "peers:"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nmessage-bytes = 1000000", "message-bytes"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\npeer-connections = 0", "peer-connections"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\ntracks = 65", "tracks"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nmedia-bytes-per-second = 10", "media-bytes-per-second"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\npending-frames = 0", "pending-frames"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\npending-frame-bytes = 10", "pending-frame-bytes"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nopens-per-minute = 0", "opens-per-minute"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nstun = [\"stun.example:3478\"]", "stun: \"stun.example:3478\" is not an ip:port"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{ url = \"turn:127.0.0.1\", username = \"u\", credential = \"c\" }]", "unknown field `url`"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{ server = \"turn.example:3478\", username = \"u\", credential = \"c\" }]", "turn[0].server: \"turn.example:3478\" is not an ip:port"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{ server = \"127.0.0.1:3478\", credential = \"c\" }]", "turn[0].username: missing"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{ server = \"127.0.0.1:3478\", username = \"u\" }]", "turn[0].credential: missing"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{ server = \"127.0.0.1:3478\", username = \"\", credential = \"c\" }]", "turn[0].username: 0 bytes"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nice-transport-policy = \"relay\"", "ice-transport-policy: \"relay\" needs at least one `turn` server"),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nstun = [\"[::1]:3478\"]", "stun: [::1]:3478 is IPv6 but bind 127.0.0.1 is IPv4"),
            ("bind = \"::1\"\nports = \"1-2\"\nturn = [{ server = \"127.0.0.1:3478\", username = \"u\", credential = \"c\" }]", "turn[0].server: 127.0.0.1:3478 is IPv4 but bind ::1 is IPv6"),
            (
                "bind = \"127.0.0.1\"\nports = \"1-2\"\nturn = [{ server = \"127.0.0.1:3478\", username = \"u\", credential = \"c\" }, { server = \"127.0.0.1:3478\", username = \"v\", credential = \"d\" }]",
                "turn[1].server: 127.0.0.1:3478 is turn[0]'s already",
            ),
            ("bind = \"127.0.0.1\"\nports = \"1-2\"\nice-transport-policy = \"public\"", "ice-transport-policy: \"public\" is neither"),
        ] {
            let e = raw(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
