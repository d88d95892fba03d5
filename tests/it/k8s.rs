//! The Kubernetes manifests in deploy/k8s as the tests read them: rendered
//! by `kubectl kustomize`, parsed into the fields the tests check.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_norway::Value;

use crate::common::tools::{run_tool, success};

/// One kustomization, rendered by kubectl.
pub fn kustomize(dir: &str) -> String {
    success(
        &format!("kubectl kustomize {dir}"),
        run_tool(
            "kubectl",
            &["kustomize", dir],
            "kubectl (with its built-in kustomize) comes with these machines",
        ),
    )
}

#[derive(Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The pods' controller: the base's StatefulSet (SQLite, one pod and its
/// volume) or the postgres overlay's Deployment (stateless replicas).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub kind: String,
    pub metadata: Metadata,
    pub spec: WorkloadSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub replicas: u32,
    pub selector: LabelSelector,
    pub template: PodTemplate,
    /// A StatefulSet's only.
    #[serde(default)]
    pub volume_claim_templates: Vec<ClaimTemplate>,
    /// A Deployment's only.
    pub strategy: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub struct ClaimTemplate {
    pub metadata: Metadata,
}

#[derive(Deserialize)]
pub struct PodTemplate {
    pub metadata: Metadata,
    pub spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub termination_grace_period_seconds: u64,
    pub enable_service_links: bool,
    pub security_context: PodSecurityContext,
    #[serde(default)]
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpreadConstraint {
    pub topology_key: String,
    pub when_unsatisfiable: String,
    pub label_selector: LabelSelector,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSecurityContext {
    pub run_as_user: i64,
    pub fs_group: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    pub startup_probe: Option<Probe>,
    pub readiness_probe: Option<Probe>,
    pub liveness_probe: Option<Probe>,
    pub lifecycle: Option<Value>,
    pub resources: Resources,
    pub security_context: Value,
}

#[derive(Deserialize, PartialEq, Debug)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<Value>,
}

#[derive(Deserialize, PartialEq, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: String,
    pub container_port: u16,
}

#[derive(Deserialize, PartialEq, Debug)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    pub sub_path: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub grpc: GrpcAction,
    pub period_seconds: u64,
    pub failure_threshold: u32,
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct GrpcAction {
    pub port: u16,
    pub service: String,
}

#[derive(Deserialize, PartialEq, Debug)]
pub struct Resources {
    pub requests: BTreeMap<String, Value>,
    pub limits: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub persistent_volume_claim: Option<Value>,
    pub host_path: Option<Value>,
    pub config_map: Option<ConfigMapVolume>,
    pub secret: Option<SecretVolume>,
    pub empty_dir: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolume {
    pub secret_name: String,
}

#[derive(Deserialize)]
pub struct ConfigMapVolume {
    pub name: String,
}

#[derive(Deserialize)]
pub struct ConfigMap {
    pub metadata: Metadata,
    pub data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub struct Service {
    pub metadata: Metadata,
    pub spec: ServiceSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub target_port: Value,
}

#[derive(Deserialize)]
pub struct PodDisruptionBudget {
    pub spec: PdbSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PdbSpec {
    pub selector: LabelSelector,
    pub min_available: Option<Value>,
    pub max_unavailable: Option<Value>,
}

#[derive(Deserialize)]
pub struct HorizontalPodAutoscaler {
    pub spec: HpaSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HpaSpec {
    pub scale_target_ref: ScaleTargetRef,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub metrics: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

pub fn parse<T: serde::de::DeserializeOwned>(resource: Value) -> T {
    let name = format!("{:?}/{:?}", resource["kind"], resource["metadata"]["name"]);
    serde_norway::from_value(resource).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// One kustomization, rendered by kubectl and parsed.
pub struct Manifests {
    pub workload: Workload,
    pub config_maps: Vec<ConfigMap>,
    pub services: Vec<Service>,
    pub pdb: PodDisruptionBudget,
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// The Prometheus Operator's resources (deploy/monitoring), as rendered:
    /// no schema here, tests/it/monitoring.rs checks their fields.
    pub service_monitors: Vec<Value>,
    /// Every resource's labels.
    pub labels: Vec<(String, BTreeMap<String, String>)>,
}

impl Manifests {
    pub fn render(dir: &str) -> Self {
        Self::parse(dir, &kustomize(dir))
    }

    /// `rendered`, what `kubectl kustomize dir` printed.
    pub fn parse(dir: &str, rendered: &str) -> Self {
        let (mut workloads, mut config_maps, mut services, mut pdbs, mut hpas, mut labels) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut service_monitors = Vec::new();
        for document in serde_norway::Deserializer::from_str(rendered) {
            let resource = Value::deserialize(document).unwrap();
            let kind = resource["kind"].as_str().expect("kind").to_owned();
            let metadata: Metadata =
                serde_norway::from_value(resource["metadata"].clone()).unwrap();
            labels.push((format!("{kind}/{}", metadata.name), metadata.labels));
            match kind.as_str() {
                "StatefulSet" | "Deployment" => workloads.push(parse(resource)),
                "ConfigMap" => config_maps.push(parse(resource)),
                "Service" => services.push(parse(resource)),
                "PodDisruptionBudget" => pdbs.push(parse(resource)),
                "HorizontalPodAutoscaler" => hpas.push(parse(resource)),
                "ServiceMonitor" => service_monitors.push(resource),
                other => panic!("{dir} renders an unexpected {other}"),
            }
        }
        assert_eq!(workloads.len(), 1, "{dir}: one StatefulSet or Deployment");
        assert_eq!(pdbs.len(), 1, "{dir}: one PodDisruptionBudget");
        assert!(
            hpas.len() <= 1,
            "{dir}: at most one HorizontalPodAutoscaler"
        );
        Manifests {
            workload: workloads.remove(0),
            config_maps,
            services,
            pdb: pdbs.remove(0),
            hpa: hpas.pop(),
            service_monitors,
            labels,
        }
    }

    pub fn pod(&self) -> &PodSpec {
        &self.workload.spec.template.spec
    }

    pub fn server(&self) -> &Container {
        let containers = &self.pod().containers;
        assert_eq!(containers.len(), 1, "one container in the pod");
        &containers[0]
    }
}
