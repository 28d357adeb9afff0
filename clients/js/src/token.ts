/**
 * Token handling: reading `exp`/`iat` from a JWT (without verifying it: the
 * edge does that) and choosing when to refresh.
 */

/** A token, or a callback that returns one (called at every connect and before `exp`). */
export type TokenProvider = string | (() => string | Promise<string>);

/** The time claims of a JWT, in unix seconds, when present. */
export interface TokenTimes {
  exp?: number;
  iat?: number;
}

function base64UrlDecode(s: string): string {
  const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
  if (typeof atob === "function") {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new TextDecoder().decode(bytes);
  }
  throw new Error("no base64 decoder available");
}

/** Reads `exp` and `iat` from a JWT's payload; empty when it cannot be read. */
export function tokenTimes(token: string): TokenTimes {
  const parts = token.split(".");
  if (parts.length !== 3) return {};
  try {
    const claims = JSON.parse(base64UrlDecode(parts[1]!)) as Record<string, unknown>;
    const out: TokenTimes = {};
    if (typeof claims.exp === "number" && Number.isFinite(claims.exp)) out.exp = claims.exp;
    if (typeof claims.iat === "number" && Number.isFinite(claims.iat)) out.iat = claims.iat;
    return out;
  } catch {
    return {};
  }
}

/**
 * When to refresh, in milliseconds from `nowMs` (local clock), or `undefined`
 * when the token has no `exp`. `skewMs` is server clock minus local clock.
 * The margin before `exp` is a fifth of the token's lifetime, between 1 s
 * and 60 s (or `marginMs` when given).
 */
export function refreshDelay(times: TokenTimes, nowMs: number, skewMs: number, marginMs?: number): number | undefined {
  if (times.exp === undefined) return undefined;
  const expLocal = times.exp * 1000 - skewMs;
  let margin = marginMs;
  if (margin === undefined) {
    const lifetime = times.iat !== undefined ? (times.exp - times.iat) * 1000 : 300_000;
    margin = Math.min(60_000, Math.max(1_000, lifetime / 5));
  }
  return Math.max(0, expLocal - margin - nowMs);
}
