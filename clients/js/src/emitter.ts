/**
 * A small typed event emitter. A listener that throws does not stop the
 * others or the client: its error is reported the way the DOM reports
 * listener errors (`reportError`, or an uncaught error on a later tick).
 */

/** A listener for values of type `T`. */
export type Listener<T> = (value: T) => void;

/** Reports an error thrown by application code without unwinding the client. */
export function reportListenerError(err: unknown): void {
  const g = globalThis as { reportError?: (e: unknown) => void };
  if (typeof g.reportError === "function") {
    g.reportError(err);
  } else {
    setTimeout(() => {
      throw err;
    }, 0);
  }
}

/** Listeners keyed by name; `M` maps each name to its value type. */
export class Emitter<M> {
  private readonly listeners = new Map<keyof M, Set<Listener<never>>>();

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof M>(name: K, fn: Listener<M[K]>): () => void {
    let set = this.listeners.get(name);
    if (!set) {
      set = new Set();
      this.listeners.set(name, set);
    }
    set.add(fn as Listener<never>);
    return () => this.off(name, fn);
  }

  /** Adds a listener called at most once. */
  once<K extends keyof M>(name: K, fn: Listener<M[K]>): () => void {
    const off = this.on(name, (v) => {
      off();
      fn(v);
    });
    return off;
  }

  /** Removes a listener. */
  off<K extends keyof M>(name: K, fn: Listener<M[K]>): void {
    this.listeners.get(name)?.delete(fn as Listener<never>);
  }

  /** Calls every listener of `name` with `value`. */
  protected emit<K extends keyof M>(name: K, value: M[K]): void {
    const set = this.listeners.get(name);
    if (!set || set.size === 0) return;
    for (const fn of [...set]) {
      try {
        (fn as Listener<M[K]>)(value);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }

  /** Whether `name` has listeners. */
  protected has<K extends keyof M>(name: K): boolean {
    return (this.listeners.get(name)?.size ?? 0) > 0;
  }
}
