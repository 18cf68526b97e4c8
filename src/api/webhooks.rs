//! `POST /internal/webhooks/psp/{provider}`: PSP webhooks, verified, then published to
//! JetStream (`Nats-Msg-Id` = the PSP's event id) and only then answered 200. NATS down is a
//! 503 so the PSP retries; a bad signature, stale timestamp or malformed body is a 400 and
//! nothing is published.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{body, json_value, AppState};
use crate::adapters::nats::PspEvent;
use crate::adapters::psp::signature::{verify_adyen, verify_stripe, AdyenFields};
use crate::api::error::ApiError;

/// PSP payloads can be larger than the API's requests; still bounded.
const WEBHOOK_BODY_LIMIT: usize = 256 * 1024;

fn signature_invalid(message: &str) -> ApiError {
    ApiError::invalid("signature_invalid", message, None)
}

fn malformed(message: &str) -> ApiError {
    ApiError::invalid("body_invalid", message, None)
}

/// An id, type or reference payrail carries as a NATS header, a key and a column: 1 to 255
/// printable ASCII characters (no control characters, no NUL), or absent for a reference.
fn printable(s: &str) -> bool {
    s.len() <= 255 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Refuses an event whose identifiers could not travel: at the door, with nothing published.
fn checked(e: PspEvent) -> Result<PspEvent, ApiError> {
    if e.event_id.is_empty() || !printable(&e.event_id) {
        return Err(malformed("the event id must be 1 to 255 printable ASCII characters"));
    }
    if e.event_type.is_empty() || !printable(&e.event_type) {
        return Err(malformed("the event type must be 1 to 255 printable ASCII characters"));
    }
    if !printable(&e.reference) {
        return Err(malformed(
            "the object reference must be printable ASCII, at most 255 characters",
        ));
    }
    Ok(e)
}

pub async fn receive(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let provider = req.match_info().get("provider").unwrap_or_default().to_owned();
    if !matches!(provider.as_str(), "sandbox" | "stripe" | "adyen") {
        return Err(ApiError::NotFound("route"));
    }
    let raw = body::read(&req, payload, WEBHOOK_BODY_LIMIT).await?;
    let w = &state.config.webhooks;
    let events = match provider.as_str() {
        "adyen" => adyen_events(&w.adyen_hmac_key, &raw)?,
        _ => vec![stripe_event(
            &state,
            &req,
            &provider,
            &raw,
            &[w.secret.as_str(), w.previous_secret.as_str()],
        )?],
    };
    publish(&state, &provider, &events).await
}

/// `POST /internal/webhooks/psp/{provider}/{connector_id}`: one connector's webhooks, verified
/// with that connector's own secret (`webhook_secret`, or `hmac_key` for Adyen, in its sealed
/// credentials); a connector with none is verified with `[webhooks]`' secrets, as the
/// provider's own URL is.
pub async fn receive_for_connector(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let provider = req.match_info().get("provider").unwrap_or_default().to_owned();
    let id = req.match_info().get("connector_id").unwrap_or_default().to_owned();
    if !matches!(provider.as_str(), "sandbox" | "stripe" | "adyen") {
        return Err(ApiError::NotFound("route"));
    }
    if !id.starts_with("mca_") || id.len() > 64 {
        return Err(ApiError::NotFound("connector"));
    }
    let connector = state.db.connector(&id).await?;
    let connector = connector
        .filter(|c| c.psp == provider)
        .ok_or(ApiError::NotFound("connector"))?;
    let raw = body::read(&req, payload, WEBHOOK_BODY_LIMIT).await?;
    let own = super::connectors::webhook_secret(&state, &connector).await?;
    let w = &state.config.webhooks;
    let mut events = match (provider.as_str(), own.as_deref()) {
        ("adyen", Some(key)) => adyen_events(key, &raw)?,
        ("adyen", None) => adyen_events(&w.adyen_hmac_key, &raw)?,
        (_, Some(secret)) => vec![stripe_event(&state, &req, &provider, &raw, &[secret])?],
        (_, None) => vec![stripe_event(
            &state,
            &req,
            &provider,
            &raw,
            &[w.secret.as_str(), w.previous_secret.as_str()],
        )?],
    };
    // Verified with this connector's own secret: such an event may change only its merchant's
    // payments, and its JetStream dedupe id is the connector's own, so a forged id can never
    // hide another connector's real event.
    if own.is_some() {
        for e in &mut events {
            e.merchant = Some(connector.merchant_id.to_string());
        }
        return publish_as(&state, &provider, &events, Some(&connector.id)).await;
    }
    publish(&state, &provider, &events).await
}

/// Publishes verified events to JetStream, and only then answers the PSP.
async fn publish(state: &AppState, provider: &str, events: &[PspEvent]) -> Result<HttpResponse, ApiError> {
    publish_as(state, provider, events, None).await
}

/// [`publish`], the JetStream message ids prefixed with `scope` when given.
async fn publish_as(
    state: &AppState,
    provider: &str,
    events: &[PspEvent],
    scope: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let timeout = Duration::from_millis(state.config.nats.publish_timeout_ms);
    let mut duplicates = 0;
    for e in events {
        let id = match scope {
            Some(scope) => format!("{scope}:{}", e.event_id),
            None => e.event_id.clone(),
        };
        match state
            .nats
            .publish_psp_event_as(e, &id, state.config.nats.partitions, timeout)
            .await
        {
            Ok(duplicate) => duplicates += usize::from(duplicate),
            Err(err) => {
                tracing::warn!(provider = %provider, event_id = %e.event_id, error = %err, "webhook not published; the PSP will retry");
                state.metrics.psp_event(provider, "unpublished");
                return Err(ApiError::Unavailable("nats"));
            }
        }
        state.metrics.psp_event(provider, "received");
    }
    if provider == "adyen" {
        // Adyen's documented acknowledgement.
        return Ok(HttpResponse::Ok().content_type("text/plain").body("[accepted]"));
    }
    Ok(json_value(
        200,
        &serde_json::json!({ "received": events.len(), "duplicates": duplicates }),
    ))
}

/// A Stripe-format event (Stripe's, or the sandbox's), verified against the current and the
/// previous secret.
fn stripe_event(
    state: &AppState,
    req: &HttpRequest,
    provider: &str,
    raw: &[u8],
    secrets: &[&str],
) -> Result<PspEvent, ApiError> {
    let header = req
        .headers()
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| signature_invalid("the Stripe-Signature header is missing"))?;
    let w = &state.config.webhooks;
    let now = chrono::Utc::now().timestamp();
    verify_stripe(header, raw, secrets, w.tolerance_seconds as i64, now)
        .map_err(|e| signature_invalid(&e.to_string()))?;
    stripe_event_of(provider, raw)
}

/// The event of a verified Stripe-format body.
fn stripe_event_of(provider: &str, raw: &[u8]) -> Result<PspEvent, ApiError> {
    // The body is a JSON object (a derived struct would also take an array).
    if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(malformed("the event is not a JSON object"));
    }
    let event: StripeEnvelope = serde_json::from_slice(raw).map_err(|_| malformed("the event is not valid JSON"))?;
    let text = |v: Option<&RawValue>| v.and_then(|v| serde_json::from_str::<String>(v.get()).ok());
    let id = text(event.id)
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| malformed("the event has no id"))?;
    let event_type = text(event.event_type)
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| malformed("the event has no type"))?;
    let data: Option<StripeData> = event
        .data
        .filter(|d| d.get().starts_with('{'))
        .map(|d| serde_json::from_str(d.get()))
        .transpose()
        .map_err(|_| malformed("the event is not valid JSON"))?;
    let object = data
        .and_then(|d| d.object)
        .filter(|o| o.get().starts_with('{'))
        .ok_or_else(|| malformed("the event has no data.object"))?;
    // The object is read whole, as the consumer will read it: skimming alone lets through what
    // it cannot read (a lone surrogate escape), and an object it cannot read has no fields.
    let parsed: Value = serde_json::from_str(object.get()).map_err(|_| malformed("the event is not valid JSON"))?;
    // docs/API.md: data.object.id for payment_intent.* and payout.*, data.object.payment_intent
    // for charge.*. It is passed on as sent.
    let reference = if event_type.starts_with("payment_intent.") || event_type.starts_with("payout.") {
        parsed.get("id")
    } else {
        parsed.get("payment_intent")
    };
    checked(PspEvent {
        provider: provider.to_owned(),
        event_id: id,
        event_type,
        reference: reference.and_then(Value::as_str).unwrap_or_default().to_owned(),
        object: object.get().as_bytes().to_vec(),
        raw: raw.to_vec(),
        merchant: None,
        unrecorded: false,
    })
}

/// A Stripe-format event as far as the bridge reads it: members are borrowed from the body and
/// parsed only when read, so no tree of the whole event is built (a webhook per payment).
#[derive(Deserialize)]
struct StripeEnvelope<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow, default)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StripeData<'a> {
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
}

/// The most items an Adyen notification may carry (Adyen batches at most six): each becomes an
/// event that carries the whole body, published one after another.
const MAX_ADYEN_ITEMS: usize = 6;

/// Adyen notifications: each item verified by its own HMAC; any bad one refuses the request.
fn adyen_events(key: &str, raw: &[u8]) -> Result<Vec<PspEvent>, ApiError> {
    if key.is_empty() {
        return Err(signature_invalid("no Adyen HMAC key is configured"));
    }
    let body: Value = serde_json::from_slice(raw).map_err(|_| malformed("the notification is not valid JSON"))?;
    let items = body["notificationItems"]
        .as_array()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| malformed("no notificationItems"))?;
    if items.len() > MAX_ADYEN_ITEMS {
        return Err(malformed("more than 6 notificationItems"));
    }
    let mut events = Vec::with_capacity(items.len());
    for item in items {
        let n = &item["NotificationRequestItem"];
        let s = |k: &str| n[k].as_str().unwrap_or_default();
        let value = n["amount"]["value"].as_i64().map(|v| v.to_string()).unwrap_or_default();
        let fields = AdyenFields {
            psp_reference: s("pspReference"),
            original_reference: s("originalReference"),
            merchant_account_code: s("merchantAccountCode"),
            merchant_reference: s("merchantReference"),
            value: &value,
            currency: n["amount"]["currency"].as_str().unwrap_or_default(),
            event_code: s("eventCode"),
            success: s("success"),
        };
        let signature = n["additionalData"]["hmacSignature"]
            .as_str()
            .ok_or_else(|| signature_invalid("an item has no hmacSignature"))?;
        verify_adyen(&fields, key, signature).map_err(|e| signature_invalid(&e.to_string()))?;
        if fields.psp_reference.is_empty() || fields.event_code.is_empty() {
            return Err(malformed("an item has no pspReference or eventCode"));
        }
        let reference = if fields.original_reference.is_empty() {
            fields.psp_reference
        } else {
            fields.original_reference
        };
        events.push(checked(PspEvent {
            provider: "adyen".into(),
            event_id: format!("{}:{}", fields.psp_reference, fields.event_code),
            event_type: format!("adyen.{}", fields.event_code.to_ascii_lowercase()),
            reference: reference.to_owned(),
            object: serde_json::to_vec(n).unwrap_or_default(),
            raw: raw.to_vec(),
            merchant: None,
            unrecorded: false,
        })?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Result<PspEvent, String> {
        stripe_event_of("sandbox", raw.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_payment_intent_event_is_found_by_its_object_id_and_the_object_passes_as_sent() {
        let raw = r#"{ "id": "evt_1", "type": "payment_intent.succeeded", "created": 1,
                      "data": { "object": {"id": "pi_\u0041", "amount": 100, "nested": {"id": "no"}} } }"#;
        let e = parsed(raw).unwrap();
        assert_eq!(
            (e.event_id.as_str(), e.event_type.as_str(), e.reference.as_str()),
            ("evt_1", "payment_intent.succeeded", "pi_A")
        );
        assert_eq!(
            std::str::from_utf8(&e.object).unwrap(),
            r#"{"id": "pi_\u0041", "amount": 100, "nested": {"id": "no"}}"#
        );
        assert_eq!(e.raw, raw.as_bytes());
        assert_eq!(e.provider, "sandbox");
    }

    #[test]
    fn a_charge_event_is_found_by_its_payment_intent_and_a_missing_one_is_no_reference() {
        let e = parsed(
            r#"{"id":"evt_2","type":"charge.dispute.created","data":{"object":{"id":"dp_1","payment_intent":"pi_9"}}}"#,
        )
        .unwrap();
        assert_eq!(e.reference, "pi_9");
        // An expanded (object) payment_intent, or none, names no payment.
        for object in [r#"{"id":"dp_1","payment_intent":{"id":"pi_9"}}"#, r#"{"id":"dp_1"}"#] {
            let raw = format!(r#"{{"id":"evt_3","type":"charge.dispute.created","data":{{"object":{object}}}}}"#);
            assert_eq!(parsed(&raw).unwrap().reference, "");
        }
    }

    #[test]
    fn an_adyen_notification_carries_at_most_six_items() {
        let key = "44782def547aaa06c910c43932b1eb0c71fc68d9d0c057550c48ec2acf6ba056";
        let body = |n: usize| {
            let items: Vec<Value> = (0..n)
                .map(|i| {
                    let psp = format!("psp{i}");
                    let fields = AdyenFields {
                        psp_reference: &psp,
                        merchant_account_code: "M",
                        merchant_reference: "r",
                        value: "100",
                        currency: "EUR",
                        event_code: "AUTHORISATION",
                        success: "true",
                        ..Default::default()
                    };
                    let signature = crate::adapters::psp::signature::sign_adyen(&fields, key).unwrap();
                    serde_json::json!({ "NotificationRequestItem": {
                        "pspReference": psp, "merchantAccountCode": "M", "merchantReference": "r",
                        "amount": { "value": 100, "currency": "EUR" }, "eventCode": "AUTHORISATION",
                        "success": "true", "additionalData": { "hmacSignature": signature } } })
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({ "live": "false", "notificationItems": items })).unwrap()
        };
        assert_eq!(adyen_events(key, &body(6)).map(|e| e.len()).ok(), Some(6));
        let seven = adyen_events(key, &body(7)).map(|e| e.len()).unwrap_err();
        assert!(seven.to_string().contains("more than 6"), "{seven}");
    }

    #[test]
    fn an_event_without_a_text_id_a_text_type_or_an_object_is_malformed() {
        for (raw, why) in [
            ("not json", "not a JSON object"),
            (r#"["evt_1","x.y",{"object":{"id":"pi_1"}}]"#, "not a JSON object"),
            (
                r#"{"id":"evt_1","type":"x.y","data":[{"object":{}}]}"#,
                "has no data.object",
            ),
            (
                r#"{"id":"evt_1","type":"x.y","data":{"object":{"id":"pi_\ud800"}}}"#,
                "not valid JSON",
            ),
            (
                r#"{"id":"evt_1","type":"x.y","data":{"object":{"id":"pi_1"}"#,
                "not valid JSON",
            ),
            (r#"{"type":"x.y","data":{"object":{}}}"#, "has no id"),
            (r#"{"id":7,"type":"x.y","data":{"object":{}}}"#, "has no id"),
            (r#"{"id":"","type":"x.y","data":{"object":{}}}"#, "has no id"),
            (r#"{"id":"evt_1","type":null,"data":{"object":{}}}"#, "has no type"),
            (r#"{"id":"evt_1","type":"x.y"}"#, "has no data.object"),
            (
                r#"{"id":"evt_1","type":"x.y","data":{"object":[1]}}"#,
                "has no data.object",
            ),
            (
                r#"{"id":"evt_1","type":"x.y","data":{"object":"pi_1"}}"#,
                "has no data.object",
            ),
            (
                r#"{"id":"evt\u0001","type":"x.y","data":{"object":{}}}"#,
                "printable ASCII",
            ),
        ] {
            let e = parsed(raw).unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
        }
        let long = format!(
            r#"{{"id":"{}","type":"x.y","data":{{"object":{{}}}}}}"#,
            "e".repeat(256)
        );
        assert!(parsed(&long).unwrap_err().contains("has no id"));
    }
}
