"""A Switchyard producer in Python: market ticks and pattern alerts, with the SDK.

Ticks go to ``<prefix>.events.tick.<SYMBOL>``: live only (``durable=False``),
keyed by symbol, so a backlogged connection keeps only the latest price;
plain NATS publishes (``ack=False``), as many as the rate asks.
Alerts go to ``<prefix>.events.pattern`` with no key token: durable (kept in
the delivery log for resume and offline users), never conflated, and in
order, since they share one subject; each is acknowledged by JetStream
(``ack=True``) and has an ``id``, so a retried publish is stored once.
The SDK (clients/python) builds the envelope docs/PROTOCOL.md gives
("Producers").

    bash examples/python/run.sh --rate 10 --alert-every-ms 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time

from switchyard import Switchyard, to_match

SYMBOLS = ["AAPL", "TSLA", "NVDA", "MSFT", "AMZN", "META"]
PATTERNS = ["BreakoutBO", "HeadShoulders", "DoubleBottom", "BullFlag"]
TIERS = ["intraday", "daily", "weekly"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Publish demo ticks and pattern alerts to a Switchyard fleet")
    p.add_argument("--nats-url", default=os.environ.get("SWITCHYARD_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--prefix", default=os.environ.get("SWITCHYARD_PREFIX", "sy"))
    p.add_argument("--rate", type=float, default=10.0, help="ticks per second over all symbols")
    p.add_argument("--alert-every-ms", type=int, default=2000, help="one pattern alert this often")
    p.add_argument("--duration-s", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    return p.parse_args()


async def main() -> None:
    a = parse_args()
    sy = await Switchyard.connect(a.nats_url, prefix=a.prefix, name="switchyard-python-producer")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if a.duration_s > 0:
        loop.call_later(a.duration_s, stop.set)

    run = f"py{int(time.time())}"
    rng = random.Random(7)
    prices = {s: 100.0 + 50 * i for i, s in enumerate(SYMBOLS)}
    tick_every = 1.0 / max(a.rate, 0.001)
    alert_every = a.alert_every_ms / 1000.0
    next_tick = next_alert = time.monotonic()
    ticks = alerts = 0
    print(
        f"python producer: ~{a.rate:g} ticks/s, an alert every {a.alert_every_ms} ms, to {a.nats_url} (prefix {a.prefix})",
        flush=True,
    )
    async with sy:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick += tick_every
                sym = rng.choice(SYMBOLS)
                prices[sym] *= 1 + (rng.random() - 0.5) * 0.002
                ticks += 1
                await sy.publish(
                    "tick",
                    {"symbol": sym, "price": round(prices[sym], 2), "seq": ticks},
                    target=to_match({"symbol": sym}),
                    key=sym,
                    durable=False,
                    ack=False,
                )
            if now >= next_alert:
                next_alert += alert_every
                alerts += 1
                sym, pattern, tier = rng.choice(SYMBOLS), rng.choice(PATTERNS), rng.choice(TIERS)
                confidence = round(rng.random(), 2)
                await sy.publish(
                    "pattern",
                    {
                        "symbol": sym,
                        "pattern": pattern,
                        "tier": tier,
                        "confidence": confidence,
                        "price": round(prices[sym], 2),
                        "seq": alerts,
                    },
                    target=to_match(
                        {"symbol": sym, "pattern_type": pattern, "tier": tier}, values={"confidence": confidence}
                    ),
                    id=f"{run}-{alerts}",
                    prio="high",
                )
            wait = min(next_tick, next_alert) - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
        await sy.flush()
    print(f"python producer: published {ticks} ticks and {alerts} alerts", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
