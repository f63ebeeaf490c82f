//! `GET /openapi.json` describes every route the router serves, and every
//! route it describes is served.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::spawn_app;

/// `(method, path)` of every `.route(path, method(handler)…)` in the HTTP
/// modules' source: what the router serves.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/http"
    ))];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut routes = BTreeSet::new();
    for file in files {
        let source = std::fs::read_to_string(file).unwrap();
        for call in source.split(".route(").skip(1) {
            let Some(path) = call
                .trim_start()
                .strip_prefix('"')
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            // The method routers up to the call's closing parenthesis.
            let mut depth = 1;
            let end = call
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(call.len(), |(i, _)| i);
            for method in ["get", "post", "put", "delete", "patch"] {
                let args = &call[..end];
                let called = args.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0 || !args[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if called {
                    routes.insert((method.to_string(), path.to_string()));
                }
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_openapi_document_covers_every_route_and_only_served_ones() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();

    let served = routes_in_source();
    assert!(served.len() >= 20, "the route scan found only {served:?}");
    for (method, path) in &served {
        let operation = &paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is served but not documented"))[method];
        assert!(
            operation.is_object(),
            "{method} {path} is served but not documented"
        );
        let responses = operation["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no success"
        );
        let public = [
            "/",
            "/admin",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ]
        .contains(&path.as_str());
        if !public {
            assert!(
                responses.contains_key("401"),
                "{method} {path}: 401 undocumented"
            );
            assert_eq!(
                responses["401"]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem"
            );
        }
    }

    // Everything documented answers from a real route, not the fallback.
    let token = app.admin();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{test_id}", &uuid::Uuid::new_v4().to_string())
                .replace("{attempt_id}", &uuid::Uuid::new_v4().to_string())
                .replace("{id}", &uuid::Uuid::new_v4().to_string())
                .replace("{question_id}", "q1")
                .replace("{user_id}", "someone");
            let method: Method = method.to_uppercase().parse().unwrap();
            let response = app
                .request(method.clone(), &concrete, Some(&token))
                .send()
                .await
                .unwrap();
            assert_ne!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            if response.status() == StatusCode::NOT_FOUND {
                let body: Value = response.json().await.unwrap();
                assert_ne!(
                    body["detail"], "no such route",
                    "{method} {path} is documented but not served"
                );
            }
        }
    }
}

#[tokio::test]
async fn each_listing_names_its_own_schema_and_bodies_document_their_refusals() {
    let app = spawn_app().await;
    let doc = app.openapi().await;
    // The schema a 200 answers with, and the schema of its `items` or
    // `entries` elements.
    let item_schema = |path: &str, list: &str| {
        let reference = doc["paths"][path]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no schema"))
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        let items = &doc["components"]["schemas"][&reference]["properties"][list]["items"]["$ref"];
        (reference, items.as_str().unwrap_or_default().to_string())
    };
    let (tests, test_item) = item_schema("/v1/tests", "items");
    let (attempts, attempt_item) = item_schema("/v1/me/attempts", "items");
    assert_ne!(tests, attempts);
    assert!(test_item.ends_with("/TestSummary"), "{test_item}");
    assert!(attempt_item.ends_with("/AttemptSummary"), "{attempt_item}");
    let (feed, _) = item_schema("/v1/me/notifications", "items");
    let (board, _) = item_schema("/v1/tests/{test_id}/leaderboard", "entries");
    assert_ne!(feed, board);

    for (method, path) in [
        ("post", "/v1/notifications"),
        ("put", "/v1/attempts/{attempt_id}/answers/{question_id}"),
        ("post", "/v1/tests/{test_id}/attempts"),
        ("post", "/v1/tests"),
    ] {
        let responses = &doc["paths"][path][method]["responses"];
        for status in ["400", "413", "415", "422"] {
            assert_eq!(
                responses[status]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{method} {path} {status}"
            );
        }
    }
}
