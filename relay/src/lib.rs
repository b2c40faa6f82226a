//! TAAS data plane: the registrar, the 307 redirector, the rendezvous relay (parking, pairing,
//! splicing) and the hidden-server agent. The binaries in `src/bin` are thin shells over this.
//!
//! Where each concept lives:
//! - the wire contract and its decisions (no I/O) are the `taas-protocol` crate: the
//!   `Authorization` header, Host dispatch, PROXY headers, TOTP, the guard, the registrar's
//!   answers, the decision on one registration, the parked pool's arithmetic, the `200` body;
//!   `authorization`, `gateway_auth`, `guard`, `host`, `proxy_header` and `totp` are
//!   re-exported here;
//! - `relay`: the standalone label backend (`StandaloneBackend`: every label in one process);
//! - `label`: the per-label state machine (p ports, parked connections, q, pairing) over
//!   `taas_protocol::pool`;
//! - `shared_port`: one client port for every label, routed by the ClientHello's server name;
//!   `direct`: direct labels on the front end's HTTPS port; `client_hello`: the bounded read
//!   of the server name both use; `edge`: a label relay's edge port, where a gateway in
//!   the cluster's edge mode forwards clients and hidden servers raw after an edge header;
//! - `splice`: the copy loop; `ports`: the rendezvous port pool;
//! - `data_plane`: the threads the labels' connections run on;
//! - `rate_limit`: the gateway's per-source token buckets for 307s; `sources`: per-source
//!   connection counts on q;
//! - `frontend`: the HTTPS listener (TLS, HTTP/1.1, dispatch) and the `LabelBackend` it asks:
//!   `relay::StandaloneBackend` (every label here) or `gateway` (forwarded to each label's relay);
//!   `gateway::edge`: the gateway's side of the edge (shared port, rendezvous range, direct
//!   labels forwarded raw), over `gateway::edge_index` (what it looks up, pure);
//! - `run`: the three run modes, `standalone` (`serve`), `pod` (`label-relay`) and
//!   `gateway`, over one shared set-up (certificate pair, front end, metrics, file
//!   followers); logs, signals and the metrics endpoint are the `taas-process` crate;
//!   `handover`: the standalone relay's hot restart (listening sockets passed to a successor
//!   over a Unix socket, `serve --take-over`, SIGHUP);
//! - `label_source`: labels from a directory of manifests; `provision`: `label new`;
//! - `agent`: the hidden-server side, a thin shell (`agent::run`) over a pure supervisor
//!   (`agent::supervisor`); `tls`: server and client TLS set-up; `metrics`, `config`, `demo`;
//! - `console`: the standalone relay's web console (`serve --console`), over `provision` and
//!   the labels directory.
#![forbid(unsafe_code)]

pub mod agent;
pub mod client_hello;
pub mod config;
pub mod console;
pub mod data_plane;
pub mod demo;
pub mod direct;
pub mod edge;
pub mod frontend;
pub mod gateway;
pub mod handover;
pub mod label;
pub mod label_source;
pub mod metrics;
pub mod ports;
pub mod provision;
pub mod rate_limit;
pub mod relay;
pub mod run;
pub mod shared_port;
pub mod sources;
pub mod splice;
pub mod tls;

// Protocol modules the rest of the relay, its tests and the operator name through this crate.
pub use taas_protocol::{authorization, gateway_auth, guard, host, proxy_header, totp};
