//! The Kubernetes API permissions the operator needs, next to the code that uses them.
//!
//! `operator/rbac.yaml` grants exactly these: a unit test compares the two both ways, and the
//! mocked API server scenarios (`tests.rs`) check that every request a reconcile sends is
//! covered. Server-side apply needs `create` as well as `patch`, because an apply may create
//! the object.

/// Where a rule is granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// In every namespace (ClusterRole `metastore-operator`): the clusters and their objects.
    Cluster,
    /// In the operator's own namespace (Role `metastore-operator-leader-election`).
    OperatorNamespace,
}

/// Verbs on one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resource, with `/subresource` where one is used.
    pub resource: &'static str,
    /// Verbs used.
    pub verbs: &'static [&'static str],
    /// Where it is needed.
    pub scope: Scope,
    /// What uses it.
    pub why: &'static str,
}

const fn cluster(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    why: &'static str,
) -> Permission {
    Permission {
        group,
        resource,
        verbs,
        scope: Scope::Cluster,
        why,
    }
}

/// Every permission the operator uses.
pub const PERMISSIONS: &[Permission] = &[
    cluster(
        "metastore.io",
        "metastoreclusters",
        &["list", "watch", "patch"],
        "the controller's watch; the finalizer is added and removed by JSON patch",
    ),
    cluster(
        "metastore.io",
        "metastoreclusters/status",
        &["patch"],
        "status written by server-side apply",
    ),
    cluster(
        "apps",
        "statefulsets",
        &["get", "list", "watch", "create", "patch"],
        "read in observe; applied; owned (watched)",
    ),
    cluster(
        "",
        "services",
        &["list", "watch", "create", "patch"],
        "peer and client Services applied; owned",
    ),
    cluster(
        "",
        "configmaps",
        &["list", "watch", "create", "patch"],
        "bootstrap ConfigMap applied; owned",
    ),
    cluster(
        "policy",
        "poddisruptionbudgets",
        &["list", "watch", "create", "patch", "delete"],
        "applied, deleted when disabled; owned",
    ),
    cluster(
        "batch",
        "jobs",
        &["list", "watch", "create", "patch"],
        "migration Job listed and applied; owned",
    ),
    cluster(
        "",
        "pods",
        &["list", "watch", "delete"],
        "member pods observed; deleted to upgrade or restart one",
    ),
    cluster(
        "",
        "persistentvolumeclaims",
        &["list", "patch", "delete"],
        "data holders observed; grown; deleted on cleanup when asked",
    ),
    cluster(
        "",
        "secrets",
        &["get"],
        "the client TLS Secret's CA and certificate, to call a cluster's https client URLs",
    ),
    cluster(
        "events.k8s.io",
        "events",
        &["create", "patch"],
        "an Event per action (a repeated one is patched as a series)",
    ),
    Permission {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "patch"],
        scope: Scope::OperatorNamespace,
        why: "leader election",
    },
];

/// Whether `verb` on `group`/`resource` is in [`PERMISSIONS`].
pub fn allowed(group: &str, resource: &str, verb: &str) -> bool {
    PERMISSIONS
        .iter()
        .any(|p| p.group == group && p.resource == resource && p.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        kind: String,
        #[serde(default)]
        rules: Vec<Rule>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Rule {
        api_groups: Vec<String>,
        resources: Vec<String>,
        verbs: Vec<String>,
    }

    type Grant = BTreeSet<(Scope, String, String, String)>;

    fn granted() -> Grant {
        let text = include_str!("../../rbac.yaml");
        let mut out = Grant::new();
        let mut kinds = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let doc = Doc::deserialize(document).expect("rbac.yaml parses");
            kinds.push(doc.kind.clone());
            let scope = match doc.kind.as_str() {
                "ClusterRole" => Scope::Cluster,
                "Role" => Scope::OperatorNamespace,
                _ => continue,
            };
            for rule in doc.rules {
                for g in &rule.api_groups {
                    for r in &rule.resources {
                        for v in &rule.verbs {
                            assert_ne!(v, "*", "no wildcard verbs");
                            assert_ne!(r, "*", "no wildcard resources");
                            out.insert((scope, g.clone(), r.clone(), v.clone()));
                        }
                    }
                }
            }
        }
        for kind in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ] {
            assert!(kinds.iter().any(|k| k == kind), "rbac.yaml lacks a {kind}");
        }
        out
    }

    fn needed() -> Grant {
        PERMISSIONS
            .iter()
            .flat_map(|p| {
                p.verbs.iter().map(|v| {
                    (
                        p.scope,
                        p.group.to_string(),
                        p.resource.to_string(),
                        v.to_string(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn rbac_yaml_grants_exactly_what_the_code_uses() {
        let granted = granted();
        let needed = needed();
        let missing: Vec<_> = needed.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&needed).collect();
        assert!(missing.is_empty(), "rbac.yaml lacks {missing:?}");
        assert!(
            extra.is_empty(),
            "rbac.yaml grants more than used: {extra:?}"
        );
    }

    #[test]
    fn lookups() {
        assert!(allowed("apps", "statefulsets", "patch"));
        assert!(!allowed("apps", "statefulsets", "delete"));
        assert!(allowed("", "secrets", "get"));
        assert!(
            !allowed("", "secrets", "list"),
            "only named Secrets are read"
        );
    }
}
