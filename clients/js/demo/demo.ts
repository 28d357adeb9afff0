// The demo page: a live watchlist of ticks (each symbol's last price at once,
// by snapshot), a "1 update/s" panel (throttle_ms) and a list of pattern
// alerts with filter controls, over the library's browser bundle (global
// `Switchyard`).
//
// Query parameters: `user` (default: one per browser, kept in localStorage),
// `encoding` (`msgpack` or `json`), `symbols` (the live watchlist, comma
// separated), `slow` (the throttled panel's symbols; those not in the
// watchlist: an event that also matches an unthrottled subscription is not
// throttled).
// Tokens come from the edge's dev endpoint (`/demo/token`, dev mode only), or
// from `#token=<jwt>` in the URL for an edge with a real key.

import type * as SY from "../src/index.js";

declare const Switchyard: typeof SY;

interface Tick {
  symbol: string;
  price: number;
  seq?: number;
}

interface Pattern {
  symbol: string;
  pattern: string;
  tier: string;
  confidence: number;
  price?: number;
  seq?: number;
}

interface DemoEvents {
  tick: Tick;
  pattern: Pattern;
}

/** What the page exposes for end-to-end tests and the console. */
interface DemoState {
  client: SY.SwitchyardClient<DemoEvents>;
  /** Alert ids (producer `id`, else `pos`) in arrival order. */
  alertIds: string[];
  ticks: number;
  /** Ticks received per symbol (both panels). */
  tickCounts: Record<string, number>;
  /** Snapshot events received (a key's last value, sent on subscribing). */
  snapshots: number;
  subscriptionsApplied: number;
  log: string[];
}

const SYMBOLS = ["AAPL", "TSLA", "NVDA", "MSFT", "AMZN", "META"];
/** The throttled panel's interval: one update per symbol per second at most. */
const SLOW_THROTTLE_MS = 1000;
const TIERS = ["intraday", "daily", "weekly"];
const MAX_ALERT_ROWS = 200;

const params = new URLSearchParams(location.search);

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`missing #${id}`);
  return e as T;
}

function demoUser(): string {
  const given = params.get("user");
  if (given) return given;
  const key = "switchyard-demo-user";
  let user = localStorage.getItem(key);
  if (!user) {
    user = `demo-${Math.random().toString(36).slice(2, 10)}`;
    localStorage.setItem(key, user);
  }
  return user;
}

const user = demoUser();
const encoding: SY.Encoding = params.get("encoding") === "json" ? "json" : "msgpack";
function symbolList(text: string): string[] {
  return text
    .split(",")
    .map((s) => s.trim().toUpperCase())
    .filter((s) => /^[A-Z0-9._-]{1,16}$/.test(s));
}
const watchlist = symbolList(params.get("symbols") ?? SYMBOLS.slice(0, 4).join(","));
const slowlist = symbolList(params.get("slow") ?? SYMBOLS.slice(4).join(",")).filter((s) => !watchlist.includes(s));
/** Alerts can be about any symbol on the page. */
const alertSymbols = [...watchlist, ...slowlist];
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const positionKey = `switchyard-demo-pos:${user}`;

function hashToken(): string | null {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]!) : null;
}

/** The token provider: `#token=` when given, else the edge's dev endpoint (called again before `exp`). */
async function token(): Promise<string> {
  const fixed = hashToken();
  if (fixed) return fixed;
  const r = await fetch(`token?sub=${encodeURIComponent(user)}`, { cache: "no-store" });
  if (r.status === 404) {
    throw new Error("no dev token endpoint: run the edge with --dev-insecure (scripts/dev.sh does), or open this page with #token=<jwt>");
  }
  if (!r.ok) throw new Error(`token endpoint: HTTP ${r.status}`);
  const body = (await r.json()) as { token: string };
  return body.token;
}

function loadPosition(): SY.Position | null {
  try {
    const p = JSON.parse(localStorage.getItem(positionKey) ?? "null") as SY.Position | null;
    return p && typeof p.epoch === "string" && typeof p.pos === "number" ? p : null;
  } catch {
    return null;
  }
}

const client = new Switchyard.SwitchyardClient<DemoEvents>({
  url: wsUrl,
  token,
  encoding,
  position: loadPosition(),
  // The persistence hook: a reload resumes where this page stopped.
  onPosition: (p) => localStorage.setItem(positionKey, JSON.stringify(p)),
});

const state: DemoState = { client, alertIds: [], ticks: 0, tickCounts: {}, snapshots: 0, subscriptionsApplied: 0, log: [] };
(window as unknown as { switchyardDemo: DemoState }).switchyardDemo = state;

// ---- connection status, counters, log ----

function log(line: string): void {
  const t = new Date().toLocaleTimeString();
  state.log.push(line);
  const li = document.createElement("li");
  li.textContent = `${t}  ${line}`;
  const ol = el("log");
  ol.prepend(li);
  while (ol.children.length > 40) ol.lastElementChild?.remove();
}

function setStatus(state: string, text: string): void {
  const s = el("status");
  s.dataset.state = state;
  s.textContent = text;
}

let reconnectAt = 0;
client.on("state", ({ state: st }) => {
  const text: Record<SY.ConnectionState, string> = {
    idle: "idle",
    connecting: "connecting…",
    resuming: "resuming…",
    open: "live",
    reconnecting: "reconnecting…",
    closed: "closed",
  };
  let label = text[st];
  if (st === "reconnecting" && reconnectAt > Date.now()) {
    label = `reconnecting in ${((reconnectAt - Date.now()) / 1000).toFixed(1)} s`;
  }
  setStatus(st, label);
});
client.on("ready", (r) => {
  log(`ready conn=${r.conn} user=${r.user} pos=${r.pos}${r.resuming ? " (resume asked)" : ""}`);
  el("footer").textContent = `user ${r.user} · conn ${r.conn} · ${client.encoding} · heartbeat ${r.heartbeatMs} ms · ${wsUrl}`;
});
client.on("resumed", (r) => {
  log(`resumed recovered=${r.recovered} replayed=${r.replayed}`);
  el("c-last-resume").textContent = `last: ${r.recovered ? "recovered" : "NOT recovered"}, ${r.replayed} replayed`;
});
client.on("dropped", (d) => log(`dropped ${d.count} (${d.reason})`));
client.on("reconnect", (a) => log(`node draining: reconnect advised in ${a.afterMs} ms`));
client.on("close", (c) => {
  if (c.delayMs !== undefined) reconnectAt = Date.now() + c.delayMs;
  log(`closed ${c.code}${c.reason ? ` ${c.reason}` : ""}${c.willReconnect ? `, reconnecting in ${c.delayMs} ms` : ""}`);
});
client.on("error", (e) => {
  log(`error ${e.code}: ${e.message}`);
  if (e.code === "connect_failed") setStatus("error", "cannot connect");
});

function renderCounters(): void {
  const s = client.stats;
  el("c-events").textContent = String(s.events);
  el("c-ticks").textContent = String(state.ticks);
  el("c-alerts").textContent = String(state.alertIds.length);
  el("c-resumes").textContent = String(s.resumes);
  const dropped = Object.values(s.dropped).reduce((a, b) => a + b, 0);
  el("c-dropped").textContent = String(dropped);
  el("c-dropped-detail").textContent =
    Object.entries(s.dropped)
      .map(([k, v]) => `${k} ${v}`)
      .join(", ") || "none";
  el("c-reconnects").textContent = String(Math.max(0, s.connects - 1));
  el("c-attempts").textContent = `${s.failedAttempts} failed attempts`;
  const p = client.position;
  el("c-pos").textContent = p ? String(p.pos) : "–";
  el("c-epoch").textContent = p ? p.epoch : "–";
}
setInterval(renderCounters, 250);

// ---- watchlist (live) and the "1 update/s" panel (throttled) ----

const rows = new Map<string, { tr: HTMLTableRowElement; last?: number; count: number }>();
function fillTable(table: string, symbols: string[]): void {
  const body = el(table).querySelector("tbody")!;
  for (const sym of symbols) {
    const tr = document.createElement("tr");
    tr.dataset.symbol = sym;
    tr.innerHTML = `<td>${sym}</td><td class="price">–</td><td class="chg">–</td><td class="n">0</td><td class="at">–</td>`;
    body.append(tr);
    rows.set(sym, { tr, count: 0 });
  }
}
fillTable("watchlist", watchlist);
fillTable("slowlist", slowlist);

client.onEvent("tick", (e) => {
  const row = rows.get(e.data.symbol);
  if (!row) return;
  state.ticks++;
  state.tickCounts[e.data.symbol] = (state.tickCounts[e.data.symbol] ?? 0) + 1;
  if (e.snapshot) state.snapshots++;
  row.count++;
  const cells = row.tr.children;
  const chg = cells[2] as HTMLElement;
  if (row.last !== undefined) {
    const d = e.data.price - row.last;
    chg.textContent = `${d >= 0 ? "▲" : "▼"} ${Math.abs(d).toFixed(2)}`;
    chg.className = `chg ${d >= 0 ? "up" : "down"}`;
  }
  row.last = e.data.price;
  cells[1]!.textContent = e.data.price.toFixed(2);
  cells[3]!.textContent = String(row.count);
  // A snapshot is the symbol's last price from before the page subscribed.
  cells[4]!.textContent = `${new Date(e.ts).toLocaleTimeString()}${e.snapshot ? " (last)" : ""}`;
  row.tr.classList.remove("flash");
  void row.tr.offsetWidth;
  row.tr.classList.add("flash");
});

// ---- alerts ----

client.onEvent("pattern", (e) => {
  const id = String(e.id ?? e.pos ?? "");
  state.alertIds.push(id);
  const a = e.data;
  const li = document.createElement("li");
  li.className = "new";
  li.dataset.id = id;
  li.dataset.tier = a.tier;
  li.dataset.symbol = a.symbol;
  li.dataset.confidence = String(a.confidence);
  const replayed = client.state === "resuming";
  li.innerHTML =
    `<span>${new Date(e.ts).toLocaleTimeString()}</span><b>${a.symbol}</b><span>${a.pattern}</span>` +
    `<span>${a.tier}</span><span class="conf">${a.confidence.toFixed(2)}</span>` +
    `<span class="tag">${replayed ? "replayed" : e.prio === "high" ? "high" : ""}</span>`;
  const ol = el("alerts");
  ol.prepend(li);
  while (ol.children.length > MAX_ALERT_ROWS) ol.lastElementChild?.remove();
});

// ---- filters → subscriptions ----

function checkboxes(container: string, name: string, values: string[]): void {
  const c = el(container);
  for (const v of values) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" name="${name}" value="${v}" checked /> ${v}`;
    c.append(label);
  }
}
checkboxes("f-symbols", "symbol", alertSymbols);
checkboxes("f-tiers", "tier", TIERS);

function checked(name: string): string[] {
  return [...document.querySelectorAll<HTMLInputElement>(`input[name="${name}"]:checked`)].map((i) => i.value);
}

function subStatus(text: string, cls: "" | "ok" | "err"): void {
  const s = el("sub-status");
  s.textContent = text;
  s.className = `sub-status ${cls}`;
}

/**
 * The two tick panels. `snapshot` gives each symbol's last price at once,
 * even for one that has not ticked since; the slow panel's symbols are in no
 * unthrottled subscription, so `throttle_ms` holds for them.
 */
let ticksSubscribed = false;
async function subscribeTicks(): Promise<void> {
  await client.subscribe({ sub: "watchlist", type: "tick", filters: { symbol: watchlist }, snapshot: true });
  if (slowlist.length > 0) {
    await client.subscribe({ sub: "slow", type: "tick", filters: { symbol: slowlist }, snapshot: true, throttle_ms: SLOW_THROTTLE_MS });
  }
  ticksSubscribed = true;
}
// The edge keeps subscriptions across reconnects, but ticks are not durable: after
// a reconnect, ask again for the last prices missed while away.
client.on("ready", (r) => {
  if (r.resuming && ticksSubscribed) {
    subscribeTicks().catch((err: unknown) => log(`tick subscriptions: ${String(err)}`));
  }
});

let applying = Promise.resolve();
/** Sends the subscriptions the controls describe (the same names replace the old ones). */
function applySubscriptions(): Promise<void> {
  applying = applying.then(async () => {
    const symbols = checked("symbol");
    const tiers = checked("tier");
    const min = Number(el<HTMLInputElement>("f-min").value);
    el("f-min-out").textContent = min.toFixed(2);
    try {
      if (!ticksSubscribed) await subscribeTicks();
      if (symbols.length === 0 || tiers.length === 0) {
        await client.unsubscribe("alerts");
        subStatus("subscription: alerts off (no symbol or tier selected)", "ok");
      } else {
        await client.subscribe({
          sub: "alerts",
          type: "pattern",
          filters: { symbol: symbols, tier: tiers },
          min: { confidence: min },
        });
        subStatus(`subscription: ${symbols.join(",")} · ${tiers.join(",")} · confidence ≥ ${min.toFixed(2)} ✓`, "ok");
      }
      state.subscriptionsApplied++;
      el("sub-status").dataset.applied = String(state.subscriptionsApplied);
    } catch (err) {
      const e = err as SY.SwitchyardError;
      subStatus(`subscription failed: ${e.code ?? ""} ${e.message}`, "err");
    }
  });
  return applying;
}

el("filters").addEventListener("change", () => void applySubscriptions());
el("f-min").addEventListener("input", () => {
  el("f-min-out").textContent = Number(el<HTMLInputElement>("f-min").value).toFixed(2);
});

setStatus("connecting", "connecting…");
client.connect().then(
  () => applySubscriptions(),
  (err: unknown) => log(`connect failed: ${String(err)}`),
);
