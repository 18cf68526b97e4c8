//! Property tests for what parses untrusted input: the amount/currency parser and the
//! idempotency fingerprint. (The webhook signature header parser's are in signatures.rs.)

use payrail::api::body::{object, Fields};
use payrail::api::idempotency::fingerprint;
use payrail::domain::{Currency, MAX_AMOUNT};
use proptest::prelude::*;
use serde_json::{json, Value};

fn accepted() -> Vec<Currency> {
    ["USD", "EUR", "JPY"]
        .iter()
        .map(|c| Currency::parse(c).unwrap())
        .collect()
}

fn parse_amount(v: Value) -> Result<Option<(i64, String)>, String> {
    let body = json!({ "amount": v });
    let obj = body.as_object().unwrap();
    let f = Fields::new(obj, &["amount"], "").map_err(|e| e.code().to_owned())?;
    f.opt_amount("amount", &accepted())
        .map(|m| m.map(|m| (m.minor, m.currency.code().to_owned())))
        .map_err(|e| e.code().to_owned())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// An integer value is accepted exactly when 1 ≤ value ≤ 99,999,999,999.
    #[test]
    fn integer_amounts_are_accepted_exactly_within_bounds(v in prop_oneof![any::<i64>(), -10i64..=10, (MAX_AMOUNT - 10)..=(MAX_AMOUNT + 10), 1i64..=MAX_AMOUNT]) {
        let r = parse_amount(json!({ "value": v, "currency": "USD" }));
        if (1..=MAX_AMOUNT).contains(&v) {
            prop_assert_eq!(r, Ok(Some((v, "USD".to_owned()))));
        } else {
            prop_assert_eq!(r, Err("amount_invalid".to_owned()));
        }
    }

    /// No float is an amount, not even one with an integral value.
    #[test]
    fn float_amounts_are_refused(v in prop_oneof![any::<f64>().prop_filter("finite", |f| f.is_finite()), (1i64..1000).prop_map(|i| i as f64)]) {
        let r = parse_amount(json!({ "value": v, "currency": "USD" }));
        prop_assert_eq!(r, Err("amount_invalid".to_owned()));
    }

    /// A currency is accepted exactly when it is a configured upper-case code.
    #[test]
    fn currencies_are_accepted_exactly_when_configured(c in "[A-Za-z]{0,4}") {
        let r = parse_amount(json!({ "value": 100, "currency": c }));
        if ["USD", "EUR", "JPY"].contains(&c.as_str()) {
            prop_assert_eq!(r, Ok(Some((100, c.clone()))));
        } else {
            prop_assert_eq!(r, Err("currency_invalid".to_owned()));
        }
    }

    /// Whatever bytes arrive, the body parser answers (a 400 or an object) and never panics;
    /// its error never repeats the input.
    #[test]
    fn the_body_parser_survives_anything(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = object(&bytes) {
            prop_assert_eq!(e.status().as_u16(), 400);
            let text = String::from_utf8_lossy(&e.body()).into_owned();
            let input = String::from_utf8_lossy(&bytes).into_owned();
            prop_assert!(input.len() < 8 || !text.contains(&input));
        }
    }

    /// The fingerprint tells requests apart: equal only for equal (method, path, body).
    #[test]
    fn fingerprints_are_equal_exactly_for_equal_requests(
        a in ("(GET|POST)", "/[a-z/]{0,12}", prop::collection::vec(any::<u8>(), 0..40)),
        b in ("(GET|POST)", "/[a-z/]{0,12}", prop::collection::vec(any::<u8>(), 0..40)),
    ) {
        let fa = fingerprint(&a.0, &a.1, &a.2);
        let fb = fingerprint(&b.0, &b.1, &b.2);
        prop_assert_eq!(fa == fb, a == b);
    }
}
