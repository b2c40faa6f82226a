//! Reading `TaasLabel` and `Secret` objects from multi-document YAML, and writing them back.
//!
//! These are the manifests a user would `kubectl apply`; the relay reads the same files from
//! its labels directory. Only the fields the relay needs are read; everything else (status,
//! annotations, other kinds) is ignored, as the API server would store it but we do not care.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::{TaasLabelSpec, API_VERSION, KIND};

/// Namespace of an object whose metadata names none (as `kubectl apply` would default it).
pub const DEFAULT_NAMESPACE: &str = "default";

/// One document of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Label(LabelObject),
    Secret(SecretObject),
    /// Any other kind: accepted and ignored, so a file may carry unrelated manifests.
    Other {
        api_version: String,
        kind: String,
        name: Option<String>,
    },
}

/// A `TaasLabel` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelObject {
    pub name: String,
    pub namespace: String,
    pub spec: TaasLabelSpec,
}

/// A `v1` `Secret`, with `data` decoded and `stringData` merged in.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretObject {
    pub name: String,
    pub namespace: String,
    pub data: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for SecretObject {
    // Hand-written so that secret values can never reach a log line: keys only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretObject")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A problem with one document (numbered from 1), e.g. YAML syntax (with line and column),
/// a missing field, or bad base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document}{}: {message}", describe(.what))]
pub struct ManifestError {
    /// 1-based index of the document in the stream.
    pub document: usize,
    /// `Kind "name"` when known.
    pub what: Option<String>,
    pub message: String,
}

fn describe(what: &Option<String>) -> String {
    what.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

impl Metadata {
    fn namespace(self) -> (String, String) {
        let ns = self
            .namespace
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        (self.name, ns)
    }
}

#[derive(Deserialize)]
struct LabelDoc {
    metadata: Metadata,
    spec: TaasLabelSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretDoc {
    metadata: Metadata,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
    #[serde(default)]
    string_data: Option<BTreeMap<String, String>>,
}

/// What the first pass learnt about a document.
enum Shape {
    Empty,
    Label,
    Secret,
    /// Always an `Object::Other` (boxed: a label would make every `Shape` large).
    Other(Box<Object>),
}

/// Parses every document of `yaml`. Empty documents are skipped; any problem is an error
/// naming its document.
pub fn parse_documents(yaml: &str) -> Result<Vec<Object>, ManifestError> {
    // Pass 1 learns each document's kind from a generic value; pass 2 deserializes the typed
    // object straight from the text, so that its errors keep serde_yaml's path, line and column.
    let mut shapes = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let err = |what: Option<String>, message: String| ManifestError {
            document: i + 1,
            what,
            message,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(None, e.to_string()))?;
        let what = describe_object(&value);
        let shape = shape(&value).map_err(|m| err(what.clone(), m))?;
        shapes.push((shape, what.unwrap_or_default()));
    }
    let mut objects = Vec::new();
    for (i, (doc, (shape, what))) in serde_yaml::Deserializer::from_str(yaml)
        .zip(shapes)
        .enumerate()
    {
        let err = |message: String| ManifestError {
            document: i + 1,
            what: Some(what.clone()).filter(|w| !w.is_empty()),
            message,
        };
        match shape {
            Shape::Empty => {
                IgnoredAny::deserialize(doc).map_err(|e| err(e.to_string()))?;
            }
            Shape::Other(object) => {
                IgnoredAny::deserialize(doc).map_err(|e| err(e.to_string()))?;
                objects.push(*object);
            }
            Shape::Label => {
                let d = LabelDoc::deserialize(doc).map_err(|e| err(e.to_string()))?;
                let (name, namespace) = d.metadata.namespace();
                objects.push(Object::Label(LabelObject {
                    name,
                    namespace,
                    spec: d.spec,
                }));
            }
            Shape::Secret => {
                // serde quotes the offending value (`invalid type: string "…"`), which here
                // may be the secret itself: the message keeps the problem and drops the value.
                let d = SecretDoc::deserialize(doc).map_err(|e| err(without_values(&e)))?;
                let (name, namespace) = d.metadata.namespace();
                let mut data = BTreeMap::new();
                for (key, b64) in d.data.unwrap_or_default() {
                    // The decoder's message would quote an offending byte of the secret: omit it.
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map_err(|_| err(format!("data.{key} is not valid base64")))?;
                    data.insert(key, bytes);
                }
                // As in Kubernetes, stringData wins over data for the same key.
                for (key, text) in d.string_data.unwrap_or_default() {
                    data.insert(key, text.into_bytes());
                }
                objects.push(Object::Secret(SecretObject {
                    name,
                    namespace,
                    data,
                }));
            }
        }
    }
    Ok(objects)
}

/// serde's message without the values it quotes (`"…"` and `` `…` ``).
fn without_values(error: &serde_yaml::Error) -> String {
    let (text, mut out) = (error.to_string(), String::new());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '`' => {
                while let Some(inner) = chars.next() {
                    match inner {
                        '\\' => {
                            chars.next();
                        }
                        _ if inner == c => break,
                        _ => {}
                    }
                }
                out.push_str("(value not shown)");
            }
            c => out.push(c),
        }
    }
    out
}

/// `Kind "name"`, as far as the document tells, for error messages.
fn describe_object(value: &serde_yaml::Value) -> Option<String> {
    let kind = value.get("kind").and_then(|k| k.as_str());
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str());
    match (kind, name) {
        (Some(k), Some(n)) => Some(format!("{k} {n:?}")),
        (Some(k), None) => Some(k.to_string()),
        (None, Some(n)) => Some(format!("object {n:?}")),
        (None, None) => None,
    }
}

fn shape(value: &serde_yaml::Value) -> Result<Shape, String> {
    if value.is_null() {
        return Ok(Shape::Empty);
    }
    let Some(map) = value.as_mapping() else {
        return Err("expected a mapping with apiVersion and kind".into());
    };
    let field = |k: &str| map.get(k).and_then(|v| v.as_str());
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        return Err("apiVersion and kind are required".into());
    };
    let expect = |wanted: &str, shape: Shape| {
        if api_version == wanted {
            Ok(shape)
        } else {
            Err(format!(
                "apiVersion is {api_version:?}; a {kind} must have apiVersion {wanted}"
            ))
        }
    };
    match kind {
        KIND => expect(API_VERSION, Shape::Label),
        "Secret" => expect("v1", Shape::Secret),
        _ => Ok(Shape::Other(Box::new(Object::Other {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            name: value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string),
        }))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Out<'a, T: Serialize> {
    api_version: &'a str,
    kind: &'a str,
    metadata: MetadataOut<'a>,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct MetadataOut<'a> {
    name: &'a str,
    namespace: &'a str,
}

#[derive(Serialize)]
struct LabelBody<'a> {
    spec: &'a TaasLabelSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SecretBody<'a> {
    #[serde(rename = "type")]
    type_: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    string_data: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    data: BTreeMap<&'a str, String>,
}

/// One file holding a `TaasLabel` and its `Secret`, usable with `kubectl apply -f`,
/// `taas-relay serve --labels DIR` and `taas-agent --label-file`. Secret values that are
/// text go to `stringData` so the file stays readable; anything else to `data` (base64).
pub fn render_label_file(label: &LabelObject, secret: &SecretObject) -> String {
    let label_doc = Out {
        api_version: API_VERSION,
        kind: KIND,
        metadata: MetadataOut {
            name: &label.name,
            namespace: &label.namespace,
        },
        body: LabelBody { spec: &label.spec },
    };
    let mut body = SecretBody {
        type_: "Opaque",
        string_data: BTreeMap::new(),
        data: BTreeMap::new(),
    };
    for (key, value) in &secret.data {
        match std::str::from_utf8(value) {
            Ok(text) => {
                body.string_data.insert(key, text);
            }
            Err(_) => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(value);
                body.data.insert(key, b64);
            }
        }
    }
    let secret_doc = Out {
        api_version: "v1",
        kind: "Secret",
        metadata: MetadataOut {
            name: &secret.name,
            namespace: &secret.namespace,
        },
        body,
    };
    format!(
        "# TAAS label: a TaasLabel and the Secret holding its TOTP secret (base32).\n\
         # Keep this file private. It works with `taas-relay serve --labels DIR`,\n\
         # `taas-agent --label-file FILE` and `kubectl apply -f FILE`.\n\
         {}---\n{}",
        to_yaml(&label_doc),
        to_yaml(&secret_doc),
    )
}

fn to_yaml<T: Serialize>(value: &T) -> String {
    // Plain structs of strings, numbers and maps with string keys: this cannot fail.
    serde_yaml::to_string(value).expect("manifest structs always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Algorithm, ClientAdmission, ExternalTrafficPolicy, LabelService, ProxyProtocol,
        SecretKeyRef, ServiceType,
    };

    fn spec() -> TaasLabelSpec {
        TaasLabelSpec {
            id: "2f402f80-da50-11e1-9b23-0123456789ab".into(),
            label: "home".into(),
            secret_ref: SecretKeyRef {
                name: "home-totp".into(),
                key: "secret".into(),
            },
            algorithm: Algorithm::SHA256,
            period: 60,
            max_parked: 8,
            source_pinning: false,
            proxy_protocol: ProxyProtocol::V2,
            client_port: Some(21000),
            client_admission: ClientAdmission::Redirected,
            server_speaks_first: true,
            direct: false,
            service: LabelService {
                type_: Some(ServiceType::NodePort),
                annotations: [("a.example/b".to_string(), "c".to_string())].into(),
                external_traffic_policy: ExternalTrafficPolicy::Cluster,
                load_balancer_class: None,
            },
            rendezvous_ports: 4,
            replicas: None,
        }
    }

    const LABEL: &str = "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\n\
        metadata: {name: home}\n\
        spec: {id: x, label: home, secretRef: {name: home-totp}}\n";

    #[test]
    fn round_trip() {
        let label = LabelObject {
            name: "home".into(),
            namespace: "ns1".into(),
            spec: spec(),
        };
        let secret = SecretObject {
            name: "home-totp".into(),
            namespace: "ns1".into(),
            data: [
                ("secret".to_string(), b"JBSWY3DPEHPK3PXP".to_vec()),
                ("blob".to_string(), vec![0xff, 0, 1]),
            ]
            .into(),
        };
        let text = render_label_file(&label, &secret);
        assert!(text.starts_with("# TAAS label"));
        assert!(text.contains("stringData:\n  secret: JBSWY3DPEHPK3PXP\n"));
        assert!(text.contains("type: Opaque"));
        let objects = parse_documents(&text).unwrap();
        assert_eq!(objects, vec![Object::Label(label), Object::Secret(secret)]);
    }

    #[test]
    fn defaults_and_empty_documents() {
        let objects =
            parse_documents(&format!("---\n---\n# only a comment\n---\n{LABEL}---\n")).unwrap();
        let [Object::Label(l)] = objects.as_slice() else {
            panic!("{objects:?}")
        };
        assert_eq!(l.namespace, "default");
        assert_eq!(l.spec.secret_ref.key, "secret");
        assert_eq!(l.spec.period, 30);
        assert_eq!(l.spec.max_parked, 32);
        assert!(l.spec.source_pinning);
        assert!(!l.spec.server_speaks_first);
        assert_eq!(l.spec.rendezvous_ports, 8);
        assert_eq!(l.spec.service, LabelService::default());
        assert_eq!(l.spec.service.type_, None);
        assert_eq!(
            l.spec.service.external_traffic_policy,
            ExternalTrafficPolicy::Local
        );
        assert!(parse_documents("").unwrap().is_empty());
    }

    #[test]
    fn data_and_string_data_merge() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: n}\n\
            data: {a: YWFh, b: YmJi}\nstringData: {b: override, c: ccc}\n";
        let objects = parse_documents(yaml).unwrap();
        let [Object::Secret(s)] = objects.as_slice() else {
            panic!("{objects:?}")
        };
        assert_eq!(s.namespace, "n");
        assert_eq!(s.data["a"], b"aaa");
        assert_eq!(s.data["b"], b"override");
        assert_eq!(s.data["c"], b"ccc");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("aaa") && !debug.contains("override"),
            "{debug}"
        );
    }

    #[test]
    fn other_kinds_are_kept_as_other() {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\ndata: {{x: y}}\n---\n{LABEL}"
        );
        let objects = parse_documents(&yaml).unwrap();
        assert_eq!(
            objects[0],
            Object::Other {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: Some("cm".into())
            }
        );
        assert!(matches!(objects[1], Object::Label(_)));
    }

    #[test]
    fn bad_base64_names_document_and_key_but_not_value() {
        let yaml = format!("{LABEL}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\ndata: {{k: 'sec$ret'}}\n");
        let e = parse_documents(&yaml).unwrap_err();
        assert_eq!(e.document, 2);
        let msg = e.to_string();
        assert!(msg.contains("document 2 (Secret \"s\")"), "{msg}");
        assert!(msg.contains("data.k is not valid base64"), "{msg}");
        assert!(!msg.contains("sec$ret") && !msg.contains('$'), "{msg}");
    }

    #[test]
    fn missing_spec_field_has_path_and_location() {
        let yaml = "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata:\n  name: home\n\
            spec:\n  label: home\n  secretRef: {name: s}\n";
        let msg = parse_documents(yaml).unwrap_err().to_string();
        assert!(
            msg.starts_with("document 1 (TaasLabel \"home\"): spec: "),
            "{msg}"
        );
        assert!(msg.contains("missing field `id`"), "{msg}");
        assert!(msg.contains("line 6"), "{msg}");
    }

    #[test]
    fn wrong_api_version_and_shape() {
        let yaml = LABEL.replace("taas.dev/v1alpha1", "taas.dev/v1");
        let msg = parse_documents(&yaml).unwrap_err().to_string();
        assert!(msg.contains("document 1 (TaasLabel \"home\")"), "{msg}");
        assert!(msg.contains("apiVersion taas.dev/v1alpha1"), "{msg}");
        let msg = parse_documents("kind: Secret\nmetadata: {name: s}\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("apiVersion and kind are required"), "{msg}");
        let msg = parse_documents("- a\n- b\n").unwrap_err().to_string();
        assert!(msg.contains("expected a mapping"), "{msg}");
    }

    #[test]
    fn syntax_error_keeps_location() {
        let yaml = format!("{LABEL}---\napiVersion: v1\nkind: [unclosed\n");
        let e = parse_documents(&yaml).unwrap_err();
        assert_eq!(e.document, 2);
        assert!(e.to_string().contains("line"), "{e}");
    }
}
