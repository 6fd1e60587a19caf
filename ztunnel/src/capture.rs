//! Keeps the node's eBPF capture and certificates in step with the controller's view of this
//! node: after every xDS update, each local pod's host-side veth carries the capture program
//! (every local pod, so replies to ztunnel's transparent sockets are matched), pods in the mesh
//! are enrolled and others known but not captured (see [`ebpf::Capture::unenroll`]), and a certificate is fetched ahead of time for each identity of a
//! local mesh pod (so the first connection does not wait for the CA), and the identities of pods
//! that left the node are forgotten (no longer renewed).
//!
//! A pod's host-side interface is found from the node's route to the pod's IP (`ip route get`),
//! as a CNI plugin would have installed it; a pod without such a route is skipped with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use weft_core::cert_manager::{CertManager, CertificateSource};
use weft_core::state::{Protocol, ProxyState, Shared};
use weft_core::xds::Synced;
use weft_core::Identity;

/// What this node runs, as the controller sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPods {
    /// Every local pod IP, in the mesh or not.
    pub all: BTreeSet<IpAddr>,
    /// Local pod IPs in the ambient mesh.
    pub in_mesh: BTreeSet<IpAddr>,
    /// Identities of local pods in the mesh.
    pub identities: BTreeSet<Identity>,
    /// The xDS generation ([`Synced::generation`]) whose state the capture was set up for.
    pub generation: u64,
}

impl LocalPods {
    pub fn of(state: &ProxyState, node: &str) -> LocalPods {
        let mut out = LocalPods::default();
        for w in state.workloads().filter(|w| w.node == node) {
            out.all.extend(w.addresses.iter().copied());
            if w.protocol == Protocol::Hbone {
                out.in_mesh.extend(w.addresses.iter().copied());
                out.identities.insert(w.identity.clone());
            }
        }
        out
    }
}

/// Applies [`LocalPods`] to the capture after each xDS update, until the channel closes.
/// `reattach` (notified once this ztunnel has taken over from a predecessor, which attached pods
/// of its own until then) makes the next pass attach every pod again.
pub async fn sync<S: CertificateSource>(
    node: String,
    state: Arc<Shared<ProxyState>>,
    mut updates: watch::Receiver<Synced>,
    capture: Option<Arc<Mutex<ebpf::Capture>>>,
    certs: Arc<CertManager<S>>,
    local: watch::Sender<LocalPods>,
    reattach: Arc<tokio::sync::Notify>,
) {
    let mut attached: BTreeMap<IpAddr, String> = BTreeMap::new();
    loop {
        let (generation, complete) = {
            let synced = updates.borrow_and_update();
            (synced.generation, synced.complete())
        };
        if !complete {
            // Until every type has arrived the state is partial: applying it would forget the
            // pods the pinned capture holds (a restarted or upgraded ztunnel), uncapturing them.
            if updates.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut pods = LocalPods::of(&state.load(), &node);
        pods.generation = generation;
        // hostNetwork pods have the node's own address (their "host interface" is `lo`): there
        // is nothing of theirs to capture, as with Istio.
        pods.all.retain(|ip| !crate::proxy::is_node_address(*ip));
        pods.in_mesh.retain(|ip| !crate::proxy::is_node_address(*ip));
        if let Some(capture) = &capture {
            let capture = Arc::clone(capture);
            let wanted = pods.clone();
            let before = attached.clone();
            match tokio::task::spawn_blocking(move || apply(&capture, &wanted, before)).await {
                Ok(now) => attached = now,
                Err(e) => tracing::error!(error = %e, "capture update panicked"),
            }
        }
        for identity in &pods.identities {
            if certs.current(identity).is_none() {
                let certs = Arc::clone(&certs);
                let identity = identity.clone();
                tokio::spawn(async move {
                    if let Err(e) = certs.get(&identity).await {
                        tracing::warn!(%identity, error = %e, "cannot fetch a certificate yet");
                    }
                });
            }
        }
        // Identities no local mesh pod has any more stop being renewed.
        let gone: Vec<Identity> = local.borrow().identities.difference(&pods.identities).cloned().collect();
        for identity in &gone {
            tracing::info!(%identity, "no pod of this node has the identity any more; its certificate is dropped");
            certs.forget(identity);
        }
        local.send_if_modified(|old| {
            let changed = *old != pods;
            *old = pods;
            changed
        });
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = reattach.notified() => {
                // Attaching is idempotent: an attachment that runs this process's programs stays,
                // one the predecessor made for a pod that appeared meanwhile is replaced.
                tracing::info!("attaching every pod again after the hand-over");
                attached.clear();
            }
        }
    }
}

/// Attaches, enrolls and unenrolls so the capture matches `wanted`; returns the interfaces now
/// attached by pod IP. Each failure is logged and leaves the rest of the update going.
fn apply(
    capture: &Mutex<ebpf::Capture>,
    wanted: &LocalPods,
    mut attached: BTreeMap<IpAddr, String>,
) -> BTreeMap<IpAddr, String> {
    let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
    // Pods already attached keep their link (a recreated veth gets a new pod IP from the CNI,
    // or is re-attached by `attach_pod` noticing the stale link): no `ip route get` per pod per
    // update.
    let new: Vec<IpAddr> = wanted.all.iter().filter(|ip| !attached.contains_key(ip)).copied().collect();
    for ip in &new {
        match host_interface(*ip) {
            Ok(ifname) => match capture.attach_pod(&ifname) {
                Ok(()) => {
                    tracing::info!(%ip, ifname, "capture attached");
                    attached.insert(*ip, ifname);
                }
                Err(e) => tracing::warn!(%ip, ifname, error = %e, "cannot attach capture"),
            },
            Err(e) => tracing::warn!(%ip, error = %e, "no host interface for local pod; not captured"),
        }
    }
    // Every local pod has an entry: captured (in the mesh) or not. An entry that is not
    // captured still delivers the connections ztunnel holds for the pod (an unenrolled pod's
    // open connections finish through ztunnel); a pod gone from the node is forgotten.
    let known: BTreeMap<IpAddr, bool> = match capture.pods() {
        Ok(list) => list.into_iter().collect(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the enrolled pods map");
            BTreeMap::new()
        }
    };
    for ip in &wanted.all {
        let captured = wanted.in_mesh.contains(ip);
        if known.get(ip) == Some(&captured) {
            continue;
        }
        let (what, result) = if captured {
            ("enrolled", capture.enroll(*ip))
        } else {
            (if known.contains_key(ip) { "unenrolled" } else { "known, not captured" }, capture.unenroll(*ip))
        };
        match result {
            Ok(()) => tracing::info!(%ip, "pod {what}"),
            Err(e) => tracing::warn!(%ip, error = %e, "cannot update the capture of the pod ({what})"),
        }
    }
    for ip in known.keys().filter(|ip| !wanted.all.contains(ip)) {
        match capture.forget(*ip) {
            Ok(()) => tracing::info!(%ip, "pod left the node; forgotten by the capture"),
            Err(e) => tracing::warn!(%ip, error = %e, "cannot forget the pod"),
        }
    }
    // Pods gone from the node: their veths are gone with them, and so are the links.
    attached.retain(|ip, _| wanted.all.contains(ip));
    attached
}

/// The interface the node routes `ip` through (`ip route get`), which for a pod is its host-side
/// veth.
pub fn host_interface(ip: IpAddr) -> Result<String, String> {
    let family = if ip.is_ipv4() { "-4" } else { "-6" };
    let out = Command::new("ip")
        .args([family, "-o", "route", "get", &ip.to_string()])
        .output()
        .map_err(|e| format!("cannot run `ip route get`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`ip route get {ip}`: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "dev" {
            return words.next().map(str::to_owned).ok_or_else(|| format!("no device in {text:?}"));
        }
    }
    Err(format!("no device in `ip route get {ip}`: {text:?}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use weft_core::testing::resources::*;
    use weft_core::testing::{LocalSource, TestCa};
    use weft_core::xds::Synced;

    use super::*;

    #[tokio::test]
    async fn a_pod_that_left_the_node_has_its_identity_forgotten() {
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = LocalSource {
            ca: Arc::new(TestCa::new()),
            lifetime: Duration::from_millis(400),
            fetches: Arc::clone(&fetches),
        };
        let certs = Arc::new(CertManager::new(source));
        let state = Arc::new(Shared::new(ProxyState::new("")));
        state.update(|s| add_workload(s, workload("shop", "web", "10.0.1.5")));
        let (synced_tx, synced) = watch::channel(Synced::new(&[]));
        let (local_tx, mut local) = watch::channel(LocalPods::default());
        let task = tokio::spawn(sync(
            "node-a".into(),
            Arc::clone(&state),
            synced,
            None,
            Arc::clone(&certs),
            local_tx,
            Arc::new(tokio::sync::Notify::new()),
        ));

        let web = weft_core::testing::identity("shop", "web");
        let wait = |what: &'static str, f: Box<dyn Fn() -> bool>| async move {
            for _ in 0..200 {
                if f() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("timed out waiting until {what}");
        };
        let c = Arc::clone(&certs);
        let id = web.clone();
        wait("the certificate is fetched", Box::new(move || c.current(&id).is_some())).await;
        let f = Arc::clone(&fetches);
        wait("it is renewed", Box::new(move || f.load(Ordering::SeqCst) >= 2)).await;

        state.update(|s| s.remove_address(&uid("shop", "web")));
        synced_tx.send_modify(|s| s.generation += 1);
        local.wait_for(|l| l.identities.is_empty()).await.unwrap();
        assert!(certs.current(&web).is_none(), "the certificate is dropped");
        let after = fetches.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), after, "no renewal after the pod left");
        task.abort();
    }
}

#[cfg(test)]
mod probe_source_tests {
    /// The capture has Istio's probe source built in; the rest of Weft names it in
    /// `weft_core::names`. They must agree.
    #[test]
    fn the_capture_and_the_platform_agree_on_the_probe_source() {
        assert_eq!(ebpf::PROBE_SOURCE_V4, weft_core::names::PROBE_SOURCE_V4);
        assert_eq!(ebpf::PROBE_SOURCE_V6, weft_core::names::PROBE_SOURCE_V6);
    }
}
