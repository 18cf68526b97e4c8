//! Cluster mode: three in-process nodes on one database and one NATS share the partitions
//! through leases, forward calls for payments they do not own, hand a stopped node's
//! partitions to the survivors, and a node whose lease moved cannot write (the database
//! refuses its fence).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use payrail::app::{Application, StartError};
use serde_json::json;

use crate::helpers::{spawn_app_with, TestApp};

const PARTITIONS: u32 = 16;

fn cluster(c: &mut payrail::config::Config, node: &str) {
    c.cluster.enabled = true;
    c.cluster.node_id = node.into();
    c.cluster.partitions = PARTITIONS;
    c.cluster.lease_ttl_ms = 1_500;
    c.cluster.renew_every_ms = 400;
    c.cluster.max_moves = 16;
    c.cluster.forward_timeout_ms = 10_000;
}

/// Three nodes on one database and one set of streams, once every partition has an owner and
/// each node owns some.
async fn three_nodes() -> Vec<TestApp> {
    three_nodes_with(|_, _| {}).await
}

/// [`three_nodes`], each node's configuration changed by `configure` (given its name) too.
async fn three_nodes_with(configure: impl Fn(&mut payrail::config::Config, &str) + Clone + 'static) -> Vec<TestApp> {
    let first = configure.clone();
    let a = spawn_app_with(move |c| {
        cluster(c, "a");
        first(c, "a");
    })
    .await;
    let (url, prefix) = (a.database_url.clone(), a.state.config.nats.stream_prefix.clone());
    let mut nodes = vec![a];
    for name in ["b", "c"] {
        let (url, prefix, configure) = (url.clone(), prefix.clone(), configure.clone());
        nodes.push(
            spawn_app_with(move |c| {
                cluster(c, name);
                c.database.url = url;
                c.nats.stream_prefix = prefix;
                configure(c, name);
            })
            .await,
        );
    }
    settled(&nodes, "three nodes share the partitions").await;
    nodes
}

/// Which partitions each node owns.
fn owned(node: &TestApp) -> BTreeSet<u32> {
    let leases = node.state.leases.as_ref().expect("cluster mode");
    (0..PARTITIONS).filter(|&p| leases.owns(p)).collect()
}

/// Waits until the nodes own every partition between them, each exactly once, each node some.
async fn settled(nodes: &[TestApp], what: &str) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let sets: Vec<BTreeSet<u32>> = nodes.iter().map(owned).collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
        let seen_by_all = nodes.iter().all(|n| n.state.leases.as_ref().unwrap().complete());
        if total == PARTITIONS as usize
            && union.len() == PARTITIONS as usize
            && sets.iter().all(|s| !s.is_empty())
            && seen_by_all
        {
            return started.elapsed();
        }
        assert!(Instant::now() < deadline, "{what}: partitions {sets:?}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node that owns `payment`.
fn owner<'a>(nodes: &'a [TestApp], payment: &str) -> &'a TestApp {
    let found: Vec<&TestApp> = nodes
        .iter()
        .filter(|n| {
            let l = n.state.leases.as_ref().unwrap();
            l.owns(l.partition_of(payment))
        })
        .collect();
    assert_eq!(found.len(), 1, "one owner for {payment}");
    found[0]
}

async fn capture_journals(sql: &tokio_postgres::Client, payment: &str) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM journals WHERE payment_id = $1 AND kind = 'capture'",
        &[&payment],
    )
    .await
    .unwrap()
    .get(0)
}

#[actix_web::test]
async fn three_nodes_share_the_partitions_and_any_node_serves_any_payment() {
    let nodes = three_nodes().await;
    // Readiness says so, and the operator view shows every partition's owner.
    for n in &nodes {
        let r = n.request("GET", "/readyz", None, None, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let token = nodes[0].state.config.admin.token.clone();
    let view = nodes[0]
        .request("GET", "/admin/v1/cluster", Some(&token), None, None)
        .await;
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(view.body["mode"], "cluster");
    assert_eq!(view.body["nodes"].as_array().unwrap().len(), 3, "{}", view.body);
    assert_eq!(view.body["partitions"].as_array().unwrap().len(), PARTITIONS as usize);
    assert!(view.body["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["owner"].is_string()));
    let fences = nodes[0].count("partition_fences").await;
    assert_eq!(fences, PARTITIONS as i64);

    // Payments created on each node, then every operation through the other nodes.
    for (i, creator) in nodes.iter().enumerate() {
        let made = creator.pay(5_000, "pm_card_visa", "manual", true).await;
        assert_eq!(made.status, 201, "{}", made.body);
        let id = made.body["payment_id"].as_str().unwrap().to_owned();
        // Created where its partition is owned: no forwarding for creation.
        assert!(
            std::ptr::eq(owner(&nodes, &id), creator),
            "payment {id} created off its owner"
        );
        let other = &nodes[(i + 1) % 3];
        let third = &nodes[(i + 2) % 3];
        let captured = other
            .post(
                &format!("/api/v1/payments/{id}/capture"),
                json!({ "amount": { "value": 3_000, "currency": "USD" } }),
            )
            .await;
        assert_eq!(captured.status, 200, "{}", captured.body);
        assert_eq!(captured.body["amount_captured"], 3_000, "{}", captured.body);
        let refunded = third
            .post(
                &format!("/api/v1/payments/{id}/refunds"),
                json!({ "amount": { "value": 1_000, "currency": "USD" } }),
            )
            .await;
        assert_eq!(refunded.status, 201, "{}", refunded.body);
        // A state-machine refusal comes back from the owner as it said it.
        let refused = other.post(&format!("/api/v1/payments/{id}/cancel"), json!({})).await;
        assert_eq!(refused.status, 409, "{}", refused.body);
        assert_eq!(
            refused.body["error"]["code"], "payment_invalid_state",
            "{}",
            refused.body
        );
        // Only the owner has the payment's actor.
        let pid = payrail::domain::PaymentId::parse(&id).unwrap();
        assert!(creator.state.registry.live_mailbox(&pid).is_some());
        assert!(other.state.registry.live_mailbox(&pid).is_none());
        assert!(third.state.registry.live_mailbox(&pid).is_none());
        let seen = third.get(&format!("/api/v1/payments/{id}")).await;
        assert_eq!(seen.body["amount_refunded"], 1_000, "{}", seen.body);
    }

    // The sandbox's webhooks for those payments went to the node that made each one; each event
    // was read by the owner of its stream partition and applied by its payment's owner.
    let sql = nodes[0].sql().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let applied: i64 = sql
            .query_one(
                "SELECT count(DISTINCT payment_id) FROM processed_events WHERE payment_id IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if applied >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PSP events applied for {applied} of 3 payments"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }

    // An idempotent retry through another node is answered as the first was.
    let made = nodes[0].pay(700, "pm_card_visa", "manual", true).await;
    let id = made.body["payment_id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/payments/{id}/capture");
    let body = Some("{}");
    let first = nodes[1]
        .request("POST", &path, Some(crate::helpers::DEMO_KEY), Some("cap-1"), body)
        .await;
    let again = nodes[2]
        .request("POST", &path, Some(crate::helpers::DEMO_KEY), Some("cap-1"), body)
        .await;
    assert_eq!(
        (first.status, again.status),
        (200, 200),
        "{} {}",
        first.body,
        again.body
    );
    assert_eq!(first.raw, again.raw);
    assert_eq!(capture_journals(&nodes[0].sql().await, &id).await, 1);
}

#[actix_web::test]
async fn a_stopped_node_s_partitions_move_to_the_survivors_who_serve_its_payments() {
    let mut nodes = three_nodes().await;
    let leaving = nodes.pop().unwrap();
    let made = leaving.pay(4_000, "pm_card_visa", "automatic", true).await;
    assert_eq!(made.status, 201, "{}", made.body);
    let id = made.body["payment_id"].as_str().unwrap().to_owned();
    leaving.stop().await.unwrap();
    let moved = settled(&nodes, "the survivors take the stopped node's partitions").await;
    assert!(moved < Duration::from_secs(5), "{moved:?}");
    // Its payment is served by its new owner, from PostgreSQL.
    let new_owner = owner(&nodes, &id);
    let seen = new_owner.get(&format!("/api/v1/payments/{id}")).await;
    assert_eq!(seen.body["status"], "captured", "{}", seen.body);
    let other = nodes.iter().find(|n| !std::ptr::eq(*n, new_owner)).unwrap();
    let refunded = other
        .post(
            &format!("/api/v1/payments/{id}/refunds"),
            json!({ "amount": { "value": 4_000, "currency": "USD" } }),
        )
        .await;
    // The embedded sandbox keeps its charges in the memory of the node that made them: the
    // refund reaches the PSP from the new owner, whose sandbox answers that it does not know
    // the charge (a real PSP is shared by the nodes). The new owner's actor handled it, and
    // nothing moved.
    assert_eq!(
        (refunded.status, refunded.body["error"]["code"].as_str()),
        (400, Some("resource_missing")),
        "{}",
        refunded.body
    );
    let after = other.get(&format!("/api/v1/payments/{id}")).await;
    assert_eq!(
        (after.body["status"].as_str(), after.body["amount_refunded"].as_i64()),
        (Some("captured"), Some(0)),
        "{}",
        after.body
    );
    // Payments keep being created and captured on the survivors.
    for n in &nodes {
        let r = n.pay(1_000, "pm_card_visa", "automatic", true).await;
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (201, Some("captured")),
            "{}",
            r.body
        );
    }
}

#[actix_web::test]
async fn a_node_whose_partition_moved_cannot_write_it() {
    let nodes = three_nodes().await;
    let made = nodes[0].pay(2_500, "pm_card_visa", "manual", true).await;
    assert_eq!(made.status, 201, "{}", made.body);
    let id = made.body["payment_id"].as_str().unwrap().to_owned();
    let owner = owner(&nodes, &id);
    let leases = owner.state.leases.as_ref().unwrap();
    let partition = leases.partition_of(&id) as i32;
    // Another holder takes the partition in the database while the owner still believes it
    // holds the lease (a paused process, a partitioned network): the owner's commits stop.
    let sql = owner.sql().await;
    sql.execute(
        "UPDATE partition_fences SET revision = revision + 1000000, holder = 'elsewhere/1' WHERE partition = $1",
        &[&partition],
    )
    .await
    .unwrap();
    let r = owner.post(&format!("/api/v1/payments/{id}/capture"), json!({})).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let said = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("its partition moved to another node"), "{said}");
    let row = sql
        .query_one("SELECT status, amount_captured FROM payments WHERE id = $1", &[&id])
        .await
        .unwrap();
    let (status, captured): (String, i64) = (row.get(0), row.get(1));
    assert_eq!((status.as_str(), captured), ("authorized", 0));
    assert_eq!(capture_journals(&sql, &id).await, 0);
}

#[actix_web::test]
async fn cluster_nodes_and_a_node_outside_cluster_mode_refuse_each_other() {
    let a = spawn_app_with(|c| cluster(c, "a")).await;
    let mut single = crate::helpers::test_config();
    single.database.url = a.database_url.clone();
    single.database.node_lock_wait_ms = 300;
    let refused = match Application::build(single).await {
        Ok(_) => panic!("a node outside cluster mode started beside cluster nodes"),
        Err(e) => e,
    };
    assert!(matches!(refused, StartError::NodeLock(_)), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("in cluster mode are serving this database"),
        "{refused}"
    );
    a.stop().await.unwrap();

    let url = a.database_url.clone();
    let alone = spawn_app_with(move |c| c.database.url = url).await;
    let mut joining = crate::helpers::test_config();
    cluster(&mut joining, "b");
    joining.database.url = alone.database_url.clone();
    joining.database.node_lock_wait_ms = 300;
    let refused = match Application::build(joining).await {
        Ok(_) => panic!("a cluster node started beside a node outside cluster mode"),
        Err(e) => e,
    };
    assert!(
        refused
            .to_string()
            .contains("outside cluster mode is serving this database"),
        "{refused}"
    );
}

#[actix_web::test]
async fn a_forwarded_call_with_no_answer_in_time_keeps_its_key_until_the_owner_finishes() {
    // Node a's PSP is slow; the others give a forwarded call 300 ms.
    let nodes = three_nodes_with(|c, name| {
        c.cluster.forward_timeout_ms = 300;
        c.idempotency.in_flight_lease_ms = 3_000;
        if name == "a" {
            c.psp.sandbox.latency_ms = 1_500;
        }
    })
    .await;
    let made = nodes[0].pay(3_300, "pm_card_visa", "manual", false).await;
    assert_eq!(made.status, 201, "{}", made.body);
    let id = made.body["payment_id"].as_str().unwrap().to_owned();
    assert!(std::ptr::eq(owner(&nodes, &id), &nodes[0]));
    let path = format!("/api/v1/payments/{id}/confirm");
    let key = Some("confirm-slow");
    let demo = Some(crate::helpers::DEMO_KEY);
    let first = nodes[1].request("POST", &path, demo, key, Some("{}")).await;
    assert_eq!(first.status, 503, "{}", first.body);
    assert!(
        first.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("did not answer in time"),
        "{}",
        first.body
    );
    // The owner is still at it: the key stays claimed, a retry is refused, not run again.
    let early = nodes[2].request("POST", &path, demo, key, Some("{}")).await;
    assert_eq!(early.status, 409, "{}", early.body);
    assert_eq!(early.body["error"]["code"], "idempotency_key_in_use", "{}", early.body);
    // Once the owner's call has finished, a retry gets its answer.
    let deadline = Instant::now() + Duration::from_secs(15);
    let done = loop {
        let r = nodes[1].request("POST", &path, demo, key, Some("{}")).await;
        if r.status == 200 {
            break r;
        }
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(Instant::now() < deadline, "the retry never got the owner's answer");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.body["status"], "authorized", "{}", done.body);
    let sql = nodes[0].sql().await;
    let authorizations: i64 = sql
        .query_one(
            "SELECT count(*) FROM psp_attempts WHERE payment_id = $1 AND operation = 'authorize'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(authorizations, 1);
}

#[actix_web::test]
async fn a_key_claimed_by_a_process_no_longer_in_the_cluster_is_taken_over_at_once() {
    use payrail::adapters::postgres::idempotency::{Begin, Claimant};
    let app = crate::helpers::spawn_app().await;
    let db = &app.state.db;
    let merchant = app.first_merchant().await;
    let both = || Some(vec!["a/1".to_owned(), "b/2".to_owned()]);
    let (a, b) = (
        Claimant {
            holder: "a/1",
            live: &both,
        },
        Claimant {
            holder: "b/2",
            live: &both,
        },
    );
    let key = "k".repeat(64);
    let lease = 60_000;
    let first = db
        .idempotency_begin_as(&merchant, &key, b"fp", lease, Some(&a))
        .await
        .unwrap();
    assert_eq!(
        first,
        Begin::Proceed {
            resource_id: None,
            fence: 1
        }
    );
    // a is alive: its claim stands until its lease passes, in and out of cluster mode.
    let early = db
        .idempotency_begin_as(&merchant, &key, b"fp", lease, Some(&b))
        .await
        .unwrap();
    assert_eq!(early, Begin::InFlight);
    // A node that cannot tell who is live (cut off from NATS: every other node looks gone to
    // it) takes nothing over by departure: a's claim stands until its lease passes.
    let blind = || None;
    let cut_off = Claimant {
        holder: "b/2",
        live: &blind,
    };
    let unsure = db
        .idempotency_begin_as(&merchant, &key, b"fp", lease, Some(&cut_off))
        .await
        .unwrap();
    assert_eq!(unsure, Begin::InFlight);
    // a has left the cluster: b takes the key over at once, under a new fence.
    let only_b = || Some(vec!["b/2".to_owned()]);
    let gone = Claimant {
        holder: "b/2",
        live: &only_b,
    };
    let taken = db
        .idempotency_begin_as(&merchant, &key, b"fp", lease, Some(&gone))
        .await
        .unwrap();
    assert_eq!(
        taken,
        Begin::Proceed {
            resource_id: None,
            fence: 2
        }
    );
    // Now b holds it, and b is alive.
    let again = db
        .idempotency_begin_as(&merchant, &key, b"fp", lease, Some(&gone))
        .await
        .unwrap();
    assert_eq!(again, Begin::InFlight);
    // Outside cluster mode only the lease counts.
    let single = db.idempotency_begin(&merchant, &key, b"fp", lease).await.unwrap();
    assert_eq!(single, Begin::InFlight);
}

/// A forwarded call the owner cannot read (a node of another version sent it) is answered 503,
/// not to be stored: nothing was done, and the client may send it again.
#[actix_web::test]
async fn a_forwarded_call_the_owner_cannot_read_is_a_503_not_stored() {
    let node = spawn_app_with(|c| cluster(c, "a")).await;
    let leases = node.state.leases.as_ref().expect("cluster mode");
    let subject = format!("{}.cluster.node.{}", node.state.config.nats.stream_prefix, leases.node);
    let nats = async_nats::connect(node.state.config.nats.url.as_str()).await.unwrap();
    let reply = nats
        .request(subject, b"\xc1 not a call".to_vec().into())
        .await
        .expect("the owner answers");
    let answer: serde_json::Value = rmp_serde::from_slice(&reply.payload).expect("an answer");
    let error = &answer["Error"];
    assert_eq!(error["status"], 503, "{answer}");
    assert_eq!(error["replayable"], false, "{answer}");
    let body: Vec<u8> = serde_json::from_value(error["body"].clone()).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "dependency_unavailable", "{body}");
}

#[actix_web::test]
async fn a_reconciliation_run_of_a_process_that_left_the_cluster_is_failed() {
    let node = spawn_app_with(|c| cluster(c, "a")).await;
    let connector = node.get("/api/v1/connectors").await.body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mine = node.state.leases.as_ref().unwrap().holder.to_string();
    let sql = node.sql().await;
    for (id, holder) in [("rcn_gone", "gone/1"), ("rcn_mine", mine.as_str())] {
        sql.execute(
            "INSERT INTO reconciliation_runs (id, connector_id, format, source, status, holder)
             VALUES ($1, $2, 'stripe', 'upload', 'running', $3)",
            &[&id, &connector, &holder],
        )
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: String = sql
            .query_one("SELECT status FROM reconciliation_runs WHERE id = 'rcn_gone'", &[])
            .await
            .unwrap()
            .get(0);
        if status == "failed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the departed process's run is still {status}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    let mine: String = sql
        .query_one("SELECT status FROM reconciliation_runs WHERE id = 'rcn_mine'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mine, "running");
}
