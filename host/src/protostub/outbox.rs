//! What a durable protostub (`durable = true` on its bundle entry) keeps in
//! the runtime's database (`<data dir>/runtime.redb`, [`crate::store`]),
//! so that nothing is lost or doubled when the runtime process dies:
//!
//! - **the outbox**: every envelope queued for the domain, written (and
//!   synced) before the sender's call returns, removed once the stub says
//!   the far end took it (`delivered`, after JetStream's PubAck) or refused
//!   it for good. A restarted runtime queues again what is left, in order,
//!   under the same origin and sequence numbers, so JetStream's
//!   `Nats-Msg-Id` and the receiving host's dedup recognise a resend;
//! - **the next sequence number** of the domain's queue, so that a number
//!   is never given twice (a reused one would be taken for a duplicate);
//! - **the envelopes taken from the domain's node** (origin, sequence
//!   number), the last [`SEEN_WINDOW`] of them, so the receiving side drops
//!   a redelivery across its own restarts.
//!
//! Removals are not synced on their own (a crash may undo the last ones:
//! those messages are sent again and dropped as duplicates on the far
//! side); the next synced write carries them.

use std::sync::Arc;

use anyhow::Result;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::store::Store;

/// (stub domain, sequence number) → envelope.
const OUTBOX: TableDefinition<(&str, u64), &str> = TableDefinition::new("outbox");
/// Stub domain → the last sequence number given.
const LAST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("outbox-last-seq");
/// (stub domain, n) → (origin, sequence number) of the n-th envelope taken.
const SEEN: TableDefinition<(&str, u64), (&str, u64)> = TableDefinition::new("inbound-seen");

/// Envelopes taken from a domain's node whose ids are kept for dedup.
pub(crate) const SEEN_WINDOW: u64 = 65_536;

/// A durable stub's share of the runtime's database.
pub(crate) struct Outbox {
    store: Arc<Store>,
    domain: String,
}

/// What a durable stub finds at its start.
pub(crate) struct Kept {
    /// Envelopes not acknowledged, by sequence number.
    pub envelopes: Vec<(u64, String)>,
    /// The last sequence number given.
    pub last_seq: u64,
    /// Envelopes taken, oldest first (origin, sequence number), and how
    /// many were taken in all.
    pub seen: Vec<(String, u64)>,
    pub seen_count: u64,
}

impl Outbox {
    /// The outbox of the stub for `domain`, and what it kept.
    pub fn open(store: Arc<Store>, domain: &str) -> Result<(Outbox, Kept)> {
        let read = store.database().begin_read()?;
        let mut kept = Kept { envelopes: Vec::new(), last_seq: 0, seen: Vec::new(), seen_count: 0 };
        if let Ok(table) = read.open_table(OUTBOX) {
            for entry in table.range((domain, 0)..=(domain, u64::MAX))? {
                let (key, envelope) = entry?;
                kept.envelopes.push((key.value().1, envelope.value().to_owned()));
            }
        }
        if let Ok(table) = read.open_table(LAST_SEQ)
            && let Some(last) = table.get(domain)?
        {
            kept.last_seq = last.value();
        }
        kept.last_seq = kept.last_seq.max(kept.envelopes.last().map_or(0, |(seq, _)| *seq));
        if let Ok(table) = read.open_table(SEEN) {
            for entry in table.range((domain, 0)..=(domain, u64::MAX))? {
                let (key, value) = entry?;
                let (origin, seq) = value.value();
                kept.seen.push((origin.to_owned(), seq));
                kept.seen_count = key.value().1 + 1;
            }
        }
        drop(read);
        Ok((Outbox { store, domain: domain.to_owned() }, kept))
    }

    /// Writes envelope `seq` and syncs it to disk.
    pub fn put(&self, seq: u64, envelope: &str) -> Result<()> {
        let write = self.store.database().begin_write()?;
        {
            write.open_table(OUTBOX)?.insert((self.domain.as_str(), seq), envelope)?;
            let mut last = write.open_table(LAST_SEQ)?;
            let before = last.get(self.domain.as_str())?.map_or(0, |v| v.value());
            last.insert(self.domain.as_str(), before.max(seq))?;
        }
        write.commit()?;
        Ok(())
    }

    /// Removes envelope `seq`, synced only when `sync` (the queue is empty
    /// now): a removal not synced is undone by a crash, and the envelope
    /// sent again (the receiver's kept ids drop it), so syncing when the
    /// queue empties bounds what an idle sender resends after a crash.
    pub fn remove(&self, seq: u64, sync: bool) -> Result<()> {
        let mut write = self.store.database().begin_write()?;
        if !sync {
            write.set_durability(Durability::None).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        write.open_table(OUTBOX)?.remove((self.domain.as_str(), seq))?;
        write.commit()?;
        Ok(())
    }

    /// Records the `n`-th envelope taken from the node, `(origin, seq)`,
    /// synced, and forgets the one [`SEEN_WINDOW`] before it.
    pub fn seen(&self, n: u64, origin: &str, seq: u64) -> Result<()> {
        let write = self.store.database().begin_write()?;
        {
            let mut table = write.open_table(SEEN)?;
            table.insert((self.domain.as_str(), n), (origin, seq))?;
            if let Some(old) = n.checked_sub(SEEN_WINDOW) {
                table.remove((self.domain.as_str(), old))?;
            }
        }
        write.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(store: &Arc<Store>, domain: &str) -> (Outbox, Kept) {
        Outbox::open(store.clone(), domain).unwrap()
    }

    #[test]
    fn what_is_kept_is_what_was_not_removed_and_sequence_numbers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (outbox, kept) = open(&store, "b.example");
        assert_eq!((kept.envelopes.len(), kept.last_seq), (0, 0));
        outbox.put(1, "one").unwrap();
        outbox.put(2, "two").unwrap();
        outbox.put(3, "three").unwrap();
        outbox.remove(2, false).unwrap();
        let (other, _) = open(&store, "c.example");
        other.put(7, "another domain's").unwrap();
        let (outbox, kept) = open(&store, "b.example");
        assert_eq!(kept.envelopes, vec![(1, "one".to_owned()), (3, "three".to_owned())]);
        outbox.remove(1, false).unwrap();
        outbox.remove(3, true).unwrap();
        // Emptied, it still knows the last number it gave.
        let (_, kept) = open(&store, "b.example");
        assert_eq!((kept.envelopes.len(), kept.last_seq), (0, 3));
    }

    #[test]
    fn the_ids_taken_are_kept_for_the_last_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (outbox, _) = open(&store, "b.example");
        for n in 0..3 {
            outbox.seen(n, "origin", 10 + n).unwrap();
        }
        // The (window + 1)-th forgets the one a window before it.
        outbox.seen(SEEN_WINDOW + 1, "origin", 99).unwrap();
        let (_, kept) = open(&store, "b.example");
        assert_eq!(kept.seen, vec![("origin".to_owned(), 10), ("origin".to_owned(), 12), ("origin".to_owned(), 99)]);
        assert_eq!(kept.seen_count, SEEN_WINDOW + 2);
    }
}
