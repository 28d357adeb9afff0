//! The rate limit on a connection's client ops (docs/PROTOCOL.md, "Client
//! ops", limits on what one client may ask): a token bucket per connection
//! for well-formed ops other than `ping` and `auth`.
//!
//! Why: every `list`, `subscribe`, `join`, ... is a request to the router
//! tier (and `subscribe`/`list` a JetStream API request there), so one client
//! looping on them slows ingest for everyone. `ping` stays free so a client
//! can always tell a slow server from a dead one, and `auth` so a token can
//! always be refreshed before it expires.
//!
//! Pure policy: the caller decodes the frame first (a bad frame gets
//! `bad_frame` and never reaches [`OpLimiter::admit`], so it spends no token),
//! passes the clock in, and answers a refusal with `error rate_limited`, which
//! does not count against the bad-frame budget. No I/O, no timers, no locks.

use std::time::Instant;

use switchyard_common::client::ClientOp;

use crate::outbound::TokenBucket;

/// Whether `op` is exempt from the op rate limit (`ping` and `auth`).
pub fn is_exempt(op: &ClientOp) -> bool {
    matches!(op, ClientOp::Ping | ClientOp::Auth { .. })
}

/// One connection's op rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpLimiter {
    bucket: TokenBucket,
}

impl OpLimiter {
    /// A full bucket of `burst` ops (0 counts as 1) refilled at `ops_per_s`;
    /// a rate of 0 turns the limit off.
    pub fn new(ops_per_s: u32, burst: u32) -> OpLimiter {
        OpLimiter {
            bucket: TokenBucket::new(ops_per_s, burst),
        }
    }

    /// Whether `op` may go ahead at `now`; exempt ops always may and spend nothing.
    pub fn admit(&mut self, op: &ClientOp, now: Instant) -> bool {
        is_exempt(op) || self.bucket.try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rmpv::Value;

    use super::*;

    fn list() -> ClientOp {
        ClientOp::List
    }

    fn admitted(l: &mut OpLimiter, op: &ClientOp, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| l.admit(op, now)).count()
    }

    #[test]
    fn the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = OpLimiter::new(20, 50);
        assert_eq!(
            admitted(&mut l, &list(), t0, 60),
            50,
            "a rested connection gets the burst"
        );
        assert!(!l.admit(&list(), t0));
        // 20 per second: one op every 50 ms.
        assert!(!l.admit(&list(), t0 + Duration::from_millis(49)));
        assert!(l.admit(&list(), t0 + Duration::from_millis(50)));
        assert!(!l.admit(&list(), t0 + Duration::from_millis(50)));
        // Two seconds refill 40 tokens, one of which was spent at 50 ms.
        assert_eq!(admitted(&mut l, &list(), t0 + Duration::from_secs(2), 100), 39);
        // A long rest refills up to the burst, no further.
        assert_eq!(admitted(&mut l, &list(), t0 + Duration::from_secs(3600), 100), 50);
    }

    #[test]
    fn refusals_spend_nothing() {
        let t0 = Instant::now();
        let mut l = OpLimiter::new(1, 1);
        assert!(l.admit(&list(), t0));
        for ms in 0..1000 {
            assert!(!l.admit(&list(), t0 + Duration::from_millis(ms)));
        }
        assert!(l.admit(&list(), t0 + Duration::from_secs(1)));
    }

    #[test]
    fn ping_and_auth_are_exempt_and_spend_nothing() {
        let t0 = Instant::now();
        let mut l = OpLimiter::new(1, 2);
        let auth = ClientOp::Auth {
            token: "t".into(),
            resume: None,
        };
        for _ in 0..100 {
            assert!(l.admit(&ClientOp::Ping, t0));
            assert!(l.admit(&auth, t0));
        }
        let others = [
            ClientOp::List,
            ClientOp::Unsubscribe { sub: Value::from("s") },
            ClientOp::Join { room: Value::from("r") },
            ClientOp::Leave { room: Value::from("r") },
            ClientOp::Rpc {
                method: "m".into(),
                data: Value::Nil,
            },
        ];
        assert!(others.iter().all(|op| !is_exempt(op)));
        assert!(
            l.admit(&others[0], t0) && l.admit(&others[4], t0),
            "the burst is intact"
        );
        assert!(!l.admit(&others[2], t0));
        assert!(l.admit(&ClientOp::Ping, t0), "ping passes an empty bucket");
    }

    #[test]
    fn zero_rate_turns_the_limit_off() {
        let mut l = OpLimiter::new(0, 0);
        assert_eq!(admitted(&mut l, &list(), Instant::now(), 10_000), 10_000);
    }
}
