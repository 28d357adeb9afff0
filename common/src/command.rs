//! Commands from the router tier to every edge, and the edges' answers: the
//! fleet-wide half of the application API.
//!
//! A router serving an API request publishes one [`EdgeCommand`] on
//! `<prefix>.edges.command` with a reply inbox; every edge answers with an
//! [`EdgeAnswer`] naming itself, and the router waits until every edge it
//! knows to be alive has answered. Only the edges know their connections,
//! so disconnects, connection counts and revocation acknowledgements come
//! from them. MessagePack, like the router tier's other messages.

use serde::{Deserialize, Serialize};

/// What every edge is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeCommand {
    /// Close every connection of `user` with 4003 (after `reconnect`, when asked).
    Disconnect {
        /// The user id.
        user: String,
        /// Send `reconnect` with `after_ms` 0 first.
        reconnect: bool,
        /// The reason given in the `reconnect` frame.
        reason: Option<String>,
    },
    /// Count the connections of each of `users`.
    Count {
        /// User ids.
        users: Vec<String>,
    },
    /// Count this edge's connections and users.
    Stats,
    /// Answer once the revocations up to this bucket revision are in force.
    Revoked {
        /// The revocation bucket's revision of the write.
        revision: u64,
    },
    /// A subscription of `user` with a snapshot is about to be made: keep
    /// its snapshot in order with its live events on each connection.
    ExpectSnapshot {
        /// The user id.
        user: String,
        /// The subscription's name.
        sub: String,
    },
    /// The snapshot of that subscription, for each of the user's connections.
    Snapshot {
        /// The user id.
        user: String,
        /// The subscription's name.
        sub: String,
        /// Delivery bodies marked `snapshot`.
        bodies: Vec<serde_bytes::ByteBuf>,
    },
}

/// One edge's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeAnswer {
    /// The answering edge's id.
    pub edge: String,
    /// What it did or found.
    pub outcome: EdgeOutcome,
}

/// What an edge did or found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeOutcome {
    /// `(user, connections)` for each asked user with at least one connection.
    Counts(Vec<(String, u32)>),
    /// This edge's open, authenticated connections (users come from the
    /// delivery stage, where a user on two edges counts once).
    Stats {
        /// Connections.
        connections: u64,
    },
    /// The revocations are in force.
    Applied,
    /// Connections the command was carried out on (closed, for `disconnect`).
    Connections(u64),
    /// It could not do it (e.g. the revocations did not arrive in time).
    Failed(String),
}

/// Encodes a command or an answer.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(msg).expect("edge commands encode")
}

/// Decodes a command or an answer.
pub fn decode<'a, T: Deserialize<'a>>(buf: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(buf)
}

/// A router's answer to `<prefix>.routers.command` (`stats`): the users
/// present in the user partitions it delivers for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterStats {
    /// The router's id.
    pub router: String,
    /// `(partition, users with a connection)` for each partition it owns.
    pub partitions: Vec<(u32, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for cmd in [
            EdgeCommand::Disconnect {
                user: "u".into(),
                reconnect: true,
                reason: Some("r".into()),
            },
            EdgeCommand::Count {
                users: vec!["a".into(), "b".into()],
            },
            EdgeCommand::Stats,
            EdgeCommand::Revoked { revision: 7 },
            EdgeCommand::Snapshot {
                user: "u".into(),
                sub: "s".into(),
                bodies: vec![serde_bytes::ByteBuf::from(vec![0x80u8])],
            },
        ] {
            assert_eq!(decode::<EdgeCommand>(&encode(&cmd)).unwrap(), cmd);
        }
        let answer = EdgeAnswer {
            edge: "e1".into(),
            outcome: EdgeOutcome::Counts(vec![("a".into(), 2)]),
        };
        assert_eq!(decode::<EdgeAnswer>(&encode(&answer)).unwrap(), answer);
        let stats = RouterStats {
            router: "r".into(),
            partitions: vec![(0, 3)],
        };
        assert_eq!(decode::<RouterStats>(&encode(&stats)).unwrap(), stats);
    }
}
