// @ts-check
/**
 * @module hyperty-client
 *
 * The JavaScript client of hyperty's app gateway (served by the gateway at
 * `/.hyperty/client.js`; an ES module, no build step). A page connects over
 * WebSocket, logs in, and then exchanges reTHINK messages with hyperties:
 *
 * ```js
 * import { connect } from "/.hyperty/client.js";
 * const client = await connect(undefined, { domain: "alice.example", user: "alice@alice.example" });
 * const answer = await client.request({ type: "execute", to: chat, body: { value: { op: "join" } } });
 * const room = await client.subscribe(answer.body.value.room);
 * room.onChange(() => render(room.data));
 * ```
 *
 * Protocol (the gateway's module doc, `host/src/gateway`): one JSON message
 * per text frame, `{id, type, from?, to, body?: {code, resource, value,
 * description}, request?}`; the first frame is the login. The host stamps
 * `from` and the identity; answers to requests are `response` frames with
 * the request's `id` from the address it went to; a refused frame comes
 * back as `{type: "error", id, error, description}`.
 *
 * Data objects (reTHINK's syncher, `wit/hyperty.wit` interface `syncher`):
 * `subscribe` answers 200 with the state `{version, data, children, ...}`;
 * every change then arrives from the object's URL as one message with
 * `body.resource` naming what changed: `update` of the data with
 * `{version, patch}` (RFC 6902 JSON Patch), `create`/`update` of a child
 * `<url>/children/<name>` with `{version, data}`, `delete` of a child or of
 * the object with `{version}`. A {@link Replica} applies them in version
 * order, ignores what it has and reads the state again after a gap — the
 * same rules as the host's `hyperty_replica::Replica`.
 *
 * Reconnecting: when the connection drops (not closed by the app, not a
 * refused login), every pending request is rejected with code
 * `"disconnected"`, the app is told what was lost (`onStatus`), and the
 * client reconnects with exponential backoff (with jitter), logs in again
 * (a new address), and subscribes again to every replica, which then
 * reloads its state and fires `onChange`.
 */

/**
 * A message body. `value` is any JSON value.
 * @typedef {Object} Body
 * @property {number} [code] a response's status code (200, 403, 404, 408, ...)
 * @property {string} [resource] what the message is about (a data object's URL or child)
 * @property {any} [value] the payload
 * @property {string} [description] the host's explanation of an error code
 */

/**
 * A reTHINK message as the gateway carries it.
 * @typedef {Object} Message
 * @property {number} id chosen by the sender; a request and its response share it
 * @property {string} type create | read | update | delete | subscribe | unsubscribe | response | forward | execute
 * @property {string} [from] the sender's address (stamped by the host)
 * @property {string} to the receiver's address
 * @property {Body} [body]
 * @property {{user: string, idp: string}} [identity] who the sender acts for, set by the host
 */

/**
 * What a message to send needs: `id` and `from` are filled in.
 * @typedef {Object} Outgoing
 * @property {string} type
 * @property {string} to
 * @property {Body} [body]
 * @property {number} [id] only to answer a request with a response of its id
 */

/**
 * How to log in: with an identity assertion of the domain's IdP, or, when
 * the gateway has development users for the domain, as one of them.
 * @typedef {{domain?: string, assertion: {idp: string, token: string}} | {domain?: string, user?: string}} Login
 */

/**
 * A registration, as discovery returns it.
 * @typedef {Object} Registration
 * @property {string} address
 * @property {string} kind hyperty | protostub | idpproxy | dataobject
 * @property {string} name its bundle name (a data object's: its URL's path)
 * @property {string} domain
 * @property {string | null} user
 * @property {string[]} hyperty-types
 * @property {string[]} schemes
 * @property {string} status created | live | disconnected | failed
 */

/**
 * Connection events, for `onStatus`:
 * - `connected`: logged in at `address` (after a reconnect also the
 *   `previous` address and, per replica, `resubscribed` URLs and `failed`
 *   ones with their error);
 * - `disconnected`: the connection dropped (`code`, `reason` of the close)
 *   and what was `lost`: the pending requests (rejected) and the
 *   subscriptions (made again once reconnected); `retryInMs` until the next
 *   attempt;
 * - `closed`: for good (`close()` called, or a login refused).
 * @typedef {{state: "connected", address: string, user: string, previous?: string, resubscribed?: string[], failed?: {url: string, error: HypertyError}[]}
 *   | {state: "disconnected", code: number, reason: string, lost: {requests: {id: number, type: string, to: string}[], subscriptions: string[]}, retryInMs: number}
 *   | {state: "closed", code: number, reason: string}} Status
 */

/**
 * Options of {@link connect}.
 * @typedef {Object} Options
 * @property {boolean} [reconnect] reconnect when the connection drops (default true)
 * @property {number} [initialBackoffMs] first wait before reconnecting (default 250)
 * @property {number} [maxBackoffMs] longest wait between attempts (default 10000)
 * @property {number} [requestTimeoutMs] default `timeoutMs` of {@link Client#request} (default 30000)
 * @property {(status: Status) => void} [onStatus] connection events (also settable later)
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default: the global one)
 */

/**
 * Why a request failed or the connection was refused.
 *
 * `code` is a number for an answer (the responder's or the host's 4xx/5xx:
 * 401 no valid identity, 403 a policy denied it, 404 no such address, 408
 * no response in time — also when `timeoutMs` passed here — 503 the
 * receiver is down), a WebSocket close code when connecting failed (1006:
 * cannot reach the gateway or the handshake was refused, e.g. an Origin not
 * allowed; 1008: the login was refused), or a string: the kind of the
 * gateway's error frame (`not-json`, `not-a-message`, `bad-address`,
 * `rate-limited`, `spoofed-from`, `malformed`, `too-large`,
 * `duplicate-id`, `inbox-full`, `too-many-pending`, ...) or
 * `"disconnected"` (the connection dropped first: the request may or may
 * not have reached its receiver).
 */
export class HypertyError extends Error {
  /**
   * @param {number | string} code
   * @param {string} description
   * @param {Message} [response] the response frame, for an answer
   */
  constructor(code, description, response) {
    super(`${code}: ${description}`);
    this.name = "HypertyError";
    /** @type {number | string} */
    this.code = code;
    /** @type {string} */
    this.description = description;
    /** @type {Message | undefined} */
    this.response = response;
  }
}

/**
 * The gateway of the page's own origin: `ws://<host>/` (`wss:` on https).
 * @param {{protocol: string, host: string}} [location] default: the page's
 * @returns {string}
 */
export function gatewayUrl(location = globalThis.location) {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
}

/**
 * Connects to the gateway at `url` and logs in.
 * @param {string | undefined} url `ws://host:port/`; default {@link gatewayUrl}
 * @param {Login} login
 * @param {Options} [options]
 * @returns {Promise<Client>} rejects with a {@link HypertyError} (close code
 *   1006 when the gateway cannot be reached or refuses the handshake, 1008
 *   with the gateway's reason when the login is refused)
 */
export async function connect(url, login, options = {}) {
  const client = new Client(url ?? gatewayUrl(), login, options);
  await client._open();
  return client;
}

/** A logged-in connection to the gateway. Made by {@link connect}. */
export class Client {
  /** @type {WebSocket | null} */
  #ws = null;
  #url;
  #login;
  #options;
  /** Ids are never reused within a client, across reconnects too. */
  #nextId = 1;
  /** @type {Map<number, {to: string, type: string, resolve: (m: Message) => void, reject: (e: HypertyError) => void, timer: any}>} */
  #pending = new Map();
  /** @type {Set<(m: Message) => void>} */
  #handlers = new Set();
  /** @type {Set<(s: Status) => void>} */
  #statusHandlers = new Set();
  /** @type {Map<string, Replica>} */
  #replicas = new Map();
  #closed = false;
  #attempt = 0;
  /** The address before the connection dropped. */
  #previous = "";
  /** @type {any} */
  #retryTimer = null;

  /**
   * @param {string} url
   * @param {Login} login
   * @param {Options} options
   */
  constructor(url, login, options) {
    this.#url = url;
    this.#login = login;
    this.#options = options;
    /** This connection's address on the bus, `app://<domain>/<id>` (new after a reconnect). */
    this.address = "";
    /** The user the gateway bound the connection to. */
    this.user = "";
    if (options.onStatus) this.#statusHandlers.add(options.onStatus);
  }

  /** Whether the connection is logged in now. */
  get connected() {
    return this.#ws !== null && this.address !== "";
  }

  /**
   * Opens the WebSocket and logs in; resolves once the gateway answered the
   * login.
   * @returns {Promise<void>}
   */
  _open() {
    const WS = this.#options.WebSocket ?? globalThis.WebSocket;
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WS(this.#url);
      } catch (e) {
        reject(new HypertyError(1006, `cannot open ${this.#url}: ${e}`));
        return;
      }
      let loggedIn = false;
      ws.onopen = () => {
        /** @type {Record<string, any>} */
        const frame = { type: "login", ...this.#login };
        ws.send(JSON.stringify(frame));
      };
      ws.onmessage = (event) => {
        if (loggedIn) {
          this.#frame(event.data);
          return;
        }
        let answer;
        try {
          answer = JSON.parse(event.data);
        } catch {
          answer = null;
        }
        if (answer?.type !== "login" || typeof answer.address !== "string") {
          ws.close(1002, "expected the login answer");
          return;
        }
        if (this.#closed) {
          ws.close(1000, "closed by the app");
          reject(new HypertyError("disconnected", "the client was closed"));
          return;
        }
        loggedIn = true;
        this.#ws = ws;
        this.address = answer.address;
        this.user = answer.user ?? "";
        this.#attempt = 0;
        resolve();
      };
      ws.onclose = (event) => {
        if (!loggedIn) {
          const why = event.reason || (event.code === 1006 ? `cannot connect to ${this.#url} (unreachable, or the handshake was refused: is this page's origin allowed?)` : "closed before the login was answered");
          reject(new HypertyError(event.code, why));
          return;
        }
        this.#dropped(ws, event.code, event.reason);
      };
    });
  }

  /**
   * Sends a notification (no answer expected; a refusal arrives at
   * `onError`). Returns its id.
   * @param {Outgoing} msg
   * @returns {number}
   * @throws {HypertyError} `"disconnected"` when not connected
   */
  send(msg) {
    const id = msg.id ?? this.#nextId++;
    this.#write({ ...msg, id, request: false });
    return id;
  }

  /**
   * Sends a request and waits for its response.
   * @param {Outgoing} msg
   * @param {{timeoutMs?: number}} [options] default the client's `requestTimeoutMs`
   * @returns {Promise<Message>} the response (code below 400); rejects with a
   *   {@link HypertyError}: the response's code and description on 4xx/5xx
   *   (a responder's error value `{error}` serves as the description when
   *   the host gave none), the error frame's kind, 408 after `timeoutMs`,
   *   or `"disconnected"`
   */
  request(msg, options = {}) {
    const id = this.#nextId++;
    const timeoutMs = options.timeoutMs ?? this.#options.requestTimeoutMs ?? 30000;
    return new Promise((resolve, reject) => {
      try {
        this.#write({ ...msg, id });
      } catch (e) {
        reject(e);
        return;
      }
      const timer = setTimeout(() => {
        if (this.#pending.delete(id)) reject(new HypertyError(408, `no response from ${msg.to} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { to: msg.to, type: msg.type, resolve, reject, timer });
    });
  }

  /**
   * Discovers what the runtime's registry knows (reTHINK discovery, as a
   * hyperty's `registry.discover`): the registrations matching every field
   * given, at most 100. Answered by the gateway itself (a `discover` frame),
   * not by a hyperty.
   * @param {{user?: string, name?: string, type?: string, domain?: string, scheme?: string}} query
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<Registration[]>}
   */
  discover(query, options = {}) {
    const id = this.#nextId++;
    const timeoutMs = options.timeoutMs ?? this.#options.requestTimeoutMs ?? 30000;
    return new Promise((resolve, reject) => {
      try {
        this.#write({ type: "discover", id, query });
      } catch (e) {
        reject(e);
        return;
      }
      const timer = setTimeout(() => {
        if (this.#pending.delete(id)) reject(new HypertyError(408, `no discovery answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { to: DISCOVERY, type: "discover", resolve: (m) => resolve(/** @type {any} */ (m).registrations ?? []), reject, timer });
    });
  }

  /**
   * Answers `request` (a message this client received) with `code` and a
   * JSON `value`.
   * @param {Message} request
   * @param {number} code
   * @param {any} [value]
   */
  respond(request, code, value) {
    if (!request.from) throw new HypertyError("not-a-message", "the request has no sender to answer");
    this.#write({ id: request.id, type: "response", to: request.from, body: { code, value } });
  }

  /**
   * Calls `handler` with every message for the app that is not a response
   * to one of its requests nor a delta applied to a replica (invitations,
   * requests, notifications). Returns a function that removes it.
   * @param {(m: Message) => void} handler
   * @returns {() => void}
   */
  onMessage(handler) {
    this.#handlers.add(handler);
    return () => this.#handlers.delete(handler);
  }

  /**
   * Calls `handler` with connection events ({@link Status}). Returns a
   * function that removes it.
   * @param {(s: Status) => void} handler
   * @returns {() => void}
   */
  onStatus(handler) {
    this.#statusHandlers.add(handler);
    return () => this.#statusHandlers.delete(handler);
  }

  /**
   * Subscribes to the data object at `url` and keeps a replica of it.
   * Subscribing twice to one URL gives the same replica.
   * @param {string} url
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<Replica>} rejects like {@link Client#request} (403: the
   *   reporter refused; 401/404 ...)
   */
  async subscribe(url, options = {}) {
    const existing = this.#replicas.get(url);
    if (existing) return existing;
    const answer = await this.request({ type: "subscribe", to: url }, options);
    const replica = this.#replicas.get(url) ?? new Replica(url, this);
    replica._reset(answer.body?.value, "subscribed");
    this.#replicas.set(url, replica);
    return replica;
  }

  /**
   * Reads the current state of a data object (`{version, data, children,
   * reporter, user, scheme}`): the reporter and subscribers may.
   * @param {string} url
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<any>}
   */
  async read(url, options = {}) {
    const answer = await this.request({ type: "read", to: url }, options);
    return answer.body?.value;
  }

  /**
   * Stops observing `url` (tells the object, forgets the replica).
   * @param {string} url
   */
  unsubscribe(url) {
    if (!this.#replicas.delete(url)) return;
    if (this.connected) this.request({ type: "unsubscribe", to: url }).catch(() => {});
  }

  /** Closes the connection for good: pending requests are rejected, no reconnect. */
  close() {
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    const ws = this.#ws;
    this.#ws = null;
    this.address = "";
    this.#rejectPending(new HypertyError("disconnected", "the client was closed"));
    ws?.close(1000, "closed by the app");
    this.#emit({ state: "closed", code: 1000, reason: "closed by the app" });
  }

  /** @param {Record<string, any>} frame */
  #write(frame) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== 1) throw new HypertyError("disconnected", "not connected to the gateway");
    ws.send(JSON.stringify(frame));
  }

  /** @param {string} text */
  #frame(text) {
    /** @type {any} */
    let m;
    try {
      m = JSON.parse(text);
    } catch {
      return;
    }
    if (m?.type === "error") {
      const waiting = typeof m.id === "number" ? this.#take(m.id) : undefined;
      const error = new HypertyError(m.error, m.description ?? "");
      if (waiting) waiting.reject(error);
      else this.#emitMessage(m);
      return;
    }
    if (m?.type === "discover" && this.#pending.get(m.id)?.to === DISCOVERY) {
      this.#take(m.id)?.resolve(m);
      return;
    }
    if (m?.type === "response") {
      const waiting = this.#pending.get(m.id);
      // A response counts only from the address the request went to.
      if (waiting && waiting.to === m.from) {
        this.#take(m.id);
        const code = m.body?.code ?? 500;
        if (code >= 400) waiting.reject(new HypertyError(code, describe(m), m));
        else waiting.resolve(m);
        return;
      }
    }
    const replica = this.#replicas.get(m?.from);
    if (replica && replica._apply(m)) return;
    this.#emitMessage(m);
  }

  /** @param {number} id */
  #take(id) {
    const waiting = this.#pending.get(id);
    if (!waiting) return undefined;
    this.#pending.delete(id);
    clearTimeout(waiting.timer);
    return waiting;
  }

  /** @param {Message} m */
  #emitMessage(m) {
    for (const handler of this.#handlers) {
      try {
        handler(m);
      } catch (e) {
        console.error("hyperty client: a message handler threw", e);
      }
    }
  }

  /** @param {Status} status */
  #emit(status) {
    for (const handler of this.#statusHandlers) {
      try {
        handler(status);
      } catch (e) {
        console.error("hyperty client: a status handler threw", e);
      }
    }
  }

  /** @param {HypertyError} error */
  #rejectPending(error) {
    const lost = [...this.#pending.entries()].map(([id, p]) => ({ id, type: p.type, to: p.to }));
    for (const id of [...this.#pending.keys()]) this.#take(id)?.reject(error);
    return lost;
  }

  /**
   * The logged-in connection `ws` closed.
   * @param {WebSocket} ws
   * @param {number} code
   * @param {string} reason
   */
  #dropped(ws, code, reason) {
    if (this.#ws !== ws || this.#closed) return;
    this.#ws = null;
    this.#previous = this.address;
    this.address = "";
    const requests = this.#rejectPending(new HypertyError("disconnected", `the connection dropped (${code}${reason ? `: ${reason}` : ""}) before the answer; the request may or may not have been delivered`));
    const subscriptions = [...this.#replicas.keys()];
    if (this.#options.reconnect === false) {
      this.#closed = true;
      this.#emit({ state: "closed", code, reason });
      return;
    }
    const retryInMs = this.#backoff();
    this.#emit({ state: "disconnected", code, reason, lost: { requests, subscriptions }, retryInMs });
    this.#retryTimer = setTimeout(() => this.#reconnect(), retryInMs);
  }

  /** The next wait: doubling from the initial backoff up to the maximum, with jitter (half to all of it). */
  #backoff() {
    const initial = this.#options.initialBackoffMs ?? 250;
    const max = this.#options.maxBackoffMs ?? 10000;
    const full = Math.min(max, initial * 2 ** Math.min(this.#attempt, 30));
    this.#attempt += 1;
    return Math.round(full / 2 + (Math.random() * full) / 2);
  }

  async #reconnect() {
    if (this.#closed) return;
    const previous = this.#previous;
    try {
      await this._open();
    } catch (e) {
      const error = /** @type {HypertyError} */ (e);
      if (error.code === 1008) {
        // The login is refused now: retrying will not change that.
        this.#closed = true;
        this.#emit({ state: "closed", code: 1008, reason: error.description });
        return;
      }
      const retryInMs = this.#backoff();
      this.#emit({ state: "disconnected", code: Number(error.code) || 1006, reason: error.description, lost: { requests: [], subscriptions: [...this.#replicas.keys()] }, retryInMs });
      this.#retryTimer = setTimeout(() => this.#reconnect(), retryInMs);
      return;
    }
    /** @type {string[]} */
    const resubscribed = [];
    /** @type {{url: string, error: HypertyError}[]} */
    const failed = [];
    for (const [url, replica] of [...this.#replicas]) {
      try {
        const answer = await this.request({ type: "subscribe", to: url });
        replica._reset(answer.body?.value, "resubscribed");
        resubscribed.push(url);
      } catch (e) {
        this.#replicas.delete(url);
        const error = /** @type {HypertyError} */ (e);
        replica._lost(error);
        failed.push({ url, error });
      }
    }
    this.#emit({ state: "connected", address: this.address, user: this.user, previous, resubscribed, failed });
  }
}

/** Stands for the gateway as the "receiver" of a discovery. */
const DISCOVERY = "(discovery)";

/**
 * The description of an error response: the host's `description`, else a
 * responder's `{error}` value.
 * @param {Message} m
 */
function describe(m) {
  const body = m.body ?? {};
  if (body.description) return body.description;
  if (body.value && typeof body.value.error === "string") return body.value.error;
  return `answered ${body.code}`;
}

/**
 * What changed, for `onChange` handlers: `update` (the data, with its
 * `patch`), `child` (its `name`, and `data` or `removed`), `deleted` (the
 * object), `subscribed`/`resubscribed`/`resynced` (the whole state was
 * loaded: first, after a reconnect, after a gap), `lost` (no longer kept
 * current: `error`).
 * @typedef {{kind: "update", patch: any[]} | {kind: "child", name: string, data?: any, removed?: boolean}
 *   | {kind: "deleted"} | {kind: "subscribed" | "resubscribed" | "resynced"} | {kind: "lost", error: HypertyError}} Change
 */

/** A data object as this client observes it. Made by {@link Client#subscribe}. */
export class Replica {
  /** @type {Set<(r: Replica, c: Change) => void>} */
  #handlers = new Set();
  #client;
  #reading = false;

  /**
   * @param {string} url
   * @param {Client} client
   */
  constructor(url, client) {
    this.#client = client;
    /** The object's URL. */
    this.url = url;
    /** The version held: every change of the data or a child is one more. */
    this.version = 0;
    /** The object's data. @type {any} */
    this.data = null;
    /** Its children by name. @type {Record<string, any>} */
    this.children = {};
    /** The reporter deleted the object. */
    this.deleted = false;
    /** The reporter's address and user, the object's scheme (from the state). */
    this.reporter = "";
    this.user = "";
    this.scheme = "";
  }

  /**
   * Calls `handler(replica, change)` after every change applied. Returns a
   * function that removes it.
   * @param {(r: Replica, c: Change) => void} handler
   * @returns {() => void}
   */
  onChange(handler) {
    this.#handlers.add(handler);
    return () => this.#handlers.delete(handler);
  }

  /** Stops observing (see {@link Client#unsubscribe}). */
  unsubscribe() {
    this.#client.unsubscribe(this.url);
  }

  /**
   * Loads a whole state (`{version, data, children, reporter, user, scheme}`).
   * @param {any} state
   * @param {"subscribed" | "resubscribed" | "resynced"} kind
   */
  _reset(state, kind) {
    if (!state || typeof state.version !== "number") throw new HypertyError("not-a-message", `the state of ${this.url} has no version`);
    this.version = state.version;
    this.data = state.data ?? null;
    this.children = state.children ?? {};
    this.reporter = state.reporter ?? "";
    this.user = state.user ?? "";
    this.scheme = state.scheme ?? "";
    this.deleted = false;
    this.#changed({ kind });
  }

  /** @param {HypertyError} error */
  _lost(error) {
    this.#changed({ kind: "lost", error });
  }

  /**
   * Applies a message from the object's URL; false if it is not a delta.
   * @param {Message} m
   * @returns {boolean}
   */
  _apply(m) {
    const value = m.body?.value;
    if (!["update", "create", "delete"].includes(m.type) || typeof value?.version !== "number") return false;
    if (value.version <= this.version) return true; // stale: already held
    if (value.version !== this.version + 1) {
      this.#resync();
      return true;
    }
    const resource = m.body?.resource ?? this.url;
    const child = resource.startsWith(`${this.url}/children/`) ? resource.slice(this.url.length + "/children/".length) : null;
    try {
      if (child === null && m.type === "update") {
        this.data = applyPatch(this.data, value.patch);
        this.version = value.version;
        this.#changed({ kind: "update", patch: value.patch });
      } else if (child === null && m.type === "delete") {
        this.deleted = true;
        this.version = value.version;
        this.#changed({ kind: "deleted" });
      } else if (child !== null && m.type === "delete") {
        delete this.children[child];
        this.version = value.version;
        this.#changed({ kind: "child", name: child, removed: true });
      } else if (child !== null) {
        this.children[child] = value.data;
        this.version = value.version;
        this.#changed({ kind: "child", name: child, data: value.data });
      } else {
        return false;
      }
    } catch (e) {
      // A delta that does not apply here: the copy is off; load it again.
      console.warn(`hyperty client: ${this.url}: ${e}; reading it again`);
      this.#resync();
    }
    return true;
  }

  /** Reads the state again (after a gap), once at a time. */
  #resync() {
    if (this.#reading) return;
    this.#reading = true;
    this.#client
      .read(this.url)
      .then((state) => {
        if (state.version > this.version) this._reset(state, "resynced");
      })
      .catch((e) => console.warn(`hyperty client: cannot read ${this.url} again: ${e}`))
      .finally(() => {
        this.#reading = false;
      });
  }

  /** @param {Change} change */
  #changed(change) {
    for (const handler of this.#handlers) {
      try {
        handler(this, change);
      } catch (e) {
        console.error("hyperty client: an onChange handler threw", e);
      }
    }
  }
}

/**
 * `doc` with the JSON Patch `patch` (RFC 6902) applied; `doc` is not
 * changed. Throws an Error naming the operation that does not apply.
 * @param {any} doc
 * @param {any[]} patch
 * @returns {any}
 */
export function applyPatch(doc, patch) {
  if (!Array.isArray(patch)) throw new Error("a patch is an array of operations");
  let result = structuredClone(doc);
  patch.forEach((op, i) => {
    try {
      result = applyOperation(result, op);
    } catch (e) {
      throw new Error(`operation ${i} (${op?.op} ${op?.path}): ${/** @type {Error} */ (e).message}`);
    }
  });
  return result;
}

/**
 * The reference tokens of a JSON Pointer (RFC 6901).
 * @param {string} pointer
 * @returns {string[]}
 */
function tokens(pointer) {
  if (pointer === "") return [];
  if (typeof pointer !== "string" || !pointer.startsWith("/")) throw new Error(`bad pointer ${JSON.stringify(pointer)}`);
  return pointer
    .slice(1)
    .split("/")
    .map((t) => t.replace(/~1/g, "/").replace(/~0/g, "~"));
}

/**
 * The container the last token of `path` is in, and that token.
 * @param {any} doc
 * @param {string[]} path
 * @returns {[any, string]}
 */
function parentOf(doc, path) {
  let node = doc;
  for (const t of path.slice(0, -1)) {
    node = child(node, t);
  }
  if (node === null || typeof node !== "object") throw new Error("the parent is not a container");
  return [node, path[path.length - 1]];
}

/**
 * @param {any} node
 * @param {string} token
 */
function child(node, token) {
  if (Array.isArray(node)) {
    const i = index(node, token, false);
    return node[i];
  }
  if (node !== null && typeof node === "object" && Object.hasOwn(node, token)) return node[token];
  throw new Error(`no member ${JSON.stringify(token)}`);
}

/**
 * An array index token: digits without leading zeros (RFC 6901 §4); `-`
 * (one past the end) only when adding.
 * @param {any[]} array
 * @param {string} token
 * @param {boolean} adding
 */
function index(array, token, adding) {
  if (adding && token === "-") return array.length;
  if (!/^(0|[1-9][0-9]*)$/.test(token)) throw new Error(`bad array index ${JSON.stringify(token)}`);
  const i = Number(token);
  if (i > array.length || (!adding && i === array.length)) throw new Error(`index ${i} out of bounds`);
  return i;
}

/**
 * @param {any} doc
 * @param {string} pointer
 */
function get(doc, pointer) {
  let node = doc;
  for (const t of tokens(pointer)) node = child(node, t);
  return node;
}

/**
 * @param {any} doc
 * @param {string[]} path
 * @param {any} value
 * @returns {any}
 */
function add(doc, path, value) {
  if (path.length === 0) return value;
  const [parent, last] = parentOf(doc, path);
  if (Array.isArray(parent)) parent.splice(index(parent, last, true), 0, value);
  else parent[last] = value;
  return doc;
}

/**
 * @param {any} doc
 * @param {string[]} path
 * @returns {[any, any]} the document and the removed value
 */
function remove(doc, path) {
  if (path.length === 0) return [null, doc];
  const [parent, last] = parentOf(doc, path);
  if (Array.isArray(parent)) return [doc, parent.splice(index(parent, last, false), 1)[0]];
  if (!Object.hasOwn(parent, last)) throw new Error(`no member ${JSON.stringify(last)}`);
  const removed = parent[last];
  delete parent[last];
  return [doc, removed];
}

/**
 * @param {any} doc
 * @param {any} op
 * @returns {any}
 */
function applyOperation(doc, op) {
  const path = tokens(op.path);
  switch (op.op) {
    case "add":
      return add(doc, path, structuredClone(op.value));
    case "remove":
      return remove(doc, path)[0];
    case "replace":
      return add(remove(doc, path)[0] ?? doc, path, structuredClone(op.value));
    case "move": {
      if (op.path.startsWith(`${op.from}/`)) throw new Error("cannot move a value into itself");
      const [rest, value] = remove(doc, tokens(op.from));
      return add(rest, path, value);
    }
    case "copy":
      return add(doc, path, structuredClone(get(doc, op.from)));
    case "test":
      if (!equal(get(doc, op.path), op.value)) throw new Error("test failed");
      return doc;
    default:
      throw new Error(`unknown operation ${JSON.stringify(op.op)}`);
  }
}

/**
 * JSON equality (RFC 6902 §4.6).
 * @param {any} a
 * @param {any} b
 * @returns {boolean}
 */
function equal(a, b) {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  if (Array.isArray(a)) return a.length === b.length && a.every((x, i) => equal(x, b[i]));
  const keys = Object.keys(a);
  return keys.length === Object.keys(b).length && keys.every((k) => Object.hasOwn(b, k) && equal(a[k], b[k]));
}
