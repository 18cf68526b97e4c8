//! Orchestration, pure: which of a merchant's connectors a payment's authorization goes to
//! (docs/API.md, "Routing"), and the circuit breaker that takes a failing connector out of the
//! way for a while (docs/DESIGN.md, "Routing and failover"). No I/O and no clock of its own:
//! the caller gives the facts and the time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::risk::CardSignals;
use super::Currency;

/// At most this many rules per merchant.
pub const MAX_RULES: usize = 100;
/// At most this many connectors in one split or in the default list.
pub const MAX_TARGETS: usize = 20;

/// A merchant's routing: the first rule whose condition holds picks the connector; a payment
/// no rule takes goes by `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRules {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Connectors in the order to try them when no rule matches, and the fallbacks after a
    /// rule's own. Empty: every eligible connector of the merchant, oldest first.
    #[serde(default)]
    pub default: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub when: Condition,
    /// One connector…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    /// …or volume shared by weight (70/30): a payment's share is fixed by its id, so a retry of
    /// the same payment goes to the same connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<Weighted>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub connector: String,
    pub weight: u32,
}

/// Every field given must hold; an empty condition holds for every payment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Any of these currencies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Vec<String>>,
    /// Amount in minor units, `gte` inclusive and `lt` exclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_gte: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_lt: Option<i64>,
    /// Any of these card brands (`visa`, `mastercard`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_brand: Option<Vec<String>>,
    /// The card's BIN within `from..=to` (digits, compared on the shorter length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bin: Option<BinRange>,
    /// Any of these issuer countries (ISO 3166-1 alpha-2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_country: Option<Vec<String>>,
    /// Every one of these metadata keys with exactly this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinRange {
    pub from: String,
    pub to: String,
}

/// What routing reads of a payment.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub currency: Currency,
    pub amount: i64,
    pub card: Option<&'a CardSignals>,
    pub metadata: &'a super::record::Metadata,
    /// A stable hash of the payment's id: its place in a weighted split.
    pub key: u64,
}

/// Where an authorization goes: the connectors to try in order (the first is the choice, the
/// rest are fallbacks for a failure that provably reached no PSP), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub connectors: Vec<String>,
    /// The matching rule's name, or `default`.
    pub rule: String,
}

/// A rule set refused, with the field it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub param: String,
    pub message: String,
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        param: param.into(),
        message: message.into(),
    }
}

impl RoutingRules {
    /// Checks the rules against the merchant's connector ids.
    pub fn validate(&self, connectors: &[&str]) -> Result<(), Invalid> {
        if self.rules.len() > MAX_RULES {
            return Err(invalid("rules", format!("at most {MAX_RULES} rules")));
        }
        let known = |param: String, id: &str| {
            if connectors.contains(&id) {
                Ok(())
            } else {
                Err(invalid(param, format!("no connector {id:?} of this merchant")))
            }
        };
        if self.default.len() > MAX_TARGETS {
            return Err(invalid("default", format!("at most {MAX_TARGETS} connectors")));
        }
        for (i, c) in self.default.iter().enumerate() {
            known(format!("default[{i}]"), c)?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let p = |f: &str| format!("rules[{i}].{f}");
            if r.name.is_empty() || r.name.len() > 64 || r.name == "default" {
                return Err(invalid(p("name"), "1 to 64 characters, not \"default\""));
            }
            if !names.insert(r.name.as_str()) {
                return Err(invalid(p("name"), "rule names are unique"));
            }
            match (&r.connector, &r.split) {
                (Some(c), None) => known(p("connector"), c)?,
                (None, Some(split)) => {
                    if split.is_empty() || split.len() > MAX_TARGETS {
                        return Err(invalid(p("split"), format!("1 to {MAX_TARGETS} connectors")));
                    }
                    let mut total: u32 = 0;
                    for (j, w) in split.iter().enumerate() {
                        known(p(&format!("split[{j}].connector")), &w.connector)?;
                        if w.weight == 0 || w.weight > 10_000 {
                            return Err(invalid(p(&format!("split[{j}].weight")), "1 to 10000"));
                        }
                        total += w.weight;
                    }
                    if split
                        .iter()
                        .enumerate()
                        .any(|(j, w)| split[..j].iter().any(|x| x.connector == w.connector))
                    {
                        return Err(invalid(p("split"), "each connector once"));
                    }
                    debug_assert!(total > 0);
                }
                _ => return Err(invalid(p("connector"), "a rule names a connector or a split, not both")),
            }
            let w = &r.when;
            if let Some(cs) = &w.currency {
                if cs.is_empty() || cs.iter().any(|c| Currency::parse(c).is_none()) {
                    return Err(invalid(p("when.currency"), "ISO 4217 codes, upper case"));
                }
            }
            match (w.amount_gte, w.amount_lt) {
                (Some(a), _) if a < 0 => return Err(invalid(p("when.amount_gte"), "not negative")),
                (_, Some(b)) if b <= 0 => return Err(invalid(p("when.amount_lt"), "above zero")),
                (Some(a), Some(b)) if a >= b => {
                    return Err(invalid(p("when.amount_lt"), "above amount_gte"));
                }
                _ => {}
            }
            if let Some(b) = &w.bin {
                let digits = |s: &str| (1..=8).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit());
                if !digits(&b.from) || !digits(&b.to) || b.from.len() != b.to.len() || b.from > b.to {
                    return Err(invalid(
                        p("when.bin"),
                        "from and to: 1 to 8 digits, the same length, from ≤ to",
                    ));
                }
            }
            for (f, list) in [
                ("when.card_brand", &w.card_brand),
                ("when.card_country", &w.card_country),
            ] {
                if let Some(l) = list {
                    if l.is_empty() || l.len() > 100 || l.iter().any(|s| s.is_empty() || s.len() > 32) {
                        return Err(invalid(p(f), "1 to 100 values of 1 to 32 characters"));
                    }
                }
            }
            if let Some(m) = &w.metadata {
                if m.is_empty() || m.len() > 20 {
                    return Err(invalid(p("when.metadata"), "1 to 20 keys"));
                }
            }
        }
        Ok(())
    }

    /// The connectors to try for `facts`, among `eligible` (the merchant's enabled connectors
    /// that take the currency, oldest first). `None`: no eligible connector at all.
    pub fn route(&self, facts: &Facts<'_>, eligible: &[&str]) -> Option<Decision> {
        let mut order: Vec<String> = Vec::new();
        let push = |order: &mut Vec<String>, c: &str| {
            if eligible.contains(&c) && !order.iter().any(|x| x == c) {
                order.push(c.to_owned());
            }
        };
        let rule = self.rules.iter().find(|r| r.when.holds(facts));
        if let Some(r) = rule {
            if let Some(c) = &r.connector {
                push(&mut order, c);
            }
            if let Some(split) = &r.split {
                for c in pick(split, facts.key) {
                    push(&mut order, c);
                }
            }
        }
        if self.default.is_empty() {
            for c in eligible {
                push(&mut order, c);
            }
        } else {
            for c in &self.default {
                push(&mut order, c);
            }
        }
        if order.is_empty() {
            return None;
        }
        Some(Decision {
            connectors: order,
            rule: rule.map(|r| r.name.clone()).unwrap_or_else(|| "default".to_owned()),
        })
    }
}

/// A split's connectors, the one `key` falls on first, then the others in their order.
fn pick(split: &[Weighted], key: u64) -> Vec<&str> {
    let total: u64 = split.iter().map(|w| u64::from(w.weight)).sum();
    if total == 0 {
        return split.iter().map(|w| w.connector.as_str()).collect();
    }
    let mut at = key % total;
    let mut chosen = 0;
    for (i, w) in split.iter().enumerate() {
        if at < u64::from(w.weight) {
            chosen = i;
            break;
        }
        at -= u64::from(w.weight);
    }
    let mut out = vec![split[chosen].connector.as_str()];
    out.extend(
        split
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != chosen)
            .map(|(_, w)| w.connector.as_str()),
    );
    out
}

impl Condition {
    pub fn holds(&self, f: &Facts<'_>) -> bool {
        if let Some(cs) = &self.currency {
            if !cs.iter().any(|c| c == f.currency.code()) {
                return false;
            }
        }
        if self.amount_gte.is_some_and(|a| f.amount < a) || self.amount_lt.is_some_and(|b| f.amount >= b) {
            return false;
        }
        // A condition on the card does not hold for a payment whose card is unknown.
        if let Some(brands) = &self.card_brand {
            match f.card {
                Some(c) if brands.iter().any(|b| b.eq_ignore_ascii_case(&c.brand)) => {}
                _ => return false,
            }
        }
        if let Some(countries) = &self.card_country {
            match f.card {
                Some(c) if countries.iter().any(|b| b.eq_ignore_ascii_case(&c.country)) => {}
                _ => return false,
            }
        }
        if let Some(range) = &self.bin {
            let Some(card) = f.card else { return false };
            let n = range.from.len().min(card.bin.len());
            if n == 0 {
                return false;
            }
            let bin = &card.bin[..n];
            if bin < &range.from[..n] || bin > &range.to[..n] {
                return false;
            }
        }
        if let Some(m) = &self.metadata {
            if !m.iter().all(|(k, v)| f.metadata.get(k) == Some(v)) {
                return false;
            }
        }
        true
    }
}

/// When a connector's breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Opens after this many failed calls in a row…
    pub consecutive_failures: u32,
    /// …or when, over the last `window_ms` and with at least `min_calls` calls, this share of
    /// them failed (percent).
    pub error_rate_percent: u32,
    pub min_calls: u32,
    pub window_ms: u64,
    /// Open this long, then one probe call is let through (half-open): it closes the breaker
    /// if it succeeds and opens it again if it fails.
    pub cool_down_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            error_rate_percent: 50,
            min_calls: 20,
            window_ms: 10_000,
            cool_down_ms: 5_000,
        }
    }
}

impl BreakerConfig {
    /// A breaker that never opens.
    pub fn never() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: u32::MAX,
            error_rate_percent: 101,
            ..BreakerConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is out since `since`; everything else is refused until it answers, or until
    /// a cool-down has passed without an answer (a probe whose call was dropped: another goes).
    HalfOpen {
        since: Instant,
    },
}

/// A circuit breaker: failures are calls that got no answer (a timeout, a connection refused,
/// an answer the PSP documents as "not processed"); a decline is an answer, not a failure.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive: u32,
    window_start: Instant,
    calls: u32,
    failures: u32,
    /// Times it opened, for `/metrics`.
    pub opened: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Breaker {
        Breaker {
            config,
            state: BreakerState::Closed,
            consecutive: 0,
            window_start: now,
            calls: 0,
            failures: 0,
            opened: 0,
        }
    }

    /// Whether a call may go now. An open breaker past its cool-down lets exactly one through.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { since: now };
                true
            }
            BreakerState::HalfOpen { since }
                if now.duration_since(since) >= Duration::from_millis(self.config.cool_down_ms) =>
            {
                self.state = BreakerState::HalfOpen { since: now };
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => false,
        }
    }

    /// A call's result: `true` when the PSP answered.
    pub fn record(&mut self, answered: bool, now: Instant) {
        if now.duration_since(self.window_start) > Duration::from_millis(self.config.window_ms) {
            self.window_start = now;
            self.calls = 0;
            self.failures = 0;
        }
        self.calls = self.calls.saturating_add(1);
        if answered {
            self.consecutive = 0;
            if matches!(self.state, BreakerState::HalfOpen { .. }) {
                self.state = BreakerState::Closed;
                self.calls = 0;
                self.failures = 0;
                self.window_start = now;
            }
            return;
        }
        self.failures = self.failures.saturating_add(1);
        self.consecutive = self.consecutive.saturating_add(1);
        let rate_tripped = self.calls >= self.config.min_calls
            && u64::from(self.failures) * 100 >= u64::from(self.config.error_rate_percent) * u64::from(self.calls);
        let trip = match self.state {
            BreakerState::HalfOpen { .. } => true,
            BreakerState::Closed => self.consecutive >= self.config.consecutive_failures || rate_tripped,
            BreakerState::Open { .. } => false,
        };
        if trip {
            self.state = BreakerState::Open {
                until: now + Duration::from_millis(self.config.cool_down_ms),
            };
            self.opened += 1;
            self.consecutive = 0;
            self.calls = 0;
            self.failures = 0;
            self.window_start = now;
        }
    }

    /// Whether a call now would be refused: open and cooling down, or half-open with its probe
    /// still out. Routing puts such a connector last.
    pub fn refuses(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => false,
            BreakerState::Open { until } => now < until,
            BreakerState::HalfOpen { since } => {
                now.duration_since(since) < Duration::from_millis(self.config.cool_down_ms)
            }
        }
    }

    /// `closed`, `open` or `half_open` at `now` (an open breaker past its cool-down reads as
    /// half-open: the next call is its probe).
    pub fn state(&self, now: Instant) -> &'static str {
        match self.state {
            BreakerState::Closed => "closed",
            BreakerState::Open { until } if now >= until => "half_open",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn card(brand: &str, bin: &str, country: &str) -> CardSignals {
        CardSignals {
            fingerprint: "fp".into(),
            bin: bin.into(),
            brand: brand.into(),
            country: country.into(),
            funding: "credit".into(),
            last4: "4242".into(),
        }
    }

    fn facts<'a>(
        amount: i64,
        cur: &str,
        card: Option<&'a CardSignals>,
        m: &'a crate::domain::record::Metadata,
    ) -> Facts<'a> {
        Facts {
            currency: Currency::parse(cur).unwrap(),
            amount,
            card,
            metadata: m,
            key: 7,
        }
    }

    fn rules(json: &str) -> RoutingRules {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_first_matching_rule_chooses_and_the_default_list_follows() {
        let r = rules(
            r#"{"rules":[
                {"name":"big-eur","when":{"currency":["EUR"],"amount_gte":100000},"connector":"mca_b"},
                {"name":"visa-gb","when":{"card_brand":["visa"],"card_country":["GB"]},"connector":"mca_c"},
                {"name":"bins","when":{"bin":{"from":"400000","to":"424242"}},"connector":"mca_b"},
                {"name":"vip","when":{"metadata":{"tier":"vip"}},"connector":"mca_c"}],
               "default":["mca_a","mca_b"]}"#,
        );
        let all = ["mca_a", "mca_b", "mca_c"];
        r.validate(&all).unwrap();
        let none = crate::domain::record::Metadata::default();
        let visa_gb = card("visa", "424242", "GB");
        let visa_us = card("visa", "411111", "US");
        let mc = card("mastercard", "555555", "US");
        let d = r.route(&facts(100_000, "EUR", None, &none), &all).unwrap();
        assert_eq!(
            (d.rule.as_str(), d.connectors.clone()),
            ("big-eur", vec!["mca_b".to_string(), "mca_a".into()])
        );
        // 99,999 is below the range: the next rules, then the default.
        let d = r.route(&facts(99_999, "EUR", Some(&visa_gb), &none), &all).unwrap();
        assert_eq!((d.rule.as_str(), d.connectors[0].as_str()), ("visa-gb", "mca_c"));
        assert_eq!(d.connectors, ["mca_c", "mca_a", "mca_b"]);
        let d = r.route(&facts(500, "USD", Some(&visa_us), &none), &all).unwrap();
        assert_eq!(d.rule, "bins");
        let d = r.route(&facts(500, "USD", Some(&mc), &none), &all).unwrap();
        assert_eq!(
            (d.rule.as_str(), d.connectors.clone()),
            ("default", vec!["mca_a".to_string(), "mca_b".into()])
        );
        let vip: crate::domain::record::Metadata = [("tier".to_string(), "vip".to_string())].into();
        assert_eq!(r.route(&facts(500, "USD", Some(&mc), &vip), &all).unwrap().rule, "vip");
        // A card rule never matches a payment whose card is unknown.
        assert_eq!(r.route(&facts(500, "USD", None, &none), &all).unwrap().rule, "default");
        // An ineligible choice (disabled, or not in this currency) leaves the fallbacks.
        let d = r.route(&facts(100_000, "EUR", None, &none), &["mca_a"]).unwrap();
        assert_eq!(d.connectors, ["mca_a"]);
        assert_eq!(r.route(&facts(1, "EUR", None, &none), &[]), None);
    }

    #[test]
    fn no_rules_and_no_default_take_every_eligible_connector_oldest_first() {
        let r = RoutingRules::default();
        let none = crate::domain::record::Metadata::default();
        let d = r.route(&facts(1, "USD", None, &none), &["mca_old", "mca_new"]).unwrap();
        assert_eq!(
            (d.rule.as_str(), d.connectors.clone()),
            ("default", vec!["mca_old".to_string(), "mca_new".into()])
        );
    }

    #[test]
    fn validation_names_the_field() {
        let all = ["mca_a", "mca_b"];
        let bad = [
            (r#"{"rules":[{"name":"x","connector":"mca_z"}]}"#, "rules[0].connector"),
            (r#"{"rules":[{"name":"x"}]}"#, "rules[0].connector"),
            (
                r#"{"rules":[{"name":"x","connector":"mca_a","split":[{"connector":"mca_b","weight":1}]}]}"#,
                "rules[0].connector",
            ),
            (
                r#"{"rules":[{"name":"x","split":[{"connector":"mca_a","weight":0}]}]}"#,
                "rules[0].split[0].weight",
            ),
            (
                r#"{"rules":[{"name":"x","split":[{"connector":"mca_a","weight":1},{"connector":"mca_a","weight":1}]}]}"#,
                "rules[0].split",
            ),
            (
                r#"{"rules":[{"name":"x","connector":"mca_a"},{"name":"x","connector":"mca_a"}]}"#,
                "rules[1].name",
            ),
            (r#"{"rules":[{"name":"default","connector":"mca_a"}]}"#, "rules[0].name"),
            (
                r#"{"rules":[{"name":"x","when":{"currency":["usd"]},"connector":"mca_a"}]}"#,
                "rules[0].when.currency",
            ),
            (
                r#"{"rules":[{"name":"x","when":{"amount_gte":10,"amount_lt":10},"connector":"mca_a"}]}"#,
                "rules[0].when.amount_lt",
            ),
            (
                r#"{"rules":[{"name":"x","when":{"bin":{"from":"5","to":"4"}},"connector":"mca_a"}]}"#,
                "rules[0].when.bin",
            ),
            (r#"{"default":["mca_a","mca_q"]}"#, "default[1]"),
        ];
        for (json, param) in bad {
            assert_eq!(rules(json).validate(&all).unwrap_err().param, param, "{json}");
        }
        assert!(serde_json::from_str::<RoutingRules>(r#"{"rules":[],"extra":1}"#).is_err());
    }

    proptest! {
        /// A 70/30 split sends each payment to one connector fixed by its key, in proportion.
        #[test]
        fn weighted_splits_follow_their_weights(w1 in 1u32..100, w2 in 1u32..100, start in 0u64..1_000_000) {
            let split = vec![
                Weighted { connector: "a".into(), weight: w1 },
                Weighted { connector: "b".into(), weight: w2 },
            ];
            let total = u64::from(w1 + w2);
            let mut to_a = 0u64;
            for key in start..start + total {
                let order = pick(&split, key);
                prop_assert_eq!(order.len(), 2);
                prop_assert_ne!(order[0], order[1]);
                prop_assert_eq!(pick(&split, key), order.clone());
                if order[0] == "a" { to_a += 1; }
            }
            // Over one whole cycle of keys the shares are exact.
            prop_assert_eq!(to_a, u64::from(w1));
        }

        /// Whatever the rules, a decision lists only eligible connectors, each once, and lists
        /// every default one that is eligible.
        #[test]
        fn decisions_hold_only_eligible_connectors_once(amount in 0i64..1_000_000, key in any::<u64>(),
                                                       eligible_mask in 0u8..8, default_mask in 0u8..8) {
            let names = ["mca_a", "mca_b", "mca_c"];
            let eligible: Vec<&str> = names.iter().enumerate().filter(|(i, _)| eligible_mask & (1 << i) != 0).map(|(_, n)| *n).collect();
            let default: Vec<String> = names.iter().enumerate().filter(|(i, _)| default_mask & (1 << i) != 0).map(|(_, n)| n.to_string()).collect();
            let r = RoutingRules {
                rules: vec![Rule { name: "s".into(), when: Condition { amount_gte: Some(500_000), ..Condition::default() }, connector: None,
                                   split: Some(vec![Weighted { connector: "mca_c".into(), weight: 3 }, Weighted { connector: "mca_a".into(), weight: 7 }]) }],
                default: default.clone(),
            };
            let none = crate::domain::record::Metadata::default();
            let f = Facts { currency: Currency::parse("USD").unwrap(), amount, card: None, metadata: &none, key };
            match r.route(&f, &eligible) {
                None => {
                    let rule_has = amount >= 500_000 && ["mca_a", "mca_c"].iter().any(|c| eligible.contains(c));
                    let default_has = if default.is_empty() { !eligible.is_empty() } else { default.iter().any(|d| eligible.contains(&d.as_str())) };
                    prop_assert!(!rule_has && !default_has);
                }
                Some(d) => {
                    for (i, c) in d.connectors.iter().enumerate() {
                        prop_assert!(eligible.contains(&c.as_str()));
                        prop_assert!(!d.connectors[..i].contains(c));
                    }
                    for c in &default {
                        if eligible.contains(&c.as_str()) { prop_assert!(d.connectors.contains(c)); }
                    }
                }
            }
        }
    }

    #[test]
    fn the_breaker_opens_on_consecutive_failures_and_probes_after_the_cool_down() {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            consecutive_failures: 3,
            error_rate_percent: 100,
            min_calls: 1_000,
            window_ms: 10_000,
            cool_down_ms: 1_000,
        };
        let mut b = Breaker::new(cfg, t0);
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.record(false, t0);
        }
        b.record(true, t0);
        // The run was broken by an answer: two more failures do not open it.
        b.record(false, t0);
        b.record(false, t0);
        assert_eq!(b.state(t0), "closed");
        b.record(false, t0);
        assert_eq!((b.state(t0), b.opened), ("open", 1));
        assert!(!b.allow(t0 + Duration::from_millis(999)));
        let t1 = t0 + Duration::from_millis(1_000);
        assert_eq!(b.state(t1), "half_open");
        assert!(b.allow(t1), "one probe");
        assert!(b.refuses(t1), "routing puts it last while its probe is out");
        assert!(!b.allow(t1), "only one");
        // A probe whose answer never comes (its call was dropped) does not hold the breaker
        // half-open for ever: after a cool-down another probe goes.
        let mut stuck = b.clone();
        assert!(!stuck.allow(t1 + Duration::from_millis(999)));
        assert!(stuck.allow(t1 + Duration::from_millis(1_000)));
        b.record(false, t1);
        assert_eq!((b.state(t1), b.opened), ("open", 2));
        let t2 = t1 + Duration::from_millis(1_000);
        assert!(b.allow(t2));
        b.record(true, t2);
        assert_eq!(b.state(t2), "closed");
        assert!(b.allow(t2) && b.allow(t2));
    }

    #[test]
    fn the_breaker_opens_on_the_error_rate_once_enough_calls_were_made() {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            consecutive_failures: 1_000,
            error_rate_percent: 50,
            min_calls: 10,
            window_ms: 1_000,
            cool_down_ms: 1_000,
        };
        let mut b = Breaker::new(cfg, t0);
        for i in 0..9 {
            b.record(i % 2 == 0, t0);
        }
        assert_eq!(b.state(t0), "closed", "below min_calls");
        b.record(false, t0);
        assert_eq!(b.state(t0), "open", "5 of 10 failed");
        // A new window forgets the old calls.
        let mut b = Breaker::new(cfg, t0);
        for _ in 0..9 {
            b.record(false, t0);
        }
        let later = t0 + Duration::from_millis(1_001);
        b.record(false, later);
        assert_eq!(b.state(later), "closed");
        assert!(BreakerConfig::never().consecutive_failures == u32::MAX);
    }
}
