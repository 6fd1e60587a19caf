//! Drain signal: tells listeners and their connections to finish what they hold and stop taking
//! new work. The listener pairs it with a hard deadline after which remaining work is cut.

use tokio::sync::watch;

/// Starts draining every [`Watch`] made from it when [`Trigger::drain`] is called or it is dropped.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Learns when draining has begun. Cheap to clone; one per listener or connection.
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Watch) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Watch(rx))
}

impl Trigger {
    pub fn drain(&self) {
        self.0.send_replace(true);
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.drain();
    }
}

impl Watch {
    /// Resolves once draining has begun (immediately if it already has).
    pub async fn signaled(&mut self) {
        // An error means the trigger is gone, which also means drain.
        let _ = self.0.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

/// Waits for what stops a proxy: SIGTERM, Ctrl-C, or `quit` turning true (the admin
/// `/quitquitquit`). Logs which, for the binary's drain that follows.
pub async fn stop_signal(quit: &mut watch::Receiver<bool>) -> std::io::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The admin server holding the sender may be gone (a drained proxy): then only a signal.
    let quitquitquit = async {
        if quit.wait_for(|q| *q).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: draining"),
        () = quitquitquit => tracing::info!("quitquitquit: draining"),
    }
    Ok(())
}
