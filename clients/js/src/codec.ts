/**
 * Frame codecs: one MessagePack map per binary message, or one JSON object
 * per text message (docs/PROTOCOL.md, "Subprotocol and encoding").
 */

import { Decoder, Encoder } from "@msgpack/msgpack";
import type { Encoding } from "./types.js";

/** A decoded frame: a map with a string `op`. */
export type Frame = { op: string; [field: string]: unknown };

/** Encodes and decodes frames for one encoding. */
export interface Codec {
  /** Which encoding this is. */
  readonly encoding: Encoding;
  /** Encodes a client frame (fields that are `undefined` are left out). */
  encode(frame: Record<string, unknown>): Uint8Array | string;
  /** Decodes one message; throws when it is not a frame of this encoding. */
  decode(data: ArrayBuffer | ArrayBufferView | string): Frame;
}

function asFrame(value: unknown): Frame {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new TypeError("a frame must be a map");
  }
  const op = (value as { op?: unknown }).op;
  if (typeof op !== "string") throw new TypeError("a frame needs a string op");
  return value as Frame;
}

class MsgpackCodec implements Codec {
  readonly encoding = "msgpack" as const;
  private readonly encoder = new Encoder({ ignoreUndefined: true });
  private readonly decoder = new Decoder();

  encode(frame: Record<string, unknown>): Uint8Array {
    return this.encoder.encode(frame);
  }

  decode(data: ArrayBuffer | ArrayBufferView | string): Frame {
    if (typeof data === "string") throw new TypeError("text message on a MessagePack connection");
    return asFrame(this.decoder.decode(data));
  }
}

class JsonCodec implements Codec {
  readonly encoding = "json" as const;

  encode(frame: Record<string, unknown>): string {
    return JSON.stringify(frame);
  }

  decode(data: ArrayBuffer | ArrayBufferView | string): Frame {
    if (typeof data !== "string") throw new TypeError("binary message on a JSON connection");
    return asFrame(JSON.parse(data));
  }
}

/** The codec for an encoding. */
export function codecFor(encoding: Encoding): Codec {
  return encoding === "json" ? new JsonCodec() : new MsgpackCodec();
}
