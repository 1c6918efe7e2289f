//! Relayed candidates (RFC 8445 §5.1.1.2): each connection's socket
//! allocates a relayed address on the TURN servers of its domain's `turn`
//! setting (RFC 8656, host configuration, never a guest's), with the
//! long-term credentials given there (RFC 8489 §9.2: 401 → REALM and
//! NONCE → MESSAGE-INTEGRITY; 438 stale nonce → the new nonce). The
//! XOR-RELAYED-ADDRESS (of `bind`'s address family) becomes a local
//! `relay` candidate of the connection. What str0m sends from that
//! address goes to the server wrapped (a Send indication, or ChannelData
//! once a channel is bound); what the server relays from a peer (Data
//! indication, ChannelData) is unwrapped and given to str0m as received on
//! the relayed address, from a peer a permission was asked for only.
//!
//! The protocol is `turn-client-proto`'s (sans-IO, by the author of
//! `stun-types`): it refreshes the allocation before its LIFETIME ends and
//! the permissions and channels before theirs; the connection's task only
//! moves its datagrams and joins its next timeout to its own wait.
//!
//! Only responses to the requests this allocation sent (their transaction
//! ids, the latest [`REQUESTS_KEPT`]) are read: a forged one from a
//! spoofed source with a made-up id is dropped unread.
//!
//! Bounds: one allocation per server per connection; at most
//! [`MAX_PERMISSIONS`] peer addresses (permissions, and as many channels)
//! per allocation, each within the domain's `peers`; a permission refused
//! or not renewed frees its place and is asked again, at most
//! [`PERMISSION_TRIES`] times per peer address; each request sent at
//! most [`TRIES`] times (then the server is given up on, logged); a server
//! that refuses (a second 401: the credentials are wrong; 403, 437, 486
//! allocation quota, ...) is given up on with the code it answered (its
//! reason phrase escaped and cut at [`MAX_REASON_BYTES`]). A closed
//! connection's allocation is released (Refresh, LIFETIME 0, sent again on
//! a loss or a 438), or, while its Allocate is in flight, released once
//! the server answers it: its task keeps the socket for that at most
//! [`RELEASE_WITHIN`].

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use stun_types::attribute::ErrorCode;
use stun_types::message::{Message, MessageClass, TransactionId};
use turn_client_proto::api::{Transmit, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::types::message::{ALLOCATE, REFRESH};
use turn_client_proto::types::{AddressFamily, TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

use super::settings::TurnServer;

/// Peer addresses one allocation holds permissions (and channels) for.
pub const MAX_PERMISSIONS: usize = 16;
/// Times a permission for one peer address is asked for: one refused (or
/// not renewed) frees its place and is asked again while under this.
pub const PERMISSION_TRIES: u32 = 3;
/// Times a request (Allocate, CreatePermission, ...) is sent before the
/// server is given up on, [`RTO`] apart at first (then doubling), as STUN's.
pub const TRIES: u32 = super::stun::TRIES;
/// The first wait between two sends of a request (RFC 8489 §6.2.1).
pub const RTO: Duration = super::stun::RTO;
/// Transaction ids of the latest requests sent whose responses are read.
pub const REQUESTS_KEPT: usize = 64;
/// The longest reason phrase of a server's error response kept, in bytes
/// (escaped first, then cut, `…` added).
pub const MAX_REASON_BYTES: usize = 128;
/// The longest one request waits for its answer: sent at 0, RTO and 3 RTO,
/// its last answer awaited 2 RTO more.
const TRANSACTION: Duration = Duration::from_millis(RTO.as_millis() as u64 * 5);
/// The longest a closed connection keeps its socket to release its
/// allocations: an Allocate in flight answered, then the Refresh (LIFETIME
/// 0) sent after the requests queued before it (50 ms apart) and answered.
pub const RELEASE_WITHIN: Duration =
    Duration::from_millis(TRANSACTION.as_millis() as u64 * 2 + REQUEST_CADENCE.as_millis() as u64 * (2 * MAX_PERMISSIONS as u64 + 2));
/// The shortest wait between two polls of a client with nothing to do.
const MIN_WAIT: Duration = Duration::from_millis(5);
/// Rounds of one poll (each takes the client's events and datagrams).
const MAX_ROUNDS: usize = 16;
/// `turn-client-proto` spaces two requests by 50 ms.
const REQUEST_CADENCE: Duration = Duration::from_millis(50);
/// Allocate requests whose transaction ids are kept (the first, the
/// authenticated one, those sent again after a 438).
const MAX_ALLOCATES: usize = 16;

/// The allocation of one connection on one TURN server.
pub(super) struct Allocation {
    pub server: SocketAddr,
    /// `None` once given up on (or released).
    client: Option<TurnClientUdp>,
    /// The zero of the client's clock.
    base: Instant,
    /// The address family of the socket, so of the relayed address and of
    /// the peers it can reach.
    ipv4: bool,
    relayed: Option<SocketAddr>,
    /// Transaction ids of the latest requests sent (at most
    /// [`REQUESTS_KEPT`]): responses with another are not read.
    requests: VecDeque<TransactionId>,
    /// Transaction ids of the Allocate requests sent.
    allocates: Vec<TransactionId>,
    /// Allocate transactions the server answered 401: the first is the
    /// challenge (REALM, NONCE), a second the credentials refused.
    unauthorized: Vec<TransactionId>,
    /// The last error the server answered an Allocate with (`403
    /// Forbidden`).
    refused: Option<String>,
    /// Peer IPs a permission was asked for (or waits for the allocation).
    permitted: Vec<IpAddr>,
    /// Peer IPs whose permission was refused or not renewed, and how many
    /// times (the latest `4 × MAX_PERMISSIONS`).
    refusals: VecDeque<(IpAddr, u32)>,
    /// Peers a channel was asked for.
    channels: Vec<SocketAddr>,
    /// Released (or to be, once its Allocate is answered).
    releasing: bool,
    /// Time of the next poll the client asked for.
    pub due: Option<Instant>,
}

/// What an [`Allocation`] tells its connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The server allocated this relayed address.
    Relayed(SocketAddr),
    /// The server is given up on, for this reason.
    Failed(String),
}

/// What a datagram from the server was.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Received {
    /// Not for this allocation (e.g. a STUN Binding response, or a
    /// response to none of its requests).
    NotOurs,
    /// A response the allocation consumed (or relayed data it dropped).
    Handled,
    /// Data relayed from `peer`, unwrapped.
    Peer(SocketAddr, Vec<u8>),
}

impl Allocation {
    /// Starts allocating on `server` from the socket at `local` (a relayed
    /// address of `local`'s address family).
    pub fn new(server: &TurnServer, local: SocketAddr) -> Allocation {
        let mut config = TurnConfig::new(TurnCredentials::new(&server.username, &server.credential));
        config.set_request_retransmits(RTO, RTO * 4, TRIES, RTO * 2);
        config.set_address_family(if local.is_ipv4() { AddressFamily::IPV4 } else { AddressFamily::IPV6 });
        let client = TurnClientUdp::allocate(local, server.server, config);
        Allocation {
            server: server.server,
            client: Some(client),
            base: Instant::now(),
            ipv4: local.is_ipv4(),
            relayed: None,
            requests: VecDeque::new(),
            allocates: Vec::new(),
            unauthorized: Vec::new(),
            refused: None,
            permitted: Vec::new(),
            refusals: VecDeque::new(),
            channels: Vec::new(),
            releasing: false,
            due: Some(Instant::now()),
        }
    }

    fn at(&self, now: Instant) -> turn_client_proto::types::Instant {
        turn_client_proto::types::Instant::from_nanos(i64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(i64::MAX))
    }

    /// Whether the server was given up on (or the allocation released).
    pub fn is_gone(&self) -> bool {
        self.client.is_none()
    }

    /// The relayed address, once allocated (and until released).
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed.filter(|_| self.client.is_some() && !self.releasing)
    }

    /// Drives the client at `now`: the datagrams to send to the server go
    /// into `out`; what happened (allocated, given up on), if anything
    /// (nothing once released).
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) -> Option<Step> {
        let at = self.at(now);
        let base = self.base;
        let client = self.client.as_mut()?;
        let mut step = None;
        let mut closed = false;
        // Rounds of events and datagrams: bounded, whatever the client says.
        for _ in 0..MAX_ROUNDS {
            let wait = match client.poll(at) {
                TurnPollRet::WaitUntil(wait) => Some(wait),
                TurnPollRet::Closed => {
                    closed = true;
                    None
                }
                // Only TCP allocations ask for sockets.
                TurnPollRet::AllocateTcpSocket { .. } | TurnPollRet::TcpClose { .. } => None,
            };
            let mut progressed = false;
            while let Some(event) = client.poll_event() {
                progressed = true;
                match event {
                    TurnEvent::AllocationCreated(TransportType::Udp, relayed) if self.relayed.is_none() => {
                        self.relayed = Some(relayed);
                        if self.releasing {
                            // Closed while its Allocate was in flight: released now.
                            closed |= client.delete(at).is_err();
                        } else if !super::stun::usable(relayed) {
                            self.refused = Some(format!("an unusable relayed address {relayed}"));
                            self.relayed = None;
                            closed = true;
                        } else {
                            step = Some(Step::Relayed(relayed));
                        }
                    }
                    TurnEvent::AllocationCreateFailed(_) => closed = true,
                    TurnEvent::PermissionCreateFailed(_, ip) => {
                        tracing::debug!(server = %self.server, "the TURN server refused (or did not renew) a permission for {ip}");
                        refused_permission(&mut self.permitted, &mut self.refusals, ip);
                    }
                    _ => {}
                }
            }
            while let Some(transmit) = client.poll_transmit(at) {
                progressed = true;
                let sent = Message::from_bytes(&transmit.data).ok();
                if let Some(m) = sent.as_ref().filter(|m| m.has_class(MessageClass::Request)) {
                    remember(&mut self.requests, &mut self.allocates, m);
                }
                // Released: only what releases it (the Allocate whose
                // success is awaited, the Refresh).
                if self.releasing && !sent.is_some_and(|m| m.has_method(ALLOCATE) || m.has_method(REFRESH)) {
                    continue;
                }
                out.push(transmit.data.to_vec());
            }
            // A wait already over with nothing to do would spin the task:
            // at least MIN_WAIT.
            self.due = wait.map(|w| (base + Duration::from_nanos(u64::try_from(w.as_nanos()).unwrap_or(0))).max(now + MIN_WAIT));
            if closed || !progressed {
                break;
            }
        }
        if step.is_some() {
            // Permissions asked for before the allocation existed.
            for ip in self.permitted.clone() {
                let _ = client.create_permission(TransportType::Udp, ip, at);
            }
            self.due = Some(now);
        }
        if closed {
            return self.give_up();
        }
        step
    }

    /// Gives the server up (why, once; nothing once released).
    fn give_up(&mut self) -> Option<Step> {
        self.client = None;
        self.due = None;
        if self.releasing {
            tracing::debug!(server = %self.server, "TURN allocation released");
            return None;
        }
        let why = match (&self.relayed, &self.refused) {
            (None, Some(code)) => format!("the TURN server {} refused the allocation: {code}", self.server),
            (None, None) => format!("the TURN server {} gave no allocation (no answer to {TRIES} Allocate requests)", self.server),
            (Some(relayed), _) => format!("the TURN server {} dropped the allocation {relayed} (a refresh failed)", self.server),
        };
        Some(Step::Failed(why))
    }

    /// Reads `data`, received from the server on the socket at `local`;
    /// `Err` gives the server up (why).
    pub fn received(&mut self, data: &[u8], local: SocketAddr, now: Instant) -> Result<Received, Step> {
        let at = self.at(now);
        let message = Message::from_bytes(data).ok();
        // A response to none of our requests (forged, or a STUN Binding's).
        if message.as_ref().is_some_and(|m| m.is_response() && !self.requests.contains(&m.transaction_id())) {
            return Ok(Received::NotOurs);
        }
        let Some(client) = self.client.as_mut() else { return Ok(Received::NotOurs) };
        let answer = match client.recv(Transmit::new(data, TransportType::Udp, self.server, local), at) {
            TurnRecvRet::Ignored(_) => Received::NotOurs,
            TurnRecvRet::Handled | TurnRecvRet::PeerIcmp { .. } => Received::Handled,
            TurnRecvRet::PeerData(peer) if self.permitted.contains(&peer.peer.ip()) => Received::Peer(peer.peer, peer.data().to_vec()),
            TurnRecvRet::PeerData(peer) => {
                tracing::debug!(server = %self.server, "relayed data from {}, which no permission was asked for, dropped", peer.peer);
                Received::Handled
            }
        };
        if answer == Received::Handled {
            self.due = Some(now);
        }
        if let Some(m) = message.filter(|m| self.relayed.is_none() && m.has_class(MessageClass::Error) && self.allocates.contains(&m.transaction_id())) {
            self.note_refusal(&m, answer == Received::Handled)?;
        }
        Ok(answer)
    }

    /// Keeps the error code of an error response `m` to one of our
    /// Allocate requests that the client `handled` (checked); a 401 to a
    /// second one (the authenticated request: the client ignores it when
    /// its REALM and NONCE are those it answered) gives up.
    fn note_refusal(&mut self, m: &Message<'_>, handled: bool) -> Result<(), Step> {
        let Ok(code) = m.attribute::<ErrorCode>() else { return Ok(()) };
        let reason = reason(code.reason());
        if code.code() != ErrorCode::UNAUTHORIZED {
            if handled {
                self.refused = Some(format!("{} {reason}", code.code()));
            }
            return Ok(());
        }
        if !self.unauthorized.contains(&m.transaction_id()) {
            self.unauthorized.push(m.transaction_id());
            if self.unauthorized.len() > 1 {
                self.refused = Some(format!("{} {reason} twice: the username or credential is wrong", code.code()));
                return Err(self.give_up().expect("not released"));
            }
        }
        Ok(())
    }

    /// Asks for a permission for `ip` (within the domain's `peers`: the
    /// caller's check), now or once allocated; at most [`MAX_PERMISSIONS`]
    /// at once, [`PERMISSION_TRIES`] times for one `ip`, of the socket's
    /// address family only.
    pub fn permit(&mut self, ip: IpAddr, now: Instant) {
        if self.client.is_none()
            || self.releasing
            || ip.is_ipv4() != self.ipv4
            || self.permitted.contains(&ip)
            || self.permitted.len() >= MAX_PERMISSIONS
            || self.refusals.iter().any(|&(refused, times)| refused == ip && times >= PERMISSION_TRIES)
        {
            return;
        }
        self.permitted.push(ip);
        let at = self.at(now);
        if let (Some(client), Some(_)) = (self.client.as_mut(), self.relayed) {
            let _ = client.create_permission(TransportType::Udp, ip, at);
            self.due = Some(now);
        }
    }

    /// `data` for `to` wrapped for the server (ChannelData once a channel
    /// is bound, else a Send indication), or `None` while `to` has no
    /// permission yet (one is asked for: ICE sends its checks again).
    pub fn wrap(&mut self, to: SocketAddr, data: &[u8], now: Instant) -> Option<Vec<u8>> {
        let at = self.at(now);
        self.relayed()?;
        if !self.client.as_ref()?.have_permission(TransportType::Udp, to.ip()) {
            self.permit(to.ip(), now);
            return None;
        }
        let client = self.client.as_mut()?;
        if !self.channels.contains(&to) && self.channels.len() < MAX_PERMISSIONS {
            self.channels.push(to);
            if client.bind_channel(TransportType::Udp, to, at).is_ok() {
                self.due = Some(now);
            }
        }
        let wrapped = client.send_to(TransportType::Udp, to, data, at).ok()??;
        Some(wrapped.build().data)
    }

    /// Releases the allocation (a Refresh with LIFETIME 0, RFC 8656 §7,
    /// sent again on a loss or a 438 stale nonce), or, while its Allocate
    /// is in flight, once the server answers it: the client keeps running
    /// for that, its datagrams from [`Allocation::poll`] (nothing else),
    /// until [`Allocation::is_gone`]; the caller bounds how long
    /// ([`RELEASE_WITHIN`]).
    pub fn release(&mut self, now: Instant) {
        if self.releasing {
            return;
        }
        self.releasing = true;
        let at = self.at(now);
        let Some(client) = self.client.as_mut() else { return };
        if self.relayed.is_some() {
            if client.delete(at).is_err() {
                self.client = None;
            }
        } else if self.allocates.is_empty() {
            // Nothing sent: nothing to release.
            self.client = None;
        }
        self.due = self.client.as_ref().map(|_| now);
    }
}

/// Notes that the permission for `ip` was refused (or not renewed): its
/// place in `permitted` is freed, and `refusals` counts it (the latest
/// `4 × MAX_PERMISSIONS` addresses).
fn refused_permission(permitted: &mut Vec<IpAddr>, refusals: &mut VecDeque<(IpAddr, u32)>, ip: IpAddr) {
    permitted.retain(|p| *p != ip);
    match refusals.iter_mut().find(|(refused, _)| *refused == ip) {
        Some((_, times)) => *times += 1,
        None => {
            if refusals.len() >= 4 * MAX_PERMISSIONS {
                refusals.pop_front();
            }
            refusals.push_back((ip, 1));
        }
    }
}

/// Keeps the transaction id of the request `m` sent (once; the latest
/// [`REQUESTS_KEPT`]), and in `allocates` too if it is an Allocate.
fn remember(requests: &mut VecDeque<TransactionId>, allocates: &mut Vec<TransactionId>, m: &Message<'_>) {
    let id = m.transaction_id();
    if requests.contains(&id) {
        return;
    }
    if requests.len() >= REQUESTS_KEPT {
        requests.pop_front();
    }
    requests.push_back(id);
    if m.has_method(ALLOCATE) && allocates.len() < MAX_ALLOCATES {
        allocates.push(id);
    }
}

/// A server's reason phrase as it may go into a log line and a guest's
/// `closed` event: escaped, cut at [`MAX_REASON_BYTES`] (then `…`).
fn reason(text: &str) -> String {
    let mut out = String::new();
    for c in crate::sandbox::printable(text).chars() {
        if out.len() + c.len_utf8() > MAX_REASON_BYTES {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_types::attribute::{AttributeWrite, Nonce, Realm, XorMappedAddress};
    use turn_client_proto::types::attribute::{Data, Lifetime, XorPeerAddress, XorRelayedAddress};
    use turn_client_proto::types::message::{CREATE_PERMISSION, REFRESH, SEND};
    use turn_client_proto::types::transmit::DelayedMessage;
    use stun_types::message::{
        IntegrityAlgorithm, LongTermKeyCredentials, MessageIntegrityCredentials, MessageWrite, MessageWriteExt, MessageWriteVec,
    };

    fn server() -> TurnServer {
        TurnServer { server: "127.0.0.1:3478".parse().unwrap(), username: "u".into(), credential: "c".into() }
    }

    /// The error response `code` to `request` with a REALM and a NONCE,
    /// signed with the credentials when `signed`.
    fn error(request: &[u8], code: u16, reason: &str, signed: bool) -> Vec<u8> {
        let request = Message::from_bytes(request).unwrap();
        let mut write = Message::builder_error(&request, MessageWriteVec::new());
        write.add_attribute(&ErrorCode::new(code, reason).unwrap()).unwrap();
        write.add_attribute(&Realm::new("hyperty.test").unwrap()).unwrap();
        write.add_attribute(&Nonce::new("n0nce").unwrap()).unwrap();
        if signed {
            write.add_message_integrity(&key(), IntegrityAlgorithm::Sha1).unwrap();
        }
        write.finish()
    }

    /// The credentials' key, as the server signs with it.
    fn key() -> MessageIntegrityCredentials {
        MessageIntegrityCredentials::LongTerm(LongTermKeyCredentials::new("u".into(), "c".into(), "hyperty.test".into()))
    }

    /// The signed success response to `request` with the attributes `with`
    /// makes (given the transaction id).
    fn success(request: &[u8], with: impl Fn(TransactionId) -> Vec<Box<dyn AttributeWrite>>) -> Vec<u8> {
        let request = Message::from_bytes(request).unwrap();
        let mut write = Message::builder_success(&request, MessageWriteVec::new());
        for attribute in with(request.transaction_id()) {
            write.add_attribute(attribute.as_ref()).unwrap();
        }
        write.add_message_integrity(&key(), IntegrityAlgorithm::Sha1).unwrap();
        write.finish()
    }

    /// What `allocation` sends at `now` (nothing else happening).
    fn sent(allocation: &mut Allocation, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        assert_eq!(allocation.poll(now, &mut out), None);
        out
    }

    /// An allocation on [`server`] past the 401 challenge: its
    /// authenticated Allocate request.
    fn challenged(local: SocketAddr, now: Instant) -> (Allocation, Vec<u8>) {
        let mut allocation = Allocation::new(&server(), local);
        let first = sent(&mut allocation, now);
        assert_eq!(first.len(), 1);
        assert_eq!(allocation.received(&error(&first[0], 401, "Unauthorized", false), local, now), Ok(Received::Handled));
        let second = sent(&mut allocation, now + REQUEST_CADENCE * 2);
        assert_eq!(second.len(), 1, "the Allocate again, authenticated");
        let m = Message::from_bytes(&second[0]).unwrap();
        assert!(m.has_method(turn_client_proto::types::message::ALLOCATE) && m.transaction_id() != Message::from_bytes(&first[0]).unwrap().transaction_id());
        (allocation, second[0].clone())
    }

    #[test]
    fn a_second_401_gives_the_server_up_naming_it_and_the_code() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let now = Instant::now();
        let (mut allocation, request) = challenged(local, now);
        let e = allocation.received(&error(&request, 401, "Unauthorized", false), local, now).unwrap_err();
        let why = "the TURN server 127.0.0.1:3478 refused the allocation: 401 Unauthorized twice: the username or credential is wrong";
        assert_eq!(e, Step::Failed(why.into()));
        assert!(allocation.is_gone() && allocation.relayed().is_none());
        assert_eq!(sent(&mut allocation, now + RTO * 10), Vec::<Vec<u8>>::new(), "nothing more is sent");
    }

    #[test]
    fn a_refusal_after_the_challenge_gives_the_server_up_with_its_code() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for (code, reason) in [(403, "Forbidden"), (437, "Allocation Mismatch"), (486, "Allocation Quota Reached")] {
            let now = Instant::now();
            let (mut allocation, request) = challenged(local, now);
            assert_eq!(allocation.received(&error(&request, code, reason, true), local, now), Ok(Received::Handled));
            let step = allocation.poll(now + REQUEST_CADENCE * 2, &mut Vec::new());
            assert_eq!(step, Some(Step::Failed(format!("the TURN server 127.0.0.1:3478 refused the allocation: {code} {reason}"))));
            assert!(allocation.is_gone());
        }
    }

    #[test]
    fn an_allocation_relays_both_ways_once_permitted_and_is_released_with_lifetime_0() {
        let (local, relayed, peer): (SocketAddr, SocketAddr, SocketAddr) =
            ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:50000".parse().unwrap(), "127.0.0.1:41000".parse().unwrap());
        let now = Instant::now();
        let (mut allocation, request) = challenged(local, now);
        let allocated = success(&request, |id| {
            vec![Box::new(XorRelayedAddress::new(relayed, id)), Box::new(Lifetime::new(600)), Box::new(XorMappedAddress::new(local, id))]
        });
        assert_eq!(allocation.received(&allocated, local, now), Ok(Received::Handled));
        let later = now + REQUEST_CADENCE * 3;
        assert_eq!(allocation.poll(later, &mut Vec::new()), Some(Step::Relayed(relayed)));
        assert_eq!(allocation.relayed(), Some(relayed));
        // No permission for the peer yet: nothing goes, one is asked for.
        assert_eq!(allocation.wrap(peer, b"hello", later), None);
        let asked = sent(&mut allocation, later + REQUEST_CADENCE);
        assert_eq!(asked.len(), 1);
        assert!(Message::from_bytes(&asked[0]).unwrap().has_method(CREATE_PERMISSION));
        assert_eq!(allocation.received(&success(&asked[0], |_| Vec::new()), local, later), Ok(Received::Handled));
        // Permitted: the data goes wrapped for the server, to the peer.
        let wrapped = allocation.wrap(peer, b"hello", later).expect("wrapped once permitted");
        let m = Message::from_bytes(&wrapped).unwrap();
        assert!(m.has_method(SEND), "a Send indication (no channel bound yet)");
        assert_eq!(m.attribute::<XorPeerAddress>().unwrap().addr(m.transaction_id()), peer);
        assert_eq!(m.attribute::<Data>().unwrap().data(), b"hello");
        // What the server relays from the peer comes back unwrapped.
        let indication = DelayedMessage::for_client(peer, &b"back"[..]).build();
        assert_eq!(allocation.received(&indication, local, later), Ok(Received::Peer(peer, b"back".to_vec())));
        // Released: a Refresh with LIFETIME 0 (RFC 8656 §7), then gone.
        allocation.release(later);
        assert_eq!(allocation.relayed(), None, "nothing more is relayed");
        let mut at = later;
        let release = next_sent(&mut allocation, &mut at);
        assert_eq!(release.iter().map(|d| lifetime_of_refresh(d)).collect::<Vec<_>>(), [Some(0)]);
        assert_eq!(allocation.received(&success(&release[0], |_| Vec::new()), local, at), Ok(Received::Handled));
        assert_eq!(allocation.poll(at + MIN_WAIT, &mut Vec::new()), None);
        assert!(allocation.is_gone() && allocation.relayed().is_none());
    }

    /// The next datagrams `allocation` sends, polled from `at` on (moved)
    /// every MIN_WAIT, within RELEASE_WITHIN.
    fn next_sent(allocation: &mut Allocation, at: &mut Instant) -> Vec<Vec<u8>> {
        let (mut out, until) = (Vec::new(), *at + RELEASE_WITHIN);
        while out.is_empty() && *at < until {
            *at += MIN_WAIT;
            allocation.poll(*at, &mut out);
        }
        out
    }

    /// The LIFETIME of `data` if it is a Refresh request.
    fn lifetime_of_refresh(data: &[u8]) -> Option<u32> {
        let m = Message::from_bytes(data).ok().filter(|m| m.has_method(REFRESH) && m.has_class(MessageClass::Request))?;
        Some(m.attribute::<Lifetime>().map_or(600, |l| l.seconds()))
    }

    /// An allocation on [`server`] of `relayed`, past the challenge.
    fn allocated(local: SocketAddr, relayed: SocketAddr, now: Instant) -> Allocation {
        let (mut allocation, request) = challenged(local, now);
        let answer = success(&request, |id| {
            vec![Box::new(XorRelayedAddress::new(relayed, id)), Box::new(Lifetime::new(600)), Box::new(XorMappedAddress::new(local, id))]
        });
        assert_eq!(allocation.received(&answer, local, now), Ok(Received::Handled));
        assert_eq!(allocation.poll(now + REQUEST_CADENCE * 3, &mut Vec::new()), Some(Step::Relayed(relayed)));
        allocation
    }

    /// An error response to a request no one sent (a made-up transaction
    /// id), as a spoofed datagram would carry.
    fn forged(method: stun_types::message::Method, code: u16, reason: &str) -> Vec<u8> {
        let request = Message::builder_request(method, MessageWriteVec::new()).finish();
        error(&request, code, reason, false)
    }

    #[test]
    fn forged_allocate_errors_with_made_up_transaction_ids_are_not_read() {
        let (local, relayed): (SocketAddr, SocketAddr) = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:50000".parse().unwrap());
        let now = Instant::now();
        let (mut allocation, request) = challenged(local, now);
        // Two forged 401s (two made-up transactions) and a forged 403.
        for (code, reason) in [(401, "Unauthorized"), (401, "Unauthorized"), (403, "Forbidden")] {
            let forged = forged(ALLOCATE, code, reason);
            assert_eq!(allocation.received(&forged, local, now), Ok(Received::NotOurs));
        }
        assert!(!allocation.is_gone() && allocation.refused.is_none());
        // The server's own answer still allocates.
        let answer = success(&request, |id| vec![Box::new(XorRelayedAddress::new(relayed, id)), Box::new(Lifetime::new(600))]);
        assert_eq!(allocation.received(&answer, local, now), Ok(Received::Handled));
        assert_eq!(allocation.poll(now + REQUEST_CADENCE * 3, &mut Vec::new()), Some(Step::Relayed(relayed)));
    }

    #[test]
    fn a_connection_closed_while_its_allocate_is_in_flight_releases_the_allocation_once_answered() {
        let (local, relayed): (SocketAddr, SocketAddr) = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:50000".parse().unwrap());
        let now = Instant::now();
        let (mut allocation, request) = challenged(local, now);
        allocation.release(now);
        assert!(!allocation.is_gone(), "kept to release what the server may allocate");
        let answer = success(&request, |id| vec![Box::new(XorRelayedAddress::new(relayed, id)), Box::new(Lifetime::new(1800))]);
        assert_eq!(allocation.received(&answer, local, now), Ok(Received::Handled));
        let mut out = Vec::new();
        assert_eq!(allocation.poll(now + REQUEST_CADENCE * 3, &mut out), None, "no relayed candidate once closed");
        assert_eq!(allocation.relayed(), None);
        assert_eq!(out.iter().map(|d| lifetime_of_refresh(d)).collect::<Vec<_>>(), [Some(0)], "the Refresh (LIFETIME 0) alone");
        assert_eq!(allocation.received(&success(&out[0], |_| Vec::new()), local, now), Ok(Received::Handled));
        assert_eq!(allocation.poll(now + REQUEST_CADENCE * 4, &mut Vec::new()), None);
        assert!(allocation.is_gone());
        // Closed before anything was sent: nothing to release, gone at once.
        let mut unsent = Allocation::new(&server(), local);
        unsent.release(now);
        assert!(unsent.is_gone());
    }

    #[test]
    fn the_release_is_sent_again_on_a_loss_and_a_438_and_only_it_goes_out() {
        let (local, relayed): (SocketAddr, SocketAddr) = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:50000".parse().unwrap());
        let now = Instant::now();
        let mut allocation = allocated(local, relayed, now);
        let mut at = now + REQUEST_CADENCE * 3;
        // Requests queued before the release (permissions) never go out.
        for i in 1..=5u8 {
            allocation.permit(IpAddr::from([127, 0, 2, i]), at);
        }
        allocation.release(at);
        let out = next_sent(&mut allocation, &mut at);
        assert_eq!(out.iter().map(|d| lifetime_of_refresh(d)).collect::<Vec<_>>(), [Some(0)]);
        let first = out[0].clone();
        // Lost: sent again (the same transaction).
        assert_eq!(next_sent(&mut allocation, &mut at), std::slice::from_ref(&first), "the same Refresh again");
        // 438 stale nonce: a new Refresh, still LIFETIME 0.
        assert_eq!(allocation.received(&error(&first, 438, "Stale Nonce", false), local, at), Ok(Received::Handled));
        let out = next_sent(&mut allocation, &mut at);
        assert_eq!(out.iter().map(|d| lifetime_of_refresh(d)).collect::<Vec<_>>(), [Some(0)]);
        assert_ne!(out[0], first);
        assert_eq!(allocation.received(&success(&out[0], |_| Vec::new()), local, at), Ok(Received::Handled));
        assert_eq!(allocation.poll(at + MIN_WAIT, &mut Vec::new()), None);
        assert!(allocation.is_gone());
    }

    #[test]
    fn a_refused_permission_frees_its_place_and_is_asked_again_at_most_permission_tries_times() {
        let (local, relayed): (SocketAddr, SocketAddr) = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:50000".parse().unwrap());
        let now = Instant::now();
        let mut allocation = allocated(local, relayed, now);
        let mut at = now + REQUEST_CADENCE * 3;
        // Junk peers take every place.
        let junk: Vec<IpAddr> = (1..=MAX_PERMISSIONS as u8).map(|i| IpAddr::from([127, 0, 3, i])).collect();
        let real = IpAddr::from([127, 0, 4, 1]);
        for &ip in &junk {
            allocation.permit(ip, at);
        }
        allocation.permit(real, at);
        assert!(!allocation.permitted.contains(&real), "no place left for the real peer");
        // The server refuses the first: its place is free again.
        let refuse = |allocation: &mut Allocation, at: &mut Instant, ip: IpAddr| loop {
            let out = next_sent(allocation, at);
            assert!(!out.is_empty(), "a CreatePermission for {ip}");
            let asked = out.iter().find(|d| {
                let m = Message::from_bytes(d).unwrap();
                m.has_method(CREATE_PERMISSION) && m.attribute::<XorPeerAddress>().unwrap().addr(m.transaction_id()).ip() == ip
            });
            if let Some(request) = asked {
                assert_eq!(allocation.received(&error(request, 403, "Forbidden", true), local, *at), Ok(Received::Handled));
                allocation.poll(*at, &mut Vec::new());
                return;
            }
        };
        refuse(&mut allocation, &mut at, junk[0]);
        assert!(!allocation.permitted.contains(&junk[0]));
        allocation.permit(real, at);
        assert!(allocation.permitted.contains(&real), "the real peer's permission is asked for");
        // One peer refused PERMISSION_TRIES times is not asked again.
        let mut allocation = allocated(local, relayed, now);
        let mut at = now + REQUEST_CADENCE * 3;
        for _ in 0..PERMISSION_TRIES {
            allocation.permit(junk[0], at);
            assert!(allocation.permitted.contains(&junk[0]), "asked again");
            refuse(&mut allocation, &mut at, junk[0]);
        }
        allocation.permit(junk[0], at);
        assert!(!allocation.permitted.contains(&junk[0]), "refused {PERMISSION_TRIES} times: not asked again");
    }

    #[test]
    fn an_ipv6_socket_allocates_an_ipv6_relayed_address_and_permits_ipv6_peers_only() {
        use turn_client_proto::types::attribute::RequestedAddressFamily;
        let local: SocketAddr = "[::1]:40000".parse().unwrap();
        let mut allocation = Allocation::new(&TurnServer { server: "[::1]:3478".parse().unwrap(), ..server() }, local);
        let first = sent(&mut allocation, Instant::now());
        let m = Message::from_bytes(&first[0]).unwrap();
        assert_eq!(m.attribute::<RequestedAddressFamily>().map(|f| f.family()).ok(), Some(AddressFamily::IPV6));
        allocation.permit(IpAddr::from([127, 0, 0, 1]), Instant::now());
        allocation.permit("::2".parse().unwrap(), Instant::now());
        assert_eq!(allocation.permitted, ["::2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn a_refusal_s_reason_phrase_is_escaped_and_cut() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let now = Instant::now();
        let (mut allocation, request) = challenged(local, now);
        let reason = format!("Forbidden\n2026-12-01 INFO forged line\u{202e}{}", "x".repeat(400));
        allocation.received(&error(&request, 403, &reason, true), local, now).unwrap();
        let Some(Step::Failed(why)) = allocation.poll(now + REQUEST_CADENCE * 2, &mut Vec::new()) else { panic!("given up") };
        let shown = why.split("refused the allocation: 403 ").nth(1).unwrap();
        assert!(shown.starts_with("Forbidden\\n2026") && shown.contains("\\u{202e}") && shown.ends_with('…'), "{shown}");
        assert!(!why.contains('\n') && shown.len() <= MAX_REASON_BYTES + '…'.len_utf8(), "{why}");
    }

    #[test]
    fn relayed_data_from_a_peer_without_a_permission_is_dropped() {
        let (local, relayed): (SocketAddr, SocketAddr) = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:50000".parse().unwrap());
        let now = Instant::now();
        let mut allocation = allocated(local, relayed, now);
        let stranger: SocketAddr = "127.0.0.7:41000".parse().unwrap();
        let indication = DelayedMessage::for_client(stranger, &b"in"[..]).build();
        assert!(!matches!(allocation.received(&indication, local, now), Ok(Received::Peer(..))));
    }

    #[test]
    fn an_unusable_relayed_address_gives_the_server_up() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let now = Instant::now();
        let (mut allocation, request) = challenged(local, now);
        let zero: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let answer = success(&request, |id| vec![Box::new(XorRelayedAddress::new(zero, id)), Box::new(Lifetime::new(600))]);
        assert_eq!(allocation.received(&answer, local, now), Ok(Received::Handled));
        let step = allocation.poll(now + REQUEST_CADENCE * 3, &mut Vec::new());
        assert_eq!(step, Some(Step::Failed("the TURN server 127.0.0.1:3478 refused the allocation: an unusable relayed address 0.0.0.0:0".into())));
        assert_eq!(allocation.relayed(), None);
    }

    #[test]
    fn an_allocation_permits_at_most_max_permissions_peers() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut allocation = Allocation::new(&server(), local);
        let now = Instant::now();
        for i in 0..40u8 {
            allocation.permit(IpAddr::from([127, 0, 1, i]), now);
            allocation.permit(IpAddr::from([127, 0, 1, i]), now);
        }
        assert_eq!(allocation.permitted.len(), MAX_PERMISSIONS);
        assert_eq!(allocation.permitted[MAX_PERMISSIONS - 1], IpAddr::from([127, 0, 1, MAX_PERMISSIONS as u8 - 1]));
        // Nothing to wrap before the allocation exists.
        assert_eq!(allocation.wrap("127.0.0.1:5000".parse().unwrap(), b"x", now), None);
    }

    #[test]
    fn an_allocate_is_sent_three_times_then_the_silent_server_is_given_up() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut allocation = Allocation::new(&server(), local);
        let start = Instant::now();
        let mut requests = Vec::new();
        let mut step = None;
        // Polled whenever it asks (each wait at least MIN_WAIT: no spin).
        for _ in 0..100 {
            let due = allocation.due.expect("a next poll while allocating");
            step = allocation.poll(due.max(start), &mut requests);
            if step.is_some() {
                break;
            }
        }
        assert_eq!(requests.len(), TRIES as usize, "{requests:?}");
        assert!(requests.iter().all(|r| *r == requests[0]), "one transaction, sent again");
        let why = format!("the TURN server 127.0.0.1:3478 gave no allocation (no answer to {TRIES} Allocate requests)");
        assert_eq!(step, Some(Step::Failed(why)));
        assert!(allocation.due.is_none() && allocation.is_gone());
    }
}
