//! The API as a contract: the OpenAPI document is generated from the routes, describes every body,
//! parameter and error, validates as OpenAPI 3.1, and a client generated from it can drive a build;
//! every route belongs to one caller group, and every operator route refuses a call without the key.

use std::collections::BTreeSet;
use std::path::Path;

use expo_controller::api::openapi::ROUTES;
use serde_json::Value;

use crate::support::{API_KEY, TestApp};

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

async fn document(app: &TestApp) -> Value {
    let r = app.client.get(app.url("/api/v2/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Every operation of the document: (method, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut all = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                all.push((method.to_string(), path.clone(), op.clone()));
            }
        }
    }
    all
}

fn concrete(path: &str) -> String {
    path.replace("{platform}", "ios")
        .replace("{id}", "x")
        .replace("{worker_id}", "x")
}

/// A `$ref` to a component schema, resolved.
fn schema<'a>(doc: &'a Value, reference: &Value) -> &'a Value {
    let name = reference["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .unwrap_or_else(|| panic!("{reference} is not a component reference"));
    &doc["components"]["schemas"][name]
}

/// Non-GET operations that take no body at all (the path names the action).
const BODYLESS: &[&str] = &[
    "post /api/builds/{id}/cancel",
    "post /api/builds/{id}/retry",
    "post /api/builds/{id}/vm-ready",
    "post /api/workers/unregister",
    "post /api/workers/{id}/unregister",
    "post /api/v2/builds/{id}/cancel",
    "post /api/v2/builds/{id}/retry",
    "post /api/v2/builds/{id}/requeue",
    "post /api/v2/builds/{id}/tokens/revoke",
    "delete /api/v2/builds/{id}",
    "post /api/v2/workers/{id}/drain",
    "post /api/v2/workers/{id}/disable",
    "post /api/v2/workers/{id}/enable",
    "post /api/v2/workers/{id}/release",
    "delete /api/v2/workers/{id}",
    "delete /api/v2/keys/{id}",
    "post /api/v2/queues/{platform}/pause",
    "post /api/v2/queues/{platform}/resume",
    "delete /api/v2/webhooks/{id}",
    "post /api/v2/webhooks/{id}/test",
    "post /api/v2/webhooks/deliveries/{id}/redeliver",
];

#[tokio::test]
async fn the_document_has_schemas_for_every_body_parameter_and_error() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let ops = operations(&doc);
    assert!(ops.len() >= 58, "{} operations", ops.len());

    // The error schemas, with `code` under /api/v2.
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "{error}");
    let coded = &doc["components"]["schemas"]["CodedError"];
    let required: BTreeSet<&str> = coded["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["error", "code"]), "{coded}");
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for scheme in ["api_key", "build_token", "worker_token", "vm_token", "bearer"] {
        assert!(schemes.contains_key(scheme), "security scheme {scheme}");
    }

    let mut ids = BTreeSet::new();
    for (method, path, op) in &ops {
        let name = format!("{method} {path}");
        assert!(
            ids.insert(op["operationId"].as_str().unwrap().to_string()),
            "{name}: operationId unique"
        );
        // A success answer with a schema (a 204, a redirect and the document itself excepted).
        let responses = op["responses"].as_object().unwrap();
        let success: Vec<_> = responses.iter().filter(|(s, _)| s.starts_with('2')).collect();
        assert!(!success.is_empty(), "{name}: a success response");
        for (status, response) in &success {
            if status.as_str() == "204" {
                continue;
            }
            let content = response["content"].as_object();
            let with_schema = content.is_some_and(|c| c.values().all(|m| m["schema"].is_object()));
            assert!(with_schema, "{name}: {status} has a schema: {response}");
        }
        // Every error answer is the error schema of its family, with `code` under /api/v2.
        let family = if path.starts_with("/api/v2/") {
            "CodedError"
        } else {
            "Error"
        };
        for status in ["4XX", "5XX"] {
            assert!(responses.contains_key(status), "{name}: {status}");
        }
        for (status, response) in responses
            .iter()
            .filter(|(s, _)| s.starts_with('4') || s.starts_with('5'))
        {
            let reference = &response["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(
                reference.as_str(),
                Some(format!("#/components/schemas/{family}").as_str()),
                "{name}: {status}"
            );
            assert!(
                !response["description"].as_str().unwrap().contains("api.md"),
                "{name}: {status}"
            );
        }
        // Bodies.
        if method != "get" && !BODYLESS.contains(&name.as_str()) {
            let content = op["requestBody"]["content"].as_object();
            let content = content.unwrap_or_else(|| panic!("{name}: a request body"));
            for (media, body) in content {
                let body_schema = schema(&doc, &body["schema"]);
                assert!(
                    body_schema["properties"].is_object() || body_schema["oneOf"].is_array(),
                    "{name}: {media}"
                );
            }
        }
        // Path parameters are described.
        for segment in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
            let described = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == segment && p["in"] == "path"));
            assert!(described, "{name}: path parameter {segment}");
        }
    }

    // Multipart uploads: binary parts, so Swagger's "Try it out" can upload a file.
    for (path, part) in [
        ("/api/builds/submit", "source"),
        ("/api/builds", "source"),
        ("/api/workers/upload", "result"),
        ("/api/builds/{id}/artifact", "artifact"),
    ] {
        let body = &doc["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"];
        let form = schema(&doc, &body["schema"]);
        let field = &form["properties"][part];
        let binary = field["format"] == "binary";
        assert!(binary, "{path}: {part} is binary: {form}");
    }
    // Query parameters are described.
    let params = |path: &str| -> BTreeSet<String> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        params("/api/v2/builds").is_superset(
            &["state", "platform", "queue", "worker", "since", "cursor", "limit"]
                .map(String::from)
                .into()
        )
    );
    assert!(params("/api/workers/poll").is_superset(&["worker_id", "wait"].map(String::from).into()));
    assert!(
        params("/api/builds").is_superset(
            &["limit", "before", "status", "platform", "worker_id"]
                .map(String::from)
                .into()
        )
    );
}

/// Every route the document lists is served, and nothing else can be: routes enter the API only as
/// `routes!` of `#[utoipa::path]` handlers added to a caller group (no bare `.route(` in `src/api`).
#[tokio::test]
async fn every_route_is_documented_and_belongs_to_one_group() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let groups = ["public", "worker", "submitter", "operator"];
    let mut public = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let name = format!("{method} {path}");
        assert_eq!(op["tags"].as_array().map(Vec::len), Some(1), "{name}: one group");
        let group = op["x-caller"].as_str().unwrap();
        assert!(groups.contains(&group), "{name}: {group}");
        assert_eq!(op["tags"][0], group, "{name}");
        if op["security"]
            .as_array()
            .is_some_and(|s| s.iter().all(|r| r.as_object().is_some_and(|o| o.is_empty())))
        {
            public.insert(name.clone());
        }
        // Served: not the fallback's 404, nor 405.
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = app
            .client
            .request(method, app.url(&concrete(&path)))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            !(status == 404 && body["error"] == "Not found") && status != 405,
            "{name} is routed (got {status} {body})"
        );
    }
    // The routes anyone may call, and the OTP exchange (its credential is in the body).
    let expected: BTreeSet<String> = [
        "get /health",
        "get /api/health",
        "get /ready",
        "get /api/stats",
        "get /api/v2/openapi.json",
        "post /api/builds/{id}/authenticate",
    ]
    .map(String::from)
    .into();
    assert_eq!(public, expected);
    // A VM may not ask for its own readiness and token (api.md §4): vm-status documents no VM token.
    let vm_status = operations(&doc)
        .into_iter()
        .find(|(m, p, _)| m == "get" && p == "/api/builds/{id}/vm-status")
        .expect("vm-status documented");
    let schemes: Vec<String> = vm_status.2["security"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().cloned())
        .collect();
    assert!(
        !schemes.is_empty() && !schemes.contains(&"vm_token".to_string()),
        "{schemes:?}"
    );
    // Swagger UI reads this document (its "Try it out" uses the security schemes and multipart forms).
    let init = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), 200);
    assert!(init.text().await.unwrap().contains("/api/v2/openapi.json"));
    // The table tests walk is the document's.
    let table: BTreeSet<(String, String)> = ROUTES
        .into_iter()
        .map(|(m, p, ..)| (m.to_lowercase(), p.to_string()))
        .collect();
    let documented: BTreeSet<(String, String)> = operations(&doc).into_iter().map(|(m, p, _)| (m, p)).collect();
    assert_eq!(table, documented);

    // No route can bypass a group: `src/api` adds routes only through `routes!`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for forbidden in [".route(\"", ".route_service(", ".nest(", ".nest_service("] {
                assert!(
                    !text.contains(forbidden),
                    "{} adds a route outside a group: {forbidden}",
                    path.display()
                );
            }
        }
    }
}

/// Every operator route refuses a call without the key (401, exact wording; `code` under /api/v2) and
/// one with a wrong key (403); every other guarded route refuses a call without its credential.
#[tokio::test]
async fn every_operator_route_refuses_a_missing_key() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let mut operator_routes = 0;
    for (method, path, op) in operations(&doc) {
        let name = format!("{method} {path}");
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let url = app.url(&concrete(&path));
        let r = app.client.request(method.clone(), &url).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let native = path.starts_with("/api/v2/");
        if op["x-caller"] == "operator" {
            operator_routes += 1;
            assert_eq!(
                op["x-credential"].as_str().map(|c| c.starts_with("admin_key")),
                Some(true),
                "{name}"
            );
            assert_eq!(status, 401, "{name}: {body}");
            assert_eq!(body["error"], "Missing X-API-Key header", "{name}");
            if native {
                assert_eq!(body["code"], "unauthorized", "{name}");
            } else {
                assert!(body.get("code").is_none(), "{name}: G0 shape {body}");
            }
            let wrong = app
                .client
                .request(method, &url)
                .header("X-API-Key", "not-the-admin-key-0123456789abcdef0123")
                .send()
                .await
                .unwrap();
            assert_eq!(wrong.status(), 403, "{name}");
            let body: Value = wrong.json().await.unwrap();
            assert_eq!(body["error"], "Invalid API key", "{name}");
        } else if let Some(missing) = op["responses"]["401"]["description"].as_str().filter(|_| {
            op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.as_object().is_some_and(|o| !o.is_empty())))
        }) {
            assert_eq!(status, 401, "{name}: {body}");
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                missing.contains(&format!("\"{error}\"")),
                "{name}: {error} is the documented {missing}"
            );
        }
    }
    assert!(operator_routes >= 27, "{operator_routes} operator routes");
}

/// The document validates as OpenAPI 3.1 (a validator from npm), and a client generated from it at run
/// time registers a worker, submits a build with a multipart source upload and polls that very build.
#[tokio::test]
async fn a_generated_client_registers_submits_and_polls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "node is required (apt-get install nodejs; make test installs it: scripts/setup.sh)"
    );
    assert!(
        root.join("tests/browser/node_modules/openapi-client-axios").exists(),
        "the npm packages are missing: npm ci --prefix tests/browser (scripts/test.sh does it)"
    );
    let app = TestApp::spawn().await;
    let base = app.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(root.join("tests/browser/openapi.mjs"))
            .arg(base)
            .arg(API_KEY)
            .arg(root.join("fixtures/sample-app.zip"))
            .current_dir(root)
            .output()
    })
    .await
    .unwrap()
    .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openapi.mjs failed:\n{stdout}\n{stderr}");
    let seen: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(seen["valid"], true, "{seen}");
    assert_eq!(seen["openapi"], "3.1.0");
    assert_eq!(seen["worker_token"], true, "{seen}");
    let submitted = seen["submitted_id"].as_str().unwrap();
    assert_eq!(
        seen["polled_job_id"], submitted,
        "the poll hands out the build just submitted: {seen}"
    );
    assert_eq!(seen["polled_source_url"], format!("/api/builds/{submitted}/source"));
    assert_eq!(seen["status_id"], submitted);
    assert_eq!(seen["status"], "assigned", "{seen}");
    assert_eq!(seen["refused_status"], 401);
    assert_eq!(seen["refused_error"], "Missing X-API-Key header");
    // The server really stored it: the row is the worker's now.
    let owner: Option<String> = sqlx::query_scalar("SELECT lease_owner FROM builds WHERE id = $1")
        .bind(submitted)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(owner.as_deref(), seen["worker_id"].as_str());
}

/// The keys of an object schema (following `allOf`).
fn keys_of(doc: &Value, schema_value: &Value) -> BTreeSet<String> {
    let resolved = if schema_value.get("$ref").is_some() {
        schema(doc, schema_value)
    } else {
        schema_value
    };
    let mut keys: BTreeSet<String> = resolved["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in resolved["allOf"].as_array().into_iter().flatten() {
        keys.extend(keys_of(doc, part));
    }
    keys
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

/// The answers of a build's life match their documented schemas key for key (a view that gains or
/// loses a field without its schema fails here).
#[tokio::test]
async fn answers_match_their_schemas() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let component = |name: &str| {
        keys_of(
            &doc,
            &serde_json::json!({ "$ref": format!("#/components/schemas/{name}") }),
        )
    };
    let (worker_id, _) = app.register("mac", &["ios"]).await;
    let submitted = app.submit("ios", b"PK\x05\x06 source").await;
    assert_eq!(keys(&submitted), component("Submitted"));
    let id = submitted["id"].as_str().unwrap();
    let polled = app.poll(&worker_id).await;
    assert_eq!(keys(&polled), BTreeSet::from(["job".to_string()]));
    assert_eq!(keys(&polled["job"]), component("Job"));
    let status = app.admin_json(&format!("/api/builds/{id}/status")).await;
    assert_eq!(keys(&status), component("BuildStatus"));
    let detail = app.admin_json(&format!("/api/v2/builds/{id}")).await;
    assert_eq!(keys(&detail), component("BuildDetail"));
    assert_eq!(keys(&detail["attempts"][0]), component("Attempt"));
    let page = app.admin_json("/api/v2/builds").await;
    assert_eq!(keys(&page), component("BuildPage"));
    assert_eq!(keys(&page["items"][0]), component("Build"));
    let workers = app.admin_json("/api/v2/workers").await;
    assert_eq!(keys(&workers["items"][0]), component("Worker"));
    let queues = app.admin_json("/api/v2/queues").await;
    assert_eq!(keys(&queues["items"][0]), component("Queue"));
    let active = app.admin_json("/api/builds/active").await;
    assert_eq!(keys(&active["builds"][0]), component("ActiveBuild"));
    let list = app.admin_json("/api/builds").await;
    // `completedAt` is absent until the build is finished.
    let mut entry = component("BuildListEntry");
    entry.remove("completedAt");
    assert_eq!(keys(&list[0]), entry);
    let stats = app.admin_json(&format!("/api/workers/{worker_id}/stats")).await;
    assert_eq!(keys(&stats), component("WorkerStats"));
    let health = app.admin_json("/health").await;
    assert_eq!(keys(&health), component("Health"));
    let public_stats = app.admin_json("/api/stats").await;
    assert_eq!(keys(&public_stats), component("Stats"));
}
