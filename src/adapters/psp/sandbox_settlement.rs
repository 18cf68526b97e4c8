//! The sandbox PSP's settlement reports: one UTC day of its own books (captures, refunds,
//! disputes), with its fees and, once the day has ended, one payout to the bank per currency, in
//! Stripe's or Adyen's format, so that reconciliation runs end to end with no outside account. Faults can be
//! injected (`amount_mismatch:3,missing:2,duplicate:1,unknown:2`): each takes the next
//! charges of the day in booking order, so a test knows which lines it changed.

use std::collections::BTreeMap;
use std::io::Write;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use crate::adapters::postgres::{Db, StoreError};
use crate::config::SandboxSettlementConfig;
use crate::domain::settlement::{Format, Line, LineKind, ReportWriter};
use crate::domain::Currency;

/// How long after a day's end its report first carries the day's payout.
const PAYOUT_MARGIN: chrono::Duration = chrono::Duration::minutes(5);

/// Faults a report may carry, each a number of lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Charges whose amount is one minor unit more than booked.
    pub amount_mismatch: u32,
    /// Charges left out.
    pub missing: u32,
    /// Charges written twice.
    pub duplicate: u32,
    /// Charges of intents the PSP never had, added.
    pub unknown: u32,
}

const MAX_FAULTS: u32 = 10_000;

impl Faults {
    /// `amount_mismatch:3,missing:2,duplicate:1,unknown:2`; empty: none.
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, n) = part
                .split_once(':')
                .ok_or_else(|| format!("fault {part:?} is not name:count"))?;
            let n: u32 = n
                .parse()
                .ok()
                .filter(|n| *n <= MAX_FAULTS)
                .ok_or_else(|| format!("fault count {n:?} is not a number up to {MAX_FAULTS}"))?;
            match name {
                "amount_mismatch" => f.amount_mismatch = n,
                "missing" => f.missing = n,
                "duplicate" => f.duplicate = n,
                "unknown" => f.unknown = n,
                _ => {
                    return Err(format!(
                        "unknown fault {name:?} (amount_mismatch, missing, duplicate, unknown)"
                    ))
                }
            }
        }
        Ok(f)
    }

    fn on_charges(&self) -> u32 {
        self.amount_mismatch + self.missing + self.duplicate
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the report could not be written: {0}")]
    Write(String),
    #[error("{0}")]
    Faults(String),
}

/// The UTC day `[start, end)` of a date.
pub fn day_bounds(date: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default());
    (start, start + chrono::Duration::days(1))
}

/// A charge's fee: basis points (rounded half up) plus the fixed part, never above the amount.
pub fn charge_fee(amount: i64, fees: &SandboxSettlementConfig) -> i64 {
    let variable = (i128::from(amount) * i128::from(fees.fee_bps) + 5_000) / 10_000;
    let fee = variable + i128::from(fees.fee_fixed);
    fee.clamp(0, i128::from(amount.max(0))) as i64
}

const PAGE: i64 = 10_000;

/// Writes the report of `merchant`'s `date` into `out`; returns it and the lines written.
pub async fn write_report<W: Write>(
    db: &Db,
    merchant: &str,
    date: NaiveDate,
    format: Format,
    faults: Faults,
    fees: &SandboxSettlementConfig,
    out: W,
) -> Result<(W, u64), ReportError> {
    let werr = |e: csv::Error| ReportError::Write(e.to_string());
    let (start, end) = day_bounds(date);
    let batch = (date - NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default())
        .num_days()
        .max(0) as u32;
    let mut writer = ReportWriter::new(format, out).map_err(werr)?;
    let mut net: BTreeMap<Currency, i64> = BTreeMap::new();
    let mut charges_seen = 0u32;
    let mut written = 0u64;
    let mut first_currency = None;
    let mut after = 0;
    loop {
        let page = db.sandbox_book_page(merchant, start, end, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for row in page {
            let Some(currency) = Currency::parse(&row.currency) else {
                continue;
            };
            first_currency.get_or_insert(currency);
            let (kind, fee) = match row.kind.as_str() {
                "charge" => (LineKind::Charge, charge_fee(row.amount, fees)),
                "refund" => (LineKind::Refund, 0),
                "dispute" => (LineKind::Dispute, fees.dispute_fee),
                _ => (LineKind::DisputeReversal, 0),
            };
            let mut line = Line {
                line_no: 0,
                key: format!("txn_{:016x}", row.id),
                kind,
                reference: row.reference.clone(),
                intent: (row.reference != row.intent).then(|| row.intent.clone()),
                amount: row.amount,
                fee,
                currency,
                created: row.at,
                raw_type: String::new(),
                charge_only: false,
            };
            let mut copies = 1;
            if kind == LineKind::Charge {
                let n = charges_seen;
                charges_seen += 1;
                if n < faults.missing {
                    continue;
                } else if n < faults.missing + faults.amount_mismatch {
                    line.amount += 1;
                } else if n < faults.on_charges() {
                    copies = 2;
                }
            }
            for _ in 0..copies {
                writer.write(&line, "", batch).map_err(werr)?;
                *net.entry(currency).or_default() += line.amount - line.fee;
                written += 1;
            }
        }
    }
    if charges_seen < faults.on_charges() {
        return Err(ReportError::Faults(format!(
            "the day has {charges_seen} charges; the faults asked change {}",
            faults.on_charges()
        )));
    }
    let currency = first_currency.unwrap_or(Currency::parse("USD").expect("USD is ISO 4217"));
    for i in 0..faults.unknown {
        let line = Line {
            line_no: 0,
            key: format!("txn_unknown_{}_{i}", date.format("%Y%m%d")),
            kind: LineKind::Charge,
            reference: format!("pi_unknown_{}_{i}", date.format("%Y%m%d")),
            intent: None,
            amount: 1000,
            fee: charge_fee(1000, fees),
            currency,
            created: start + chrono::Duration::hours(12),
            raw_type: String::new(),
            charge_only: false,
        };
        writer.write(&line, "", batch).map_err(werr)?;
        *net.entry(currency).or_default() += line.amount - line.fee;
        written += 1;
    }
    // The day's balance goes to the merchant's bank, one payout per currency, once the day has
    // ended: a payout in a report of the day so far would stand for the whole day's (its line
    // has the same key), and the rest of the day would never leave the PSP's balance. A booking
    // is stamped when its transaction starts and lands when its group commits: the margin lets
    // the day's last ones land first.
    if Utc::now() < end + PAYOUT_MARGIN {
        net.clear();
    }
    let tag = &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(merchant.as_bytes()))[..8];
    for (currency, total) in net.into_iter().filter(|(_, t)| *t > 0) {
        let id = format!(
            "po_{tag}_{}_{}",
            date.format("%Y%m%d"),
            currency.code().to_ascii_lowercase()
        );
        let line = Line {
            line_no: 0,
            key: format!("txn_{id}"),
            kind: LineKind::Payout,
            reference: id,
            intent: None,
            amount: -total,
            fee: 0,
            currency,
            created: end - chrono::Duration::seconds(1),
            raw_type: String::new(),
            charge_only: false,
        };
        writer.write(&line, "", batch).map_err(werr)?;
        written += 1;
    }
    let out = writer.finish().map_err(|e| ReportError::Write(e.to_string()))?;
    Ok((out, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(
            Faults::parse("amount_mismatch:3,missing:2,duplicate:1,unknown:2"),
            Ok(Faults {
                amount_mismatch: 3,
                missing: 2,
                duplicate: 1,
                unknown: 2
            })
        );
        assert_eq!(Faults::parse(""), Ok(Faults::default()));
        assert!(Faults::parse("missing").is_err());
        assert!(Faults::parse("missing:x").is_err());
        assert!(Faults::parse("missing:100000").is_err());
        assert!(Faults::parse("lost:1").is_err());
    }

    #[test]
    fn fees_round_half_up_and_never_exceed_the_amount() {
        let fees = SandboxSettlementConfig {
            fee_bps: 250,
            fee_fixed: 25,
            dispute_fee: 1500,
        };
        assert_eq!(charge_fee(10_000, &fees), 275);
        assert_eq!(charge_fee(4999, &fees), 125 + 25);
        assert_eq!(charge_fee(10, &fees), 10);
    }
}
