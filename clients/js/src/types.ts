/**
 * Wire types of the Switchyard protocol, version 1 (docs/PROTOCOL.md), as this
 * client sees them. Field names are the protocol's, unchanged.
 */

/** Frame encodings, chosen by WebSocket subprotocol. */
export type Encoding = "msgpack" | "json";

/** The subprotocol names the edge accepts. */
export const SUBPROTOCOLS: Record<Encoding, string> = {
  msgpack: "switchyard.v1.msgpack",
  json: "switchyard.v1.json",
};

/** Error codes the edge sends in `error` frames. */
export type ProtocolErrorCode =
  | "bad_frame"
  | "unauthorized"
  | "forbidden"
  | "invalid_filter"
  | "too_many_subscriptions"
  | "too_many_rooms"
  | "rate_limited"
  | "token_expired"
  | "unavailable"
  | "internal";

/** Codes this client adds for failures that never reached the edge or never got an answer. */
export type LocalErrorCode = "timeout" | "disconnected" | "closed" | "connect_failed";

/** Close codes of docs/PROTOCOL.md ("Errors and close codes"). */
export const CloseCodes = {
  normal: 1000,
  goingAway: 1001,
  heartbeatTimeout: 4000,
  unauthorized: 4001,
  policyViolation: 4008,
  slowConsumer: 4009,
  tokenExpired: 4010,
} as const;

/** Event priority; absent on the wire means `normal`. */
export type Priority = "low" | "normal" | "high" | "critical";

/**
 * One delivered event (a lone `event` frame, or one entry of a `batch`).
 * `T` is the type of `data` for event type `K`.
 */
export interface SwitchyardEvent<K extends string = string, T = unknown> {
  /** Event type. */
  type: K;
  /** The producer's payload. */
  data: T;
  /** Unix milliseconds at publish. */
  ts: number;
  /** Position in the delivery log; present on durable events only. */
  pos?: number;
  /** Producer's event id, when it gave one. */
  id?: string | number;
  /** Conflation key, when there is one. */
  key?: string;
  /** Priority; absent means `normal`. */
  prio?: Priority;
  /** Names of this user's subscriptions that matched (subscription matches only). */
  sub?: string[];
  /**
   * `true` on a snapshot (protocol 1.1): the latest event of a key, sent
   * because a `subscribe` asked for `snapshot: true`. It has no `pos` and
   * never moves the resume position; keep the last event per (`type`, `key`)
   * and snapshots and live events end at the latest value.
   */
  snapshot?: boolean;
}

/** Limits announced in `ready`. */
export interface Limits {
  max_frame_bytes: number;
  max_subscriptions: number;
  rate_per_s: number;
  burst: number;
  batch_max_events: number;
  batch_max_bytes: number;
  [extra: string]: number;
}

/** What `ready` says about the connection. */
export interface ReadyInfo {
  /** Connection id. */
  conn: string;
  /** The authenticated user (the token's `sub`). */
  user: string;
  /** Delivery log incarnation. */
  epoch: string;
  /** The log's position when the connection became ready. */
  pos: number;
  /** Server clock, unix milliseconds. */
  serverTime: number;
  /** Server ping interval. */
  heartbeatMs: number;
  /** Per-connection limits. */
  limits: Limits;
  /** Whether this connection asked to resume. */
  resuming: boolean;
}

/** Where the client stopped: the largest `pos` seen, with its `epoch`. */
export interface Position {
  epoch: string;
  pos: number;
}

/** End of a resume replay. */
export interface ResumedInfo {
  /** True only when the server could show nothing after `since` was lost. */
  recovered: boolean;
  /** How many events were replayed. */
  replayed: number;
}

/** Events this connection did not get since the last notice of that reason. */
export interface DroppedInfo {
  count: number;
  reason: "rate_limited" | "slow_consumer" | string;
}

/** `reconnect` advice from a draining node. */
export interface ReconnectAdvice {
  afterMs: number;
  reason: string;
}

/** A subscription as sent in `subscribe` and shown by `list`. */
export interface Subscription {
  /** Name, unique per user; the same name replaces. */
  sub: string;
  /** Subscription type (`[a-z][a-z0-9_]{0,31}`). */
  type: string;
  /** Dimension → accepted values. */
  filters?: Record<string, string[]>;
  /** Field → lower bound. */
  min?: Record<string, number>;
  /** Field → upper bound. */
  max?: Record<string, number>;
  /** Top-level payload keys to receive. */
  fields?: string[];
  /**
   * Protocol 1.1: also send, for every key of `type` whose latest keyed event
   * matches, that event (marked `snapshot: true`, without `pos`).
   */
  snapshot?: boolean;
  /**
   * Protocol 1.1: at most one event per (`type`, `key`) every `throttle_ms`
   * milliseconds on each connection, latest value wins (integer 1..3600000).
   * Events without a key, `critical` and replayed events are not throttled,
   * nor events that also match a subscription without `throttle_ms`.
   */
  throttle_ms?: number;
}

/** The largest `throttle_ms` the protocol allows (one hour). */
export const MAX_THROTTLE_MS = 3_600_000;

/**
 * Where the client learns whether the device has a network (a browser's
 * `online`/`offline` events, React Native's NetInfo, ...).
 */
export interface NetworkSource {
  /** Whether the device is online now. */
  isOnline(): boolean;
  /** Calls `cb` on every change; returns a function that stops it. */
  subscribe(cb: (online: boolean) => void): () => void;
}

/** Where the client learns whether the page (or app) is in the foreground. */
export interface VisibilitySource {
  /** Whether the page is visible now. */
  isVisible(): boolean;
  /** Calls `cb` on every change; returns a function that stops it. */
  subscribe(cb: (visible: boolean) => void): () => void;
}

/** Reply to `ping`. */
export interface PongInfo {
  serverTime: number;
  /** Round trip measured by this client. */
  rttMs: number;
}
