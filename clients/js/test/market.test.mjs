// Protocol 1.1 market-data features end to end, against a real edge, router
// and nats-server: snapshots (`snapshot: true` on subscribe) and throttling
// (`throttle_ms`). Written against PROTOCOL.md ("Snapshots (1.1)",
// "Throttling (1.1)"); each test is skipped, saying why, when the fleet's
// binaries do not implement the field yet (probeFeatures in fleet.mjs: such a
// server ignores the field instead of refusing a bad value).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { SwitchyardClient } from "../dist/node.js";
import { probeFeatures, startFleet, waitFor } from "./fleet.mjs";

let fleet;
let features;
const clients = [];

function binariesVersion() {
  try {
    return readFileSync(join(process.env.SWITCHYARD_BIN_DIR ?? "", "VERSION"), "utf8").trim().slice(0, 12);
  } catch {
    return "unknown";
  }
}

function unsupported(field) {
  return `the fleet's edge does not implement ${field} yet (binaries ${binariesVersion()}: ${features.detail})`;
}

before(async () => {
  fleet = await startFleet();
  features = await probeFeatures(fleet);
});

after(async () => {
  for (const c of clients) c.close();
  await fleet?.stop();
});

function newClient(user, options = {}) {
  const c = new SwitchyardClient({
    url: fleet.wsUrl,
    token: () => fleet.token(user),
    reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
    ...options,
  });
  clients.push(c);
  return c;
}

/** A keyed event of type `type` for `symbol` (the subject's key token is the symbol). */
function quote(type, symbol, data, durable = false) {
  return fleet.publish(`${type}.${symbol}`, { data: { symbol, ...data }, target: { match: { symbol } }, durable });
}

test("the 1.1 subscription fields are sent and accepted (whatever the server does with them)", async () => {
  const c = newClient("uma");
  await c.connect();
  await c.subscribe({ sub: "w", type: "quote", filters: { symbol: ["AAPL"] }, snapshot: true, throttle_ms: 250 });
  assert.deepEqual((await c.list()).map((s) => s.sub), ["w"]);
  await assert.rejects(c.subscribe({ sub: "w", type: "quote", throttle_ms: 0 }), (e) => e.code === "invalid_filter");
  await c.unsubscribe("w");
  c.close();
});

test("snapshot: a subscribe with snapshot: true gets each matching key's latest event, then the live ones", async (t) => {
  if (!features.snapshot) return t.skip(unsupported("snapshot"));
  // A witness sees the producer's events go through, so the latest per key is known to the fleet before subscribing.
  const witness = newClient("sam-witness");
  const seen = [];
  witness.onEvent("px", (e) => seen.push(e));
  await witness.connect();
  await witness.subscribe({ sub: "all", type: "px" });
  await quote("px", "AAPL", { price: 1 }, true);
  await quote("px", "AAPL", { price: 2 }, true);
  await quote("px", "TSLA", { price: 250 });
  await quote("px", "NVDA", { price: 120 });
  await fleet.flush();
  // (The two AAPL events may be conflated on the witness's connection: wait for the last of each key.)
  const saw = (sym, price) => seen.some((e) => e.key === sym && e.data.price === price);
  await waitFor(() => saw("AAPL", 2) && saw("TSLA", 250) && saw("NVDA", 120), "the witness saw the latest of each key");

  const c = newClient("sam");
  const got = [];
  c.onEvent("px", (e) => got.push(e));
  const ready = await c.connect();
  const positions = [];
  c.on("position", (p) => positions.push(p));
  await c.subscribe({ sub: "watch", type: "px", filters: { symbol: ["AAPL", "TSLA"] }, snapshot: true });
  await waitFor(() => got.filter((e) => e.snapshot).length === 2, "two snapshots (AAPL, TSLA)", 10_000);
  const snap = Object.fromEntries(got.filter((e) => e.snapshot).map((e) => [e.key, e]));
  assert.deepEqual(Object.keys(snap).sort(), ["AAPL", "TSLA"], "NVDA does not match the filters");
  assert.equal(snap.AAPL.data.price, 2, "the latest event of the key");
  assert.equal(snap.TSLA.data.price, 250);
  for (const e of Object.values(snap)) {
    assert.equal(e.snapshot, true);
    assert.equal(e.pos, undefined, "snapshots carry no pos");
    assert.equal(e.type, "px");
  }
  assert.equal(c.stats.snapshots, 2);
  assert.deepEqual(c.position, { epoch: ready.epoch, pos: ready.pos }, "snapshots do not move the resume position");
  assert.deepEqual(positions, []);

  // A live event of the same key comes after its snapshot.
  await quote("px", "AAPL", { price: 3 });
  await fleet.flush();
  await waitFor(() => got.some((e) => !e.snapshot && e.data.price === 3), "the live AAPL event", 10_000);
  const aapl = got.filter((e) => e.key === "AAPL").map((e) => [e.data.price, e.snapshot === true]);
  assert.deepEqual(aapl, [[2, true], [3, false]]);
  // Keeping the last event per key ends at the latest value.
  const latest = new Map(got.map((e) => [e.key, e.data.price]));
  assert.deepEqual(Object.fromEntries(latest), { AAPL: 3, TSLA: 250 });

  // Without snapshot: nothing but live events.
  const d = newClient("sam-plain");
  const plain = [];
  d.onEvent("px", (e) => plain.push(e));
  await d.connect();
  await d.subscribe({ sub: "watch", type: "px", filters: { symbol: ["AAPL"] } });
  await quote("px", "AAPL", { price: 4 });
  await fleet.flush();
  await waitFor(() => plain.length >= 1, "a live event");
  assert.deepEqual(plain.map((e) => [e.data.price, e.snapshot === true]), [[4, false]]);
  for (const x of [c, d, witness]) x.close();
});

test("throttle_ms: a burst of 20 events per key arrives merged, ending with each key's last value", async (t) => {
  if (!features.throttle) return t.skip(unsupported("throttle_ms"));
  const c = newClient("tom");
  const got = [];
  c.onEvent("bq", (e) => got.push(e));
  await c.connect();
  await c.subscribe({ sub: "slow", type: "bq", filters: { symbol: ["AAA", "BBB"] }, throttle_ms: 1000 });
  for (let seq = 1; seq <= 20; seq++) {
    await quote("bq", "AAA", { seq });
    await quote("bq", "BBB", { seq });
  }
  await fleet.flush();
  const last = (key) => got.filter((e) => e.key === key).at(-1)?.data.seq;
  await waitFor(() => last("AAA") === 20 && last("BBB") === 20, "the last value of each key", 15_000);
  assert.ok(got.length <= 10, `far fewer than 40 events: got ${got.length} (${got.map((e) => `${e.key}${e.data.seq}`)})`);
  for (const key of ["AAA", "BBB"]) {
    const seqs = got.filter((e) => e.key === key).map((e) => e.data.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), `${key}: nothing stale after a newer value`);
    assert.equal(new Set(seqs).size, seqs.length, `${key}: no value twice`);
  }
  assert.deepEqual(c.stats.dropped, {}, "throttled-away events are not reported as dropped");
  c.close();
});
