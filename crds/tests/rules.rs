//! One source for each rule: the generated CRD (its OpenAPI schema and CEL rules, as the API
//! server would apply them) and `TaasLabelSpec::validate` (what the operator, the standalone
//! relay and `label new` apply) find the same fields at fault, on a table of cases (in range,
//! each bound, just outside each bound, bad label names) and on random specs.

use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::{json, Value};
use taas_crds::limits::{
    CLIENT_PORT_MAX, CLIENT_PORT_MIN, DNS_PART_MAX_LEN, DNS_SUBDOMAIN_MAX_LEN, ID_MAX_LEN,
    LOAD_BALANCER_CLASS_MAX_LEN, MAX_PARKED_MAX, MAX_PARKED_MIN, PERIOD_MAX, PERIOD_MIN,
    RENDEZVOUS_PORTS_MAX, RENDEZVOUS_PORTS_MIN, REPLICAS_MAX, REPLICAS_MIN, SECRET_KEY_MAX_LEN,
};
use taas_crds::{
    ClientAdmission, LabelService, ProxyProtocol, SecretKeyRef, ServiceType, TaasLabelSpec,
};

mod common;

use common::{cel_errors, label_with, schema_errors};

/// The spec fields (API spelling, `secretRef.name`) the schema and the CEL rules refuse.
fn api_server_fields(label: &Value) -> BTreeSet<String> {
    let from_schema = schema_errors(label).into_iter().map(|e| {
        // "/spec/secretRef/name: ..." → "secretRef.name"
        let path = e.split_once(": ").map_or(e.as_str(), |(path, _)| path);
        let path = path.strip_prefix("/spec/").unwrap_or(path);
        path.replace('/', ".")
    });
    let from_cel = cel_errors(label, None).into_iter().map(|e| {
        // "spec.proxyProtocol: message" → "proxyProtocol"
        let path = e.split_once(": ").map_or(e.as_str(), |(path, _)| path);
        path.strip_prefix("spec.").unwrap_or(path).to_string()
    });
    from_schema.chain(from_cel).collect()
}

/// The spec fields `validate()` refuses.
fn validate_fields(spec: &TaasLabelSpec) -> BTreeSet<String> {
    let errors = spec.validate().err().map(|e| e.0).unwrap_or_default();
    errors.iter().map(|e| e.field().to_string()).collect()
}

/// Checks that the API server and `validate()` agree on `overrides` (merged over a minimal
/// valid spec), and that the fields at fault are `expected`.
fn agree(overrides: Value, expected: &[&str]) {
    let label = label_with(overrides.clone());
    let spec: TaasLabelSpec = serde_json::from_value(label["spec"].clone())
        .unwrap_or_else(|e| panic!("{overrides}: {e}"));
    let api_server = api_server_fields(&label);
    let validate = validate_fields(&spec);
    let expected: BTreeSet<String> = expected.iter().map(|f| f.to_string()).collect();
    assert_eq!(api_server, expected, "API server on {overrides}");
    assert_eq!(validate, expected, "validate() on {overrides}");
}

#[test]
fn ranges_agree_in_range_at_each_bound_and_just_outside() {
    for (field, min, max) in [
        ("period", PERIOD_MIN, PERIOD_MAX),
        ("maxParked", MAX_PARKED_MIN, MAX_PARKED_MAX),
        (
            "rendezvousPorts",
            RENDEZVOUS_PORTS_MIN,
            RENDEZVOUS_PORTS_MAX,
        ),
        ("replicas", REPLICAS_MIN, REPLICAS_MAX),
    ] {
        for ok in [min, min + 1, (min + max) / 2, max - 1, max] {
            agree(json!({ field: ok }), &[]);
        }
        agree(json!({ field: min - 1 }), &[field]);
        agree(json!({ field: max + 1 }), &[field]);
        agree(json!({ field: u32::MAX }), &[field]);
    }
    for ok in [CLIENT_PORT_MIN, 443, CLIENT_PORT_MAX] {
        agree(json!({ "clientPort": ok }), &[]);
    }
    agree(
        json!({ "clientPort": CLIENT_PORT_MIN - 1 }),
        &["clientPort"],
    );
    // (Above CLIENT_PORT_MAX is not a u16: the types refuse it, as the schema does.)
    agree(json!({ "clientPort": null }), &[]);
    agree(json!({ "replicas": null }), &[]);
}

#[test]
fn label_names_agree() {
    let part = "a".repeat(DNS_PART_MAX_LEN);
    // Four parts: 63 + 63 + 63 + 61 characters and three dots = 253.
    let longest = format!("{part}.{part}.{part}.{}", "b".repeat(61));
    assert_eq!(longest.len(), DNS_SUBDOMAIN_MAX_LEN);
    let good = [
        "a",
        "0",
        "home",
        "a-b.c9",
        "office.home-2",
        "xn--bcher-kva",
        "123.456",
        &part,
        &longest,
    ];
    for label in good {
        agree(json!({ "label": label }), &[]);
    }
    let bad = [
        "".to_string(),
        format!("{longest}b"),
        format!("{longest}.b"),
        format!("{part}x"),
        format!("x.{part}x"),
        "Home".into(),
        "HOME".into(),
        "home.Office".into(),
        "-home".into(),
        "home-".into(),
        "a.-b".into(),
        "a-.b".into(),
        ".".into(),
        ".home".into(),
        "home.".into(),
        "a..b".into(),
        "my_home".into(),
        "my home".into(),
        "home\n".into(),
        "é".into(),
        "h\u{43e}me".into(), // a Cyrillic o
        "home\u{200b}".into(),
        "*.home".into(),
        "home:80".into(),
    ];
    for label in &bad {
        agree(json!({ "label": label }), &["label"]);
    }
}

#[test]
fn ids_agree() {
    for id in [
        "a".to_string(),
        "a:b/c@d".into(),
        "2f402f80-da50-11e1-9b23-0123456789ab".into(),
        "ü".into(),
        "x".repeat(ID_MAX_LEN),
    ] {
        agree(json!({ "id": id }), &[]);
    }
    for id in [
        String::new(),
        "x".repeat(ID_MAX_LEN + 1),
        "a b".into(),
        " a".into(),
        "a\tb".into(),
        "a\nb".into(),
        "a\u{0}".into(),
        "a\u{7}".into(),
        "a\u{7f}".into(),
        "a\u{85}".into(),
        "a\u{9f}".into(),
        "a\u{a0}b".into(),
        "a\u{2028}b".into(),
        "a\u{3000}b".into(),
    ] {
        agree(json!({ "id": id }), &["id"]);
    }
}

#[test]
fn secret_refs_agree() {
    for secret_ref in [
        json!({"name": "home-totp"}),
        json!({"name": "home.totp", "key": "totp.b32"}),
        json!({"name": "s", "key": "A_b-1.c"}),
        json!({"name": "s", "key": "k".repeat(SECRET_KEY_MAX_LEN)}),
    ] {
        agree(json!({ "secretRef": secret_ref }), &[]);
    }
    for (secret_ref, field) in [
        (json!({"name": ""}), "secretRef.name"),
        (json!({"name": "Home_TOTP"}), "secretRef.name"),
        (json!({"name": "home-"}), "secretRef.name"),
        (json!({"name": "s", "key": ""}), "secretRef.key"),
        (json!({"name": "s", "key": "a b"}), "secretRef.key"),
        (json!({"name": "s", "key": "a/b"}), "secretRef.key"),
        (
            json!({"name": "s", "key": "k".repeat(SECRET_KEY_MAX_LEN + 1)}),
            "secretRef.key",
        ),
    ] {
        agree(json!({ "secretRef": secret_ref }), &[field]);
    }
}

#[test]
fn cel_rules_agree() {
    agree(
        json!({"serverSpeaksFirst": true, "proxyProtocol": "v1"}),
        &[],
    );
    agree(
        json!({"serverSpeaksFirst": true, "proxyProtocol": "v2"}),
        &[],
    );
    agree(json!({"serverSpeaksFirst": false}), &[]);
    agree(json!({"serverSpeaksFirst": true}), &["proxyProtocol"]);
    agree(
        json!({"serverSpeaksFirst": true, "proxyProtocol": "none"}),
        &["proxyProtocol"],
    );
    let class = |class: String, type_: &str| json!({"service": {"type": type_, "loadBalancerClass": class}});
    agree(class("example.com/lb".into(), "LoadBalancer"), &[]);
    agree(
        class("c".repeat(LOAD_BALANCER_CLASS_MAX_LEN), "LoadBalancer"),
        &[],
    );
    for bad in [
        class(String::new(), "LoadBalancer"),
        class("c".repeat(LOAD_BALANCER_CLASS_MAX_LEN + 1), "LoadBalancer"),
        class("x".into(), "NodePort"),
        class("x".into(), "ClusterIP"),
        // Unset, the type is the install's default, which may be no Service at all.
        json!({"service": {"loadBalancerClass": "x"}}),
    ] {
        agree(bad, &["service.loadBalancerClass"]);
    }
}

#[test]
fn direct_agrees_except_with_a_server_that_speaks_first_which_only_validate_refuses() {
    agree(json!({"direct": true}), &[]);
    agree(
        json!({"direct": false, "serverSpeaksFirst": true, "proxyProtocol": "v1"}),
        &[],
    );
    // `direct` with `serverSpeaksFirst`: refused by validate() (the operator and the relay),
    // accepted by the API server (the CRD keeps its four CEL rules): the documented exception.
    let overrides = json!({"direct": true, "serverSpeaksFirst": true, "proxyProtocol": "v1"});
    let label = label_with(overrides);
    let spec: TaasLabelSpec = serde_json::from_value(label["spec"].clone()).unwrap();
    assert_eq!(api_server_fields(&label), BTreeSet::new());
    assert_eq!(
        validate_fields(&spec),
        BTreeSet::from(["direct".to_string()])
    );
}

#[test]
fn several_problems_at_once_agree() {
    agree(
        json!({"id": "", "label": "Home", "period": 0, "maxParked": 1025, "clientPort": 0,
               "rendezvousPorts": 65, "replicas": 17, "serverSpeaksFirst": true,
               "secretRef": {"name": "a_b", "key": "a b"},
               "service": {"type": "NodePort", "loadBalancerClass": ""}}),
        &[
            "id",
            "label",
            "period",
            "maxParked",
            "clientPort",
            "rendezvousPorts",
            "replicas",
            "proxyProtocol",
            "secretRef.name",
            "secretRef.key",
            "service.loadBalancerClass",
        ],
    );
}

/// Random specs near the bounds and names from a small, rule-breaking alphabet.
fn any_spec() -> impl Strategy<Value = TaasLabelSpec> {
    let number = |min: u32, max: u32| {
        prop_oneof![
            (min.saturating_sub(2)..=max + 2),
            Just(0u32),
            Just(u32::MAX),
            any::<u32>(),
        ]
    };
    let name = prop_oneof![
        "[a-z0-9][-a-z0-9.]{0,20}[a-z0-9]",
        "[-a-zA-Z0-9._ é]{0,12}",
        "([a-z]{1,64}\\.){0,4}[a-z]{1,64}",
    ];
    let id = prop_oneof![
        "[!-~]{1,20}",
        "[-a-z \t\u{0}\u{7}\u{7f}\u{85}\u{9f}\u{a0}\u{2028}\u{3000}éü]{0,12}",
        "x{250,260}",
    ];
    let key = prop_oneof!["[-._a-zA-Z0-9]{1,12}", "[-._a-z /:]{0,6}"];
    let service_type = prop_oneof![
        Just(None),
        Just(Some(ServiceType::LoadBalancer)),
        Just(Some(ServiceType::NodePort)),
        Just(Some(ServiceType::ClusterIP)),
    ];
    let proxy = prop_oneof![
        Just(ProxyProtocol::None),
        Just(ProxyProtocol::V1),
        Just(ProxyProtocol::V2),
    ];
    (
        (id, name.clone(), name, key),
        (
            number(PERIOD_MIN, PERIOD_MAX),
            number(MAX_PARKED_MIN, MAX_PARKED_MAX),
            number(RENDEZVOUS_PORTS_MIN, RENDEZVOUS_PORTS_MAX),
            prop_oneof![Just(None), Just(Some(0u16)), any::<u16>().prop_map(Some)],
            proptest::option::of(number(REPLICAS_MIN, REPLICAS_MAX)),
        ),
        (
            any::<bool>(),
            proxy,
            service_type,
            proptest::option::of(prop_oneof!["[a-z./]{0,8}", "c{250,256}"]),
        ),
    )
        .prop_map(
            |(
                (id, label, secret_name, secret_key),
                (period, max_parked, rendezvous_ports, client_port, replicas),
                (server_speaks_first, proxy_protocol, type_, load_balancer_class),
            )| TaasLabelSpec {
                id,
                label,
                secret_ref: SecretKeyRef {
                    name: secret_name,
                    key: secret_key,
                },
                algorithm: Default::default(),
                period,
                max_parked,
                source_pinning: true,
                proxy_protocol,
                client_port,
                client_admission: ClientAdmission::Open,
                server_speaks_first,
                direct: false,
                service: LabelService {
                    type_,
                    load_balancer_class,
                    ..Default::default()
                },
                rendezvous_ports,
                replicas,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_agree(spec in any_spec()) {
        let mut label = label_with(json!({}));
        label["spec"] = serde_json::to_value(&spec).unwrap();
        prop_assert_eq!(api_server_fields(&label), validate_fields(&spec), "{:?}", spec);
    }
}
