//! Requests that came in through carriers (protostubs) and wait for a
//! response from here: the bus's record of them, so that a response leaves
//! through a carrier only when it answers one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::address::Address;
use crate::message::Message;

/// Requests that came in through protostubs and wait for a response from
/// here: a response leaves through a protostub only when it answers one of
/// them (from the address the request went to, before its sender stops
/// waiting). So a hyperty cannot push responses nobody asked for into a
/// queue that other domains share. Bounded per stub the requests came
/// through ([`InboundRequests::PER_STUB`]); each is kept as long as its
/// sender waits (the envelope's `timeout-ms`, at most
/// [`InboundRequests::MAX_WAIT`]).
#[derive(Default)]
pub(crate) struct InboundRequests {
    state: Mutex<InboundState>,
}

#[derive(Default)]
struct InboundState {
    /// (requester, id) → who may answer, until when, through which stub it came.
    by_key: HashMap<(Address, u64), Awaited>,
    per_stub: HashMap<String, usize>,
}

struct Awaited {
    responder: Address,
    until: std::time::Instant,
    stub: String,
    /// Provisional (1xx) responses that went out for it.
    provisional: u32,
}

impl InboundState {
    fn remove(&mut self, key: &(Address, u64)) -> Option<Awaited> {
        let awaited = self.by_key.remove(key)?;
        if let Some(n) = self.per_stub.get_mut(&awaited.stub) {
            *n -= 1;
        }
        Some(awaited)
    }
}

impl InboundRequests {
    /// Requests awaiting a response, per stub they came through.
    pub const PER_STUB: usize = 4096;
    /// The longest a request is kept (a longer `timeout-ms` is clamped).
    pub const MAX_WAIT: Duration = Duration::from_secs(300);

    /// Records `request`, which came through the stub of `stub` and whose
    /// sender waits `wait`; an error (the limit) when that stub has
    /// [`Self::PER_STUB`] requests waiting already.
    pub fn record(&self, request: &Message, stub: &str, wait: Duration) -> Result<(), usize> {
        let now = std::time::Instant::now();
        let mut s = self.state.lock().unwrap();
        if s.per_stub.get(stub).is_some_and(|n| *n >= Self::PER_STUB) {
            let InboundState { by_key, per_stub } = &mut *s;
            by_key.retain(|_, a| {
                let keep = a.until > now;
                if !keep && let Some(n) = per_stub.get_mut(&a.stub) {
                    *n -= 1;
                }
                keep
            });
            if s.per_stub.get(stub).is_some_and(|n| *n >= Self::PER_STUB) {
                return Err(Self::PER_STUB);
            }
        }
        let key = (request.from.clone(), request.id);
        s.remove(&key);
        let awaited = Awaited { responder: request.to.clone(), until: now + wait.min(Self::MAX_WAIT), stub: stub.to_owned(), provisional: 0 };
        s.by_key.insert(key, awaited);
        *s.per_stub.entry(stub.to_owned()).or_default() += 1;
        Ok(())
    }

    /// Takes the request `response` answers; false if there is none
    /// waiting (never asked, answered already, expired, or another address
    /// answering).
    /// A provisional (1xx) response leaves the request waiting; at most
    /// [`super::MAX_PROVISIONAL`] of them go out per request.
    pub fn take(&self, response: &Message) -> bool {
        if super::provisional(response) {
            let mut s = self.state.lock().unwrap();
            let key = (response.to.clone(), response.id);
            let Some(a) = s.by_key.get_mut(&key).filter(|a| a.responder == response.from && a.until > std::time::Instant::now()) else {
                return false;
            };
            a.provisional += 1;
            return a.provisional <= super::MAX_PROVISIONAL;
        }
        self.close(response)
    }

    /// Takes the request `response` answers, whatever its code (a refused
    /// response closes it too).
    pub fn close(&self, response: &Message) -> bool {
        let key = (response.to.clone(), response.id);
        let mut s = self.state.lock().unwrap();
        match s.by_key.get(&key) {
            Some(a) if a.responder == response.from => s.remove(&key).is_some_and(|a| a.until > std::time::Instant::now()),
            _ => false,
        }
    }

    /// Forgets `request` (it could not be delivered).
    pub fn forget(&self, request: &Message) {
        let key = (request.from.clone(), request.id);
        let mut s = self.state.lock().unwrap();
        if s.by_key.get(&key).is_some_and(|a| a.responder == request.to) {
            s.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageType, code};

    fn request(from: &str, id: u64, to: &str) -> Message {
        Message::new(id, MessageType::Read, Address::parse(from).unwrap(), Address::parse(to).unwrap(), None)
    }

    #[test]
    fn inbound_requests_are_answered_once_by_their_receiver_and_bounded_per_stub() {
        let inbound = InboundRequests::default();
        let wait = Duration::from_secs(60);
        let (asker, local) = ("hyperty://bob.example/asker", "hyperty://alice.example/a");
        inbound.record(&request(asker, 1, local), "bob.example", wait).unwrap();
        let answer = |from: &str, id: u64| Message::response(id, Address::parse(from).unwrap(), Address::parse(asker).unwrap(), code::OK);
        assert!(!inbound.take(&answer("hyperty://alice.example/other", 1)), "another address answered");
        assert!(!inbound.take(&answer(local, 2)), "a request never made");
        assert!(inbound.take(&answer(local, 1)));
        assert!(!inbound.take(&answer(local, 1)), "answered twice");
        // The bound is per stub; a full stub refuses, others do not care.
        for id in 0..InboundRequests::PER_STUB as u64 {
            inbound.record(&request(asker, id, local), "bob.example", wait).unwrap();
        }
        assert_eq!(inbound.record(&request(asker, 99_999, local), "bob.example", wait), Err(InboundRequests::PER_STUB));
        inbound.record(&request("hyperty://carol.example/c", 1, local), "carol.example", wait).unwrap();
        // Taking one makes room; expired ones make room too.
        assert!(inbound.take(&answer(local, 7)));
        inbound.record(&request(asker, 99_999, local), "bob.example", Duration::ZERO).unwrap();
        assert!(!inbound.take(&answer(local, 99_999)), "expired");
        inbound.record(&request(asker, 100_000, local), "bob.example", Duration::ZERO).unwrap();
        inbound.record(&request(asker, 100_001, local), "bob.example", wait).unwrap();
        assert!(inbound.take(&answer(local, 100_001)));
    }
}
