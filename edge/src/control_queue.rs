//! A connection's queue of control frames (replies, pings, closes): small,
//! bounded, and holding no memory while empty.
//!
//! tokio's bounded channel allocates its first block of slots when it is
//! created; with one per connection and most connections idle, that block
//! was about a kilobyte of every idle connection. This queue allocates on
//! the first frame and gives the memory back when it drains. Many senders
//! (the session, the sweeper, the hub), one receiver (the writer); the
//! writer closes it when it stops, after which every send fails at once.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::conn::Control;

/// Most control frames waiting per connection.
pub const CAPACITY: usize = 64;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct ControlQueue {
    inner: Mutex<Inner>,
    /// An item arrived (or the queue closed): wakes the writer.
    item: Notify,
    /// Room was made (or the queue closed): wakes a waiting sender.
    room: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<Control>,
    closed: bool,
}

impl ControlQueue {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("control queue lock")
    }

    /// Queues `c` if there is room; false when full or closed.
    pub fn try_push(&self, c: Control) -> bool {
        self.try_push_all([c])
    }

    /// Queues all of `items` in order, or none of them (no room, or closed).
    pub fn try_push_all<const N: usize>(&self, items: [Control; N]) -> bool {
        let mut inner = self.inner();
        if inner.closed || inner.items.len() + N > CAPACITY {
            return false;
        }
        inner.items.extend(items);
        drop(inner);
        self.item.notify_one();
        true
    }

    /// Queues `c`, waiting for room; false once the queue is closed.
    pub async fn push(&self, c: Control) -> bool {
        let mut c = Some(c);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut inner = self.inner();
                if inner.closed {
                    return false;
                }
                if inner.items.len() < CAPACITY {
                    inner.items.extend(c.take());
                    drop(inner);
                    self.item.notify_one();
                    return true;
                }
            }
            room.await;
        }
    }

    /// The next item, if any, without waiting.
    pub fn try_pop(&self) -> Option<Control> {
        let mut inner = self.inner();
        let c = inner.items.pop_front()?;
        if inner.items.is_empty() {
            // Give the buffer back: an idle connection keeps none.
            inner.items = VecDeque::new();
        }
        drop(inner);
        self.room.notify_one();
        Some(c)
    }

    /// The next item, waiting for one; `None` once closed and empty.
    pub async fn pop(&self) -> Option<Control> {
        loop {
            let item = self.item.notified();
            tokio::pin!(item);
            item.as_mut().enable();
            if let Some(c) = self.try_pop() {
                return Some(c);
            }
            if self.inner().closed {
                return None;
            }
            item.await;
        }
    }

    /// Nothing waits in the queue.
    pub fn is_empty(&self) -> bool {
        self.inner().items.is_empty()
    }

    /// The writer stopped: sends fail from now on.
    pub fn is_closed(&self) -> bool {
        self.inner().closed
    }

    /// Stops the queue: drops what waits, fails every send, wakes everyone.
    pub fn close(&self) {
        let mut inner = self.inner();
        inner.closed = true;
        inner.items = VecDeque::new();
        drop(inner);
        self.room.notify_waiters();
        self.item.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_all_or_nothing_and_empty_holds_no_buffer() {
        let q = ControlQueue::default();
        for _ in 0..CAPACITY - 1 {
            assert!(q.try_push(Control::Ping));
        }
        assert!(!q.try_push_all([Control::Ping, Control::Ping]), "room for one, not two");
        assert!(q.try_push(Control::Ping));
        assert!(!q.try_push(Control::Ping));
        while q.try_pop().is_some() {}
        assert!(q.is_empty());
        assert_eq!(q.inner().items.capacity(), 0);
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_and_the_writer_for_items() {
        let q = Arc::new(ControlQueue::default());
        for _ in 0..CAPACITY {
            assert!(q.try_push(Control::Ping));
        }
        let sender = {
            let q = q.clone();
            tokio::spawn(async move { q.push(Control::DroppedNotice).await })
        };
        // One runtime thread (tokio::test): yielding lets the spawned task
        // run until it waits.
        tokio::task::yield_now().await;
        assert!(!sender.is_finished(), "full: the sender waits");
        assert!(matches!(q.pop().await, Some(Control::Ping)));
        assert!(sender.await.unwrap(), "room was made");
        for _ in 0..CAPACITY - 1 {
            assert!(matches!(q.pop().await, Some(Control::Ping)));
        }
        assert!(matches!(q.pop().await, Some(Control::DroppedNotice)));
        let writer = {
            let q = q.clone();
            tokio::spawn(async move { q.pop().await })
        };
        // One runtime thread (tokio::test): yielding lets the spawned task
        // run until it waits.
        tokio::task::yield_now().await;
        assert!(q.try_push(Control::Ping));
        assert!(matches!(writer.await.unwrap(), Some(Control::Ping)));
    }

    #[tokio::test]
    async fn closing_fails_senders_and_ends_the_writer() {
        let q = Arc::new(ControlQueue::default());
        for _ in 0..CAPACITY {
            assert!(q.try_push(Control::Ping));
        }
        let sender = {
            let q = q.clone();
            tokio::spawn(async move { q.push(Control::Ping).await })
        };
        // One runtime thread (tokio::test): yielding lets the spawned task
        // run until it waits.
        tokio::task::yield_now().await;
        q.close();
        assert!(!sender.await.unwrap());
        assert!(q.pop().await.is_none());
        assert!(!q.try_push(Control::Ping));
        assert!(q.is_closed());
    }
}
