//! Connected accounts: a platform's sellers (docs/API.md, "Connected accounts"). Who a seller
//! is lives here; what it has lives in the ledger (`seller_pending:{acct}`,
//! `seller_available:{acct}`). Each change writes its `account.*` event in the same
//! transaction.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::outbox::insert_event;
use super::{pg_error, Db, StoreError};
use crate::domain::ledger::Entry;
use crate::domain::marketplace::{seller_available, seller_pending};
use crate::domain::record::timestamp;
use crate::domain::{AccountId, MerchantId};

const COLUMNS: &str = "id, platform_id, name, email, country, default_currency, status, payout_interval, \
    payout_delay_days, payout_minimum, metadata, created_at, updated_at, bank_account";

/// Platforms list at most this many accounts per page.
pub const MAX_PAGE: i64 = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub id: AccountId,
    pub platform_id: MerchantId,
    pub name: String,
    pub email: Option<String>,
    pub country: String,
    pub default_currency: String,
    /// `active`, `restricted` (keeps its funds, receives none) or `disabled`.
    pub status: String,
    pub payout_interval: String,
    pub payout_delay_days: i32,
    pub payout_minimum: i64,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Where its payouts go: a bank account token of the payout rail.
    pub bank_account: String,
}

impl Account {
    /// docs/API.md's Account object.
    pub fn to_object(&self) -> Value {
        json!({
            "object": "account",
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "country": self.country,
            "default_currency": self.default_currency,
            "status": self.status,
            "payout_schedule": {
                "interval": self.payout_interval,
                "delay_days": self.payout_delay_days,
                "minimum": self.payout_minimum,
            },
            "bank_account": self.bank_account,
            "metadata": self.metadata,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
        })
    }

    /// Whether new funds (splits, transfers) may go to it.
    pub fn receives_funds(&self) -> bool {
        self.status == "active"
    }
}

/// The fields an update may change; `None` leaves one as it is.
#[derive(Debug, Default)]
pub struct AccountUpdate {
    pub name: Option<String>,
    pub email: Option<String>,
    pub status: Option<String>,
    pub payout_interval: Option<String>,
    pub payout_delay_days: Option<i32>,
    pub payout_minimum: Option<i64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub bank_account: Option<String>,
}

fn from_row(row: &tokio_postgres::Row) -> Result<Account, StoreError> {
    let metadata: Value = row.get(10);
    Ok(Account {
        id: AccountId::from_trusted(row.get(0)),
        platform_id: MerchantId::from_trusted(row.get(1)),
        name: row.get(2),
        email: row.get(3),
        country: row.get(4),
        default_currency: row.get(5),
        status: row.get(6),
        payout_interval: row.get(7),
        payout_delay_days: row.get(8),
        payout_minimum: row.get(9),
        metadata: serde_json::from_value(metadata).map_err(|_| StoreError::Broken)?,
        created_at: row.get(11),
        updated_at: row.get(12),
        bank_account: row.get(13),
    })
}

/// A balance per currency: (currency, pending, available).
pub type Balances = Vec<(String, i64, i64)>;

impl Db {
    /// Creates the account unless one with its id exists (a retry whose idempotency record
    /// expired): returns the stored account and whether it was made now.
    pub async fn insert_account(&self, a: &Account) -> Result<(Account, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let metadata = serde_json::to_value(&a.metadata).map_err(|_| StoreError::Broken)?;
        let row = tx
            .query_opt(
                &format!(
                    "INSERT INTO connected_accounts ({COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                     ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}"
                ),
                &[
                    &a.id.as_str(),
                    &a.platform_id.as_str(),
                    &a.name,
                    &a.email,
                    &a.country,
                    &a.default_currency,
                    &a.status,
                    &a.payout_interval,
                    &a.payout_delay_days,
                    &a.payout_minimum,
                    &metadata,
                    &a.created_at,
                    &a.updated_at,
                    &a.bank_account,
                ],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else {
            drop(tx);
            let existing = self.account(&a.platform_id, &a.id).await?.ok_or(StoreError::Broken)?;
            return Ok((existing, false));
        };
        let stored = from_row(&row)?;
        insert_event(&tx, stored.platform_id.as_str(), "account.created", &stored.to_object()).await?;
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        Ok((stored, true))
    }

    /// The platform's account `id`; another platform's is `None`, as one that does not exist.
    pub async fn account(&self, platform: &MerchantId, id: &AccountId) -> Result<Option<Account>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM connected_accounts WHERE id = $1 AND platform_id = $2"
            ))
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&id.as_str(), &platform.as_str()])
            .await
            .map_err(pg_error)?;
        row.as_ref().map(from_row).transpose()
    }

    /// The platform's accounts among `ids` (for a payment's splits). Read by primary key and
    /// filtered here: a platform with many sellers made the planner walk all of them by
    /// `platform_id` (1.3 ms a payment with 10,000 sellers).
    pub async fn accounts_of(&self, platform: &MerchantId, ids: &[&str]) -> Result<Vec<Account>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {COLUMNS} FROM connected_accounts WHERE id = ANY($1)"))
            .await
            .map_err(pg_error)?;
        let rows = client.query(&stmt, &[&ids]).await.map_err(pg_error)?;
        let accounts = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        Ok(accounts.into_iter().filter(|a| a.platform_id == *platform).collect())
    }

    /// A page of the platform's accounts, newest first, and whether more follow.
    pub async fn list_accounts(
        &self,
        platform: &MerchantId,
        limit: i64,
        starting_after: Option<&AccountId>,
    ) -> Result<(Vec<Account>, bool), StoreError> {
        let after = starting_after.map(|a| a.as_str());
        self.platform_page(
            "connected_accounts",
            COLUMNS,
            platform,
            limit.min(MAX_PAGE),
            after,
            from_row,
        )
        .await
    }

    /// Applies `u` to the platform's account `id` with its `account.updated` event; `None` if
    /// the platform has no such account.
    pub async fn update_account(
        &self,
        platform: &MerchantId,
        id: &AccountId,
        u: &AccountUpdate,
    ) -> Result<Option<Account>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let metadata = u
            .metadata
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(|_| StoreError::Broken)?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE connected_accounts SET name = coalesce($3, name), email = coalesce($4, email),
                         status = coalesce($5, status), payout_interval = coalesce($6, payout_interval),
                         payout_delay_days = coalesce($7, payout_delay_days),
                         payout_minimum = coalesce($8, payout_minimum), metadata = coalesce($9, metadata),
                         bank_account = coalesce($10, bank_account), updated_at = now()
                     WHERE id = $1 AND platform_id = $2 RETURNING {COLUMNS}"
                ),
                &[
                    &id.as_str(),
                    &platform.as_str(),
                    &u.name,
                    &u.email,
                    &u.status,
                    &u.payout_interval,
                    &u.payout_delay_days,
                    &u.payout_minimum,
                    &metadata,
                    &u.bank_account,
                ],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else { return Ok(None) };
        let stored = from_row(&row)?;
        insert_event(&tx, stored.platform_id.as_str(), "account.updated", &stored.to_object()).await?;
        tx.commit().await.map_err(pg_error)?;
        self.outbox_committed();
        Ok(Some(stored))
    }

    /// What the ledger holds for a seller, per currency: pending and available.
    pub async fn account_balances(&self, id: &AccountId) -> Result<Balances, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT account, currency::text, sum(credit_total - debit_total)::bigint FROM ledger_accounts
                 WHERE account = ANY($1) GROUP BY account, currency ORDER BY currency",
            )
            .await
            .map_err(pg_error)?;
        let (pending, available) = (seller_pending(id), seller_available(id));
        let rows = client
            .query(&stmt, &[&vec![pending.as_str(), available.as_str()]])
            .await
            .map_err(pg_error)?;
        let mut by_currency: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for row in rows {
            let account: String = row.get(0);
            let amount: i64 = row.get(2);
            let b = by_currency.entry(row.get(1)).or_default();
            if account == pending {
                b.0 += amount;
            } else {
                b.1 += amount;
            }
        }
        Ok(by_currency.into_iter().map(|(c, (p, a))| (c, p, a)).collect())
    }

    /// Moves sellers' funds whose `available_on` has come from pending to available: at most
    /// `limit` captured credits, one `funds_available` journal per account and currency
    /// (`Dr seller_pending / Cr seller_available`), in one transaction. Rows another node is
    /// releasing are skipped; each credit is released once. Returns how many were released.
    pub async fn release_seller_funds(&self, limit: i64) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let rows = tx
            .query(
                "SELECT f.entry_id, f.account, f.currency::text, f.amount, a.platform_id
                 FROM seller_pending_funds f JOIN connected_accounts a ON a.id = f.account
                 WHERE f.released_journal IS NULL AND f.available_on <= now()
                 ORDER BY f.available_on, f.entry_id LIMIT $1
                 FOR UPDATE OF f SKIP LOCKED",
                &[&limit.clamp(1, 10_000)],
            )
            .await
            .map_err(pg_error)?;
        // (account, currency) → (platform, entry ids, total), in order: one journal each.
        let mut groups: BTreeMap<(String, String), (String, Vec<i64>, i64)> = BTreeMap::new();
        for r in &rows {
            let g = groups
                .entry((r.get(1), r.get(2)))
                .or_insert_with(|| (r.get(4), Vec::new(), 0));
            g.1.push(r.get(0));
            g.2 = g.2.checked_add(r.get::<_, i64>(3)).ok_or(StoreError::Broken)?;
        }
        let now = Utc::now();
        for ((account, currency), (platform, entries, total)) in &groups {
            let acct = AccountId::from_trusted(account.clone());
            let lines = [
                Entry::debit(seller_pending(&acct), *total),
                Entry::credit(seller_available(&acct), *total),
            ];
            // Keyed by the first credit it releases: a credit is released once, so is the key.
            let key = format!("release:{}", entries[0]);
            let journal = super::transfers::post(&tx, "funds_available", &key, platform, currency, &lines, now).await?;
            tx.execute(
                "UPDATE seller_pending_funds SET released_journal = $1 WHERE entry_id = ANY($2)",
                &[&journal, entries],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(rows.len())
    }
}
