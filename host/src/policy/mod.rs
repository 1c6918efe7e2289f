//! The policy hook: the bus asks a [`PolicyDecisionPoint`] at each of its
//! three enforcement points, for every message of every type.
//!
//! [`AllowAll`] permits everything; [`cedar::CedarPolicies`] evaluates
//! Cedar policies. A denial is answered to the sender at once with a
//! `response` 403 naming the point and the policies that denied.

pub mod cedar;
pub mod clock;
pub mod nesting;

use std::fmt;

use crate::message::Message;

/// What the runtime knows about a hyperty at one end of a message: what
/// its bundle calls it and the user it acts for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub domain: String,
    /// The name the bundle gives it.
    pub name: String,
    /// The user identity the hyperty is bound to, if any.
    pub user: Option<String>,
}

/// The two ends of a message, where they are hyperties of this runtime.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parties<'a> {
    pub sender: Option<&'a Descriptor>,
    pub target: Option<&'a Descriptor>,
}

/// Where on the message path a decision is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnforcementPoint {
    /// The sender domain's policies, as the message leaves it.
    Outgoing,
    /// The runtime's own bus-access policies.
    BusAccess,
    /// The receiver domain's policies, as the message arrives.
    Incoming,
}

impl fmt::Display for EnforcementPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnforcementPoint::Outgoing => "outgoing",
            EnforcementPoint::BusAccess => "bus-access",
            EnforcementPoint::Incoming => "incoming",
        })
    }
}

/// A policy decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Permit,
    /// Denied by the named policies, for a human-readable reason.
    Deny { policies: Vec<String>, reason: String },
}

/// Decides whether a message may pass an enforcement point.
///
/// `domain` is the domain whose policies apply: the sender's domain at
/// [`EnforcementPoint::Outgoing`], the receiver's at
/// [`EnforcementPoint::Incoming`], and the runtime's own domain at
/// [`EnforcementPoint::BusAccess`]. Called on the per-message path from any
/// sandbox thread: it must be cheap and must not block.
pub trait PolicyDecisionPoint: Send + Sync + 'static {
    fn decide(&self, point: EnforcementPoint, domain: &str, message: &Message, parties: Parties<'_>) -> Decision;

    /// Decides `message` at each of `points` (a point and the domain whose
    /// policies apply there), in order, and returns the first denial with
    /// its index. An implementation whose policies can change must answer
    /// all of them from one version of its policies, so a message in flight
    /// sees either the old set or the new one, never both.
    fn decide_path(&self, points: &[(EnforcementPoint, &str)], message: &Message, parties: Parties<'_>) -> Result<(), (usize, Decision)> {
        for (i, (point, domain)) in points.iter().enumerate() {
            let decision = self.decide(*point, domain, message, parties);
            if decision != Decision::Permit {
                return Err((i, decision));
            }
        }
        Ok(())
    }

    /// The version its decisions are made under now: while it stays the
    /// same, the same inputs (the points and their domains, the message's
    /// `from`, `to`, type, `body.resource` and identity, both parties'
    /// descriptors) get the same decision, so the bus may keep one beside
    /// the receiver's route and use it again. An implementation must give
    /// a new version whenever a decision could change for the same inputs
    /// (a reload, a group change, a time boundary a policy reads), and the
    /// new number only once the new policies are the ones in force. `None`
    /// (the default): nothing may be kept, every message is decided.
    fn version(&self) -> Option<Version> {
        None
    }
}

/// A version of a decision point's policies ([`PolicyDecisionPoint::version`]):
/// its generation (a number that only grows, bumped by every change of the
/// policies or of what they read) and, when some policy reads the time,
/// the UTC minute (`i64::MIN` otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub generation: u64,
    pub minute: i64,
}

/// The default decision point: permits everything.
pub struct AllowAll;

impl PolicyDecisionPoint for AllowAll {
    fn decide(&self, _: EnforcementPoint, _: &str, _: &Message, _: Parties<'_>) -> Decision {
        Decision::Permit
    }

    /// Never changes.
    fn version(&self) -> Option<Version> {
        Some(Version { generation: 0, minute: i64::MIN })
    }
}
