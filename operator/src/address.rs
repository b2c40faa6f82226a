//! Where a label is reached from outside, read from its applied Service (and, for NodePort,
//! the nodes' addresses): pure functions.
//!
//! - LoadBalancer: the first ingress IP (or host name) and the Service ports;
//! - NodePort: a node address (by `--node-address-type` preference, Ready nodes first, then
//!   by name) and the allocated node ports;
//! - ClusterIP: the cluster IP and the Service ports (reachable inside the cluster only).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use serde::Serialize;
use taas_crds::TaasLabel;

use crate::names;

/// The label's external address: host, client port q and the rendezvous ports p (in the
/// order of the pod's ports 20000, 20001, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    pub host: String,
    pub client: u16,
    pub rendezvous: Vec<u16>,
}

/// The relay's `--external-file` (`host:` and `ports: {LOCAL: EXTERNAL}`); with a Service per
/// replica (`build::per_pod_services`), `pods:` holds each pod's own, by pod name, and the
/// top level is the first pod's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct External {
    pub host: String,
    pub ports: BTreeMap<u16, u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pods: BTreeMap<String, External>,
}

/// The external address of `label` given its applied `service`, or why there is none yet.
pub fn exposure(
    label: &TaasLabel,
    service: &Service,
    nodes: &[Node],
    address_types: &[String],
) -> Result<Exposure, String> {
    let spec = service.spec.clone().unwrap_or_default();
    let node_port = spec.type_.as_deref() == Some("NodePort");
    let port = |name: &str| -> Option<u16> {
        let port = spec
            .ports
            .iter()
            .flatten()
            .find(|port| port.name.as_deref() == Some(name))?;
        let external = if node_port {
            port.node_port?
        } else {
            port.port
        };
        u16::try_from(external).ok().filter(|&p| p != 0)
    };
    let ports = || -> Option<(u16, Vec<u16>)> {
        let rendezvous = (0..names::p_ports(label).count())
            .map(|i| port(&format!("p{i}")))
            .collect::<Option<Vec<u16>>>()?;
        Some((port("client")?, rendezvous))
    };
    let host = service_host(service, nodes, address_types)?;
    let (client, rendezvous) = ports().ok_or(if node_port {
        "waiting for the Service's node ports"
    } else {
        "the Service lacks some of the label's ports"
    })?;
    Ok(Exposure {
        host,
        client,
        rendezvous,
    })
}

/// The public host of an applied Service, or why there is none yet: the first load balancer
/// ingress IP (or host name), a node address for NodePort, the cluster IP for ClusterIP.
pub fn service_host(
    service: &Service,
    nodes: &[Node],
    address_types: &[String],
) -> Result<String, String> {
    let spec = service.spec.clone().unwrap_or_default();
    Ok(match spec.type_.as_deref() {
        Some("NodePort") => node_address(nodes, address_types).ok_or_else(|| {
            format!(
                "no node has an address of type {}",
                address_types.join(" or ")
            )
        })?,
        Some("ClusterIP") => spec
            .cluster_ip
            .clone()
            .filter(|ip| !ip.is_empty() && ip != "None")
            .ok_or("the Service has no cluster IP yet")?,
        // LoadBalancer (the default).
        _ => service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .and_then(|ingress| {
                ingress.iter().find_map(|i| {
                    i.ip.clone()
                        .filter(|ip| !ip.is_empty())
                        .or_else(|| i.hostname.clone().filter(|h| !h.is_empty()))
                })
            })
            .ok_or("waiting for the load balancer's address")?,
    })
}

/// The address the relay tells hidden servers and clients: the exposure, or until there is
/// one, the Service's cluster IP (or its DNS name) and its ports, so the relay can start.
pub fn external(label: &TaasLabel, service: &Service, exposure: Option<&Exposure>) -> External {
    let local_p = names::p_ports(label);
    match exposure {
        Some(exposure) => External {
            host: exposure.host.clone(),
            ports: local_p
                .zip(exposure.rendezvous.iter().copied())
                .chain([(names::CLIENT_PORT, exposure.client)])
                .collect(),
            pods: BTreeMap::new(),
        },
        None => {
            let spec = service.spec.as_ref();
            let host = spec
                .and_then(|spec| spec.cluster_ip.clone())
                .filter(|ip| !ip.is_empty() && ip != "None")
                .unwrap_or_else(|| {
                    format!(
                        "{}.{}.svc",
                        names::relay_name(label),
                        names::namespace(label)
                    )
                });
            let client = spec
                .and_then(|spec| spec.ports.as_ref())
                .and_then(|ports| {
                    ports
                        .iter()
                        .find(|port| port.name.as_deref() == Some("client"))
                })
                .and_then(|port| u16::try_from(port.port).ok())
                .unwrap_or(names::CLIENT_PORT);
            External {
                host,
                ports: local_p
                    .map(|p| (p, p))
                    .chain([(names::CLIENT_PORT, client)])
                    .collect(),
                pods: BTreeMap::new(),
            }
        }
    }
}

/// The external file of a label whose replicas each have a Service of their own: every pod's
/// address under its name, and the first pod's at the top level (what a relay without a pod
/// name, or of an older image, tells).
pub fn per_pod(pods: Vec<(String, External)>) -> External {
    let mut top = pods
        .first()
        .map(|(_, external)| external.clone())
        .unwrap_or(External {
            host: String::new(),
            ports: BTreeMap::new(),
            pods: BTreeMap::new(),
        });
    top.pods = pods.into_iter().collect();
    top
}

/// The label's address when each replica has its own: the first replica's, once every replica
/// has one (else why one has none yet).
pub fn first_exposure(exposures: Vec<Result<Exposure, String>>) -> Result<Exposure, String> {
    let mut first = None;
    for (i, exposure) in exposures.into_iter().enumerate() {
        match exposure {
            Ok(exposure) => {
                first.get_or_insert(exposure);
            }
            Err(problem) => return Err(format!("replica {i}: {problem}")),
        }
    }
    first.ok_or_else(|| "no replica".to_string())
}

/// The first address of the most preferred type, looking at Ready nodes first, then by name.
pub fn node_address(nodes: &[Node], address_types: &[String]) -> Option<String> {
    let mut nodes: Vec<&Node> = nodes.iter().collect();
    nodes.sort_by_key(|node| (!is_ready(node), node.metadata.name.clone()));
    address_types.iter().find_map(|wanted| {
        nodes.iter().find_map(|node| {
            node.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| &a.type_ == wanted && !a.address.is_empty())
                .map(|a| a.address.clone())
        })
    })
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::build;
    use crate::build::tests::label;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeCondition, NodeStatus,
        ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use taas_crds::ServiceType;

    #[test]
    fn each_replica_with_a_service_of_its_own_has_its_address_and_the_first_is_the_labels() {
        let at = |host: &str, q: u16| External {
            host: host.into(),
            ports: BTreeMap::from([(names::CLIENT_PORT, q)]),
            pods: BTreeMap::new(),
        };
        let file = per_pod(vec![
            ("taas-home-0".into(), at("203.0.113.1", 31000)),
            ("taas-home-1".into(), at("203.0.113.2", 32000)),
        ]);
        assert_eq!(file.host, "203.0.113.1");
        assert_eq!(file.pods["taas-home-1"], at("203.0.113.2", 32000));
        let yaml = serde_yaml::to_string(&file).unwrap();
        assert!(yaml.contains("pods:"), "{yaml}");
        // One replica's file has no `pods:` (as before).
        assert!(!serde_yaml::to_string(&at("h", 1)).unwrap().contains("pods"));
        let exposure = |host: &str| Exposure {
            host: host.into(),
            client: 1,
            rendezvous: vec![],
        };
        assert_eq!(
            first_exposure(vec![Ok(exposure("a")), Ok(exposure("b"))]),
            Ok(exposure("a"))
        );
        assert_eq!(
            first_exposure(vec![
                Ok(exposure("a")),
                Err("waiting for the load balancer's address".into())
            ]),
            Err("replica 1: waiting for the load balancer's address".into())
        );
    }

    fn types() -> Vec<String> {
        vec!["ExternalIP".into(), "InternalIP".into()]
    }

    pub fn node(name: &str, ready: bool, addresses: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(type_, address)| NodeAddress {
                            type_: type_.to_string(),
                            address: address.to_string(),
                        })
                        .collect(),
                ),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The built Service as the API server would return it: a cluster IP, node ports for
    /// NodePort (31000 for the client, 32000+i for p_i, unless pinned), and `ingress`.
    pub fn applied(label: &TaasLabel, ingress: Option<LoadBalancerIngress>) -> Service {
        let mut service = build::service(label);
        let spec = service.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.0.0.7".into());
        if spec.type_.as_deref() == Some("NodePort") {
            for (i, port) in spec.ports.as_mut().unwrap().iter_mut().enumerate() {
                port.node_port
                    .get_or_insert(if i == 0 { 31000 } else { 32000 + i as i32 - 1 });
            }
        }
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: ingress.map(|i| vec![i]),
            }),
            ..Default::default()
        });
        service
    }

    pub fn ip(ip: &str) -> Option<LoadBalancerIngress> {
        Some(LoadBalancerIngress {
            ip: Some(ip.into()),
            ..Default::default()
        })
    }

    #[test]
    fn load_balancer_with_an_ip() {
        let l = label();
        let got = exposure(&l, &applied(&l, ip("203.0.113.7")), &[], &types());
        assert_eq!(
            got,
            Ok(Exposure {
                host: "203.0.113.7".into(),
                client: 21000,
                rendezvous: vec![20000, 20001],
            })
        );
        let external = external(&l, &applied(&l, None), got.as_ref().ok());
        assert_eq!(external.host, "203.0.113.7");
        assert_eq!(
            external.ports,
            BTreeMap::from([(20000, 20000), (20001, 20001), (21000, 21000)])
        );
    }

    #[test]
    fn load_balancer_with_a_host_name_and_a_pinned_port() {
        let mut l = label();
        l.spec.client_port = Some(443);
        let ingress = Some(LoadBalancerIngress {
            hostname: Some("lb.example.net".into()),
            ..Default::default()
        });
        let got = exposure(&l, &applied(&l, ingress), &[], &types()).unwrap();
        assert_eq!(got.host, "lb.example.net");
        assert_eq!(got.client, 443);
        let external = external(&l, &applied(&l, None), Some(&got));
        assert_eq!(external.ports[&21000], 443);
    }

    #[test]
    fn load_balancer_without_an_address_yet() {
        let l = label();
        for service in [applied(&l, None), build::service(&l)] {
            assert_eq!(
                exposure(&l, &service, &[], &types()),
                Err("waiting for the load balancer's address".into())
            );
        }
        // Meanwhile the relay is told the cluster IP and the Service ports.
        assert_eq!(
            external(&l, &applied(&l, None), None),
            External {
                host: "10.0.0.7".into(),
                ports: BTreeMap::from([(20000, 20000), (20001, 20001), (21000, 21000)]),
                pods: BTreeMap::new(),
            }
        );
        // Or, without even that, the Service's DNS name.
        assert_eq!(
            external(&l, &build::service(&l), None).host,
            "taas-home.default.svc"
        );
    }

    #[test]
    fn node_port_with_a_pinned_client_port() {
        let mut l = label();
        l.spec.service.type_ = Some(ServiceType::NodePort);
        l.spec.client_port = Some(30443);
        let nodes = [
            node("b", true, &[("InternalIP", "192.168.1.2")]),
            node("a", true, &[("InternalIP", "192.168.1.1")]),
        ];
        let got = exposure(&l, &applied(&l, None), &nodes, &types()).unwrap();
        assert_eq!(
            got,
            Exposure {
                host: "192.168.1.1".into(),
                client: 30443,
                rendezvous: vec![32000, 32001],
            }
        );
        assert_eq!(
            external(&l, &applied(&l, None), Some(&got)).ports,
            BTreeMap::from([(20000, 32000), (20001, 32001), (21000, 30443)])
        );
    }

    #[test]
    fn node_port_waits_for_node_ports_and_addresses() {
        let mut l = label();
        l.spec.service.type_ = Some(ServiceType::NodePort);
        let nodes = [node("a", true, &[("InternalIP", "192.168.1.1")])];
        assert_eq!(
            exposure(&l, &build::service(&l), &nodes, &types()),
            Err("waiting for the Service's node ports".into())
        );
        assert_eq!(
            exposure(&l, &applied(&l, None), &[], &types()),
            Err("no node has an address of type ExternalIP or InternalIP".into())
        );
        let hostname_only = [node("a", true, &[("Hostname", "a")])];
        assert!(exposure(&l, &applied(&l, None), &hostname_only, &types()).is_err());
    }

    #[test]
    fn node_addresses_by_preference_then_readiness_then_name() {
        let nodes = [
            node("c", true, &[("InternalIP", "10.1.0.3")]),
            node("b", false, &[("ExternalIP", "198.51.100.2")]),
            node("a", false, &[("InternalIP", "10.1.0.1")]),
            node(
                "d",
                true,
                &[("ExternalIP", "198.51.100.4"), ("InternalIP", "10.1.0.4")],
            ),
        ];
        assert_eq!(
            node_address(&nodes, &types()).as_deref(),
            Some("198.51.100.4")
        );
        assert_eq!(
            node_address(&nodes, &["InternalIP".into()]).as_deref(),
            Some("10.1.0.3")
        );
        assert_eq!(
            node_address(&nodes[1..3], &["InternalIP".into()]).as_deref(),
            Some("10.1.0.1")
        );
        assert_eq!(node_address(&nodes, &["Hostname".into()]), None);
    }

    #[test]
    fn cluster_ip() {
        let mut l = label();
        l.spec.service.type_ = Some(ServiceType::ClusterIP);
        assert_eq!(
            exposure(&l, &applied(&l, None), &[], &types()),
            Ok(Exposure {
                host: "10.0.0.7".into(),
                client: 21000,
                rendezvous: vec![20000, 20001],
            })
        );
        assert_eq!(
            exposure(&l, &build::service(&l), &[], &types()),
            Err("the Service has no cluster IP yet".into())
        );
    }
}
