//! Received frames waiting in the hyperty's inbox: what a remote peer can
//! make the host hold for a hyperty that does not keep up.
//!
//! A `media` event (one received frame, base64) handed to the domain's
//! inbox is held there until the sandbox takes it. Per connection, at most
//! `pending-frames` such events and `pending-frame-bytes` of their JSON
//! wait at once, and their bytes are charged to the domain's
//! `total-memory-mb` (with its instances' memories and data objects) until
//! the sandbox takes them; a frame beyond any of the three is dropped and
//! counted in the track's `track-stats` (`dropped`). So a flood of frames
//! to a hyperty that does not read cannot fill its inbox: other messages
//! (its control events, requests from other hyperties) still find room.
//!
//! The sandbox tells which messages it took ([`InboxFrames::taken`],
//! before it hands one to the hyperty). A connection's events enter the
//! inbox in the order of their ids, so a message taken releases every
//! frame of that connection sent up to its id (one the bus accepted
//! without queueing it, e.g. for an instance that has stopped, is
//! released then, or when the connection's task ends).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use crate::address::Address;
use crate::message::Message;
use crate::sandbox::limits::DomainMemory;

/// Why a frame could not wait in the inbox (it is dropped and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// `pending-frames` of this connection are waiting already.
    Frames,
    /// Its bytes would pass `pending-frame-bytes`.
    Bytes,
    /// Its bytes would pass the domain's `total-memory-mb`.
    Memory,
}

/// The frames of one domain's connections waiting in its inbox.
pub(super) struct InboxFrames {
    memory: Arc<DomainMemory>,
    /// The domain's `total-memory-mb`, in bytes.
    total: usize,
    waiting: Mutex<HashMap<Address, Waiting>>,
}

/// One connection's frames in the inbox: (message id, bytes charged), in
/// the order they were sent.
#[derive(Default)]
struct Waiting {
    frames: VecDeque<(u64, usize)>,
    bytes: usize,
}

impl InboxFrames {
    /// `total`: the domain's `total-memory-mb` in bytes, shared with
    /// `memory`'s other users.
    pub fn new(memory: Arc<DomainMemory>, total: usize) -> InboxFrames {
        InboxFrames { memory, total, waiting: Mutex::default() }
    }

    /// Takes room for the frame event `id` (its value `bytes` long) of
    /// `conn`, before it is sent: at most `frames` and `max_bytes` waiting
    /// for the connection, charged to the domain's memory.
    pub fn reserve(&self, conn: &Address, id: u64, bytes: usize, frames: u32, max_bytes: u32) -> Result<(), Full> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let w = waiting.entry(conn.clone()).or_default();
        if w.frames.len() >= frames as usize {
            return Err(Full::Frames);
        }
        if w.bytes + bytes > max_bytes as usize {
            return Err(Full::Bytes);
        }
        if !self.memory.charge(bytes, self.total) {
            return Err(Full::Memory);
        }
        w.frames.push_back((id, bytes));
        w.bytes += bytes;
        Ok(())
    }

    /// Gives back the room of frame `id` of `conn`, which the bus did not
    /// take after all.
    pub fn unreserve(&self, conn: &Address, id: u64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = waiting.get_mut(conn)
            && let Some(at) = w.frames.iter().position(|(i, _)| *i == id)
        {
            let (_, bytes) = w.frames.remove(at).expect("found");
            w.bytes -= bytes;
            self.memory.release(bytes);
        }
    }

    /// The sandbox took `message` from the inbox: if it is an event of a
    /// connection, that connection's frames up to it no longer wait.
    pub fn taken(&self, message: &Message) {
        if message.from.scheme() != "media" {
            return;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(w) = waiting.get_mut(&message.from) else { return };
        while let Some(&(id, bytes)) = w.frames.front()
            && id <= message.id
        {
            w.frames.pop_front();
            w.bytes -= bytes;
            self.memory.release(bytes);
        }
        if w.frames.is_empty() {
            waiting.remove(&message.from);
        }
    }

    /// The connection's task ended: its frames are no longer charged (a
    /// closed connection sends no more, so what it left in the inbox is
    /// bounded by the inbox alone).
    pub fn forget(&self, conn: &Address) {
        let removed = self.waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(conn);
        if let Some(w) = removed {
            self.memory.release(w.bytes);
        }
    }

    /// Frame events waiting in the inbox, all connections together, and
    /// their bytes.
    #[cfg(test)]
    pub fn waiting(&self) -> (usize, usize) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.values().fold((0, 0), |(n, b), w| (n + w.frames.len(), b + w.bytes))
    }
}

impl Drop for InboxFrames {
    fn drop(&mut self) {
        let waiting = self.waiting.get_mut().unwrap_or_else(PoisonError::into_inner);
        for w in waiting.values() {
            self.memory.release(w.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    fn event(from: &Address, id: u64) -> Message {
        Message::new(id, MessageType::Update, from.clone(), Address::parse("hyperty://a.example/x").unwrap(), None)
    }

    #[test]
    fn frames_are_capped_by_count_bytes_and_memory_and_released_when_taken() {
        let memory = Arc::new(DomainMemory::default());
        let frames = InboxFrames::new(memory.clone(), 1000);
        let conn = Address::parse("media://a.example/1").unwrap();
        assert_eq!(frames.reserve(&conn, 1, 100, 2, 250), Ok(()));
        assert_eq!(frames.reserve(&conn, 2, 200, 2, 250), Err(Full::Bytes));
        assert_eq!(frames.reserve(&conn, 3, 100, 2, 250), Ok(()));
        assert_eq!(frames.reserve(&conn, 4, 10, 2, 250), Err(Full::Frames));
        assert_eq!((frames.waiting(), memory.used()), ((2, 200), 200));
        // Taking a later event (a control event) releases the frames before it.
        frames.taken(&event(&conn, 3));
        assert_eq!((frames.waiting(), memory.used()), ((0, 0), 0));
        // The domain's memory bounds them too.
        assert_eq!(frames.reserve(&conn, 5, 900, 10, 10_000), Ok(()));
        assert_eq!(frames.reserve(&conn, 6, 200, 10, 10_000), Err(Full::Memory));
        frames.unreserve(&conn, 5);
        assert_eq!(memory.used(), 0);
        assert_eq!(frames.reserve(&conn, 7, 300, 10, 10_000), Ok(()));
        frames.forget(&conn);
        assert_eq!((frames.waiting(), memory.used()), ((0, 0), 0));
        assert_eq!(frames.reserve(&conn, 8, 300, 10, 10_000), Ok(()));
        drop(frames);
        assert_eq!(memory.used(), 0);
    }
}
