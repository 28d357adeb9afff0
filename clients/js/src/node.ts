/**
 * Switchyard client, Node.js entry: the `ws` package and header auth
 * (`Authorization: Bearer` on the upgrade, resume point in the URL), and
 * WebSocket pings count for the heartbeat watchdog.
 */

import WebSocket from "ws";
import { ClientCore, type ClientOptions } from "./client.js";
import type { TransportFactory } from "./transport.js";

export * from "./core.js";

/** Options of the `ws` transport. */
export interface WsTransportOptions {
  /** Largest message accepted from the edge, in bytes (default 16 MiB). */
  maxPayload?: number;
  /** Time the upgrade may take, in milliseconds (default 10000). */
  handshakeTimeoutMs?: number;
  /**
   * Offer permessage-deflate (RFC 7692; default true): the edge then
   * compresses frames of 256 bytes or more (batches, large events), with no
   * context kept between messages. `false` saves the client's zlib memory.
   */
  perMessageDeflate?: boolean;
}

/** A transport over the `ws` package: sends headers and sees pings. */
export function wsTransport(options: WsTransportOptions = {}): TransportFactory {
  return (req, h) => {
    const ws = new WebSocket(req.url, req.protocols, {
      headers: req.headers,
      perMessageDeflate: options.perMessageDeflate ?? true,
      maxPayload: options.maxPayload ?? 16 << 20,
      handshakeTimeout: options.handshakeTimeoutMs ?? 10_000,
    });
    let ended = false;
    ws.on("open", () => h.open(ws.protocol));
    ws.on("message", (data: WebSocket.RawData, isBinary: boolean) => {
      const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
      h.message(isBinary ? buf : buf.toString("utf8"));
    });
    ws.on("ping", () => h.ping());
    ws.on("error", (err: Error) => h.error(err.message));
    ws.on("close", (code: number, reason: Buffer) => {
      if (ended) return;
      ended = true;
      h.close(code, reason.toString("utf8"));
    });
    return {
      send: (data) => ws.send(data),
      close: (code, reason) => ws.close(code, reason),
      abort: () => {
        ended = true;
        ws.removeAllListeners();
        // A late socket error must not become an unhandled 'error' event.
        ws.on("error", () => {});
        ws.terminate();
      },
    };
  };
}

/** A Switchyard connection over `ws`, with header auth by default. */
export class SwitchyardClient<E = Record<string, unknown>> extends ClientCore<E> {
  constructor(options: ClientOptions) {
    super(options, { transport: wsTransport(), auth: "header" });
  }
}
