//! Every known-answer vector of shared/vectors/webhook_signatures.json (copied into
//! tests/vectors/), plus properties of the parser: tolerance, rotation, tampering.

use payrail::adapters::psp::signature::{
    sign_stripe, verify_adyen, verify_stripe, AdyenFields, SignatureError, MAX_SIGNATURES,
};
use proptest::prelude::*;
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("vectors/webhook_signatures.json")).unwrap()
}

#[test]
fn every_stripe_vector_verifies_as_labelled() {
    let v = vectors();
    let cases = v["stripe"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let t = c["timestamp"].as_i64().unwrap();
        // The vectors are far in the past: verify with the clock at their timestamp.
        let r = verify_stripe(
            c["header"].as_str().unwrap(),
            c["payload"].as_str().unwrap().as_bytes(),
            &[c["secret"].as_str().unwrap()],
            300,
            t,
        );
        assert_eq!(r.is_ok(), c["valid"].as_bool().unwrap(), "{}: {r:?}", c["name"]);
    }
}

#[test]
fn every_adyen_vector_verifies_and_builds_its_signed_string() {
    let v = vectors();
    for c in v["adyen"].as_array().unwrap() {
        let f = &c["fields"];
        let value = f["amount_value"].to_string();
        let fields = AdyenFields {
            psp_reference: f["pspReference"].as_str().unwrap(),
            original_reference: f["originalReference"].as_str().unwrap(),
            merchant_account_code: f["merchantAccountCode"].as_str().unwrap(),
            merchant_reference: f["merchantReference"].as_str().unwrap(),
            value: &value,
            currency: f["amount_currency"].as_str().unwrap(),
            event_code: f["eventCode"].as_str().unwrap(),
            success: f["success"].as_str().unwrap(),
        };
        assert_eq!(
            fields.signed_string(),
            c["signed_string"].as_str().unwrap(),
            "{}",
            c["name"]
        );
        let key = c["hmac_key_hex"].as_str().unwrap();
        assert_eq!(
            verify_adyen(&fields, key, c["signature_base64"].as_str().unwrap()),
            Ok(()),
            "{}",
            c["name"]
        );
        let tampered = AdyenFields {
            value: "1131",
            ..fields.clone()
        };
        assert_eq!(
            verify_adyen(&tampered, key, c["signature_base64"].as_str().unwrap()),
            Err(SignatureError::Mismatch)
        );
    }
}

#[test]
fn adyen_fields_escape_backslashes_and_colons() {
    let f = AdyenFields {
        psp_reference: "a:b",
        merchant_reference: "c\\d",
        ..Default::default()
    };
    assert_eq!(f.signed_string(), "a\\:b:::c\\\\d::::");
}

#[test]
fn stale_and_future_timestamps_are_refused() {
    let header = sign_stripe(b"{}", "whsec_x", 1_000_000);
    assert_eq!(
        verify_stripe(&header, b"{}", &["whsec_x"], 300, 1_000_300),
        Ok(1_000_000)
    );
    assert_eq!(
        verify_stripe(&header, b"{}", &["whsec_x"], 300, 1_000_301),
        Err(SignatureError::Stale)
    );
    assert_eq!(
        verify_stripe(&header, b"{}", &["whsec_x"], 300, 999_699),
        Err(SignatureError::Stale)
    );
}

#[test]
fn the_previous_secret_still_verifies_during_rotation() {
    let header = sign_stripe(b"{\"id\":1}", "whsec_old", 50);
    assert_eq!(
        verify_stripe(&header, b"{\"id\":1}", &["whsec_new", "whsec_old"], 300, 50),
        Ok(50)
    );
    assert_eq!(
        verify_stripe(&header, b"{\"id\":1}", &["whsec_new", ""], 300, 50),
        Err(SignatureError::Mismatch)
    );
}

#[test]
fn malformed_headers_are_refused() {
    for h in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage", "t=1,v0=00"] {
        assert!(verify_stripe(h, b"{}", &["s"], 300, 1).is_err(), "{h}");
    }
}

#[test]
fn a_timestamp_at_the_ends_of_the_range_is_stale_not_an_overflow() {
    for t in [i64::MIN, i64::MAX] {
        let header = format!("t={t},v1={}", "00".repeat(32));
        assert_eq!(
            verify_stripe(&header, b"{}", &["s"], 300, 1_700_000_000),
            Err(SignatureError::Stale),
            "{t}"
        );
    }
}

#[test]
fn a_header_with_many_signatures_is_refused_before_any_is_computed() {
    let body = vec![b'x'; 256 * 1024];
    let good = sign_stripe(&body, "whsec_x", 1_000);
    let v1 = good.split_once(",v1=").unwrap().1;
    // Empty and short signatures are skipped; the real one among them still verifies.
    let padded = format!("t=1000,v1=,v1=00,v1={v1},v1={}", "ab".repeat(32));
    assert_eq!(verify_stripe(&padded, &body, &["whsec_x"], 300, 1_000), Ok(1_000));
    // Up to MAX_SIGNATURES are looked at; one more and the header is not Stripe's.
    let many = |n: usize| format!("t=1000{}", ",v1=".repeat(n));
    assert_eq!(
        verify_stripe(&many(MAX_SIGNATURES), &body, &["whsec_x"], 300, 1_000),
        Err(SignatureError::Mismatch)
    );
    let flood = many(30_000);
    assert_eq!(
        verify_stripe(&flood, &body, &["whsec_x", "whsec_y"], 300, 1_000),
        Err(SignatureError::Malformed)
    );
}

proptest! {
    /// Signing and verifying agree for any payload and secret; any single changed byte fails.
    #[test]
    fn sign_then_verify_round_trips(payload in prop::collection::vec(any::<u8>(), 0..512), secret in "[a-z_]{1,40}", flip in any::<prop::sample::Index>()) {
        let header = sign_stripe(&payload, &secret, 1_700_000_000);
        prop_assert_eq!(verify_stripe(&header, &payload, &[secret.as_str()], 300, 1_700_000_000), Ok(1_700_000_000));
        if !payload.is_empty() {
            let mut tampered = payload.clone();
            let i = flip.index(tampered.len());
            tampered[i] ^= 1;
            prop_assert_eq!(verify_stripe(&header, &tampered, &[secret.as_str()], 300, 1_700_000_000), Err(SignatureError::Mismatch));
        }
    }

    /// The header parser never panics, whatever it is given.
    #[test]
    fn the_header_parser_survives_anything(header in ".{0,200}") {
        let _ = verify_stripe(&header, b"{}", &["s"], 300, 0);
    }
}

/// Merchant webhooks are signed as Stripe signs: for every valid single-signature vector,
/// payrail's `Payrail-Signature` is the vector's header itself.
#[test]
fn merchant_webhook_signatures_reproduce_the_stripe_vectors() {
    let v = vectors();
    let mut reproduced = 0;
    for c in v["stripe"].as_array().unwrap() {
        let header = c["header"].as_str().unwrap();
        if !c["valid"].as_bool().unwrap() || header.matches("v1=").count() != 1 || header.contains("v0=") {
            continue;
        }
        let made = payrail::domain::webhook::signature_header(
            c["payload"].as_str().unwrap().as_bytes(),
            &[c["secret"].as_str().unwrap()],
            c["timestamp"].as_i64().unwrap(),
        );
        assert_eq!(made, header, "{}", c["name"]);
        reproduced += 1;
    }
    assert!(reproduced >= 2, "the vectors hold at least two plain Stripe signatures");
}

proptest! {
    /// During a rotation both secrets sign: each verifies alone, a third does not, and any
    /// changed byte fails under both.
    #[test]
    fn rotation_headers_verify_under_either_secret(
        payload in prop::collection::vec(any::<u8>(), 1..512),
        new in "whsec_[a-f0-9]{8,64}",
        old in "whsec_[a-f0-9]{8,64}",
        t in 0i64..4_000_000_000,
        flip in any::<prop::sample::Index>(),
    ) {
        let header = payrail::domain::webhook::signature_header(&payload, &[new.as_str(), old.as_str()], t);
        prop_assert_eq!(verify_stripe(&header, &payload, &[new.as_str()], 300, t), Ok(t));
        prop_assert_eq!(verify_stripe(&header, &payload, &[old.as_str()], 300, t), Ok(t));
        prop_assert!(verify_stripe(&header, &payload, &["whsec_other"], 300, t).is_err());
        let mut tampered = payload.clone();
        let i = flip.index(tampered.len());
        tampered[i] ^= 0x80;
        prop_assert!(verify_stripe(&header, &tampered, &[new.as_str(), old.as_str()], 300, t).is_err());
    }
}
