//! The sandbox PSP's tokenized cards. Brand, last four and expiry only: the number is gone
//! before anything reaches here.

use super::{pg_error, Db, StoreError};

#[derive(Debug, Clone)]
pub struct StoredCard {
    pub id: String,
    pub merchant_id: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: i16,
    pub exp_year: i16,
    /// The sandbox behaviour this card triggers (`success`, `declined`, …).
    pub behaviour: String,
    /// BIN, issuing country, funding and keyed fingerprint (cards stored before them: `None`).
    pub signals: Option<crate::domain::risk::CardSignals>,
}

impl Db {
    pub async fn sandbox_store_card(&self, c: &StoredCard) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO sandbox_payment_methods (id, merchant_id, brand, last4, exp_month, exp_year, behaviour,
                     bin, fingerprint, country, funding)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &c.id,
                    &c.merchant_id,
                    &c.brand,
                    &c.last4,
                    &c.exp_month,
                    &c.exp_year,
                    &c.behaviour,
                    &c.signals.as_ref().map(|s| s.bin.as_str()),
                    &c.signals.as_ref().map(|s| s.fingerprint.as_str()),
                    &c.signals.as_ref().map(|s| s.country.as_str()),
                    &c.signals.as_ref().map(|s| s.funding.as_str()),
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    pub async fn sandbox_card(&self, id: &str) -> Result<Option<StoredCard>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, merchant_id, brand, last4::text, exp_month, exp_year, behaviour, bin, fingerprint, country, funding
                 FROM sandbox_payment_methods WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.map(|r| StoredCard {
            id: r.get(0),
            merchant_id: r.get(1),
            brand: r.get(2),
            last4: r.get(3),
            exp_month: r.get(4),
            exp_year: r.get(5),
            behaviour: r.get(6),
            signals: match (r.get(7), r.get(8), r.get(9), r.get(10)) {
                (Some(bin), Some(fingerprint), Some(country), Some(funding)) => {
                    Some(crate::domain::risk::CardSignals {
                        bin,
                        fingerprint,
                        brand: r.get(2),
                        country,
                        funding,
                        last4: r.get(3),
                    })
                }
                _ => None,
            },
        }))
    }
}

/// One movement in the sandbox PSP's books.
#[derive(Debug, Clone)]
pub struct BookRow {
    pub id: i64,
    pub kind: String,
    pub reference: String,
    pub intent: String,
    pub amount: i64,
    pub currency: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// One movement waiting for its batch ([`Db::sandbox_book`]).
pub struct Booking {
    merchant: String,
    kind: String,
    reference: String,
    intent: String,
    amount: i64,
    currency: String,
}

/// The batch's movements in one statement, its own transaction. `set_config(…, true)` turns
/// the WAL flush off for this transaction only (a `SET LOCAL` would need BEGIN and COMMIT
/// round trips). A movement booked already (the same kind and reference, in the table or
/// earlier in the batch) books nothing.
const BOOK: &str = "INSERT INTO sandbox_settlement_book (merchant_id, kind, reference, intent, amount, currency)
    SELECT u.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[])
        AS u(merchant_id, kind, reference, intent, amount, currency),
        (SELECT set_config('synchronous_commit', 'off', true)) async_commit
    ON CONFLICT (kind, reference) DO NOTHING";

impl Db {
    /// Books a movement of the sandbox's balance once: the same object again books nothing.
    /// The simulated PSP's books, not payrail's: written without waiting for the WAL flush
    /// (`synchronous_commit` off for their transaction only), so the sandbox adds no fsync to a
    /// payment. A PostgreSQL crash may lose its last fraction of a second of bookings, which
    /// reconciliation then reports as `missing_in_report`, as it would a PSP's late report.
    /// The movements of concurrent calls are written together (`group`); each call returns
    /// once its own is committed.
    pub async fn sandbox_book(
        &self,
        merchant: &str,
        kind: &str,
        reference: &str,
        intent: &str,
        amount: i64,
        currency: &str,
    ) -> Result<(), StoreError> {
        let booking = Booking {
            merchant: merchant.to_owned(),
            kind: kind.to_owned(),
            reference: reference.to_owned(),
            intent: intent.to_owned(),
            amount,
            currency: currency.to_owned(),
        };
        let db = self.clone();
        self.bookings
            .submit(booking, move |batch| {
                let db = db.clone();
                async move { db.write_bookings(batch).await }
            })
            .await
    }

    /// Writes one batch of movements and answers each. A batch the database refuses is written
    /// again movement by movement, so one bad row fails only its own call.
    async fn write_bookings(&self, batch: Vec<super::group::Waiting<Booking, ()>>) {
        let rows: Vec<&Booking> = batch.iter().map(|w| &w.row).collect();
        match self.insert_bookings(&rows).await {
            Err(StoreError::Broken) if batch.len() > 1 => {
                for w in batch {
                    let written = self.insert_bookings(&[&w.row]).await;
                    let _ = w.answer.send(written);
                }
            }
            written => {
                for w in batch {
                    let _ = w.answer.send(written.clone());
                }
            }
        }
    }

    async fn insert_bookings(&self, rows: &[&Booking]) -> Result<(), StoreError> {
        // In key order, as the idempotency claims (no deadlock between concurrent batches).
        let mut rows = rows.to_vec();
        rows.sort_unstable_by(|a, b| (&a.kind, &a.reference).cmp(&(&b.kind, &b.reference)));
        let client = self.client().await?;
        let stmt = client.prepare_cached(BOOK).await.map_err(pg_error)?;
        let column = |f: fn(&Booking) -> &String| rows.iter().map(|b| f(b).as_str()).collect::<Vec<_>>();
        let amounts: Vec<i64> = rows.iter().map(|b| b.amount).collect();
        client
            .execute(
                &stmt,
                &[
                    &column(|b| &b.merchant),
                    &column(|b| &b.kind),
                    &column(|b| &b.reference),
                    &column(|b| &b.intent),
                    &amounts,
                    &column(|b| &b.currency),
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// A page of a merchant's booked movements in `[from, to)`, after row `after`, oldest first.
    pub async fn sandbox_book_page(
        &self,
        merchant: &str,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BookRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, kind, reference, intent, amount, currency::text, at FROM sandbox_settlement_book
                 WHERE merchant_id = $1 AND at >= $2 AND at < $3 AND id > $4 ORDER BY id LIMIT $5",
                &[&merchant, &from, &to, &after, &limit],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| BookRow {
                id: r.get(0),
                kind: r.get(1),
                reference: r.get(2),
                intent: r.get(3),
                amount: r.get(4),
                currency: r.get(5),
                at: r.get(6),
            })
            .collect())
    }
}
