//! Subscriptions: what a client sends, the validated form, and the matching
//! rule of docs/PROTOCOL.md ("Matching").
//!
//! [`Subscription::matches`] is the reference semantics; every index the
//! router uses must return exactly what it returns.

use std::collections::BTreeMap;

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::ids;
use crate::value::as_number;

/// Most dimensions one subscription may filter on.
pub const MAX_FILTER_DIMENSIONS: usize = 32;
/// Most values one dimension may list.
pub const MAX_VALUES_PER_DIMENSION: usize = 1024;
/// Most filter values one subscription may list, its dimensions together
/// (docs/PROTOCOL.md, "Client ops", 1.1 limits): every value is interned
/// with its own posting set on every router, so a 64 KiB frame must not be
/// able to add ~20k of them.
pub const MAX_FILTER_VALUES: usize = 1024;
/// Most bound fields (`min` plus `max`) and most `fields` names.
pub const MAX_FIELDS: usize = 64;
/// The largest `throttle_ms` (one hour); the smallest is 1.
pub const MAX_THROTTLE_MS: u32 = 3_600_000;

/// A `subscribe` frame's fields, exactly as the client sent them.
/// The edge forwards this to the router, which validates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawSubscription {
    /// Subscription name.
    pub sub: Value,
    /// Subscription type.
    #[serde(rename = "type")]
    pub sub_type: Value,
    /// `{dimension: [values]}`.
    pub filters: Option<Value>,
    /// `{field: lower bound}`.
    pub min: Option<Value>,
    /// `{field: upper bound}`.
    pub max: Option<Value>,
    /// Top-level payload keys to keep.
    pub fields: Option<Value>,
    /// At most one event per (`type`, `key`) every this many ms (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_ms: Option<Value>,
    /// Also send the latest keyed event of each matching key (1.1); part of
    /// the request, not of the stored subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Value>,
}

impl RawSubscription {
    /// Whether the request asks for a snapshot (`snapshot` must be a boolean).
    pub fn wants_snapshot(&self) -> Result<bool, InvalidFilter> {
        match &self.snapshot {
            None | Some(Value::Nil) => Ok(false),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(_) => invalid("snapshot must be a boolean"),
        }
    }
}

/// A validated subscription, as stored, listed and matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// Name, unique per user.
    #[serde(rename = "sub")]
    pub name: String,
    /// The subscription type events target.
    #[serde(rename = "type")]
    pub sub_type: String,
    /// Per dimension, the accepted values (each list non-empty, sorted, deduplicated).
    pub filters: BTreeMap<String, Vec<String>>,
    /// Lower bounds, inclusive.
    pub min: BTreeMap<String, f64>,
    /// Upper bounds, inclusive.
    pub max: BTreeMap<String, f64>,
    /// Top-level payload keys to deliver; `None` delivers the whole payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// Per (`type`, `key`), at most one event every this many ms on each
    /// connection (docs/PROTOCOL.md, "Throttling"); `None` is unthrottled.
    /// Stored and listed only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_ms: Option<u32>,
}

/// Why a subscription (or a name in unsubscribe/join/leave) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFilter(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, InvalidFilter> {
    Err(InvalidFilter(msg.into()))
}

/// Reads a name field that must be a string passing `check`.
pub fn name_field<'a>(v: &'a Value, what: &str, check: fn(&str) -> bool) -> Result<&'a str, InvalidFilter> {
    match v.as_str() {
        Some(s) if check(s) => Ok(s),
        _ => invalid(format!("invalid {what}")),
    }
}

fn map_entries<'a>(v: &'a Option<Value>, what: &str) -> Result<&'a [(Value, Value)], InvalidFilter> {
    match v {
        None => Ok(&[]),
        Some(Value::Map(m)) => Ok(m),
        Some(_) => invalid(format!("{what} must be a map")),
    }
}

fn bounds(v: &Option<Value>, what: &str) -> Result<BTreeMap<String, f64>, InvalidFilter> {
    let mut out = BTreeMap::new();
    for (k, val) in map_entries(v, what)? {
        let field = name_field(k, &format!("{what} field name"), ids::is_valid_type_name)?;
        let n = match as_number(val) {
            Some(n) if n.is_finite() => n,
            _ => return invalid(format!("{what}.{field} must be a finite number")),
        };
        if out.insert(field.to_string(), n).is_some() {
            return invalid(format!("duplicate {what} field {field}"));
        }
    }
    Ok(out)
}

impl Subscription {
    /// Validates a client's subscription against the protocol's rules.
    pub fn from_raw(raw: &RawSubscription) -> Result<Subscription, InvalidFilter> {
        raw.wants_snapshot()?;
        let name = name_field(&raw.sub, "subscription name", ids::is_valid_sub_name)?.to_string();
        let sub_type = name_field(&raw.sub_type, "subscription type", ids::is_valid_type_name)?.to_string();
        let mut filters = BTreeMap::new();
        let dims = map_entries(&raw.filters, "filters")?;
        if dims.len() > MAX_FILTER_DIMENSIONS {
            return invalid(format!("at most {MAX_FILTER_DIMENSIONS} filter dimensions"));
        }
        let mut listed = 0usize;
        for (k, vals) in dims {
            let dim = name_field(k, "dimension name", ids::is_valid_type_name)?;
            let Value::Array(vals) = vals else {
                return invalid(format!("filters.{dim} must be an array of strings"));
            };
            // Counted as listed (before duplicates are removed): the bound
            // is on what a client may send.
            listed += vals.len();
            if listed > MAX_FILTER_VALUES {
                return invalid(format!(
                    "a subscription lists at most {MAX_FILTER_VALUES} filter values in all"
                ));
            }
            if vals.is_empty() || vals.len() > MAX_VALUES_PER_DIMENSION {
                return invalid(format!(
                    "filters.{dim} must list 1 to {MAX_VALUES_PER_DIMENSION} values"
                ));
            }
            let mut list = Vec::with_capacity(vals.len());
            for v in vals {
                match v.as_str() {
                    Some(s) if ids::is_valid_value(s) => list.push(s.to_string()),
                    _ => return invalid(format!("filters.{dim} values must be strings of at most 64 bytes")),
                }
            }
            list.sort_unstable();
            list.dedup();
            if filters.insert(dim.to_string(), list).is_some() {
                return invalid(format!("duplicate dimension {dim}"));
            }
        }
        let min = bounds(&raw.min, "min")?;
        let max = bounds(&raw.max, "max")?;
        if min.len() + max.len() > MAX_FIELDS {
            return invalid(format!("at most {MAX_FIELDS} bounds"));
        }
        let fields = match &raw.fields {
            None => None,
            Some(Value::Array(names)) if !names.is_empty() && names.len() <= MAX_FIELDS => {
                let mut out = Vec::with_capacity(names.len());
                for n in names {
                    out.push(name_field(n, "field name", ids::is_valid_type_name)?.to_string());
                }
                out.sort_unstable();
                out.dedup();
                Some(out)
            }
            Some(_) => return invalid(format!("fields must be an array of 1 to {MAX_FIELDS} names")),
        };
        let throttle_ms = match &raw.throttle_ms {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=u64::from(MAX_THROTTLE_MS)).contains(&n) => Some(n as u32),
                _ => return invalid(format!("throttle_ms must be an integer from 1 to {MAX_THROTTLE_MS}")),
            },
        };
        Ok(Subscription {
            name,
            sub_type,
            filters,
            min,
            max,
            fields,
            throttle_ms,
        })
    }

    /// The reference matching rule: every named dimension has one of its
    /// values in the event, and every bound holds on the event's values.
    pub fn matches(&self, event: &MatchQuery<'_>) -> bool {
        self.sub_type == event.sub_type
            && self.filters.iter().all(|(dim, accepted)| {
                event
                    .dimension(dim)
                    .is_some_and(|v| accepted.binary_search_by(|a| a.as_str().cmp(v)).is_ok())
            })
            && self.min.iter().all(|(f, lo)| event.value(f).is_some_and(|v| v >= *lo))
            && self.max.iter().all(|(f, hi)| event.value(f).is_some_and(|v| v <= *hi))
    }
}

/// What an event offers to subscriptions: its target type, dimensions and values.
#[derive(Debug, Clone, Copy)]
pub struct MatchQuery<'a> {
    /// The subscription type the event targets.
    pub sub_type: &'a str,
    /// `match` dimensions.
    pub dimensions: &'a [(String, String)],
    /// `values` fields.
    pub values: &'a [(String, f64)],
}

impl MatchQuery<'_> {
    /// The event's value for a dimension.
    pub fn dimension(&self, dim: &str) -> Option<&str> {
        self.dimensions.iter().find(|(d, _)| d == dim).map(|(_, v)| v.as_str())
    }

    /// The event's numeric value for a field.
    pub fn value(&self, field: &str) -> Option<f64> {
        self.values.iter().find(|(f, _)| f == field).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::json_to_value;
    use serde_json::json;

    fn raw(v: serde_json::Value) -> RawSubscription {
        let Value::Map(m) = json_to_value(&v) else { panic!() };
        let get = |k: &str| crate::value::get(&m, k).cloned();
        RawSubscription {
            sub: get("sub").unwrap_or(Value::Nil),
            sub_type: get("type").unwrap_or(Value::Nil),
            filters: get("filters"),
            min: get("min"),
            max: get("max"),
            fields: get("fields"),
            throttle_ms: get("throttle_ms"),
            snapshot: get("snapshot"),
        }
    }

    fn dims(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn protocol_example() {
        let s = Subscription::from_raw(&raw(json!({"sub":"s","type":"tier_patterns","filters":{"symbol":["AAPL","TSLA"],"tier":["daily"]},"min":{"confidence":0.6}}))).unwrap();
        let d = dims(&[("symbol", "AAPL"), ("tier", "daily"), ("pattern_type", "BreakoutBO")]);
        let q = |d: &[(String, String)], c: f64| {
            s.matches(&MatchQuery {
                sub_type: "tier_patterns",
                dimensions: d,
                values: &[("confidence".into(), c)],
            })
        };
        assert!(q(&d, 0.8));
        assert!(q(&d, 0.6));
        assert!(!q(&d, 0.5));
        assert!(!q(&dims(&[("symbol", "NVDA"), ("tier", "daily")]), 0.8));
        assert!(!q(&dims(&[("symbol", "AAPL")]), 0.8));
        assert!(!s.matches(&MatchQuery {
            sub_type: "tier_patterns",
            dimensions: &d,
            values: &[]
        }));
        assert!(!s.matches(&MatchQuery {
            sub_type: "other",
            dimensions: &d,
            values: &[("confidence".into(), 0.9)]
        }));
    }

    #[test]
    fn empty_filters_match_every_event_of_the_type() {
        let s = Subscription::from_raw(&raw(json!({"sub":"all","type":"tick"}))).unwrap();
        assert!(s.matches(&MatchQuery {
            sub_type: "tick",
            dimensions: &[],
            values: &[]
        }));
        assert!(!s.matches(&MatchQuery {
            sub_type: "alert",
            dimensions: &[],
            values: &[]
        }));
    }

    #[test]
    fn validation() {
        let bad = [
            json!({"sub":"a.b","type":"t"}),
            json!({"sub":"s","type":"T"}),
            json!({"sub":1,"type":"t"}),
            json!({"sub":"s","type":"t","filters":{"symbol":[]}}),
            json!({"sub":"s","type":"t","filters":{"symbol":[1]}}),
            json!({"sub":"s","type":"t","filters":{"symbol":"AAPL"}}),
            json!({"sub":"s","type":"t","filters":{"Bad":["x"]}}),
            json!({"sub":"s","type":"t","filters":{"s":["x".repeat(65)]}}),
            json!({"sub":"s","type":"t","min":{"c":"high"}}),
            json!({"sub":"s","type":"t","max":[1]}),
            json!({"sub":"s","type":"t","fields":[]}),
            json!({"sub":"s","type":"t","fields":["A"]}),
            json!({"sub":"s","type":"t","throttle_ms":0}),
            json!({"sub":"s","type":"t","snapshot":"yes"}),
            json!({"sub":"s","type":"t","snapshot":1}),
            json!({"sub":"s","type":"t","throttle_ms":-5}),
            json!({"sub":"s","type":"t","throttle_ms":3_600_001}),
            json!({"sub":"s","type":"t","throttle_ms":1.5}),
            json!({"sub":"s","type":"t","throttle_ms":"100"}),
        ];
        for b in bad {
            assert!(Subscription::from_raw(&raw(b.clone())).is_err(), "{b} accepted");
        }
        let ok = Subscription::from_raw(&raw(
            json!({"sub":"s","type":"t","filters":{"s":["b","a","a"]},"max":{"p":3},"fields":["x"]}),
        ))
        .unwrap();
        assert_eq!(ok.filters["s"], vec!["a", "b"]);
        assert_eq!(ok.max["p"], 3.0);
        assert_eq!(ok.fields, Some(vec!["x".to_string()]));
        assert_eq!(ok.throttle_ms, None);
        for n in [1u32, 250, MAX_THROTTLE_MS] {
            let t = Subscription::from_raw(&raw(json!({"sub":"s","type":"t","throttle_ms":n}))).unwrap();
            assert_eq!(t.throttle_ms, Some(n));
        }
    }

    #[test]
    fn at_most_1024_filter_values_in_all() {
        let values = |from: usize, n: usize| (from..from + n).map(|i| format!("v{i}")).collect::<Vec<_>>();
        let sub =
            |filters: serde_json::Value| Subscription::from_raw(&raw(json!({"sub":"s","type":"t","filters":filters})));
        assert!(sub(json!({"a": values(0, 1024)})).is_ok());
        assert!(sub(json!({"a": values(0, 512), "b": values(0, 512)})).is_ok());
        let err = sub(json!({"a": values(0, 1025)})).unwrap_err();
        assert!(err.0.contains("1024 filter values"), "{err}");
        assert!(sub(json!({"a": values(0, 600), "b": values(0, 425)})).is_err());
        let many: serde_json::Map<String, serde_json::Value> =
            (0..32).map(|d| (format!("d{d}"), json!(values(0, 33)))).collect();
        assert!(sub(serde_json::Value::Object(many)).is_err(), "32 x 33 = 1056 values");
        // Duplicates count as listed.
        assert!(sub(json!({"a": vec!["x"; 1025]})).is_err());
    }
}
