//! Policy decisions kept beside a route (issue 17): what the three
//! enforcement points said about a message to it, and the counter of its
//! sender's domain and type, for the next message with the same inputs
//! under the same version of the policies.
//!
//! A kept decision is used only while the decision point reports the
//! version it was made under ([`PolicyDecisionPoint::version`]: a reload,
//! a group change and a time boundary are new versions; a point that
//! reports none keeps nothing), and only for a message equal in every
//! input a decision is made from: `from`, `to` (a child address comes to
//! its object's route), the type, `body.resource`, the established
//! identity and the sender's descriptor. The points and their domains
//! follow from `from` and `to`, and the receiver's descriptor from the
//! route (a route whose destination changes is a new route). So a message
//! is decided exactly as the decision point would decide it, without
//! asking it: no hashing of the message, no lock shared by every route.
//!
//! Bounds: [`WAYS`] entries a route, replaced in turn; what one holds is
//! the message's addresses, resource and identity (each within the bus's
//! message size limit).

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

use crate::address::Address;
use crate::message::{Identity, Message, MessageType};
use crate::metrics::Metrics;
use crate::policy::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint, Version};

/// The decisions a route keeps: the senders of a hot path are few.
pub(super) const WAYS: usize = 4;

/// A path's result: the first point that denied, and its decision.
pub(super) type PathResult = Result<(), (usize, Decision)>;

/// The decisions kept beside one route.
#[derive(Default)]
pub(super) struct Decisions {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    entries: Vec<Entry>,
    /// The entry replaced next once all [`WAYS`] are taken.
    next: usize,
}

/// One decision and what it was made for.
struct Entry {
    version: Version,
    /// [`Metrics::version`] when `counter` was resolved.
    metrics: u64,
    from: Address,
    to: Address,
    kind: MessageType,
    resource: Option<Box<str>>,
    identity: Option<Identity>,
    sender: Option<Descriptor>,
    result: PathResult,
    /// Messages of `kind` sent by `from`'s domain.
    counter: Counter,
}

impl Entry {
    fn is_for(&self, version: Version, metrics: u64, m: &Message, sender: Option<&Descriptor>) -> bool {
        self.version == version
            && self.metrics == metrics
            && self.kind == m.kind
            && self.from == m.from
            && self.to == m.to
            && self.resource.as_deref() == m.body.resource.as_deref()
            && self.identity.as_ref() == m.identity.as_ref()
            && self.sender.as_ref() == sender
    }
}

impl Decisions {
    /// The decision about `message` at `points` (whose domains are those
    /// of its `from`, the runtime and its `to`), and the counter of
    /// messages of its type from its sender's domain: kept ones when they
    /// were made for the same inputs under the policies' current version,
    /// else asked of `policy` (and kept when its version did not change
    /// meanwhile).
    pub fn decide(
        &self,
        policy: &dyn PolicyDecisionPoint,
        metrics: &Metrics,
        points: &[(EnforcementPoint, &str); 3],
        message: &Message,
        parties: Parties<'_>,
    ) -> (PathResult, Counter) {
        let Some(version) = policy.version() else {
            let result = policy.decide_path(points, message, parties);
            return (result, metrics.message_counter(message.from.domain(), message.kind));
        };
        let metrics_version = metrics.version();
        // Never waits: a route taken by another thread is decided without.
        if let Ok(kept) = self.kept.try_lock()
            && let Some(entry) = kept.entries.iter().find(|e| e.is_for(version, metrics_version, message, parties.sender))
        {
            return (entry.result.clone(), entry.counter.clone());
        }
        let result = policy.decide_path(points, message, parties);
        let counter = metrics.message_counter(message.from.domain(), message.kind);
        if policy.version() == Some(version)
            && let Ok(mut kept) = self.kept.try_lock()
        {
            let entry = Entry {
                version,
                metrics: metrics_version,
                from: message.from.clone(),
                to: message.to.clone(),
                kind: message.kind,
                resource: message.body.resource.as_deref().map(Into::into),
                identity: message.identity.clone(),
                sender: parties.sender.cloned(),
                result: result.clone(),
                counter: counter.clone(),
            };
            let Kept { entries, next } = &mut *kept;
            // Entries of an older version are replaced first.
            match entries.iter().position(|e| e.version != version || e.metrics != metrics_version) {
                Some(stale) => entries[stale] = entry,
                None if entries.len() < WAYS => entries.push(entry),
                None => {
                    entries[*next % WAYS] = entry;
                    *next = (*next + 1) % WAYS;
                }
            }
        }
        (result, counter)
    }
}
