/**
 * Switchyard client, browser entry: the platform `WebSocket` and frame auth
 * (browsers cannot set headers on the upgrade).
 *
 * ```ts
 * const client = new SwitchyardClient<{ tick: { symbol: string; price: number } }>({
 *   url: "wss://rt.example.com/ws",
 *   token: () => fetch("/token").then((r) => r.text()),
 * });
 * client.onEvent("tick", (e) => console.log(e.data.symbol, e.data.price));
 * await client.connect();
 * await client.subscribe({ sub: "ticks", type: "tick", filters: { symbol: ["AAPL"] } });
 * ```
 */

import { ClientCore, type ClientOptions } from "./client.js";
import { webSocketTransport } from "./transport.js";

export * from "./core.js";

/** A Switchyard connection over the platform `WebSocket`, with frame auth by default. */
export class SwitchyardClient<E = Record<string, unknown>> extends ClientCore<E> {
  constructor(options: ClientOptions) {
    super(options, { transport: webSocketTransport(), auth: "frame" });
  }
}
