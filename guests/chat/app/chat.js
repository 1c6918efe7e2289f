// @ts-check
// The chat page: logs in to the gateway that serves it (as the development
// user the URL fragment names, `#domain=alice.example&user=alice@alice.example`,
// or the login form), finds its domain's chat hyperty, joins the room and
// renders it from a replica of the room's data object; sending goes through
// the chat hyperty. `body[data-state]` says where it is: login, connecting,
// ready, error.

import { connect } from "/.hyperty/client.js";

/** @typedef {import("/.hyperty/client.js").Client} Client */
/** @typedef {import("/.hyperty/client.js").Replica} Replica */

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

/**
 * Shows `text` in the status line.
 * @param {string} text
 * @param {boolean} [error]
 */
function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

/** @param {string} state */
function setState(state) {
  document.body.dataset.state = state;
}

/**
 * Renders the room's data: members and messages.
 * @param {Replica} room
 * @param {string} me
 */
function render(room, me) {
  const data = room.data ?? {};
  $("title").textContent = data.title ?? "hyperty chat";
  $("members").replaceChildren(
    ...(data.members ?? []).map((/** @type {string} */ user) => {
      const li = document.createElement("li");
      li.textContent = user;
      return li;
    }),
  );
  const list = $("messages");
  list.replaceChildren(
    ...(data.messages ?? []).map((/** @type {{seq: number, user: string, text: string}} */ m) => {
      const li = document.createElement("li");
      li.dataset.seq = String(m.seq);
      li.dataset.user = m.user;
      li.classList.toggle("mine", m.user === me);
      const user = document.createElement("span");
      user.className = "user";
      user.textContent = m.user;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = m.text;
      li.append(user, text);
      return li;
    }),
  );
  list.lastElementChild?.scrollIntoView({ block: "end" });
}

/**
 * Joins the room through `chat` (the domain's chat hyperty) and subscribes
 * to it.
 * @param {Client} client
 * @param {string} chat
 * @returns {Promise<Replica>}
 */
async function join(client, chat) {
  const joined = await client.request({ type: "execute", to: chat, body: { value: { op: "join" } } });
  const room = await client.subscribe(joined.body?.value.room);
  room.onChange(() => render(room, client.user));
  render(room, client.user);
  return room;
}

/** The logged-in client, once there is one. @type {Client | null} */
let client = null;
/** The address of the domain's chat hyperty. */
let chat = "";

/**
 * Logs in and runs the chat.
 * @param {string} domain
 * @param {string} user
 */
async function start(domain, user) {
  $("login").hidden = true;
  setState("connecting");
  status(`connecting as ${user}…`);
  /** @type {Client} */
  let connected;
  try {
    connected = await connect(undefined, { domain, user });
  } catch (e) {
    const error = /** @type {import("/.hyperty/client.js").HypertyError} */ (e);
    setState("error");
    status(`cannot log in: ${error.description}`, true);
    return;
  }
  $("who").textContent = `${connected.user} · ${connected.address}`;
  try {
    const [found] = await connected.discover({ domain, name: "chat" });
    if (!found) throw new Error(`${domain} has no chat hyperty`);
    chat = found.address;
    await join(connected, chat);
  } catch (e) {
    setState("error");
    status(`cannot join the room: ${/** @type {any} */ (e).description ?? e}`, true);
    return;
  }
  connected.onStatus(async (s) => {
    if (s.state === "disconnected") {
      setState("offline");
      const lost = s.lost.requests.length ? `; ${s.lost.requests.length} message(s) may not have been sent` : "";
      status(`connection lost (${s.reason || s.code}); reconnecting in ${Math.round(s.retryInMs / 100) / 10} s${lost}`, true);
    } else if (s.state === "connected") {
      $("who").textContent = `${connected.user} · ${connected.address}`;
      try {
        // The room admits invited addresses: a new address joins again.
        if (s.failed?.length) await join(connected, chat);
        setState("ready");
        status("reconnected");
      } catch (e) {
        setState("error");
        status(`cannot join the room again: ${/** @type {any} */ (e).description ?? e}`, true);
      }
    } else if (s.state === "closed") {
      setState("error");
      status(`disconnected: ${s.reason || s.code}`, true);
    }
  });
  client = connected;
  setState("ready");
  status("");
  $("room").hidden = false;
  /** @type {HTMLInputElement} */ (say.elements.namedItem("text")).focus();
}

const say = /** @type {HTMLFormElement} */ ($("say"));
say.addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = /** @type {HTMLInputElement} */ (say.elements.namedItem("text"));
  const text = input.value.trim();
  if (!text) return;
  if (!client) {
    status("not sent: not logged in", true);
    return;
  }
  try {
    await client.request({ type: "execute", to: chat, body: { value: { op: "say", text } } });
    input.value = "";
    status("");
  } catch (e) {
    const error = /** @type {import("/.hyperty/client.js").HypertyError} */ (e);
    status(`not sent: ${error.code} ${error.description}`, true);
  }
});

const fragment = new URLSearchParams(location.hash.slice(1));
const login = /** @type {HTMLFormElement} */ ($("login"));
if (fragment.get("user")) {
  start(fragment.get("domain") ?? "", fragment.get("user") ?? "");
} else {
  login.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(login);
    const domain = String(data.get("domain"));
    const user = String(data.get("user"));
    history.replaceState(null, "", `#${new URLSearchParams({ domain, user })}`);
    start(domain, user);
  });
}
