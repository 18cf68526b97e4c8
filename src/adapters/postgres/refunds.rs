//! Refund reads. Refunds are written with their payment's transitions, in [`super::commit`].

use super::{pg_error, Db};
use crate::domain::{Currency, MerchantId, Money, PaymentId, Refund, RefundId, RefundStatus};
use crate::error::ApiError;

const COLUMNS: &str =
    "id, payment_id, merchant_id, amount, currency, status, reason, psp_reference, created_at, updated_at";

fn from_row(row: &tokio_postgres::Row) -> Result<Refund, ApiError> {
    let currency: String = row.get(4);
    let status: String = row.get(5);
    Ok(Refund {
        id: RefundId::from_trusted(row.get(0)),
        payment_id: PaymentId::from_trusted(row.get(1)),
        merchant_id: MerchantId::from_trusted(row.get(2)),
        amount: Money::new(row.get(3), Currency::parse(&currency).ok_or(ApiError::Internal)?),
        status: RefundStatus::parse(&status).ok_or(ApiError::Internal)?,
        reason: row.get(6),
        psp_reference: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
    })
}

impl Db {
    pub async fn refund_for_merchant(&self, merchant: &MerchantId, id: &RefundId) -> Result<Option<Refund>, ApiError> {
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

    /// A payment's refunds, oldest first (at most a few hundred: each needs an amount left).
    pub async fn refunds_of_payment(&self, id: &PaymentId) -> Result<Vec<Refund>, ApiError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM refunds WHERE payment_id = $1 ORDER BY created_at, id LIMIT 1000"
            ))
            .await
            .map_err(pg_error)?;
        let rows = client.query(&stmt, &[&id.as_str()]).await.map_err(pg_error)?;
        rows.iter().map(from_row).collect()
    }
}
