//! Accounting shared by the connections, the producer and the reporter:
//! counters, latency histograms (sharded to keep lock contention low), and
//! readings of other processes (CPU time, RSS) from /proc.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Histogram shards; a connection records into shard `user % SHARDS`.
const SHARDS: usize = 8;
/// Latencies above this (µs) are clamped: 60 s.
const MAX_US: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds")
}

/// The window and the interval histogram of one shard.
struct Shard {
    window: Histogram<u64>,
    interval: Histogram<u64>,
}

/// Latencies: the measurement window's (for the summary) and the last
/// second's (for the progress line).
pub struct Latency {
    shards: Vec<Mutex<Shard>>,
    /// Events published in [from, to) (unix µs) count toward the window.
    window: Mutex<(u64, u64)>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        window: histogram(),
                        interval: histogram(),
                    })
                })
                .collect(),
            window: Mutex::new((u64::MAX, u64::MAX)),
        }
    }
}

impl Latency {
    /// Events published in [from_us, to_us) count toward the window's histogram.
    pub fn set_window(&self, from_us: u64, to_us: u64) {
        *self.window.lock().expect("window lock") = (from_us, to_us);
    }

    /// The window.
    pub fn window(&self) -> (u64, u64) {
        *self.window.lock().expect("window lock")
    }

    /// Records a frame's events (`(publish µs, latency µs)` pairs).
    pub fn record(&self, shard: usize, window: (u64, u64), samples: impl Iterator<Item = (u64, u64)>) {
        let mut s = self.shards[shard % SHARDS].lock().expect("histogram lock");
        for (t, lat) in samples {
            let lat = lat.clamp(1, MAX_US);
            s.interval.saturating_record(lat);
            if t >= window.0 && t < window.1 {
                s.window.saturating_record(lat);
            }
        }
    }

    /// The last interval's histogram (and resets it).
    pub fn take_interval(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            let mut s = s.lock().expect("histogram lock");
            all.add(&s.interval).expect("same bounds");
            s.interval.reset();
        }
        all
    }

    /// The window's histogram.
    pub fn window_histogram(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            all.add(&s.lock().expect("histogram lock").window).expect("same bounds");
        }
        all
    }
}

/// Counters every part of a run updates.
#[derive(Default)]
pub struct Counters {
    /// Events published.
    pub published: AtomicU64,
    /// Deliveries expected (sum over published events of their target users).
    pub expected: AtomicU64,
    /// Event deliveries received (duplicates included).
    pub received: AtomicU64,
    /// Distinct deliveries received.
    pub unique: AtomicU64,
    /// WebSocket frames that carried events (`event` or `batch`): deliveries
    /// per frame shows how much the edge batched.
    pub event_frames: AtomicU64,
    /// Connections open (authenticated, subscribed).
    pub connected: AtomicU64,
    /// Clients that ended with an error.
    pub failed: AtomicU64,
    /// Connects or resumes that failed (`unavailable`, or a dropped
    /// connection) and were tried again.
    pub retries: AtomicU64,
    /// Connect attempts that failed.
    pub connect_errors: AtomicU64,
    /// Events reported in `dropped` notices as rate limited.
    pub dropped_rate_limited: AtomicU64,
    /// Events reported in `dropped` notices as slow consumer.
    pub dropped_slow_consumer: AtomicU64,
    /// Bytes of data frames received on the wire (headers included,
    /// compressed size when permessage-deflate is on).
    pub wire_bytes: AtomicU64,
    /// Data frames that came compressed (RSV1).
    pub compressed_frames: AtomicU64,
}

impl Counters {
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Which events one connection has seen, and in what order.
#[derive(Debug, Default)]
pub struct Seen {
    bits: Vec<u64>,
    last_seq: Option<u64>,
    /// Largest durable position seen.
    pub last_pos: u64,
    /// Distinct events.
    pub unique: u64,
    /// Events seen before.
    pub duplicates: u64,
    /// Events whose `seq` is below one seen earlier, or durable events whose
    /// `pos` is not above the last one.
    pub out_of_order: u64,
}

/// What [`Seen::note`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new event.
    New,
    /// Seen before.
    Duplicate,
}

impl Seen {
    /// Notes event `seq` (at `pos`, when durable).
    pub fn note(&mut self, seq: u64, pos: Option<u64>) -> Verdict {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1 + word / 4, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return Verdict::Duplicate;
        }
        self.bits[word] |= 1 << bit;
        self.unique += 1;
        if self.last_seq.is_some_and(|l| seq < l) {
            self.out_of_order += 1;
        }
        self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
        if let Some(p) = pos {
            if p <= self.last_pos {
                self.out_of_order += 1;
            }
            self.last_pos = self.last_pos.max(p);
        }
        Verdict::New
    }
}

/// A process whose CPU time and memory the run reports.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its role (`nats`, `router`, `edge`, ...).
    pub name: String,
    /// Its process id.
    pub pid: u32,
}

/// A reading of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// User + system CPU seconds so far.
    pub cpu_s: f64,
    /// Resident set, KiB.
    pub rss_kib: u64,
}

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`; 100 if unknown).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

impl Proc {
    /// Reads CPU time and RSS; `None` when the process is gone.
    pub fn sample(&self, ticks: f64) -> Option<ProcSample> {
        sample_pid(&self.pid.to_string(), ticks)
    }
}

/// Reads a process (`self` for this one).
pub fn sample_pid(pid: &str, ticks: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let cpu = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: cpu / ticks,
        rss_kib: rss,
    })
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_counts_duplicates_and_order() {
        let mut s = Seen::default();
        assert_eq!(s.note(5, Some(10)), Verdict::New);
        assert_eq!(s.note(700, Some(11)), Verdict::New);
        assert_eq!(s.note(5, Some(10)), Verdict::Duplicate);
        assert_eq!(s.note(6, Some(12)), Verdict::New);
        assert_eq!((s.unique, s.duplicates, s.out_of_order), (3, 1, 1));
        assert_eq!(s.note(701, Some(12)), Verdict::New);
        assert_eq!(s.out_of_order, 2, "a repeated pos is out of order");
    }

    #[test]
    fn reads_this_process() {
        let s = sample_pid("self", clock_ticks()).unwrap();
        assert!(s.rss_kib > 0);
    }
}
