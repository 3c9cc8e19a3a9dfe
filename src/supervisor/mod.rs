//! The generation state machine.
//!
//! One task owns all state and reacts to events — control requests, notify
//! datagrams, child exits, fd-store hang-ups, timers, signals — so there are
//! no locks and every transition is in one place:
//!
//! ```text
//!   spawn ──► Starting ──READY=1──► (HealthCheck) ──► Active ──restart──► Draining ──exit──► gone
//!                │                                         │
//!                └── exit / ready timeout / bad health ──► killed; the Active one keeps serving
//! ```
//!
//! At most one generation is starting at a time. Restart requests that
//! arrive meanwhile wait for the *next* restart, which starts as soon as the
//! current one ends, and all of them get its outcome.
//!
//! `baton upgrade` ([`crate::upgrade`]) is handled here too: the new binary
//! is probed by a separate task while the supervisor goes on; then, only
//! between restarts, the whole state is handed over and the process
//! re-executes itself ([`Supervisor::adopt`] is the other side).
//!
//! The decisions are the pure `core`'s: the generation table, the restart
//! transaction, exits, the watchdog, backoff, stopping, where stored fds
//! go, upstream notifications, upgrade eligibility. This module is the
//! shell around it: one tokio task that turns sockets, signals, exits and
//! timers into the core's inputs and carries out its actions.
//!
//! The concerns, one module each: the `core` (with its own concerns) and
//! the pure pieces it is made of — the supervisor's `phase` (restarting,
//! backing off, stopping...), a generation's `lifecycle` (states and
//! deadlines), the typed [`Policy`] and [`Failure`]s; and the shell's — a
//! `generation`'s processes and spawning, the `restart` edge (health-check
//! processes, failure reports), `notify` datagrams and their attribution,
//! stored `connections`, `render`ing the core's events, outcomes and
//! upstream notifications, `stop` signals, `self_upgrade` (`baton
//! upgrade`) and its `handover`, and each generation's [`probe`] listener
//! (`--probe`).

use std::ffi::OsString;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_sd::wire::{self, BarrierUse, Lifecycle, NotifyState};
use baton_sd::{FdPoll, Notifier};
use rustix::process::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::closer::ReceivedFd;
use crate::control::{
    ControlServer, GenerationStatus, Incoming, Request, Response, RestartDone, RestartFailure, SocketStatus, Status,
    UpgradeDone,
};
use crate::lineage::{self, MainProcess};
use crate::listen::BoundSocket;
use crate::notify_server::{Datagram, NotifyServer};
use crate::output::{InheritedTo, Output, OutputKind, OutputMode};
use crate::ratelimit::{RefusalLog, Refused};
use crate::reaper::{self, Reaper};
use crate::spawn::{AppCommand, Child, GenerationSetup};
use crate::store::FdStore;
use crate::upgrade::{self, Handover, Image, ProbeInfo, UpgradeError};

/// Before an upgrade's exec: how long control clients already connected may
/// take to get their answers (their connections cannot be handed over; new
/// ones wait in the backlog meanwhile).
const UPGRADE_QUIESCE: Duration = Duration::from_secs(1);

mod connections;
mod core;
mod execute;
mod failure;
mod generation;
mod handover;
mod lifecycle;
mod notify;
mod phase;
mod policy;
pub mod probe;
pub(crate) mod probes;
mod render;
mod restart;
mod self_upgrade;
#[cfg(test)]
mod simulation;
mod stop;
mod traffic;

use self::core::{Action, Core, Counters, FdsHandle, Gen, Input, Slot};
use execute::FdHandles;
pub use failure::{Exit, Failure, ProbationFailure, StartFailure, WatchdogCause};
use generation::Procs;
use lifecycle::{Life, State};
use phase::Waiters;
pub use policy::{Backoff, Compat, HealthProbe, NotifyAccess, Policy, Proving, Readiness, SteeringMode};
use probe::ProbeSocket;
use self_upgrade::probe_result;

/// Everything `baton run` was asked to do.
pub struct Config {
    /// Instance name (logs, status).
    pub name: String,
    /// The app.
    pub command: AppCommand,
    /// The app's command line as given (`argv[0]` as the user wrote it):
    /// `baton upgrade` hands it to the new image, which resolves it again.
    pub command_line: Vec<OsString>,
    /// Listening sockets, passed to every generation at 3.. in this order.
    pub sockets: Vec<BoundSocket>,
    /// Fd-store entries inherited at start (from systemd's store), with the
    /// connections recovered from its vaults (see [`crate::vault`]).
    pub stored: Vec<(String, OwnedFd)>,
    /// The names of the vaults those connections came from, to remove from
    /// systemd's store once they are in a vault of this Baton's.
    pub inherited_vaults: Vec<String>,
    /// How generations are started, checked, drained and replaced.
    pub policy: Policy,
    /// The steered pairs of `sockets` (see [`crate::steering`]); `None`:
    /// every generation gets `sockets` as they are.
    pub steering: Option<crate::steering::Steering>,
}

/// How a supervisor run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Stopped on request (signal or `baton stop`).
    Stopped,
    /// Gave up: the app kept dying ([`Failure::CrashLoop`]).
    CrashLoop(Failure),
}

/// Fatal errors of the supervisor itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// A socket, signal handler or the notify socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What Baton was doing.
        context: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The state handed over by `baton upgrade` could not be adopted.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

/// The running supervisor.
pub struct Supervisor {
    cfg: Config,
    notify: NotifyServer,
    reaper: Reaper,
    store: FdStore,
    upstream: Option<Arc<Notifier>>,
    /// Under systemd, the crash-safe copy of the store's connections (see
    /// [`crate::vault`]).
    vault: Option<crate::vault::Vault>,
    /// The serial of the last vault created (names are never reused).
    vault_serial: u64,
    /// The processes and handles of each generation the core keeps (and of
    /// those it has not forgotten yet), oldest first.
    procs: Vec<Procs>,
    /// The decisions: the generation table, the phase (restarting, backing
    /// off, stopping...), the counters (see `core`).
    core: Core,
    /// Reply channels of the callers the core names by token.
    waiters: Waiters,
    /// Fds a datagram brought, until the core's action for them.
    fds: FdHandles,
    started: Instant,
    last_failure: Option<Failure>,
    /// Status and output of the generation whose start failed last, for the
    /// failure report.
    failed_output: Option<FailedOutput>,
    output_closed: Arc<tokio::sync::Notify>,
    /// Where inherited output goes, for failure reports.
    inherited_to: InheritedTo,
    handoff: Option<(crate::handoff::HandoffServer, mpsc::Receiver<crate::handoff::Peer>)>,
    /// The control socket, owned here so `baton upgrade` can hand it over.
    control: Option<ControlServer>,
    /// This program image.
    image: Image,
    /// A `baton upgrade` being probed (`probe` set) or about to exec.
    upgrading: Option<PendingUpgrade>,
    /// A `baton upgrade` just asked, while the core decides on it.
    upgrade_request: Option<UpgradeRequest>,
    /// Set when this image adopted its state from the previous one.
    adopted: Option<Adopted>,
    /// Rate limit and summaries for the log of refused notify datagrams and
    /// handoff connections.
    refusals: RefusalLog,
    /// Built-in probes out: one per generation at most (the core's rule),
    /// each bounded by `--health-timeout`.
    probes: tokio::task::JoinSet<(u64, Result<(), String>)>,
    /// The slot whose accept queue the core waits to see empty, and until
    /// when Baton looks (see `traffic`).
    queue_watch: Option<(Slot, Instant)>,
    /// Connections rescued from a failed generation's queue, relayed to
    /// the serving one (see `traffic`).
    relays: tokio::task::JoinSet<()>,
    /// A copy of the handoff connection that was full, watched until it
    /// has room (see `connections`).
    handoff_watch: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
}

/// `baton upgrade` as asked.
struct UpgradeRequest {
    binary: Option<PathBuf>,
    reply: oneshot::Sender<Response>,
    conn: Option<OwnedFd>,
}

struct PendingUpgrade {
    reply: oneshot::Sender<Response>,
    /// The client's connection, answered by the new image.
    conn: Option<OwnedFd>,
    binary: PathBuf,
    requested: Instant,
    probe: Option<oneshot::Receiver<Result<ProbeInfo, UpgradeError>>>,
    /// The handover format to write: the newest the new binary reads
    /// (known once probed).
    format: u32,
}

/// What the adopting image still has to do once it runs.
struct Adopted {
    client: Option<OwnedFd>,
    requested_mono_us: u64,
    from_version: String,
    /// Generations whose exit the previous image reaped but never processed.
    lost: Vec<u32>,
    /// Set when this image is the previous one, back after a failed
    /// upgrade: why the next one could not adopt the state.
    failed: Option<String>,
    /// The binary of the image that handed the state over.
    previous_binary: Option<PathBuf>,
}

/// What a failure report says about a generation's output.
struct FailedOutput {
    number: u64,
    status_text: Option<String>,
    lines: Vec<String>,
    hint: Option<String>,
}

impl Supervisor {
    /// Sets up the notify socket, reaper and store. Must run inside a tokio
    /// runtime, before any generation is spawned.
    pub fn new(cfg: Config, notify: NotifyServer, upstream: Option<Arc<Notifier>>) -> Result<Self, SupervisorError> {
        let io = |context| move |source| SupervisorError::Io { context, source };
        reaper::become_subreaper().map_err(io("becoming the subreaper of the app's processes"))?;
        let reaper = Reaper::start().map_err(io("starting the child reaper"))?;
        let mut store = FdStore::new(cfg.policy.fdstore_max);
        if let Err(e) = store.watch_hangups() {
            // Not fatal: the store retries with its first polled entry.
            tracing::warn!(event = "fdstore-watch-failed", "fd store: cannot create its epoll instance yet: {e}");
        }
        let mut cfg = cfg;
        for (name, fd) in std::mem::take(&mut cfg.stored) {
            // Inherited entries are already in systemd's store: keep them
            // here without forwarding again.
            if let Err(e) = store.add(&name, vec![fd], true) {
                tracing::warn!(event = "fdstore-inherit-failed", name = %name, "{e}");
            }
        }
        let core = Core::new(cfg.policy.clone(), Counters { next_number: 1, ..Counters::default() });
        let inherited_vaults = std::mem::take(&mut cfg.inherited_vaults);
        let vault_serial = inherited_vaults.iter().filter_map(|n| crate::vault::Vault::serial_of(n)).max().unwrap_or(0);
        let mut supervisor = Supervisor {
            cfg,
            notify,
            reaper,
            store,
            upstream,
            vault: None,
            vault_serial,
            procs: Vec::new(),
            core,
            waiters: Waiters::default(),
            fds: FdHandles::default(),
            started: Instant::now(),
            last_failure: None,
            failed_output: None,
            output_closed: Arc::new(tokio::sync::Notify::new()),
            inherited_to: InheritedTo::detect(),
            handoff: None,
            control: None,
            image: Image::at_startup(),
            upgrading: None,
            upgrade_request: None,
            adopted: None,
            refusals: RefusalLog::new(),
            probes: tokio::task::JoinSet::new(),
            queue_watch: None,
            relays: tokio::task::JoinSet::new(),
            handoff_watch: None,
        };
        supervisor.adopt_vaults(&inherited_vaults);
        Ok(supervisor)
    }

    /// Serves `control` (which delivers its requests to [`run`](Self::run)):
    /// the supervisor owns it, to hand it over on `baton upgrade` and to shut
    /// it down when it ends.
    pub fn with_control(mut self, control: ControlServer) -> Self {
        self.control = Some(control);
        self
    }

    /// Describes this program image (default: [`Image::at_startup`]).
    pub fn with_image(mut self, image: Image) -> Self {
        self.image = image;
        self
    }

    /// Offers generations a handoff socket (`$BATON_HANDOFF_SOCKET`) at
    /// `path`, for connections stored during an overlapped restart.
    pub fn with_handoff(mut self, path: &std::path::Path) -> Result<Self, SupervisorError> {
        let server = crate::handoff::HandoffServer::bind(path)
            .map_err(|source| SupervisorError::Io { context: "creating the handoff socket", source })?;
        self.handoff = Some(server);
        Ok(self)
    }

    /// Runs until stopped. `control` delivers requests from the control
    /// socket.
    pub async fn run(mut self, mut control: mpsc::Receiver<Incoming>) -> Result<Ended, SupervisorError> {
        let io = |context| move |source| SupervisorError::Io { context, source };
        // Before tokio's handlers: see `stop_begun`.
        crate::stop_signal::watch().map_err(io("installing the stop signal flag"))?;
        let mut hup = signal(SignalKind::hangup()).map_err(io("installing the SIGHUP handler"))?;
        let mut term = signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler"))?;
        crate::closer::start();
        match self.adopted.take() {
            None => {
                let actions = self.core.start();
                self.execute(actions);
            }
            Some(adopted) => self.finish_adoption(adopted),
        }
        loop {
            if let Some(ended) = self.core.take_ended() {
                if let Some(server) = self.control.take() {
                    server.shutdown(Duration::from_secs(2)).await;
                }
                return Ok(ended);
            }
            // A stop signal whose stream has not fired yet is still handled
            // before anything else this iteration (see `stop_begun`).
            self.stop_begun();
            if self.upgrading.as_ref().is_some_and(|u| u.probe.is_none()) {
                self.execute_upgrade(&mut control, [&mut hup, &mut term, &mut int]).await;
                continue;
            }
            // The core's one timer (an hour ahead when nothing is due: the
            // loop just turns).
            let deadline = self.core.next_deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let summaries_due = self.refusals.next_due();
            tokio::select! {
                Some(incoming) = control.recv() => self.on_control(incoming),
                received = self.notify.recv() => match received {
                    Ok(Ok(datagram)) => self.on_datagram(datagram),
                    Ok(Err(dropped)) => {
                        if self.refusals.allow(Refused::Notify, dropped.sender()) {
                            tracing::warn!(event = "notify-dropped", "notify message dropped: {dropped}");
                        }
                    }
                    Err(e) => return Err(SupervisorError::Io { context: "receiving notify messages", source: e }),
                },
                Some(exit) = self.reaper.next() => self.on_exit(exit.pid, &exit.status),
                hangup = self.store.hangup() => {
                    tracing::info!(event = "fdstore-hangup", name = %hangup.name, "stored fd hung up; removed");
                    self.tidy_vault();
                }
                _ = tokio::time::sleep_until(deadline.into()) => self.feed(Input::Tick),
                _ = tokio::time::sleep_until(summaries_due.unwrap_or(deadline).into()), if summaries_due.is_some() => {
                    self.refusals.log_summaries();
                }
                _ = self.output_closed.notified(), if self.core.awaiting_output().is_some() => self.output_maybe_complete(),
                Some(peer) = next_peer(&mut self.handoff) => self.on_handoff_peer(peer),
                () = has_room(&self.handoff_watch), if self.handoff_watch.is_some() => {
                    self.handoff_watch = None;
                    self.feed(Input::HandoffWritable);
                }
                _ = tokio::time::sleep(traffic::QUEUE_POLL), if self.queue_watch.is_some() => self.check_queue(),
                Some(_) = self.relays.join_next(), if !self.relays.is_empty() => {}
                Some(done) = self.probes.join_next(), if !self.probes.is_empty() => match done {
                    Ok((generation, result)) => self.feed(Input::Probed { generation, result }),
                    // A probe task cannot panic by design; were one to, its
                    // generation's next probe is simply never due.
                    Err(e) => tracing::error!(event = "probe-task-failed", "a probe task failed: {e}"),
                },
                probed = probe_result(&mut self.upgrading) => self.on_probe(probed),
                _ = hup.recv() => self.request_restart(None),
                _ = term.recv() => self.begin_stop(None),
                _ = int.recv() => self.begin_stop(None),
            }
        }
    }

    // ---- control ------------------------------------------------------

    fn on_control(&mut self, incoming: Incoming) {
        match incoming.request {
            Request::Restart { wait } => {
                if self.core.is_stopping() {
                    let _ = incoming.reply.send(Response::Stopping);
                } else if wait {
                    self.request_restart(Some(incoming.reply));
                } else {
                    self.request_restart(None);
                    let _ = incoming.reply.send(Response::Accepted);
                }
            }
            Request::Status => {
                let _ = incoming.reply.send(Response::Status(Box::new(self.status())));
            }
            Request::Stop => self.begin_stop(Some(incoming.reply)),
            Request::Upgrade { binary } => self.request_upgrade(binary, incoming.reply, incoming.conn),
        }
    }

    /// A restart request: starts one now, or joins the next one if a
    /// restart is already running (so changes made before this request are
    /// picked up).
    fn request_restart(&mut self, waiter: Option<oneshot::Sender<Response>>) {
        if self.stop_begun() {
            return;
        }
        let waiter = self.waiters.register(waiter);
        self.feed(Input::RestartRequested { waiter });
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        Status {
            name: self.cfg.name.clone(),
            pid: std::process::id(),
            uptime_s: (now - self.started).as_secs_f64(),
            generations: self
                .core
                .generations()
                .iter()
                .map(|g| GenerationStatus {
                    generation: g.number,
                    pid: self.main_pid(g.number),
                    state: g.state_name().to_owned(),
                    status_text: g.status_text.clone(),
                    uptime_s: (now - g.spawned_at).as_secs_f64(),
                    ready_ms: g.ready_at.map(|r| (r - g.spawned_at).as_millis() as u64),
                    probe: self.procs(g.number).and_then(|p| p.probe.as_ref()).map(|p| p.addr.to_string()),
                    proving: traffic::proving_text(g, &self.cfg.policy.proving, now),
                    slot: self.steers().then(|| if g.slot == Slot::A { "a" } else { "b" }.to_owned()),
                    steered: self.steers()
                        && g.slot == self.core.steered()
                        && !matches!(g.life.state, lifecycle::State::Draining { .. }),
                })
                .collect(),
            sockets: self
                .cfg
                .sockets
                .iter()
                .map(|s| SocketStatus { name: s.name.clone(), local: s.local.clone() })
                .collect(),
            fdstore: self.store.len(),
            restarts: self.core.counters().restarts,
            crash_restarts: self.core.counters().crash_restarts,
            last_failure: self.last_failure.as_ref().map(|f| f.to_string()),
            restarting: self.core.restart().is_some(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            binary: self.image.binary.as_ref().map(|b| b.display().to_string()),
            upgrades: self.image.upgrades,
            image_uptime_s: (now - self.image.started).as_secs_f64(),
            policy: Some(self.cfg.policy.clone()),
        }
    }

    /// Hands `input` to the core and carries out what it decides. A stop
    /// signal that arrived is handed over first (see `stop_begun`), so the
    /// core never decides on a replacement that is stopped right away.
    fn feed(&mut self, input: Input) {
        if !matches!(input, Input::StopRequested { .. }) {
            self.stop_begun();
        }
        let actions = self.core.handle(Instant::now(), input);
        self.execute(actions);
    }

    /// Generation `number`'s processes and handles.
    fn procs(&self, number: u64) -> Option<&Procs> {
        self.procs.iter().find(|p| p.number == number)
    }

    fn procs_mut(&mut self, number: u64) -> Option<&mut Procs> {
        self.procs.iter_mut().find(|p| p.number == number)
    }

    /// Generation `number`'s main process (0 if it is unknown).
    fn main_pid(&self, number: u64) -> u32 {
        self.procs(number).map_or(0, Procs::main_pid)
    }

    /// The serving generation, as the core keeps it.
    fn active(&self) -> Option<&Gen> {
        self.core.active()
    }

    /// "generation N serving as pid P", for upstream `STATUS=`.
    fn serving_status(&self) -> Option<String> {
        self.active().map(|g| format!("generation {} serving as pid {}", g.number, self.main_pid(g.number)))
    }

    fn upstream_notify(&self, states: &[NotifyState<'_>]) {
        if let Some(up) = &self.upstream
            && let Err(e) = up.notify(states)
        {
            tracing::warn!(event = "upstream-notify-failed", "notifying the service manager failed: {e}");
        }
    }
}

/// The next handoff connection, or never when there is no handoff socket.
async fn next_peer(
    handoff: &mut Option<(crate::handoff::HandoffServer, mpsc::Receiver<crate::handoff::Peer>)>,
) -> Option<crate::handoff::Peer> {
    match handoff {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Ready once the watched handoff connection is writable (or failed, which
/// the next push reports); never without one.
async fn has_room(watch: &Option<tokio::io::unix::AsyncFd<OwnedFd>>) {
    match watch {
        Some(w) => drop(w.writable().await),
        None => std::future::pending().await,
    }
}

/// The longest delay a deadline is ever set ahead: options are bounded when
/// parsed ([`crate::cli::MAX_DURATION`]), but values the app sends
/// (`EXTEND_TIMEOUT_USEC=`, `WATCHDOG_USEC=`) reach `u64::MAX` µs.
const LONGEST_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from + delay`, saturating: a huge delay means "not in our lifetime",
/// never an `Instant` overflow (which panics and would leave the
/// generations unsupervised).
fn after(from: Instant, delay: Duration) -> Instant {
    // Cannot fail for CLOCK_MONOTONIC (seconds since boot in an i64) plus
    // 100 years; `from` is the harmless answer if it ever did.
    from.checked_add(delay.min(LONGEST_DELAY)).unwrap_or(from)
}

/// A duration in whole µs, saturating at `u64::MAX`.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
