//! Ledger postings (docs/API.md, "Postings"): which accounts a journal debits and credits. Pure;
//! every journal built here balances, and `Journal::is_balanced` says so before it is stored.

use super::ids::MerchantId;
use super::money::{platform_fee, Currency};
use super::payment::JournalKind;

pub const PSP_CLEARING: &str = "psp_clearing";
pub const PLATFORM_FEE_REVENUE: &str = "platform_fee_revenue";

pub fn merchant_payable(merchant: &MerchantId) -> String {
    format!("merchant_payable:{merchant}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub account: String,
    pub debit: i64,
    pub credit: i64,
}

impl Entry {
    pub fn debit(account: impl Into<String>, amount: i64) -> Entry {
        Entry {
            account: account.into(),
            debit: amount,
            credit: 0,
        }
    }

    pub fn credit(account: impl Into<String>, amount: i64) -> Entry {
        Entry {
            account: account.into(),
            debit: 0,
            credit: amount,
        }
    }
}

/// The entries of one journal, in one currency.
pub fn postings(kind: JournalKind, amount: i64, merchant: &MerchantId, fee_bps: u32, fee_fixed: i64) -> Vec<Entry> {
    let payable = merchant_payable(merchant);
    match kind {
        JournalKind::Capture => {
            let fee = platform_fee(amount, fee_bps, fee_fixed);
            let mut entries = vec![Entry::debit(PSP_CLEARING, amount)];
            if amount - fee > 0 {
                entries.push(Entry::credit(payable, amount - fee));
            }
            if fee > 0 {
                entries.push(Entry::credit(PLATFORM_FEE_REVENUE, fee));
            }
            entries
        }
        JournalKind::Refund | JournalKind::DisputeOpened => {
            vec![Entry::debit(payable, amount), Entry::credit(PSP_CLEARING, amount)]
        }
        JournalKind::DisputeWon => vec![Entry::debit(PSP_CLEARING, amount), Entry::credit(payable, amount)],
    }
}

/// Σ debit = Σ credit, in i128 so the check itself cannot overflow.
pub fn is_balanced(entries: &[Entry]) -> bool {
    let d: i128 = entries.iter().map(|e| i128::from(e.debit)).sum();
    let c: i128 = entries.iter().map(|e| i128::from(e.credit)).sum();
    entries.len() >= 2
        && d == c
        && entries
            .iter()
            .all(|e| (e.debit == 0) != (e.credit == 0) && e.debit >= 0 && e.credit >= 0)
}

/// A journal ready to be stored.
#[derive(Debug, Clone)]
pub struct Journal {
    pub kind: JournalKind,
    /// The attempt, refund or dispute that caused it: with the payment and kind, its natural key.
    pub correlation_id: String,
    pub currency: Currency,
    pub entries: Vec<Entry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m() -> MerchantId {
        MerchantId::parse("mer_test").unwrap()
    }

    #[test]
    fn capture_splits_into_payable_and_fee() {
        let e = postings(JournalKind::Capture, 4999, &m(), 290, 30);
        assert_eq!(
            e,
            vec![
                Entry::debit(PSP_CLEARING, 4999),
                Entry::credit("merchant_payable:mer_test", 4824),
                Entry::credit(PLATFORM_FEE_REVENUE, 175),
            ]
        );
    }

    #[test]
    fn a_fee_that_takes_everything_leaves_no_zero_entry() {
        let e = postings(JournalKind::Capture, 10, &m(), 290, 30);
        assert_eq!(
            e,
            vec![Entry::debit(PSP_CLEARING, 10), Entry::credit(PLATFORM_FEE_REVENUE, 10)]
        );
        assert!(is_balanced(&e));
    }

    #[test]
    fn an_unbalanced_journal_is_caught() {
        assert!(!is_balanced(&[Entry::debit("a", 2), Entry::credit("b", 1)]));
        assert!(!is_balanced(&[Entry::debit("a", 0), Entry::credit("b", 0)]));
        assert!(!is_balanced(&[Entry::debit("a", 1)]));
    }

    proptest! {
        #[test]
        fn every_posting_balances(amount in 1i64..=99_999_999_999, bps in 0u32..=10_000, fixed in 0i64..=100_000, k in 0usize..4) {
            let kind = [JournalKind::Capture, JournalKind::Refund, JournalKind::DisputeOpened, JournalKind::DisputeWon][k];
            prop_assert!(is_balanced(&postings(kind, amount, &m(), bps, fixed)));
        }
    }
}
