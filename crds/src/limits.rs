//! The bounds of a `TaasLabel` spec, in one place: the schema attributes in [`crate`] and
//! [`TaasLabelSpec::validate`](crate::TaasLabelSpec::validate) both read them, so the API
//! server, the operator and the standalone relay accept the same values.
//!
//! Ranges are inclusive. Lengths are in bytes for the id and for the ASCII-only names (LABEL,
//! Secret name and key, where bytes are the characters the schema's `maxLength` counts), in
//! characters for the free-form `loadBalancerClass`.

/// `spec.period`, the TOTP step in seconds: at least a second, at most five minutes (a
/// longer step would keep one code valid for too long).
pub const PERIOD_MIN: u32 = 1;
pub const PERIOD_MAX: u32 = 300;

/// `spec.maxParked`: parked connections one label may hold at once.
pub const MAX_PARKED_MIN: u32 = 1;
pub const MAX_PARKED_MAX: u32 = 1024;

/// `spec.rendezvousPorts`: the fixed pool of rendezvous ports p of a label's relay pod and
/// Service in a cluster.
pub const RENDEZVOUS_PORTS_MIN: u32 = 1;
pub const RENDEZVOUS_PORTS_MAX: u32 = 64;

/// `spec.replicas`: relay pods for one label in a cluster. Sixteen is plenty for a label
/// (each replica holds a share of the hidden server's parked connections) and keeps one
/// label from filling a cluster.
pub const REPLICAS_MIN: u32 = 1;
pub const REPLICAS_MAX: u32 = 16;

/// `spec.clientPort`, a pinned client port q (port 0 would mean "any").
pub const CLIENT_PORT_MIN: u16 = 1;
pub const CLIENT_PORT_MAX: u16 = 65535;

/// `spec.id`: the hidden server's ID travels in an HTTP header; at most this many bytes.
pub const ID_MAX_LEN: usize = 256;

/// A DNS subdomain name (LABEL, a Secret's name): at most this many bytes in all...
pub const DNS_SUBDOMAIN_MAX_LEN: usize = 253;
/// ... and this many in each dot-separated part (RFC 1123).
pub const DNS_PART_MAX_LEN: usize = 63;

/// `spec.secretRef.key`, a key of a Secret's `data`.
pub const SECRET_KEY_MAX_LEN: usize = 253;

/// `spec.service.loadBalancerClass`.
pub const LOAD_BALANCER_CLASS_MAX_LEN: usize = 253;
