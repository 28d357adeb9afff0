//! Token revocations at the edge: the set every token is checked against,
//! kept current by watching the revocation bucket.
//!
//! A revoked token must be refused at connect and at refresh on every
//! edge, without a NATS round trip per check, and connections using it
//! must be closed. So each edge keeps the whole set in memory
//! ([`RevocationSet`]), loads it before it serves anyone, and applies each
//! new entry as it arrives: first to the set, then to the connections it
//! covers. A connection that authenticates at the same moment checks the
//! set again once it is in the user table, so it cannot slip between the
//! two.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::revocation::{RevocationSet, TokenFacts};
use switchyard_common::{CloseCode, ErrorCode};
use switchyard_runtime::clock::now_ms;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::conn::{ConnHandle, TokenId};
use crate::intake::UserTable;

/// How long an edge waits at start for the revocations already in force.
const LOAD_WAIT: Duration = Duration::from_secs(10);
/// How often entries that cover no valid token any more are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why the revocations could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The bucket could be neither opened nor created.
    #[error(transparent)]
    Bucket(#[from] switchyard_runtime::nats::KvOpenError),
    /// The bucket could not be watched.
    #[error("cannot watch the revocation bucket")]
    Watch(#[from] kv::WatchError),
    /// The bucket's state could not be read.
    #[error("cannot read the revocation bucket's state")]
    Status(#[from] kv::StatusError),
    /// The revocations in force did not arrive in time.
    #[error("the revocations in force did not arrive within {0:?}")]
    Timeout(Duration),
}

/// The revocations in force on this edge.
#[derive(Debug, Default)]
pub struct Revocations {
    set: RwLock<RevocationSet>,
    /// The bucket revision applied last.
    applied: watch::Sender<u64>,
}

impl Revocations {
    /// Whether `user`'s token `token` is revoked now.
    pub fn is_revoked(&self, user: &str, token: &TokenId) -> bool {
        let set = self.set.read().expect("revocation set lock");
        if set.is_empty() {
            return false;
        }
        let facts = TokenFacts {
            user,
            iat: token.iat,
            jti: token.jti.as_deref(),
        };
        set.is_revoked(facts, now_ms() / 1000)
    }

    /// Waits until the bucket's `revision` is in force here; whether it is
    /// within `wait`.
    pub async fn wait_applied(&self, revision: u64, wait: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|applied| *applied >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn apply(&self, entry: &kv::Entry) {
        let value = match entry.operation {
            kv::Operation::Put => Some(&entry.value[..]),
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        let mut set = self.set.write().expect("revocation set lock");
        set.apply(&entry.key, value);
        metrics::gauge!("switchyard_edge_revocations").set(set.len() as f64);
    }

    fn prune(&self) {
        let mut set = self.set.write().expect("revocation set lock");
        set.prune(now_ms() / 1000);
        metrics::gauge!("switchyard_edge_revocations").set(set.len() as f64);
    }
}

/// Opens (or creates) the revocation bucket, loads the revocations in
/// force, and returns them with the task that keeps them current and
/// closes the connections new ones cover.
pub async fn load(
    js: &async_nats::jetstream::Context,
    bucket: kv::Config,
    table: Arc<UserTable>,
    cancel: CancellationToken,
) -> Result<(Arc<Revocations>, impl std::future::Future<Output = ()>), RevocationError> {
    let kv = switchyard_runtime::nats::open_or_create_kv(js, &bucket).await?;
    let revocations = Arc::new(Revocations::default());
    let status = kv.status().await?;
    let mut watch = kv.watch_with_history(">").await?;
    if status.info.state.messages > 0 {
        let loading = async {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                revocations.apply(&entry);
                revocations.applied.send_replace(entry.revision);
                if entry.delta == 0 || entry.seen_current {
                    return true;
                }
            }
            false
        };
        if !tokio::time::timeout(LOAD_WAIT, loading).await.unwrap_or(false) {
            return Err(RevocationError::Timeout(LOAD_WAIT));
        }
    }
    let task = keep_current(kv, watch, revocations.clone(), table, cancel);
    Ok((revocations, task))
}

async fn keep_current(
    kv: kv::Store,
    mut watch: kv::Watch,
    revocations: Arc<Revocations>,
    table: Arc<UserTable>,
    cancel: CancellationToken,
) {
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = prune.tick() => revocations.prune(),
            entry = watch.next() => match entry {
                Some(Ok(entry)) => {
                    revocations.apply(&entry);
                    if entry.operation == kv::Operation::Put {
                        close_covered(&revocations, &table, &entry.key);
                    }
                    revocations.applied.send_replace(entry.revision);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "revocation watch error"),
                None => {
                    // The watch ended (e.g. NATS restarted): start again
                    // after what was applied, paced so a dead server is
                    // not hammered.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let from = *revocations.applied.borrow() + 1;
                    match kv.watch_all_from_revision(from).await {
                        Ok(w) => watch = w,
                        Err(e) => tracing::warn!(error = %e, "cannot watch the revocation bucket again"),
                    }
                }
            },
        }
    }
}

/// Closes (4001) the connections whose current token the revocation under
/// `key` covers: the user's own, or, for a token id, any connection using it.
fn close_covered(revocations: &Revocations, table: &UserTable, key: &str) {
    let candidates: Vec<Arc<ConnHandle>> = match key.strip_prefix("user.") {
        Some(user) => table.connections_of(user),
        None => table.connections(),
    };
    let mut closed = 0u64;
    for conn in candidates {
        if revocations.is_revoked(conn.user(), &conn.token()) && close_revoked(&conn) {
            closed += 1;
        }
    }
    if closed > 0 {
        tracing::info!(key, closed, "connections closed by a revocation");
    }
}

/// Sends `error unauthorized` and closes with 4001: the connection's token
/// was revoked. Whether this call closed it.
pub fn close_revoked(conn: &ConnHandle) -> bool {
    let mut frame = Vec::new();
    encode_server_frame(
        conn.encoding,
        &ServerFrame::Error {
            id: None,
            code: ErrorCode::Unauthorized.as_str(),
            message: "token revoked",
        },
        &mut frame,
    );
    conn.close_once(CloseCode::Unauthorized, "token revoked", Some(frame))
}
