// The JavaScript pong: answers every request with its `text`, "ping"
// turned into "pong" (the same game as the Rust guests/pong).

import { hyperty, reply, value, log } from "../sdk/hyperty.js";

export const handler = hyperty({
  init() {
    log.info("ready to answer pings (JavaScript)");
  },
  handle(msg) {
    if (msg.type === "response") return;
    const text = String(value(msg)?.text ?? "");
    const answer = text.replace("ping", "pong");
    // The host set `identity`: validated by the sender's IdP proxy.
    const who = msg.identity ? `${msg.identity.user} (asserted by ${msg.identity.idp})` : "an anonymous sender";
    log.info(`got "${text}" from ${who} at ${msg.from}, answering "${answer}"`);
    reply(msg, 200, { text: answer, from: msg.from, identity: msg.identity });
  },
});
