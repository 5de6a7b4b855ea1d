//! The shutdown signal shared by the caller, the accept loops and every connection.
//!
//! This module owns a one-way flag built on `tokio::sync::watch`: once triggered it stays
//! triggered, and every waiter, present or future, wakes. It must never be reset.

use std::sync::Arc;
use tokio::sync::watch;

/// Tells a server to stop: it stops accepting, ends negotiations, lets requests in flight
/// finish and reply, closes every connection, and then `serve_*` returns. Cheap to clone;
/// all clones share one flag.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Triggers the shutdown. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether `trigger` was called.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once `trigger` has been called (at once if it already was).
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail with a closed channel.
        let _ = rx.wait_for(|&t| t).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_even_ones_that_start_late() {
        let s = Shutdown::new();
        let early = tokio::spawn({
            let s = s.clone();
            async move { s.triggered().await }
        });
        assert!(!s.is_triggered());
        s.clone().trigger();
        early.await.unwrap();
        s.triggered().await;
        assert!(s.is_triggered());
    }
}
