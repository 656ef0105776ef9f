//! Cancellation: SIGTERM and SIGINT set one flag that every stage polls, so a
//! terminated worker unwinds through its normal cleanup and exits 143.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that SIGTERM and SIGINT trip.
    pub fn from_signals() -> anyhow::Result<Self> {
        let token = Self::default();
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, token.0.clone())?;
        }
        Ok(token)
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(terminated)` once cancelled: `ctx.cancel.check()?` in loops.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            Err(crate::error::terminated())
        } else {
            Ok(())
        }
    }

    /// Resolves when cancelled; for `tokio::select!` around network waits.
    pub async fn cancelled(&self) {
        while !self.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
