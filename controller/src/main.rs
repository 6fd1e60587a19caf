//! The controller binary: parses the configuration, then runs [`controller::Controller`] until
//! SIGINT or SIGTERM. Everything else lives in the library.

use clap::Parser;
use weft_core::telemetry::{init_tracing, LogFormat};

use controller::config::{Args, Config};
use controller::Controller;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing(LogFormat::Plain, "info");
    let config = Config::from_args(Args::parse())?;
    tracing::info!(?config, "starting");
    let controller = Controller::bind(&config).await?;
    controller.run(shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => Some(term),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the controller");
            None
        }
    };
    let term = async {
        match term.as_mut() {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot watch Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
