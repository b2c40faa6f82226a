//! The binary's own commands: `crd` prints the committed CRD, `--help` documents the flags.

use std::process::Command;

fn operator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_taas-operator"))
        .args(args)
        .output()
        .expect("run taas-operator")
}

#[test]
fn crd_prints_the_committed_manifest() {
    let out = operator(&["crd"]);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/taaslabels.yaml"
    ))
    .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
}

#[test]
fn help_lists_the_flags_and_their_environment() {
    let out = operator(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--namespace",
        "--operator-namespace",
        "--routes-configmap",
        "--relay-image",
        "--relay-image-pull-policy",
        "--registrar",
        "--domain",
        "--node-address-type",
        "--metrics",
        "TAAS_RELAY_IMAGE",
        "POD_NAMESPACE",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}

#[test]
fn bad_flags_are_refused_before_connecting() {
    let out = operator(&["--metrics", "nowhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--metrics \"nowhere\""), "{err}");
}

#[test]
fn rbac_prints_the_rules_table() {
    let out = operator(&["rbac"]);
    assert!(out.status.success());
    let rules = String::from_utf8(out.stdout).unwrap();
    assert_eq!(rules, taas_operator::rbac::cluster_role_rules());
    assert!(rules.contains("resources: [\"taaslabels/status\"]\n  verbs: [\"patch\"]"));
    // What the operator deletes: a label's own children it no longer needs (its budget back
    // at one replica; the workload and Services of one replica or of several with a Service
    // each, when it switches). Never a Secret, a ConfigMap or a label.
    let deleting: Vec<&str> = rules
        .split("- apiGroups:")
        .filter(|rule| rule.contains("\"delete\""))
        .map(|rule| {
            rule.split("resources: [\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        deleting,
        [
            "deployments",
            "statefulsets",
            "services",
            "poddisruptionbudgets"
        ],
        "{rules}"
    );
}
