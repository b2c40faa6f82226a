//! TAAS's wire contract and its decisions, without I/O: what the relay, the agent and the fuzz
//! targets must agree on, in one place a reader can study alone (PROTOCOL.md is the prose).
//! No tokio, no sockets: every function here takes its inputs, time included, as values.
//!
//! Where each concept lives:
//! - the registrar's requests and answers: [`answer`] (routing `PUT /register/LABEL`, the
//!   several-ports header, every HTTP answer), [`authorization`] (the `TOTP` header);
//! - the `200` body, `HOST:PORT` per rendezvous port p: [`rendezvous`] (written by the relay,
//!   read by the agent);
//! - who may register: [`totp`] (RFC 6238 codes, base32 secrets), [`guard`] (token reuse,
//!   replay and failure limits), [`registration`] (the decision on one registration);
//! - a label's parked connections: [`pool`] (reserved ports, parked connections, waiting
//!   clients, pairing order);
//! - how a label's relay knows a gateway of its install (per-label tokens): [`gateway_auth`];
//! - Host dispatch (registrar, `LABEL.<domain>`, not ours): [`host`];
//! - the server name a TLS client asks for, read from its ClientHello without decrypting (the
//!   shared client port routes by it): [`client_hello`];
//! - what a hidden server is told of its client: [`proxy_header`] (PROXY v1/v2);
//! - what a gateway tells a label relay's edge port of a connection it forwards (a PROXY v2
//!   header with the kind, LABEL and gateway token), and the rendezvous claim bytes: [`edge`];
//! - the agent's registrar URL and redirects: [`target`];
//! - locks that survive a panic: [`sync`].
#![forbid(unsafe_code)]

pub mod answer;
pub mod authorization;
pub mod client_hello;
pub mod edge;
pub mod gateway_auth;
pub mod guard;
pub mod host;
pub mod pool;
pub mod proxy_header;
pub mod registration;
pub mod rendezvous;
pub mod sync;
pub mod target;
pub mod totp;
