//! The cluster edge (pure functions): all public traffic enters through the gateway's Service
//! (`--edge-service`), which has a constant set of ports however many labels there are:
//! HTTPS, the shared client port and one shared range of rendezvous ports, each with
//! port == targetPort (== nodePort for a NodePort Service), so a port has one number
//! everywhere.
//!
//! - Each label owns a slice of the range ([`slice`]): `spec.rendezvousPorts` ports starting
//!   at a stable offset `FNV-1a(namespace/name) mod count`, wrapping around. Slices may
//!   overlap; the gateway asks every candidate relay which one expects the connection.
//! - A label without a Service of its own ([`service_type`] is `None`) is reached at the
//!   gateway Service's public address ([`exposure`]): its relay's local client port q maps to
//!   the shared port, local p port `20000 + k` to the slice's `T_k`.
//!
//! The range and the shared port are operator flags (`--edge-rendezvous-ports`,
//! `--edge-shared-port`), not read from the gateway Service's port list: the slices are a
//! function of the range, so it must be known before anything is applied and must not
//! shift when someone edits the Service; the chart derives the operator's, the gateway's
//! and the Service's numbers from the same values, and [`exposure`] checks the Service
//! really has the ports a label needs before it tells the relay to advertise them.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Node, Service};
use taas_crds::{ServiceType, TaasLabel, TaasLabelSpec};

use crate::address::{self, Exposure};
use crate::names;

/// The operator's edge mode settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeSettings {
    /// The gateway's Service, in the operator's namespace.
    pub service: String,
    /// The public shared client port (the gateway's `--shared-port`).
    pub shared_port: u16,
    /// The shared range of rendezvous ports (the gateway's `--rendezvous-ports`).
    pub rendezvous: PortRange,
}

/// A non-empty range of ports `first..=first + count - 1` (`LO-HI` on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    count: u16,
}

impl PortRange {
    /// `None` if empty or past port 65535.
    pub fn new(first: u16, count: u16) -> Option<Self> {
        (first > 0 && count > 0 && u32::from(first) + u32::from(count) - 1 <= 65535)
            .then_some(Self { first, count })
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn last(&self) -> u16 {
        self.first + (self.count - 1)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last())
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected LO-HI, two ports 1..=65535 with LO <= HI")]
pub struct PortRangeError(String);

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || PortRangeError(s.to_string());
        let (lo, hi) = s.trim().split_once('-').ok_or_else(error)?;
        let lo: u16 = lo.trim().parse().map_err(|_| error())?;
        let hi: u16 = hi.trim().parse().map_err(|_| error())?;
        if lo == 0 || hi < lo {
            return Err(error());
        }
        Self::new(lo, hi - lo + 1).ok_or_else(error)
    }
}

/// 64-bit FNV-1a: stable across Rust releases and platforms (std's `DefaultHasher` is not),
/// so a label keeps its slice across operator upgrades.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where the slice of the TaasLabel `namespace/name` starts: an offset into the range.
pub fn offset(namespace: &str, name: &str, count: u16) -> u16 {
    let hash = fnv1a(format!("{namespace}/{name}").as_bytes());
    // `count` is at least 1 for a `PortRange`; 0 would be meaningless, give 0.
    u16::try_from(hash % u64::from(count.max(1))).unwrap_or(0)
}

/// The `n` public rendezvous ports of the TaasLabel `namespace/name`, in the order of its
/// relay's local p ports 20000, 20001, ...: consecutive ports of `range` from
/// [`offset`], wrapping around (distinct when `n <= count`).
pub fn slice(namespace: &str, name: &str, n: u16, range: PortRange) -> Vec<u16> {
    let start = offset(namespace, name, range.count);
    (0..n)
        .map(|k| {
            let index = (u32::from(start) + u32::from(k)) % u32::from(range.count);
            // index < count, so first + index <= last <= 65535.
            range.first + index as u16
        })
        .collect()
}

/// A label's slice under `edge`.
pub fn label_slice(label: &TaasLabel, edge: &EdgeSettings) -> Vec<u16> {
    slice(
        names::namespace(label),
        names::object_name(label),
        names::p_ports(label).count() as u16,
        edge.rendezvous,
    )
}

/// The type of the label's own public Service, `None` for none: the spec's, or when unset
/// the install's default (no Service of its own in edge mode, `LoadBalancer` otherwise).
pub fn service_type(spec: &TaasLabelSpec, edge: bool) -> Option<ServiceType> {
    match spec.service.type_ {
        Some(type_) => Some(type_),
        None if edge => None,
        None => Some(ServiceType::LoadBalancer),
    }
}

/// Whether the label is reached through the gateway's Service only (edge mode, no Service
/// of its own): then its rendezvous ports are its slice of the shared range.
pub fn through_gateway(label: &TaasLabel, edge: Option<&EdgeSettings>) -> bool {
    edge.is_some() && service_type(&label.spec, true).is_none()
}

/// The external address of a label reached through the gateway Service `gateway`: the
/// Service's public host (as for a label's own Service: load balancer ingress, a node
/// address for NodePort, the cluster IP for ClusterIP), the shared port and the slice.
/// Waits (an `Err` saying why) while the Service is missing, has no address yet, or lacks
/// one of those ports with port == nodePort.
pub fn exposure(
    label: &TaasLabel,
    edge: &EdgeSettings,
    gateway: Option<&Service>,
    nodes: &[Node],
    address_types: &[String],
) -> Result<Exposure, String> {
    let gateway = gateway.ok_or_else(|| {
        format!(
            "waiting for the gateway Service {} (the cluster edge)",
            edge.service
        )
    })?;
    let host = address::service_host(gateway, nodes, address_types)?;
    let rendezvous = label_slice(label, edge);
    let spec = gateway.spec.clone().unwrap_or_default();
    let node_port = spec.type_.as_deref() == Some("NodePort");
    let missing: Vec<String> = std::iter::once(edge.shared_port)
        .chain(rendezvous.iter().copied())
        .filter(|&wanted| {
            !spec.ports.iter().flatten().any(|port| {
                port.port == i32::from(wanted)
                    && (!node_port || port.node_port == Some(i32::from(wanted)))
            })
        })
        .map(|p| p.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the gateway Service {} lacks port{} {}{}",
            edge.service,
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if node_port {
                " (with nodePort equal to port)"
            } else {
                ""
            }
        ));
    }
    Ok(Exposure {
        host,
        client: edge.shared_port,
        rendezvous,
    })
}

/// The external address a label reached through the gateway tells its relay until there is
/// an exposure: the gateway Service's DNS name and the edge ports (so the relay can start).
pub fn provisional_external(
    label: &TaasLabel,
    edge: &EdgeSettings,
    operator_namespace: &str,
) -> Exposure {
    Exposure {
        host: format!("{}.{operator_namespace}.svc", edge.service),
        client: edge.shared_port,
        rendezvous: label_slice(label, edge),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::build::tests::label;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;

    pub fn edge_settings() -> EdgeSettings {
        EdgeSettings {
            service: "taas-gateway".into(),
            shared_port: 9443,
            rendezvous: "20000-20255".parse().unwrap(),
        }
    }

    /// The gateway Service as the chart makes it: `https`, `shared` and `rdv-T` for the whole
    /// range, port == targetPort (== nodePort for NodePort).
    pub fn gateway_service(
        type_: &str,
        edge: &EdgeSettings,
        ingress: Option<LoadBalancerIngress>,
    ) -> Service {
        let node_port = type_ == "NodePort";
        let port = |name: String, port: u16| ServicePort {
            name: Some(name),
            port: port.into(),
            node_port: node_port.then_some(port.into()),
            ..Default::default()
        };
        let mut ports = vec![
            port("https".into(), 443),
            port("shared".into(), edge.shared_port),
        ];
        let range = edge.rendezvous;
        ports.extend((range.first()..=range.last()).map(|t| port(format!("rdv-{t}"), t)));
        Service {
            metadata: ObjectMeta {
                name: Some(edge.service.clone()),
                namespace: Some("taas-system".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ip: Some("10.0.0.9".into()),
                ports: Some(ports),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: ingress.map(|i| vec![i]),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn port_ranges_parse_as_lo_dash_hi() {
        let r: PortRange = "20000-20255".parse().unwrap();
        assert_eq!((r.first(), r.count(), r.last()), (20000, 256, 20255));
        assert_eq!(r.to_string(), "20000-20255");
        let one: PortRange = "30000-30000".parse().unwrap();
        assert_eq!(one.count(), 1);
        assert_eq!("65535-65535".parse::<PortRange>().unwrap().last(), 65535);
        for bad in ["", "20000", "20001-20000", "0-10", "1-65536", "a-b", "-5"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
        assert_eq!(PortRange::new(65535, 2), None);
        assert_eq!(PortRange::new(1, 0), None);
    }

    #[test]
    fn the_hash_is_fnv_1a() {
        // The published FNV-1a 64 test vectors: the slices must never move between releases.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_slice_is_consecutive_ports_wrapping_at_the_end_of_the_range() {
        let range = PortRange::new(30000, 10).unwrap();
        let start = offset("default", "home", 10);
        let s = slice("default", "home", 10, range);
        assert_eq!(s[0], 30000 + start);
        let mut sorted = s.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (30000..30010).collect::<Vec<_>>());
        for pair in s.windows(2) {
            assert!(pair[1] == pair[0] + 1 || (pair[0] == 30009 && pair[1] == 30000));
        }
    }

    #[test]
    fn labels_without_a_type_have_no_service_of_their_own_in_edge_mode_only() {
        let mut l = label();
        assert_eq!(
            service_type(&l.spec, false),
            Some(ServiceType::LoadBalancer)
        );
        assert_eq!(service_type(&l.spec, true), None);
        assert!(through_gateway(&l, Some(&edge_settings())));
        assert!(!through_gateway(&l, None));
        l.spec.service.type_ = Some(ServiceType::NodePort);
        assert_eq!(service_type(&l.spec, true), Some(ServiceType::NodePort));
        assert!(!through_gateway(&l, Some(&edge_settings())));
    }

    #[test]
    fn a_label_behind_the_gateway_is_reached_at_its_load_balancer() {
        let l = label();
        let edge = edge_settings();
        let lb = gateway_service(
            "LoadBalancer",
            &edge,
            Some(LoadBalancerIngress {
                ip: Some("203.0.113.1".into()),
                ..Default::default()
            }),
        );
        let got = exposure(&l, &edge, Some(&lb), &[], &[]).unwrap();
        assert_eq!(got.host, "203.0.113.1");
        assert_eq!(got.client, 9443);
        assert_eq!(got.rendezvous, label_slice(&l, &edge));
        assert_eq!(got.rendezvous.len(), 2);
        // The relay maps its local ports to those.
        // (With an exposure, `external` does not look at the Service.)
        let external = address::external(&l, &Service::default(), Some(&got));
        assert_eq!(
            external.ports,
            [
                (20000, got.rendezvous[0]),
                (20001, got.rendezvous[1]),
                (21000, 9443)
            ]
            .into()
        );
    }

    #[test]
    fn a_label_behind_the_gateway_waits_for_its_service_and_address() {
        let l = label();
        let edge = edge_settings();
        assert_eq!(
            exposure(&l, &edge, None, &[], &[]),
            Err("waiting for the gateway Service taas-gateway (the cluster edge)".into())
        );
        let no_address = gateway_service("LoadBalancer", &edge, None);
        assert_eq!(
            exposure(&l, &edge, Some(&no_address), &[], &[]),
            Err("waiting for the load balancer's address".into())
        );
        // NodePort: a node's address, once there is one.
        let np = gateway_service("NodePort", &edge, None);
        let types = ["InternalIP".to_string()];
        assert!(exposure(&l, &edge, Some(&np), &[], &types).is_err());
        let nodes = [crate::address::tests::node(
            "a",
            true,
            &[("InternalIP", "192.168.1.1")],
        )];
        let got = exposure(&l, &edge, Some(&np), &nodes, &types).unwrap();
        assert_eq!(got.host, "192.168.1.1");
        assert_eq!(got.client, 9443);
    }

    #[test]
    fn a_gateway_service_without_the_labels_ports_is_waited_for() {
        let l = label();
        let edge = edge_settings();
        let slice = label_slice(&l, &edge);
        let mut np = gateway_service("NodePort", &edge, None);
        let ports = np.spec.as_mut().unwrap().ports.as_mut().unwrap();
        ports.retain(|p| p.port != i32::from(slice[1]));
        // A node port other than the port is not the same number everywhere.
        for p in ports.iter_mut() {
            if p.port == 9443 {
                p.node_port = Some(31443);
            }
        }
        let nodes = [crate::address::tests::node(
            "a",
            true,
            &[("InternalIP", "192.168.1.1")],
        )];
        assert_eq!(
            exposure(&l, &edge, Some(&np), &nodes, &["InternalIP".into()]),
            Err(format!(
                "the gateway Service taas-gateway lacks ports 9443, {} (with nodePort equal to port)",
                slice[1]
            ))
        );
    }

    #[test]
    fn until_then_the_relay_is_told_the_gateway_services_name() {
        let l = label();
        let edge = edge_settings();
        let e = provisional_external(&l, &edge, "taas-system");
        assert_eq!(e.host, "taas-gateway.taas-system.svc");
        assert_eq!(e.client, 9443);
        assert_eq!(e.rendezvous, label_slice(&l, &edge));
    }

    proptest! {
        #[test]
        fn slices_lie_in_the_range_are_distinct_and_stable(
            namespace in "[a-z0-9-]{1,20}",
            name in "[a-z0-9-]{1,20}",
            first in 1u16..=65000,
            count in 1u16..=512,
            n in 1u16..=64,
        ) {
            let Some(range) = PortRange::new(first, count) else { return Ok(()) };
            let s = slice(&namespace, &name, n, range);
            prop_assert_eq!(s.len(), usize::from(n));
            prop_assert!(s.iter().all(|&p| p >= range.first() && p <= range.last()));
            let distinct: std::collections::BTreeSet<_> = s.iter().collect();
            prop_assert_eq!(distinct.len(), usize::from(n.min(count)));
            prop_assert_eq!(&slice(&namespace, &name, n, range), &s);
            // Growing n extends the slice: the first ports never move.
            let longer = slice(&namespace, &name, n.saturating_add(1), range);
            prop_assert_eq!(&longer[..s.len()], &s[..]);
        }
    }
}
