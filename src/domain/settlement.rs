//! PSP settlement reports: Stripe's balance-transactions export and Adyen's Settlement
//! Details Report, read as a stream of lines (memory bounded whatever the file's size), and
//! written back in the same formats by the sandbox. Pure: no I/O beyond the reader given.
//!
//! Amounts in both reports are decimal major units ("12.34"); they are read exactly into
//! minor units with the currency's exponent, never through a float. Every line becomes a
//! [`Line`] in the PSP balance's sense: `amount` is signed (a refund is negative), `fee` is
//! what the PSP kept (positive), `amount - fee` is what reached the PSP balance.
//!
//! Two kinds of failure: a file the reader cannot follow (no header, a column missing, broken
//! quoting, not UTF-8) is refused whole ([`FileError`]); a line whose fields do not read (an
//! amount, a date, a currency) is [`Parsed::Malformed`] with its line number, and the rest
//! of the file goes on.

use std::io::Read;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

use super::money::Currency;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Stripe,
    Adyen,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "stripe" => Some(Format::Stripe),
            "adyen" => Some(Format::Adyen),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Stripe => "stripe",
            Format::Adyen => "adyen",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineKind {
    Charge,
    Refund,
    Dispute,
    DisputeReversal,
    Payout,
    /// A type payrail does not reconcile (a PSP's own fee line, a top-up…).
    Other,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Charge => "charge",
            LineKind::Refund => "refund",
            LineKind::Dispute => "dispute",
            LineKind::DisputeReversal => "dispute_reversal",
            LineKind::Payout => "payout",
            LineKind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<LineKind> {
        [
            LineKind::Charge,
            LineKind::Refund,
            LineKind::Dispute,
            LineKind::DisputeReversal,
            LineKind::Payout,
            LineKind::Other,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One report line, in the PSP balance's sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line of the file where the record starts.
    pub line_no: u64,
    /// The PSP's natural key of the line: Stripe's `txn_…`; Adyen's batch, reference, type
    /// and modification reference.
    pub key: String,
    pub kind: LineKind,
    /// The object the line is about: the intent of a charge (`pi_…`), a refund (`re_…`), a
    /// dispute, a payout.
    pub reference: String,
    /// The intent the object belongs to, when the report says (Adyen's `Psp Reference`).
    pub intent: Option<String>,
    pub amount: i64,
    pub fee: i64,
    pub currency: Currency,
    pub created: DateTime<Utc>,
    /// The report's own type, as written (for an operator).
    pub raw_type: String,
    /// A Stripe charge named by its charge (`ch_…`, `py_…`) in a file with no
    /// `payment_intent_id` column: the same file with the column may name its PaymentIntent.
    pub charge_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Line(Line),
    /// A line whose fields do not read; its key when the key itself did.
    Malformed {
        line_no: u64,
        key: Option<String>,
        reason: String,
    },
}

/// Why a whole file is refused (nothing of it is applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("the report is empty")]
    Empty,
    #[error("the report has no {0:?} column (is it a {1} report?)")]
    MissingColumn(&'static str, &'static str),
    #[error("line {line}: {reason}")]
    Structure { line: u64, reason: String },
}

/// What a reconciliation exception can be (docs/API.md, "Reconciliation").
pub const EXCEPTION_TYPES: [&str; 8] = [
    "amount_mismatch",
    "missing_in_payrail",
    "missing_in_report",
    "duplicate_in_report",
    "currency_mismatch",
    "status_mismatch",
    "malformed_line",
    "unsupported_line",
];

/// The most characters one field may have: a report is data, not prose.
const MAX_FIELD: usize = 512;

/// Reads `s` ("-12.34", "1200", "0.5") as minor units of a currency with `exponent` digits
/// after the point. More digits than the currency has, a sign in the middle, an exponent or
/// a value past ±10¹⁵ are refused. Exact: no float is ever involved.
pub fn parse_amount(s: &str, exponent: u8) -> Option<i64> {
    let s = s.trim();
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (whole, fraction) = match digits.split_once('.') {
        Some((w, f)) => (w, f),
        None => (digits, ""),
    };
    if whole.is_empty() && fraction.is_empty()
        || whole.len() > 15
        || fraction.len() > usize::from(exponent)
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || (digits.contains('.') && fraction.is_empty())
    {
        return None;
    }
    let mut minor: i64 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        minor = minor.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    for _ in fraction.len()..usize::from(exponent) {
        minor = minor.checked_mul(10)?;
    }
    if minor > 1_000_000_000_000_000 {
        return None;
    }
    Some(if negative { -minor } else { minor })
}

/// Minor units as the reports write them: "-12.34", "1200" (JPY).
pub fn format_amount(minor: i64, exponent: u8) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{abs}");
    }
    let scale = 10u64.pow(u32::from(exponent));
    format!(
        "{sign}{}.{:0width$}",
        abs / scale,
        abs % scale,
        width = usize::from(exponent)
    )
}

/// "2026-11-27 10:00:00" (both reports, UTC), "2026-11-27 10:00", RFC 3339, or Unix seconds.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
        return Some(Utc.from_utc_datetime(&t));
    }
    // Stripe's Dashboard export writes minutes only.
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M") {
        return Some(Utc.from_utc_datetime(&t));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?));
    }
    if !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return Utc.timestamp_opt(s.parse().ok()?, 0).single();
    }
    None
}

/// The UTC offset, in seconds, of an Adyen report's `TimeZone` (the zone its times are in):
/// empty, UTC or GMT, the European abbreviations Adyen writes, or a fixed `±HH:MM`.
pub fn zone_offset(zone: &str) -> Option<i64> {
    let hours = match zone.trim() {
        "" | "UTC" | "GMT" | "Z" => 0,
        "WET" => 0,
        "WEST" | "CET" | "BST" => 1,
        "CEST" | "EET" => 2,
        "EEST" => 3,
        other => {
            let (sign, rest) = match other.as_bytes().first()? {
                b'+' => (1, &other[1..]),
                b'-' => (-1, &other[1..]),
                _ => return None,
            };
            let (h, m) = rest.split_once(':')?;
            let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
            if h > 14 || m > 59 {
                return None;
            }
            return Some(sign * (h * 3600 + m * 60));
        }
    };
    Some(hours * 3600)
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The columns of one format, found by name in the header (order does not matter, extra
/// columns are ignored).
enum Columns {
    Stripe {
        id: usize,
        /// The balance transaction's `type`; Stripe's itemized reports have only the category.
        kind: Option<usize>,
        source: usize,
        amount: usize,
        fee: usize,
        net: usize,
        currency: usize,
        created: usize,
        category: Option<usize>,
        /// `payment_intent_id`: Stripe names a charge by its `ch_…` (or `py_…`) in `source`,
        /// payrail knows the PaymentIntent.
        intent: Option<usize>,
    },
    Adyen {
        psp_reference: usize,
        kind: usize,
        modification: usize,
        gross_currency: usize,
        gross_debit: usize,
        gross_credit: usize,
        net_currency: usize,
        net_debit: usize,
        net_credit: usize,
        created: usize,
        time_zone: Option<usize>,
        batch: usize,
        merchant_reference: Option<usize>,
    },
}

pub const STRIPE_HEADER: [&str; 10] = [
    "id",
    "type",
    "source",
    "amount",
    "fee",
    "net",
    "currency",
    "created",
    "available_on",
    "reporting_category",
];

pub const ADYEN_HEADER: [&str; 23] = [
    "Company Account",
    "Merchant Account",
    "Psp Reference",
    "Merchant Reference",
    "Payment Method",
    "Creation Date",
    "TimeZone",
    "Type",
    "Modification Reference",
    "Gross Currency",
    "Gross Debit (GC)",
    "Gross Credit (GC)",
    "Exchange Rate",
    "Net Currency",
    "Net Debit (NC)",
    "Net Credit (NC)",
    "Commission (NC)",
    "Markup (NC)",
    "Scheme Fees (NC)",
    "Interchange (NC)",
    "Payment Method Variant",
    "Modification Merchant Reference",
    "Batch Number",
];

impl Columns {
    fn find(format: Format, header: &csv::StringRecord) -> Result<Columns, FileError> {
        let name = format.as_str();
        let at = |col: &'static str| {
            header
                .iter()
                .position(|h| h.trim().eq_ignore_ascii_case(col))
                .ok_or(FileError::MissingColumn(col, name))
        };
        let maybe = |col: &'static str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(col));
        // The first of a column's names, in the order given, that the header has (Stripe's
        // balance transactions export and its itemized report name some columns otherwise).
        let any = |cols: &[&'static str]| -> Result<usize, FileError> {
            cols.iter()
                .find_map(|c| maybe(c))
                .ok_or(FileError::MissingColumn(cols[0], name))
        };
        Ok(match format {
            Format::Stripe => {
                // `balance_transaction_id` names the balance transaction whatever else the file
                // has; an export's `id` is it too.
                let id = any(&["balance_transaction_id", "id"]).map_err(|_| FileError::MissingColumn("id", name))?;
                let category = maybe("reporting_category");
                let kind = maybe("type");
                if kind.is_none() && category.is_none() {
                    return Err(FileError::MissingColumn("type", name));
                }
                Columns::Stripe {
                    id,
                    kind,
                    source: any(&["source", "source_id"])?,
                    amount: any(&["amount", "gross"])?,
                    fee: at("fee")?,
                    net: at("net")?,
                    currency: at("currency")?,
                    // An itemized report's `created` is in the report's own time zone; its
                    // `created_utc` is the time.
                    created: any(&["created_utc", "created (utc)", "created"])
                        .map_err(|_| FileError::MissingColumn("created", name))?,
                    category,
                    intent: maybe("payment_intent_id"),
                }
            }
            Format::Adyen => Columns::Adyen {
                psp_reference: at("Psp Reference")?,
                kind: at("Type")?,
                // Part of every line's key: a file without it would key a refund or a payout
                // otherwise than the same report with it, and apply it twice.
                modification: at("Modification Reference")?,
                gross_currency: at("Gross Currency")?,
                gross_debit: at("Gross Debit (GC)")?,
                gross_credit: at("Gross Credit (GC)")?,
                net_currency: at("Net Currency")?,
                net_debit: at("Net Debit (NC)")?,
                net_credit: at("Net Credit (NC)")?,
                created: at("Creation Date")?,
                time_zone: maybe("TimeZone"),
                batch: at("Batch Number")?,
                merchant_reference: maybe("Merchant Reference"),
            },
        })
    }
}

/// The most bytes one record (the header included) may take: a field is at most [`MAX_FIELD`]
/// characters, and a quote left open would otherwise make the rest of the file one record, held
/// in memory whole.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What the CSV reader may read ahead of the record it is in (its own buffer).
const READ_AHEAD: u64 = 1 << 16;

/// The input, refused past a limit the reader moves on at each record.
struct Bounded<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = self.limit.saturating_sub(self.read);
        if room == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a record runs past {MAX_RECORD_BYTES} bytes (a quote left open?)"),
            ));
        }
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..take])?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads a report one line at a time.
pub struct ReportReader<R: Read> {
    reader: csv::Reader<Bounded<R>>,
    columns: Columns,
    record: csv::StringRecord,
    /// The line the next record starts on.
    next_line: u64,
}

impl<R: Read> ReportReader<R> {
    pub fn new(format: Format, input: R) -> Result<ReportReader<R>, FileError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .trim(csv::Trim::All)
            .from_reader(Bounded {
                inner: input,
                read: 0,
                limit: MAX_RECORD_BYTES + READ_AHEAD,
            });
        let header = reader.headers().map_err(|e| structure(e, 1))?.clone();
        let next = reader.position().clone();
        reader.get_mut().limit = next.byte() + MAX_RECORD_BYTES + READ_AHEAD;
        if header.is_empty() || header.iter().all(str::is_empty) {
            return Err(FileError::Empty);
        }
        let columns = Columns::find(format, &header)?;
        Ok(ReportReader {
            reader,
            columns,
            record: csv::StringRecord::new(),
            next_line: next.line(),
        })
    }

    /// What the lines were read from.
    pub fn into_inner(self) -> R {
        self.reader.into_inner().inner
    }

    /// The next line; `None` at the end; an error refuses the whole file.
    pub fn next_line(&mut self) -> Option<Result<Parsed, FileError>> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                let line_no = self.record.position().map(|p| p.line()).unwrap_or(0);
                let next = self.reader.position().clone();
                self.next_line = next.line();
                self.reader.get_mut().limit = next.byte() + MAX_RECORD_BYTES + READ_AHEAD;
                Some(Ok(self.interpret(line_no)))
            }
            // An input error has no position of its own: the record it broke starts where the
            // last one ended.
            Err(e) => Some(Err(structure(e, self.next_line))),
        }
    }

    fn interpret(&self, line_no: u64) -> Parsed {
        let r = &self.record;
        if let Some(long) = r.iter().find(|f| f.len() > MAX_FIELD) {
            return Parsed::Malformed {
                line_no,
                key: None,
                reason: format!("a field of {} characters (at most {MAX_FIELD})", long.len()),
            };
        }
        // A card number has no place in a report: the line is kept out, and nothing of it is
        // repeated anywhere.
        if r.iter().any(super::card::contains_pan) {
            return Parsed::Malformed {
                line_no,
                key: None,
                reason: "a field holds what looks like a card number; the line was not read".into(),
            };
        }
        let field = |i: usize| r.get(i).unwrap_or("");
        let result = match &self.columns {
            Columns::Stripe {
                id,
                kind,
                source,
                amount,
                fee,
                net,
                currency,
                created,
                category,
                intent,
            } => {
                let key = field(*id);
                if key.is_empty() {
                    return malformed(line_no, None, "id is empty");
                }
                stripe_line(
                    line_no,
                    key,
                    (kind.map(field), category.map(field).unwrap_or("")),
                    (field(*source), intent.map(field)),
                    [field(*amount), field(*fee), field(*net)],
                    field(*currency),
                    field(*created),
                )
                .map_err(|reason| (Some(key.to_owned()), reason))
            }
            Columns::Adyen {
                psp_reference,
                kind,
                modification,
                gross_currency,
                gross_debit,
                gross_credit,
                net_currency,
                net_debit,
                net_credit,
                created,
                time_zone,
                batch,
                merchant_reference,
            } => {
                let modification = field(*modification);
                let mut key = format!(
                    "{}:{}:{}:{}",
                    field(*batch),
                    field(*psp_reference),
                    field(*kind),
                    modification
                );
                // A line with no Psp Reference (a payout, an invoice's fee) is told from the
                // batch's others by its Modification Reference, or, with neither, its Merchant
                // Reference. Without that column the same line would have another key in a
                // file that has it, and be applied twice.
                if field(*psp_reference).is_empty() && modification.is_empty() {
                    let Some(m) = merchant_reference.map(field) else {
                        return malformed(
                            line_no,
                            Some(key),
                            "a line with neither reference needs the report's Merchant Reference column",
                        );
                    };
                    if !m.is_empty() {
                        key.push(':');
                        key.push_str(m);
                    }
                }
                adyen_line(
                    line_no,
                    &key,
                    field(*kind),
                    field(*psp_reference),
                    modification,
                    (field(*gross_currency), field(*gross_debit), field(*gross_credit)),
                    (field(*net_currency), field(*net_debit), field(*net_credit)),
                    field(*created),
                    time_zone.map(field).unwrap_or(""),
                )
                .map_err(|reason| (Some(key), reason))
            }
        };
        match result {
            Ok(line) => Parsed::Line(line),
            Err((key, reason)) => Parsed::Malformed { line_no, key, reason },
        }
    }
}

fn malformed(line_no: u64, key: Option<String>, reason: &str) -> Parsed {
    Parsed::Malformed {
        line_no,
        key,
        reason: reason.to_owned(),
    }
}

fn structure(e: csv::Error, line_at: u64) -> FileError {
    let line = e.position().map(|p| p.line()).unwrap_or(line_at);
    let reason = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_owned(),
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("{len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Io(e) => format!("could not be read: {e}"),
        _ => "not CSV".to_owned(),
    };
    FileError::Structure { line, reason }
}

fn currency_of(code: &str) -> Result<Currency, String> {
    Currency::parse(&code.to_ascii_uppercase()).ok_or_else(|| format!("unknown currency {code:?}"))
}

fn amount_of(what: &str, s: &str, c: Currency) -> Result<i64, String> {
    if s.is_empty() {
        return Ok(0);
    }
    parse_amount(s, c.exponent()).ok_or_else(|| format!("{what} {s:?} is not an amount in {}", c.code()))
}

fn reference_of(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("reference {s:?} is not a PSP reference"));
    }
    Ok(s.to_owned())
}

/// Text where a line about no transaction has its reference: printable, at most 128 characters.
fn description_of(s: &str) -> Result<String, String> {
    if s.chars().count() > 128 || s.chars().any(char::is_control) {
        return Err("the Modification Reference is not a reference or a description".into());
    }
    Ok(s.to_owned())
}

/// A PSP's own fee line as (amount, fee): no amount, its net (a debit) the fee the PSP kept; a
/// credit gives a fee back.
fn kept(net: i64) -> Result<(i64, i64), String> {
    Ok((0, net.checked_neg().ok_or("net is beyond what an amount may be")?))
}

/// Adyen's types of line that are a fee the PSP kept (or gave back), about no transaction.
/// (`InvoiceDeduction` is Adyen's invoice for its services, taken from the balance.)
const ADYEN_FEE_TYPES: [&str; 5] = [
    "Fee",
    "MiscCosts",
    "PaymentCost",
    "InvoiceDeduction",
    "AuthorisationSchemeFee",
];

/// Stripe's balance transaction types, and reporting categories, of its own fees.
const STRIPE_FEE_TYPES: [&str; 4] = ["stripe_fee", "stripe_fx_fee", "network_cost", "tax_fee"];
const STRIPE_FEE_CATEGORIES: [&str; 2] = ["fee", "network_cost"];

fn stripe_line(
    line_no: u64,
    key: &str,
    (kind, category): (Option<&str>, &str),
    (source, intent): (&str, Option<&str>),
    [amount, fee, net]: [&str; 3],
    currency: &str,
    created: &str,
) -> Result<Line, String> {
    let currency = currency_of(currency)?;
    let amount = amount_of("amount", amount, currency)?;
    let fee = amount_of("fee", fee, currency)?;
    let net = amount_of("net", net, currency)?;
    if amount.checked_sub(fee) != Some(net) {
        return Err(format!("amount − fee ≠ net ({amount} − {fee} ≠ {net} minor units)"));
    }
    let created = parse_time(created).ok_or_else(|| format!("created {created:?} is not a time"))?;
    let line_kind = match kind {
        Some(kind) => match (kind, category) {
            ("charge" | "payment", _) => LineKind::Charge,
            ("refund" | "payment_refund", _) => LineKind::Refund,
            ("adjustment", "dispute") | ("dispute", _) => LineKind::Dispute,
            ("adjustment", "dispute_reversal") => LineKind::DisputeReversal,
            ("payout", _) => LineKind::Payout,
            ("", _) => return Err("type is empty".into()),
            _ => LineKind::Other,
        },
        // An itemized report says what a line is by its reporting category alone.
        None => match category {
            "charge" => LineKind::Charge,
            "refund" => LineKind::Refund,
            "dispute" => LineKind::Dispute,
            "dispute_reversal" => LineKind::DisputeReversal,
            "payout" => LineKind::Payout,
            "" => return Err("reporting_category is empty".into()),
            _ => LineKind::Other,
        },
    };
    // Stripe's own fee (Radar, a network cost…) is written as a negative amount: it is a fee the
    // PSP kept, as a charge's fee is.
    let own_fee = line_kind == LineKind::Other
        && (kind.is_some_and(|k| STRIPE_FEE_TYPES.contains(&k))
            || (kind.is_none() && STRIPE_FEE_CATEGORIES.contains(&category)));
    let (amount, fee) = if own_fee { kept(net)? } else { (amount, fee) };
    // A charge is about its PaymentIntent when the report names it (payrail's reference of a
    // Stripe payment); a refund or dispute belongs to it.
    let charge_only =
        intent.is_none() && line_kind == LineKind::Charge && (source.starts_with("ch_") || source.starts_with("py_"));
    let intent = match intent {
        None | Some("") => None,
        Some(pi) => Some(reference_of(pi)?),
    };
    let (reference, intent) = match (line_kind, intent) {
        (LineKind::Charge, Some(pi)) => (pi, None),
        (LineKind::Refund | LineKind::Dispute | LineKind::DisputeReversal, intent) => (reference_of(source)?, intent),
        // Nothing is matched by a payout's or an unsupported line's reference: it may have none
        // (a Stripe fee line of an itemized report often has no source).
        (LineKind::Payout | LineKind::Other, _) if source.is_empty() => (String::new(), None),
        _ => (reference_of(source)?, None),
    };
    Ok(Line {
        line_no,
        key: key.to_owned(),
        kind: line_kind,
        reference,
        intent,
        amount,
        fee,
        currency,
        created,
        raw_type: kind.unwrap_or(category).to_owned(),
        charge_only,
    })
}

#[allow(clippy::too_many_arguments)]
fn adyen_line(
    line_no: u64,
    key: &str,
    kind: &str,
    psp_reference: &str,
    modification: &str,
    (gross_currency, gross_debit, gross_credit): (&str, &str, &str),
    (net_currency, net_debit, net_credit): (&str, &str, &str),
    created: &str,
    time_zone: &str,
) -> Result<Line, String> {
    let line_kind = match kind {
        "Settled" | "SettledBulk" => LineKind::Charge,
        "Refunded" | "RefundedBulk" => LineKind::Refund,
        "Chargeback" => LineKind::Dispute,
        "ChargebackReversed" => LineKind::DisputeReversal,
        "MerchantPayout" => LineKind::Payout,
        "" => return Err("Type is empty".into()),
        _ => LineKind::Other,
    };
    // A payout, and a line about no transaction (Adyen's `Fee`, a `DepositCorrection`, …), may
    // move only the net; a transaction's line has its gross.
    let transaction = !matches!(line_kind, LineKind::Payout | LineKind::Other);
    let net_only = gross_currency.is_empty() && gross_debit.is_empty() && gross_credit.is_empty();
    let currency = if net_only && !transaction {
        currency_of(net_currency)?
    } else {
        currency_of(gross_currency)?
    };
    if !net_currency.is_empty() && currency_of(net_currency)? != currency {
        return Err(format!(
            "gross in {gross_currency}, net in {net_currency}: converted lines are not reconciled"
        ));
    }
    let credit = |d: &str, c: &str| -> Result<i64, String> {
        let debit = amount_of("debit", d, currency)?;
        let credit = amount_of("credit", c, currency)?;
        if debit < 0 || credit < 0 {
            return Err("a debit or credit is negative".into());
        }
        Ok(credit - debit)
    };
    let net = credit(net_debit, net_credit)?;
    let (amount, fee) = if net_only && !transaction {
        // A line with only a net: a fee's net is what the PSP kept (a credit gives a fee back);
        // any other such line (a payout, a deposit correction, a transfer between accounts)
        // moved its net, and kept nothing.
        if ADYEN_FEE_TYPES.contains(&kind) {
            kept(net)?
        } else {
            (net, 0)
        }
    } else {
        let amount = credit(gross_debit, gross_credit)?;
        let fee = amount
            .checked_sub(net)
            .ok_or_else(|| "gross less net is beyond what an amount may be".to_owned())?;
        (amount, fee)
    };
    let offset = zone_offset(time_zone).ok_or_else(|| format!("TimeZone {time_zone:?} is not one payrail reads"))?;
    let created = parse_time(created).ok_or_else(|| format!("Creation Date {created:?} is not a time"))?
        - chrono::Duration::seconds(offset);
    let (reference, intent) = match line_kind {
        LineKind::Refund | LineKind::Dispute | LineKind::DisputeReversal if !modification.is_empty() => {
            (reference_of(modification)?, Some(reference_of(psp_reference)?))
        }
        // Nothing is matched by a payout's or an unsupported line's reference: it may have none,
        // or a description where a reference would be (Adyen writes a fee's or a payout's so).
        LineKind::Payout | LineKind::Other => match (psp_reference, modification) {
            ("", "") => (String::new(), None),
            ("", m) => (description_of(m)?, None),
            (p, _) => (reference_of(p)?, None),
        },
        _ => (reference_of(psp_reference)?, None),
    };
    Ok(Line {
        line_no,
        key: key.to_owned(),
        kind: line_kind,
        reference,
        intent,
        amount,
        fee,
        currency,
        created,
        raw_type: kind.to_owned(),
        charge_only: false,
    })
}

/// Writes lines in one of the two formats (the sandbox's reports, tests, the benchmark).
pub struct ReportWriter<W: std::io::Write> {
    format: Format,
    writer: csv::Writer<W>,
}

impl<W: std::io::Write> ReportWriter<W> {
    pub fn new(format: Format, out: W) -> Result<ReportWriter<W>, csv::Error> {
        let mut writer = csv::WriterBuilder::new().from_writer(out);
        match format {
            Format::Stripe => writer.write_record(STRIPE_HEADER)?,
            Format::Adyen => writer.write_record(ADYEN_HEADER)?,
        }
        Ok(ReportWriter { format, writer })
    }

    /// `merchant_reference` is the merchant's own reference (Adyen's column); `batch` the
    /// settlement batch.
    pub fn write(&mut self, line: &Line, merchant_reference: &str, batch: u32) -> Result<(), csv::Error> {
        let e = line.currency.exponent();
        let amt = |m: i64| format_amount(m, e);
        let created = format_time(line.created);
        match self.format {
            Format::Stripe => {
                let (kind, category) = match line.kind {
                    LineKind::Charge => ("charge", "charge"),
                    LineKind::Refund => ("refund", "refund"),
                    LineKind::Dispute => ("adjustment", "dispute"),
                    LineKind::DisputeReversal => ("adjustment", "dispute_reversal"),
                    LineKind::Payout => ("payout", "payout"),
                    LineKind::Other => (line.raw_type.as_str(), "other_adjustment"),
                };
                let available = (line.created + chrono::Duration::days(2))
                    .format("%Y-%m-%d")
                    .to_string();
                self.writer.write_record([
                    line.key.as_str(),
                    kind,
                    line.reference.as_str(),
                    &amt(line.amount),
                    &amt(line.fee),
                    &amt(line.amount - line.fee),
                    &line.currency.code().to_ascii_lowercase(),
                    &created,
                    &available,
                    category,
                ])
            }
            Format::Adyen => {
                let kind = match line.kind {
                    LineKind::Charge => "Settled",
                    LineKind::Refund => "Refunded",
                    LineKind::Dispute => "Chargeback",
                    LineKind::DisputeReversal => "ChargebackReversed",
                    LineKind::Payout => "MerchantPayout",
                    LineKind::Other => line.raw_type.as_str(),
                };
                let split = |m: i64| {
                    if m < 0 {
                        (amt(-m), String::new())
                    } else {
                        (String::new(), amt(m))
                    }
                };
                let (gd, gc) = split(line.amount);
                let (nd, nc) = split(line.amount - line.fee);
                let (psp_reference, modification) = match &line.intent {
                    Some(intent) => (intent.as_str(), line.reference.as_str()),
                    None => (line.reference.as_str(), ""),
                };
                let code = line.currency.code();
                let batch = batch.to_string();
                let (gross_currency, gd, gc) = if line.kind == LineKind::Payout {
                    ("", String::new(), String::new())
                } else {
                    (code, gd, gc)
                };
                self.writer.write_record([
                    "PayrailSandbox",
                    "PayrailSandboxMerchant",
                    psp_reference,
                    merchant_reference,
                    "visa",
                    &created,
                    "UTC",
                    kind,
                    modification,
                    gross_currency,
                    &gd,
                    &gc,
                    "1",
                    code,
                    &nd,
                    &nc,
                    &amt(line.fee.max(0)),
                    "",
                    "",
                    "",
                    "visa",
                    "",
                    &batch,
                ])
            }
        }
    }

    pub fn finish(mut self) -> Result<W, std::io::Error> {
        self.writer.flush()?;
        self.writer.into_inner().map_err(|e| e.into_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn amounts_read_exactly() {
        assert_eq!(parse_amount("12.34", 2), Some(1234));
        assert_eq!(parse_amount("-0.05", 2), Some(-5));
        assert_eq!(parse_amount("7", 2), Some(700));
        assert_eq!(parse_amount("7.5", 2), Some(750));
        assert_eq!(parse_amount("1200", 0), Some(1200));
        assert_eq!(parse_amount("1.234", 3), Some(1234));
        for bad in [
            "", "-", ".", "1.", "1.234", "1e3", "1,00", "--1", "1-", " 1 2", "0x10", "1.2.3",
        ] {
            assert_eq!(parse_amount(bad, 2), None, "{bad:?}");
        }
        assert_eq!(parse_amount("12.5", 0), None);
        assert_eq!(parse_amount("99999999999999999999", 2), None);
    }

    proptest! {
        #[test]
        fn amounts_round_trip(minor in -1_000_000_000_000_000i64..=1_000_000_000_000_000, e in 0u8..=3) {
            prop_assert_eq!(parse_amount(&format_amount(minor, e), e), Some(minor));
        }
    }

    fn line(kind: LineKind, amount: i64, fee: i64) -> Line {
        Line {
            line_no: 0,
            key: "txn_1".into(),
            kind,
            reference: "pi_1".into(),
            intent: None,
            amount,
            fee,
            currency: usd(),
            created: Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap(),
            raw_type: kind.as_str().into(),
            charge_only: false,
        }
    }

    fn read_all(format: Format, text: &str) -> Result<Vec<Parsed>, FileError> {
        let mut r = ReportReader::new(format, text.as_bytes())?;
        let mut out = Vec::new();
        while let Some(p) = r.next_line() {
            out.push(p?);
        }
        Ok(out)
    }

    #[test]
    fn stripe_report_round_trips() {
        let mut w = ReportWriter::new(Format::Stripe, Vec::new()).unwrap();
        let mut refund = line(LineKind::Refund, -500, 0);
        refund.key = "txn_2".into();
        refund.reference = "re_1".into();
        w.write(&line(LineKind::Charge, 4999, 175), "", 1).unwrap();
        w.write(&refund, "", 1).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        assert!(text.starts_with("id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n"));
        assert!(text.contains("txn_1,charge,pi_1,49.99,1.75,48.24,usd,2026-11-27 10:00:00,2026-11-29,charge"));
        let parsed = read_all(Format::Stripe, &text).unwrap();
        let mut first = line(LineKind::Charge, 4999, 175);
        first.line_no = 2;
        refund.line_no = 3;
        assert_eq!(parsed, vec![Parsed::Line(first), Parsed::Line(refund)]);
    }

    #[test]
    fn adyen_report_round_trips() {
        let mut w = ReportWriter::new(Format::Adyen, Vec::new()).unwrap();
        let mut refund = line(LineKind::Refund, -500, 0);
        refund.reference = "re_1".into();
        refund.intent = Some("pi_1".into());
        let mut payout = line(LineKind::Payout, -4324, 0);
        payout.reference = "po_1".into();
        w.write(&line(LineKind::Charge, 4999, 175), "pay_1", 7).unwrap();
        w.write(&refund, "pay_1", 7).unwrap();
        w.write(&payout, "", 7).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let parsed = read_all(Format::Adyen, &text).unwrap();
        let keys: Vec<_> = parsed
            .iter()
            .map(|p| match p {
                Parsed::Line(l) => (l.key.clone(), l.kind, l.reference.clone(), l.amount, l.fee),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ("7:pi_1:Settled:".into(), LineKind::Charge, "pi_1".into(), 4999, 175),
                ("7:pi_1:Refunded:re_1".into(), LineKind::Refund, "re_1".into(), -500, 0),
                (
                    "7:po_1:MerchantPayout:".into(),
                    LineKind::Payout,
                    "po_1".into(),
                    -4324,
                    0
                ),
            ]
        );
    }

    #[test]
    fn adyen_documented_columns_read() {
        // The Settlement Details Report's documented header, with a Settled line whose fees
        // are split over commission, markup, scheme fees and interchange.
        let text = "Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,Creation Date,TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),Commission (NC),Markup (NC),Scheme Fees (NC),Interchange (NC),Payment Method Variant,Modification Merchant Reference,Batch Number\n\
            TestCompany,TestMerchant,8515131751004933,order-1,mc,2026-11-27 07:12:44,CET,Settled,8515131751004933,EUR,,100.00,1,EUR,,97.10,0.12,2.00,0.13,0.65,mccredit,,42\n";
        let parsed = read_all(Format::Adyen, text).unwrap();
        let Parsed::Line(l) = &parsed[0] else {
            panic!("{parsed:?}")
        };
        assert_eq!((l.kind, l.amount, l.fee, l.line_no), (LineKind::Charge, 10000, 290, 2));
        assert_eq!(l.reference, "8515131751004933");
        // 07:12:44 CET is 06:12:44 UTC.
        assert_eq!(l.created, Utc.with_ymd_and_hms(2026, 11, 27, 6, 12, 44).unwrap());
    }

    fn lines(parsed: &[Parsed]) -> Vec<&Line> {
        parsed
            .iter()
            .map(|p| match p {
                Parsed::Line(l) => l,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn stripe_itemized_report_reads_by_category_and_payment_intent() {
        // Stripe's Reports API (balance_change_from_activity.itemized): no `type`, the charge
        // named by its ch_…, the PaymentIntent in its own column, `created` in the report's
        // zone and `created_utc` beside it.
        let text = "balance_transaction_id,created_utc,created,available_on_utc,currency,gross,fee,net,reporting_category,source_id,description,charge_id,payment_intent_id\n\
            txn_1,2026-11-27 10:00:00,2026-11-27 11:00:00,2026-11-29 00:00:00,usd,49.99,1.75,48.24,charge,ch_1,,ch_1,pi_1\n\
            txn_2,2026-11-27 10:05:00,2026-11-27 11:05:00,2026-11-29 00:00:00,usd,-5.00,0.00,-5.00,refund,re_1,,ch_1,pi_1\n\
            txn_3,2026-11-27 10:06:00,2026-11-27 11:06:00,2026-11-29 00:00:00,usd,-15.00,0.00,-15.00,dispute,du_1,,ch_1,pi_1\n\
            txn_4,2026-11-27 10:07:00,2026-11-27 11:07:00,2026-11-29 00:00:00,usd,-2.00,0.00,-2.00,fee,,Radar,,\n\
            txn_9,2026-11-27 10:07:30,2026-11-27 11:07:30,2026-11-29 00:00:00,usd,7.00,0.00,7.00,other_adjustment,,,,\n\
            txn_5,2026-11-27 10:08:00,2026-11-27 11:08:00,2026-11-29 00:00:00,usd,10.00,0.59,9.41,charge,ch_2,,ch_2,\n";
        let parsed = read_all(Format::Stripe, text).unwrap();
        let got: Vec<_> = lines(&parsed)
            .into_iter()
            .map(|l| (l.kind, l.reference.as_str(), l.intent.as_deref(), l.amount, l.fee))
            .collect();
        assert_eq!(
            got,
            vec![
                (LineKind::Charge, "pi_1", None, 4999, 175),
                (LineKind::Refund, "re_1", Some("pi_1"), -500, 0),
                (LineKind::Dispute, "du_1", Some("pi_1"), -1500, 0),
                // A fee of Stripe's own, about no transaction: what it kept.
                (LineKind::Other, "", None, 0, 200),
                // Any other line moved its amount and kept nothing.
                (LineKind::Other, "", None, 700, 0),
                // No PaymentIntent named: the charge stays what the report calls it.
                (LineKind::Charge, "ch_2", None, 1000, 59),
            ]
        );
        // With the column, a charge it leaves empty is not one payrail made: nothing to wait for.
        assert!(lines(&parsed).iter().all(|l| !l.charge_only));
        let Parsed::Line(first) = &parsed[0] else {
            unreachable!()
        };
        assert_eq!(first.created, Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap());
        assert_eq!(first.raw_type, "charge");
        // A category payrail does not know reads as a line it does not reconcile; an empty one
        // does not read; a charge must name what it is about.
        let text = "balance_transaction_id,created_utc,currency,gross,fee,net,reporting_category,source_id\n\
                    txn_6,2026-11-27 10:07:00,usd,-2.00,0.00,-2.00,fee,fee_1\n\
                    txn_7,2026-11-27 10:07:00,usd,-2.00,0.00,-2.00,,fee_2\n\
                    txn_8,2026-11-27 10:07:00,usd,2.00,0.00,2.00,charge,\n";
        let parsed = read_all(Format::Stripe, text).unwrap();
        assert!(
            matches!(&parsed[0], Parsed::Line(l) if l.kind == LineKind::Other && l.raw_type == "fee" && l.reference == "fee_1")
        );
        assert!(matches!(&parsed[1], Parsed::Malformed { reason, .. } if reason == "reporting_category is empty"));
        assert!(matches!(&parsed[2], Parsed::Malformed { line_no: 4, .. }), "{parsed:?}");
        // Neither `type` nor `reporting_category`: not a Stripe report payrail can read.
        assert_eq!(
            read_all(
                Format::Stripe,
                "balance_transaction_id,created_utc,currency,gross,fee,net,source_id\n"
            )
            .unwrap_err(),
            FileError::MissingColumn("type", "stripe")
        );
    }

    #[test]
    fn stripe_dashboard_export_reads() {
        // The Dashboard's balance export: capitalized names, `Created (UTC)` in minutes.
        let text = "id,Type,Source,Amount,Fee,Net,Currency,Created (UTC),Available On (UTC),Description\n\
                    txn_1,charge,pi_1,49.99,1.75,48.24,usd,2026-11-27 10:00,2026-11-29 00:00,order 1\n\
                    txn_2,charge,ch_2,10.00,0.59,9.41,usd,2026-11-27 10:01,2026-11-29 00:00,order 2\n\
                    txn_3,refund,re_3,-1.00,0.00,-1.00,usd,2026-11-27 10:02,2026-11-29 00:00,order 2\n";
        let parsed = read_all(Format::Stripe, text).unwrap();
        let got = lines(&parsed);
        // With no payment_intent_id column, a charge named by its charge may be named by its
        // PaymentIntent in the same report with the column; the others are what they are.
        let charge_only: Vec<bool> = got.iter().map(|l| l.charge_only).collect();
        assert_eq!(charge_only, [false, true, false]);
        assert_eq!(
            (got[0].kind, got[0].reference.as_str(), got[0].amount),
            (LineKind::Charge, "pi_1", 4999)
        );
        assert_eq!(got[0].created, Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap());
    }

    #[test]
    fn adyen_lines_about_no_transaction_read() {
        // A payout and an invoice's fee carry no PSP reference and only a net; a settled line
        // without its gross is still malformed.
        let text = "Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,Creation Date,TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),Commission (NC),Markup (NC),Scheme Fees (NC),Interchange (NC),Payment Method Variant,Modification Merchant Reference,Batch Number\n\
            TestCompany,TestMerchant,,Payout of batch 42,,2026-11-27 07:12:44,CET,MerchantPayout,,,,,,EUR,1000.00,,,,,,,,42\n\
            TestCompany,TestMerchant,,Invoice 2026-11,,2026-11-27 07:12:45,CET,Fee,,,,,,EUR,12.50,,,,,,,,42\n\
            TestCompany,TestMerchant,,Invoice 2026-12,,2026-11-27 07:12:46,CET,Fee,,,,,,EUR,3.00,,,,,,,,42\n\
            TestCompany,TestMerchant,,,,2026-11-27 07:12:48,CET,Fee,Fee refund November,,,,,EUR,,1.00,,,,,,,42\n\
            TestCompany,TestMerchant,,,,2026-11-27 07:12:49,CET,DepositCorrection,Deposit released,,,,,EUR,,250.00,,,,,,,42\n\
            TestCompany,TestMerchant,8515131751004933,order-1,mc,2026-11-27 07:12:47,CET,Settled,,,,,,EUR,,97.10,,,,,,,42\n";
        let parsed = read_all(Format::Adyen, text).unwrap();
        assert!(matches!(&parsed[5], Parsed::Malformed { line_no: 7, .. }), "{parsed:?}");
        let got: Vec<_> = lines(&parsed[..5])
            .into_iter()
            .map(|l| (l.key.as_str(), l.kind, l.reference.as_str(), l.amount, l.fee))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "42::MerchantPayout::Payout of batch 42",
                    LineKind::Payout,
                    "",
                    -100_000,
                    0
                ),
                // What the PSP kept: no gross, its net is the fee.
                ("42::Fee::Invoice 2026-11", LineKind::Other, "", 0, 1250),
                ("42::Fee::Invoice 2026-12", LineKind::Other, "", 0, 300),
                // A fee given back; a description where the reference would be.
                (
                    "42::Fee:Fee refund November",
                    LineKind::Other,
                    "Fee refund November",
                    0,
                    -100
                ),
                // Not a fee: it moved its net, and the PSP kept nothing of it.
                (
                    "42::DepositCorrection:Deposit released",
                    LineKind::Other,
                    "Deposit released",
                    25_000,
                    0
                ),
            ]
        );
        // Without the Merchant Reference column, a line with neither reference has no key that
        // the same report with the column would give it: it is not read.
        let text = "Psp Reference,Creation Date,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),Net Currency,Net Debit (NC),Net Credit (NC),Batch Number\n\
                    ,2026-11-27 07:12:45,Fee,,,,,EUR,12.50,,42\n";
        let parsed = read_all(Format::Adyen, text).unwrap();
        assert!(
            matches!(&parsed[0], Parsed::Malformed { reason, .. } if reason.contains("Merchant Reference")),
            "{parsed:?}"
        );
        // A file without the Modification Reference column, part of every line's key, is not
        // read at all.
        let text = "Psp Reference,Merchant Reference,Creation Date,Type,Gross Currency,Gross Debit (GC),Gross Credit (GC),Net Currency,Net Debit (NC),Net Credit (NC),Batch Number\n";
        assert_eq!(
            read_all(Format::Adyen, text).unwrap_err(),
            FileError::MissingColumn("Modification Reference", "adyen")
        );
    }

    #[test]
    fn bad_fields_make_a_malformed_line_and_the_rest_goes_on() {
        let text = "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n\
                    txn_1,charge,pi_1,1.00,0.10,0.90,usd,2026-11-27 10:00:00,,charge\n\
                    txn_2,charge,pi_2,1.0x,0.10,0.90,usd,2026-11-27 10:00:00,,charge\n\
                    txn_3,charge,pi_3,1.00,0.10,0.80,usd,2026-11-27 10:00:00,,charge\n\
                    txn_4,charge,pi_4,1.00,0.10,0.90,xyz,2026-11-27 10:00:00,,charge\n\
                    txn_5,charge,pi_5,1.00,0.10,0.90,usd,yesterday,,charge\n\
                    ,charge,pi_6,1.00,0.10,0.90,usd,2026-11-27 10:00:00,,charge\n\
                    txn_7,charge,pi_7,1.00,0.10,0.90,usd,1795000000,,charge\n";
        let parsed = read_all(Format::Stripe, text).unwrap();
        let malformed: Vec<u64> = parsed
            .iter()
            .filter_map(|p| match p {
                Parsed::Malformed { line_no, .. } => Some(*line_no),
                _ => None,
            })
            .collect();
        assert_eq!(malformed, vec![3, 4, 5, 6, 7]);
        assert!(matches!(&parsed[0], Parsed::Line(l) if l.amount == 100));
        assert!(matches!(&parsed[6], Parsed::Line(l) if l.key == "txn_7"));
    }

    #[test]
    fn a_file_that_cannot_be_followed_is_refused() {
        assert_eq!(read_all(Format::Stripe, "").unwrap_err(), FileError::Empty);
        assert_eq!(
            read_all(Format::Stripe, "id,type,source,amount\n").unwrap_err(),
            FileError::MissingColumn("fee", "stripe")
        );
        assert!(matches!(
            read_all(Format::Adyen, "id,type,source,amount,fee,net,currency,created\n").unwrap_err(),
            FileError::MissingColumn("Psp Reference", "adyen")
        ));
        let ragged = "id,type,source,amount,fee,net,currency,created\n\
                      txn_1,charge,pi_1,1.00,0.10,0.90,usd,2026-11-27 10:00:00\n\
                      txn_2,charge,pi_2\n";
        assert_eq!(
            read_all(Format::Stripe, ragged).unwrap_err(),
            FileError::Structure {
                line: 3,
                reason: "3 fields where the header has 8".into()
            }
        );
        let not_utf8: &[u8] = b"id,type,source,amount,fee,net,currency,created\ntxn_\xff,charge,pi,1,0,1,usd,1\n";
        let mut r = ReportReader::new(Format::Stripe, not_utf8).unwrap();
        assert!(matches!(r.next_line(), Some(Err(FileError::Structure { line: 2, .. }))));
    }

    #[test]
    fn a_quote_left_open_is_refused_before_the_rest_of_the_file_is_held() {
        let header = "id,type,source,amount,fee,net,currency,created\n";
        let good = "txn_1,charge,pi_1,1.00,0.10,0.90,usd,2026-11-27 10:00:00\n";
        // Far more than one record may take, in lines of an ordinary size: read to the end.
        let many = good.repeat((3 * MAX_RECORD_BYTES as usize) / good.len());
        let parsed = read_all(Format::Stripe, &format!("{header}{many}")).unwrap();
        assert_eq!(parsed.len(), many.lines().count());
        // A quote opened on line 3 and never closed: the file is refused there, not read whole
        // into one record.
        let open = format!("{header}{good}\"txn_2,charge,{}", good.repeat(40_000));
        assert!(open.len() as u64 > 2 * MAX_RECORD_BYTES);
        match read_all(Format::Stripe, &open).unwrap_err() {
            FileError::Structure { line, reason } => {
                assert_eq!(line, 3);
                assert!(reason.contains("quote left open"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_card_number_in_a_line_is_never_read() {
        let text = "id,type,source,amount,fee,net,currency,created\n\
                    txn_1,charge,4242424242424242,1.00,0,1.00,usd,2026-11-27 10:00:00\n";
        let parsed = read_all(Format::Stripe, text).unwrap();
        match &parsed[0] {
            Parsed::Malformed { line_no, key, reason } => {
                assert_eq!((*line_no, key), (2, &None));
                assert!(!reason.contains("4242"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn time_zones_read() {
        assert_eq!(zone_offset("CET"), Some(3600));
        assert_eq!(zone_offset("-05:30"), Some(-(5 * 3600 + 1800)));
        assert_eq!(zone_offset(""), Some(0));
        assert_eq!(zone_offset("America/New_York"), None);
    }

    #[test]
    fn quoted_fields_read() {
        let text = "id,type,source,amount,fee,net,currency,created\n\
                    \"txn_1\",\"charge\",\"pi_1\",\"1,000.00\",0,1000.00,usd,2026-11-27 10:00:00\n\
                    \"txn_2\",\"charge\",\"pi_2\",\"1000.00\",0,1000.00,usd,2026-11-27 10:00:00\n";
        let parsed = read_all(Format::Stripe, text).unwrap();
        assert!(matches!(&parsed[0], Parsed::Malformed { line_no: 2, .. }));
        assert!(matches!(&parsed[1], Parsed::Line(l) if l.amount == 100_000));
    }
}
