//! TAAS data plane: the registrar, the 307 redirector, the rendezvous relay (parking, pairing,
//! splicing) and the hidden-server agent. The binaries in `src/bin` are thin shells over this.
//!
//! Where each concept lives:
//! - wire formats: `authorization` (the `TOTP` header), `host` (Host dispatch),
//!   `proxy_header` (PROXY v1/v2);
//! - `totp`: RFC 6238 codes; `guard`: token reuse, replay and failure rate limits;
//! - `registrar`: the decision on one registration request (pure);
//! - `label`: the per-label state machine (p ports, parked connections, q, pairing);
//! - `splice`: the copy loop; `ports`: the rendezvous port pool;
//! - `data_plane`: the threads the labels' connections run on;
//! - `rate_limit`: the gateway's per-source token buckets for 307s; `sources`: per-source
//!   connection counts on q;
//! - `gateway_auth`: how a label's relay knows a gateway of its install (per-label tokens);
//! - `frontend`: the HTTPS listener (TLS, HTTP/1.1, dispatch) and the `LabelBackend` it asks:
//!   `relay::Relay` (every label here) or `gateway` (forwarded to each label's relay);
//! - `run`: the three run modes, `standalone` (`serve`), `pod` (`label-relay`) and
//!   `gateway`, over one shared set-up (certificate pair, front end, metrics, file
//!   followers); logs, signals and the metrics endpoint are the `taas-process` crate;
//! - `label_source`: labels from a directory of manifests; `provision`: `label new`;
//! - `agent`: the hidden-server side; `tls`, `metrics`, `config`, `demo`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod authorization;
pub mod config;
pub mod data_plane;
pub mod demo;
pub mod frontend;
pub mod gateway;
pub mod gateway_auth;
pub mod guard;
pub mod host;
pub mod label;
pub mod label_source;
pub mod metrics;
pub mod ports;
pub mod provision;
pub mod proxy_header;
pub mod rate_limit;
pub mod registrar;
pub mod relay;
pub mod run;
pub mod sources;
pub mod splice;
pub mod tls;
pub mod totp;
