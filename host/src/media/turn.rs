//! Relayed candidates (RFC 8445 §5.1.1.2): each connection's socket
//! allocates a relayed address on the TURN servers of its domain's `turn`
//! setting (RFC 8656, host configuration, never a guest's), with the
//! long-term credentials given there (RFC 8489 §9.2: 401 → REALM and
//! NONCE → MESSAGE-INTEGRITY; 438 stale nonce → the new nonce). The
//! XOR-RELAYED-ADDRESS becomes a local `relay` candidate of the
//! connection. What str0m sends from that address goes to the server
//! wrapped (a Send indication, or ChannelData once a channel is bound);
//! what the server relays from a peer (Data indication, ChannelData) is
//! unwrapped and given to str0m as received on the relayed address.
//!
//! The protocol is `turn-client-proto`'s (sans-IO, by the author of
//! `stun-types`): it refreshes the allocation before its LIFETIME ends and
//! the permissions and channels before theirs; the connection's task only
//! moves its datagrams and joins its next timeout to its own wait.
//!
//! Bounds: one allocation per server per connection; at most
//! [`MAX_PERMISSIONS`] peer addresses (permissions, and as many channels)
//! per allocation, each within the domain's `peers`; each request sent at
//! most [`TRIES`] times (then the server is given up on, logged); a server
//! that refuses (a second 401: the credentials are wrong; 403, 437, 486
//! allocation quota, ...) is given up on with the code it answered. A
//! closed connection's allocation is released (Refresh, LIFETIME 0).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use stun_types::attribute::ErrorCode;
use stun_types::message::{Message, MessageClass, TransactionId};
use turn_client_proto::api::{Transmit, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

use super::settings::TurnServer;

/// Peer addresses one allocation holds permissions (and channels) for.
pub const MAX_PERMISSIONS: usize = 16;
/// Times a request (Allocate, CreatePermission, ...) is sent before the
/// server is given up on, [`RTO`] apart at first (then doubling), as STUN's.
pub const TRIES: u32 = super::stun::TRIES;
/// The first wait between two sends of a request (RFC 8489 §6.2.1).
pub const RTO: Duration = super::stun::RTO;
/// The shortest wait between two polls of a client with nothing to do.
const MIN_WAIT: Duration = Duration::from_millis(5);
/// Rounds of one poll (each takes the client's events and datagrams).
const MAX_ROUNDS: usize = 16;
/// `turn-client-proto` spaces two requests by 50 ms.
const REQUEST_CADENCE: Duration = Duration::from_millis(50);

/// The allocation of one connection on one TURN server.
pub(super) struct Allocation {
    pub server: SocketAddr,
    /// `None` once given up on (or released).
    client: Option<TurnClientUdp>,
    /// The zero of the client's clock.
    base: Instant,
    relayed: Option<SocketAddr>,
    /// Allocate transactions the server answered 401: the first is the
    /// challenge (REALM, NONCE), a second the credentials refused.
    unauthorized: Vec<TransactionId>,
    /// The last error the server answered an Allocate with (`403
    /// Forbidden`).
    refused: Option<String>,
    /// Peer IPs a permission was asked for (or waits for the allocation).
    permitted: Vec<IpAddr>,
    /// Peers a channel was asked for.
    channels: Vec<SocketAddr>,
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
    /// Not for this allocation (e.g. a STUN Binding response).
    NotOurs,
    /// A response the allocation consumed.
    Handled,
    /// Data relayed from `peer`, unwrapped.
    Peer(SocketAddr, Vec<u8>),
}

impl Allocation {
    /// Starts allocating on `server` from the socket at `local`.
    pub fn new(server: &TurnServer, local: SocketAddr) -> Allocation {
        let mut config = TurnConfig::new(TurnCredentials::new(&server.username, &server.credential));
        config.set_request_retransmits(RTO, RTO * 4, TRIES, RTO * 2);
        let client = TurnClientUdp::allocate(local, server.server, config);
        Allocation {
            server: server.server,
            client: Some(client),
            base: Instant::now(),
            relayed: None,
            unauthorized: Vec::new(),
            refused: None,
            permitted: Vec::new(),
            channels: Vec::new(),
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

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed.filter(|_| self.client.is_some())
    }

    /// Drives the client at `now`: the datagrams to send to the server go
    /// into `out`; what happened (allocated, given up on), if anything.
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
                        step = Some(Step::Relayed(relayed));
                    }
                    TurnEvent::AllocationCreateFailed(_) => closed = true,
                    // Not asked again (bounded): that peer is not reached through this relay.
                    TurnEvent::PermissionCreateFailed(_, ip) => {
                        tracing::debug!(server = %self.server, "the TURN server refused (or did not renew) a permission for {ip}");
                    }
                    _ => {}
                }
            }
            while let Some(transmit) = client.poll_transmit(at) {
                progressed = true;
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
            return Some(self.give_up());
        }
        step
    }

    /// Gives the server up (why, once).
    fn give_up(&mut self) -> Step {
        self.client = None;
        self.due = None;
        let why = match (&self.relayed, &self.refused) {
            (None, Some(code)) => format!("the TURN server {} refused the allocation: {code}", self.server),
            (None, None) => format!("the TURN server {} gave no allocation (no answer to {TRIES} Allocate requests)", self.server),
            (Some(relayed), _) => format!("the TURN server {} dropped the allocation {relayed} (a refresh failed)", self.server),
        };
        Step::Failed(why)
    }

    /// Reads `data`, received from the server on the socket at `local`;
    /// `Err` gives the server up (why).
    pub fn received(&mut self, data: &[u8], local: SocketAddr, now: Instant) -> Result<Received, Step> {
        let at = self.at(now);
        if self.relayed.is_none() {
            self.note_refusal(data)?;
        }
        let Some(client) = self.client.as_mut() else { return Ok(Received::NotOurs) };
        let answer = match client.recv(Transmit::new(data, TransportType::Udp, self.server, local), at) {
            TurnRecvRet::Ignored(_) => Received::NotOurs,
            TurnRecvRet::Handled | TurnRecvRet::PeerIcmp { .. } => Received::Handled,
            TurnRecvRet::PeerData(peer) => Received::Peer(peer.peer, peer.data().to_vec()),
        };
        if answer == Received::Handled {
            self.due = Some(now);
        }
        Ok(answer)
    }

    /// Keeps the error code of an Allocate error response; a second 401
    /// (another transaction: the authenticated request) gives up.
    fn note_refusal(&mut self, data: &[u8]) -> Result<(), Step> {
        let Ok(m) = Message::from_bytes(data) else { return Ok(()) };
        if !m.has_class(MessageClass::Error) || !m.has_method(turn_client_proto::types::message::ALLOCATE) {
            return Ok(());
        }
        let Ok(code) = m.attribute::<ErrorCode>() else { return Ok(()) };
        self.refused = Some(format!("{} {}", code.code(), code.reason()));
        if code.code() == ErrorCode::UNAUTHORIZED && !self.unauthorized.contains(&m.transaction_id()) {
            self.unauthorized.push(m.transaction_id());
            if self.unauthorized.len() > 1 {
                self.refused = Some(format!("{} {} twice: the username or credential is wrong", code.code(), code.reason()));
                return Err(self.give_up());
            }
        }
        Ok(())
    }

    /// Asks for a permission for `ip` (within the domain's `peers`: the
    /// caller's check), now or once allocated; at most [`MAX_PERMISSIONS`].
    pub fn permit(&mut self, ip: IpAddr, now: Instant) {
        if self.client.is_none() || self.permitted.contains(&ip) || self.permitted.len() >= MAX_PERMISSIONS {
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
        self.relayed?;
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

    /// Releases the allocation (a Refresh with LIFETIME 0, RFC 8656 §7):
    /// the datagram to send, if there is one.
    pub fn release(&mut self, now: Instant) -> Option<Vec<u8>> {
        let at = self.at(now);
        let mut client = self.client.take()?;
        self.relayed?;
        client.delete(at).ok()?;
        // The Refresh, past the client's spacing of requests and whatever
        // requests wait before it (a channel bind...), which are dropped.
        (1..=MAX_ROUNDS as u32)
            .filter_map(|k| client.poll_transmit(at + REQUEST_CADENCE * k))
            .map(|t| t.data.to_vec())
            .find(|d| Message::from_bytes(d).is_ok_and(|m| m.has_method(turn_client_proto::types::message::REFRESH)))
    }
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
        let release = allocation.release(later).expect("a Refresh");
        let m = Message::from_bytes(&release).unwrap();
        assert!(m.has_method(REFRESH));
        assert_eq!(m.attribute::<Lifetime>().unwrap().seconds(), 0);
        assert!(allocation.is_gone() && allocation.relayed().is_none());
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
