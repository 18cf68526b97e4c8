//! Refund reads. Refunds are written with their payment's transitions, in [`super::commit`].

use super::{pg_error, Db, StoreError};
use crate::domain::{Currency, MerchantId, Money, PaymentId, Refund, RefundId, RefundStatus};

const COLUMNS: &str =
    "id, payment_id, merchant_id, amount, currency, status, reason, psp_reference, created_at, updated_at, \
    reverse_splits, refund_application_fee";

fn from_row(row: &tokio_postgres::Row) -> Result<Refund, StoreError> {
    let currency: String = row.get(4);
    let status: String = row.get(5);
    Ok(Refund {
        id: RefundId::from_trusted(row.get(0)),
        payment_id: PaymentId::from_trusted(row.get(1)),
        merchant_id: MerchantId::from_trusted(row.get(2)),
        amount: Money::new(row.get(3), Currency::parse(&currency).ok_or(StoreError::Broken)?),
        status: RefundStatus::parse(&status).ok_or(StoreError::Broken)?,
        reason: row.get(6),
        psp_reference: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
        reverse_splits: row.get(10),
        refund_application_fee: row.get(11),
    })
}

impl Db {
    pub async fn refund_for_merchant(
        &self,
        merchant: &MerchantId,
        id: &RefundId,
    ) -> Result<Option<Refund>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM refunds WHERE id = $1 AND merchant_id = $2"
            ))
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&id.as_str(), &merchant.as_str()])
            .await
            .map_err(pg_error)?;
        row.as_ref().map(from_row).transpose()
    }

    /// A page of a payment's refunds, oldest first: at most `limit` after `starting_after`,
    /// and whether more follow.
    pub async fn refunds_of_payment(
        &self,
        id: &PaymentId,
        limit: i64,
        starting_after: Option<&RefundId>,
    ) -> Result<(Vec<Refund>, bool), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM refunds WHERE payment_id = $1
                   AND ($2::text IS NULL OR (created_at, id) > (SELECT created_at, id FROM refunds WHERE id = $2 AND payment_id = $1))
                 ORDER BY created_at, id LIMIT $3"
            ))
            .await
            .map_err(pg_error)?;
        let after = starting_after.map(RefundId::as_str);
        let rows = client
            .query(&stmt, &[&id.as_str(), &after, &(limit + 1)])
            .await
            .map_err(pg_error)?;
        let mut list = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let more = list.len() as i64 > limit;
        list.truncate(limit as usize);
        Ok((list, more))
    }

    /// One refund of a payment.
    pub async fn refund_of_payment(&self, payment: &PaymentId, id: &RefundId) -> Result<Option<Refund>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM refunds WHERE id = $1 AND payment_id = $2"
            ))
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&id.as_str(), &payment.as_str()])
            .await
            .map_err(pg_error)?;
        row.as_ref().map(from_row).transpose()
    }

    /// The payment's refunds with one of these PSP references (an event lists the refunds it
    /// settles), oldest first. Bounded by the list, not by a row limit.
    pub async fn refunds_by_reference(
        &self,
        payment: &PaymentId,
        references: &[String],
    ) -> Result<Vec<Refund>, StoreError> {
        if references.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM refunds WHERE payment_id = $1 AND psp_reference = ANY($2) ORDER BY created_at, id"
            ))
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&stmt, &[&payment.as_str(), &references])
            .await
            .map_err(pg_error)?;
        rows.iter().map(from_row).collect()
    }
}
