//! The rules of a `TaasLabel` spec as code, for those who read a spec without an API server:
//! the standalone relay (label files), `taas-relay label new`, and the operator (whose API
//! server may be too old for the CEL rules). The schema attributes on [`TaasLabelSpec`] say
//! the same with the same [`limits`](crate::limits); `crds/tests/rules.rs` checks that the
//! generated schema and CEL rules and [`TaasLabelSpec::validate`] agree case by case.
//!
//! Not here: what only the types say (enum values, required fields: serde refuses those), and
//! the CEL transition rules (`id` and `label` are immutable), which need the old object.
//!
//! One rule is here and not in the CRD: a `direct` label cannot have its server speak first
//! ([`SpecError::DirectServerSpeaksFirst`]); the CRD keeps its four CEL rules, so an API
//! server accepts that spec, and the operator and the relay refuse it.
//!
//! Two differences the schema cannot avoid, both about non-ASCII ids, which pass a real API
//! server and are refused here, as the relay always refused them: `maxLength` counts
//! characters where the id rule counts bytes (an id of at most 256 characters but more than
//! 256 bytes), and Kubernetes' regular expressions (Go's) read `\s` in the id pattern as ASCII
//! whitespace only (an id with a no-break space). The test's JSON-schema validator reads `\s`
//! as ECMAScript does, like this code.

use crate::limits::{
    CLIENT_PORT_MAX, CLIENT_PORT_MIN, DNS_PART_MAX_LEN, DNS_SUBDOMAIN_MAX_LEN, ID_MAX_LEN,
    LOAD_BALANCER_CLASS_MAX_LEN, MAX_PARKED_MAX, MAX_PARKED_MIN, PERIOD_MAX, PERIOD_MIN,
    RENDEZVOUS_PORTS_MAX, RENDEZVOUS_PORTS_MIN, REPLICAS_MAX, REPLICAS_MIN, SECRET_KEY_MAX_LEN,
};
use crate::{ProxyProtocol, ServiceType, TaasLabelSpec};

/// Why a name is not a DNS subdomain name in lower case (RFC 1123), the syntax of LABEL and
/// of Kubernetes object names: [`DNS_SUBDOMAIN_PATTERN`](crate::DNS_SUBDOMAIN_PATTERN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsNameError {
    #[error("it must be 1 to {} characters long", DNS_SUBDOMAIN_MAX_LEN)]
    Length,
    #[error(
        "each dot-separated part must be 1 to {} characters long",
        DNS_PART_MAX_LEN
    )]
    PartLength,
    #[error("only a-z, 0-9, '-' and '.' are allowed")]
    Character,
    #[error("a part may not start or end with '-'")]
    Hyphen,
}

/// Checks `name` against the DNS subdomain rule: 1–253 bytes, dot-separated parts of 1–63 of
/// `[a-z0-9-]`, none starting or ending with `-`. Upper case is refused (the relay, which
/// reads LABEL case-insensitively, lower-cases it first).
pub fn check_dns_subdomain(name: &str) -> Result<(), DnsNameError> {
    if name.is_empty() || name.len() > DNS_SUBDOMAIN_MAX_LEN {
        return Err(DnsNameError::Length);
    }
    for part in name.split('.') {
        if part.is_empty() || part.len() > DNS_PART_MAX_LEN {
            return Err(DnsNameError::PartLength);
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(DnsNameError::Character);
        }
        if part.starts_with('-') || part.ends_with('-') {
            return Err(DnsNameError::Hyphen);
        }
    }
    Ok(())
}

/// Whether `name` is a DNS subdomain name in lower case ([`check_dns_subdomain`]).
pub fn is_dns_subdomain(name: &str) -> bool {
    check_dns_subdomain(name).is_ok()
}

/// One problem of a spec. Each names its field ([`SpecError::field`]) and says what is
/// allowed; none quotes a secret (a spec holds none).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("id must be 1 to {} bytes long", ID_MAX_LEN)]
    IdLength,
    #[error(
        "id {:?} may not contain whitespace or control characters",
        .0.escape_debug().to_string()
    )]
    IdCharacter(String),
    #[error("label {label:?} is not a valid DNS name: {reason}")]
    Label { label: String, reason: DnsNameError },
    #[error("secretRef.name {name:?} is not a valid Secret name: {reason}")]
    SecretName { name: String, reason: DnsNameError },
    #[error(
        "secretRef.key {:?} must be 1 to {} characters of a-z, A-Z, 0-9, '-', '_' and '.'",
        .0, SECRET_KEY_MAX_LEN
    )]
    SecretKey(String),
    #[error("period {} must be {} to {} seconds", .0, PERIOD_MIN, PERIOD_MAX)]
    Period(u32),
    #[error("maxParked {} must be {} to {}", .0, MAX_PARKED_MIN, MAX_PARKED_MAX)]
    MaxParked(u32),
    #[error("clientPort {} must be {} to {}", .0, CLIENT_PORT_MIN, CLIENT_PORT_MAX)]
    ClientPort(u16),
    #[error(
        "rendezvousPorts {} must be {} to {}",
        .0, RENDEZVOUS_PORTS_MIN, RENDEZVOUS_PORTS_MAX
    )]
    RendezvousPorts(u32),
    #[error("replicas {} must be {} to {}", .0, REPLICAS_MIN, REPLICAS_MAX)]
    Replicas(u32),
    /// The TAAS agent learns that a parked connection was paired from its first bytes: for a
    /// protocol where the server speaks first, only the PROXY header can tell it.
    #[error("{}", SERVER_SPEAKS_FIRST_MESSAGE)]
    ServerSpeaksFirstWithoutProxyHeader,
    /// A direct label is found by the server name of the client's ClientHello: the client
    /// must speak first.
    #[error("{}", DIRECT_SERVER_SPEAKS_FIRST_MESSAGE)]
    DirectServerSpeaksFirst,
    #[error(
        "service.loadBalancerClass must be 1 to {} characters long",
        LOAD_BALANCER_CLASS_MAX_LEN
    )]
    LoadBalancerClassLength,
    #[error("{}", LOAD_BALANCER_CLASS_MESSAGE)]
    LoadBalancerClassWithoutLoadBalancer,
}

/// The CEL rule's message, and [`SpecError::ServerSpeaksFirstWithoutProxyHeader`]'s.
pub const SERVER_SPEAKS_FIRST_MESSAGE: &str = "serverSpeaksFirst needs proxyProtocol v1 or v2";
/// [`SpecError::DirectServerSpeaksFirst`]'s message. Checked here only, not as a CEL rule:
/// the CRD keeps its four rules (`crds/tests/crd.rs` counts them), so an API server accepts
/// such a spec and the relay refuses the label when it reads it.
pub const DIRECT_SERVER_SPEAKS_FIRST_MESSAGE: &str =
    "direct cannot be combined with serverSpeaksFirst: a direct label is named by the client's first bytes";
/// The CEL rule's message, and [`SpecError::LoadBalancerClassWithoutLoadBalancer`]'s.
pub const LOAD_BALANCER_CLASS_MESSAGE: &str =
    "loadBalancerClass may only be set when type is LoadBalancer";

impl SpecError {
    /// The field at fault, as a path below `spec` in the API's spelling (`secretRef.name`):
    /// where the API server's schema or CEL rule would report it.
    pub fn field(&self) -> &'static str {
        match self {
            Self::IdLength | Self::IdCharacter(_) => "id",
            Self::Label { .. } => "label",
            Self::SecretName { .. } => "secretRef.name",
            Self::SecretKey(_) => "secretRef.key",
            Self::Period(_) => "period",
            Self::MaxParked(_) => "maxParked",
            Self::ClientPort(_) => "clientPort",
            Self::RendezvousPorts(_) => "rendezvousPorts",
            Self::Replicas(_) => "replicas",
            Self::ServerSpeaksFirstWithoutProxyHeader => "proxyProtocol",
            Self::DirectServerSpeaksFirst => "direct",
            Self::LoadBalancerClassLength | Self::LoadBalancerClassWithoutLoadBalancer => {
                "service.loadBalancerClass"
            }
        }
    }
}

/// Every problem of a spec ([`TaasLabelSpec::validate`]), in field order; never empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", join(.0))]
pub struct SpecErrors(pub Vec<SpecError>);

fn join(errors: &[SpecError]) -> String {
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    messages.join("; ")
}

/// The id rule: 1–256 bytes, no whitespace or control characters (it travels in an HTTP
/// header and is compared exactly).
pub fn check_id(id: &str) -> Result<(), SpecError> {
    if id.is_empty() || id.len() > ID_MAX_LEN {
        return Err(SpecError::IdLength);
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SpecError::IdCharacter(id.to_string()));
    }
    Ok(())
}

fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= SECRET_KEY_MAX_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl TaasLabelSpec {
    /// Every problem of this spec, by the rules the CRD's schema and CEL rules state (except
    /// the transition rules), plus `direct` without `serverSpeaksFirst` (no CEL rule): `Ok`
    /// exactly when a Kubernetes API server would accept it and it is not such a direct label.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut errors = Vec::new();
        errors.extend(check_id(&self.id).err());
        if let Err(reason) = check_dns_subdomain(&self.label) {
            errors.push(SpecError::Label {
                label: self.label.clone(),
                reason,
            });
        }
        if let Err(reason) = check_dns_subdomain(&self.secret_ref.name) {
            errors.push(SpecError::SecretName {
                name: self.secret_ref.name.clone(),
                reason,
            });
        }
        if !is_secret_key(&self.secret_ref.key) {
            errors.push(SpecError::SecretKey(self.secret_ref.key.clone()));
        }
        if !(PERIOD_MIN..=PERIOD_MAX).contains(&self.period) {
            errors.push(SpecError::Period(self.period));
        }
        if !(MAX_PARKED_MIN..=MAX_PARKED_MAX).contains(&self.max_parked) {
            errors.push(SpecError::MaxParked(self.max_parked));
        }
        if let Some(port) = self.client_port.filter(|p| *p < CLIENT_PORT_MIN) {
            errors.push(SpecError::ClientPort(port));
        }
        if self.server_speaks_first && self.proxy_protocol == ProxyProtocol::None {
            errors.push(SpecError::ServerSpeaksFirstWithoutProxyHeader);
        }
        if self.direct && self.server_speaks_first {
            errors.push(SpecError::DirectServerSpeaksFirst);
        }
        if let Some(class) = &self.service.load_balancer_class {
            if class.is_empty() || class.chars().count() > LOAD_BALANCER_CLASS_MAX_LEN {
                errors.push(SpecError::LoadBalancerClassLength);
            }
            if self.service.type_ != Some(ServiceType::LoadBalancer) {
                errors.push(SpecError::LoadBalancerClassWithoutLoadBalancer);
            }
        }
        if !(RENDEZVOUS_PORTS_MIN..=RENDEZVOUS_PORTS_MAX).contains(&self.rendezvous_ports) {
            errors.push(SpecError::RendezvousPorts(self.rendezvous_ports));
        }
        if let Some(replicas) = self
            .replicas
            .filter(|n| !(REPLICAS_MIN..=REPLICAS_MAX).contains(n))
        {
            errors.push(SpecError::Replicas(replicas));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Algorithm, ClientAdmission, LabelService, SecretKeyRef};

    fn spec() -> TaasLabelSpec {
        TaasLabelSpec {
            id: "id-1".into(),
            label: "home".into(),
            secret_ref: SecretKeyRef {
                name: "home-totp".into(),
                key: "secret".into(),
            },
            algorithm: Algorithm::SHA1,
            period: 30,
            max_parked: 32,
            source_pinning: true,
            proxy_protocol: ProxyProtocol::None,
            client_port: None,
            client_admission: ClientAdmission::Open,
            server_speaks_first: false,
            direct: false,
            service: LabelService::default(),
            rendezvous_ports: 8,
            replicas: None,
        }
    }

    fn errors(change: impl FnOnce(&mut TaasLabelSpec)) -> Vec<SpecError> {
        let mut s = spec();
        change(&mut s);
        s.validate().err().map(|e| e.0).unwrap_or_default()
    }

    #[test]
    fn a_good_spec_and_every_bound_are_accepted() {
        assert_eq!(spec().validate(), Ok(()));
        for (period, max_parked, ports, client) in [
            (
                PERIOD_MIN,
                MAX_PARKED_MIN,
                RENDEZVOUS_PORTS_MIN,
                CLIENT_PORT_MIN,
            ),
            (
                PERIOD_MAX,
                MAX_PARKED_MAX,
                RENDEZVOUS_PORTS_MAX,
                CLIENT_PORT_MAX,
            ),
        ] {
            assert_eq!(
                errors(|s| {
                    s.period = period;
                    s.max_parked = max_parked;
                    s.rendezvous_ports = ports;
                    s.client_port = Some(client);
                }),
                vec![]
            );
        }
    }

    #[test]
    fn replicas_are_one_to_sixteen_or_unset() {
        for ok in [None, Some(REPLICAS_MIN), Some(2), Some(REPLICAS_MAX)] {
            assert_eq!(errors(|s| s.replicas = ok), vec![], "{ok:?}");
        }
        for bad in [0, REPLICAS_MAX + 1, u32::MAX] {
            let found = errors(|s| s.replicas = Some(bad));
            assert_eq!(found, vec![SpecError::Replicas(bad)]);
            assert_eq!(found[0].field(), "replicas");
        }
    }

    #[test]
    fn a_direct_label_is_valid_unless_its_server_speaks_first() {
        assert_eq!(errors(|s| s.direct = true), vec![]);
        let both = errors(|s| {
            s.direct = true;
            s.server_speaks_first = true;
            s.proxy_protocol = ProxyProtocol::V2;
        });
        assert_eq!(both, vec![SpecError::DirectServerSpeaksFirst]);
        assert_eq!(both[0].field(), "direct");
        assert!(both[0].to_string().contains("serverSpeaksFirst"));
    }

    #[test]
    fn every_problem_is_listed_with_its_field_and_the_allowed_range() {
        let all = errors(|s| {
            s.id = String::new();
            s.label = "Home".into();
            s.secret_ref.name = "a_b".into();
            s.secret_ref.key = "a b".into();
            s.period = PERIOD_MAX + 1;
            s.max_parked = 0;
            s.client_port = Some(0);
            s.server_speaks_first = true;
            s.service.type_ = Some(ServiceType::NodePort);
            s.service.load_balancer_class = Some(String::new());
            s.rendezvous_ports = RENDEZVOUS_PORTS_MAX + 1;
            s.replicas = Some(0);
        });
        let fields: Vec<_> = all.iter().map(SpecError::field).collect();
        assert_eq!(
            fields,
            [
                "id",
                "label",
                "secretRef.name",
                "secretRef.key",
                "period",
                "maxParked",
                "clientPort",
                "proxyProtocol",
                "service.loadBalancerClass",
                "service.loadBalancerClass",
                "rendezvousPorts",
                "replicas",
            ]
        );
        let text = SpecErrors(all).to_string();
        for expected in [
            "id must be 1 to 256 bytes long",
            "label \"Home\" is not a valid DNS name: only a-z, 0-9, '-' and '.' are allowed",
            "secretRef.name \"a_b\" is not a valid Secret name",
            "secretRef.key \"a b\" must be 1 to 253 characters",
            "period 301 must be 1 to 300 seconds",
            "maxParked 0 must be 1 to 1024",
            "clientPort 0 must be 1 to 65535",
            "serverSpeaksFirst needs proxyProtocol v1 or v2",
            "service.loadBalancerClass must be 1 to 253 characters long",
            "loadBalancerClass may only be set when type is LoadBalancer",
            "rendezvousPorts 65 must be 1 to 64",
            "replicas 0 must be 1 to 16",
        ] {
            assert!(text.contains(expected), "{expected:?} in {text}");
        }
        assert_eq!(text.matches("; ").count(), 11, "{text}");
    }

    #[test]
    fn dns_subdomain_reasons() {
        for (name, expected) in [
            ("a", Ok(())),
            ("a-b.c9", Ok(())),
            ("", Err(DnsNameError::Length)),
            (&*"a".repeat(254), Err(DnsNameError::Length)),
            ("a..b", Err(DnsNameError::PartLength)),
            (&*"a".repeat(64), Err(DnsNameError::PartLength)),
            ("A", Err(DnsNameError::Character)),
            ("a_b", Err(DnsNameError::Character)),
            ("é", Err(DnsNameError::Character)),
            ("-a", Err(DnsNameError::Hyphen)),
            ("a.b-", Err(DnsNameError::Hyphen)),
        ] {
            assert_eq!(check_dns_subdomain(name), expected, "{name:?}");
        }
    }

    #[test]
    fn id_rule_counts_bytes_and_refuses_whitespace_and_controls() {
        assert_eq!(check_id(&"x".repeat(ID_MAX_LEN)), Ok(()));
        assert_eq!(
            check_id(&"x".repeat(ID_MAX_LEN + 1)),
            Err(SpecError::IdLength)
        );
        assert_eq!(check_id(&"é".repeat(129)), Err(SpecError::IdLength)); // 258 bytes
        for bad in ["a b", "a\tb", "a\u{7}", "a\u{7f}", "a\u{85}", "a\u{a0}b"] {
            assert!(
                matches!(check_id(bad), Err(SpecError::IdCharacter(_))),
                "{bad:?}"
            );
        }
        let message = check_id("a\u{7}").unwrap_err().to_string();
        assert!(
            message.contains(r#"id "a\\u{7}" may not contain"#),
            "{message}"
        );
    }
}
