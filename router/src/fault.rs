//! Fault injection for the failover tests, compiled in only with the cargo
//! feature `fault-injection` (the test crate turns it on; a production build,
//! `cargo build -p switchyard-router`, leaves it out, and then nothing here
//! can abort the process whatever the environment says).
//!
//! With the feature, `SWITCHYARD_TEST_CRASH_AFTER_DELIVERIES=N` makes the
//! router abort once N durable deliveries are stored, before their live
//! copies go out and before their hand-off is acknowledged: the worst moment
//! for a router to die.

/// Aborts the process after a number of stored durable deliveries.
#[derive(Debug)]
pub struct CrashAfter {
    #[cfg(feature = "fault-injection")]
    limit: u64,
    #[cfg(feature = "fault-injection")]
    stored: std::sync::atomic::AtomicU64,
}

impl CrashAfter {
    /// The crash the environment asks for; always `None` without the feature.
    pub fn from_env() -> Option<CrashAfter> {
        #[cfg(feature = "fault-injection")]
        {
            let limit = std::env::var("SWITCHYARD_TEST_CRASH_AFTER_DELIVERIES").ok()?;
            let limit = limit
                .trim()
                .parse()
                .expect("SWITCHYARD_TEST_CRASH_AFTER_DELIVERIES must be a number");
            tracing::warn!(
                limit,
                "fault injection: this router aborts after {limit} stored deliveries"
            );
            Some(CrashAfter {
                limit,
                stored: std::sync::atomic::AtomicU64::new(0),
            })
        }
        #[cfg(not(feature = "fault-injection"))]
        None
    }

    /// Counts `n` more stored durable deliveries; aborts once the limit is reached.
    pub fn stored(&self, n: u64) {
        #[cfg(feature = "fault-injection")]
        {
            let before = self.stored.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if before + n >= self.limit {
                tracing::error!("SWITCHYARD_TEST_CRASH_AFTER_DELIVERIES reached: aborting");
                std::process::abort();
            }
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = n;
    }
}
