//! A property-based fuzz of the API against its own served OpenAPI document.
//!
//! Requests are generated from `/openapi.json`, operation by operation: path
//! parameters from real ids, unknown ids and malformed strings; declared
//! query parameters and headers with values of their type or of none;
//! bodies from the operation's schema, mutated, replaced by arbitrary JSON,
//! by non-JSON or sent with another content type. Each is sent as a user,
//! as an admin and without a token. The properties, for every response:
//! - no server error (5xx);
//! - its status is one the operation documents;
//! - its content type is one documented for that status;
//! - a JSON body conforms to the documented schema.
//!
//! The generator is seeded, so a failure names a case that runs again the
//! same way; `PODIUM_FUZZ_CASES` sets the cases per operation and role.

use std::time::Duration;

use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::helpers::{spawn_app, TestApp};

/// Cases per operation and role, unless `PODIUM_FUZZ_CASES` says otherwise.
const CASES: usize = 40;

fn pick(rng: &mut TestRng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn chance(rng: &mut TestRng, percent: u64) -> bool {
    rng.next_u64() % 100 < percent
}

/// Strings a client might send where an id, a name or a number goes.
const ODD_STRINGS: [&str; 10] = [
    "",
    "abc",
    "0",
    "-1",
    "99999999999999999999",
    "%00",
    "%F0%9F%98%80",
    "a%20b",
    "null",
    "00000000-0000-0000-0000-000000000000",
];

fn odd_string(rng: &mut TestRng) -> String {
    match pick(rng, 4) {
        0 => "x".repeat(1 + pick(rng, 300)),
        _ => ODD_STRINGS[pick(rng, ODD_STRINGS.len())].to_string(),
    }
}

/// What the generator draws on: ids that exist, and the document.
struct World {
    doc: Value,
    test_id: String,
    attempt_id: String,
    notification_id: String,
}

impl World {
    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(reference) => {
                let name = reference.rsplit('/').next().unwrap();
                self.resolve(&self.doc["components"]["schemas"][name])
            }
            None => schema,
        }
    }

    /// A value for a path parameter named `name`.
    fn path_value(&self, rng: &mut TestRng, name: &str) -> String {
        let real = match name {
            "test_id" => self.test_id.clone(),
            "attempt_id" => self.attempt_id.clone(),
            "id" => self.notification_id.clone(),
            "question_id" => "q1".to_string(),
            "user_id" => "alice".to_string(),
            _ => "x".to_string(),
        };
        match pick(rng, 4) {
            0 | 1 => real,
            2 => uuid::Uuid::from_u128(u128::from(rng.next_u64())).to_string(),
            _ => odd_string(rng),
        }
    }

    /// A value of `schema`'s type, or now and then of another.
    fn scalar(&self, rng: &mut TestRng, schema: &Value) -> String {
        let schema = self.resolve(schema);
        if chance(rng, 25) {
            return odd_string(rng);
        }
        match type_of(schema) {
            Some("integer") => {
                let values = [0, 1, 2, 50, 200, 201, -1, 1_000_000, i64::MAX];
                values[pick(rng, values.len())].to_string()
            }
            Some("boolean") => ["true", "false"][pick(rng, 2)].to_string(),
            _ => format!("s{}", rng.next_u64() % 1000),
        }
    }

    /// A JSON value following `schema`, sometimes bent out of it.
    fn json(&self, rng: &mut TestRng, schema: &Value, depth: usize) -> Value {
        let schema = self.resolve(schema);
        if depth > 4 || chance(rng, 8) {
            return arbitrary(rng, 2);
        }
        if let Some(choices) = schema["enum"].as_array() {
            return choices[pick(rng, choices.len())].clone();
        }
        for combinator in ["oneOf", "anyOf", "allOf"] {
            if let Some(options) = schema[combinator].as_array() {
                let option = &options[pick(rng, options.len())];
                return self.json(rng, option, depth + 1);
            }
        }
        match type_of(schema) {
            Some("object") => {
                let mut object = Map::new();
                let properties = schema["properties"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                for (name, property) in &properties {
                    let required = schema["required"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|n| n == name));
                    if required || chance(rng, 50) {
                        object.insert(name.clone(), self.json(rng, property, depth + 1));
                    }
                }
                if chance(rng, 5) {
                    object.insert("unexpected".into(), json!(1));
                }
                Value::Object(object)
            }
            Some("array") => {
                let n = if chance(rng, 5) { 0 } else { 1 + pick(rng, 4) };
                Value::Array(
                    (0..n)
                        .map(|_| self.json(rng, &schema["items"], depth + 1))
                        .collect(),
                )
            }
            Some("integer") => {
                let values = [0, 1, 3, 10, -1, 1_001, 4_294_967_296i64];
                json!(values[pick(rng, values.len())])
            }
            Some("number") => json!(rng.next_u64() % 100),
            Some("boolean") => json!(chance(rng, 50)),
            Some("string") => match schema["format"].as_str() {
                Some("uuid") if chance(rng, 70) => {
                    json!(uuid::Uuid::from_u128(u128::from(rng.next_u64())).to_string())
                }
                _ if chance(rng, 20) => json!(odd_string(rng)),
                _ => json!(format!("text {}", rng.next_u64() % 1000)),
            },
            _ => arbitrary(rng, 2),
        }
    }
}

/// The first non-null type a schema names.
fn type_of(schema: &Value) -> Option<&str> {
    match &schema["type"] {
        Value::String(t) => Some(t),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null"),
        _ => None,
    }
}

fn arbitrary(rng: &mut TestRng, depth: usize) -> Value {
    match pick(rng, if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(chance(rng, 50)),
        2 => json!(rng.next_u64() as i64),
        3 => json!(odd_string(rng)),
        4 => json!(-1.5),
        5 => Value::Array(
            (0..pick(rng, 3))
                .map(|_| arbitrary(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut object = Map::new();
            for _ in 0..pick(rng, 3) {
                object.insert(odd_string(rng), arbitrary(rng, depth - 1));
            }
            Value::Object(object)
        }
    }
}

/// Why `value` does not conform to `schema`, if it does not.
fn violation(world: &World, value: &Value, schema: &Value, at: &str) -> Option<String> {
    let schema = world.resolve(schema);
    for combinator in ["oneOf", "anyOf"] {
        if let Some(options) = schema[combinator].as_array() {
            let fits = options
                .iter()
                .any(|option| violation(world, value, option, at).is_none());
            return (!fits).then(|| format!("{at}: fits none of {combinator}"));
        }
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all
            .iter()
            .find_map(|part| violation(world, value, part, at));
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(types) => types.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    let fits_type = types.iter().any(|t| match *t {
        "null" => value.is_null(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    });
    if !fits_type {
        return Some(format!("{at}: {value} is not {types:?}"));
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if n < min {
            return Some(format!("{at}: {n} is below {min}"));
        }
    }
    if let Some(object) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                return Some(format!("{at}: `{name}` is missing"));
            }
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                if let Some(field) = object.get(name) {
                    if let Some(why) = violation(world, field, property, &format!("{at}.{name}")) {
                        return Some(why);
                    }
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            if let Some(why) = violation(world, item, items, &format!("{at}[{i}]")) {
                return Some(why);
            }
        }
    }
    None
}

/// One generated request: what to send, and a line that names it.
struct Case {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<(String, Vec<u8>)>,
}

fn generate(world: &World, rng: &mut TestRng, method: &str, template: &str, op: &Value) -> Case {
    let mut path = template.to_string();
    let mut query = Vec::new();
    let mut headers = Vec::new();
    for parameter in op["parameters"].as_array().into_iter().flatten() {
        let name = parameter["name"].as_str().unwrap();
        match parameter["in"].as_str().unwrap() {
            "path" => {
                let value = world.path_value(rng, name);
                path = path.replace(&format!("{{{name}}}"), &value);
            }
            "query" if chance(rng, 50) => {
                query.push(format!(
                    "{name}={}",
                    world.scalar(rng, &parameter["schema"])
                ));
            }
            "header" if chance(rng, 50) => {
                headers.push((name.to_string(), world.scalar(rng, &parameter["schema"])));
            }
            _ => {}
        }
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let body = op["requestBody"]["content"]["application/json"]["schema"]
        .as_object()
        .map(|schema| {
            let schema = Value::Object(schema.clone());
            match pick(rng, 10) {
                0 => ("text/plain".to_string(), b"not json".to_vec()),
                1 => ("application/json".to_string(), b"{\"unterminated".to_vec()),
                2 => (
                    "application/json".to_string(),
                    serde_json::to_vec(&arbitrary(rng, 2)).unwrap(),
                ),
                _ => (
                    "application/json".to_string(),
                    serde_json::to_vec(&world.json(rng, &schema, 0)).unwrap(),
                ),
            }
        });
    Case {
        method: method.to_uppercase().parse().unwrap(),
        path,
        headers,
        body,
    }
}

/// Sends `case` as `token` and checks the properties; `Err` says which
/// one failed and how.
async fn check(
    world: &World,
    app: &TestApp,
    op: &Value,
    case: &Case,
    token: Option<&str>,
) -> Result<(), String> {
    let mut request = app
        .request(case.method.clone(), &case.path, token)
        .timeout(Duration::from_secs(20));
    for (name, value) in &case.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    if let Some((content_type, body)) = &case.body {
        request = request
            .header("content-type", content_type.as_str())
            .body(body.clone());
    }
    let mut response = request
        .send()
        .await
        .map_err(|err| format!("no answer: {err}"))?;
    let status = response.status();
    if status.is_server_error() {
        let body = response.text().await.unwrap_or_default();
        return Err(format!("server error {status}: {body}"));
    }
    let documented = &op["responses"][status.as_str()];
    if documented.is_null() {
        return Err(format!("{status} is not documented"));
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap().trim().to_string());
    let Some(content) = documented["content"].as_object() else {
        return Ok(());
    };
    let Some(content_type) = content_type else {
        return Err(format!(
            "{status}: no content type, documented {:?}",
            content.keys()
        ));
    };
    let Some(media) = content.get(&content_type) else {
        return Err(format!(
            "{status}: content type {content_type}, documented {:?}",
            content.keys().collect::<Vec<_>>()
        ));
    };
    if content_type == "text/event-stream" {
        // A stream stays open: its head is what is checked.
        return Ok(());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| err.to_string())? {
        body.extend_from_slice(&chunk);
    }
    if content_type.ends_with("json") && !media["schema"].is_null() {
        let value: Value = serde_json::from_slice(&body)
            .map_err(|err| format!("{status}: a {content_type} body that is not JSON: {err}"))?;
        if let Some(why) = violation(world, &value, &media["schema"], "body") {
            return Err(format!("{status}: {why} in {value}"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn every_operation_keeps_to_the_document_whatever_it_is_sent() {
    let app = spawn_app().await;
    let admin = app.admin();
    let alice = app.user("alice");
    let test_id = app.published_test().await;
    let attempt_id = app.started_attempt(&test_id, &alice).await;
    let sent = app
        .post(
            "/v1/notifications",
            &admin,
            Some(json!({"user_ids": ["alice"], "title": "Hello", "body": "Welcome"})),
        )
        .await;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    let sent: Value = sent.json().await.unwrap();
    let doc = app.openapi().await;
    let world = World {
        notification_id: sent["notification_ids"][0].as_str().unwrap().to_string(),
        doc,
        test_id,
        attempt_id,
    };
    let cases = std::env::var("PODIUM_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    // Failures by operation and kind, with the count and one example.
    let mut failures: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    let mut sent_count = 0;
    let paths = world.doc["paths"].as_object().unwrap().clone();
    for (template, item) in &paths {
        for (method, op) in item.as_object().unwrap() {
            for (role, token) in [
                ("user", Some(&alice)),
                ("admin", Some(&admin)),
                ("anonymous", None),
            ] {
                for n in 0..cases {
                    let case = generate(&world, &mut rng, method, template, op);
                    sent_count += 1;
                    if let Err(why) =
                        check(&world, &app, op, &case, token.map(String::as_str)).await
                    {
                        let body = case
                            .body
                            .as_ref()
                            .map(|(t, b)| format!(" [{t}] {:.200}", String::from_utf8_lossy(b)))
                            .unwrap_or_default();
                        let kind: String = why.chars().take_while(|c| *c != ':').collect();
                        let example = format!(
                            "as {role}, case {n}: {} {}{body}\n      {why:.600}",
                            case.method, case.path
                        );
                        failures
                            .entry(format!("{method} {template}: {kind}"))
                            .or_insert((0, example))
                            .0 += 1;
                    }
                }
            }
        }
    }
    assert!(sent_count > 1_000, "only {sent_count} requests");
    let broken: usize = failures.values().map(|(count, _)| count).sum();
    let report: Vec<String> = failures
        .iter()
        .map(|(kind, (count, example))| format!("{kind} ({count} times)\n    {example}"))
        .collect();
    assert!(
        failures.is_empty(),
        "{broken} of {sent_count} requests broke the document:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_schema_check_finds_what_does_not_conform() {
    let world = World {
        doc: json!({"components": {"schemas": {"Item": {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "string"}, "n": {"type": ["integer", "null"], "minimum": 0}}
        }}}}),
        test_id: String::new(),
        attempt_id: String::new(),
        notification_id: String::new(),
    };
    let list = json!({"type": "array", "items": {"$ref": "#/components/schemas/Item"}});
    assert_eq!(
        violation(&world, &json!([{"id": "a", "n": null}]), &list, "body"),
        None
    );
    for bad in [
        json!([{"n": 1}]),
        json!([{"id": 1}]),
        json!([{"id": "a", "n": -1}]),
        json!([{"id": "a", "n": "1"}]),
        json!({"id": "a"}),
    ] {
        assert!(violation(&world, &bad, &list, "body").is_some(), "{bad}");
    }
    let either = json!({"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Item"}]});
    assert!(violation(&world, &json!(null), &either, "body").is_none());
    assert!(violation(&world, &json!({"n": 2}), &either, "body").is_some());
}
