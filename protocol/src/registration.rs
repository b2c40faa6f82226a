//! The decision on one registration request (PROTOCOL.md §2): given the request, the label it
//! names, the TOTP check and the guard's verdict, which answer it gets and how many one-shot
//! rendezvous ports to open. The relay opens them (sockets) and writes the answer; everything
//! before that is here, with time passed in as values.
//!
//! The order of the checks is part of the contract:
//! - a blocked source or ID hears `429` before any token is looked at;
//! - an unknown label, a label of another ID and a wrong token do the same work (a TOTP check
//!   against a decoy when there is no label to check against) and get the same `401`, so the
//!   answers and their timing do not tell which IDs exist (issue 13);
//! - a full label is said (`503`) before the token is spent, so that the hidden server's retry
//!   later is not refused for reusing it too often;
//! - never more ports than the label has room for, so that no token use is spent on a port
//!   that cannot be granted.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use taas_crds::Algorithm;

use crate::answer::{Answer, ConnectionAuth, Registration};
use crate::authorization::{self, AuthorizationError};
use crate::guard::{AuthGuard, IdKind, TokenRefusal, TokenUse};
use crate::totp;

/// How long a hidden server is told to wait when its label is full or no port is free.
pub const RETRY_UNAVAILABLE: Duration = Duration::from_secs(5);

/// What the decision needs of a label's configuration.
#[derive(Clone, Copy)]
pub struct Terms<'a> {
    /// The hidden server's ID (the TOTP `username`), compared exactly.
    pub id: &'a str,
    /// The decoded TOTP key.
    pub secret: &'a [u8],
    pub algorithm: Algorithm,
    /// TOTP step in seconds.
    pub period: u64,
    /// Parked connections allowed at once: also the new connections one token may serve.
    pub max_parked: usize,
    /// A token is accepted again only from the source that used it first.
    pub source_pinning: bool,
}

impl fmt::Debug for Terms<'_> {
    // Hand-written so that the secret can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Terms")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("algorithm", &self.algorithm)
            .field("period", &self.period)
            .field("max_parked", &self.max_parked)
            .field("source_pinning", &self.source_pinning)
            .finish()
    }
}

/// The label a registration names, as the decision sees it.
pub trait NamedLabel {
    /// What its configuration says now.
    fn terms(&self) -> Terms<'_>;
    /// How many more rendezvous ports its parked-connection limit allows now. Asked only once
    /// the token has been verified.
    fn room(&self) -> usize;
}

/// The key checked against when the ID or label is unknown, so that every refusal costs the
/// same. Its algorithm does not matter: every check computes all of them (`totp::verify`).
pub struct Decoy {
    secret: Vec<u8>,
}

impl Decoy {
    /// `secret` should be random and never given out.
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn terms(&self) -> Terms<'_> {
        Terms {
            id: "",
            secret: &self.secret,
            algorithm: Algorithm::default(),
            period: 30,
            max_parked: 1,
            source_pinning: true,
        }
    }
}

impl fmt::Debug for Decoy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decoy(<redacted>)")
    }
}

/// What one registration gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No `Authorization` header: `401` with the challenge; not a failure (a client's first
    /// try, as with the original).
    Challenge,
    /// A malformed `Authorization` header: `400`.
    Malformed(AuthorizationError),
    /// The source or the ID is blocked: `429`, retry after this long.
    RateLimited(Duration),
    /// Unknown label, a label of another ID, or a wrong token: `401`, counted as a failure.
    Unauthorized,
    /// The token matched, but the guard refused this use of it: `401`, counted as a failure.
    TokenRefused(TokenRefusal),
    /// The label has no room: `503`, the token not spent.
    Full,
    /// Authorised: open this many rendezvous ports (from 1 to the count asked for).
    Open(u32),
}

impl Verdict {
    /// The answer, for every verdict but [`Verdict::Open`] (whose answer depends on the
    /// ports the relay manages to open).
    pub fn answer(&self) -> Option<Answer> {
        Some(match self {
            Verdict::Challenge | Verdict::Unauthorized | Verdict::TokenRefused(_) => {
                Answer::unauthorized()
            }
            Verdict::Malformed(_) => Answer::bad_request(),
            Verdict::RateLimited(retry_after) => Answer::too_many(*retry_after),
            Verdict::Full => Answer::unavailable(RETRY_UNAVAILABLE),
            Verdict::Open(_) => return None,
        })
    }
}

/// Decides one registration. `label` is the label the request names, if it exists (its ID
/// may still be another); `connection` holds the IDs already authenticated on the request's
/// kept-alive connection, and learns this one's when it is admitted. Failures are counted in
/// `guard`, and so are token uses.
pub fn decide(
    guard: &AuthGuard,
    decoy: &Decoy,
    request: &Registration<'_>,
    label: Option<&dyn NamedLabel>,
    connection: &ConnectionAuth,
    unix_time: u64,
    now: Instant,
) -> Verdict {
    let Some(header) = request.authorization else {
        return Verdict::Challenge;
    };
    let credentials = match authorization::parse(header) {
        Ok(credentials) => credentials,
        Err(error) => return Verdict::Malformed(error),
    };
    let id = credentials.username.as_str();
    if let Some(retry_after) = guard.blocked(request.source, id, now) {
        return Verdict::RateLimited(retry_after);
    }
    let authorised = label.filter(|label| label.terms().id == id);
    let checked = authorised.map_or_else(|| decoy.terms(), |label| label.terms());
    let step = totp::verify(
        checked.secret,
        checked.algorithm,
        checked.period,
        &credentials.response,
        unix_time,
    );
    // Kept apart so that failures for made-up IDs cannot evict a guessed ID's count.
    let kind = match authorised {
        Some(_) => IdKind::Configured,
        None => IdKind::Unknown,
    };
    let (Some(label), Some(step)) = (authorised, step) else {
        return refuse(guard, request.source, id, kind, now, Verdict::Unauthorized);
    };
    let room = label.room();
    if room == 0 {
        return Verdict::Full;
    }
    let terms = label.terms();
    let token = TokenUse {
        id,
        step,
        source: request.source,
        max_uses: u32::try_from(terms.max_parked).unwrap_or(u32::MAX),
        pin_source: terms.source_pinning,
        connection_authenticated: connection.has(id),
        wanted: request.count.min(u32::try_from(room).unwrap_or(u32::MAX)),
    };
    match guard.admit_many(&token, now) {
        Ok(granted) => {
            connection.add(id);
            Verdict::Open(granted)
        }
        Err(refusal) => refuse(
            guard,
            request.source,
            id,
            IdKind::Configured,
            now,
            Verdict::TokenRefused(refusal),
        ),
    }
}

fn refuse(
    guard: &AuthGuard,
    source: IpAddr,
    id: &str,
    kind: IdKind,
    now: Instant,
    verdict: Verdict,
) -> Verdict {
    guard.record_failure(source, id, kind, now);
    verdict
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::guard::GuardLimits;

    const ID: &str = "2f40c5f4-hidden";
    const SECRET: &[u8] = b"12345678901234567890";
    const T: u64 = 1_111_111_109;

    struct Fake {
        id: &'static str,
        max_parked: usize,
        room: usize,
        /// How often the decision asked for the room.
        asked: Cell<u32>,
    }

    impl Fake {
        fn new(room: usize) -> Self {
            Self {
                id: ID,
                max_parked: 8,
                room,
                asked: Cell::new(0),
            }
        }
    }

    impl NamedLabel for Fake {
        fn terms(&self) -> Terms<'_> {
            Terms {
                id: self.id,
                secret: SECRET,
                algorithm: Algorithm::SHA1,
                period: 30,
                max_parked: self.max_parked,
                source_pinning: true,
            }
        }

        fn room(&self) -> usize {
            self.asked.set(self.asked.get() + 1);
            self.room
        }
    }

    fn source(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn header(id: &str, time: u64) -> String {
        authorization::format(id, &totp::code(SECRET, Algorithm::SHA1, 6, 30, time))
    }

    struct Case {
        guard: AuthGuard,
        decoy: Decoy,
        connection: ConnectionAuth,
        now: Instant,
    }

    impl Case {
        fn new() -> Self {
            Self {
                guard: AuthGuard::default(),
                decoy: Decoy::new(b"decoy-decoy-decoy-de".to_vec()),
                connection: ConnectionAuth::default(),
                now: Instant::now(),
            }
        }

        fn decide(
            &self,
            authorization: Option<&str>,
            count: u32,
            from: IpAddr,
            label: Option<&dyn NamedLabel>,
        ) -> Verdict {
            let request = Registration {
                label: "home",
                authorization: authorization.map(str::as_bytes),
                source: from,
                count,
            };
            decide(
                &self.guard,
                &self.decoy,
                &request,
                label,
                &self.connection,
                T,
                self.now,
            )
        }
    }

    #[test]
    fn a_valid_token_opens_as_many_ports_as_asked_for_and_there_is_room() {
        let case = Case::new();
        let label = Fake::new(3);
        let token = header(ID, T);
        assert_eq!(
            case.decide(Some(&token), 1, source(1), Some(&label)),
            Verdict::Open(1)
        );
        assert!(case.connection.has(ID), "the connection learns the ID");
        // On that connection, more are granted without counting token uses, up to the room.
        assert_eq!(
            case.decide(Some(&token), 16, source(1), Some(&label)),
            Verdict::Open(3)
        );
        assert_eq!(Verdict::Open(3).answer(), None);
    }

    #[test]
    fn no_header_is_a_challenge_and_not_a_failure() {
        let case = Case::new();
        let label = Fake::new(1);
        for _ in 0..50 {
            let verdict = case.decide(None, 1, source(1), Some(&label));
            assert_eq!(verdict, Verdict::Challenge);
            assert_eq!(verdict.answer(), Some(Answer::unauthorized()));
        }
        assert_eq!(case.guard.blocked(source(1), ID, case.now), None);
        assert_eq!(label.asked.get(), 0);
    }

    #[test]
    fn a_malformed_header_is_a_bad_request() {
        let case = Case::new();
        let verdict = case.decide(Some("Basic abc"), 1, source(1), None);
        assert!(matches!(verdict, Verdict::Malformed(_)), "{verdict:?}");
        assert_eq!(verdict.answer(), Some(Answer::bad_request()));
    }

    #[test]
    fn unknown_label_other_id_and_wrong_token_get_the_same_401_and_count() {
        let case = Case::new();
        let label = Fake::new(1);
        let other = Fake {
            id: "someone-else",
            ..Fake::new(1)
        };
        let wrong = authorization::format(ID, "000000");
        let cases: [(&str, Option<&dyn NamedLabel>); 3] = [
            (&header(ID, T), None),
            (&header(ID, T), Some(&other)),
            (&wrong, Some(&label)),
        ];
        for (token, label) in cases {
            let verdict = case.decide(Some(token), 1, source(1), label);
            assert_eq!(verdict, Verdict::Unauthorized);
            assert_eq!(verdict.answer(), Some(Answer::unauthorized()));
        }
        assert_eq!(label.asked.get() + other.asked.get(), 0, "room not asked");
        // Failures count against the source: ten of them block it.
        for _ in 3..10 {
            case.decide(Some(&wrong), 1, source(1), Some(&label));
        }
        let blocked = case.decide(Some(&header(ID, T)), 1, source(1), Some(&label));
        assert_eq!(blocked, Verdict::RateLimited(Duration::from_secs(60)));
        assert_eq!(
            blocked.answer(),
            Some(Answer::too_many(Duration::from_secs(60)))
        );
    }

    #[test]
    fn a_full_label_is_said_before_the_token_is_spent() {
        let case = Case::new();
        let full = Fake {
            max_parked: 1,
            ..Fake::new(0)
        };
        let token = header(ID, T);
        for _ in 0..3 {
            let verdict = case.decide(Some(&token), 1, source(1), Some(&full));
            assert_eq!(verdict, Verdict::Full);
            assert_eq!(
                verdict.answer(),
                Some(Answer::unavailable(RETRY_UNAVAILABLE))
            );
        }
        // maxParked 1: the token serves one new connection, which it still can.
        let room = Fake {
            max_parked: 1,
            ..Fake::new(1)
        };
        assert_eq!(
            case.decide(Some(&token), 1, source(1), Some(&room)),
            Verdict::Open(1)
        );
    }

    #[test]
    fn a_token_used_up_or_replayed_is_refused_and_counted() {
        let mut case = Case::new();
        case.guard = AuthGuard::new(GuardLimits {
            failures_per_id: 2,
            ..GuardLimits::default()
        });
        let label = Fake {
            max_parked: 2,
            ..Fake::new(5)
        };
        let token = header(ID, T);
        let fresh = |case: &Case, from| {
            // A new connection each time: nothing authenticated on it.
            let request = Registration {
                label: "home",
                authorization: Some(token.as_bytes()),
                source: from,
                count: 1,
            };
            decide(
                &case.guard,
                &case.decoy,
                &request,
                Some(&label),
                &ConnectionAuth::default(),
                T,
                case.now,
            )
        };
        assert_eq!(fresh(&case, source(1)), Verdict::Open(1));
        assert_eq!(
            fresh(&case, source(2)),
            Verdict::TokenRefused(TokenRefusal::Replayed)
        );
        assert_eq!(fresh(&case, source(1)), Verdict::Open(1));
        assert_eq!(
            fresh(&case, source(1)),
            Verdict::TokenRefused(TokenRefusal::Exhausted)
        );
        assert_eq!(
            Verdict::TokenRefused(TokenRefusal::Exhausted).answer(),
            Some(Answer::unauthorized())
        );
        // Both refusals were counted against the ID: two block it (from elsewhere than its
        // known-good source).
        assert!(case.guard.blocked(source(9), ID, case.now).is_some());
        assert_eq!(case.guard.blocked(source(1), ID, case.now), None);
    }

    #[test]
    fn the_ports_asked_for_are_capped_by_the_room_and_the_token() {
        let case = Case::new();
        let label = Fake {
            max_parked: 4,
            ..Fake::new(3)
        };
        let token = header(ID, T);
        // A new connection: at most the room (3) of the 16 asked for.
        let request = Registration {
            label: "home",
            authorization: Some(token.as_bytes()),
            source: source(1),
            count: 16,
        };
        let new_connection = ConnectionAuth::default();
        let decide_new = || {
            decide(
                &case.guard,
                &case.decoy,
                &request,
                Some(&label),
                &new_connection,
                T,
                case.now,
            )
        };
        assert_eq!(decide_new(), Verdict::Open(3));
        assert_eq!(label.asked.get(), 1);
        // Another new connection: the token has one use of its four left.
        let again = ConnectionAuth::default();
        let verdict = decide(
            &case.guard,
            &case.decoy,
            &request,
            Some(&label),
            &again,
            T,
            case.now,
        );
        assert_eq!(verdict, Verdict::Open(1));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let label = Fake::new(1);
        let shown = format!("{:?} {:?}", label.terms(), Decoy::new(SECRET.to_vec()));
        assert!(!shown.contains("49, 50"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
