/**
 * The Switchyard client: one logical connection that survives socket
 * failures. It authenticates (header or first frame), keeps the largest
 * `pos` seen with its `epoch` and resumes from it on every reconnect,
 * reconnects with capped, fully jittered exponential backoff (or after the
 * delay a draining node advises), refreshes the token before `exp`, and
 * watches the connection's heartbeat. Requests are promises resolved by the
 * reply carrying their `id`. It listens to the platform's network and page
 * visibility: no attempts while offline, an attempt at once when the network
 * comes back or a page returns to a connection that went quiet.
 */

import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { codecFor, type Codec, type Frame } from "./codec.js";
import { Emitter, reportListenerError } from "./emitter.js";
import { browserNetwork, browserVisibility } from "./environment.js";
import { refreshDelay, tokenTimes, type TokenProvider } from "./token.js";
import type { Transport, TransportFactory } from "./transport.js";
import {
  CloseCodes,
  MAX_THROTTLE_MS,
  SUBPROTOCOLS,
  type DroppedInfo,
  type Encoding,
  type LocalErrorCode,
  type NetworkSource,
  type PongInfo,
  type Position,
  type ProtocolErrorCode,
  type ReadyInfo,
  type ReconnectAdvice,
  type ResumedInfo,
  type Subscription,
  type SwitchyardEvent,
  type VisibilitySource,
} from "./types.js";

/** An `error` frame from the edge, or a local failure (timeout, disconnect, close). */
export class SwitchyardError extends Error {
  /** The protocol's error code, or a local one. */
  readonly code: ProtocolErrorCode | LocalErrorCode | string;

  constructor(code: ProtocolErrorCode | LocalErrorCode | string, message: string) {
    super(message);
    this.name = "SwitchyardError";
    this.code = code;
  }
}

/** Connection states, in the order a connection usually goes through them. */
export type ConnectionState =
  /** Created, `connect()` not called yet. */
  | "idle"
  /** Opening the socket and authenticating. */
  | "connecting"
  /** `ready` received with a resume asked; replaying until `resumed`. */
  | "resuming"
  /** Live. */
  | "open"
  /** Waiting before the next attempt. */
  | "reconnecting"
  /** Closed by the application (`close()`); nothing more happens. */
  | "closed";

/** Reconnect settings (`false` turns reconnecting off). */
export interface ReconnectOptions extends BackoffOptions {
  /** A connection that stayed ready this long resets the backoff (default 10000 ms). */
  stableAfterMs?: number;
}

/** Client settings. Only `url` and `token` are required. */
export interface ClientOptions {
  /** The edge's WebSocket endpoint, e.g. `wss://rt.example.com/ws`. */
  url: string;
  /** A token, or a callback giving one: called at every connect and before `exp` to refresh. */
  token: TokenProvider;
  /** `msgpack` (default) or `json`. */
  encoding?: Encoding;
  /** `frame` (first frame; browsers) or `header` (`Authorization` on the upgrade; Node). */
  auth?: "frame" | "header";
  /** How sockets are opened (each entry point has a default). */
  transport?: TransportFactory;
  /** Where to resume from at the first connect (e.g. read back from storage); later ones use what was seen. */
  position?: Position | null;
  /** Called whenever the position changes, to persist it. */
  onPosition?: (position: Position) => void;
  /** Reconnect backoff, or `false` to stay closed after a failure. */
  reconnect?: ReconnectOptions | false;
  /** Time a request (`subscribe`, `rpc`, ...) waits for its reply (default 10000 ms). */
  requestTimeoutMs?: number;
  /** Time a connection attempt has to reach `ready` (default 10000 ms). */
  connectTimeoutMs?: number;
  /** Refresh the token this long before `exp` (default: a fifth of its lifetime, 1–60 s). */
  refreshMarginMs?: number;
  /** Watchdog interval override; default the `heartbeat_ms` announced in `ready`. */
  heartbeatMs?: number;
  /** Random source for backoff jitter (tests). */
  random?: () => number;
  /**
   * Whether the device is online. Default: `navigator.onLine` with the
   * `online`/`offline` events where the platform has them (browsers,
   * workers); pass one for React Native (NetInfo), or `false` to ignore the
   * network. While offline the client makes no attempts; when the network
   * comes back it connects at once (no backoff wait) and resumes.
   */
  network?: NetworkSource | false;
  /**
   * Whether the page is visible. Default: `document.visibilityState` with
   * `visibilitychange` in browsers; pass one for React Native (AppState), or
   * `false` to ignore it. A page visible again after being hidden longer than
   * one heartbeat interval checks its connection: one on which nothing
   * arrived for that long is replaced at once (with resume), and a pending
   * backoff wait is cut short.
   */
  visibility?: VisibilitySource | false;
}

/** Checks the fields a `subscribe` may carry that the edge would refuse anyway; the message, or `null`. */
export function subscriptionProblem(s: Subscription): string | null {
  if (!s || typeof s !== "object") return "a subscription must be an object";
  if (s.snapshot !== undefined && typeof s.snapshot !== "boolean") return "snapshot must be a boolean";
  const t = s.throttle_ms;
  if (t !== undefined && (typeof t !== "number" || !Number.isInteger(t) || t < 1 || t > MAX_THROTTLE_MS)) {
    return `throttle_ms must be an integer from 1 to ${MAX_THROTTLE_MS}`;
  }
  return null;
}

/** The union of typed events for an event map `E` (type name → `data` type). */
export type EventOf<E> = { [K in keyof E & string]: SwitchyardEvent<K, E[K]> }[keyof E & string];

/** Why a connection ended, and what happens next. */
export interface CloseInfo {
  code: number;
  reason: string;
  /** Whether the client will connect again. */
  willReconnect: boolean;
  /** Delay before the next attempt, when it will (absent while waiting for the network). */
  delayMs?: number;
  /** The device is offline: the next attempt waits for the network to come back. */
  waitingForNetwork?: boolean;
}

/** Counters since the client was created. */
export interface ClientStats {
  /** Connections that reached `ready`. */
  connects: number;
  /** Connections that ended other than by `close()`. */
  disconnects: number;
  /** Of those, attempts that ended before `ready` (refused, unreachable, timed out). */
  failedAttempts: number;
  /** Events delivered to the application. */
  events: number;
  /** Durable events (with `pos`) among them. */
  durable: number;
  /** `batch` frames received. */
  batches: number;
  /** `resumed` frames received, and how many said `recovered: true`. */
  resumes: number;
  recovered: number;
  /** Events replayed by resumes. */
  replayed: number;
  /** Events the edge reported as not sent, by reason. */
  dropped: Record<string, number>;
  /** Snapshot events (`snapshot: true`) among the delivered ones. */
  snapshots: number;
  /** Durable events at or below the current position (the edge promises none). */
  duplicatesSkipped: number;
  /** Connections closed by the heartbeat watchdog. */
  heartbeatTimeouts: number;
}

/** The client's own events (`on(name, listener)`). */
export interface ClientEvents<E> {
  /** Every delivered event (batches flattened), in order. */
  event: EventOf<E>;
  /** Connection state changes. */
  state: { state: ConnectionState; previous: ConnectionState };
  /** A connection became ready. */
  ready: ReadyInfo;
  /** A resume finished. */
  resumed: ResumedInfo;
  /** The edge did not send some events (rate limit, slow consumer). */
  dropped: DroppedInfo;
  /** A draining node asked to reconnect after a delay. */
  reconnect: ReconnectAdvice;
  /** A connection ended. */
  close: CloseInfo;
  /** An `error` frame that answers no pending request, or a connection failure. */
  error: SwitchyardError;
  /** The resume position changed. */
  position: Position;
  /** The platform reported the network going away or coming back. */
  network: { online: boolean };
}

type Timer = ReturnType<typeof setTimeout>;

interface Pending {
  frame: Record<string, unknown>;
  sent: boolean;
  resolve: (f: Frame) => void;
  reject: (e: SwitchyardError) => void;
  timer: Timer;
}

/** One socket's life. */
interface Conn {
  transport?: Transport;
  done: boolean;
  token: string;
  resume: Position | null;
  ready?: ReadyInfo;
  readyAt?: number;
  lastRecv: number;
  pingSent: boolean;
  advice?: ReconnectAdvice;
  lastError?: string;
  /** The device went offline while this connection was up: it may be dead without knowing it. */
  offlineSeen: boolean;
  timers: Set<Timer>;
  intervals: Set<ReturnType<typeof setInterval>>;
}

/** Defaults an entry point supplies (browser: WebSocket + frame auth; Node: ws + header auth). */
export interface EntryDefaults {
  transport: TransportFactory;
  auth: "frame" | "header";
}

const MAX_ID = 0xffff_ffff;

/**
 * A Switchyard connection. `E` maps event types to their `data` types, for
 * typed callbacks: `new SwitchyardClient<{ tick: Tick }>(...).onEvent("tick", e => e.data.price)`.
 */
export class ClientCore<E = Record<string, unknown>> extends Emitter<ClientEvents<E>> {
  /** Counters since creation. */
  readonly stats: ClientStats = {
    connects: 0,
    disconnects: 0,
    failedAttempts: 0,
    events: 0,
    durable: 0,
    batches: 0,
    resumes: 0,
    recovered: 0,
    replayed: 0,
    dropped: {},
    snapshots: 0,
    duplicatesSkipped: 0,
    heartbeatTimeouts: 0,
  };

  private readonly opts: ClientOptions;
  private readonly transportFactory: TransportFactory;
  private readonly authMode: "frame" | "header";
  private readonly codec: Codec;
  private readonly typed = new Map<string, Set<(ev: never) => void>>();
  private readonly pending = new Map<number, Pending>();
  private stateValue: ConnectionState = "idle";
  private positionValue: Position | null;
  private conn: Conn | null = null;
  private attempt = 0;
  private nextId = 1;
  private reconnectTimer: Timer | undefined;
  private readyWaiters: { resolve: (r: ReadyInfo) => void; reject: (e: SwitchyardError) => void }[] = [];
  private lastReady: ReadyInfo | null = null;
  private readonly network: NetworkSource | null;
  private readonly visibility: VisibilitySource | null;
  /** Removes the network and visibility listeners (set while connecting or connected). */
  private detachEnvironment: (() => void) | null = null;
  /** Offline: the next attempt waits for the network to come back. */
  private waitingForNetwork = false;
  /** When the page was hidden, while it is. */
  private hiddenAt: number | undefined;

  constructor(options: ClientOptions, defaults: EntryDefaults) {
    super();
    if (!options || typeof options.url !== "string") throw new TypeError("options.url is required");
    if (options.token === undefined) throw new TypeError("options.token is required");
    this.opts = options;
    this.transportFactory = options.transport ?? defaults.transport;
    this.authMode = options.auth ?? defaults.auth;
    this.codec = codecFor(options.encoding ?? "msgpack");
    this.positionValue = options.position ? { ...options.position } : null;
    this.network = options.network === false ? null : (options.network ?? browserNetwork());
    this.visibility = options.visibility === false ? null : (options.visibility ?? browserVisibility());
  }

  /** Whether the platform says the device is online (always `true` without a network source). */
  get online(): boolean {
    return !this.offline();
  }

  /** The current connection state. */
  get state(): ConnectionState {
    return this.stateValue;
  }

  /** Where a resume would start: the largest `pos` seen, with its `epoch`. */
  get position(): Position | null {
    return this.positionValue ? { ...this.positionValue } : null;
  }

  /** What the current (or last) connection's `ready` said. */
  get ready(): ReadyInfo | null {
    return this.lastReady;
  }

  /** The encoding in use. */
  get encoding(): Encoding {
    return this.codec.encoding;
  }

  /**
   * Starts connecting (and keeps reconnecting until `close()`); resolves
   * with the first `ready`. Rejects only when `close()` is called first.
   */
  connect(): Promise<ReadyInfo> {
    const p = new Promise<ReadyInfo>((resolve, reject) => {
      if (this.stateValue === "open" || this.stateValue === "resuming") {
        if (this.lastReady) return resolve(this.lastReady);
      }
      this.readyWaiters.push({ resolve, reject });
    });
    if (this.stateValue === "idle" || this.stateValue === "closed") {
      this.attempt = 0;
      this.attachEnvironment();
      if (this.offline()) {
        this.waitingForNetwork = true;
        this.setState("connecting");
      } else {
        void this.open();
      }
    }
    return p;
  }

  /** Closes the connection for good (code 1000); pending requests fail with `closed`. */
  close(): void {
    const prev = this.stateValue;
    if (prev === "closed") return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.stopEnvironment();
    const conn = this.conn;
    this.conn = null;
    if (conn) {
      this.endConn(conn);
      try {
        conn.transport?.close(CloseCodes.normal, "client closed");
      } catch {
        conn.transport?.abort();
      }
    }
    this.failPending(() => true, "closed", "client closed");
    for (const w of this.readyWaiters.splice(0)) w.reject(new SwitchyardError("closed", "client closed"));
    this.setState("closed");
    if (prev !== "idle" && conn) this.emit("close", { code: CloseCodes.normal, reason: "client closed", willReconnect: false });
  }

  /** Drops the current socket and connects again at once, resuming (e.g. after `dropped`). */
  reconnect(): void {
    const conn = this.conn;
    if (!conn || this.stateValue === "closed") return;
    this.lose(conn, CloseCodes.normal, "reconnect requested", true);
  }

  /** Calls `fn` for every event of type `type`; returns a function that removes it. */
  onEvent<K extends keyof E & string>(type: K, fn: (event: SwitchyardEvent<K, E[K]>) => void): () => void {
    let set = this.typed.get(type);
    if (!set) {
      set = new Set();
      this.typed.set(type, set);
    }
    set.add(fn as (ev: never) => void);
    return () => {
      this.typed.get(type)?.delete(fn as (ev: never) => void);
    };
  }

  /**
   * Creates or replaces the named subscription. `snapshot` and `throttle_ms`
   * (protocol 1.1) are checked here first: a bad value rejects with
   * `invalid_filter` without a round trip.
   */
  async subscribe(subscription: Subscription): Promise<void> {
    const problem = subscriptionProblem(subscription);
    if (problem) throw new SwitchyardError("invalid_filter", problem);
    await this.request({ op: "subscribe", ...subscription });
  }

  /** Removes a subscription (resolves also when it did not exist). */
  async unsubscribe(sub: string): Promise<void> {
    await this.request({ op: "unsubscribe", sub });
  }

  /** The user's subscriptions. */
  async list(): Promise<Subscription[]> {
    const reply = await this.request({ op: "list" });
    return Array.isArray(reply.subs) ? (reply.subs as Subscription[]) : [];
  }

  /** Joins a room (rejects with `forbidden` when the token does not allow it). */
  async join(room: string): Promise<void> {
    await this.request({ op: "join", room });
  }

  /** Leaves a room. */
  async leave(room: string): Promise<void> {
    await this.request({ op: "leave", room });
  }

  /** Round trip to the edge. */
  async ping(): Promise<PongInfo> {
    const started = Date.now();
    const reply = await this.request({ op: "ping" });
    return { serverTime: Number(reply.server_time), rttMs: Date.now() - started };
  }

  /** Calls an application method; resolves with its `data`, rejects with its error code. */
  async rpc<T = unknown>(method: string, data?: unknown, options: { timeoutMs?: number } = {}): Promise<T> {
    const reply = await this.request({ op: "rpc", method, data: data ?? null }, options.timeoutMs);
    return reply.data as T;
  }

  // ---- requests ----

  /** Sends a frame with a fresh `id` (now, or once the connection is ready) and waits for its reply. */
  private request(frame: Record<string, unknown>, timeoutMs?: number): Promise<Frame> {
    if (this.stateValue === "closed") {
      return Promise.reject(new SwitchyardError("closed", "client closed"));
    }
    return new Promise<Frame>((resolve, reject) => {
      const id = this.allocId();
      const wait = timeoutMs ?? this.opts.requestTimeoutMs ?? 10_000;
      const timer = setTimeout(() => {
        if (this.pending.delete(id)) reject(new SwitchyardError("timeout", `no reply to ${String(frame.op)} within ${wait} ms`));
      }, wait);
      const p: Pending = { frame: { ...frame, id }, sent: false, resolve, reject, timer };
      this.pending.set(id, p);
      const conn = this.conn;
      if (conn?.ready && !conn.done) this.sendPending(conn, p);
    });
  }

  private allocId(): number {
    for (let i = 0; i < 1000; i++) {
      const id = this.nextId;
      this.nextId = this.nextId >= MAX_ID ? 1 : this.nextId + 1;
      if (!this.pending.has(id)) return id;
    }
    throw new SwitchyardError("internal", "too many requests in flight");
  }

  private sendPending(conn: Conn, p: Pending): void {
    if (this.send(conn, p.frame)) p.sent = true;
  }

  private failPending(which: (p: Pending) => boolean, code: LocalErrorCode, message: string): void {
    for (const [id, p] of this.pending) {
      if (!which(p)) continue;
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new SwitchyardError(code, message));
    }
  }

  private send(conn: Conn, frame: Record<string, unknown>): boolean {
    if (!conn.transport || conn.done) return false;
    try {
      conn.transport.send(this.codec.encode(frame));
      return true;
    } catch (err) {
      conn.lastError = String(err);
      return false;
    }
  }

  // ---- connection lifecycle ----

  /** Whether a `close` listener just closed the client (read after the emit, past TypeScript's narrowing). */
  private closedByListener(): boolean {
    return this.stateValue === "closed";
  }

  private setState(state: ConnectionState): void {
    const previous = this.stateValue;
    if (previous === state) return;
    this.stateValue = state;
    this.emit("state", { state, previous });
  }

  private async open(): Promise<void> {
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.setState("connecting");
    const conn: Conn = {
      done: false,
      token: "",
      resume: this.positionValue ? { ...this.positionValue } : null,
      lastRecv: Date.now(),
      pingSent: false,
      offlineSeen: false,
      timers: new Set(),
      intervals: new Set(),
    };
    this.conn = conn;
    try {
      conn.token = await this.fetchToken();
    } catch (err) {
      if (this.conn !== conn || conn.done) return;
      this.emit("error", new SwitchyardError("connect_failed", `token provider failed: ${String(err)}`));
      this.connEnded(conn, 1006, "token provider failed");
      return;
    }
    if (this.conn !== conn || conn.done) return;
    const resume = conn.resume;
    const protocols = [SUBPROTOCOLS[this.codec.encoding]];
    let url = this.opts.url;
    let headers: Record<string, string> | undefined;
    if (this.authMode === "header") {
      headers = { Authorization: `Bearer ${conn.token}` };
      if (resume) {
        const u = new URL(url);
        u.searchParams.set("epoch", resume.epoch);
        u.searchParams.set("since", String(resume.pos));
        url = u.toString();
      }
    }
    this.later(conn, this.opts.connectTimeoutMs ?? 10_000, () => {
      if (!conn.ready) this.lose(conn, CloseCodes.heartbeatTimeout, "connect timeout");
    });
    try {
      conn.transport = this.transportFactory(
        { url, protocols, headers },
        {
          open: () => {
            if (conn.done) return;
            conn.lastRecv = Date.now();
            if (this.authMode === "frame") {
              const auth: Record<string, unknown> = { op: "auth", id: this.allocId(), token: conn.token };
              if (resume) {
                auth.epoch = resume.epoch;
                auth.since = resume.pos;
              }
              this.send(conn, auth);
            }
          },
          message: (data) => this.onMessage(conn, data),
          ping: () => {
            conn.lastRecv = Date.now();
            conn.pingSent = false;
          },
          error: (message) => {
            conn.lastError = message;
          },
          close: (code, reason) => this.connEnded(conn, code, reason || conn.lastError || ""),
        },
      );
    } catch (err) {
      conn.lastError = String(err);
      this.emit("error", new SwitchyardError("connect_failed", String(err)));
      this.connEnded(conn, 1006, String(err));
    }
  }

  private async fetchToken(): Promise<string> {
    const t = this.opts.token;
    const token = typeof t === "function" ? await t() : t;
    if (typeof token !== "string" || token.length === 0) throw new Error("the token provider gave no token");
    return token;
  }

  private later(conn: Conn, ms: number, fn: () => void): void {
    const t = setTimeout(() => {
      conn.timers.delete(t);
      if (!conn.done) fn();
    }, ms);
    conn.timers.add(t);
  }

  /** Stops everything a connection scheduled; it calls nothing afterwards. */
  private endConn(conn: Conn): void {
    conn.done = true;
    for (const t of conn.timers) clearTimeout(t);
    for (const i of conn.intervals) clearInterval(i);
    conn.timers.clear();
    conn.intervals.clear();
  }

  /** Gives up on a socket that is not answering (watchdog, connect timeout) or that the app wants replaced. */
  private lose(conn: Conn, code: number, reason: string, immediate = false): void {
    if (conn.done) return;
    const t = conn.transport;
    if (t) {
      try {
        // Tell the server when it can still hear us; a dead peer is not waited for.
        t.close(code === CloseCodes.normal ? CloseCodes.normal : CloseCodes.heartbeatTimeout, reason);
      } catch {
        // Already closing.
      }
      t.abort();
    }
    this.connEnded(conn, code, reason, immediate);
  }

  /** A socket ended: fail its in-flight requests and decide whether and when to connect again. */
  private connEnded(conn: Conn, code: number, reason: string, immediate = false): void {
    if (conn.done) return;
    this.endConn(conn);
    if (this.conn === conn) this.conn = null;
    this.stats.disconnects++;
    if (!conn.ready) this.stats.failedAttempts++;
    this.failPending((p) => p.sent, "disconnected", `connection lost (${code}${reason ? ` ${reason}` : ""})`);
    if (this.stateValue === "closed") return;
    const rc = this.opts.reconnect;
    if (rc === false) {
      this.stopEnvironment();
      this.failPending(() => true, "closed", "connection lost and reconnect is off");
      for (const w of this.readyWaiters.splice(0)) w.reject(new SwitchyardError("closed", "connection lost"));
      this.setState("closed");
      this.emit("close", { code, reason, willReconnect: false });
      return;
    }
    const backoff = rc ?? {};
    // A connection that stayed ready for a while proves the path: start the backoff over.
    if (conn.readyAt !== undefined && Date.now() - conn.readyAt >= (backoff.stableAfterMs ?? 10_000)) {
      this.attempt = 0;
    }
    if (this.offline()) {
      // No attempts while offline (they would fail and grow the backoff): the network's return starts the next one.
      this.waitingForNetwork = true;
      this.emit("close", { code, reason, willReconnect: true, waitingForNetwork: true });
      // A listener that closed the client keeps it closed.
      if (!this.closedByListener()) this.setState("reconnecting");
      return;
    }
    let delayMs: number;
    if (immediate) {
      delayMs = 0;
    } else if (conn.advice) {
      // A draining node spreads its clients itself: follow its delay.
      delayMs = conn.advice.afterMs;
    } else {
      delayMs = backoffDelay(this.attempt, backoff, this.opts.random);
      this.attempt++;
    }
    this.emit("close", { code, reason, willReconnect: true, delayMs });
    // A listener that closed the client keeps it closed.
    if (this.closedByListener()) return;
    this.setState("reconnecting");
    if (immediate) {
      void this.open();
      return;
    }
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this.stateValue !== "reconnecting") return;
      if (this.offline()) this.waitingForNetwork = true;
      else void this.open();
    }, delayMs);
  }

  // ---- network and page visibility ----

  /** Whether the network source says offline (a source that throws counts as online). */
  private offline(): boolean {
    if (!this.network) return false;
    try {
      return this.network.isOnline() === false;
    } catch (err) {
      reportListenerError(err);
      return false;
    }
  }

  private attachEnvironment(): void {
    if (this.detachEnvironment) return;
    const offs: (() => void)[] = [];
    try {
      if (this.network) offs.push(this.network.subscribe((online) => this.onNetwork(online)));
      if (this.visibility) {
        this.hiddenAt = this.visibility.isVisible() ? undefined : Date.now();
        offs.push(this.visibility.subscribe((visible) => this.onVisibility(visible)));
      }
    } catch (err) {
      // A broken source must not stop the connection; it is reported like a listener error.
      reportListenerError(err);
    }
    this.detachEnvironment = () => {
      for (const off of offs) {
        try {
          off();
        } catch (err) {
          reportListenerError(err);
        }
      }
    };
  }

  private stopEnvironment(): void {
    const detach = this.detachEnvironment;
    this.detachEnvironment = null;
    this.waitingForNetwork = false;
    this.hiddenAt = undefined;
    detach?.();
  }

  private onNetwork(online: boolean): void {
    if (this.stateValue === "closed" || this.stateValue === "idle") return;
    this.emit("network", { online });
    if (!online) {
      // A pending backoff wait becomes a wait for the network; an open socket is kept (it may still work).
      if (this.reconnectTimer !== undefined) {
        clearTimeout(this.reconnectTimer);
        this.reconnectTimer = undefined;
        this.waitingForNetwork = true;
      }
      if (this.conn) this.conn.offlineSeen = true;
      return;
    }
    if (this.offline()) return;
    this.attempt = 0;
    this.reconnectNow("network back");
  }

  private onVisibility(visible: boolean): void {
    if (!visible) {
      this.hiddenAt ??= Date.now();
      return;
    }
    const hiddenAt = this.hiddenAt;
    this.hiddenAt = undefined;
    if (hiddenAt === undefined || this.stateValue === "closed" || this.stateValue === "idle") return;
    const hb = this.heartbeatInterval();
    if (Date.now() - hiddenAt <= hb || this.offline()) return;
    this.reconnectNow("page visible again", hb);
  }

  /**
   * Connects at once when the client is waiting (for the network, or out a
   * backoff delay), or replaces the socket when it may be dead: it went
   * through an offline period, or nothing arrived on it for `quietMs`.
   */
  private reconnectNow(why: string, quietMs?: number): void {
    if (this.waitingForNetwork || this.reconnectTimer !== undefined) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
      this.waitingForNetwork = false;
      if (this.stateValue === "connecting" && !this.conn) void this.open();
      else if (this.stateValue === "reconnecting") void this.open();
      return;
    }
    const conn = this.conn;
    if (!conn?.ready || conn.done) return;
    const stale = conn.offlineSeen || (quietMs !== undefined && Date.now() - conn.lastRecv >= quietMs);
    if (stale) this.lose(conn, CloseCodes.normal, `${why}: reconnecting`, true);
  }

  private heartbeatInterval(): number {
    return Math.max(100, this.opts.heartbeatMs ?? this.lastReady?.heartbeatMs ?? 25_000);
  }

  // ---- incoming frames ----

  private onMessage(conn: Conn, data: ArrayBuffer | ArrayBufferView | string): void {
    if (conn.done) return;
    conn.lastRecv = Date.now();
    conn.pingSent = false;
    let frame: Frame;
    try {
      frame = this.codec.decode(data);
    } catch (err) {
      this.emit("error", new SwitchyardError("bad_frame", `undecodable frame from the edge: ${String(err)}`));
      return;
    }
    switch (frame.op) {
      case "event":
        this.deliver(frame);
        return;
      case "batch":
        this.stats.batches++;
        if (Array.isArray(frame.events)) {
          for (const ev of frame.events) {
            if (conn.done) return;
            if (ev && typeof ev === "object") this.deliver(ev as Frame);
          }
        }
        return;
      case "ready":
        this.onReady(conn, frame);
        return;
      case "resumed": {
        const info: ResumedInfo = { recovered: frame.recovered === true, replayed: Number(frame.replayed ?? 0) };
        this.stats.resumes++;
        if (info.recovered) this.stats.recovered++;
        this.stats.replayed += info.replayed;
        // The replay covered every durable event of this user up to `ready.pos`.
        if (conn.ready) this.advance(conn.ready.epoch, conn.ready.pos);
        this.setState("open");
        this.emit("resumed", info);
        return;
      }
      case "dropped": {
        const info: DroppedInfo = { count: Number(frame.count ?? 0), reason: String(frame.reason ?? "") };
        this.stats.dropped[info.reason] = (this.stats.dropped[info.reason] ?? 0) + info.count;
        this.emit("dropped", info);
        return;
      }
      case "reconnect": {
        const advice: ReconnectAdvice = { afterMs: Math.max(0, Number(frame.after_ms ?? 0)), reason: String(frame.reason ?? "") };
        conn.advice = advice;
        this.emit("reconnect", advice);
        return;
      }
      case "ok":
      case "subs":
      case "pong":
      case "rpc_result":
      case "error":
        this.onReply(frame);
        return;
      default:
        // Unknown ops are a later protocol's additions: ignore them.
        return;
    }
  }

  private onReply(frame: Frame): void {
    const id = typeof frame.id === "number" ? frame.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p || id === undefined) {
      if (frame.op === "error") {
        this.emit("error", new SwitchyardError(String(frame.code ?? "internal"), String(frame.message ?? "")));
      }
      return;
    }
    this.pending.delete(id);
    clearTimeout(p.timer);
    if (frame.op === "error") p.reject(new SwitchyardError(String(frame.code ?? "internal"), String(frame.message ?? "")));
    else p.resolve(frame);
  }

  private onReady(conn: Conn, frame: Frame): void {
    const now = Date.now();
    const ready: ReadyInfo = {
      conn: String(frame.conn ?? ""),
      user: String(frame.user ?? ""),
      epoch: String(frame.epoch ?? ""),
      pos: Number(frame.pos ?? 0),
      serverTime: Number(frame.server_time ?? now),
      heartbeatMs: Number(frame.heartbeat_ms ?? 25_000),
      limits: (frame.limits ?? {}) as ReadyInfo["limits"],
      resuming: conn.resume !== null,
    };
    conn.ready = ready;
    conn.readyAt = now;
    this.lastReady = ready;
    this.stats.connects++;
    if (conn.resume) {
      // Replayed events (after `since` in the same epoch, or all of a new epoch) come next.
      if (conn.resume.epoch !== ready.epoch) this.setPosition({ epoch: ready.epoch, pos: 0 });
      this.setState("resuming");
    } else {
      // Live from here on: events after `ready.pos`. Resuming from it later loses nothing.
      this.setPosition({ epoch: ready.epoch, pos: ready.pos });
      this.setState("open");
    }
    this.startWatchdog(conn, frame.server_time !== undefined ? ready.serverTime - now : 0);
    for (const p of this.pending.values()) if (!p.sent) this.sendPending(conn, p);
    for (const w of this.readyWaiters.splice(0)) w.resolve(ready);
    this.emit("ready", ready);
  }

  private deliver(raw: Frame | Record<string, unknown>): void {
    const { op: _op, ...fields } = raw as Frame;
    void _op;
    const ev = fields as unknown as SwitchyardEvent;
    if (ev.snapshot === true) {
      // A key's latest value, sent on subscribing: not part of the log's order, so it never moves the position.
      this.stats.snapshots++;
    } else if (typeof ev.pos === "number") {
      const cur = this.positionValue;
      if (cur && ev.pos <= cur.pos && this.conn?.ready && cur.epoch === this.conn.ready.epoch) {
        this.stats.duplicatesSkipped++;
        return;
      }
      this.stats.durable++;
      this.advance(this.conn?.ready?.epoch ?? cur?.epoch ?? "", ev.pos);
    }
    this.stats.events++;
    this.emit("event", ev as EventOf<E>);
    const set = this.typed.get(ev.type);
    if (set) {
      for (const fn of [...set]) {
        try {
          (fn as (e: SwitchyardEvent) => void)(ev);
        } catch (err) {
          reportListenerError(err);
        }
      }
    }
  }

  /** Moves the position forward (never back within an epoch). */
  private advance(epoch: string, pos: number): void {
    const cur = this.positionValue;
    if (cur && cur.epoch === epoch && cur.pos >= pos) return;
    this.setPosition({ epoch, pos });
  }

  private setPosition(p: Position): void {
    const cur = this.positionValue;
    if (cur && cur.epoch === p.epoch && cur.pos === p.pos) return;
    this.positionValue = p;
    if (this.opts.onPosition) {
      try {
        this.opts.onPosition({ ...p });
      } catch (err) {
        reportListenerError(err);
      }
    }
    this.emit("position", { ...p });
  }

  // ---- heartbeat and token refresh ----

  /**
   * docs/PROTOCOL.md, "Flow control on each connection": a client that receives nothing (no frame, no ping) for two
   * intervals should reconnect. Browsers cannot see pings, so after one quiet
   * interval the client sends a `ping` frame, whose `pong` proves the path.
   */
  private startWatchdog(conn: Conn, skewMs: number): void {
    const hb = this.heartbeatInterval();
    const i = setInterval(() => {
      if (conn.done) return;
      const quiet = Date.now() - conn.lastRecv;
      if (quiet >= 2 * hb) {
        this.stats.heartbeatTimeouts++;
        this.lose(conn, CloseCodes.heartbeatTimeout, "heartbeat timeout");
      } else if (quiet >= hb && !conn.pingSent) {
        conn.pingSent = this.send(conn, { op: "ping" });
      }
    }, Math.max(50, Math.floor(hb / 4)));
    conn.intervals.add(i);
    this.scheduleRefresh(conn, skewMs);
  }

  private scheduleRefresh(conn: Conn, skewMs: number): void {
    if (typeof this.opts.token !== "function") return;
    const delay = refreshDelay(tokenTimes(conn.token), Date.now(), skewMs, this.opts.refreshMarginMs);
    if (delay === undefined) return;
    this.later(conn, Math.max(1000, delay), () => void this.refresh(conn, skewMs));
  }

  private async refresh(conn: Conn, skewMs: number): Promise<void> {
    let token: string;
    try {
      token = await this.fetchToken();
    } catch (err) {
      this.emit("error", new SwitchyardError("unauthorized", `token refresh failed: ${String(err)}`));
      this.later(conn, 5000, () => void this.refresh(conn, skewMs));
      return;
    }
    if (conn.done || this.conn !== conn) return;
    if (token === conn.token) {
      // Nothing new yet; ask again shortly (the edge closes with 4010 at `exp`, and the reconnect fetches a token anyway).
      this.later(conn, 5000, () => void this.refresh(conn, skewMs));
      return;
    }
    try {
      await this.request({ op: "auth", token });
      conn.token = token;
      this.scheduleRefresh(conn, skewMs);
    } catch (err) {
      if (conn.done) return;
      this.emit("error", err instanceof SwitchyardError ? err : new SwitchyardError("unauthorized", String(err)));
      this.later(conn, 5000, () => void this.refresh(conn, skewMs));
    }
  }
}
