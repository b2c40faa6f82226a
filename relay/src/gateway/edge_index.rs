//! What the gateway's edge looks up in the routes, and its decision on a rendezvous port's
//! claims. Pure (no I/O): the index is built from the routes whenever they change
//! (`RouteTable::replace`), so a connection costs a map lookup, never a scan of every label.
//!
//! - By server name (the shared client port, direct labels on HTTPS): `LABEL.<domain>` →
//!   LABEL's relay edge address, when LABEL is in edge mode.
//! - By rendezvous port T: every label whose slice holds T (slices overlap by design), each
//!   asked in turn by the edge whether the hidden server on T is its own ([`decide`]), every
//!   replica of each.
//! - A client for a label with several replicas: each asked in turn whether it can serve it
//!   now ([`Offer`]), the pick made by [`decide_offer`].

use std::collections::HashMap;

use super::{Replicas, Route};

/// One label's relay as the edge reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeTarget {
    /// LABEL, lower case: written in the edge header, and its gateway token's input.
    pub label: String,
    /// `host:port` of the relay's edge port (or several: each address a replica).
    pub edge: Replicas,
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

/// The decision on the answers of every candidate replica, each given with its label (an
/// index): claims of one label win whatever the others did (a silent relay cannot own what
/// another owns, since a relay claims only its own pinned registration), the first of them
/// if several replicas of that label claimed (the hidden server registered with each; any
/// of its registrations will do, the others stay pending for its next connections); claims
/// of different labels are ambiguous; no claim and no silence is nobody's.
pub fn decide(claims: &[(usize, Claim)]) -> ClaimDecision {
    let mut mine = claims
        .iter()
        .enumerate()
        .filter(|(_, (_, c))| *c == Claim::Mine);
    let Some((winner, (label, _))) = mine.next() else {
        return if claims.iter().any(|(_, c)| *c == Claim::NoAnswer) {
            ClaimDecision::RelayUnreachable
        } else {
            ClaimDecision::NoRegistration
        };
    };
    if mine.any(|(_, (other, _))| other != label) {
        return ClaimDecision::Ambiguous;
    }
    ClaimDecision::Commit(winner)
}

/// One replica's answer to "can you serve this client?" (the offer TLV).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// `SERVE`: a parked connection is free now.
    Serve,
    /// `WAIT`: nothing parked; the client would queue there.
    Wait,
    /// `LAST_RESORT`: draining, parked connections still held.
    LastResort,
    /// `REFUSE`: draining with nothing parked, or the label closed.
    Refuse,
    /// Closed without a byte: a relay that predates the offer (it refuses an unknown TLV);
    /// it is sent the client with the old header.
    Legacy,
    /// Not reached, not in time, a reset, or any other byte.
    NoAnswer,
}

impl Offer {
    pub const ALL: [Offer; 6] = [
        Self::Serve,
        Self::Wait,
        Self::LastResort,
        Self::Refuse,
        Self::Legacy,
        Self::NoAnswer,
    ];

    /// The answer read: `Some(byte)`, or `None` for a clean close before any byte.
    pub fn from_answer(byte: Option<u8>) -> Self {
        use taas_protocol::edge;
        match byte {
            None => Self::Legacy,
            Some(edge::SERVE) => Self::Serve,
            Some(edge::WAIT) => Self::Wait,
            Some(edge::LAST_RESORT) => Self::LastResort,
            Some(edge::REFUSE) => Self::Refuse,
            Some(_) => Self::NoAnswer,
        }
    }

    /// Whether no later replica need be asked: this one takes the client now.
    pub fn settles(self) -> bool {
        matches!(self, Self::Serve | Self::Legacy)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serve => "serve",
            Self::Wait => "wait",
            Self::LastResort => "last_resort",
            Self::Refuse => "refuse",
            Self::Legacy => "legacy",
            Self::NoAnswer => "no_answer",
        }
    }
}

/// What becomes of a client offered to a label's replicas one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferDecision {
    /// COMMIT to this replica (an index into the answers) and send the client.
    Commit(usize),
    /// Connect to this replica again and send the client behind the header without the offer.
    Legacy(usize),
    /// Nobody takes it: every replica refused or was not reached.
    NoReplica,
}

/// The pick among the answers so far: the first that serves now (or predates offers), else
/// the first draining replica still holding parked connections (better than a queue with
/// nothing parked, whose client may wait out the whole client wait), else the first that
/// would queue it.
pub fn decide_offer(answers: &[Offer]) -> OfferDecision {
    let first = |wanted: &[Offer]| answers.iter().position(|a| wanted.contains(a));
    match first(&[Offer::Serve, Offer::Legacy]) {
        Some(i) if answers[i] == Offer::Legacy => return OfferDecision::Legacy(i),
        Some(i) => return OfferDecision::Commit(i),
        None => {}
    }
    first(&[Offer::LastResort])
        .or_else(|| first(&[Offer::Wait]))
        .map_or(OfferDecision::NoReplica, OfferDecision::Commit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOMAIN: &str = "taas.localhost";

    fn route(edge: Option<&str>, direct: bool, rendezvous: &[u16]) -> Route {
        Route {
            edge: edge.map(Replicas::from),
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
        assert_eq!(home.edge, Replicas::from("home-edge:21001"));
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
            index
                .direct("d.taas.localhost", DOMAIN)
                .map(|t| t.edge.to_string()),
            Some("d:21001".to_string())
        );
        assert_eq!(index.direct("plain.taas.localhost", DOMAIN), None);
        assert_eq!(index.direct("noedge.taas.localhost", DOMAIN), None);
        assert_eq!(index.direct("taas-registrar.localhost", DOMAIN), None);
    }

    /// Each claim from a label of its own (no replicas).
    fn one_each(claims: &[Claim]) -> Vec<(usize, Claim)> {
        claims.iter().copied().enumerate().collect()
    }

    #[test]
    fn one_claim_wins_several_or_none_do_not() {
        use Claim::*;
        let decide1 = |claims: &[Claim]| decide(&one_each(claims));
        assert_eq!(
            decide1(&[NotMine, Mine, NoAnswer]),
            ClaimDecision::Commit(1)
        );
        assert_eq!(decide1(&[Mine, Mine]), ClaimDecision::Ambiguous);
        assert_eq!(decide1(&[NotMine, NotMine]), ClaimDecision::NoRegistration);
        assert_eq!(
            decide1(&[NotMine, NoAnswer]),
            ClaimDecision::RelayUnreachable
        );
        assert_eq!(decide1(&[]), ClaimDecision::NoRegistration);
        assert_eq!(Claim::from_answer(Some(1)), Mine);
        assert_eq!(Claim::from_answer(Some(0)), NotMine);
        assert_eq!(Claim::from_answer(Some(7)), NoAnswer);
        assert_eq!(Claim::from_answer(None), NoAnswer);
    }

    #[test]
    fn claims_from_replicas_of_one_label_commit_to_the_first_and_across_labels_are_ambiguous() {
        use Claim::*;
        // Label 0 has two replicas, label 1 one.
        let claims = [(0, Mine), (0, Mine), (1, NotMine)];
        assert_eq!(decide(&claims), ClaimDecision::Commit(0));
        let claims = [(0, NotMine), (0, Mine), (1, NoAnswer)];
        assert_eq!(decide(&claims), ClaimDecision::Commit(1));
        let claims = [(0, Mine), (0, NotMine), (1, Mine)];
        assert_eq!(decide(&claims), ClaimDecision::Ambiguous);
        let claims = [(0, NotMine), (0, NoAnswer)];
        assert_eq!(decide(&claims), ClaimDecision::RelayUnreachable);
    }

    #[test]
    fn a_client_goes_to_the_first_that_serves_else_a_last_resort_else_a_queue() {
        use Offer::*;
        assert_eq!(decide_offer(&[Wait, Serve]), OfferDecision::Commit(1));
        assert_eq!(
            decide_offer(&[Wait, LastResort, Wait]),
            OfferDecision::Commit(1)
        );
        assert_eq!(
            decide_offer(&[Refuse, Wait, NoAnswer]),
            OfferDecision::Commit(1)
        );
        assert_eq!(decide_offer(&[Refuse, NoAnswer]), OfferDecision::NoReplica);
        assert_eq!(decide_offer(&[]), OfferDecision::NoReplica);
        assert!(Serve.settles() && Legacy.settles());
        assert!(!Wait.settles() && !LastResort.settles() && !Refuse.settles());
    }

    #[test]
    fn a_relay_without_the_offer_tlv_still_gets_clients() {
        use Offer::*;
        // It closes without a byte: the client goes to it with the old header.
        assert_eq!(Offer::from_answer(None), Legacy);
        assert_eq!(decide_offer(&[Legacy]), OfferDecision::Legacy(0));
        assert_eq!(decide_offer(&[Wait, Legacy]), OfferDecision::Legacy(1));
        assert_eq!(
            decide_offer(&[Refuse, LastResort, Legacy]),
            OfferDecision::Legacy(2)
        );
        assert_eq!(Offer::from_answer(Some(taas_protocol::edge::SERVE)), Serve);
        assert_eq!(Offer::from_answer(Some(taas_protocol::edge::WAIT)), Wait);
        assert_eq!(
            Offer::from_answer(Some(taas_protocol::edge::LAST_RESORT)),
            LastResort
        );
        assert_eq!(
            Offer::from_answer(Some(taas_protocol::edge::REFUSE)),
            Refuse
        );
        assert_eq!(Offer::from_answer(Some(9)), NoAnswer);
    }

    fn arb_routes() -> impl Strategy<Value = HashMap<String, Route>> {
        let one = (
            proptest::option::of("[a-z]{1,3}:[0-9]{1,2}"),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(20_000u16..20_016, 0..6),
        )
            .prop_map(|(edge, direct, ready, rendezvous)| Route {
                edge: edge.map(Replicas::from),
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

        /// Without replicas: commit iff exactly one claim, to that one; otherwise the reason
        /// follows the answers.
        #[test]
        fn the_decision_commits_to_the_only_claim(claims in proptest::collection::vec(
            prop_oneof![Just(Claim::Mine), Just(Claim::NotMine), Just(Claim::NoAnswer)], 0..8)) {
            let mine: Vec<usize> = (0..claims.len()).filter(|&i| claims[i] == Claim::Mine).collect();
            let decision = decide(&one_each(&claims));
            match mine.as_slice() {
                [one] => prop_assert_eq!(decision, ClaimDecision::Commit(*one)),
                [] if claims.contains(&Claim::NoAnswer) =>
                    prop_assert_eq!(decision, ClaimDecision::RelayUnreachable),
                [] => prop_assert_eq!(decision, ClaimDecision::NoRegistration),
                _ => prop_assert_eq!(decision, ClaimDecision::Ambiguous),
            }
        }
    }

    fn any_claim() -> impl Strategy<Value = Claim> {
        prop_oneof![
            Just(Claim::Mine),
            Just(Claim::NotMine),
            Just(Claim::NoAnswer)
        ]
    }

    fn any_offer() -> impl Strategy<Value = Offer> {
        proptest::sample::select(Offer::ALL.to_vec())
    }

    proptest! {
        /// With replicas: a commit goes to a claim, and every claim is of its label; claims
        /// of two labels are never committed.
        #[test]
        fn with_replicas_a_commit_is_a_claim_of_the_only_label_that_claimed(
            claims in proptest::collection::vec((0usize..3, any_claim()), 0..10)) {
            let labels: std::collections::HashSet<usize> = claims.iter()
                .filter(|(_, c)| *c == Claim::Mine).map(|(l, _)| *l).collect();
            match decide(&claims) {
                ClaimDecision::Commit(i) => {
                    prop_assert_eq!(claims[i].1, Claim::Mine);
                    prop_assert_eq!(labels.len(), 1);
                    prop_assert!(claims[..i].iter().all(|(_, c)| *c != Claim::Mine));
                }
                ClaimDecision::Ambiguous => prop_assert!(labels.len() > 1),
                ClaimDecision::RelayUnreachable => prop_assert!(labels.is_empty() && claims.iter().any(|(_, c)| *c == Claim::NoAnswer)),
                ClaimDecision::NoRegistration => prop_assert!(claims.iter().all(|(_, c)| *c == Claim::NotMine)),
            }
        }

        /// The pick is never a refusal or a silent replica; nothing better than it was
        /// answered; no pick only when nobody could take the client.
        #[test]
        fn an_offer_goes_to_the_best_answer_and_the_first_of_its_kind(
            answers in proptest::collection::vec(any_offer(), 0..8)) {
            let rank = |a: Offer| match a {
                Offer::Serve | Offer::Legacy => 3,
                Offer::LastResort => 2,
                Offer::Wait => 1,
                Offer::Refuse | Offer::NoAnswer => 0,
            };
            let best = answers.iter().map(|a| rank(*a)).max().unwrap_or(0);
            match decide_offer(&answers) {
                OfferDecision::Commit(i) | OfferDecision::Legacy(i) => {
                    prop_assert!(rank(answers[i]) > 0);
                    prop_assert_eq!(rank(answers[i]), best);
                    prop_assert!(answers[..i].iter().all(|a| rank(*a) < best));
                    let legacy = matches!(decide_offer(&answers), OfferDecision::Legacy(_));
                    prop_assert_eq!(legacy, answers[i] == Offer::Legacy);
                }
                OfferDecision::NoReplica => prop_assert_eq!(best, 0),
            }
        }
    }
}
