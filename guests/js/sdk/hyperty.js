// The JavaScript SDK of the `hyperty` world of `rethink:hyperty@0.1.0`
// (wit/hyperty.wit): what a hyperty written in JavaScript imports.
//
//   import { hyperty, request, reply, log } from "../sdk/hyperty.js";
//
//   export const handler = hyperty({
//     init(address, config) { log.info(`I am ${address}`); },
//     handle(msg) { reply(msg, 200, { text: "pong" }); },
//   });
//
// The module must export `handler` (the world's `handler` interface);
// `hyperty()` builds it from your `init` and `handle`, routes responses to
// the promises `request()` returned, and logs an exception that escapes
// `init` or `handle` (then rethrows it: a trap, and the host restarts the
// instance, see ARCHITECTURE.md "Sandboxes").
//
// Built for jco's QuickJS backend (componentize-qjs, see guests/js/README.md).
// What that engine implies here:
// - No import may be called at module top level: the module is evaluated
//   once at build time (Wizer pre-initialisation), when no host exists.
//   Call them from `init` or `handle` only.
// - WIT `u64` values (message ids, object versions, expiry) are Numbers:
//   exact up to 2^53 (Number.MAX_SAFE_INTEGER). This SDK chooses ids below
//   that; an id above it sent by another language's hyperty arrives rounded.
// - No TextEncoder/TextDecoder; `JSON` and strings are all this SDK needs.
// - No WASI: `console.*` goes to the host's log (below); there is no clock
//   (`Date.now()` and `new Date()` throw); `Math.random()` is seeded when
//   the component is built, so every instance draws the same numbers: never
//   use it for anything that must not be guessed.
// - The engine never runs its job queue in a sync component: native
//   Promise callbacks and everything after an `await` never run (and would
//   pile up). So `request()` returns a `Pending`, a thenable whose callbacks
//   run synchronously when the response arrives, inside the `handle` call
//   that delivered it (counted in that call's deadline and fuel). Chain it
//   with `then`/`catch`/`finally`; do not `await` it, and do not make
//   `handle` async (the SDK warns if it returns a Promise).

import * as bus from "rethink:hyperty/bus@0.1.0";
import * as hostRegistry from "rethink:hyperty/registry@0.1.0";
import * as hostSyncher from "rethink:hyperty/syncher@0.1.0";
import * as hostLog from "rethink:hyperty/log@0.1.0";

/**
 * A message as the host delivers and the bus carries it (WIT `message`).
 * @typedef {object} Message
 * @property {number} id Chosen by the sender; a response carries its request's.
 * @property {MessageType} type
 * @property {string} from The sender's address (stamped by the host).
 * @property {string} to The receiver's address.
 * @property {Body} body
 * @property {{user: string, idp: string} | null} identity Set by the host only:
 *   the sender's user as its IdP validated it.
 */

/**
 * @typedef {"create"|"read"|"update"|"delete"|"subscribe"|"unsubscribe"|"response"|"forward"|"execute"} MessageType
 */

/**
 * @typedef {object} Body
 * @property {number | null} code A response's status code (HTTP-like).
 * @property {string | null} resource What the message is about (e.g. an object's URL).
 * @property {string | null} value The payload, JSON text.
 * @property {string | null} description Set by the host only (why it answered).
 */

/**
 * What `send` and `request` take: `to` and `type` at least; `value` any
 * JSON-serialisable value (sent as JSON text); `id` chosen by the SDK if
 * left out; `from` is always this hyperty.
 * @typedef {object} Outgoing
 * @property {string} to
 * @property {MessageType} type
 * @property {*} [value]
 * @property {string} [resource]
 * @property {number} [id]
 */

/**
 * The bus refused a message at the import (WIT `send-error`): `kind` is
 * one of spoofed-from, spoofed-identity, malformed, too-large, duplicate-id,
 * inbox-full, rate-limited, too-many-pending; `detail` the host's text.
 */
export class SendError extends Error {
  /** @param {string} kind @param {string|number} detail */
  constructor(kind, detail) {
    super(`${kind}: ${detail}`);
    this.name = "SendError";
    this.kind = kind;
    this.detail = detail;
  }
}

/**
 * A request was answered with a code of 300 or more: by the host (403
 * denied by a policy, 404 no such address, 408 no response in time, 401,
 * 500, 503, with its `description`) or by the peer through `reply`.
 */
export class ResponseError extends Error {
  /** @param {Message} response */
  constructor(response) {
    const code = response.body.code ?? 0;
    const description = response.body.description ?? "";
    super(`${code}${description ? ": " + description : ""}`);
    this.name = "ResponseError";
    /** @type {number} */
    this.code = code;
    /** @type {string} */
    this.description = description;
    /** @type {Message} */
    this.response = response;
  }
}

/**
 * A syncher call was refused (WIT `sync-error`): `kind` is forbidden,
 * not-found, invalid or limit; `detail` names what and why.
 */
export class SyncError extends Error {
  /** @param {string} kind @param {string} detail */
  constructor(kind, detail) {
    super(`${kind}: ${detail}`);
    this.name = "SyncError";
    this.kind = kind;
    this.detail = detail;
  }
}

/**
 * The outcome of a request, settled when its response arrives: a thenable
 * like a Promise, but its callbacks run synchronously (see the note at the
 * top: this engine runs no job queue). `then` returns a new `Pending` that
 * settles with what the callback returns (adopting a returned `Pending`) or
 * rejects with what it throws. A rejection that reaches the end of a chain
 * with no handler is logged (warn).
 * @template T
 */
export class Pending {
  constructor() {
    /** @type {"pending" | "fulfilled" | "rejected"} */
    this.state = "pending";
    /** @type {*} */
    this.result = undefined;
    /** @type {Array<() => void>} */
    this.waiting = [];
  }

  /** @param {T} v */
  resolve(v) {
    if (this.state !== "pending") return;
    if (v instanceof Pending) {
      v.then((x) => this.resolve(x), (e) => this.reject(e));
      return;
    }
    this.settle("fulfilled", v);
  }

  /** @param {*} e */
  reject(e) {
    if (this.state !== "pending") return;
    this.settle("rejected", e);
  }

  settle(state, result) {
    this.state = state;
    this.result = result;
    const waiting = this.waiting;
    this.waiting = [];
    if (state === "rejected" && waiting.length === 0) {
      log.warn(`unhandled rejection: ${describe(result)}`);
    }
    for (const run of waiting) run();
  }

  /**
   * @template U
   * @param {(value: T) => U} [onFulfilled]
   * @param {(error: *) => U} [onRejected]
   * @returns {Pending<U>}
   */
  then(onFulfilled, onRejected) {
    const next = new Pending();
    const run = () => {
      const f = this.state === "fulfilled" ? onFulfilled : onRejected;
      if (typeof f !== "function") {
        if (this.state === "fulfilled") next.resolve(this.result);
        else next.reject(this.result);
        return;
      }
      try {
        next.resolve(f(this.result));
      } catch (e) {
        next.reject(e);
      }
    };
    if (this.state === "pending") this.waiting.push(run);
    else run();
    return next;
  }

  /** @param {(error: *) => *} onRejected */
  catch(onRejected) {
    return this.then(undefined, onRejected);
  }

  /** @param {() => void} f runs either way; the outcome passes through */
  finally(f) {
    return this.then(
      (v) => { f(); return v; },
      (e) => { f(); throw e; },
    );
  }
}

/** This hyperty's address, known from `init` on. */
let me = "";
/** The last id this SDK chose. */
let lastId = 0;
/**
 * Requests waiting for their response, by id. Bounded by the host: at most
 * `max-pending` requests of a hyperty wait, and each is answered (by its
 * peer, or 404/403/408/503 by the host), which settles and removes it.
 * @type {Map<number, Pending<Message>>}
 */
const pending = new Map();

/** This hyperty's address (`hyperty://<domain>/<id>`). */
export function address() {
  return me;
}

/**
 * The JSON value of a message's body, parsed; `undefined` if it has none.
 * @param {Message} msg
 * @returns {*}
 */
export function value(msg) {
  const text = msg.body.value;
  return text == null ? undefined : JSON.parse(text);
}

/** @param {*} v @returns {string | null} */
function jsonText(v) {
  return v === undefined ? null : JSON.stringify(v);
}

/**
 * Calls an import, turning its WIT error variant into `make(tag, val)`.
 * componentize-qjs throws an import's `result` error as an `Error` whose
 * `payload` is the variant `{tag, val}`.
 */
function call(make, f) {
  try {
    return f();
  } catch (e) {
    const variant = e?.payload ?? e;
    if (variant && typeof variant === "object" && typeof variant.tag === "string") throw make(variant.tag, variant.val);
    throw e;
  }
}

/** @param {Outgoing} out @returns {Message} */
function message(out) {
  if (out.id === undefined) {
    // Ids are this SDK's: a request is (from, id), so they must not repeat
    // while one waits; a counter below 2^53 never repeats in practice.
    lastId = lastId >= Number.MAX_SAFE_INTEGER ? 1 : lastId + 1;
  }
  return {
    id: out.id ?? lastId,
    type: out.type,
    from: me,
    to: out.to,
    body: { code: null, resource: out.resource ?? null, value: jsonText(out.value), description: null },
    identity: null,
  };
}

/**
 * Sends a notification (no response expected).
 * @param {Outgoing} out
 * @returns {Message} what was sent
 * @throws {SendError} refused at the import
 */
export function send(out) {
  const msg = message(out);
  call((k, v) => new SendError(k, v), () => bus.send(msg));
  return msg;
}

/**
 * Sends a request; the outcome settles with its response: fulfilled for a
 * code below 300, rejected with a {@link ResponseError} otherwise (the
 * host's 403/404/408/503 carry a `description`).
 * @param {Outgoing} out
 * @param {{timeoutMs?: number}} [options] clamped by the host to `max-request-timeout-ms`
 * @returns {Pending<Message>}
 * @throws {SendError} refused at the import (synchronously)
 */
export function request(out, options = {}) {
  const msg = message(out);
  if (pending.has(msg.id)) throw new SendError("duplicate-id", msg.id);
  call((k, v) => new SendError(k, v), () => bus.request(msg, options.timeoutMs ?? null));
  const outcome = new Pending();
  pending.set(msg.id, outcome);
  return outcome;
}

/**
 * Answers `req` with `code` (100..=599) and an optional JSON value.
 * @param {Message} req a request this hyperty received
 * @param {number} code
 * @param {*} [v]
 * @throws {SendError}
 */
export function reply(req, code, v) {
  call((k, val) => new SendError(k, val), () => bus.reply(req, code, jsonText(v)));
}

/**
 * The address of hyperty `name` of `domain` (a bundle name `<domain>/<name>`),
 * or null.
 * @param {string} domain
 * @param {string} name
 * @returns {string | null}
 */
export function lookup(domain, name) {
  return hostRegistry.lookup(domain, name) ?? null;
}

/**
 * @typedef {object} Registration
 * @property {string} address
 * @property {"hyperty"|"protostub"|"idp-proxy"|"data-object"} kind
 * @property {string} name
 * @property {string} domain
 * @property {string | null} user
 * @property {string[]} hypertyTypes
 * @property {string[]} schemes
 * @property {"created"|"live"|"disconnected"|"failed"} status
 */

/**
 * Registrations matching every field given.
 * @param {{user?: string, name?: string, hypertyType?: string, domain?: string, scheme?: string}} q
 * @returns {Registration[]}
 */
export function discover(q = {}) {
  return hostRegistry.discover({
    user: q.user ?? null,
    name: q.name ?? null,
    hypertyType: q.hypertyType ?? null,
    domain: q.domain ?? null,
    scheme: q.scheme ?? null,
  });
}

/** @template T @param {() => T} f @returns {T} */
function sync(f) {
  return call((k, v) => new SyncError(k, v), f);
}

/**
 * Data objects this hyperty reports (the `syncher` interface). Every call
 * throws a {@link SyncError} when refused.
 */
export const syncher = {
  /** Creates an object of `scheme`; its URL. @param {string} scheme @param {*} data @returns {string} */
  create: (scheme, data) => sync(() => hostSyncher.create(scheme, JSON.stringify(data))),
  /** Lets `observers` subscribe and invites them. @param {string} url @param {string[]} observers */
  invite: (url, observers) => sync(() => hostSyncher.invite(url, observers)),
  /** Applies a JSON Patch (RFC 6902, an array of operations); the new version. @param {string} url @param {object[]} patch @returns {number} */
  update: (url, patch) => sync(() => hostSyncher.update(url, JSON.stringify(patch))),
  /** Creates or replaces child `name`; the new version. @param {string} url @param {string} name @param {*} data @returns {number} */
  setChild: (url, name, data) => sync(() => hostSyncher.setChild(url, name, JSON.stringify(data))),
  /** Removes child `name`; the new version. @param {string} url @param {string} name @returns {number} */
  removeChild: (url, name) => sync(() => hostSyncher.removeChild(url, name)),
  /** Deletes the object; its subscribers are told. @param {string} url */
  delete: (url) => sync(() => hostSyncher.delete(url)),
};

/**
 * What an observer holds of a data object: the state a `subscribe` or
 * `read` answer carried, kept current by the deltas the object's URL sends
 * (the same rules as the Rust SDK's `Replica`): applied in version order;
 * one already held is stale and ignored; a missing version is a gap, after
 * which the observer reads the state again (`observe` does it for you).
 */
export class Replica {
  /**
   * @param {string} url
   * @param {string} state JSON text `{"version", "data", "children"}`
   */
  constructor(url, state) {
    const s = JSON.parse(state);
    if (typeof s?.version !== "number") throw new Error(`the state of ${url} has no version`);
    /** @type {string} */ this.url = url;
    /** @type {number} */ this.version = s.version;
    /** @type {*} */ this.data = s.data;
    /** @type {Record<string, *>} */ this.children = s.children ?? {};
    /** The reporter deleted the object. */ this.deleted = false;
  }

  /**
   * Applies a delta (a message from the object's URL).
   * @param {Message} msg
   * @returns {"applied" | "stale" | "gap" | "not-this-object"}
   * @throws {Error} a malformed delta or a patch that does not apply (the replica is unchanged)
   */
  apply(msg) {
    if (msg.from !== this.url) return "not-this-object";
    const v = value(msg);
    if (typeof v?.version !== "number") throw new Error(`a delta of ${this.url} without a version`);
    if (v.version <= this.version) return "stale";
    if (v.version !== this.version + 1) return "gap";
    const resource = msg.body.resource ?? "";
    const prefix = this.url + "/children/";
    const child = resource.startsWith(prefix) ? resource.slice(prefix.length) : null;
    if (msg.type === "update" && child === null) {
      this.data = applyPatch(this.data, v.patch);
    } else if (msg.type === "delete" && child === null) {
      this.deleted = true;
    } else if ((msg.type === "create" || msg.type === "update") && child !== null) {
      put(this.children, child, v.data);
    } else if (msg.type === "delete" && child !== null) {
      delete this.children[child];
    } else {
      throw new Error(`a delta of type ${msg.type} about ${resource}`);
    }
    this.version = v.version;
    return "applied";
  }
}

/** Replicas of the objects this hyperty observes, by URL. @type {Map<string, Replica>} */
const replicas = new Map();

/**
 * Subscribes to the object at `url` (its reporter may be asked) and keeps a
 * {@link Replica} of it current: deltas from `url` are applied before your
 * `handle` sees them, and a gap reads the state again.
 * @param {string} url
 * @returns {Pending<Replica>} rejected with a {@link ResponseError} (403, 404...)
 */
export function observe(url) {
  return request({ type: "subscribe", to: url }).then((answer) => {
    const replica = new Replica(url, answer.body.value ?? "null");
    replicas.set(url, replica);
    return replica;
  });
}

/**
 * The replica of `url` this hyperty observes, if any.
 * @param {string} url
 * @returns {Replica | undefined}
 */
export function replica(url) {
  return replicas.get(url);
}

/**
 * Stops observing `url`: unsubscribes and forgets the replica.
 * @param {string} url
 * @returns {Pending<Message>}
 */
export function unobserve(url) {
  replicas.delete(url);
  return request({ type: "unsubscribe", to: url });
}

/** A deep copy of JSON data. @param {*} v */
function copy(v) {
  return v === undefined ? undefined : JSON.parse(JSON.stringify(v));
}

/** RFC 6901 reference tokens of `pointer`. @param {string} pointer @returns {string[]} */
function tokens(pointer) {
  if (pointer === "") return [];
  if (!pointer.startsWith("/")) throw new Error(`${JSON.stringify(pointer)} is not a JSON Pointer`);
  return pointer.slice(1).split("/").map((t) => t.replaceAll("~1", "/").replaceAll("~0", "~"));
}

/** An array index token (RFC 6901 §4), `-` as `len` when `end` is allowed. */
function index(arr, token, end) {
  if (end && token === "-") return arr.length;
  if (!/^(0|[1-9][0-9]*)$/.test(token)) throw new Error(`${JSON.stringify(token)} is not an array index`);
  const i = Number(token);
  if (i > arr.length || (!end && i === arr.length)) throw new Error(`index ${i} is out of bounds`);
  return i;
}

/** The parent container of `path` in `doc` and the last token. */
function parent(doc, path) {
  const t = tokens(path);
  if (t.length === 0) return [null, null];
  let node = doc;
  for (const token of t.slice(0, -1)) {
    if (Array.isArray(node)) node = node[index(node, token, false)];
    else if (node !== null && typeof node === "object" && Object.hasOwn(node, token)) node = node[token];
    else throw new Error(`${path}: no such path`);
  }
  if (node === null || typeof node !== "object") throw new Error(`${path}: no such path`);
  return [node, t[t.length - 1]];
}

function get(doc, path) {
  const [node, last] = parent(doc, path);
  if (node === null) return doc;
  if (Array.isArray(node)) return node[index(node, last, false)];
  if (!Object.hasOwn(node, last)) throw new Error(`${path}: no such path`);
  return node[last];
}

/** Sets member `key` of `obj` as an own property, even `__proto__`. */
function put(obj, key, v) {
  Object.defineProperty(obj, key, { value: v, writable: true, enumerable: true, configurable: true });
}

function add(doc, path, v) {
  const [node, last] = parent(doc, path);
  if (node === null) return v;
  if (Array.isArray(node)) node.splice(index(node, last, true), 0, v);
  else put(node, last, v);
  return doc;
}

function replace(doc, path, v) {
  const [node, last] = parent(doc, path);
  if (node === null) return v;
  if (Array.isArray(node)) node[index(node, last, false)] = v;
  else if (Object.hasOwn(node, last)) put(node, last, v);
  else throw new Error(`${path}: no such path`);
  return doc;
}

function remove(doc, path) {
  const [node, last] = parent(doc, path);
  if (node === null) throw new Error("cannot remove the whole document");
  if (Array.isArray(node)) node.splice(index(node, last, false), 1);
  else if (Object.hasOwn(node, last)) delete node[last];
  else throw new Error(`${path}: no such path`);
  return doc;
}

function equal(a, b) {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

function canonical(v) {
  if (Array.isArray(v)) return v.map(canonical);
  if (v !== null && typeof v === "object") {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]));
  }
  return v;
}

/**
 * `doc` with a JSON Patch (RFC 6902) applied, all or nothing: `doc` itself
 * is not changed.
 * @param {*} doc
 * @param {{op: string, path: string, from?: string, value?: *}[]} patch
 * @returns {*}
 * @throws {Error} an operation that does not apply, naming it
 */
export function applyPatch(doc, patch) {
  if (!Array.isArray(patch)) throw new Error("a patch is an array of operations");
  let result = copy(doc);
  patch.forEach((o, i) => {
    try {
      switch (o.op) {
        case "add": result = add(result, o.path, copy(o.value)); break;
        case "remove": result = remove(result, o.path); break;
        case "replace": result = replace(result, o.path, copy(o.value)); break;
        case "move": {
          if (o.path.startsWith(o.from + "/")) throw new Error("cannot move a value into itself");
          const v = get(result, o.from);
          result = add(remove(result, o.from), o.path, v);
          break;
        }
        case "copy": result = add(result, o.path, copy(get(result, o.from))); break;
        case "test": if (!equal(get(result, o.path), o.value)) throw new Error("test failed"); break;
        default: throw new Error(`unknown op ${JSON.stringify(o.op)}`);
      }
    } catch (e) {
      throw new Error(`operation ${i} (${o.op} ${o.path}) does not apply: ${e.message}`);
    }
  });
  return result;
}

/** Log lines into the host's log, tagged with this hyperty (cut at 4 KiB, rate-limited). */
export const log = {
  /** @param {string} text */ trace: (text) => hostLog.log("trace", String(text)),
  /** @param {string} text */ debug: (text) => hostLog.log("debug", String(text)),
  /** @param {string} text */ info: (text) => hostLog.log("info", String(text)),
  /** @param {string} text */ warn: (text) => hostLog.log("warn", String(text)),
  /** @param {string} text */ error: (text) => hostLog.log("error", String(text)),
};

// The component imports no WASI (built with --stub-wasi): what the engine
// would write to stdout/stderr or read from a clock would trap with no
// reason given. So `console` writes into the host's log, and the clock
// calls throw an error that says why.
globalThis.console = {
  log: (...a) => log.info(a.map(String).join(" ")),
  info: (...a) => log.info(a.map(String).join(" ")),
  debug: (...a) => log.debug(a.map(String).join(" ")),
  warn: (...a) => log.warn(a.map(String).join(" ")),
  error: (...a) => log.error(a.map(String).join(" ")),
};

function noClock() {
  throw new Error("no clock: the hyperty world has none (Date.now() and new Date() without arguments)");
}

const WorldDate = Date;
globalThis.Date = class Date extends WorldDate {
  constructor(...args) {
    if (args.length === 0) noClock();
    super(...args);
  }
  static now() {
    return noClock();
  }
};

/** The error's message and stack for the log. */
function describe(e) {
  if (e instanceof Error) return `${e.name}: ${e.message}${e.stack ? "\n" + e.stack : ""}`;
  return String(e);
}

/**
 * @typedef {object} Hyperty
 * @property {(address: string, config: *) => void} [init] Called once; `config`
 *   is the bundle's JSON config, parsed. Throw to refuse to start (the
 *   deployment fails with your message).
 * @property {(msg: Message) => void} handle Every message but the responses
 *   to `request()`, which settle its `Pending` instead. An exception escaping
 *   it is logged and traps: the host answers 500 and restarts the instance.
 */

/**
 * The `handler` export of the world, from your hyperty's `init` and `handle`.
 * @param {Hyperty} h
 * @returns {{init: (address: string, config: string) => void, handle: (msg: Message) => void}}
 */
export function hyperty(h) {
  return {
    init(addr, config) {
      me = addr;
      try {
        h.init?.(addr, config === "" ? null : JSON.parse(config));
      } catch (e) {
        log.error(`init failed: ${describe(e)}`);
        // WIT `result<_, string>`: a thrown string is the error.
        throw e instanceof Error ? e.message : String(e);
      }
    },
    handle(msg) {
      try {
        if (msg.type === "response" && pending.has(msg.id)) {
          const outcome = pending.get(msg.id);
          pending.delete(msg.id);
          if ((msg.body.code ?? 0) < 300) outcome.resolve(msg);
          else outcome.reject(new ResponseError(msg));
          return;
        }
        const observed = replicas.get(msg.from);
        if (observed && msg.type !== "response" && observed.apply(msg) === "gap") {
          // Read the state again; the answer replaces the replica.
          request({ type: "read", to: observed.url }).then(
            (answer) => replicas.set(observed.url, new Replica(observed.url, answer.body.value ?? "null")),
            (e) => log.warn(`cannot read ${observed.url} again: ${e.message}`),
          );
        }
        const returned = h.handle(msg);
        if (returned instanceof Promise) {
          log.warn("handle returned a Promise: async handlers are not supported (nothing after an `await` runs in this engine); use the SDK's Pending");
        }
      } catch (e) {
        log.error(`uncaught exception in handle: ${describe(e)}`);
        throw e;
      }
    },
  };
}
