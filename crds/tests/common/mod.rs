//! What the API server would say about an object, approximated without one: the generated
//! CRD's OpenAPI schema (with a JSON-schema validator) and its CEL rules (kube's evaluator).

use kube::core::cel::Validator;
use kube::CustomResourceExt as _;
use serde_json::{json, Value};
use taas_crds::TaasLabel;

/// The generated CRD's `openAPIV3Schema` as JSON.
pub fn schema() -> Value {
    let crd = TaasLabel::crd();
    let schema = crd.spec.versions[0].schema.as_ref().unwrap();
    serde_json::to_value(schema.open_api_v3_schema.as_ref().unwrap()).unwrap()
}

/// A minimal valid TaasLabel with `spec` merged over it.
pub fn label_with(spec: Value) -> Value {
    let mut label = json!({
        "apiVersion": "taas.dev/v1alpha1",
        "kind": "TaasLabel",
        "metadata": {"name": "home", "namespace": "default"},
        "spec": {"id": "id-1", "label": "home", "secretRef": {"name": "home-totp"}},
    });
    for (k, v) in spec.as_object().unwrap() {
        label["spec"][k] = v.clone();
    }
    label
}

/// What the API server's OpenAPI validation would say about `object`, approximated with a
/// JSON-schema validator: OpenAPI's `nullable` becomes a `null` type, and fields the schema
/// does not know (which the API server would silently prune) are errors too.
pub fn schema_errors(object: &Value) -> Vec<String> {
    fn nullable_to_type(schema: &mut Value) {
        if let Some(map) = schema.as_object_mut() {
            if map.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = map.get("type").cloned() {
                    map.insert("type".into(), json!([t, "null"]));
                }
            }
            map.values_mut().for_each(nullable_to_type);
        } else if let Some(items) = schema.as_array_mut() {
            items.iter_mut().for_each(nullable_to_type);
        }
    }
    fn unknown_fields(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                let props = schema.get("properties").and_then(Value::as_object);
                for (key, v) in map {
                    let here = format!("{path}/{key}");
                    if let Some(sub) = props.and_then(|p| p.get(key)) {
                        unknown_fields(sub, v, &here, out);
                    } else if let Some(sub) = schema.get("additionalProperties") {
                        unknown_fields(sub, v, &here, out);
                    } else if !(path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&key.as_str()))
                    {
                        out.push(format!(
                            "{here}: unknown field (the API server would drop it)"
                        ));
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    unknown_fields(&schema["items"], v, &format!("{path}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut schema = schema();
    nullable_to_type(&mut schema);
    let validator = jsonschema::draft4::new(&schema).expect("the CRD schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    unknown_fields(&schema, object, "", &mut errors);
    errors
}

/// Every CEL rule that fails for `object` (an update from `old` when given).
pub fn cel_errors(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}
