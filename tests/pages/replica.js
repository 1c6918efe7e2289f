// @ts-check
// Test page (tests/tests/browser.rs): logs in as the development user the
// fragment names (`domain`, `user`), subscribes to the data object `url`
// through the JavaScript client and POSTs to `<report>/report`, after the
// subscription and every change, {page: "replica", change, version, data,
// children, deleted}; a failure as {page: "replica", error, description};
// every connection event as {page: "replica", status: {state, ...}}.

import { connect } from "/.hyperty/client.js";

const params = new URLSearchParams(location.hash.slice(1));
const report = params.get("report");

/** @param {any} body */
async function post(body) {
  await fetch(`${report}/report`, { method: "POST", body: JSON.stringify({ page: "replica", ...body }), headers: { "content-type": "text/plain" } });
}

try {
  const client = await connect(undefined, { domain: params.get("domain") ?? "", user: params.get("user") ?? "" }, { initialBackoffMs: 100, maxBackoffMs: 1000 });
  client.onStatus((status) => post({ status }));
  const replica = await client.subscribe(params.get("url") ?? "");
  const show = (/** @type {string} */ change) => {
    const { version, data, children, deleted } = replica;
    (/** @type {HTMLElement} */ (document.getElementById("state"))).textContent = JSON.stringify({ version, data, children, deleted }, null, 2);
    post({ change, version, data, children, deleted });
  };
  replica.onChange((_, change) => show(change.kind));
  show("subscribed");
} catch (e) {
  const error = /** @type {any} */ (e);
  post({ error: error.code ?? "exception", description: error.description ?? String(e) });
}
