//! `hyperty-host`: runs reTHINK hyperties as sandboxed WebAssembly
//! components on wasmtime.
//!
//! An embedder creates a [`Runtime`], loads a [`Bundle`] and deploys it;
//! hyperties then talk over the bus, and the embedder joins the bus through
//! an [`Endpoint`]. The `hyperty` CLI ([`cli`]) does the same for operators.
//!
//! ```no_run
//! use hyperty_host::{Bundle, Runtime, RuntimeConfig};
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let bundle = Bundle::load("bundle.toml")?;
//! for h in runtime.deploy(&bundle)? {
//!     println!("{}/{} is at {}", h.domain, h.name, h.address);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod address;
pub mod bundle;
mod bus;
mod cache;
mod contract;
mod domain_registry;
pub mod cli;
mod engine;
pub mod events;
pub mod gateway;
mod identity;
pub mod media;
pub mod message;
pub mod policy;
mod protostub;
pub mod registry;
pub mod runtime;
mod sandbox;
pub mod signing;
mod store;
pub mod syncher;

pub use address::Address;
pub use bundle::{Bundle, BundleError, Problem};
pub use bus::SendError;
pub use engine::Digest;
pub use message::{Body, Message, MessageType};
pub use policy::cedar::{CedarPolicies, PolicyError};
pub use policy::clock::{Clock, FixedClock, SystemClock};
pub use policy::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint};
pub use registry::{Query, Registration};
pub use runtime::{DeployedHyperty, Endpoint, Runtime, RuntimeConfig};
pub use events::{Event, EventKind};
pub use sandbox::SandboxSettings;
pub use sandbox::limits::{Grant, Limits, RestartKind, RestartPolicy};
