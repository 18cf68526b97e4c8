//! Idempotency records (docs/API.md, "Idempotency"): one row per (merchant, key).

use super::{pg_error, Db, StoreError};
use crate::domain::MerchantId;

/// What a request with an `Idempotency-Key` may do.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// The key is ours; `resource_id` is what an earlier, interrupted attempt already created.
    Proceed { resource_id: Option<String>, fence: i64 },
    /// The first request finished: answer exactly what it answered.
    Replay { status: u16, body: Vec<u8> },
    /// The first request is still running.
    InFlight,
    /// The key was used with another method, path or body.
    Mismatch,
}

/// Cluster mode: the process claiming a key, and how to list the processes of the cluster's
/// live nodes (a key claimed by any other is abandoned). The list is made only when a key is
/// found already claimed, not on every request.
pub struct Claimant<'a> {
    pub holder: &'a str,
    /// The live processes, or `None` when this node cannot tell (its view of the cluster is
    /// not trusted): then a key is taken over only once its lease has run out.
    pub live: &'a (dyn Fn() -> Option<Vec<String>> + Sync),
}

/// A key a request's first commit claims itself, instead of a claim's own transaction before it
/// (docs/DESIGN.md, "A key claimed by the payment's first commit"): what the claim's row holds.
/// The commit inserts the row, or fails as `KeyHeld` if any row holds the key already.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyClaim {
    /// [`crate::api::idempotency::fingerprint`] of the request.
    pub fingerprint: Vec<u8>,
    /// `[idempotency] in_flight_lease_ms`.
    pub lease_ms: u64,
    /// Cluster mode: the claiming process, as a claim names it.
    pub holder: Option<String>,
}

/// What [`Db::idempotency_release_first`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The request's own row, freed.
    Ours,
    /// No row: the request ended before its first commit, and nothing holds the key.
    NoRow,
    /// Another request's row holds the key.
    Held,
}

/// A key's claim waiting for its batch ([`Db::idempotency_begin_as`]).
pub struct Claim {
    merchant: String,
    key: String,
    fingerprint: Vec<u8>,
    lease: f64,
    holder: Option<String>,
}

/// Claims the batch's keys that no row holds yet, in one statement and one transaction
/// (committed with the WAL flush, as a single claim was). A key held already inserts nothing
/// and is not returned.
const CLAIM: &str = "INSERT INTO idempotency_keys (merchant_id, key, fingerprint, locked_until, holder)
    SELECT u.merchant_id, u.key, u.fingerprint, now() + make_interval(secs => u.lease), u.holder
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::float8[], $5::text[])
        AS u(merchant_id, key, fingerprint, lease, holder)
    ON CONFLICT (merchant_id, key) DO NOTHING RETURNING merchant_id, key";

impl Db {
    /// Writes one batch of claims and tells each whether it claimed its key. Within a batch a
    /// key asked for twice is claimed by its first request only: the second finds it held
    /// (and, once the batch has committed, in flight). A batch the database refuses is
    /// written again claim by claim, so one bad row fails only its own request.
    async fn write_claims(&self, batch: Vec<super::group::Waiting<Claim, bool>>) {
        let mut first = std::collections::HashSet::with_capacity(batch.len());
        let unique: Vec<bool> = batch
            .iter()
            .map(|w| first.insert((w.row.merchant.as_str(), w.row.key.as_str())))
            .collect();
        let rows: Vec<&Claim> = batch
            .iter()
            .zip(&unique)
            .filter(|(_, u)| **u)
            .map(|(w, _)| &w.row)
            .collect();
        let claimed = self.insert_claims(&rows).await;
        match claimed {
            Ok(claimed) => {
                for (w, unique) in batch.into_iter().zip(unique) {
                    let ours = unique && claimed.contains(&(w.row.merchant.clone(), w.row.key.clone()));
                    let _ = w.answer.send(Ok(ours));
                }
            }
            Err(StoreError::Broken) if rows.len() > 1 => {
                for (w, unique) in batch.into_iter().zip(unique) {
                    let answer = if unique {
                        self.insert_claims(&[&w.row]).await.map(|c| !c.is_empty())
                    } else {
                        Ok(false)
                    };
                    let _ = w.answer.send(answer);
                }
            }
            Err(e) => {
                for w in batch {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
        }
    }

    async fn insert_claims(&self, rows: &[&Claim]) -> Result<std::collections::HashSet<(String, String)>, StoreError> {
        // In key order: two nodes claiming overlapping keys at once then wait for each other in
        // the same order, never in a cycle (a deadlock would fail every claim of both batches).
        let mut rows = rows.to_vec();
        rows.sort_unstable_by(|a, b| (&a.merchant, &a.key).cmp(&(&b.merchant, &b.key)));
        let client = self.client().await?;
        let stmt = client.prepare_cached(CLAIM).await.map_err(pg_error)?;
        let merchants: Vec<&str> = rows.iter().map(|c| c.merchant.as_str()).collect();
        let keys: Vec<&str> = rows.iter().map(|c| c.key.as_str()).collect();
        let fingerprints: Vec<&[u8]> = rows.iter().map(|c| c.fingerprint.as_slice()).collect();
        let leases: Vec<f64> = rows.iter().map(|c| c.lease).collect();
        let holders: Vec<Option<&str>> = rows.iter().map(|c| c.holder.as_deref()).collect();
        Ok(client
            .query(&stmt, &[&merchants, &keys, &fingerprints, &leases, &holders])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    pub async fn idempotency_begin(
        &self,
        merchant: &MerchantId,
        key: &str,
        fingerprint: &[u8],
        lease_ms: u64,
    ) -> Result<Begin, StoreError> {
        self.idempotency_begin_as(merchant, key, fingerprint, lease_ms, None)
            .await
    }

    /// [`Db::idempotency_begin`]; in cluster mode (`claimant`), the claim names its process,
    /// and a key in flight whose process is not among the live ones is taken over at once.
    pub async fn idempotency_begin_as(
        &self,
        merchant: &MerchantId,
        key: &str,
        fingerprint: &[u8],
        lease_ms: u64,
        claimant: Option<&Claimant<'_>>,
    ) -> Result<Begin, StoreError> {
        let lease = lease_ms as f64 / 1000.0;
        let holder = claimant.map(|c| c.holder);
        // The common case, a key never seen: claimed by an insert, group-committed with the
        // claims of concurrent requests.
        let claim = Claim {
            merchant: merchant.as_str().to_owned(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_vec(),
            lease,
            holder: holder.map(str::to_owned),
        };
        let db = self.clone();
        let claimed = self
            .claims
            .submit(claim, move |batch| {
                let db = db.clone();
                async move { db.write_claims(batch).await }
            })
            .await?;
        if claimed {
            return Ok(Begin::Proceed {
                resource_id: None,
                fence: 1,
            });
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT fingerprint, response_status, response_body,
                        locked_until < now() OR coalesce(holder IS NOT NULL AND $3 AND NOT holder = ANY($4), false)
                 FROM idempotency_keys WHERE merchant_id = $1 AND key = $2",
            )
            .await
            .map_err(pg_error)?;
        // Taken over by departure only on a trusted view of who is live.
        let live: Option<Vec<String>> = claimant.and_then(|c| (c.live)());
        let cluster = live.is_some();
        let live = live.unwrap_or_default();
        let Some(row) = client
            .query_opt(&stmt, &[&merchant.as_str(), &key, &cluster, &live])
            .await
            .map_err(pg_error)?
        else {
            // Purged between the two statements: a retry will find the key free.
            return Ok(Begin::InFlight);
        };
        let stored: Vec<u8> = row.get(0);
        if stored != fingerprint {
            return Ok(Begin::Mismatch);
        }
        if let Some(status) = row.get::<_, Option<i16>>(1) {
            return Ok(Begin::Replay {
                status: status as u16,
                body: row.get::<_, Option<Vec<u8>>>(2).unwrap_or_default(),
            });
        }
        if !row.get::<_, bool>(3) {
            return Ok(Begin::InFlight);
        }
        // The first request died without an answer (a crash, a 5xx, its node gone from the
        // cluster), or its client gave up while it waited: take the key over, once, under a new
        // fence. The first request, if it still runs, can no longer complete the key (its
        // commits are fenced off).
        let stmt = client
            .prepare_cached(
                "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3), fence = fence + 1,
                        holder = $4
                 WHERE merchant_id = $1 AND key = $2 AND response_status IS NULL
                   AND (locked_until < now() OR (holder IS NOT NULL AND $5 AND NOT holder = ANY($6)))
                 RETURNING resource_id, fence",
            )
            .await
            .map_err(pg_error)?;
        match client
            .query_opt(&stmt, &[&merchant.as_str(), &key, &lease, &holder, &cluster, &live])
            .await
            .map_err(pg_error)?
        {
            Some(row) => Ok(Begin::Proceed {
                resource_id: row.get(0),
                fence: row.get(1),
            }),
            None => Ok(Begin::InFlight),
        }
    }

    /// The fingerprint a key was first used with, if it was; reads only.
    pub async fn idempotency_fingerprint(
        &self,
        merchant: &MerchantId,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT fingerprint FROM idempotency_keys WHERE merchant_id = $1 AND key = $2")
            .await
            .map_err(pg_error)?;
        Ok(client
            .query_opt(&stmt, &[&merchant.as_str(), &key])
            .await
            .map_err(pg_error)?
            .map(|r| r.get(0)))
    }

    /// Stores a response that no commit of the operation stored (a 4xx the operation produced),
    /// if the key still holds `fence`. Returns the answer the key holds instead, when a commit of
    /// this same request stored one (it landed, though reported failed, and the request ran
    /// again from the reloaded payment): that first answer is the request's.
    pub async fn idempotency_store(
        &self,
        merchant: &MerchantId,
        key: &str,
        fence: i64,
        status: u16,
        body: &[u8],
    ) -> Result<Option<(u16, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        // The answer already stored under this fence, if there is one: a commit of this request
        // that landed though it was reported failed stored its own answer, which is the key's.
        let stmt = client
            .prepare_cached(
                "WITH stored AS (
                     UPDATE idempotency_keys SET response_status = $3, response_body = $4
                     WHERE merchant_id = $1 AND key = $2 AND response_status IS NULL AND fence = $5
                     RETURNING 1)
                 SELECT response_status, response_body FROM idempotency_keys
                 WHERE merchant_id = $1 AND key = $2 AND fence = $5 AND response_status IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM stored)",
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&merchant.as_str(), &key, &(status as i16), &body, &fence])
            .await
            .map_err(pg_error)?;
        Ok(row.map(|r| {
            (
                r.get::<_, i16>(0) as u16,
                r.get::<_, Option<Vec<u8>>>(1).unwrap_or_default(),
            )
        }))
    }

    /// Frees a key whose request failed with a 5xx so that it may be retried at once. The row
    /// stays (with whatever `resource_id` it holds) so the retry continues rather than repeats.
    pub async fn idempotency_release(&self, merchant: &MerchantId, key: &str, fence: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE idempotency_keys SET locked_until = now() - interval '1 millisecond'
                 WHERE merchant_id = $1 AND key = $2 AND response_status IS NULL AND fence = $3",
            )
            .await
            .map_err(pg_error)?;
        client
            .execute(&stmt, &[&merchant.as_str(), &key, &fence])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// [`Db::idempotency_store`] for a request whose first commit was to claim its key
    /// ([`KeyClaim`]): the row is inserted with the answer if no row holds the key (the
    /// request ended before its first commit), or completed if it is the one that commit
    /// inserted (it names `payment`; an answer that commit stored stays). Returns the answer
    /// the key holds now, this request's to give (the one that commit stored, if it landed
    /// though reported failed); `None` for a row another request holds, left alone.
    pub async fn idempotency_store_first(
        &self,
        merchant: &MerchantId,
        key: &str,
        claim: &KeyClaim,
        payment: &str,
        status: u16,
        body: &[u8],
    ) -> Result<Option<(u16, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO idempotency_keys AS k (merchant_id, key, fingerprint, locked_until, holder, response_status,
                        response_body)
                 VALUES ($1, $2, $3, now(), $4, $5, $6)
                 ON CONFLICT (merchant_id, key) DO UPDATE
                    SET response_status = coalesce(k.response_status, excluded.response_status),
                        response_body = CASE WHEN k.response_status IS NULL THEN excluded.response_body
                                             ELSE k.response_body END
                    WHERE k.fence = 1 AND k.resource_id = $7
                 RETURNING k.response_status, k.response_body",
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(
                &stmt,
                &[
                    &merchant.as_str(),
                    &key,
                    &claim.fingerprint,
                    &claim.holder,
                    &(status as i16),
                    &body,
                    &payment,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.map(|r| {
            (
                r.get::<_, i16>(0) as u16,
                r.get::<_, Option<Vec<u8>>>(1).unwrap_or_default(),
            )
        }))
    }

    /// [`Db::idempotency_release`] for a request whose first commit was to claim its key: frees
    /// the row that commit inserted (it names `payment`), if it did. `Held` if another request's
    /// row holds the key.
    pub async fn idempotency_release_first(
        &self,
        merchant: &MerchantId,
        key: &str,
        payment: &str,
    ) -> Result<Released, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH freed AS (
                     UPDATE idempotency_keys SET locked_until = now() - interval '1 millisecond'
                     WHERE merchant_id = $1 AND key = $2 AND response_status IS NULL AND fence = 1
                       AND resource_id = $3
                     RETURNING 1)
                 SELECT EXISTS (SELECT 1 FROM freed),
                        EXISTS (SELECT 1 FROM idempotency_keys WHERE merchant_id = $1 AND key = $2)",
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_one(&stmt, &[&merchant.as_str(), &key, &payment])
            .await
            .map_err(pg_error)?;
        Ok(match (row.get::<_, bool>(0), row.get::<_, bool>(1)) {
            (true, _) => Released::Ours,
            (false, false) => Released::NoRow,
            (false, true) => Released::Held,
        })
    }

    /// Deletes at most `limit` records older than the retention; returns how many.
    pub async fn idempotency_purge(&self, retention_hours: u64, limit: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let hours = retention_hours as i32;
        client
            .execute(
                "DELETE FROM idempotency_keys WHERE ctid IN (
                     SELECT ctid FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1) LIMIT $2)",
                &[&hours, &limit],
            )
            .await
            .map_err(pg_error)
    }
}
