//! PostgreSQL: the pool, database creation, migrations, and the error mapping that makes an
//! unreachable database a 503 (fail closed) rather than a guess.

pub mod accounts;
pub mod commit;
pub mod events;
pub mod group;
pub mod idempotency;
pub mod ledger;
pub mod merchants;
pub mod node_lock;
pub mod outbox;
pub mod payments;
pub mod payouts;
pub mod reconciliation;
pub mod refunds;
pub mod reports;
pub mod risk;
pub mod routing;
pub mod sandbox;
pub mod transfers;
pub mod webhooks_out;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;

/// What can go wrong with PostgreSQL, as the rooms above see it. The API answers
/// `Unavailable` with 503 (fail closed) and `Broken` with 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL cannot be reached, is overloaded, or dropped the connection mid-statement:
    /// retry later. For a commit, its fate is unknown (it may have landed).
    #[error("the database is unavailable")]
    Unavailable,
    /// A statement was refused (a constraint, a type) or a stored row could not be read: a
    /// bug, not an outage.
    #[error("the database refused a statement or returned an unreadable row")]
    Broken,
}

/// What bounds a migration instead of the pool's `statement_timeout` ([`Db::apply_migrations`]):
/// an hour of work for each of its statements, and ten seconds' wait for any one lock.
pub const MIGRATION_TIMEOUTS: &str = "SET LOCAL statement_timeout = '1h'; SET LOCAL lock_timeout = '10s'";

/// How long a starting process waits for another that is applying migrations.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(3600);

/// The versioned migrations in `migrations/`, applied in order, each once (public so that a
/// test can stop a database at an earlier version).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/V1__init.sql")),
    (
        2,
        "ledger_slots",
        include_str!("../../../migrations/V2__ledger_slots.sql"),
    ),
    (3, "psp_events", include_str!("../../../migrations/V3__psp_events.sql")),
    (
        4,
        "money_safety",
        include_str!("../../../migrations/V4__money_safety.sql"),
    ),
    (5, "risk", include_str!("../../../migrations/V5__risk.sql")),
    (
        6,
        "merchant_webhooks",
        include_str!("../../../migrations/V6__merchant_webhooks.sql"),
    ),
    (
        7,
        "reconciliation",
        include_str!("../../../migrations/V7__reconciliation.sql"),
    ),
    (
        8,
        "hot_updates",
        include_str!("../../../migrations/V8__hot_updates.sql"),
    ),
    (
        9,
        "marketplaces",
        include_str!("../../../migrations/V9__marketplaces.sql"),
    ),
    (10, "routing", include_str!("../../../migrations/V10__routing.sql")),
    (
        11,
        "reconciliation_speed",
        include_str!("../../../migrations/V11__reconciliation_speed.sql"),
    ),
    (
        12,
        "lean_event_writes",
        include_str!("../../../migrations/V12__lean_event_writes.sql"),
    ),
    (
        13,
        "trigger_plans",
        include_str!("../../../migrations/V13__trigger_plans.sql"),
    ),
    (
        14,
        "partition_fences",
        include_str!("../../../migrations/V14__partition_fences.sql"),
    ),
    (
        15,
        "idempotency_holder",
        include_str!("../../../migrations/V15__idempotency_holder.sql"),
    ),
    (
        16,
        "reconciliation_run_holder",
        include_str!("../../../migrations/V16__reconciliation_run_holder.sql"),
    ),
    (
        17,
        "attempts_finished",
        include_str!("../../../migrations/V17__attempts_finished.sql"),
    ),
    (
        18,
        "entries_account_index",
        include_str!("../../../migrations/V18__entries_account_index.sql"),
    ),
    (
        19,
        "ledger_checks",
        include_str!("../../../migrations/V19__ledger_checks.sql"),
    ),
    (
        20,
        "outbox_json_body",
        include_str!("../../../migrations/V20__outbox_json_body.sql"),
    ),
    (
        21,
        "outbox_json_body_validated",
        include_str!("../../../migrations/V21__outbox_json_body_validated.sql"),
    ),
    (
        22,
        "outbox_cursor",
        include_str!("../../../migrations/V22__outbox_cursor.sql"),
    ),
    (
        23,
        "payment_references",
        include_str!("../../../migrations/V23__payment_references.sql"),
    ),
    (
        24,
        "payment_psp_references",
        include_str!("../../../migrations/V24__payment_psp_references.sql"),
    ),
    (
        25,
        "payments_half_pages",
        include_str!("../../../migrations/V25__payments_half_pages.sql"),
    ),
    (
        26,
        "after_row_checks",
        include_str!("../../../migrations/V26__after_row_checks.sql"),
    ),
    (
        27,
        "idempotency_keys_room",
        include_str!("../../../migrations/V27__idempotency_keys_room.sql"),
    ),
    (
        28,
        "entries_keyed_by_journal",
        include_str!("../../../migrations/V28__entries_keyed_by_journal.sql"),
    ),
    (
        29,
        "database_guards",
        include_str!("../../../migrations/V29__database_guards.sql"),
    ),
];

/// The first line of a migration that cannot run in one transaction (an index built
/// `CONCURRENTLY`, which writers do not wait for). Its steps, one statement each (a `DO` block
/// is one) and separated
/// by [`STEP`] lines, run on their own, outside a transaction, under [`STEP_TIMEOUTS`]; the last
/// step (any number of statements) runs in the transaction that records the migration. Every
/// step but the last must be safe to run again: a start that dies between them runs them all
/// again.
pub const OUTSIDE_A_TRANSACTION: &str = "-- payrail: outside a transaction";

/// The line between two steps of an [`OUTSIDE_A_TRANSACTION`] migration.
pub const STEP: &str = "-- payrail: step";

/// What bounds a step run outside a transaction: an hour, for the work and for any wait. An
/// index built `CONCURRENTLY` waits for every transaction that could still use the table (a long
/// `ledger verify`, say) without holding up any writer meanwhile.
const STEP_TIMEOUTS: &str = "SET statement_timeout = '1h'; SET lock_timeout = '1h'";

/// How many times the last step of an [`OUTSIDE_A_TRANSACTION`] migration is tried when it could
/// not get a lock in time (its own `lock_timeout` keeps each wait short, since writers queue
/// behind it), one second apart.
const LAST_STEP_TRIES: u32 = 30;

/// A migration's steps when it runs [`OUTSIDE_A_TRANSACTION`], or `None` for one transaction.
pub fn steps(sql: &str) -> Option<Vec<&str>> {
    let rest = sql.strip_prefix(OUTSIDE_A_TRANSACTION)?;
    let rest = rest.strip_prefix('\n')?;
    Some(rest.split(&format!("\n{STEP}\n")).collect())
}

/// A handle on the pool. Cloning is cheap: the pool is shared.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// Woken when a commit wrote outbox rows, so the relay publishes them at once instead of
    /// at its next poll.
    outbox_ready: std::sync::Arc<tokio::sync::Notify>,
    /// The sessions' settings, for the node lock's own connection.
    pg: std::sync::Arc<tokio_postgres::Config>,
    /// Idempotency keys' claims, group-committed ([`group`]).
    claims: std::sync::Arc<group::Group<idempotency::Claim, bool>>,
    /// The sandbox's bookings, group-committed ([`group`]).
    bookings: std::sync::Arc<group::Group<sandbox::Booking, ()>>,
    /// PSP events' dedupe look-ups, read together ([`group`]).
    processed_lookups: std::sync::Arc<group::Group<events::Pair, bool>>,
    /// PSP events' payments, and whether each event is recorded, read together ([`group`]).
    reference_lookups: std::sync::Arc<group::Group<events::EventKey, Option<events::EventPayment>>>,
}

/// Rows one group-committed statement carries at most, and rows that may wait for one.
const GROUP_MAX_BATCH: usize = 256;
const GROUP_MAX_QUEUED: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("database: {}", .0.as_db_error().map(|d| d.message()).map_or_else(|| .0.to_string(), str::to_owned))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("another process has been applying migrations for longer than {0:?}")]
    MigrationsBusy(Duration),
    /// The database records another migration under this version: this build's migrations
    /// were renumbered or renamed after that one was applied, so what the database holds is
    /// not what this build's later migrations were written against.
    #[error("migration {version} was applied as {recorded:?}, but this build names it {expected:?}")]
    MigrationMismatch {
        version: i32,
        recorded: String,
        expected: String,
    },
}

impl Db {
    /// Creates the database named in the URL if it is missing, then opens the pool.
    pub async fn connect(config: &DatabaseConfig) -> Result<Db, SetupError> {
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| SetupError::Url(e.to_string()))?;
        pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        // payrail's statements are short and index-driven: compiling them (JIT) or starting
        // parallel workers for them costs more than it saves, and on a busy server a parallel
        // sequential scan is planned where index probes are what pays (docs/BENCHMARKS.md,
        // "Reconciliation of a large settlement report").
        pg.options(format!(
            "-c statement_timeout={} -c jit=off -c max_parallel_workers_per_gather=0",
            config.statement_timeout_ms
        ));
        if pg.get_application_name().is_none() {
            pg.application_name("payrail");
        }
        ensure_database(&pg).await?;
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let wait = Duration::from_millis(config.pool_wait_ms);
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .wait_timeout(Some(wait))
            .create_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .recycle_timeout(Some(wait))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| SetupError::Pool(e.to_string()))?;
        Ok(Db {
            pool,
            outbox_ready: Default::default(),
            pg: std::sync::Arc::new(pg),
            claims: std::sync::Arc::new(group::Group::new(GROUP_MAX_BATCH, GROUP_MAX_QUEUED)),
            bookings: std::sync::Arc::new(group::Group::new(GROUP_MAX_BATCH, GROUP_MAX_QUEUED)),
            processed_lookups: std::sync::Arc::new(group::Group::new(GROUP_MAX_BATCH, GROUP_MAX_QUEUED)),
            reference_lookups: std::sync::Arc::new(group::Group::new(GROUP_MAX_BATCH, GROUP_MAX_QUEUED)),
        })
    }

    /// A newest-first page (keyset on `(created_at, id)`) of a platform's rows of `table`, at
    /// most `limit` after `starting_after` (one that names none of its rows gives an empty
    /// page), and whether more follow. `table` and `columns` are our own constants.
    pub(super) async fn platform_page<T>(
        &self,
        table: &'static str,
        columns: &'static str,
        platform: &crate::domain::MerchantId,
        limit: i64,
        starting_after: Option<&str>,
        from_row: impl Fn(&tokio_postgres::Row) -> Result<T, StoreError>,
    ) -> Result<(Vec<T>, bool), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {columns} FROM {table} WHERE platform_id = $1
                   AND ($2::text IS NULL OR (created_at, id) <
                        (SELECT created_at, id FROM {table} WHERE id = $2 AND platform_id = $1))
                 ORDER BY created_at DESC, id DESC LIMIT $3"
            ))
            .await
            .map_err(pg_error)?;
        let limit = limit.clamp(1, 100);
        let rows = client
            .query(&stmt, &[&platform.as_str(), &starting_after, &(limit + 1)])
            .await
            .map_err(pg_error)?;
        let mut page = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let more = page.len() as i64 > limit;
        page.truncate(limit as usize);
        Ok((page, more))
    }

    /// Cluster mode: records that `holder` now holds `partition` under lease `revision`, unless
    /// the row holds a newer revision already (`force`: the lease bucket was made again and its
    /// revisions restarted). Waits at most `lock_timeout_ms` for commits still holding the
    /// previous fence (FOR SHARE) to finish; from then on they are refused. `Some(revision)`:
    /// the newer revision that kept it.
    pub async fn take_partition(
        &self,
        partition: i32,
        revision: i64,
        holder: &str,
        force: bool,
        lock_timeout_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = {lock_timeout_ms}"))
            .await
            .map_err(pg_error)?;
        let taken = tx
            .query_opt(
                "INSERT INTO partition_fences (partition, revision, holder) VALUES ($1, $2, $3)
                 ON CONFLICT (partition) DO UPDATE
                    SET revision = excluded.revision, holder = excluded.holder, taken_at = now()
                    WHERE partition_fences.revision < excluded.revision OR $4
                 RETURNING partition",
                &[&partition, &revision, &holder, &force],
            )
            .await
            .map_err(pg_error)?;
        if taken.is_some() {
            tx.commit().await.map_err(pg_error)?;
            return Ok(None);
        }
        let newer = tx
            .query_one(
                "SELECT revision FROM partition_fences WHERE partition = $1",
                &[&partition],
            )
            .await
            .map_err(pg_error)?;
        Ok(Some(newer.get(0)))
    }

    /// Takes this database's node lock (one serving payrail per database), waiting up to
    /// `wait` for a holder to go.
    pub async fn node_lock(
        &self,
        wait: Duration,
        shared: bool,
    ) -> Result<node_lock::NodeLock, node_lock::NodeLockError> {
        node_lock::NodeLock::acquire(&self.pg, wait, shared).await
    }

    /// Tells the outbox relay that rows are waiting.
    pub fn outbox_committed(&self) {
        self.outbox_ready.notify_one();
    }

    /// Waits until a commit writes outbox rows, or `timeout` passes.
    pub async fn outbox_wait(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.outbox_ready.notified()).await;
    }

    /// A pooled connection, or 503 when PostgreSQL cannot be reached in time.
    pub async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            tracing::warn!(error = %e, "database pool");
            StoreError::Unavailable
        })
    }

    /// Whether PostgreSQL answers now.
    pub async fn ping(&self) -> bool {
        match self.client().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    /// Connections in use and callers waiting for one.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    /// Applies every migration the database has not seen, under an advisory lock so that
    /// several processes starting at once apply each one exactly once.
    pub async fn migrate(&self) -> Result<Vec<i32>, SetupError> {
        self.apply_migrations(MIGRATIONS).await
    }

    /// [`Db::migrate`] with the given list (tests give their own). A migration runs under
    /// [`MIGRATION_TIMEOUTS`], not the pool's `statement_timeout`: building an index or
    /// rewriting a table of a large database takes longer than any request may, while a lock
    /// it cannot get (behind a long `ledger verify`, say) still fails it soon and plainly.
    ///
    /// A version is known by its number and its name: one the database recorded under another
    /// name stops the process ([`SetupError::MigrationMismatch`]) before anything is applied.
    /// Versions the database holds and this build does not know (a newer node's, during a
    /// rolling upgrade) are left alone.
    pub async fn apply_migrations(&self, migrations: &[(i32, &str, &str)]) -> Result<Vec<i32>, SetupError> {
        let mut client = self.pool.get().await.map_err(|e| SetupError::Pool(e.to_string()))?;
        // Another process may be applying a long migration: wait for it as long as one of its
        // statements may run (polled, since a blocking pg_advisory_lock would be cut off by
        // the pool's statement_timeout), then give up plainly.
        let deadline = tokio::time::Instant::now() + MIGRATION_LOCK_WAIT;
        while !client
            .query_one("SELECT pg_try_advisory_lock(7423001)", &[])
            .await?
            .get::<_, bool>(0)
        {
            if tokio::time::Instant::now() >= deadline {
                return Err(SetupError::MigrationsBusy(MIGRATION_LOCK_WAIT));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Whatever happens from here, the lock is given back before the connection is.
        let result = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS payrail_migrations (
                         version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());",
                )
                .await?;
            // Every version this build knows and the database recorded is checked before any
            // is applied: a mismatch stops the start with nothing new written.
            let recorded: std::collections::HashMap<i32, String> = client
                .query("SELECT version, name FROM payrail_migrations", &[])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            for (version, name, _) in migrations {
                match recorded.get(version) {
                    Some(recorded) if recorded != name => {
                        return Ok(Err(SetupError::MigrationMismatch {
                            version: *version,
                            recorded: recorded.clone(),
                            expected: (*name).to_owned(),
                        }));
                    }
                    _ => {}
                }
            }
            let mut applied = Vec::new();
            for (version, name, sql) in migrations {
                if recorded.contains_key(version) {
                    continue;
                }
                apply_one(&mut client, *version, name, sql).await?;
                applied.push(*version);
            }
            Ok::<_, tokio_postgres::Error>(Ok(applied))
        }
        .await;
        client.batch_execute("SELECT pg_advisory_unlock(7423001)").await?;
        result?
    }
}

/// Applies one migration and records it: whole, in one transaction, or step by step when it
/// runs [`OUTSIDE_A_TRANSACTION`].
async fn apply_one(client: &mut Object, version: i32, name: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    let stepped = steps(sql);
    let last = match &stepped {
        None => sql,
        Some(steps) => {
            let (last, before) = steps.split_last().map_or(("", &[][..]), |(l, b)| (*l, b));
            client.batch_execute(STEP_TIMEOUTS).await?;
            let mut ran = Ok(());
            for step in before {
                ran = client.batch_execute(step).await;
                if ran.is_err() {
                    break;
                }
            }
            // Back to the pool's settings (the connection's start-up options) either way.
            client
                .batch_execute("RESET statement_timeout; RESET lock_timeout")
                .await?;
            ran?;
            last
        }
    };
    // Only a stepped migration's last step is tried again: it keeps its own lock waits short.
    let tries = if stepped.is_some() { LAST_STEP_TRIES } else { 1 };
    let mut tried = 0;
    loop {
        tried += 1;
        let tx = client.transaction().await?;
        tx.batch_execute(MIGRATION_TIMEOUTS).await?;
        let done = async {
            tx.batch_execute(last).await?;
            tx.execute(
                "INSERT INTO payrail_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await?;
            tx.commit().await
        }
        .await;
        match done {
            Err(e) if tried < tries && e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::warn!(
                    version,
                    tried,
                    "migration: the table is busy; trying its last step again"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            done => return done,
        }
    }
}

async fn ensure_database(pg: &tokio_postgres::Config) -> Result<(), SetupError> {
    let name = pg.get_dbname().unwrap_or("postgres").to_owned();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(SetupError::Url(format!(
            "database name {name:?}: use letters, digits and underscores"
        )));
    }
    let mut admin = pg.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(NoTls).await?;
    let conn = tokio::spawn(connection);
    // Several processes may race here (a cluster's nodes starting together): the loser's
    // "already exists" is success, and one that finds template1 busy with another's CREATE
    // DATABASE looks again shortly (at most 50 times).
    for tries in 1.. {
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if exists {
            break;
        }
        match client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await {
            Ok(()) => break,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => break,
            // Another's CREATE DATABASE under way: template1 busy, or its name not yet visible.
            Err(e)
                if tries < 50
                    && (e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                        || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = conn.await;
    Ok(())
}

/// Maps a query error: connection trouble, timeouts and overload are 503 (the caller may
/// retry); anything else is a bug or a broken invariant, 500. Only the SQLSTATE and message
/// are logged, never the row detail.
pub fn pg_error(e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    let io = std::error::Error::source(&e)
        .map(|s| s.is::<std::io::Error>())
        .unwrap_or(false);
    match e.code() {
        None if e.is_closed() || io => {
            tracing::warn!(error = %e, "database connection");
            StoreError::Unavailable
        }
        None => {
            // Client-side: a parameter or type mismatch is a bug, not an outage.
            tracing::error!(error = %e, "database statement failed in the client");
            StoreError::Broken
        }
        Some(code)
            if code.code().starts_with("08")
                || code.code().starts_with("53")
                || code.code().starts_with("57")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            tracing::warn!(sqlstate = code.code(), "database unavailable");
            StoreError::Unavailable
        }
        Some(code) => {
            let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
            tracing::error!(sqlstate = code.code(), %message, "database rejected a statement");
            StoreError::Broken
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{steps, MIGRATIONS, OUTSIDE_A_TRANSACTION, STEP};

    /// Every file in `migrations/` is registered under its own version and name, in order,
    /// and nothing is registered without its file.
    #[test]
    fn the_registered_migrations_are_the_files_in_migrations() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<(i32, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .map(|file| {
                let stem = file.strip_suffix(".sql").expect("only .sql files in migrations/");
                let (version, name) = stem
                    .strip_prefix('V')
                    .and_then(|rest| rest.split_once("__"))
                    .expect("V<version>__<name>.sql");
                (version.parse().unwrap(), name.to_owned())
            })
            .collect();
        files.sort();
        let registered: Vec<(i32, String)> = MIGRATIONS.iter().map(|(v, n, _)| (*v, (*n).to_owned())).collect();
        assert_eq!(registered, files);
        for ((version, name, sql), _) in MIGRATIONS.iter().zip(&files) {
            let file = std::fs::read_to_string(format!("{dir}/V{version}__{name}.sql")).unwrap();
            assert_eq!(*sql, file, "V{version} includes its own file");
        }
    }

    #[test]
    fn a_migration_runs_in_steps_only_when_its_first_line_says_so() {
        assert_eq!(steps("CREATE TABLE t (n int);\nDROP TABLE t;"), None);
        assert_eq!(
            steps(&format!("-- a comment\n{OUTSIDE_A_TRANSACTION}\nSELECT 1;")),
            None
        );
        assert_eq!(
            steps(&format!(
                "{OUTSIDE_A_TRANSACTION}\n-- why\nSELECT 1;\n{STEP}\nSELECT 2;\n{STEP}\nSELECT 3;\nSELECT 4;\n"
            )),
            Some(vec!["-- why\nSELECT 1;", "SELECT 2;", "SELECT 3;\nSELECT 4;\n"])
        );
        // A step marker inside a line is not a step.
        assert_eq!(
            steps(&format!("{OUTSIDE_A_TRANSACTION}\nSELECT '{STEP}';")),
            Some(vec![&*format!("SELECT '{STEP}';")])
        );
        // Every step run outside a transaction is one statement (PostgreSQL runs several sent
        // at once in one transaction, where `CONCURRENTLY` is refused).
        for (version, _, sql) in MIGRATIONS {
            let Some(steps) = steps(sql) else { continue };
            assert!(steps.len() >= 2, "V{version} has steps");
            for step in &steps[..steps.len() - 1] {
                let code: String = step
                    .lines()
                    .filter(|line| !line.trim_start().starts_with("--"))
                    .collect::<String>()
                    .split("$$")
                    .step_by(2) // outside dollar quotes (a DO block's body)
                    .collect();
                assert_eq!(
                    code.matches(';').count(),
                    1,
                    "V{version}: one statement per step: {step}"
                );
            }
        }
    }
}
