//! Live connection handoff through the service manager's fd store.
//!
//! # Storing (old generation, at shutdown)
//!
//! Each idle keep-alive connection is stored in its own `FDSTORE=1`
//! datagram named `conn/<pid>/<seq>` ([`StoredName::Connection`]; an
//! `FDNAME=` applies to a whole datagram, and a name per fd lets the next
//! generation remove each alone). Polling stays on, so the manager drops a
//! connection by itself if the client hangs up while it waits in the store.
//! Our copy is closed right after. Once all are sent, a `BARRIER=1` waits
//! until the manager has processed them, so none is sent by a process that
//! already exited (which the manager may not be able to attribute).
//!
//! Some connections are closed instead of stored, cleanly (FIN) as any
//! server closes idle keep-alive connections:
//!
//! - when the process has no `NOTIFY_SOCKET` or `--handoff=false`;
//! - beyond `$FDSTORE` (systemd ≥ 254 announces the store's size);
//! - beyond the **name budget**: the next generation receives every name in
//!   one environment variable, `LISTEN_FDNAMES`, and Linux refuses to
//!   `execve` a process with any single environment string longer than
//!   `MAX_ARG_STRLEN` (128 KiB) — the manager could not start the next
//!   generation at all. With `conn/<pid>/<seq>` names (12–18 bytes with
//!   the separator) that is about 8,000 connections; see [`NameBudget`].
//!
//! # Adopting (new generation, at start)
//!
//! Every `conn/*` fd passed in `LISTEN_FDS` is removed from the store at
//! once (`FDSTOREREMOVE=1`, by name) — an fd stays in the store after it is
//! passed, and would otherwise be handed over again on the next restart —
//! then checked to be a connected TCP socket and served like a newly
//! accepted connection. One that cannot be used is shut down (FIN, even
//! though the manager may still hold a copy) and closed: handed over but
//! never adopted, it must not linger in the store.
//!
//! If no next generation ever comes (the unit is stopped, or its next start
//! fails without a restart), systemd releases the store and the kernel
//! closes the connections.

use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use baton_sd::{FdKind, FdPoll, ListenFds, Notifier, NotifyState, StoredName};
use rustix::net::{AddressFamily, SocketType};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Linux's limit on one environment string, `NAME=value` and its NUL
/// included (`MAX_ARG_STRLEN`, 32 pages of 4 KiB).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;

/// Room left in `LISTEN_FDNAMES` for names this process does not know of
/// yet (sockets or stored fds added to the unit before the next start).
pub const NAME_BUDGET_RESERVE: usize = 4096;

/// How long to wait for the manager to acknowledge the final `BARRIER=1`.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes the next generation's `LISTEN_FDNAMES` may still spend on
/// connection names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameBudget {
    /// Bytes left.
    pub bytes: usize,
    /// Fds left, if the manager announced the store's size (`$FDSTORE`).
    pub fds: Option<usize>,
}

impl NameBudget {
    /// The budget given the names passed to *this* generation: every name
    /// that is not a connection (sockets, other stored fds) will be passed
    /// again, so it is counted as spent, plus [`NAME_BUDGET_RESERVE`].
    /// `fdstore_max` is `$FDSTORE`.
    pub fn new<'a>(kept_names: impl IntoIterator<Item = &'a str>, fdstore_max: Option<usize>) -> Self {
        let mut bytes = MAX_ARG_STRLEN - "LISTEN_FDNAMES=".len() - 1 - NAME_BUDGET_RESERVE;
        let mut kept = 0;
        for name in kept_names {
            bytes = bytes.saturating_sub(name.len() + 1);
            kept += 1;
        }
        Self { bytes, fds: fdstore_max.map(|m| m.saturating_sub(kept)) }
    }

    /// Spends room for `name`; false (and nothing spent) if it does not fit.
    pub fn spend(&mut self, name: &str) -> bool {
        let cost = name.len() + 1;
        if cost > self.bytes || self.fds == Some(0) {
            return false;
        }
        self.bytes -= cost;
        if let Some(f) = &mut self.fds {
            *f -= 1;
        }
        true
    }
}

/// `$FDSTORE` (systemd ≥ 254): the unit's `FileDescriptorStoreMax=`.
pub fn fdstore_max_from_env() -> Option<usize> {
    std::env::var("FDSTORE").ok()?.parse().ok()
}

/// Connections taken over from the previous generation.
#[derive(Debug, Default)]
pub struct Adoption {
    /// Connected TCP sockets to serve.
    pub streams: Vec<std::net::TcpStream>,
    /// `conn/*` fds that were not connected TCP sockets, closed.
    pub rejected: usize,
    /// `FDSTOREREMOVE=1` messages that could not be sent (those entries
    /// would be handed over again).
    pub remove_failed: usize,
}

/// Takes every `conn/*` fd from `fds`, removes each from the store and keeps
/// the usable ones (see the [module docs](self)). Blocking (one datagram per
/// connection); run it before serving.
pub fn adopt(fds: &mut ListenFds, notifier: Option<&Notifier>) -> Adoption {
    let taken = fds.take_matching(|name| matches!(StoredName::parse(name), StoredName::Connection { .. }));
    let mut adoption = Adoption { streams: Vec::with_capacity(taken.len()), ..Adoption::default() };
    for (name, fd) in taken {
        if let Some(n) = notifier
            && let Err(e) = n.remove_fds(&name)
        {
            tracing::warn!(name, error = %e, "cannot remove an adopted connection from the fd store");
            adoption.remove_failed += 1;
        }
        match FdKind::of(fd.as_fd()) {
            Ok(FdKind::Socket { family, ty: SocketType::STREAM, listening: false })
                if family == AddressFamily::INET || family == AddressFamily::INET6 =>
            {
                adoption.streams.push(std::net::TcpStream::from(fd));
            }
            kind => {
                tracing::warn!(name, kind = ?kind, "a handed-over connection is not a connected TCP socket; closing it");
                close_cleanly(fd);
                adoption.rejected += 1;
            }
        }
    }
    adoption
}

/// Shuts a socket down for both directions (FIN to the peer even if another
/// process still holds a copy), then closes our fd.
fn close_cleanly(fd: OwnedFd) {
    // Not a socket, or already disconnected: nothing to tell the peer.
    let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Both);
}

/// What happened to the connections at shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffReport {
    /// Stored in the fd store.
    pub stored: usize,
    /// Of those, how many had request bytes waiting in the kernel's receive
    /// queue (left there for the next generation).
    pub with_queued_bytes: usize,
    /// Closed because handoff is off or there is no service manager.
    pub closed_no_handoff: usize,
    /// Closed because the name budget or `$FDSTORE` was exhausted.
    pub closed_over_budget: usize,
    /// Closed because storing failed.
    pub store_failed: usize,
}

/// Whether and where to hand connections over.
#[derive(Debug, Clone)]
pub struct HandoffPlan {
    /// The notify socket; `None` means close every connection.
    pub notifier: Option<Arc<Notifier>>,
    /// `--handoff`.
    pub enabled: bool,
    /// Our pid, for the names.
    pub pid: u32,
    /// Room in the next generation's `LISTEN_FDNAMES`.
    pub budget: NameBudget,
}

/// Stores (or closes) idle connections on a blocking thread, one datagram
/// each, as the connection tasks finish.
#[derive(Debug)]
pub struct HandoffWorker {
    tx: mpsc::Sender<std::net::TcpStream>,
    task: JoinHandle<HandoffReport>,
}

impl HandoffWorker {
    /// Starts the worker. Must run inside a tokio runtime.
    pub fn spawn(plan: HandoffPlan) -> Self {
        // Bounded: connection tasks wait rather than pile up sockets.
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::task::spawn_blocking(move || store_all(plan, rx));
        Self { tx, task }
    }

    /// Queues an idle connection.
    pub async fn hand_over(&self, stream: tokio::net::TcpStream) {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take a connection back from the runtime; closing it");
                return;
            }
        };
        // The worker lives until `finish`, which needs `self`.
        if let Err(mpsc::error::SendError(stream)) = self.tx.send(stream).await {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Waits until every queued connection is stored or closed, then sends
    /// `BARRIER=1` so the manager has processed them all before we exit.
    pub async fn finish(self, notifier: Option<&Notifier>) -> HandoffReport {
        drop(self.tx);
        let report = match self.task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the handoff worker failed");
                HandoffReport::default()
            }
        };
        if report.stored > 0
            && let Some(n) = notifier
            && let Err(e) = n.barrier_async(BARRIER_TIMEOUT).await
        {
            tracing::warn!(error = %e, "the service manager did not confirm the handed-over connections");
        }
        report
    }
}

fn store_all(mut plan: HandoffPlan, mut rx: mpsc::Receiver<std::net::TcpStream>) -> HandoffReport {
    let mut report = HandoffReport::default();
    let mut seq: u64 = 0;
    while let Some(stream) = rx.blocking_recv() {
        let notifier = match &plan.notifier {
            Some(n) if plan.enabled => n,
            _ => {
                let _ = stream.shutdown(Shutdown::Both);
                report.closed_no_handoff += 1;
                continue;
            }
        };
        let name = StoredName::Connection { pid: plan.pid, seq }.to_string();
        if !plan.budget.spend(&name) {
            if report.closed_over_budget == 0 {
                tracing::warn!(
                    stored = report.stored,
                    "no room for more connection names in the next generation's LISTEN_FDNAMES \
                     (or $FDSTORE is reached): closing the remaining idle connections"
                );
            }
            let _ = stream.shutdown(Shutdown::Both);
            report.closed_over_budget += 1;
            continue;
        }
        seq += 1;
        if rustix::io::ioctl_fionread(&stream).is_ok_and(|n| n > 0) {
            report.with_queued_bytes += 1;
        }
        match notifier.store_fds(&name, &[stream.as_fd()], FdPoll::Poll) {
            Ok(()) => report.stored += 1,
            Err(e) => {
                tracing::warn!(name, error = %e, "storing a connection failed; closing it");
                let _ = stream.shutdown(Shutdown::Both);
                report.store_failed += 1;
            }
        }
        if report.stored % 1000 == 0 && report.stored > 0 {
            let status = format!("handing over connections: {} stored", report.stored);
            let _ = notifier.notify(&[NotifyState::Status(&status)]);
        }
        // Our copy closes here; the manager holds the connection now.
        drop(stream);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_counts_kept_names_and_stops_at_the_limit() {
        let full = MAX_ARG_STRLEN - 16 - NAME_BUDGET_RESERVE;
        assert_eq!(NameBudget::new([], None).bytes, full);
        let b = NameBudget::new(["http", "baton-httpd.generation"], Some(10));
        assert_eq!(b.bytes, full - 5 - 23);
        assert_eq!(b.fds, Some(8));

        let mut b = NameBudget { bytes: 30, fds: None };
        assert!(b.spend("conn/123/0")); // 11
        assert!(b.spend("conn/123/1")); // 22
        assert!(!b.spend("conn/123/2")); // would be 33
        assert_eq!(b.bytes, 8);
        let mut b = NameBudget { bytes: 1000, fds: Some(1) };
        assert!(b.spend("a"));
        assert!(!b.spend("b"));
    }

    #[test]
    fn ten_thousand_names_do_not_fit() {
        // The reason for the budget: with a 3-digit pid, 10,000 connection
        // names overflow MAX_ARG_STRLEN.
        let total: usize = (0..10_000).map(|seq| format!("conn/123/{seq}").len() + 1).sum();
        assert!(total > MAX_ARG_STRLEN, "{total}");
        let mut b = NameBudget::new(["http"], None);
        let fit = (0..10_000).take_while(|seq| b.spend(&format!("conn/123/{seq}"))).count();
        assert!((8_000..10_000).contains(&fit), "{fit}");
    }
}
