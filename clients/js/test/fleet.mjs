// A real Switchyard on loopback for the JS tests: nats-server (JetStream,
// own temp dir), switchyard-router and switchyard-edge as child processes on
// free ports, a NATS producer connection, and HS256 tokens. Everything is
// killed by stop(), and on process exit as a last resort.
//
// Needs SWITCHYARD_NATS_SERVER (scripts/install-nats.sh prints it) and the
// binaries in SWITCHYARD_BIN_DIR (default: the workspace's target/debug).

import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { createWriteStream, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { encode } from "@msgpack/msgpack";
import { connect as natsConnect } from "nats";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..", "..");
export const DEV_SECRET = "switchyard-dev-secret-do-not-use-in-production";

const live = new Set();
process.on("exit", () => {
  for (const child of live) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
});

function binDir() {
  if (process.env.SWITCHYARD_BIN_DIR) return process.env.SWITCHYARD_BIN_DIR;
  const target = process.env.CARGO_TARGET_DIR ?? join(repoRoot, "target");
  return join(target, "debug");
}

function natsBin() {
  const p = process.env.SWITCHYARD_NATS_SERVER ?? join(repoRoot, ".venv", "bin", "nats-server");
  if (!existsSync(p)) throw new Error(`nats-server not found at ${p}: run scripts/install-nats.sh and set SWITCHYARD_NATS_SERVER`);
  return p;
}

/** A free loopback TCP port (the OS picks it). */
export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.unref();
    s.on("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value or `ms` passes. */
export async function waitFor(check, what, ms = 15_000, every = 25, proc = null) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    proc?.check();
    try {
      const v = await check();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await sleep(every);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ` (last error: ${last})` : ""}`);
}

function portOpen(port) {
  return new Promise((ok) => {
    const s = tcpConnect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      ok(true);
    });
    s.once("error", () => ok(false));
  });
}

async function httpStatus(url) {
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(2000) });
    await r.arrayBuffer();
    return r.status;
  } catch {
    return 0;
  }
}

function b64url(buf) {
  return Buffer.from(buf).toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

/** An HS256 JWT for `sub`, valid `ttlS` seconds, with extra claims. */
export function signToken(secret, sub, ttlS = 3600, extra = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify({ sub, iat: now, exp: now + ttlS, ...extra }));
  const sig = b64url(createHmac("sha256", secret).update(`${header}.${payload}`).digest());
  return `${header}.${payload}.${sig}`;
}

class Proc {
  constructor(name, cmd, args, env, logPath) {
    this.name = name;
    this.logPath = logPath;
    const log = createWriteStream(logPath, { flags: "a" });
    this.child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    this.child.stdout.pipe(log);
    this.child.stderr.pipe(log);
    live.add(this.child);
    this.failure = null;
    this.child.once("error", (err) => {
      this.failure = err;
    });
    this.exited = new Promise((ok) =>
      this.child.once("exit", (code, signal) => {
        live.delete(this.child);
        ok({ code, signal });
      }),
    );
  }

  /** Throws when the process could not start or has exited (for readiness waits). */
  check() {
    if (this.failure) throw new Error(`${this.name} did not start: ${this.failure.message}`);
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      throw new Error(`${this.name} exited (${this.child.exitCode ?? this.child.signalCode}):\n${this.tail()}`);
    }
  }

  signal(sig) {
    try {
      this.child.kill(sig);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL if it is still there after `graceMs`. */
  async stop(graceMs = 5000) {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.signal("SIGCONT");
    this.signal("SIGTERM");
    const t = setTimeout(() => this.signal("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(t);
  }

  tail(lines = 30) {
    try {
      return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "";
    }
  }
}

/**
 * Starts nats-server, a router and an edge.
 * options.edgeArgs: extra edge flags; options.dev: --dev-insecure without a
 * key (tokens signed with DEV_SECRET); options.demoDir: serve the demo page.
 */
export async function startFleet(options = {}) {
  const dir = mkdtempSync(join(tmpdir(), "switchyard-js-"));
  const [natsPort, routerAdmin, edgePort, edgeAdmin] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
  const natsUrl = `nats://127.0.0.1:${natsPort}`;
  const secret = options.dev ? DEV_SECRET : randomBytes(24).toString("hex");
  const bins = binDir();
  const procs = {};

  const fleet = {
    dir,
    natsUrl,
    secret,
    wsUrl: `ws://127.0.0.1:${edgePort}/ws`,
    httpUrl: `http://127.0.0.1:${edgePort}`,
    edgeAdminUrl: `http://127.0.0.1:${edgeAdmin}`,
    procs,
    nc: null,

    token(sub, ttlS = 3600, extra = {}) {
      return signToken(secret, sub, ttlS, extra);
    },

    async startEdge() {
      const env = {
        SWITCHYARD_NATS_URL: natsUrl,
        SWITCHYARD_LISTEN: `127.0.0.1:${edgePort}`,
        SWITCHYARD_ADMIN_LISTEN: `127.0.0.1:${edgeAdmin}`,
        SWITCHYARD_DRAIN_SPREAD_MS: "300",
        SWITCHYARD_DRAIN_TIMEOUT_MS: "3000",
        SWITCHYARD_REQUEST_TIMEOUT_MS: "1500",
      };
      const args = [];
      if (options.dev) args.push("--dev-insecure");
      else env.SWITCHYARD_JWT_SECRET = secret;
      if (options.demoDir) args.push("--demo-dir", options.demoDir);
      args.push(...(options.edgeArgs ?? []));
      procs.edge = new Proc("edge", join(bins, "switchyard-edge"), args, env, join(dir, "edge.log"));
      await waitFor(async () => (await httpStatus(`${fleet.edgeAdminUrl}/readyz`)) === 200, "edge ready", 15_000, 25, procs.edge);
    },

    /** SIGTERM: the edge drains (reconnect advice, 1001) and exits. */
    async stopEdge() {
      await procs.edge.stop();
    },

    async restartEdge() {
      await fleet.stopEdge();
      await fleet.startEdge();
    },

    /** Publishes a producer event (MessagePack) on `sy.events.<tail>`. */
    async publish(tail, event) {
      fleet.nc.publish(`sy.events.${tail}`, encode(event));
    },

    async flush() {
      await fleet.nc.flush();
    },

    async stop() {
      if (fleet.nc) {
        await fleet.nc.close().catch(() => {});
        fleet.nc = null;
      }
      for (const name of ["edge", "router", "nats"]) {
        if (procs[name]) await procs[name].stop();
      }
      if (!process.env.SWITCHYARD_KEEP_TMP) rmSync(dir, { recursive: true, force: true });
    },
  };

  try {
    procs.nats = new Proc(
      "nats",
      natsBin(),
      ["-a", "127.0.0.1", "-p", String(natsPort), "-js", "-sd", join(dir, "nats")],
      {},
      join(dir, "nats.log"),
    );
    await waitFor(() => portOpen(natsPort), "nats-server", 15_000, 25, procs.nats);
    procs.router = new Proc(
      "router",
      join(bins, "switchyard-router"),
      [],
      { SWITCHYARD_NATS_URL: natsUrl, SWITCHYARD_ADMIN_LISTEN: `127.0.0.1:${routerAdmin}`, SWITCHYARD_LOG_STORAGE: "memory" },
      join(dir, "router.log"),
    );
    await waitFor(async () => (await httpStatus(`http://127.0.0.1:${routerAdmin}/readyz`)) === 200, "router ready", 15_000, 25, procs.router);
    await fleet.startEdge();
    fleet.nc = await natsConnect({ servers: natsUrl });
    return fleet;
  } catch (err) {
    await fleet.stop().catch(() => {});
    throw err;
  }
}

/**
 * Which protocol 1.1 subscription fields the fleet's edge implements. A
 * server that knows `snapshot` and `throttle_ms` refuses bad values with
 * `invalid_filter` (PROTOCOL.md, "Client ops"); one that does not ignores
 * them like any unknown field and answers `ok`. Probed over a raw JSON
 * connection, since the client library refuses such values itself.
 * Returns `{ snapshot, throttle, detail }` (booleans, and what was answered).
 */
export async function probeFeatures(fleet) {
  const ws = new WebSocket(fleet.wsUrl, ["switchyard.v1.json"], {
    headers: { Authorization: `Bearer ${fleet.token("feature-probe")}` },
  });
  const replies = new Map();
  let ready = false;
  ws.on("message", (data) => {
    const f = JSON.parse(data.toString("utf8"));
    if (f.op === "ready") ready = true;
    else if (typeof f.id === "number") replies.set(f.id, f);
  });
  ws.on("error", () => {});
  try {
    await waitFor(() => ready, "probe connection ready", 10_000);
    const send = (f) => ws.send(JSON.stringify(f));
    send({ op: "subscribe", id: 1, sub: "probe_snapshot", type: "probe", snapshot: "not-a-boolean" });
    send({ op: "subscribe", id: 2, sub: "probe_throttle", type: "probe", throttle_ms: 0 });
    await waitFor(() => replies.has(1) && replies.has(2), "probe replies", 10_000);
    send({ op: "unsubscribe", id: 3, sub: "probe_snapshot" });
    send({ op: "unsubscribe", id: 4, sub: "probe_throttle" });
    await waitFor(() => replies.has(3) && replies.has(4), "probe cleanup", 10_000);
    const refused = (r) => r.op === "error" && r.code === "invalid_filter";
    const show = (r) => (r.op === "error" ? `error ${r.code}: ${r.message}` : r.op);
    return {
      snapshot: refused(replies.get(1)),
      throttle: refused(replies.get(2)),
      detail: `snapshot: "not-a-boolean" -> ${show(replies.get(1))}; throttle_ms: 0 -> ${show(replies.get(2))}`,
    };
  } finally {
    ws.terminate();
  }
}
