//! Live connection handoff: through the service manager's fd store across a
//! stop-then-start restart (systemd), and pushed by Baton to the running
//! generation across an overlapped restart (`baton restart`).
//!
//! # Storing (old generation, at shutdown)
//!
//! Idle keep-alive connections are stored in batches of up to
//! [`SCM_MAX_FD`] (253, the kernel's limit per `SCM_RIGHTS` message) per
//! `FDSTORE=1` datagram, all under the one name `conn`
//! ([`StoredName::Connection`]). A batch is sent once it is full, once no
//! connection is left that could still join it ([`HandoffWorker::flush`]:
//! the server has no other connection open), or once no further connection
//! became idle for [`BATCH_GAP`] (some connection is still busy): at
//! shutdown the idle connections all finish within a burst, so thousands
//! cost few datagrams (which matters most under Baton, which pushes each one
//! on as a message to a socket with a bounded queue). Sending as soon as
//! nothing more can come matters for latency: a connection is not read
//! between the moment it is stopped here and the moment the next generation
//! polls it, so a request its client sends meanwhile waits that long (a
//! fixed gap cost a keep-alive client about 3 ms per restart). Polling stays
//! on, so the manager drops a connection by itself if the client hangs up
//! while it waits in the store. Our copies are closed right after. Once all
//! are sent, a `BARRIER=1` waits until the manager has processed them, so
//! none is sent by a process that already exited (which the manager may not
//! be able to attribute).
//!
//! Under Baton, connections stored by a draining generation do not stay in
//! the store: Baton moves them at once to the running generation (see
//! [Receiving](#receiving-new-generation-while-running)).
//!
//! Some connections are closed instead of stored, cleanly (FIN) as any
//! server closes idle keep-alive connections:
//!
//! - when the process has no `NOTIFY_SOCKET` or `--handoff=false`;
//! - beyond `$FDSTORE` (systemd ≥ 254 announces the store's size);
//! - beyond the **name budget** ([`NameBudget`]): the next generation
//!   receives every name in one environment variable, `LISTEN_FDNAMES`, and
//!   Linux refuses to `execve` a process with any single environment string
//!   longer than `MAX_ARG_STRLEN` (128 KiB) — the manager could not start
//!   the next generation at all. At five bytes per connection (`conn` and
//!   the separator) about 25,000 fit.
//!
//! # Adopting (new generation, at start)
//!
//! Every connection fd passed in `LISTEN_FDS` is taken, then they are
//! removed from the store with **one** `FDSTOREREMOVE=1` + `FDNAME=conn`
//! (an fd stays in the store after it is passed, and would otherwise be
//! handed over again on the next restart). Removing by the shared name is
//! safe because this process received every fd of that name. Connections
//! stored under the per-connection names of earlier versions
//! (`conn/<pid>/<seq>`) are adopted too and removed by their own names, so
//! an upgrade keeps them. Each fd is then checked to be a connected TCP
//! socket and served like a newly accepted connection. One that cannot be
//! used is shut down (FIN, even though the manager may still hold a copy)
//! and closed: handed over but never adopted, it must not linger.
//!
//! If no next generation ever comes (the unit is stopped, or its next start
//! fails without a restart), systemd releases the store and the kernel
//! closes the connections.
//!
//! # Receiving (new generation, while running)
//!
//! Under Baton the new generation is already running when the old one is
//! told to stop, so what the old one stores could never reach it through
//! `LISTEN_FDS`. Baton sets `$BATON_HANDOFF_SOCKET`; the generation connects
//! before `READY=1` ([`HandoffReceiver::connect_from_env`]) and
//! [`PushedConnections`] receives the batches Baton pushes and yields them
//! to be served; each fd is checked like an adopted one
//! ([`pushed_connection`]) by the task that serves it. Pushed fds are
//! moved, not copied: nothing needs removing from any store.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use baton_sd::fdstore::CONNECTION;
use baton_sd::handoff::{Handoff, HandoffReceiver};
use baton_sd::wire::SCM_MAX_FD;
use baton_sd::{FdKind, FdPoll, ListenFds, Notifier, NotifyState, StoredName};

use crate::conn::IdleConnection;
use rustix::net::{AddressFamily, SocketType};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Linux's limit on one environment string, `NAME=value` and its NUL
/// included (`MAX_ARG_STRLEN`, 32 pages of 4 KiB).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;

/// Room left in `LISTEN_FDNAMES` for names this process does not know of
/// yet (sockets or stored fds added to the unit before the next start): an
/// overflow would stop the next generation from starting at all, which is
/// far worse than closing the last ~800 of 25,000 idle connections.
pub const NAME_BUDGET_RESERVE: usize = 4096;

/// How long to wait for the manager to acknowledge the final `BARRIER=1`.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the store worker waits for one more idle connection before it
/// sends a batch that is not full, while some connection is still busy (see
/// the [module docs](self)).
pub const BATCH_GAP: Duration = Duration::from_millis(2);

/// How many received batches may wait for the server to take them: the
/// receiver empties Baton's socket eagerly (its queue is short, and a full
/// one makes Baton keep connections in its store for the *next*
/// generation), so up to this many × 253 connections are buffered.
pub const PUSH_QUEUE: usize = 64;

/// How long a stopping receiver waits for batches already queued on the
/// handoff socket to be reported readable (see [`PushedConnections::stop`]).
pub const STOP_GRACE: Duration = Duration::from_millis(200);

/// Bytes one stored connection adds to `LISTEN_FDNAMES`: `conn` and a `:`.
pub const CONNECTION_NAME_COST: usize = CONNECTION.len() + 1;

/// How many connections the next generation can still be passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameBudget {
    /// Connections left.
    pub connections: usize,
}

impl NameBudget {
    /// The budget given the names passed to *this* generation: every name
    /// that is not a connection (sockets, other stored fds) will be passed
    /// again, so it is counted as spent, plus [`NAME_BUDGET_RESERVE`]; what
    /// is left is divided by [`CONNECTION_NAME_COST`]. `fdstore_max` is
    /// `$FDSTORE`, which also caps the count (every kept name counted
    /// against it, sockets included: a conservative overestimate by one or
    /// two).
    pub fn new<'a>(kept_names: impl IntoIterator<Item = &'a str>, fdstore_max: Option<usize>) -> Self {
        let mut bytes = MAX_ARG_STRLEN - "LISTEN_FDNAMES=".len() - 1 - NAME_BUDGET_RESERVE;
        let mut kept = 0;
        for name in kept_names {
            bytes = bytes.saturating_sub(name.len() + 1);
            kept += 1;
        }
        let by_names = bytes / CONNECTION_NAME_COST;
        let connections = match fdstore_max {
            Some(max) => by_names.min(max.saturating_sub(kept)),
            None => by_names,
        };
        Self { connections }
    }

    /// Takes room for up to `want` connections; returns how many fit.
    pub fn take(&mut self, want: usize) -> usize {
        let granted = want.min(self.connections);
        self.connections -= granted;
        granted
    }
}

/// `$FDSTORE` (systemd ≥ 254): the unit's `FileDescriptorStoreMax=`.
pub fn fdstore_max_from_env() -> Option<usize> {
    std::env::var("FDSTORE").ok()?.parse().ok()
}

/// Why a handed-over fd cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotAConnection {
    /// It is something else than a TCP stream socket.
    #[error("it is {0}, not a connected TCP socket")]
    Kind(FdKind),
    /// A TCP socket with no peer (never connected, or reset since).
    #[error("it is a TCP socket with no peer ({0})")]
    NotConnected(std::io::Error),
    /// `fstat`/`getsockopt` failed on it.
    #[error("it cannot be inspected: {0}")]
    Inspect(std::io::Error),
}

/// Checks that `fd` is a connected TCP socket (IPv4 or IPv6) and returns it
/// as one; otherwise shuts it down (FIN to a peer, if any, even though
/// another process may hold a copy) and closes it.
pub fn connection_from_fd(fd: OwnedFd) -> Result<std::net::TcpStream, NotAConnection> {
    // Two syscalls for the common case (thousands are taken from the fd
    // store at once after a restart): a peer address of family INET or INET6 means a connected
    // socket of that family, and only its type is left to check. Anything
    // else is told apart by `FdKind` for the error.
    if let Ok(Some(peer)) = rustix::net::getpeername(&fd)
        && matches!(peer.address_family(), AddressFamily::INET | AddressFamily::INET6)
        && rustix::net::sockopt::socket_type(&fd).is_ok_and(|ty| ty == SocketType::STREAM)
    {
        return Ok(std::net::TcpStream::from(fd));
    }
    let result = match FdKind::of(fd.as_fd()) {
        Ok(FdKind::Socket { family, ty: SocketType::STREAM, listening: false })
            if family == AddressFamily::INET || family == AddressFamily::INET6 =>
        {
            match rustix::net::getpeername(&fd) {
                Ok(_) => return Ok(std::net::TcpStream::from(fd)),
                Err(e) => NotAConnection::NotConnected(e.into()),
            }
        }
        Ok(kind) => NotAConnection::Kind(kind),
        Err(e) => NotAConnection::Inspect(e),
    };
    close_cleanly(fd);
    Err(result)
}

/// Connections taken over from the previous generation.
#[derive(Debug, Default)]
pub struct Adoption {
    /// Connected TCP sockets to serve.
    pub streams: Vec<std::net::TcpStream>,
    /// Connection fds that were not connected TCP sockets, closed.
    pub rejected: usize,
    /// `FDSTOREREMOVE=1` messages that could not be sent (those entries
    /// would be handed over again).
    pub remove_failed: usize,
}

/// Takes every connection fd from `fds`, removes them from the store (one
/// `FDSTOREREMOVE=1` for `conn`, one per legacy name) and keeps the usable
/// ones (see the [module docs](self)). Blocking; run it before serving.
pub fn adopt(fds: &mut ListenFds, notifier: Option<&Notifier>) -> Adoption {
    let taken = fds.take_matching(|name| StoredName::parse(name) == StoredName::Connection);
    let mut adoption = Adoption { streams: Vec::with_capacity(taken.len()), ..Adoption::default() };
    if let Some(n) = notifier {
        let names: BTreeSet<&str> = taken.iter().map(|(name, _)| name.as_str()).collect();
        for name in names {
            if let Err(e) = n.remove_fds(name) {
                tracing::warn!(name, error = %e, "cannot remove adopted connections from the fd store");
                adoption.remove_failed += 1;
            }
        }
    }
    for (name, fd) in taken {
        match connection_from_fd(fd) {
            Ok(stream) => adoption.streams.push(stream),
            Err(e) => {
                tracing::warn!(name, "a handed-over connection cannot be served: {e}; closing it");
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
    /// Stored in the fd store (or, under Baton, pushed to the running
    /// generation: this process cannot tell the difference).
    pub stored: usize,
    /// `FDSTORE=1` datagrams sent.
    pub datagrams: usize,
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
    /// Room in the next generation's `LISTEN_FDNAMES`.
    pub budget: NameBudget,
}

/// What the store worker is sent.
#[derive(Debug)]
enum ToWorker {
    /// Idle connections to store.
    Connections(Vec<IdleConnection>),
    /// No connection is left that could join the batch: send it now rather
    /// than after [`BATCH_GAP`].
    Flush,
}

/// Stores (or closes) idle connections on a blocking thread, in batches, as
/// the connection tasks finish.
///
/// Our copies of the connections it stored are released (deregistered
/// from the runtime and closed, see [`IdleConnection`]) only once no
/// connection came for [`RELEASE_GAP`], or at [`finish`](Self::finish)
/// after the manager confirmed them: during the burst every syscall spent
/// here is one the next generation waits for. Not later than that gap
/// either: while this process holds a copy, the next generation closing a
/// connection without `shutdown` would not reach its client.
#[derive(Debug)]
pub struct HandoffWorker {
    tx: mpsc::Sender<ToWorker>,
    /// A connection was queued since the last [`flush`](Self::flush).
    unflushed: AtomicBool,
    task: JoinHandle<(HandoffReport, Vec<Vec<IdleConnection>>)>,
}

/// How long the store worker waits without a new connection before it
/// releases our copies of those it stored (see [`HandoffWorker`]): longer
/// than the pauses within a drain's burst (the drain sweeps every
/// millisecond), short next to any idle timeout.
pub const RELEASE_GAP: Duration = Duration::from_millis(20);

impl HandoffWorker {
    /// Starts the worker. Must run inside a tokio runtime.
    pub fn spawn(plan: HandoffPlan) -> Self {
        // Bounded: connection tasks wait rather than pile up sockets. One
        // full batch can queue while the previous one is being sent.
        let (tx, rx) = mpsc::channel(SCM_MAX_FD);
        let runtime = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || Worker::new(plan).run(rx, &runtime));
        Self { tx, unflushed: AtomicBool::new(false), task }
    }

    /// Queues an idle connection that the runtime does not own.
    pub async fn hand_over_std(&self, stream: std::net::TcpStream) {
        self.hand_over_all(vec![stream.into()]).await;
    }

    /// Queues idle connections, in one message to the worker: at shutdown
    /// thousands become idle within a burst, and one wake-up of the worker
    /// per connection would cost more than storing them.
    pub async fn hand_over_all(&self, connections: Vec<IdleConnection>) {
        if connections.is_empty() {
            return;
        }
        // The worker lives until `finish`, which needs `self`.
        match self.tx.send(ToWorker::Connections(connections)).await {
            Ok(()) => self.unflushed.store(true, Relaxed),
            Err(mpsc::error::SendError(ToWorker::Connections(connections))) => close_all(connections),
            Err(mpsc::error::SendError(ToWorker::Flush)) => {}
        }
    }

    /// Tells the worker that no further connection can join the batch it is
    /// collecting (the server has no other connection open), so that it
    /// sends the batch now instead of waiting [`BATCH_GAP`] for more: every
    /// moment a connection spends between here and the next generation is
    /// latency for a request its client sends meanwhile. Does nothing if no
    /// connection was queued since the last call.
    pub async fn flush(&self) {
        if self.unflushed.swap(false, Relaxed) {
            // Fails only if the worker is gone, and then there is nothing
            // to send.
            let _ = self.tx.send(ToWorker::Flush).await;
        }
    }

    /// Waits until every queued connection is stored or closed, then sends
    /// `BARRIER=1` so the manager has processed them all before we exit,
    /// and releases our copies of the stored ones.
    pub async fn finish(self, notifier: Option<&Notifier>) -> HandoffReport {
        drop(self.tx);
        let (report, stored) = match self.task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the handoff worker failed");
                (HandoffReport::default(), Vec::new())
            }
        };
        if report.stored > 0
            && let Some(n) = notifier
            && let Err(e) = n.barrier_async(BARRIER_TIMEOUT).await
        {
            tracing::warn!(error = %e, "the service manager did not confirm the handed-over connections");
        }
        drop(stored);
        report
    }
}

/// The store worker's state (see [`HandoffWorker`]).
struct Worker {
    plan: HandoffPlan,
    report: HandoffReport,
    /// The datagram being filled: at most [`SCM_MAX_FD`] connections.
    batch: Vec<IdleConnection>,
    /// Batches stored, our copies not released yet.
    stored: Vec<Vec<IdleConnection>>,
}

impl Worker {
    fn new(plan: HandoffPlan) -> Self {
        Self { plan, report: HandoffReport::default(), batch: Vec::with_capacity(SCM_MAX_FD), stored: Vec::new() }
    }

    /// Until the channel closes; returns the report and the stored
    /// connections not released yet.
    fn run(
        mut self,
        mut rx: mpsc::Receiver<ToWorker>,
        runtime: &tokio::runtime::Handle,
    ) -> (HandoffReport, Vec<Vec<IdleConnection>>) {
        loop {
            let next = if !self.batch.is_empty() {
                // A datagram is open: more of the burst may join it.
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    // On a blocking-pool thread, so blocking on the runtime
                    // is allowed.
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match runtime.block_on(tokio::time::timeout(BATCH_GAP, rx.recv())) {
                            Ok(m) => m,
                            Err(_) => Some(ToWorker::Flush),
                        }
                    }
                }
            } else if !self.stored.is_empty() {
                match runtime.block_on(tokio::time::timeout(RELEASE_GAP, rx.recv())) {
                    Ok(m) => m,
                    Err(_) => {
                        // The burst is over.
                        self.stored.clear();
                        continue;
                    }
                }
            } else {
                rx.blocking_recv()
            };
            match next {
                Some(ToWorker::Connections(more)) => {
                    for connection in more {
                        self.batch.push(connection);
                        if self.batch.len() == SCM_MAX_FD {
                            self.store_batch();
                        }
                    }
                }
                // Nothing more can join the open datagram (or it waited
                // BATCH_GAP for more): it goes now.
                Some(ToWorker::Flush) => self.store_batch(),
                None => {
                    self.store_batch();
                    return (self.report, self.stored);
                }
            }
        }
    }

    /// Stores (or closes) the open datagram's connections.
    fn store_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut batch = std::mem::replace(&mut self.batch, Vec::with_capacity(SCM_MAX_FD));
        let report = &mut self.report;
        let notifier = match &self.plan.notifier {
            Some(n) if self.plan.enabled => Arc::clone(n),
            _ => {
                report.closed_no_handoff += batch.len();
                close_all(batch);
                return;
            }
        };
        let fit = self.plan.budget.take(batch.len());
        if fit < batch.len() {
            if report.closed_over_budget == 0 {
                tracing::warn!(
                    stored = report.stored + fit,
                    "no room for more connection names in the next generation's LISTEN_FDNAMES \
                     (or $FDSTORE is reached): closing the remaining idle connections"
                );
            }
            report.closed_over_budget += batch.len() - fit;
            close_all(batch.drain(fit..));
        }
        if batch.is_empty() {
            return;
        }
        let fds: Vec<_> = batch.iter().map(AsFd::as_fd).collect();
        let before = report.stored;
        let sent = notifier.store_fds(CONNECTION, &fds, FdPoll::Poll);
        drop(fds);
        match sent {
            Ok(()) => {
                report.stored += batch.len();
                report.datagrams += 1;
                // For the handover benchmark's breakdown.
                tracing::debug!(
                    count = batch.len(),
                    total = report.stored,
                    mono_us = baton_sd::monotonic_usec(),
                    "stored connections"
                );
                self.stored.push(batch);
            }
            Err(e) => {
                tracing::warn!(count = batch.len(), error = %e, "storing connections failed; closing them");
                report.store_failed += batch.len();
                close_all(batch);
            }
        }
        if report.stored / 1000 > before / 1000 {
            let status = format!("handing over connections: {} stored", report.stored);
            let _ = notifier.notify(&[NotifyState::Status(&status)]);
        }
    }
}

/// Shuts each connection down both ways (its client sees the close even if
/// another process still holds a copy of the socket) and closes it.
fn close_all<C: AsFd>(connections: impl IntoIterator<Item = C>) {
    for c in connections {
        let _ = rustix::net::shutdown(&c, rustix::net::Shutdown::Both);
    }
}

/// What the receiver of pushed connections saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Batches received.
    pub batches: usize,
    /// Fds named `conn` passed on to be served (those
    /// [`PushedConnections::next`] found unusable count as rejected; those
    /// taken with [`PushedConnections::next_batch`] are checked by the
    /// server).
    pub connections: usize,
    /// Fds that were not connected TCP sockets, or not named `conn`; closed.
    pub rejected: usize,
}

/// Connections Baton pushes to this generation while it runs (see the
/// [module docs](self#receiving-new-generation-while-running)): a task
/// receives them and yields them through [`next`](Self::next).
#[derive(Debug)]
pub struct PushedConnections {
    rx: mpsc::Receiver<Vec<OwnedFd>>,
    /// The batch being yielded.
    current: std::vec::IntoIter<OwnedFd>,
    /// Fds [`next`](Self::next) found unusable and closed.
    unusable: usize,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<ReceiveReport>,
}

impl PushedConnections {
    /// Starts receiving on `receiver`. Must run inside a tokio runtime.
    pub fn spawn(receiver: HandoffReceiver) -> Self {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(receive_all(receiver, tx, stopped));
        Self { rx, current: Vec::new().into_iter(), unusable: 0, stop: Some(stop), task }
    }

    /// The next pushed connection, checked ([`pushed_connection`]; an fd
    /// that is not one is shut down, closed and skipped); `None` once
    /// receiving has ended (Baton closed the socket, it failed, or
    /// [`stop`](Self::stop) was called and everything already queued has
    /// been yielded).
    pub async fn next(&mut self) -> Option<std::net::TcpStream> {
        loop {
            if let Some(fd) = self.current.next() {
                match pushed_connection(fd) {
                    Ok(s) => return Some(s),
                    Err(e) => {
                        tracing::warn!("a pushed connection cannot be served: {e}; closing it");
                        self.unusable += 1;
                        continue;
                    }
                }
            }
            self.current = self.rx.recv().await?.into_iter();
        }
    }

    /// The rest of the batch being yielded, or the next pushed batch (as
    /// Baton sent it, up to 253), **not checked yet**: each goes through
    /// [`pushed_connection`] where it is served. `None` once receiving has
    /// ended, as for [`next`](Self::next). Serving a batch at a time costs
    /// one wake-up per batch rather than per connection, and checking each
    /// where it is served spreads those syscalls over the runtime's
    /// threads: done here, they made the receiving task the hop that
    /// paced a handover (10,000 connections, `perf`).
    pub async fn next_batch(&mut self) -> Option<Vec<OwnedFd>> {
        let rest: Vec<_> = std::mem::take(&mut self.current).collect();
        if !rest.is_empty() {
            return Some(rest);
        }
        self.rx.recv().await
    }

    /// Stops waiting for more pushes: batches already queued on the socket
    /// are still received and yielded, then [`next`](Self::next) returns
    /// `None` — after at most [`STOP_GRACE`] without a batch, or at once if
    /// Baton closed the socket. Call it when draining starts: Baton pushes
    /// only to the active generation and makes another one active before it
    /// asks this one to stop, so whatever it pushed here is queued by then.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the receiving task to end and returns what it saw.
    pub async fn finish(mut self) -> ReceiveReport {
        self.stop();
        // Anything not yielded yet is closed: no one would serve it.
        self.rx.close();
        close_all(std::mem::take(&mut self.current));
        while let Some(batch) = self.rx.recv().await {
            close_all(batch);
        }
        let mut report = self.task.await.unwrap_or_default();
        report.connections -= self.unusable.min(report.connections);
        report.rejected += self.unusable;
        report
    }
}

/// A pushed fd as a connection to serve, made non-blocking for the runtime
/// (its file status flags are shared with the sender's copy, so most
/// likely it is already, but the runtime cannot do without it).
///
/// Cheaper than [`connection_from_fd`], which is the fallback for anything
/// but a plain TCP socket (MPTCP, and every error message): one lock-free
/// `getsockopt(SO_PROTOCOL)` proves a TCP socket, hence a stream of family
/// INET or INET6. That it is still connected is left to its first read, as
/// it is for a connection its client resets later: a TCP socket that never
/// had a peer or lost it fails that read and is closed (a listening one is
/// read, and closed, once a client connects to it). Thousands arrive at
/// once in a handover; `connection_from_fd`'s `getpeername` takes the
/// socket's lock, and with it the check was a fifth of the new
/// generation's CPU time in adopting 10,000 connections (`perf`).
pub fn pushed_connection(fd: OwnedFd) -> Result<std::net::TcpStream, NotAConnection> {
    let stream = match rustix::net::sockopt::socket_protocol(&fd) {
        Ok(Some(protocol)) if protocol == rustix::net::ipproto::TCP => std::net::TcpStream::from(fd),
        _ => connection_from_fd(fd)?,
    };
    stream.set_nonblocking(true).map_err(NotAConnection::Inspect)?;
    Ok(stream)
}

async fn receive_all(
    mut receiver: HandoffReceiver,
    tx: mpsc::Sender<Vec<OwnedFd>>,
    mut stop: oneshot::Receiver<()>,
) -> ReceiveReport {
    let mut report = ReceiveReport::default();
    loop {
        let received = tokio::select! {
            // A batch that is already there wins over stopping.
            biased;
            r = receiver.recv() => r,
            _ = &mut stop => break,
        };
        match received {
            Ok(Some(handoff)) => forward(handoff, &tx, &mut report).await,
            Ok(None) => {
                tracing::debug!("the handoff socket was closed by Baton");
                return report;
            }
            Err(e) => {
                tracing::warn!(error = %e, "receiving handed-over connections failed; no more will arrive here");
                return report;
            }
        }
    }
    // Stopping: take the batches already queued. The runtime learns that
    // the socket is readable only when its I/O driver next polls, which
    // may come after the stop request was seen: allow it STOP_GRACE to
    // report a queued batch (Baton pushed before it sent the stop signal,
    // so nothing queued can be later than that; an EOF ends this at once).
    loop {
        match tokio::time::timeout(STOP_GRACE, receiver.recv()).await {
            Ok(Ok(Some(handoff))) => forward(handoff, &tx, &mut report).await,
            Ok(Ok(None) | Err(_)) | Err(_) => return report,
        }
    }
}

async fn forward(handoff: Handoff, tx: &mpsc::Sender<Vec<OwnedFd>>, report: &mut ReceiveReport) {
    report.batches += 1;
    if StoredName::parse(&handoff.name) != StoredName::Connection {
        tracing::warn!(name = handoff.name, "Baton pushed fds that are not connections; closing them");
        report.rejected += handoff.fds.len();
        handoff.fds.into_iter().for_each(close_cleanly);
        return;
    }
    report.connections += handoff.fds.len();
    if let Err(mpsc::error::SendError(fds)) = tx.send(handoff.fds).await {
        // The server stopped taking connections: close them cleanly.
        close_all(fds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fdnames_len(names: &[&str]) -> usize {
        "LISTEN_FDNAMES=".len() + names.join(":").len() + 1
    }

    #[test]
    fn budget_counts_kept_names_and_stops_at_the_limit() {
        let full = (MAX_ARG_STRLEN - 16 - NAME_BUDGET_RESERVE) / 5;
        assert_eq!(NameBudget::new([], None).connections, full);
        let b = NameBudget::new(["http", "baton-httpd.generation"], None);
        assert_eq!(b.connections, (MAX_ARG_STRLEN - 16 - NAME_BUDGET_RESERVE - 5 - 23) / 5);
        // $FDSTORE caps it, kept names counted against it.
        assert_eq!(NameBudget::new(["http", "baton-httpd.generation"], Some(10)).connections, 8);
        assert_eq!(NameBudget::new(["a", "b", "c"], Some(2)).connections, 0);

        let mut b = NameBudget { connections: 300 };
        assert_eq!(b.take(253), 253);
        assert_eq!(b.take(253), 47);
        assert_eq!(b.take(1), 0);
        assert_eq!(b.connections, 0);
    }

    #[test]
    fn the_budget_fits_in_one_environment_string() {
        // Whatever the budget allows must still exec: the longest
        // LISTEN_FDNAMES it permits stays within MAX_ARG_STRLEN, reserve
        // included, and one more name would not fit in the reserve-less
        // remainder much longer.
        let kept = ["http", "listen/http", "baton-httpd.generation"];
        let n = NameBudget::new(kept, None).connections;
        let mut names: Vec<&str> = kept.to_vec();
        names.extend(std::iter::repeat_n(CONNECTION, n));
        let len = fdnames_len(&names);
        assert!(len + NAME_BUDGET_RESERVE <= MAX_ARG_STRLEN, "{len}");
        assert!(len + NAME_BUDGET_RESERVE + CONNECTION_NAME_COST > MAX_ARG_STRLEN, "{len}: budget too small");
    }

    #[test]
    fn ten_thousand_connections_fit_now() {
        // The reason for the shared name: 10,000 per-connection names
        // (`conn/123/<seq>`) overflowed MAX_ARG_STRLEN; 10,000 `conn` fit
        // with room for 15,000 more.
        let legacy: usize = (0..10_000).map(|seq| format!("conn/123/{seq}").len() + 1).sum();
        assert!(legacy > MAX_ARG_STRLEN, "{legacy}");
        let n = NameBudget::new(["http", "baton-httpd.generation"], None).connections;
        assert!((25_000..26_214).contains(&n), "{n}");
    }

    /// Receives one datagram from `socket` (blocking, bounded by its read
    /// timeout): its text and how many fds it carried.
    fn recv_datagram(socket: &std::os::unix::net::UnixDatagram) -> std::io::Result<(String, usize)> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut buf = [0u8; 4096];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
        let mut fds = 0;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds += received.count();
            }
        }
        Ok((String::from_utf8_lossy(&buf[..msg.bytes]).into_owned(), fds))
    }

    /// `flush` ends the batch being collected at once: a connection handed
    /// over and flushed goes in its own datagram even when the next one
    /// follows right away (without the flush both would wait out
    /// `BATCH_GAP` together), and a flush with nothing queued sends nothing.
    #[test]
    fn flush_sends_the_batch_without_waiting_for_more() {
        let address = format!("@baton-httpd-test-flush-{}", std::process::id());
        let manager = std::os::unix::net::UnixDatagram::from(
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::DGRAM, rustix::net::SocketFlags::CLOEXEC, None)
                .unwrap(),
        );
        let name = rustix::net::SocketAddrUnix::new_abstract_name(&address.as_bytes()[1..]).unwrap();
        rustix::net::bind(&manager, &name).unwrap();
        manager.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let notifier = Arc::new(Notifier::new(&address).unwrap());

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (c, listener.accept().unwrap().0)
        };
        let (clients, servers): (Vec<_>, Vec<_>) = (0..2).map(|_| pair()).unzip();

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let report = rt.block_on(async {
            let plan = HandoffPlan { notifier: Some(notifier), enabled: true, budget: NameBudget { connections: 100 } };
            let worker = HandoffWorker::spawn(plan);
            worker.flush().await;
            let mut servers = servers.into_iter();
            worker.hand_over_std(servers.next().unwrap()).await;
            worker.flush().await;
            worker.hand_over_std(servers.next().unwrap()).await;
            worker.flush().await;
            worker.flush().await;
            worker.finish(None).await
        });
        assert_eq!((report.stored, report.datagrams), (2, 2), "{report:?}");
        for i in 0..2 {
            let (text, fds) = recv_datagram(&manager).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert!(text.contains("FDSTORE=1") && text.contains("FDNAME=conn"), "{text:?}");
            assert_eq!(fds, 1, "datagram {i}: {text:?}");
        }
        manager.set_nonblocking(true).unwrap();
        let more = recv_datagram(&manager);
        assert!(more.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "{more:?}");
        drop(clients);
    }

    #[test]
    fn only_connected_tcp_sockets_are_connections() {
        use std::os::fd::OwnedFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(connection_from_fd(OwnedFd::from(server)).is_ok());
        let err = connection_from_fd(OwnedFd::from(listener)).unwrap_err();
        assert!(matches!(err, NotAConnection::Kind(_)), "{err}");
        assert!(err.to_string().contains("listening"), "{err}");
        // A TCP socket that was never connected.
        let fresh =
            rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, rustix::net::SocketFlags::CLOEXEC, None)
                .unwrap();
        let err = connection_from_fd(fresh).unwrap_err();
        assert!(matches!(err, NotAConnection::NotConnected(_)), "{err}");
        let (r, _w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        assert!(matches!(connection_from_fd(r), Err(NotAConnection::Kind(FdKind::Fifo))));
        drop(client);
    }

    #[test]
    fn pushed_connections_are_tcp_sockets_made_non_blocking() {
        use std::io::Read;
        use std::os::fd::OwnedFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut stream = pushed_connection(OwnedFd::from(server)).expect("a connected TCP socket");
        // Non-blocking: a read with nothing to read does not wait.
        let read = stream.read(&mut [0u8; 1]);
        assert!(read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "{read:?}");
        // Not TCP: refused, with what it is.
        let (r, _w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        assert!(matches!(pushed_connection(r), Err(NotAConnection::Kind(FdKind::Fifo))));
        let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = pushed_connection(OwnedFd::from(unix)).unwrap_err();
        assert!(matches!(err, NotAConnection::Kind(FdKind::Socket { .. })), "{err}");
        // A TCP socket that was never connected passes the check; its
        // first read fails, which closes it where it is served.
        let fresh =
            rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, rustix::net::SocketFlags::CLOEXEC, None)
                .unwrap();
        let mut fresh = pushed_connection(fresh).expect("a TCP socket");
        let read = fresh.read(&mut [0u8; 1]);
        assert!(read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::NotConnected), "{read:?}");
        drop(client);
    }
}
