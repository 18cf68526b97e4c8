//! `GET /metrics`: Prometheus text format. No ids as labels; base units; `_total` counters.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};

use super::AppState;
use crate::actors::ActorStats;

fn actor_lines(out: &mut String, kind: &str, s: &ActorStats) {
    let _ = writeln!(out, "payrail_actor_mailbox_depth{{actor=\"{kind}\"}} {}", s.depth());
    let _ = writeln!(out, "payrail_actors_live{{actor=\"{kind}\"}} {}", s.live());
    let _ = writeln!(
        out,
        "payrail_actor_restarts_total{{actor=\"{kind}\"}} {}",
        s.restarts.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "payrail_actor_messages_total{{actor=\"{kind}\"}} {}",
        s.messages.load(Ordering::Relaxed)
    );
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut out = String::with_capacity(4096);
    let ledger = &state.ledger;
    out.push_str("# HELP payrail_actor_mailbox_depth Messages sent to actors of a kind and not yet taken up.\n");
    out.push_str("# TYPE payrail_actor_mailbox_depth gauge\n");
    actor_lines(&mut out, "payment", &state.registry.stats);
    actor_lines(&mut out, "ledger_shard", &ledger.kind);
    actor_lines(&mut out, "event_consumer", &state.event_consumers);

    let stats = &ledger.stats;
    out.push_str("# HELP payrail_ledger_batch_size Commits written per ledger transaction.\n");
    out.push_str("# TYPE payrail_ledger_batch_size histogram\n");
    let mut cumulative = 0;
    for (i, bucket) in stats.size_buckets.iter().enumerate() {
        cumulative += bucket.load(Ordering::Relaxed);
        // Bucket i holds sizes [2^i, 2^(i+1)); its upper bound is 2^(i+1) - 1.
        let _ = writeln!(
            out,
            "payrail_ledger_batch_size_bucket{{le=\"{}\"}} {cumulative}",
            (1u64 << (i + 1)) - 1
        );
    }
    let batches = stats.batches.load(Ordering::Relaxed);
    let commits = stats.commits.load(Ordering::Relaxed);
    let _ = writeln!(out, "payrail_ledger_batch_size_bucket{{le=\"+Inf\"}} {batches}");
    let _ = writeln!(out, "payrail_ledger_batch_size_sum {commits}");
    let _ = writeln!(out, "payrail_ledger_batch_size_count {batches}");
    let _ = writeln!(
        out,
        "payrail_ledger_split_batches_total {}",
        stats.split_batches.load(Ordering::Relaxed)
    );

    state.metrics.render(&mut out);
    if let Some(lag) = state.nats.psp_consumer_lag(state.config.nats.partitions).await {
        crate::metrics::header(
            &mut out,
            "payrail_psp_consumer_pending",
            "gauge",
            "PSP events in JetStream not yet delivered to payrail.",
        );
        let _ = writeln!(out, "payrail_psp_consumer_pending {}", lag.pending);
        crate::metrics::header(
            &mut out,
            "payrail_psp_consumer_ack_pending",
            "gauge",
            "PSP events delivered and not yet acknowledged.",
        );
        let _ = writeln!(out, "payrail_psp_consumer_ack_pending {}", lag.ack_pending);
        crate::metrics::header(
            &mut out,
            "payrail_psp_consumer_redelivered",
            "gauge",
            "PSP events JetStream delivered more than once.",
        );
        let _ = writeln!(out, "payrail_psp_consumer_redelivered {}", lag.redelivered);
    }
    // The alert: a dead letter is an event payrail could not apply; each waits for an operator.
    if let Ok(Ok(n)) = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        state.db.dead_letters_unreplayed(),
    )
    .await
    {
        crate::metrics::header(
            &mut out,
            "payrail_dead_letters_unreplayed",
            "gauge",
            "PSP events parked as dead letters and not replayed yet (alert when above 0).",
        );
        let _ = writeln!(out, "payrail_dead_letters_unreplayed {n}");
    }
    let pool = state.db.pool_status();
    out.push_str("# TYPE payrail_db_pool_connections gauge\n");
    let _ = writeln!(
        out,
        "payrail_db_pool_connections{{state=\"in_use\"}} {}",
        pool.size.saturating_sub(pool.available)
    );
    let _ = writeln!(out, "payrail_db_pool_connections{{state=\"idle\"}} {}", pool.available);
    let _ = writeln!(out, "payrail_db_pool_waiters {}", pool.waiting);
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out)
}
