/**
 * What the platform says about the network and the page, for the client's
 * reconnect decisions: a browser's (or worker's) `online`/`offline` events
 * with `navigator.onLine`, and the document's `visibilitychange` with
 * `visibilityState`. React Native and other hosts pass their own sources
 * (NetInfo, AppState) through the client options instead.
 */

import type { NetworkSource, VisibilitySource } from "./types.js";

/** The subset of an `EventTarget` used here. */
export interface EventTargetLike {
  addEventListener(type: string, listener: () => void): void;
  removeEventListener(type: string, listener: () => void): void;
}

/** A global scope with network events (a window or a worker's `self`). */
export interface NetworkGlobals extends EventTargetLike {
  navigator?: { onLine?: boolean };
}

/** A document with visibility events. */
export interface VisibilityDocument extends EventTargetLike {
  visibilityState?: string;
}

/**
 * The browser's network state: `navigator.onLine` and the `online`/`offline`
 * events of `g` (default `globalThis`). `null` where there is no such thing
 * (Node.js, React Native).
 */
export function browserNetwork(g: unknown = globalThis): NetworkSource | null {
  const scope = g as Partial<NetworkGlobals> | null | undefined;
  if (!scope || typeof scope.addEventListener !== "function" || typeof scope.removeEventListener !== "function") return null;
  if (typeof scope.navigator?.onLine !== "boolean") return null;
  const target = scope as NetworkGlobals;
  return {
    // `onLine === false` is reliable; `true` only means "maybe", which is what reconnecting needs.
    isOnline: () => target.navigator?.onLine !== false,
    subscribe(cb) {
      const on = () => cb(true);
      const off = () => cb(false);
      target.addEventListener("online", on);
      target.addEventListener("offline", off);
      return () => {
        target.removeEventListener("online", on);
        target.removeEventListener("offline", off);
      };
    },
  };
}

/**
 * The page's visibility: `document.visibilityState` and `visibilitychange`
 * (default `globalThis.document`). `null` where there is no document.
 */
export function browserVisibility(doc: unknown = (globalThis as { document?: unknown }).document): VisibilitySource | null {
  const d = doc as Partial<VisibilityDocument> | null | undefined;
  if (!d || typeof d.addEventListener !== "function" || typeof d.removeEventListener !== "function") return null;
  if (typeof d.visibilityState !== "string") return null;
  const target = d as VisibilityDocument;
  const visible = () => target.visibilityState !== "hidden";
  return {
    isVisible: visible,
    subscribe(cb) {
      const changed = () => cb(visible());
      target.addEventListener("visibilitychange", changed);
      return () => target.removeEventListener("visibilitychange", changed);
    },
  };
}
