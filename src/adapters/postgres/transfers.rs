//! Transfers from a platform's balance to its sellers, and their reversals (docs/API.md,
//! "Transfers"). A transfer posts `Dr merchant_payable:{platform} / Cr
//! seller_available:{acct}`; a reversal the other way round.
//!
//! A transfer never overdraws the platform: every transfer of one platform and currency takes
//! the same transaction lock first, and the row is inserted only if the platform's balance, as
//! committed by then, covers it. The check and the debit are one transaction, so two
//! transfers can never both spend the same funds, whichever node runs them.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::outbox::insert_event;
use super::{pg_error, Db, StoreError};
use crate::domain::ledger::{merchant_payable, Entry};
use crate::domain::marketplace::seller_available;
use crate::domain::record::timestamp;
use crate::domain::{AccountId, JournalId, MerchantId};

/// Balance rows moved by transfers live in a slot of their own (no ledger shard and no
/// reconciliation run writes it): a balance is the sum of its slots.
pub const TRANSFER_SLOT: i16 = i16::MAX - 1;

const COLUMNS: &str = "id, platform_id, destination, amount, currency::text, amount_reversed, source_payment, \
    transfer_group, metadata, created_at";

#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    pub id: String,
    pub platform_id: MerchantId,
    pub destination: AccountId,
    pub amount: i64,
    pub currency: String,
    pub amount_reversed: i64,
    pub source_payment: Option<String>,
    pub transfer_group: Option<String>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

impl Transfer {
    pub fn to_object(&self) -> Value {
        json!({
            "object": "transfer",
            "id": self.id,
            "amount": self.amount,
            "currency": self.currency,
            "destination": self.destination,
            "amount_reversed": self.amount_reversed,
            "reversed": self.amount_reversed == self.amount,
            "source_payment": self.source_payment,
            "transfer_group": self.transfer_group,
            "metadata": self.metadata,
            "created_at": timestamp(self.created_at),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reversal {
    pub id: String,
    pub transfer_id: String,
    pub amount: i64,
    pub created_at: DateTime<Utc>,
}

impl Reversal {
    pub fn to_object(&self, transfer: &Transfer) -> Value {
        json!({
            "object": "transfer_reversal",
            "id": self.id,
            "transfer": self.transfer_id,
            "amount": self.amount,
            "currency": transfer.currency,
            "created_at": timestamp(self.created_at),
        })
    }
}

/// How a transfer or reversal ended.
#[derive(Debug)]
pub enum Moved<T> {
    /// Made now.
    Created(T),
    /// Made earlier by a request with the same idempotency key.
    Existing(T),
    /// The platform's balance does not cover it (a transfer), or it is more than what is
    /// left of the transfer (a reversal).
    Insufficient,
    /// The seller's available balance does not cover it (a reversal).
    Uncovered,
    /// No such transfer (a reversal).
    NotFound,
    /// The id, derived from the request's idempotency key, names a reversal of another
    /// transfer: the key was used before, for something else (its record since expired).
    Reused,
    /// The seller's account is disabled (a payout): it is not paid out.
    Inactive,
}

fn from_row(row: &tokio_postgres::Row) -> Transfer {
    Transfer {
        id: row.get(0),
        platform_id: MerchantId::from_trusted(row.get(1)),
        destination: AccountId::from_trusted(row.get(2)),
        amount: row.get(3),
        currency: row.get(4),
        amount_reversed: row.get(5),
        source_payment: row.get(6),
        transfer_group: row.get(7),
        metadata: row.get(8),
        created_at: row.get(9),
    }
}

/// The lock every transfer (and payout) of a platform's balance in a currency takes first.
pub(super) async fn lock_balance(
    tx: &tokio_postgres::Transaction<'_>,
    platform: &str,
    currency: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('payable:' || $1 || ':' || $2))",
        &[&platform, &currency],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// One balanced journal of no payment, its entries and the balance rows it moves; returns its id.
pub(super) async fn post(
    tx: &tokio_postgres::Transaction<'_>,
    kind: &str,
    correlation: &str,
    merchant: &str,
    currency: &str,
    entries: &[Entry],
    at: DateTime<Utc>,
) -> Result<String, StoreError> {
    if !crate::domain::ledger::is_balanced(entries) {
        tracing::error!(kind, correlation, "a transfer journal does not balance; refused");
        return Err(StoreError::Broken);
    }
    let id = JournalId::generate().to_string();
    tx.execute(
        "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
         VALUES ($1, NULL, $2, $3, $4, $5, $6)",
        &[&id, &merchant, &kind, &correlation, &currency, &at],
    )
    .await
    .map_err(pg_error)?;
    // All of a journal's entries in one statement: the database checks the journal balances
    // when the statement ends.
    let accounts: Vec<&str> = entries.iter().map(|e| e.account.as_str()).collect();
    let debits: Vec<i64> = entries.iter().map(|e| e.debit).collect();
    let credits: Vec<i64> = entries.iter().map(|e| e.credit).collect();
    tx.execute(
        "INSERT INTO entries (journal_id, account, currency, debit, credit)
         SELECT $1, a, $2, d, c FROM unnest($3::text[], $4::int8[], $5::int8[]) AS u(a, d, c)",
        &[&id, &currency, &accounts, &debits, &credits],
    )
    .await
    .map_err(pg_error)?;
    // In account order, so that two transactions lock shared balance rows in the same order.
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.account.cmp(&b.account));
    for e in sorted {
        tx.execute(
            "INSERT INTO ledger_accounts (account, currency, slot, debit_total, credit_total) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account, currency, slot) DO UPDATE SET
                 debit_total = ledger_accounts.debit_total + excluded.debit_total,
                 credit_total = ledger_accounts.credit_total + excluded.credit_total",
            &[&e.account, &currency, &TRANSFER_SLOT, &e.debit, &e.credit],
        )
        .await
        .map_err(pg_error)?;
    }
    Ok(id)
}

impl Db {
    /// Makes transfer `t` if the platform's balance covers it, or finds the one its id names.
    pub async fn create_transfer(&self, t: &Transfer) -> Result<Moved<Transfer>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let platform = t.platform_id.as_str();
        lock_balance(&tx, platform, &t.currency).await?;
        if let Some(row) = tx
            .query_opt(&format!("SELECT {COLUMNS} FROM transfers WHERE id = $1"), &[&t.id])
            .await
            .map_err(pg_error)?
        {
            return Ok(Moved::Existing(from_row(&row)));
        }
        // The destination as it is now, held so: an account disabled or restricted since the
        // request read it (or while this waited for the balance lock) receives nothing, and one
        // being changed waits for this transfer.
        let status = tx
            .query_opt(
                "SELECT status FROM connected_accounts WHERE id = $1 AND platform_id = $2 FOR SHARE",
                &[&t.destination.as_str(), &platform],
            )
            .await
            .map_err(pg_error)?;
        if status.is_none_or(|r| r.get::<_, &str>(0) != "active") {
            return Ok(Moved::Inactive);
        }
        let payable = merchant_payable(&t.platform_id);
        let row = tx
            .query_opt(
                &format!(
                    "INSERT INTO transfers (id, platform_id, destination, amount, currency, source_payment, transfer_group,
                         metadata, created_at)
                     SELECT $1, $2, $3, $4::bigint, $5, $6, $7, $8, $9
                     WHERE (SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts
                            WHERE account = $10 AND currency = $5)
                         - (SELECT coalesce(sum(amount), 0)::bigint FROM refunds
                            WHERE merchant_id = $2 AND currency = $5 AND status = 'pending') >= $4::bigint
                     RETURNING {COLUMNS}"
                ),
                &[
                    &t.id,
                    &platform,
                    &t.destination.as_str(),
                    &t.amount,
                    &t.currency,
                    &t.source_payment,
                    &t.transfer_group,
                    &t.metadata,
                    &t.created_at,
                    &payable,
                ],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else {
            return Ok(Moved::Insufficient);
        };
        let stored = from_row(&row);
        let entries = [
            Entry::debit(payable, t.amount),
            Entry::credit(seller_available(&t.destination), t.amount),
        ];
        post(&tx, "transfer", &t.id, platform, &t.currency, &entries, t.created_at).await?;
        insert_event(&tx, platform, "transfer.created", &stored.to_object()).await?;
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        Ok(Moved::Created(stored))
    }

    pub async fn transfer(&self, platform: &MerchantId, id: &str) -> Result<Option<Transfer>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM transfers WHERE id = $1 AND platform_id = $2"),
                &[&id, &platform.as_str()],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(from_row))
    }

    /// A page of the platform's transfers, newest first, and whether more follow.
    pub async fn list_transfers(
        &self,
        platform: &MerchantId,
        limit: i64,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Transfer>, bool), StoreError> {
        self.platform_page("transfers", COLUMNS, platform, limit, starting_after, |r| {
            Ok(from_row(r))
        })
        .await
    }

    /// Reverses `amount` of the platform's transfer (`None`: what is left of it), or finds the
    /// reversal `reversal_id` names. Only what the seller still has available comes back: the
    /// seller's balance is locked as a seller's payout locks it and must cover the reversal, so
    /// money the seller was paid out is never also returned to the platform to pay out again.
    pub async fn reverse_transfer(
        &self,
        platform: &MerchantId,
        transfer_id: &str,
        reversal_id: &str,
        amount: Option<i64>,
    ) -> Result<Moved<(Transfer, Reversal)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // The transfer's row lock serializes its reversals.
        let Some(current) = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM transfers WHERE id = $1 AND platform_id = $2 FOR UPDATE"),
                &[&transfer_id, &platform.as_str()],
            )
            .await
            .map_err(pg_error)?
        else {
            return Ok(Moved::NotFound);
        };
        let current = from_row(&current);
        if let Some(r) = tx
            .query_opt(
                "SELECT id, transfer_id, amount, created_at FROM transfer_reversals WHERE id = $1",
                &[&reversal_id],
            )
            .await
            .map_err(pg_error)?
        {
            if r.get::<_, &str>(1) != transfer_id {
                return Ok(Moved::Reused);
            }
            let r = Reversal {
                id: r.get(0),
                transfer_id: r.get(1),
                amount: r.get(2),
                created_at: r.get(3),
            };
            return Ok(Moved::Existing((current, r)));
        }
        let left = current.amount - current.amount_reversed;
        let amount = amount.unwrap_or(left);
        if amount <= 0 || amount > left {
            return Ok(Moved::Insufficient);
        }
        // After the transfer's row lock: a seller's payout takes only the balance's, so the
        // two locks are never waited for in the opposite order.
        lock_balance(&tx, &format!("available:{}", current.destination), &current.currency).await?;
        let available: i64 = tx
            .query_one(
                "SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts
                 WHERE account = $1 AND currency = $2",
                &[&seller_available(&current.destination), &current.currency],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if available < amount {
            return Ok(Moved::Uncovered);
        }
        let row = tx
            .query_one(
                &format!(
                    "UPDATE transfers SET amount_reversed = amount_reversed + $2 WHERE id = $1 RETURNING {COLUMNS}"
                ),
                &[&transfer_id, &amount],
            )
            .await
            .map_err(pg_error)?;
        let updated = from_row(&row);
        let at = Utc::now();
        tx.execute(
            "INSERT INTO transfer_reversals (id, transfer_id, amount, created_at) VALUES ($1, $2, $3, $4)",
            &[&reversal_id, &transfer_id, &amount, &at],
        )
        .await
        .map_err(pg_error)?;
        let entries = [
            Entry::debit(seller_available(&updated.destination), amount),
            Entry::credit(merchant_payable(platform), amount),
        ];
        post(
            &tx,
            "transfer_reversal",
            reversal_id,
            platform.as_str(),
            &updated.currency,
            &entries,
            at,
        )
        .await?;
        insert_event(&tx, platform.as_str(), "transfer.reversed", &updated.to_object()).await?;
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        let reversal = Reversal {
            id: reversal_id.to_owned(),
            transfer_id: transfer_id.to_owned(),
            amount,
            created_at: at,
        };
        Ok(Moved::Created((updated, reversal)))
    }
}
