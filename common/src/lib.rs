//! The Switchyard wire contract, shared by the edge and router tiers.
//!
//! Everything here is pure: no tokio, no NATS client, no sockets, so the
//! protocol can be unit-tested, fuzzed and benchmarked on its own.
//!
//! # Layout
//! - [`ids`]: validation of user ids and every name a client or producer sends.
//! - [`subject`]: NATS subject names under the configurable prefix.
//! - [`error`]: the protocol's error codes and close codes.
//! - [`value`]: helpers over decoded MessagePack/JSON maps (field lookup).
//! - [`client`]: client → edge frames (decode) and edge → client control frames (encode).
//! - [`subscription`]: a validated subscription and its matching semantics.
//! - [`event`]: producer events (MessagePack or JSON) and their targets.
//! - [`delivery`]: the pre-targeted delivery body routers publish and edges turn into `event`/`batch` frames.
//! - [`fanout`]: the router tier's own messages: hand-off to delivery partitions, live batches per edge, presence.
//! - [`control`]: edge ↔ router request/reply messages for subscription changes.
//! - [`api`]: the application API's requests (checked) and replies.
//! - [`command`]: router → every-edge commands behind the application API.
//! - [`latest`]: the latest keyed event per (type, key), as kept for snapshots.
//! - [`revocation`]: token revocations, as stored and as checked.
//! - [`transcode`]: byte-level MessagePack helpers (skip, trim, to JSON).
//! - [`secret`]: a config value whose `Debug` is `<redacted>`.
//! - [`hash`]: FNV-1a, the stable hash routers and edges must agree on.

pub mod api;
pub mod client;
pub mod command;
pub mod control;
pub mod delivery;
pub mod error;
pub mod event;
pub mod fanout;
pub mod hash;
pub mod ids;
pub mod latest;
pub mod revocation;
pub mod secret;
pub mod subject;
pub mod subscription;
pub mod transcode;
pub mod value;

pub use error::{CloseCode, ErrorCode};

/// Which encoding a client connection negotiated (its WebSocket subprotocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `switchyard.v1.msgpack`: binary frames, one MessagePack map each (the default).
    MsgPack,
    /// `switchyard.v1.json`: text frames, one JSON object each.
    Json,
}

impl Encoding {
    /// The subprotocol name clients offer in `Sec-WebSocket-Protocol`.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::MsgPack => MSGPACK_SUBPROTOCOL,
            Encoding::Json => JSON_SUBPROTOCOL,
        }
    }

    /// Maps an offered subprotocol name to an encoding, if it is one we speak.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name {
            MSGPACK_SUBPROTOCOL => Some(Encoding::MsgPack),
            JSON_SUBPROTOCOL => Some(Encoding::Json),
            _ => None,
        }
    }
}

/// Subprotocol name of the MessagePack encoding.
pub const MSGPACK_SUBPROTOCOL: &str = "switchyard.v1.msgpack";
/// Subprotocol name of the JSON encoding.
pub const JSON_SUBPROTOCOL: &str = "switchyard.v1.json";
