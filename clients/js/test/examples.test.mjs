// The producer examples (examples/node, examples/python) run with their one
// command against a real fleet, and a client sees what they publish: ticks
// (live, keyed by symbol) and durable pattern alerts.
//
// SWITCHYARD_SKIP_PY_EXAMPLE=1 skips the Python one (it installs nats-py and
// msgpack into the repo's .venv).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { SwitchyardClient } from "../dist/node.js";
import { repoRoot, startFleet, waitFor } from "./fleet.mjs";

let fleet;

before(async () => {
  fleet = await startFleet();
});

after(async () => {
  await fleet?.stop();
});

function run(script, args) {
  return new Promise((ok, fail) => {
    const child = spawn("bash", [join(repoRoot, script), ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (out += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
    child.on("error", fail);
    child.on("exit", (code) => {
      clearTimeout(timer);
      if (code === 0) ok(out);
      else fail(new Error(`${script} exited ${code}:\n${out}`));
    });
  });
}

async function producerReaches(user, script) {
  const c = new SwitchyardClient({ url: fleet.wsUrl, token: () => fleet.token(user) });
  const ticks = [];
  const alerts = [];
  c.onEvent("tick", (e) => ticks.push(e));
  c.onEvent("pattern", (e) => alerts.push(e));
  try {
    await c.connect();
    await c.subscribe({ sub: "aapl", type: "tick", filters: { symbol: ["AAPL"] } });
    await c.subscribe({ sub: "alerts", type: "pattern" });
    const out = await run(script, ["--nats-url", fleet.natsUrl, "--rate", "40", "--alert-every-ms", "100", "--duration-s", "2"]);
    const m = /published (\d+) ticks and (\d+) alerts/.exec(out);
    assert.ok(m, out);
    const published = Number(m[2]);
    await waitFor(() => alerts.length === published && ticks.length > 0, `${published} alerts and some ticks`, 10_000);
    assert.ok(ticks.every((t) => t.data.symbol === "AAPL" && typeof t.data.price === "number" && t.pos === undefined));
    assert.ok(alerts.every((e) => e.pos > 0 && e.prio === "high" && e.data.confidence >= 0 && e.data.confidence <= 1));
    assert.deepEqual(
      alerts.map((e) => e.data.seq),
      Array.from({ length: published }, (_, i) => i + 1),
      "alerts in order, none conflated",
    );
  } finally {
    c.close();
  }
}

test("the Node producer example: one command, ticks and alerts arrive", async () => {
  await producerReaches("example-node", "examples/node/run.sh");
});

test("the Python producer example: one command, ticks and alerts arrive", { skip: process.env.SWITCHYARD_SKIP_PY_EXAMPLE === "1" }, async () => {
  await producerReaches("example-py", "examples/python/run.sh");
});
