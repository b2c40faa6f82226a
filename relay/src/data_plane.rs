//! The threads that carry the labels' connections: rendezvous ports p, client ports q, parked
//! connections and spliced pairs. Each thread runs its own single-threaded runtime, and each
//! label lives on one of them, the least busy when it was created.
//!
//! Why not the front end's work-stealing runtime: a fresh connection is a chain of short steps
//! (accept on q, take a parked connection, splice, close), each waking the next task. On a
//! work-stealing runtime every such wake may unpark another worker thread, which costs more
//! than the step itself; on one thread they run back to back. Measured on 2 cores (issue 6,
//! `bench/results/2026-11-25T153732/`): 8,000 fresh connections/s instead of 7,200, and 15 %
//! less CPU per connection for the whole machine. Labels spread over the threads, so a relay
//! with many labels still uses every core; one label's connections share one core (16 Gbit/s
//! of copying on loopback, as before).
//! The HTTPS front end (TLS, registrations, 307s) stays on the multi-threaded runtime. The
//! shared client port accepts on every data-plane thread (`spawn_on_each`), so that a client
//! of a label on the accepting thread is served there without a hand-over (`Placement::
//! is_current`).

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{EnterGuard, Handle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Data-plane threads of every data plane in the process get distinct ids (tests run several
/// relays in one process), so that "this is the label's thread" cannot be true by accident.
static NEXT_THREAD_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The id of the data-plane thread running here; 0 on every other thread.
    static CURRENT_THREAD: Cell<usize> = const { Cell::new(0) };
}

/// The data-plane threads. Dropping it stops them: every task still on them is dropped and
/// its sockets close.
#[derive(Debug)]
pub struct DataPlane {
    threads: Vec<Thread>,
}

#[derive(Debug)]
struct Thread {
    id: usize,
    runtime: Handle,
    /// Labels placed on this thread now.
    labels: Arc<AtomicUsize>,
    /// Dropped with the data plane: the thread's `block_on` returns and its runtime goes.
    _stop: oneshot::Sender<()>,
}

/// A label's place on the data plane: the runtime its sockets and tasks belong to.
/// Dropping it frees the place.
#[derive(Debug)]
pub struct Placement {
    thread: usize,
    runtime: Handle,
    labels: Arc<AtomicUsize>,
}

impl DataPlane {
    /// Starts `threads` threads, named `taas-data-N`.
    pub fn start(threads: NonZeroUsize) -> std::io::Result<Self> {
        let threads = (0..threads.get())
            .map(start_thread)
            .collect::<std::io::Result<_>>()?;
        Ok(Self { threads })
    }

    /// The number of threads: the CPUs this process may use.
    pub fn default_threads() -> NonZeroUsize {
        std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
    }

    /// A place for a new label: the thread with the fewest labels (the first of them).
    pub fn place(&self) -> Placement {
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.labels.load(Ordering::Relaxed))
            .expect("a data plane has at least one thread");
        thread.labels.fetch_add(1, Ordering::Relaxed);
        Placement {
            thread: thread.id,
            runtime: thread.runtime.clone(),
            labels: thread.labels.clone(),
        }
    }

    /// Runs one task on every thread: `task(index)` is spawned on thread `index` (a listener
    /// accepting on each thread, `shared_port`). The handles abort nothing when dropped.
    pub fn spawn_on_each<F, T>(&self, mut task: F) -> Vec<JoinHandle<()>>
    where
        F: FnMut(usize) -> T,
        T: std::future::Future<Output = ()> + Send + 'static,
    {
        self.threads
            .iter()
            .enumerate()
            .map(|(index, thread)| thread.runtime.spawn(task(index)))
            .collect()
    }

    /// The number of threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Labels on each thread.
    pub fn labels_per_thread(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.labels.load(Ordering::Relaxed))
            .collect()
    }
}

impl Placement {
    /// Makes sockets created and tasks spawned until the guard drops belong to this place.
    pub fn enter(&self) -> EnterGuard<'_> {
        self.runtime.enter()
    }

    /// Whether the caller runs on this place's thread: a connection accepted here can be
    /// served in place, with no hand-over to another thread.
    pub fn is_current(&self) -> bool {
        CURRENT_THREAD.with(Cell::get) == self.thread
    }

    /// Runs `task` on this place's thread (a connection accepted elsewhere, handed over).
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(task);
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.labels.fetch_sub(1, Ordering::Relaxed);
    }
}

fn start_thread(index: usize) -> std::io::Result<Thread> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = runtime.handle().clone();
    let id = NEXT_THREAD_ID.fetch_add(1, Ordering::Relaxed);
    std::thread::Builder::new()
        .name(format!("taas-data-{index}"))
        .spawn(move || {
            // A current-thread runtime runs its tasks on the thread that blocks on it: this one.
            CURRENT_THREAD.with(|current| current.set(id));
            // Runs the thread's tasks until the data plane is dropped; then the runtime is
            // dropped here, outside any async context, with everything still on it.
            let _ = runtime.block_on(stopped);
        })?;
    Ok(Thread {
        id,
        runtime: handle,
        labels: Arc::new(AtomicUsize::new(0)),
        _stop: stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_go_to_the_least_busy_thread_and_free_their_place() {
        let plane = DataPlane::start(NonZeroUsize::new(3).unwrap()).unwrap();
        let a = plane.place();
        let b = plane.place();
        let c = plane.place();
        assert_eq!(plane.labels_per_thread(), [1, 1, 1]);
        let d = plane.place();
        assert_eq!(plane.labels_per_thread(), [2, 1, 1]);
        drop(b);
        assert_eq!(plane.labels_per_thread(), [2, 0, 1]);
        let e = plane.place();
        assert_eq!(plane.labels_per_thread(), [2, 1, 1]);
        drop((a, c, d, e));
        assert_eq!(plane.labels_per_thread(), [0, 0, 0]);
    }

    /// A task spawned in a place runs on that place's thread, and stopping the data plane
    /// drops it (its sockets close).
    #[test]
    fn tasks_run_on_their_thread_and_stop_with_the_data_plane() {
        let plane = DataPlane::start(NonZeroUsize::new(2).unwrap()).unwrap();
        let place = plane.place();
        let (name_tx, name_rx) = std::sync::mpsc::channel();
        let (_keep, never) = oneshot::channel::<()>();
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
        {
            let _in = place.enter();
            tokio::spawn(async move {
                let _on_drop = dropped_tx;
                let name = std::thread::current().name().map(str::to_owned);
                name_tx.send(name).unwrap();
                let _ = never.await;
            });
        }
        let timeout = std::time::Duration::from_secs(10);
        assert_eq!(
            name_rx.recv_timeout(timeout).unwrap().as_deref(),
            Some("taas-data-0")
        );
        drop(place);
        drop(plane);
        // The task's sender is dropped with it: the receiver sees the channel close.
        assert_eq!(
            dropped_rx.recv_timeout(timeout),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }

    /// A task knows whether it runs on a label's thread: true only there, false on the
    /// plane's other threads, on another data plane's threads and off the data plane.
    #[test]
    fn a_placement_is_current_only_on_its_own_thread() {
        let plane = DataPlane::start(NonZeroUsize::new(2).unwrap()).unwrap();
        let other_plane = DataPlane::start(NonZeroUsize::new(2).unwrap()).unwrap();
        let place = Arc::new(plane.place());
        assert!(!place.is_current(), "not on the test's thread");
        let (tx, rx) = std::sync::mpsc::channel();
        for p in [&plane, &other_plane] {
            let (place, tx) = (place.clone(), tx.clone());
            p.spawn_on_each(move |index| {
                let (place, tx) = (place.clone(), tx.clone());
                async move { tx.send((index, place.is_current())).unwrap() }
            });
        }
        let timeout = std::time::Duration::from_secs(10);
        let mut seen: Vec<_> = (0..4).map(|_| rx.recv_timeout(timeout).unwrap()).collect();
        seen.sort();
        // Thread 0 of `plane` (the label's) says true; the three others false.
        assert_eq!(seen, [(0, false), (0, true), (1, false), (1, false)]);
        assert_eq!(plane.threads(), 2);
    }
}
