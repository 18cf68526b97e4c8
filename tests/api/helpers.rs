//! Start the real server in-process on port 0, against the real PostgreSQL and NATS, with a
//! database and a stream prefix of its own, so tests run in parallel without meeting.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web;
use awc::Client;
use futures_util::StreamExt;
use payrail::api::AppState;
use payrail::app::Application;
use payrail::config::{repo_config_path, Config};
use serde_json::{json, Value};

pub const DEMO_KEY: &str = "sk_test_demo";

/// Every log line every test in this binary wrote, for the tests that scan them.
pub fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "payrail=trace,actix_web=debug,actix=debug,info",
            ))
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut logs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a test binary never needs more than 256 MiB of logs.
        if logs.len() < 256 << 20 {
            logs.extend_from_slice(b);
        }
        // PAYRAIL_TEST_LOGS=1 also shows them, for a developer chasing a failure.
        if std::env::var_os("PAYRAIL_TEST_LOGS").is_some() {
            std::io::stderr().write_all(b)?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A port nobody listens on right now, for processes a test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Drops a database a process-level test created itself (`root` is the URL without a name).
pub async fn drop_database(root: &str, name: &str) {
    if let Ok((admin, conn)) = tokio_postgres::connect(&format!("{root}/postgres"), tokio_postgres::NoTls).await {
        actix_rt::spawn(conn);
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
}

pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub state: web::Data<AppState>,
    pub database_url: String,
    /// This app made its database (another app of the test may share it).
    owns_database: bool,
    server: actix_web::dev::ServerHandle,
    running: Mutex<Option<actix_rt::task::JoinHandle<std::io::Result<()>>>>,
}

/// A passing test's database is dropped when its app goes. The app's ledger shards and webhook
/// workers live on arbiters of their own, which outlive the test's runtime and would keep their
/// pooled connections open: dropping the database (WITH FORCE) closes them, so a long test run
/// does not exhaust PostgreSQL's connections. A failing test's database stays for inspection
/// (and is dropped by a later run after two hours).
impl Drop for TestApp {
    fn drop(&mut self) {
        if !self.owns_database || std::thread::panicking() {
            return;
        }
        let Some((root, name)) = self.database_url.rsplit_once('/') else {
            return;
        };
        let (root, name) = (root.to_owned(), name.to_owned());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin_url = format!("{root}/postgres");
                let connect = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls);
                let (admin, conn) = tokio::time::timeout(Duration::from_secs(5), connect).await.ok()?.ok()?;
                tokio::spawn(conn);
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                tokio::time::timeout(Duration::from_secs(10), admin.batch_execute(&sql))
                    .await
                    .ok()?
                    .ok()
            })
        });
        let _ = dropped.join();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: awc::http::header::HeaderMap,
    pub raw: Vec<u8>,
    pub body: Value,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A fresh database name: its creation time in it, so stale ones can be dropped later.
pub fn database_name() -> String {
    format!(
        "payrail_test_{}_{}",
        now_secs(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A fresh stream prefix, `T<secs>X<random>`, dated like the databases.
pub fn stream_prefix() -> String {
    format!("T{}X{}", now_secs(), &uuid::Uuid::new_v4().simple().to_string()[..8]).to_uppercase()
}

/// Once per test binary: drops the databases and streams that test runs older than two hours
/// left behind, so a developer's machine does not fill up.
async fn clean_up_old_runs(config: &Config) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let cutoff = now_secs().saturating_sub(2 * 3600);
    let old = |name: &str, prefix: &str, end: char| {
        name.strip_prefix(prefix)
            .and_then(|r| r.split(end).next())
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|t| t < cutoff)
    };
    let base = config
        .database
        .url
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or_default();
    if let Ok((client, conn)) = tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls).await {
        actix_rt::spawn(conn);
        let sql = "SELECT datname::text FROM pg_database WHERE datname LIKE 'payrail_test_%'";
        let rows = client.query(sql, &[]).await.unwrap_or_default();
        for name in rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|n| old(n, "payrail_test_", '_'))
        {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
    if let Ok(nats) = async_nats::connect(config.nats.url.as_str()).await {
        let js = async_nats::jetstream::new(nats);
        let mut names = js.stream_names();
        let mut stale = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            if old(&name, "T", 'X') {
                stale.push(name);
            }
        }
        for name in stale {
            let _ = js.delete_stream(&name).await;
        }
    }
}

/// The configuration every test app starts from: config.toml with a database and a stream
/// prefix of its own, on port 0.
pub fn test_config() -> Config {
    let mut config = Config::load(std::path::Path::new(repo_config_path())).expect("config.toml");
    let base = config
        .database
        .url
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .expect("database url");
    config.database.url = format!("{base}/{}", database_name());
    config.database.pool_size = 8;
    config.server.bind = "127.0.0.1:0".into();
    config.server.workers = 1;
    config.nats.stream_prefix = stream_prefix();
    config
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Config)) -> TestApp {
    captured_logs();
    let mut config = test_config();
    clean_up_old_runs(&config).await;
    let made = config.database.url.clone();
    configure(&mut config);
    let owns_database = config.database.url == made;
    let database_url = config.database.url.clone();
    let app = Application::build(config).await.expect("payrail starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let server = app.server_handle();
    let running = Mutex::new(Some(actix_rt::spawn(app.run_until_stopped())));
    let client = Client::builder().timeout(Duration::from_secs(30)).finish();
    TestApp {
        address,
        client,
        state,
        database_url,
        owns_database,
        server,
        running,
    }
}

impl TestApp {
    /// Stops this app as SIGTERM would, and waits until it has: its background loops are done
    /// and its node lock released, so another app may serve its database.
    pub async fn stop(&self) -> std::io::Result<()> {
        self.server.stop(true).await;
        self.stopped_within(Duration::from_secs(30)).await
    }

    /// Waits for this app to stop on its own, and returns how its run ended.
    pub async fn stopped_within(&self, bound: Duration) -> std::io::Result<()> {
        let running = self.running.lock().unwrap().take();
        match running {
            Some(r) => actix_rt::time::timeout(bound, r)
                .await
                .expect("the app stops in time")
                .expect("run_until_stopped"),
            None => Ok(()),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        idem: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.address));
        if let Some(k) = key {
            req = req.insert_header(("Authorization", format!("Bearer {k}")));
        }
        if let Some(i) = idem {
            req = req.insert_header(("Idempotency-Key", i));
        }
        req = req.insert_header(("Content-Type", "application/json"));
        let resp = match body {
            Some(b) => req.send_body(b.to_owned()).await,
            None => req.send().await,
        }
        .expect("request sent");
        // The client's timeout ends with the answer's head; the body has a bound of its own.
        let mut resp = resp.timeout(Duration::from_secs(30));
        let raw = resp.body().limit(16 << 20).await.expect("body").to_vec();
        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Response {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            raw,
            body,
        }
    }

    /// A POST as the demo merchant with a fresh idempotency key.
    pub async fn post(&self, path: &str, body: Value) -> Response {
        let key = uuid::Uuid::new_v4().to_string();
        self.request("POST", path, Some(DEMO_KEY), Some(&key), Some(&body.to_string()))
            .await
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, Some(DEMO_KEY), None, None).await
    }

    /// The customer completes the sandbox's 3-D Secure challenge of the intent `reference`.
    pub async fn complete_3ds(&self, reference: &str) -> Response {
        let path = format!("/sandbox/v1/payments/{reference}/complete_3ds");
        self.request("POST", &path, Some(DEMO_KEY), None, None).await
    }

    /// Creates (and by default confirms) a payment as the demo merchant.
    pub async fn pay(&self, amount: i64, payment_method: &str, capture: &str, confirm: bool) -> Response {
        self.post(
            "/api/v1/payments",
            json!({ "order_id": "ord_test", "amount": { "value": amount, "currency": "USD" },
                    "payment_method": payment_method, "capture_strategy": capture, "confirm": confirm }),
        )
        .await
    }

    /// A second merchant and its key, made through the operator API.
    pub async fn new_merchant(&self) -> String {
        let token = self.state.config.admin.token.clone();
        let r = self
            .request(
                "POST",
                "/admin/v1/merchants",
                Some(&token),
                None,
                Some(r#"{"name":"Other Shop","default_currency":"USD"}"#),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["api_key"].as_str().unwrap().to_owned()
    }

    /// A direct connection to this test's database, for checks the API cannot make.
    /// The id of a merchant of this app's database (the demo merchant, when it is the only one).
    pub async fn first_merchant(&self) -> payrail::domain::MerchantId {
        let id: String = self
            .sql()
            .await
            .query_one("SELECT id FROM merchants LIMIT 1", &[])
            .await
            .unwrap()
            .get(0);
        payrail::domain::MerchantId::parse(&id).unwrap()
    }

    /// A connection of the test's own. Every statement on it is bounded (a lock it waits
    /// for, or a statement that never ends, fails the test instead of hanging the run).
    pub async fn sql(&self) -> tokio_postgres::Client {
        let mut config: tokio_postgres::Config = self.database_url.parse().expect("database url");
        config
            .connect_timeout(Duration::from_secs(10))
            .options("-c statement_timeout=30000 -c lock_timeout=15000");
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect");
        actix_rt::spawn(conn);
        client
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.sql()
            .await
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }
}

impl TestApp {
    /// A POST with a raw body, as the demo merchant, with a fresh idempotency key.
    pub async fn post_raw(&self, path: &str, body: &str) -> Response {
        let key = uuid::Uuid::new_v4().to_string();
        self.request("POST", path, Some(DEMO_KEY), Some(&key), Some(body)).await
    }
}

impl TestApp {
    /// A payment read as whichever of `keys` owns it.
    pub async fn get_as(&self, keys: &[String], id: &str) -> Value {
        for key in keys {
            let r = self
                .request("GET", &format!("/api/v1/payments/{id}"), Some(key), None, None)
                .await;
            if r.status == 200 {
                return r.body;
            }
        }
        panic!("no merchant owns {id}");
    }
}
