//! `weft-app`: the sample workload of the local cluster's pods (see `weft::app`).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    weft_core::telemetry::init_tracing(weft_core::telemetry::LogFormat::Plain, "warn");
    match weft::app::run(weft::app::Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-app: {e}");
            ExitCode::FAILURE
        }
    }
}
