/**
 * Reconnect delays: exponential backoff with full jitter, capped.
 *
 * Full jitter (a uniform draw between 0 and the exponential ceiling) spreads
 * the clients of a failed node over the whole window instead of having them
 * return in waves.
 */

/** Backoff settings. */
export interface BackoffOptions {
  /** Ceiling of the first delay, in milliseconds (default 250). */
  initialDelayMs?: number;
  /** Largest ceiling, in milliseconds (default 30000). */
  maxDelayMs?: number;
  /** Ceiling growth per failed attempt (default 2). */
  multiplier?: number;
}

/** The ceiling for attempt `n` (0-based): `min(max, initial * multiplier^n)`. */
export function backoffCeiling(attempt: number, o: BackoffOptions = {}): number {
  const initial = o.initialDelayMs ?? 250;
  const max = o.maxDelayMs ?? 30_000;
  const mult = o.multiplier ?? 2;
  // Stop multiplying once past the cap, so huge attempt counts cannot overflow to Infinity/NaN.
  let ceiling = initial;
  for (let i = 0; i < attempt && ceiling < max; i++) ceiling *= mult;
  return Math.min(max, ceiling);
}

/** A delay for attempt `n`: uniform in `[0, ceiling(n)]`. `random` is injectable for tests. */
export function backoffDelay(attempt: number, o: BackoffOptions = {}, random: () => number = Math.random): number {
  return Math.floor(random() * backoffCeiling(attempt, o));
}
