// permessage-deflate end to end: the edge compresses large frames for a
// client that offers the extension, and both the JS client in Node (the
// `ws` transport) and headless Chromium decode them. The edge's own
// counters prove the frames went compressed.
//
// SWITCHYARD_CHROMIUM: the browser (default /usr/bin/chromium).

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { SwitchyardClient } from "../dist/node.js";
import { startFleet, waitFor } from "./fleet.mjs";

const demoDir = join(dirname(fileURLToPath(import.meta.url)), "..", "dist", "demo");
const executablePath = process.env.SWITCHYARD_CHROMIUM ?? "/usr/bin/chromium";

let fleet;

before(async () => {
  fleet = await startFleet({ dev: true, demoDir });
});

after(async () => {
  await fleet?.stop();
});

/** A value of the edge's /metrics page (0 when absent). */
async function metric(name) {
  const text = await (await fetch(`${fleet.edgeAdminUrl}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `) || l.startsWith(`${name}{`));
  return line ? Number(line.split(" ").pop()) : 0;
}

/** An event whose frame is far above the edge's 256-byte minimum, and compresses well. */
function bigNews(user, n) {
  const text = `Market update ${n}: `.padEnd(4000, "all quiet on every desk; ");
  return fleet.publish("news", { data: { n, text }, target: { users: [user] }, durable: false });
}

test("the JS client in Node decodes compressed frames", async () => {
  const before = await metric("switchyard_edge_deflate_bytes_out_total");
  const client = new SwitchyardClient({ url: fleet.wsUrl, token: fleet.token("deflate-node") });
  const got = [];
  client.on("event", (e) => got.push(e));
  await client.connect();
  try {
    await bigNews("deflate-node", 1);
    await fleet.flush();
    await waitFor(() => got.length === 1, "the big event");
    assert.equal(got[0].data.n, 1);
    assert.ok(got[0].data.text.startsWith("Market update 1: "));
    assert.equal(got[0].data.text.length, 4000);
    const out = await metric("switchyard_edge_deflate_bytes_out_total");
    assert.ok(out > before, `the edge compressed nothing (deflate bytes out ${before} -> ${out})`);
  } finally {
    client.close();
  }
});

test("headless Chromium negotiates permessage-deflate and decodes compressed frames", async (t) => {
  if (!existsSync(executablePath)) {
    t.skip(`no browser at ${executablePath}`);
    return;
  }
  const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox", "--disable-gpu"] });
  try {
    const page = await browser.newPage();
    // Same origin as the edge (its demo page), so the browser's Origin is accepted.
    await page.goto(`${fleet.httpUrl}/demo/?user=deflate-browser`);
    const token = fleet.token("deflate-browser");
    const opened = page.evaluate(
      ({ url, token }) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url, ["switchyard.v1.json"]);
          window.deflateTest = { ws, events: [] };
          ws.onopen = () => ws.send(JSON.stringify({ op: "auth", token }));
          ws.onmessage = (m) => {
            const f = JSON.parse(m.data);
            if (f.op === "ready") resolve(ws.extensions);
            if (f.op === "event") window.deflateTest.events.push(f);
          };
          ws.onerror = () => reject(new Error("websocket error"));
        }),
      { url: fleet.wsUrl, token },
    );
    const extensions = await opened;
    assert.match(extensions, /permessage-deflate/, `negotiated: ${extensions}`);
    const before = await metric("switchyard_edge_deflate_bytes_out_total");
    await bigNews("deflate-browser", 2);
    await fleet.flush();
    await waitFor(async () => (await page.evaluate(() => window.deflateTest.events.length)) === 1, "the big event in Chromium");
    const ev = await page.evaluate(() => window.deflateTest.events[0]);
    assert.equal(ev.data.n, 2);
    assert.equal(ev.data.text.length, 4000);
    const out = await metric("switchyard_edge_deflate_bytes_out_total");
    assert.ok(out > before, `the edge compressed nothing for Chromium (deflate bytes out ${before} -> ${out})`);
  } finally {
    await browser.close();
  }
});
