//! The delivery log: the JetStream streams that keep every durable delivery,
//! and the hand-off stream between the match and delivery stages.
//!
//! User partition `p` writes its users' deliveries on
//! `<prefix>.deliver.<p>.<user>` and its broadcasts on
//! `<prefix>.deliver.<p>._all`, in log stream `p % groups`
//! (`<BASE>_LOG_<group>`); several streams spread the writes over a NATS
//! cluster's stream leaders. Each keeps at most `max_per_subject` messages
//! per subject (the offline queue) for at most `max_age`. The stored
//! sequence is the `pos` clients see; [`epoch`] is one for the whole log.
//! Only the delivery stage writes the log, and it sends each delivery's
//! live copy itself (nothing is republished). Edges read a user's history
//! with direct gets (hence `allow_direct`; see `edge/src/log.rs`), so a
//! resume creates no consumer on the server.
//!
//! The hand-off stream `<BASE>_TARGETS` (work queue) carries durable
//! events' targets from the match stage to the delivery stage, one subject
//! per user partition.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy};
use switchyard_common::subject::Subjects;

/// Delivery log settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Messages kept per user (the offline queue length).
    pub max_per_subject: i64,
    /// How long a message is kept.
    pub max_age: Duration,
    /// File (default) or memory storage.
    pub storage: switchyard_runtime::nats::Storage,
    /// Stream replicas (1 on a single server; 3 on a cluster).
    pub replicas: usize,
    /// Window in which a delivery with the same message id is stored once
    /// (a redone event after a router failover; see [`crate::ingest`]).
    pub duplicate_window: Duration,
    /// User partitions.
    pub user_partitions: u32,
    /// Log streams the user partitions are spread over.
    pub groups: u32,
}

/// The configuration of log stream `group`.
pub fn stream_config(subjects: &Subjects, s: &LogSettings, group: u32) -> Config {
    Config {
        name: subjects.log_stream(group),
        description: Some("Switchyard delivery log: per-user durable deliveries of some user partitions".into()),
        subjects: (0..s.user_partitions)
            .filter(|p| p % s.groups == group)
            .map(|p| subjects.deliver_partition(p))
            .collect(),
        max_messages_per_subject: s.max_per_subject,
        max_age: s.max_age,
        storage: s.storage.into(),
        num_replicas: s.replicas,
        discard: DiscardPolicy::Old,
        duplicate_window: s.duplicate_window,
        allow_direct: true,
        ..Default::default()
    }
}

/// The hand-off stream's configuration.
pub fn targets_config(subjects: &Subjects, s: &LogSettings) -> Config {
    Config {
        name: subjects.targets_stream(),
        description: Some("Switchyard hand-off: durable events' targets awaiting their delivery partition".into()),
        subjects: vec![subjects.targets_wildcard()],
        retention: RetentionPolicy::WorkQueue,
        storage: s.storage.into(),
        num_replicas: s.replicas,
        discard: DiscardPolicy::Old,
        duplicate_window: s.duplicate_window,
        max_age: s.max_age,
        ..Default::default()
    }
}

/// Creates the log streams and the hand-off stream, or brings existing ones
/// to this configuration.
pub async fn ensure_streams(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    settings: &LogSettings,
) -> Result<(), async_nats::jetstream::context::CreateStreamError> {
    for group in 0..settings.groups {
        let info = js
            .create_or_update_stream(stream_config(subjects, settings, group))
            .await?;
        tracing::info!(
            stream = %info.config.name,
            messages = info.state.messages,
            last_seq = info.state.last_sequence,
            "delivery log ready"
        );
    }
    js.create_or_update_stream(targets_config(subjects, settings)).await?;
    Ok(())
}

/// The `epoch` clients see: one for the whole log, a hash of every log
/// stream's name and creation time and the partition count (a recreated
/// stream, or a different count, which moves users to other subjects, is a
/// new epoch). Every router computes the same.
pub async fn epoch(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    settings: &LogSettings,
) -> Result<String, async_nats::jetstream::context::GetStreamError> {
    let mut h = switchyard_common::hash::Fnv1a::new();
    for group in 0..settings.groups {
        let stream = js.get_stream(subjects.log_stream(group)).await?;
        let info = stream.cached_info();
        h = h
            .write(info.config.name.as_bytes())
            .write(&info.created.unix_timestamp_nanos().to_be_bytes());
    }
    let h = h.finish();
    Ok(format!(
        "{}-{h:016x}-u{}",
        subjects.log_stream(0).trim_end_matches("_0"),
        settings.user_partitions
    ))
}
