//! Payouts (docs/API.md, "Payouts"): a seller's available funds, or the platform's own balance,
//! sent to a bank account through the payout rail.
//!
//! | when | journal | entries |
//! | --- | --- | --- |
//! | created | `payout` | Dr source / Cr `payouts_in_transit` |
//! | paid | `payout_paid` | Dr `payouts_in_transit` / Cr `bank` |
//! | failed or canceled | `payout_returned` | Dr `payouts_in_transit` / Cr source (after paid: Dr `bank`) |
//!
//! The source is `seller_available:{acct}`, or `merchant_payable:{platform}` for a payout of the
//! platform's own balance. Like a transfer, a payout takes the source's balance lock and is
//! inserted only where the committed balance covers it, with its journal, in one transaction.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};

use super::outbox::insert_event;
use super::transfers::{lock_balance, post, Moved};
use super::{pg_error, Db, StoreError};
use crate::domain::ledger::{merchant_payable, Entry};
use crate::domain::marketplace::seller_available;
use crate::domain::record::timestamp;
use crate::domain::{AccountId, MerchantId};

pub const PAYOUTS_IN_TRANSIT: &str = "payouts_in_transit";
pub const BANK: &str = "bank";

const COLUMNS: &str = "id, platform_id, account, amount, currency::text, status, bank_account, automatic, \
    failure_code, created_at, updated_at";

#[derive(Debug, Clone, PartialEq)]
pub struct Payout {
    pub id: String,
    pub platform_id: MerchantId,
    /// The seller paid out; `None`: the platform's own balance.
    pub account: Option<AccountId>,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub bank_account: String,
    /// Made by the account's payout schedule, not by a request.
    pub automatic: bool,
    pub failure_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Payout {
    pub fn to_object(&self) -> Value {
        json!({
            "object": "payout",
            "id": self.id,
            "account": self.account,
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "bank_account": self.bank_account,
            "automatic": self.automatic,
            "failure_code": self.failure_code,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
        })
    }

    /// The ledger account the money leaves.
    fn source(&self) -> String {
        match &self.account {
            Some(a) => seller_available(a),
            None => merchant_payable(&self.platform_id),
        }
    }

    /// The balance lock the payout shares with every other spender of its source.
    fn lock_key(&self) -> String {
        match &self.account {
            Some(a) => format!("available:{a}"),
            None => self.platform_id.to_string(),
        }
    }
}

/// What a payout event did.
#[derive(Debug, PartialEq, Eq)]
pub enum PayoutEvent {
    Applied,
    /// Recorded, nothing moved: its amount or currency is not the payout's, or it reports an
    /// outcome for a canceled payout. Logged as an error for an operator.
    Refused,
    /// This event id was applied before.
    Duplicate,
    /// No payout with this id (yet).
    Unknown,
}

fn from_row(row: &tokio_postgres::Row) -> Payout {
    Payout {
        id: row.get(0),
        platform_id: MerchantId::from_trusted(row.get(1)),
        account: row.get::<_, Option<String>>(2).map(AccountId::from_trusted),
        amount: row.get(3),
        currency: row.get(4),
        status: row.get(5),
        bank_account: row.get(6),
        automatic: row.get(7),
        failure_code: row.get(8),
        created_at: row.get(9),
        updated_at: row.get(10),
    }
}

impl Db {
    /// Makes payout `p` (status `pending`) if its source's balance covers it, or finds the one
    /// its id names.
    pub async fn create_payout(&self, p: &Payout) -> Result<Moved<Payout>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        lock_balance(&tx, &p.lock_key(), &p.currency).await?;
        if let Some(row) = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM payouts WHERE id = $1 AND platform_id = $2"),
                &[&p.id, &p.platform_id.as_str()],
            )
            .await
            .map_err(pg_error)?
        {
            return Ok(Moved::Existing(from_row(&row)));
        }
        if let Some(account) = &p.account {
            // Share-locked: a disabling that commits first is seen, one that comes later waits
            // for this payout (and the payout, still `pending`, is not handed on: below).
            let status = tx
                .query_opt(
                    "SELECT status FROM connected_accounts WHERE id = $1 AND platform_id = $2 FOR SHARE",
                    &[&account.as_str(), &p.platform_id.as_str()],
                )
                .await
                .map_err(pg_error)?;
            if status.is_none_or(|r| r.get::<_, &str>(0) == "disabled") {
                return Ok(Moved::Inactive);
            }
        }
        let source = p.source();
        let row = tx
            .query_opt(
                &format!(
                    "INSERT INTO payouts (id, platform_id, account, amount, currency, status, bank_account, automatic,
                         created_at, updated_at)
                     SELECT $1, $2, $3, $4::bigint, $5, 'pending', $6, $7, now(), now()
                     WHERE (SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts
                            WHERE account = $8 AND currency = $5)
                         -- The platform's own balance still owes its pending refunds.
                         - (SELECT coalesce(sum(amount), 0)::bigint FROM refunds
                            WHERE $3::text IS NULL AND merchant_id = $2 AND currency = $5 AND status = 'pending')
                         >= $4::bigint
                     RETURNING {COLUMNS}"
                ),
                &[
                    &p.id,
                    &p.platform_id.as_str(),
                    &p.account.as_ref().map(|a| a.as_str()),
                    &p.amount,
                    &p.currency,
                    &p.bank_account,
                    &p.automatic,
                    &source,
                ],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else {
            return Ok(Moved::Insufficient);
        };
        let stored = from_row(&row);
        let entries = [
            Entry::debit(source, p.amount),
            Entry::credit(PAYOUTS_IN_TRANSIT, p.amount),
        ];
        let platform = p.platform_id.as_str();
        post(&tx, "payout", &p.id, platform, &p.currency, &entries, stored.created_at).await?;
        insert_event(&tx, platform, "payout.created", &stored.to_object()).await?;
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        Ok(Moved::Created(stored))
    }

    /// The payout is handed to the rail: `pending` → `in_transit`, committed BEFORE the rail is
    /// called, so a payout the rail may have is never cancelable (an outcome that came first
    /// stays). A seller's payout whose account is disabled stays `pending` (cancelable; handed
    /// on if the account is enabled again).
    pub async fn payout_in_transit(&self, id: &str) -> Result<Option<Payout>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE payouts SET status = 'in_transit', updated_at = now() WHERE id = $1 AND status = 'pending'
                       AND (account IS NULL OR EXISTS (SELECT 1 FROM connected_accounts a
                                                       WHERE a.id = payouts.account AND a.status <> 'disabled' FOR SHARE))
                     RETURNING {COLUMNS}"
                ),
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        let moved = row.as_ref().map(from_row);
        if let Some(p) = &moved {
            insert_event(&tx, p.platform_id.as_str(), "payout.updated", &p.to_object()).await?;
        }
        tx.commit().await.map_err(pg_error)?;
        if moved.is_some() {
            self.outbox_committed();
        }
        match moved {
            Some(p) => Ok(Some(p)),
            None => self.payout_by_id(id).await,
        }
    }

    async fn payout_by_id(&self, id: &str) -> Result<Option<Payout>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {COLUMNS} FROM payouts WHERE id = $1"), &[&id])
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(from_row))
    }

    pub async fn payout(&self, platform: &MerchantId, id: &str) -> Result<Option<Payout>, StoreError> {
        Ok(self.payout_by_id(id).await?.filter(|p| p.platform_id == *platform))
    }

    /// A page of the platform's payouts, newest first, and whether more follow.
    pub async fn list_payouts(
        &self,
        platform: &MerchantId,
        limit: i64,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Payout>, bool), StoreError> {
        self.platform_page("payouts", COLUMNS, platform, limit, starting_after, |r| Ok(from_row(r)))
            .await
    }

    /// Cancels the platform's payout while it is still `pending` (the rail has not taken it):
    /// its money goes back to its source. `None` if there is no such payout; the payout as it
    /// stands otherwise (a payout past `pending` is not changed).
    pub async fn cancel_payout(&self, platform: &MerchantId, id: &str) -> Result<Option<Payout>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let Some(row) = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM payouts WHERE id = $1 AND platform_id = $2 FOR UPDATE"),
                &[&id, &platform.as_str()],
            )
            .await
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let current = from_row(&row);
        if current.status != "pending" {
            return Ok(Some(current));
        }
        let updated = self.finish(&tx, &current, "canceled", None).await?;
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        Ok(Some(updated))
    }

    /// Applies the rail's event (`payout.paid`, `payout.failed`) once per event id: the status
    /// moves on and its journal posts in the same transaction as the event is recorded.
    pub async fn apply_payout_event(
        &self,
        provider: &str,
        event_id: &str,
        event_type: &str,
        reference: &str,
        object: &Value,
        raw: &[u8],
    ) -> Result<PayoutEvent, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let Some(row) = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM payouts WHERE id = $1 FOR UPDATE"),
                &[&reference],
            )
            .await
            .map_err(pg_error)?
        else {
            return Ok(PayoutEvent::Unknown);
        };
        let fresh = tx
            .execute(
                "INSERT INTO processed_events (provider, event_id, event_type, raw) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&provider, &event_id, &event_type, &raw],
            )
            .await
            .map_err(pg_error)?;
        if fresh == 0 {
            return Ok(PayoutEvent::Duplicate);
        }
        let current = from_row(&row);
        // An outcome names the payout's amount and currency; one that leaves either out is not
        // the rail's report of this payout, and moves nothing.
        let amount_differs = object["amount"].as_i64() != Some(current.amount);
        let currency_differs = !object["currency"]
            .as_str()
            .is_some_and(|c| c.eq_ignore_ascii_case(&current.currency));
        if amount_differs || currency_differs || current.status == "canceled" {
            tracing::error!(payout = %current.id, event_id, event_type, status = %current.status,
                amount_differs, currency_differs, "a payout event that cannot apply: recorded, nothing moved");
            tx.commit().await.map_err(pg_error)?;
            return Ok(PayoutEvent::Refused);
        }
        let open = matches!(current.status.as_str(), "pending" | "in_transit");
        match event_type {
            "payout.paid" if open => {
                self.finish(&tx, &current, "paid", None).await?;
            }
            // A failure, before or after the money reached the bank (a returned payout).
            "payout.failed" if open || current.status == "paid" => {
                let code = object["failure_code"]
                    .as_str()
                    .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    .unwrap_or("unknown");
                self.finish(&tx, &current, "failed", Some(code)).await?;
            }
            // Late or out of order: recorded, nothing moves.
            _ => {}
        }
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        Ok(PayoutEvent::Applied)
    }

    /// Moves `p` to `status` with its journal and event, in `tx`.
    async fn finish(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        p: &Payout,
        status: &str,
        failure_code: Option<&str>,
    ) -> Result<Payout, StoreError> {
        let row = tx
            .query_one(
                &format!(
                    "UPDATE payouts SET status = $2, failure_code = $3, updated_at = now() WHERE id = $1
                     RETURNING {COLUMNS}"
                ),
                &[&p.id, &status, &failure_code],
            )
            .await
            .map_err(pg_error)?;
        let updated = from_row(&row);
        let (kind, entries) = match status {
            "paid" => (
                "payout_paid",
                [
                    Entry::debit(PAYOUTS_IN_TRANSIT, p.amount),
                    Entry::credit(BANK, p.amount),
                ],
            ),
            // The money comes back to its source: from the rail, or from the bank if it was paid.
            _ => {
                let from = if p.status == "paid" { BANK } else { PAYOUTS_IN_TRANSIT };
                (
                    "payout_returned",
                    [Entry::debit(from, p.amount), Entry::credit(p.source(), p.amount)],
                )
            }
        };
        let platform = p.platform_id.as_str();
        post(tx, kind, &p.id, platform, &p.currency, &entries, Utc::now()).await?;
        insert_event(tx, platform, &format!("payout.{status}"), &updated.to_object()).await?;
        Ok(updated)
    }

    /// Per currency, what payouts still on their way (`pending`, `in_transit`) hold: of `account`,
    /// or of the platform's own balance when `None`.
    pub async fn payouts_in_flight(
        &self,
        platform: &MerchantId,
        account: Option<&AccountId>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT currency::text, sum(amount)::bigint FROM payouts
                 WHERE platform_id = $1 AND account IS NOT DISTINCT FROM $2 AND status IN ('pending', 'in_transit')
                 GROUP BY currency ORDER BY currency",
                &[&platform.as_str(), &account.map(|a| a.as_str())],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Payouts the rail may not have taken or answered: `pending` or `in_transit` and unchanged
    /// for `older_than_secs`, oldest first; each is marked as looked at now, so the next
    /// `limit` are others (each is handed again once per `older_than_secs`, not every tick).
    pub async fn open_payouts(&self, older_than_secs: i64, limit: i64) -> Result<Vec<Payout>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "UPDATE payouts SET updated_at = now() WHERE id IN (
                         SELECT id FROM payouts WHERE status IN ('pending', 'in_transit')
                           AND updated_at < now() - make_interval(secs => $1::float8)
                         ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING {COLUMNS}"
                ),
                &[&(older_than_secs as f64), &limit],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// Sellers whose payout schedule says "now": active, `daily` (or `weekly` on a Monday,
    /// UTC), with an available balance of at least their minimum (and more than nothing), per
    /// currency. Days are the database's (UTC), as is every payout's `created_at`, so that
    /// nodes whose clocks disagree near midnight agree on which day a payout is of.
    pub async fn scheduled_payouts_due(&self, limit: i64) -> Result<Vec<ScheduledPayout>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT a.platform_id, a.id, b.currency::text, b.available, a.bank_account,
                        (now() AT TIME ZONE 'UTC')::date
                 FROM connected_accounts a
                 JOIN LATERAL (SELECT currency, sum(credit_total - debit_total)::bigint AS available
                               FROM ledger_accounts WHERE account = 'seller_available:' || a.id
                               GROUP BY currency) b ON true
                 WHERE a.status = 'active'
                   AND (a.payout_interval = 'daily'
                        OR (a.payout_interval = 'weekly' AND extract(isodow FROM now() AT TIME ZONE 'UTC') = 1))
                   AND b.available >= greatest(a.payout_minimum, 1)
                   -- Paid out today already: not due again before tomorrow (so the next ones are).
                   AND NOT EXISTS (SELECT 1 FROM payouts p WHERE p.account = a.id AND p.currency = b.currency
                                     AND p.automatic AND p.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                 ORDER BY a.id, b.currency LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| ScheduledPayout {
                platform: MerchantId::from_trusted(r.get(0)),
                account: AccountId::from_trusted(r.get(1)),
                currency: r.get(2),
                available: r.get(3),
                bank_account: r.get(4),
                day: r.get(5),
            })
            .collect())
    }
}

/// A seller due a scheduled payout: what it is paid, in which currency, on which (UTC) day.
pub struct ScheduledPayout {
    pub platform: MerchantId,
    pub account: AccountId,
    pub currency: String,
    pub available: i64,
    pub bank_account: String,
    pub day: NaiveDate,
}
