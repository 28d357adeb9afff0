// A Switchyard producer in Node.js: market ticks and pattern alerts on NATS.
//
// Ticks go to <prefix>.events.tick.<SYMBOL>: live only (durable: false),
// keyed by symbol, so a backlogged connection keeps only the latest price.
// Alerts go to <prefix>.events.pattern with no key token: durable (kept in
// the delivery log for resume and offline users), never conflated, and in
// order, since they share one subject. Payloads are MessagePack maps in the
// shape docs/PROTOCOL.md gives ("Producers").
//
//   bash examples/node/run.sh --rate 10 --alert-every-ms 2000

import { parseArgs } from "node:util";
import { encode } from "@msgpack/msgpack";
import { connect } from "nats";

const SYMBOLS = ["AAPL", "TSLA", "NVDA", "MSFT", "AMZN", "META"];
const PATTERNS = ["BreakoutBO", "HeadShoulders", "DoubleBottom", "BullFlag"];
const TIERS = ["intraday", "daily", "weekly"];

const { values: a } = parseArgs({
  options: {
    "nats-url": { type: "string", default: process.env.SWITCHYARD_NATS_URL ?? "nats://127.0.0.1:4222" },
    prefix: { type: "string", default: process.env.SWITCHYARD_PREFIX ?? "sy" },
    rate: { type: "string", default: "10" },
    "alert-every-ms": { type: "string", default: "2000" },
    "duration-s": { type: "string", default: "0" },
  },
});
const rate = Math.max(Number(a.rate), 0.001);
const alertEveryMs = Math.max(Number(a["alert-every-ms"]), 1);
const durationS = Number(a["duration-s"]);

// A small deterministic generator: the demo needs variety, not randomness.
let seed = 0x9e3779b9;
const random = () => {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) / 2 ** 32;
};
const pick = (xs) => xs[Math.floor(random() * xs.length)];

const nc = await connect({ servers: a["nats-url"], name: "switchyard-node-producer" });
const run = `node${Date.now().toString(36)}`;
const prices = Object.fromEntries(SYMBOLS.map((s, i) => [s, 100 + 50 * i]));
let ticks = 0;
let alerts = 0;
console.log(`node producer: ~${rate} ticks/s, an alert every ${alertEveryMs} ms, to ${a["nats-url"]} (prefix ${a.prefix})`);

const tickTimer = setInterval(() => {
  const symbol = pick(SYMBOLS);
  prices[symbol] *= 1 + (random() - 0.5) * 0.002;
  ticks++;
  nc.publish(
    `${a.prefix}.events.tick.${symbol}`,
    encode({ data: { symbol, price: Math.round(prices[symbol] * 100) / 100, seq: ticks }, target: { match: { symbol } }, durable: false }),
  );
}, 1000 / rate);

const alertTimer = setInterval(() => {
  alerts++;
  const symbol = pick(SYMBOLS);
  const pattern = pick(PATTERNS);
  const tier = pick(TIERS);
  const confidence = Math.round(random() * 100) / 100;
  nc.publish(
    `${a.prefix}.events.pattern`,
    encode({
      id: `${run}-${alerts}`,
      prio: "high",
      data: { symbol, pattern, tier, confidence, price: Math.round(prices[symbol] * 100) / 100, seq: alerts },
      target: { match: { symbol, pattern_type: pattern, tier }, values: { confidence } },
    }),
  );
}, alertEveryMs);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  clearInterval(tickTimer);
  clearInterval(alertTimer);
  await nc.flush();
  await nc.close();
  console.log(`node producer: published ${ticks} ticks and ${alerts} alerts`);
}
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
if (durationS > 0) setTimeout(stop, durationS * 1000);
