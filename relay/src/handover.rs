//! Hot restart of the standalone relay (`serve`): a new relay process takes the listening
//! sockets of the running one over a Unix socket (`<state-dir>/handover.sock`, SCM_RIGHTS),
//! the way HAProxy and Envoy hand over, so that the binary is replaced without a gap.
//!
//! ```text
//!  old relay (serving)                          new relay (`serve --take-over`)
//!  handover.sock listening ◀──── connect ────── started by SIGHUP (a re-exec) or by hand
//!  peer uid == own uid? hello? ◀── hello ─────
//!  unlink handover.sock
//!  every listener (key, fd) ───── fds ───────▶ binds through the registry: inherited
//!                                              sockets first, else a fresh bind; closes
//!                                              the inherited ones nobody claimed
//!         (both accept from the same kernel sockets now)
//!                          ◀──── SERVING ───── labels loaded, serving; sd_notify
//!  stop accepting everywhere                   MAINPID=<pid>, READY=1; binds its own
//!  registrations still in flight: 503          handover.sock for the next upgrade
//!  front-end connections closed once idle
//!  (every answer says close): agents and
//!  browsers reconnect, to the new relay
//!  the clients it accepted get paired
//!  parked connections given back ──────────▶ agents register again, with the new relay
//!  active pairs finish (≤ --drain-timeout), exit
//! ```
//!
//! Why sockets are passed rather than bound again with `SO_REUSEPORT`: closing one of a
//! reuse-port group resets the connections queued on it, while a passed socket is the same
//! kernel socket with its queue; both processes accept from it until the old one stops, so
//! no SYN is lost. Clients the new relay accepts before an agent has parked with it wait
//! (the client wait, 10 s by default) and are paired once the agents re-park.
//!
//! Client admission (`clientAdmission: Redirected`) is handed over too: once the successor
//! serves, the old relay sends it, on the same connection, every source it redirected within
//! the admission window and then each one it redirects until it exits (one line each,
//! [`admission_line`]), so a client that got its 307 from the old relay is admitted on q by
//! the new one. Best effort and bounded: a line beyond [`ADMISSIONS_QUEUED`] waiting to be
//! written is dropped (that client asks again after its refusal).
//!
//! Only a process of the same user may take over (`SO_PEERCRED`); a peer that says nothing
//! or something else within [`HELLO_TIMEOUT`] is closed, and the relay goes on serving.
//!
//! The message is pure ([`encode`], [`parse`]): a length-prefixed, versioned list of
//! `(key, fd index)`, where a key names a listener by role and configured address
//! ([`Key`]); the descriptors follow, [`FDS_PER_MESSAGE`] per `sendmsg`.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use taas_protocol::sync::lock;
use tokio::net::TcpListener;

use crate::ports::{PortError, PortLease, PortPool};

/// The socket's file name in the state directory.
pub const SOCKET_NAME: &str = "handover.sock";
/// Listeners one hand-over may carry.
pub const MAX_LISTENERS: usize = 4096;
/// Longest key, in bytes.
pub const MAX_KEY: usize = 128;
/// The format's version; a successor speaking another is refused.
pub const VERSION: u8 = 1;
/// Descriptors per `sendmsg` (the kernel takes at most 253, SCM_MAX_FD).
pub const FDS_PER_MESSAGE: usize = 250;
/// What a successor says first.
const HELLO: &[u8] = b"TAAS-TAKE-OVER 1\n";
/// What it says once it serves.
const SERVING: &[u8] = b"SERVING\n";
/// How long a peer of handover.sock has to say hello (and each later step of the exchange
/// of sockets has to take).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a successor may take from receiving the sockets to serving (loading labels,
/// TLS); past it, the old relay keeps serving alone.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest message [`parse`] accepts (its length prefix excluded).
pub const MAX_MESSAGE: usize = 1 + 2 + MAX_LISTENERS * (1 + MAX_KEY + 2);

/// Admissions waiting to be written to the successor at most.
pub const ADMISSIONS_QUEUED: usize = 4096;
/// The longest admission line read (a label, an IPv6 address and an age fit well within).
pub const MAX_ADMISSION_LINE: usize = 256;

/// One admission for the successor: `ADMIT <label> <ip> <age in ms>\n`. Pure.
pub fn admission_line(label: &str, source: IpAddr, age: Duration) -> String {
    format!("ADMIT {label} {source} {}\n", age.as_millis())
}

/// The admission a line (without its newline) says, if it is one: a label of printable
/// ASCII without spaces, an IP address, an age in milliseconds. Pure; anything else is `None`.
pub fn parse_admission(line: &str) -> Option<(String, IpAddr, Duration)> {
    let mut words = line.strip_prefix("ADMIT ")?.split(' ');
    let label = words.next().filter(|label| key_ok(label))?;
    let source = words.next()?.parse().ok()?;
    let age = Duration::from_millis(words.next()?.parse().ok()?);
    words
        .next()
        .is_none()
        .then(|| (label.to_string(), source, age))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{0} listeners: at most {MAX_LISTENERS}")]
    TooMany(usize),
    #[error("a key of {0} bytes: 1 to {MAX_KEY} printable ASCII bytes")]
    BadKey(usize),
    #[error("version {0}, expected {VERSION}")]
    Version(u8),
    #[error("the message is cut short")]
    Truncated,
    #[error("bytes after the last entry")]
    Trailing,
    #[error("descriptor index {0} out of place (each listener has its own, 0..count)")]
    FdIndex(u16),
    #[error("key {0:?} twice")]
    Duplicate(String),
}

/// One listener in the message: its key and the index of its descriptor among those sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub fd: u16,
}

fn key_ok(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len()) && key.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// The message for `entries`, length prefix included: `u32` length, version, `u16` count,
/// then per entry `u8` key length, the key, `u16` descriptor index (big-endian).
pub fn encode(entries: &[Entry]) -> Result<Vec<u8>, FormatError> {
    check(entries)?;
    let mut body = vec![VERSION];
    body.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    for entry in entries {
        body.push(entry.key.len() as u8);
        body.extend_from_slice(entry.key.as_bytes());
        body.extend_from_slice(&entry.fd.to_be_bytes());
    }
    let mut message = (body.len() as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    Ok(message)
}

/// The entries of a message body (what follows the length prefix), checked: every bound,
/// one descriptor per listener, no key twice.
pub fn parse(body: &[u8]) -> Result<Vec<Entry>, FormatError> {
    let mut rest = body;
    let mut take = |n: usize| -> Result<&[u8], FormatError> {
        if rest.len() < n {
            return Err(FormatError::Truncated);
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let version = take(1)?[0];
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let count = u16::from_be_bytes(take(2)?.try_into().unwrap_or_default()) as usize;
    if count > MAX_LISTENERS {
        return Err(FormatError::TooMany(count));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = take(1)?[0] as usize;
        let key = take(len)?;
        let key = std::str::from_utf8(key).map_err(|_| FormatError::BadKey(len))?;
        let fd = u16::from_be_bytes(take(2)?.try_into().unwrap_or_default());
        entries.push(Entry {
            key: key.to_string(),
            fd,
        });
    }
    if !rest.is_empty() {
        return Err(FormatError::Trailing);
    }
    check(&entries)?;
    Ok(entries)
}

fn check(entries: &[Entry]) -> Result<(), FormatError> {
    if entries.len() > MAX_LISTENERS {
        return Err(FormatError::TooMany(entries.len()));
    }
    let mut keys = std::collections::HashSet::new();
    let mut fds = vec![false; entries.len()];
    for entry in entries {
        if !key_ok(&entry.key) {
            return Err(FormatError::BadKey(entry.key.len()));
        }
        if !keys.insert(entry.key.as_str()) {
            return Err(FormatError::Duplicate(entry.key.clone()));
        }
        match fds.get_mut(entry.fd as usize) {
            Some(seen @ false) => *seen = true,
            _ => return Err(FormatError::FdIndex(entry.fd)),
        }
    }
    Ok(())
}

/// The name of a listener, the same in both processes for the same configuration: its role
/// and the address it was asked for (port 0 included), so that a process started with the
/// same flags finds what its predecessor bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Frontend(SocketAddr),
    /// One of the shared port's sockets (one per data-plane thread).
    Shared(SocketAddr, usize),
    Metrics(SocketAddr),
    /// The web console (`crate::console`).
    Console(SocketAddr),
    /// A label's client port q: the address bound, then the label.
    Q(SocketAddr, String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Frontend(addr) => write!(f, "frontend {addr}"),
            Key::Shared(addr, i) => write!(f, "shared {addr} #{i}"),
            Key::Metrics(addr) => write!(f, "metrics {addr}"),
            Key::Console(addr) => write!(f, "console {addr}"),
            Key::Q(addr, label) => write!(f, "q {addr} {label}"),
        }
    }
}

/// The address and label of a q key (`q ADDR LABEL`).
fn parse_q(key: &str) -> Option<(SocketAddr, &str)> {
    let rest = key.strip_prefix("q ")?;
    let (addr, label) = rest.split_once(' ')?;
    Some((addr.parse().ok()?, label))
}

/// A socket from the predecessor: its key and descriptor.
pub type Inherited = (String, OwnedFd);

/// Every listening socket of the relay, by key: the ones this process holds (to hand over;
/// duplicates of the descriptors, dropped with their [`Registration`]) and the ones it
/// inherited and has not claimed yet.
#[derive(Debug, Default)]
pub struct Listeners {
    next: AtomicU64,
    held: Mutex<BTreeMap<u64, (String, OwnedFd)>>,
    inherited: Mutex<BTreeMap<String, OwnedFd>>,
}

/// A listener in the registry; dropping it (its owner closed the socket) takes it out.
#[derive(Debug)]
pub struct Registration {
    listeners: Weak<Listeners>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(listeners) = self.listeners.upgrade() {
            lock(&listeners.held).remove(&self.id);
        }
    }
}

impl Listeners {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Sockets from the predecessor, claimed by key as the relay binds.
    pub fn inherit(&self, sockets: Vec<Inherited>) {
        lock(&self.inherited).extend(sockets);
    }

    fn take(&self, key: &Key) -> Option<OwnedFd> {
        lock(&self.inherited).remove(&key.to_string())
    }

    fn register(self: &Arc<Self>, key: &Key, fd: BorrowedFd<'_>) -> std::io::Result<Registration> {
        let dup = fd.try_clone_to_owned()?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.held).insert(id, (key.to_string(), dup));
        Ok(Registration {
            listeners: Arc::downgrade(self),
            id,
        })
    }

    /// The listener for `key`: the inherited one when there is one, else `bind()`'s.
    pub fn std_listener(
        self: &Arc<Self>,
        key: &Key,
        bind: impl FnOnce() -> std::io::Result<std::net::TcpListener>,
    ) -> std::io::Result<(std::net::TcpListener, Registration)> {
        let listener = match self.take(key) {
            Some(fd) => {
                tracing::info!(%key, "listener taken over");
                let listener = std::net::TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                listener
            }
            None => bind()?,
        };
        let registration = self.register(key, listener.as_fd())?;
        Ok((listener, registration))
    }

    /// [`Listeners::std_listener`] for the async runtime (the front end, metrics).
    pub fn listener(
        self: &Arc<Self>,
        key: &Key,
        bind: impl FnOnce() -> std::io::Result<TcpListener>,
    ) -> std::io::Result<(TcpListener, Registration)> {
        let (listener, registration) =
            self.std_listener(key, || bind().and_then(TcpListener::into_std))?;
        Ok((TcpListener::from_std(listener)?, registration))
    }

    /// A label's client port q: the predecessor's q for the same address (pinned) or the
    /// same label (from the pool, still in its range), else a fresh bind.
    pub(crate) fn bind_q(
        self: &Arc<Self>,
        label: &str,
        pinned: Option<u16>,
        ip: IpAddr,
        pool: &Arc<PortPool>,
        backlog: u32,
    ) -> Result<(TcpListener, PortLease), PortError> {
        let inherited = {
            let mut inherited = lock(&self.inherited);
            let found = inherited.keys().find_map(|key| {
                let (addr, owner) = parse_q(key)?;
                let fits = addr.ip() == ip
                    && match pinned {
                        Some(port) => addr.port() == port,
                        None => owner == label && pool.range().contains(addr.port()),
                    };
                fits.then(|| (key.clone(), addr))
            });
            found.and_then(|(key, addr)| Some((addr, inherited.remove(&key)?)))
        };
        let taken = inherited.and_then(|(addr, fd)| {
            let lease = match pinned {
                Some(_) => PortLease::fixed(addr.port()),
                None => pool.lease(addr.port())?,
            };
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true).ok()?;
            let listener = TcpListener::from_std(listener).ok()?;
            tracing::info!(%label, %addr, "client port taken over");
            Some((listener, lease))
        });
        let (listener, lease) = match taken {
            Some(taken) => taken,
            None => match pinned {
                Some(port) => crate::ports::bind_fixed(SocketAddr::new(ip, port), backlog)?,
                None => pool.bind_random(ip, backlog)?,
            },
        };
        let addr = SocketAddr::new(ip, lease.port());
        let key = Key::Q(addr, label.to_string());
        let registration = self
            .register(&key, listener.as_fd())
            .map_err(|source| PortError::Bind { addr, source })?;
        Ok((listener, lease.registered(registration)))
    }

    /// Closes the inherited sockets nobody claimed (a label deleted meanwhile, a listener
    /// turned off); returns their keys.
    pub fn close_unclaimed(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.inherited))
            .into_keys()
            .collect()
    }

    /// Forgets every socket held: after a hand-over, this process holds nothing for a
    /// successor.
    pub fn clear(&self) {
        lock(&self.held).clear();
        lock(&self.inherited).clear();
    }

    /// Copies of every socket held, with their keys (what a successor gets).
    fn snapshot(&self) -> std::io::Result<Vec<Inherited>> {
        let mut seen = std::collections::HashSet::new();
        lock(&self.held)
            .values()
            .filter(|(key, _)| seen.insert(key.clone()))
            .take(MAX_LISTENERS)
            .map(|(key, fd)| Ok((key.clone(), fd.try_clone()?)))
            .collect()
    }

    /// How many sockets are held.
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("message: {0}")]
    Format(#[from] FormatError),
    #[error("refused: {0}")]
    Refused(String),
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// The path of the socket in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// The old relay's side: handover.sock, listening.
#[derive(Debug)]
pub struct HandoverSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// Its inode: removed at the end only while the path is still this socket.
    ino: u64,
}

impl HandoverSocket {
    /// Binds `<state_dir>/handover.sock` fresh (a stale one left by a crash is replaced),
    /// mode 0600.
    pub fn bind(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = socket_path(state_dir);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let ino = std::fs::metadata(&path)?.ino();
        Ok(Self {
            listener,
            path,
            ino,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file, unless it is another process's socket by now.
    fn unlink(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Serves take-over requests until one succeeds: each peer must be of this uid and say
    /// hello in time; it then gets every listener in `listeners` (the file is removed first,
    /// so that the successor can bind its own), and this returns once it says it serves.
    /// `hello` is called when a successor has said hello (before the sockets go).
    /// A successor that fails before serving leaves this relay as it was, listening again.
    /// Returns the connection to the successor, for [`send_admissions`].
    pub async fn successor(
        mut self,
        listeners: Arc<Listeners>,
        mut hello: impl FnMut(),
    ) -> std::io::Result<UnixStream> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            let step = tokio::task::spawn_blocking(move || greet(&stream).map(|()| stream));
            let stream = match step.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "handover.sock: peer refused");
                    continue;
                }
                Err(_) => continue,
            };
            hello();
            self.unlink();
            let sent = {
                let listeners = listeners.clone();
                tokio::task::spawn_blocking(move || {
                    let count = send_listeners(&stream, &listeners)?;
                    await_serving(&stream).map(|()| (count, stream))
                })
                .await
                .unwrap_or_else(|_| Err(HandoverError::Refused("task failed".into())))
            };
            match sent {
                Ok((count, stream)) => {
                    tracing::info!(listeners = count, "handed over: the successor serves");
                    return Ok(stream);
                }
                Err(error) => {
                    tracing::warn!(%error, "hand-over failed: the successor did not start; serving on");
                    let state_dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
                    self = Self::bind(&state_dir)?;
                }
            }
        }
    }
}

impl Drop for HandoverSocket {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// The peer is this user and says hello in time.
fn greet(stream: &UnixStream) -> Result<(), HandoverError> {
    let peer = rustix::net::sockopt::socket_peercred(stream).map_err(std::io::Error::from)?;
    let own = rustix::process::getuid();
    if peer.uid != own {
        return Err(HandoverError::Refused(format!(
            "uid {} is not this relay's {}",
            peer.uid.as_raw(),
            own.as_raw()
        )));
    }
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    let mut said = [0u8; HELLO.len()];
    (&*stream).read_exact(&mut said)?;
    if said != HELLO {
        return Err(HandoverError::Refused("not a take-over hello".into()));
    }
    Ok(())
}

/// Sends the message, then the descriptors, one batch per byte.
fn send_listeners(stream: &UnixStream, listeners: &Listeners) -> Result<usize, HandoverError> {
    let sockets = listeners.snapshot()?;
    let entries: Vec<Entry> = sockets
        .iter()
        .enumerate()
        .map(|(i, (key, _))| Entry {
            key: key.clone(),
            fd: i as u16,
        })
        .collect();
    (&*stream).write_all(&encode(&entries)?)?;
    for batch in sockets.chunks(FDS_PER_MESSAGE) {
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(invalid("no room for the descriptors").into());
        }
        let sent = rustix::net::sendmsg(
            stream,
            &[IoSlice::new(b"F")],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        if sent != 1 {
            return Err(invalid("descriptors not sent").into());
        }
    }
    Ok(sockets.len())
}

fn await_serving(stream: &UnixStream) -> Result<(), HandoverError> {
    stream.set_read_timeout(Some(START_TIMEOUT))?;
    let mut said = [0u8; SERVING.len()];
    (&*stream).read_exact(&mut said)?;
    if said != SERVING {
        return Err(HandoverError::Refused("not SERVING".into()));
    }
    Ok(())
}

/// The new relay's side, after it took the sockets: tells the predecessor it serves.
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    pid: Option<u32>,
}

impl Predecessor {
    /// The predecessor's process ID, as the kernel reports it.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Tells the predecessor this relay serves: it stops accepting and drains. Returns the
    /// connection, on which the predecessor then sends its admissions
    /// ([`receive_admissions`]).
    pub fn serving(self) -> std::io::Result<UnixStream> {
        (&self.stream).write_all(SERVING)?;
        Ok(self.stream)
    }
}

/// The old relay's side of the admissions (on its own thread): `snapshot` first, then each
/// admission `queued` until the queue's senders are gone or the successor stops reading.
pub fn send_admissions(
    stream: UnixStream,
    snapshot: Vec<(String, IpAddr, Duration)>,
    queued: std::sync::mpsc::Receiver<(String, IpAddr)>,
) {
    if stream.set_write_timeout(Some(HELLO_TIMEOUT)).is_err() {
        return;
    }
    let mut stream = std::io::BufWriter::new(stream);
    for (label, source, age) in snapshot {
        if stream
            .write_all(admission_line(&label, source, age).as_bytes())
            .is_err()
        {
            return;
        }
    }
    if stream.flush().is_err() {
        return;
    }
    while let Ok((label, source)) = queued.recv() {
        let line = admission_line(&label, source, Duration::ZERO);
        if stream.write_all(line.as_bytes()).is_err() || stream.flush().is_err() {
            return;
        }
    }
}

/// The new relay's side (on its own thread): calls `admit` for each admission line until
/// the predecessor closes (it exits) or sends anything else. Returns how many it took.
pub fn receive_admissions(
    stream: UnixStream,
    mut admit: impl FnMut(&str, IpAddr, Duration),
) -> usize {
    use std::io::BufRead;
    // Blocks until the predecessor exits, which it does once its pairs end (or at its
    // drain timeout).
    if stream.set_read_timeout(None).is_err() {
        return 0;
    }
    let mut reader = std::io::BufReader::new(stream);
    let mut taken = 0;
    let mut line = Vec::with_capacity(MAX_ADMISSION_LINE);
    loop {
        line.clear();
        let limit = (MAX_ADMISSION_LINE + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return taken,
            Ok(_) => {}
        }
        let Some(text) = line
            .strip_suffix(b"\n")
            .and_then(|line| std::str::from_utf8(line).ok())
        else {
            return taken;
        };
        let Some((label, source, age)) = parse_admission(text) else {
            return taken;
        };
        admit(&label, source, age);
        taken += 1;
    }
}

/// Takes the listeners of the relay serving on `<state_dir>/handover.sock`. `Ok(None)` when
/// no socket answers there (nothing to take over).
pub fn take_over(state_dir: &Path) -> Result<Option<(Predecessor, Vec<Inherited>)>, HandoverError> {
    let path = socket_path(state_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(error) => return Err(error.into()),
    };
    let peer = rustix::net::sockopt::socket_peercred(&stream).map_err(std::io::Error::from)?;
    if peer.uid != rustix::process::getuid() {
        return Err(HandoverError::Refused(format!(
            "{} belongs to uid {}",
            path.display(),
            peer.uid.as_raw()
        )));
    }
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    (&stream).write_all(HELLO)?;
    let mut len = [0u8; 4];
    (&stream).read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(invalid("message too long").into());
    }
    let mut body = vec![0u8; len];
    (&stream).read_exact(&mut body)?;
    let entries = parse(&body)?;
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(entries.len());
    while fds.len() < entries.len() {
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let got = rustix::net::recvmsg(
            &stream,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        if got.bytes != 1 {
            return Err(invalid("closed before every descriptor came").into());
        }
        let before = fds.len();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if fds.len() == before || fds.len() > entries.len() {
            return Err(invalid("descriptors missing or too many").into());
        }
    }
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let sockets = entries
        .into_iter()
        .filter_map(|entry| Some((entry.key, fds.get_mut(entry.fd as usize)?.take()?)))
        .collect();
    let pid = u32::try_from(peer.pid.as_raw_nonzero().get()).ok();
    Ok(Some((Predecessor { stream, pid }, sockets)))
}

/// Tells systemd (when it started this process: `NOTIFY_SOCKET`) what happens; a no-op
/// otherwise.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}

/// The binary to run for a successor: this process's executable on disk now (after a
/// package upgrade replaced the file, `/proc/self/exe` reads "PATH (deleted)": the path is
/// what is wanted, the new binary).
pub fn own_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// The arguments of the successor: this process's, plus `--take-over` once.
pub fn successor_args(
    own: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = own.into_iter().collect();
    if !args.iter().any(|arg| arg == "--take-over") {
        args.push("--take-over".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(keys: &[&str]) -> Vec<Entry> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| Entry {
                key: key.to_string(),
                fd: i as u16,
            })
            .collect()
    }

    #[test]
    fn an_admission_line_gives_back_its_label_source_and_age_and_nothing_else_parses() {
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        for (label, source, age) in [
            (
                "home",
                IpAddr::from([127, 0, 0, 1]),
                Duration::from_millis(1234),
            ),
            ("a.b-c_d", v6, Duration::ZERO),
        ] {
            let line = admission_line(label, source, age);
            assert!(line.len() <= MAX_ADMISSION_LINE);
            let parsed = parse_admission(line.strip_suffix('\n').unwrap());
            assert_eq!(parsed, Some((label.to_string(), source, age)));
        }
        for bad in [
            "",
            "ADMIT",
            "ADMIT home",
            "ADMIT home 127.0.0.1",
            "ADMIT home 127.0.0.1 x",
            "ADMIT home 300.0.0.1 5",
            "ADMIT home 127.0.0.1 5 extra",
            "ADMIT  127.0.0.1 5",
            "admit home 127.0.0.1 5",
        ] {
            assert_eq!(parse_admission(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parsing_any_admission_line_never_panics(line in "\\PC{0,300}") {
            let _ = parse_admission(&line);
        }
    }

    #[test]
    fn admissions_go_over_the_socket_snapshot_first_until_the_sender_is_gone() {
        let (old, new) = UnixStream::pair().unwrap();
        let (queue, queued) = std::sync::mpsc::sync_channel(ADMISSIONS_QUEUED);
        let one = IpAddr::from([10, 0, 0, 1]);
        let two = IpAddr::from([10, 0, 0, 2]);
        queue.send(("home".to_string(), two)).unwrap();
        drop(queue);
        let sender = std::thread::spawn(move || {
            send_admissions(
                old,
                vec![("home".into(), one, Duration::from_secs(3))],
                queued,
            )
        });
        let mut got = Vec::new();
        let taken = receive_admissions(new, |label, source, age| {
            got.push((label.to_string(), source, age))
        });
        sender.join().unwrap();
        assert_eq!(taken, 2);
        assert_eq!(
            got,
            [
                ("home".to_string(), one, Duration::from_secs(3)),
                ("home".to_string(), two, Duration::ZERO)
            ]
        );
    }

    #[test]
    fn a_predecessor_saying_anything_else_ends_the_admissions() {
        let (mut old, new) = UnixStream::pair().unwrap();
        old.write_all(b"ADMIT home 10.0.0.1 5\nGARBAGE\nADMIT home 10.0.0.2 5\n")
            .unwrap();
        let long = format!("ADMIT {} 10.0.0.3 5\n", "x".repeat(MAX_ADMISSION_LINE));
        old.write_all(long.as_bytes()).unwrap();
        drop(old);
        let mut got = Vec::new();
        assert_eq!(receive_admissions(new, |_, source, _| got.push(source)), 1);
        assert_eq!(got, [IpAddr::from([10, 0, 0, 1])]);
    }

    #[test]
    fn a_message_of_every_role_survives_encoding() {
        let keys = [
            Key::Frontend("0.0.0.0:443".parse().unwrap()).to_string(),
            Key::Shared("0.0.0.0:9443".parse().unwrap(), 1).to_string(),
            Key::Metrics("127.0.0.1:9090".parse().unwrap()).to_string(),
            Key::Q("[::]:31001".parse().unwrap(), "home".into()).to_string(),
        ];
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let message = encode(&entries(&keys)).unwrap();
        assert_eq!(message[..4], ((message.len() - 4) as u32).to_be_bytes());
        assert_eq!(parse(&message[4..]).unwrap(), entries(&keys));
        assert_eq!(
            parse_q("q [::]:31001 home"),
            Some(("[::]:31001".parse().unwrap(), "home"))
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        assert_eq!(parse(&[]), Err(FormatError::Truncated));
        assert_eq!(parse(&[2, 0, 0]), Err(FormatError::Version(2)));
        assert_eq!(parse(&[1, 0, 0, 9]), Err(FormatError::Trailing));
        assert_eq!(parse(&[1, 0x10, 1]), Err(FormatError::TooMany(4097)));
        assert_eq!(parse(&[1, 0, 1, 0, 0, 0]), Err(FormatError::BadKey(0)));
        let long = "k".repeat(MAX_KEY + 1);
        assert_eq!(encode(&entries(&[&long])), Err(FormatError::BadKey(129)));
        assert_eq!(
            encode(&entries(&["a", "a"])),
            Err(FormatError::Duplicate("a".into()))
        );
        let mut twice = entries(&["a", "b"]);
        twice[1].fd = 0;
        assert_eq!(encode(&twice), Err(FormatError::FdIndex(0)));
        assert_eq!(
            encode(&entries(&["new\nline"])),
            Err(FormatError::BadKey(8))
        );
    }

    #[test]
    fn the_successor_runs_the_binary_on_disk_with_take_over_once() {
        let args = successor_args(["serve".into(), "--listen".into(), "1.2.3.4:5".into()]);
        assert_eq!(args.last().unwrap(), "--take-over");
        assert_eq!(successor_args(args.clone()), args);
        assert!(own_binary().unwrap().exists());
    }

    /// A socket inherited under a key is the one the same key binds (the same kernel
    /// socket: its address), and what nobody claims is closed.
    #[tokio::test]
    async fn an_inherited_socket_is_claimed_by_its_key_and_the_rest_is_closed() {
        let asked: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let old = std::net::TcpListener::bind(asked).unwrap();
        let bound = old.local_addr().unwrap();
        let gone = std::net::TcpListener::bind(asked).unwrap();
        let listeners = Listeners::new();
        listeners.inherit(vec![
            (Key::Frontend(asked).to_string(), OwnedFd::from(old)),
            (
                Key::Q(gone.local_addr().unwrap(), "gone".into()).to_string(),
                OwnedFd::from(gone),
            ),
        ]);
        let (front, _registration) = listeners
            .listener(&Key::Frontend(asked), || unreachable!("inherited"))
            .unwrap();
        assert_eq!(front.local_addr().unwrap(), bound);
        assert_eq!(listeners.held(), 1);
        assert_eq!(listeners.close_unclaimed().len(), 1);
        drop(_registration);
        assert_eq!(listeners.held(), 0, "a closed listener leaves the registry");
    }

    /// The whole exchange over a real handover.sock: the successor gets every listener by
    /// key, the same sockets, and the old side returns once it says it serves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_receives_every_listener_over_the_socket_and_says_when_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let listeners = Listeners::new();
        let mut registrations = Vec::new();
        let mut addrs = BTreeMap::new();
        for i in 0..300 {
            let key = Key::Shared("127.0.0.1:9443".parse().unwrap(), i);
            let (listener, registration) = listeners
                .std_listener(&key, || std::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            addrs.insert(key.to_string(), listener.local_addr().unwrap());
            registrations.push((listener, registration));
        }
        let socket = HandoverSocket::bind(dir.path()).unwrap();
        let mode = std::fs::metadata(socket.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let old = tokio::spawn(socket.successor(listeners.clone(), || {}));
        let state = dir.path().to_path_buf();
        let (predecessor, sockets) = tokio::task::spawn_blocking(move || take_over(&state))
            .await
            .unwrap()
            .unwrap()
            .expect("a relay answers");
        assert_eq!(predecessor.pid(), Some(std::process::id()));
        assert_eq!(sockets.len(), 300, "more than one batch of descriptors");
        for (key, fd) in sockets {
            let listener = std::net::TcpListener::from(fd);
            assert_eq!(
                Some(&listener.local_addr().unwrap()),
                addrs.get(&key),
                "{key}"
            );
        }
        assert!(
            !socket_path(dir.path()).exists(),
            "free for the successor's own"
        );
        predecessor.serving().unwrap();
        tokio::time::timeout(Duration::from_secs(10), old)
            .await
            .expect("the old side sees SERVING")
            .unwrap()
            .unwrap();
        assert!(
            take_over(dir.path()).unwrap().is_none(),
            "nothing left to take"
        );
    }

    proptest! {
        #[test]
        fn any_valid_list_round_trips(keys in proptest::collection::btree_set("[ -~]{1,128}", 0..64)) {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let list = entries(&keys);
            let message = encode(&list).unwrap();
            prop_assert!(message.len() - 4 <= MAX_MESSAGE);
            prop_assert_eq!(parse(&message[4..]).unwrap(), list);
        }

        #[test]
        fn any_bytes_parse_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(list) = parse(&bytes) {
                prop_assert!(list.len() <= MAX_LISTENERS);
                prop_assert!(list.iter().all(|e| key_ok(&e.key) && (e.fd as usize) < list.len()));
                let again = encode(&list).unwrap();
                prop_assert_eq!(&again[4..], &bytes[..]);
            }
        }
    }
}
