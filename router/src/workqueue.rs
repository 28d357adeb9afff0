//! Taking over one slice of a work-queue stream (an event partition, a
//! user partition's hand-offs): the pull consumer both stages use.
//!
//! The consumer is deleted and created again whenever a worker starts, so
//! whatever the previous owner had fetched but not acknowledged is offered
//! again at once, in stream order, instead of after its acknowledgement wait.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};

/// How long an unacknowledged message waits before the server offers it again.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// What a stage asks of its consumer.
#[derive(Debug, Clone)]
pub struct Slice {
    /// The stream.
    pub stream: String,
    /// The durable consumer's name (one per slice, shared by owners over time).
    pub consumer: String,
    /// The subjects of the slice.
    pub filter: String,
    /// Messages fetched ahead of their acknowledgement.
    pub max_ack_pending: usize,
    /// Messages asked for per pull.
    pub batch: usize,
}

/// Why the consumer could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot take over consumer {consumer} on {stream}")]
pub struct ConsumerError {
    /// The stream.
    pub stream: String,
    /// The consumer.
    pub consumer: String,
    /// The step that failed.
    #[source]
    pub source: TakeOverStep,
}

/// The step of [`take_over`] that failed, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverStep {
    /// The stream could not be looked up.
    #[error("looking up the stream")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// The consumer could not be created.
    #[error("creating the consumer")]
    Create(#[from] async_nats::jetstream::stream::ConsumerError),
    /// Pulling could not start.
    #[error("starting to pull")]
    Pull(#[from] async_nats::jetstream::consumer::StreamError),
}

/// (Re)creates the slice's consumer from the oldest message left and starts pulling.
pub async fn take_over(js: &async_nats::jetstream::Context, slice: &Slice) -> Result<pull::Stream, ConsumerError> {
    let err = |e: TakeOverStep| ConsumerError {
        stream: slice.stream.clone(),
        consumer: slice.consumer.clone(),
        source: e,
    };
    let stream = js.get_stream(&slice.stream).await.map_err(|e| err(e.into()))?;
    if let Err(e) = stream.delete_consumer(&slice.consumer).await {
        tracing::debug!(consumer = %slice.consumer, error = %e, "no consumer to delete");
    }
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(slice.consumer.clone()),
            filter_subject: slice.filter.clone(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: slice.max_ack_pending as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| err(e.into()))?;
    consumer
        .stream()
        .max_messages_per_batch(slice.batch)
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(|e| err(e.into()))
}
