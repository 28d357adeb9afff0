//! The event streams: durable capture of producer events, split into
//! partitions that routers own one at a time.
//!
//! Producers publish on `<prefix>.events.<type>` or
//! `<prefix>.events.<type>.<key>`, with a plain NATS publish or a JetStream
//! publish (which then gets the stream's acknowledgement). Each shape has its
//! own stream, because a stream has one subject transform and the transform
//! can only hash `*` tokens: `<BASE>_EVENTS_KEYED` stores
//! `<prefix>.evk.<p>.<type>.<key>` with `p = partition(N, type, key)`, and
//! `<BASE>_EVENTS_TYPED` stores `<prefix>.evt.<p>.<type>` with
//! `p = partition(N, type)`. One subject always lands in one partition, so a
//! router that processes a partition in stream order keeps every subject's
//! order. The hashing is the server's, so producers need no library of ours.
//!
//! Both streams use work-queue retention: a message leaves the stream when
//! a router acknowledges it, which it does only after the event's durable
//! deliveries are stored in the delivery log. What is in a stream is
//! therefore exactly what some router still owes; a router that takes a
//! partition over starts from the oldest such message.
//!
//! Changing the partition count of existing streams re-hashes new events
//! only; drain the streams first (stop producers until they are empty).

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, SubjectTransform};
use switchyard_common::subject::{EventShape, Subjects};

/// Event stream settings.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Partitions per shape.
    pub partitions: u32,
    /// File (default) or memory storage.
    pub storage: switchyard_runtime::nats::Storage,
    /// Stream replicas.
    pub replicas: usize,
    /// Longest an unprocessed event is kept (no router running for that long).
    pub max_age: Duration,
    /// Window in which a JetStream publish with the same `Nats-Msg-Id` is stored once.
    pub duplicate_window: Duration,
}

/// One partition of one shape: the unit a router owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    /// Which stream.
    pub shape: EventShape,
    /// Partition number, below [`EventSettings::partitions`].
    pub number: u32,
}

impl Partition {
    /// Every partition of both shapes.
    pub fn all(partitions: u32) -> Vec<Partition> {
        EventShape::ALL
            .iter()
            .flat_map(|&shape| (0..partitions).map(move |number| Partition { shape, number }))
            .collect()
    }

    /// A short name used for the lease key and the consumer: `k3`, `t0`.
    pub fn name(&self) -> String {
        format!("{}{}", self.shape.tag(), self.number)
    }
}

/// The stream configuration of one shape.
pub fn stream_config(subjects: &Subjects, shape: EventShape, s: &EventSettings) -> Config {
    Config {
        name: subjects.events_stream(shape),
        description: Some("Switchyard producer events awaiting a router, partitioned".into()),
        subjects: vec![subjects.events_capture(shape)],
        subject_transform: Some(SubjectTransform {
            source: subjects.events_capture(shape),
            destination: subjects.events_partitioned(shape, s.partitions),
        }),
        retention: RetentionPolicy::WorkQueue,
        storage: s.storage.into(),
        num_replicas: s.replicas,
        max_age: s.max_age,
        duplicate_window: s.duplicate_window,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates both streams, or brings existing ones to this configuration.
pub async fn ensure_streams(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    settings: &EventSettings,
) -> Result<(), async_nats::jetstream::context::CreateStreamError> {
    for shape in EventShape::ALL {
        let info = js
            .create_or_update_stream(stream_config(subjects, shape, settings))
            .await?;
        tracing::info!(stream = %info.config.name, pending = info.state.messages, "event stream ready");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_both_shapes_with_distinct_names() {
        let all = Partition::all(4);
        assert_eq!(all.len(), 8);
        let names: std::collections::HashSet<String> = all.iter().map(Partition::name).collect();
        assert_eq!(names.len(), 8);
        assert!(names.contains("k3") && names.contains("t0"));
    }
}
