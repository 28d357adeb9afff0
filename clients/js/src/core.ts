/**
 * Everything both entry points share: the client core, protocol types,
 * codecs, backoff and token helpers, transports, network and visibility sources.
 */

export {
  ClientCore,
  SwitchyardError,
  type ClientEvents,
  type ClientOptions,
  type ClientStats,
  type CloseInfo,
  type ConnectionState,
  type EntryDefaults,
  type EventOf,
  type ReconnectOptions,
  subscriptionProblem,
} from "./client.js";
export {
  browserNetwork,
  browserVisibility,
  type EventTargetLike,
  type NetworkGlobals,
  type VisibilityDocument,
} from "./environment.js";
export { codecFor, type Codec, type Frame } from "./codec.js";
export { backoffCeiling, backoffDelay, type BackoffOptions } from "./backoff.js";
export { refreshDelay, tokenTimes, type TokenProvider, type TokenTimes } from "./token.js";
export {
  webSocketTransport,
  type ConnectRequest,
  type Transport,
  type TransportFactory,
  type TransportHandlers,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./transport.js";
export * from "./types.js";
