//! The policy hook: the bus asks a [`PolicyDecisionPoint`] at each of its
//! three enforcement points, for every message of every type.
//!
//! The backbone ships [`AllowAll`]; the policy engine plugs in by
//! implementing the trait. A denial is answered to the sender at once with a
//! `response` 403 naming the point and the policies that denied.

use std::fmt;

use crate::message::Message;

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
    fn decide(&self, point: EnforcementPoint, domain: &str, message: &Message) -> Decision;
}

/// The default decision point: permits everything.
pub struct AllowAll;

impl PolicyDecisionPoint for AllowAll {
    fn decide(&self, _: EnforcementPoint, _: &str, _: &Message) -> Decision {
        Decision::Permit
    }
}
