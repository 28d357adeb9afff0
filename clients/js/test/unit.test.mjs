// Client behaviour over a scripted transport: what the client sends and how
// it reacts to each server frame, without sockets or timing assumptions.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { encode } from "@msgpack/msgpack";
import {
  backoffCeiling,
  backoffDelay,
  browserNetwork,
  browserVisibility,
  codecFor,
  refreshDelay,
  SwitchyardClient,
  SwitchyardError,
  tokenTimes,
} from "../dist/node.js";
import { sleep, signToken, waitFor } from "./fleet.mjs";

/** A transport whose server side the test plays. */
function scripted() {
  const sockets = [];
  const factory = (req, h) => {
    const s = {
      req,
      h,
      sent: [],
      closed: null,
      aborted: false,
      send(d) {
        this.sent.push(typeof d === "string" ? JSON.parse(d) : d);
      },
      close(code, reason) {
        this.closed = [code, reason];
      },
      abort() {
        this.aborted = true;
      },
      /** Server → client frame. */
      push(frame) {
        h.message(JSON.stringify(frame));
      },
      ready(extra = {}) {
        h.open("switchyard.v1.json");
        this.push({ op: "ready", conn: "c1", user: "u", epoch: "E1", pos: 10, server_time: Date.now(), heartbeat_ms: 25000, limits: {}, ...extra });
      },
    };
    sockets.push(s);
    return s;
  };
  return { factory, sockets };
}

function client(t, extra = {}) {
  const c = new SwitchyardClient({ url: "ws://127.0.0.1:1/ws", token: "tok", encoding: "json", auth: "frame", transport: t.factory, ...extra });
  return c;
}

describe("backoff", () => {
  test("ceiling doubles from the initial delay and stops at the cap", () => {
    const o = { initialDelayMs: 100, maxDelayMs: 1000 };
    assert.deepEqual([0, 1, 2, 3, 4, 5, 100, 1e6].map((n) => backoffCeiling(n, o)), [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
  });
  test("full jitter: uniform between 0 and the ceiling", () => {
    assert.equal(backoffDelay(3, { initialDelayMs: 100 }, () => 0), 0);
    assert.equal(backoffDelay(3, { initialDelayMs: 100 }, () => 0.5), 400);
    assert.equal(backoffDelay(30, { initialDelayMs: 100, maxDelayMs: 5000 }, () => 0.999), 4995);
  });
});

describe("tokens", () => {
  test("exp and iat are read from the payload; refresh comes before exp", () => {
    const tok = signToken("s", "alice", 300);
    const times = tokenTimes(tok);
    assert.equal(times.exp - times.iat, 300);
    const now = times.iat * 1000;
    // A fifth of 300 s is 60 s: refresh 240 s after issue.
    assert.equal(refreshDelay(times, now, 0), 240_000);
    // A server clock 5 s ahead brings it forward by 5 s.
    assert.equal(refreshDelay(times, now, 5000), 235_000);
    assert.equal(refreshDelay({ exp: times.exp, iat: times.exp - 3 }, now, 0, undefined) <= 300_000 - 1000, true);
    assert.deepEqual(tokenTimes("not-a-jwt"), {});
    assert.equal(refreshDelay({}, now, 0), undefined);
  });
});

describe("codecs", () => {
  test("msgpack frames are maps with an op; text on a msgpack connection is refused", () => {
    const c = codecFor("msgpack");
    const bytes = c.encode({ op: "subscribe", id: 1, sub: "s", type: "tick", filters: undefined });
    assert.deepEqual(c.decode(bytes), { op: "subscribe", id: 1, sub: "s", type: "tick" });
    assert.throws(() => c.decode("{}"));
    assert.throws(() => c.decode(encode([1, 2])));
    const j = codecFor("json");
    assert.throws(() => j.decode(new Uint8Array([1])));
    assert.throws(() => j.decode('{"no":"op"}'));
  });
});

describe("client over a scripted server", () => {
  test("frame auth first, then requests resolved by id, errors rejected with their code", async () => {
    const t = scripted();
    const c = client(t);
    const ready = c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    assert.equal(s.req.headers, undefined);
    assert.deepEqual(s.req.protocols, ["switchyard.v1.json"]);
    // A request made before ready waits for it.
    const sub = c.subscribe({ sub: "a", type: "tick", filters: { symbol: ["AAPL"] } });
    s.ready();
    assert.equal((await ready).epoch, "E1");
    assert.equal(s.sent[0].op, "auth");
    assert.equal(s.sent[0].token, "tok");
    assert.equal(s.sent[0].since, undefined, "no resume on a first connect");
    const subFrame = s.sent[1];
    assert.equal(subFrame.op, "subscribe");
    assert.deepEqual(subFrame.filters, { symbol: ["AAPL"] });
    s.push({ op: "ok", id: subFrame.id });
    await sub;
    const bad = c.join("vip");
    s.push({ op: "error", id: s.sent[2].id, code: "forbidden", message: "no" });
    await assert.rejects(bad, (e) => e instanceof SwitchyardError && e.code === "forbidden");
    const list = c.list();
    s.push({ op: "subs", id: s.sent[3].id, subs: [{ sub: "a", type: "tick", filters: { symbol: ["AAPL"] }, min: {}, max: {} }] });
    assert.equal((await list)[0].sub, "a");
    const rpc = c.rpc("echo.it", { x: 1 });
    assert.deepEqual(s.sent[4], { op: "rpc", id: s.sent[4].id, method: "echo.it", data: { x: 1 } });
    s.push({ op: "rpc_result", id: s.sent[4].id, data: { y: 2 } });
    assert.deepEqual(await rpc, { y: 2 });
    c.close();
    assert.deepEqual(s.closed, [1000, "client closed"]);
    assert.equal(c.state, "closed");
  });

  test("batches are flattened in order; typed callbacks; dropped and duplicates", async () => {
    const t = scripted();
    const c = client(t);
    const seen = [];
    const ticks = [];
    const dropped = [];
    c.on("event", (e) => seen.push(e.pos ?? e.data));
    c.onEvent("tick", (e) => ticks.push(e.data));
    c.on("dropped", (d) => dropped.push(d));
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready();
    s.push({ op: "event", type: "alert", data: "a", ts: 1, pos: 11 });
    s.push({
      op: "batch",
      events: [
        { type: "tick", data: 1, ts: 2 },
        { type: "alert", data: "b", ts: 3, pos: 12 },
        { type: "alert", data: "dup", ts: 3, pos: 12 },
        { type: "tick", data: 2, ts: 4 },
      ],
    });
    s.push({ op: "dropped", count: 7, reason: "rate_limited" });
    assert.deepEqual(seen, [11, 1, 12, 2]);
    assert.deepEqual(ticks, [1, 2]);
    assert.deepEqual(dropped, [{ count: 7, reason: "rate_limited" }]);
    assert.equal(c.stats.batches, 1);
    assert.equal(c.stats.duplicatesSkipped, 1);
    assert.deepEqual(c.stats.dropped, { rate_limited: 7 });
    assert.deepEqual(c.position, { epoch: "E1", pos: 12 });
    c.close();
  });

  test("a close listener that closes the client keeps it closed", async () => {
    const t = scripted();
    const c = client(t, { reconnect: { initialDelayMs: 10, maxDelayMs: 20 } });
    c.on("close", (x) => {
      if (x.willReconnect) c.close();
    });
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    t.sockets[0].ready();
    t.sockets[0].h.close(1006, "lost");
    assert.equal(c.state, "closed");
    // No attempt comes after the backoff (20 ms at most here).
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(t.sockets.length, 1);
  });

  test("reconnect advice sets the delay; the next connect resumes from the position", async () => {
    const t = scripted();
    const positions = [];
    const c = client(t, { onPosition: (p) => positions.push(p) });
    const closes = [];
    c.on("close", (x) => closes.push(x));
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready();
    s.push({ op: "event", type: "alert", data: 1, ts: 1, pos: 42 });
    s.push({ op: "reconnect", after_ms: 150, reason: "draining" });
    s.h.close(1001, "draining");
    assert.equal(closes[0].delayMs, 150);
    assert.equal(c.state, "reconnecting");
    await waitFor(() => t.sockets.length === 2, "second socket", 3000);
    const s2 = t.sockets[1];
    s2.h.open("switchyard.v1.json");
    assert.equal(s2.sent[0].op, "auth");
    assert.equal(s2.sent[0].epoch, "E1");
    assert.equal(s2.sent[0].since, 42);
    s2.push({ op: "ready", conn: "c2", user: "u", epoch: "E1", pos: 50, server_time: Date.now(), heartbeat_ms: 25000, limits: {} });
    assert.equal(c.state, "resuming");
    s2.push({ op: "event", type: "alert", data: 2, ts: 1, pos: 45 });
    s2.push({ op: "resumed", recovered: true, replayed: 1 });
    assert.equal(c.state, "open");
    // After the replay every durable event up to ready.pos was sent.
    assert.deepEqual(c.position, { epoch: "E1", pos: 50 });
    assert.deepEqual(positions.at(-1), { epoch: "E1", pos: 50 });
    assert.equal(c.stats.recovered, 1);
    c.close();
  });

  test("a new epoch restarts the position; header auth puts the resume point in the URL", async () => {
    const t = scripted();
    const c = client(t, { auth: "header", position: { epoch: "OLD", pos: 99 } });
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    assert.deepEqual(s.req.headers, { Authorization: "Bearer tok" });
    const u = new URL(s.req.url);
    assert.equal(u.searchParams.get("epoch"), "OLD");
    assert.equal(u.searchParams.get("since"), "99");
    s.h.open("switchyard.v1.json");
    assert.equal(s.sent.length, 0, "no auth frame with header auth");
    s.push({ op: "ready", conn: "c", user: "u", epoch: "NEW", pos: 5, server_time: Date.now(), heartbeat_ms: 25000, limits: {} });
    assert.deepEqual(c.position, { epoch: "NEW", pos: 0 });
    s.push({ op: "event", type: "x", data: null, ts: 1, pos: 3 });
    assert.equal(c.stats.durable, 1, "pos 3 of the new epoch is not a duplicate");
    c.close();
  });

  test("backoff after failures, in-flight requests fail with disconnected", async () => {
    const t = scripted();
    const delays = [];
    const c = client(t, { reconnect: { initialDelayMs: 40, maxDelayMs: 100 }, random: () => 1 });
    c.on("close", (x) => delays.push(x.delayMs));
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    t.sockets[0].ready();
    const p = c.ping();
    t.sockets[0].h.close(1006, "");
    await assert.rejects(p, (e) => e.code === "disconnected");
    for (let i = 2; i <= 4; i++) {
      await waitFor(() => t.sockets.length === i, `socket ${i}`, 3000);
      t.sockets[i - 1].h.close(1006, "refused");
    }
    assert.deepEqual(delays, [40, 80, 100, 100]);
    c.close();
  });

  test("heartbeat watchdog: a ping frame after one quiet interval, a reconnect after two", async () => {
    const t = scripted();
    const c = client(t, { heartbeatMs: 100, reconnect: { initialDelayMs: 1 } });
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready();
    await waitFor(() => s.sent.some((f) => f.op === "ping"), "a ping frame", 2000);
    await waitFor(() => s.aborted, "the silent socket dropped", 2000);
    assert.equal(s.closed[0], 4000);
    assert.equal(c.stats.heartbeatTimeouts, 1);
    await waitFor(() => t.sockets.length === 2, "a new socket", 2000);
    c.close();
  });

  test("token provider: called at connect, and the refreshed token sent as auth before exp", async () => {
    const t = scripted();
    let calls = 0;
    const c = client(t, {
      token: () => {
        calls++;
        return signToken("s", "u", 2, { n: calls });
      },
      refreshMarginMs: 1500,
    });
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready();
    assert.equal(calls, 1);
    const refresh = await waitFor(() => s.sent.find((f, i) => i > 0 && f.op === "auth"), "a refresh auth frame", 5000);
    assert.equal(calls, 2);
    assert.notEqual(refresh.token, s.sent[0].token);
    s.push({ op: "ok", id: refresh.id });
    await sleep(10);
    c.close();
  });

  test("a listener that throws does not stop delivery", async () => {
    const t = scripted();
    const c = client(t);
    const got = [];
    const reported = [];
    const orig = globalThis.reportError;
    globalThis.reportError = (e) => reported.push(e);
    try {
      c.on("event", () => {
        throw new Error("app bug");
      });
      c.on("event", (e) => got.push(e.data));
      c.connect();
      await waitFor(() => t.sockets.length === 1, "socket");
      t.sockets[0].ready();
      t.sockets[0].push({ op: "batch", events: [{ type: "t", data: 1, ts: 1 }, { type: "t", data: 2, ts: 1 }] });
      assert.deepEqual(got, [1, 2]);
      assert.equal(reported.length, 2);
    } finally {
      globalThis.reportError = orig;
      c.close();
    }
  });
});

describe("snapshot and throttle_ms (protocol 1.1)", () => {
  test("subscribe passes snapshot and throttle_ms through and checks them first", async () => {
    const t = scripted();
    const c = client(t);
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready();
    const ok = c.subscribe({ sub: "w", type: "tick", filters: { symbol: ["AAPL"] }, snapshot: true, throttle_ms: 1000 });
    const f = s.sent.at(-1);
    assert.deepEqual(f, { op: "subscribe", id: f.id, sub: "w", type: "tick", filters: { symbol: ["AAPL"] }, snapshot: true, throttle_ms: 1000 });
    s.push({ op: "ok", id: f.id });
    await ok;
    const sent = s.sent.length;
    for (const bad of [
      { snapshot: "yes" },
      { snapshot: 1 },
      { throttle_ms: 0 },
      { throttle_ms: -5 },
      { throttle_ms: 1.5 },
      { throttle_ms: 3_600_001 },
      { throttle_ms: "100" },
      { throttle_ms: Number.NaN },
    ]) {
      await assert.rejects(c.subscribe({ sub: "w", type: "tick", ...bad }), (e) => e instanceof SwitchyardError && e.code === "invalid_filter", JSON.stringify(bad));
    }
    assert.equal(s.sent.length, sent, "refused locally, nothing sent");
    const edge = c.subscribe({ sub: "w", type: "tick", throttle_ms: 3_600_000, snapshot: false });
    assert.equal(s.sent.at(-1).throttle_ms, 3_600_000);
    s.push({ op: "ok", id: s.sent.at(-1).id });
    await edge;
    c.close();
  });

  test("snapshot events are delivered with the flag and never move the position", async () => {
    const t = scripted();
    const positions = [];
    const c = client(t, { onPosition: (p) => positions.push(p) });
    const seen = [];
    c.onEvent("tick", (e) => seen.push([e.key, e.data, e.snapshot === true, e.pos]));
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready(); // pos 10
    s.push({ op: "event", type: "alert", data: "a", ts: 1, pos: 12 });
    s.push({
      op: "batch",
      events: [
        { type: "tick", key: "AAPL", data: 190, ts: 1, snapshot: true, sub: ["w"] },
        // Off-contract, but a stale pos on a snapshot must neither move the position nor hide the event as a duplicate.
        { type: "tick", key: "TSLA", data: 250, ts: 1, snapshot: true, pos: 3 },
        { type: "tick", key: "AAPL", data: 191, ts: 2 },
      ],
    });
    assert.deepEqual(seen, [
      ["AAPL", 190, true, undefined],
      ["TSLA", 250, true, 3],
      ["AAPL", 191, false, undefined],
    ]);
    assert.deepEqual(c.position, { epoch: "E1", pos: 12 });
    assert.deepEqual(positions.map((p) => p.pos), [10, 12]);
    assert.equal(c.stats.snapshots, 2);
    assert.equal(c.stats.duplicatesSkipped, 0);
    // A durable event after them still advances as usual.
    s.push({ op: "event", type: "alert", data: "b", ts: 3, pos: 13 });
    assert.deepEqual(c.position, { epoch: "E1", pos: 13 });
    c.close();
  });
});

/** A fake EventTarget that counts its listeners. */
class FakeTarget {
  constructor(props = {}) {
    Object.assign(this, props);
    this.listeners = new Map();
  }
  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
  }
  removeEventListener(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }
  dispatch(type) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) fn({ type });
  }
  count() {
    let n = 0;
    for (const set of this.listeners.values()) n += set.size;
    return n;
  }
}

/** A browser-like global (window) and document, fake. */
function fakeBrowser() {
  const win = new FakeTarget({ navigator: { onLine: true } });
  const doc = new FakeTarget({ visibilityState: "visible" });
  return {
    win,
    doc,
    network: browserNetwork(win),
    visibility: browserVisibility(doc),
    goOffline() {
      win.navigator.onLine = false;
      win.dispatch("offline");
    },
    goOnline() {
      win.navigator.onLine = true;
      win.dispatch("online");
    },
    hide() {
      doc.visibilityState = "hidden";
      doc.dispatch("visibilitychange");
    },
    show() {
      doc.visibilityState = "visible";
      doc.dispatch("visibilitychange");
    },
  };
}

describe("network and page visibility", () => {
  test("sources read navigator.onLine and visibilityState; none where the platform has none", () => {
    const b = fakeBrowser();
    assert.equal(b.network.isOnline(), true);
    b.win.navigator.onLine = false;
    assert.equal(b.network.isOnline(), false);
    b.doc.visibilityState = "hidden";
    assert.equal(b.visibility.isVisible(), false);
    assert.equal(browserNetwork({}), null);
    assert.equal(browserNetwork(new FakeTarget()), null, "no navigator.onLine");
    assert.equal(browserVisibility(undefined), null);
    assert.equal(browserNetwork(), null, "Node.js has no online events");
  });

  test("offline: no attempts at all; online: an attempt at once (no backoff wait), resuming", async () => {
    const t = scripted();
    const b = fakeBrowser();
    const closes = [];
    const positions = [];
    const c = client(t, {
      network: b.network,
      visibility: b.visibility,
      // Without the network check this would retry every few milliseconds.
      reconnect: { initialDelayMs: 5, maxDelayMs: 5 },
      onPosition: (p) => positions.push(p),
    });
    c.on("close", (x) => closes.push(x));
    const net = [];
    c.on("network", (n) => net.push(n.online));
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    const s = t.sockets[0];
    s.ready();
    s.push({ op: "event", type: "alert", data: 1, ts: 1, pos: 42 });
    assert.equal(b.win.count(), 2, "online and offline listeners");
    assert.equal(b.doc.count(), 1, "visibilitychange listener");

    b.goOffline();
    assert.equal(c.state, "open", "an open socket is kept when the platform says offline");
    s.h.close(1006, "network gone");
    assert.equal(c.state, "reconnecting");
    assert.deepEqual(closes.at(-1), { code: 1006, reason: "network gone", willReconnect: true, waitingForNetwork: true });
    await sleep(200); // forty backoff periods
    assert.equal(t.sockets.length, 1, "no attempt while offline");
    c.reconnect(); // nothing to replace
    assert.equal(t.sockets.length, 1);

    b.goOnline();
    assert.equal(c.state, "connecting", "the attempt starts synchronously on `online`");
    assert.deepEqual(net, [false, true]);
    await waitFor(() => t.sockets.length === 2, "second socket", 2000);
    const s2 = t.sockets[1];
    s2.h.open("switchyard.v1.json");
    assert.deepEqual([s2.sent[0].op, s2.sent[0].epoch, s2.sent[0].since], ["auth", "E1", 42]);
    s2.push({ op: "ready", conn: "c2", user: "u", epoch: "E1", pos: 45, server_time: Date.now(), heartbeat_ms: 25000, limits: {} });
    s2.push({ op: "event", type: "alert", data: 2, ts: 1, pos: 44 });
    s2.push({ op: "resumed", recovered: true, replayed: 1 });
    assert.equal(c.state, "open");
    assert.deepEqual(positions.at(-1), { epoch: "E1", pos: 45 }, "the persistence hook sees the position after the resume");

    c.close();
    assert.equal(b.win.count(), 0, "close() removes the network listeners");
    assert.equal(b.doc.count(), 0, "close() removes the visibility listener");
    b.goOffline();
    b.goOnline();
    assert.equal(t.sockets.length, 2);
    assert.equal(c.state, "closed");
  });

  test("a backoff wait becomes a wait for the network; a socket that lived through offline is replaced on online", async () => {
    const t = scripted();
    const b = fakeBrowser();
    const c = client(t, { network: b.network, visibility: false, reconnect: { initialDelayMs: 60_000, maxDelayMs: 60_000 }, random: () => 1 });
    c.connect();
    await waitFor(() => t.sockets.length === 1, "socket");
    t.sockets[0].ready();
    t.sockets[0].h.close(1006, "");
    assert.equal(c.state, "reconnecting"); // a 60 s backoff
    b.goOffline();
    b.goOnline();
    assert.equal(c.state, "connecting", "the backoff wait was skipped");
    await waitFor(() => t.sockets.length === 2, "second socket", 2000);
    const s2 = t.sockets[1];
    s2.ready();
    assert.equal(c.state, "resuming");
    s2.push({ op: "resumed", recovered: true, replayed: 0 });
    // Offline and back while the socket looks open: it may be dead (a new network), so it is replaced.
    b.goOffline();
    assert.equal(s2.aborted, false);
    b.goOnline();
    assert.equal(s2.aborted, true);
    assert.equal(s2.closed[0], 1000);
    assert.equal(c.state, "connecting");
    await waitFor(() => t.sockets.length === 3, "third socket", 2000);
    // Online again without an offline period in between changes nothing.
    t.sockets[2].ready();
    b.goOnline();
    assert.equal(t.sockets[2].aborted, false);
    c.close();
    assert.equal(b.win.count(), 0);
  });

  test("connect() while offline waits for the network", async () => {
    const t = scripted();
    const b = fakeBrowser();
    b.win.navigator.onLine = false;
    const c = client(t, { network: b.network, visibility: false });
    assert.equal(c.online, false);
    const ready = c.connect();
    assert.equal(c.state, "connecting");
    await sleep(50);
    assert.equal(t.sockets.length, 0);
    b.goOnline();
    await waitFor(() => t.sockets.length === 1, "socket", 2000);
    t.sockets[0].ready();
    assert.equal((await ready).epoch, "E1");
    c.close();
  });

  test("visible again after more than a heartbeat: a quiet connection is replaced at once, a lively one kept", async (t) => {
    // A hidden tab's timers are throttled: the watchdog (setInterval) does not run here, as in a background tab.
    t.mock.timers.enable({ apis: ["setInterval"] });
    const tr = scripted();
    const b = fakeBrowser();
    const c = client(tr, { network: b.network, visibility: b.visibility });
    c.connect();
    await waitFor(() => tr.sockets.length === 1, "socket");
    const s = tr.sockets[0];
    s.ready({ heartbeat_ms: 150 });
    // Hidden for less than a heartbeat: nothing is checked.
    b.hide();
    b.show();
    assert.equal(s.aborted, false);
    // Hidden longer, but something arrived within the interval: the socket is alive.
    b.hide();
    await sleep(250);
    s.push({ op: "pong", server_time: Date.now() });
    b.show();
    assert.equal(s.aborted, false, "kept: it received something within the interval");
    // Hidden longer and quiet longer than a heartbeat: replaced.
    b.hide();
    await sleep(250);
    b.show();
    assert.equal(s.aborted, true, "replaced: hidden > heartbeat and quiet > heartbeat");
    assert.equal(s.closed[0], 1000);
    assert.equal(c.state, "connecting", "at once, no backoff");
    await waitFor(() => tr.sockets.length === 2, "second socket", 2000);
    tr.sockets[1].h.open("switchyard.v1.json");
    assert.equal(tr.sockets[1].sent[0].since, 10, "resumes from the position");
    c.close();
    assert.equal(b.doc.count(), 0);
    assert.equal(b.win.count(), 0);
  });

  test("visible again cuts a backoff wait short", async () => {
    const tr = scripted();
    const b = fakeBrowser();
    const c = client(tr, { network: false, visibility: b.visibility, heartbeatMs: 100, reconnect: { initialDelayMs: 60_000, maxDelayMs: 60_000 }, random: () => 1 });
    c.connect();
    await waitFor(() => tr.sockets.length === 1, "socket");
    tr.sockets[0].ready();
    b.hide();
    tr.sockets[0].h.close(1006, "");
    assert.equal(c.state, "reconnecting");
    await sleep(150);
    b.show();
    assert.equal(c.state, "connecting");
    await waitFor(() => tr.sockets.length === 2, "second socket", 2000);
    c.close();
  });

  test("the default sources come from the globals (window, document)", async () => {
    const b = fakeBrowser();
    const saved = {};
    for (const k of ["addEventListener", "removeEventListener", "navigator", "document"]) {
      saved[k] = Object.getOwnPropertyDescriptor(globalThis, k);
    }
    Object.defineProperty(globalThis, "addEventListener", { value: b.win.addEventListener.bind(b.win), configurable: true, writable: true });
    Object.defineProperty(globalThis, "removeEventListener", { value: b.win.removeEventListener.bind(b.win), configurable: true, writable: true });
    Object.defineProperty(globalThis, "navigator", { value: b.win.navigator, configurable: true, writable: true });
    Object.defineProperty(globalThis, "document", { value: b.doc, configurable: true, writable: true });
    try {
      const t = scripted();
      const c = client(t, { reconnect: { initialDelayMs: 5, maxDelayMs: 5 } });
      c.connect();
      await waitFor(() => t.sockets.length === 1, "socket");
      t.sockets[0].ready();
      assert.equal(b.win.count(), 2);
      assert.equal(b.doc.count(), 1);
      b.goOffline();
      t.sockets[0].h.close(1006, "");
      await sleep(100);
      assert.equal(t.sockets.length, 1, "no attempt while navigator.onLine is false");
      b.goOnline();
      assert.equal(c.state, "connecting");
      c.close();
      assert.equal(b.win.count() + b.doc.count(), 0);
    } finally {
      for (const [k, d] of Object.entries(saved)) {
        if (d) Object.defineProperty(globalThis, k, d);
        else delete globalThis[k];
      }
    }
  });
});
