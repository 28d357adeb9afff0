//! The delivery log: the JetStream stream that keeps every durable delivery.
//!
//! The stream captures `<prefix>.deliver.>` (one subject per user, plus the
//! shared `<prefix>.deliver._all` for broadcasts), keeps at most
//! `max_per_subject` messages per subject for at most `max_age`, and
//! republishes each stored message to `<prefix>.live.>`, where edges listen;
//! the republished message carries the stream sequence (`Nats-Sequence`),
//! which clients see as `pos`. Requires nats-server ≥ 2.10 (republish: 2.9;
//! multi-filter consumers used by the edge's replay: 2.10); the project pins
//! 2.15.1.
//!
//! Broadcasts are stored once on the shared subject rather than once per
//! user: at 100k users a durable broadcast costs one stored message (about
//! 100 bytes) instead of 100k (about 10 MB and 100k stream writes), at the
//! price of a merge on the edge (a resume reads the user's subject and the
//! shared one through one consumer, in sequence order; live, the edge merges
//! the two subscriptions by sequence). Room events are expanded per member
//! by the router, since rooms are usually small and a member's resume must
//! not depend on room membership history.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, Republish, StorageType};
use switchyard_common::subject::Subjects;

/// Delivery log settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Messages kept per user (the offline queue length).
    pub max_per_subject: i64,
    /// How long a message is kept.
    pub max_age: Duration,
    /// File (default) or memory storage.
    pub memory: bool,
    /// Stream replicas (1 on a single server; 3 on a cluster).
    pub replicas: usize,
    /// Window in which a delivery with the same message id is stored once
    /// (a redone event after a router failover; see [`crate::ingest`]).
    pub duplicate_window: Duration,
}

/// The stream configuration for `subjects`.
pub fn stream_config(subjects: &Subjects, s: &LogSettings) -> Config {
    Config {
        name: subjects.log_stream(),
        description: Some("Switchyard delivery log: per-user durable deliveries, republished live".into()),
        subjects: vec![subjects.deliver_wildcard()],
        max_messages_per_subject: s.max_per_subject,
        max_age: s.max_age,
        storage: if s.memory {
            StorageType::Memory
        } else {
            StorageType::File
        },
        num_replicas: s.replicas,
        discard: DiscardPolicy::Old,
        duplicate_window: s.duplicate_window,
        allow_direct: true,
        republish: Some(Republish {
            source: subjects.deliver_wildcard(),
            destination: subjects.live_wildcard(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Creates the stream, or brings an existing one to this configuration.
pub async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    settings: &LogSettings,
) -> Result<(), async_nats::jetstream::context::CreateStreamError> {
    let info = js.create_or_update_stream(stream_config(subjects, settings)).await?;
    tracing::info!(
        stream = %info.config.name,
        messages = info.state.messages,
        last_seq = info.state.last_sequence,
        "delivery log ready"
    );
    Ok(())
}
