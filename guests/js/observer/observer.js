// A JavaScript observer: accepts every invitation to a data object,
// subscribes and keeps a replica of it current through its deltas (the
// SDK's `observe`).
//
// Requests (`execute`): `{"replica": url}` answers the replica as
// `{"version", "data", "children", "deleted"}` (404 if it observes no such
// object); `{"observe": url}` subscribes without an invitation and answers
// once subscribed (or with the code the subscription got).

import { hyperty, reply, value, observe, replica, log, ResponseError } from "../sdk/hyperty.js";

export const handler = hyperty({
  handle(msg) {
    const v = value(msg);
    if (msg.type === "create" && typeof v?.url === "string" && msg.from === v.url) {
      // An invitation: `{"url", "scheme", "reporter"}` from the object itself.
      observe(v.url).then(
        (r) => log.info(`observing ${r.url} at version ${r.version}`),
        (e) => log.warn(`cannot observe ${v.url}: ${e.message}`),
      );
    } else if (msg.type === "execute" && typeof v?.replica === "string") {
      const r = replica(v.replica);
      if (!r) reply(msg, 404, { error: `no replica of ${v.replica}` });
      else reply(msg, 200, { version: r.version, data: r.data, children: r.children, deleted: r.deleted });
    } else if (msg.type === "execute" && typeof v?.observe === "string") {
      observe(v.observe).then(
        (r) => reply(msg, 200, { version: r.version }),
        (e) => reply(msg, e instanceof ResponseError ? e.code : 500, { error: e.message }),
      );
    }
  },
});
