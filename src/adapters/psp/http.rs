//! HTTP to PSPs: actix's own client, one per arbiter thread (it is not `Send`; PSP calls run on
//! the payment actor's thread), no redirects, answers read up to 1 MiB. What could not be sent
//! at all is told apart from what may have reached the PSP: only the first is `NotSent`.

use std::time::Duration;

use serde_json::Value;

use super::PspError;

/// The most of an answer payrail reads.
const MAX_ANSWER_BYTES: usize = 1 << 20;

thread_local! {
    static CLIENT: awc::Client = awc::Client::builder()
        // The payment flow bounds every call by `[psp] timeout_ms`; this is only a backstop.
        .timeout(Duration::from_secs(120))
        .disable_redirects()
        .finish();
}

/// A request to build: method, URL and headers.
pub fn request(method: &str, url: &str, headers: &[(&str, String)]) -> awc::ClientRequest {
    let mut req = CLIENT.with(|c| match method {
        "GET" => c.get(url),
        _ => c.post(url),
    });
    for (k, v) in headers {
        req = req.insert_header((*k, v.clone()));
    }
    req
}

/// The answer's status and JSON body (`Null` when it is not JSON), or what went wrong on the
/// way: no connection made is `NotSent` (nothing reached the PSP), anything after is
/// `Unavailable` (it may have).
pub async fn answer(
    who: &str,
    sent: Result<
        awc::ClientResponse<impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>>>,
        awc::error::SendRequestError,
    >,
) -> Result<Answer, PspError> {
    let mut resp = match sent {
        Ok(r) => r,
        Err(awc::error::SendRequestError::Connect(e)) => return Err(PspError::NotSent(format!("{who}: {e}"))),
        Err(awc::error::SendRequestError::Url(e)) => {
            return Err(PspError::NotSent(format!("{who}: bad api_base: {e}")))
        }
        Err(e) => return Err(PspError::Unavailable(format!("{who}: {e}"))),
    };
    let status = resp.status().as_u16();
    // Stripe marks an answer it replays for a key it already saw.
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    // Adyen marks an answer whose request may succeed if sent again (one still in progress).
    let transient = resp
        .headers()
        .get("transient-error")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let body = resp
        .body()
        .limit(MAX_ANSWER_BYTES)
        .await
        .map_err(|e| PspError::Unavailable(format!("{who}: the answer could not be read: {e}")))?;
    Ok(Answer {
        status,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        replayed,
        transient,
    })
}

/// A PSP's answer: its status, its JSON body (`Null` when it is not JSON), and whether it is
/// the saved answer to a key already used (`Idempotent-Replayed: true`), or one to send again
/// later (`transient-error: true`).
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub replayed: bool,
    pub transient: bool,
}
