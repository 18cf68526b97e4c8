//! Reading and validating request bodies. Bodies are parsed into a JSON value and checked
//! field by field, so every error names its parameter and none repeats what was sent: a card
//! number pasted into any field can never come back in an error.

use actix_web::web::{self, Bytes, BytesMut};
use actix_web::HttpRequest;
use futures_util::StreamExt;
use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::domain::card::contains_pan;
use crate::domain::{Currency, Money, MAX_AMOUNT};

/// Reads the body, refusing anything above `limit` bytes with 413 before it is all buffered.
pub async fn read(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.map(|n| n > limit).unwrap_or(false) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::invalid("body_invalid", "the request body could not be read", None))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// A JSON object; an empty body counts as `{}`.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(
            "body_invalid",
            "the request body must be a JSON object",
            None,
        )),
        Err(_) => Err(ApiError::invalid(
            "body_invalid",
            "the request body is not valid JSON",
            None,
        )),
    }
}

/// The fields of one JSON object, checked against the names a route accepts.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// Refuses parameters the route does not know, as Stripe does.
    pub fn new(obj: &'a Map<String, Value>, allowed: &[&str], prefix: &'a str) -> Result<Fields<'a>, ApiError> {
        for k in obj.keys() {
            if !allowed.contains(&k.as_str()) {
                let param = (!contains_pan(k) && k.len() <= 64).then(|| format!("{prefix}{k}"));
                return Err(ApiError::invalid("parameter_unknown", "unknown parameter", param));
            }
        }
        Ok(Fields { obj, prefix })
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn present(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// An optional string of at most `max` characters, refused if it holds a card number.
    pub fn opt_str(&self, field: &str, max: usize) -> Result<Option<&'a str>, ApiError> {
        let Some(v) = self.present(field) else { return Ok(None) };
        let s = v
            .as_str()
            .ok_or_else(|| ApiError::param(&self.name(field), format!("{} must be a string", self.name(field))))?;
        if s.is_empty() || s.chars().count() > max {
            return Err(ApiError::param(
                &self.name(field),
                format!("{} must be 1 to {max} characters", self.name(field)),
            ));
        }
        no_card_data(&self.name(field), s)?;
        Ok(Some(s))
    }

    pub fn req_str(&self, field: &str, max: usize) -> Result<&'a str, ApiError> {
        self.opt_str(field, max)?.ok_or_else(|| {
            ApiError::invalid(
                "parameter_missing",
                format!("{} is required", self.name(field)),
                self.name(field),
            )
        })
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, ApiError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::param(
                &self.name(field),
                format!("{} must be true or false", self.name(field)),
            )),
        }
    }

    /// An optional integer in `range`.
    pub fn opt_int(&self, field: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.present(field) else { return Ok(None) };
        match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::param(
                &self.name(field),
                format!("{} must be an integer from {min} to {max}", self.name(field)),
            )),
        }
    }

    /// `{ "value": integer, "currency": "USD" }`: 1 ≤ value ≤ 99,999,999,999, currency upper-case
    /// ISO 4217 and one this deployment accepts.
    pub fn opt_amount(&self, field: &str, accepted: &[Currency]) -> Result<Option<Money>, ApiError> {
        let Some(v) = self.present(field) else { return Ok(None) };
        let name = self.name(field);
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::param(&name, format!("{name} must be an object with value and currency")))?;
        let inner_prefix = format!("{name}.");
        let inner = Fields::new(obj, &["value", "currency"], &inner_prefix)?;
        let value_param = format!("{name}.value");
        let value = match inner.present("value") {
            Some(Value::Number(n)) => n.as_i64().filter(|v| (1..=MAX_AMOUNT).contains(v)),
            _ => None,
        }
        .ok_or_else(|| {
            ApiError::invalid(
                "amount_invalid",
                format!("{value_param} must be an integer from 1 to {MAX_AMOUNT}"),
                value_param,
            )
        })?;
        let currency_param = format!("{name}.currency");
        let currency = inner
            .present("currency")
            .and_then(Value::as_str)
            .and_then(Currency::parse)
            .filter(|c| accepted.contains(c))
            .ok_or_else(|| {
                ApiError::invalid(
                    "currency_invalid",
                    format!("{currency_param} must be an accepted ISO 4217 code in upper case"),
                    currency_param,
                )
            })?;
        Ok(Some(Money::new(value, currency)))
    }

    /// The customer's risk signals: `{ "email"?, "ip"?, "country"? }`, each checked.
    pub fn opt_customer(&self, field: &str) -> Result<Option<crate::domain::risk::Customer>, ApiError> {
        let Some(v) = self.present(field) else { return Ok(None) };
        let name = self.name(field);
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::param(&name, format!("{name} must be an object")))?;
        let inner_prefix = format!("{name}.");
        let inner = Fields::new(obj, &["email", "ip", "country"], &inner_prefix)?;
        let email = inner.opt_str("email", 254)?;
        if let Some(e) = email {
            // No spaces or control characters: lists and velocity read one spelling of an
            // address, and `a@risky.example ` must not pass a list of `risky.example`.
            let ok = !e.chars().any(|c| c.is_whitespace() || c.is_control())
                && e.split_once('@')
                    .map(|(l, d)| !l.is_empty() && d.trim_end_matches('.').contains('.'))
                    .unwrap_or(false);
            if !ok {
                return Err(ApiError::param(
                    &format!("{name}.email"),
                    "email must be an email address",
                ));
            }
        }
        let ip = inner.opt_str("ip", 45)?;
        if let Some(ip) = ip {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(ApiError::param(
                    &format!("{name}.ip"),
                    "ip must be an IPv4 or IPv6 address",
                ));
            }
        }
        let country = inner.opt_str("country", 2)?;
        if let Some(c) = country {
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ApiError::param(
                    &format!("{name}.country"),
                    "country must be an ISO 3166-1 alpha-2 code in upper case",
                ));
            }
        }
        Ok(Some(crate::domain::risk::Customer {
            // A domain's trailing dot (`risky.example.`, the same domain) is not kept.
            email: email.map(|e| e.trim_end_matches('.').to_ascii_lowercase()),
            // One form per address (`::ffff:1.2.3.4` is 1.2.3.4; IPv6 compressed, lower case), so
            // that lists and velocity see one address once.
            ip: ip.map(crate::domain::risk::canonical_ip),
            country: country.map(str::to_owned),
        }))
    }

    pub fn req_amount(&self, field: &str, accepted: &[Currency]) -> Result<Money, ApiError> {
        self.opt_amount(field, accepted)?.ok_or_else(|| {
            ApiError::invalid(
                "parameter_missing",
                format!("{} is required", self.name(field)),
                self.name(field),
            )
        })
    }

    /// A `pm_…` token. Anything else is refused without repeating it; a card number gets its
    /// own message, since it must be tokenized first.
    pub fn opt_payment_method(&self, field: &str) -> Result<Option<&'a str>, ApiError> {
        let Some(v) = self.present(field) else { return Ok(None) };
        let name = self.name(field);
        let s = v.as_str().ok_or_else(|| {
            ApiError::invalid(
                "payment_method_invalid",
                format!("{name} must be a pm_ token"),
                name.clone(),
            )
        })?;
        let numeric = s.len() >= 12 && s.bytes().all(|b| b.is_ascii_digit() || b == b' ' || b == b'-');
        if contains_pan(s) || numeric {
            return Err(ApiError::invalid(
                "payment_method_invalid",
                format!("{name} must be a pm_ token: card numbers are never accepted here; tokenize the card first"),
                name,
            ));
        }
        let body = s.strip_prefix("pm_").unwrap_or("");
        if body.is_empty() || body.len() > 100 || !body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ApiError::invalid(
                "payment_method_invalid",
                format!("{name} must be a pm_ token"),
                name,
            ));
        }
        Ok(Some(s))
    }

    /// Up to 50 string keys of at most 40 characters, with string values of at most 500.
    pub fn opt_metadata(&self, field: &str) -> Result<Option<std::collections::BTreeMap<String, String>>, ApiError> {
        let Some(v) = self.present(field) else { return Ok(None) };
        let name = self.name(field);
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::param(&name, format!("{name} must be an object of strings")))?;
        if obj.len() > 50 {
            return Err(ApiError::param(&name, format!("{name} may have at most 50 keys")));
        }
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in obj {
            if k.is_empty() || k.chars().count() > 40 {
                return Err(ApiError::param(
                    &name,
                    format!("{name} keys must be 1 to 40 characters"),
                ));
            }
            no_card_data(&name, k)?;
            let s = v
                .as_str()
                .ok_or_else(|| ApiError::param(&name, format!("{name} values must be strings")))?;
            if s.chars().count() > 500 {
                return Err(ApiError::param(
                    &name,
                    format!("{name} values must be at most 500 characters"),
                ));
            }
            no_card_data(&name, s)?;
            out.insert(k.clone(), s.to_owned());
        }
        Ok(Some(out))
    }
}

/// Refuses free text that holds a card number (payrail must never store one) or a NUL
/// character (PostgreSQL's text and jsonb cannot hold one).
pub fn no_card_data(param: &str, s: &str) -> Result<(), ApiError> {
    if s.contains('\0') {
        return Err(ApiError::invalid(
            "parameter_invalid",
            format!("{param} must not contain NUL characters"),
            param.to_owned(),
        ));
    }
    if contains_pan(s) {
        return Err(ApiError::invalid(
            "card_data_not_allowed",
            format!("{param} looks like a card number; card data is never accepted"),
            param.to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn usd() -> Vec<Currency> {
        vec![Currency::parse("USD").unwrap(), Currency::parse("JPY").unwrap()]
    }

    fn amount(v: Value) -> Result<Option<Money>, ApiError> {
        let obj = json!({ "amount": v });
        let obj = obj.as_object().unwrap();
        Fields::new(obj, &["amount"], "").unwrap().opt_amount("amount", &usd())
    }

    #[test]
    fn amounts_must_be_positive_integers_within_the_limit() {
        assert_eq!(
            amount(json!({"value": 1, "currency": "USD"})).unwrap().unwrap().minor,
            1
        );
        assert_eq!(
            amount(json!({"value": 99_999_999_999i64, "currency": "JPY"}))
                .unwrap()
                .unwrap()
                .minor,
            99_999_999_999
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(10.5),
            json!(1.0),
            json!(100_000_000_000i64),
            json!(9_223_372_036_854_775_808u64),
            json!("100"),
            json!(null),
        ] {
            let e = amount(json!({"value": bad, "currency": "USD"})).unwrap_err();
            assert_eq!((e.code(), e.status().as_u16()), ("amount_invalid", 400), "{bad}");
        }
        let huge: Value =
            serde_json::from_str(r#"{"value": 1000000000000000000000000000000, "currency": "USD"}"#).unwrap();
        assert_eq!(amount(huge).unwrap_err().code(), "amount_invalid");
    }

    #[test]
    fn currencies_must_be_accepted_upper_case_codes() {
        for bad in ["usd", "EUR", "XXX", ""] {
            let e = amount(json!({"value": 1, "currency": bad})).unwrap_err();
            assert_eq!(e.code(), "currency_invalid", "{bad}");
        }
        assert_eq!(
            amount(json!({"value": 1, "currency": "USD", "x": 1}))
                .unwrap_err()
                .code(),
            "parameter_unknown"
        );
    }

    #[test]
    fn a_card_number_is_refused_and_never_echoed() {
        let obj = json!({ "payment_method": "4242424242424242", "description": "card 4242 4242 4242 4242" });
        let obj = obj.as_object().unwrap();
        let f = Fields::new(obj, &["payment_method", "description"], "").unwrap();
        for e in [
            f.opt_payment_method("payment_method").unwrap_err(),
            f.opt_str("description", 1000).unwrap_err(),
        ] {
            let body = String::from_utf8(e.body()).unwrap();
            assert!(!body.contains("4242"), "{body}");
            assert_eq!(e.status().as_u16(), 400);
        }
    }

    #[test]
    fn nul_characters_are_refused_everywhere() {
        let obj = json!({ "description": "a\u{0}b", "metadata": { "k\u{0}": "v" }, "m2": { "k": "v\u{0}" } });
        let obj = obj.as_object().unwrap();
        let f = Fields::new(obj, &["description", "metadata", "m2"], "").unwrap();
        assert_eq!(f.opt_str("description", 100).unwrap_err().status().as_u16(), 400);
        assert_eq!(f.opt_metadata("metadata").unwrap_err().status().as_u16(), 400);
        assert_eq!(f.opt_metadata("m2").unwrap_err().status().as_u16(), 400);
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let obj = json!({ "amount": 1, "surprise": true });
        let e = Fields::new(obj.as_object().unwrap(), &["amount"], "").err().unwrap();
        assert_eq!((e.code(), !e.body().is_empty()), ("parameter_unknown", true));
    }

    #[test]
    fn malformed_json_is_a_400_without_the_input() {
        for bad in [
            &b"{\"order_id\": "[..],
            b"[1,2]",
            b"\"4242424242424242\"",
            b"{\"a\":4242424242424242",
        ] {
            let e = object(bad).unwrap_err();
            assert_eq!(e.status().as_u16(), 400);
            assert!(!String::from_utf8(e.body()).unwrap().contains("4242"));
        }
        assert!(object(b"").unwrap().is_empty());
    }
}
