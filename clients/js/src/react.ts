/**
 * React bindings (`@switchyard/client/react`, React 18 or 19): a provider
 * that owns or shares one client, `useSwitchyard()` for the client and its
 * connection state, and `useSubscription()` for one subscription's events.
 *
 * ```tsx
 * <SwitchyardProvider options={{ url: "wss://rt.example.com/ws", token: getToken }}>
 *   <Watchlist />
 * </SwitchyardProvider>
 *
 * function Watchlist() {
 *   const { state } = useSwitchyard();
 *   const { latest, status } = useSubscription<Tick>({ sub: "watchlist", type: "tick", filters: { symbol: ["AAPL"] }, snapshot: true });
 *   return <p>{state} {status} {latest.AAPL?.data.price}</p>;
 * }
 * ```
 *
 * It must not hold events anywhere but in the hooks' state, nor open more
 * than the one client a provider is given or creates.
 */

import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactElement,
  type ReactNode,
} from "react";
import { ClientCore, SwitchyardError, type ClientOptions, type ConnectionState } from "./client.js";
import { webSocketTransport } from "./transport.js";
import type { ReadyInfo, Subscription, SwitchyardEvent } from "./types.js";

// Any client works here, whatever its event map.
type AnyClient = ClientCore<any>;

const ClientContext = createContext<AnyClient | null>(null);

/** Props of `SwitchyardProvider`: a client to share, or the options to create one with. */
export type SwitchyardProviderProps = { children?: ReactNode } & (
  | {
      /** A client the application made (and closes); connected here if it is idle. */
      client: AnyClient;
      options?: undefined;
    }
  | {
      /**
       * Options for a client the provider creates, connects on mount and
       * closes on unmount; it uses the platform `WebSocket` with frame auth
       * (browsers, React Native) unless `options.transport` says otherwise.
       * Read once: later changes are ignored.
       */
      options: ClientOptions;
      client?: undefined;
    }
);

/** Makes a client available to `useSwitchyard` and `useSubscription` below it. */
export function SwitchyardProvider(props: SwitchyardProviderProps): ReactElement {
  const [owned] = useState<AnyClient | null>(() =>
    props.client ? null : new ClientCore(props.options, { transport: webSocketTransport(), auth: "frame" }),
  );
  const client = props.client ?? owned!;
  const closing = useRef<ReturnType<typeof setTimeout> | undefined>(undefined);
  useEffect(() => {
    // A remount right after an unmount (StrictMode, a moved subtree) keeps the connection.
    clearTimeout(closing.current);
    if (client.state === "idle" || (owned && client.state === "closed")) {
      client.connect().catch(() => {
        // close() before the first ready; the state says so.
      });
    }
    return () => {
      if (!owned) return;
      // After the hooks' unsubscribes (queued as microtasks) have been sent.
      closing.current = setTimeout(() => owned.close(), 0);
    };
  }, [client, owned]);
  return createElement(ClientContext.Provider, { value: client }, props.children);
}

function useClient<E>(): ClientCore<E> {
  const client = useContext(ClientContext);
  if (!client) throw new Error("Switchyard hooks need a <SwitchyardProvider> above them");
  return client as ClientCore<E>;
}

/** What `useSwitchyard()` returns. */
export interface SwitchyardContextValue<E> {
  /** The client. */
  client: ClientCore<E>;
  /** Its connection state (the component re-renders when it changes). */
  state: ConnectionState;
  /** What the current (or last) connection's `ready` said. */
  ready: ReadyInfo | null;
  /** Whether the platform says the device is online. */
  online: boolean;
}

/** The provider's client and its connection state; re-renders on state and network changes. */
export function useSwitchyard<E = Record<string, unknown>>(): SwitchyardContextValue<E> {
  const client = useClient<E>();
  const snapshot = useSyncExternalStore(
    (changed) => {
      const offState = client.on("state", changed);
      const offNet = client.on("network", changed);
      return () => {
        offState();
        offNet();
      };
    },
    () => `${client.state} ${client.online ? 1 : 0}`,
    () => `${client.state} ${client.online ? 1 : 0}`,
  );
  const [state, online] = snapshot.split(" ");
  return { client, state: state as ConnectionState, ready: client.ready, online: online === "1" };
}

/** Where a subscription made by `useSubscription` stands. */
export type SubscriptionStatus =
  /** No spec (`null`): nothing subscribed. */
  | "idle"
  /** `subscribe` sent (or waiting for the connection), no answer yet. */
  | "subscribing"
  /** The edge said `ok`. */
  | "active"
  /** The edge refused it (`error` holds why), or the request failed; retried at the next connection. */
  | "error";

/** Options of `useSubscription`. */
export interface UseSubscriptionOptions<T, S> {
  /** Called for every event of the subscription, before the state updates (the latest callback is used). */
  onEvent?: (event: SwitchyardEvent<string, T>) => void;
  /** Folds each event into `state`, like `useReducer` (it must be pure). */
  reducer?: (state: S, event: SwitchyardEvent<string, T>) => S;
  /** The reducer's starting state (also after the spec changes). */
  initialState?: S;
}

/** What `useSubscription` returns. */
export interface SubscriptionResult<T, S> {
  status: SubscriptionStatus;
  /** Why it is in `error`. */
  error: SwitchyardError | null;
  /** The latest event of each key (`""` for events without a key): snapshots and live events alike. */
  latest: Readonly<Record<string, SwitchyardEvent<string, T>>>;
  /** The latest event, whatever its key. */
  last: SwitchyardEvent<string, T> | undefined;
  /** Events received since the spec was last set. */
  count: number;
  /** The reducer's state (`initialState` without a reducer). */
  state: S;
}

/** A JSON text of `v` with object keys sorted: equal specs give equal texts. */
function stableKey(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableKey).join(",")}]`;
  if (v && typeof v === "object") {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o)
      .filter((k) => o[k] !== undefined)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${stableKey(o[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(v) ?? "null";
}

/**
 * How many mounted hooks use each subscription name, per client: a hook
 * that unmounts while another (or its own remount, or its next spec) takes
 * the same name does not unsubscribe it.
 */
const holders = new WeakMap<AnyClient, Map<string, number>>();

function hold(client: AnyClient, name: string): void {
  let m = holders.get(client);
  if (!m) {
    m = new Map();
    holders.set(client, m);
  }
  m.set(name, (m.get(name) ?? 0) + 1);
}

function release(client: AnyClient, name: string): void {
  const m = holders.get(client);
  if (!m) return;
  m.set(name, (m.get(name) ?? 1) - 1);
  // Effects of the same commit run before microtasks: a new holder of the name shows up by then.
  queueMicrotask(() => {
    if ((m.get(name) ?? 0) > 0) return;
    m.delete(name);
    if (client.state === "closed") return;
    client.unsubscribe(name).catch(() => {
      // The connection went away; the subscription stays with the user until removed.
    });
  });
}

/** Whether `e` was selected by the subscription `s`. */
function selectedBy(e: SwitchyardEvent, s: Subscription): boolean {
  if (e.type !== s.type) return false;
  // Subscription matches, snapshots included, name their subscriptions.
  return Array.isArray(e.sub) && e.sub.includes(s.sub);
}

function fresh<T, S>(status: SubscriptionStatus, initialState: S): SubscriptionResult<T, S> {
  return { status, error: null, latest: {}, last: undefined, count: 0, state: initialState };
}

/**
 * Subscribes while mounted (and again when `spec` changes, compared by
 * value), unsubscribes on unmount; returns the latest event per key, a
 * reducer's state if given, and the subscription's status. `null` subscribes
 * to nothing. A spec with `snapshot: true` is sent again after every
 * reconnect, so values missed while away (non-durable ones are not resumed)
 * are refreshed; a subscribe that failed is retried at the next connection.
 *
 * Subscriptions belong to the user (PROTOCOL.md): the unmount's
 * `unsubscribe` removes the name for every connection of the user, so use
 * names that are unique to the view.
 */
export function useSubscription<T = unknown, S = undefined>(
  spec: Subscription | null | undefined,
  options: UseSubscriptionOptions<T, S> = {},
): SubscriptionResult<T, S> {
  const client = useClient();
  const key = spec ? stableKey(spec) : null;
  const opts = useRef(options);
  opts.current = options;
  const [result, setResult] = useState<SubscriptionResult<T, S>>(() =>
    fresh(spec ? "subscribing" : "idle", options.initialState as S),
  );

  useEffect(() => {
    const initial = opts.current.initialState as S;
    if (key === null) {
      setResult(fresh("idle", initial));
      return;
    }
    const s = JSON.parse(key) as Subscription;
    let live = true;
    let active = false;
    let retry = false;
    setResult(fresh("subscribing", initial));

    const offEvent = client.on("event", (raw) => {
      const e = raw as SwitchyardEvent<string, T>;
      if (!selectedBy(e, s)) return;
      opts.current.onEvent?.(e);
      const reducer = opts.current.reducer;
      setResult((p) => ({
        ...p,
        latest: { ...p.latest, [e.key ?? ""]: e },
        last: e,
        count: p.count + 1,
        state: reducer ? reducer(p.state, e) : p.state,
      }));
    });
    const send = () => {
      setResult((p) => (p.status === "subscribing" ? p : { ...p, status: "subscribing" }));
      client.subscribe(s).then(
        () => {
          active = true;
          if (live) setResult((p) => ({ ...p, status: "active", error: null }));
        },
        (err: unknown) => {
          const error = err instanceof SwitchyardError ? err : new SwitchyardError("internal", String(err));
          // Lost with its connection, or no answer: sent again at the next `ready`. A refusal stays.
          if (error.code === "disconnected" || error.code === "timeout") retry = true;
          if (live) setResult((p) => ({ ...p, status: "error", error }));
        },
      );
    };
    const offClose = client.on("close", () => {
      // The edge keeps the subscription, but non-durable values sent while away are not resumed: ask for snapshots again.
      if (active && s.snapshot === true) retry = true;
    });
    const offReady = client.on("ready", () => {
      if (!retry) return;
      retry = false;
      send();
    });
    hold(client, s.sub);
    send();
    return () => {
      live = false;
      offEvent();
      offClose();
      offReady();
      release(client, s.sub);
    };
  }, [client, key]);

  return result;
}
