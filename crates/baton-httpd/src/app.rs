//! The life of one generation: start, serve, drain, hand over, exit.
//!
//! 1. Take the passed fds (before any thread exists) and build the runtime.
//! 2. `STATUS=starting`; the test knobs `--startup-delay` and
//!    `--fail-startup` act here, before any passed fd is touched.
//! 3. Open the root, get the listening socket ([`crate::listener`]), the
//!    generation ([`crate::generation`]) and the handed-over connections
//!    ([`crate::handoff::adopt`]), and Baton's `probe` listener if passed
//!    (`baton run --probe`, served like the listening socket); under Baton, connect to
//!    `$BATON_HANDOFF_SOCKET` (before `READY=1`: Baton pushes connections
//!    only to the active generation, which this one becomes at `READY=1`).
//! 4. Serve the adopted connections, then `READY=1` — only now can every
//!    request be answered — and accept new ones, and serve the connections
//!    Baton pushes ([`crate::handoff::PushedConnections`]). Ping the
//!    watchdog if asked. Each connection has its header and idle deadlines
//!    ([`crate::conn`]); new ones beyond `--max-connections` are refused,
//!    and accepting pauses at the fd limit ([`crate::admission`]).
//! 5. On SIGTERM/SIGINT: `STOPPING=1`, stop accepting (a passed or stored
//!    listener stays open in the manager, so new connections wait in its
//!    backlog), let in-flight requests finish within `--drain-timeout`,
//!    hand each connection over as soon as it is idle (and pushed ones that
//!    were still queued, at once), `BARRIER=1`, exit 0. When nothing can be
//!    handed over (`--handoff=false`, no manager, or `STOPPING=1` failed:
//!    the manager is gone) idle connections are closed instead, and a
//!    fresh one first gets a moment to send its first request
//!    ([`crate::conn::FIRST_REQUEST_GRACE`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use baton_sd::handoff::HandoffReceiver;
use baton_sd::shutdown::Shutdown;
use baton_sd::{ActivationError, ListenFds, Notifier, NotifyError, NotifyState, StoredName, watchdog};
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::admission::{AcceptPacer, Refuser};
use crate::config::Config;
use crate::conn::lot::{Lot, TaskLot};
use crate::conn::{self, Arrival, Deadlines, DrainMode, DrainSignal, IdleConnection, Outcome};
use crate::files::{Files, FilesError};
use crate::generation::{self, GENERATION_FDNAME, GenerationError};
use crate::handoff::{self, HandoffPlan, HandoffWorker, NameBudget, PushedConnections};
use crate::listener::{self, ListenError, Origin};
use crate::logging;
use crate::service::{Handler, Identity};

/// Why a generation could not start (or serve).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// `LISTEN_*` is malformed or a passed fd is unusable.
    #[error(transparent)]
    Activation(#[from] ActivationError),
    /// `WATCHDOG_USEC`/`WATCHDOG_PID` are malformed.
    #[error(transparent)]
    Env(#[from] baton_sd::wire::EnvError),
    /// `NOTIFY_SOCKET` is unusable.
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// The root directory cannot be opened.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// No listening socket.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// `BATON_GENERATION` is malformed.
    #[error(transparent)]
    Generation(#[from] GenerationError),
    /// The runtime, signal handlers or a socket could not be set up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `--fail-startup` was given.
    #[error("failing on purpose before READY=1 (--fail-startup)")]
    FailStartup,
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> AppError {
    move |source| AppError::Setup { what, source }
}

/// Fds reserved ahead beyond the connection limit: sockets, files served,
/// the runtime's own.
const FD_RESERVE_EXTRA: usize = 1024;
/// The largest fd table reserved ahead (512 KiB of kernel memory); beyond
/// it the table grows as needed.
const FD_RESERVE_MAX: usize = 65_536;

/// `baton-httpd`'s `main`: parses the command line, runs one generation,
/// and maps the outcome to the exit status.
pub fn main() -> ExitCode {
    let config = Config::parse();
    logging::init();
    // SAFETY: no other thread exists yet; the runtime is built below.
    let fds = unsafe { ListenFds::from_env_and_unset() };
    // Before the runtime's threads: a handover brings thousands of fds at
    // once, and growing the table while threads run waits for RCU each
    // time (see `baton_sd::fdtable`). Up to a bound: the table is kept for
    // good.
    if let Err(e) = baton_sd::reserve_fds((config.connection_limit() + FD_RESERVE_EXTRA).min(FD_RESERVE_MAX)) {
        tracing::debug!(error = %e, "cannot grow the fd table ahead");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.threads {
        builder.worker_threads(n.get());
    }
    let result = match builder.enable_all().build() {
        Ok(rt) => {
            let result = rt.block_on(run(config, fds));
            // Not shut down: that would drop every task still pending one
            // by one — after a handover, those of the thousands of
            // connections the drain took (see `conn::park`): tens of ms of
            // CPU while the next generation serves the same connections.
            // The process exits right after; the kernel reclaims it all at
            // once.
            std::mem::forget(rt);
            result
        }
        Err(e) => Err(setup("starting the tokio runtime")(e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            if let Ok(Some(n)) = Notifier::from_env() {
                let status = format!("failed: {e}");
                let _ = n.notify(&[NotifyState::Status(&status)]);
            }
            ExitCode::FAILURE
        }
    }
}

fn status(notifier: Option<&Notifier>, text: &str) {
    if let Some(n) = notifier
        && let Err(e) = n.notify(&[NotifyState::Status(text)])
    {
        tracing::warn!(error = %e, "cannot send STATUS=");
    }
}

/// Runs one generation to the end (see the [module docs](self)). `fds` is
/// what [`ListenFds::from_env_and_unset`] returned before the runtime
/// started.
pub async fn run(config: Config, fds: Result<ListenFds, ActivationError>) -> Result<(), AppError> {
    let notifier = Notifier::from_env()?.map(Arc::new);
    let n = notifier.as_deref();
    status(n, "starting");
    let mut shutdown = Shutdown::install().map_err(setup("installing the SIGTERM handler"))?;

    if !config.startup_delay.is_zero() {
        status(n, &format!("starting: waiting {:?} (--startup-delay)", config.startup_delay));
        tokio::select! {
            () = tokio::time::sleep(config.startup_delay) => {}
            (signal, _) = shutdown.wait(n) => {
                tracing::info!(?signal, "stopped while starting");
                return Ok(());
            }
        }
    }
    if config.fail_startup {
        return Err(AppError::FailStartup);
    }

    let mut fds = fds?;
    let files = Files::open(&config.root)?;
    // Names that will be passed to the next generation again: everything
    // but connections, plus what this start may add to the store.
    let mut kept: Vec<String> = fds
        .names()
        .map(|(_, name, _)| name)
        .filter(|name| StoredName::parse(name) != StoredName::Connection)
        .map(str::to_owned)
        .collect();
    let acquired = listener::acquire(&mut fds, &config.socket_name, config.listen, n.filter(|_| config.handoff))?;
    // Baton's private probe listener (`baton run --probe`): served like the
    // listening socket, so a health check reaches this generation only.
    let probe = fds.take_probe_listener()?;
    let generation = generation::determine(&mut fds, n)?;
    let adoption = handoff::adopt(&mut fds, n);
    for (fd, name, available) in fds.names() {
        if available {
            tracing::info!(fd, name, "ignoring a passed fd this server does not use");
        }
    }
    drop(fds);
    for extra in [GENERATION_FDNAME.to_owned(), StoredName::Listener(&config.socket_name).to_string()] {
        if !kept.contains(&extra) {
            kept.push(extra);
        }
    }

    // Not fatal: without a receiver, Baton keeps what the old generation
    // stores and passes it to the next start instead.
    let receiver = match HandoffReceiver::connect_from_env() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot connect to Baton's handoff socket; connections handed over while running will reach \
                 the next generation instead of this one"
            );
            None
        }
    };
    let mut pushed = receiver.map(PushedConnections::spawn);

    let identity = Identity {
        pid: std::process::id(),
        generation,
        started: SystemTime::now(),
        adopted: adoption.streams.len() as u64,
    };
    let handler = Handler::new(files, identity);
    acquired.listener.set_nonblocking(true).map_err(setup("making the listening socket non-blocking"))?;
    let listener = TcpListener::from_std(acquired.listener).map_err(setup("registering the listening socket"))?;
    let local = listener.local_addr().map_err(setup("reading the listening address"))?;
    let probe = match probe {
        Some(p) => {
            p.set_nonblocking(true).map_err(setup("making the probe listener non-blocking"))?;
            Some(TcpListener::from_std(p).map_err(setup("registering the probe listener"))?)
        }
        None => None,
    };
    let probe_addr = probe.as_ref().and_then(|p| p.local_addr().ok());

    let drain = DrainSignal::new();
    let deadlines =
        Deadlines { header: config.header_deadline(), idle: config.idle_deadline(), max_head: config.max_request_head };
    let mut refuser = Refuser::new(config.connection_limit());
    let mut pacer = AcceptPacer::default();
    let mut conns: JoinSet<()> = JoinSet::new();
    let pen = Pen::default();
    // Handed-over connections wait there for their next request, without a
    // task each; without it (no epoll instance to be had), each waits in
    // its own task.
    let mut lot = match Lot::new(deadlines.idle) {
        Ok(lot) => Some(lot),
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up the lot for handed-over connections; each gets its own task");
            None
        }
    };
    // Pushed batches go alternately to a second lot kept by a task of its
    // own, when the runtime has more than one thread to run it on.
    let mut task_lot = match &lot {
        Some(_) if tokio::runtime::Handle::current().metrics().num_workers() > 1 => {
            match TaskLot::spawn(deadlines.idle) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up a second lot for handed-over connections");
                    None
                }
            }
        }
        _ => None,
    };
    let mut to_task_lot = false;
    // Adopted and pushed connections count towards the limit but are never
    // refused: their clients are already being served.
    let adopted_fds = adoption.streams.into_iter().map(std::os::fd::OwnedFd::from).collect();
    for fd in park_all_in(&mut lot, adopted_fds) {
        match adopt_stream(std::net::TcpStream::from(fd)) {
            Ok(s) => {
                let served = conn::drive_handed_over(s, handler.clone(), drain.clone(), deadlines, || ());
                spawn_conn(&mut conns, &pen, served);
            }
            Err(e) => tracing::warn!(error = %e, "cannot serve an adopted connection; closing it"),
        }
    }
    // A pushed connection's task checks it first (see
    // `PushedConnections::next_batch`).
    let serve_pushed = |fd: std::os::fd::OwnedFd, batch: Arc<PushedBatch>| {
        let (handler, drain) = (handler.clone(), drain.clone());
        async move {
            match handoff::pushed_connection(fd) {
                Ok(s) => conn::drive_handed_over(s, handler, drain, deadlines, move || drop(batch)).await,
                Err(e) => {
                    drop(batch);
                    tracing::warn!("a pushed connection cannot be served: {e}; closing it");
                    Outcome::Closed
                }
            }
        }
    };
    // A connection that became readable in the lot: checked, then served
    // by hyper at once.
    let serve_readable = |fd: std::os::fd::OwnedFd| {
        let (handler, drain) = (handler.clone(), drain.clone());
        async move {
            let stream = handoff::pushed_connection(fd)
                .map_err(|e| e.to_string())
                .and_then(|s| TcpStream::from_std(s).map_err(|e| format!("cannot register it: {e}")));
            match stream {
                Ok(s) => conn::drive(s, handler, drain, deadlines, Arrival::HandedOver).await,
                Err(e) => {
                    tracing::warn!("a handed-over connection cannot be served: {e}; closing it");
                    Outcome::Closed
                }
            }
        }
    };
    let adopted = conns.len() + lot_len(&lot, &task_lot);
    let receiving = if pushed.is_some() { ", receiving handed-over connections" } else { "" };

    let serving = format!(
        "serving on {local} ({}), generation {generation}, {adopted} connections adopted{receiving}",
        match acquired.origin {
            Origin::Passed => "passed socket",
            Origin::Stored => "stored socket",
            Origin::Bound => "bound socket",
        }
    );
    if let Some(arc) = &notifier {
        arc.notify(&[NotifyState::Ready, NotifyState::Status(&serving)])?;
        if let Some(timeout) = watchdog::watchdog_timeout()? {
            // Detached: it pings until the process exits.
            drop(watchdog::spawn_watchdog(Arc::clone(arc), timeout));
        }
    }
    tracing::info!(
        rejected = adoption.rejected,
        root = %config.root.display(),
        max_connections = refuser.limit(),
        header_timeout = ?deadlines.header,
        idle_timeout = ?deadlines.idle,
        max_request_head = deadlines.max_head,
        probe = ?probe_addr,
        "{serving}"
    );

    let fail_after_ready = async {
        match config.fail_after_ready {
            Some(delay) => tokio::time::sleep(delay).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(fail_after_ready);
    // Whether the manager took `STOPPING=1`: if not (Baton was killed),
    // nothing stored now would reach anyone.
    // Connections pushed by Baton while serving, for the log.
    let mut adopted_pushed = 0usize;
    let manager_reachable = loop {
        tokio::select! {
            accepted = accept_any(&listener, probe.as_ref()), if pacer.paused_until().is_none() => match accepted {
                Ok((stream, _)) => {
                    pacer.accepted();
                    if refuser.over_limit(conns.len() + lot_len(&lot, &task_lot)) {
                        refuser.refuse(stream);
                    } else {
                        // Small responses must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        let served = conn::drive(stream, handler.clone(), drain.clone(), deadlines, Arrival::Accepted);
                        spawn_conn(&mut conns, &pen, served);
                    }
                }
                Err(e) => pacer.failed(&e),
            },
            // The listener stays readable while accepting fails: waiting
            // here, not in the accept branch, keeps the rest of the loop
            // (connections ending, pushes, SIGTERM) going.
            () = pause_over(pacer.paused_until()), if pacer.paused_until().is_some() => pacer.resume(),
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            fd = lot_readable(&mut lot) => spawn_conn(&mut conns, &pen, serve_readable(fd)),
            fd = task_lot_readable(&mut task_lot) => spawn_conn(&mut conns, &pen, serve_readable(fd)),
            next = next_pushed_batch(&mut pushed) => match next {
                Some(batch) => {
                    let count = batch.len();
                    adopted_pushed += count;
                    let stamp = Arc::new(PushedBatch { count, total: adopted_pushed });
                    to_task_lot = !to_task_lot;
                    match task_lot.as_ref().filter(|_| to_task_lot) {
                        Some(t) => t.park(batch, move || drop(stamp)).await,
                        None => {
                            for fd in park_all_in(&mut lot, batch) {
                                spawn_conn(&mut conns, &pen, serve_pushed(fd, Arc::clone(&stamp)));
                            }
                        }
                    }
                    handler.count_adopted(count as u64);
                }
                None => {
                    if let Some(p) = pushed.take() {
                        let r = p.finish().await;
                        tracing::warn!(
                            received = r.connections,
                            "Baton's handoff socket closed; connections handed over while running will reach \
                             the next generation instead of this one"
                        );
                    }
                }
            },
            (signal, sent) = shutdown.wait(n) => {
                if let Err(e) = &sent {
                    tracing::warn!(error = %e, "cannot send STOPPING=1");
                }
                tracing::info!(?signal, connections = conns.len() + lot_len(&lot, &task_lot), mono_us = baton_sd::monotonic_usec(), "stopping");
                break sent.is_ok();
            }
            () = &mut fail_after_ready => {
                tracing::error!("exiting abruptly with status 1 (--fail-after-ready)");
                std::process::exit(1);
            }
        }
    };

    // Stop accepting. A passed or stored listener stays open in the manager.
    drop(listener);
    drop(probe);
    let open = conns.len() + lot_len(&lot, &task_lot);
    status(n, &format!("draining {open} connections"));
    let mode =
        if config.handoff && notifier.is_some() && manager_reachable { DrainMode::HandOver } else { DrainMode::Close };
    tracing::debug!(?mode, "draining");
    pen.reserve(open);
    let mut parked = drain.start(mode);
    // Their tasks stay pending until released (see `conn::park`); the
    // lot's have none.
    let mut unreleased = parked.len();
    if let Some(lot) = &mut lot {
        parked.extend(lot.take_all().into_iter().map(IdleConnection::from));
    }
    if let Some(lot) = &mut task_lot {
        parked.extend(lot.take_all().await.into_iter().map(IdleConnection::from));
    }
    // Pushes that were queued before we were asked to stop still arrive;
    // then the stream ends.
    if let Some(p) = &mut pushed {
        p.stop();
    }
    let worker = HandoffWorker::spawn(HandoffPlan {
        notifier: notifier.clone(),
        enabled: config.handoff,
        budget: NameBudget::new(kept.iter().map(String::as_str), handoff::fdstore_max_from_env()),
    });
    // The parked connections, most of the idle ones, go at once.
    worker.hand_over_all(parked).await;
    let release_at = tokio::time::Instant::now() + handoff::RELEASE_GAP;
    let deadline = far_or(config.drain_timeout);
    let mut cut = 0;
    // The connections' tasks put what they stop into the pen; it is swept
    // every PEN_SWEEP rather than woken for by each task (thousands end
    // within a burst, and a wake-up each cost more than storing them).
    let mut sweep = tokio::time::interval(PEN_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = async {
            tokio::select! {
                biased;
                // Never served here: idle by definition, straight on.
                Some(batch) = next_pushed_batch(&mut pushed) => Drained::Pushed(batch),
                _ = sweep.tick() => Drained::Sweep,
            }
        };
        match tokio::time::timeout_at(deadline, next).await {
            Ok(Drained::Pushed(batch)) => {
                handler.count_adopted(batch.len() as u64);
                worker.hand_over_all(batch.into_iter().map(IdleConnection::from).collect()).await;
            }
            Ok(Drained::Sweep) => {}
            Err(_) => {
                cut = conns.len();
                tracing::warn!(
                    connections = cut,
                    deadline = ?config.drain_timeout,
                    "drain deadline passed; closing connections still busy"
                );
                conns.shutdown().await;
                worker.hand_over_all(pen.take()).await;
                break;
            }
        }
        // Ended tasks first: what they stopped is in the pen by then.
        while let Some(ended) = conns.try_join_next() {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a connection task failed");
            }
        }
        worker.hand_over_all(pen.take()).await;
        if unreleased > 0 && conns.len() > unreleased && tokio::time::Instant::now() >= release_at {
            // Other connections keep the drain going: let go of our copies
            // of the taken ones.
            drain.release_taken();
            unreleased = 0;
        }
        if conns.len() == unreleased {
            // No connection left that could still become idle: what is
            // queued goes now, not after the batching gap.
            worker.flush().await;
            // Done once no pushed one can come.
            match pushed.take() {
                None => break,
                Some(mut p) => match p.next_batch().await {
                    Some(batch) => {
                        pushed = Some(p);
                        handler.count_adopted(batch.len() as u64);
                        worker.hand_over_all(batch.into_iter().map(IdleConnection::from).collect()).await;
                    }
                    None => drop(p.finish().await),
                },
            }
        }
    }
    if let Some(p) = pushed.take() {
        p.finish().await;
    }
    // The tasks of taken connections, still pending: left to the process's
    // exit (see `main`), not aborted one by one.
    conns.detach_all();
    let report = worker.finish(n).await;
    let summary = format!(
        "stopped: {} connections handed over, {} closed idle, {} cut at the drain deadline",
        report.stored,
        report.closed_no_handoff + report.closed_over_budget + report.store_failed,
        cut
    );
    tracing::info!(over_budget = report.closed_over_budget, store_failed = report.store_failed, "{summary}");
    status(n, &summary);
    Ok(())
}

/// What the drain loop waits for.
enum Drained {
    Pushed(Vec<std::os::fd::OwnedFd>),
    Sweep,
}

/// How often a drain collects the connections its tasks stopped.
const PEN_SWEEP: std::time::Duration = std::time::Duration::from_millis(1);

/// Where connection tasks leave the connections a drain stopped at a
/// request boundary ([`Outcome::Idle`]), for the drain loop to hand over.
#[derive(Clone, Default)]
struct Pen(Arc<std::sync::Mutex<Vec<IdleConnection>>>);

impl Pen {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        // A push or a drain cannot leave the Vec inconsistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Room for `n` more without growing: growing a Vec of thousands in
    /// the burst (copied, under the lock) showed in the drain's profile.
    fn reserve(&self, n: usize) {
        self.lock().reserve(n);
    }

    fn put(&self, connection: IdleConnection) {
        self.lock().push(connection);
    }

    /// What is in the pen, in a Vec of its own size; the pen keeps its
    /// room.
    fn take(&self) -> Vec<IdleConnection> {
        self.lock().drain(..).collect()
    }
}

/// Parks `fds` in `lot`, if there is one; gives back those that cannot
/// wait there (all of them, without a lot), to be served in a task each.
fn park_all_in(lot: &mut Option<Lot>, fds: Vec<std::os::fd::OwnedFd>) -> Vec<std::os::fd::OwnedFd> {
    let Some(lot) = lot else { return fds };
    let refused = lot.park_all(fds);
    refused
        .into_iter()
        .map(|(fd, e)| {
            tracing::debug!(error = %e, "a handed-over connection cannot wait in the lot; it gets its own task");
            fd
        })
        .collect()
}

fn lot_len(lot: &Option<Lot>, task_lot: &Option<TaskLot>) -> usize {
    lot.as_ref().map_or(0, Lot::len) + task_lot.as_ref().map_or(0, TaskLot::len)
}

/// The next connection of `lot` that became readable; never, without one.
async fn lot_readable(lot: &mut Option<Lot>) -> std::os::fd::OwnedFd {
    match lot {
        Some(lot) => lot.readable().await,
        None => std::future::pending().await,
    }
}

/// [`lot_readable`] for the second lot.
async fn task_lot_readable(lot: &mut Option<TaskLot>) -> std::os::fd::OwnedFd {
    match lot {
        Some(lot) => lot.readable().await,
        None => std::future::pending().await,
    }
}

/// A batch of pushed connections being adopted. Each connection's task
/// holds it until the runtime watches that connection, so it is dropped
/// when the last one of the batch is, which is the moment the handover
/// benchmark's breakdown wants: its debug line (one per batch of up to 253)
/// carries the stamp.
struct PushedBatch {
    count: usize,
    /// Connections pushed so far, this batch included.
    total: usize,
}

impl Drop for PushedBatch {
    fn drop(&mut self) {
        tracing::debug!(
            count = self.count,
            total = self.total,
            mono_us = baton_sd::monotonic_usec(),
            "adopted pushed connections"
        );
    }
}

/// Serves one connection as a task of `conns`; if a drain stops it idle,
/// it goes into `pen`.
fn spawn_conn(conns: &mut JoinSet<()>, pen: &Pen, conn: impl std::future::Future<Output = Outcome> + Send + 'static) {
    let pen = pen.clone();
    conns.spawn(async move {
        if let Outcome::Idle(stream) = conn.await {
            pen.put(stream);
        }
    });
}

/// The next batch of pushed connections, or `None` when the stream ended;
/// never ready when there is no receiver.
async fn next_pushed_batch(pushed: &mut Option<PushedConnections>) -> Option<Vec<std::os::fd::OwnedFd>> {
    match pushed {
        Some(p) => p.next_batch().await,
        None => std::future::pending().await,
    }
}

/// A handed-over connection, ready for [`conn::drive_handed_over`].
/// `TCP_NODELAY` is the socket's and was set where it was accepted (by a
/// generation of this server): one syscall fewer per connection, thousands
/// at once. The file status flags are shared with the sender's copy, so
/// `O_NONBLOCK` is most likely set already, but the runtime cannot do
/// without it.
fn adopt_stream(stream: std::net::TcpStream) -> std::io::Result<std::net::TcpStream> {
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// `timeout` from now; a timeout too long to add to the clock (e.g.
/// `--drain-timeout 1e19s`) is taken as 30 years, in effect no deadline.
fn far_or(timeout: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + std::time::Duration::from_secs(30 * 365 * 86_400))
}

/// The next connection on the listening socket or, if there is one, the
/// probe listener (both are served alike; `accept` is cancel-safe).
async fn accept_any(
    listener: &TcpListener,
    probe: Option<&TcpListener>,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match probe {
        Some(probe) => tokio::select! {
            accepted = listener.accept() => accepted,
            accepted = probe.accept() => accepted,
        },
        None => listener.accept().await,
    }
}

/// Ready when an accept pause ends (never, without one).
async fn pause_over(until: Option<tokio::time::Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
