//! `hyperty-host`: runs reTHINK hyperties as sandboxed WebAssembly
//! components on wasmtime.
//!
//! An embedder creates a [`Runtime`], loads or builds a [`Bundle`] and
//! deploys it; hyperties then talk over the bus, and the embedder joins the
//! bus through [`Endpoint`]s. The `hyperty` CLI ([`cli`]) does the same for
//! operators.
//!
//! # Embedder guide
//!
//! ## A runtime and a bundle
//!
//! A bundle comes from a manifest file ([`Bundle::load`], see [`bundle`]
//! for the format) or from code ([`Bundle::builder`]): domains, hyperties,
//! IdP proxies, protostubs and policies, components by path or by bytes,
//! each pinned to its sha256 — computed by the builder, or given and then
//! checked at deployment. Both ways meet the same checks and give the same
//! [`Bundle`]. Deployment is all or nothing.
//!
//! ```no_run
//! use hyperty_host::bundle::{Component, Domain, Hyperty};
//! use hyperty_host::{Bundle, Limits, Runtime, RuntimeConfig};
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let bundle = Bundle::builder("ping-pong")
//!     .domain("alice.example", Domain::new().limits(Limits { memory_mb: 32, ..Limits::default() }))
//!     .hyperty("alice.example", Hyperty::new("ping", Component::file("ping.wasm")).config(serde_json::json!({ "rounds": 3 })))
//!     .hyperty("bob.example", Hyperty::new("pong", Component::bytes("pong.wasm", std::fs::read("pong.wasm")?)))
//!     .build()?;
//! // or: let bundle = Bundle::load("bundle.toml")?;
//! for h in runtime.deploy(&bundle)? {
//!     println!("{}/{} is at {}", h.domain, h.name, h.address);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Endpoints, messages, request and reply
//!
//! [`Runtime::endpoint`] opens an endpoint at a `hyperty://` or `app://`
//! address (others are refused: see [`endpoint`]). [`Endpoint::message`]
//! builds a message from it, filling `from` and a fresh id, and checks
//! addresses and JSON, naming the field that is wrong.
//! [`Endpoint::request_reply`] sends a request and returns its response —
//! the responder's, or the host's 401/403/404/408 — while everything else
//! that arrives meanwhile stays queued, in order, for
//! [`Endpoint::recv_timeout`]. (Hyperties are reached the same way: here an
//! endpoint plays the responder, so the example needs no component.)
//!
//! ```
//! use std::time::Duration;
//! use hyperty_host::{MessageType, Runtime, RuntimeConfig};
//! let cache = tempfile::tempdir()?;
//! let runtime = Runtime::new(RuntimeConfig { cache_dir: cache.path().into(), ..RuntimeConfig::default() })?;
//! let app = runtime.endpoint("app://alice.example/console", 64)?;
//! let service = runtime.endpoint("hyperty://alice.example/clock", 64)?;
//!
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         let request = service.recv_timeout(Duration::from_secs(10)).expect("a request");
//!         service.send(service.reply(&request, 200).value(r#"{"time":"12:00"}"#).build().unwrap()).unwrap();
//!     });
//!     app.send(app.message(MessageType::Update, "hyperty://alice.example/nobody").build()?)?; // answered 404
//!     let request = app.message(MessageType::Read, "hyperty://alice.example/clock").build()?;
//!     let response = app.request_reply(request, Some(Duration::from_secs(10)))?;
//!     assert_eq!((response.body.code, response.body.value.as_deref()), (Some(200), Some(r#"{"time":"12:00"}"#)));
//!     // What came meanwhile is still there, in order.
//!     let earlier = app.recv_timeout(Duration::from_secs(10)).expect("the 404");
//!     assert_eq!(earlier.body.code, Some(404));
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })?;
//!
//! // Bad input names the field.
//! let err = app.message(MessageType::Create, "hyperty://alice.example/x").value("{oops").build().unwrap_err();
//! assert_eq!(err.field, "body.value");
//! // The runtime's own addresses take no endpoint.
//! let refused = runtime.endpoint("domain://registry.alice.example", 16).err().unwrap();
//! assert!(refused.to_string().contains("the domain's own services"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Endpoints that act for a user
//!
//! An endpoint without a user has no identity: a domain that requires one
//! answers its messages 401. [`Runtime::endpoint_as`] binds an endpoint to
//! a user the embedder authenticated itself ([`Acting::User`]) or to an
//! identity assertion ([`Acting::Assertion`], validated by the proxy of the
//! IdP of the endpoint's domain). Its messages then carry the user's
//! identity, with an assertion made by the domain's IdP proxy when they
//! leave the domain, and policies see the user — as for a hyperty bound to
//! a user in its bundle.
//!
//! ```
//! use std::time::Duration;
//! use hyperty_host::{Acting, Identity, MessageType, Runtime, RuntimeConfig};
//! # let cache = tempfile::tempdir()?;
//! # let runtime = Runtime::new(RuntimeConfig { cache_dir: cache.path().into(), ..RuntimeConfig::default() })?;
//! let alice = runtime.endpoint_as("app://alice.example/alice", 16, Acting::User("alice@alice.example".into()))?;
//! let inbox = runtime.endpoint("hyperty://alice.example/inbox", 16)?;
//! alice.send(alice.message(MessageType::Update, inbox.address().as_str()).build()?)?;
//! let got = inbox.recv_timeout(Duration::from_secs(10)).expect("delivered");
//! // Within its domain, the identity is the user (the domain has no IdP here).
//! assert_eq!(got.identity, Some(Identity { user: "alice@alice.example".into(), idp: "alice.example".into() }));
//!
//! // With an IdP proxy deployed for the domain:
//! // let token = /* a JWT the user got from idp.example */;
//! // let web = runtime.endpoint_as("app://alice.example/web", 16,
//! //     Acting::Assertion(Assertion { idp: "idp.example".into(), token }))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Status events, with or without an async runtime
//!
//! [`Runtime::events`] gives an [`EventReceiver`]: blocking `recv`,
//! `try_recv` and `recv_timeout` for synchronous code, `recv_async` for
//! async code (any executor).
//!
//! ```
//! use std::time::Duration;
//! use hyperty_host::events::{RecvTimeoutError, TryRecvError};
//! use hyperty_host::{EventKind, Runtime, RuntimeConfig};
//! # let cache = tempfile::tempdir()?;
//! let runtime = Runtime::new(RuntimeConfig { cache_dir: cache.path().into(), ..RuntimeConfig::default() })?;
//! let mut events = runtime.events();
//! assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
//! match events.recv_timeout(Duration::from_millis(10)) {
//!     Ok(event) if matches!(event.kind, EventKind::Trapped { .. }) => println!("{} trapped", event.hyperty),
//!     Ok(event) => println!("{event:?}"),
//!     Err(RecvTimeoutError::Lagged(missed)) => println!("{missed} events missed"),
//!     Err(RecvTimeoutError::Timeout | RecvTimeoutError::Closed) => {}
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod address;
pub mod bundle;
mod bus;
mod cache;
mod contract;
mod domain_registry;
pub mod endpoint;
pub mod cli;
mod engine;
mod http;
pub mod events;
pub mod gateway;
mod identity;
pub mod media;
pub mod message;
pub mod metrics;
pub mod policy;
mod private;
mod protostub;
mod receipt;
pub mod registry;
pub mod runtime;
mod sandbox;
pub mod signing;
mod store;
pub mod syncher;

pub use address::Address;
pub use bundle::{Bundle, BundleBuilder, BundleError, Problem};
pub use bus::SendError;
pub use engine::{Digest, EngineKind};
pub use message::{Assertion, Body, Identity, Message, MessageBuilder, MessageError, MessageType, Text};
pub use policy::cedar::{CedarPolicies, PolicyError};
pub use policy::clock::{Clock, FixedClock, SystemClock};
pub use policy::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint};
pub use registry::{Query, Registration};
pub use runtime::{DeployedHyperty, Runtime, RuntimeConfig};
pub use endpoint::{Acting, Endpoint, EndpointError, RequestError};
pub use events::{Event, EventKind, EventReceiver};
pub use sandbox::SandboxSettings;
pub use sandbox::limits::{Grant, Limits, RestartKind, RestartPolicy};
