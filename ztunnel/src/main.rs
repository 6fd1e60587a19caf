//! `ztunnel`: Weft's node proxy. Run one per node, in the node's network namespace (hostNetwork
//! on Kubernetes), as root or with CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW.

use anyhow::Context;
use ztunnel::app::App;
use ztunnel::config::{Capture, Config};

/// jemalloc, with its background thread purging freed pages: after a storm of connections the
/// memory goes back to the kernel within seconds (glibc's malloc kept hundreds of MB of a
/// 10,000-connection storm for good), and it is cheaper per allocation on the data path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let log = weft_core::telemetry::init_tracing(config.log_format, "info");
    match ztunnel::app::raise_open_files_limit() {
        Ok(limit) => tracing::info!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    if let Capture::LoadOnly { pin_dir } = &config.capture {
        let capture = ebpf::CaptureConfig { pin_dir: pin_dir.clone(), ..ebpf::CaptureConfig::default() };
        ebpf::Capture::open(capture).context("loading the eBPF capture")?;
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.get())
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            if config.pod_state_dir.as_deref().is_some_and(ztunnel::handover::pod_handed_over) {
                // This pod handed its listeners over and its container restarted: serving again
                // would take them back from the successor. Its pod is about to be deleted.
                tracing::warn!("this pod already handed its listeners to a successor; waiting to be deleted");
                let (_quit_tx, mut quit) = tokio::sync::watch::channel(false);
                return weft_core::drain::stop_signal(&mut quit).await.context("waiting for signals");
            }
            let app = App::start(config, log).await?;
            app.run_until_signal().await.context("waiting for signals")
        })
}
