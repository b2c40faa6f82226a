//! What the gateway's edge looks up in the routes, and its decision on a rendezvous port's
//! claims. Pure (no I/O): the index is built from the routes whenever they change
//! (`RouteTable::replace`), so a connection costs a map lookup, never a scan of every label.
//!
//! - By server name (the shared client port, direct labels on HTTPS): `LABEL.<domain>` →
//!   LABEL's relay edge address, when LABEL is in edge mode.
//! - By rendezvous port T: every label whose slice holds T (slices overlap by design), each
//!   asked in turn by the edge whether the hidden server on T is its own ([`decide`]).

use std::collections::HashMap;

use super::Route;

/// One label's relay as the edge reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeTarget {
    /// LABEL, lower case: written in the edge header, and its gateway token's input.
    pub label: String,
    /// `host:port` of the relay's edge port.
    pub edge: String,
    /// The route's `ready` flag (it can lag the relay: the edge tries an unready relay).
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// `None`: routed (HTTPS is forwarded), but not in edge mode.
    target: Option<EdgeTarget>,
    direct: bool,
}

/// What the edge looks up, built from the routes ([`EdgeIndex::build`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeIndex {
    by_label: HashMap<String, Entry>,
    /// T → the labels owning it, by label name (deterministic order, no duplicates).
    by_port: HashMap<u16, Vec<EdgeTarget>>,
}

/// What a server name names, for the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameLookup<'a> {
    /// A label in edge mode.
    Edge(&'a EdgeTarget),
    /// A routed label without an edge address (not in edge mode).
    NoEdge,
    /// `LABEL.<domain>` with no route for LABEL.
    UnknownName,
    /// Not a label under the domain.
    OutsideDomain,
}

impl EdgeIndex {
    pub fn build(routes: &HashMap<String, Route>) -> Self {
        let mut index = Self::default();
        for (label, route) in routes {
            let label = label.to_ascii_lowercase();
            let target = route.edge.as_ref().map(|edge| EdgeTarget {
                label: label.clone(),
                edge: edge.clone(),
                ready: route.ready,
            });
            if let Some(target) = &target {
                for &port in &route.rendezvous {
                    index.by_port.entry(port).or_default().push(target.clone());
                }
            }
            index.by_label.insert(
                label,
                Entry {
                    target,
                    direct: route.direct,
                },
            );
        }
        for targets in index.by_port.values_mut() {
            targets.sort_by(|a, b| a.label.cmp(&b.label));
            // A label listing T twice is asked once.
            targets.dedup_by(|a, b| a.label == b.label);
        }
        index
    }

    /// Labels in edge mode.
    pub fn labels(&self) -> usize {
        self.by_label
            .values()
            .filter(|e| e.target.is_some())
            .count()
    }

    /// What `server_name` (from a ClientHello) names under `domain`.
    pub fn for_server_name(&self, server_name: &str, domain: &str) -> NameLookup<'_> {
        let Some(label) = crate::shared_port::label_for(server_name, domain) else {
            return NameLookup::OutsideDomain;
        };
        match self.by_label.get(&label.to_ascii_lowercase()) {
            None => NameLookup::UnknownName,
            Some(Entry { target: None, .. }) => NameLookup::NoEdge,
            Some(Entry {
                target: Some(target),
                ..
            }) => NameLookup::Edge(target),
        }
    }

    /// The relay a direct label's HTTPS connection is forwarded to: only a label both direct
    /// and in edge mode; every other name is served by the gateway's own TLS.
    pub fn direct(&self, server_name: &str, domain: &str) -> Option<&EdgeTarget> {
        let label = crate::shared_port::label_for(server_name, domain)?;
        let entry = self.by_label.get(&label.to_ascii_lowercase())?;
        entry.direct.then_some(entry.target.as_ref()).flatten()
    }

    /// The labels whose slice holds rendezvous port `port`.
    pub fn candidates(&self, port: u16) -> &[EdgeTarget] {
        self.by_port.get(&port).map_or(&[], Vec::as_slice)
    }
}

/// One candidate relay's answer to "is the hidden server on T from S yours?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// `edge::CLAIM`.
    Mine,
    /// `edge::NOT_MINE`.
    NotMine,
    /// No answer within the deadline, a connection that failed or closed, or any other byte.
    NoAnswer,
}

impl Claim {
    /// The answer byte read (`None`: nothing was read).
    pub fn from_answer(byte: Option<u8>) -> Self {
        match byte {
            Some(taas_protocol::edge::CLAIM) => Self::Mine,
            Some(taas_protocol::edge::NOT_MINE) => Self::NotMine,
            _ => Self::NoAnswer,
        }
    }
}

/// What becomes of a hidden server's connection on a rendezvous port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// Exactly one relay claimed it (the index into the answers): commit to it.
    Commit(usize),
    /// Every candidate answered that it is not theirs.
    NoRegistration,
    /// Several claimed it (registrations without source pinning on overlapping slices):
    /// the gateway cannot tell, so nobody gets it.
    Ambiguous,
    /// Nobody claimed it and some candidate did not answer: it may have been that one's.
    RelayUnreachable,
}

/// The decision on the answers of every candidate: one claim wins whatever the others did
/// (a silent relay cannot own what another owns, since a relay claims only its own pinned
/// registration); no claim and no silence is nobody's.
pub fn decide(claims: &[Claim]) -> ClaimDecision {
    let mut mine = claims
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == Claim::Mine);
    match (mine.next(), mine.next()) {
        (Some((winner, _)), None) => ClaimDecision::Commit(winner),
        (Some(_), Some(_)) => ClaimDecision::Ambiguous,
        (None, _) if claims.contains(&Claim::NoAnswer) => ClaimDecision::RelayUnreachable,
        (None, _) => ClaimDecision::NoRegistration,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOMAIN: &str = "taas.localhost";

    fn route(edge: Option<&str>, direct: bool, rendezvous: &[u16]) -> Route {
        Route {
            edge: edge.map(str::to_string),
            direct,
            rendezvous: rendezvous.to_vec(),
            ..Route::new("relay:8080")
        }
    }

    #[test]
    fn a_server_name_finds_its_labels_edge_and_tells_the_other_cases_apart() {
        let routes = HashMap::from([
            (
                "home".to_string(),
                route(Some("home-edge:21001"), false, &[]),
            ),
            ("old".to_string(), route(None, false, &[])),
        ]);
        let index = EdgeIndex::build(&routes);
        let NameLookup::Edge(home) = index.for_server_name("HOME.taas.localhost", DOMAIN) else {
            panic!("home is in edge mode");
        };
        assert_eq!(home.edge, "home-edge:21001");
        assert_eq!(home.label, "home");
        assert_eq!(
            index.for_server_name("old.taas.localhost", DOMAIN),
            NameLookup::NoEdge
        );
        assert_eq!(
            index.for_server_name("nope.taas.localhost", DOMAIN),
            NameLookup::UnknownName
        );
        assert_eq!(
            index.for_server_name("home.example.com", DOMAIN),
            NameLookup::OutsideDomain
        );
        assert_eq!(index.labels(), 1);
    }

    #[test]
    fn only_a_direct_label_in_edge_mode_is_forwarded_from_https() {
        let routes = HashMap::from([
            ("d".to_string(), route(Some("d:21001"), true, &[])),
            ("plain".to_string(), route(Some("p:21001"), false, &[])),
            ("noedge".to_string(), route(None, true, &[])),
        ]);
        let index = EdgeIndex::build(&routes);
        assert_eq!(
            index.direct("d.taas.localhost", DOMAIN).map(|t| &*t.edge),
            Some("d:21001")
        );
        assert_eq!(index.direct("plain.taas.localhost", DOMAIN), None);
        assert_eq!(index.direct("noedge.taas.localhost", DOMAIN), None);
        assert_eq!(index.direct("taas-registrar.localhost", DOMAIN), None);
    }

    #[test]
    fn one_claim_wins_several_or_none_do_not() {
        use Claim::*;
        assert_eq!(decide(&[NotMine, Mine, NoAnswer]), ClaimDecision::Commit(1));
        assert_eq!(decide(&[Mine, Mine]), ClaimDecision::Ambiguous);
        assert_eq!(decide(&[NotMine, NotMine]), ClaimDecision::NoRegistration);
        assert_eq!(
            decide(&[NotMine, NoAnswer]),
            ClaimDecision::RelayUnreachable
        );
        assert_eq!(decide(&[]), ClaimDecision::NoRegistration);
        assert_eq!(Claim::from_answer(Some(1)), Mine);
        assert_eq!(Claim::from_answer(Some(0)), NotMine);
        assert_eq!(Claim::from_answer(Some(7)), NoAnswer);
        assert_eq!(Claim::from_answer(None), NoAnswer);
    }

    fn arb_routes() -> impl Strategy<Value = HashMap<String, Route>> {
        let one = (
            proptest::option::of("[a-z]{1,3}:[0-9]{1,2}"),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(20_000u16..20_016, 0..6),
        )
            .prop_map(|(edge, direct, ready, rendezvous)| Route {
                edge,
                direct,
                ready,
                rendezvous,
                ..Route::new("relay:8080")
            });
        proptest::collection::hash_map("[a-z]{1,4}", one, 0..12)
    }

    proptest! {
        /// For any routes: T's candidates are exactly the edge labels listing T, each once,
        /// in label order; a label's own server name finds it exactly as its route says.
        #[test]
        fn the_index_agrees_with_the_routes(routes in arb_routes(), port in 19_999u16..20_017) {
            let index = EdgeIndex::build(&routes);
            let found: Vec<&str> = index.candidates(port).iter().map(|t| t.label.as_str()).collect();
            let mut expected: Vec<&str> = routes
                .iter()
                .filter(|(_, r)| r.edge.is_some() && r.rendezvous.contains(&port))
                .map(|(l, _)| l.as_str())
                .collect();
            expected.sort();
            prop_assert_eq!(found, expected);
            for target in index.candidates(port) {
                prop_assert_eq!(Some(&target.edge), routes[&target.label].edge.as_ref());
            }
            for (label, route) in &routes {
                let name = format!("{label}.{DOMAIN}");
                match (index.for_server_name(&name, DOMAIN), &route.edge) {
                    (NameLookup::Edge(target), Some(edge)) => {
                        prop_assert_eq!(&target.edge, edge);
                        prop_assert_eq!(&target.label, label);
                        prop_assert_eq!(target.ready, route.ready);
                    }
                    (NameLookup::NoEdge, None) => {}
                    (other, edge) => prop_assert!(false, "{label}: {other:?} for {edge:?}"),
                }
                let direct = index.direct(&name, DOMAIN).map(|t| t.edge.clone());
                prop_assert_eq!(direct, route.edge.clone().filter(|_| route.direct));
            }
            prop_assert_eq!(index.labels(), routes.values().filter(|r| r.edge.is_some()).count());
        }

        /// Commit iff exactly one claim, to that one; otherwise the reason follows the
        /// answers.
        #[test]
        fn the_decision_commits_to_the_only_claim(claims in proptest::collection::vec(
            prop_oneof![Just(Claim::Mine), Just(Claim::NotMine), Just(Claim::NoAnswer)], 0..8)) {
            let mine: Vec<usize> = (0..claims.len()).filter(|&i| claims[i] == Claim::Mine).collect();
            let decision = decide(&claims);
            match mine.as_slice() {
                [one] => prop_assert_eq!(decision, ClaimDecision::Commit(*one)),
                [] if claims.contains(&Claim::NoAnswer) =>
                    prop_assert_eq!(decision, ClaimDecision::RelayUnreachable),
                [] => prop_assert_eq!(decision, ClaimDecision::NoRegistration),
                _ => prop_assert_eq!(decision, ClaimDecision::Ambiguous),
            }
        }
    }
}
