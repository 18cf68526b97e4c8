//! Merchant reporting (docs/API.md, "Reports"): balance transactions, CSV exports streamed
//! page by page, and receipts — JSON for the merchant, an HTML page for the customer.

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::payments::{int_param, query, time_param};
use super::{auth, json_value, AppState};
use crate::adapters::postgres::reports::{Cursor, Window, BALANCE_CSV_HEADER, PAYMENTS_CSV_HEADER};
use crate::adapters::postgres::Db;
use crate::api::error::ApiError;
use crate::domain::record::{list_object, timestamp};
use crate::domain::settlement::format_amount;
use crate::domain::{MerchantId, Payment};

/// Rows per page of an export: one query and about 200 KiB of CSV at a time.
const EXPORT_PAGE: i64 = 2000;

/// Pages of 100 refunds the customer's receipt page reads at most.
const RECEIPT_REFUND_PAGES: usize = 10;

fn window(q: &std::collections::HashMap<String, String>, from: &str, to: &str) -> Result<Window, ApiError> {
    let window = Window {
        from: time_param(q, from)?,
        to: time_param(q, to)?,
    };
    if let (Some(f), Some(t)) = (window.from, window.to) {
        if f >= t {
            return Err(ApiError::param(to, format!("{to} must be after {from}")));
        }
    }
    Ok(window)
}

/// `GET /api/v1/balance_transactions?limit=&starting_after=&created[gte]=&created[lt]=`
pub async fn balance_transactions(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, 100)?;
    let window = window(&q, "created[gte]", "created[lt]")?;
    let after = match q.get("starting_after") {
        None => None,
        Some(a) => Some(
            crate::domain::JournalId::parse(a)
                .ok_or_else(|| ApiError::param("starting_after", "starting_after must be a balance transaction id"))?,
        ),
    };
    let after = after.as_ref().map(|a| a.as_str());
    let mut page = state
        .db
        .balance_transactions(&merchant.id, &window, Cursor::Newest(after), limit + 1)
        .await?;
    let more = page.len() as i64 > limit;
    page.truncate(limit as usize);
    Ok(json_value(
        200,
        &list_object(page.iter().map(|t| t.to_object()).collect(), more),
    ))
}

/// What an export streams: its header once, then page after page until one comes back short.
#[derive(Clone, Copy)]
enum Export {
    Payments,
    BalanceTransactions,
}

struct ExportState {
    db: Db,
    merchant: MerchantId,
    window: Window,
    export: Export,
    after: Option<(DateTime<Utc>, String)>,
    header_sent: bool,
    done: bool,
}

fn csv_bytes(
    rows: impl FnOnce(&mut csv::Writer<Vec<u8>>) -> Result<(), csv::Error>,
) -> Result<Bytes, actix_web::Error> {
    let mut w = csv::Writer::from_writer(Vec::with_capacity(64 << 10));
    rows(&mut w).map_err(actix_web::error::ErrorInternalServerError)?;
    let buf = w
        .into_inner()
        .map_err(|e| actix_web::error::ErrorInternalServerError(e.to_string()))?;
    Ok(Bytes::from(buf))
}

async fn next_page(mut s: ExportState) -> Option<(Result<Bytes, actix_web::Error>, ExportState)> {
    if s.done {
        return None;
    }
    if !s.header_sent {
        s.header_sent = true;
        let header = match s.export {
            Export::Payments => csv_bytes(|w| w.write_record(PAYMENTS_CSV_HEADER)),
            Export::BalanceTransactions => csv_bytes(|w| w.write_record(BALANCE_CSV_HEADER)),
        };
        return Some((header, s));
    }
    let page = match s.export {
        Export::Payments => {
            let rows =
                s.db.payments_page(&s.merchant, &s.window, s.after.clone(), EXPORT_PAGE)
                    .await;
            rows.map(|rows| {
                let last = rows.last().map(|p| (p.created_at, p.id.to_string()));
                (
                    rows.len(),
                    last,
                    csv_bytes(|w| rows.iter().try_for_each(|p| w.write_record(payment_row(p)))),
                )
            })
        }
        Export::BalanceTransactions => {
            let cursor = Cursor::Oldest(s.after.as_ref().map(|(t, id)| (*t, id.as_str())));
            let rows =
                s.db.balance_transactions(&s.merchant, &s.window, cursor, EXPORT_PAGE)
                    .await;
            rows.map(|rows| {
                let last = rows.last().map(|t| (t.created, t.id.clone()));
                let bytes = csv_bytes(|w| {
                    rows.iter().try_for_each(|t| {
                        w.write_record([
                            t.id.clone(),
                            timestamp(t.created),
                            t.kind.to_owned(),
                            t.source.clone(),
                            t.amount.to_string(),
                            t.fee.to_string(),
                            t.net.to_string(),
                            t.currency.clone(),
                        ])
                    })
                });
                (rows.len(), last, bytes)
            })
        }
    };
    match page {
        Ok((n, last, bytes)) => {
            s.done = (n as i64) < EXPORT_PAGE;
            s.after = last.or(s.after);
            Some((bytes, s))
        }
        Err(e) => {
            // The answer is already under way: end it broken rather than short and whole.
            tracing::warn!(error = %e, "export stopped: the database failed mid-stream");
            s.done = true;
            Some((
                Err(actix_web::error::ErrorServiceUnavailable("the database is unavailable")),
                s,
            ))
        }
    }
}

fn payment_row(p: &Payment) -> [String; 12] {
    [
        p.id.to_string(),
        timestamp(p.created_at),
        p.status().as_str().to_owned(),
        p.state.amount.to_string(),
        p.currency.code().to_owned(),
        p.state.captured.to_string(),
        p.state.refunded.to_string(),
        p.state.disputed.to_string(),
        p.capture_strategy.as_str().to_owned(),
        text_cell(&p.order_id),
        text_cell(&p.psp),
        text_cell(p.psp_reference.as_deref().unwrap_or_default()),
    ]
}

/// A text cell of an export, safe to open in a spreadsheet: text that a spreadsheet would read
/// as a formula (it begins with `=`, `+`, `-`, `@`, a tab or a carriage return) is given a
/// leading `'`, which spreadsheets show as text (OWASP's "CSV injection"). Only the columns whose
/// text comes from outside (a merchant's order id, a PSP's reference) pass through here; ids and
/// amounts are payrail's own, and a negative amount stays a number.
fn text_cell(s: &str) -> String {
    match s.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{s}"),
        _ => s.to_owned(),
    }
}

async fn export(state: web::Data<AppState>, req: HttpRequest, export: Export) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let mut window = window(&q, "from", "to")?;
    // A fixed end, so that rows committed while the export streams do not move it.
    window.to.get_or_insert_with(Utc::now);
    // Fail closed before the first byte: a database that does not answer is a 503, not an
    // empty file.
    drop(state.db.client().await?);
    let name = match export {
        Export::Payments => "payments.csv",
        Export::BalanceTransactions => "balance_transactions.csv",
    };
    let s = ExportState {
        db: state.db.clone(),
        merchant: merchant.id.clone(),
        window,
        export,
        after: None,
        header_sent: false,
        done: false,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{name}\"")))
        .streaming(futures_util::stream::unfold(s, next_page)))
}

/// `GET /api/v1/reports/payments.csv?from=&to=`
pub async fn payments_csv(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    export(state, req, Export::Payments).await
}

/// `GET /api/v1/reports/balance_transactions.csv?from=&to=`
pub async fn balance_transactions_csv(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    export(state, req, Export::BalanceTransactions).await
}

/// `GET /api/v1/payments/{id}/receipt`
pub async fn receipt(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = super::payments::path_id(&req)?;
    let p = state
        .db
        .payment_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("payment"))?;
    if p.state.captured == 0 {
        return Err(ApiError::InvalidState(p.status()));
    }
    let token = state.db.receipt_token(p.id.as_str()).await?;
    let (refunds, _) = state.db.refunds_of_payment(&p.id, 100, None).await?;
    let refunds: Vec<_> = refunds
        .iter()
        .map(|r| {
            json!({ "refund_id": r.id, "amount": { "value": r.amount.minor, "currency": r.amount.currency },
                    "status": r.status.as_str(), "created_at": timestamp(r.created_at) })
        })
        .collect();
    Ok(json_value(
        200,
        &json!({
            "object": "receipt",
            "payment_id": p.id,
            "receipt_url": format!("{}/receipts/{token}", state.public_url),
            "merchant": { "name": merchant.name },
            "amount": { "value": p.state.amount, "currency": p.currency },
            "amount_captured": p.state.captured,
            "amount_refunded": p.state.refunded,
            "status": p.status().as_str(),
            "card": p.card.as_ref().filter(|c| !c.last4.is_empty()).map(|c| json!({ "brand": c.brand, "last4": c.last4 })),
            "created_at": timestamp(p.created_at),
            "refunds": refunds,
        }),
    ))
}

/// Text made safe for HTML.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn money(minor: i64, currency: crate::domain::Currency) -> String {
    format!("{} {}", currency.code(), format_amount(minor, currency.exponent()))
}

fn receipt_page(status: u16, title: &str, body: &str) -> HttpResponse {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{title}</title><style>\
         body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;background:#f4f5f7;color:#1b1f24;margin:0}}\
         main{{max-width:420px;margin:48px auto;background:#fff;border-radius:12px;padding:32px;box-shadow:0 2px 12px rgba(0,0,0,.08)}}\
         h1{{font-size:18px;margin:0 0 4px}} .muted{{color:#66707a;font-size:14px}}\
         .total{{font-size:32px;font-weight:600;margin:24px 0 8px}}\
         table{{width:100%;border-collapse:collapse;margin-top:16px;font-size:14px}}\
         td{{padding:8px 0;border-top:1px solid #eceef0}} td:last-child{{text-align:right}}\
         </style></head><body><main>{body}</main></body></html>"
    );
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK))
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'",
        ))
        .body(html)
}

/// `GET /receipts/{token}`: the customer's receipt. No API key: the token is the credential.
pub async fn receipt_html(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let token = req.match_info().get("token").unwrap_or("");
    let not_found = || {
        receipt_page(
            404,
            "Receipt not found",
            "<h1>Receipt not found</h1><p class=\"muted\">Check the link in your email.</p>",
        )
    };
    if !token.starts_with("rcpt_") || token.len() != 37 || !token[5..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(not_found());
    }
    let Some((p, merchant)) = state.db.payment_by_receipt(token).await? else {
        return Ok(not_found());
    };
    // Every refund but the failed ones, oldest first, read a page at a time up to a bound.
    let mut refunds = Vec::new();
    let mut more = true;
    let mut after = None;
    for _ in 0..RECEIPT_REFUND_PAGES {
        let (page, has_more) = state.db.refunds_of_payment(&p.id, 100, after.as_ref()).await?;
        after = page.last().map(|r| r.id.clone());
        refunds.extend(
            page.into_iter()
                .filter(|r| r.status != crate::domain::RefundStatus::Failed),
        );
        more = has_more;
        if !more {
            break;
        }
    }
    let mut rows = format!(
        "<tr><td>Paid</td><td>{}</td></tr>",
        escape(&money(p.state.captured, p.currency))
    );
    if let Some(c) = p.card.as_ref().filter(|c| !c.last4.is_empty()) {
        let brand = escape(&c.brand);
        rows += &format!("<tr><td>Card</td><td>{} •••• {}</td></tr>", brand, escape(&c.last4));
    }
    rows += &format!(
        "<tr><td>Date</td><td>{}</td></tr>",
        p.created_at.format("%-d %B %Y, %H:%M UTC")
    );
    for r in &refunds {
        let what = if r.status == crate::domain::RefundStatus::Pending {
            "Refund (pending)"
        } else {
            "Refunded"
        };
        rows += &format!(
            "<tr><td>{what} {}</td><td>−{}</td></tr>",
            r.created_at.format("%-d %b %Y"),
            escape(&money(r.amount.minor, r.amount.currency))
        );
    }
    if more {
        rows += "<tr><td>More refunds</td><td>in the total above</td></tr>";
    }
    rows += &format!("<tr><td>Reference</td><td>{}</td></tr>", escape(p.id.as_str()));
    let net = p.state.captured - p.state.refunded;
    let body = format!(
        "<h1>Receipt from {merchant}</h1><p class=\"muted\">Thank you for your payment.</p>\
         <div class=\"total\">{total}</div><p class=\"muted\">{status}</p><table>{rows}</table>",
        merchant = escape(&merchant),
        total = escape(&money(net, p.currency)),
        status = if p.state.refunded > 0 {
            "After refunds"
        } else {
            "Paid in full"
        },
    );
    Ok(receipt_page(200, &format!("Receipt from {}", escape(&merchant)), &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape("<b>\"Tom & Jerry's\"</b>"),
            "&lt;b&gt;&quot;Tom &amp; Jerry&#39;s&quot;&lt;/b&gt;"
        );
    }

    #[test]
    fn text_a_spreadsheet_would_run_as_a_formula_is_given_a_leading_quote() {
        for formula in ["=1+1", "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"] {
            assert_eq!(text_cell(formula), format!("'{formula}"));
        }
        for plain in ["ord_9x7k2m", "", "a=b", "'=1", " =1"] {
            assert_eq!(text_cell(plain), plain);
        }
    }

    #[test]
    fn money_reads_in_major_units() {
        let usd = crate::domain::Currency::parse("USD").unwrap();
        let jpy = crate::domain::Currency::parse("JPY").unwrap();
        assert_eq!(money(4999, usd), "USD 49.99");
        assert_eq!(money(1200, jpy), "JPY 1200");
    }
}
