//! A connector at run time: one merchant account at one PSP, the adapter that talks to it, and
//! its circuit breaker. The payment flow reaches PSPs only through [`Connectors`]: routing
//! chooses where an authorization goes, and everything after it (capture, refund, cancel,
//! retrieve) goes to the connector that authorized (docs/DESIGN.md, "Routing and failover").

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Psp;
use crate::actors::store::StoreFuture;
use crate::domain::routing::{Breaker, BreakerConfig, Decision};
use crate::domain::{Failure, MerchantId, Payment};

/// What one call's result did to a breaker, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerChange {
    /// It opened (from closed, or again after a failed probe).
    pub opened: bool,
    /// It was closed and is not any more.
    pub left_closed: bool,
    /// It closed again.
    pub closed: bool,
}

pub struct Connector {
    pub id: String,
    /// `sandbox`, `stripe` or `adyen`.
    pub kind: &'static str,
    pub psp: Arc<dyn Psp>,
    /// A std Mutex: held for a few instructions, never across an await.
    breaker: Mutex<Breaker>,
}

impl Connector {
    pub fn new(id: String, kind: &'static str, psp: Arc<dyn Psp>, breaker: BreakerConfig) -> Connector {
        Connector {
            id,
            kind,
            psp,
            breaker: Mutex::new(Breaker::new(breaker, Instant::now())),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // A panic while holding it cannot leave a breaker half-updated in a way that matters:
        // take it back.
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go to this connector now (its breaker is not open).
    pub fn allow(&self) -> bool {
        self.breaker().allow(Instant::now())
    }

    /// A call's result: `answered` when the PSP gave an answer (a decline is one).
    pub fn record(&self, answered: bool) -> BreakerChange {
        let now = Instant::now();
        let mut b = self.breaker();
        let (was_closed, opened) = (b.state(now) == "closed", b.opened);
        b.record(answered, now);
        let closed = b.state(now) == "closed";
        BreakerChange {
            opened: b.opened > opened,
            left_closed: was_closed && !closed,
            closed: !was_closed && closed,
        }
    }

    /// Whether its breaker would refuse a call now (open and cooling down, or half-open with
    /// its probe out): routing puts it last.
    pub fn is_open(&self) -> bool {
        self.breaker().refuses(Instant::now())
    }

    /// `closed`, `open` or `half_open`, and how often it opened.
    pub fn breaker_state(&self) -> (&'static str, u64) {
        let b = self.breaker();
        (b.state(Instant::now()), b.opened)
    }
}

/// The connectors the payment flow may call.
pub trait Connectors: Send + Sync + 'static {
    /// Where a new authorization of `payment` goes (its card is known by now). `None`: the
    /// merchant has no enabled connector that takes the payment's currency.
    fn route<'a>(&'a self, payment: &'a Payment) -> StoreFuture<'a, Option<Decision>>;
    /// The connector `id` of `merchant`; `None` names the merchant's own sandbox connector
    /// (payments made before routing existed). `Ok(None)`: no such connector.
    fn get<'a>(&'a self, merchant: &'a MerchantId, id: Option<&'a str>) -> StoreFuture<'a, Option<Arc<Connector>>>;
    /// Whether a decline is soft: worth one more try on another connector.
    fn soft_decline(&self, failure: &Failure) -> bool;
}

/// One connector for every payment: the deterministic simulation's PSP, and a build with no
/// database behind its routing.
pub struct OneConnector {
    connector: Arc<Connector>,
}

impl OneConnector {
    pub fn new(psp: Arc<dyn Psp>) -> OneConnector {
        let kind = psp.name();
        OneConnector {
            connector: Arc::new(Connector::new("mca_only".into(), kind, psp, BreakerConfig::never())),
        }
    }
}

impl Connectors for OneConnector {
    fn route<'a>(&'a self, _payment: &'a Payment) -> StoreFuture<'a, Option<Decision>> {
        let d = Decision {
            connectors: vec![self.connector.id.clone()],
            rule: "default".into(),
        };
        Box::pin(std::future::ready(Ok(Some(d))))
    }

    fn get<'a>(&'a self, _merchant: &'a MerchantId, _id: Option<&'a str>) -> StoreFuture<'a, Option<Arc<Connector>>> {
        Box::pin(std::future::ready(Ok(Some(self.connector.clone()))))
    }

    fn soft_decline(&self, _failure: &Failure) -> bool {
        false
    }
}
