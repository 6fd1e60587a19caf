//! `waypoint`: Weft's waypoint proxy, the pod of an `istio-waypoint` Gateway. Needs no
//! privileges: it listens on :15008 in its own pod and connects out.

use anyhow::Context;
use waypoint::app::App;
use waypoint::config::Config;

/// jemalloc, as ztunnel: freed memory goes back to the kernel within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let log = weft_core::telemetry::init_tracing(config.log_format, "info");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.get())
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            let app = App::start(config, log).await?;
            app.run_until_signal().await.context("waiting for signals")
        })
}
