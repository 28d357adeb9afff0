// The library against a real edge, router and nats-server (child processes
// on free loopback ports): both auth modes and encodings, every op, batches
// and dropped notices, resume across an edge restart with reconnect advice,
// the heartbeat watchdog against a frozen edge, token refresh, the network
// going away and coming back (a TCP proxy cut while the client is told it is
// offline).

import assert from "node:assert/strict";
import { createServer, connect as tcpConnect } from "node:net";
import { after, before, describe, test } from "node:test";
import { encode } from "@msgpack/msgpack";
import { SwitchyardClient, wsTransport } from "../dist/node.js";
import { sleep, startFleet, waitFor } from "./fleet.mjs";

let fleet;
const clients = [];

before(async () => {
  fleet = await startFleet({ edgeArgs: ["--heartbeat-ms", "500"] });
});

after(async () => {
  for (const c of clients) c.close();
  await fleet?.stop();
});

function newClient(sub, options = {}) {
  const c = new SwitchyardClient({
    url: fleet.wsUrl,
    token: () => fleet.token(sub),
    reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
    connectTimeoutMs: 2000,
    ...options,
  });
  clients.push(c);
  return c;
}

/** Collects events of a client. */
function collect(c) {
  const events = [];
  c.on("event", (e) => events.push(e));
  return events;
}

/** A loopback TCP proxy to `port` whose connections can all be cut at once (a network that goes away). */
function tcpProxy(port) {
  const open = new Set();
  const proxy = { accepted: 0, url: "", cut, close: () => new Promise((ok) => (cut(), server.close(() => ok()))) };
  function cut() {
    for (const s of open) s.destroy();
    open.clear();
  }
  const server = createServer((down) => {
    proxy.accepted++;
    const up = tcpConnect(port, "127.0.0.1");
    for (const s of [down, up]) {
      open.add(s);
      s.on("error", () => {});
      s.on("close", () => {
        open.delete(s);
        down.destroy();
        up.destroy();
      });
    }
    down.pipe(up);
    up.pipe(down);
  });
  return new Promise((ok) =>
    server.listen(0, "127.0.0.1", () => {
      proxy.url = `ws://127.0.0.1:${server.address().port}/ws`;
      ok(proxy);
    }),
  );
}

/** A network source the test switches (what NetInfo or `online`/`offline` events would say). */
function fakeNetwork() {
  let online = true;
  const cbs = new Set();
  return {
    isOnline: () => online,
    subscribe(cb) {
      cbs.add(cb);
      return () => cbs.delete(cb);
    },
    set(value) {
      online = value;
      for (const cb of [...cbs]) cb(value);
    },
    listeners: () => cbs.size,
  };
}

/** An event for `user` on a subject without a key token: never conflated, so a burst arrives whole. */
function unkeyed(user, seq) {
  return fleet.publish("alert", { data: { seq }, target: { users: [user] } });
}

/** Publishes an event for `user` with a sequence number. */
function direct(user, seq, extra = {}) {
  return fleet.publish(`alert.${user}`, { data: { seq }, target: { users: [user] }, ...extra });
}

describe("ops", () => {
  test("header auth, MessagePack: subscribe, typed events, list, unsubscribe, ping", async () => {
    const c = newClient("alice");
    const events = collect(c);
    const ticks = [];
    c.onEvent("tick", (e) => ticks.push(e));
    const ready = await c.connect();
    assert.equal(ready.user, "alice");
    assert.equal(c.encoding, "msgpack");
    assert.equal(c.state, "open");
    assert.ok(ready.limits.rate_per_s > 0 && ready.heartbeatMs === 500);
    await c.subscribe({ sub: "ticks", type: "tick", filters: { symbol: ["AAPL", "TSLA"] }, min: { price: 1 } });
    await fleet.publish("tick.AAPL", { data: { symbol: "AAPL", price: 191.5, raw: new Uint8Array([1, 2]) }, target: { match: { symbol: "AAPL" }, values: { price: 191.5 } }, durable: false });
    await fleet.publish("tick.NVDA", { data: { symbol: "NVDA", price: 120 }, target: { match: { symbol: "NVDA" }, values: { price: 120 } }, durable: false });
    await fleet.publish("tick.TSLA", { data: { symbol: "TSLA", price: 250 }, target: { match: { symbol: "TSLA" }, values: { price: 250 } }, durable: false });
    await waitFor(() => ticks.length === 2, "two ticks");
    // Two subjects (tick.AAPL, tick.TSLA): no order between them (docs/PROTOCOL.md).
    assert.deepEqual(
      ticks.map((t) => t.data.symbol).sort(),
      ["AAPL", "TSLA"],
    );
    const aapl = ticks.find((t) => t.data.symbol === "AAPL");
    assert.equal(aapl.type, "tick");
    assert.equal(aapl.key, "AAPL");
    assert.deepEqual(aapl.sub, ["ticks"]);
    assert.ok(aapl.data.raw instanceof Uint8Array, "MessagePack binary stays binary");
    assert.equal(aapl.pos, undefined, "non-durable events have no pos");
    assert.ok(Math.abs(aapl.ts - Date.now()) < 60_000);
    const subs = await c.list();
    assert.deepEqual(subs.map((s) => s.sub), ["ticks"]);
    assert.deepEqual(subs[0].filters, { symbol: ["AAPL", "TSLA"] });
    await assert.rejects(c.subscribe({ sub: "bad name!", type: "tick" }), (e) => e.code === "invalid_filter");
    await c.unsubscribe("ticks");
    assert.deepEqual(await c.list(), []);
    const pong = await c.ping();
    assert.ok(pong.serverTime > 0 && pong.rttMs >= 0);
    assert.equal(events.length, 2);
    c.close();
  });

  test("frame auth, JSON: rooms (joined and forbidden), rpc to an application and unavailable", async () => {
    const c = newClient("bob", { auth: "frame", encoding: "json", token: () => fleet.token("bob", 3600, { rooms: ["desk:*"] }) });
    const events = collect(c);
    await c.connect();
    assert.equal(c.encoding, "json");
    await c.join("desk:fx");
    await assert.rejects(c.join("vip"), (e) => e.code === "forbidden");
    await fleet.publish("note", { data: { text: "hi", bin: new Uint8Array([255]) }, target: { room: "desk:fx" } });
    await waitFor(() => events.length === 1, "room event");
    assert.equal(events[0].data.text, "hi");
    assert.equal(events[0].data.bin, "/w==", "JSON connections get binary as base64");
    assert.ok(events[0].pos > 0, "durable by default");
    await c.leave("desk:fx");

    const sub = fleet.nc.subscribe("sy.rpc.echo.upper");
    (async () => {
      const { decode } = await import("@msgpack/msgpack");
      for await (const m of sub) {
        const req = decode(m.data);
        m.respond(encode({ data: { user: req.user, text: String(req.data.text).toUpperCase() } }));
      }
    })();
    await fleet.flush();
    assert.deepEqual(await c.rpc("echo.upper", { text: "abc" }), { user: "bob", text: "ABC" });
    await assert.rejects(c.rpc("nobody.home", {}), (e) => e.code === "unavailable");
    sub.unsubscribe();
    c.close();
  });

  test("a burst beyond the rate limit: batches flattened in order, the cut reported as dropped", async () => {
    const c = newClient("carol");
    const events = collect(c);
    const dropped = [];
    c.on("dropped", (d) => dropped.push(d));
    await c.connect();
    await c.subscribe({ sub: "all", type: "burst" });
    const n = 400;
    for (let i = 0; i < n; i++) {
      await fleet.publish("burst", { data: i, target: { match: {} }, durable: false });
    }
    await fleet.flush();
    const total = () => events.length + dropped.reduce((a, d) => a + d.count, 0);
    await waitFor(() => total() === n, `received + dropped = ${n}`, 20_000);
    const data = events.map((e) => e.data);
    assert.deepEqual(data, [...data].sort((a, b) => a - b), "in publish order");
    assert.ok(dropped.length > 0 && dropped.every((d) => d.reason === "rate_limited"), JSON.stringify(dropped));
    assert.ok(c.stats.batches > 0, "a burst arrives in batch frames");
    assert.equal(c.stats.dropped.rate_limited, n - events.length);
    c.close();
  });
});

describe("resilience", () => {
  test("the edge restarts while events flow: reconnect advice, resume, nothing missing, nothing twice", async () => {
    const c = newClient("dave");
    const seqs = [];
    c.onEvent("alert", (e) => seqs.push(e.data.seq));
    const advice = [];
    c.on("reconnect", (a) => advice.push(a));
    const closes = [];
    c.on("close", (x) => closes.push(x));
    const resumed = [];
    c.on("resumed", (r) => resumed.push(r));
    const saved = [];
    c.on("position", (p) => saved.push(p));
    await c.connect();
    let seq = 0;
    let publishing = true;
    const producer = (async () => {
      while (publishing) {
        await direct("dave", ++seq);
        await sleep(15);
      }
      await fleet.flush();
    })();
    await waitFor(() => seqs.length >= 20, "events before the restart");
    await fleet.restartEdge();
    try {
      await waitFor(() => resumed.length === 1 && c.state === "open", "resumed on the new edge", 20_000);
      const atResume = seq;
      await waitFor(() => seqs.length >= atResume + 20, "events after the restart");
    } finally {
      publishing = false;
      await producer;
    }
    await waitFor(() => seqs.length >= seq, `all ${seq} events`, 10_000).catch(() => {});
    assert.deepEqual(seqs, Array.from({ length: seq }, (_, i) => i + 1), "every durable event once, in order");
    assert.equal(advice.length, 1, "reconnect advice from the draining edge");
    assert.equal(closes[0].code, 1001);
    assert.equal(closes[0].delayMs, advice[0].afterMs, "the advised delay is used");
    assert.equal(resumed[0].recovered, true);
    assert.equal(c.stats.duplicatesSkipped, 0);
    assert.equal(saved.at(-1).pos, c.position.pos, "the persistence hook saw the last position");
    c.close();
  });

  test("heartbeat watchdog: a frozen edge is given up on, and the client resumes when it thaws", async () => {
    const c = newClient("erin", { heartbeatMs: 400, connectTimeoutMs: 1000 });
    const seqs = [];
    c.onEvent("alert", (e) => seqs.push(e.data.seq));
    const closes = [];
    c.on("close", (x) => closes.push(x));
    await c.connect();
    await direct("erin", 1);
    await fleet.flush();
    await waitFor(() => seqs.length === 1, "first event");
    fleet.procs.edge.signal("SIGSTOP");
    try {
      await waitFor(() => c.stats.heartbeatTimeouts === 1, "watchdog fired", 10_000);
      assert.equal(closes[0].code, 4000);
      // Published while the edge is frozen: kept in the log.
      for (let i = 2; i <= 5; i++) await direct("erin", i);
      await fleet.flush();
      await sleep(300);
    } finally {
      fleet.procs.edge.signal("SIGCONT");
    }
    await waitFor(() => seqs.length === 5 && c.state === "open", "resumed after the thaw", 20_000);
    assert.deepEqual(seqs, [1, 2, 3, 4, 5]);
    assert.ok(c.stats.resumes >= 1);
    c.close();
  });

  test("the network goes away: no attempts while offline, then back at once with resume, no gap", async () => {
    const proxy = await tcpProxy(Number(new URL(fleet.wsUrl).port));
    const network = fakeNetwork();
    let attempts = 0;
    const ws = wsTransport();
    const saved = [];
    const c = newClient("gina", {
      url: proxy.url,
      network,
      // Without the network check, this backoff would retry every 100 ms at most.
      reconnect: { initialDelayMs: 50, maxDelayMs: 100 },
      transport: (req, h) => {
        attempts++;
        return ws(req, h);
      },
      onPosition: (p) => saved.push(p),
    });
    const seqs = [];
    c.onEvent("alert", (e) => seqs.push(e.data.seq));
    const closes = [];
    c.on("close", (x) => closes.push(x));
    const resumed = [];
    c.on("resumed", (r) => resumed.push(r));
    try {
      await c.connect();
      for (let i = 1; i <= 5; i++) await unkeyed("gina", i);
      await fleet.flush();
      await waitFor(() => seqs.length === 5, "events before going offline");

      network.set(false);
      proxy.cut();
      await waitFor(() => closes.length === 1, "the socket's end seen");
      assert.equal(closes[0].waitingForNetwork, true, JSON.stringify(closes[0]));
      assert.equal(c.state, "reconnecting");
      // Published while the device is offline: kept in the delivery log.
      for (let i = 6; i <= 10; i++) await unkeyed("gina", i);
      await fleet.flush();
      await sleep(1000); // ten backoff periods
      assert.equal(attempts, 1, "no attempt while offline");
      assert.equal(proxy.accepted, 1);

      network.set(true);
      assert.equal(c.state, "connecting", "an attempt at once on `online`, no backoff wait");
      await waitFor(() => resumed.length === 1 && seqs.length === 10, "resumed with the events published while offline");
      assert.equal(attempts, 2);
      assert.equal(resumed[0].recovered, true);
      await unkeyed("gina", 11);
      await fleet.flush();
      await waitFor(() => seqs.length === 11, "live again");
      assert.deepEqual(seqs, Array.from({ length: 11 }, (_, i) => i + 1), "every event once, in order, no gap");
      assert.equal(c.stats.duplicatesSkipped, 0);
      assert.deepEqual(saved.at(-1), c.position, "the persistence hook has the last position");
      c.close();
      assert.equal(network.listeners(), 0, "close() removes the network listener");
    } finally {
      c.close();
      await proxy.close();
    }
  });

  test("a short-lived token is refreshed before exp and the connection stays", async () => {
    let calls = 0;
    const c = newClient("frank", {
      auth: "frame",
      encoding: "json",
      token: () => {
        calls++;
        return fleet.token("frank", 3);
      },
    });
    const errors = [];
    c.on("error", (e) => errors.push(e));
    const ready = await c.connect();
    await sleep(6500);
    assert.ok(calls >= 3, `token provider called ${calls} times`);
    assert.equal(c.stats.connects, 1, "never reconnected");
    assert.equal(c.ready.conn, ready.conn);
    assert.equal(c.state, "open");
    assert.deepEqual(errors, []);
    c.close();
  });
});
