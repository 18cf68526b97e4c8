//! The connectors of every merchant as the payment flow reaches them (docs/DESIGN.md, "Routing
//! and failover"): each merchant's connectors and routing rules, read from PostgreSQL and
//! trusted for `[routing] cache_ms` (a change made through this node applies at once), and one
//! run-time [`Connector`] per connector, kept while the process runs so that its circuit
//! breaker remembers. A sandbox connector is the embedded sandbox seen through that
//! connector's own latency, failure rate and outage switch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::Value;

use super::postgres::reconciliation::Connector as ConnectorRow;
use super::postgres::{Db, StoreError};
use super::psp::adyen::AdyenPsp;
use super::psp::connector::{Connector, Connectors};
use super::psp::sandbox::SandboxPsp;
use super::psp::stripe::StripePsp;
use super::psp::{AuthorizeRequest, Intent, Psp, PspError, PspFuture, PspRefund};
use super::secrets::Sealer;
use crate::actors::store::StoreFuture;
use crate::config::RoutingConfig;
use crate::domain::ids::{sandbox_connector_id, stable_hash};
use crate::domain::routing::{Decision, Facts, RoutingRules};
use crate::domain::{AttemptId, Failure, MerchantId, Money, Payment};

/// Merchants whose routing a node keeps in memory; past it, the cache starts again.
const MAX_MERCHANTS: usize = 100_000;

/// What a node knows of one merchant's routing.
struct MerchantRouting {
    loaded: Instant,
    connectors: Vec<ConnectorRow>,
    rules: RoutingRules,
}

pub struct Directory {
    db: Db,
    sandbox: Arc<SandboxPsp>,
    config: RoutingConfig,
    sealer: Option<Sealer>,
    merchants: DashMap<MerchantId, Arc<MerchantRouting>>,
    /// Connector id → its run-time connector (the breaker lives here), and the row version
    /// (`updated_at`) it was built from: a changed row (credentials, `api_base`, settings)
    /// gets a new one once this node reads the row again.
    runtimes: DashMap<String, (chrono::DateTime<chrono::Utc>, Arc<Connector>)>,
    /// Sandbox connectors switched to an outage on this node.
    outages: DashMap<String, Arc<AtomicBool>>,
    /// Connectors that could not be made (no adapter, credentials missing or unreadable), by
    /// the row version that failed: not tried again until the row changes.
    broken: DashMap<String, chrono::DateTime<chrono::Utc>>,
}

impl Directory {
    pub fn new(db: Db, sandbox: Arc<SandboxPsp>, config: RoutingConfig, sealer: Option<Sealer>) -> Directory {
        Directory {
            db,
            sandbox,
            config,
            sealer,
            merchants: DashMap::new(),
            runtimes: DashMap::new(),
            outages: DashMap::new(),
            broken: DashMap::new(),
        }
    }

    pub fn sealer(&self) -> Option<&Sealer> {
        self.sealer.as_ref()
    }

    /// Forgets what this node read of `merchant`: its next payment reads the connectors and
    /// rules again, and a connector whose row changed gets a new run-time connector (and a
    /// closed breaker). Other nodes do the same within `[routing] cache_ms`.
    pub fn invalidate(&self, merchant: &MerchantId) {
        self.merchants.remove(merchant);
    }

    /// Switches a sandbox connector's outage on this node: every call to it then fails before
    /// reaching the sandbox, as a refused connection does.
    pub fn set_outage(&self, connector: &str, on: bool) {
        self.outage_flag(connector).store(on, Ordering::Relaxed);
    }

    fn outage_flag(&self, connector: &str) -> Arc<AtomicBool> {
        self.outages
            .entry(connector.to_owned())
            .or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone()
    }

    /// Every run-time connector this node has built, with its breaker: `/admin/v1/connectors`.
    pub fn breakers(&self) -> Vec<(String, &'static str, &'static str, u64, bool)> {
        let mut out: Vec<_> = self
            .runtimes
            .iter()
            .map(|e| {
                let (state, opened) = e.value().1.breaker_state();
                let outage = self
                    .outages
                    .get(e.key())
                    .map(|f| f.load(Ordering::Relaxed))
                    .unwrap_or(false);
                (e.key().clone(), e.value().1.kind, state, opened, outage)
            })
            .collect();
        out.sort();
        out
    }

    async fn routing_of(&self, merchant: &MerchantId) -> Result<Arc<MerchantRouting>, StoreError> {
        let ttl = Duration::from_millis(self.config.cache_ms);
        if let Some(m) = self.merchants.get(merchant) {
            if m.loaded.elapsed() < ttl {
                return Ok(m.clone());
            }
        }
        let connectors = self.db.connectors_of(merchant).await?;
        let rules = match self.db.routing_rules(merchant).await? {
            None => RoutingRules::default(),
            Some((v, _)) => serde_json::from_value(v).map_err(|e| {
                tracing::error!(merchant_id = %merchant, error = %e, "stored routing rules do not parse");
                StoreError::Broken
            })?,
        };
        let m = Arc::new(MerchantRouting {
            loaded: Instant::now(),
            connectors,
            rules,
        });
        if self.merchants.len() >= MAX_MERCHANTS {
            self.merchants.clear();
        }
        self.merchants.insert(merchant.clone(), m.clone());
        Ok(m)
    }

    /// The run-time connector of a row: its adapter, with its credentials opened. `None` (and
    /// an error logged) when it cannot be made: no adapter, missing or unreadable credentials.
    async fn build(&self, row: &ConnectorRow) -> Result<Option<Arc<Connector>>, StoreError> {
        let (psp, kind): (Arc<dyn Psp>, &'static str) = match row.psp.as_str() {
            "sandbox" => (
                Arc::new(SandboxConnector {
                    inner: self.sandbox.clone(),
                    id: row.id.clone(),
                    latency: Duration::from_millis(row.settings.get("latency_ms").and_then(Value::as_u64).unwrap_or(0)),
                    failure_rate: row.settings.get("failure_rate").and_then(Value::as_f64).unwrap_or(0.0),
                    outage: self.outage_flag(&row.id),
                }),
                "sandbox",
            ),
            "stripe" => {
                let Some(creds) = self.credentials_to_build(row).await? else {
                    return Ok(None);
                };
                let Some(key) = creds.get("api_key").and_then(Value::as_str) else {
                    tracing::error!(connector = %row.id, "a Stripe connector without api_key");
                    return Ok(None);
                };
                let base = creds.get("api_base").and_then(Value::as_str).map(str::to_owned);
                (Arc::new(StripePsp::new(row.id.clone(), key.to_owned(), base)), "stripe")
            }
            "adyen" => {
                let Some(creds) = self.credentials_to_build(row).await? else {
                    return Ok(None);
                };
                let field = |k: &str| creds.get(k).and_then(Value::as_str).map(str::to_owned);
                let (Some(key), Some(account)) = (field("api_key"), field("merchant_account")) else {
                    tracing::error!(connector = %row.id, "an Adyen connector without api_key or merchant_account");
                    return Ok(None);
                };
                (
                    Arc::new(AdyenPsp::new(row.id.clone(), key, account, field("api_base"))),
                    "adyen",
                )
            }
            other => {
                tracing::error!(connector = %row.id, psp = other, "no adapter for this PSP in this build");
                return Ok(None);
            }
        };
        Ok(Some(Arc::new(Connector::new(
            row.id.clone(),
            kind,
            psp,
            self.config.breaker,
        ))))
    }

    /// A connector's credentials, opened: `Ok(None)` when it has none, `Err(Unreadable)` (logged)
    /// when they cannot be opened (no `[secrets] key`, another key, not JSON). The one place
    /// sealed credentials are read: routing skips such a connector, a webhook answers 503.
    pub async fn credentials(&self, id: &str) -> Result<Option<serde_json::Map<String, Value>>, CredentialsError> {
        let Some(sealed) = self.db.connector_credentials(id).await? else {
            return Ok(None);
        };
        let Some(sealer) = &self.sealer else {
            tracing::error!(connector = %id, "a connector has credentials but no [secrets] key is configured");
            return Err(CredentialsError::Unreadable);
        };
        let plain = sealer.open(id, &sealed).map_err(|e| {
            tracing::error!(connector = %id, error = %e, "a connector's credentials do not open");
            CredentialsError::Unreadable
        })?;
        serde_json::from_slice(&plain).map(Some).map_err(|_| {
            tracing::error!(connector = %id, "a connector's credentials are not a JSON object");
            CredentialsError::Unreadable
        })
    }

    /// [`Directory::credentials`] for building an adapter: `None` when they are missing or
    /// cannot be opened (logged).
    async fn credentials_to_build(
        &self,
        row: &ConnectorRow,
    ) -> Result<Option<serde_json::Map<String, Value>>, StoreError> {
        match self.credentials(&row.id).await {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) => {
                tracing::error!(connector = %row.id, "a connector without credentials");
                Ok(None)
            }
            Err(CredentialsError::Unreadable) => Ok(None),
            Err(CredentialsError::Store(e)) => Err(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the connector's credentials cannot be opened")]
    Unreadable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Connectors for Directory {
    fn route<'a>(&'a self, payment: &'a Payment) -> StoreFuture<'a, Option<Decision>> {
        Box::pin(async move {
            let m = self.routing_of(&payment.merchant_id).await?;
            let currency = payment.currency.code();
            let eligible: Vec<&str> = m
                .connectors
                .iter()
                .filter(|c| {
                    c.enabled
                        && payment.currency.psp_counts_in_iso_units(&c.psp)
                        && (c.currencies.is_empty() || c.currencies.iter().any(|x| x == currency))
                })
                .map(|c| c.id.as_str())
                .collect();
            let facts = Facts {
                currency: payment.currency,
                amount: payment.state.amount,
                card: payment.card.as_deref(),
                metadata: &payment.metadata,
                key: stable_hash(payment.id.as_str()),
            };
            let mut decision = m.rules.route(&facts, &eligible);
            if let Some(d) = decision.as_mut() {
                // A connector that cannot be made (its credentials do not open, say) is skipped,
                // not tried: the others take the payment.
                let mut usable = Vec::with_capacity(d.connectors.len());
                for id in d.connectors.drain(..) {
                    if self.get(&payment.merchant_id, Some(&id)).await?.is_some() {
                        usable.push(id);
                    }
                }
                d.connectors = usable;
                // A connector whose breaker is open goes last: a payment is not sent to it (and
                // failed over, one commit more) while others can take it. Once its cool-down is
                // over it is in its place again, and the next payment is its probe.
                let open = |id: &String| self.runtimes.get(id).is_some_and(|c| c.1.is_open());
                if d.connectors.iter().any(open) {
                    d.connectors.sort_by_key(open);
                }
            }
            Ok(decision.filter(|d| !d.connectors.is_empty()))
        })
    }

    fn get<'a>(&'a self, merchant: &'a MerchantId, id: Option<&'a str>) -> StoreFuture<'a, Option<Arc<Connector>>> {
        Box::pin(async move {
            let id = id.map(str::to_owned).unwrap_or_else(|| sandbox_connector_id(merchant));
            let m = self.routing_of(merchant).await?;
            let Some(row) = m.connectors.iter().find(|c| c.id == id) else {
                return Ok(None);
            };
            if let Some(c) = self.runtimes.get(&id) {
                if c.0 == row.updated_at {
                    return Ok(Some(c.1.clone()));
                }
            }
            if self.broken.get(&id).is_some_and(|at| *at == row.updated_at) {
                return Ok(None);
            }
            let Some(built) = self.build(row).await? else {
                if self.broken.len() >= MAX_MERCHANTS {
                    self.broken.clear();
                }
                self.broken.insert(id, row.updated_at);
                return Ok(None);
            };
            let mut entry = self.runtimes.entry(id).or_insert((row.updated_at, built.clone()));
            if entry.0 != row.updated_at {
                *entry = (row.updated_at, built);
            }
            Ok(Some(entry.1.clone()))
        })
    }

    fn soft_decline(&self, failure: &Failure) -> bool {
        let code = failure.decline_code.as_deref().unwrap_or(&failure.code);
        self.config.soft_declines.iter().any(|s| s == code)
    }
}

/// The embedded sandbox through one sandbox connector: its added latency, its share of calls
/// answered "not processed", and its outage switch.
struct SandboxConnector {
    inner: Arc<SandboxPsp>,
    id: String,
    latency: Duration,
    failure_rate: f64,
    outage: Arc<AtomicBool>,
}

impl SandboxConnector {
    /// What happens before the sandbox hears of a call.
    async fn gate(&self) -> Result<(), PspError> {
        if self.outage.load(Ordering::Relaxed) {
            return Err(PspError::NotSent(format!(
                "sandbox connector {}: connection refused (outage)",
                self.id
            )));
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(PspError::NotSent(format!(
                "sandbox connector {}: 503, request not processed",
                self.id
            )));
        }
        Ok(())
    }
}

impl Psp for SandboxConnector {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn authorize(&self, req: AuthorizeRequest) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.authorize(req).await
        })
    }

    fn capture(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.capture(key, reference, amount).await
        })
    }

    fn cancel(&self, key: AttemptId, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.cancel(key, reference).await
        })
    }

    fn refund(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, PspRefund> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.refund(key, reference, amount).await
        })
    }

    fn retrieve(&self, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.retrieve(reference).await
        })
    }
}
