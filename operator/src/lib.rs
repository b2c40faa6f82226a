//! The TAAS operator: reconciles each `TaasLabel` into the objects that run its relay (a
//! ConfigMap, two Services and a Deployment, all owned by the label), reports the label's
//! external address in its status, and publishes the gateways' routes.
//!
//! One reconcile is dereference → validate → build → apply → status (and, for a label with
//! several relay replicas, a PodDisruptionBudget in the version the cluster serves:
//! [`budget`]):
//! - [`reconcile`] reads what the label refers to (Secret, same-named objects, nodes), applies
//!   the objects and writes the status: the only module that talks to the API server for a
//!   label;
//! - [`validate`] and [`build`] are pure: problems that need a user's fix (including what the
//!   cluster owner's [`policy`] refuses), and the desired objects;
//! - [`address`] and [`status`] are pure: the external address from the applied Service, and
//!   the status from what was applied.
//!
//! [`edge`] (pure) is the cluster edge: each label's slice of the gateway's shared
//! rendezvous ports, and its address when it is reached through the gateway's Service.
//!
//! [`routes`] keeps the gateways' routes ConfigMap in step with all labels, [`metrics`]
//! serves `/metrics`, `/healthz` and `/readyz`, [`rbac`] lists every API call the operator
//! makes, [`controller`] wires the watches together, and [`leader`] elects one active replica
//! when asked to (`--leader-elect`).
#![forbid(unsafe_code)]

pub mod address;
pub mod budget;
pub mod build;
pub mod controller;
pub mod edge;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod rbac;
pub mod reconcile;
pub mod routes;
pub mod settings;
pub mod status;
pub mod validate;

pub use reconcile::{Context, Error};
pub use settings::Settings;
