//! PSP events' tables: dedupe of processed events, dead letters, and disputes.

use serde_json::{json, Value};

use super::{pg_error, Db, StoreError};
use crate::domain::record::timestamp;
use crate::domain::{Currency, Dispute, DisputeId, DisputeStatus, MerchantId, Money, PaymentId};

const DISPUTE_COLUMNS: &str =
    "id, payment_id, merchant_id, psp_reference, amount, currency, status, reason, created_at, updated_at";

fn dispute_from_row(row: &tokio_postgres::Row) -> Result<Dispute, StoreError> {
    let currency: String = row.get(5);
    let status: String = row.get(6);
    Ok(Dispute {
        id: DisputeId::from_trusted(row.get(0)),
        payment_id: PaymentId::from_trusted(row.get(1)),
        merchant_id: MerchantId::from_trusted(row.get(2)),
        psp_reference: row.get(3),
        amount: Money::new(row.get(4), Currency::parse(&currency).ok_or(StoreError::Broken)?),
        status: DisputeStatus::parse(&status).ok_or(StoreError::Broken)?,
        reason: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
    })
}

/// Whether each (provider, event id) of a batch was processed: the ordinals of those that were.
/// One index probe per pair, whatever the table's statistics: a semi-join (`EXISTS`) planned
/// while the table was small is a hash join over a sequential scan of the whole table, and a
/// generic plan kept by the connection stays so as the table grows (measured: 1.6 ms a look-up
/// and 8.6 million rows read in a 10 s run from an empty database). A lateral subquery with a
/// limit runs once per pair (a nested loop), and its equality on the primary key is an index
/// probe even on an empty table (`tests/api/plans.rs`).
pub const PROCESSED: &str = "SELECT u.i FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(provider, event_id, i)
    CROSS JOIN LATERAL (SELECT 1 FROM processed_events e
                         WHERE e.provider = u.provider AND e.event_id = u.event_id LIMIT 1) x";

/// The payment of each (PSP, reference) of a batch that has one: a reference the payment was
/// given (`payment_psp_references`), or one of its authorizations that was failed over (its
/// events are recorded, not applied); and whether the event (the PSP's, by id) is recorded in
/// `processed_events`, one probe of its primary key per event as in [`PROCESSED`] (an `EXISTS`
/// in the select list was planned as a hashed subplan over the whole index: `tests/api/plans.rs`).
pub const PAYMENTS_OF_REFERENCES: &str = "SELECT u.i, x.id, x.merchant_id, d.recorded IS NOT NULL
    FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(psp, reference, event_id, i)
    CROSS JOIN LATERAL (
        (SELECT p.id, p.merchant_id FROM payments p
         WHERE p.id = (SELECT r.payment_id FROM payment_psp_references r
                       WHERE r.psp = u.psp AND r.psp_reference = u.reference))
        UNION ALL
        (SELECT p.id, p.merchant_id FROM psp_attempts a JOIN payments p ON p.id = a.payment_id
         JOIN connectors c ON c.id = a.connector_id
         WHERE a.psp_reference = u.reference AND c.psp = u.psp)
        LIMIT 1) x
    LEFT JOIN LATERAL (SELECT true AS recorded FROM processed_events e
                        WHERE e.provider = u.psp AND e.event_id = u.event_id LIMIT 1) d ON true";

/// A look-up's transaction: the statement's generic plan from its first execution on (checked
/// by the plan test), under the planner settings of a batch's statements (`commit::PLANNER`)
/// and with bitmap scans off too (the look-up's probes name single keys, never a range worth a
/// bitmap): kept for the connection's life, the plan must be index probes whatever the tables
/// held when it was made. Left to choose, PostgreSQL planned [`PAYMENTS_OF_REFERENCES`] afresh
/// for every batch, about 220 µs a time: a custom plan, which knows the arrays' lengths, is
/// always priced below the generic one.
pub const LOOKUP_BEGIN: &str = "BEGIN READ ONLY; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; SET LOCAL plan_cache_mode = force_generic_plan";

/// A (provider, event id) pair waiting for its batch's dedupe look-up.
pub type Pair = (String, String);

/// A PSP event waiting for the look-up of its payment: (provider, reference, event id).
pub type EventKey = (String, String, String);

/// The payment a PSP event concerns, and whether the event was recorded as processed when it
/// was looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPayment {
    pub payment: PaymentId,
    pub merchant: MerchantId,
    pub processed: bool,
}

impl Db {
    /// Whether the event was processed: the actor's own check, for an event no consumer looked
    /// up just before (`PspEvent::unrecorded`). Concurrent look-ups are read together, one
    /// statement per batch (`group`); each sees every commit made before it asked.
    pub async fn event_processed(&self, provider: &str, event_id: &str) -> Result<bool, StoreError> {
        let db = self.clone();
        self.processed_lookups
            .submit((provider.to_owned(), event_id.to_owned()), move |batch| {
                let db = db.clone();
                async move {
                    let providers: Vec<&str> = batch.iter().map(|w| w.row.0.as_str()).collect();
                    let ids: Vec<&str> = batch.iter().map(|w| w.row.1.as_str()).collect();
                    let found = db.read_batch(PROCESSED, &[&providers, &ids], |_| ()).await;
                    for (i, w) in batch.into_iter().enumerate() {
                        let _ = w
                            .answer
                            .send(found.as_ref().map(|f| f.contains_key(&i)).map_err(Clone::clone));
                    }
                }
            })
            .await
    }

    /// Runs a batch look-up over the batch's columns (`params`, one array each) whose rows
    /// start with the row's ordinal (from 1); the rest of each row is read by `row`. By batch
    /// position (from 0).
    async fn read_batch<V>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        row: impl Fn(&tokio_postgres::Row) -> V,
    ) -> Result<std::collections::HashMap<usize, V>, StoreError> {
        let mut open = super::commit::Open::new(self.client().await?);
        let stmt = open.client().prepare_cached(sql).await.map_err(pg_error)?;
        // In a transaction of its own, to run the statement's generic plan (LOOKUP_BEGIN); the
        // three messages go out together, one round trip. A BEGIN refused would leave a read
        // that commits on its own, and a COMMIT without a transaction is only a warning.
        let (begun, rows, ended) = {
            let tx: &tokio_postgres::Client = open.client();
            // Polled, and so sent, in this order.
            futures_util::future::join3(
                tx.batch_execute(LOOKUP_BEGIN),
                tx.query(&stmt, params),
                tx.batch_execute("COMMIT"),
            )
            .await
        };
        // Back to the pool only after a COMMIT that succeeded: any other end closes the
        // connection, so none is handed on inside a transaction, aborted or not.
        if ended.is_ok() {
            open.ended(&ended);
        }
        begun.map_err(pg_error)?;
        let rows = rows.map_err(pg_error)?;
        ended.map_err(pg_error)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let i: i64 = r.get(0);
                Some((usize::try_from(i).ok()?.checked_sub(1)?, row(r)))
            })
            .collect())
    }

    /// Records an event that concerns no payment (recorded, acknowledged, ignored).
    pub async fn record_event(
        &self,
        provider: &str,
        event_id: &str,
        event_type: &str,
        raw: &[u8],
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO processed_events (provider, event_id, event_type, raw) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&provider, &event_id, &event_type, &raw],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// The payment a PSP event's reference (`pi_…`) belongs to: the payment's own, or one of
    /// its authorizations that was failed over (its events are recorded, not applied); and
    /// whether the event is recorded as processed. Read with concurrent look-ups, as
    /// [`Db::event_processed`].
    pub async fn payment_of_event(
        &self,
        provider: &str,
        reference: &str,
        event_id: &str,
    ) -> Result<Option<EventPayment>, StoreError> {
        let db = self.clone();
        self.reference_lookups
            .submit(
                (provider.to_owned(), reference.to_owned(), event_id.to_owned()),
                move |batch| {
                    let db = db.clone();
                    async move {
                        let column =
                            |f: fn(&EventKey) -> &String| batch.iter().map(|w| f(&w.row).as_str()).collect::<Vec<_>>();
                        let (providers, references, ids) = (column(|k| &k.0), column(|k| &k.1), column(|k| &k.2));
                        let found = db
                            .read_batch(PAYMENTS_OF_REFERENCES, &[&providers, &references, &ids], |r| {
                                EventPayment {
                                    payment: PaymentId::from_trusted(r.get(1)),
                                    merchant: MerchantId::from_trusted(r.get(2)),
                                    processed: r.get(3),
                                }
                            })
                            .await;
                        match found {
                            Ok(mut found) => {
                                for (i, w) in batch.into_iter().enumerate() {
                                    let _ = w.answer.send(Ok(found.remove(&i)));
                                }
                            }
                            Err(e) => {
                                for w in batch {
                                    let _ = w.answer.send(Err(e.clone()));
                                }
                            }
                        }
                    }
                },
            )
            .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        provider: &str,
        event_id: &str,
        event_type: &str,
        reference: &str,
        reason: &str,
        deliveries: i32,
        raw: &[u8],
        envelope: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        // An event parked again while its dead letter waits (the acknowledgement after parking
        // was lost, and JetStream delivered it once more) updates that one: one alert, one
        // replay. An unreadable one (no envelope, so no trustworthy id) is always a row of its own.
        client
            .execute(
                "WITH open AS (
                     UPDATE dead_letters SET reason = $5, deliveries = greatest(deliveries, $6)
                     WHERE $8::bytea IS NOT NULL AND envelope IS NOT NULL AND replayed_at IS NULL
                       AND provider = $1 AND event_id = $2
                     RETURNING 1)
                 INSERT INTO dead_letters (provider, event_id, event_type, reference, reason, deliveries, raw, envelope)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE NOT EXISTS (SELECT 1 FROM open)",
                &[
                    &provider,
                    &event_id,
                    &event_type,
                    &reference,
                    &reason,
                    &deliveries,
                    &raw,
                    &envelope,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// The envelope of a dead letter, to publish again. `None`: no such dead letter;
    /// `Some(None)`: it has no envelope to replay (unreadable when it came).
    pub async fn dead_letter_envelope(&self, id: i64) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT envelope FROM dead_letters WHERE id = $1", &[&id])
            .await
            .map_err(pg_error)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Marks a dead letter replayed, once its envelope is published again.
    pub async fn mark_dead_letter_replayed(&self, id: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("UPDATE dead_letters SET replayed_at = now() WHERE id = $1", &[&id])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Dead letters not replayed yet: what operators are alerted on.
    pub async fn dead_letters_unreplayed(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL", &[])
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// The newest dead letters, at most `limit` (their raw bodies are not listed).
    pub async fn dead_letters(&self, limit: i64) -> Result<(Vec<Value>, i64), StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, provider, event_id, event_type, reference, reason, deliveries, created_at, replayed_at,
                        envelope IS NOT NULL
                 FROM dead_letters ORDER BY created_at DESC, id DESC LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(pg_error)?;
        let total: i64 = client
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        let list = rows
            .iter()
            .map(|r| {
                json!({ "id": r.get::<_, i64>(0), "provider": r.get::<_, String>(1), "event_id": r.get::<_, String>(2),
                        "event_type": r.get::<_, String>(3), "reference": r.get::<_, String>(4), "reason": r.get::<_, String>(5),
                        "deliveries": r.get::<_, i32>(6), "created_at": timestamp(r.get(7)),
                        "replayed_at": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(8).map(timestamp),
                        "replayable": r.get::<_, bool>(9) })
            })
            .collect();
        Ok((list, total))
    }

    /// The payment's dispute with this PSP reference: a reference is only unique per payment
    /// (two PSPs may use the same one).
    pub async fn dispute_of_payment(
        &self,
        payment: &PaymentId,
        reference: &str,
    ) -> Result<Option<Dispute>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {DISPUTE_COLUMNS} FROM disputes WHERE payment_id = $1 AND psp_reference = $2"
            ))
            .await
            .map_err(pg_error)?;
        client
            .query_opt(&stmt, &[&payment.as_str(), &reference])
            .await
            .map_err(pg_error)?
            .as_ref()
            .map(dispute_from_row)
            .transpose()
    }

    pub async fn dispute_for_merchant(
        &self,
        merchant: &MerchantId,
        id: &DisputeId,
    ) -> Result<Option<Dispute>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {DISPUTE_COLUMNS} FROM disputes WHERE id = $1 AND merchant_id = $2"
            ))
            .await
            .map_err(pg_error)?;
        client
            .query_opt(&stmt, &[&id.as_str(), &merchant.as_str()])
            .await
            .map_err(pg_error)?
            .as_ref()
            .map(dispute_from_row)
            .transpose()
    }

    /// Newest first; `has_more` by reading one past the limit.
    pub async fn disputes_of_merchant(
        &self,
        merchant: &MerchantId,
        limit: i64,
    ) -> Result<(Vec<Dispute>, bool), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {DISPUTE_COLUMNS} FROM disputes WHERE merchant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
            ))
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&stmt, &[&merchant.as_str(), &(limit + 1)])
            .await
            .map_err(pg_error)?;
        let mut list = rows.iter().map(dispute_from_row).collect::<Result<Vec<_>, _>>()?;
        let more = list.len() as i64 > limit;
        list.truncate(limit as usize);
        Ok((list, more))
    }
}
