//! Reconciliation runs (docs/DESIGN.md, "Reconciliation"): a PSP settlement report against
//! payrail's payments, refunds and disputes.
//!
//! 1. **Check.** The report (spooled to a file, never held in memory) is read through once on a
//!    blocking thread: a file that cannot be read is refused whole, with nothing applied.
//! 2. **Apply**, in chunks of `[reconciliation] chunk_lines`, in file order, read a second time
//!    (a blocking thread parses the next chunk while one is applied). A line whose key
//!    an earlier run applied is skipped (a report given twice changes nothing); the rest are
//!    matched by PSP reference, type, currency and amount. A matched capture is settled first
//!    (through its actor if it is live; otherwise by the same state-machine step in commits
//!    fenced by each payment's version, in batches on the ledger's write path), then the chunk's lines,
//!    exceptions, fee journal and payout journals commit together. A crash between the two
//!    leaves the lines unapplied: the rerun settles again (a no-op) and applies them.
//! 3. **Missing in report.** Captures and refunds made between `lookback_days` and
//!    `window_hours` before the end of the report's day that no line ever matched.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use dashmap::DashMap;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::PaymentError;
use super::ledger_shard::Ledger;
use super::payment::{Op, PaymentCall};
use super::payment_flow::settle_commit_standalone;
use super::registry::PaymentRegistry;
use crate::adapters::postgres::commit::CommitError;
use crate::adapters::postgres::reconciliation::{
    new_id, AppliedLine, ChunkWrite, Connector, NewException, ReportLine, SettlementJournal, BANK, PSP_FEES_EXPENSE,
};
use crate::adapters::postgres::{Db, StoreError};
use crate::adapters::psp::sandbox_settlement::{day_bounds, write_report, Faults, ReportError};
use crate::config::{ReconciliationConfig, SandboxSettlementConfig};
use crate::domain::ledger::{Entry, PSP_CLEARING};
use crate::domain::settlement::{FileError, Format, LineKind, Parsed, ReportReader};
use crate::domain::{Payment, Status};

#[derive(Debug, thiserror::Error)]
pub enum ReconError {
    #[error("a run for this connector is in progress")]
    Busy,
    /// The report could not be read: nothing of it was applied.
    #[error("{reason}")]
    Refused { run_id: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a payment could not be settled: {0}")]
    Settle(#[from] PaymentError),
    #[error("a payment could not be settled: {0}")]
    Commit(CommitError),
    #[error("the report file could not be written or read: {0}")]
    Io(String),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// A file removed when dropped: reports are spooled to disk, never kept.
pub struct Spooled(pub PathBuf);

impl Spooled {
    pub fn new() -> Spooled {
        Spooled(std::env::temp_dir().join(format!("payrail-report-{}.csv", uuid::Uuid::new_v4().simple())))
    }
}

impl Default for Spooled {
    fn default() -> Self {
        Spooled::new()
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a run reconciles.
pub struct RunRequest {
    pub connector: Connector,
    pub format: Format,
    /// `upload`, `sandbox` or `schedule`.
    pub source: &'static str,
    /// The report's day; without it, the day of its latest line.
    pub date: Option<NaiveDate>,
    pub file: Spooled,
}

pub struct Reconciler {
    db: Db,
    registry: Arc<PaymentRegistry>,
    ledger: Arc<Ledger>,
    config: ReconciliationConfig,
    fees: SandboxSettlementConfig,
    metrics: Arc<crate::metrics::Metrics>,
    /// Connectors with a run under way on this node.
    busy: DashMap<String, ()>,
}

/// Releases a connector's run slot however the run ends.
struct Busy<'a>(&'a DashMap<String, ()>, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// Reads a file and hashes what it read.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A chunk classified and settled, waiting for its commit.
struct Prepared {
    chunk_no: u32,
    page: Vec<ReportLine>,
    write: ChunkWrite,
    already: i64,
}

#[derive(Debug, Default)]
struct Totals {
    lines: i64,
    already: i64,
    matched: i64,
    exceptions: i64,
    latest: Option<DateTime<Utc>>,
}

impl Reconciler {
    pub fn new(
        db: Db,
        registry: Arc<PaymentRegistry>,
        ledger: Arc<Ledger>,
        config: ReconciliationConfig,
        fees: SandboxSettlementConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Reconciler {
        Reconciler {
            db,
            registry,
            ledger,
            config,
            fees,
            metrics,
            busy: DashMap::new(),
        }
    }

    pub fn config(&self) -> &ReconciliationConfig {
        &self.config
    }

    /// Writes the sandbox's report of `connector`'s day into a spooled file.
    pub async fn sandbox_report(
        &self,
        connector: &Connector,
        date: NaiveDate,
        format: Format,
        faults: Faults,
    ) -> Result<Spooled, ReconError> {
        let spooled = Spooled::new();
        let file = std::fs::File::create(&spooled.0).map_err(|e| ReconError::Io(e.to_string()))?;
        let out = std::io::BufWriter::new(file);
        let (out, _) = write_report(
            &self.db,
            connector.merchant_id.as_str(),
            date,
            format,
            faults,
            &self.fees,
            out,
        )
        .await?;
        out.into_inner()
            .map_err(|e| ReconError::Io(e.to_string()))?
            .sync_all()
            .map_err(|e| ReconError::Io(e.to_string()))?;
        Ok(spooled)
    }

    /// Runs one report; returns the run object.
    pub async fn run(&self, req: RunRequest) -> Result<Value, ReconError> {
        if self.busy.insert(req.connector.id.clone(), ()).is_some() {
            return Err(ReconError::Busy);
        }
        let _busy = Busy(&self.busy, req.connector.id.clone());
        let run_id = new_id("rcn_");
        self.db
            .create_run(
                &run_id,
                &req.connector.id,
                req.format.as_str(),
                req.source,
                req.date,
                self.registry.holder().as_deref(),
            )
            .await?;
        let result = self.run_inner(&run_id, &req).await;
        match result {
            Ok((sha, totals)) => {
                self.finish(&run_id, Ok((&sha, &totals))).await?;
                self.metrics
                    .reconciliation_run(&req.connector.psp, totals.matched, totals.exceptions);
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(run_id, connector = %req.connector.id, error = %reason, "reconciliation run failed");
                self.finish(&run_id, Err(&reason)).await?;
                if let ReconError::Refused { .. } = e {
                    return Err(ReconError::Refused { run_id, reason });
                }
                return Err(e);
            }
        }
        self.refresh_metrics().await;
        Ok(self.db.run_object(&run_id).await?.unwrap_or(Value::Null))
    }

    /// Records how a run ended, asking again a few times (1.3 s of pauses in all) when the database
    /// does not answer. A run whose end still could not be recorded stays `running` until the
    /// connector's next run in this process fails it, or this process's next start does.
    /// `outcome` is the file's SHA-256 and the run's counts, or why it failed (its counts 0).
    async fn finish(&self, run_id: &str, outcome: Result<(&str, &Totals), &str>) -> Result<(), ReconError> {
        let (status, sha, t, error) = match outcome {
            Ok((sha, t)) => (
                "succeeded",
                Some(sha),
                [t.lines, t.already, t.matched, t.exceptions],
                None,
            ),
            Err(reason) => ("failed", None, [0; 4], Some(reason)),
        };
        let [lines, already, matched, exceptions] = t;
        let mut pause = std::time::Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let Err(e) = self
                .db
                .finish_run(run_id, status, sha, lines, already, matched, exceptions, error)
                .await
            else {
                return Ok(());
            };
            if attempt == FINISH_ATTEMPTS {
                tracing::error!(run_id, status, error = %e, "a reconciliation run's end could not be recorded");
                return Err(e.into());
            }
            tracing::warn!(run_id, attempt, error = %e, "recording a reconciliation run's end; asking again");
            tokio::time::sleep(pause).await;
            pause *= 3;
            attempt += 1;
        }
    }

    /// A committed settle's status change, in `/metrics` as the actor's own commits count it.
    fn count_transition(&self, t: Option<&crate::adapters::postgres::commit::Transition>) {
        if let Some(t) = t {
            self.metrics
                .transition(t.from.map(Status::as_str).unwrap_or("none"), t.to.as_str());
        }
    }

    /// Open exceptions by type into `/metrics`.
    pub async fn refresh_metrics(&self) {
        if let Ok(open) = self.db.open_exceptions_by_type().await {
            self.metrics.reconciliation_open(&open);
        }
    }

    async fn run_inner(&self, run_id: &str, req: &RunRequest) -> Result<(String, Totals), ReconError> {
        let checking = std::time::Instant::now();
        let sha = self.check(run_id, req.format, &req.file.0).await?;
        tracing::debug!(
            run_id,
            check_ms = checking.elapsed().as_millis() as u64,
            "report read through"
        );
        let mut totals = Totals::default();
        let mut chunk_no = 0u32;
        let chunk = self.config.chunk_lines.clamp(1, 100_000);
        // The second reading: chunks of lines, parsed on a blocking thread while the previous
        // chunk is applied. The queue holds two chunks at most.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<ReportLine>>(2);
        let (path, format) = (req.file.0.clone(), req.format);
        let parser = tokio::task::spawn_blocking(move || -> Result<(), FileError> {
            let Ok(file) = std::fs::File::open(&path) else {
                return Err(FileError::Empty);
            };
            let mut reader = ReportReader::new(format, std::io::BufReader::with_capacity(1 << 16, file))?;
            let mut page = Vec::with_capacity(chunk);
            while let Some(item) = reader.next_line() {
                page.push(to_line(item?, Utc::now())?);
                if page.len() == chunk
                    && tx
                        .blocking_send(std::mem::replace(&mut page, Vec::with_capacity(chunk)))
                        .is_err()
                {
                    return Ok(());
                }
            }
            if !page.is_empty() {
                let _ = tx.blocking_send(page);
            }
            Ok(())
        });
        // Chunk N commits while chunk N + 1 is classified and settled: the two use PostgreSQL
        // differently (one connection writing lines; reads, then several connections settling),
        // so together they keep both of its cores busy. A line or capture of chunk N + 1 that
        // chunk N applies meanwhile makes the database refuse chunk N + 1's commit, which then
        // prepares it again (`commit_chunk`).
        let mut waiting: Option<Prepared> = None;
        while let Some(page) = rx.recv().await {
            chunk_no += 1;
            totals.lines += page.len() as i64;
            if chunk_no.is_power_of_two() && chunk_no >= 4 {
                // A large report grows settlement_lines faster than autovacuum re-reads it: the
                // key lookups must keep using their indexes.
                self.db.analyze_settlement_lines().await?;
            }
            let prepare = self.prepare(run_id, &sha, chunk_no, &req.connector, &page);
            let (prepared, committed) = match waiting.take() {
                Some(before) => {
                    let commit = self.commit_chunk(run_id, &sha, &req.connector, before, &mut totals);
                    futures_util::future::join(prepare, commit).await
                }
                None => (prepare.await, Ok(())),
            };
            committed?;
            let (write, already) = prepared?;
            waiting = Some(Prepared {
                chunk_no,
                page,
                write,
                already,
            });
        }
        if let Some(last) = waiting {
            self.commit_chunk(run_id, &sha, &req.connector, last, &mut totals)
                .await?;
        }
        match parser.await {
            Ok(Ok(())) => {}
            // The file was read whole once already: it changed under the run.
            Ok(Err(e)) => {
                return Err(ReconError::Io(format!(
                    "the spooled report changed while it was applied: {e}"
                )))
            }
            Err(e) => return Err(ReconError::Io(e.to_string())),
        }
        let date = req.date.or(totals.latest.map(|t| t.date_naive()));
        if let Some(date) = date {
            let (_, end) = day_bounds(date);
            let cutoff = end - chrono::Duration::hours(self.config.window_hours as i64);
            let from = cutoff - chrono::Duration::days(self.config.lookback_days.max(1) as i64);
            totals.exceptions += self
                .db
                .raise_missing_in_report(&req.connector, run_id, from, cutoff)
                .await?;
        }
        Ok((sha, totals))
    }

    /// The first reading: the whole file, on a blocking thread, before anything is applied. A
    /// file the reader cannot follow is refused here, with nothing applied. Returns the file's
    /// SHA-256.
    async fn check(&self, run_id: &str, format: Format, path: &Path) -> Result<String, ReconError> {
        let path = path.to_owned();
        let checked = tokio::task::spawn_blocking(move || -> Result<Result<String, FileError>, String> {
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let input = Hashing {
                inner: std::io::BufReader::with_capacity(1 << 16, file),
                hash: Sha256::new(),
            };
            let mut reader = match ReportReader::new(format, input) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            while let Some(item) = reader.next_line() {
                if let Err(e) = item.and_then(|p| to_line(p, Utc::now())) {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(hex::encode(reader.into_inner().hash.finalize())))
        })
        .await
        .map_err(|e| ReconError::Io(e.to_string()))?
        .map_err(ReconError::Io)?;
        checked.map_err(|e| ReconError::Refused {
            run_id: run_id.to_owned(),
            reason: format!("the report was refused, nothing was applied: {e}"),
        })
    }

    /// Classifies a chunk and settles what it matched: everything but the chunk's own commit.
    async fn prepare(
        &self,
        run_id: &str,
        sha: &str,
        chunk_no: u32,
        connector: &Connector,
        page: &[ReportLine],
    ) -> Result<(ChunkWrite, i64), ReconError> {
        let t0 = std::time::Instant::now();
        let (write, settle, already) = self.classify(run_id, sha, chunk_no, connector, page).await?;
        let t1 = std::time::Instant::now();
        self.settle(connector, settle).await?;
        tracing::debug!(
            chunk_no,
            classify_ms = (t1 - t0).as_millis() as u64,
            settle_ms = t1.elapsed().as_millis() as u64,
            "reconciliation chunk prepared"
        );
        Ok((write, already))
    }

    /// Commits a prepared chunk. The database refuses it if a line of it, or a capture, refund
    /// or dispute it matched, was applied since it was classified (by another run, on this node
    /// or another): it is then prepared again.
    async fn commit_chunk(
        &self,
        run_id: &str,
        sha: &str,
        connector: &Connector,
        chunk: Prepared,
        totals: &mut Totals,
    ) -> Result<(), ReconError> {
        let Prepared {
            chunk_no,
            page,
            mut write,
            mut already,
        } = chunk;
        for attempt in 0..4 {
            if attempt > 0 {
                (write, already) = self.prepare(run_id, sha, chunk_no, connector, &page).await?;
            }
            let t0 = std::time::Instant::now();
            let applied = self.db.apply_chunk(connector, run_id, &write).await?;
            tracing::debug!(
                chunk_no,
                attempt,
                apply_ms = t0.elapsed().as_millis() as u64,
                "reconciliation chunk"
            );
            if let Some(counts) = applied {
                totals.already += already;
                totals.exceptions += counts.exceptions;
                let matched = write.lines.iter().filter(|l| l.matched).count() as i64;
                totals.matched += matched;
                // The report's day counts every line it holds, those an earlier run applied
                // included: a report run again (after a failure past its chunks, say) has the
                // same day, and raises what is missing from it.
                totals.latest = totals.latest.max(write.already_latest);
                for l in &write.lines {
                    totals.latest = totals.latest.max(Some(l.line.created));
                }
                return Ok(());
            }
        }
        // Another run kept applying the same lines.
        Err(ReconError::Busy)
    }

    /// Decides every line of a chunk: skipped, matched, or an exception.
    async fn classify(
        &self,
        run_id: &str,
        sha: &str,
        chunk_no: u32,
        connector: &Connector,
        page: &[ReportLine],
    ) -> Result<(ChunkWrite, Vec<Payment>, i64), ReconError> {
        // Every look-up at once, each on its own connection: the lines already applied, and the
        // payments, refunds and disputes the chunk's lines name, with whether a line of this
        // connector matched them already. (A line applied before is looked up for nothing.)
        let keys: Vec<&str> = page.iter().map(|l| l.key.as_str()).collect();
        let refs = |kinds: &[LineKind]| -> Vec<&str> {
            page.iter()
                .filter(|l| l.malformed.is_none())
                .filter(|l| kinds.contains(&LineKind::parse(&l.kind).unwrap_or(LineKind::Other)))
                .map(|l| l.reference.as_str())
                .collect()
        };
        let (charges, refund_refs, dispute_refs) = (
            refs(&[LineKind::Charge]),
            refs(&[LineKind::Refund]),
            refs(&[LineKind::Dispute, LineKind::DisputeReversal]),
        );
        let merchant = &connector.merchant_id;
        let (applied, (payments, mut matched_payments), (refunds, mut matched_refunds), disputes, matched_disputes) = tokio::try_join!(
            self.db.applied_lines(&connector.id, &keys),
            self.db
                .payments_by_references(merchant, &connector.psp, &connector.id, &charges),
            self.db
                .refunds_by_references(merchant, &connector.psp, &connector.id, &refund_refs),
            self.db
                .disputes_by_references(merchant, &connector.psp, &connector.id, &dispute_refs),
            self.db.matched_disputes(&connector.id, &dispute_refs),
        )?;
        let mut matched_disputes: HashSet<(LineKind, String)> = matched_disputes
            .into_iter()
            .filter_map(|(kind, reference)| Some((LineKind::parse(&kind)?, reference)))
            .collect();
        let mut w = ChunkWrite::default();
        let mut already = 0;
        let mut seen: HashSet<&str> = HashSet::new();
        let mut fresh: Vec<(&ReportLine, LineKind)> = Vec::new();
        for l in page {
            if let Some(reason) = &l.malformed {
                w.exceptions.push(exception(
                    "malformed_line",
                    format!("{sha}:{}", l.line_no),
                    l,
                    format!("line {}: {reason}", l.line_no),
                ));
                continue;
            }
            match applied.get(&l.key) {
                Some(r) if r != run_id => {
                    already += 1;
                    w.already_latest = w.already_latest.max(Some(l.created));
                    continue;
                }
                Some(_) => {}
                None if seen.insert(l.key.as_str()) => {
                    fresh.push((l, LineKind::parse(&l.kind).unwrap_or(LineKind::Other)));
                    continue;
                }
                None => {}
            }
            w.exceptions.push(exception(
                "duplicate_in_report",
                format!("{}:{}", l.key, l.line_no),
                l,
                format!("line {}: {} appears more than once in the report", l.line_no, l.key),
            ));
        }
        let mut settle = Vec::new();
        // Summed wide: a chunk's lines may not overflow it; the sum must fit a journal's amount.
        let mut fees: BTreeMap<String, i128> = BTreeMap::new();
        for (l, kind) in fresh {
            if kind == LineKind::Charge && !l.charge_only {
                // The report names this charge as payrail can find it: a wait for the column
                // raised by an earlier run is over, whatever the line finds now.
                w.waiting_over.push(waiting_key(&l.key));
            }
            let mut applied = AppliedLine {
                line: l.clone(),
                kind,
                payment_id: None,
                refund_id: None,
                matched: false,
                journal_id: None,
            };
            let problem: Option<(&'static str, String, Option<i64>)> = match kind {
                LineKind::Charge => match payments.get(&l.reference) {
                    None => Some(("missing_in_payrail", no_payment(l.charge_only), None)),
                    Some(p) => {
                        applied.payment_id = Some(p.id.to_string());
                        let captured = p.state.captured;
                        if !p.currency.code().eq_ignore_ascii_case(&l.currency) {
                            Some((
                                "currency_mismatch",
                                format!("the payment is in {}", p.currency.code()),
                                None,
                            ))
                        } else if captured == 0
                            || matches!(
                                p.status(),
                                Status::Pending
                                    | Status::RequiresAction
                                    | Status::Authorized
                                    | Status::InReview
                                    | Status::Failed
                                    | Status::Canceled
                            )
                        {
                            Some((
                                "status_mismatch",
                                format!("the report has a charge; the payment is {}", p.status().as_str()),
                                Some(captured),
                            ))
                        } else if l.amount != captured {
                            Some((
                                "amount_mismatch",
                                format!("payrail captured {captured}"),
                                Some(captured),
                            ))
                        } else if !matched_payments.insert(p.id.to_string()) {
                            Some((
                                "duplicate_in_report",
                                "another line already settled this capture".into(),
                                Some(captured),
                            ))
                        } else {
                            if !p.state.settled {
                                settle.push(l.reference.as_str());
                            }
                            None
                        }
                    }
                },
                LineKind::Refund => match refunds.get(&l.reference) {
                    None => Some(("missing_in_payrail", "no refund has this reference".into(), None)),
                    Some(r) => {
                        applied.payment_id = Some(r.payment_id.clone());
                        applied.refund_id = Some(r.id.clone());
                        if !r.currency.eq_ignore_ascii_case(&l.currency) {
                            Some(("currency_mismatch", format!("the refund is in {}", r.currency), None))
                        } else if r.status != "succeeded" {
                            Some((
                                "status_mismatch",
                                format!("the report has a refund; payrail's is {}", r.status),
                                Some(-r.amount),
                            ))
                        } else if l.amount != -r.amount {
                            Some((
                                "amount_mismatch",
                                format!("payrail refunded {}", r.amount),
                                Some(-r.amount),
                            ))
                        } else if !matched_refunds.insert(r.id.clone()) {
                            Some((
                                "duplicate_in_report",
                                "another line already matched this refund".into(),
                                Some(-r.amount),
                            ))
                        } else {
                            None
                        }
                    }
                },
                LineKind::Dispute | LineKind::DisputeReversal => match disputes.get(&l.reference) {
                    None => Some(("missing_in_payrail", "no dispute has this reference".into(), None)),
                    Some(_) if !matched_disputes.insert((kind, l.reference.clone())) => Some((
                        "duplicate_in_report",
                        "another line already matched this dispute".into(),
                        None,
                    )),
                    Some(d) => {
                        applied.payment_id = Some(d.payment_id.clone());
                        let expected = if kind == LineKind::Dispute { -d.amount } else { d.amount };
                        if !d.currency.eq_ignore_ascii_case(&l.currency) {
                            Some(("currency_mismatch", format!("the dispute is in {}", d.currency), None))
                        } else if kind == LineKind::DisputeReversal && d.status != "won" {
                            Some((
                                "status_mismatch",
                                format!("the report reverses a dispute payrail has as {}", d.status),
                                Some(expected),
                            ))
                        } else if l.amount != expected {
                            Some((
                                "amount_mismatch",
                                format!("payrail's dispute is {}", d.amount),
                                Some(expected),
                            ))
                        } else {
                            None
                        }
                    }
                },
                LineKind::Payout => {
                    // The PSP paid its balance out to the bank (a negative line), or a payout
                    // came back (positive).
                    let amount = l.amount.checked_abs().unwrap_or(0);
                    if amount > 0 {
                        let (bank, clearing) = if l.amount < 0 {
                            (Entry::debit(BANK, amount), Entry::credit(PSP_CLEARING, amount))
                        } else {
                            (Entry::credit(BANK, amount), Entry::debit(PSP_CLEARING, amount))
                        };
                        let id = new_id("jr_");
                        applied.journal_id = Some(id.clone());
                        w.payout_journals.push(SettlementJournal {
                            id,
                            kind: "psp_payout",
                            correlation_id: format!("{}:{}", connector.id, l.key),
                            currency: l.currency.clone(),
                            entries: vec![bank, clearing],
                        });
                    }
                    None
                }
                LineKind::Other => Some((
                    "unsupported_line",
                    if l.fee == 0 {
                        "payrail does not reconcile this type of line; nothing of it was posted".into()
                    } else {
                        "payrail does not reconcile this type of line; the fee the PSP kept on it was posted".into()
                    },
                    None,
                )),
            };
            match problem {
                None => {
                    applied.matched = true;
                    if !l.reference.is_empty() {
                        w.matched_references.push(l.reference.clone());
                    }
                    w.matched_keys.push(l.key.clone());
                }
                Some((problem_kind, detail, expected)) => {
                    // A charge waiting for the column has an exception of its own, which the
                    // line's evaluation with the column ends (the line may then raise another).
                    let waiting = problem_kind == "missing_in_payrail" && l.charge_only;
                    let dedupe = if waiting { waiting_key(&l.key) } else { l.key.clone() };
                    let mut e = exception(problem_kind, dedupe, l, format!("line {}: {detail}", l.line_no));
                    e.payment_id = applied.payment_id.clone();
                    e.refund_id = applied.refund_id.clone();
                    e.expected = expected;
                    w.exceptions.push(e);
                    if problem_kind == "status_mismatch" || waiting {
                        // Left unapplied (its fee too), for the next run of a report that holds
                        // the line: payrail may not have heard yet (a capture or refund whose
                        // PSP event is on its way), or the report named the charge, not its
                        // PaymentIntent, and comes again with its payment_intent_id column.
                        continue;
                    }
                }
            }
            // The PSP kept its fee whether or not the line matched: every applied line's fee
            // is posted (a status-mismatched line's waits with the line).
            *fees.entry(l.currency.clone()).or_default() += i128::from(l.fee);
            // An applied line that names a capture or refund ends its `missing_in_report`, as
            // it keeps one from being raised.
            match (kind, &applied.payment_id, &applied.refund_id) {
                (LineKind::Charge, Some(id), _) | (LineKind::Refund, _, Some(id)) => w.named.push(id.clone()),
                _ => {}
            }
            w.lines.push(applied);
        }
        // A line given twice names what its first copy matched.
        let by_key: std::collections::HashMap<&str, &AppliedLine> =
            w.lines.iter().map(|l| (l.line.key.as_str(), l)).collect();
        let first_copies: Vec<(usize, Option<String>, Option<String>)> = w
            .exceptions
            .iter()
            .enumerate()
            .filter(|(_, e)| e.payment_id.is_none())
            .filter_map(|(i, e)| {
                let first = by_key.get(e.line_key.as_deref()?)?;
                Some((i, first.payment_id.clone(), first.refund_id.clone()))
            })
            .collect();
        drop(by_key);
        for (i, payment, refund) in first_copies {
            w.exceptions[i].payment_id = payment;
            w.exceptions[i].refund_id = refund;
        }
        for (currency, fee) in fees.into_iter().filter(|(_, f)| *f != 0) {
            // A journal's amount is a positive i64; fees beyond it are no report's.
            let amount = i64::try_from(fee.unsigned_abs()).map_err(|_| ReconError::Refused {
                run_id: run_id.to_owned(),
                reason: format!("the fees of a chunk's {currency} lines add up beyond what an amount may be"),
            })?;
            let entries = if fee > 0 {
                vec![
                    Entry::debit(PSP_FEES_EXPENSE, amount),
                    Entry::credit(PSP_CLEARING, amount),
                ]
            } else {
                vec![
                    Entry::debit(PSP_CLEARING, amount),
                    Entry::credit(PSP_FEES_EXPENSE, amount),
                ]
            };
            w.fee_journals.push(SettlementJournal {
                id: new_id("jr_"),
                kind: "psp_fee",
                correlation_id: format!("{run_id}:{chunk_no}:{currency}"),
                currency,
                entries,
            });
        }
        // The payments to settle, moved out of the look-up (not copied: a chunk's payments are
        // most of its memory).
        let mut payments = payments;
        let settle = settle.into_iter().filter_map(|r| payments.remove(r)).collect();
        Ok((w, settle, already))
    }

    /// Settles matched captures before their lines are recorded. A payment with a live actor
    /// is asked through it. The others are settled by the same state-machine step in commits
    /// fenced by each payment's version, written in [`SETTLE_BATCHES_IN_FLIGHT`] batches of at
    /// most [`SETTLE_BATCH`] (one transaction each, the ledger shards' write path); a batch refused because one payment
    /// moved meanwhile (its actor woke up) goes one payment at a time through the shards, and a
    /// stale one through its actor.
    async fn settle(&self, connector: &Connector, payments: Vec<Payment>) -> Result<(), ReconError> {
        let now = Utc::now();
        let (live, idle): (Vec<Payment>, Vec<Payment>) = payments
            .into_iter()
            .partition(|p| self.registry.live_mailbox(&p.id).is_some());
        let slot = crate::actors::ledger_shard::shard_of(connector.merchant_id.as_str(), self.ledger.shards()) as i16;
        // Batches go to PostgreSQL a few at a time: each is one transaction on its own
        // connection, so they use the database's cores together. As many batches as go at once,
        // each no larger than SETTLE_BATCH: none is left to run alone at the end.
        let size = idle.len().div_ceil(SETTLE_BATCHES_IN_FLIGHT).clamp(1, SETTLE_BATCH);
        let outcomes: Vec<Result<Vec<Payment>, ReconError>> =
            futures_util::stream::iter(idle.chunks(size).map(|batch| async move {
                let commits: Vec<crate::adapters::postgres::commit::Commit> =
                    batch.iter().filter_map(|p| settle_commit_standalone(p, now)).collect();
                if commits.is_empty() {
                    return Ok(Vec::new());
                }
                let refs: Vec<&crate::adapters::postgres::commit::Commit> = commits.iter().collect();
                match self.db.commit_batch(&refs, slot).await {
                    Ok(()) => {
                        refs.iter().for_each(|c| self.count_transition(c.transition.as_ref()));
                        Ok(Vec::new())
                    }
                    Err(CommitError::Stale) => Ok(batch.to_vec()),
                    Err(e) => Err(ReconError::Commit(e)),
                }
            }))
            .buffer_unordered(SETTLE_BATCHES_IN_FLIGHT)
            .collect()
            .await;
        let mut one_by_one = live;
        for o in outcomes {
            one_by_one.extend(o?);
        }
        let merchant = &connector.merchant_id;
        futures_util::stream::iter(one_by_one.into_iter().map(|p| async move {
            if self.registry.live_mailbox(&p.id).is_none() {
                let Some(commit) = settle_commit_standalone(&p, now) else {
                    return Ok(());
                };
                let transition = commit.transition.clone();
                match self.ledger.commit(commit).await {
                    Ok(()) => {
                        self.count_transition(transition.as_ref());
                        return Ok(());
                    }
                    // Its actor woke up and wrote first: ask it.
                    Err(CommitError::Stale) => {}
                    Err(e) => return Err(ReconError::Commit(e)),
                }
            }
            self.registry
                .call(&p.id, PaymentCall::new(merchant.clone(), Op::Settle, None))
                .await
                .map(|_| ())
                .map_err(ReconError::Settle)
        }))
        .buffer_unordered(self.config.settle_concurrency.clamp(1, 4096))
        .try_collect::<()>()
        .await
    }
}

/// Times a run's end is asked to be recorded (pauses of 0.1, 0.3 and 0.9 s between).
const FINISH_ATTEMPTS: u32 = 4;

/// Payments settled in one transaction when none of them has a live actor.
const SETTLE_BATCH: usize = 2000;
/// Such transactions at once.
const SETTLE_BATCHES_IN_FLIGHT: usize = 4;

/// The `missing_in_payrail` of a charge line waiting for the `payment_intent_id` column has a
/// key of its own: the line's evaluation with the column ends it, and may raise the plain one.
fn waiting_key(line_key: &str) -> String {
    format!("{line_key}:charge_only")
}

/// Why a charge line found no payment. Stripe names a charge by its `ch_…` (or `py_…`) where
/// payrail keeps the PaymentIntent's `pi_…`: a report without `payment_intent_id` cannot match.
fn no_payment(charge_only: bool) -> String {
    if charge_only {
        "no payment has this reference: it names a Stripe charge, and payrail knows the PaymentIntent \
         (pi_…); the line was not applied: give the report again with its payment_intent_id column"
            .into()
    } else {
        "no payment has this reference".into()
    }
}

fn exception(kind: &'static str, dedupe_key: String, l: &ReportLine, detail: String) -> NewException {
    NewException {
        kind,
        dedupe_key,
        line_no: Some(l.line_no),
        line_key: (!l.key.starts_with("line:")).then(|| l.key.clone()),
        reference: (!l.reference.is_empty()).then(|| l.reference.clone()),
        payment_id: None,
        refund_id: None,
        expected: None,
        reported: l.malformed.is_none().then_some(l.amount),
        currency: (l.currency.len() == 3).then(|| l.currency.to_ascii_uppercase()),
        detail,
    }
}

fn to_line(p: Parsed, now: DateTime<Utc>) -> Result<ReportLine, FileError> {
    let line_no = |n: u64| {
        i32::try_from(n).map_err(|_| FileError::Structure {
            line: n,
            reason: "more lines than a report may have".into(),
        })
    };
    Ok(match p {
        Parsed::Line(l) => ReportLine {
            line_no: line_no(l.line_no)?,
            key: l.key,
            kind: l.kind.as_str().to_owned(),
            reference: l.reference,
            intent: l.intent,
            amount: l.amount,
            fee: l.fee,
            currency: l.currency.code().to_owned(),
            created: l.created,
            malformed: None,
            charge_only: l.charge_only,
        },
        Parsed::Malformed {
            line_no: n,
            key,
            reason,
        } => ReportLine {
            line_no: line_no(n)?,
            key: key.unwrap_or_else(|| format!("line:{n}")),
            kind: LineKind::Other.as_str().to_owned(),
            reference: String::new(),
            intent: None,
            amount: 0,
            fee: 0,
            currency: String::new(),
            created: now,
            malformed: Some(reason),
            charge_only: false,
        },
    })
}

/// The scheduled daily run: at `[reconciliation] daily_at_utc`, every enabled sandbox
/// connector's report of the day before. Other PSPs' reports are uploaded (`payrail
/// reconcile`) until their connectors can fetch them.
pub async fn daily(reconciler: Arc<Reconciler>, shutdown: crate::shutdown::Shutdown) {
    let Some((h, m)) = parse_hhmm(&reconciler.config.daily_at_utc) else {
        return;
    };
    loop {
        let now = Utc::now();
        let today = now.date_naive().and_hms_opt(h, m, 0).unwrap_or_default().and_utc();
        let next = if today > now {
            today
        } else {
            today + chrono::Duration::days(1)
        };
        let wait = (next - now).to_std().unwrap_or_default();
        if shutdown.sleep(wait).await {
            return;
        }
        let _running = shutdown.enter();
        let date = next.date_naive() - chrono::Duration::days(1);
        let connectors = match reconciler.db.sandbox_connectors().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled reconciliation: connectors unavailable");
                continue;
            }
        };
        // The sandbox keeps one book per merchant: its own sandbox connector reconciles it.
        let own = connectors
            .into_iter()
            .filter(|c| c.id == crate::domain::ids::sandbox_connector_id(&c.merchant_id));
        for connector in own {
            let result = async {
                let file = reconciler
                    .sandbox_report(&connector, date, Format::Stripe, Faults::default())
                    .await?;
                reconciler
                    .run(RunRequest {
                        connector: connector.clone(),
                        format: Format::Stripe,
                        source: "schedule",
                        date: Some(date),
                        file,
                    })
                    .await
            }
            .await;
            match result {
                Ok(run) => {
                    tracing::info!(connector = %connector.id, %date, run = %run["id"], "scheduled reconciliation done")
                }
                Err(e) => {
                    tracing::warn!(connector = %connector.id, %date, error = %e, "scheduled reconciliation failed")
                }
            }
        }
    }
}

fn parse_hhmm(s: &str) -> Option<(u32, u32)> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some((h, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_times_parse() {
        assert_eq!(parse_hhmm("02:30"), Some((2, 30)));
        assert_eq!(parse_hhmm(""), None);
        assert_eq!(parse_hhmm("24:00"), None);
        assert_eq!(parse_hhmm("2:61"), None);
    }
}
