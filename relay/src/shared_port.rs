//! The shared client port (`serve --shared-port PORT`): one TCP port for every label, routed
//! by the server name (SNI) of the client's TLS ClientHello, without decrypting anything.
//!
//! Why: each label's own q is a port of its own, and many networks block high ports; one
//! port (with one wildcard DNS record, `*.<domain>`) serves them all. TLS stays end to end:
//! the ClientHello is only read (`client_hello::read_server_name`, bounded by
//! `MAX_CLIENT_HELLO`), then written unchanged to the hidden server, which answers it.
//!
//! ```text
//! accept on every data-plane thread (`SO_REUSEPORT`) ──(hello-phase cap, source cap)──▶
//!   read the ClientHello there (first byte within the first-byte timeout, all of it within
//!   the handshake timeout) ──▶ LABEL.<domain> ──▶ the label's data-plane thread (in place
//!   when it accepted it, handed over otherwise): the same `serve_client` as q (admission,
//!   per-label source cap, pairing, waiting, PROXY header, idle timeout, metrics with
//!   entry="shared_port")
//! ```
//!
//! A refusal (unknown or missing name, a name outside the domain, not a ClientHello, too
//! large, a deadline, the caps, a label whose server speaks first) is counted in
//! `taas_shared_port_refused{reason}` and the connection is closed without a byte sent back:
//! answering with a TLS alert would need a record the client may not even parse (a port scan,
//! plain HTTP), and a silent close is what an unknown name gets from other SNI routers.
//! Labels whose server speaks first cannot be reached here (the client must speak first to
//! name its label): their clients use the label's own q, which every label keeps.
//!
//! Connections still reading their ClientHello are bounded relay-wide (`frontend_connections`
//! of them at once, the front end's cap for its TLS handshakes) and per source (they count in
//! the relay-wide `clients_per_source`, from accept to close, like q's).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client_hello::{read_server_name, Deadlines, HelloFailure};
use crate::handover::{Key, Listeners, Registration};
use crate::label::{ClientConn, Entry};
use crate::metrics::SharedPortRefused;
use crate::relay::StandaloneBackend;
use crate::sources::SourceKey;

/// Room for a ClientHello before its first read. An empty `Vec` is read into 64 bytes at a
/// time (tokio's `read_buf` grows it by its own capacity), so a hello took several `read`
/// system calls; browsers' hellos are 0.5–2 KiB (with a post-quantum key share), which this
/// reads in one. A larger one grows the buffer as before, up to `MAX_CLIENT_HELLO`.
pub(crate) const HELLO_BUFFER: usize = 2048;

/// The label a server name asks for: `LABEL.<domain>`, the domain compared
/// case-insensitively; LABEL may itself have dots (`a.b`), as in the 307's Host dispatch
/// (`taas_protocol::host`), so that every label a 307 can name is reachable here. `None` for
/// any other name.
pub fn label_for<'a>(server_name: &'a str, domain: &str) -> Option<&'a str> {
    let server_name = server_name.strip_suffix('.').unwrap_or(server_name);
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let cut = server_name.len().checked_sub(domain.len() + 1)?;
    if !server_name.is_char_boundary(cut) {
        return None;
    }
    let (label, rest) = server_name.split_at(cut);
    let suffix = rest.strip_prefix('.')?;
    (suffix.eq_ignore_ascii_case(domain) && !label.is_empty() && !label.ends_with('.'))
        .then_some(label)
}

/// Binds the shared port once per data-plane thread (`threads` sockets on one port, `addr`'s
/// or, when it is 0, one the system picks), each with `SO_REUSEPORT`: the kernel spreads new
/// connections over them, and each thread accepts its own share.
///
/// A port already taken fails as before, even by another relay's `SO_REUSEPORT` sockets
/// (which would otherwise share it silently): a plain bind is tried first.
pub fn bind(
    addr: SocketAddr,
    threads: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    if addr.port() != 0 {
        drop(bind_one(addr, false)?);
    }
    let first = bind_one(addr, true)?;
    let local = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads.max(1) {
        listeners.push(bind_one(local, true)?);
    }
    Ok((listeners, local))
}

/// [`bind`] through the hand-over registry: the sockets a predecessor bound for `addr`
/// (`shared ADDR #i`) are taken over, and more bound beside them with `SO_REUSEPORT` when
/// this relay has more data-plane threads.
pub fn bind_registered(
    listeners: &Arc<Listeners>,
    addr: SocketAddr,
    threads: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr, Vec<Registration>)> {
    let (first, registration) = listeners.std_listener(&Key::Shared(addr, 0), || {
        bind(addr, 1).map(|(mut one, _)| one.remove(0))
    })?;
    let local = first.local_addr()?;
    let (mut sockets, mut registrations) = (vec![first], vec![registration]);
    for i in 1..threads.max(1) {
        let (socket, registration) =
            listeners.std_listener(&Key::Shared(addr, i), || bind_one(local, true))?;
        sockets.push(socket);
        registrations.push(registration);
    }
    Ok((sockets, local, registrations))
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves the shared client port until the task is dropped: one accept loop per data-plane
/// thread (`listeners` from [`bind`], one each), so that a connection for a label living on
/// the thread that accepted it is read and served there, like a connection on the label's own
/// q (measured: the hand-over from the front end's runtime to the label's thread cost about
/// 15 % of q's connections per second, `bench/results/`); only the others cross threads.
pub async fn serve(listeners: Vec<std::net::TcpListener>, relay: Arc<StandaloneBackend>) {
    let hello_phase = Arc::new(Semaphore::new(
        relay
            .settings()
            .limits
            .frontend_connections
            .min(Semaphore::MAX_PERMITS),
    ));
    let mut listeners = listeners.into_iter();
    // Weak: the loops live on the data plane, which the relay owns.
    let weak = Arc::downgrade(&relay);
    let loops = relay.data_plane().spawn_on_each(|_| {
        let listener = listeners.next();
        let (relay, hello_phase) = (weak.clone(), hello_phase.clone());
        async move {
            if let Some(listener) = listener {
                accept_loop(listener, relay, hello_phase).await
            }
        }
    });
    drop(relay);
    struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.iter().for_each(tokio::task::JoinHandle::abort);
        }
    }
    let _loops = AbortOnDrop(loops);
    std::future::pending::<()>().await
}

/// Accepts on one data-plane thread; each connection is routed by a task on that thread.
async fn accept_loop(
    listener: std::net::TcpListener,
    relay: Weak<StandaloneBackend>,
    hello_phase: Arc<Semaphore>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            // Its socket closes: the kernel gives its share to the other threads' sockets.
            tracing::warn!(%error, "shared port: a thread's listener could not be registered");
            return;
        }
    };
    // Inherited by every accepted connection (no Nagle, keepalive), as on q.
    crate::splice::tune_listener(&listener);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(relay) = relay.upgrade() else { return };
                let Ok(permit) = hello_phase.clone().try_acquire_owned() else {
                    relay
                        .metrics()
                        .shared_port_refused(SharedPortRefused::Overloaded);
                    tracing::debug!(%peer, "shared port: too many connections reading their ClientHello; closed");
                    continue;
                };
                tokio::spawn(route(relay, stream, peer, permit));
            }
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                tracing::warn!(%error, "shared port accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one connection's ClientHello and hands the connection to its label, or refuses it.
async fn route(
    relay: Arc<StandaloneBackend>,
    mut stream: TcpStream,
    peer: SocketAddr,
    hello_phase: OwnedSemaphorePermit,
) {
    let refuse = |reason: SharedPortRefused| {
        relay.metrics().shared_port_refused(reason);
        tracing::debug!(%peer, ?reason, "shared port: connection refused");
    };
    let settings = relay.settings();
    let Some(relay_slot) = relay
        .client_sources()
        .try_acquire_owned(SourceKey::of(peer.ip()), settings.limits.clients_per_source)
    else {
        return refuse(SharedPortRefused::SourceLimit);
    };
    let accepted_at = Instant::now();
    let deadlines = Deadlines {
        first_byte: accepted_at + settings.timeouts.first_byte,
        complete: accepted_at + settings.timeouts.handshake,
    };
    let mut hello = Vec::with_capacity(HELLO_BUFFER);
    let name = match read_server_name(&mut stream, &mut hello, deadlines).await {
        Ok(name) => name,
        Err(failure) => return refuse(failure.into()),
    };
    drop(hello_phase);
    let Some(label_name) = label_for(&name, &settings.domain) else {
        return refuse(SharedPortRefused::OutsideDomain);
    };
    let Some(label) = relay.label(&label_name.to_ascii_lowercase()) else {
        return refuse(SharedPortRefused::UnknownName);
    };
    if label.config().server_speaks_first {
        return refuse(SharedPortRefused::ServerSpeaksFirst);
    }
    drop(relay);
    label
        .serve_accepted(ClientConn {
            stream,
            peer,
            entry: Entry::SharedPort,
            read_ahead: hello,
            relay_slot: Some(relay_slot),
        })
        .await;
}

impl From<HelloFailure> for SharedPortRefused {
    fn from(failure: HelloFailure) -> Self {
        match failure {
            HelloFailure::Silent => Self::Silent,
            HelloFailure::Deadline => Self::Deadline,
            HelloFailure::Closed => Self::Closed,
            HelloFailure::ReadError => Self::ReadError,
            HelloFailure::TooLarge => Self::TooLarge,
            HelloFailure::NoServerName => Self::NoServerName,
            HelloFailure::NotClientHello => Self::NotClientHello,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_is_the_one_name_under_the_domain_in_any_case() {
        let domain = "taas.localhost";
        assert_eq!(label_for("home.taas.localhost", domain), Some("home"));
        assert_eq!(label_for("Home.TAAS.localhost", domain), Some("Home"));
        assert_eq!(label_for("home.taas.localhost.", domain), Some("home"));
        assert_eq!(
            label_for("home.taas.localhost", "TAAS.localhost."),
            Some("home")
        );
        assert_eq!(
            label_for("xn--bcher-kva.taas.localhost", domain),
            Some("xn--bcher-kva")
        );
        // Dotted labels, as the 307's Host dispatch has them.
        assert_eq!(label_for("a.b.taas.localhost", domain), Some("a.b"));
    }

    #[test]
    fn other_names_map_to_no_label() {
        let domain = "taas.localhost";
        for name in [
            "taas.localhost",
            ".taas.localhost",
            "a..taas.localhost",
            "hometaas.localhost",
            "home.taas.localhost.evil",
            "home.other.localhost",
            "home.aas.localhost",
            "",
            "localhost",
            "é.taas.localhost.x",
        ] {
            assert_eq!(label_for(name, domain), None, "{name:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the name, a label found is not empty, and the name is that label under
        /// the domain.
        #[test]
        fn a_label_found_always_rebuilds_the_name(name in ".{0,40}", label in "[a-z0-9-]{1,20}") {
            let domain = "taas.localhost";
            if let Some(found) = label_for(&name, domain) {
                proptest::prop_assert!(!found.is_empty() && !found.ends_with('.'));
                let rebuilt = format!("{found}.{domain}");
                proptest::prop_assert!(name.trim_end_matches('.').eq_ignore_ascii_case(&rebuilt));
            }
            let name = format!("{label}.{domain}");
            proptest::prop_assert_eq!(label_for(&name, domain), Some(label.as_str()));
        }
    }
}
