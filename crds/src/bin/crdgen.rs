//! Prints the `TaasLabel` CustomResourceDefinition as YAML (the content of
//! `crds/taaslabels.yaml`): `cargo run -p taas-crds --bin crdgen > crds/taaslabels.yaml`.
#![forbid(unsafe_code)]

fn main() {
    print!("{}", taas_crds::crd_yaml());
}
