//! The commands that talk to a Kubernetes cluster: `weft waypoint apply` (like `istioctl
//! waypoint apply --enroll-namespace`) and `weft check` (pre-flight checks before installing).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The label that binds a namespace's (or service's, or pod's) traffic to a waypoint.
pub const USE_WAYPOINT: &str = weft_core::names::USE_WAYPOINT_LABEL;
/// The Gateway class of waypoints.
pub const WAYPOINT_CLASS: &str = weft_core::names::WAYPOINT_GATEWAY_CLASS;
/// The field manager of what `weft` writes.
const FIELD_MANAGER: &str = "weft";

/// The CRDs Weft reads, by name (`<plural>.<group>`).
pub const CRDS: [&str; 9] = [
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "gateways.networking.istio.io",
    "serviceentries.networking.istio.io",
    "authorizationpolicies.security.istio.io",
    "peerauthentications.security.istio.io",
    "requestauthentications.security.istio.io",
    "telemetries.telemetry.istio.io",
    "gateways.gateway.networking.k8s.io",
];

/// A client for the cluster of `kubeconfig`, else `$KUBECONFIG`, `~/.kube/config` or the
/// in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        None => kube::Config::infer().await?,
        Some(path) => {
            let file = Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
    };
    Ok(kube::Client::try_from(config)?)
}

fn gateway_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

/// The waypoint Gateway `name` in `namespace`, as istioctl writes it: class `istio-waypoint`,
/// one HBONE listener on 15008, for service traffic.
pub fn waypoint_gateway(namespace: &str, name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"istio.io/waypoint-for": "service"},
        },
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    })
}

/// `weft waypoint apply`: writes the Gateway (server-side apply, so running it again changes
/// nothing) and labels the namespace `istio.io/use-waypoint=<name>`.
pub async fn waypoint_apply(client: kube::Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &gateway_resource());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    gateways.patch(name, &params, &Patch::Apply(waypoint_gateway(namespace, name))).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot write Gateway {namespace}/{name}: {e}{}",
            if e.to_string().contains("404") {
                " (are the Gateway API CRDs installed? daemonset/manifests/crds-gateway-api.yaml)"
            } else {
                ""
            }
        )
    })?;
    let namespaces: Api<Namespace> = Api::all(client);
    let label = serde_json::json!({"metadata": {"labels": {USE_WAYPOINT: name}}});
    namespaces
        .patch(namespace, &PatchParams::default(), &Patch::Merge(label))
        .await
        .map_err(|e| anyhow::anyhow!("cannot label namespace {namespace}: {e}"))?;
    Ok(format!(
        "waypoint {namespace}/{name} applied\nnamespace {namespace} labeled \"{USE_WAYPOINT}={name}\": its services' traffic now goes through the waypoint\n"
    ))
}

/// One pre-flight check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do when it failed.
    pub fix: String,
}

fn check(name: &'static str, result: Result<String, (String, String)>) -> Check {
    match result {
        Ok(detail) => Check { name, ok: true, detail, fix: String::new() },
        Err((detail, fix)) => Check { name, ok: false, detail, fix },
    }
}

/// The node checks: what a ztunnel needs of the machine it runs on (run them on a node, as the
/// user ztunnel runs as).
pub fn node_checks() -> Vec<Check> {
    vec![
        check(
            "kernel",
            kernel(
                &nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()),
                ebpf::AttachMode::detect().ok(),
            ),
        ),
        check("bpffs", bpffs(&std::fs::read_to_string("/proc/mounts").unwrap_or_default())),
        check("capabilities", capabilities(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())),
        check(
            "bpf-tc",
            match ebpf::tc_programs_supported() {
                Ok(true) => Ok("the kernel loads tc (sched_cls) BPF programs".into()),
                Ok(false) => Err((
                    "the kernel does not load tc (sched_cls) BPF programs".into(),
                    "use a kernel built with CONFIG_BPF_SYSCALL and CONFIG_NET_CLS_BPF (every distribution kernel has them)"
                        .into(),
                )),
                Err(e) => Err((
                    format!("cannot probe BPF: {e}"),
                    "run as root (or with CAP_BPF and CAP_NET_ADMIN), as ztunnel runs".into(),
                )),
            },
        ),
    ]
}

/// Which way ztunnel attaches its capture on this kernel: TCX links on Linux 6.6+, a clsact qdisc
/// and tc filters (netlink) on 5.10 to 6.5; older kernels cannot run it. `detected` is what
/// ztunnel's own choice ([`ebpf::AttachMode::detect`]) says here, when it could say.
fn kernel(
    release: &Result<String, nix::Error>,
    detected: Option<ebpf::AttachMode>,
) -> Result<String, (String, String)> {
    let release = release.as_ref().map_err(|e| (format!("uname failed: {e}"), String::new()))?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    match ebpf::AttachMode::for_kernel(major, minor) {
        Some(by_version) => {
            let mode = detected.unwrap_or(by_version);
            Ok(format!("Linux {release}: ztunnel will attach the capture with {}", mode.describe()))
        }
        None => Err((
            format!("Linux {release} is older than 5.10, the oldest kernel ztunnel's capture runs on"),
            "run the nodes on Linux 5.10 or later (Debian 11+, Ubuntu 22.04+, RHEL 9+); 6.6+ (e.g. Debian 13, \
             Ubuntu 24.04 HWE) attaches with TCX links"
                .into(),
        )),
    }
}

fn bpffs(mounts: &str) -> Result<String, (String, String)> {
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        Ok("bpffs mounted at /sys/fs/bpf".into())
    } else {
        Err((
            "no bpffs at /sys/fs/bpf: the capture's pins would not outlive a ztunnel restart".into(),
            "mount it on every node: `mount -t bpf bpf /sys/fs/bpf` (and in /etc/fstab: `bpf /sys/fs/bpf bpf defaults 0 0`)"
                .into(),
        ))
    }
}

/// CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_PERFMON (38), CAP_BPF (39) in the effective set.
fn capabilities(status: &str) -> Result<String, (String, String)> {
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> =
        [(12, "CAP_NET_ADMIN"), (13, "CAP_NET_RAW"), (38, "CAP_PERFMON"), (39, "CAP_BPF")]
            .into_iter()
            .filter(|(bit, _)| effective & (1 << bit) == 0)
            .map(|(_, name)| name)
            .collect();
    if missing.is_empty() {
        Ok("CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_NET_RAW held".into())
    } else {
        Err((
            format!("missing {}", missing.join(", ")),
            "run as root, or grant them (the chart's ztunnel DaemonSet adds BPF, PERFMON, NET_ADMIN and NET_RAW)"
                .into(),
        ))
    }
}

/// The cluster checks: the API server answers, and the CRDs Weft reads are installed.
pub async fn cluster_checks(client: Result<kube::Client, String>) -> Vec<Check> {
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            return vec![check(
                "api-server",
                Err((format!("no cluster configured: {e}"), "set KUBECONFIG or pass --kubeconfig".into())),
            )]
        }
    };
    let version = match client.apiserver_version().await {
        Ok(v) => check("api-server", Ok(format!("reachable, Kubernetes {}", v.git_version))),
        Err(e) => {
            return vec![check(
                "api-server",
                Err((
                    format!("not reachable: {e}"),
                    "check the kubeconfig's server address and credentials (`kubectl version`)".into(),
                )),
            )]
        }
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let mut missing = Vec::new();
    for name in CRDS {
        match crds.get_opt(name).await {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(name),
            Err(e) => {
                return vec![
                    version,
                    check(
                        "crds",
                        Err((
                            format!("cannot read CRDs: {e}"),
                            "use credentials that may read customresourcedefinitions".into(),
                        )),
                    ),
                ]
            }
        }
    }
    let crds = if missing.is_empty() {
        check("crds", Ok(format!("all {} present", CRDS.len())))
    } else {
        check(
            "crds",
            Err((
                format!("missing {}", missing.join(", ")),
                "install them: `kubectl apply -f daemonset/manifests/crds-istio.yaml` (and crds-gateway-api.yaml), or the Helm chart".into(),
            )),
        )
    };
    vec![version, crds]
}

/// The checks as a table; the caller exits 1 when any failed.
pub fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(out, "{} {:<13} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
        if !c.ok && !c.fix.is_empty() {
            let _ = writeln!(out, "     {:<13} fix: {}", "", c.fix);
        }
    }
    out
}

/// `weft check`: the node checks (unless `cluster_only`) and the cluster checks.
pub async fn run_checks(kubeconfig: Option<PathBuf>, cluster_only: bool) -> Vec<Check> {
    let mut checks = if cluster_only { Vec::new() } else { node_checks() };
    let client = client(kubeconfig.as_deref()).await.map_err(|e| e.to_string());
    checks.extend(cluster_checks(client).await);
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_say_the_attach_mode() {
        for (release, says) in [
            ("6.6.0", "TCX links"),
            ("6.18.44-fc-v669", "TCX links"),
            ("6.1.0-28-amd64", "clsact qdisc and tc filters"),
            ("5.15.0-91-generic", "clsact qdisc and tc filters"),
            ("5.14.0-427.el9.x86_64", "clsact qdisc and tc filters"),
            ("5.10.0-33-amd64", "clsact qdisc and tc filters"),
        ] {
            let detail = kernel(&Ok(release.into()), None).unwrap();
            assert!(detail.contains(release) && detail.contains(says), "{release}: {detail}");
        }
        // What the kernel answered wins over its version (e.g. TCX backported).
        let detail = kernel(&Ok("5.14.0-503.el9".into()), Some(ebpf::AttachMode::Tcx)).unwrap();
        assert!(detail.contains("TCX links"), "{detail}");
        for old in ["5.4.0-150-generic", "4.19.0-27-amd64"] {
            let (detail, fix) = kernel(&Ok(old.into()), None).unwrap_err();
            assert!(detail.contains("older than 5.10") && fix.contains("5.10 or later"), "{detail} / {fix}");
        }
    }

    #[test]
    fn bpffs_and_capabilities() {
        assert!(bpffs("bpf /sys/fs/bpf bpf rw,nosuid 0 0\n").is_ok());
        assert!(bpffs("sysfs /sys sysfs rw 0 0\n").unwrap_err().1.contains("mount -t bpf"));
        assert!(capabilities("CapEff:\t000001ffffffffff\n").is_ok());
        // CAP_NET_ADMIN and CAP_NET_RAW but neither CAP_PERFMON nor CAP_BPF.
        let (detail, _) = capabilities("CapEff:\t0000000000003000\n").unwrap_err();
        assert_eq!(detail, "missing CAP_PERFMON, CAP_BPF");
    }

    #[test]
    fn the_report_names_each_failure_with_its_fix() {
        let checks = [
            check("kernel", Ok("Linux 6.18".into())),
            check("crds", Err(("missing x".into(), "install them".into()))),
        ];
        let text = report(&checks);
        assert!(text.contains("ok   kernel        Linux 6.18"), "{text}");
        assert!(text.contains("FAIL crds          missing x"), "{text}");
        assert!(text.contains("fix: install them"), "{text}");
    }
}
