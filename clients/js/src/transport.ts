/**
 * The socket under the client, behind a small interface so one client works
 * over the browser's `WebSocket` (frame auth: browsers cannot set headers)
 * and over Node's `ws` (header auth, and WebSocket pings are visible).
 */

/** What the client asks a transport to open. */
export interface ConnectRequest {
  /** `ws://` or `wss://` URL, resume query included when header auth is used. */
  url: string;
  /** Subprotocols to offer, first choice first. */
  protocols: string[];
  /** Extra upgrade headers (`Authorization`), only with header auth. */
  headers?: Record<string, string>;
}

/** Callbacks a transport calls; after `close` it calls nothing more. */
export interface TransportHandlers {
  /** The upgrade succeeded; `protocol` is the subprotocol the server chose. */
  open(protocol: string): void;
  /** One complete message: text as a string, binary as bytes. */
  message(data: ArrayBuffer | ArrayBufferView | string): void;
  /** A WebSocket ping arrived (transports that can see pings). */
  ping(): void;
  /** The socket failed; `close` follows. */
  error(message: string): void;
  /** The socket closed (1006 when it closed without a close frame). */
  close(code: number, reason: string): void;
}

/** An open or opening socket. */
export interface Transport {
  /** Sends one message (binary for bytes, text for a string). */
  send(data: Uint8Array | string): void;
  /** Starts the close handshake. */
  close(code: number, reason: string): void;
  /** Drops the socket at once, without waiting for the peer (a dead or frozen server). */
  abort(): void;
}

/** Opens transports. */
export type TransportFactory = (req: ConnectRequest, handlers: TransportHandlers) => Transport;

/** The subset of the WHATWG `WebSocket` this client uses. */
export interface WebSocketLike {
  binaryType: string;
  readonly protocol: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array | string): void;
  close(code?: number, reason?: string): void;
}

/** A `WebSocket` constructor (the browser's, or any compatible one). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/**
 * A transport over a WHATWG `WebSocket` (default: `globalThis.WebSocket`).
 * It cannot send headers, so it only supports frame auth; and it cannot see
 * pings, so the client's watchdog sends `ping` frames on a quiet connection.
 */
export function webSocketTransport(ctor?: WebSocketConstructor): TransportFactory {
  return (req, h) => {
    const Ctor = ctor ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      throw new Error("no WebSocket available: pass options.transport (in Node.js, use the package's node entry)");
    }
    if (req.headers && Object.keys(req.headers).length > 0) {
      throw new Error("this WebSocket cannot send headers: use auth: 'frame'");
    }
    const ws = new Ctor(req.url, req.protocols);
    ws.binaryType = "arraybuffer";
    let ended = false;
    ws.onopen = () => h.open(ws.protocol);
    ws.onmessage = (ev) => {
      const d = ev.data;
      if (typeof d === "string" || d instanceof ArrayBuffer || ArrayBuffer.isView(d)) h.message(d);
      else h.error("unexpected message type");
    };
    ws.onerror = () => h.error("WebSocket error");
    ws.onclose = (ev) => {
      if (ended) return;
      ended = true;
      h.close(ev.code, ev.reason);
    };
    return {
      send: (data) => ws.send(data),
      close: (code, reason) => ws.close(code, reason),
      abort: () => {
        ended = true;
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try {
          ws.close();
        } catch {
          // Closing a socket that already failed throws in some engines; it is gone either way.
        }
      },
    };
  };
}
