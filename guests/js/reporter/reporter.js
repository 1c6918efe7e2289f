// A JavaScript reporter: a chat room as a data object (`comm://`), kept
// current for every observer through the syncher's JSON Patch deltas.
//
// Config: `{"title": "...", "observers": ["<domain>/<name>", ...]}`; the
// named hyperties are invited when the room is created (in `init`).
// Requests (`execute`, a JSON command), answered 200 with the result or 400
// with `{"error"}`:
// - `{"say": "text"}`: appends to `messages`; `{"version"}`.
// - `{"title": "text"}`: renames the room; `{"version"}`.
// - `{"attach": name, "data": json}` / `{"detach": name}`: a child.
// - `{"invite": address}`: lets another observer in.
// - `{"close": true}`: deletes the room.
// - `{"room": true}`: `{"url"}`.

import { hyperty, reply, value, lookup, syncher, log, SyncError } from "../sdk/hyperty.js";

let url = "";

export const handler = hyperty({
  init(address, config) {
    const observers = (config?.observers ?? []).map((name) => {
      const [domain, hyperty] = name.split("/");
      const found = lookup(domain, hyperty);
      if (!found) throw new Error(`the bundle has no hyperty ${name}`);
      return found;
    });
    url = syncher.create("comm", { title: config?.title ?? "room", messages: [] });
    if (observers.length) syncher.invite(url, observers);
    log.info(`room ${url} created, ${observers.length} invited`);
  },
  handle(msg) {
    if (msg.type === "subscribe") {
      // The syncher asks before letting an uninvited observer in: welcome all.
      reply(msg, 200, null);
      return;
    }
    if (msg.type !== "execute") return;
    const c = value(msg) ?? {};
    try {
      reply(msg, 200, run(c));
    } catch (e) {
      if (!(e instanceof SyncError)) throw e;
      reply(msg, 400, { error: e.message });
    }
  },
});

function run(c) {
  if (c.say !== undefined) return { version: syncher.update(url, [{ op: "add", path: "/messages/-", value: c.say }]) };
  if (c.title !== undefined) return { version: syncher.update(url, [{ op: "replace", path: "/title", value: c.title }]) };
  if (c.attach !== undefined) return { version: syncher.setChild(url, c.attach, c.data ?? null) };
  if (c.detach !== undefined) return { version: syncher.removeChild(url, c.detach) };
  if (c.invite !== undefined) { syncher.invite(url, [c.invite]); return { ok: true }; }
  if (c.close) { syncher.delete(url); return { ok: true }; }
  return { url };
}
