//! `/openapi.json` describes exactly the routes the server registers, and its references resolve.

use std::collections::BTreeSet;

use payrail::api::ROUTES;
use serde_json::Value;

use crate::helpers::spawn_app;

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[actix_web::test]
async fn the_document_and_the_registered_routes_are_the_same_set() {
    let app = spawn_app().await;
    let r = app.request("GET", "/openapi.json", None, None, None).await;
    assert_eq!(r.status, 200);
    let doc = r.body;
    assert_eq!(doc["openapi"], "3.0.3");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    let registered: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(
        documented, registered,
        "every route is documented and every documented route exists"
    );
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} has no responses"
            );
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").expect("local schema refs only");
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {r}");
    }
}

#[actix_web::test]
async fn every_listed_route_is_really_served() {
    let app = spawn_app().await;
    for (method, path) in ROUTES {
        let concrete = path
            .replace("{id}", "pay_x")
            .replace("{kind}", "payment")
            .replace("{provider}", "sandbox")
            .replace("{reference}", "pi_x");
        let r = app
            .request(&method.to_uppercase(), &concrete, None, Some("k"), Some("{}"))
            .await;
        let unrouted = r.status == 404 && r.body["error"]["message"] == "no such route";
        assert!(!unrouted, "{method} {path} is listed but not served");
    }
    let r = app.request("GET", "/api/v1/nowhere", None, None, None).await;
    assert_eq!(r.body["error"]["message"], "no such route");
}
