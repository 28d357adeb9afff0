// The React entry (`@switchyard/client/react`) in headless Chromium with
// React 19 against a real edge, router and nats-server: the provider
// connects, useSwitchyard re-renders on state changes, useSubscription
// subscribes on mount, renders the latest event per key, subscribes again
// when its spec changes (and, for a snapshot spec, after a reconnect) and
// unsubscribes on unmount (seen from a second, Node client of the same
// user: subscriptions belong to the user).
// The page (test/react-app.mjs) is bundled here with esbuild.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { chromium } from "playwright-core";
import { SwitchyardClient } from "../dist/node.js";
import { probeFeatures, sleep, startFleet, waitFor } from "./fleet.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const executablePath = process.env.SWITCHYARD_CHROMIUM ?? "/usr/bin/chromium";

let fleet;
let browser;
let bundle;
let features;

before(async () => {
  assert.ok(existsSync(join(here, "..", "dist", "react.js")), "build the package first (npm run build)");
  assert.ok(existsSync(executablePath), `no browser at ${executablePath} (apt-get install chromium)`);
  const built = await esbuild.build({
    entryPoints: [join(here, "react-app.mjs")],
    bundle: true,
    format: "iife",
    platform: "browser",
    target: "es2020",
    write: false,
    logLevel: "silent",
    define: { "process.env.NODE_ENV": '"development"' },
  });
  bundle = built.outputFiles[0].text;
  fleet = await startFleet();
  features = await probeFeatures(fleet);
  browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox", "--disable-gpu", "--no-first-run"] });
});

after(async () => {
  await browser?.close();
  await fleet?.stop();
});

function px(symbol, price) {
  return fleet.publish(`px.${symbol}`, { data: { symbol, price }, target: { match: { symbol } }, durable: false });
}

async function openApp(user, spec, extra = {}) {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });
  await page.setContent('<!doctype html><html><body><div id="root"></div></body></html>');
  await page.evaluate((c) => {
    window.reactTestConfig = c;
  }, { url: fleet.wsUrl, token: fleet.token(user), spec, ...extra });
  await page.addScriptTag({ content: bundle });
  return { page, errors };
}

const text = (page, sel) => page.textContent(sel);

test("provider, useSwitchyard and useSubscription against a real edge", async () => {
  const user = "rhea";
  const observer = new SwitchyardClient({ url: fleet.wsUrl, token: () => fleet.token(user) });
  await observer.connect();
  const subNames = async () => (await observer.list()).map((s) => `${s.sub}:${JSON.stringify(s.filters)}`);
  const { page, errors } = await openApp(user, { sub: "ui", type: "px", filters: { symbol: ["AAPL", "TSLA"] } });
  try {
    await page.waitForFunction(() => document.querySelector("#conn")?.textContent === "open", null, { timeout: 15_000 });
    await page.waitForFunction(() => document.querySelector("#status")?.textContent === "active", null, { timeout: 15_000 });
    assert.equal(await text(page, "#online"), "true");
    // StrictMode mounted, unmounted and mounted again: the subscription is there once.
    assert.deepEqual(await subNames(), ['ui:{"symbol":["AAPL","TSLA"]}']);

    await px("AAPL", 1);
    await px("TSLA", 2);
    await px("NVDA", 3);
    await px("AAPL", 4);
    await fleet.flush();
    await page.waitForFunction(
      () => [...document.querySelectorAll("#latest li")].map((li) => li.textContent).join(" ") === "AAPL=4 TSLA=2",
      null,
      { timeout: 15_000 },
    );
    // AAPL 1 may have been conflated away (keyed, backlogged): two or three events.
    const count = Number(await text(page, "#count"));
    assert.ok(count >= 2 && count <= 3, `count ${count}`);

    // A new spec (compared by value): subscribed again under the same name, state started over.
    await page.evaluate(() => window.reactTest.setSpec({ type: "px", sub: "ui", filters: { symbol: ["NVDA"] } }));
    await waitFor(async () => (await subNames()).join() === 'ui:{"symbol":["NVDA"]}', "the replaced subscription", 15_000);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent === "active", null, { timeout: 15_000 });
    await px("NVDA", 5);
    await fleet.flush();
    await page.waitForFunction(() => document.querySelector("#latest")?.textContent === "NVDA=5", null, { timeout: 15_000 });
    assert.equal(await text(page, "#count"), "1");
    // An equal spec in a new object changes nothing.
    const rendersBefore = await page.evaluate(() => window.reactTest.renders.ticker);
    await page.evaluate(() => window.reactTest.setSpec({ sub: "ui", type: "px", filters: { symbol: ["NVDA"] } }));
    await page.waitForFunction((n) => window.reactTest.renders.ticker > n, rendersBefore, { timeout: 15_000 });
    assert.equal(await text(page, "#count"), "1", "not subscribed again: the state did not start over");
    assert.equal(await text(page, "#status"), "active");

    // A refused spec shows the edge's error code.
    await page.evaluate(() => window.reactTest.setSpec({ sub: "bad name!", type: "px" }));
    await page.waitForFunction(() => document.querySelector("#status")?.textContent === "error", null, { timeout: 15_000 });
    assert.equal(await text(page, "#error"), "invalid_filter");
    await page.evaluate(() => window.reactTest.setSpec({ sub: "ui", type: "px", filters: { symbol: ["MSFT"] } }));
    await page.waitForFunction(() => document.querySelector("#status")?.textContent === "active", null, { timeout: 15_000 });

    // Unmounting the subscriber unsubscribes; unmounting the provider closes its client.
    await page.evaluate(() => window.reactTest.setSpec(undefined));
    await waitFor(async () => (await subNames()).length === 0, "unsubscribed on unmount", 15_000);
    await page.evaluate(() => window.reactTest.unmount());
    assert.deepEqual(errors, []);
  } finally {
    observer.close();
    await page.close();
  }
});

test("a shared client: a snapshot spec is sent again after a reconnect (values missed while away)", async () => {
  const spec = { sub: "ui", type: "px", filters: { symbol: ["IBM"] }, snapshot: true };
  const { page, errors } = await openApp("remy", spec, { sharedClient: true });
  try {
    await page.waitForFunction(() => document.querySelector("#status")?.textContent === "active", null, { timeout: 15_000 });
    const first = await page.evaluate(() => window.reactTest.subscribes.length);
    await page.evaluate(() => window.reactTest.client.reconnect());
    await page.waitForFunction((n) => window.reactTest.subscribes.length > n, first, { timeout: 15_000 });
    await page.waitForFunction(() => document.querySelector("#status")?.textContent === "active" && document.querySelector("#conn")?.textContent === "open", null, {
      timeout: 15_000,
    });
    const sent = await page.evaluate(() => window.reactTest.subscribes);
    assert.deepEqual(sent.at(-1), spec, "the same spec, snapshot included");
    assert.ok((await page.evaluate(() => window.reactTest.client.stats.connects)) >= 2);
    // The provider does not close a client it was given.
    await page.evaluate(() => window.reactTest.unmount());
    await sleep(50);
    assert.equal(await page.evaluate(() => window.reactTest.client.state), "open");
    await page.evaluate(() => window.reactTest.client.close());
    assert.deepEqual(errors, []);
  } finally {
    await page.close();
  }
});

test("useSubscription with snapshot: true renders the keys' latest values at once", async (t) => {
  if (!features.snapshot) return t.skip(`the fleet's edge does not implement snapshot yet (${features.detail})`);
  const user = "sora";
  // A witness sees the events go through, so the fleet knows them before the page subscribes.
  const witness = new SwitchyardClient({ url: fleet.wsUrl, token: () => fleet.token(`${user}-witness`) });
  const seen = [];
  witness.onEvent("px", (e) => seen.push(`${e.data.symbol}=${e.data.price}`));
  await witness.connect();
  await witness.subscribe({ sub: "w", type: "px", filters: { symbol: ["META", "AMZN"] } });
  await px("META", 7);
  await px("AMZN", 8);
  await px("META", 9);
  await fleet.flush();
  await waitFor(() => seen.includes("AMZN=8") && seen.includes("META=9"), "the witness saw the latest of each key");
  witness.close();
  const { page, errors } = await openApp(user, { sub: "ui", type: "px", filters: { symbol: ["META", "AMZN"] }, snapshot: true });
  try {
    await page.waitForFunction(
      () => [...document.querySelectorAll("#latest li")].map((li) => `${li.textContent}/${li.dataset.snapshot}`).join(" ") === "AMZN=8/true META=9/true",
      null,
      { timeout: 15_000 },
    );
    assert.equal(await text(page, "#live"), "0", "snapshots are not live ticks");
    await px("META", 10);
    await fleet.flush();
    await page.waitForFunction(() => document.querySelector('#latest li[data-key="META"]')?.textContent === "META=10", null, { timeout: 15_000 });
    assert.equal(await text(page, "#live"), "1");
    assert.deepEqual(errors, []);
  } finally {
    await page.close();
  }
});
