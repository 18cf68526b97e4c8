//! Wiring: build the application from its configuration, then run it until stopped. Split in
//! two so that tests start the real server on port 0 and learn its address first.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use actix_web::dev::{Server, Service};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App, HttpServer};
use dashmap::DashMap;
use futures_util::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::actors::event_consumer::EventConsumer;
use crate::actors::ledger_shard::Ledger;
use crate::actors::payment_flow::PaymentDeps;
use crate::actors::store::{PgStore, SystemClock};
use crate::actors::PaymentRegistry;
use crate::adapters::nats::{Nats, NatsError};
use crate::adapters::postgres::node_lock::{NodeLock, NodeLockError};
use crate::adapters::postgres::{Db, SetupError};
use crate::adapters::psp::sandbox::SandboxPsp;
use crate::adapters::psp::sandbox_webhooks::Notifier;
use crate::adapters::psp::Psp;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::domain::Currency;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Database(#[from] SetupError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("demo merchant: {0}")]
    Demo(crate::adapters::postgres::StoreError),
    #[error("outbox cursor: {0}")]
    Outbox(crate::adapters::postgres::StoreError),
    #[error(transparent)]
    NodeLock(#[from] NodeLockError),
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    shutdown: crate::shutdown::Shutdown,
    /// Held while this process serves; released when it is dropped.
    node_lock: NodeLock,
}

impl Application {
    /// Connects to PostgreSQL (creating the database and applying migrations) and NATS
    /// (creating the streams), ensures the demo merchant, and binds the listener.
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let db = Db::connect(&config.database).await?;
        // Before anything that changes the database (migrations included) or acts on its
        // payments: one node per database. Cluster nodes share the lock: they may run beside
        // each other, not beside a node outside cluster mode.
        let node_lock = db
            .node_lock(
                Duration::from_millis(config.database.node_lock_wait_ms),
                config.cluster.enabled,
            )
            .await?;
        let applied = db.migrate().await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
        // A database copied from another PostgreSQL cluster: its events' transaction ids are
        // that cluster's (docs/DESIGN.md, "OutboxRelay").
        if db.outbox_rebase().await.map_err(StartError::Outbox)? {
            tracing::warn!("the outbox cursor came from another PostgreSQL cluster: rebased on this one");
        }
        let nats = Nats::connect(&config.nats).await?;
        if config.sandbox.demo_merchant {
            db.ensure_demo_merchant(config.payments.default_fee_bps, config.payments.default_fee_fixed)
                .await
                .map_err(StartError::Demo)?;
        }
        let listener =
            TcpListener::bind(&config.server.bind).map_err(|e| StartError::Bind(config.server.bind.clone(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| StartError::Bind(config.server.bind.clone(), e))?;
        let port = bound.port();
        // The address others reach us at: as configured, or the address just bound (port 0 in
        // tests, `bind` changed by an override), so that the sandbox's webhooks find this server.
        let public_url = config.server.public_url_for(bound);
        let public_url_for_state = public_url.clone();
        let leases = config.cluster.enabled.then(|| {
            Arc::new(crate::adapters::cluster::Leases::new(
                &config.cluster,
                public_url.clone(),
            ))
        });
        let lease_bucket = match &leases {
            Some(_) => Some(crate::adapters::cluster::open_bucket(&nats, &config.cluster, config.nats.replicas).await?),
            None => None,
        };
        let notifier = (config.psp.provider == "sandbox" && config.psp.sandbox.webhooks).then(|| {
            Notifier::start(
                format!("{public_url}/internal/webhooks/psp/sandbox"),
                config.webhooks.secret.clone(),
                config.psp.sandbox.chaos.clone(),
            )
        });
        let sandbox = Arc::new(SandboxPsp::new(
            db.clone(),
            config.psp.sandbox.clone(),
            public_url,
            notifier,
        ));
        let psp: Arc<dyn Psp> = match config.psp.provider.as_str() {
            "sandbox" => sandbox.clone(),
            other => {
                return Err(StartError::Config(format!(
                    "[psp] provider {other:?} has no adapter in this build; use \"sandbox\""
                )))
            }
        };
        let metrics = Arc::new(Metrics::default());
        let ledger = Arc::new(Ledger::start(&db, &config.ledger, metrics.clone()));
        let risk = Arc::new(crate::actors::risk::RiskEngine::new(
            db.clone(),
            config.risk.default_rules,
        ));
        if config.risk.enabled {
            match risk.rebuild().await {
                Ok(n) => tracing::info!(attempts = n, "risk velocity rebuilt from the last day"),
                Err(e) => tracing::warn!(error = %e, "risk velocity could not be rebuilt; it starts empty"),
            }
        }
        let risk_check: Arc<dyn crate::actors::risk::RiskCheck> = if config.risk.enabled {
            risk.clone()
        } else {
            Arc::new(crate::actors::risk::NoRisk)
        };
        let sealer = crate::adapters::secrets::Sealer::from_config(&config.secrets.key)
            .map_err(|e| StartError::Config(e.to_string()))?;
        let connectors = Arc::new(crate::adapters::connectors::Directory::new(
            db.clone(),
            sandbox.clone(),
            config.routing.clone(),
            sealer,
        ));
        let deps = PaymentDeps {
            store: Arc::new(PgStore {
                db: db.clone(),
                ledger: ledger.clone(),
                leases: leases.clone(),
            }),
            psp,
            connectors: connectors.clone(),
            psp_timeout: Some(Duration::from_millis(config.psp.timeout_ms)),
            clock: Arc::new(SystemClock),
            risk: risk_check,
            metrics: metrics.clone(),
            landing: Default::default(),
        };
        let registry = Arc::new(PaymentRegistry::new(deps, config.actors.clone()));
        registry.spawn_passivation();
        let shutdown = crate::shutdown::Shutdown::default();
        if let (Some(leases), Some(kv)) = (&leases, lease_bucket) {
            let forwarder = Arc::new(crate::actors::forward::Forwarder {
                client: nats.client.clone(),
                prefix: nats.prefix.clone(),
                leases: leases.clone(),
                timeout: Duration::from_millis(config.cluster.forward_timeout_ms),
                metrics: metrics.clone(),
            });
            registry.set_forwarder(forwarder.clone());
            forwarder
                .serve(
                    registry.clone(),
                    config.cluster.max_forwarded_in_flight,
                    config.server.workers,
                    shutdown.clone(),
                )
                .await?;
            let evict = registry.clone();
            let keeper = crate::adapters::cluster::LeaseKeeper {
                leases: leases.clone(),
                kv,
                db: db.clone(),
                config: config.cluster.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
                on_lost: Box::new(move |p| evict.evict_partition(p)),
            };
            actix_rt::spawn(keeper.run());
            tracing::info!(node = %leases.node, partitions = leases.partitions(), "cluster mode: joining");
        } else {
            // Before any request can start a run: a run still `running` now was left by a
            // process that stopped. (In cluster mode the other nodes' runs are running.)
            match db.fail_abandoned_runs().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    runs = n,
                    "reconciliation runs left running by a stopped process were failed"
                ),
                Err(e) => tracing::warn!(error = %e, "abandoned reconciliation runs could not be closed"),
            }
        }
        let reconciler = Arc::new(crate::actors::reconciler::Reconciler::new(
            db.clone(),
            registry.clone(),
            ledger.clone(),
            config.reconciliation.clone(),
            config.psp.sandbox.settlement.clone(),
            metrics.clone(),
        ));
        let event_consumers = Arc::new(crate::actors::ActorStats::default());
        for partition in 0..config.nats.partitions {
            EventConsumer {
                partition,
                nats: nats.clone(),
                db: db.clone(),
                registry: registry.clone(),
                config: config.nats.clone(),
                kind: event_consumers.clone(),
                mailbox: Arc::new(crate::actors::Mailbox::new(event_consumers.clone())),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            }
            .start();
        }
        let webhooks = if config.webhooks_out.enabled {
            crate::actors::webhook_delivery::WebhookDelivery::start(
                db.clone(),
                nats.clone(),
                config.webhooks_out.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(StartError::Nats)?
        } else {
            crate::actors::webhook_delivery::WebhookDelivery::idle()
        };
        let currencies = config
            .payments
            .currencies
            .iter()
            .filter_map(|c| Currency::parse(c))
            .collect();
        let workers = config.server.workers;
        let shutdown_timeout = config.server.shutdown_timeout_secs;
        let max_connections = config.server.max_connections;
        let rate_limiter = crate::api::ratelimit::RateLimiter::new(config.ratelimit.clone());
        let state = web::Data::new(AppState {
            config,
            db,
            nats,
            registry,
            ledger,
            reconciler,
            risk,
            event_consumers,
            webhooks,
            sandbox: Some(sandbox),
            connectors,
            public_url: public_url_for_state,
            merchants: DashMap::new(),
            key_lookups: tokio::sync::Semaphore::new(crate::api::KEY_LOOKUPS),
            probes: tokio::sync::Semaphore::new(crate::api::PROBES),
            readiness: tokio::sync::Semaphore::new(crate::api::PROBES),
            currencies,
            metrics,
            rate_limiter,
            leases,
            recent_keys: Default::default(),
        });
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            let metrics = app_state.metrics.clone();
            App::new()
                .app_data(app_state.clone())
                .wrap_fn(move |req, srv| {
                    // One span per request; the request id is echoed so a caller can quote it.
                    let started = Instant::now();
                    let request_id = req
                        .headers()
                        .get("request-id")
                        .and_then(|v| v.to_str().ok())
                        .filter(|v| {
                            v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        })
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple()));
                    let method = req.method().to_string();
                    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                    let span = tracing::info_span!("request", %request_id, %method, %route);
                    let metrics = metrics.clone();
                    // The handler runs inside the request's span: its log lines (and, through
                    // PaymentCall::parent, its actor's) carry the request id.
                    let fut = srv.call(req).instrument(span.clone());
                    async move {
                    let mut res = fut.await?;
                    let status = res.status().as_u16();
                    metrics.http(&route, status, started.elapsed());
                    tracing::info!(parent: &span, status, elapsed_us = started.elapsed().as_micros() as u64, "request");
                    if let Ok(v) = HeaderValue::from_str(&request_id) {
                        res.headers_mut().insert(HeaderName::from_static("request-id"), v);
                    }
                    Ok(res)
                }
                .boxed_local()
                })
                .configure(api::routes)
        })
        .workers(workers)
        .max_connections(max_connections)
        .shutdown_timeout(shutdown_timeout)
        .listen(listener)
        .map_err(|e| StartError::Bind("listener".into(), e))?
        .run();
        spawn_housekeeping(state.clone(), shutdown.clone());
        state.reconciler.refresh_metrics().await;
        actix_rt::spawn(crate::actors::reconciler::daily(
            state.reconciler.clone(),
            shutdown.clone(),
        ));
        crate::actors::outbox_relay::spawn(state.db.clone(), state.nats.clone(), shutdown.clone());
        // Another node took the lock while this one's session was down: stop serving at once,
        // the background loops first (consumers, relay, sweeper), then HTTP.
        let (lost, handle, stopping) = (node_lock.lost(), server.handle(), shutdown.clone());
        actix_rt::spawn(async move {
            if lost.await {
                stopping.begin();
                handle.stop(false).await;
            }
        });
        Ok(Application {
            port,
            server,
            state,
            shutdown,
            node_lock,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Stops the server from outside, as SIGTERM does (tests stop one node to start another).
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM or SIGINT, then stops gracefully: no new connections, in-flight
    /// requests finish (their actor messages and ledger batches with them), then the event
    /// consumers finish the batch in hand, the outbox relay its round and the sweeper its
    /// sweep. Each phase waits at most `[server] shutdown_timeout_secs`.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        tracing::info!("HTTP server stopped; stopping the background loops");
        self.shutdown.begin();
        let bound = Duration::from_secs(self.state.config.server.shutdown_timeout_secs);
        if self.shutdown.drained(bound).await {
            tracing::info!("payrail stopped cleanly");
        } else {
            tracing::warn!("background loops still running at the shutdown bound; exiting anyway");
        }
        if self.node_lock.is_lost() {
            return Err(std::io::Error::other(
                "another payrail node took this database's node lock; stopped serving",
            ));
        }
        served
    }
}

/// Payments the recovery sweeper takes per tick, and how many it resolves at once.
const SWEEP_BATCH: i64 = 1_000;
const SWEEP_CONCURRENCY: usize = 16;

/// Background upkeep: PSP attempts a crash left open are completed; idempotency records past
/// their retention are deleted in bounded slices.
fn spawn_housekeeping(state: web::Data<AppState>, shutdown: crate::shutdown::Shutdown) {
    let recovery = state.clone();
    let stop = shutdown.clone();
    actix_rt::spawn(async move {
        let _running = stop.enter();
        // docs/DESIGN.md, "Calling the PSP safely": an attempt with no outcome is completed even if
        // its client never comes back. Older than twice the PSP timeout: surely not in flight.
        let every = Duration::from_millis(recovery.config.psp.timeout_ms.clamp(1_000, 30_000));
        // Each round takes the next page, and starts over after the last: every stale attempt
        // has its turn, however many older ones cannot be completed yet.
        let mut after: Option<crate::adapters::postgres::payments::StalePlace> = None;
        while !stop.sleep(every).await {
            let stale = recovery.config.psp.timeout_ms * 2;
            let Ok(page) = recovery
                .db
                .payments_with_stale_attempts(stale, after.as_ref(), SWEEP_BATCH)
                .await
            else {
                continue;
            };
            after = if (page.len() as i64) < SWEEP_BATCH {
                None
            } else {
                page.last().map(|(_, _, place)| place.clone())
            };
            // Cluster mode: each node completes its own partitions' payments.
            let found: Vec<_> = page
                .into_iter()
                .filter(|(id, _, _)| !recovery.registry.is_elsewhere(id))
                .map(|(id, merchant, _)| (id, merchant))
                .collect();
            // The oldest first, several at once: one slow PSP call does not hold up the rest.
            // The Resolve reloads each payment from PostgreSQL, so an attempt its actor's
            // memory missed (an ambiguous commit) is completed too.
            let registry = &recovery.registry;
            futures_util::stream::iter(found)
                .for_each_concurrent(SWEEP_CONCURRENCY, |(id, merchant)| async move {
                    let call = crate::actors::PaymentCall::new(merchant, crate::actors::Op::Resolve, None);
                    if let Err(e) = registry.call(&id, call).await {
                        tracing::warn!(payment_id = %id, error = %e, "could not complete an open PSP attempt yet");
                    }
                })
                .await;
        }
    });
    let release = state.clone();
    let stop = shutdown.clone();
    actix_rt::spawn(async move {
        let _running = stop.enter();
        let config = release.config.marketplace.clone();
        let every = Duration::from_secs(config.release_every_secs.clamp(1, 86_400));
        while !stop.sleep(every).await {
            // Bounded work per tick, however large the backlog.
            for _ in 0..100 {
                match release.db.release_seller_funds(config.release_batch).await {
                    Ok(n) if n as i64 >= config.release_batch.clamp(1, 10_000) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "releasing sellers' funds");
                        break;
                    }
                }
            }
            crate::api::payouts::housekeeping(&release).await;
        }
    });
    actix_rt::spawn(async move {
        let _running = shutdown.enter();
        while !shutdown.sleep(Duration::from_secs(60)).await {
            let hours = state.config.idempotency.retention_hours;
            // At most 100 slices of 10,000 a minute: bounded work, however large the backlog.
            for _ in 0..100 {
                match state.db.idempotency_purge(hours, 10_000).await {
                    Ok(10_000) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "idempotency purge");
                        break;
                    }
                }
            }
        }
    });
}
