//! Reading `TaasLabel` and `Secret` objects from multi-document YAML.
