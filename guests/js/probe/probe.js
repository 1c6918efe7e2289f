// A JavaScript hyperty the tests drive (`execute` requests from anyone,
// each a JSON command) to check that JS hyperties get the same guarantees
// as Rust ones. Not an example to follow: it misbehaves on purpose.
//
// - `{"ask": {"to", "type", "value"?, "timeoutMs"?}}`: sends that request
//   with the SDK and answers the command once it settles, 200 with
//   `{"code", "value", "from"}` or `{"rejected": {"name", "code",
//   "description"}}`, or at once with `{"refused": {"kind", "detail"}}`.
// - `{"spoof": "<address>"}`: sends a message claiming to come from that
//   address through the raw import; answers `{"refused": {"kind"}}`.
// - `{"spin": true}`: loops forever (the call deadline or fuel stops it).
// - `{"bomb": true}`: allocates until memory runs out.
// - `{"throw": "text"}`: throws `new Error(text)` out of `handle`.
// - anything else: answered 200 with `{"from", "identity"}` as received.

import * as bus from "rethink:hyperty/bus@0.1.0";
import { hyperty, reply, request, value, address, SendError, ResponseError } from "../sdk/hyperty.js";

export const handler = hyperty({
  handle(msg) {
    if (msg.type !== "execute") return;
    const c = value(msg) ?? {};
    if (c.ask) {
      let answer;
      try {
        answer = request(c.ask, { timeoutMs: c.ask.timeoutMs });
      } catch (e) {
        if (!(e instanceof SendError)) throw e;
        reply(msg, 200, { refused: { kind: e.kind, detail: e.detail } });
        return;
      }
      answer.then(
        (r) => reply(msg, 200, { code: r.body.code, value: r.body.value, from: r.from }),
        (e) => reply(msg, 200, { rejected: { name: e.name, code: e instanceof ResponseError ? e.code : null, description: e.description } }),
      );
    } else if (c.spoof) {
      const forged = { id: 1, type: "execute", from: c.spoof, to: msg.from, body: { code: null, resource: null, value: null, description: null }, identity: null };
      try {
        bus.send(forged);
        reply(msg, 200, { refused: null });
      } catch (e) {
        // The WIT error variant, as componentize-qjs throws it.
        reply(msg, 200, { refused: { kind: e.payload?.tag } });
      }
    } else if (c.spin) {
      for (;;) {}
    } else if (c.bomb) {
      const hoard = [];
      for (;;) hoard.push(new Array(1 << 16).fill(hoard.length));
    } else if (c.throw !== undefined) {
      throw new Error(String(c.throw));
    } else {
      reply(msg, 200, { me: address(), from: msg.from, identity: msg.identity });
    }
  },
});
