// @ts-check
// Test page (tests/tests/browser.rs): shows the chat page (index.html) once
// per user, side by side in same-origin frames, and drives their real UI.
// Fragment: `pages` (JSON: [{name, domain, user}]) and, unless it only
// shows them (for a screenshot), `report` (the test's HTTP endpoint, see
// tests/src/browser.rs).
// - Whenever what a page shows changes, it POSTs {page, seq, state,
//   status, members, messages: [{user, text}]} to `<report>/report`.
// - It takes commands from `<report>/command`: {op: "say", page, text}
//   types and submits a message in that page's form; {op: "raw", id,
//   frames} opens a WebSocket of its own to the gateway, sends `frames`
//   (JSON) as soon as it is open and reports {page: "raw", id, received,
//   code, reason} when the gateway closes it.
// With `hold` (an URL of the same endpoint) instead of `report`, for a
// screenshot (`--virtual-time-budget`): until every page is ready (or
// failed) it keeps a request to `<hold>/command` pending, which pauses
// Chromium's virtual time, so the budget is spent on a page that has
// rendered the room, not on one still logging in.

const params = new URLSearchParams(location.hash.slice(1));
const report = params.get("report");
const hold = params.get("hold");
/** @type {{name: string, domain: string, user: string}[]} */
const pages = JSON.parse(params.get("pages") ?? "[]");
/** @type {Map<string, HTMLIFrameElement>} */
const pageFrames = new Map();
let seq = 0;

/** @param {any} body */
async function post(body) {
  if (!report) return;
  await fetch(`${report}/report`, { method: "POST", body: JSON.stringify({ ...body, seq: ++seq }), headers: { "content-type": "text/plain" } });
}

/**
 * What a chat page shows.
 * @param {Document} doc
 */
function snapshot(doc) {
  return {
    state: doc.body?.dataset.state ?? "",
    status: doc.getElementById("status")?.textContent ?? "",
    members: [...doc.querySelectorAll("#members li")].map((li) => li.textContent),
    messages: [...doc.querySelectorAll("#messages li")].map((li) => ({
      user: /** @type {HTMLElement} */ (li).dataset.user,
      text: li.querySelector(".text")?.textContent,
    })),
  };
}

/**
 * Reports what page `name` shows, now and after every change.
 * @param {string} name
 * @param {HTMLIFrameElement} frame
 */
function watch(name, frame) {
  const doc = /** @type {Document} */ (frame.contentDocument);
  let last = "";
  let queued = false;
  const send = () => {
    queued = false;
    const now = JSON.stringify(snapshot(doc));
    if (now === last) return;
    last = now;
    changed();
    post({ page: name, ...JSON.parse(now) });
  };
  new MutationObserver(() => {
    if (!queued) {
      queued = true;
      queueMicrotask(send);
    }
  }).observe(doc, { subtree: true, childList: true, characterData: true, attributes: true });
  send();
}

for (const page of pages) {
  const frame = document.createElement("iframe");
  frame.title = page.name;
  frame.src = `index.html#${new URLSearchParams({ domain: page.domain, user: page.user })}`;
  frame.addEventListener("load", () => watch(page.name, frame), { once: true });
  pageFrames.set(page.name, frame);
  document.body.append(frame);
}

/** @param {any} command */
function run(command) {
  if (command.op === "say") {
    const doc = /** @type {Document} */ (pageFrames.get(command.page)?.contentDocument);
    const form = /** @type {HTMLFormElement} */ (doc.getElementById("say"));
    /** @type {HTMLInputElement} */ (form.elements.namedItem("text")).value = command.text;
    form.requestSubmit();
  } else if (command.op === "raw") {
    /** @type {any[]} */
    const received = [];
    const ws = new WebSocket(`ws://${location.host}/`);
    ws.onopen = () => command.frames.forEach((/** @type {any} */ f) => ws.send(JSON.stringify(f)));
    ws.onmessage = (e) => received.push(JSON.parse(e.data));
    ws.onclose = (e) => post({ page: "raw", id: command.id, received, code: e.code, reason: e.reason });
  }
}

/** Called whenever a page's view changes. */
let changed = () => {};

if (hold) {
  const controller = new AbortController();
  const settled = (/** @type {HTMLIFrameElement} */ f) => {
    const doc = f.contentDocument;
    const state = doc?.body?.dataset.state;
    return state === "error" || (state === "ready" && (doc?.querySelectorAll("#members li").length ?? 0) > 0);
  };
  // Not a timer: timers wait on virtual time, which the hold pauses.
  changed = () => {
    if ([...pageFrames.values()].every(settled)) controller.abort();
  };
  (async () => {
    while (!controller.signal.aborted) {
      await fetch(`${hold}/command`, { signal: controller.signal }).catch(() => {});
    }
  })();
}

if (report) {
  (async () => {
    for (;;) {
      try {
        const answer = await fetch(`${report}/command`);
        if (answer.status === 200) run(await answer.json());
      } catch (e) {
        await post({ page: "driver", error: String(e) });
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  })();
}
