//! Scatter-gather over core NATS: one request, an answer from each of a
//! known set of peers (every live edge, or every router).
//!
//! The application API's fleet-wide methods must know that every edge
//! (or router) has answered before they reply `result`. The request goes
//! out once with a fresh inbox as its reply subject; answers are collected
//! until each expected peer has answered or the wait runs out, in which
//! case the caller learns which peers stayed silent.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

/// Why not every expected peer answered.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    /// The inbox could not be subscribed to.
    #[error("cannot subscribe to the answers")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The request could not be published.
    #[error("cannot publish the request")]
    Publish(#[from] async_nats::PublishError),
    /// Some peers did not answer in time.
    #[error("{missing} of {expected} peers did not answer in time")]
    Silent {
        /// Peers expected.
        expected: usize,
        /// Peers that did not answer.
        missing: usize,
    },
}

/// Publishes `payload` on `subject` and collects answers until every peer
/// in `expected` has answered (peers are named by `peer_of`, which reads
/// an answer's sender; answers it cannot read are skipped) or `wait`
/// passes. Answers from peers not in `expected` are kept too: a peer that
/// started a moment ago is still a peer.
pub async fn gather<T>(
    client: &async_nats::Client,
    subject: String,
    payload: Bytes,
    expected: &HashSet<String>,
    wait: Duration,
    peer_of: impl Fn(&[u8]) -> Option<(String, T)>,
) -> Result<Vec<T>, GatherError> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client.publish_with_reply(subject, inbox, payload).await?;
    let mut heard: HashSet<String> = HashSet::with_capacity(expected.len());
    let mut out = Vec::with_capacity(expected.len());
    let deadline = tokio::time::Instant::now() + wait;
    while !expected.iter().all(|p| heard.contains(p)) {
        match tokio::time::timeout_at(deadline, answers.next()).await {
            Ok(Some(msg)) => {
                if let Some((peer, answer)) = peer_of(&msg.payload) {
                    if heard.insert(peer) {
                        out.push(answer);
                    }
                }
            }
            Ok(None) | Err(_) => {
                let missing = expected.iter().filter(|p| !heard.contains(*p)).count();
                return Err(GatherError::Silent {
                    expected: expected.len(),
                    missing,
                });
            }
        }
    }
    let _ = answers.unsubscribe().await;
    Ok(out)
}
