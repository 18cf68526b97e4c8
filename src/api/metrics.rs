//! `GET /metrics`: every metric in the OpenMetrics text format (`crate::metrics`). No ids as
//! labels; base units; counters end in `_total`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, HttpResponse};

use super::AppState;
use crate::actors::ActorStats;
use crate::metrics::{ActorFigures, Scrape};

fn figures(s: &ActorStats) -> ActorFigures {
    ActorFigures {
        depth: s.depth(),
        live: s.live(),
        restarts: s.restarts.load(Ordering::Relaxed),
        messages: s.messages.load(Ordering::Relaxed),
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // The figures read from JetStream and PostgreSQL, by at most `PROBES` scrapes at once; a
    // scrape that finds no permit free goes without them at once (their gauges keep the last
    // reading), so scrapes never queue.
    let (lag, unreplayed, backlog) = match state.probes.try_acquire().ok() {
        Some(_permit) => {
            let lag = state.nats.psp_consumer_lag(state.config.nats.partitions).await;
            // The alert: a dead letter is an event payrail could not apply; each waits for an
            // operator.
            let unreplayed = tokio::time::timeout(Duration::from_millis(500), state.db.dead_letters_unreplayed())
                .await
                .ok()
                .and_then(Result::ok);
            let backlog = tokio::time::timeout(Duration::from_millis(500), state.db.webhook_backlog())
                .await
                .ok()
                .and_then(Result::ok);
            (lag, unreplayed, backlog)
        }
        None => (None, None, None),
    };
    let pool = state.db.pool_status();
    let scrape = Scrape {
        actors: vec![
            ("payment", figures(&state.registry.stats)),
            ("ledger_shard", figures(&state.ledger.kind)),
            ("event_consumer", figures(&state.event_consumers)),
            ("webhook_endpoint", figures(&state.webhooks.stats)),
        ],
        ledger_split_batches: state.ledger.stats.split_batches.load(Ordering::Relaxed),
        consumer_lag: lag.map(|l| (l.pending, l.ack_pending, l.redelivered)),
        dead_letters_unreplayed: unreplayed,
        risk_velocity_keys: state.risk.velocity.keys() as i64,
        webhook_backlog: backlog,
        cluster: state
            .leases
            .as_ref()
            .map(|l| (l.owned() as i64, l.nodes().len() as i64)),
        pool: (
            pool.size.saturating_sub(pool.available) as i64,
            pool.available as i64,
            pool.waiting as i64,
        ),
    };
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.encode(&scrape))
}
