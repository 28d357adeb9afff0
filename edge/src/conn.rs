//! The handle other components hold on one live connection.
//!
//! Deliveries go into a bounded data queue with `try_send`: a full queue is
//! a slow consumer, counted and reported, never awaited. Control frames
//! (replies, pings, close) have their own small queue so data cannot block
//! them. The handle also carries the few atomics the sweeper reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Something for the connection's writer to send that is not a delivery.
#[derive(Debug)]
pub enum Control {
    /// An encoded control frame (reply, error, ready...).
    Frame(Vec<u8>),
    /// A WebSocket pong answering the client's ping.
    Pong(Bytes),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// Echo of the client's close frame; the writer then stops.
    CloseEcho(Bytes),
    /// Close the connection with this code and reason; the writer then stops.
    Close(u16, &'static str),
    /// Drop counters changed: send a `dropped` notice now.
    DroppedNotice,
}

/// Sending ends of a connection's queues, created before the user is known.
#[derive(Debug, Clone)]
pub struct ConnSenders {
    data: mpsc::Sender<Bytes>,
    control: mpsc::Sender<Control>,
    dropped_slow: Arc<AtomicU64>,
}

/// Receiving ends owned by the connection's writer.
pub struct ConnQueues {
    /// Deliveries.
    pub data: mpsc::Receiver<Bytes>,
    /// Control frames.
    pub control: mpsc::Receiver<Control>,
    /// Deliveries dropped because the data queue was full, not yet reported.
    pub dropped_slow: Arc<AtomicU64>,
}

/// Room for control frames per connection.
const CONTROL_QUEUE: usize = 64;

/// Creates a connection's bounded queues.
pub fn channels(queue_events: usize) -> (ConnSenders, ConnQueues) {
    let (data_tx, data_rx) = mpsc::channel(queue_events);
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    (
        ConnSenders {
            data: data_tx,
            control: ctl_tx.clone(),
            dropped_slow: dropped.clone(),
        },
        ConnQueues {
            data: data_rx,
            control: ctl_rx,
            dropped_slow: dropped,
        },
    )
}

impl ConnSenders {
    /// Queues a control frame, waiting for room (used by the connection's own reader).
    pub async fn control(&self, c: Control) -> bool {
        self.control.send(c).await.is_ok()
    }

    /// A sender for the control queue, for fastwebsockets' obligated replies.
    pub fn control_sender(&self) -> mpsc::Sender<Control> {
        self.control.clone()
    }
}

/// Shared reference to an authenticated connection, held by the hub and pumps.
#[derive(Debug)]
pub struct ConnHandle {
    /// Node-unique connection id.
    pub id: u64,
    /// The authenticated user.
    pub user: Arc<str>,
    senders: ConnSenders,
    /// Unix ms of the last frame received from the client.
    pub last_rx_ms: AtomicU64,
    /// Token expiry, unix seconds (updated by refresh).
    pub exp_s: AtomicU64,
}

impl ConnHandle {
    /// A handle for an authenticated connection.
    pub fn new(id: u64, user: Arc<str>, senders: ConnSenders, exp_s: u64) -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id,
            user,
            senders,
            last_rx_ms: AtomicU64::new(now_ms()),
            exp_s: AtomicU64::new(exp_s),
        })
    }

    /// Queues a delivery without waiting; a full queue counts a drop.
    pub fn deliver(&self, body: Bytes) {
        match self.senders.data.try_send(body) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("switchyard_edge_dropped_total", "reason" => "slow_consumer").increment(1);
                if self.senders.dropped_slow.fetch_add(1, Ordering::Relaxed) == 0 {
                    // First drop since the last notice: wake the writer to report it.
                    self.try_control(Control::DroppedNotice);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queues a control frame without waiting (used by shared tasks such as the sweeper).
    pub fn try_control(&self, c: Control) -> bool {
        self.senders.control.try_send(c).is_ok()
    }

    /// Records that the client sent something.
    pub fn touch(&self, now_ms: u64) {
        self.last_rx_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
