//! Server-reflexive candidates (RFC 8445 §5.1.1.1): each connection's
//! socket asks the STUN servers of its domain's `stun` setting (host
//! configuration, never a guest's) for its address as they see it, with an
//! RFC 8489 Binding request, and the address they answer becomes a local
//! `srflx` candidate of the connection.
//!
//! Bounds: one request in flight per server, sent at most [`TRIES`] times
//! [`RTO`] apart (then the server is given up on, logged), a response
//! read only from the server's address with the request's transaction id,
//! and at most [`MAX_DATAGRAM`](super::MAX_DATAGRAM) bytes long (what the
//! connection's task reads). Messages are written and read with the
//! `stun-types` crate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_types::attribute::XorMappedAddress;
use stun_types::message::{BINDING, Message, MessageClass, MessageType, MessageWrite, MessageWriteExt, MessageWriteVec, TransactionId};

/// Times a Binding request is sent before its server is given up on.
pub const TRIES: u32 = 3;
/// Between two sends of a Binding request (RFC 8489 §6.2.1's initial RTO,
/// kept fixed: a loopback or LAN server answers within it).
pub const RTO: Duration = Duration::from_millis(500);

/// The Binding transaction with one STUN server.
pub(super) struct Binding {
    pub server: SocketAddr,
    id: TransactionId,
    request: Vec<u8>,
    sent: u32,
    /// When to send again (or give up), while unanswered.
    pub due: Option<Instant>,
}

/// What a datagram from a server was to its [`Binding`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// Not a Binding response to this transaction: ignored.
    NotOurs,
    /// The server's view of the socket's address.
    Mapped(SocketAddr),
    /// An error response, or a success response without an address.
    Refused(String),
}

impl Binding {
    pub fn new(server: SocketAddr) -> Binding {
        let id = TransactionId::generate();
        let mut write = Message::builder(MessageType::from_class_method(MessageClass::Request, BINDING), id, MessageWriteVec::new());
        // A FINGERPRINT (RFC 8489 §14.7) tells it from the connection's other traffic.
        let _ = write.add_fingerprint();
        Binding { server, id, request: write.finish(), sent: 0, due: Some(Instant::now()) }
    }

    /// The request to send now, if it is due and tries are left; `Err`
    /// once the server is given up on (the reason, once).
    pub fn poll(&mut self, now: Instant) -> Result<Option<&[u8]>, String> {
        match self.due {
            Some(due) if due <= now && self.sent < TRIES => {
                self.sent += 1;
                self.due = Some(now + RTO);
                Ok(Some(&self.request))
            }
            Some(due) if due <= now => {
                self.due = None;
                Err(format!("the STUN server {} gave no answer to {TRIES} Binding requests", self.server))
            }
            _ => Ok(None),
        }
    }

    /// Reads `data`, received from the server.
    pub fn answer(&mut self, data: &[u8]) -> Answer {
        let Ok(m) = Message::from_bytes(data) else { return Answer::NotOurs };
        if self.due.is_none() || !m.has_method(BINDING) || m.transaction_id() != self.id || !m.is_response() {
            return Answer::NotOurs;
        }
        self.due = None;
        if m.has_class(MessageClass::Error) {
            return Answer::Refused(format!("the STUN server {} refused the Binding request", self.server));
        }
        // RFC 8489 §14.2: servers answer XOR-MAPPED-ADDRESS (the RFC 3489
        // MAPPED-ADDRESS alone is not read).
        match m.attribute::<XorMappedAddress>().map(|a| a.addr(self.id)) {
            // An address no peer could send to is not a candidate (the
            // server is host configuration, but the answer crossed a network).
            Ok(addr) if !usable(addr) => Answer::Refused(format!("the STUN server {} answered an address no peer can reach ({addr})", self.server)),
            Ok(addr) => Answer::Mapped(addr),
            Err(_) => Answer::Refused(format!("the STUN server {} answered without an address", self.server)),
        }
    }
}

/// Whether a peer could send to `addr`: a unicast address and a port.
pub(super) fn usable(addr: SocketAddr) -> bool {
    let ip = addr.ip();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    addr.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && !broadcast
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(request: &[u8], addr: SocketAddr) -> Vec<u8> {
        let request = Message::from_bytes(request).unwrap();
        let mut write = Message::builder_success(&request, MessageWriteVec::new());
        write.add_attribute(&XorMappedAddress::new(addr, request.transaction_id())).unwrap();
        write.finish()
    }

    #[test]
    fn a_binding_is_retried_then_given_up_and_only_its_own_response_counts() {
        let server: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let mut b = Binding::new(server);
        let now = Instant::now();
        let request = b.poll(now).unwrap().unwrap().to_vec();
        assert_eq!(b.poll(now), Ok(None), "not due again before the RTO");
        // Another transaction's response, or garbage, is not ours.
        let other = Binding::new(server);
        let mapped: SocketAddr = "203.0.113.7:40001".parse().unwrap();
        assert_eq!(b.answer(&response(&other.request, mapped)), Answer::NotOurs);
        assert_eq!(b.answer(b"not stun"), Answer::NotOurs);
        assert_eq!(b.answer(&response(&request, mapped)), Answer::Mapped(mapped));
        assert_eq!(b.answer(&response(&request, mapped)), Answer::NotOurs, "answered once");
        // An address no peer can reach is refused, naming it.
        for unusable in ["0.0.0.0:40001", "224.0.0.1:40001", "255.255.255.255:40001", "203.0.113.7:0", "[::]:40001"] {
            let mut b = Binding::new(server);
            let request = b.poll(Instant::now()).unwrap().unwrap().to_vec();
            let addr: SocketAddr = unusable.parse().unwrap();
            let why = format!("the STUN server 127.0.0.1:3478 answered an address no peer can reach ({addr})");
            assert_eq!(b.answer(&response(&request, addr)), Answer::Refused(why));
        }
        // Unanswered: TRIES sends, then given up.
        let mut b = Binding::new(server);
        let now = Instant::now();
        for i in 0..TRIES {
            assert!(b.poll(now + RTO * i).unwrap().is_some());
        }
        let e = b.poll(now + RTO * TRIES).unwrap_err();
        assert_eq!(e, "the STUN server 127.0.0.1:3478 gave no answer to 3 Binding requests");
        assert_eq!(b.poll(now + RTO * 10), Ok(None));
    }
}
