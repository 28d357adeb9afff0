//! The load generator behind `switchyard-loadgen`: many WebSocket clients
//! against running edges, a producer publishing through NATS at a fixed
//! rate, and exact accounting of every event.
//!
//! Every client's user, subscriptions and every event's attributes are pure
//! functions of a seed ([`plan`]), so the producer computes, for each event
//! it publishes, which users the reference matching rule says must get it,
//! and the run compares that with what each client received: lost,
//! duplicated, out of order (per connection, `seq` order, and `pos` order
//! for durable events). Events carry the producer's publish time (unix µs),
//! so clients record end-to-end latency in an HDR histogram.
//!
//! Scenarios:
//! - `w1` market fan-out: each user subscribes to 10 of 500 symbols drawn
//!   Zipf; ticks (non-durable) on a Zipf-drawn symbol.
//! - `w2` alerts: several multi-dimensional subscriptions per user (symbol,
//!   pattern type, tier, confidence bounds); durable alerts.
//! - `w3` idle: connections that only authenticate; reports the RSS of the
//!   watched processes per connection.
//! - `w4` reconnect storm: durable events flow, then every client drops its
//!   socket and reconnects with resume; reports the time until all are back
//!   and what was lost.
//!
//! Every phase is bounded in time; a run never waits forever.
//!
//! # Layout
//! - [`plan`]: seeded workloads and the reference matcher.
//! - [`wire`]: reading server frames without building value trees.
//! - [`stats`]: counters, histograms, /proc readings.
//! - [`client`]: one simulated client.

pub mod client;
pub mod plan;
pub mod stats;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use client::{ClientReport, ClientSpec, Shared};
use plan::{AlertSub, Zipf};
use stats::{Counters, Latency, Proc, ProcSample};

/// The workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Market fan-out: non-durable ticks, 10 of 500 symbols per user (Zipf).
    W1,
    /// Alerts: multi-dimensional filters with confidence bounds, durable.
    W2,
    /// Idle authenticated connections: memory per connection.
    W3,
    /// Reconnect storm: every client drops and resumes; time and loss.
    W4,
}

/// Settings of one run (flags of `switchyard-loadgen`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "switchyard-loadgen",
    about = "Switchyard load generator (see docs/BENCHMARKS.md)"
)]
pub struct LoadConfig {
    /// Which workload.
    #[arg(long, value_enum, default_value = "w1")]
    pub scenario: Scenario,
    /// Edge WebSocket addresses (host:port), comma separated; clients are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:18080")]
    pub edge: Vec<SocketAddr>,
    /// NATS URL the producer publishes to.
    #[arg(long, default_value = "nats://127.0.0.1:14222")]
    pub nats_url: String,
    /// Subject prefix.
    #[arg(long, default_value = "sy")]
    pub prefix: String,
    /// HS256 secret the edge verifies tokens with (default: the edge's dev secret).
    #[arg(long, default_value = switchyard_edge::config::DEV_JWT_SECRET)]
    pub secret: String,
    /// Users, one connection each.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// First user index (several load generators side by side use disjoint ranges).
    #[arg(long, default_value_t = 0)]
    pub user_offset: usize,
    /// Connections that share one user id (w3 only): separates what an edge
    /// holds per connection from what it holds per user.
    #[arg(long, default_value_t = 1)]
    pub conns_per_user: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1 ..= 127.0.0.N).
    #[arg(long, default_value_t = 16)]
    pub sources: u8,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 512)]
    pub connect_concurrency: usize,
    /// Events per second the producer publishes (w1, w2, w4).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of publishing before the measurement window.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_s: f64,
    /// Seconds of the measurement window (w1, w2), or of holding (w3).
    #[arg(long, default_value_t = 20.0)]
    pub duration_s: f64,
    /// Longest wait, after the producer stops, for the last deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain_s: f64,
    /// Longest wait for all clients to connect and subscribe.
    #[arg(long, default_value_t = 300.0)]
    pub connect_timeout_s: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Clients offer permessage-deflate (RFC 7692) and inflate what comes
    /// compressed (a raw client of the harness instead of tungstenite).
    #[arg(long, default_value_t = false)]
    pub deflate: bool,
    /// Symbols in the universe (w1, w2).
    #[arg(long, default_value_t = 500)]
    pub symbols: usize,
    /// Symbols per user (w1).
    #[arg(long, default_value_t = 10)]
    pub symbols_per_user: usize,
    /// Zipf exponent for symbols (w1, w2).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Alert subscriptions per user (w2).
    #[arg(long, default_value_t = 5)]
    pub subs_per_user: usize,
    /// w1: subscribe with this `throttle_ms` and give every tick its symbol
    /// as `key` (throttling acts on keyed events only).
    #[arg(long)]
    pub throttle_ms: Option<u32>,
    /// w1: give every tick its symbol as `key` (without `--throttle-ms`: the
    /// keyed, unthrottled reference).
    #[arg(long)]
    pub keyed: bool,
    /// Groups in the storm workload: each event goes to one group of users (w4).
    #[arg(long, default_value_t = 100)]
    pub groups: usize,
    /// Seconds of steady traffic before the storm (w4).
    #[arg(long, default_value_t = 5.0)]
    pub storm_after_s: f64,
    /// Longest wait for every client to be back after the storm (w4).
    #[arg(long, default_value_t = 120.0)]
    pub storm_timeout_s: f64,
    /// Seconds of traffic after every client is back (w4).
    #[arg(long, default_value_t = 3.0)]
    pub storm_tail_s: f64,
    /// The storm's moment as unix milliseconds (w4), instead of
    /// `--storm-after-s`: load generators side by side drop together.
    #[arg(long)]
    pub storm_at_ms: Option<u64>,
    /// Percent of clients that stay connected through the storm (w4): the
    /// bystanders, whose live latency during the storm is reported apart.
    #[arg(long, default_value_t = 0)]
    pub storm_bystanders_pct: u8,
    /// nats-server's monitoring address (w4): JetStream API requests and
    /// messages in during the storm, from `/jsz` and `/varz`.
    #[arg(long)]
    pub nats_monitor: Option<SocketAddr>,
    /// The edges' admin addresses (w4): their log reads during the storm.
    #[arg(long = "edge-admin", value_delimiter = ',')]
    pub edge_admin: Vec<SocketAddr>,
    /// Processes to watch, `name=pid` (CPU seconds and RSS are reported per name).
    #[arg(long = "watch", value_delimiter = ',')]
    pub watch: Vec<String>,
    /// Print a progress line every second (to stderr).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub progress: bool,
}

impl LoadConfig {
    fn procs(&self) -> Result<Vec<Proc>> {
        self.watch
            .iter()
            .map(|w| {
                let (name, pid) = w.split_once('=').context("--watch takes name=pid")?;
                Ok(Proc {
                    name: name.to_string(),
                    pid: pid.parse().context("--watch pid")?,
                })
            })
            .collect()
    }
}

/// Users each event reaches, by the reference rule.
enum Targets {
    /// Symbol rank → users subscribed to it.
    Ticks(Vec<Vec<u32>>),
    /// Symbol rank → (user, subscription) pairs naming it, and every user's subscriptions.
    Alerts(Vec<Vec<(u32, u16)>>, Vec<Vec<AlertSub>>),
    /// Users by group, and the groups' name prefix (disjoint per load generator).
    Groups(Vec<Vec<u32>>, String),
    /// No events.
    None,
}

fn subscribe_frames(cfg: &LoadConfig, zipf: &Zipf) -> (Vec<Vec<Value>>, Targets) {
    let n = cfg.users;
    match cfg.scenario {
        Scenario::W1 => {
            let mut by_symbol = vec![Vec::new(); cfg.symbols];
            let frames = (0..n)
                .map(|u| {
                    let syms = plan::tick_symbols(cfg.seed, u, cfg.symbols_per_user, zipf);
                    for &s in &syms {
                        by_symbol[s].push(u as u32);
                    }
                    let names: Vec<String> = syms.iter().map(|&s| plan::symbol(s)).collect();
                    let mut f = json!({"op":"subscribe","sub":"ticks","type":"tick","filters":{"symbol": names}});
                    if let Some(t) = cfg.throttle_ms {
                        f["throttle_ms"] = json!(t);
                    }
                    vec![f]
                })
                .collect();
            (frames, Targets::Ticks(by_symbol))
        }
        Scenario::W2 => {
            let mut by_symbol = vec![Vec::new(); cfg.symbols];
            let mut all = Vec::with_capacity(n);
            let frames = (0..n)
                .map(|u| {
                    let subs = plan::alert_subs(cfg.seed, u, cfg.subs_per_user, zipf);
                    let frames = subs
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            for &sym in &s.symbols {
                                by_symbol[sym].push((u as u32, i as u16));
                            }
                            s.frame(&format!("a{i}"))
                        })
                        .collect();
                    all.push(subs);
                    frames
                })
                .collect();
            (frames, Targets::Alerts(by_symbol, all))
        }
        Scenario::W3 => (vec![Vec::new(); n], Targets::None),
        Scenario::W4 => {
            let g = cfg.groups.max(1);
            let mut groups = vec![Vec::new(); g];
            // Load generators side by side have disjoint users: their groups
            // are disjoint too, so each one's producer reaches only its own.
            let prefix = format!("g{}-", cfg.user_offset);
            let frames = (0..n)
                .map(|u| {
                    groups[u % g].push(u as u32);
                    vec![json!({"op":"subscribe","sub":"storm","type":"storm","filters":{"group":[format!("{prefix}{}", u % g)]}})]
                })
                .collect();
            (frames, Targets::Groups(groups, prefix))
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn w_str(out: &mut Vec<u8>, s: &str) {
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

/// Publishes events at a fixed rate until `end` (or `stop`), counting for
/// each the deliveries the reference rule expects.
struct Producer {
    client: async_nats::Client,
    subject: String,
    scenario: Scenario,
    seed: u64,
    zipf: Zipf,
    targets: Targets,
    expected: Arc<Vec<AtomicU64>>,
    shared: Arc<Shared>,
    rate: f64,
    /// w1 ticks carry their symbol as `key`.
    keyed: bool,
}

impl Producer {
    fn event(&self, seq: u64, buf: &mut Vec<u8>, users: &mut Vec<u32>) {
        buf.clear();
        users.clear();
        let t = now_us();
        let keyed = self.keyed && matches!(self.targets, Targets::Ticks(_));
        let _ = rmp::encode::write_map_len(buf, 3 + u32::from(keyed));
        w_str(buf, "data");
        match (&self.targets, self.scenario) {
            (Targets::Ticks(by_symbol), _) => {
                let s = plan::tick_symbol(self.seed, seq, &self.zipf);
                let sym = plan::symbol(s);
                users.extend_from_slice(&by_symbol[s]);
                let _ = rmp::encode::write_map_len(buf, 4);
                w_str(buf, "seq");
                let _ = rmp::encode::write_uint(buf, seq);
                w_str(buf, "t");
                let _ = rmp::encode::write_uint(buf, t);
                w_str(buf, "sym");
                w_str(buf, &sym);
                w_str(buf, "px");
                let _ = rmp::encode::write_f64(buf, 100.0 + (seq % 1000) as f64 / 100.0);
                w_str(buf, "target");
                let _ = rmp::encode::write_map_len(buf, 1);
                w_str(buf, "match");
                let _ = rmp::encode::write_map_len(buf, 1);
                w_str(buf, "symbol");
                w_str(buf, &sym);
                w_str(buf, "durable");
                let _ = rmp::encode::write_bool(buf, false);
                if keyed {
                    w_str(buf, "key");
                    w_str(buf, &sym);
                }
            }
            (Targets::Alerts(by_symbol, subs), _) => {
                let e = plan::alert_event(self.seed, seq, &self.zipf);
                for &(u, i) in &by_symbol[e.symbol] {
                    if users.last() != Some(&u) && subs[u as usize][i as usize].matches(&e) {
                        users.push(u);
                    }
                }
                users.dedup();
                let sym = plan::symbol(e.symbol);
                let pattern = format!("P{}", e.pattern);
                let tier = plan::TIERS[e.tier];
                let _ = rmp::encode::write_map_len(buf, 6);
                w_str(buf, "seq");
                let _ = rmp::encode::write_uint(buf, seq);
                w_str(buf, "t");
                let _ = rmp::encode::write_uint(buf, t);
                w_str(buf, "sym");
                w_str(buf, &sym);
                w_str(buf, "pattern");
                w_str(buf, &pattern);
                w_str(buf, "tier");
                w_str(buf, tier);
                w_str(buf, "confidence");
                let _ = rmp::encode::write_f64(buf, e.confidence);
                w_str(buf, "target");
                let _ = rmp::encode::write_map_len(buf, 2);
                w_str(buf, "match");
                let _ = rmp::encode::write_map_len(buf, 3);
                w_str(buf, "symbol");
                w_str(buf, &sym);
                w_str(buf, "pattern_type");
                w_str(buf, &pattern);
                w_str(buf, "tier");
                w_str(buf, tier);
                w_str(buf, "values");
                let _ = rmp::encode::write_map_len(buf, 1);
                w_str(buf, "confidence");
                let _ = rmp::encode::write_f64(buf, e.confidence);
                w_str(buf, "durable");
                let _ = rmp::encode::write_bool(buf, true);
            }
            (Targets::Groups(groups, prefix), _) => {
                let g = (seq % groups.len() as u64) as usize;
                users.extend_from_slice(&groups[g]);
                let _ = rmp::encode::write_map_len(buf, 2);
                w_str(buf, "seq");
                let _ = rmp::encode::write_uint(buf, seq);
                w_str(buf, "t");
                let _ = rmp::encode::write_uint(buf, t);
                w_str(buf, "target");
                let _ = rmp::encode::write_map_len(buf, 1);
                w_str(buf, "match");
                let _ = rmp::encode::write_map_len(buf, 1);
                w_str(buf, "group");
                w_str(buf, &format!("{prefix}{g}"));
                w_str(buf, "durable");
                let _ = rmp::encode::write_bool(buf, true);
            }
            (Targets::None, _) => {}
        }
    }

    /// Publishes until `stop`; returns how many events went out.
    async fn run(self, stop: CancellationToken) -> Result<u64> {
        let start = tokio::time::Instant::now();
        let mut buf = Vec::with_capacity(256);
        let mut users = Vec::new();
        let mut seq = 0u64;
        let interval = Duration::from_secs_f64(1.0 / self.rate.max(0.001));
        loop {
            let due = start + interval.mul_f64(seq as f64);
            if due > tokio::time::Instant::now() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(due) => {}
                }
            } else if stop.is_cancelled() {
                break;
            }
            self.event(seq, &mut buf, &mut users);
            for &u in &users {
                self.expected[u as usize].fetch_add(1, Ordering::Relaxed);
            }
            self.shared
                .counters
                .expected
                .fetch_add(users.len() as u64, Ordering::Relaxed);
            self.client
                .publish(self.subject.clone(), bytes::Bytes::copy_from_slice(&buf))
                .await?;
            self.shared.counters.published.fetch_add(1, Ordering::Relaxed);
            seq += 1;
        }
        self.client.flush().await?;
        Ok(seq)
    }
}

fn sample_all(procs: &[Proc], ticks: f64) -> Vec<Option<ProcSample>> {
    procs.iter().map(|p| p.sample(ticks)).collect()
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn hist_json(h: &hdrhistogram::Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": round(h.mean(), 1),
    })
}

/// CPU seconds per watched process between two samplings, and their sum.
fn cpu_delta(procs: &[Proc], a: &[Option<ProcSample>], b: &[Option<ProcSample>]) -> (Value, f64) {
    let mut m = serde_json::Map::new();
    let mut total = 0.0;
    for (i, p) in procs.iter().enumerate() {
        if let (Some(x), Some(y)) = (a[i], b[i]) {
            let d = y.cpu_s - x.cpu_s;
            total += d;
            let e = m.entry(p.name.clone()).or_insert(json!(0.0));
            *e = json!(round(e.as_f64().unwrap_or(0.0) + d, 3));
        }
    }
    (Value::Object(m), total)
}

fn rss_json(procs: &[Proc], s: &[Option<ProcSample>]) -> Value {
    let mut m = serde_json::Map::new();
    for (i, p) in procs.iter().enumerate() {
        if let Some(x) = s[i] {
            let e = m.entry(p.name.clone()).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + x.rss_kib);
        }
    }
    Value::Object(m)
}

/// Waits until `cond` or `timeout`, checking every 50 ms; whether `cond` held.
async fn wait_until(timeout: Duration, stop: &CancellationToken, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline || stop.is_cancelled() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one load test and returns its JSON summary. `lost`, `duplicated`
/// and `out_of_order` in it are exact; the caller decides what is a failure.
pub async fn run(cfg: LoadConfig) -> Result<Value> {
    if cfg.edge.is_empty() || cfg.users == 0 {
        bail!("need at least one edge and one user");
    }
    let procs = cfg.procs()?;
    let ticks = stats::clock_ticks();
    let load_start = stats::load_average();
    let zipf = Zipf::new(cfg.symbols.max(1), cfg.zipf);
    let (frames, targets) = subscribe_frames(&cfg, &zipf);
    let (storm_tx, storm_rx) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        latency: Latency::default(),
        bystander_latency: Latency::default(),
        connect_slots: Semaphore::new(cfg.connect_concurrency.max(1)),
        storm: storm_rx,
        resumed: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });
    let expected: Arc<Vec<AtomicU64>> = Arc::new((0..cfg.users).map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();
    let before = sample_all(&procs, ticks);
    let self_before = stats::sample_pid("self", ticks);

    let reporter = tokio::spawn(progress(shared.clone(), procs.clone(), ticks, cfg.progress, cfg.users));

    let mut tasks = tokio::task::JoinSet::new();
    let ttl = 24 * 3600;
    if cfg.conns_per_user > 1 && cfg.scenario != Scenario::W3 {
        bail!("--conns-per-user is for w3 only");
    }
    let per_user = cfg.conns_per_user.max(1);
    let mut bystanders = 0u64;
    for (u, subscribe) in frames.into_iter().enumerate() {
        let bystander = cfg.scenario == Scenario::W4 && (u % 100) < usize::from(cfg.storm_bystanders_pct);
        bystanders += u64::from(bystander);
        let spec = ClientSpec {
            user: u,
            bystander,
            edge: cfg.edge[(cfg.user_offset + u) % cfg.edge.len()],
            source: Ipv4Addr::new(
                127,
                0,
                0,
                1 + ((cfg.user_offset + u) % cfg.sources.max(1) as usize) as u8,
            ),
            token: crate::tokens::token(
                &cfg.secret,
                &format!("lg{}", cfg.user_offset + u / per_user),
                ttl,
                json!({}),
            ),
            subscribe,
            deflate: cfg.deflate,
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            let r = client::run(spec, shared.clone()).await;
            if r.error.is_some() {
                shared.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            r
        });
    }
    let c = &shared.counters;
    let all_in = wait_until(Duration::from_secs_f64(cfg.connect_timeout_s), &shared.stop, || {
        Counters::get(&c.connected) + Counters::get(&c.failed) >= cfg.users as u64
    })
    .await;
    let connect_s = started.elapsed().as_secs_f64();
    let connected = Counters::get(&c.connected);
    if !all_in || connected < cfg.users as u64 {
        tracing::warn!(connected, users = cfg.users, "not every client connected");
    }
    let mut summary = json!({
        "scenario": format!("{:?}", cfg.scenario).to_lowercase(),
        "users": cfg.users,
        "edges": cfg.edge.len(),
        "connected": connected,
        "connect_seconds": round(connect_s, 2),
        "load_average_start": load_start,
        "deflate": cfg.deflate,
    });

    let mut producer = match cfg.scenario {
        Scenario::W3 => None,
        s => Some(Producer {
            client: async_nats::connect(cfg.nats_url.as_str())
                .await
                .context("producer cannot reach NATS")?,
            subject: format!(
                "{}.events.{}",
                cfg.prefix,
                match s {
                    Scenario::W1 => "tick",
                    Scenario::W2 => "alert",
                    _ => "storm",
                }
            ),
            scenario: s,
            seed: cfg.seed,
            zipf: zipf.clone(),
            targets,
            expected: expected.clone(),
            shared: shared.clone(),
            rate: cfg.rate,
            keyed: cfg.keyed || cfg.throttle_ms.is_some(),
        }),
    };
    let stop_producer = CancellationToken::new();
    let mut window = json!(null);
    match cfg.scenario {
        Scenario::W3 => {
            // Let allocators and lazily grown buffers settle before reading memory.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let held = sample_all(&procs, ticks);
            tokio::time::sleep(Duration::from_secs_f64(cfg.duration_s)).await;
            let after = sample_all(&procs, ticks);
            let mut per_conn = serde_json::Map::new();
            for (i, p) in procs.iter().enumerate() {
                if let (Some(b), Some(h)) = (before[i], held[i]) {
                    let e = per_conn.entry(p.name.clone()).or_insert(json!(0.0));
                    let bytes = h.rss_kib.saturating_sub(b.rss_kib) as f64 * 1024.0;
                    *e = json!(e.as_f64().unwrap_or(0.0) + bytes);
                }
            }
            for v in per_conn.values_mut() {
                *v = json!((v.as_f64().unwrap_or(0.0) / connected.max(1) as f64).round());
            }
            let (cpu_idle, _) = cpu_delta(&procs, &held, &after);
            summary["rss_kib_before"] = rss_json(&procs, &before);
            summary["rss_kib_connected"] = rss_json(&procs, &held);
            summary["rss_bytes_per_connection"] = Value::Object(per_conn);
            summary["idle_cpu_seconds"] = cpu_idle;
            summary["idle_seconds"] = json!(cfg.duration_s);
        }
        Scenario::W1 | Scenario::W2 => {
            let start_us = now_us() + (cfg.warmup_s * 1e6) as u64;
            let end_us = start_us + (cfg.duration_s * 1e6) as u64;
            shared.latency.set_window(start_us, end_us);
            let producer = producer.take().context("producer")?;
            let ptask = tokio::spawn(producer.run(stop_producer.clone()));
            tokio::time::sleep(Duration::from_secs_f64(cfg.warmup_s)).await;
            let (b0, z0) = (Counters::get(&c.wire_bytes), Counters::get(&c.compressed_frames));
            let (r0, f0, t0, s0) = (
                Counters::get(&c.received),
                Counters::get(&c.event_frames),
                Instant::now(),
                sample_all(&procs, ticks),
            );
            tokio::time::sleep(Duration::from_secs_f64(cfg.duration_s)).await;
            let (b1, z1) = (Counters::get(&c.wire_bytes), Counters::get(&c.compressed_frames));
            let (r1, f1, t1, s1) = (
                Counters::get(&c.received),
                Counters::get(&c.event_frames),
                Instant::now(),
                sample_all(&procs, ticks),
            );
            stop_producer.cancel();
            ptask.await??;
            let secs = (t1 - t0).as_secs_f64();
            let deliveries = r1 - r0;
            let (cpu, _) = cpu_delta(&procs, &s0, &s1);
            let server_total: f64 = procs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.name != "loadgen")
                .filter_map(|(i, _)| Some(s1[i]?.cpu_s - s0[i]?.cpu_s))
                .sum();
            window = json!({
                "seconds": round(secs, 3),
                "deliveries": deliveries,
                "deliveries_per_s": (deliveries as f64 / secs).round(),
                "deliveries_per_frame": round(deliveries as f64 / (f1 - f0).max(1) as f64, 2),
                "wire_bytes": b1 - b0,
                "wire_bytes_per_delivery": round((b1 - b0) as f64 / deliveries.max(1) as f64, 1),
                "compressed_frames": z1 - z0,
                "events_per_s": cfg.rate,
                "cpu_seconds": cpu,
                "server_cpu_seconds": round(server_total, 3),
                "server_cpu_us_per_delivery": if deliveries > 0 { json!(round(server_total * 1e6 / deliveries as f64, 3)) } else { json!(null) },
                "server_cpu_cores": round(server_total / secs, 3),
                "load_average": stats::load_average(),
            });
        }
        Scenario::W4 => {
            // Latency over the whole run: replayed events show how late a storm makes them.
            shared.latency.set_window(now_us(), u64::MAX);
            let producer = producer.take().context("producer")?;
            let ptask = tokio::spawn(producer.run(stop_producer.clone()));
            match cfg.storm_at_ms {
                Some(at) => {
                    let wait = at.saturating_sub(now_us() / 1000);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                None => tokio::time::sleep(Duration::from_secs_f64(cfg.storm_after_s)).await,
            }
            let m0 = monitor_sample(&cfg).await;
            let s0 = sample_all(&procs, ticks);
            let t0 = Instant::now();
            let t0_us = now_us();
            shared.bystander_latency.set_window(t0_us, u64::MAX);
            storm_tx.send_replace(1);
            // Who must come back: every client that was connected and drops.
            let dropping = connected.saturating_sub(bystanders);
            let deadline = t0 + Duration::from_secs_f64(cfg.storm_timeout_s);
            let mut timeline = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let back = loop {
                tick.tick().await;
                let n = shared.resumed.load(Ordering::Relaxed);
                timeline.push(json!([round(t0.elapsed().as_secs_f64(), 2), n]));
                if n + Counters::get(&c.failed) >= dropping {
                    break true;
                }
                if Instant::now() >= deadline || shared.stop.is_cancelled() {
                    break false;
                }
            };
            let storm_s = t0.elapsed().as_secs_f64();
            shared.bystander_latency.set_window(t0_us, now_us());
            let s1 = sample_all(&procs, ticks);
            let m1 = monitor_sample(&cfg).await;
            let (cpu, _) = cpu_delta(&procs, &s0, &s1);
            tokio::time::sleep(Duration::from_secs_f64(cfg.storm_tail_s)).await;
            stop_producer.cancel();
            ptask.await??;
            let resumed = shared.resumed.load(Ordering::Relaxed);
            let per_resume = |d: f64| {
                if resumed > 0 {
                    json!(round(d / resumed as f64, 2))
                } else {
                    json!(null)
                }
            };
            let requests = match (m0, m1) {
                (Some(m0), Some(m1)) => {
                    let d = |i: usize| m1[i] - m0[i];
                    json!({
                        "js_api": d(0),
                        "nats_in_msgs": d(1),
                        "edge_direct_gets": d(2),
                        "edge_stream_infos": d(3),
                        "edge_subject_counts": d(4),
                        "js_api_per_resume": per_resume(d(0)),
                        "edge_log_requests_per_resume": per_resume(d(2) + d(3) + d(4)),
                        "nats_in_msgs_per_resume": per_resume(d(1)),
                    })
                }
                _ => json!(null),
            };
            summary["storm"] = json!({
                "all_back": back,
                "dropped": dropping,
                "bystanders": bystanders,
                "resumed": resumed,
                "seconds_until_all_back": round(storm_s, 3),
                "resumes_per_s": round(resumed as f64 / storm_s.max(1e-3), 1),
                "resumed_over_time": timeline,
                "requests": requests,
                "bystander_latency_us": hist_json(&shared.bystander_latency.window_histogram()),
                "cpu_seconds": cpu,
                "rss_kib_before": rss_json(&procs, &s0),
                "rss_kib_after": rss_json(&procs, &s1),
                "load_average": stats::load_average(),
            });
        }
    }
    if cfg.scenario != Scenario::W3 {
        // The last deliveries: wait until every expected one is in, or the drain bound.
        let expected_total = Counters::get(&c.expected);
        wait_until(Duration::from_secs_f64(cfg.drain_s), &shared.stop, || {
            Counters::get(&c.unique) >= expected_total
        })
        .await;
    }
    shared.stop.cancel();
    let mut reports: Vec<ClientReport> = Vec::with_capacity(cfg.users);
    let collect_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(r)) = tokio::time::timeout_at(collect_deadline, tasks.join_next()).await {
        match r {
            Ok(r) => reports.push(r),
            Err(e) => tracing::warn!(error = %e, "client task failed"),
        }
    }
    tasks.abort_all();
    reporter.abort();
    let after = sample_all(&procs, ticks);
    let self_after = stats::sample_pid("self", ticks);

    let (mut lost, mut extra, mut dup, mut ooo, mut unique, mut with_loss) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    let mut not_recovered = 0;
    // A client that did not report in time received nothing we can count.
    let mut reported = vec![false; cfg.users];
    for r in &reports {
        reported[r.user] = true;
    }
    for (u, done) in reported.iter().enumerate() {
        if !done {
            lost += expected[u].load(Ordering::Relaxed);
            with_loss += 1;
        }
    }
    for r in &reports {
        let exp = expected[r.user].load(Ordering::Relaxed);
        unique += r.seen.unique;
        dup += r.seen.duplicates;
        ooo += r.seen.out_of_order;
        if r.seen.unique < exp {
            lost += exp - r.seen.unique;
            with_loss += 1;
        } else {
            extra += r.seen.unique - exp;
        }
        if r.recovered == Some(false) {
            not_recovered += 1;
        }
        if let Some(e) = &r.error {
            if errors.len() < 5 {
                errors.push(format!("user {}: {e}", r.user));
            }
        }
    }
    let window_hist = shared.latency.window_histogram();
    summary["published"] = json!(Counters::get(&c.published));
    summary["expected"] = json!(Counters::get(&c.expected));
    summary["received"] = json!(Counters::get(&c.received));
    summary["unique"] = json!(unique);
    summary["lost"] = json!(lost);
    summary["unexpected"] = json!(extra);
    summary["duplicated"] = json!(dup);
    summary["out_of_order"] = json!(ooo);
    summary["clients_with_loss"] = json!(with_loss);
    summary["clients_failed"] = json!(Counters::get(&c.failed));
    summary["clients_reported"] = json!(reports.len());
    summary["connect_errors"] = json!(Counters::get(&c.connect_errors));
    summary["retries"] = json!(Counters::get(&c.retries));
    summary["dropped_rate_limited"] = json!(Counters::get(&c.dropped_rate_limited));
    summary["dropped_slow_consumer"] = json!(Counters::get(&c.dropped_slow_consumer));
    if cfg.scenario == Scenario::W4 {
        summary["resumed_not_recovered"] = json!(not_recovered);
    }
    summary["errors"] = json!(errors);
    summary["window"] = window;
    summary["latency_us"] = hist_json(&window_hist);
    summary["cpu_seconds_whole_run"] = cpu_delta(&procs, &before, &after).0;
    if let (Some(a), Some(b)) = (self_before, self_after) {
        summary["loadgen_cpu_seconds"] = json!(round(b.cpu_s - a.cpu_s, 3));
        summary["loadgen_rss_kib"] = json!(b.rss_kib);
    }
    summary["rss_kib_end"] = rss_json(&procs, &after);
    summary["seconds"] = json!(round(started.elapsed().as_secs_f64(), 2));
    summary["load_average_end"] = json!(stats::load_average());
    Ok(summary)
}

/// Counters read around the storm: JetStream API requests and messages in
/// (nats-server), direct gets, stream-info reads and subject counts (the edges').
/// `None` without `--nats-monitor`.
async fn monitor_sample(cfg: &LoadConfig) -> Option<[f64; 5]> {
    let mon = cfg.nats_monitor?;
    let get = |addr, path: &'static str| async move {
        let (_, body) = crate::fleet::http_get(addr, path).await.ok()?;
        Some(body)
    };
    let jsz: Value = serde_json::from_str(&get(mon, "/jsz").await?).ok()?;
    let varz: Value = serde_json::from_str(&get(mon, "/varz").await?).ok()?;
    let mut sample = [jsz["api"]["total"].as_f64()?, varz["in_msgs"].as_f64()?, 0.0, 0.0, 0.0];
    for &admin in &cfg.edge_admin {
        let Some(metrics) = get(admin, "/metrics").await else {
            continue;
        };
        for (i, kind) in [
            (2, "direct_get"),
            (2, "direct_get_broadcast"),
            (3, "stream_info"),
            (4, "subject_count"),
        ] {
            sample[i] += crate::fleet::metric(
                &metrics,
                &format!("switchyard_edge_log_requests_total{{kind=\"{kind}\"}}"),
            );
        }
    }
    Some(sample)
}

/// Prints one line a second: connections, publishing and delivery rates,
/// the last second's latency, CPU of the watched processes.
async fn progress(shared: Arc<Shared>, procs: Vec<Proc>, ticks: f64, print: bool, users: usize) {
    let started = Instant::now();
    let mut last = (0u64, 0u64, sample_all(&procs, ticks), Instant::now());
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    loop {
        every.tick().await;
        let c = &shared.counters;
        let (p, r) = (Counters::get(&c.published), Counters::get(&c.received));
        let s = sample_all(&procs, ticks);
        let dt = last.3.elapsed().as_secs_f64().max(1e-3);
        let h = shared.latency.take_interval();
        if print {
            let cpu: Vec<String> = procs
                .iter()
                .enumerate()
                .filter_map(|(i, proc_)| {
                    let (a, b) = (last.2[i]?, s[i]?);
                    Some(format!(
                        "{}={:.0}%/{}MiB",
                        proc_.name,
                        100.0 * (b.cpu_s - a.cpu_s) / dt,
                        b.rss_kib / 1024
                    ))
                })
                .collect();
            let lat = if h.is_empty() {
                String::from("-")
            } else {
                format!(
                    "p50={}us p99={}us max={}us",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.max()
                )
            };
            eprintln!(
                "[{:>5.1}s] conns={}/{} failed={} retries={} resumed={} pub={} ({:.0}/s) recv={} ({:.0}/s) exp={} dropped={} {lat} {} load={:.2}",
                started.elapsed().as_secs_f64(),
                Counters::get(&c.connected),
                users,
                Counters::get(&c.failed),
                Counters::get(&c.retries),
                shared.resumed.load(Ordering::Relaxed),
                p,
                (p - last.0) as f64 / dt,
                r,
                (r - last.1) as f64 / dt,
                Counters::get(&c.expected),
                Counters::get(&c.dropped_rate_limited) + Counters::get(&c.dropped_slow_consumer),
                cpu.join(" "),
                stats::load_average(),
            );
        }
        last = (p, r, s, Instant::now());
    }
}
