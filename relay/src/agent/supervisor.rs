//! The agent's decisions, without I/O: how many rendezvous ports to ask for and when, how
//! failures feed the backoff, and what to tell the operator. Events go in (a registration's
//! outcome, what a rendezvous task reported), the next step and notices come out; time and
//! the backoff's jitter are passed in as values. The async shell (`run`) only performs them,
//! so every rule here is tested without a network or a clock.
//!
//! The rule that needs this most: one event that drops many parked connections at once (a
//! relay restart drops all of them) is one failure for the backoff, not one per connection.
//! Counted per connection, 64 parked connections pushed the next attempt 16-29 s away while
//! the relay was already back (issue 14).

use std::time::{Duration, Instant};

use super::backoff::{self, Backoff};
use super::explain::{explain_parked_lost, explain_rendezvous, Problem};
use super::parked;
use taas_protocol::answer::MAX_RENDEZVOUS_PER_REQUEST;

/// A parked connection the relay closes sooner than this counts as a failure (backoff), so a
/// relay that accepts and drops at once is not hammered.
pub const SHORT_LIVED: Duration = Duration::from_secs(5);
/// While at least half of the connections are still parked, replacements for the ones used
/// up are registered this long after the first of them, together in one request: one
/// registration per batch instead of per connection, and none of it on the path of the
/// connection that was just paired. Below half, replacements are registered at once.
pub const REFILL_DELAY: Duration = Duration::from_millis(5);

/// What happened, as the shell saw it.
#[derive(Debug)]
pub enum Event {
    /// The registrar answered with `ports` rendezvous ports; a connection to each is on its
    /// way. Ports beyond the number asked for are ignored (the registrar client drops them).
    Registered { ports: usize },
    /// The registration attempt failed.
    RegistrationFailed {
        problem: Problem,
        /// How long the registrar asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// What a rendezvous task reported.
    Rendezvous(parked::Event),
}

/// What the shell does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send one registration asking for this many rendezvous ports, then report its outcome.
    Register { count: u32 },
    /// Wait for an event, or until this moment.
    WaitUntil(Instant),
    /// Wait for an event: the pool is full, or a registration is under way.
    Wait,
}

/// What the operator is told (the shell turns each into a log line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A failure that counted for the backoff. A new reason is logged at its severity, the
    /// same reason again only at debug.
    Failed {
        problem: Problem,
        new_reason: bool,
        /// Consecutive failures counted so far.
        failures: u32,
        retry_in: Duration,
    },
    /// A further rendezvous failure of a burst already counted since the last registration
    /// attempt (debug).
    FailedInBurst { problem: Problem },
    /// A connection parked again after a problem.
    Recovered {
        parked: usize,
        previous: &'static str,
    },
    /// All wanted connections are parked, for the first time.
    Ready { parked: usize },
    /// The relay closed a parked connection that had lived long: replaced, not a failure.
    Replacing { lived: Duration, how: String },
    /// A parked connection was paired; its replacement joins the next registration.
    Paired { pairs_active: usize },
}

/// A snapshot of what the agent is doing (see [`super::Agent::status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Connections parked at the relay.
    pub parked: usize,
    /// Registered, connecting to p.
    pub connecting: usize,
    /// Paired connections being forwarded.
    pub pairs_active: usize,
    /// Pairs started since the agent started.
    pub pairings: u64,
    /// The current reason registration is failing, if it is.
    pub problem: Option<String>,
}

/// Keeps `wanted` connections registered: one registration at a time, for every missing
/// connection at once (up to the relay's per-request maximum), after the backoff.
#[derive(Debug)]
pub struct Supervisor {
    /// Connections to keep parked (`--parked`).
    wanted: usize,
    /// Registered, connecting to p.
    connecting: usize,
    parked: usize,
    pairs_active: usize,
    pairings: u64,
    /// Ports asked for by the registration under way.
    registering: Option<u32>,
    backoff: Backoff,
    /// The earliest next registration (the backoff).
    next_attempt: Instant,
    /// The earliest next registration while the pool is at least half full (`REFILL_DELAY`).
    refill_at: Instant,
    problem: Option<Problem>,
    reached_target: bool,
    /// A rendezvous failure (a refused connect to p, a parked connection dropped early) has
    /// been counted since the last registration attempt: further ones of the same burst are
    /// not.
    rendezvous_failure_counted: bool,
}

impl Supervisor {
    /// Nothing registered yet; the first registration is due at `now`.
    pub fn new(wanted: usize, max_backoff: Duration, now: Instant) -> Self {
        Self {
            wanted,
            connecting: 0,
            parked: 0,
            pairs_active: 0,
            pairings: 0,
            registering: None,
            backoff: Backoff::new(backoff::INITIAL, max_backoff),
            next_attempt: now,
            refill_at: now,
            problem: None,
            reached_target: false,
            rendezvous_failure_counted: false,
        }
    }

    /// Consecutive failures counted by the backoff.
    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }

    /// The connections registered or parked, and the ones a registration under way asks for.
    fn occupied(&self) -> usize {
        self.connecting + self.parked + self.registering.map_or(0, |n| n as usize)
    }

    /// When the next registration may go: after the backoff, and while at least half of the
    /// pool is parked or on its way, after the refill delay too.
    fn due(&self) -> Instant {
        if 2 * (self.connecting + self.parked) >= self.wanted {
            self.next_attempt.max(self.refill_at)
        } else {
            self.next_attempt
        }
    }

    /// Rendezvous ports to ask for in the next registration: every missing one, up to the
    /// relay's per-request maximum (the several-ports extension; a relay without it answers
    /// one port, and the next registration asks for the rest).
    fn missing(&self) -> u32 {
        let missing = self.wanted.saturating_sub(self.occupied());
        u32::try_from(missing)
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_RENDEZVOUS_PER_REQUEST)
    }

    /// The next step at `now`. `Register` marks the registration as under way until its
    /// outcome (`Registered` or `RegistrationFailed`) is handled.
    pub fn next(&mut self, now: Instant) -> Next {
        if self.registering.is_some() || self.occupied() >= self.wanted {
            return Next::Wait;
        }
        let due = self.due();
        if now < due {
            return Next::WaitUntil(due);
        }
        let count = self.missing();
        self.registering = Some(count);
        Next::Register { count }
    }

    /// Takes one event that happened at `now`; `jitter` (in `[0, 1)`, random) spreads the
    /// backoff if the event is a failure.
    pub fn handle(&mut self, event: Event, now: Instant, jitter: f64) -> Vec<Notice> {
        match event {
            Event::Registered { ports } => {
                let asked = self.registering.take().unwrap_or_else(|| self.missing());
                self.rendezvous_failure_counted = false;
                self.connecting += ports.min(asked as usize);
                Vec::new()
            }
            Event::RegistrationFailed {
                problem,
                retry_after,
            } => {
                self.registering = None;
                self.rendezvous_failure_counted = false;
                vec![self.failed(problem, retry_after, now, jitter)]
            }
            Event::Rendezvous(event) => self.rendezvous(event, now, jitter),
        }
    }

    fn rendezvous(&mut self, event: parked::Event, now: Instant, jitter: f64) -> Vec<Notice> {
        let mut notices = Vec::new();
        match event {
            parked::Event::Parked => {
                self.connecting = self.connecting.saturating_sub(1);
                self.parked += 1;
                self.backoff.reset();
                self.next_attempt = now;
                if let Some(problem) = self.problem.take() {
                    notices.push(Notice::Recovered {
                        parked: self.parked,
                        previous: problem.kind,
                    });
                }
                if !self.reached_target && self.parked >= self.wanted {
                    self.reached_target = true;
                    notices.push(Notice::Ready {
                        parked: self.parked,
                    });
                }
            }
            parked::Event::ConnectFailed { endpoint, error } => {
                self.connecting = self.connecting.saturating_sub(1);
                let problem = explain_rendezvous(&endpoint, &error);
                notices.push(self.rendezvous_failed(problem, now, jitter));
            }
            parked::Event::Lost { lived, error } => {
                self.parked = self.parked.saturating_sub(1);
                self.replace_later(now);
                let how = match &error {
                    Some(e) => e.to_string(),
                    None => "closed".to_string(),
                };
                if lived < SHORT_LIVED {
                    let problem = explain_parked_lost(lived, &how);
                    notices.push(self.rendezvous_failed(problem, now, jitter));
                } else {
                    notices.push(Notice::Replacing { lived, how });
                }
            }
            parked::Event::Paired => {
                self.parked = self.parked.saturating_sub(1);
                self.replace_later(now);
                self.pairs_active += 1;
                self.pairings += 1;
                notices.push(Notice::Paired {
                    pairs_active: self.pairs_active,
                });
            }
            parked::Event::PairEnded => {
                self.pairs_active = self.pairs_active.saturating_sub(1);
            }
        }
        notices
    }

    /// A parked connection was used up or lost: its replacement joins the next batch.
    fn replace_later(&mut self, now: Instant) {
        if self.refill_at <= now {
            self.refill_at = now + REFILL_DELAY;
        }
    }

    /// A failure that counts: back off, and say why (loudly once per distinct reason).
    fn failed(
        &mut self,
        problem: Problem,
        retry_after: Option<Duration>,
        now: Instant,
        jitter: f64,
    ) -> Notice {
        let retry_in = self.backoff.fail(jitter, retry_after);
        self.next_attempt = self.next_attempt.max(now + retry_in);
        let new_reason = !matches!(&self.problem, Some(old) if old.same_reason(&problem));
        self.problem = Some(problem.clone());
        Notice::Failed {
            problem,
            new_reason,
            failures: self.backoff.failures(),
            retry_in,
        }
    }

    /// A rendezvous failed: the first since the last registration attempt backs off (a relay
    /// that accepts and drops at once is not hammered); the others of the same burst only
    /// say so.
    fn rendezvous_failed(&mut self, problem: Problem, now: Instant, jitter: f64) -> Notice {
        if self.rendezvous_failure_counted {
            return Notice::FailedInBurst { problem };
        }
        self.rendezvous_failure_counted = true;
        self.failed(problem, None, now, jitter)
    }

    /// Shutting down: every connection is gone.
    pub fn shut_down(&mut self) {
        self.parked = 0;
        self.connecting = 0;
        self.pairs_active = 0;
        self.registering = None;
    }

    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            parked: self.parked,
            connecting: self.connecting,
            pairs_active: self.pairs_active,
            pairings: self.pairings,
            problem: self.problem.as_ref().map(|p| p.message.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use proptest::prelude::*;

    use super::*;
    use crate::agent::explain::{explain_status, Severity};

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const MAX_BACKOFF: Duration = Duration::from_secs(30);

    fn parked() -> Event {
        Event::Rendezvous(parked::Event::Parked)
    }
    fn paired() -> Event {
        Event::Rendezvous(parked::Event::Paired)
    }
    fn lost(lived: Duration) -> Event {
        Event::Rendezvous(parked::Event::Lost { lived, error: None })
    }
    fn refused() -> Event {
        Event::Rendezvous(parked::Event::ConnectFailed {
            endpoint: "192.0.2.7:40001".into(),
            error: io::Error::from(io::ErrorKind::ConnectionRefused),
        })
    }
    fn unavailable() -> Event {
        Event::RegistrationFailed {
            problem: explain_status(503, None, None),
            retry_after: None,
        }
    }

    /// A supervisor with `n` of `wanted` connections parked, registered at `t0`.
    fn with_parked(wanted: usize, n: usize, t0: Instant) -> Supervisor {
        let mut s = Supervisor::new(wanted, MAX_BACKOFF, t0);
        let mut left = n;
        while left > 0 {
            let Next::Register { count } = s.next(t0) else {
                panic!("no registration due: {s:?}");
            };
            let ports = (count as usize).min(left);
            s.handle(Event::Registered { ports }, t0, 0.5);
            for _ in 0..ports {
                s.handle(parked(), t0, 0.5);
            }
            left -= ports;
        }
        s
    }

    #[test]
    fn asks_for_every_missing_connection_up_to_the_relays_maximum() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(8, MAX_BACKOFF, t0);
        assert_eq!(s.next(t0), Next::Register { count: 8 });
        // One registration at a time.
        assert_eq!(s.next(t0), Next::Wait);
        let mut big = Supervisor::new(64, MAX_BACKOFF, t0);
        assert_eq!(
            big.next(t0),
            Next::Register {
                count: MAX_RENDEZVOUS_PER_REQUEST
            }
        );
    }

    #[test]
    fn a_relay_answering_one_port_is_asked_again_for_the_rest() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(8, MAX_BACKOFF, t0);
        assert_eq!(s.next(t0), Next::Register { count: 8 });
        s.handle(Event::Registered { ports: 1 }, t0, 0.5);
        assert_eq!(s.status().connecting, 1);
        // Below half: at once, for the 7 missing.
        assert_eq!(s.next(t0), Next::Register { count: 7 });
    }

    #[test]
    fn more_ports_than_asked_for_are_ignored() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(4, MAX_BACKOFF, t0);
        assert_eq!(s.next(t0), Next::Register { count: 4 });
        s.handle(Event::Registered { ports: 9 }, t0, 0.5);
        assert_eq!(s.status().connecting, 4);
        assert_eq!(s.next(t0), Next::Wait);
    }

    #[test]
    fn a_full_pool_waits_for_events() {
        let t0 = Instant::now();
        let mut s = with_parked(4, 4, t0);
        assert_eq!(s.status().parked, 4);
        assert_eq!(s.next(t0 + Duration::from_secs(3600)), Next::Wait);
    }

    #[test]
    fn replacements_wait_for_the_refill_delay_while_half_the_pool_is_parked() {
        let t0 = Instant::now();
        let mut s = with_parked(8, 8, t0);
        let t1 = t0 + MS(100);
        s.handle(paired(), t1, 0.5);
        assert_eq!(s.next(t1), Next::WaitUntil(t1 + REFILL_DELAY));
        // A second one a moment later joins the same batch: the delay is not extended.
        s.handle(paired(), t1 + MS(2), 0.5);
        assert_eq!(s.next(t1 + MS(2)), Next::WaitUntil(t1 + REFILL_DELAY));
        assert_eq!(
            s.next(t1 + REFILL_DELAY),
            Next::Register { count: 2 },
            "both replacements in one request"
        );
    }

    #[test]
    fn below_half_the_pool_replacements_are_registered_at_once() {
        let t0 = Instant::now();
        let mut s = with_parked(4, 4, t0);
        let t1 = t0 + MS(100);
        for _ in 0..3 {
            s.handle(paired(), t1, 0.5);
        }
        assert_eq!(s.status().pairs_active, 3);
        assert_eq!(s.next(t1), Next::Register { count: 3 });
    }

    #[test]
    fn a_failed_registration_backs_off_and_says_why_once() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(2, MAX_BACKOFF, t0);
        assert!(matches!(s.next(t0), Next::Register { .. }));
        let notices = s.handle(unavailable(), t0, 1.0);
        let [Notice::Failed {
            problem,
            new_reason: true,
            failures: 1,
            retry_in,
        }] = notices.as_slice()
        else {
            panic!("{notices:?}");
        };
        assert_eq!(problem.kind, "unavailable");
        assert_eq!(*retry_in, backoff::INITIAL);
        assert_eq!(s.next(t0), Next::WaitUntil(t0 + backoff::INITIAL));
        assert!(s.status().problem.unwrap().contains("(503)"));

        let t1 = t0 + backoff::INITIAL;
        assert!(matches!(s.next(t1), Next::Register { .. }));
        let notices = s.handle(unavailable(), t1, 1.0);
        assert!(
            matches!(
                notices.as_slice(),
                [Notice::Failed {
                    new_reason: false,
                    failures: 2,
                    ..
                }]
            ),
            "the same reason again is quiet: {notices:?}"
        );
        assert_eq!(s.next(t1), Next::WaitUntil(t1 + 2 * backoff::INITIAL));
    }

    #[test]
    fn retry_after_is_respected_up_to_the_cap() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(2, Duration::from_secs(10), t0);
        s.next(t0);
        s.handle(
            Event::RegistrationFailed {
                problem: explain_status(429, Some(Duration::from_secs(7)), None),
                retry_after: Some(Duration::from_secs(7)),
            },
            t0,
            0.0,
        );
        assert_eq!(s.next(t0), Next::WaitUntil(t0 + Duration::from_secs(7)));
        let t1 = t0 + Duration::from_secs(7);
        s.next(t1);
        s.handle(
            Event::RegistrationFailed {
                problem: explain_status(429, Some(Duration::from_secs(3600)), None),
                retry_after: Some(Duration::from_secs(3600)),
            },
            t1,
            0.0,
        );
        assert_eq!(s.next(t1), Next::WaitUntil(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn a_parked_connection_resets_the_backoff_and_clears_the_problem() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(2, MAX_BACKOFF, t0);
        let mut t = t0;
        for _ in 0..4 {
            s.next(t);
            s.handle(unavailable(), t, 1.0);
            t += MAX_BACKOFF;
        }
        assert_eq!(s.failures(), 4);
        assert_eq!(s.next(t), Next::Register { count: 2 });
        s.handle(Event::Registered { ports: 2 }, t, 0.5);
        assert_eq!(s.failures(), 4, "a 200 alone is not yet a success");
        let notices = s.handle(parked(), t, 0.5);
        assert_eq!(
            notices,
            [Notice::Recovered {
                parked: 1,
                previous: "unavailable"
            }]
        );
        assert_eq!(s.failures(), 0);
        assert_eq!(s.status().problem, None);
        let notices = s.handle(parked(), t, 0.5);
        assert_eq!(notices, [Notice::Ready { parked: 2 }]);
        // Ready is said once.
        s.handle(paired(), t, 0.5);
        s.next(t + REFILL_DELAY);
        s.handle(Event::Registered { ports: 1 }, t + REFILL_DELAY, 0.5);
        assert!(s.handle(parked(), t + REFILL_DELAY, 0.5).is_empty());
    }

    #[test]
    fn a_relay_restart_dropping_every_parked_connection_is_one_failure() {
        let t0 = Instant::now();
        let mut s = with_parked(64, 64, t0);
        let t1 = t0 + MS(300); // young connections: each drop is a failure
        let notices: Vec<Notice> = (0..64)
            .flat_map(|_| s.handle(lost(MS(300)), t1, 1.0))
            .collect();
        assert_eq!(s.failures(), 1);
        assert!(matches!(
            &notices[0],
            Notice::Failed {
                new_reason: true,
                failures: 1,
                ..
            }
        ));
        assert!(notices[1..]
            .iter()
            .all(|n| matches!(n, Notice::FailedInBurst { .. })));
        assert_eq!(s.status().parked, 0);
        // The next attempt is one initial backoff away, not 16-29 s.
        assert_eq!(s.next(t1), Next::WaitUntil(t1 + backoff::INITIAL));
        assert_eq!(
            s.next(t1 + backoff::INITIAL),
            Next::Register {
                count: MAX_RENDEZVOUS_PER_REQUEST
            }
        );
    }

    #[test]
    fn each_registration_attempt_allows_one_more_counted_rendezvous_failure() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(4, MAX_BACKOFF, t0);
        s.next(t0);
        s.handle(Event::Registered { ports: 4 }, t0, 0.5);
        for _ in 0..4 {
            s.handle(refused(), t0, 0.5);
        }
        assert_eq!(s.failures(), 1);
        assert_eq!(s.status().connecting, 0);
        let t1 = t0 + MAX_BACKOFF;
        s.next(t1);
        s.handle(Event::Registered { ports: 4 }, t1, 0.5);
        for _ in 0..4 {
            s.handle(refused(), t1, 0.5);
        }
        assert_eq!(s.failures(), 2);
        let status = s.status();
        assert!(status.problem.unwrap().contains("192.0.2.7:40001"));
    }

    #[test]
    fn a_long_lived_parked_connection_closed_by_the_relay_is_replaced_without_backoff() {
        let t0 = Instant::now();
        let mut s = with_parked(4, 4, t0);
        let t1 = t0 + Duration::from_secs(600);
        let notices = s.handle(lost(SHORT_LIVED), t1, 0.5);
        assert_eq!(
            notices,
            [Notice::Replacing {
                lived: SHORT_LIVED,
                how: "closed".into()
            }]
        );
        assert_eq!(s.failures(), 0);
        assert_eq!(s.next(t1), Next::WaitUntil(t1 + REFILL_DELAY));
        assert_eq!(s.next(t1 + REFILL_DELAY), Next::Register { count: 1 });
    }

    #[test]
    fn a_parked_connection_lost_with_an_error_says_which() {
        let t0 = Instant::now();
        let mut s = with_parked(2, 2, t0);
        let notices = s.handle(
            Event::Rendezvous(parked::Event::Lost {
                lived: MS(20),
                error: Some(io::Error::from(io::ErrorKind::ConnectionReset)),
            }),
            t0,
            0.5,
        );
        let [Notice::Failed { problem, .. }] = notices.as_slice() else {
            panic!("{notices:?}");
        };
        assert_eq!(problem.kind, "rendezvous_closed");
        assert_eq!(problem.severity, Severity::Warn);
        assert!(problem.message.contains("reset"), "{}", problem.message);
    }

    #[test]
    fn pairs_are_counted_until_they_end() {
        let t0 = Instant::now();
        let mut s = with_parked(2, 2, t0);
        s.handle(paired(), t0, 0.5);
        s.handle(paired(), t0, 0.5);
        assert_eq!((s.status().pairs_active, s.status().pairings), (2, 2));
        s.handle(Event::Rendezvous(parked::Event::PairEnded), t0, 0.5);
        assert_eq!((s.status().pairs_active, s.status().pairings), (1, 2));
        s.shut_down();
        let status = s.status();
        assert_eq!(
            (status.parked, status.connecting, status.pairs_active),
            (0, 0, 0)
        );
        assert_eq!(status.pairings, 2);
    }

    /// One step of a simulated world: the shell's and the relay's possible moves. Each is
    /// taken only when it can happen (a connection parks only if one is connecting, ...).
    #[derive(Clone, Debug)]
    enum Step {
        /// Time passes.
        Wait(u64),
        /// The shell asks what to do, and the registration (if any) answers.
        Poll {
            ok: bool,
            extra_ports: usize,
        },
        Park,
        Refuse,
        /// The relay drops `n` parked connections at once, each after `lived_ms`.
        Drop {
            n: usize,
            lived_ms: u64,
        },
        Pair,
        EndPair,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..2_000).prop_map(Step::Wait),
            (any::<bool>(), 0usize..3).prop_map(|(ok, extra_ports)| Step::Poll { ok, extra_ports }),
            Just(Step::Park),
            Just(Step::Refuse),
            (1usize..80, 0u64..8_000).prop_map(|(n, lived_ms)| Step::Drop { n, lived_ms }),
            Just(Step::Pair),
            Just(Step::EndPair),
        ]
    }

    /// Whether the failures went up, and by the registration's outcome or otherwise.
    struct Applied {
        registration_completed: bool,
        registration_failed: bool,
        failures_before: u32,
    }

    fn apply(s: &mut Supervisor, now: Instant, step: &Step, jitter: f64) -> Applied {
        let failures_before = s.failures();
        let mut applied = Applied {
            registration_completed: false,
            registration_failed: false,
            failures_before,
        };
        let status = s.status();
        match *step {
            Step::Wait(_) => {}
            Step::Poll { ok, extra_ports } => {
                if let Next::Register { count } = s.next(now) {
                    applied.registration_completed = true;
                    if ok {
                        let ports = count as usize + extra_ports;
                        s.handle(Event::Registered { ports }, now, jitter);
                    } else {
                        applied.registration_failed = true;
                        s.handle(unavailable(), now, jitter);
                    }
                }
            }
            Step::Park if status.connecting > 0 => {
                s.handle(parked(), now, jitter);
            }
            Step::Refuse if status.connecting > 0 => {
                s.handle(refused(), now, jitter);
            }
            Step::Drop { n, lived_ms } => {
                for _ in 0..n.min(status.parked) {
                    s.handle(lost(MS(lived_ms)), now, jitter);
                }
            }
            Step::Pair if status.parked > 0 => {
                s.handle(paired(), now, jitter);
            }
            Step::EndPair if status.pairs_active > 0 => {
                s.handle(Event::Rendezvous(parked::Event::PairEnded), now, jitter);
            }
            _ => {}
        }
        applied
    }

    proptest! {
        /// Never more connections parked, connecting or asked for than wanted.
        #[test]
        fn never_more_than_wanted(
            wanted in 1usize..40,
            steps in proptest::collection::vec(step(), 1..200),
            jitter in 0.0f64..1.0,
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Supervisor::new(wanted, MAX_BACKOFF, t0);
            for step in &steps {
                if let Step::Wait(ms) = step {
                    now += MS(*ms);
                }
                apply(&mut s, now, step, jitter);
                prop_assert!(s.occupied() <= wanted, "{s:?} after {step:?}");
                if let Next::Register { count } = s.next(now) {
                    prop_assert!(count >= 1 && s.occupied() <= wanted, "{s:?}");
                    // Undo the poll: the step list decides when registrations complete.
                    s.registering = None;
                }
            }
        }

        /// The backoff counts a failed registration, and at most one rendezvous failure per
        /// registration attempt, whatever their number (a relay restart dropping N parked
        /// connections raises it at most once); a parked connection resets it; nothing else
        /// moves it.
        #[test]
        fn the_backoff_grows_once_per_attempt_and_resets_on_success(
            wanted in 1usize..80,
            steps in proptest::collection::vec(step(), 1..200),
            jitter in 0.0f64..1.0,
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Supervisor::new(wanted, MAX_BACKOFF, t0);
            // Counted rendezvous failures since the last completed registration attempt.
            let mut rendezvous_counted = 0u32;
            for step in &steps {
                if let Step::Wait(ms) = step {
                    now += MS(*ms);
                }
                let applied = apply(&mut s, now, step, jitter);
                let after = s.failures();
                match step {
                    Step::Park if after != applied.failures_before => {
                        prop_assert_eq!(after, 0, "a parked connection resets the backoff");
                        rendezvous_counted = 0;
                    }
                    Step::Poll { .. } if applied.registration_completed => {
                        rendezvous_counted = 0;
                        let grew = u32::from(applied.registration_failed);
                        prop_assert_eq!(after, applied.failures_before + grew);
                    }
                    Step::Refuse | Step::Drop { .. } => {
                        prop_assert!(after <= applied.failures_before + 1, "a burst counts once");
                        rendezvous_counted += after - applied.failures_before;
                        prop_assert!(rendezvous_counted <= 1, "once per registration attempt");
                    }
                    _ => prop_assert_eq!(after, applied.failures_before, "{:?}", step),
                }
            }
        }

        /// However the failures came, missing connections are asked for again once the
        /// longest backoff (and the refill delay) has passed.
        #[test]
        fn missing_connections_are_asked_for_again_after_the_backoff(
            wanted in 1usize..40,
            steps in proptest::collection::vec(step(), 1..200),
            jitter in 0.0f64..1.0,
            max_backoff_ms in 250u64..60_000,
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let max_backoff = MS(max_backoff_ms);
            let mut s = Supervisor::new(wanted, max_backoff, t0);
            for step in &steps {
                if let Step::Wait(ms) = step {
                    now += MS(*ms);
                }
                apply(&mut s, now, step, jitter);
            }
            let status = s.status();
            let missing = wanted - status.parked - status.connecting;
            let later = now + max_backoff + REFILL_DELAY;
            if missing > 0 {
                let want = u32::try_from(missing).unwrap().min(MAX_RENDEZVOUS_PER_REQUEST);
                prop_assert_eq!(s.next(later), Next::Register { count: want });
            } else {
                prop_assert_eq!(s.next(later), Next::Wait);
            }
        }
    }
}
