//! The CRD generated from the types: it builds (kube's schema rewriter does not panic), the
//! committed `crds/taaslabels.yaml` is current, its schema accepts the example manifest and
//! rejects bad specs, and its CEL rules (which a Kubernetes 1.20 API server drops) hold.

use std::path::Path;

use common::{cel_errors, label_with, schema, schema_errors};
use kube::core::cel::{compile_schema, validate_cel, validate_cel_update};
use kube::CustomResourceExt as _;
use serde_json::{json, Value};
use taas_crds::manifest::{parse_documents, Object};
use taas_crds::{crd_yaml, TaasLabel, TaasLabelSpec, CRDGEN_COMMAND};

mod common;

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example's documents, as JSON values: the TaasLabel, then the Secret.
fn example() -> (Value, Value) {
    let text = repo_file("examples/label.yaml");
    let mut docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap());
    let (label, secret) = (docs.next().unwrap(), docs.next().unwrap());
    assert!(docs.next().is_none());
    (label, secret)
}

#[test]
fn crd_builds_with_names_columns_and_status() {
    let crd = TaasLabel::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("taaslabels.taas.dev"));
    assert_eq!(crd.spec.group, "taas.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    let names = &crd.spec.names;
    assert_eq!(names.kind, "TaasLabel");
    assert_eq!(names.plural, "taaslabels");
    assert_eq!(names.short_names.as_deref(), Some(&["tl".to_string()][..]));
    let [version] = crd.spec.versions.as_slice() else {
        panic!("one version expected")
    };
    assert_eq!(version.name, "v1alpha1");
    assert!(version.served && version.storage);
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("LABEL", ".spec.label"),
            ("ID", ".spec.id"),
            ("ENDPOINT", ".status.endpoint"),
            ("READY", r#".status.conditions[?(@.type=="Ready")].status"#),
            ("SERVING", ".status.readyReplicas"),
            ("REPLICAS", ".status.replicas"),
            ("AGE", ".metadata.creationTimestamp"),
        ]
    );
}

#[test]
fn committed_crd_is_current() {
    let committed = repo_file("crds/taaslabels.yaml");
    assert!(
        committed == crd_yaml(),
        "crds/taaslabels.yaml differs from the CRD generated from the types in crds/src; \
         regenerate it from the repository root with:\n    {CRDGEN_COMMAND}"
    );
}

/// A structural schema (what apiextensions/v1 requires): every node has a type (or says it
/// preserves unknown fields), and nothing uses references or combinators the generator could
/// have left behind.
#[test]
fn schema_is_structural() {
    fn walk(schema: &Value, path: &str) {
        let map = schema
            .as_object()
            .unwrap_or_else(|| panic!("{path}: not an object"));
        for bad in [
            "$ref",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
            "definitions",
            "$defs",
        ] {
            assert!(!map.contains_key(bad), "{path}: {bad}");
        }
        assert!(
            map.contains_key("type") || map.contains_key("x-kubernetes-preserve-unknown-fields"),
            "{path}: no type"
        );
        for (name, sub) in map
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            walk(sub, &format!("{path}.{name}"));
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = map.get(key).filter(|s| s.is_object()) {
                walk(sub, &format!("{path}[{key}]"));
            }
        }
    }
    walk(&schema(), "");
}

#[test]
fn cel_rules_compile() {
    let compiled = compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    let rules = serde_json::to_string(&schema())
        .unwrap()
        .matches("\"rule\"")
        .count();
    assert_eq!(
        rules, 4,
        "id and label immutable, loadBalancerClass needs LoadBalancer, serverSpeaksFirst needs proxyProtocol"
    );
}

#[test]
fn example_is_valid_for_the_api_server_and_the_relay() {
    let (label, secret) = example();
    assert_eq!(schema_errors(&label), Vec::<String>::new());
    assert_eq!(cel_errors(&label, None), Vec::<String>::new());
    // The typed resource reads it, and kube's own client-side CEL check agrees.
    let typed: TaasLabel = serde_json::from_value(label.clone()).unwrap();
    validate_cel(&typed).unwrap();
    assert_eq!(typed.spec.label, "home");
    assert_eq!(
        secret["metadata"]["name"],
        typed.spec.secret_ref.name.as_str()
    );
    assert!(secret["stringData"][&typed.spec.secret_ref.key].is_string());

    // The relay's manifest parser reads the same file to the same spec.
    let objects = parse_documents(&repo_file("examples/label.yaml")).unwrap();
    let [Object::Label(l), Object::Secret(s)] = objects.as_slice() else {
        panic!("{objects:?}")
    };
    assert_eq!((l.name.as_str(), l.namespace.as_str()), ("home", "default"));
    assert_eq!(l.spec, typed.spec);
    assert_eq!(s.name, l.spec.secret_ref.name);
    assert!(
        s.data[&l.spec.secret_ref.key].len() >= 32,
        "160-bit base32 secret"
    );
}

/// What the API server fills in for the optional fields equals the Rust defaults.
#[test]
fn schema_defaults_match_serde_defaults() {
    let minimal = label_with(json!({}));
    let spec: TaasLabelSpec = serde_json::from_value(minimal["spec"].clone()).unwrap();
    let defaults = schema()["properties"]["spec"]["properties"].clone();
    let serialized = serde_json::to_value(&spec).unwrap();
    for (field, value) in serialized.as_object().unwrap() {
        if let Some(default) = defaults[field].get("default") {
            assert_eq!(default, value, "default of spec.{field}");
        }
    }
    assert_eq!(spec.rendezvous_ports, 8);
    // No default type: unset is the install's choice (none of its own in edge mode).
    assert_eq!(
        serde_json::to_value(&spec.service).unwrap(),
        json!({"externalTrafficPolicy": "Local"})
    );
}

#[test]
fn schema_accepts_good_specs() {
    for spec in [
        json!({}),
        json!({"label": "office.home-2", "id": "a:b/c@d"}),
        json!({"clientPort": 1, "period": 1, "maxParked": 1, "rendezvousPorts": 1}),
        json!({"clientPort": 65535, "period": 300, "maxParked": 1024, "rendezvousPorts": 64}),
        json!({"clientPort": null}),
        json!({"algorithm": "SHA512", "proxyProtocol": "v2", "clientAdmission": "Redirected"}),
        json!({"serverSpeaksFirst": true, "proxyProtocol": "v1"}),
        json!({"serverSpeaksFirst": false}),
        json!({"service": {"type": "NodePort", "externalTrafficPolicy": "Cluster"}}),
        json!({"service": {"type": "LoadBalancer", "loadBalancerClass": "example.com/lb",
                           "annotations": {"a.example/b": "c"}}}),
        json!({"secretRef": {"name": "home-totp", "key": "totp.b32"}}),
    ] {
        let label = label_with(spec.clone());
        assert_eq!(schema_errors(&label), Vec::<String>::new(), "{spec}");
        assert_eq!(cel_errors(&label, None), Vec::<String>::new(), "{spec}");
    }
}

#[test]
fn schema_rejects_bad_specs() {
    let long_label = format!("{}.{}", "a".repeat(63), "b".repeat(190));
    for (spec, why) in [
        (json!({"label": "Home"}), "/spec/label"),
        (json!({"label": "my_home"}), "/spec/label"),
        (json!({"label": "-home"}), "/spec/label"),
        (json!({"label": "home."}), "/spec/label"),
        (
            json!({"label": format!("{}x", "a".repeat(63))}),
            "/spec/label",
        ),
        (json!({"label": long_label}), "/spec/label"),
        (json!({"id": ""}), "/spec/id"),
        (json!({"id": "two words"}), "/spec/id"),
        (json!({"id": "x".repeat(257)}), "/spec/id"),
        (json!({"period": 0}), "/spec/period"),
        (json!({"period": 301}), "/spec/period"),
        (json!({"maxParked": 0}), "/spec/maxParked"),
        (json!({"maxParked": 1025}), "/spec/maxParked"),
        (json!({"clientPort": 0}), "/spec/clientPort"),
        (json!({"clientPort": 65536}), "/spec/clientPort"),
        (json!({"rendezvousPorts": 0}), "/spec/rendezvousPorts"),
        (json!({"rendezvousPorts": 65}), "/spec/rendezvousPorts"),
        (json!({"algorithm": "MD5"}), "/spec/algorithm"),
        (json!({"proxyProtocol": "V2"}), "/spec/proxyProtocol"),
        (json!({"clientAdmission": "open"}), "/spec/clientAdmission"),
        (
            json!({"service": {"type": "ExternalName"}}),
            "/spec/service/type",
        ),
        (
            json!({"service": {"externalTrafficPolicy": "local"}}),
            "/spec/service/externalTrafficPolicy",
        ),
        (
            json!({"service": {"annotations": {"a": 1}}}),
            "/spec/service/annotations/a",
        ),
        (json!({"secretRef": {"key": "secret"}}), "/spec/secretRef"),
        (
            json!({"secretRef": {"name": "Home_TOTP"}}),
            "/spec/secretRef/name",
        ),
        (
            json!({"secretRef": {"name": "s", "key": "a b"}}),
            "/spec/secretRef/key",
        ),
        (json!({"maxparked": 4}), "/spec/maxparked"),
    ] {
        let errors = schema_errors(&label_with(spec.clone()));
        assert!(
            errors.iter().any(|e| e.starts_with(why)),
            "{spec} should fail at {why}: {errors:?}"
        );
    }
    let mut no_id = label_with(json!({}));
    no_id["spec"].as_object_mut().unwrap().remove("id");
    assert!(schema_errors(&no_id)
        .iter()
        .any(|e| e.contains("\"id\" is a required")));
}

#[test]
fn cel_rejects_server_speaks_first_without_a_proxy_header() {
    for spec in [
        json!({"serverSpeaksFirst": true}),
        json!({"serverSpeaksFirst": true, "proxyProtocol": "none"}),
    ] {
        let errors = cel_errors(&label_with(spec.clone()), None);
        assert!(
            errors.len() == 1
                && errors[0].contains("serverSpeaksFirst needs proxyProtocol v1 or v2"),
            "{spec}: {errors:?}"
        );
    }
    assert_eq!(
        schema_errors(&label_with(json!({"serverSpeaksFirst": "yes"}))).len(),
        1,
        "a boolean"
    );
}

#[test]
fn cel_rejects_load_balancer_class_without_load_balancer() {
    for service_type in ["NodePort", "ClusterIP"] {
        let label =
            label_with(json!({"service": {"type": service_type, "loadBalancerClass": "x"}}));
        let errors = cel_errors(&label, None);
        assert!(
            errors.len() == 1
                && errors[0]
                    .contains("loadBalancerClass may only be set when type is LoadBalancer"),
            "{service_type}: {errors:?}"
        );
    }
    // With the type left out it is the install's default, which in edge mode is no Service
    // at all: a class needs the type said explicitly.
    let errors = cel_errors(
        &label_with(json!({"service": {"loadBalancerClass": "x"}})),
        None,
    );
    assert!(
        errors.len() == 1
            && errors[0].contains("loadBalancerClass may only be set when type is LoadBalancer"),
        "{errors:?}"
    );
    assert_eq!(
        cel_errors(
            &label_with(json!({"service": {"type": "LoadBalancer", "loadBalancerClass": "x"}})),
            None
        ),
        Vec::<String>::new()
    );
}

#[test]
fn cel_makes_id_and_label_immutable() {
    let (old, _) = example();
    let update = |spec: Value| {
        let mut new = old.clone();
        for (k, v) in spec.as_object().unwrap() {
            new["spec"][k] = v.clone();
        }
        new
    };
    // Everything else may change.
    let ok = update(json!({"period": 60, "maxParked": 4, "clientPort": 21000,
                           "secretRef": {"name": "other"}, "service": {"type": "NodePort"}}));
    assert_eq!(cel_errors(&ok, Some(&old)), Vec::<String>::new());
    for (spec, message) in [
        (json!({"id": "someone-else"}), "id is immutable"),
        (json!({"label": "office"}), "label is immutable"),
    ] {
        let new = update(spec.clone());
        let errors = cel_errors(&new, Some(&old));
        assert!(
            errors.len() == 1 && errors[0].contains(message),
            "{spec}: {errors:?}"
        );
        // A create is not an update: the transition rules do not apply.
        assert_eq!(cel_errors(&new, None), Vec::<String>::new());
    }
    // kube's typed helper agrees.
    let old: TaasLabel = serde_json::from_value(old).unwrap();
    let mut new = old.clone();
    new.spec.label = "office".into();
    assert!(validate_cel_update(&new, &old).is_err());
    new.spec.label = old.spec.label.clone();
    new.spec.period = 60;
    validate_cel_update(&new, &old).unwrap();
}
