//! One payrail node per database, unless the nodes run in cluster mode. Two `payrail serve`
//! processes outside cluster mode on one database would each run actors, consumers and
//! sweepers for the same payments, and nothing but luck would keep their commits apart. So a
//! serving process holds a PostgreSQL session-level advisory lock on a connection of its own,
//! and a second one is refused at start with the holder's name. Cluster nodes hold the same
//! lock *shared*: they start beside each other (partition leases keep them apart), and a node
//! outside cluster mode cannot start beside them, nor they beside it.
//!
//! The lock is a guard against a misconfiguration, not a fence: PostgreSQL releases it when the
//! holding session ends (the process dies, the connection is cut, PostgreSQL restarts). The
//! holder then takes it again at once; if another process took it first, the holder stops its
//! background loops and its HTTP server (fail closed). Work already in hand finishes, fenced as
//! every commit is by the payment's version and the key's fence.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::NoTls;

/// The advisory lock's key (the migration lock is 7423001).
pub const NODE_LOCK_KEY: i64 = 7_423_002;
/// How often a node that lost its lock's connection tries to take the lock again, and how
/// often a starting node asks while another holds it.
const RETRY: Duration = Duration::from_millis(250);
const RETAKE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum NodeLockError {
    #[error(
        "another payrail node is serving this database ({holder}); payrail runs one node per \
         database: stop it, or point this one at another database"
    )]
    Held { holder: String },
    #[error(
        "payrail nodes in cluster mode are serving this database ({holder}); start this one with \
         [cluster] enabled = true to join them, or point it at another database"
    )]
    HeldByCluster { holder: String },
    #[error(
        "a payrail node outside cluster mode is serving this database ({holder}); a cluster node \
         cannot join it: stop it first"
    )]
    HeldBySingle { holder: String },
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// Held for as long as this process serves; dropping it ends the session and so releases the
/// lock.
pub struct NodeLock {
    keeper: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl Drop for NodeLock {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl NodeLock {
    /// Takes the lock, waiting up to `wait` for a holder to go (a process restarted after
    /// `kill -9` may start before PostgreSQL has noticed the old session end).
    /// `shared`: a cluster node's hold, which other cluster nodes share.
    pub async fn acquire(pg: &tokio_postgres::Config, wait: Duration, shared: bool) -> Result<NodeLock, NodeLockError> {
        let deadline = tokio::time::Instant::now() + wait;
        let pg = with_name(pg);
        loop {
            let (client, connection) = pg.connect(NoTls).await?;
            let connection = tokio::spawn(connection);
            if try_lock(&client, shared).await? {
                let (tell, lost) = watch::channel(false);
                let keeper = tokio::spawn(keep(pg, client, connection, tell, shared));
                return Ok(NodeLock { keeper, lost });
            }
            let holder = holder(&client).await.unwrap_or_else(|| "holder unknown".into());
            drop(client);
            if tokio::time::Instant::now() + RETRY > deadline {
                return Err(if shared {
                    NodeLockError::HeldBySingle { holder }
                } else if holder_is_shared(&holder) {
                    NodeLockError::HeldByCluster { holder }
                } else {
                    NodeLockError::Held { holder }
                });
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Resolves to true when the lock was lost to another process (this one must stop
    /// serving), to false when the lock was dropped. Holds no reference to the lock.
    pub fn lost(&self) -> impl std::future::Future<Output = bool> + 'static {
        let mut lost = self.lost.clone();
        async move { lost.wait_for(|l| *l).await.is_ok() }
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

/// The session's name says who holds the lock, for the error a second node prints.
fn with_name(pg: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut pg = pg.clone();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown host".into());
    pg.application_name(format!("payrail node pid {} on {host}", std::process::id()));
    pg
}

async fn try_lock(client: &tokio_postgres::Client, shared: bool) -> Result<bool, tokio_postgres::Error> {
    let sql = if shared {
        "SELECT pg_try_advisory_lock_shared($1)"
    } else {
        "SELECT pg_try_advisory_lock($1)"
    };
    Ok(client.query_one(sql, &[&NODE_LOCK_KEY]).await?.get(0))
}

/// [`holder`] names shared holders with this mark.
const SHARED_MARK: &str = " (cluster mode)";

fn holder_is_shared(holder: &str) -> bool {
    holder.contains(SHARED_MARK)
}

/// Who holds the lock in this database: its session's name, address and start (the first
/// of the cluster nodes when they share it).
async fn holder(client: &tokio_postgres::Client) -> Option<String> {
    let rows = client
        .query(
            "SELECT a.application_name, coalesce(host(a.client_addr), 'local socket'),
                    to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    l.mode = 'ShareLock'
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
              ORDER BY a.backend_start",
            &[&NODE_LOCK_KEY],
        )
        .await
        .ok()?;
    let row = rows.first()?;
    let (name, addr, since, shared): (String, String, String, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let mark = if shared { SHARED_MARK } else { "" };
    let others = match rows.len() {
        1 => String::new(),
        n => format!(", and {} more", n - 1),
    };
    Some(format!("{name}{mark}, connected from {addr} since {since}{others}"))
}

/// Holds the session open. When it ends, takes the lock again on a new session at once, then
/// every `RETAKE_INTERVAL` while PostgreSQL cannot be reached; if another process holds it by
/// then, says so and stops.
async fn keep(
    pg: tokio_postgres::Config,
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    lost: watch::Sender<bool>,
    shared: bool,
) {
    let mut held = Some((client, connection));
    loop {
        if let Some((client, connection)) = held.take() {
            let ended = connection.await;
            drop(client);
            tracing::warn!(?ended, "the node lock's database session ended; taking the lock again");
        }
        let (client, connection) = match pg.connect(NoTls).await {
            Ok(c) => c,
            Err(_) => {
                // PostgreSQL is unreachable: every request answers 503 meanwhile.
                tokio::time::sleep(RETAKE_INTERVAL).await;
                continue;
            }
        };
        let connection = tokio::spawn(connection);
        match try_lock(&client, shared).await {
            Ok(true) => {
                tracing::info!("node lock taken again");
                held = Some((client, connection));
            }
            Ok(false) => {
                let holder = holder(&client).await.unwrap_or_else(|| "holder unknown".into());
                tracing::error!(%holder, "another payrail node took this database's node lock; this one stops serving");
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "node lock");
                tokio::time::sleep(RETAKE_INTERVAL).await;
            }
        }
    }
}
