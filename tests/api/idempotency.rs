//! docs/API.md, "Idempotency": replay byte for byte, 422 on reuse, 409 in flight, exactly once
//! under concurrency, scoped per merchant.

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{spawn_app, DEMO_KEY};

const CREATE: &str = r#"{"order_id":"ord_idem","amount":{"value":4999,"currency":"USD"},"payment_method":"pm_card_visa","confirm":true}"#;

#[actix_web::test]
async fn a_retry_replays_the_first_response_byte_for_byte() {
    let app = spawn_app().await;
    let first = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("key-1"), Some(CREATE))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("key-1"), Some(CREATE))
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.raw, first.raw);
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(app.count("payments").await, 1);

    // An operation's own 4xx is stored and replayed too.
    let p = first.body["payment_id"].as_str().unwrap();
    let path = format!("/api/v1/payments/{p}/capture");
    let e1 = app
        .request("POST", &path, Some(DEMO_KEY), Some("cap-1"), Some("{}"))
        .await;
    assert_eq!(e1.status, 409);
    let e2 = app
        .request("POST", &path, Some(DEMO_KEY), Some("cap-1"), Some("{}"))
        .await;
    assert_eq!((e2.status, e2.raw == e1.raw), (409, true));
    assert_eq!(e2.headers.get("idempotent-replayed").unwrap(), "true");
}

#[actix_web::test]
async fn the_same_key_with_another_body_or_path_is_422() {
    let app = spawn_app().await;
    let first = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("key-2"), Some(CREATE))
        .await;
    assert_eq!(first.status, 201);
    let other_body = CREATE.replace("4999", "5000");
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("key-2"),
            Some(&other_body),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["error"]["code"].as_str(),
            r.body["error"]["type"].as_str()
        ),
        (422, Some("idempotency_key_reused"), Some("idempotency_error"))
    );
    let p = first.body["payment_id"].as_str().unwrap();
    let r = app
        .request(
            "POST",
            &format!("/api/v1/payments/{p}/refunds"),
            Some(DEMO_KEY),
            Some("key-2"),
            Some(CREATE),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(app.count("payments").await, 1);
}

#[actix_web::test]
async fn a_missing_or_malformed_key_is_400_and_nothing_is_stored() {
    let app = spawn_app().await;
    for key in [None, Some(""), Some(&"k".repeat(256)[..]), Some("tab\there")] {
        let r = app
            .request("POST", "/api/v1/payments", Some(DEMO_KEY), key, Some(CREATE))
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some("idempotency_key_missing")),
            "{key:?}"
        );
    }
    assert_eq!(app.count("payments").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
}

#[actix_web::test]
async fn thirty_two_concurrent_requests_with_one_key_make_exactly_one_payment() {
    let app = spawn_app().await;
    let requests =
        (0..32).map(|_| app.request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("burst"), Some(CREATE)));
    let responses = join_all(requests).await;
    let created: Vec<_> = responses.iter().filter(|r| r.status == 201).collect();
    assert!(!created.is_empty());
    for r in &responses {
        assert!(
            r.status == 201 || (r.status == 409 && r.body["error"]["code"] == "idempotency_key_in_use"),
            "{} {}",
            r.status,
            r.body
        );
    }
    // Every 201 is the same payment, byte for byte.
    assert!(created.iter().all(|r| r.raw == created[0].raw));
    assert_eq!(app.count("payments").await, 1);
    assert_eq!(app.count("journals").await, 1);
    // Once the first finished, the key replays.
    let after = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("burst"), Some(CREATE))
        .await;
    assert_eq!((after.status, after.raw == created[0].raw), (201, true));
}

#[actix_web::test]
async fn keys_are_scoped_per_merchant() {
    let app = spawn_app().await;
    let other = app.new_merchant().await;
    let a = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("shared"), Some(CREATE))
        .await;
    let b = app
        .request("POST", "/api/v1/payments", Some(&other), Some("shared"), Some(CREATE))
        .await;
    assert_eq!((a.status, b.status), (201, 201));
    assert_ne!(a.body["payment_id"], b.body["payment_id"]);
    assert!(b.headers.get("idempotent-replayed").is_none());
}

#[actix_web::test]
async fn twenty_concurrent_refunds_of_500_on_3000_let_exactly_six_through() {
    let app = spawn_app().await;
    let body = json!({ "order_id": "o", "amount": { "value": 3000, "currency": "USD" }, "payment_method": "pm_card_visa", "confirm": true });
    let p = app.post("/api/v1/payments", body).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/payments/{p}/refunds");
    let refund = r#"{"amount":{"value":500,"currency":"USD"}}"#;
    let keys: Vec<String> = (0..20).map(|i| format!("refund-{i}")).collect();
    let responses = join_all(
        keys.iter()
            .map(|k| app.request("POST", &path, Some(DEMO_KEY), Some(k), Some(refund))),
    )
    .await;
    let ok = responses.iter().filter(|r| r.status == 201).count();
    let too_large = responses
        .iter()
        .filter(|r| r.status == 400 && r.body["error"]["code"] == "amount_too_large")
        .count();
    assert_eq!(
        (ok, too_large),
        (6, 14),
        "{:?}",
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let payment = app.get(&format!("/api/v1/payments/{p}")).await.body;
    assert_eq!(
        (payment["status"].as_str(), payment["amount_refunded"].as_i64()),
        (Some("refunded"), Some(3000))
    );
    assert_eq!(app.count("refunds").await, 6);
}

#[actix_web::test]
async fn claims_made_together_are_committed_together_and_each_key_is_claimed_once() {
    use payrail::adapters::postgres::idempotency::Begin;
    let app = spawn_app().await;
    let merchant = app.first_merchant().await;
    let db = app.state.db.clone();
    let key = |i: usize| format!("{i:064}");
    // Twenty distinct keys, the first of them asked for a second time, and one key the
    // database refuses (a stored key is always 64 characters): all at once.
    let mut keys: Vec<String> = (0..20).map(key).collect();
    keys.push(key(0));
    keys.push("bad".to_owned());
    let begins = join_all(keys.iter().map(|k| {
        let (db, merchant) = (db.clone(), merchant.clone());
        async move { db.idempotency_begin(&merchant, k, b"fp", 30_000).await }
    }))
    .await;
    for (i, b) in begins[..20].iter().enumerate() {
        assert!(
            matches!(
                b,
                Ok(Begin::Proceed {
                    resource_id: None,
                    fence: 1
                })
            ),
            "key {i}: {b:?}"
        );
    }
    assert_eq!(
        begins[20],
        Ok(Begin::InFlight),
        "the same key again is in flight, not claimed twice"
    );
    assert!(begins[21].is_err(), "the refused row fails alone: {:?}", begins[21]);
    assert_eq!(app.count("idempotency_keys").await, 20);
}

/// A create whose first commit was to claim its key, ending after it: it frees or completes only
/// the row that commit inserted (naming its payment), keeps an answer that commit stored, and
/// leaves another request's row alone. Against PostgreSQL, as the simulation models it.
#[actix_web::test]
async fn a_first_commits_key_is_released_or_completed_only_when_it_is_ours() {
    use payrail::adapters::postgres::idempotency::{KeyClaim, Released};
    let app = spawn_app().await;
    let merchant = app.first_merchant().await;
    let db = app.state.db.clone();
    let sql = app.sql().await;
    let key = |i: usize| format!("{i:064}");
    // The row a first commit inserts: in flight, fence 1, naming its payment.
    let claimed = |k: String, payment: &'static str| {
        let (sql, merchant) = (&sql, merchant.to_string());
        async move {
            sql.execute(
                "INSERT INTO idempotency_keys (merchant_id, key, fingerprint, locked_until, resource_id)
                 VALUES ($1, $2, 'fp', now() + interval '30 seconds', $3)",
                &[&merchant, &k, &payment],
            )
            .await
            .unwrap();
        }
    };
    let locked = |k: String| {
        let (sql, merchant) = (&sql, merchant.to_string());
        async move {
            let row = sql
                .query_one(
                    "SELECT locked_until > now() FROM idempotency_keys WHERE merchant_id = $1 AND key = $2",
                    &[&merchant, &k],
                )
                .await
                .unwrap();
            row.get::<_, bool>(0)
        }
    };

    // No row at all: the request ended before its commit; nothing to free, nothing holds the key.
    assert_eq!(
        db.idempotency_release_first(&merchant, &key(1), "pay_a").await,
        Ok(Released::NoRow)
    );
    // Its own row: freed.
    claimed(key(2), "pay_a").await;
    assert_eq!(
        db.idempotency_release_first(&merchant, &key(2), "pay_a").await,
        Ok(Released::Ours)
    );
    assert!(!locked(key(2)).await, "freed");
    // Another request's row: held, and left locked.
    claimed(key(3), "pay_other").await;
    assert_eq!(
        db.idempotency_release_first(&merchant, &key(3), "pay_a").await,
        Ok(Released::Held)
    );
    assert!(locked(key(3)).await, "another's row stays locked");

    let claim = KeyClaim {
        fingerprint: b"fp".to_vec(),
        lease_ms: 30_000,
        holder: None,
    };
    // Completing: its own row takes the answer; another's does not.
    claimed(key(4), "pay_a").await;
    assert_eq!(
        db.idempotency_store_first(&merchant, &key(4), &claim, "pay_a", 201, b"first")
            .await,
        Ok(Some((201, b"first".to_vec())))
    );
    assert_eq!(
        db.idempotency_store_first(&merchant, &key(3), &claim, "pay_a", 201, b"mine")
            .await,
        Ok(None)
    );
    // An answer already stored (by the commit itself) stays, and is the one to give.
    assert_eq!(
        db.idempotency_store_first(&merchant, &key(4), &claim, "pay_a", 409, b"later")
            .await,
        Ok(Some((201, b"first".to_vec())))
    );
    let answers = sql
        .query(
            "SELECT key, response_status, response_body FROM idempotency_keys
             WHERE merchant_id = $1 AND key = ANY($2) ORDER BY key",
            &[&merchant.to_string(), &vec![key(3), key(4)]],
        )
        .await
        .unwrap();
    let answers: Vec<(Option<i16>, Option<Vec<u8>>)> = answers.iter().map(|r| (r.get(1), r.get(2))).collect();
    assert_eq!(
        answers,
        vec![(None, None), (Some(201), Some(b"first".to_vec()))],
        "another's row untouched; the first answer kept"
    );
    // No row: the answer is inserted with the key (a 4xx before the commit).
    assert_eq!(
        db.idempotency_store_first(&merchant, &key(5), &claim, "pay_a", 422, b"bad")
            .await,
        Ok(Some((422, b"bad".to_vec())))
    );
    assert_eq!(app.count("idempotency_keys").await, 4);
}

/// How many keys were claimed by a claim of their own (`payrail_idempotency_claim_duration_seconds`).
async fn claims_made(app: &crate::helpers::TestApp) -> u64 {
    let m = app.request("GET", "/metrics", None, None, None).await;
    String::from_utf8_lossy(&m.raw)
        .lines()
        .find_map(|l| l.strip_prefix("payrail_idempotency_claim_duration_seconds_count "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// The key's digest, as `api::idempotency::key` stores it.
fn digest(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// docs/DESIGN.md, "A key claimed by the payment's first commit": a create makes no claim of its
/// own; the commit that stores the payment inserts the key's row, naming it.
#[actix_web::test]
async fn a_create_claims_its_key_with_the_commit_that_stores_the_payment() {
    let app = spawn_app().await;
    let created = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("first"), Some(CREATE))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let pending = CREATE.replace(r#","confirm":true"#, "");
    let unconfirmed = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("second"),
            Some(&pending),
        )
        .await;
    assert_eq!(unconfirmed.status, 201, "{}", unconfirmed.body);
    assert_eq!(claims_made(&app).await, 0, "no claim before the payment's commit");
    let client = app.sql().await;
    for (key, r) in [("first", &created), ("second", &unconfirmed)] {
        let row = client
            .query_one(
                "SELECT resource_id, fence, response_status, response_body FROM idempotency_keys WHERE key = $1",
                &[&digest(key)],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, Option<String>>(0).as_deref(),
            r.body["payment_id"].as_str()
        );
        assert_eq!(row.get::<_, i64>(1), 1);
        assert_eq!(row.get::<_, Option<i16>>(2), Some(201));
        assert_eq!(row.get::<_, Option<Vec<u8>>>(3).as_deref(), Some(&r.raw[..]));
    }
    // A retry finds the row and replays; another body with the key is refused.
    let again = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("first"), Some(CREATE))
        .await;
    assert_eq!((again.status, again.raw == created.raw), (201, true));
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(
        claims_made(&app).await,
        1,
        "a key this node saw lately is claimed at once"
    );
    let reused = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("first"),
            Some(&pending),
        )
        .await;
    assert_eq!(reused.status, 422, "{}", reused.body);
    assert_eq!(app.count("payments").await, 2);
}

/// A create whose key another request holds in flight: its payment's commit finds the row and
/// writes nothing (no payment, no audit row, no event), and the request is answered as any
/// request on a key in flight.
#[actix_web::test]
async fn a_create_on_a_key_held_in_flight_writes_nothing_and_is_409() {
    let app = spawn_app().await;
    let merchant = app.first_merchant().await;
    let fp = payrail::api::idempotency::fingerprint("POST", "/api/v1/payments", CREATE.as_bytes());
    let held = app
        .state
        .db
        .idempotency_begin(&merchant, &digest("held"), &fp, 60_000)
        .await
        .unwrap();
    assert!(matches!(
        held,
        payrail::adapters::postgres::idempotency::Begin::Proceed { fence: 1, .. }
    ));
    let r = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("held"), Some(CREATE))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("idempotency_key_in_use")),
        "{}",
        r.body
    );
    for table in ["payments", "payment_transitions", "psp_attempts", "outbox"] {
        assert_eq!(app.count(table).await, 0, "{table}");
    }
    assert_eq!(
        claims_made(&app).await,
        1,
        "the held key was then claimed the ordinary way"
    );
    // Another body with the key is still a reuse.
    let other = CREATE.replace("4999", "5000");
    let r = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("held"), Some(&other))
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
}

/// A create refused before its payment's commit (a split to an account that does not exist)
/// stores its answer on a row of its own, and a retry replays it.
#[actix_web::test]
async fn a_create_refused_before_its_commit_stores_its_answer() {
    let app = spawn_app().await;
    let body = json!({ "order_id": "ord_split", "amount": { "value": 1000, "currency": "USD" },
        "payment_method": "pm_card_visa", "splits": [{ "account": "acct_missing", "amount": 500 }] })
    .to_string();
    let first = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("refused"), Some(&body))
        .await;
    assert_eq!(
        (first.status, first.body["error"]["code"].as_str()),
        (400, Some("resource_missing")),
        "{}",
        first.body
    );
    let again = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("refused"), Some(&body))
        .await;
    assert_eq!((again.status, again.raw == first.raw), (400, true));
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(app.count("payments").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 1);
}

/// A request whose own commit stored its answer (the commit landed, reported failed, and the
/// request ran again) answers with that stored answer, never with the re-run's: it is what every
/// retry of the key replays. Another fence's answer is not taken for this request's.
#[actix_web::test]
async fn storing_an_answer_finds_the_one_its_own_commit_stored() {
    let app = crate::helpers::spawn_app().await;
    let merchant = app.first_merchant().await;
    let key = "a".repeat(64);
    let db = app.sql().await;
    db.execute(
        "INSERT INTO idempotency_keys (merchant_id, key, fingerprint, locked_until, fence, response_status, response_body)
         VALUES ($1, $2, '\\x00', now() + interval '1 minute', 2, 200, '{\"status\":\"canceled\"}')",
        &[&merchant.as_str(), &key],
    )
    .await
    .unwrap();
    let found = app
        .state
        .db
        .idempotency_store(&merchant, &key, 2, 409, b"{}")
        .await
        .unwrap();
    assert_eq!(found, Some((200, br#"{"status":"canceled"}"#.to_vec())));
    let other_fence = app
        .state
        .db
        .idempotency_store(&merchant, &key, 1, 409, b"{}")
        .await
        .unwrap();
    assert_eq!(
        other_fence, None,
        "an answer stored under another fence is not this request's"
    );
    // A key with no answer yet takes this one.
    let fresh = "b".repeat(64);
    db.execute(
        "INSERT INTO idempotency_keys (merchant_id, key, fingerprint, locked_until) VALUES ($1, $2, '\\x00', now())",
        &[&merchant.as_str(), &fresh],
    )
    .await
    .unwrap();
    let stored = app
        .state
        .db
        .idempotency_store(&merchant, &fresh, 1, 409, b"{\"error\":1}")
        .await
        .unwrap();
    assert_eq!(stored, None);
    let row = db
        .query_one(
            "SELECT response_status, response_body FROM idempotency_keys WHERE key = $1",
            &[&fresh],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i16>(0), row.get::<_, Vec<u8>>(1)),
        (409, b"{\"error\":1}".to_vec())
    );
}

/// A key used again after its record was purged is a new request: the attempt an earlier use of
/// the key started does not answer it (it would answer a new refund with the old one).
#[actix_web::test]
async fn an_attempt_from_before_the_keys_record_is_not_the_keys() {
    let app = crate::helpers::spawn_app().await;
    let paid = app.pay(1000, "pm_card_visa", "automatic", true).await;
    let id = paid.body["payment_id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/refunds"),
            json!({ "amount": { "value": 300, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let db = app.sql().await;
    let key: String = db
        .query_one(
            "SELECT idempotency_key FROM psp_attempts WHERE payment_id = $1 AND operation = 'refund'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let payment = payrail::domain::PaymentId::parse(&id).unwrap();
    let found = app.state.db.attempt_by_key(&payment, &key).await.unwrap();
    assert!(found.is_some(), "the key's own attempt is found");
    // Two days later the record is purged and the key used again: its new record is today's.
    db.batch_execute(&format!(
        "UPDATE psp_attempts SET started_at = started_at - interval '2 days' WHERE payment_id = '{id}';
         UPDATE idempotency_keys SET created_at = now() WHERE key = '{key}';"
    ))
    .await
    .unwrap();
    let found = app.state.db.attempt_by_key(&payment, &key).await.unwrap();
    assert!(
        found.is_none(),
        "an attempt of the key's earlier use answered its new one"
    );
}
