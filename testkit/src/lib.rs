//! What the TAAS tests share, split by topic: the relay under test ([`relay::TestRelay`]
//! in-process, [`spawned::SpawnedRelay`] as a process), the gateway as the edge
//! ([`gateway::EdgeGateway`]), the agent under test ([`agent`]),
//! labels ([`label`]), the wire as tests speak it ([`http`], [`tls`]), echo traffic
//! ([`echo`]), bounded waits ([`wait`]), port blocks that keep concurrent tests apart
//! ([`ports`]), logs and panics ([`logs`]), `/proc` and metrics readings ([`readings`]),
//! seeded property runs ([`property`]), the churn soak ([`soak`]), and the opt-in test tiers
//! ([`tiers`]).
//!
//! A crate rather than files pulled in with `#[path]`: each test binary used to compile its
//! own copy, with `dead_code` allowed everywhere. `use taas_testkit::prelude::*;` gives a test
//! the everyday names (`TestRelay`, `TestLabel`, `eventually`…); the rest is named by module
//! (`logs::debug_logs()`, `property::check(…)`).
#![forbid(unsafe_code)]

pub mod agent;
pub mod echo;
pub mod gateway;
pub mod http;
pub mod label;
pub mod logs;
pub mod net;
pub mod ports;
pub mod property;
pub mod readings;
pub mod relay;
pub mod soak;
pub mod spawned;
pub mod tiers;
pub mod tls;
pub mod wait;

use std::sync::Arc;

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// The names nearly every test uses.
pub mod prelude {
    pub use crate::agent::agent_config;
    pub use crate::arc;
    pub use crate::echo::echo_server;
    pub use crate::http::{curl, read_response, steward_request, Response};
    pub use crate::label::{mount_label, unix_now, write_label, TestLabel};
    pub use crate::logs::init_logs;
    pub use crate::net::connect_from;
    pub use crate::ports::port_block;
    pub use crate::readings::{metric, paired};
    pub use crate::relay::{label_relay_options, Session, TestRelay, DOMAIN, REGISTRAR};
    pub use crate::tls::{
        assert_client_hello_passes_unchanged, assert_relayed_both_ways, client_hello,
        hello_over_tls, hidden_tls_server, tls_acceptor, tls_connect, tls_connect_from,
        tls_connect_trusting, TlsPage,
    };
    pub use crate::wait::{assert_closed, echo_roundtrip, eventually, read_to_end, PATIENCE};
}
