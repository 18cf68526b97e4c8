//! The embedded sandbox PSP: a simulated card processor with Stripe's test tokens, so payrail
//! runs with no outside account. Deterministic per idempotency key: the same key always gets
//! the same answer and the same reference. Its intents live in memory, bounded by
//! `[psp.sandbox] max_intents`; tokenized cards (brand, last four, expiry) live in PostgreSQL.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;
use sha2::{Digest, Sha256};

use serde_json::json;

use super::sandbox_webhooks::Notifier;
use super::{AuthorizeRequest, Intent, IntentStatus, Psp, PspError, PspFuture, PspRefund, PspRefundStatus};
use crate::adapters::postgres::sandbox::StoredCard;
use crate::adapters::postgres::Db;
use crate::adapters::postgres::StoreError;
use crate::config::SandboxPspConfig;
use crate::domain::card::CardNumber;
use crate::domain::risk::CardSignals;
use crate::domain::{AttemptId, CaptureStrategy, Failure, MerchantId, Money};

/// What a test card does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Success,
    Declined,
    InsufficientFunds,
    ThreeDSecure,
    Dispute,
    Fraudulent,
    /// A soft decline (`processing_error`) on a payment's first authorization; the next one,
    /// on any connector, succeeds.
    ProcessingError,
}

impl Behaviour {
    fn as_str(self) -> &'static str {
        match self {
            Behaviour::Success => "success",
            Behaviour::Declined => "declined",
            Behaviour::InsufficientFunds => "insufficient_funds",
            Behaviour::ThreeDSecure => "three_d_secure",
            Behaviour::Dispute => "dispute",
            Behaviour::Fraudulent => "fraudulent",
            Behaviour::ProcessingError => "processing_error",
        }
    }

    fn parse(s: &str) -> Behaviour {
        [
            Behaviour::Declined,
            Behaviour::InsufficientFunds,
            Behaviour::ThreeDSecure,
            Behaviour::Dispute,
            Behaviour::Fraudulent,
            Behaviour::ProcessingError,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
        .unwrap_or(Behaviour::Success)
    }

    /// The behaviour of one of docs/API.md's test cards; any other valid number succeeds.
    fn of_card(pan: &CardNumber) -> Behaviour {
        match pan.expose_digits() {
            "4000000000000002" => Behaviour::Declined,
            "4000000000009995" => Behaviour::InsufficientFunds,
            "4000000000003220" => Behaviour::ThreeDSecure,
            "4000000000000259" => Behaviour::Dispute,
            "4100000000000019" => Behaviour::Fraudulent,
            "4000000000000119" => Behaviour::ProcessingError,
            _ => Behaviour::Success,
        }
    }
}

/// The card behind each named test token.
fn builtin_pan(token: &str) -> Option<&'static str> {
    Some(match token {
        "pm_card_visa" => "4242424242424242",
        "pm_card_mastercard" => "5555555555554444",
        "pm_card_chargeDeclined" => "4000000000000002",
        "pm_card_chargeDeclinedInsufficientFunds" => "4000000000009995",
        "pm_card_threeDSecureRequired" => "4000000000003220",
        "pm_card_createDispute" => "4000000000000259",
        "pm_card_riskLevelHighest" => "4100000000000019",
        "pm_card_chargeDeclinedProcessingError" => "4000000000000119",
        _ => return None,
    })
}

/// The issuing country and funding of the test cards that have them (Stripe's numbers);
/// any other number is a US credit card.
fn card_profile(digits: &str) -> (&'static str, &'static str) {
    match digits {
        "4000056655665556" | "5200828282828210" => ("US", "debit"),
        "5105105105105100" => ("US", "prepaid"),
        "4000000760000002" => ("BR", "credit"),
        "4000001240000000" => ("CA", "credit"),
        "4000002500000003" => ("FR", "credit"),
        "4000002760000016" => ("DE", "credit"),
        "4000008260000000" => ("GB", "credit"),
        _ => ("US", "credit"),
    }
}

/// docs/API.md's named test tokens.
fn builtin_token(token: &str) -> Option<Behaviour> {
    Some(match token {
        "pm_card_visa" | "pm_card_mastercard" => Behaviour::Success,
        "pm_card_chargeDeclined" => Behaviour::Declined,
        "pm_card_chargeDeclinedInsufficientFunds" => Behaviour::InsufficientFunds,
        "pm_card_threeDSecureRequired" => Behaviour::ThreeDSecure,
        "pm_card_createDispute" => Behaviour::Dispute,
        "pm_card_riskLevelHighest" => Behaviour::Fraudulent,
        "pm_card_chargeDeclinedProcessingError" => Behaviour::ProcessingError,
        _ => return None,
    })
}

#[derive(Debug, Clone)]
struct SandboxIntent {
    /// Whose intent it is: its captures and refunds go to that merchant's settlement reports.
    merchant: MerchantId,
    behaviour: Behaviour,
    amount: Money,
    capture: CaptureStrategy,
    status: IntentStatus,
    client_secret: String,
    refunded: i64,
}

#[derive(Debug, Clone)]
enum Remembered {
    Intent(Intent),
    Refund(PspRefund),
}

pub struct SandboxPsp {
    db: Db,
    config: SandboxPspConfig,
    /// Where 3-D Secure redirect URLs point.
    public_url: String,
    /// Shared with the tasks that send delayed events (a dispute reads what is left when it opens).
    intents: std::sync::Arc<DashMap<String, SandboxIntent>>,
    /// The answer given to each idempotency key, replayed when the key comes again.
    answers: DashMap<String, Remembered>,
    /// Insertion order of `intents` and `answers`, so the oldest can be forgotten at the bound.
    /// A std Mutex: held for one push or pop, never across an await.
    order: Mutex<VecDeque<(bool, String)>>,
    /// Tokenized cards already read from PostgreSQL: token → (merchant, behaviour, signals).
    cards: DashMap<String, (String, Behaviour, Option<CardSignals>)>,
    /// Idempotency keys `PANIC_ONCE` already panicked for: the drill panics once per key, so
    /// the restarted actor's retry goes through.
    panicked: DashMap<String, ()>,
    /// Payments whose first authorization `ProcessingError` declined (cleared past 100,000).
    soft_declined: DashMap<String, ()>,
    /// Where the sandbox's events go, when `[psp.sandbox] webhooks` is on.
    notifier: Option<Notifier>,
}

/// What the sandbox's books record (`sandbox_settlement_book.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookKind {
    Charge,
    Refund,
    Dispute,
}

impl BookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BookKind::Charge => "charge",
            BookKind::Refund => "refund",
            BookKind::Dispute => "dispute",
        }
    }
}

/// The sandbox payout rail's bank account tokens: paid at once, paid after a few seconds in
/// transit, and failed (the bank account is closed).
pub const BANK_TOKENS: &[&str] = &["ba_success", "ba_delayed", "ba_failure"];

/// How long a payout to `ba_delayed` stays in transit.
pub const DELAYED_PAYOUT: Duration = Duration::from_secs(3);

/// A sandbox-only token whose authorization panics inside the payment actor's handler, once
/// per attempt: the supervision drill (issue 5) and its test use it.
pub const PANIC_ONCE: &str = "pm_card_panicOnceInHandler";

/// A sandbox-only token whose payment's first ledger commit panics inside the ledger shard's
/// batch, once per order id: the ledger half of the supervision drill.
pub const LEDGER_PANIC_ONCE: &str = "pm_card_panicOnceInLedger";

/// `pi_` (or another prefix) and 24 hex digits of the key's hash: the same key, the same reference.
fn reference(prefix: &str, key: &AttemptId) -> String {
    let h = Sha256::digest(key.as_str().as_bytes());
    format!("{prefix}{}", &hex::encode(h)[..24])
}

fn invalid(code: &str, message: &str, param: Option<&str>) -> PspError {
    PspError::Invalid {
        code: code.into(),
        message: message.into(),
        param: param.map(str::to_owned),
    }
}

impl SandboxPsp {
    pub fn new(db: Db, config: SandboxPspConfig, public_url: String, notifier: Option<Notifier>) -> SandboxPsp {
        SandboxPsp {
            db,
            config,
            public_url,
            intents: std::sync::Arc::new(DashMap::new()),
            answers: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            cards: DashMap::new(),
            panicked: DashMap::new(),
            soft_declined: DashMap::new(),
            notifier,
        }
    }

    /// Turns a test card into a `pm_…` token for `merchant`. The number is dropped here: only
    /// brand, last four, expiry and the test behaviour are kept.
    pub async fn tokenize(
        &self,
        merchant: &MerchantId,
        pan: CardNumber,
        exp_month: i16,
        exp_year: i16,
    ) -> Result<StoredCard, StoreError> {
        let behaviour = Behaviour::of_card(&pan);
        let signals = self.signals_of(&pan);
        let card = StoredCard {
            id: format!("pm_{}", random_base62(24)),
            merchant_id: merchant.to_string(),
            brand: pan.brand().to_owned(),
            last4: pan.last4().to_owned(),
            exp_month,
            exp_year,
            behaviour: behaviour.as_str().to_owned(),
            signals: Some(signals.clone()),
        };
        drop(pan);
        self.db.sandbox_store_card(&card).await?;
        self.cards
            .insert(card.id.clone(), (card.merchant_id.clone(), behaviour, Some(signals)));
        Ok(card)
    }

    /// What the tokenizer keeps of a card for risk rules: the BIN, brand, issuing country and
    /// funding of the test cards, and a keyed hash of the number that no one can reverse.
    fn signals_of(&self, pan: &CardNumber) -> CardSignals {
        use hmac::{Hmac, Mac};
        let digits = pan.expose_digits();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(self.config.card_fingerprint_key.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(digits.as_bytes());
        let fingerprint = hex::encode(&mac.finalize().into_bytes()[..16]);
        let (country, funding) = card_profile(digits);
        CardSignals {
            fingerprint,
            bin: digits[..6.min(digits.len())].to_owned(),
            brand: pan.brand().to_owned(),
            country: country.to_owned(),
            funding: funding.to_owned(),
            last4: pan.last4().to_owned(),
        }
    }

    /// The signals of a token: a named test token's card, or a tokenized card of `merchant`.
    async fn card_signals(&self, merchant: &MerchantId, token: &str) -> Result<Option<CardSignals>, PspError> {
        if let Some(pan) = builtin_pan(token).and_then(CardNumber::parse) {
            return Ok(Some(self.signals_of(&pan)));
        }
        self.behaviour(merchant, token).await?;
        Ok(self.cards.get(token).and_then(|c| c.2.clone()))
    }

    /// The customer finished the 3-D Secure step: the intent is authorized (or captured, with
    /// automatic capture). Errors with the intent's status when it was not waiting for it.
    pub async fn complete_3ds(&self, reference: &str) -> Result<(), Option<IntentStatus>> {
        let (merchant, amount, capture) = {
            let intent = self.intents.get(reference).ok_or(None)?;
            if !matches!(intent.status, IntentStatus::RequiresAction { .. }) {
                return Err(Some(intent.status.clone()));
            }
            (intent.merchant.clone(), intent.amount, intent.capture)
        };
        if capture == CaptureStrategy::Automatic {
            // The PSP's books first: a capture it cannot record does not happen.
            self.book(&merchant, BookKind::Charge, reference, reference, amount.minor, amount)
                .await
                .map_err(|_| None)?;
        }
        let mut intent = self.intents.get_mut(reference).ok_or(None)?;
        if !matches!(intent.status, IntentStatus::RequiresAction { .. }) {
            return Err(Some(intent.status.clone()));
        }
        intent.status = match intent.capture {
            CaptureStrategy::Automatic => IntentStatus::Succeeded {
                amount_captured: intent.amount.minor,
            },
            CaptureStrategy::Manual => IntentStatus::Authorized {
                amount: intent.amount.minor,
            },
        };
        self.announce(reference, &intent);
        Ok(())
    }

    /// Whether the payout rail can report outcomes (it reports by webhook only).
    pub fn pays_out(&self) -> bool {
        self.notifier.is_some()
    }

    /// The payout rail: takes payout `id` and reports its outcome by signed webhook
    /// (`payout.paid` or `payout.failed`, `data.object.id` = `id`), as the bank token says. It
    /// keeps no state: handed the same payout again, it reports again, under a new event id
    /// (payrail applies an outcome to a payout once). Without webhooks it refuses.
    pub fn submit_payout(&self, id: &str, amount: i64, currency: &str, bank_account: &str) -> Result<(), PspError> {
        let Some(n) = &self.notifier else {
            return Err(PspError::Unavailable(
                "the sandbox payout rail reports by webhook: [psp.sandbox] webhooks is off".into(),
            ));
        };
        let object = |status: &str| {
            json!({ "id": id, "object": "payout", "amount": amount, "currency": currency.to_ascii_lowercase(),
                    "status": status, "destination": bank_account })
        };
        match bank_account {
            "ba_success" => n.send("payout.paid", object("paid"), Duration::ZERO),
            "ba_delayed" => n.send("payout.paid", object("paid"), DELAYED_PAYOUT),
            "ba_failure" => {
                let mut o = object("failed");
                o["failure_code"] = json!("account_closed");
                n.send("payout.failed", o, Duration::ZERO)
            }
            _ => {
                return Err(invalid(
                    "resource_missing",
                    "no such bank account",
                    Some("bank_account"),
                ))
            }
        }
        Ok(())
    }

    /// Sends what just happened to `reference` as the PSP's event, if webhooks are on.
    fn announce(&self, reference: &str, intent: &SandboxIntent) {
        let Some(n) = &self.notifier else { return };
        let currency = intent.amount.currency.code().to_ascii_lowercase();
        let base = |status: &str| {
            json!({ "id": reference, "object": "payment_intent", "amount": intent.amount.minor, "currency": currency,
                    "status": status })
        };
        match &intent.status {
            IntentStatus::Authorized { amount } => {
                let mut o = base("requires_capture");
                o["amount_capturable"] = json!(amount);
                n.send("payment_intent.amount_capturable_updated", o, Duration::ZERO);
            }
            IntentStatus::Succeeded { amount_captured } => {
                let mut o = base("succeeded");
                o["amount_received"] = json!(amount_captured);
                n.send("payment_intent.succeeded", o, Duration::ZERO);
                if intent.behaviour == Behaviour::Dispute {
                    // The customer disputes what is left of the charge when the dispute opens:
                    // a refund made before then is not disputed again.
                    let (intents, n, reference) = (self.intents.clone(), n.clone(), reference.to_owned());
                    let (captured, delay) = (*amount_captured, Duration::from_millis(self.config.dispute_delay_ms));
                    let (db, merchant, money) = (self.db.clone(), intent.merchant.clone(), intent.amount);
                    actix_rt::spawn(async move {
                        actix_rt::time::sleep(delay).await;
                        let left = intents.get(&reference).map(|i| captured - i.refunded).unwrap_or(0);
                        if left > 0 {
                            let id = format!("du_{}", reference.trim_start_matches("pi_"));
                            // The dispute takes the funds back from the PSP balance at once.
                            let booked = db
                                .sandbox_book(
                                    merchant.as_str(),
                                    BookKind::Dispute.as_str(),
                                    &id,
                                    &reference,
                                    -left,
                                    money.currency.code(),
                                )
                                .await;
                            if let Err(e) = booked {
                                tracing::warn!(error = %e, "sandbox: dispute not booked; it opens when the database answers");
                                return;
                            }
                            let dispute = json!({ "id": id,
                                                  "object": "dispute", "amount": left, "currency": currency,
                                                  "payment_intent": reference, "reason": "fraudulent",
                                                  "status": "needs_response" });
                            n.send("charge.dispute.created", dispute, Duration::ZERO);
                        }
                    });
                }
            }
            IntentStatus::Failed(f) => {
                let mut o = base("requires_payment_method");
                o["last_payment_error"] =
                    json!({ "code": f.code, "decline_code": f.decline_code, "message": f.message });
                n.send("payment_intent.payment_failed", o, Duration::ZERO);
            }
            IntentStatus::Canceled => n.send("payment_intent.canceled", base("canceled"), Duration::ZERO),
            // The sandbox captures at once; it never answers "received".
            IntentStatus::RequiresAction { .. } | IntentStatus::CaptureReceived { .. } | IntentStatus::Processing => {}
        }
    }

    async fn behaviour(&self, merchant: &MerchantId, token: &str) -> Result<Behaviour, PspError> {
        if let Some(b) = builtin_token(token) {
            return Ok(b);
        }
        let known = self.cards.get(token).map(|c| c.clone());
        let (owner, behaviour, _) = match known {
            Some(c) => c,
            None => {
                let card = self
                    .db
                    .sandbox_card(token)
                    .await
                    .map_err(|e| PspError::Unavailable(e.to_string()))?;
                let card =
                    card.ok_or_else(|| invalid("resource_missing", "No such payment method.", Some("payment_method")))?;
                let entry = (card.merchant_id, Behaviour::parse(&card.behaviour), card.signals);
                self.cards.insert(token.to_owned(), entry.clone());
                entry
            }
        };
        if owner != merchant.as_str() {
            return Err(invalid(
                "resource_missing",
                "No such payment method.",
                Some("payment_method"),
            ));
        }
        Ok(behaviour)
    }

    /// Records a movement of the PSP balance in the sandbox's books (once per object: a retried
    /// call books nothing twice). Unreachable books fail the call as the PSP being down.
    async fn book(
        &self,
        merchant: &MerchantId,
        kind: BookKind,
        reference: &str,
        intent: &str,
        amount: i64,
        money: Money,
    ) -> Result<(), PspError> {
        self.db
            .sandbox_book(
                merchant.as_str(),
                kind.as_str(),
                reference,
                intent,
                amount,
                money.currency.code(),
            )
            .await
            .map_err(|e| PspError::Unavailable(format!("sandbox books: {e}")))
    }

    async fn latency(&self) {
        if self.config.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        }
    }

    fn remember(&self, key: &AttemptId, answer: Remembered) {
        self.answers.insert(key.as_str().to_owned(), answer);
        self.track(false, key.as_str().to_owned());
    }

    fn track(&self, is_intent: bool, id: String) {
        let evicted = {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            order.push_back((is_intent, id));
            let mut evicted = Vec::new();
            while order.len() > self.config.max_intents.max(1) {
                evicted.extend(order.pop_front());
            }
            evicted
        };
        for (is_intent, id) in evicted {
            if is_intent {
                self.intents.remove(&id);
            } else {
                self.answers.remove(&id);
            }
        }
    }

    fn intent_view(reference: &str, i: &SandboxIntent) -> Intent {
        Intent {
            reference: reference.to_owned(),
            client_secret: i.client_secret.clone(),
            status: i.status.clone(),
        }
    }

    fn replay(&self, key: &AttemptId) -> Option<Remembered> {
        self.answers.get(key.as_str()).map(|a| a.clone())
    }

    async fn do_authorize(&self, req: AuthorizeRequest) -> Result<Intent, PspError> {
        self.latency().await;
        if let Some(Remembered::Intent(i)) = self.replay(&req.key) {
            return Ok(i);
        }
        if req.payment_method == PANIC_ONCE && self.panicked.insert(req.key.to_string(), ()).is_none() {
            panic!("sandbox: {PANIC_ONCE} panics once inside the handler");
        }
        let behaviour = if req.payment_method == PANIC_ONCE || req.payment_method == LEDGER_PANIC_ONCE {
            Behaviour::Success
        } else {
            self.behaviour(&req.merchant_id, &req.payment_method).await?
        };
        let behaviour = match behaviour {
            Behaviour::ProcessingError => {
                if self.soft_declined.len() >= 100_000 {
                    self.soft_declined.clear();
                }
                match self.soft_declined.insert(req.payment_id.to_string(), ()) {
                    None => Behaviour::ProcessingError,
                    Some(()) => Behaviour::Success,
                }
            }
            b => b,
        };
        let reference = reference("pi_", &req.key);
        let amount = req.amount.minor;
        let status = match behaviour {
            Behaviour::ProcessingError => declined("processing_error", "An error occurred while processing the card."),
            // A risk rule asked for 3-D Secure: the sandbox challenges, as ThreeDSecure does.
            Behaviour::Success | Behaviour::Dispute if req.three_d_secure => IntentStatus::RequiresAction {
                redirect_url: format!("{}/sandbox/v1/payments/{reference}/complete_3ds", self.public_url),
            },
            Behaviour::Success | Behaviour::Dispute => match req.capture {
                CaptureStrategy::Automatic => IntentStatus::Succeeded {
                    amount_captured: amount,
                },
                CaptureStrategy::Manual => IntentStatus::Authorized { amount },
            },
            Behaviour::ThreeDSecure => IntentStatus::RequiresAction {
                redirect_url: format!("{}/sandbox/v1/payments/{reference}/complete_3ds", self.public_url),
            },
            Behaviour::Declined => declined("generic_decline", "Your card was declined."),
            Behaviour::InsufficientFunds => declined("insufficient_funds", "Your card has insufficient funds."),
            Behaviour::Fraudulent => IntentStatus::Failed(Failure {
                code: "fraudulent".into(),
                decline_code: None,
                message: "The payment was blocked as fraudulent.".into(),
            }),
        };
        let client_secret = format!(
            "{reference}_secret_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        if let IntentStatus::Succeeded { amount_captured } = status {
            self.book(
                &req.merchant_id,
                BookKind::Charge,
                &reference,
                &reference,
                amount_captured,
                req.amount,
            )
            .await?;
        }
        let intent = SandboxIntent {
            merchant: req.merchant_id.clone(),
            behaviour,
            amount: req.amount,
            capture: req.capture,
            status,
            client_secret,
            refunded: 0,
        };
        let view = Self::intent_view(&reference, &intent);
        self.announce(&reference, &intent);
        self.intents.insert(reference.clone(), intent);
        self.track(true, reference);
        self.remember(&req.key, Remembered::Intent(view.clone()));
        Ok(view)
    }

    async fn do_capture(&self, key: AttemptId, reference: String, amount: Money) -> Result<Intent, PspError> {
        self.latency().await;
        if let Some(Remembered::Intent(i)) = self.replay(&key) {
            return Ok(i);
        }
        let merchant = self
            .intents
            .get(&reference)
            .map(|i| i.merchant.clone())
            .ok_or_else(|| invalid("resource_missing", "No such payment intent.", None))?;
        let capturable = self.intents.get(&reference).is_some_and(|i| {
            matches!(i.status, IntentStatus::Authorized { amount: held }
                if amount.minor <= held && amount.currency == i.amount.currency)
        });
        if capturable {
            self.book(
                &merchant,
                BookKind::Charge,
                &reference,
                &reference,
                amount.minor,
                amount,
            )
            .await?;
        }
        let view = {
            let mut intent = self
                .intents
                .get_mut(&reference)
                .ok_or_else(|| invalid("resource_missing", "No such payment intent.", None))?;
            match intent.status {
                IntentStatus::Authorized { amount: held }
                    if amount.minor <= held && amount.currency == intent.amount.currency =>
                {
                    intent.status = IntentStatus::Succeeded {
                        amount_captured: amount.minor,
                    };
                }
                _ => {
                    return Err(invalid(
                        "payment_intent_unexpected_state",
                        "This payment intent cannot be captured.",
                        None,
                    ))
                }
            }
            self.announce(&reference, &intent);
            Self::intent_view(&reference, &intent)
        };
        self.remember(&key, Remembered::Intent(view.clone()));
        Ok(view)
    }

    async fn do_cancel(&self, key: AttemptId, reference: String) -> Result<Intent, PspError> {
        self.latency().await;
        if let Some(Remembered::Intent(i)) = self.replay(&key) {
            return Ok(i);
        }
        let view = {
            let mut intent = self
                .intents
                .get_mut(&reference)
                .ok_or_else(|| invalid("resource_missing", "No such payment intent.", None))?;
            match intent.status {
                IntentStatus::Authorized { .. } | IntentStatus::RequiresAction { .. } => {
                    intent.status = IntentStatus::Canceled
                }
                _ => {
                    return Err(invalid(
                        "payment_intent_unexpected_state",
                        "This payment intent cannot be canceled.",
                        None,
                    ))
                }
            }
            self.announce(&reference, &intent);
            Self::intent_view(&reference, &intent)
        };
        self.remember(&key, Remembered::Intent(view.clone()));
        Ok(view)
    }

    async fn do_refund(&self, key: AttemptId, reference: String, amount: Money) -> Result<PspRefund, PspError> {
        self.latency().await;
        if let Some(Remembered::Refund(r)) = self.replay(&key) {
            return Ok(r);
        }
        let refund_reference = reference_for_refund(&key);
        let merchant = {
            let intent = self
                .intents
                .get(&reference)
                .ok_or_else(|| invalid("resource_missing", "No such charge.", None))?;
            refundable(&intent, amount)?;
            intent.merchant.clone()
        };
        self.book(
            &merchant,
            BookKind::Refund,
            &refund_reference,
            &reference,
            -amount.minor,
            amount,
        )
        .await?;
        {
            let mut intent = self
                .intents
                .get_mut(&reference)
                .ok_or_else(|| invalid("resource_missing", "No such charge.", None))?;
            refundable(&intent, amount)?;
            intent.refunded += amount.minor;
        }
        let status = if self.config.refund_delay_ms == 0 {
            PspRefundStatus::Succeeded
        } else {
            PspRefundStatus::Pending
        };
        let refund = PspRefund {
            reference: refund_reference,
            status,
        };
        self.remember(&key, Remembered::Refund(refund.clone()));
        if let Some(n) = &self.notifier {
            // The PSP confirms the refund by webhook: at once, or after the configured delay.
            let object = json!({ "id": refund.reference, "object": "refund", "amount": amount.minor,
                                 "currency": amount.currency.code().to_ascii_lowercase(), "status": "succeeded",
                                 "payment_intent": reference });
            n.send(
                "charge.refund.updated",
                object,
                Duration::from_millis(self.config.refund_delay_ms),
            );
        }
        Ok(refund)
    }

    async fn do_retrieve(&self, reference: String) -> Result<Intent, PspError> {
        self.latency().await;
        let intent = self
            .intents
            .get(&reference)
            .ok_or_else(|| invalid("resource_missing", "No such payment intent.", None))?;
        Ok(Self::intent_view(&reference, &intent))
    }
}

/// Letters and digits, so a token never holds a long run of digits.
fn random_base62(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A refund of `amount` fits what is left of the captured charge.
fn refundable(intent: &SandboxIntent, amount: Money) -> Result<(), PspError> {
    let IntentStatus::Succeeded { amount_captured } = intent.status else {
        return Err(invalid(
            "charge_not_captured",
            "This charge has not been captured.",
            None,
        ));
    };
    if intent.refunded + amount.minor > amount_captured {
        return Err(invalid(
            "amount_too_large",
            "Refund amount is greater than what is left.",
            Some("amount"),
        ));
    }
    Ok(())
}

fn reference_for_refund(key: &AttemptId) -> String {
    reference("re_", key)
}

fn declined(decline_code: &str, message: &str) -> IntentStatus {
    IntentStatus::Failed(Failure {
        code: "card_declined".into(),
        decline_code: Some(decline_code.into()),
        message: message.into(),
    })
}

impl Psp for SandboxPsp {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn authorize(&self, req: AuthorizeRequest) -> PspFuture<'_, Intent> {
        Box::pin(self.do_authorize(req))
    }

    fn capture(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, Intent> {
        Box::pin(self.do_capture(key, reference, amount))
    }

    fn cancel(&self, key: AttemptId, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(self.do_cancel(key, reference))
    }

    fn refund(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, PspRefund> {
        Box::pin(self.do_refund(key, reference, amount))
    }

    fn card<'a>(&'a self, merchant: &'a MerchantId, token: &'a str) -> PspFuture<'a, Option<CardSignals>> {
        Box::pin(self.card_signals(merchant, token))
    }

    fn retrieve(&self, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(self.do_retrieve(reference))
    }
}
