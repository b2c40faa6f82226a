//! The hidden-server side (`taas-agent`): keep N connections registered and parked at the
//! relay; forward each one that gets paired to a local service.
//!
//! Life of one slot: `PUT /register/LABEL` (TOTP) on a kept-alive TLS connection → `200`
//! with `HOST:PORT` → TCP connection to that p, parked → first bytes arrive (a mobile client
//! was paired onto it) → its replacement is registered (with the others missing, in one
//! request: the relay's several-ports extension; within `REFILL_DELAY` while at least half the
//! pool is parked, at once below half), and this connection is spliced with a fresh
//! connection to `--forward`. A parked connection the relay closes is replaced the same way.
//!
//! Where each part lives:
//! - `config`: the configuration, the secret and label files, why the agent cannot start;
//! - `supervisor`: every decision (how many ports to ask for and when, the backoff, what to
//!   tell the operator) as a pure state machine, events in, next step and notices out;
//! - `run`: [`Agent`], the async shell that performs the supervisor's decisions;
//! - `registrar_client` (the HTTPS client of the relay's registrar), `target` (URLs,
//!   redirects; in `taas_protocol`, as is the 200 body, `taas_protocol::rendezvous`), `parked` (one rendezvous and its pair);
//! - `backoff`, `explain` (every piece of advice: failure → words), `metrics`.
//!
//! The client TLS configuration ([`Trust`], [`client_tls_config`]) lives beside the server's
//! in `crate::tls`.

pub mod backoff;
pub mod config;
pub mod explain;
pub mod metrics;
pub mod parked;
pub mod registrar_client;
pub mod run;
pub mod supervisor;
// Pure parsers in the protocol crate: the registrar URL and redirects.
pub use taas_protocol::target;

pub use crate::tls::{client_tls_config, ClientTlsError, Trust};
pub use config::{
    decode_secret, read_label_file, read_secret_file, AgentConfig, AgentError, DEFAULT_MAX_BACKOFF,
    DEFAULT_PARKED, DEFAULT_SHUTDOWN_GRACE,
};
pub use run::{run, Agent};
pub use supervisor::AgentStatus;
