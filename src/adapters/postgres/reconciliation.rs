//! Connectors, reconciliation runs, settlement lines and exceptions (docs/API.md,
//! "Reconciliation"). A report is applied chunk by chunk: each chunk's lines, exceptions and
//! journals commit together, so a line is applied once however often its report is given.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};

use super::payments::{payment_from_row, COLUMNS};
use super::{pg_error, Db, StoreError};
use crate::domain::ledger::Entry;
use crate::domain::settlement::LineKind;
use crate::domain::{MerchantId, Payment};

/// The balance slot reconciliation's journals move: one no ledger shard uses, so a run never
/// waits on a shard's rows (an account's balance is the sum of its slots).
pub const RECONCILIATION_SLOT: i16 = i16::MAX;

pub const PSP_FEES_EXPENSE: &str = "psp_fees_expense";
pub const BANK: &str = "bank";

#[derive(Debug, Clone)]
pub struct Connector {
    pub id: String,
    pub merchant_id: MerchantId,
    pub psp: String,
    pub label: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    /// The currencies it takes; empty: any.
    pub currencies: Vec<String>,
    /// A sandbox connector's behaviour (`latency_ms`, `failure_rate`).
    pub settings: Value,
    /// Whether sealed credentials are stored (they are never read out through the API).
    pub has_credentials: bool,
    pub updated_at: DateTime<Utc>,
}

impl Connector {
    /// docs/API.md's Connector object (never any credential).
    pub fn to_object(&self) -> Value {
        json!({ "object": "connector", "id": self.id, "merchant_id": self.merchant_id.as_str(), "psp": self.psp,
                "label": self.label, "enabled": self.enabled, "currencies": self.currencies,
                "settings": self.settings, "has_credentials": self.has_credentials,
                "webhook_url_path": format!("/internal/webhooks/psp/{}/{}", self.psp, self.id),
                "created": self.created_at.timestamp(), "updated": self.updated_at.timestamp() })
    }
}

pub(super) fn connector_from_row(r: &tokio_postgres::Row) -> Connector {
    Connector {
        id: r.get(0),
        merchant_id: MerchantId::from_trusted(r.get(1)),
        psp: r.get(2),
        label: r.get(3),
        enabled: r.get(4),
        created_at: r.get(5),
        currencies: r.get(6),
        settings: r.get(7),
        has_credentials: r.get(8),
        updated_at: r.get(9),
    }
}

pub(super) const CONNECTOR_COLUMNS: &str =
    "id, merchant_id, psp, label, enabled, created_at, currencies, settings, credentials IS NOT NULL, updated_at";

/// One line of a report as a run applies it (a malformed line keeps only its number and why).
#[derive(Debug, Clone)]
pub struct ReportLine {
    pub line_no: i32,
    pub key: String,
    pub kind: String,
    pub reference: String,
    pub intent: Option<String>,
    pub amount: i64,
    pub fee: i64,
    pub currency: String,
    pub created: DateTime<Utc>,
    pub malformed: Option<String>,
    /// A Stripe charge named by its charge in a file with no `payment_intent_id` column.
    pub charge_only: bool,
}

/// A refund as reconciliation sees it.
#[derive(Debug, Clone)]
pub struct RefundFacts {
    pub id: String,
    pub payment_id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
}

/// A dispute as reconciliation sees it.
#[derive(Debug, Clone)]
pub struct DisputeFacts {
    pub payment_id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
}

/// A line as applied: its row in `settlement_lines`.
#[derive(Debug, Clone)]
pub struct AppliedLine {
    pub line: ReportLine,
    pub kind: LineKind,
    pub payment_id: Option<String>,
    pub refund_id: Option<String>,
    pub matched: bool,
    /// The journal of a payout line (its own); fee journals are set per chunk.
    pub journal_id: Option<String>,
}

/// An exception to raise (once per connector, type and dedupe key).
#[derive(Debug, Clone)]
pub struct NewException {
    pub kind: &'static str,
    pub dedupe_key: String,
    pub line_no: Option<i32>,
    pub line_key: Option<String>,
    pub reference: Option<String>,
    pub payment_id: Option<String>,
    pub refund_id: Option<String>,
    pub expected: Option<i64>,
    pub reported: Option<i64>,
    pub currency: Option<String>,
    pub detail: String,
}

/// A journal a report posts, with its entries.
#[derive(Debug, Clone)]
pub struct SettlementJournal {
    pub id: String,
    /// `psp_fee` or `psp_payout`.
    pub kind: &'static str,
    pub correlation_id: String,
    pub currency: String,
    pub entries: Vec<Entry>,
}

/// Everything one chunk writes, in one transaction.
#[derive(Debug, Default)]
pub struct ChunkWrite {
    pub lines: Vec<AppliedLine>,
    pub exceptions: Vec<NewException>,
    /// The chunk's fee journals (one per currency), with the currency they cover.
    pub fee_journals: Vec<SettlementJournal>,
    pub payout_journals: Vec<SettlementJournal>,
    /// The references (intent, refund, dispute) of the lines this chunk matched: their open
    /// `missing_in_report` exceptions resolve themselves.
    pub matched_references: Vec<String>,
    /// The keys of the lines this chunk matched: a `status_mismatch` an earlier run raised for
    /// the very line, and left unapplied, resolves itself (another line of the same object, a
    /// dispute's reversal beside its opening say, leaves it open).
    pub matched_keys: Vec<String>,
    /// The waiting keys (`{key}:charge_only`) of Stripe charge lines evaluated with their
    /// PaymentIntent's column: the `missing_in_payrail` an earlier run raised for the very line,
    /// waiting for that column, resolves itself.
    pub waiting_over: Vec<String>,
    /// The payments and refunds the chunk's applied charge and refund lines name (matched or
    /// not): their open `missing_in_report` resolves itself, as an applied line that names a
    /// capture or refund keeps one from being raised.
    pub named: Vec<String>,
    /// The latest time among the lines an earlier run applied (skipped here): with the lines
    /// this chunk applies, they give the report's day, also when the report is run again.
    pub already_latest: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkCounts {
    pub lines: i64,
    pub exceptions: i64,
}

/// Filters for the exceptions queue.
#[derive(Debug, Default)]
pub struct ExceptionFilter {
    pub limit: i64,
    pub starting_after: Option<String>,
    pub connector_id: Option<String>,
    pub kind: Option<String>,
    pub status: Option<String>,
    pub run_id: Option<String>,
}

fn timestamp(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| json!(t.timestamp())).unwrap_or(Value::Null)
}

const RUN_COLUMNS: &str =
    "id, connector_id, format, source, report_date, file_sha256, status, lines, already_applied, \
    matched, exceptions, error, started_at, finished_at";

fn run_object(r: &tokio_postgres::Row) -> Value {
    let lines: i32 = r.get(7);
    let already: i32 = r.get(8);
    let matched: i32 = r.get(9);
    let exceptions: i32 = r.get(10);
    let date: Option<NaiveDate> = r.get(4);
    let considered = matched + exceptions;
    json!({
        "object": "reconciliation_run", "id": r.get::<_, String>(0), "connector_id": r.get::<_, String>(1),
        "format": r.get::<_, String>(2), "source": r.get::<_, String>(3),
        "report_date": date.map(|d| d.to_string()), "file_sha256": r.get::<_, Option<String>>(5),
        "status": r.get::<_, String>(6), "lines": lines, "already_applied": already, "matched": matched,
        "exceptions": exceptions,
        "match_ratio": if considered > 0 { json!(f64::from(matched) / f64::from(considered)) } else { Value::Null },
        "error": r.get::<_, Option<String>>(11),
        "started": r.get::<_, DateTime<Utc>>(12).timestamp(), "finished": timestamp(r.get(13)),
    })
}

const EXCEPTION_COLUMNS: &str = "id, connector_id, run_id, type, line_no, line_key, reference, payment_id, refund_id, \
    expected, reported, currency::text, detail, status, resolved_by, resolution, resolved_at, created_at";

fn exception_object(r: &tokio_postgres::Row) -> Value {
    json!({
        "object": "reconciliation_exception", "id": r.get::<_, String>(0), "connector_id": r.get::<_, String>(1),
        "run_id": r.get::<_, String>(2), "type": r.get::<_, String>(3), "line": r.get::<_, Option<i32>>(4),
        "line_key": r.get::<_, Option<String>>(5), "reference": r.get::<_, Option<String>>(6),
        "payment_id": r.get::<_, Option<String>>(7), "refund_id": r.get::<_, Option<String>>(8),
        "expected_amount": r.get::<_, Option<i64>>(9), "reported_amount": r.get::<_, Option<i64>>(10),
        "currency": r.get::<_, Option<String>>(11), "detail": r.get::<_, String>(12),
        "status": r.get::<_, String>(13), "resolved_by": r.get::<_, Option<String>>(14),
        "resolution_note": r.get::<_, Option<String>>(15), "resolved": timestamp(r.get(16)),
        "created": r.get::<_, DateTime<Utc>>(17).timestamp(),
    })
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

/// A look-up's payment `p` was handled by the report's connector: `p` is at its PSP ($3), and
/// its routing names the connector ($4; none: the merchant's own sandbox connector, $5), or the
/// connector is the merchant's own sandbox connector, whose report is the sandbox's whole book
/// of the merchant ([`Db::payments_by_references`]).
const HANDLED: &str = "p.psp = $3 AND ($4 = $5 OR coalesce(p.routing->>'connector_id', $5) = $4)";

impl Db {
    pub async fn connector(&self, id: &str) -> Result<Option<Connector>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(connector_from_row))
    }

    pub async fn connectors_of(&self, merchant: &MerchantId) -> Result<Vec<Connector>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE merchant_id = $1 ORDER BY created_at, id"),
                &[&merchant.as_str()],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(connector_from_row).collect())
    }

    /// Merchants' own enabled sandbox connectors (the scheduled daily run fetches their
    /// reports: the sandbox keeps one book per merchant), at most 10,000.
    pub async fn sandbox_connectors(&self) -> Result<Vec<Connector>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE psp = 'sandbox' AND enabled
                     AND id = 'mca_' || left(encode(sha256(convert_to(merchant_id, 'UTF8')), 'hex'), 24)
                     ORDER BY id LIMIT 10000"
                ),
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(connector_from_row).collect())
    }

    pub async fn create_run(
        &self,
        id: &str,
        connector: &str,
        format: &str,
        source: &str,
        date: Option<NaiveDate>,
        holder: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // The caller runs this connector's one run in this process: a run of the connector that
        // this process left `running` is one whose end could not be recorded (the database did
        // not answer when it finished). It is failed here, not left `running` for good.
        tx.execute(
            "UPDATE reconciliation_runs SET status = 'failed', finished_at = now(),
                 error = 'its end could not be recorded; the lines it applied stay applied, run the report again'
             WHERE connector_id = $1 AND status = 'running' AND holder IS NOT DISTINCT FROM $2",
            &[&connector, &holder],
        )
        .await
        .map_err(pg_error)?;
        tx.execute(
            "INSERT INTO reconciliation_runs (id, connector_id, format, source, report_date, status, holder)
             VALUES ($1, $2, $3, $4, $5, 'running', $6)",
            &[&id, &connector, &format, &source, &date, &holder],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }

    /// Which of `keys` a run already applied for this connector: key → run id.
    pub async fn applied_lines(&self, connector: &str, keys: &[&str]) -> Result<HashMap<String, String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT line_key, run_id FROM settlement_lines WHERE connector_id = $1 AND line_key = ANY($2)",
                &[&connector, &keys],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The merchant's payments at `psp` with these references that `connector` handled, by
    /// reference; and the ids of those a line (of any connector) matched already. A connector
    /// handled the payments its routing names (none: the merchant's own sandbox connector); the
    /// merchant's own sandbox connector, whose report is the sandbox's whole book of the
    /// merchant, all of the merchant's sandbox payments. A payment a report of another
    /// connector matched is a duplicate here, never matched (settled, its fee posted) twice.
    pub async fn payments_by_references(
        &self,
        merchant: &MerchantId,
        psp: &str,
        connector: &str,
        references: &[&str],
    ) -> Result<(HashMap<String, Payment>, HashSet<String>), StoreError> {
        if references.is_empty() {
            return Ok(Default::default());
        }
        let client = self.client().await?;
        let own = crate::domain::ids::sandbox_connector_id(merchant);
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS}, EXISTS (SELECT 1 FROM settlement_lines l WHERE l.payment_id = p.id
                         AND l.kind = 'charge' AND l.outcome = 'matched')
                     FROM payments p
                     WHERE p.id IN (SELECT payment_id FROM payment_psp_references WHERE psp = $3 AND psp_reference = ANY($1))
                       AND p.psp_reference = ANY($1) AND p.merchant_id = $2 AND {HANDLED}"
                ),
                &[&references, &merchant.as_str(), &psp, &connector, &own],
            )
            .await
            .map_err(pg_error)?;
        let (mut out, mut matched) = (HashMap::with_capacity(rows.len()), HashSet::new());
        for r in &rows {
            let p = payment_from_row(r)?;
            if r.get::<_, bool>(r.len() - 1) {
                matched.insert(p.id.to_string());
            }
            if let Some(reference) = p.psp_reference.clone() {
                out.insert(reference, p);
            }
        }
        Ok((out, matched))
    }

    /// The merchant's refunds with these references, of payments `connector` handled at `psp`
    /// (as [`Db::payments_by_references`]), by reference; and the ids of those a line (of any
    /// connector) matched already.
    pub async fn refunds_by_references(
        &self,
        merchant: &MerchantId,
        psp: &str,
        connector: &str,
        references: &[&str],
    ) -> Result<(HashMap<String, RefundFacts>, HashSet<String>), StoreError> {
        if references.is_empty() {
            return Ok(Default::default());
        }
        let client = self.client().await?;
        let own = crate::domain::ids::sandbox_connector_id(merchant);
        let rows = client
            .query(
                &format!(
                    "SELECT r.psp_reference, r.id, r.payment_id, r.amount, r.currency::text, r.status,
                            EXISTS (SELECT 1 FROM settlement_lines l WHERE l.refund_id = r.id AND l.outcome = 'matched')
                     FROM refunds r JOIN payments p ON p.id = r.payment_id
                     WHERE r.psp_reference = ANY($1) AND r.merchant_id = $2 AND {HANDLED}"
                ),
                &[&references, &merchant.as_str(), &psp, &connector, &own],
            )
            .await
            .map_err(pg_error)?;
        let (mut out, mut matched) = (HashMap::with_capacity(rows.len()), HashSet::new());
        for r in &rows {
            let id: String = r.get(1);
            if r.get::<_, bool>(6) {
                matched.insert(id.clone());
            }
            out.insert(
                r.get(0),
                RefundFacts {
                    id,
                    payment_id: r.get(2),
                    amount: r.get(3),
                    currency: r.get(4),
                    status: r.get(5),
                },
            );
        }
        Ok((out, matched))
    }

    /// The merchant's disputes with these references, of payments `connector` handled at `psp`
    /// (as [`Db::payments_by_references`]), by reference.
    pub async fn disputes_by_references(
        &self,
        merchant: &MerchantId,
        psp: &str,
        connector: &str,
        references: &[&str],
    ) -> Result<HashMap<String, DisputeFacts>, StoreError> {
        if references.is_empty() {
            return Ok(HashMap::new());
        }
        let client = self.client().await?;
        let own = crate::domain::ids::sandbox_connector_id(merchant);
        let rows = client
            .query(
                &format!(
                    "SELECT d.psp_reference, d.payment_id, d.amount, d.currency::text, d.status
                     FROM disputes d JOIN payments p ON p.id = d.payment_id
                     WHERE d.psp_reference = ANY($1) AND d.merchant_id = $2 AND {HANDLED}"
                ),
                &[&references, &merchant.as_str(), &psp, &connector, &own],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    DisputeFacts {
                        payment_id: r.get(1),
                        amount: r.get(2),
                        currency: r.get(3),
                        status: r.get(4),
                    },
                )
            })
            .collect())
    }

    /// Fresh planner statistics for `settlement_lines` (a sample: cheap at any size).
    pub async fn analyze_settlement_lines(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.batch_execute("ANALYZE settlement_lines").await.map_err(pg_error)
    }

    /// Dispute lines of this connector already matched, as (kind, reference).
    pub async fn matched_disputes(
        &self,
        connector: &str,
        references: &[&str],
    ) -> Result<Vec<(String, String)>, StoreError> {
        if references.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT kind, reference FROM settlement_lines WHERE reference = ANY($1) AND connector_id = $2
                   AND kind IN ('dispute', 'dispute_reversal') AND outcome = 'matched'",
                &[&references, &connector],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Runs a process left `running` when it stopped are failed.
    /// (Single node: a run belongs to the process that started it.)
    /// Cluster mode: fails the runs still `running` whose process is not among `live` (its node
    /// died, or was restarted as another process).
    pub async fn fail_departed_runs(&self, live: &[String]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE reconciliation_runs SET status = 'failed', finished_at = now(),
                     error = 'the node running it left the cluster; the lines it applied stay applied, run the report again'
                 WHERE status = 'running' AND holder IS NOT NULL AND NOT holder = ANY($1)",
                &[&live],
            )
            .await
            .map_err(pg_error)?;
        Ok(n)
    }

    pub async fn fail_abandoned_runs(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE reconciliation_runs SET status = 'failed', finished_at = now(),
                     error = 'the process running it stopped; the lines it applied stay applied, run the report again'
                 WHERE status = 'running'",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(n)
    }

    /// Writes one chunk: its lines, exceptions and journals, and the balances they move, in
    /// one transaction. `None` when the database refused it because a line of it, or a capture,
    /// refund or dispute it matched, was applied since it was classified (nothing written).
    pub async fn apply_chunk(
        &self,
        connector: &Connector,
        run_id: &str,
        w: &ChunkWrite,
    ) -> Result<Option<ChunkCounts>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Runs of one connector apply one chunk at a time, on any node. A line applied since
        // the chunk was classified, or a capture, refund or dispute another line matched since
        // (whichever chunk or run matched it first), is refused by the database at the lines'
        // INSERT (their primary key, and one matched line per capture, refund and dispute:
        // migration V11): the chunk is then rolled back whole and classified again (`None`).
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&connector.id])
            .await
            .map_err(pg_error)?;
        let merchant = connector.merchant_id.as_str();
        let now = Utc::now();
        // Journals first: lines point at them.
        let journals: Vec<&SettlementJournal> = w.fee_journals.iter().chain(&w.payout_journals).collect();
        let mut written_journals = HashSet::new();
        // Balance deltas, summed and then written in (account, currency) order: two runs'
        // chunks lock the shared accounts' rows in the same order, so they never deadlock.
        let mut deltas: std::collections::BTreeMap<(&str, &str), (i64, i64)> = std::collections::BTreeMap::new();
        for j in &journals {
            if !crate::domain::ledger::is_balanced(&j.entries) {
                tracing::error!(journal = %j.id, "a settlement journal does not balance; refused");
                return Err(StoreError::Broken);
            }
            let inserted = tx
                .execute(
                    "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
                     VALUES ($1, NULL, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[&j.id, &merchant, &j.kind, &j.correlation_id, &j.currency, &now],
                )
                .await
                .map_err(pg_error)?;
            if inserted == 0 {
                continue;
            }
            written_journals.insert(j.id.clone());
            let (mut ids, mut accounts, mut currencies, mut debits, mut credits) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for e in &j.entries {
                ids.push(j.id.as_str());
                accounts.push(e.account.as_str());
                currencies.push(j.currency.as_str());
                debits.push(e.debit);
                credits.push(e.credit);
            }
            tx.execute(
                "INSERT INTO entries (journal_id, account, currency, debit, credit)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])",
                &[&ids, &accounts, &currencies, &debits, &credits],
            )
            .await
            .map_err(pg_error)?;
            for e in &j.entries {
                let d = deltas.entry((e.account.as_str(), j.currency.as_str())).or_default();
                d.0 = d.0.checked_add(e.debit).ok_or(StoreError::Broken)?;
                d.1 = d.1.checked_add(e.credit).ok_or(StoreError::Broken)?;
            }
        }
        if !deltas.is_empty() {
            let accounts: Vec<&str> = deltas.keys().map(|k| k.0).collect();
            let currencies: Vec<&str> = deltas.keys().map(|k| k.1).collect();
            let debits: Vec<i64> = deltas.values().map(|v| v.0).collect();
            let credits: Vec<i64> = deltas.values().map(|v| v.1).collect();
            tx.execute(
                "INSERT INTO ledger_accounts (account, currency, slot, debit_total, credit_total)
                 SELECT a, c, $1, d, k FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[]) AS u(a, c, d, k)
                 ON CONFLICT (account, currency, slot) DO UPDATE SET
                     debit_total = ledger_accounts.debit_total + excluded.debit_total,
                     credit_total = ledger_accounts.credit_total + excluded.credit_total",
                &[&RECONCILIATION_SLOT, &accounts, &currencies, &debits, &credits],
            )
            .await
            .map_err(pg_error)?;
        }
        // The lines, each naming the journal that carried its fee.
        let fee_journal_of = |currency: &str| {
            w.fee_journals
                .iter()
                .find(|j| j.currency == currency && written_journals.contains(&j.id))
                .map(|j| j.id.clone())
        };
        let n = w.lines.len();
        let (mut keys, mut line_nos, mut kinds, mut refs, mut intents) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut amounts, mut fees, mut currencies, mut created, mut payments, mut refunds, mut outcomes, mut jids) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for l in &w.lines {
            keys.push(l.line.key.as_str());
            line_nos.push(l.line.line_no);
            kinds.push(l.kind.as_str());
            refs.push(l.line.reference.as_str());
            intents.push(l.line.intent.as_deref());
            amounts.push(l.line.amount);
            fees.push(l.line.fee);
            currencies.push(l.line.currency.as_str());
            created.push(l.line.created);
            payments.push(l.payment_id.as_deref());
            refunds.push(l.refund_id.as_deref());
            outcomes.push(if l.matched { "matched" } else { "exception" });
            jids.push(match &l.journal_id {
                Some(j) => Some(j.clone()),
                None if l.line.fee != 0 => fee_journal_of(&l.line.currency),
                None => None,
            });
        }
        let lines = tx
            .execute(
                "INSERT INTO settlement_lines (connector_id, line_key, run_id, line_no, kind, reference, intent, amount, fee,
                     currency, created, payment_id, refund_id, outcome, journal_id)
                 SELECT $1, k, $2, n, t, r, i, a, f, c, cr, p, rf, o, j FROM unnest($3::text[], $4::int4[], $5::text[],
                     $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[], $11::timestamptz[], $12::text[],
                     $13::text[], $14::text[], $15::text[]) AS u(k, n, t, r, i, a, f, c, cr, p, rf, o, j)
",
                &[
                    &connector.id,
                    &run_id,
                    &keys,
                    &line_nos,
                    &kinds,
                    &refs,
                    &intents,
                    &amounts,
                    &fees,
                    &currencies,
                    &created,
                    &payments,
                    &refunds,
                    &outcomes,
                    &jids,
                ],
            )
            .await;
        let lines = match lines {
            Ok(n) => n,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                tracing::debug!(connector = %connector.id, error = %e, "a line of the chunk was applied since it was classified");
                return Ok(None);
            }
            Err(e) => return Err(pg_error(e)),
        };
        let exceptions = insert_exceptions(&tx, &connector.id, run_id, &w.exceptions).await?;
        if !w.matched_keys.is_empty() || !w.waiting_over.is_empty() || !w.named.is_empty() {
            tx.execute(
                "UPDATE reconciliation_exceptions SET status = 'resolved', resolved_by = 'reconciliation',
                     resolution = CASE
                         WHEN type = 'missing_in_payrail' THEN 'read with payment_intent_id by run '
                         WHEN type = 'missing_in_report' AND NOT coalesce(reference = ANY($3), false) THEN 'named by run '
                         ELSE 'matched by run ' END || $2,
                     resolved_at = now()
                 WHERE connector_id = $1 AND status = 'open'
                   AND ((type = 'missing_in_report' AND (reference = ANY($3) OR dedupe_key = ANY($6)))
                        OR (type = 'status_mismatch' AND dedupe_key = ANY($4))
                        OR (type = 'missing_in_payrail' AND dedupe_key = ANY($5)))",
                &[
                    &connector.id,
                    &run_id,
                    &w.matched_references,
                    &w.matched_keys,
                    &w.waiting_over,
                    &w.named,
                ],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(ChunkCounts {
            lines: lines as i64,
            exceptions,
        }))
    }

    /// Raises `missing_in_report` for every capture and refund of the connector made in
    /// `[from, to)` that no report line names (a line that names it but does not match has
    /// its own exception already). Returns how many were new.
    pub async fn raise_missing_in_report(
        &self,
        connector: &Connector,
        run_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let client = self.client().await?;
        // A payment is the connector's that authorized it (`routing`; none: the merchant's own
        // sandbox connector). Matching on the PSP alone, each of two connectors of one PSP
        // took the other's captures for missing from its own reports.
        let own = crate::domain::ids::sandbox_connector_id(&connector.merchant_id);
        let captures = client
            .execute(
                "INSERT INTO reconciliation_exceptions (id, connector_id, run_id, type, dedupe_key, reference, payment_id,
                     expected, currency, detail)
                 SELECT 'rex_' || replace(gen_random_uuid()::text, '-', ''), $1, $2, 'missing_in_report', p.id,
                        p.psp_reference, p.id, p.amount_captured, p.currency,
                        'captured ' || to_char(j.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC; in no report'
                 FROM journals j JOIN payments p ON p.id = j.payment_id
                 WHERE j.merchant_id = $3 AND j.created_at >= $4 AND j.created_at < $5 AND j.kind = 'capture'
                   AND p.psp = $6 AND coalesce(p.routing->>'connector_id', $7) = $1
                   AND NOT EXISTS (SELECT 1 FROM settlement_lines l WHERE l.payment_id = p.id AND l.kind = 'charge'
                                   AND l.outcome = 'matched' AND l.connector_id = $1)
                   AND NOT EXISTS (SELECT 1 FROM settlement_lines l WHERE l.payment_id = p.id AND l.kind = 'charge'
                                   AND l.outcome = 'exception' AND l.connector_id = $1)
                 ON CONFLICT (connector_id, type, dedupe_key) DO NOTHING",
                &[&connector.id, &run_id, &connector.merchant_id.as_str(), &from, &to, &connector.psp, &own],
            )
            .await
            .map_err(pg_error)?;
        let refunds = client
            .execute(
                "INSERT INTO reconciliation_exceptions (id, connector_id, run_id, type, dedupe_key, reference, payment_id,
                     refund_id, expected, currency, detail)
                 SELECT 'rex_' || replace(gen_random_uuid()::text, '-', ''), $1, $2, 'missing_in_report', r.id,
                        r.psp_reference, r.payment_id, r.id, r.amount, r.currency,
                        'refunded ' || to_char(j.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC; in no report'
                 FROM journals j JOIN refunds r ON r.id = j.correlation_id JOIN payments p ON p.id = r.payment_id
                 WHERE j.merchant_id = $3 AND j.created_at >= $4 AND j.created_at < $5 AND j.kind = 'refund'
                   AND p.psp = $6 AND coalesce(p.routing->>'connector_id', $7) = $1
                   AND NOT EXISTS (SELECT 1 FROM settlement_lines l WHERE l.refund_id = r.id AND l.outcome = 'matched'
                                   AND l.connector_id = $1)
                   AND NOT EXISTS (SELECT 1 FROM settlement_lines l WHERE l.refund_id = r.id AND l.outcome = 'exception'
                                   AND l.connector_id = $1)
                 ON CONFLICT (connector_id, type, dedupe_key) DO NOTHING",
                &[&connector.id, &run_id, &connector.merchant_id.as_str(), &from, &to, &connector.psp, &own],
            )
            .await
            .map_err(pg_error)?;
        Ok((captures + refunds) as i64)
    }

    /// Raises exceptions outside a chunk (a malformed line, say). Returns how many were new.
    pub async fn raise_exceptions(
        &self,
        connector: &str,
        run_id: &str,
        exceptions: &[NewException],
    ) -> Result<i64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let n = insert_exceptions(&tx, connector, run_id, exceptions).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(n)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn finish_run(
        &self,
        run_id: &str,
        status: &str,
        sha256: Option<&str>,
        lines: i64,
        already: i64,
        matched: i64,
        exceptions: i64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let clamp = |n: i64| n.clamp(0, i64::from(i32::MAX)) as i32;
        client
            .execute(
                "UPDATE reconciliation_runs SET status = $2, file_sha256 = coalesce($3, file_sha256), lines = $4,
                     already_applied = $5, matched = $6, exceptions = $7, error = $8, finished_at = now()
                 WHERE id = $1",
                &[
                    &run_id,
                    &status,
                    &sha256,
                    &clamp(lines),
                    &clamp(already),
                    &clamp(matched),
                    &clamp(exceptions),
                    &error,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    pub async fn run_object(&self, run_id: &str) -> Result<Option<Value>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM reconciliation_runs WHERE id = $1"),
                &[&run_id],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(run_object))
    }

    /// Newest first.
    pub async fn list_runs(
        &self,
        connector: Option<&str>,
        starting_after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<Value>, bool), StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM reconciliation_runs
                     WHERE ($1::text IS NULL OR connector_id = $1)
                       AND ($2::text IS NULL OR (started_at, id) < (SELECT started_at, id FROM reconciliation_runs WHERE id = $2))
                     ORDER BY started_at DESC, id DESC LIMIT $3"
                ),
                &[&connector, &starting_after, &(limit + 1)],
            )
            .await
            .map_err(pg_error)?;
        let more = rows.len() as i64 > limit;
        Ok((rows.iter().take(limit as usize).map(run_object).collect(), more))
    }

    /// Newest first.
    pub async fn list_exceptions(&self, f: &ExceptionFilter) -> Result<(Vec<Value>, bool), StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {EXCEPTION_COLUMNS} FROM reconciliation_exceptions
                     WHERE ($1::text IS NULL OR connector_id = $1) AND ($2::text IS NULL OR type = $2)
                       AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR run_id = $4)
                       AND ($5::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM reconciliation_exceptions WHERE id = $5))
                     ORDER BY created_at DESC, id DESC LIMIT $6"
                ),
                &[
                    &f.connector_id,
                    &f.kind,
                    &f.status,
                    &f.run_id,
                    &f.starting_after,
                    &(f.limit + 1),
                ],
            )
            .await
            .map_err(pg_error)?;
        let more = rows.len() as i64 > f.limit;
        Ok((rows.iter().take(f.limit as usize).map(exception_object).collect(), more))
    }

    /// Resolves an open exception; one already resolved is returned as it stands (the first
    /// resolution is the record). `None`: no such exception.
    pub async fn resolve_exception(&self, id: &str, note: &str, by: &str) -> Result<Option<Value>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE reconciliation_exceptions SET status = 'resolved', resolution = $2, resolved_by = $3,
                     resolved_at = now() WHERE id = $1 AND status = 'open'",
                &[&id, &note, &by],
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(
                &format!("SELECT {EXCEPTION_COLUMNS} FROM reconciliation_exceptions WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(exception_object))
    }

    /// Open exceptions by type, for `/metrics`.
    pub async fn open_exceptions_by_type(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT type, count(*) FROM reconciliation_exceptions WHERE status = 'open' GROUP BY type",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

async fn insert_exceptions(
    tx: &tokio_postgres::Transaction<'_>,
    connector: &str,
    run_id: &str,
    exceptions: &[NewException],
) -> Result<i64, StoreError> {
    if exceptions.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&NewException) -> Option<&str>| exceptions.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<String> = exceptions.iter().map(|_| new_id("rex_")).collect();
    let kinds: Vec<&str> = exceptions.iter().map(|e| e.kind).collect();
    let dedupe = col(|e| Some(e.dedupe_key.as_str()));
    let line_nos: Vec<Option<i32>> = exceptions.iter().map(|e| e.line_no).collect();
    let line_keys = col(|e| e.line_key.as_deref());
    let references = col(|e| e.reference.as_deref());
    let payments = col(|e| e.payment_id.as_deref());
    let refunds = col(|e| e.refund_id.as_deref());
    let expected: Vec<Option<i64>> = exceptions.iter().map(|e| e.expected).collect();
    let reported: Vec<Option<i64>> = exceptions.iter().map(|e| e.reported).collect();
    let currencies = col(|e| e.currency.as_deref());
    let details = col(|e| Some(e.detail.as_str()));
    let inserted = tx
        .execute(
            "INSERT INTO reconciliation_exceptions (id, connector_id, run_id, type, dedupe_key, line_no, line_key, reference,
                 payment_id, refund_id, expected, reported, currency, detail)
             SELECT i, $1, $2, t, d, n, k, r, p, rf, e, rp, c, dt FROM unnest($3::text[], $4::text[], $5::text[],
                 $6::int4[], $7::text[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::int8[], $13::text[],
                 $14::text[]) AS u(i, t, d, n, k, r, p, rf, e, rp, c, dt)
             ON CONFLICT (connector_id, type, dedupe_key) DO NOTHING",
            &[
                &connector,
                &run_id,
                &ids,
                &kinds,
                &dedupe,
                &line_nos,
                &line_keys,
                &references,
                &payments,
                &refunds,
                &expected,
                &reported,
                &currencies,
                &details,
            ],
        )
        .await
        .map_err(pg_error)?;
    Ok(inserted as i64)
}
