//! The OpenAPI document describes every route, and every route it describes is served.

use expo_controller::api::openapi::ROUTES;
use serde_json::Value;

use crate::support::TestApp;

#[tokio::test]
async fn every_documented_route_is_served_and_documented() {
    let app = TestApp::spawn().await;
    let doc: Value = app
        .client
        .get(app.url("/api/v2/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["info"]["title"], "expo-controller");
    for (method, path, _, _, _) in ROUTES {
        let operation = &doc["paths"][path][method.to_lowercase()];
        assert!(operation.is_object(), "{method} {path} documented");
        let concrete = path
            .replace("{platform}", "ios")
            .replace("{id}", "x")
            .replace("{worker_id}", "x");
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app
            .client
            .request(method.clone(), app.url(&concrete))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let fallback = (status == 404 && body["error"] == "Not found") || status == 405;
        assert!(!fallback, "{method} {path} is routed (got {status} {body})");
    }
    let ui = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(ui.status(), 200);
    assert!(
        ui.text().await.unwrap().contains("swagger"),
        "Swagger UI is served (vendored)"
    );
}
