//! The relay's PodDisruptionBudget in the API version the cluster serves.
//!
//! [`crate::build`] makes a `policy/v1` PodDisruptionBudget. Kubernetes before 1.21 (the test
//! cluster runs 1.20) serves only `policy/v1beta1`, and 1.25 and later only `policy/v1`; the
//! fields used here (`maxUnavailable`, `selector`) mean the same in both. So the operator asks
//! the API server once which one it serves ([`discover`]) and applies the same object under
//! that `apiVersion` ([`dynamic`], pure).

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::{ApiResource, DynamicObject};
use kube::Client;

/// The PodDisruptionBudget API version a cluster serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BudgetVersion {
    /// `policy/v1` (Kubernetes 1.21 and later).
    V1,
    /// `policy/v1beta1` (before 1.21; removed in 1.25).
    V1Beta1,
}

impl BudgetVersion {
    pub fn version(self) -> &'static str {
        match self {
            BudgetVersion::V1 => "v1",
            BudgetVersion::V1Beta1 => "v1beta1",
        }
    }

    /// The resource, for a dynamic `Api` and for the controller's watch.
    pub fn api_resource(self) -> ApiResource {
        ApiResource {
            group: "policy".to_string(),
            version: self.version().to_string(),
            api_version: format!("policy/{}", self.version()),
            kind: "PodDisruptionBudget".to_string(),
            plural: "poddisruptionbudgets".to_string(),
        }
    }

    /// The version from `policy/v1`'s discovery answer: `Some(resources)` if the group
    /// version is served (its resource names), `None` if the API server answered 404.
    pub fn from_discovery(v1_resources: Option<&[String]>) -> Self {
        match v1_resources {
            Some(names) if names.iter().any(|n| n == "poddisruptionbudgets") => BudgetVersion::V1,
            _ => BudgetVersion::V1Beta1,
        }
    }
}

/// Asks the API server whether it serves `policy/v1` PodDisruptionBudgets (discovery, which
/// every authenticated client may read); otherwise they are `policy/v1beta1`.
pub async fn discover(client: &Client) -> Result<BudgetVersion, kube::Error> {
    match client.list_api_group_resources("policy/v1").await {
        Ok(list) => {
            let names: Vec<String> = list.resources.into_iter().map(|r| r.name).collect();
            Ok(BudgetVersion::from_discovery(Some(&names)))
        }
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Ok(BudgetVersion::from_discovery(None))
        }
        Err(error) => Err(error),
    }
}

/// `budget` as an object of `version`: the same fields under that `apiVersion`.
pub fn dynamic(budget: &PodDisruptionBudget, version: BudgetVersion) -> DynamicObject {
    let resource = version.api_resource();
    let mut object = DynamicObject::new(
        budget.metadata.name.as_deref().unwrap_or_default(),
        &resource,
    );
    object.metadata = budget.metadata.clone();
    let spec = serde_json::to_value(&budget.spec).unwrap_or_default();
    object.data = serde_json::json!({ "spec": spec });
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::label;
    use crate::settings::Settings;

    #[test]
    fn discovery_picks_v1_only_where_it_serves_budgets() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            BudgetVersion::from_discovery(Some(&names(&[
                "poddisruptionbudgets",
                "poddisruptionbudgets/status"
            ]))),
            BudgetVersion::V1
        );
        // A 1.20 API server: no policy/v1 at all.
        assert_eq!(BudgetVersion::from_discovery(None), BudgetVersion::V1Beta1);
        assert_eq!(
            BudgetVersion::from_discovery(Some(&names(&[]))),
            BudgetVersion::V1Beta1
        );
    }

    #[test]
    fn the_budget_keeps_its_fields_under_either_version() {
        let mut l = label();
        l.spec.replicas = Some(2);
        let budget = crate::build::pod_disruption_budget(&l, &Settings::default()).unwrap();
        let v1 = serde_json::to_value(&budget).unwrap();
        for version in [BudgetVersion::V1, BudgetVersion::V1Beta1] {
            let object = serde_json::to_value(dynamic(&budget, version)).unwrap();
            assert_eq!(
                object["apiVersion"],
                format!("policy/{}", version.version())
            );
            assert_eq!(object["kind"], "PodDisruptionBudget");
            assert_eq!(object["metadata"], v1["metadata"]);
            assert_eq!(object["spec"], v1["spec"]);
            assert_eq!(object.as_object().unwrap().len(), 4, "{object}");
        }
    }
}
