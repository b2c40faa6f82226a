//! The names, labels and ports the operator gives the objects of a label `X` in namespace
//! `N`: one place, so that the builders, the checks and the routes agree.

use std::borrow::Cow;
use std::collections::BTreeMap;

use taas_crds::TaasLabel;

/// Server-side apply field manager (and events' reporting controller).
pub const FIELD_MANAGER: &str = "taas-operator";

/// The relay pod's fixed ports; the Service maps them to the external ones.
pub const CONTROL_PORT: u16 = 8080;
pub const METRICS_PORT: u16 = 9464;
pub const CLIENT_PORT: u16 = 21000;
/// The relay's edge port (`label-relay --edge`), where the gateway forwards connections it
/// took on the cluster edge's shared ports, each behind a `taas_protocol::edge` header.
pub const EDGE_PORT: u16 = 21001;
/// Rendezvous port `i` of the pod is `P_PORT_BASE + i`.
pub const P_PORT_BASE: u16 = 20000;

/// Where the relay pod mounts its ConfigMap and Secret, and the ConfigMap's keys.
pub const LABEL_DIR: &str = "/etc/taas/label";
pub const SECRET_DIR: &str = "/etc/taas/secret";
pub const LABEL_KEY: &str = "label.yaml";
pub const EXTERNAL_KEY: &str = "external.yaml";
/// The routes ConfigMap's key (the gateway's `--routes-file` format).
pub const ROUTES_KEY: &str = "routes.yaml";

pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const TAAS_LABEL_LABEL: &str = "taas.dev/label";
pub const RELAY_APP: &str = "taas-relay";
/// Selects the objects this operator made (the `.owns()` watches filter on it).
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=taas-operator";

/// The longest object name kept as is in the derived names: `taas-X-control` must be a
/// DNS-1035 label of at most 63 characters.
pub const MAX_OBJECT_NAME: usize = 63 - "taas--control".len();

/// How many hex digits of the name's hash a derived base carries: 40 bits, so that even
/// 10,000 such names in one namespace share children with odds of about 1 in 20,000 (and a
/// clash is refused as `ForeignObject`, never overwritten).
const HASH_DIGITS: usize = 10;

/// The part `X` of a label's child names (`taas-X`, `taas-X-control`), also the value of its
/// `app.kubernetes.io/instance` label, for any object name the API server accepts (a
/// DNS-1123 subdomain: up to 253 characters, dots allowed).
///
/// A name that is a DNS-1123 label of at most [`MAX_OBJECT_NAME`] characters is kept as it
/// is: those are the names served before this derivation, and renaming their children would
/// orphan and recreate them. Any other name gets its readable start, dots (and anything else
/// outside `a-z0-9`) turned to `-`, followed by a hash of the whole name, so that two names
/// never share children (`a.b` and `a-b` included). Every result is at most
/// [`MAX_OBJECT_NAME`] characters of `a-z0-9-`, starting and ending with a letter or digit.
pub fn child_base(object_name: &str) -> Cow<'_, str> {
    if object_name.len() <= MAX_OBJECT_NAME && is_dns1123_label(object_name) {
        return Cow::Borrowed(object_name);
    }
    let hash = format!("{:016x}", crate::edge::fnv1a(object_name.as_bytes()));
    let hash = &hash[..HASH_DIGITS];
    let readable: String = object_name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .take(MAX_OBJECT_NAME - HASH_DIGITS - 1)
        .collect();
    let readable = readable.trim_matches('-');
    Cow::Owned(if readable.is_empty() {
        hash.to_string()
    } else {
        format!("{readable}-{hash}")
    })
}

/// A DNS-1123 label: 1 to 63 of `a-z0-9-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| alnum(b) || b == b'-')
        && name.bytes().next().is_some_and(alnum)
        && name.bytes().last().is_some_and(alnum)
}

/// The Deployment, the ConfigMap and the external Service: `taas-X` ([`child_base`]).
pub fn relay_name(label: &TaasLabel) -> String {
    format!("taas-{}", child_base(object_name(label)))
}

/// Pod `i` of a label whose replicas each have a Service of their own (a StatefulSet's pod),
/// and that Service: `taas-X-i` (at most `taas-X-control`'s length, as `i` < 16).
pub fn pod_name(label: &TaasLabel, i: u32) -> String {
    format!("{}-{i}", relay_name(label))
}

/// The longest StatefulSet name: its pods carry `controller-revision-hash: NAME-HASH`, a
/// label value of at most 63 characters with a hash of up to 10.
pub const MAX_STATEFUL_SET_NAME: usize = 52;

/// The pod label a StatefulSet gives each pod (its own name): what a pod's own Service
/// selects.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";

/// The in-cluster Service of the relay's control port: `taas-X-control`.
pub fn control_name(label: &TaasLabel) -> String {
    format!("taas-{}-control", child_base(object_name(label)))
}

/// Where the gateways reach the label's relay: `taas-X-control.N.svc.<cluster_domain>.:8080`.
///
/// Fully qualified, with the trailing dot: a relative name (`taas-X-control.N.svc`) goes
/// through the pod's DNS search path first (`ndots:5`), so a namespace literally named `svc`
/// (`taas-X-control.N.svc.svc.cluster.local`) would be tried before the real one and could
/// capture the route. A trailing-dot name is looked up as is (getaddrinfo, which tokio uses).
pub fn relay_address(label: &TaasLabel, cluster_domain: &str) -> String {
    format!(
        "{}.{}.svc.{}.:{CONTROL_PORT}",
        control_name(label),
        namespace(label),
        cluster_domain.trim_end_matches('.')
    )
}

/// Where the gateways reach the label's relay's edge port:
/// `taas-X-control.N.svc.<cluster_domain>.:21001` (fully qualified, as [`relay_address`]).
pub fn edge_address(label: &TaasLabel, cluster_domain: &str) -> String {
    format!(
        "{}.{}.svc.{}.:{EDGE_PORT}",
        control_name(label),
        namespace(label),
        cluster_domain.trim_end_matches('.')
    )
}

pub fn object_name(label: &TaasLabel) -> &str {
    label.metadata.name.as_deref().unwrap_or_default()
}

pub fn namespace(label: &TaasLabel) -> &str {
    label.metadata.namespace.as_deref().unwrap_or("default")
}

/// The pod selector of a label's relay: stable for the Deployment's life (a Deployment's
/// selector is immutable).
pub fn selector(label: &TaasLabel) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), RELAY_APP.to_string()),
        // The base, not the name: a label value has at most 63 characters.
        (
            INSTANCE_LABEL.to_string(),
            child_base(object_name(label)).into_owned(),
        ),
    ])
}

/// The labels on every object of a label, and on its pod: the selector, who manages it, and
/// the LABEL itself when it fits a label value (at most 63 characters; longer LABELs are in
/// the ConfigMap and the TaasLabel only).
pub fn labels(label: &TaasLabel) -> BTreeMap<String, String> {
    let mut labels = selector(label);
    labels.insert(MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string());
    if label.spec.label.len() <= 63 {
        labels.insert(TAAS_LABEL_LABEL.to_string(), label.spec.label.clone());
    }
    labels
}

/// The pod's rendezvous ports, one per `spec.rendezvousPorts`.
pub fn p_ports(label: &TaasLabel) -> impl Iterator<Item = u16> {
    // The schema bounds rendezvousPorts to 1..=64; clamp anyway so a bad object cannot
    // overflow the port arithmetic.
    let n = label.spec.rendezvous_ports.clamp(
        taas_crds::limits::RENDEZVOUS_PORTS_MIN,
        taas_crds::limits::RENDEZVOUS_PORTS_MAX,
    ) as u16;
    (0..n).map(|i| P_PORT_BASE + i)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::build::tests::label;

    /// A 253-character object name: four DNS labels, the longest a name can be.
    pub(crate) fn longest_name() -> String {
        format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        )
    }

    /// A Service's name: a DNS-1035 label (starts with a letter).
    fn is_dns1035_label(name: &str) -> bool {
        is_dns1123_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
    }

    /// A label value: at most 63 of `A-Za-z0-9-_.`, starting and ending with a letter or
    /// digit (or empty).
    fn is_label_value(value: &str) -> bool {
        value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && value
                .bytes()
                .next()
                .is_none_or(|b| b.is_ascii_alphanumeric())
            && value
                .bytes()
                .last()
                .is_none_or(|b| b.is_ascii_alphanumeric())
    }

    fn named(name: &str) -> TaasLabel {
        let mut l = label();
        l.metadata.name = Some(name.to_string());
        l
    }

    fn assert_valid_children(name: &str) {
        let l = named(name);
        for service in [relay_name(&l), control_name(&l)] {
            assert!(is_dns1035_label(&service), "{name:?}: {service:?}");
        }
        for value in selector(&l).values() {
            assert!(is_label_value(value), "{name:?}: {value:?}");
        }
    }

    #[test]
    fn names_served_before_keep_their_children() {
        assert_eq!(child_base("home"), "home");
        let l = label();
        assert_eq!(relay_name(&l), "taas-home");
        assert_eq!(control_name(&l), "taas-home-control");
        assert_eq!(selector(&l)[INSTANCE_LABEL], "home");
        let longest = "x".repeat(MAX_OBJECT_NAME);
        assert_eq!(child_base(&longest), longest);
        assert_eq!(child_base("0-a--b"), "0-a--b");
    }

    #[test]
    fn dotted_and_long_names_get_a_readable_start_and_a_hash() {
        assert_eq!(child_base("automatic.home"), "automatic-home-e0e054ecb8");
        let l = named("automatic.home");
        assert_eq!(relay_name(&l), "taas-automatic-home-e0e054ecb8");
        assert_eq!(control_name(&l), "taas-automatic-home-e0e054ecb8-control");
        assert_eq!(
            edge_address(&l, "cluster.local"),
            "taas-automatic-home-e0e054ecb8-control.default.svc.cluster.local.:21001"
        );
        // `a.b` and `a-b` do not share children.
        assert_eq!(child_base("a.b"), "a-b-e61d991904");
        assert_eq!(child_base("a-b"), "a-b");
        assert_eq!(
            child_base(&longest_name()),
            format!("{}-8b50ab2ca1", "a".repeat(39))
        );
        assert_eq!(
            child_base(&"x".repeat(MAX_OBJECT_NAME + 1)),
            format!("{}-cf6d3a1a39", "x".repeat(39))
        );
        for name in ["automatic.home", "a.b", &longest_name(), &"x".repeat(51)] {
            assert_valid_children(name);
        }
    }

    #[test]
    fn even_names_the_api_server_refuses_make_valid_children() {
        for name in [
            "",
            "-",
            "a-",
            "-a",
            "A",
            "a_b",
            ".",
            "a..b",
            "é",
            &"-".repeat(300),
        ] {
            assert_valid_children(name);
        }
        assert_ne!(child_base("A"), child_base("a"));
    }

    /// One DNS-1123 label, 1 to 63 characters.
    fn dns_label() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]",
            "[a-z0-9][a-z0-9-]{0,61}[a-z0-9]",
            // Long ones, so that 253-character names come up often.
            "[a-z0-9][a-z0-9-]{55,61}[a-z0-9]",
        ]
    }

    /// Any object name the API server accepts: a DNS-1123 subdomain of at most 253
    /// characters.
    fn object_name_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(dns_label(), 1..=5).prop_map(|labels| {
            let mut name = labels.join(".");
            name.truncate(253);
            name.trim_end_matches(['.', '-']).to_string()
        })
    }

    proptest! {
        #[test]
        fn every_valid_object_name_makes_valid_deterministic_children(
            name in object_name_strategy(),
        ) {
            prop_assume!(!name.is_empty());
            let l = named(&name);
            for service in [relay_name(&l), control_name(&l)] {
                prop_assert!(is_dns1035_label(&service), "{:?}", service);
            }
            for value in selector(&l).values() {
                prop_assert!(is_label_value(value), "{:?}", value);
            }
            // Deterministic: a copy of the name (another allocation) derives the same.
            let copy = name.chars().collect::<String>();
            prop_assert_eq!(child_base(&name), child_base(&copy));
        }

        #[test]
        fn names_valid_before_are_unchanged(name in "[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?") {
            prop_assert_eq!(child_base(&name), name.as_str());
            prop_assert_eq!(control_name(&named(&name)), format!("taas-{name}-control"));
        }

        #[test]
        fn distinct_names_have_distinct_children(
            a in object_name_strategy(),
            b in object_name_strategy(),
            tail in "[a-z0-9]{1,3}",
        ) {
            // Near misses too: dots for dashes, and names that differ only past the
            // readable start.
            let dashed = a.replace('.', "-");
            let longer = format!("{a}{tail}");
            let candidates = [a.clone(), b, dashed, longer];
            for x in &candidates {
                for y in &candidates {
                    if x != y && !x.is_empty() && !y.is_empty() {
                        prop_assert_ne!(child_base(x), child_base(y), "{} vs {}", x, y);
                    }
                }
            }
        }
    }

    #[test]
    fn relay_addresses_are_fully_qualified() {
        let l = label();
        assert_eq!(
            relay_address(&l, "cluster.local"),
            "taas-home-control.default.svc.cluster.local.:8080"
        );
        // A domain given with its trailing dot gets one dot, not two.
        assert_eq!(
            relay_address(&l, "k8s.example.org."),
            "taas-home-control.default.svc.k8s.example.org.:8080"
        );
        assert_eq!(
            edge_address(&l, "cluster.local."),
            "taas-home-control.default.svc.cluster.local.:21001"
        );
    }
}
