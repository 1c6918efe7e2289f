// @ts-check
// Benchmark page (tests/benches/gateway.rs, `just bench`): in the browser,
// `rounds` round trips one at a time (after `warmup`) first to a bare
// WebSocket echo server (`echo`, a ws:// URL), then through the gateway
// with the JavaScript client (`client.request` to the hyperty `to`, logged
// in as the development user `user` of `domain`). POSTs to
// `<report>/report` {page: "bench", echo: Figures, gateway: Figures}, each
// {rate (round trips/s, from the total time), p50, p99 (µs)}, or
// {page: "bench", error, description}. performance.now() is coarsened by
// the browser (100 µs without cross-origin isolation): the rate is exact,
// the percentiles are to that grain.

import { connect } from "/.hyperty/client.js";

const params = new URLSearchParams(location.hash.slice(1));
const report = params.get("report");
const rounds = Number(params.get("rounds") ?? "2000");
const warmup = Number(params.get("warmup") ?? "200");

/** @param {any} body */
async function post(body) {
  await fetch(`${report}/report`, { method: "POST", body: JSON.stringify({ page: "bench", ...body }), headers: { "content-type": "text/plain" } });
}

/**
 * Runs `once` warmup + rounds times, one at a time.
 * @param {(i: number) => Promise<void>} once
 */
async function measure(once) {
  const times = [];
  let total = 0;
  for (let i = 0; i < warmup + rounds; i++) {
    const start = performance.now();
    await once(i);
    const took = performance.now() - start;
    if (i >= warmup) {
      times.push(took * 1000);
      total += took;
    }
  }
  times.sort((a, b) => a - b);
  const at = (/** @type {number} */ p) => times[Math.min(times.length - 1, Math.floor((times.length * p) / 100))];
  return { rate: rounds / (total / 1000), p50: at(50), p99: at(99) };
}

/** @param {string} url */
async function bareEcho(url) {
  const ws = new WebSocket(url);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error(`cannot open ${url}`));
  });
  /** @type {(v: any) => void} */
  let answered = () => {};
  ws.onmessage = (event) => answered(event.data);
  const figures = await measure(async (i) => {
    const answer = new Promise((resolve) => (answered = resolve));
    ws.send(JSON.stringify({ id: i, type: "execute", to: "x", body: { value: { n: i } } }));
    await answer;
  });
  ws.close();
  return figures;
}

try {
  const echo = await bareEcho(params.get("echo") ?? "");
  const client = await connect(undefined, { domain: params.get("domain") ?? "", user: params.get("user") ?? "" });
  const to = params.get("to") ?? "";
  const gateway = await measure(async (i) => {
    const answer = await client.request({ type: "execute", to, body: { value: { n: i } } });
    if (answer.body?.code !== 200) throw new Error(`round ${i}: ${JSON.stringify(answer)}`);
  });
  (/** @type {HTMLElement} */ (document.getElementById("result"))).textContent = JSON.stringify({ echo, gateway }, null, 2);
  await post({ echo, gateway });
} catch (e) {
  const error = /** @type {any} */ (e);
  await post({ error: error.code ?? "exception", description: error.description ?? String(e) });
}
