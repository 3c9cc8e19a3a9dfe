//! Graceful shutdown: noticing SIGTERM/SIGINT and draining in-flight work.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::{Notifier, NotifyState};

/// Which signal asked us to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// `SIGTERM`: what systemd and Baton send.
    Terminate,
    /// `SIGINT`: Ctrl-C on a terminal.
    Interrupt,
}

/// Waits for SIGTERM or SIGINT.
///
/// Create it early: the handlers are installed by [`Shutdown::install`], so a
/// signal that arrives before [`wait`](Self::wait) is polled is not lost (and
/// does not kill the process with the default action).
#[derive(Debug)]
pub struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    /// Installs the SIGTERM and SIGINT handlers. Must run inside a tokio
    /// runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Resolves at the first SIGTERM or SIGINT, after sending `STOPPING=1`
    /// through `notifier` (if any) so the manager knows the exit is intended.
    /// A failure to notify is returned alongside the signal, never hiding it.
    pub async fn wait(&mut self, notifier: Option<&Notifier>) -> (StopSignal, Result<(), crate::NotifyError>) {
        let sig = tokio::select! {
            _ = self.term.recv() => StopSignal::Terminate,
            _ = self.int.recv() => StopSignal::Interrupt,
        };
        let sent = notifier.map_or(Ok(()), |n| n.notify(&[NotifyState::Stopping]));
        (sig, sent)
    }
}

/// Counts in-flight work so shutdown can wait for it, with a deadline.
///
/// Clone it freely; each unit of work holds a [`DrainGuard`] from
/// [`track`](Self::track) and releases it by dropping.
#[derive(Debug, Clone)]
pub struct Drain {
    count: Arc<watch::Sender<usize>>,
}

/// One unit of in-flight work; dropping it marks the work done.
#[derive(Debug)]
#[must_use = "the work counts as in flight only while the guard lives"]
pub struct DrainGuard {
    count: Arc<watch::Sender<usize>>,
}

/// The drain deadline passed with work still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("drain deadline of {deadline:?} passed with {in_flight} unit(s) of work still in flight")]
pub struct DrainTimeout {
    /// The deadline that passed.
    pub deadline: Duration,
    /// Work still in flight when it passed.
    pub in_flight: usize,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A tracker with nothing in flight.
    pub fn new() -> Self {
        Self { count: Arc::new(watch::Sender::new(0)) }
    }

    /// Marks one unit of work as in flight until the guard is dropped.
    pub fn track(&self) -> DrainGuard {
        self.count.send_modify(|n| *n += 1);
        DrainGuard { count: Arc::clone(&self.count) }
    }

    /// Work currently in flight.
    pub fn in_flight(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until nothing is in flight, or `deadline` passes.
    pub async fn wait_idle(&self, deadline: Duration) -> Result<(), DrainTimeout> {
        let mut rx = self.count.subscribe();
        match tokio::time::timeout(deadline, rx.wait_for(|n| *n == 0)).await {
            // The sender lives in `self`, so `wait_for` cannot see it closed.
            Ok(_) => Ok(()),
            Err(_) => Err(DrainTimeout { deadline, in_flight: self.in_flight() }),
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_guards_and_honours_deadline() {
        let drain = Drain::new();
        assert_eq!(drain.wait_idle(Duration::from_secs(1)).await, Ok(()));
        let a = drain.track();
        let b = drain.track();
        assert_eq!(drain.in_flight(), 2);
        let err = drain.wait_idle(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err, DrainTimeout { deadline: Duration::from_secs(5), in_flight: 2 });
        drop(a);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait_idle(Duration::from_secs(60)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        drop(b);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(drain.in_flight(), 0);
    }
}
