//! Merchant webhooks' storage: events (the outbox), endpoints, and deliveries with their
//! durable retry state (docs/DESIGN.md, "Merchant webhooks").

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{pg_error, Db, StoreError};
use crate::domain::MerchantId;

/// One committed event.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: i64,
    pub event_type: String,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

impl EventRow {
    pub fn to_object(&self) -> Value {
        crate::domain::webhook::event_object(self.id, &self.event_type, self.created_at, &self.payload)
    }
}

/// Which events a list returns, newest first.
#[derive(Debug, Default)]
pub struct EventFilter {
    pub limit: i64,
    /// Events older than this one (its row id).
    pub starting_after: Option<i64>,
    /// Exactly this type, or (`type_prefix`) a family such as `payment.`.
    pub event_type: Option<String>,
    pub type_prefix: Option<String>,
    pub created_gte: Option<DateTime<Utc>>,
}

/// A merchant's endpoint, secrets included: only the delivery path and the create and rotate
/// answers ever read them.
#[derive(Clone)]
pub struct EndpointRow {
    pub id: String,
    pub merchant_id: String,
    pub url: String,
    pub description: Option<String>,
    pub enabled_events: Vec<String>,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub status: String,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for EndpointRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRow")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl EndpointRow {
    /// A new, enabled endpoint.
    pub fn new(
        id: String,
        merchant_id: &str,
        url: String,
        description: Option<String>,
        enabled_events: Vec<String>,
        secret: String,
    ) -> EndpointRow {
        let now = Utc::now();
        EndpointRow {
            id,
            merchant_id: merchant_id.to_owned(),
            url,
            description,
            enabled_events,
            secret,
            previous_secret: None,
            previous_secret_expires_at: None,
            status: "enabled".into(),
            disabled_reason: None,
            failing_since: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// The secrets that sign a delivery at `now`: the current one, and the previous one during
    /// its overlap.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(old), Some(until)) = (&self.previous_secret, self.previous_secret_expires_at) {
            if now < until {
                secrets.push(old);
            }
        }
        secrets
    }
}

const ENDPOINT_COLUMNS: &str = "id, merchant_id, url, description, enabled_events, secret, previous_secret,
    previous_secret_expires_at, status, disabled_reason, failing_since, created_at, updated_at";

fn endpoint_from_row(r: &tokio_postgres::Row) -> EndpointRow {
    EndpointRow {
        id: r.get(0),
        merchant_id: r.get(1),
        url: r.get(2),
        description: r.get(3),
        enabled_events: r.get(4),
        secret: r.get(5),
        previous_secret: r.get(6),
        previous_secret_expires_at: r.get(7),
        status: r.get(8),
        disabled_reason: r.get(9),
        failing_since: r.get(10),
        created_at: r.get(11),
        updated_at: r.get(12),
    }
}

/// The most endpoints one merchant may have (Stripe allows 16 too).
pub const MAX_ENDPOINTS: i64 = 16;

/// What an update changes; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct EndpointUpdate {
    pub url: Option<String>,
    pub enabled_events: Option<Vec<String>>,
    pub description: Option<String>,
    /// `Some(true)` disables, `Some(false)` enables again (and forgets past failures).
    pub disabled: Option<bool>,
}

/// A delivery a worker should attempt now: the event's body is built by the caller.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: i64,
    pub endpoint_id: String,
    pub merchant_id: String,
    pub attempts: i32,
    pub retry_until: DateTime<Utc>,
    pub event: EventRow,
}

/// A new delivery the dispatcher stored.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: i64,
    pub endpoint_id: String,
    pub event_id: i64,
    pub retry_until: DateTime<Utc>,
}

/// The result of one attempt, as the delivery log keeps it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub delivery_id: i64,
    /// The delivery's attempts before this one: an outcome is recorded only if no other was
    /// recorded meanwhile (a lease that ran out, a second node).
    pub prev_attempts: i32,
    pub endpoint_id: String,
    pub at: DateTime<Utc>,
    pub status_code: Option<i16>,
    pub latency_ms: i32,
    /// The first 1 KiB of the answer, as text.
    pub response: Option<String>,
    pub error: Option<String>,
    pub succeeded: bool,
    /// The next try when it failed; `None` when it succeeded or the retry window is over.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The retry window the attempt was made in. A redelivery requested while it was under way
    /// opens a new one, and this outcome is then not recorded over it: the delivery is made
    /// again, as asked.
    pub retry_until: DateTime<Utc>,
}

/// One row of an endpoint's delivery log.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: i64,
    pub endpoint_id: String,
    pub event_id: i64,
    pub event_type: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i16>,
    pub last_latency_ms: Option<i32>,
    pub last_response: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// An endpoint disabled after failing for the whole retry window.
#[derive(Debug, Clone)]
pub struct Disabled {
    pub id: String,
    pub merchant_id: String,
}

/// What operators watch: retries waiting, and the oldest undelivered event per kind of endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    pub pending: i64,
    pub retrying: i64,
    /// Seconds since the oldest undelivered event was committed, for endpoints that answer
    /// (a lag of payrail's) and for failing ones (a merchant's outage).
    pub oldest_healthy_secs: f64,
    pub oldest_failing_secs: f64,
}

fn interval(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Db {
    /// A merchant's events, newest first; the second value says whether there are more.
    pub async fn list_events(
        &self,
        merchant: &MerchantId,
        f: &EventFilter,
    ) -> Result<(Vec<EventRow>, bool), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, event_type, coalesce(body::text, payload::text), created_at FROM outbox
                 WHERE merchant_id = $1
                   AND ($2::bigint IS NULL
                        OR (id < $2 AND EXISTS (SELECT 1 FROM outbox c WHERE c.id = $2 AND c.merchant_id = $1)))
                   AND ($3::text IS NULL OR event_type = $3)
                   AND ($4::text IS NULL OR left(event_type, length($4)) = $4)
                   AND ($5::timestamptz IS NULL OR created_at >= $5)
                 ORDER BY id DESC LIMIT $6",
            )
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(
                &stmt,
                &[
                    &merchant.as_str(),
                    &f.starting_after,
                    &f.event_type,
                    &f.type_prefix,
                    &f.created_gte,
                    &(f.limit + 1),
                ],
            )
            .await
            .map_err(pg_error)?;
        let more = rows.len() as i64 > f.limit;
        let events = rows
            .iter()
            .take(f.limit as usize)
            .map(event_from_row)
            .collect::<Result<_, _>>()?;
        Ok((events, more))
    }

    pub async fn event(&self, merchant: &MerchantId, id: i64) -> Result<Option<EventRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, event_type, coalesce(body::text, payload::text), created_at FROM outbox
                 WHERE id = $1 AND merchant_id = $2",
                &[&id, &merchant.as_str()],
            )
            .await
            .map_err(pg_error)?;
        row.as_ref().map(event_from_row).transpose()
    }

    /// One event by its row id, whoever's it is (the webhook dispatcher's fallback).
    pub async fn event_by_id(&self, id: i64) -> Result<Option<EventRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, event_type, coalesce(body::text, payload::text), created_at FROM outbox WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        row.as_ref().map(event_from_row).transpose()
    }

    /// Deletes published events committed before `cutoff`, at most `limit`, from the oldest
    /// (the scan is bounded too), with their finished deliveries. Returns how many events went.
    pub async fn prune_events(&self, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let gone: Vec<i64> = tx
            .query(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM (SELECT id, tx, created_at FROM outbox ORDER BY id LIMIT $2) s
                     WHERE s.created_at < $1
                       AND (s.tx IS NULL OR (s.tx, s.id) <= (SELECT c.tx, c.id FROM outbox_cursor c))
                       AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                       WHERE d.event_id = s.id AND d.status = 'pending'))
                 RETURNING id",
                &[&cutoff, &limit],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !gone.is_empty() {
            tx.execute(
                "DELETE FROM webhook_deliveries WHERE event_id = ANY($1) AND status <> 'pending'",
                &[&gone],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(gone.len() as u64)
    }

    /// Stores an endpoint under `id` (derived from the request's idempotency key, so a retry
    /// finds it), and says whether this call made it; `None` when the merchant already has
    /// [`MAX_ENDPOINTS`].
    pub async fn insert_endpoint(&self, e: &EndpointRow) -> Result<Option<(EndpointRow, bool)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // One creation per merchant at a time: the count below must see the others' endpoints.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('webhook_endpoints:' || $1))",
            &[&e.merchant_id],
        )
        .await
        .map_err(pg_error)?;
        let sql = format!(
            "WITH existing AS (SELECT count(*) AS n FROM webhook_endpoints WHERE merchant_id = $2),
                  ins AS (INSERT INTO webhook_endpoints (id, merchant_id, url, description, enabled_events, secret)
                          SELECT $1, $2, $3, $4, $5, $6 FROM existing WHERE existing.n < $7
                          ON CONFLICT (id) DO NOTHING RETURNING {ENDPOINT_COLUMNS})
             SELECT *, true FROM ins
             UNION ALL
             SELECT {ENDPOINT_COLUMNS}, false FROM webhook_endpoints WHERE id = $1 AND merchant_id = $2
             LIMIT 1"
        );
        let row = tx
            .query_opt(
                &sql,
                &[
                    &e.id,
                    &e.merchant_id,
                    &e.url,
                    &e.description,
                    &e.enabled_events,
                    &e.secret,
                    &MAX_ENDPOINTS,
                ],
            )
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(row.as_ref().map(|r| (endpoint_from_row(r), r.get(13))))
    }

    /// A merchant's endpoints, oldest first.
    pub async fn endpoints(&self, merchant: &str) -> Result<Vec<EndpointRow>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE merchant_id = $1
                 ORDER BY created_at, id LIMIT 100"
            ))
            .await
            .map_err(pg_error)?;
        let rows = client.query(&stmt, &[&merchant]).await.map_err(pg_error)?;
        Ok(rows.iter().map(endpoint_from_row).collect())
    }

    /// Every merchant's endpoints (operators), the most recently changed first.
    pub async fn all_endpoints(&self, status: Option<&str>, limit: i64) -> Result<Vec<EndpointRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE $1::text IS NULL OR status = $1
                     ORDER BY updated_at DESC, id LIMIT $2"
                ),
                &[&status, &limit],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(endpoint_from_row).collect())
    }

    pub async fn endpoint(&self, merchant: &str, id: &str) -> Result<Option<EndpointRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND merchant_id = $2"),
                &[&id, &merchant],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(endpoint_from_row))
    }

    /// Applies `u`; disabling also ends the endpoint's pending deliveries (a redelivery brings
    /// an event back). `None` when there is no such endpoint.
    pub async fn update_endpoint(
        &self,
        merchant: &str,
        id: &str,
        u: &EndpointUpdate,
    ) -> Result<Option<EndpointRow>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let status = u.disabled.map(|d| if d { "disabled" } else { "enabled" });
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE webhook_endpoints SET
                        url = COALESCE($3, url),
                        enabled_events = COALESCE($4, enabled_events),
                        description = COALESCE($5, description),
                        status = COALESCE($6, status),
                        disabled_reason = CASE WHEN $6::text IS NULL THEN disabled_reason
                                               WHEN $6 = 'disabled' THEN 'disabled by the merchant' END,
                        failing_since = CASE WHEN $6::text IS NULL THEN failing_since END,
                        updated_at = now()
                     WHERE id = $1 AND merchant_id = $2 RETURNING {ENDPOINT_COLUMNS}"
                ),
                &[&id, &merchant, &u.url, &u.enabled_events, &u.description, &status],
            )
            .await
            .map_err(pg_error)?;
        if row.is_some() && u.disabled == Some(true) {
            end_pending(&tx, &[id.to_owned()], "the endpoint was disabled").await?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(row.as_ref().map(endpoint_from_row))
    }

    /// Deletes an endpoint and its delivery log; whether there was one.
    pub async fn delete_endpoint(&self, merchant: &str, id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM webhook_endpoints WHERE id = $1 AND merchant_id = $2",
                &[&id, &merchant],
            )
            .await
            .map_err(pg_error)?;
        Ok(n == 1)
    }

    /// Makes `secret` the signing secret; the one it replaces keeps signing for `overlap`.
    /// `key` (the request's idempotency key) makes a retried rotation rotate once: the second
    /// call finds the rotation done and returns the endpoint as it left it.
    pub async fn rotate_endpoint_secret(
        &self,
        merchant: &str,
        id: &str,
        secret: &str,
        overlap: Duration,
        key: &str,
    ) -> Result<Option<EndpointRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "WITH rotated AS (
                         UPDATE webhook_endpoints SET previous_secret = secret, secret = $3,
                             previous_secret_expires_at = now() + make_interval(secs => $4),
                             last_rotation_key = $5, updated_at = now()
                         WHERE id = $1 AND merchant_id = $2 AND last_rotation_key IS DISTINCT FROM $5
                         RETURNING {ENDPOINT_COLUMNS})
                     SELECT * FROM rotated
                     UNION ALL
                     SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints
                     WHERE id = $1 AND merchant_id = $2 AND last_rotation_key = $5"
                ),
                &[&id, &merchant, &secret, &interval(overlap), &key],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(endpoint_from_row))
    }

    /// Stores one pending delivery per (endpoint id, event id) not stored before, leased to the
    /// caller for `lease`; returns the new ones (a redelivered JetStream message adds none).
    pub async fn insert_deliveries(
        &self,
        pairs: &[(String, i64)],
        lease: Duration,
        window: Duration,
    ) -> Result<Vec<NewDelivery>, StoreError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let endpoints: Vec<&str> = pairs.iter().map(|(e, _)| e.as_str()).collect();
        let events: Vec<i64> = pairs.iter().map(|(_, ev)| *ev).collect();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO webhook_deliveries (endpoint_id, event_id, next_attempt_at, retry_until)
                 SELECT e, v, now() + make_interval(secs => $3), now() + make_interval(secs => $4)
                 FROM unnest($1::text[], $2::bigint[]) AS t(e, v)
                 WHERE EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.id = t.e AND w.status = 'enabled' FOR SHARE)
                 ON CONFLICT (endpoint_id, event_id) DO NOTHING
                 RETURNING id, endpoint_id, event_id, retry_until",
            )
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&stmt, &[&endpoints, &events, &interval(lease), &interval(window)])
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| NewDelivery {
                id: r.get(0),
                endpoint_id: r.get(1),
                event_id: r.get(2),
                retry_until: r.get(3),
            })
            .collect())
    }

    /// Extends the leases of deliveries a node holds, each only while it is still the claim that
    /// node made (`attempts` and `retry_until` unchanged, still pending).
    pub async fn renew_delivery_leases(
        &self,
        (ids, attempts, windows): (Vec<i64>, Vec<i32>, Vec<DateTime<Utc>>),
        lease: Duration,
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let client = self.client().await?;
        client
            .execute(
                "UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $4)
                 FROM unnest($1::bigint[], $2::int[], $3::timestamptz[]) AS h(id, attempts, retry_until)
                 WHERE d.id = h.id AND d.attempts = h.attempts AND d.retry_until = h.retry_until
                   AND d.status = 'pending'",
                &[&ids, &attempts, &windows, &interval(lease)],
            )
            .await
            .map_err(pg_error)
    }

    /// Takes up to `limit` deliveries whose time has come (retries, and deliveries whose lease
    /// ran out because their node died or had no room), leasing each for `lease`; none of an
    /// endpoint in `skip` (this node's full mailboxes) or of a disabled one.
    pub async fn claim_due_deliveries(
        &self,
        limit: i64,
        lease: Duration,
        skip: &[String],
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH due AS (
                     SELECT d.id FROM webhook_deliveries d
                     JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.status = 'enabled'
                     WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND d.endpoint_id <> ALL($3)
                       AND EXISTS (SELECT 1 FROM outbox o WHERE o.id = d.event_id)
                     ORDER BY d.next_attempt_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED)
                 UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $2)
                 FROM due, outbox o, webhook_endpoints w
                 WHERE d.id = due.id AND o.id = d.event_id AND w.id = d.endpoint_id
                 RETURNING d.id, d.endpoint_id, w.merchant_id, d.attempts, d.retry_until,
                           o.id, o.event_type, coalesce(o.body::text, o.payload::text), o.created_at",
            )
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&stmt, &[&limit, &interval(lease), &skip])
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                Ok(DueDelivery {
                    id: r.get(0),
                    endpoint_id: r.get(1),
                    merchant_id: r.get(2),
                    attempts: r.get(3),
                    retry_until: r.get(4),
                    event: EventRow {
                        id: r.get(5),
                        event_type: r.get(6),
                        payload: event_payload(r, 7)?,
                        created_at: r.get(8),
                    },
                })
            })
            .collect()
    }

    /// Gives back deliveries a node claimed but had no room for: due again after `delay`
    /// instead of at the end of their lease.
    pub async fn release_deliveries(&self, ids: &[i64], delay: Duration) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => $2)
                 WHERE id = ANY($1) AND status = 'pending'",
                &[&ids, &interval(delay)],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Records attempts in one transaction: each delivery's log and next try; endpoints that
    /// answered are healthy again; an endpoint failing for longer than `window` is disabled,
    /// its pending deliveries end, and a `webhook_endpoint.disabled` event is committed for it.
    /// `slack` is how late a delivery's first attempt may come after its window opened.
    pub async fn record_attempts(
        &self,
        attempts: &[Attempt],
        window: Duration,
        slack: Duration,
    ) -> Result<Vec<Disabled>, StoreError> {
        if attempts.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = attempts.iter().map(|a| a.delivery_id).collect();
        let prev: Vec<i32> = attempts.iter().map(|a| a.prev_attempts).collect();
        let ats: Vec<DateTime<Utc>> = attempts.iter().map(|a| a.at).collect();
        let codes: Vec<Option<i16>> = attempts.iter().map(|a| a.status_code).collect();
        let latencies: Vec<i32> = attempts.iter().map(|a| a.latency_ms).collect();
        let responses: Vec<Option<&str>> = attempts.iter().map(|a| a.response.as_deref()).collect();
        let errors: Vec<Option<&str>> = attempts.iter().map(|a| a.error.as_deref()).collect();
        let succeeded: Vec<bool> = attempts.iter().map(|a| a.succeeded).collect();
        let next: Vec<Option<DateTime<Utc>>> = attempts.iter().map(|a| a.next_attempt_at).collect();
        let windows: Vec<DateTime<Utc>> = attempts.iter().map(|a| a.retry_until).collect();
        let mut healthy: Vec<&str> = attempts
            .iter()
            .filter(|a| a.succeeded)
            .map(|a| a.endpoint_id.as_str())
            .collect();
        healthy.sort_unstable();
        healthy.dedup();
        let mut failing: Vec<&str> = attempts
            .iter()
            .filter(|a| !a.succeeded && healthy.binary_search(&a.endpoint_id.as_str()).is_err())
            .map(|a| a.endpoint_id.as_str())
            .collect();
        failing.sort_unstable();
        failing.dedup();

        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // A delivery settled or tried again meanwhile (a lease that ran out), or redelivered on
        // request meanwhile (a new retry window), stays as it was.
        let update = tx
            .prepare_cached(
                "UPDATE webhook_deliveries d SET
                     attempts = d.attempts + 1,
                     last_attempt_at = t.at, last_status_code = t.code, last_latency_ms = t.latency,
                     last_response = t.response, last_error = t.error,
                     status = CASE WHEN t.ok THEN 'succeeded' WHEN t.next IS NULL THEN 'failed' ELSE 'pending' END,
                     next_attempt_at = CASE WHEN t.ok THEN NULL ELSE t.next END,
                     delivered_at = CASE WHEN t.ok THEN t.at END
                 FROM unnest($1::bigint[], $2::timestamptz[], $3::smallint[], $4::int[], $5::text[], $6::text[],
                             $7::bool[], $8::timestamptz[], $9::int[], $10::timestamptz[])
                      AS t(id, at, code, latency, response, error, ok, next, prev, until)
                 WHERE d.id = t.id AND d.status = 'pending' AND d.attempts = t.prev AND d.retry_until = t.until",
            )
            .await
            .map_err(pg_error)?;
        tx.execute(
            &update,
            &[
                &ids, &ats, &codes, &latencies, &responses, &errors, &succeeded, &next, &prev, &windows,
            ],
        )
        .await
        .map_err(pg_error)?;
        if !healthy.is_empty() {
            tx.execute(
                "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = ANY($1) AND failing_since IS NOT NULL",
                &[&healthy],
            )
            .await
            .map_err(pg_error)?;
        }
        let mut disabled = Vec::new();
        if !failing.is_empty() {
            tx.execute(
                "UPDATE webhook_endpoints SET failing_since = now() WHERE id = ANY($1) AND failing_since IS NULL",
                &[&failing],
            )
            .await
            .map_err(pg_error)?;
            // Failing for the whole window: measured from now, or, when a delivery has just
            // used up its own window, from that window's start (the endpoint must have been
            // failing since then, give or take `slack` for the first attempt to happen).
            let gave_up: Vec<i64> = attempts
                .iter()
                .filter(|a| !a.succeeded && a.next_attempt_at.is_none())
                .map(|a| a.delivery_id)
                .collect();
            let rows = tx
                .query(
                    "UPDATE webhook_endpoints w SET status = 'disabled', updated_at = now(),
                         disabled_reason = 'every delivery failed for the whole retry window'
                     WHERE w.id = ANY($1) AND w.status = 'enabled' AND w.failing_since IS NOT NULL
                       AND (w.failing_since <= now() - make_interval(secs => $2)
                            OR EXISTS (SELECT 1 FROM webhook_deliveries d
                                       WHERE d.id = ANY($3) AND d.endpoint_id = w.id
                                         AND w.failing_since <= d.retry_until - make_interval(secs => $2)
                                                                + make_interval(secs => $4)))
                     RETURNING w.id, w.merchant_id, w.url, w.failing_since",
                    &[&failing, &interval(window), &gave_up, &interval(slack)],
                )
                .await
                .map_err(pg_error)?;
            for r in &rows {
                let (id, merchant_id): (String, String) = (r.get(0), r.get(1));
                let since: DateTime<Utc> = r.get(3);
                let object = serde_json::json!({
                    "object": "webhook_endpoint", "id": id, "url": r.get::<_, String>(2), "status": "disabled",
                    "disabled_reason": "every delivery failed for the whole retry window",
                    "failing_since": crate::domain::record::timestamp(since),
                });
                tx.execute(
                    "INSERT INTO outbox (merchant_id, event_type, body) VALUES ($1, 'webhook_endpoint.disabled', $2)",
                    &[&merchant_id, &object],
                )
                .await
                .map_err(pg_error)?;
                disabled.push(Disabled { id, merchant_id });
            }
            let ids: Vec<String> = disabled.iter().map(|d| d.id.clone()).collect();
            end_pending(
                &tx,
                &ids,
                "the endpoint was disabled after failing for the whole retry window",
            )
            .await?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(disabled)
    }

    /// An endpoint's delivery log, newest first.
    pub async fn list_deliveries(
        &self,
        merchant: &str,
        endpoint: &str,
        limit: i64,
        starting_after: Option<i64>,
        status: Option<&str>,
    ) -> Result<(Vec<DeliveryRow>, bool), StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT d.id, d.endpoint_id, d.event_id, o.event_type, d.status, d.attempts, d.next_attempt_at,
                        d.last_attempt_at, d.last_status_code, d.last_latency_ms, d.last_response, d.last_error,
                        d.created_at, d.delivered_at
                 FROM webhook_deliveries d
                 JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.merchant_id = $1
                 LEFT JOIN outbox o ON o.id = d.event_id
                 WHERE d.endpoint_id = $2
                   AND ($3::bigint IS NULL
                        OR (d.id < $3 AND EXISTS (SELECT 1 FROM webhook_deliveries c WHERE c.id = $3 AND c.endpoint_id = $2)))
                   AND ($4::text IS NULL OR d.status = $4)
                 ORDER BY d.id DESC LIMIT $5",
                &[&merchant, &endpoint, &starting_after, &status, &(limit + 1)],
            )
            .await
            .map_err(pg_error)?;
        let more = rows.len() as i64 > limit;
        let list = rows
            .iter()
            .take(limit as usize)
            .map(|r| DeliveryRow {
                id: r.get(0),
                endpoint_id: r.get(1),
                event_id: r.get(2),
                event_type: r.get(3),
                status: r.get(4),
                attempts: r.get(5),
                next_attempt_at: r.get(6),
                last_attempt_at: r.get(7),
                last_status_code: r.get(8),
                last_latency_ms: r.get(9),
                last_response: r.get(10),
                last_error: r.get(11),
                created_at: r.get(12),
                delivered_at: r.get(13),
            })
            .collect();
        Ok((list, more))
    }

    /// Schedules `event` again, now, to each of `endpoints` (the caller has checked they are
    /// the merchant's) that is enabled, with a fresh retry window. Returns how many.
    ///
    /// Here and in [`Db::insert_deliveries`], the endpoint's row is share-locked: a disabling
    /// that commits first is seen (the lock waits for it, then reads the row again), and one that
    /// comes later waits for this insert and ends what it made. Without the lock, a delivery made
    /// beside a disabling would stay pending on a disabled endpoint, never claimed nor ended.
    pub async fn redeliver(&self, event: i64, endpoints: &[String], window: Duration) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO webhook_deliveries (endpoint_id, event_id, next_attempt_at, retry_until)
                 SELECT e, $2, now(), now() + make_interval(secs => $3) FROM unnest($1::text[]) AS e
                 WHERE EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.id = e AND w.status = 'enabled' FOR SHARE)
                 ON CONFLICT (endpoint_id, event_id) DO UPDATE SET
                     status = 'pending', attempts = 0, next_attempt_at = now(), retry_until = EXCLUDED.retry_until,
                     delivered_at = NULL",
                &[&endpoints, &event, &interval(window)],
            )
            .await
            .map_err(pg_error)
    }

    /// The delivery backlog for `/metrics`.
    pub async fn webhook_backlog(&self) -> Result<Backlog, StoreError> {
        let client = self.client().await?;
        let r = client
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE d.attempts > 0),
                        COALESCE(EXTRACT(EPOCH FROM now() - min(d.created_at) FILTER (WHERE w.failing_since IS NULL)), 0)::float8,
                        COALESCE(EXTRACT(EPOCH FROM now() - min(d.created_at) FILTER (WHERE w.failing_since IS NOT NULL)), 0)::float8
                 FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.status = 'enabled'
                 WHERE d.status = 'pending'",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(Backlog {
            pending: r.get(0),
            retrying: r.get(1),
            oldest_healthy_secs: r.get(2),
            oldest_failing_secs: r.get(3),
        })
    }
}

fn event_from_row(r: &tokio_postgres::Row) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        id: r.get(0),
        event_type: r.get(1),
        payload: event_payload(r, 2)?,
        created_at: r.get(3),
    })
}

/// An event's object from its stored text (`body`, or the jsonb `payload` of an event written
/// before V20), its keys in the order they were written.
fn event_payload(r: &tokio_postgres::Row, i: usize) -> Result<Value, StoreError> {
    serde_json::from_str(r.get::<_, &str>(i)).map_err(|_| StoreError::Broken)
}

/// Ends the pending deliveries of `endpoints` as failed, with `why`.
async fn end_pending(
    tx: &deadpool_postgres::Transaction<'_>,
    endpoints: &[String],
    why: &str,
) -> Result<(), StoreError> {
    if endpoints.is_empty() {
        return Ok(());
    }
    tx.execute(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, last_error = $2
         WHERE endpoint_id = ANY($1) AND status = 'pending'",
        &[&endpoints, &why],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}
