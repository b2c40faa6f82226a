//! Every Kubernetes API call the operator makes, in one table: the Helm chart's ClusterRole
//! is written from it, and nothing in the code may call beyond it.
//!
//! | API group | resource | verbs | where |
//! |---|---|---|---|
//! | `taas.dev` | `taaslabels` | get, list, watch | the controller's watch and cache |
//! | `taas.dev` | `taaslabels/status` | patch | `reconcile`: status (server-side apply) |
//! | `apps` | `deployments` | get, list, watch, create, patch, delete | `reconcile`: foreign check, apply; `.owns()`; delete when a label with a Service of its own goes to several replicas |
//! | `apps` | `statefulsets` | get, list, watch, create, patch, delete | the same, for several replicas with a Service of the label's own; delete when it goes back to one |
//! | `""` | `services` | get, list, watch, create, patch, delete | the same; delete: a label's one Service when its replicas get one each, a replica's when it goes; in edge mode also `get` and `watch` (`list` to start it) of the gateway's Service in the operator's namespace |
//! | `""` | `configmaps` | get, list, watch, create, patch | the same, and the routes ConfigMap |
//! | `""` | `secrets` | get, list, watch | `reconcile`: the label's Secret (`get`); the controller's metadata-only watch (`list`, `watch`) |
//! | `""` | `nodes` | list | `reconcile`: node addresses for NodePort Services |
//! | `policy` | `poddisruptionbudgets` | get, list, watch, create, patch, delete | `reconcile`: apply (several replicas), delete (back to one); `.owns()` |
//! | `events.k8s.io` | `events` | create, patch | events on TaasLabels (kube's `Recorder`) |
//! | `coordination.k8s.io` | `leases` | get, create, update | `--leader-elect` only, in the operator's namespace |
//!
//! `create` is listed with `patch` because server-side apply of an object that does not exist
//! yet creates it (the API server authorizes a PATCH that creates as `create` too). Nothing
//! is ever deleted but a label's own children it no longer needs (each checked to be
//! controlled by the label, and deleted with its UID as a precondition): its
//! PodDisruptionBudget when it goes back to one replica, and with a Service of its own, the
//! Deployment and Service of one replica when it goes to several (a StatefulSet with a
//! Service per pod), those when it goes back, and a pod's Service when it scales down.
//! Everything else goes with the label: the children carry a controller ownerReference to
//! their TaasLabel and the garbage collector removes them. Which PodDisruptionBudget version is served (`policy/v1`, or
//! `policy/v1beta1` before Kubernetes 1.21) is read from discovery, which needs no rule. No finalizers are set (so no `update` on `taaslabels`), and
//! owner references do not set `blockOwnerDeletion` (which would need `update` on
//! `taaslabels/finalizers` where the OwnerReferencesPermissionEnforcement admission plugin
//! runs).
//!
//! **Secrets: what the code asks for, and what the role allows.** The controller watches
//! Secrets only to notice a label's Secret appearing or changing, so it watches their
//! *metadata* (`PartialObjectMeta`, `Accept: ...;as=PartialObjectMetadataList`): no Secret's
//! data is listed or cached. The one Secret a label names is read whole with `get` when the
//! label is reconciled, to tell "no such Secret" from "no such key" in the status. RBAC,
//! however, has no verb for "metadata only": `list` and `watch` on `secrets` let whoever holds
//! the operator's ServiceAccount token read every Secret's data in the namespaces it watches
//! (all of them with a ClusterRole). The chart limits that with `operator.watchNamespace`
//! (a namespaced Role instead); otherwise the operator's token is as sensitive as a
//! cluster-wide Secret reader's, and must be protected as such (its pod mounts it; nothing
//! else does).
//!
//! The routes ConfigMap, the leader election Lease and (edge mode) the gateway's Service live
//! in the operator's namespace (`--operator-namespace`); everything else in the labels' namespaces (with `--namespace`,
//! that one only) except `nodes`, which are cluster-scoped.

/// One rule of the operator's ClusterRole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// The table above, for code (and tests) that need it.
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "taas.dev",
        resource: "taaslabels",
        verbs: &["get", "list", "watch"],
    },
    Rule {
        api_group: "taas.dev",
        resource: "taaslabels/status",
        verbs: &["patch"],
    },
    Rule {
        api_group: "apps",
        resource: "deployments",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_group: "apps",
        resource: "statefulsets",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_group: "",
        resource: "services",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_group: "",
        resource: "configmaps",
        verbs: &["get", "list", "watch", "create", "patch"],
    },
    Rule {
        api_group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch"],
    },
    Rule {
        api_group: "",
        resource: "nodes",
        verbs: &["list"],
    },
    Rule {
        api_group: "policy",
        resource: "poddisruptionbudgets",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
    Rule {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
    },
];

/// The ClusterRole's `rules:` as YAML (what the chart's template holds).
pub fn cluster_role_rules() -> String {
    let mut out = String::new();
    for rule in RULES {
        out.push_str(&format!(
            "- apiGroups: [\"{}\"]\n  resources: [\"{}\"]\n  verbs: [{}]\n",
            rule.api_group,
            rule.resource,
            rule.verbs
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

/// Whether `verb` on `resource` (`group/resource[/subresource]`, core group empty) is in the
/// table: the reconcile tests check every request they see against it.
pub fn allows(api_group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .any(|r| r.api_group == api_group && r.resource == resource && r.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_as_yaml() {
        let yaml = cluster_role_rules();
        let parsed: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed.as_sequence().unwrap().len(), RULES.len());
        assert!(yaml.contains(
            "- apiGroups: [\"taas.dev\"]\n  resources: [\"taaslabels/status\"]\n  verbs: [\"patch\"]\n"
        ));
        assert!(allows("", "nodes", "list"));
        assert!(!allows("", "secrets", "patch"));
        assert!(!allows("", "configmaps", "delete"));
        assert!(allows("policy", "poddisruptionbudgets", "delete"));
        assert!(allows("coordination.k8s.io", "leases", "update"));
    }
}
