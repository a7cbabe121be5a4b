//! The Kubernetes API from inside a pod, for the two things Starling asks of it:
//! - its node's topology labels (`[kubernetes] node_name`), so the daemon reports its zone and
//!   rack to the scheduler without a per-node config file;
//! - creating the cluster CA's Secret once (`starling ca DIR --kube-secret NAME`, run by the
//!   chart's pre-install hook Job).
//!
//! In-cluster configuration only: `KUBERNETES_SERVICE_HOST`/`_PORT`, and the service account's
//! token, CA and namespace under `/var/run/secrets/kubernetes.io/serviceaccount`
//! (`STARLING_KUBE_SA_DIR` overrides the directory). Requests are plain JSON over HTTPS with
//! the API server verified against the service account's CA.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("not inside a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set")]
    NotInCluster,
    #[error("cannot read the service account's {what} at {}: {source}", path.display())]
    Account {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the service account's CA at {} is not a PEM certificate: {detail}", path.display())]
    BadCa { path: PathBuf, detail: String },
    #[error("the Kubernetes API ({url}) did not answer: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the Kubernetes API refused {what} ({status}): {body}; check the chart's RBAC")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
    #[error("the Kubernetes API answered {what} with unexpected JSON: {detail}")]
    BadAnswer { what: String, detail: String },
}

/// A client for the API server this pod runs under.
pub struct InCluster {
    base: String,
    token: String,
    namespace: String,
    http: reqwest::Client,
}

/// What creating a Secret did.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    Created,
    /// One by that name exists already; it was left as it is.
    Exists,
}

impl InCluster {
    /// The in-cluster configuration from the environment and the service account files.
    pub fn from_env() -> Result<InCluster, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let dir = std::env::var_os("STARLING_KUBE_SA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SA_DIR));
        let read = |what: &'static str, name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| KubeError::Account { what, path, source })
        };
        let token = String::from_utf8_lossy(&read("token", "token")?)
            .trim()
            .to_string();
        let namespace = String::from_utf8_lossy(&read("namespace", "namespace")?)
            .trim()
            .to_string();
        let ca = read("CA", "ca.crt")?;
        let bad_ca = |detail: String| KubeError::BadCa {
            path: dir.join("ca.crt"),
            detail,
        };
        let cert = reqwest::Certificate::from_pem(&ca).map_err(|e| bad_ca(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| bad_ca(e.to_string()))?;
        // An IPv6 service host needs brackets in a URL.
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(InCluster {
            base: format!("https://{host}:{port}"),
            token,
            namespace,
            http,
        })
    }

    /// The namespace this pod runs in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The labels of node `name` (needs `get` on `nodes`).
    pub async fn node_labels(&self, name: &str) -> Result<BTreeMap<String, String>, KubeError> {
        let what = format!("GET node {name}");
        let url = format!("{}/api/v1/nodes/{name}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| unreachable(&url, e))?;
        let node: serde_json::Value = json_of(resp, &what).await?;
        let labels = node
            .pointer("/metadata/labels")
            .and_then(|l| l.as_object())
            .map(|l| {
                l.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(labels)
    }

    /// Creates Secret `name` in this namespace with `data`, unless one exists (needs `create`
    /// on `secrets`). An existing Secret is never replaced: the cluster keeps its CA.
    pub async fn create_secret(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Created, KubeError> {
        let what = format!("create Secret {}/{name}", self.namespace);
        let url = format!("{}/api/v1/namespaces/{}/secrets", self.base, self.namespace);
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": name, "namespace": self.namespace, "labels": labels },
            "type": "Opaque",
            "data": data.iter().map(|(k, v)| (k.clone(), b64.encode(v))).collect::<BTreeMap<_, _>>(),
        });
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| unreachable(&url, e))?;
        if resp.status() == reqwest::StatusCode::CONFLICT {
            return Ok(Created::Exists);
        }
        json_of::<serde_json::Value>(resp, &what).await?;
        Ok(Created::Created)
    }
}

fn unreachable(url: &str, e: reqwest::Error) -> KubeError {
    KubeError::Unreachable {
        url: url.to_string(),
        detail: e.to_string(),
    }
}

async fn json_of<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    what: &str,
) -> Result<T, KubeError> {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    if !status.is_success() {
        return Err(KubeError::Refused {
            what: what.to_string(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|e| KubeError::BadAnswer {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// Fills `peer.zone` and `peer.rack` (those left empty) from the labels of
/// `kubernetes.node_name`. A failure is logged and the daemon runs without them: locality is
/// an optimisation, not a reason not to start.
pub async fn apply_node_labels(cfg: &mut crate::config::Config) {
    let k = &cfg.kubernetes;
    if k.node_name.is_empty() || (!cfg.peer.zone.is_empty() && !cfg.peer.rack.is_empty()) {
        return;
    }
    let labels = match InCluster::from_env() {
        Ok(c) => c.node_labels(&k.node_name).await,
        Err(e) => Err(e),
    };
    let labels = match labels {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(node = %k.node_name, error = %e, "cannot read the node's topology labels; the scheduler will not know this node's zone and rack");
            return;
        }
    };
    let pick = |key: &str| labels.get(key).cloned().unwrap_or_default();
    if cfg.peer.zone.is_empty() {
        cfg.peer.zone = pick(&k.zone_label);
    }
    if cfg.peer.rack.is_empty() {
        cfg.peer.rack = pick(&k.rack_label);
    }
    tracing::info!(node = %k.node_name, zone = %cfg.peer.zone, rack = %cfg.peer.rack, "place from the node's labels");
}
