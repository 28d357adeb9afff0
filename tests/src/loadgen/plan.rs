//! What a load run asks for: who subscribes to what, and what the producer
//! publishes. Everything is a pure function of a seed, so the producer can
//! compute the exact set of users each event must reach (the reference
//! rule of docs/PROTOCOL.md, applied here independently of the router).

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// Zipf over ranks 0..n (rank 0 most popular) with exponent `s`.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n` ranks.
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// A rank drawn from the distribution.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }

    /// `k` distinct ranks (k at most n).
    pub fn distinct(&self, rng: &mut Rng, k: usize) -> Vec<usize> {
        let k = k.min(self.cdf.len());
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            let r = self.sample(rng);
            if !out.contains(&r) {
                out.push(r);
            }
        }
        out.sort_unstable();
        out
    }
}

/// Symbol names: `S0`, `S1`, ... (rank order).
pub fn symbol(rank: usize) -> String {
    format!("S{rank}")
}

/// Pattern types of the alert workload.
pub const PATTERNS: usize = 20;
/// Tiers of the alert workload.
pub const TIERS: [&str; 3] = ["intraday", "daily", "weekly"];

/// One alert subscription (W2): values are indices; `None` is "any".
#[derive(Debug, Clone)]
pub struct AlertSub {
    /// Symbol ranks (always constrained).
    pub symbols: Vec<usize>,
    /// Pattern type indices, or any.
    pub patterns: Option<Vec<usize>>,
    /// Tier indices, or any.
    pub tiers: Option<Vec<usize>>,
    /// Lower bound on `confidence`.
    pub min_confidence: Option<f64>,
    /// Upper bound on `confidence`.
    pub max_confidence: Option<f64>,
}

impl AlertSub {
    /// Whether the reference rule matches this subscription to `e`.
    pub fn matches(&self, e: &AlertEvent) -> bool {
        self.symbols.contains(&e.symbol)
            && self.patterns.as_ref().is_none_or(|p| p.contains(&e.pattern))
            && self.tiers.as_ref().is_none_or(|t| t.contains(&e.tier))
            && self.min_confidence.is_none_or(|m| m <= e.confidence)
            && self.max_confidence.is_none_or(|m| e.confidence <= m)
    }

    /// The `subscribe` frame (as JSON) for subscription `name`.
    pub fn frame(&self, name: &str) -> serde_json::Value {
        let mut filters = serde_json::Map::new();
        filters.insert("symbol".into(), self.symbols.iter().map(|&s| symbol(s)).collect());
        if let Some(p) = &self.patterns {
            filters.insert("pattern_type".into(), p.iter().map(|&i| format!("P{i}")).collect());
        }
        if let Some(t) = &self.tiers {
            filters.insert("tier".into(), t.iter().map(|&i| TIERS[i]).collect());
        }
        let mut f = serde_json::json!({"op": "subscribe", "sub": name, "type": "alert", "filters": filters});
        if let Some(m) = self.min_confidence {
            f["min"] = serde_json::json!({ "confidence": m });
        }
        if let Some(m) = self.max_confidence {
            f["max"] = serde_json::json!({ "confidence": m });
        }
        f
    }
}

/// One alert event's matching attributes.
#[derive(Debug, Clone, Copy)]
pub struct AlertEvent {
    /// Symbol rank.
    pub symbol: usize,
    /// Pattern type index.
    pub pattern: usize,
    /// Tier index.
    pub tier: usize,
    /// Confidence in [0, 1), rounded to 3 decimals.
    pub confidence: f64,
}

/// Distinct values in 1..=max drawn uniformly from 0..n.
fn some_of(rng: &mut Rng, n: usize, max: usize) -> Vec<usize> {
    let k = 1 + rng.below(max);
    let mut v = Vec::with_capacity(k);
    while v.len() < k {
        let x = rng.below(n);
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v.sort_unstable();
    v
}

/// Rounds to 3 decimals, so the value survives any encoding exactly enough
/// for the bound check to agree with the router's.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The alert subscriptions of one user (W2): symbols 1–3 Zipf-drawn,
/// pattern types 1–2 of 20 on half, tiers 1–2 of 3 on half, a confidence
/// floor in [0.5, 0.9) on a third, and a ceiling on a tenth.
pub fn alert_subs(seed: u64, user: usize, count: usize, zipf: &Zipf) -> Vec<AlertSub> {
    let mut rng = Rng::new(seed ^ (user as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xa1);
    (0..count)
        .map(|_| {
            let n_sym = 1 + rng.below(3);
            let symbols = zipf.distinct(&mut rng, n_sym);
            let patterns = (rng.unit() < 0.5).then(|| some_of(&mut rng, PATTERNS, 2));
            let tiers = (rng.unit() < 0.5).then(|| some_of(&mut rng, TIERS.len(), 2));
            let min_confidence = (rng.unit() < 1.0 / 3.0).then(|| round3(0.5 + 0.4 * rng.unit()));
            let max_confidence = (rng.unit() < 0.1).then(|| round3(0.9 + 0.1 * rng.unit()));
            AlertSub {
                symbols,
                patterns,
                tiers,
                min_confidence,
                max_confidence,
            }
        })
        .collect()
}

/// The attributes of alert event `seq` (W2).
pub fn alert_event(seed: u64, seq: u64, zipf: &Zipf) -> AlertEvent {
    let mut rng = Rng::new(seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xe7);
    AlertEvent {
        symbol: zipf.sample(&mut rng),
        pattern: rng.below(PATTERNS),
        tier: rng.below(TIERS.len()),
        confidence: round3(rng.unit()),
    }
}

/// The symbols user `user` subscribes to in W1.
pub fn tick_symbols(seed: u64, user: usize, count: usize, zipf: &Zipf) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (user as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x71);
    zipf.distinct(&mut rng, count)
}

/// The symbol of tick `seq` in W1.
pub fn tick_symbol(seed: u64, seq: u64, zipf: &Zipf) -> usize {
    let mut rng = Rng::new(seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x7c);
    zipf.sample(&mut rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks_and_draws_distinct() {
        let z = Zipf::new(500, 1.0);
        let mut rng = Rng::new(1);
        let mut top = 0;
        for _ in 0..10_000 {
            if z.sample(&mut rng) == 0 {
                top += 1;
            }
        }
        // p(rank 0) = 1 / H(500) ≈ 0.147.
        assert!((1200..1800).contains(&top), "{top}");
        let d = z.distinct(&mut rng, 10);
        assert_eq!(d.len(), 10);
        assert!(d.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn alert_matching_follows_the_reference_rule() {
        let s = AlertSub {
            symbols: vec![1, 2],
            patterns: None,
            tiers: Some(vec![1]),
            min_confidence: Some(0.6),
            max_confidence: None,
        };
        let e = AlertEvent {
            symbol: 2,
            pattern: 7,
            tier: 1,
            confidence: 0.6,
        };
        assert!(s.matches(&e));
        assert!(!s.matches(&AlertEvent { confidence: 0.599, ..e }));
        assert!(!s.matches(&AlertEvent { tier: 0, ..e }));
        assert!(!s.matches(&AlertEvent { symbol: 3, ..e }));
    }
}
