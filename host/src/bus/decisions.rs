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
//! its object's route, and every address of a remote domain to its
//! carrier's), the type, `body.resource`, the established
//! identity and the sender's descriptor. The points and their domains
//! follow from `from` and `to`, and the receiver's descriptor from the
//! route (a route whose destination changes is a new route). So a message
//! is decided exactly as the decision point would decide it, without
//! asking it: no hashing of the message, no lock shared by every route.
//!
//! Bounds: [`WAYS`] entries a route, replaced in turn; an entry shares the
//! message's addresses and copies its resource and identity, kept only
//! when those are at most [`KEPT_TEXT_BYTES`] together (a message with a
//! longer resource is decided every time), so a route holds a few KiB at
//! most whatever its senders send.

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

use crate::address::Address;
use crate::message::{Identity, Message, MessageType};
use crate::metrics::Metrics;
use crate::policy::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint, Version};

/// The decisions a route keeps: the senders of a hot path are few.
pub(super) const WAYS: usize = 4;

/// The most resource and identity text an entry copies (a resource is an
/// address-like URL; longer ones are not kept).
pub(super) const KEPT_TEXT_BYTES: usize = crate::address::MAX_ADDRESS_LEN;

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
        let text = message.body.resource.as_deref().map_or(0, str::len) + message.identity.as_ref().map_or(0, |i| i.user.len() + i.idp.len());
        if text <= KEPT_TEXT_BYTES
            && policy.version() == Some(version)
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

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Permits everything, counting the points it is asked, at the
    /// generation the test sets.
    #[derive(Default)]
    pub(in crate::bus) struct Counting {
        pub asked: AtomicU64,
        pub generation: AtomicU64,
    }

    impl PolicyDecisionPoint for Counting {
        fn decide(&self, _: EnforcementPoint, _: &str, _: &Message, _: Parties<'_>) -> Decision {
            self.asked.fetch_add(1, Ordering::Relaxed);
            Decision::Permit
        }

        fn version(&self) -> Option<Version> {
            Some(Version { generation: self.generation.load(Ordering::Relaxed), minute: i64::MIN })
        }
    }

    #[test]
    fn a_kept_decision_serves_the_same_inputs_under_the_same_version_only() {
        let (policy, metrics, decisions) = (Counting::default(), Metrics::new(), Decisions::default());
        let message = |resource: &str| {
            let (from, to) = (Address::parse("hyperty://a.example/x").unwrap(), Address::parse("hyperty://b.example/y").unwrap());
            let mut m = Message::new(1, MessageType::Update, from, to, None);
            m.body.resource = Some(resource.into());
            m
        };
        let points = [(EnforcementPoint::Outgoing, "a.example"), (EnforcementPoint::BusAccess, "runtime.example"), (EnforcementPoint::Incoming, "b.example")];
        // The points asked so far (a path is three).
        let asked = |m: &Message| {
            assert!(decisions.decide(&policy, &metrics, &points, m, Parties::default()).0.is_ok());
            policy.asked.load(Ordering::Relaxed)
        };
        assert_eq!(asked(&message("r")), 3);
        assert_eq!(asked(&message("r")), 3, "kept");
        assert_eq!(asked(&message("other")), 6, "another resource is another input");
        policy.generation.fetch_add(1, Ordering::Relaxed);
        assert_eq!(asked(&message("r")), 9, "a new version decides again");
        assert_eq!(asked(&message("r")), 9);
        let long = "r".repeat(KEPT_TEXT_BYTES + 1);
        assert_eq!(asked(&message(&long)), 12);
        assert_eq!(asked(&message(&long)), 15, "a resource past KEPT_TEXT_BYTES is not kept");
    }
}
