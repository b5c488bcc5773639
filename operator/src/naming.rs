//! Names, labels and URLs derived from a cluster's name and namespace.
//!
//! Member `i` of cluster `demo` in namespace `db` is the pod `demo-i`, reachable at the stable
//! DNS name `demo-i.demo-peer.db.svc` through the headless peer Service. Its member name in the
//! Raft group is the pod name, so MemberList entries map back to pods without a lookup table.

use std::collections::BTreeMap;

/// Client port (etcd's 2379).
pub const CLIENT_PORT: i32 = 2379;
/// Peer port (etcd's 2380).
pub const PEER_PORT: i32 = 2380;
/// Data directory inside the member pods.
pub const DATA_DIR: &str = "/var/lib/metastore";
/// Image repository used when `spec.image` is not set.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "ghcr.io/metastore/metastore";
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "metastore-operator";

/// Names and URLs of one cluster's objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNames {
    name: String,
    namespace: String,
    client_tls: bool,
    peer_tls: bool,
}

impl ClusterNames {
    /// Names for cluster `name` in `namespace`, with `https` URLs where TLS is on.
    pub fn new(name: &str, namespace: &str, client_tls: bool, peer_tls: bool) -> Self {
        ClusterNames {
            name: name.to_string(),
            namespace: namespace.to_string(),
            client_tls,
            peer_tls,
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Headless Service giving each pod its stable DNS name.
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.name)
    }

    /// Service clients connect to.
    pub fn client_service(&self) -> String {
        format!("{}-client", self.name)
    }

    /// ConfigMap holding the bootstrap values the pods read at start.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.name)
    }

    /// The StatefulSet (named after the cluster, so pods are `<name>-<i>`).
    pub fn statefulset(&self) -> String {
        self.name.clone()
    }

    /// The PodDisruptionBudget.
    pub fn pdb(&self) -> String {
        self.name.clone()
    }

    /// The migration Job to format `to`.
    pub fn migration_job(&self, to: i32) -> String {
        format!("{}-migrate-v{to}", self.name)
    }

    /// Pod (and member) name of ordinal `i`.
    /// The backup taken at `unix_seconds`: its Job's name and its files' prefix.
    pub fn backup(&self, unix_seconds: i64) -> String {
        format!("{}-backup-{unix_seconds}", self.name)
    }

    pub fn pod_name(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.name)
    }

    /// Ordinal of a pod or member name of this cluster (`demo-2` → 2).
    pub fn ordinal_of(&self, pod_name: &str) -> Option<i32> {
        let rest = pod_name.strip_prefix(&self.name)?.strip_prefix('-')?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest.parse().ok()
    }

    /// Stable DNS name of ordinal `i`.
    pub fn pod_host(&self, ordinal: i32) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod_name(ordinal),
            self.peer_service(),
            self.namespace
        )
    }

    /// Peer URL of ordinal `i`, as registered in the member list.
    pub fn peer_url(&self, ordinal: i32) -> String {
        let scheme = if self.peer_tls { "https" } else { "http" };
        format!("{scheme}://{}:{PEER_PORT}", self.pod_host(ordinal))
    }

    /// Client URL of ordinal `i`.
    pub fn client_url(&self, ordinal: i32) -> String {
        let scheme = if self.client_tls { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", self.pod_host(ordinal))
    }

    /// Client URL of the client Service.
    pub fn service_url(&self) -> String {
        let scheme = if self.client_tls { "https" } else { "http" };
        format!(
            "{scheme}://{}.{}.svc:{CLIENT_PORT}",
            self.client_service(),
            self.namespace
        )
    }

    /// Ordinal a peer URL of this cluster points at (how a learner that has not started yet,
    /// and so has no name in MemberList, is mapped to its pod).
    pub fn ordinal_of_peer_url(&self, url: &str) -> Option<i32> {
        let host = url.split("://").nth(1)?.split([':', '/']).next()?;
        let pod = host.split('.').next()?;
        let ordinal = self.ordinal_of(pod)?;
        (self.pod_host(ordinal) == host).then_some(ordinal)
    }

    /// `--initial-cluster` value listing the given ordinals (`demo-0=http://...:2380,...`).
    pub fn initial_cluster(&self, ordinals: impl IntoIterator<Item = i32>) -> String {
        ordinals
            .into_iter()
            .map(|i| format!("{}={}", self.pod_name(i), self.peer_url(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `--initial-cluster-token`: unique per cluster so two clusters never merge.
    pub fn cluster_token(&self) -> String {
        format!("{}-{}", self.namespace, self.name)
    }

    /// Labels selecting this cluster's member pods.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "app.kubernetes.io/name".to_string(),
                "metastore".to_string(),
            ),
            ("app.kubernetes.io/instance".to_string(), self.name.clone()),
        ])
    }

    /// Labels on every object the operator owns for this cluster.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.insert("app.kubernetes.io/component".into(), component.into());
        labels.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        labels.insert("app.kubernetes.io/part-of".into(), "metastore".into());
        labels
    }
}

/// Image for a version (`1.4.2` → `ghcr.io/metastore/metastore:v1.4.2`).
pub fn image_for_version(version: &str) -> String {
    let version = version.strip_prefix('v').unwrap_or(version);
    format!("{DEFAULT_IMAGE_REPOSITORY}:v{version}")
}

/// Version in an image tag (`reg:5000/metastore:v1.4.2` → `1.4.2`), if the tag is one.
pub fn version_of_image(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let (_, tag) = last.split_once(':')?;
    let tag = tag.strip_prefix('v').unwrap_or(tag);
    crate::plan::Version::parse(tag).map(|_| tag.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> ClusterNames {
        ClusterNames::new("demo", "db", false, false)
    }

    #[test]
    fn urls_follow_the_stable_pod_dns_names() {
        let n = names();
        assert_eq!(n.pod_host(1), "demo-1.demo-peer.db.svc");
        assert_eq!(n.peer_url(1), "http://demo-1.demo-peer.db.svc:2380");
        assert_eq!(n.client_url(0), "http://demo-0.demo-peer.db.svc:2379");
        assert_eq!(n.service_url(), "http://demo-client.db.svc:2379");
        let tls = ClusterNames::new("demo", "db", true, true);
        assert_eq!(tls.peer_url(0), "https://demo-0.demo-peer.db.svc:2380");
        assert_eq!(
            n.initial_cluster(0..2),
            "demo-0=http://demo-0.demo-peer.db.svc:2380,demo-1=http://demo-1.demo-peer.db.svc:2380"
        );
        assert_eq!(n.cluster_token(), "db-demo");
    }

    #[test]
    fn ordinals_parse_back() {
        let n = names();
        assert_eq!(n.ordinal_of("demo-12"), Some(12));
        assert_eq!(n.ordinal_of("demo-"), None);
        assert_eq!(n.ordinal_of("demox-1"), None);
        assert_eq!(n.ordinal_of("demo-1a"), None);
        assert_eq!(n.ordinal_of_peer_url(&n.peer_url(4)), Some(4));
        assert_eq!(
            n.ordinal_of_peer_url("http://demo-4.other-peer.db.svc:2380"),
            None
        );
        assert_eq!(n.ordinal_of_peer_url("not a url"), None);
    }

    #[test]
    fn images_and_versions() {
        assert_eq!(
            image_for_version("v1.4.2"),
            "ghcr.io/metastore/metastore:v1.4.2"
        );
        assert_eq!(image_for_version("1.4.2"), image_for_version("v1.4.2"));
        assert_eq!(
            version_of_image("reg:5000/ms/metastore:v1.4.2").as_deref(),
            Some("1.4.2")
        );
        assert_eq!(
            version_of_image("metastore:1.4.2-rc.1").as_deref(),
            Some("1.4.2-rc.1")
        );
        assert_eq!(version_of_image("reg:5000/metastore"), None);
        assert_eq!(version_of_image("metastore:latest"), None);
        assert_eq!(version_of_image("metastore@sha256:abc"), None);
    }
}
