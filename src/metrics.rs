//! Metrics for operators, rendered in Prometheus text format by `GET /metrics`. Counters and
//! fixed-bucket histograms on relaxed atomics: recording is a few atomic adds on hot paths.
//! Label values are bounded sets (route patterns, statuses, operations), never ids.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

/// Seconds: 100 µs to 10 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: SECONDS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = SECONDS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in SECONDS.iter().zip(&self.counts) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Every metric payrail keeps beyond the actor and ledger counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (route pattern, status)
    pub http: DashMap<(String, u16), Histogram>,
    /// (psp, operation)
    pub psp: DashMap<(&'static str, &'static str), Histogram>,
    /// (psp, error code)
    pub psp_errors: DashMap<(&'static str, &'static str), AtomicU64>,
    /// actor kind
    pub actor_handle: DashMap<&'static str, Histogram>,
    /// (provider, outcome)
    pub psp_events: DashMap<(String, &'static str), AtomicU64>,
    pub idempotency_replays: AtomicU64,
    /// (kind: in_use | reused)
    pub idempotency_conflicts: DashMap<&'static str, AtomicU64>,
    /// (from, to)
    pub transitions: DashMap<(&'static str, &'static str), AtomicU64>,
    pub ledger_commit: Histogram,
}

fn bump<K: std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>, key: K) {
    map.entry(key).or_default().fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn http(&self, route: &str, status: u16, d: Duration) {
        self.http.entry((route.to_owned(), status)).or_default().observe(d);
    }

    pub fn psp_call(&self, psp: &'static str, operation: &'static str, d: Duration) {
        self.psp.entry((psp, operation)).or_default().observe(d);
    }

    pub fn psp_error(&self, psp: &'static str, code: &'static str) {
        bump(&self.psp_errors, (psp, code));
    }

    pub fn handled(&self, actor: &'static str, d: Duration) {
        self.actor_handle.entry(actor).or_default().observe(d);
    }

    pub fn psp_event(&self, provider: &str, outcome: &'static str) {
        bump(&self.psp_events, (provider.to_owned(), outcome));
    }

    pub fn replayed(&self) {
        self.idempotency_replays.fetch_add(1, Ordering::Relaxed);
    }

    pub fn idempotency_conflict(&self, kind: &'static str) {
        bump(&self.idempotency_conflicts, kind);
    }

    pub fn transition(&self, from: &'static str, to: &'static str) {
        bump(&self.transitions, (from, to));
    }

    pub fn render(&self, out: &mut String) {
        header(
            out,
            "payrail_http_request_duration_seconds",
            "histogram",
            "HTTP requests by route pattern and status.",
        );
        for e in self.http.iter() {
            let (route, status) = e.key();
            e.value().render(
                out,
                "payrail_http_request_duration_seconds",
                &format!("route=\"{route}\",status=\"{status}\""),
            );
        }
        header(
            out,
            "payrail_psp_request_duration_seconds",
            "histogram",
            "Calls to the PSP by operation.",
        );
        for e in self.psp.iter() {
            let (psp, op) = e.key();
            e.value().render(
                out,
                "payrail_psp_request_duration_seconds",
                &format!("psp=\"{psp}\",operation=\"{op}\""),
            );
        }
        header(
            out,
            "payrail_psp_errors_total",
            "counter",
            "PSP calls that failed: timeouts, outages, refused requests.",
        );
        for e in self.psp_errors.iter() {
            let (psp, code) = e.key();
            let _ = writeln!(
                out,
                "payrail_psp_errors_total{{psp=\"{psp}\",code=\"{code}\"}} {}",
                e.value().load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "payrail_actor_handle_duration_seconds",
            "histogram",
            "Time an actor spent on one message (a batch, for ledger shards).",
        );
        for e in self.actor_handle.iter() {
            e.value().render(
                out,
                "payrail_actor_handle_duration_seconds",
                &format!("actor=\"{}\"", e.key()),
            );
        }
        header(
            out,
            "payrail_psp_events_total",
            "counter",
            "PSP webhook events by provider and outcome.",
        );
        for e in self.psp_events.iter() {
            let (provider, outcome) = e.key();
            let _ = writeln!(
                out,
                "payrail_psp_events_total{{provider=\"{provider}\",outcome=\"{outcome}\"}} {}",
                e.value().load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "payrail_idempotency_replays_total",
            "counter",
            "Requests answered from a stored idempotent response.",
        );
        let _ = writeln!(
            out,
            "payrail_idempotency_replays_total {}",
            self.idempotency_replays.load(Ordering::Relaxed)
        );
        header(
            out,
            "payrail_idempotency_conflicts_total",
            "counter",
            "Idempotency-Key refused: in_use (409) or reused (422).",
        );
        for e in self.idempotency_conflicts.iter() {
            let _ = writeln!(
                out,
                "payrail_idempotency_conflicts_total{{kind=\"{}\"}} {}",
                e.key(),
                e.value().load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "payrail_payment_transitions_total",
            "counter",
            "Payment status changes committed.",
        );
        for e in self.transitions.iter() {
            let (from, to) = e.key();
            let _ = writeln!(
                out,
                "payrail_payment_transitions_total{{from=\"{from}\",to=\"{to}\"}} {}",
                e.value().load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "payrail_ledger_commit_duration_seconds",
            "histogram",
            "Time of one ledger batch transaction.",
        );
        self.ledger_commit
            .render(out, "payrail_ledger_commit_duration_seconds", "");
    }
}

pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(30));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
        assert!(out.contains("x_sum{a=\"b\"} 30.00305\n"));
    }
}
