//! Wall-clock time as the wire carries it (unix milliseconds). Timers and
//! deadlines use tokio's monotonic clock instead; this is for timestamps.

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
