//! Connectors, settlement reports and reconciliation (docs/API.md, "Reconciliation").

use std::io::Write;

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::NaiveDate;
use futures_util::StreamExt;

use super::body::{self, Fields};
use super::payments::{int_param, query};
use super::{auth, json_value, AppState};
use crate::actors::reconciler::{ReconError, RunRequest, Spooled};
use crate::adapters::postgres::reconciliation::{Connector, ExceptionFilter};
use crate::adapters::psp::sandbox_settlement::{write_report, Faults, ReportError};
use crate::api::error::ApiError;
use crate::domain::record::list_object;
use crate::domain::settlement::{Format, EXCEPTION_TYPES};
use crate::domain::MerchantId;

impl From<ReconError> for ApiError {
    fn from(e: ReconError) -> ApiError {
        match e {
            ReconError::Busy => ApiError::Conflict {
                code: "reconciliation_in_progress",
                message: "a run for this connector is in progress; try again when it ends",
            },
            ReconError::Refused { run_id, reason } => {
                ApiError::invalid("report_malformed", format!("{reason} (run {run_id})"), None)
            }
            ReconError::Store(e) => e.into(),
            ReconError::Settle(e) => e.into(),
            ReconError::Commit(crate::adapters::postgres::commit::CommitError::Store(e)) => e.into(),
            ReconError::Commit(_) => ApiError::Unavailable("the ledger"),
            ReconError::Report(ReportError::Faults(m)) => ApiError::param("faults", m),
            ReconError::Report(ReportError::Store(e)) => e.into(),
            ReconError::Report(ReportError::Write(_)) | ReconError::Io(_) => ApiError::Internal,
        }
    }
}

fn date_param(s: &str, param: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|d| (2000..=9999).contains(&chrono::Datelike::year(d)))
        .ok_or_else(|| ApiError::param(param, format!("{param} must be a date, YYYY-MM-DD")))
}

fn format_param(s: Option<&str>, connector: &Connector) -> Result<Format, ApiError> {
    match s {
        Some(f) => Format::parse(f).ok_or_else(|| ApiError::param("format", "format must be stripe or adyen")),
        None if connector.psp == "adyen" => Ok(Format::Adyen),
        None => Ok(Format::Stripe),
    }
}

/// `GET /admin/v1/merchants/{id}/connectors`
pub async fn merchant_connectors(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let merchant = req
        .match_info()
        .get("id")
        .and_then(MerchantId::parse)
        .ok_or(ApiError::NotFound("merchant"))?;
    let connectors = state.db.connectors_of(&merchant).await?;
    if connectors.is_empty() {
        return Err(ApiError::NotFound("merchant"));
    }
    Ok(json_value(
        200,
        &list_object(connectors.iter().map(Connector::to_object).collect(), false),
    ))
}

/// `GET /api/v1/connectors`: the calling merchant's own.
pub async fn connectors(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let connectors = state.db.connectors_of(&merchant.id).await?;
    Ok(json_value(
        200,
        &list_object(connectors.iter().map(Connector::to_object).collect(), false),
    ))
}

/// The most lines the sandbox writes into one HTTP answer (a reconciliation run reads the
/// sandbox's report from a file instead, whatever its size).
const MAX_SANDBOX_REPORT_BYTES: usize = 64 << 20;

/// `GET /sandbox/v1/settlement_reports/{date}?format=stripe|adyen&faults=…`: the sandbox's
/// report of the calling merchant's day.
pub async fn sandbox_report(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    state.sandbox.as_ref().ok_or(ApiError::NotFound("route"))?;
    let date = req
        .match_info()
        .get("date")
        .map(|d| date_param(d, "date"))
        .ok_or(ApiError::NotFound("report"))??;
    let q = query(&req)?;
    let format = match q.get("format").map(String::as_str) {
        None => Format::Stripe,
        Some(f) => Format::parse(f).ok_or_else(|| ApiError::param("format", "format must be stripe or adyen"))?,
    };
    let faults =
        Faults::parse(q.get("faults").map(String::as_str).unwrap_or("")).map_err(|m| ApiError::param("faults", m))?;
    let (out, _) = write_report(
        &state.db,
        merchant.id.as_str(),
        date,
        format,
        faults,
        &state.config.psp.sandbox.settlement,
        Bounded(Vec::new()),
    )
    .await
    .map_err(|e| match e {
        ReportError::Write(_) => ApiError::invalid(
            "report_too_large",
            "the report is larger than one answer may be (64 MiB); reconcile it with a run, which reads it from a file",
            None,
        ),
        e => ApiError::from(ReconError::Report(e)),
    })?;
    Ok(HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"settlement_{}_{date}.csv\"", format.as_str()),
        ))
        .body(out.0))
}

/// A buffer that refuses to grow past [`MAX_SANDBOX_REPORT_BYTES`].
struct Bounded(Vec<u8>);

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_SANDBOX_REPORT_BYTES {
            return Err(std::io::Error::other("the report is too large for one answer"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn connector_param(state: &AppState, id: Option<&str>) -> Result<Connector, ApiError> {
    let id = id.ok_or_else(|| ApiError::param("connector_id", "connector_id is required"))?;
    if !id.starts_with("mca_") || id.len() > 64 {
        return Err(ApiError::NotFound("connector"));
    }
    state.db.connector(id).await?.ok_or(ApiError::NotFound("connector"))
}

/// `POST /admin/v1/reconciliation/runs`: a report in the body (`text/csv`, with
/// `?connector_id=&format=&date=`), or `{"connector_id":…,"date":…,"format"?,"faults"?}` to
/// fetch the sandbox's report of that day. Runs to the end and answers with the run.
pub async fn create_run(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let is_json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let run = if is_json {
        let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["connector_id", "date", "format", "faults"], "")?;
        let connector = connector_param(&state, Some(f.req_str("connector_id", 64)?)).await?;
        // The sandbox keeps one book per merchant: only the merchant's own sandbox connector
        // fetches it (another sandbox connector of the merchant would apply the same lines
        // again under its own keys).
        if connector.psp != "sandbox"
            || connector.id != crate::domain::ids::sandbox_connector_id(&connector.merchant_id)
        {
            return Err(ApiError::invalid(
                "connector_cannot_fetch",
                "only a merchant's own sandbox connector fetches the sandbox's report; upload this connector's report as text/csv",
                Some("connector_id".to_owned()),
            ));
        }
        let date = date_param(f.req_str("date", 10)?, "date")?;
        let format = format_param(f.opt_str("format", 10)?, &connector)?;
        let faults =
            Faults::parse(f.opt_str("faults", 200)?.unwrap_or("")).map_err(|m| ApiError::param("faults", m))?;
        let file = state
            .reconciler
            .sandbox_report(&connector, date, format, faults)
            .await?;
        RunRequest {
            connector,
            format,
            source: "sandbox",
            date: Some(date),
            file,
        }
    } else {
        let q = query(&req)?;
        let connector = connector_param(&state, q.get("connector_id").map(String::as_str)).await?;
        let format = format_param(q.get("format").map(String::as_str), &connector)?;
        let date = q.get("date").map(|d| date_param(d, "date")).transpose()?;
        let file = spool(payload, state.reconciler.config().max_report_bytes).await?;
        RunRequest {
            connector,
            format,
            source: "upload",
            date,
            file,
        }
    };
    // The run goes on if the caller hangs up: it is a task of its own, and this answer waits
    // for it.
    let reconciler = state.reconciler.clone();
    let run = actix_rt::spawn(async move { reconciler.run(run).await })
        .await
        .map_err(|_| ApiError::Internal)??;
    Ok(json_value(201, &run))
}

/// Writes the request body to a file, at most `limit` bytes.
async fn spool(mut payload: web::Payload, limit: u64) -> Result<Spooled, ApiError> {
    let spooled = Spooled::new();
    let file = std::fs::File::create(&spooled.0).map_err(|_| ApiError::Internal)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
    let mut total = 0u64;
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::invalid("body_unreadable", "the request body could not be read", None))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(ApiError::BodyTooLarge(limit.min(usize::MAX as u64) as usize));
        }
        out.write_all(&chunk).map_err(|_| ApiError::Internal)?;
    }
    out.flush().map_err(|_| ApiError::Internal)?;
    Ok(spooled)
}

/// `GET /admin/v1/reconciliation/runs?connector_id=&limit=&starting_after=`
pub async fn list_runs(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, 100)?;
    let (runs, more) = state
        .db
        .list_runs(
            q.get("connector_id").map(String::as_str),
            q.get("starting_after").map(String::as_str),
            limit,
        )
        .await?;
    Ok(json_value(200, &list_object(runs, more)))
}

/// `GET /admin/v1/reconciliation/runs/{id}`
pub async fn get_run(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let id = req.match_info().get("id").unwrap_or("");
    let run = state.db.run_object(id).await?.ok_or(ApiError::NotFound("run"))?;
    Ok(json_value(200, &run))
}

/// `GET /admin/v1/reconciliation/exceptions?connector_id=&type=&status=&run_id=&limit=&starting_after=`
pub async fn list_exceptions(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let q = query(&req)?;
    let kind = q.get("type").cloned();
    if let Some(k) = &kind {
        if !EXCEPTION_TYPES.contains(&k.as_str()) {
            return Err(ApiError::param(
                "type",
                format!("type must be one of {}", EXCEPTION_TYPES.join(", ")),
            ));
        }
    }
    let status = q.get("status").cloned();
    if let Some(s) = &status {
        if s != "open" && s != "resolved" {
            return Err(ApiError::param("status", "status must be open or resolved"));
        }
    }
    let filter = ExceptionFilter {
        limit: int_param(&q, "limit", 10, 1, 100)?,
        starting_after: q.get("starting_after").cloned(),
        connector_id: q.get("connector_id").cloned(),
        kind,
        status,
        run_id: q.get("run_id").cloned(),
    };
    let (exceptions, more) = state.db.list_exceptions(&filter).await?;
    Ok(json_value(200, &list_object(exceptions, more)))
}

/// `POST /admin/v1/reconciliation/exceptions/{id}/resolve` `{"note":…,"resolved_by":…}`.
/// Resolving again changes nothing: the first resolution is the record.
pub async fn resolve_exception(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let id = req.match_info().get("id").unwrap_or("").to_owned();
    let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
    let obj = body::object(&body)?;
    let f = Fields::new(&obj, &["note", "resolved_by"], "")?;
    let note = f.req_str("note", 2000)?;
    let by = f.req_str("resolved_by", 200)?;
    body::no_card_data("note", note)?;
    body::no_card_data("resolved_by", by)?;
    let exception = state
        .db
        .resolve_exception(&id, note, by)
        .await?
        .ok_or(ApiError::NotFound("exception"))?;
    state.reconciler.refresh_metrics().await;
    Ok(json_value(200, &exception))
}
