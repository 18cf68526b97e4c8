//! The records a payment is made of, and their public JSON shapes (docs/API.md's Payment and
//! Refund objects). Rendering is pure so that the payment actor can render a response before
//! it commits, and commit that exact response as the idempotency record.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ids::{MerchantId, PaymentId, RefundId};
use super::money::{Currency, Money};
use super::payment::{CaptureStrategy, PaymentState, Status};

/// Why a payment failed, as the PSP said it (`card_declined` / `insufficient_funds`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decline_code: Option<String>,
    pub message: String,
}

/// What the customer must do next (3-D Secure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextAction {
    #[serde(rename = "type")]
    pub kind: String,
    pub redirect_url: String,
}

/// A payment as payrail keeps it.
#[derive(Debug, Clone, PartialEq)]
/// The optional parts a payment may never have (a card, splits, a failure…) are boxed: a live
/// actor holds its payment, and inline they were over half of its 904 bytes.
pub struct Payment {
    pub id: PaymentId,
    pub merchant_id: MerchantId,
    pub order_id: String,
    pub currency: Currency,
    pub state: PaymentState,
    pub capture_strategy: CaptureStrategy,
    pub payment_method: String,
    pub psp: String,
    pub psp_reference: Option<String>,
    pub client_secret: Option<String>,
    pub next_action: Option<Box<NextAction>>,
    pub failure: Option<Box<Failure>>,
    pub customer_id: Option<String>,
    pub description: Option<String>,
    pub metadata: Metadata,
    /// The merchant's fee when the payment was created: the price agreed then is the one charged.
    pub fee_bps: u32,
    pub fee_fixed: i64,
    /// Bumped by every committed change; a commit that finds another version lost a race.
    pub version: i32,
    /// Status changes so far, the `seq` of the next one.
    pub transitions: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The customer's email, IP and country, if the merchant sent them: risk signals.
    pub customer: Option<Box<super::risk::Customer>>,
    /// What the PSP's tokenizer knows of the card (never the number), once confirmed.
    pub card: Option<Box<super::risk::CardSignals>>,
    /// What the merchant's risk rules decided at confirm.
    pub risk: Option<Box<super::risk::RiskDecision>>,
    /// A platform's payment shared with its sellers: the splits and what each part got.
    pub splits: Option<Box<super::marketplace::Splits>>,
    /// Where its authorization went. `None`: the merchant's own sandbox connector (a payment
    /// not confirmed yet, or made before routing).
    pub routing: Option<Box<Routing>>,
}

/// Where a payment's authorization went: the connector, the rule that chose it, and every
/// authorization attempt (the payment object's `routing` and `attempts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    pub connector_id: String,
    pub rule: String,
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
}

/// One PSP attempt as the payment object lists it. At most [`Routing::MAX_ATTEMPTS`]
/// are kept on the payment (every one is a `psp_attempts` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub id: String,
    /// `authorize`, `capture`, `cancel` or `refund`.
    #[serde(default = "authorize")]
    pub operation: String,
    pub connector_id: String,
    /// `null` while open, then `succeeded`, `failed`, `requires_action`, `pending`, `rejected`
    /// or `unreachable`.
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_code: Option<String>,
}

fn authorize() -> String {
    "authorize".to_owned()
}

impl Routing {
    pub const MAX_ATTEMPTS: usize = 20;

    /// Notes a new attempt (the oldest is dropped past the bound).
    pub fn started(&mut self, id: &str, operation: &str, connector_id: &str) {
        if self.attempts.len() >= Self::MAX_ATTEMPTS {
            self.attempts.remove(0);
        }
        self.attempts.push(AttemptRecord {
            id: id.to_owned(),
            operation: operation.to_owned(),
            connector_id: connector_id.to_owned(),
            outcome: None,
            failure_code: None,
        });
    }

    /// Notes how an attempt ended.
    pub fn finished(&mut self, id: &str, outcome: &str, failure_code: Option<&str>) {
        if let Some(a) = self.attempts.iter_mut().find(|a| a.id == id) {
            a.outcome = Some(outcome.to_owned());
            a.failure_code = failure_code.map(str::to_owned);
        }
    }
}

impl Payment {
    /// Whether `next` differs from this payment only in what a state-only update writes
    /// (`state`, `version`, `transitions`, `updated_at`). Every other field is compared: a
    /// field added to `Payment` must be listed here, or this does not compile.
    pub fn differs_only_in_state(&self, next: &Payment) -> bool {
        let Payment {
            id,
            merchant_id,
            order_id,
            currency,
            state: _,
            capture_strategy,
            payment_method,
            psp,
            psp_reference,
            client_secret,
            next_action,
            failure,
            customer_id,
            description,
            metadata,
            fee_bps,
            fee_fixed,
            version: _,
            transitions: _,
            created_at,
            updated_at: _,
            customer,
            card,
            risk,
            splits,
            routing,
        } = self;
        *id == next.id
            && *merchant_id == next.merchant_id
            && *order_id == next.order_id
            && *currency == next.currency
            && *capture_strategy == next.capture_strategy
            && *payment_method == next.payment_method
            && *psp == next.psp
            && *psp_reference == next.psp_reference
            && *client_secret == next.client_secret
            && *next_action == next.next_action
            && *failure == next.failure
            && *customer_id == next.customer_id
            && *description == next.description
            && *metadata == next.metadata
            && *fee_bps == next.fee_bps
            && *fee_fixed == next.fee_fixed
            && *created_at == next.created_at
            && *customer == next.customer
            && *card == next.card
            && *risk == next.risk
            && *splits == next.splits
            && *routing == next.routing
    }

    /// A new payment as a create leaves it: `pending`, version 1, nothing from the PSP yet.
    /// The optional fields (order id, capture strategy, fees, the customer's details) are set
    /// by the caller with struct update syntax.
    pub fn pending(
        id: PaymentId,
        merchant_id: MerchantId,
        amount: Money,
        payment_method: String,
        psp: String,
        at: DateTime<Utc>,
    ) -> Payment {
        Payment {
            id,
            merchant_id,
            order_id: String::new(),
            currency: amount.currency,
            state: super::PaymentState::new(amount.minor),
            capture_strategy: super::CaptureStrategy::Automatic,
            payment_method,
            psp,
            psp_reference: None,
            client_secret: None,
            next_action: None,
            failure: None,
            customer_id: None,
            description: None,
            metadata: Metadata::default(),
            fee_bps: 0,
            fee_fixed: 0,
            version: 1,
            transitions: 1,
            created_at: at,
            updated_at: at,
            customer: None,
            card: None,
            risk: None,
            splits: None,
            routing: None,
        }
    }

    pub fn amount(&self) -> Money {
        Money::new(self.state.amount, self.currency)
    }

    pub fn status(&self) -> Status {
        self.state.status
    }

    /// The payment object (docs/API.md, "The Payment object") as a JSON tree.
    pub fn to_object(&self) -> Value {
        // A map of strings and numbers always converts.
        serde_json::to_value(self.object()).unwrap_or(Value::Null)
    }

    /// The payment object, serialized straight from the record: the hot path's answers and
    /// events are written without building a `Value` tree first. Key order is the object's.
    pub fn object(&self) -> PaymentObject<'_> {
        PaymentObject(self)
    }
}

/// [`Payment::object`]: the one definition of the payment object's fields and their order.
pub struct PaymentObject<'a>(&'a Payment);

impl Serialize for PaymentObject<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        #[derive(Serialize)]
        struct Amount {
            value: i64,
            currency: Currency,
        }
        #[derive(Serialize)]
        struct Card<'a> {
            brand: &'a str,
            bin: &'a str,
            last4: &'a str,
            country: &'a str,
            funding: &'a str,
            fingerprint: &'a str,
        }
        #[derive(Serialize)]
        struct Split<'a> {
            account: &'a super::ids::AccountId,
            amount: i64,
            amount_captured: i64,
            amount_returned: i64,
            amount_debited: i64,
        }
        #[derive(Serialize)]
        struct Route<'a> {
            connector_id: &'a str,
            rule: &'a str,
        }
        struct Splits<'a>(&'a [super::marketplace::Split]);
        impl Serialize for Splits<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|x| Split {
                    account: &x.account,
                    amount: x.amount,
                    amount_captured: x.captured,
                    amount_returned: x.returned,
                    amount_debited: x.debited,
                }))
            }
        }

        let p = self.0;
        let mut m = s.serialize_map(Some(28))?;
        m.serialize_entry("object", "payment")?;
        m.serialize_entry("payment_id", &p.id)?;
        m.serialize_entry("merchant_id", &p.merchant_id)?;
        m.serialize_entry("order_id", &p.order_id)?;
        m.serialize_entry("status", p.state.status.as_str())?;
        m.serialize_entry(
            "amount",
            &Amount {
                value: p.state.amount,
                currency: p.currency,
            },
        )?;
        m.serialize_entry("amount_capturable", &p.state.capturable)?;
        m.serialize_entry("amount_captured", &p.state.captured)?;
        m.serialize_entry("amount_refunded", &p.state.refunded)?;
        m.serialize_entry("capture_strategy", p.capture_strategy.as_str())?;
        m.serialize_entry("payment_method", &p.payment_method)?;
        m.serialize_entry("psp", &p.psp)?;
        m.serialize_entry("psp_reference", &p.psp_reference)?;
        m.serialize_entry("client_secret", &p.client_secret)?;
        m.serialize_entry("next_action", &p.next_action)?;
        m.serialize_entry("failure", &p.failure)?;
        m.serialize_entry("customer_id", &p.customer_id)?;
        m.serialize_entry("description", &p.description)?;
        m.serialize_entry("metadata", &p.metadata)?;
        m.serialize_entry("customer", &p.customer)?;
        m.serialize_entry(
            "card",
            &p.card.as_ref().map(|c| Card {
                brand: &c.brand,
                bin: &c.bin,
                last4: &c.last4,
                country: &c.country,
                funding: &c.funding,
                fingerprint: &c.fingerprint,
            }),
        )?;
        m.serialize_entry("risk", &p.risk)?;
        m.serialize_entry(
            "application_fee_amount",
            &p.splits.as_ref().map(|s| s.application_fee_amount),
        )?;
        m.serialize_entry("splits", &p.splits.as_ref().map(|s| Splits(&s.splits)))?;
        m.serialize_entry(
            "routing",
            &p.routing.as_ref().map(|r| Route {
                connector_id: &r.connector_id,
                rule: &r.rule,
            }),
        )?;
        m.serialize_entry(
            "attempts",
            p.routing.as_ref().map(|r| r.attempts.as_slice()).unwrap_or_default(),
        )?;
        m.serialize_entry("created_at", &timestamp(p.created_at))?;
        m.serialize_entry("updated_at", &timestamp(p.updated_at))?;
        m.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    Pending,
    Succeeded,
    Failed,
}

impl RefundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Pending => "pending",
            RefundStatus::Succeeded => "succeeded",
            RefundStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<RefundStatus> {
        [RefundStatus::Pending, RefundStatus::Succeeded, RefundStatus::Failed]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Refund {
    pub id: RefundId,
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    pub status: RefundStatus,
    pub reason: Option<String>,
    pub psp_reference: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// For a split payment: the sellers give back their parts of it.
    pub reverse_splits: bool,
    /// For a split payment: the platform gives back its application fee's part of it.
    pub refund_application_fee: bool,
}

impl Refund {
    /// docs/API.md's Refund object.
    pub fn to_object(&self) -> Value {
        json!({
            "object": "refund",
            "refund_id": self.id,
            "payment_id": self.payment_id,
            "amount": self.amount,
            "status": self.status.as_str(),
            "reason": self.reason,
            "psp_reference": self.psp_reference,
            "reverse_splits": self.reverse_splits,
            "refund_application_fee": self.refund_application_fee,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisputeStatus {
    NeedsResponse,
    UnderReview,
    Won,
    Lost,
}

impl DisputeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DisputeStatus::NeedsResponse => "needs_response",
            DisputeStatus::UnderReview => "under_review",
            DisputeStatus::Won => "won",
            DisputeStatus::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<DisputeStatus> {
        [
            DisputeStatus::NeedsResponse,
            DisputeStatus::UnderReview,
            DisputeStatus::Won,
            DisputeStatus::Lost,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
}

/// A chargeback, opened and closed by the PSP's events.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispute {
    pub id: super::ids::DisputeId,
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    /// The PSP's dispute id.
    pub psp_reference: String,
    pub amount: Money,
    pub status: DisputeStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Dispute {
    /// docs/API.md's Dispute object.
    pub fn to_object(&self) -> Value {
        json!({
            "object": "dispute",
            "dispute_id": self.id,
            "payment_id": self.payment_id,
            "psp_reference": self.psp_reference,
            "amount": self.amount,
            "status": self.status.as_str(),
            "reason": self.reason,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
        })
    }
}

/// RFC 3339 UTC with microseconds, the precision PostgreSQL keeps, so a timestamp read back
/// renders exactly as it was first sent.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Now, truncated to PostgreSQL's microsecond precision.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// `{ "object": "list", "data": [...], "has_more": bool }`.
pub fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    json!({ "object": "list", "data": data, "has_more": has_more })
}

/// A payment's metadata: the merchant's string keys and values (at most 50), sorted by key.
/// A sorted vector, not a `BTreeMap`: a live actor holds its payment, and a B-tree node for
/// even one key is over 500 bytes where this holds what it holds. Serialized as a JSON object
/// in key order, as the map was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets `key` (replacing its value, if it had one).
    pub fn insert(&mut self, key: String, value: String) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Metadata {
        let mut m = Metadata::default();
        for (k, v) in pairs {
            m.insert(k, v);
        }
        m.0.shrink_to_fit();
        m
    }
}

impl<const N: usize> From<[(String, String); N]> for Metadata {
    fn from(pairs: [(String, String); N]) -> Metadata {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Metadata {
        // Already in key order.
        Metadata(map.into_iter().collect())
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Metadata, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Metadata::from)
    }
}

#[cfg(test)]
mod metadata_tests {
    use super::Metadata;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// The sorted vector answers and serializes exactly as the map it replaced.
        #[test]
        fn metadata_behaves_as_a_btreemap(pairs in prop::collection::vec(("[a-d]{1,3}", "[a-z]{0,4}"), 0..12),
                                          probe in "[a-d]{1,3}") {
            let map: BTreeMap<String, String> = pairs.iter().cloned().collect();
            let meta: Metadata = pairs.iter().cloned().collect();
            prop_assert_eq!(meta.len(), map.len());
            prop_assert_eq!(meta.get(&probe), map.get(&probe));
            prop_assert_eq!(serde_json::to_string(&meta).unwrap(), serde_json::to_string(&map).unwrap());
            let back: Metadata = serde_json::from_str(&serde_json::to_string(&map).unwrap()).unwrap();
            prop_assert_eq!(&back, &meta);
            prop_assert_eq!(Metadata::from(map.clone()), meta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{decide, Currency, Input, Money};

    fn payment() -> Payment {
        Payment::pending(
            PaymentId::from_trusted("pay_1".to_owned()),
            MerchantId::from_trusted("mer_1".to_owned()),
            Money::new(1000, Currency::parse("USD").unwrap()),
            "pm_card_visa".to_owned(),
            "sandbox".to_owned(),
            chrono::Utc::now(),
        )
    }

    /// The payment object as `json!` rendered it before [`PaymentObject`] wrote it directly:
    /// the reference the direct serializer must match byte for byte.
    fn reference_object(p: &Payment) -> Value {
        json!({
            "object": "payment",
            "payment_id": p.id,
            "merchant_id": p.merchant_id,
            "order_id": p.order_id,
            "status": p.state.status.as_str(),
            "amount": { "value": p.state.amount, "currency": p.currency },
            "amount_capturable": p.state.capturable,
            "amount_captured": p.state.captured,
            "amount_refunded": p.state.refunded,
            "capture_strategy": p.capture_strategy.as_str(),
            "payment_method": p.payment_method,
            "psp": p.psp,
            "psp_reference": p.psp_reference,
            "client_secret": p.client_secret,
            "next_action": p.next_action,
            "failure": p.failure,
            "customer_id": p.customer_id,
            "description": p.description,
            "metadata": p.metadata,
            "customer": p.customer,
            "card": p.card.as_ref().map(|c| json!({ "brand": c.brand, "bin": c.bin, "last4": c.last4,
                                                     "country": c.country, "funding": c.funding,
                                                     "fingerprint": c.fingerprint })),
            "risk": p.risk,
            "application_fee_amount": p.splits.as_ref().map(|s| s.application_fee_amount),
            "splits": p.splits.as_ref().map(|s| s.splits.iter().map(|x| json!({
                "account": x.account, "amount": x.amount, "amount_captured": x.captured,
                "amount_returned": x.returned, "amount_debited": x.debited,
            })).collect::<Vec<_>>()),
            "routing": p.routing.as_ref().map(|r| json!({ "connector_id": r.connector_id, "rule": r.rule })),
            "attempts": p.routing.as_ref().map(|r| r.attempts.as_slice()).unwrap_or_default(),
            "created_at": timestamp(p.created_at),
            "updated_at": timestamp(p.updated_at),
        })
    }

    /// Every optional part of a payment set, with text that JSON must escape.
    fn everything() -> Payment {
        use super::super::ids::AccountId;
        use super::super::marketplace::{Split, Splits};
        use super::super::risk::{CardSignals, Customer, RiskAction, RiskDecision};
        let mut p = payment();
        p.state = decide(&p.state, Input::Charged { amount: 1000 }).unwrap().0;
        p.psp_reference = Some("pi_1".to_owned());
        p.client_secret = Some("pi_1_secret_\"x\"".to_owned());
        p.next_action = Some(Box::new(NextAction {
            kind: "three_d_secure".to_owned(),
            redirect_url: "https://psp.example/3ds?a=1&b=\u{e9}".to_owned(),
        }));
        p.failure = Some(Box::new(Failure {
            code: "card_declined".to_owned(),
            decline_code: Some("do_not_honor".to_owned()),
            message: "line\nbreak".to_owned(),
        }));
        p.customer_id = Some("cus_1".to_owned());
        p.description = Some("caf\u{e9} \u{1f600}".to_owned());
        p.metadata = [("b", "2"), ("a", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        p.customer = Some(Box::new(Customer {
            email: Some("a@example.com".to_owned()),
            ip: None,
            country: Some("FR".to_owned()),
        }));
        p.card = Some(Box::new(CardSignals {
            fingerprint: "f".repeat(32),
            bin: "424242".to_owned(),
            brand: "visa".to_owned(),
            country: "US".to_owned(),
            funding: "credit".to_owned(),
            last4: "4242".to_owned(),
        }));
        p.risk = Some(Box::new(RiskDecision {
            score: 40,
            outcome: RiskAction::Review,
            rule: Some("rul_1".to_owned()),
        }));
        p.splits = Some(Box::new(Splits {
            application_fee_amount: 100,
            splits: vec![Split {
                account: AccountId::from_trusted("acct_1".to_owned()),
                amount: 900,
                captured: 900,
                returned: 10,
                debited: 11,
            }],
            fee: Default::default(),
            rest: Default::default(),
            dispute: None,
        }));
        p.routing = Some(Box::new(Routing {
            connector_id: "mca_1".to_owned(),
            rule: "default".to_owned(),
            attempts: vec![AttemptRecord {
                id: "att_1".to_owned(),
                operation: "authorize".to_owned(),
                connector_id: "mca_1".to_owned(),
                outcome: Some("failed".to_owned()),
                failure_code: Some("issuer_unavailable".to_owned()),
            }],
        }));
        p
    }

    #[test]
    fn the_payment_object_is_written_exactly_as_its_json_tree_was() {
        for p in [payment(), everything()] {
            let direct = serde_json::to_string(&p.object()).unwrap();
            assert_eq!(direct, serde_json::to_string(&reference_object(&p)).unwrap());
            assert_eq!(p.to_object(), reference_object(&p));
        }
        // The fully set payment shows every part (the test would not notice a part left out
        // of both renderings otherwise).
        let object = everything().to_object();
        for key in [
            "next_action",
            "failure",
            "customer",
            "card",
            "risk",
            "splits",
            "routing",
        ] {
            assert!(object[key].is_object() || object[key].is_array(), "{key}: {object}");
        }
        assert_eq!(object.as_object().unwrap().len(), 28);
    }

    #[test]
    fn a_change_of_state_alone_is_state_only_and_any_other_field_is_not() {
        let before = payment();
        let mut next = before.clone();
        next.state = decide(&before.state, Input::Charged { amount: 1000 }).unwrap().0;
        next.version += 1;
        next.transitions += 1;
        next.updated_at = before.updated_at + chrono::Duration::seconds(1);
        assert!(before.differs_only_in_state(&next));

        let mut with_reference = next.clone();
        with_reference.psp_reference = Some("pi_1".to_owned());
        assert!(!before.differs_only_in_state(&with_reference));
        let mut with_routing = next.clone();
        with_routing.routing = Some(Box::new(Routing {
            connector_id: "con_1".to_owned(),
            rule: "default".to_owned(),
            attempts: Vec::new(),
        }));
        assert!(!before.differs_only_in_state(&with_routing));
        let mut with_failure = next;
        with_failure.failure = Some(Box::new(Failure {
            code: "card_declined".to_owned(),
            decline_code: None,
            message: "declined".to_owned(),
        }));
        assert!(!before.differs_only_in_state(&with_failure));
    }
}
