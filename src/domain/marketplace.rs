//! Marketplaces (docs/API.md, "Marketplaces"): how a split payment's
//! money is shared between the platform and its sellers when it is captured, and who gives it
//! back when it is refunded or disputed. Pure. Every sharing sums exactly to the amount shared,
//! and every journal built here balances (property-tested below).
//!
//! A split payment is made of *parts*: one per split (a seller's), the application fee (the
//! platform's), and the rest (what neither names: the platform's too). A capture shares the
//! captured amount over the parts in proportion to their amounts at create; a refund or a
//! dispute takes back from the parts in proportion to what each still holds of the capture. A
//! part never gives back more than it got, and a full refund gives back exactly what each got.

use serde::{Deserialize, Serialize};

use super::ids::{AccountId, MerchantId};
use super::ledger::{merchant_payable, Entry, PLATFORM_FEE_REVENUE, PSP_CLEARING};
use super::money::platform_fee;
use super::payment::JournalKind;

/// Splits a payment may carry.
pub const MAX_SPLITS: usize = 100;

/// A seller's funds not yet available: credited at capture.
pub fn seller_pending(account: &AccountId) -> String {
    format!("seller_pending:{account}")
}

/// A seller's available funds: refunds and disputes are taken from here (it may go negative,
/// and is then made whole from the seller's next funds).
pub fn seller_available(account: &AccountId) -> String {
    format!("seller_available:{account}")
}

/// `total` shared in proportion to `weights`, exactly: each share is the floor of its exact
/// share, and the units left over go one each to the largest fractional remainders (ties: the
/// larger weight, then the earlier part). `None` when there is something to share and no
/// weight to share it by, or a weight is negative.
///
/// When `total` ≤ Σ `weights`, no share exceeds its weight.
pub fn share(total: i64, weights: &[i64]) -> Option<Vec<i64>> {
    if total < 0 || weights.iter().any(|w| *w < 0) {
        return None;
    }
    let sum: i128 = weights.iter().map(|w| i128::from(*w)).sum();
    if sum == 0 {
        return (total == 0).then(|| vec![0; weights.len()]);
    }
    let t = i128::from(total);
    let mut shares: Vec<i64> = Vec::with_capacity(weights.len());
    let mut rems: Vec<(i128, i64, usize)> = Vec::with_capacity(weights.len());
    let mut given: i128 = 0;
    for (i, w) in weights.iter().enumerate() {
        let exact = t * i128::from(*w);
        let floor = exact / sum;
        given += floor;
        shares.push(i64::try_from(floor).ok()?);
        rems.push((exact % sum, *w, i));
    }
    // Fewer than weights.len() units are left: each Σ floor is within 1 of its exact share.
    let left = usize::try_from(t - given).ok()?;
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    for (_, _, i) in rems.into_iter().take(left) {
        shares[i] = shares[i].checked_add(1)?;
    }
    Some(shares)
}

/// One seller's split of a payment, with what it got and gave back so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub account: AccountId,
    /// As asked at create: its share of the full amount.
    pub amount: i64,
    /// Its part of what was captured.
    #[serde(default)]
    pub captured: i64,
    /// Its part taken back by refunds and disputes.
    #[serde(default)]
    pub returned: i64,
    /// What refunds and disputes debited the seller: its part, and the share of the
    /// application fee it bore when the fee was not refunded.
    #[serde(default)]
    pub debited: i64,
}

/// A part's progress: captured, then taken back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub captured: i64,
    pub returned: i64,
}

/// What the open dispute took, to be given back if the dispute is won.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// Per part (splits, then the application fee, then the rest).
    pub parts: Vec<i64>,
    /// Per seller (the splits' order) what was debited; the platform paid the remainder.
    pub sellers: Vec<i64>,
}

/// A payment's splits: who gets what of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splits {
    pub application_fee_amount: i64,
    pub splits: Vec<Split>,
    #[serde(default)]
    pub fee: Part,
    #[serde(default)]
    pub rest: Part,
    #[serde(default)]
    pub dispute: Option<Taken>,
}

/// Why a payment's splits are refused at create.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("a payment has at most {MAX_SPLITS} splits")]
    TooMany,
    #[error("each split's amount must be a positive integer")]
    NotPositive,
    #[error("application_fee_amount must not be negative")]
    NegativeFee,
    #[error("an account appears in two splits; give each account one split")]
    Repeated,
    #[error("the splits and the application fee add up to more than the amount")]
    OverAmount,
}

/// Journal entries with the payment's funds shared: what the caller stores.
pub type Postings = Vec<Entry>;

impl Splits {
    /// Checks a create's splits against the payment's amount.
    pub fn new(amount: i64, application_fee_amount: i64, splits: Vec<(AccountId, i64)>) -> Result<Splits, SplitError> {
        if splits.len() > MAX_SPLITS {
            return Err(SplitError::TooMany);
        }
        if application_fee_amount < 0 {
            return Err(SplitError::NegativeFee);
        }
        let mut total: i64 = application_fee_amount;
        for (i, (account, a)) in splits.iter().enumerate() {
            if *a <= 0 {
                return Err(SplitError::NotPositive);
            }
            if splits[..i].iter().any(|(other, _)| other == account) {
                return Err(SplitError::Repeated);
            }
            total = total.checked_add(*a).ok_or(SplitError::OverAmount)?;
        }
        if total > amount {
            return Err(SplitError::OverAmount);
        }
        Ok(Splits {
            application_fee_amount,
            splits: splits
                .into_iter()
                .map(|(account, amount)| Split {
                    account,
                    amount,
                    captured: 0,
                    returned: 0,
                    debited: 0,
                })
                .collect(),
            fee: Part::default(),
            rest: Part::default(),
            dispute: None,
        })
    }

    /// What each part still holds of the capture.
    fn holding(&self) -> Option<Vec<i64>> {
        let mut w = self
            .splits
            .iter()
            .map(|s| s.captured.checked_sub(s.returned))
            .collect::<Option<Vec<i64>>>()?;
        w.push(self.fee.captured.checked_sub(self.fee.returned)?);
        w.push(self.rest.captured.checked_sub(self.rest.returned)?);
        Some(w)
    }

    /// The entries of a split payment's journal of `kind` for `amount` (of a payment of
    /// `payment_amount`, whose payrail fee is `fee_bps` + `fee_fixed`), with the splits brought
    /// up to date; `refund_share` is the refund's (reverse_splits, refund_application_fee).
    /// `None` if the amounts are impossible: the caller refuses the journal.
    #[allow(clippy::too_many_arguments)]
    pub fn postings(
        &mut self,
        kind: JournalKind,
        amount: i64,
        payment_amount: i64,
        platform: &MerchantId,
        fee_bps: u32,
        fee_fixed: i64,
        refund_share: (bool, bool),
    ) -> Option<Postings> {
        match kind {
            JournalKind::Capture => self.capture(
                payment_amount,
                amount,
                platform_fee(amount, fee_bps, fee_fixed),
                platform,
            ),
            JournalKind::Refund => self.refund(amount, refund_share.0, refund_share.1, platform),
            JournalKind::DisputeOpened => self.dispute_opened(amount, platform),
            JournalKind::DisputeWon => self.dispute_won(amount, platform),
        }
    }

    /// A capture of `captured` (of a payment of `amount`), with payrail's fee `fee`: `Dr
    /// psp_clearing`, `Cr platform_fee_revenue`, `Cr seller_pending:{acct}` per split, and the
    /// platform's part less payrail's fee to `merchant_payable:{platform}` (a debit when the fee
    /// is larger: the platform pays payrail's fee on its sellers' sales). `None` if the
    /// amounts are impossible (the caller refuses the journal).
    pub fn capture(&mut self, amount: i64, captured: i64, fee: i64, platform: &MerchantId) -> Option<Postings> {
        // What each part has not received yet: a second capture shares only the remainder.
        let named = self
            .splits
            .iter()
            .try_fold(self.application_fee_amount, |a, s| a.checked_add(s.amount))?;
        let rest_amount = amount.checked_sub(named).filter(|r| *r >= 0)?;
        let mut open = self
            .splits
            .iter()
            .map(|s| s.amount.checked_sub(s.captured))
            .collect::<Option<Vec<i64>>>()?;
        open.push(self.application_fee_amount.checked_sub(self.fee.captured)?);
        open.push(rest_amount.checked_sub(self.rest.captured)?);
        if open.iter().any(|o| *o < 0) {
            return None;
        }
        let shares = share(captured, &open)?;
        let n = self.splits.len();
        let mut entries = vec![Entry::debit(PSP_CLEARING, captured)];
        if fee > 0 {
            entries.push(Entry::credit(PLATFORM_FEE_REVENUE, fee));
        }
        for (s, got) in self.splits.iter_mut().zip(&shares) {
            s.captured = s.captured.checked_add(*got)?;
            if *got > 0 {
                entries.push(Entry::credit(seller_pending(&s.account), *got));
            }
        }
        self.fee.captured = self.fee.captured.checked_add(shares[n])?;
        self.rest.captured = self.rest.captured.checked_add(shares[n + 1])?;
        let platform_net = shares[n].checked_add(shares[n + 1])?.checked_sub(fee)?;
        let payable = merchant_payable(platform);
        match platform_net {
            p if p > 0 => entries.push(Entry::credit(payable, p)),
            p if p < 0 => entries.push(Entry::debit(payable, -p)),
            _ => {}
        }
        Some(entries)
    }

    /// Takes `amount` back from the parts, in proportion to what each holds; returns per part
    /// what was taken, and per seller what the seller pays (the platform pays the rest).
    fn take(&mut self, amount: i64, reverse_splits: bool, refund_application_fee: bool) -> Option<Taken> {
        let n = self.splits.len();
        let holding = self.holding()?;
        let held = holding.iter().try_fold(0i64, |a, h| a.checked_add(*h))?;
        // More than the parts hold (disputes and refunds together beyond the capture) is the
        // platform's alone.
        let parts = share(amount.min(held), &holding)?;
        let mut sellers: Vec<i64> = if reverse_splits {
            parts[..n].to_vec()
        } else {
            vec![0; n]
        };
        if reverse_splits && !refund_application_fee && parts[n] > 0 {
            // The platform keeps its fee: the fee's part is borne by the other parts of this
            // refund in proportion, the sellers' share of it split among them by their parts,
            // the rest's share staying with the platform (nobody else, if no part gave back).
            let sellers_gave: i64 = parts[..n].iter().sum();
            if let Some(split) = share(parts[n], &[sellers_gave, parts[n + 1]]) {
                if let Some(borne) = share(split[0], &parts[..n]) {
                    for (s, b) in sellers.iter_mut().zip(borne) {
                        *s = s.checked_add(b)?;
                    }
                }
            }
        }
        for (i, s) in self.splits.iter_mut().enumerate() {
            s.returned = s.returned.checked_add(parts[i])?;
            s.debited = s.debited.checked_add(sellers[i])?;
        }
        self.fee.returned = self.fee.returned.checked_add(parts[n])?;
        self.rest.returned = self.rest.returned.checked_add(parts[n + 1])?;
        Some(Taken { parts, sellers })
    }

    /// The entries of money going back out (a refund, or the funds a dispute took): `Dr
    /// seller_available:{acct}` for what each seller pays, `Dr merchant_payable:{platform}` for
    /// the rest, `Cr psp_clearing`.
    fn outgoing(&self, amount: i64, taken: &Taken, platform: &MerchantId) -> Option<Postings> {
        let sellers = taken.sellers.iter().try_fold(0i64, |a, x| a.checked_add(*x))?;
        let platform_pays = amount.checked_sub(sellers).filter(|p| *p >= 0)?;
        let mut entries = Vec::with_capacity(self.splits.len() + 2);
        for (s, pays) in self.splits.iter().zip(&taken.sellers) {
            if *pays > 0 {
                entries.push(Entry::debit(seller_available(&s.account), *pays));
            }
        }
        if platform_pays > 0 {
            entries.push(Entry::debit(merchant_payable(platform), platform_pays));
        }
        entries.push(Entry::credit(PSP_CLEARING, amount));
        Some(entries)
    }

    /// A refund of `amount`. With `reverse_splits`, each seller gives back its part; without,
    /// the platform pays it all. Unless `refund_application_fee`, the platform keeps its fee and
    /// the sellers (when reversed) bear the fee's part.
    pub fn refund(
        &mut self,
        amount: i64,
        reverse_splits: bool,
        refund_application_fee: bool,
        platform: &MerchantId,
    ) -> Option<Postings> {
        let taken = self.take(amount, reverse_splits, refund_application_fee)?;
        self.outgoing(amount, &taken, platform)
    }

    /// A dispute opened for `amount`: taken as a refund that reverses the splits and keeps the
    /// platform's fee, and remembered, to be given back if the dispute is won.
    pub fn dispute_opened(&mut self, amount: i64, platform: &MerchantId) -> Option<Postings> {
        let taken = self.take(amount, true, false)?;
        let entries = self.outgoing(amount, &taken, platform)?;
        self.dispute = Some(taken);
        Some(entries)
    }

    /// A won dispute of `amount`: everyone gets back exactly what the dispute took from them.
    pub fn dispute_won(&mut self, amount: i64, platform: &MerchantId) -> Option<Postings> {
        // What the dispute took was stored when it opened; without it, refuse rather than guess.
        let taken = self.dispute.take()?;
        let n = self.splits.len();
        if taken.parts.len() != n + 2 || taken.sellers.len() != n {
            return None;
        }
        for (i, s) in self.splits.iter_mut().enumerate() {
            s.returned = s.returned.checked_sub(taken.parts[i])?;
            s.debited = s.debited.checked_sub(taken.sellers[i])?;
        }
        self.fee.returned = self.fee.returned.checked_sub(taken.parts[n])?;
        self.rest.returned = self.rest.returned.checked_sub(taken.parts[n + 1])?;
        let sellers = taken.sellers.iter().try_fold(0i64, |a, x| a.checked_add(*x))?;
        let platform_gets = amount.checked_sub(sellers).filter(|p| *p >= 0)?;
        let mut entries = vec![Entry::debit(PSP_CLEARING, amount)];
        for (s, got) in self.splits.iter().zip(&taken.sellers) {
            if *got > 0 {
                entries.push(Entry::credit(seller_available(&s.account), *got));
            }
        }
        if platform_gets > 0 {
            entries.push(Entry::credit(merchant_payable(platform), platform_gets));
        }
        Some(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ledger::is_balanced;
    use proptest::prelude::*;

    fn acct(i: usize) -> AccountId {
        AccountId::parse(&format!("acct_{i}")).unwrap()
    }

    fn platform() -> MerchantId {
        MerchantId::parse("mer_platform").unwrap()
    }

    /// Σ credit − Σ debit per account over journals.
    fn net(journals: &[Postings], account: &str) -> i64 {
        journals
            .iter()
            .flatten()
            .filter(|e| e.account == account)
            .map(|e| e.credit - e.debit)
            .sum()
    }

    #[test]
    fn shares_known_answers() {
        assert_eq!(share(10, &[1, 1, 1]), Some(vec![4, 3, 3]));
        assert_eq!(share(2, &[1, 1, 1]), Some(vec![1, 1, 0]));
        // Largest remainder first, then the larger weight.
        assert_eq!(share(5, &[3, 1]), Some(vec![4, 1]));
        assert_eq!(share(1, &[1, 3]), Some(vec![0, 1]));
        assert_eq!(share(0, &[]), Some(vec![]));
        assert_eq!(share(1, &[0, 0]), None);
        assert_eq!(share(7, &[0, 5]), Some(vec![0, 7]));
        assert_eq!(share(-1, &[1]), None);
        assert_eq!(
            share(i64::MAX, &[i64::MAX, i64::MAX]),
            Some(vec![i64::MAX / 2 + 1, i64::MAX / 2])
        );
    }

    #[test]
    fn a_capture_posts_the_issue_example() {
        // 10,000 with two sellers of 6,000 and 2,500, a fee of 1,000; 500 left to the platform.
        let mut s = Splits::new(10_000, 1_000, vec![(acct(1), 6_000), (acct(2), 2_500)]).unwrap();
        let e = [s.capture(10_000, 10_000, 320, &platform()).unwrap()];
        assert!(is_balanced(&e[0]));
        assert_eq!(net(&e, "seller_pending:acct_1"), 6_000);
        assert_eq!(net(&e, "seller_pending:acct_2"), 2_500);
        assert_eq!(net(&e, "merchant_payable:mer_platform"), 1_500 - 320);
        assert_eq!(net(&e, PLATFORM_FEE_REVENUE), 320);
        assert_eq!(net(&e, PSP_CLEARING), -10_000);
    }

    #[test]
    fn a_partial_capture_is_pro_rata_with_the_remainder_to_the_largest_remainder() {
        // 1,001 of 3,000 over 1,000 / 1,000 / 1,000 (no fee, no rest): 333.67 each.
        let mut s = Splits::new(3_000, 0, vec![(acct(1), 1_000), (acct(2), 1_000), (acct(3), 1_000)]).unwrap();
        s.capture(3_000, 1_001, 0, &platform()).unwrap();
        let got: Vec<i64> = s.splits.iter().map(|x| x.captured).collect();
        assert_eq!(got, vec![334, 334, 333]);
    }

    #[test]
    fn a_platform_fee_larger_than_the_platforms_part_is_a_debit_of_the_platform() {
        let mut s = Splits::new(1_000, 0, vec![(acct(1), 1_000)]).unwrap();
        let e = s.capture(1_000, 1_000, 59, &platform()).unwrap();
        assert!(is_balanced(&e));
        assert_eq!(net(&[e], "merchant_payable:mer_platform"), -59);
    }

    #[test]
    fn refund_without_refunding_the_fee_leaves_the_fee_with_the_platform() {
        let mut s = Splits::new(10_000, 1_000, vec![(acct(1), 9_000)]).unwrap();
        let c = s.capture(10_000, 10_000, 0, &platform()).unwrap();
        let r = s.refund(10_000, true, false, &platform()).unwrap();
        assert!(is_balanced(&r));
        let j = [c, r];
        // The seller gave back all it got and bore the fee: the platform keeps 1,000.
        assert_eq!(
            net(&j, "seller_pending:acct_1") + net(&j, "seller_available:acct_1"),
            -1_000
        );
        assert_eq!(net(&j, "merchant_payable:mer_platform"), 1_000);
        assert_eq!(net(&j, PSP_CLEARING), 0);
    }

    #[test]
    fn refund_with_the_fee_leaves_everyone_whole() {
        let mut s = Splits::new(10_000, 1_000, vec![(acct(1), 9_000)]).unwrap();
        let c = s.capture(10_000, 10_000, 0, &platform()).unwrap();
        let r1 = s.refund(3_333, true, true, &platform()).unwrap();
        let r2 = s.refund(6_667, true, true, &platform()).unwrap();
        let j = [c, r1, r2];
        assert_eq!(net(&j, "seller_pending:acct_1") + net(&j, "seller_available:acct_1"), 0);
        assert_eq!(net(&j, "merchant_payable:mer_platform"), 0);
    }

    #[test]
    fn a_refund_that_does_not_reverse_splits_is_the_platforms() {
        let mut s = Splits::new(10_000, 1_000, vec![(acct(1), 9_000)]).unwrap();
        s.capture(10_000, 10_000, 0, &platform()).unwrap();
        let r = s.refund(4_000, false, false, &platform()).unwrap();
        assert_eq!(net(&[r], "merchant_payable:mer_platform"), -4_000);
    }

    #[test]
    fn a_won_dispute_gives_back_exactly_what_it_took() {
        let mut s = Splits::new(10_000, 700, vec![(acct(1), 4_000), (acct(2), 3_000)]).unwrap();
        s.capture(10_000, 10_000, 0, &platform()).unwrap();
        s.refund(1_234, true, false, &platform()).unwrap();
        let before = s.clone();
        let opened = s.dispute_opened(8_766, &platform()).unwrap();
        let won = s.dispute_won(8_766, &platform()).unwrap();
        assert!(is_balanced(&opened) && is_balanced(&won));
        for acc in [
            "seller_available:acct_1",
            "seller_available:acct_2",
            "merchant_payable:mer_platform",
        ] {
            assert_eq!(net(&[opened.clone(), won.clone()], acc), 0, "{acc}");
        }
        assert_eq!(s, before);
    }

    #[test]
    fn create_refuses_impossible_splits() {
        assert_eq!(
            Splits::new(100, 1, vec![(acct(1), 100)]).unwrap_err(),
            SplitError::OverAmount
        );
        assert_eq!(
            Splits::new(100, 0, vec![(acct(1), 10), (acct(1), 10)]).unwrap_err(),
            SplitError::Repeated
        );
        assert_eq!(
            Splits::new(100, 0, vec![(acct(1), 0)]).unwrap_err(),
            SplitError::NotPositive
        );
        assert_eq!(Splits::new(100, -1, vec![]).unwrap_err(), SplitError::NegativeFee);
        let many: Vec<(AccountId, i64)> = (0..=MAX_SPLITS).map(|i| (acct(i), 1)).collect();
        assert_eq!(Splits::new(1_000, 0, many).unwrap_err(), SplitError::TooMany);
        assert_eq!(
            Splits::new(i64::MAX, 1, vec![(acct(1), i64::MAX)]).unwrap_err(),
            SplitError::OverAmount
        );
    }

    proptest! {
        #[test]
        fn a_share_is_exact_and_never_exceeds_its_weight(
            weights in prop::collection::vec(0i64..1_000_000_000, 1..20),
            frac in 0u32..=1000,
        ) {
            let sum: i64 = weights.iter().sum();
            let total = (i128::from(sum) * i128::from(frac) / 1000) as i64;
            let s = share(total, &weights);
            if sum == 0 {
                prop_assert_eq!(s, Some(vec![0; weights.len()]));
            } else {
                let s = s.unwrap();
                prop_assert_eq!(s.iter().sum::<i64>(), total);
                for (x, w) in s.iter().zip(&weights) {
                    prop_assert!(*x >= 0 && x <= w);
                    // Within one unit of the exact share.
                    let exact = i128::from(total) * i128::from(*w);
                    prop_assert!((i128::from(*x) * i128::from(sum) - exact).abs() < i128::from(sum));
                }
            }
        }

        /// A payment's whole life: capture (maybe partial), refunds with every flag, a dispute
        /// won or lost. Every journal balances, no unit is made or lost, no part gives back more
        /// than it got, and refunding everything with the fee leaves every party at zero.
        #[test]
        fn no_rounding_makes_or_loses_a_unit(
            amount in 1i64..10_000_000,
            seller_weights in prop::collection::vec(1u32..1000, 0..8),
            fee_permille in 0u32..300,
            rest_permille in 0u32..300,
            capture_permille in 1u32..=1000,
            payrail_fee in 0i64..500,
            refunds in prop::collection::vec((1u32..=1000, any::<bool>(), any::<bool>()), 0..5),
            dispute in prop::option::of((1u32..=1000, any::<bool>())),
        ) {
            // Splits from weights, fitting the amount with a fee and a rest.
            let fee = i64::from(fee_permille) * amount / 1000;
            let rest = i64::from(rest_permille) * amount / 1000;
            let for_sellers = (amount - fee - rest).max(0);
            let wsum: i64 = seller_weights.iter().map(|w| i64::from(*w)).sum();
            let splits: Vec<(AccountId, i64)> = seller_weights
                .iter()
                .enumerate()
                .map(|(i, w)| (acct(i), i64::from(*w) * for_sellers / wsum.max(1)))
                .filter(|(_, a)| *a > 0)
                .collect();
            let mut s = Splits::new(amount, fee, splits).unwrap();
            let captured = (i64::from(capture_permille) * amount / 1000).max(1);
            let payrail_fee = payrail_fee.min(captured);
            let mut journals = vec![s.capture(amount, captured, payrail_fee, &platform()).unwrap()];
            let mut left = captured;
            for (permille, reverse, refund_fee) in refunds {
                let r = (i64::from(permille) * left / 1000).max(1).min(left);
                if left == 0 { break; }
                journals.push(s.refund(r, reverse, refund_fee, &platform()).unwrap());
                left -= r;
            }
            if let (Some((permille, won)), true) = (dispute, left > 0) {
                let d = (i64::from(permille) * left / 1000).max(1).min(left);
                journals.push(s.dispute_opened(d, &platform()).unwrap());
                if won {
                    journals.push(s.dispute_won(d, &platform()).unwrap());
                }
            }
            for j in &journals {
                prop_assert!(is_balanced(j), "{:?}", j);
            }
            let all: i64 = journals.iter().flatten().map(|e| e.credit - e.debit).sum();
            prop_assert_eq!(all, 0);
            for x in &s.splits {
                prop_assert!(x.returned >= 0 && x.returned <= x.captured && x.captured <= x.amount);
            }
            prop_assert!(s.fee.returned <= s.fee.captured && s.rest.returned <= s.rest.captured);
            // What the ledger says each seller has is what the splits say it got and paid.
            for x in &s.splits {
                prop_assert_eq!(
                    net(&journals, &seller_pending(&x.account)) + net(&journals, &seller_available(&x.account)),
                    x.captured - x.debited
                );
            }
        }

        #[test]
        fn a_full_refund_with_the_fee_leaves_every_party_at_zero(
            amount in 1i64..10_000_000,
            seller_weights in prop::collection::vec(1u32..1000, 1..8),
            fee_permille in 0u32..300,
            cuts in prop::collection::vec(1u32..1000, 0..6),
        ) {
            let fee = i64::from(fee_permille) * amount / 1000;
            let for_sellers = amount - fee;
            let wsum: i64 = seller_weights.iter().map(|w| i64::from(*w)).sum();
            let splits: Vec<(AccountId, i64)> = seller_weights
                .iter()
                .enumerate()
                .map(|(i, w)| (acct(i), i64::from(*w) * for_sellers / wsum))
                .filter(|(_, a)| *a > 0)
                .collect();
            let mut s = Splits::new(amount, fee, splits).unwrap();
            let mut journals = vec![s.capture(amount, amount, 0, &platform()).unwrap()];
            let mut left = amount;
            for c in cuts {
                let r = (i64::from(c) * left / 1000).max(1).min(left);
                journals.push(s.refund(r, true, true, &platform()).unwrap());
                left -= r;
                if left == 0 { break; }
            }
            if left > 0 {
                journals.push(s.refund(left, true, true, &platform()).unwrap());
            }
            for x in &s.splits {
                prop_assert_eq!(x.returned, x.captured);
                prop_assert_eq!(
                    net(&journals, &seller_pending(&x.account)) + net(&journals, &seller_available(&x.account)),
                    0
                );
            }
            prop_assert_eq!(net(&journals, "merchant_payable:mer_platform"), 0);
            prop_assert_eq!(net(&journals, PSP_CLEARING), 0);
        }
    }
}
