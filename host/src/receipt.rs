//! Handled receipts: how a durable protostub learns that a message it
//! posted was handled — its hyperty's `handle` returned, or the host
//! answered it in the hyperty's place — so that it acknowledges the message
//! to its node only then (issue 19: exactly once to the hyperty across a
//! crash of the receiving runtime; a message still in a hyperty's inbox
//! when the process dies is not acknowledged, so the node delivers it again).
//!
//! The bus knows nothing of receipts. The stub offers one for the length of
//! its `Bus::send_inbound` call ([`offer`]), on its own thread; the
//! hyperty's route takes it ([`take`]) when the message it is given is the
//! one offered (same id, sender and destination: a data object's fan-out
//! on the same thread does not take it), and the sandbox fires it
//! ([`Receipt::done`]) once the message was handled or answered. A receipt
//! not taken means the message went to an endpoint or a data object, or
//! the bus answered it itself: handled when the call returns. A receipt
//! dropped unfired means the message was dropped unhandled (its runtime is
//! stopping): the stub must not acknowledge it.

use std::cell::RefCell;

use crate::message::Message;

/// The promise to say when one message was handled (see the module doc).
pub(crate) struct Receipt {
    id: u64,
    from: String,
    to: String,
    tx: flume::Sender<()>,
}

/// The stub's side of a [`Receipt`]: `try_recv` gives `Ok(())` once the
/// message was handled, `Disconnected` if it was dropped unhandled.
pub(crate) type Handled = flume::Receiver<()>;

impl Receipt {
    /// A receipt for `message`, and where its firing is seen.
    pub fn new(message: &Message) -> (Receipt, Handled) {
        let (tx, rx) = flume::bounded(1);
        (Receipt { id: message.id, from: message.from.to_string(), to: message.to.to_string(), tx }, rx)
    }

    /// The message was handled (or answered in its hyperty's place).
    pub fn done(self) {
        let _ = self.tx.try_send(());
    }

    fn is_for(&self, message: &Message) -> bool {
        self.id == message.id && message.from.as_str() == self.from && message.to.as_str() == self.to
    }
}

thread_local! {
    static OFFERED: RefCell<Option<Receipt>> = const { RefCell::new(None) };
}

/// Runs `send` with `receipt` on offer to the route its message reaches;
/// whether a route took it.
pub(crate) fn offer<R>(receipt: Receipt, send: impl FnOnce() -> R) -> (R, bool) {
    OFFERED.with(|o| *o.borrow_mut() = Some(receipt));
    let result = send();
    let left = OFFERED.with(|o| o.borrow_mut().take());
    (result, left.is_none())
}

/// The receipt on offer for `message`, if any (for a route that fires it
/// once `message` is handled).
pub(crate) fn take(message: &Message) -> Option<Receipt> {
    OFFERED.with(|o| {
        let mut o = o.borrow_mut();
        if o.as_ref().is_some_and(|r| r.is_for(message)) { o.take() } else { None }
    })
}

/// Fires its receipt when dropped — on every way out of a delivery —
/// unless [`kept`](OnReturn::kept) for later.
pub(crate) struct OnReturn(pub Option<Receipt>);

impl OnReturn {
    /// The receipt, to fire later (a message put aside, not yet handled).
    pub fn kept(&mut self) -> Option<Receipt> {
        self.0.take()
    }
}

impl Drop for OnReturn {
    fn drop(&mut self) {
        if let Some(receipt) = self.0.take() {
            receipt.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    fn message(id: u64) -> Message {
        Message::builder(id, MessageType::Create, "hyperty://a.example/x", "hyperty://b.example/y").build().unwrap()
    }

    #[test]
    fn a_receipt_is_taken_only_for_its_own_message_and_says_handled_or_dropped() {
        let (m, other) = (message(1), message(2));
        let (receipt, handled) = Receipt::new(&m);
        let ((), taken) = offer(receipt, || assert!(take(&other).is_none(), "another message's route takes nothing"));
        assert!(!taken);
        let (receipt, handled_too) = Receipt::new(&m);
        let (r, taken) = offer(receipt, || take(&m));
        assert!(taken && take(&m).is_none(), "taken once");
        drop(OnReturn(r));
        assert_eq!(handled_too.try_recv(), Ok(()));
        // Dropped unfired: the message was dropped unhandled.
        assert_eq!(handled.try_recv(), Err(flume::TryRecvError::Disconnected));
        let (receipt, kept) = Receipt::new(&m);
        let mut guard = OnReturn(Some(receipt));
        let later = guard.kept();
        drop(guard);
        assert_eq!(kept.try_recv(), Err(flume::TryRecvError::Empty), "kept for later: not fired on return");
        drop(later);
        assert_eq!(kept.try_recv(), Err(flume::TryRecvError::Disconnected));
    }
}
