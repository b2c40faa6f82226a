//! The arithmetic of one label's pool of parked connections, apart from the sockets and tasks
//! that hold them: the relay's `label.rs` keeps a [`Pool`] under the label's lock and drives
//! it; the handles it stores (`P`) and the waiting clients (`W`) are whatever the relay uses.
//!
//! - A rendezvous port handed out and not yet connected is *reserved*: it counts against
//!   `maxParked` with the parked connections, so a label never has more hidden-server
//!   connections parked or on their way than it allows.
//! - A connection arriving on a reserved port goes straight to the longest-waiting client, or
//!   is parked; its reservation ends in the same step, so the count never overshoots between
//!   the two.
//! - Pairing takes the newest parked connection (LIFO: the newest is the likeliest alive).
//! - A parked connection whose hidden server went away is removed at once; what is removed is
//!   never handed out.
//! - A connection taken for a client that could not use it goes back in untouched (its
//!   hidden server saw nothing), even if that makes the pool one over its limit for a while:
//!   dropping it would cost the hidden server a connection for nothing.

use std::collections::VecDeque;

/// Names one parked connection for as long as it is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParkedId(u64);

/// A rendezvous port counted against `maxParked` until its connection is parked or handed
/// over ([`Pool::park`], [`Pool::release`]). Not `Clone`: one port, one reservation.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation counts against maxParked until it is given back"]
pub struct Reservation(());

/// The label has no room for another rendezvous port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub max_parked: usize,
}

/// The queue of clients waiting for a parked connection is at its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

#[derive(Debug)]
struct Parked<P> {
    id: ParkedId,
    handle: P,
    /// Its hidden server has sent bytes while parked (it speaks first, unasked).
    spoke: bool,
}

/// One label's parked connections (handles `P`), reservations and waiting clients (`W`).
#[derive(Debug)]
pub struct Pool<P, W> {
    /// Newest last: pairing pops from the end.
    parked: Vec<Parked<P>>,
    /// Clients waiting for a parked connection, oldest first.
    waiting: VecDeque<W>,
    reserved: usize,
    next_id: u64,
}

impl<P, W> Default for Pool<P, W> {
    fn default() -> Self {
        Self {
            parked: Vec::new(),
            waiting: VecDeque::new(),
            reserved: 0,
            next_id: 0,
        }
    }
}

impl<P, W> Pool<P, W> {
    /// Parked connections ready for a client now.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Rendezvous ports handed out and not yet connected.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Clients in the queue (some may have given up since).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a client sent to q now would get a hidden server: one is parked, or a
    /// registration was just granted whose hidden server is connecting and no waiting client
    /// is ahead of it. A relay asked for a redirect while an agent replaces the connection a
    /// client has just taken would otherwise answer 503 for those few milliseconds; a client
    /// on q waits for the reserved connection (up to the client wait), and a reservation
    /// nobody connects ends at the rendezvous deadline.
    pub fn serves_soon(&self) -> bool {
        !self.parked.is_empty() || self.reserved > self.waiting.len()
    }

    /// How many more rendezvous ports `max_parked` allows now.
    pub fn room(&self, max_parked: usize) -> usize {
        max_parked.saturating_sub(self.parked.len() + self.reserved)
    }

    /// Reserves a rendezvous port, if `max_parked` leaves room for one.
    pub fn reserve(&mut self, max_parked: usize) -> Result<Reservation, Full> {
        if self.room(max_parked) == 0 {
            return Err(Full { max_parked });
        }
        self.reserved += 1;
        Ok(Reservation(()))
    }

    /// Gives a reservation back: its port expired, or its connection went to a client.
    pub fn release(&mut self, reservation: Reservation) {
        let Reservation(()) = reservation;
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// The longest-waiting client, taken out of the queue: an arriving connection is offered
    /// to it first. (A client that has given up refuses it; then ask for the next.)
    pub fn next_waiter(&mut self) -> Option<W> {
        self.waiting.pop_front()
    }

    /// Parks a connection that no waiting client took; its reservation (if it came through
    /// one, not back from a client) ends now.
    pub fn park(&mut self, handle: P, spoke: bool, reservation: Option<Reservation>) -> ParkedId {
        if let Some(reservation) = reservation {
            self.release(reservation);
        }
        let id = ParkedId(self.next_id);
        self.next_id += 1;
        self.parked.push(Parked { id, handle, spoke });
        id
    }

    /// Removes a parked connection whose hidden server went away; `None` if it was no longer
    /// parked (a client took it just before).
    pub fn remove(&mut self, id: ParkedId) -> Option<P> {
        let index = self.parked.iter().rposition(|parked| parked.id == id)?;
        Some(self.parked.remove(index).handle)
    }

    /// Notes that parked connection `id` has sent bytes.
    pub fn mark_spoke(&mut self, id: ParkedId) {
        if let Some(parked) = self.parked.iter_mut().rev().find(|parked| parked.id == id) {
            parked.spoke = true;
        }
    }

    /// Takes the newest parked connection for a client.
    pub fn take_newest(&mut self) -> Option<P> {
        self.parked.pop().map(|parked| parked.handle)
    }

    /// Takes the newest parked connection if its hidden server has spoken already: a client
    /// may have it before sending anything.
    pub fn take_newest_if_spoke(&mut self) -> Option<P> {
        if !self.parked.last()?.spoke {
            return None;
        }
        self.take_newest()
    }

    /// Queues a client for the next connection to arrive, after dropping the clients that
    /// have given up (`gone`); refused when `limit` clients are waiting.
    pub fn wait(
        &mut self,
        waiter: W,
        limit: usize,
        gone: impl Fn(&W) -> bool,
    ) -> Result<(), QueueFull> {
        self.waiting.retain(|waiter| !gone(waiter));
        if self.waiting.len() >= limit {
            return Err(QueueFull);
        }
        self.waiting.push_back(waiter);
        Ok(())
    }

    /// Drops every parked connection, keeping the waiting clients (the label's credentials
    /// changed: what was parked with the old ones must serve no client). Returns how many.
    pub fn clear_parked(&mut self) -> usize {
        let dropped = self.parked.len();
        self.parked.clear();
        dropped
    }

    /// Drops every parked connection and waiting client (the label is removed). Reservations
    /// stay counted until they are given back.
    pub fn clear(&mut self) {
        self.parked.clear();
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestPool = Pool<&'static str, u32>;

    #[test]
    fn clearing_the_parked_connections_keeps_the_waiting_clients() {
        let mut pool = TestPool::default();
        pool.park("a", false, None);
        pool.park("b", true, None);
        pool.wait(7, 4, |_| false).unwrap();
        assert_eq!(pool.clear_parked(), 2);
        assert_eq!((pool.parked(), pool.waiting()), (0, 1));
    }

    #[test]
    fn reservations_count_against_max_parked_until_parked_or_released() {
        let mut pool = TestPool::default();
        let a = pool.reserve(2).unwrap();
        let b = pool.reserve(2).unwrap();
        assert_eq!(pool.reserve(2), Err(Full { max_parked: 2 }));
        assert_eq!((pool.room(2), pool.reserved()), (0, 2));
        pool.park("a", false, Some(a));
        assert_eq!((pool.parked(), pool.reserved(), pool.room(2)), (1, 1, 0));
        pool.release(b);
        assert_eq!((pool.parked(), pool.reserved(), pool.room(2)), (1, 0, 1));
        // A lowered limit: no room, nothing else changes.
        assert_eq!(pool.room(0), 0);
        assert!(pool.reserve(1).is_err());
    }

    #[test]
    fn pairing_takes_the_newest_and_never_a_removed_one() {
        let mut pool = TestPool::default();
        let old = pool.park("old", false, None);
        let dead = pool.park("dead", false, None);
        pool.park("new", false, None);
        assert_eq!(pool.remove(dead), Some("dead"));
        assert_eq!(pool.remove(dead), None);
        assert_eq!(pool.take_newest(), Some("new"));
        assert_eq!(pool.take_newest(), Some("old"));
        assert_eq!(pool.remove(old), None, "taken: no longer parked");
        assert_eq!(pool.take_newest(), None);
    }

    #[test]
    fn a_silent_client_gets_only_a_connection_whose_server_spoke() {
        let mut pool = TestPool::default();
        let quiet = pool.park("quiet", false, None);
        assert_eq!(pool.take_newest_if_spoke(), None);
        pool.mark_spoke(quiet);
        assert_eq!(pool.take_newest_if_spoke(), Some("quiet"));
        assert_eq!(pool.take_newest_if_spoke(), None);
    }

    #[test]
    fn waiting_clients_are_served_oldest_first_and_bounded() {
        let mut pool = TestPool::default();
        let gone = |w: &u32| *w == 2;
        for client in 1..=3 {
            pool.wait(client, 3, |_| false).unwrap();
        }
        assert_eq!(pool.wait(4, 3, |_| false), Err(QueueFull));
        // Client 2 gave up: dropped when the next one queues.
        pool.wait(4, 3, gone).unwrap();
        assert_eq!(pool.waiting(), 3);
        let served: Vec<u32> = std::iter::from_fn(|| pool.next_waiter()).collect();
        assert_eq!(served, [1, 3, 4]);
    }

    #[test]
    fn a_label_serves_soon_while_parked_or_while_a_reserved_connection_has_no_client_ahead() {
        let mut pool = TestPool::default();
        assert!(!pool.serves_soon(), "nothing parked, nothing coming");
        let reservation = pool.reserve(4).unwrap();
        assert!(pool.serves_soon(), "a hidden server is connecting");
        pool.wait(1, 8, |_| false).unwrap();
        assert!(!pool.serves_soon(), "the one coming is a waiting client's");
        pool.park("a", false, Some(reservation));
        assert!(pool.serves_soon());
        assert_eq!(pool.take_newest(), Some("a"));
        assert!(!pool.serves_soon());
    }

    #[test]
    fn clearing_keeps_reservations() {
        let mut pool = TestPool::default();
        let reservation = pool.reserve(3).unwrap();
        pool.park("a", true, None);
        pool.wait(1, 8, |_| false).unwrap();
        pool.clear();
        assert_eq!((pool.parked(), pool.waiting(), pool.reserved()), (0, 0, 1));
        pool.release(reservation);
        assert_eq!(pool.reserved(), 0);
    }

    mod properties {
        use std::collections::{HashSet, VecDeque};

        use proptest::prelude::*;

        use super::super::*;

        /// One thing that happens to a label's pool.
        #[derive(Debug, Clone)]
        enum Op {
            /// A registration asks for a rendezvous port.
            Reserve,
            /// A rendezvous port expires unused.
            Expire,
            /// A hidden server connects to a reserved port (and has spoken already, or not).
            Arrive { spoke: bool },
            /// A parked connection's hidden server goes away (the n-th parked, modulo).
            Die(usize),
            /// A parked connection's hidden server sends bytes.
            Speak(usize),
            /// A client that has sent its first byte takes the newest.
            Take,
            /// A silent client takes the newest if it spoke.
            TakeSpoken,
            /// A taken connection goes back untouched (its client could not be served).
            PutBack,
            /// A client joins the queue.
            Wait,
            /// A waiting client gives up (the n-th, modulo).
            GiveUp(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Reserve),
                1 => Just(Op::Expire),
                3 => any::<bool>().prop_map(|spoke| Op::Arrive { spoke }),
                1 => any::<usize>().prop_map(Op::Die),
                1 => any::<usize>().prop_map(Op::Speak),
                2 => Just(Op::Take),
                1 => Just(Op::TakeSpoken),
                1 => Just(Op::PutBack),
                1 => Just(Op::Wait),
                1 => any::<usize>().prop_map(Op::GiveUp),
            ]
        }

        /// The pool as a reader would describe it, with plain vectors.
        #[derive(Default)]
        struct Model {
            /// (connection, spoke), newest last.
            parked: Vec<(u32, bool)>,
            reserved: usize,
            /// Waiting clients, oldest first.
            waiting: VecDeque<u32>,
        }

        proptest! {
            #[test]
            fn the_pool_keeps_its_limit_its_order_and_never_hands_out_a_dead_connection(
                max_parked in 1usize..8,
                queue in 1usize..4,
                ops in proptest::collection::vec(op(), 0..200),
            ) {
                let mut pool: Pool<u32, u32> = Pool::default();
                let mut model = Model::default();
                let mut reservations = Vec::new();
                let mut ids: Vec<(u32, ParkedId)> = Vec::new();
                let mut dead = HashSet::new();
                let mut gone = HashSet::new();
                let mut taken = Vec::new();
                let (mut next_conn, mut next_client, mut put_back) = (0u32, 0u32, 0usize);
                for op in ops {
                    match op {
                        Op::Reserve => {
                            let room = model.parked.len() + model.reserved < max_parked;
                            let reserved = pool.reserve(max_parked);
                            prop_assert_eq!(reserved.is_ok(), room);
                            if let Ok(reservation) = reserved {
                                reservations.push(reservation);
                                model.reserved += 1;
                                prop_assert!(pool.parked() + pool.reserved() <= max_parked);
                            }
                        }
                        Op::Expire => {
                            if let Some(reservation) = reservations.pop() {
                                pool.release(reservation);
                                model.reserved -= 1;
                            }
                        }
                        Op::Arrive { spoke } => {
                            let Some(reservation) = reservations.pop() else { continue };
                            model.reserved -= 1;
                            let conn = next_conn;
                            next_conn += 1;
                            // The model: the oldest client still waiting gets it, else parked.
                            let mut expected = None;
                            while let Some(client) = model.waiting.pop_front() {
                                if !gone.contains(&client) {
                                    expected = Some(client);
                                    break;
                                }
                            }
                            let mut served = None;
                            while let Some(client) = pool.next_waiter() {
                                if !gone.contains(&client) {
                                    served = Some(client);
                                    break;
                                }
                            }
                            prop_assert_eq!(served, expected);
                            match served {
                                Some(_) => pool.release(reservation),
                                None => {
                                    ids.push((conn, pool.park(conn, spoke, Some(reservation))));
                                    model.parked.push((conn, spoke));
                                }
                            }
                        }
                        Op::Die(n) => {
                            if model.parked.is_empty() {
                                continue;
                            }
                            let (conn, _) = model.parked.remove(n % model.parked.len());
                            let id = ids.iter().rev().find(|(c, _)| *c == conn).unwrap().1;
                            prop_assert_eq!(pool.remove(id), Some(conn));
                            prop_assert_eq!(pool.remove(id), None);
                            dead.insert(conn);
                        }
                        Op::Speak(n) => {
                            if model.parked.is_empty() {
                                continue;
                            }
                            let n = n % model.parked.len();
                            model.parked[n].1 = true;
                            let conn = model.parked[n].0;
                            pool.mark_spoke(ids.iter().rev().find(|(c, _)| *c == conn).unwrap().1);
                        }
                        Op::Take | Op::TakeSpoken => {
                            let eligible = match op {
                                Op::Take => !model.parked.is_empty(),
                                _ => model.parked.last().is_some_and(|(_, spoke)| *spoke),
                            };
                            let expected = eligible.then(|| model.parked.pop().unwrap());
                            let got = match op {
                                Op::Take => pool.take_newest(),
                                _ => pool.take_newest_if_spoke(),
                            };
                            prop_assert_eq!(got, expected.map(|(conn, _)| conn));
                            if let Some(conn) = got {
                                prop_assert!(!dead.contains(&conn), "handed out a dead one");
                            }
                            taken.extend(expected);
                        }
                        Op::PutBack => {
                            let Some((conn, spoke)) = taken.pop() else { continue };
                            ids.push((conn, pool.park(conn, spoke, None)));
                            model.parked.push((conn, spoke));
                            put_back += 1;
                        }
                        Op::Wait => {
                            let client = next_client;
                            next_client += 1;
                            model.waiting.retain(|c| !gone.contains(c));
                            let room = model.waiting.len() < queue;
                            let queued = pool.wait(client, queue, |c| gone.contains(c));
                            prop_assert_eq!(queued.is_ok(), room);
                            if room {
                                model.waiting.push_back(client);
                            }
                        }
                        Op::GiveUp(n) => {
                            if !model.waiting.is_empty() {
                                gone.insert(model.waiting[n % model.waiting.len()]);
                            }
                        }
                    }
                    prop_assert_eq!(pool.parked(), model.parked.len());
                    prop_assert_eq!(pool.reserved(), model.reserved);
                    prop_assert_eq!(pool.waiting(), model.waiting.len());
                    prop_assert_eq!(pool.reserved(), reservations.len());
                    // Only a connection put back can take the pool over its limit.
                    prop_assert!(pool.parked() + pool.reserved() <= max_parked + put_back);
                    if put_back == 0 {
                        prop_assert!(pool.parked() + pool.reserved() <= max_parked);
                    }
                }
            }
        }
    }
}
