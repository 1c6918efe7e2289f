//! Demo hyperty of `alice.example`: plays `rounds` rounds of ping-pong with
//! the hyperty the bundle names as its `peer` (`<domain>/<name>`).

use std::cell::RefCell;

use hyperty_guest::{Guest, Message, MessageType, bus, info, registry, warn};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Config {
    peer: String,
    rounds: u64,
}

struct State {
    me: String,
    peer: String,
    peer_name: String,
    rounds: u64,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

struct Ping;

impl Guest for Ping {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        let (domain, name) = config
            .peer
            .split_once('/')
            .ok_or_else(|| format!("peer {:?} is not <domain>/<name>", config.peer))?;
        let peer = registry::lookup(domain, name)
            .ok_or_else(|| format!("the bundle has no hyperty {:?}", config.peer))?;
        info(&format!("I am {address}; my peer {} is at {peer}", config.peer));
        let state = State { me: address, peer, peer_name: config.peer, rounds: config.rounds };
        send_ping(&state, 1);
        STATE.with(|s| *s.borrow_mut() = Some(state));
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            let state = s.borrow();
            let Some(state) = state.as_ref() else { return };
            if msg.type_ != MessageType::Response {
                return;
            }
            let code = msg.body.code.unwrap_or(0);
            if code != 200 {
                warn(&format!(
                    "round {} failed with {code}: {}",
                    msg.id,
                    msg.body.description.as_deref().unwrap_or("no reason given")
                ));
                return;
            }
            let text = msg.value_str("text").unwrap_or_default();
            info(&format!("{} answered \"{text}\" (round {} of {})", state.peer_name, msg.id, state.rounds));
            if msg.id < state.rounds {
                send_ping(state, msg.id + 1);
            } else {
                info("game over: every ping got its pong");
            }
        });
    }
}

fn send_ping(state: &State, round: u64) {
    let text = format!("ping {round}");
    info(&format!("asking {}: \"{text}\"", state.peer_name));
    let msg = Message::new(round, MessageType::Execute, &state.me, &state.peer, json!({ "text": text }).to_string());
    if let Err(e) = bus::request(&msg, None) {
        warn(&format!("could not send round {round}: {}", e.describe()));
    }
}

hyperty_guest::export!(Ping);
