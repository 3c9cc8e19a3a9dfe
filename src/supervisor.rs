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

use std::collections::VecDeque;
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

/// How long a generation must serve, from its cutover, before it has proven
/// healthy and Baton sends `RESTART_RESET=1` (systemd ≥ 258): systemd's
/// restarts of Baton before that (`NRestarts`, which `RestartSteps=` grows
/// the next restart delay by) no longer count. Once per Baton process: its
/// own later restarts of the app are not systemd's.
const PROVEN_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How soon to retry moving connections when the handoff socket was full.
const FLUSH_RETRY: Duration = Duration::from_millis(50);
/// Before an upgrade's exec: how long control clients already connected may
/// take to get their answers (their connections cannot be handed over; new
/// ones wait in the backlog meanwhile).
const UPGRADE_QUIESCE: Duration = Duration::from_secs(1);

/// Who may send notifications (`NotifyAccess=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotifyAccess {
    /// Only a generation's main process.
    #[default]
    Main,
    /// The main process and Baton's control processes (the health check).
    Exec,
    /// The main process, the health check, and any process of the
    /// generation's process group that also descends from its leader (its
    /// parent chain, checked twice: see [`crate::lineage`]). Group
    /// membership alone is not enough: anyone in Baton's session can
    /// `setpgid()` into that group.
    All,
}

/// Crash-restart policy for generations that die on their own.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Upper bound of the doubling delay.
    pub max: Duration,
    /// Crashes allowed within `interval` before Baton gives up.
    pub burst: u32,
    /// The window for `burst`.
    pub interval: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            burst: 10,
            interval: Duration::from_secs(60),
        }
    }
}

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
    /// Fd-store entries inherited at start (from systemd's store).
    pub stored: Vec<(String, OwnedFd)>,
    /// How long a new generation may take to send READY=1.
    pub ready_timeout: Duration,
    /// Signal that asks a generation to drain and exit.
    pub stop_signal: Signal,
    /// Drain deadline after the stop signal; then SIGKILL.
    pub stop_timeout: Duration,
    /// Who may notify.
    pub notify_access: NotifyAccess,
    /// `WATCHDOG_USEC` for generations, enforced.
    pub watchdog: Option<Duration>,
    /// Fd-store capacity (0 disables it).
    pub fdstore_max: usize,
    /// Shell command that must succeed after READY=1 before the cutover.
    pub health_cmd: Option<String>,
    /// Draining generations allowed at once; the oldest is killed beyond.
    pub max_draining: usize,
    /// Crash-restart policy.
    pub backoff: Backoff,
    /// Where generations' stdout and stderr go.
    pub output: OutputMode,
}

/// How a supervisor run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Stopped on request (signal or `baton stop`).
    Stopped,
    /// Gave up: the app kept dying.
    CrashLoop(String),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    HealthCheck { pid: u32 },
    Active,
    Draining { kill_at: Instant, killed: bool },
}

struct Generation {
    number: u64,
    child: Child,
    /// The process named by `MAINPID=`, if not the leader: pinned by its
    /// pidfd, and forgotten once it exits (see [`crate::lineage`]).
    main: Option<MainProcess>,
    state: State,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    /// Start deadline (Starting/HealthCheck), extended by EXTEND_TIMEOUT_USEC.
    start_deadline: Instant,
    status_text: Option<String>,
    watchdog: Option<Duration>,
    last_ping: Instant,
    output: Output,
    /// The running health check, killed with the generation if it fails.
    health: Option<Child>,
    /// Its `$BATON_HANDOFF_SOCKET` connection, once it connected (closed off
    /// this thread: fds queued in it are released by its close).
    handoff: Option<ReceivedFd>,
    /// The store's fds it got in `LISTEN_FDS`: never pushed to it again.
    passed: Vec<std::os::fd::RawFd>,
}

impl Generation {
    fn state_name(&self) -> &'static str {
        match self.state {
            State::Starting => "starting",
            State::HealthCheck { .. } => "health-check",
            State::Active => "active",
            State::Draining { .. } => "draining",
        }
    }

    /// The main process: the live process named by `MAINPID=`, else the
    /// leader. Never the pid of a `MAINPID=` process that has exited,
    /// whoever has that pid now.
    fn main_pid(&self) -> u32 {
        match &self.main {
            Some(m) if m.is_alive() => m.pid,
            _ => self.child.pid,
        }
    }

    /// Whether `pid` is its main process now. A process named by `MAINPID=`
    /// counts only while the process we pinned runs (see
    /// [`crate::lineage`]). The leader counts until its exit is handled,
    /// zombie or not: it is Baton's own child, so its pid cannot be reused
    /// before Baton's reaper collects it, and the `STOPPING=1` or `STATUS=`
    /// it sent just before exiting must still count, as systemd handles
    /// notifications before `SIGCHLD`.
    fn is_main(&self, pid: u32) -> bool {
        self.main_pid() == pid
    }

    /// Whether `pid` is its health check (Baton's child too: see
    /// [`is_main`](Self::is_main)).
    fn is_health_check(&self, pid: u32) -> bool {
        self.state == State::HealthCheck { pid } && self.health.is_some()
    }

    /// SIGKILL to the whole generation; it stays listed until reaped.
    fn force_kill(&mut self) {
        let _ = self.child.signal_group(Signal::KILL);
        self.state = State::Draining { kill_at: Instant::now(), killed: true };
    }
}

/// Why a restart is happening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The first generation.
    Initial,
    /// `baton restart` or SIGHUP.
    Requested,
    /// The active generation died or asked to be replaced.
    Replace,
}

struct Restart {
    generation: u64,
    trigger: Trigger,
    waiters: Vec<oneshot::Sender<Response>>,
}

/// The running supervisor.
pub struct Supervisor {
    cfg: Config,
    notify: NotifyServer,
    reaper: Reaper,
    store: FdStore,
    upstream: Option<Arc<Notifier>>,
    generations: Vec<Generation>,
    next_number: u64,
    restart: Option<Restart>,
    /// Requests that arrived during a restart: served by the next one.
    pending: Vec<oneshot::Sender<Response>>,
    pending_requested: bool,
    /// When to start a crash replacement (backoff).
    scheduled: Option<Instant>,
    crashes: VecDeque<Instant>,
    consecutive_failures: u32,
    started: Instant,
    restarts: u64,
    crash_restarts: u64,
    last_failure: Option<String>,
    stopping: Option<Vec<oneshot::Sender<Response>>>,
    ended: Option<Ended>,
    /// Status and output of a starting generation that already exited, for
    /// the failure report.
    failed_output: Option<FailedOutput>,
    /// A starting generation that exited: its failure is reported once its
    /// output has been read to the end (bounded by the deadline), so the
    /// report has its last lines.
    pending_exit: Option<PendingExit>,
    output_closed: Arc<tokio::sync::Notify>,
    /// Where inherited output goes, for failure reports.
    inherited_to: InheritedTo,
    handoff: Option<(crate::handoff::HandoffServer, mpsc::Receiver<crate::handoff::Peer>)>,
    /// When to try again to move stored connections to the active generation.
    flush_retry: Option<Instant>,
    /// The control socket, owned here so `baton upgrade` can hand it over.
    control: Option<ControlServer>,
    /// This program image.
    image: Image,
    /// A `baton upgrade` being probed (`probe` set) or about to exec.
    upgrading: Option<PendingUpgrade>,
    /// Set when this image adopted its state from the previous one.
    adopted: Option<Adopted>,
    /// Rate limit and summaries for the log of refused notify datagrams and
    /// handoff connections.
    refusals: RefusalLog,
    /// `RESTART_RESET=1` upstream: not yet, due once this generation has
    /// served until then, or already sent (see [`PROVEN_HEALTHY_AFTER`]).
    restart_reset: RestartReset,
}

/// Where `RESTART_RESET=1` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestartReset {
    /// No generation has cut over yet (or the last one stopped serving
    /// before it was due).
    Waiting,
    /// Generation `generation` cut over; send if it is still the active one
    /// at `at`.
    Due { generation: u64, at: Instant },
    /// Sent (or, after `baton upgrade`, not this image's to send).
    Done,
}

struct PendingUpgrade {
    reply: oneshot::Sender<Response>,
    /// The client's connection, answered by the new image.
    conn: Option<OwnedFd>,
    binary: PathBuf,
    requested: Instant,
    probe: Option<oneshot::Receiver<Result<ProbeInfo, UpgradeError>>>,
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

struct PendingExit {
    number: u64,
    reason: String,
    status_text: Option<String>,
    output: Output,
    /// Where its output can be read when Baton did not capture it.
    hint: Option<String>,
    deadline: Instant,
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
        let mut store = FdStore::new(cfg.fdstore_max);
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
        Ok(Supervisor {
            cfg,
            notify,
            reaper,
            store,
            upstream,
            generations: Vec::new(),
            next_number: 1,
            restart: None,
            pending: Vec::new(),
            pending_requested: false,
            scheduled: None,
            crashes: VecDeque::new(),
            consecutive_failures: 0,
            started: Instant::now(),
            restarts: 0,
            crash_restarts: 0,
            last_failure: None,
            stopping: None,
            ended: None,
            failed_output: None,
            pending_exit: None,
            output_closed: Arc::new(tokio::sync::Notify::new()),
            inherited_to: InheritedTo::detect(),
            handoff: None,
            flush_retry: None,
            control: None,
            image: Image::at_startup(),
            upgrading: None,
            adopted: None,
            refusals: RefusalLog::new(),
            restart_reset: RestartReset::Waiting,
        })
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
            None => self.begin_restart(Trigger::Initial, Vec::new()),
            Some(adopted) => self.finish_adoption(adopted),
        }
        loop {
            if let Some(ended) = self.ended.take() {
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
            let deadline = self.next_deadline();
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
                }
                _ = tokio::time::sleep_until(deadline.into()) => self.on_timers(),
                _ = tokio::time::sleep_until(summaries_due.unwrap_or(deadline).into()), if summaries_due.is_some() => {
                    self.refusals.log_summaries();
                }
                _ = self.output_closed.notified(), if self.pending_exit.is_some() => self.report_pending_exit(false),
                Some(peer) = next_peer(&mut self.handoff) => self.on_handoff_peer(peer),
                probed = probe_result(&mut self.upgrading) => self.on_probe(probed),
                _ = hup.recv() => self.request_restart(None),
                _ = term.recv() => self.begin_stop(None),
                _ = int.recv() => self.begin_stop(None),
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut next = far;
        if let Some(at) = self.scheduled {
            next = next.min(at);
        }
        if let Some(p) = &self.pending_exit {
            next = next.min(p.deadline);
        }
        if let Some(at) = self.flush_retry {
            next = next.min(at);
        }
        if let RestartReset::Due { at, .. } = self.restart_reset {
            next = next.min(at);
        }
        for g in &self.generations {
            match g.state {
                State::Starting | State::HealthCheck { .. } => next = next.min(g.start_deadline),
                State::Draining { kill_at, killed: false } => next = next.min(kill_at),
                State::Active => {
                    if let Some(w) = g.watchdog {
                        next = next.min(after(g.last_ping, w));
                    }
                }
                State::Draining { killed: true, .. } => {}
            }
        }
        next
    }

    // ---- control ------------------------------------------------------

    fn on_control(&mut self, incoming: Incoming) {
        match incoming.request {
            Request::Restart { wait } => {
                if self.stopping.is_some() {
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
        if self.restart.is_some() {
            self.pending.extend(waiter);
            self.pending_requested = true;
        } else {
            self.scheduled = None;
            self.begin_restart(Trigger::Requested, waiter.into_iter().collect());
        }
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        Status {
            name: self.cfg.name.clone(),
            pid: std::process::id(),
            uptime_s: (now - self.started).as_secs_f64(),
            generations: self
                .generations
                .iter()
                .map(|g| GenerationStatus {
                    generation: g.number,
                    pid: g.main_pid(),
                    state: g.state_name().to_owned(),
                    status_text: g.status_text.clone(),
                    uptime_s: (now - g.spawned_at).as_secs_f64(),
                    ready_ms: g.ready_at.map(|r| (r - g.spawned_at).as_millis() as u64),
                })
                .collect(),
            sockets: self
                .cfg
                .sockets
                .iter()
                .map(|s| SocketStatus { name: s.name.clone(), local: s.local.clone() })
                .collect(),
            fdstore: self.store.len(),
            restarts: self.restarts,
            crash_restarts: self.crash_restarts,
            last_failure: self.last_failure.clone(),
            restarting: self.restart.is_some(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            binary: self.image.binary.as_ref().map(|b| b.display().to_string()),
            upgrades: self.image.upgrades,
            image_uptime_s: (now - self.image.started).as_secs_f64(),
        }
    }

    // ---- restarts -----------------------------------------------------

    fn active(&self) -> Option<&Generation> {
        self.generations.iter().find(|g| g.state == State::Active)
    }

    fn begin_restart(&mut self, trigger: Trigger, waiters: Vec<oneshot::Sender<Response>>) {
        let number = self.next_number;
        self.next_number += 1;
        if trigger != Trigger::Initial {
            self.upstream_notify(&[
                NotifyState::Reloading,
                NotifyState::monotonic_usec_now(),
                NotifyState::Status(&format!("starting generation {number}")),
            ]);
        }
        // Our own start/reload timeout upstream must not fire before the
        // app's ready timeout does.
        self.upstream_notify(&[NotifyState::ExtendTimeoutUsec(
            micros(self.cfg.ready_timeout).saturating_add(5_000_000),
        )]);
        self.restart = Some(Restart { generation: number, trigger, waiters });
        match self.spawn(number) {
            Ok(g) => {
                tracing::info!(
                    event = "spawned",
                    generation = number,
                    pid = g.child.pid,
                    "generation {number} started as pid {}",
                    g.child.pid
                );
                self.generations.push(g);
            }
            Err(reason) => self.finish_restart(Err(reason)),
        }
    }

    fn spawn(&self, number: u64) -> Result<Generation, String> {
        let fds: Vec<(BorrowedFd<'_>, &str)> = self
            .cfg
            .sockets
            .iter()
            .map(|s| (s.fd.as_fd(), s.name.as_str()))
            .chain(self.store.entries().map(|(name, fd)| (fd, name)))
            .collect();
        let passed: Vec<std::os::fd::RawFd> =
            self.store.entries().map(|(_, fd)| std::os::fd::AsRawFd::as_raw_fd(&fd)).collect();
        let mut extra = vec![("BATON_GENERATION", number.to_string())];
        if let Some((server, _)) = &self.handoff {
            extra.push((baton_sd::handoff::HANDOFF_SOCKET_ENV, server.path().display().to_string()));
        }
        let (output_fd, output) = match self.cfg.output {
            OutputMode::Pipe => {
                let identity = crate::journal::Identity::new(self.cfg.command.program(), number);
                let (fd, tail) = crate::output::capture(Arc::clone(&self.output_closed), identity)
                    .map_err(|e| format!("cannot create the pipe for its output: {e}"))?;
                (Some(fd), Output::Captured(tail))
            }
            // Its 1 and 2 stay Baton's own (GenerationSetup::output: None).
            OutputMode::Inherit => (None, Output::Inherited),
        };
        let setup = GenerationSetup {
            fds: &fds,
            notify_socket: Some(self.notify.address()),
            watchdog_usec: self.cfg.watchdog.map(micros),
            extra_env: &extra,
            output: output_fd.as_ref().map(|fd| fd.as_fd()),
        };
        let child = self.cfg.command.spawn(&setup).map_err(|e| e.to_string())?;
        output.set_pid(child.pid);
        // Only the child (and its descendants) may hold the write end, so
        // the copying task sees end-of-file when they are all gone.
        drop(output_fd);
        let now = Instant::now();
        Ok(Generation {
            number,
            main: None,
            child,
            state: State::Starting,
            spawned_at: now,
            ready_at: None,
            start_deadline: after(now, self.cfg.ready_timeout),
            status_text: None,
            watchdog: self.cfg.watchdog,
            last_ping: now,
            output,
            health: None,
            handoff: None,
            passed,
        })
    }

    /// The starting generation is ready (and healthy): retire the old one.
    fn cutover(&mut self, number: u64) {
        let now = Instant::now();
        let stop_timeout = self.cfg.stop_timeout;
        let stop_signal = self.cfg.stop_signal;
        let mut replaced = None;
        for g in &mut self.generations {
            if g.state == State::Active {
                replaced = Some(g.number);
                g.state = State::Draining { kill_at: after(now, stop_timeout), killed: false };
                if let Err(e) = g.child.signal_group(stop_signal) {
                    tracing::warn!(
                        event = "signal-failed",
                        generation = g.number,
                        "cannot signal generation {}: {e}",
                        g.number
                    );
                }
                tracing::info!(
                    event = "draining",
                    generation = g.number,
                    pid = g.main_pid(),
                    "generation {} draining",
                    g.number
                );
            }
        }
        let Some(g) = self.generations.iter_mut().find(|g| g.number == number) else { return };
        g.state = State::Active;
        g.last_ping = now;
        let done = RestartDone {
            generation: number,
            pid: g.main_pid(),
            ready_ms: g.ready_at.map_or(0, |r| (r - g.spawned_at).as_millis() as u64),
            replaced,
        };
        if self.restart_reset != RestartReset::Done {
            self.restart_reset = RestartReset::Due { generation: number, at: after(now, PROVEN_HEALTHY_AFTER) };
        }
        self.enforce_draining_limit();
        self.flush_connections();
        self.finish_restart(Ok(done));
    }

    /// `RESTART_RESET=1` once the generation that cut over is still serving
    /// [`PROVEN_HEALTHY_AFTER`] later. systemd < 258 ignores the unknown
    /// assignment (252's `service_notify_message()` only looks up the keys
    /// it knows), so it is sent whatever the version.
    fn restart_reset_if_due(&mut self, now: Instant) {
        let RestartReset::Due { generation, at } = self.restart_reset else { return };
        if at > now {
            return;
        }
        if self.active().is_some_and(|g| g.number == generation) && !self.stop_begun() {
            tracing::info!(
                event = "restart-reset",
                generation,
                "generation {generation} has served for {PROVEN_HEALTHY_AFTER:?}: RESTART_RESET=1 (earlier restarts of \
                 baton stop counting)"
            );
            self.upstream_notify(&[NotifyState::RestartReset]);
            self.restart_reset = RestartReset::Done;
        } else {
            self.restart_reset = RestartReset::Waiting;
        }
    }

    /// Kills the oldest draining generations beyond `max_draining`.
    fn enforce_draining_limit(&mut self) {
        let mut draining: Vec<usize> = (0..self.generations.len())
            .filter(|&i| matches!(self.generations[i].state, State::Draining { killed: false, .. }))
            .collect();
        while draining.len() > self.cfg.max_draining {
            let i = draining.remove(0);
            let g = &mut self.generations[i];
            tracing::warn!(
                event = "drain-limit",
                generation = g.number,
                "too many draining generations; killing {}",
                g.number
            );
            g.force_kill();
        }
    }

    /// Ends the running restart with an outcome for all its callers, then
    /// starts the next one if requests arrived meanwhile.
    fn finish_restart(&mut self, outcome: Result<RestartDone, String>) {
        let Some(restart) = self.restart.take() else { return };
        let response = match outcome {
            Ok(done) => {
                self.consecutive_failures = 0;
                if restart.trigger != Trigger::Initial {
                    self.restarts += 1;
                }
                tracing::info!(
                    event = "ready",
                    generation = done.generation,
                    pid = done.pid,
                    ready_ms = done.ready_ms,
                    "generation {} ready after {} ms",
                    done.generation,
                    done.ready_ms
                );
                let status = format!("generation {} serving as pid {}", done.generation, done.pid);
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                Response::Restarted(done)
            }
            Err(reason) => {
                let serving = self.active().map(|g| g.number);
                let failed = self.take_failed(restart.generation);
                let (status_text, log_tail, hint) =
                    failed.map(|f| (f.status_text, f.lines, f.hint)).unwrap_or_default();
                // Inherited output: not in the report, so say where it is.
                let reason = match hint {
                    Some(h) => format!("{reason}; {h}"),
                    None => reason,
                };
                let message = format!("generation {} failed: {reason}", restart.generation);
                tracing::error!(event = "restart-failed", generation = restart.generation, "{message}");
                self.last_failure = Some(message.clone());
                let status = match serving {
                    Some(s) => format!("{message}; generation {s} keeps serving"),
                    None => message.clone(),
                };
                // A reload must always end with READY=1, or systemd waits
                // for it until its timeout.
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                if serving.is_none() || restart.trigger == Trigger::Replace {
                    // Nothing is serving: keep trying, with backoff.
                    self.schedule_replacement();
                }
                Response::RestartFailed(RestartFailure {
                    generation: restart.generation,
                    reason,
                    status_text,
                    log_tail,
                    serving,
                })
            }
        };
        for w in restart.waiters {
            let _ = w.send(response.clone());
        }
        if self.pending_requested && self.ended.is_none() && self.stopping.is_none() {
            self.pending_requested = false;
            let waiters = std::mem::take(&mut self.pending);
            self.scheduled = None;
            self.begin_restart(Trigger::Requested, waiters);
        }
    }

    /// Kills a generation that failed to start and returns its last
    /// STATUS= and output lines (from `failed_output` if it already exited).
    fn take_failed(&mut self, number: u64) -> Option<FailedOutput> {
        if let Some(f) = self.failed_output.take()
            && f.number == number
        {
            return Some(f);
        }
        let i = self.generations.iter().position(|g| g.number == number)?;
        let hint = self.output_hint(&self.generations[i]);
        let g = &mut self.generations[i];
        if let Some(h) = g.health.take() {
            let _ = h.signal_group(Signal::KILL);
        }
        // Like systemd after a failed start: ask it to stop, so connections
        // it already accepted from the shared socket are finished, and
        // SIGKILL only at the stop deadline.
        let _ = g.child.signal_group(self.cfg.stop_signal);
        g.state = State::Draining { kill_at: after(Instant::now(), self.cfg.stop_timeout), killed: false };
        Some(FailedOutput { number, status_text: g.status_text.clone(), lines: g.output.lines(), hint })
    }

    /// Where to read `g`'s output if Baton did not capture it.
    fn output_hint(&self, g: &Generation) -> Option<String> {
        match g.output {
            Output::Captured(_) => None,
            Output::Inherited => {
                let since = std::time::SystemTime::now().checked_sub(g.spawned_at.elapsed());
                Some(self.inherited_to.hint(g.main_pid(), since.unwrap_or(std::time::UNIX_EPOCH)))
            }
        }
    }

    /// Backoff for replacing a generation that died on its own (or a first
    /// start that failed); gives up after `burst` failures in `interval`.
    fn schedule_replacement(&mut self) {
        if !self.note_failure() {
            return;
        }
        let now = Instant::now();
        let shift = self.consecutive_failures.min(16);
        self.consecutive_failures += 1;
        let delay = (self.cfg.backoff.initial * 2u32.pow(shift)).min(self.cfg.backoff.max);
        tracing::info!(event = "backoff", delay_ms = delay.as_millis() as u64, "next start in {delay:?}");
        self.scheduled = Some(after(now, delay));
    }

    /// Records a failure; `false` (and the crash-loop verdict) once `burst`
    /// failures happened within `interval`.
    fn note_failure(&mut self) -> bool {
        let now = Instant::now();
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now - *t > self.cfg.backoff.interval) {
            self.crashes.pop_front();
        }
        if self.crashes.len() as u32 > self.cfg.backoff.burst {
            let reason = format!(
                "{} failures within {:?}; giving up (see the log for each)",
                self.crashes.len(),
                self.cfg.backoff.interval
            );
            tracing::error!(event = "crash-loop", "{reason}");
            self.last_failure = Some(reason.clone());
            self.ended = Some(Ended::CrashLoop(reason));
            self.kill_all();
            return false;
        }
        true
    }

    // ---- events -------------------------------------------------------

    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.pending_exit.as_ref().is_some_and(|p| p.deadline <= now) {
            self.report_pending_exit(true);
        }
        if self.flush_retry.is_some_and(|at| at <= now) {
            self.flush_retry = None;
            self.flush_connections();
        }
        self.restart_reset_if_due(now);
        if self.scheduled.is_some_and(|at| at <= now) {
            self.scheduled = None;
            if self.restart.is_none() && !self.stop_begun() {
                self.crash_restarts += 1;
                self.begin_restart(Trigger::Replace, Vec::new());
            }
        }
        let mut failed = None;
        let mut watchdog = Vec::new();
        for g in &mut self.generations {
            match g.state {
                State::Starting if g.start_deadline <= now => {
                    failed = Some((g.number, format!("no READY=1 within {:?}", self.cfg.ready_timeout)));
                }
                State::HealthCheck { .. } if g.start_deadline <= now => {
                    failed = Some((
                        g.number,
                        format!("health check did not finish within the ready timeout of {:?}", self.cfg.ready_timeout),
                    ));
                }
                State::Draining { kill_at, killed: false } if kill_at <= now => {
                    tracing::warn!(
                        event = "forced-kill",
                        generation = g.number,
                        "generation {} still running at the stop deadline; SIGKILL",
                        g.number
                    );
                    g.force_kill();
                }
                State::Active if g.watchdog.is_some_and(|w| after(g.last_ping, w) <= now) => watchdog.push(g.number),
                _ => {}
            }
        }
        if let Some((number, reason)) = failed {
            self.fail_starting(number, reason);
        }
        for number in watchdog {
            self.watchdog_expired(number, "watchdog timeout: no WATCHDOG=1 in time");
        }
    }

    /// Reports a starting generation's exit once its output is complete (or
    /// `anyway`, at the deadline).
    fn report_pending_exit(&mut self, anyway: bool) {
        if !anyway && !self.pending_exit.as_ref().is_some_and(|p| p.output.is_closed()) {
            return;
        }
        let Some(p) = self.pending_exit.take() else { return };
        let lines = p.output.lines();
        self.failed_output = Some(FailedOutput { number: p.number, status_text: p.status_text, lines, hint: p.hint });
        self.fail_starting(p.number, p.reason);
    }

    fn fail_starting(&mut self, number: u64, reason: String) {
        if self.restart.as_ref().is_some_and(|r| r.generation == number) {
            self.finish_restart(Err(reason));
        }
    }

    /// Like systemd: SIGABRT to the hung generation; its exit then triggers
    /// a replacement.
    fn watchdog_expired(&mut self, number: u64, why: &str) {
        let Some(g) = self.generations.iter_mut().find(|g| g.number == number) else { return };
        tracing::error!(event = "watchdog", generation = number, pid = g.main_pid(), "generation {number}: {why}");
        self.last_failure = Some(format!("generation {number}: {why}"));
        let _ = g.child.signal_group(Signal::ABORT);
        g.watchdog = None;
        let now = Instant::now();
        g.state = State::Draining { kill_at: after(now, self.cfg.stop_timeout), killed: false };
        // A hung generation counts as a failure: an app that always hangs
        // ends in the crash-loop verdict, not in endless replacements.
        if self.note_failure() {
            self.replace_active();
        }
    }

    /// The active generation is gone or going: start a replacement now,
    /// unless a restart is already under way (it becomes the replacement).
    fn replace_active(&mut self) {
        if self.stop_begun() || self.restart.is_some() {
            return;
        }
        self.crash_restarts += 1;
        self.begin_restart(Trigger::Replace, Vec::new());
    }

    fn on_exit(&mut self, pid: u32, status: &std::process::ExitStatus) {
        let how = reaper::describe(status);
        self.on_gone(pid, how, status.success());
    }

    /// A child is gone (`how` it ended, and whether it succeeded).
    fn on_gone(&mut self, pid: u32, how: String, success: bool) {
        // Health check processes.
        if let Some(g) = self.generations.iter_mut().find(|g| g.state == State::HealthCheck { pid }) {
            let number = g.number;
            g.health = None;
            if success {
                tracing::info!(event = "health-ok", generation = number, "health check passed");
                self.cutover(number);
            } else {
                self.fail_starting(number, format!("health check {how}"));
            }
            return;
        }
        let Some(i) = self.generations.iter().position(|g| g.child.pid == pid) else {
            // An orphaned grandchild we reaped as subreaper.
            tracing::debug!(event = "reaped", pid, "reaped pid {pid} ({how})");
            return;
        };
        let g = self.generations.remove(i);
        match g.state {
            State::Starting | State::HealthCheck { .. } => {
                let mut reason = match g.state {
                    State::HealthCheck { .. } => format!("{how} after READY=1, during its health check"),
                    _ => format!("{how} before READY=1"),
                };
                if let Some(s) = &g.status_text {
                    reason.push_str(&format!(" (last status: {s})"));
                }
                tracing::warn!(event = "exited", generation = g.number, pid, "generation {} {reason}", g.number);
                // Kill what it left behind in its process group.
                let _ = g.child.signal_group(Signal::KILL);
                self.pending_exit = Some(PendingExit {
                    number: g.number,
                    reason,
                    status_text: g.status_text.clone(),
                    output: g.output.clone(),
                    hint: self.output_hint(&g),
                    deadline: Instant::now() + Duration::from_millis(500),
                });
                self.report_pending_exit(false);
            }
            State::Active => {
                tracing::error!(
                    event = "crashed",
                    generation = g.number,
                    pid,
                    "generation {} {how} while serving",
                    g.number
                );
                let mut failure = format!("generation {} {how} while serving", g.number);
                if let Some(h) = self.output_hint(&g) {
                    failure.push_str(&format!("; {h}"));
                }
                self.last_failure = Some(failure);
                let _ = g.child.signal_group(Signal::KILL);
                if self.stopping.is_none() {
                    if self.restart.is_some() {
                        // The starting generation becomes the replacement.
                    } else {
                        self.schedule_replacement();
                    }
                }
            }
            State::Draining { .. } => {
                tracing::info!(event = "retired", generation = g.number, pid, "generation {} {how}", g.number);
                let _ = g.child.signal_group(Signal::KILL);
            }
        }
        self.check_stopped();
    }

    fn on_datagram(&mut self, mut d: Datagram) {
        // Refused datagrams drop their fds through the closer thread
        // (`ReceivedFd`), and are logged within the rate limit.
        let Some(index) = self.attribute(d.pid) else {
            if self.refusals.allow(Refused::Notify, Some(d.pid)) {
                tracing::warn!(
                    event = "notify-refused",
                    sender = d.pid,
                    "notify message from pid {} refused: not a generation's {} process",
                    d.pid,
                    match self.cfg.notify_access {
                        NotifyAccess::All => "",
                        _ => "main",
                    }
                );
            }
            // `baton notify` ends with a barrier: tell it, not just the log.
            crate::notify_refusal::answer_refused_barrier(&d.payload, &d.fds, d.pid, self.cfg.notify_access);
            return;
        };
        let msg = match wire::parse(&d.payload) {
            Ok(m) => m,
            Err(e) => {
                if self.refusals.allow(Refused::Notify, Some(d.pid)) {
                    tracing::warn!(
                        event = "notify-refused",
                        sender = d.pid,
                        "notify message from pid {} refused: {e}",
                        d.pid
                    );
                }
                return;
            }
        };
        for bad in &msg.invalid {
            tracing::warn!(event = "notify-invalid", sender = d.pid, "ignoring {:?}: {}", bad.line, bad.reason);
        }
        match msg.barrier() {
            BarrierUse::Valid if d.fds.len() == 1 => {
                // Everything sent before was processed (one task, in order):
                // closing the fd is the acknowledgement.
                d.fds.clear();
                return;
            }
            BarrierUse::None => {}
            _ => {
                tracing::warn!(
                    event = "notify-refused",
                    sender = d.pid,
                    "BARRIER=1 must come alone with exactly one fd; ignoring the message"
                );
                return;
            }
        }
        let number = self.generations[index].number;
        let now = Instant::now();
        let claimed = msg.find(|f| match f {
            NotifyState::MainPid(p) => Some(*p),
            _ => None,
        });
        let pidfd_id = msg.find(|f| match f {
            NotifyState::MainPidFdId(id) => Some(*id),
            _ => None,
        });
        // MAINPIDFD=1 (systemd >= 257): exactly one fd, the new main
        // process's pidfd; FDSTORE=1 in the same message would be ambiguous.
        let pidfd = (msg.has(&NotifyState::MainPidFd) && d.fds.len() == 1 && !msg.has(&NotifyState::FdStore))
            .then(|| d.fds.pop())
            .flatten();
        if msg.has(&NotifyState::MainPidFd) && pidfd.is_none() {
            tracing::warn!(
                event = "notify-invalid",
                "MAINPIDFD=1 for generation {number} ignored: it needs exactly one fd, the pidfd, and no FDSTORE=1 ({} attached)",
                d.fds.len()
            );
        }
        let g = &mut self.generations[index];
        let leader = g.child.pid;
        // How the process was named, for the log: race-free (a pidfd, or a
        // pidfd id checked against the process holding the pid) or by pid.
        let (pinned, how) = match (pidfd, claimed) {
            (Some(fd), claimed) => {
                (Some(MainProcess::from_pidfd(fd.into_owned(), claimed, leader).map(Some)), "its pidfd (MAINPIDFD=1)")
            }
            (None, Some(pid)) if pid == leader => (Some(Ok(None)), "pid"),
            (None, Some(pid)) => match pidfd_id {
                Some(id) => (Some(MainProcess::pin_with_id(pid, leader, id).map(Some)), "pid and MAINPIDFDID="),
                None => (Some(MainProcess::pin(pid, leader).map(Some)), "pid"),
            },
            (None, None) => (None, ""),
        };
        match pinned {
            Some(Ok(Some(main))) if main.pid == leader => g.main = None,
            Some(Ok(main)) => {
                if let Some(m) = &main {
                    tracing::info!(
                        event = "main-pid",
                        generation = number,
                        pid = m.pid,
                        "generation {number}'s main process is now {} (named by {how})",
                        m.pid
                    );
                }
                g.main = main;
            }
            Some(Err(why)) => {
                let what = claimed.map_or_else(|| "MAINPIDFD=1".to_owned(), |pid| format!("MAINPID={pid}"));
                tracing::warn!(event = "notify-invalid", "{what} for generation {number} ignored: {why}");
            }
            None => {}
        }
        {
            let g = &mut self.generations[index];
            if let Some(s) = msg.status() {
                g.status_text = Some(s.to_owned());
            }
            for f in &msg.fields {
                match f {
                    NotifyState::Watchdog => g.last_ping = now,
                    NotifyState::WatchdogUsec(0) => g.watchdog = None,
                    NotifyState::WatchdogUsec(u) => {
                        g.watchdog = Some(Duration::from_micros(*u));
                        g.last_ping = now;
                    }
                    NotifyState::ExtendTimeoutUsec(u) => {
                        let until = after(now, Duration::from_micros(*u));
                        match &mut g.state {
                            State::Starting | State::HealthCheck { .. } => {
                                g.start_deadline = g.start_deadline.max(until);
                            }
                            State::Draining { kill_at, killed: false } => *kill_at = (*kill_at).max(until),
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
        }
        if msg.has(&NotifyState::WatchdogTrigger) {
            self.watchdog_expired(number, "WATCHDOG=trigger");
        }
        if msg.has(&NotifyState::FdStoreRemove) {
            if let Some(name) = msg.fdname() {
                let n = self.store.remove(name);
                tracing::debug!(event = "fdstore-remove", name, removed = n);
                let upstream_name = format!("app/{name}");
                self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&upstream_name)]);
            }
        } else if msg.has(&NotifyState::FdStore) && !d.fds.is_empty() {
            let name = msg.fdname().unwrap_or("stored").to_owned();
            let poll = !msg.has(&NotifyState::FdPollDisable);
            let fds = std::mem::take(&mut d.fds);
            if let Some(fds) = self.push_to_active(index, &name, fds) {
                self.store_fds(&name, fds, poll);
            }
        }
        if !d.fds.is_empty() {
            tracing::warn!(event = "notify-fds-closed", "closing {} fd(s) sent without FDSTORE=1", d.fds.len());
        }
        match msg.lifecycle() {
            Some(Lifecycle::Ready) => self.on_ready(index),
            // A generation's STOPPING=1 is never forwarded upstream: from
            // systemd 259 on, STOPPING=1 is final for the whole unit.
            Some(Lifecycle::Stopping) => {
                if self.generations[index].state == State::Active {
                    let g = &mut self.generations[index];
                    g.state = State::Draining { kill_at: after(now, self.cfg.stop_timeout), killed: false };
                    if self.stop_begun() {
                        tracing::info!(
                            event = "stopping",
                            generation = number,
                            "generation {number} is stopping with baton; no replacement"
                        );
                    } else {
                        tracing::info!(
                            event = "stopping",
                            generation = number,
                            "generation {number} is stopping on its own; starting a replacement"
                        );
                        self.replace_active();
                    }
                }
            }
            Some(Lifecycle::Reloading) | None => {}
        }
    }

    /// Connections stored by a generation that is not the active one go
    /// straight to the active generation, if it listens for them. Returns
    /// the fds that still need storing.
    fn push_to_active(&mut self, sender: usize, name: &str, fds: Vec<ReceivedFd>) -> Option<Vec<ReceivedFd>> {
        if baton_sd::StoredName::parse(name) != baton_sd::StoredName::Connection
            || self.generations[sender].state == State::Active
        {
            return Some(fds);
        }
        // No active generation (Baton is stopping): keep them in the store,
        // forwarded to systemd's, for whoever runs next.
        let Some(active) = self.generations.iter().find(|g| g.state == State::Active) else { return Some(fds) };
        let Some(conn) = &active.handoff else { return Some(fds) };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        match crate::handoff::push(conn, name, &borrowed) {
            Ok(()) => {
                tracing::debug!(
                    event = "handoff",
                    generation = active.number,
                    count = fds.len(),
                    "moved {} fd(s) to generation {}",
                    fds.len(),
                    active.number
                );
                None
            }
            Err((sent, e)) => {
                tracing::warn!(
                    event = "handoff-deferred",
                    generation = active.number,
                    "cannot move connections to generation {} now: {e}; storing them and retrying",
                    active.number
                );
                // Those sent are the receiver's now; the rest wait in the
                // store and are moved by `flush_connections` shortly.
                self.flush_retry = Some(Instant::now() + FLUSH_RETRY);
                Some(fds.into_iter().skip(sent).collect())
            }
        }
    }

    /// Moves stored connections the active generation has not seen yet to
    /// it (after a full handoff socket, or when it connected late); retries
    /// on a timer while the socket is full.
    fn flush_connections(&mut self) {
        let Some(active) = self.generations.iter().find(|g| g.state == State::Active) else { return };
        let Some(conn) = &active.handoff else { return };
        let pending: Vec<(std::os::fd::RawFd, BorrowedFd<'_>)> = self
            .store
            .entries()
            .filter(|(name, fd)| {
                baton_sd::StoredName::parse(name) == baton_sd::StoredName::Connection
                    && !active.passed.contains(&std::os::fd::AsRawFd::as_raw_fd(fd))
            })
            .map(|(_, fd)| (std::os::fd::AsRawFd::as_raw_fd(&fd), fd))
            .collect();
        if pending.is_empty() {
            return;
        }
        let fds: Vec<BorrowedFd<'_>> = pending.iter().map(|(_, fd)| *fd).collect();
        let (sent, failed) = match crate::handoff::push(conn, baton_sd::fdstore::CONNECTION, &fds) {
            Ok(()) => (fds.len(), None),
            Err((sent, e)) => (sent, Some(e)),
        };
        let moved: Vec<std::os::fd::RawFd> = pending[..sent].iter().map(|(raw, _)| *raw).collect();
        let number = active.number;
        if let Some(e) = failed {
            tracing::debug!(event = "handoff-deferred", generation = number, "{e}; retrying");
            self.flush_retry = Some(Instant::now() + FLUSH_RETRY);
        }
        if !moved.is_empty() {
            tracing::info!(
                event = "handoff",
                generation = number,
                count = moved.len(),
                "moved {} stored connection(s) to generation {number}",
                moved.len()
            );
            self.store.remove_raw(&moved);
            // They were also kept in systemd's store for a crash of ours;
            // once none is left here, drop them there too.
            if !self.store.entries().any(|(n, _)| baton_sd::StoredName::parse(n) == baton_sd::StoredName::Connection) {
                let upstream_name = format!("app/{}", baton_sd::fdstore::CONNECTION);
                self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&upstream_name)]);
            }
        }
    }

    fn on_handoff_peer(&mut self, peer: crate::handoff::Peer) {
        let generation =
            peer.pid.and_then(|pid| self.generations.iter_mut().find(|g| g.is_main(pid) || g.child.pid == pid));
        match generation {
            Some(g) => {
                g.handoff = Some(peer.conn);
                // It may have become active (READY=1) before we saw it connect.
                self.flush_connections();
            }
            // Dropping `peer.conn` releases whatever the peer queued in it,
            // on the closer thread.
            None if !self.refusals.allow(Refused::Handoff, peer.pid) => {}
            None => match peer.pid {
                Some(pid) => tracing::warn!(
                    event = "handoff-refused",
                    sender = pid,
                    "handoff connection from pid {pid} refused: not a generation's main process"
                ),
                None => tracing::warn!(
                    event = "handoff-refused",
                    uid = peer.uid,
                    "handoff connection from uid {} refused: its pid is not visible in Baton's PID namespace, so it \
                     is no generation of Baton's; run the app in Baton's PID namespace (or one below it)",
                    peer.uid
                ),
            },
        }
    }

    fn store_fds(&mut self, name: &str, fds: Vec<ReceivedFd>, poll: bool) {
        // Forward first (the store takes ownership): under systemd, the
        // store must survive Baton itself. The `app/` prefix tells the next
        // Baton which entries are the app's.
        if let Some(up) = &self.upstream {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            let poll = if poll { FdPoll::Poll } else { FdPoll::NoPoll };
            if let Err(e) = up.store_fds(&format!("app/{name}"), &borrowed, poll) {
                tracing::warn!(event = "fdstore-forward-failed", name, "cannot forward to systemd's fd store: {e}");
            }
        }
        if let Err(e) = self.store.add_received(name, fds, poll) {
            tracing::warn!(event = "fdstore-full", name, "{e}");
        }
    }

    fn on_ready(&mut self, index: usize) {
        let now = Instant::now();
        let g = &mut self.generations[index];
        if g.state != State::Starting {
            return; // READY=1 after a reload of the app itself, or repeated
        }
        g.ready_at = Some(now);
        let number = g.number;
        let pid = g.main_pid();
        match &self.cfg.health_cmd {
            None => self.cutover(number),
            Some(cmd) => {
                let sh = AppCommand::new("/bin/sh".as_ref(), &["-c".into(), cmd.into()]);
                let extra = [("BATON_PID", pid.to_string()), ("BATON_GENERATION", number.to_string())];
                let setup = GenerationSetup {
                    fds: &[],
                    notify_socket: None,
                    watchdog_usec: None,
                    extra_env: &extra,
                    output: None,
                };
                match sh.and_then(|sh| sh.spawn(&setup)) {
                    Ok(child) => {
                        let g = &mut self.generations[index];
                        g.state = State::HealthCheck { pid: child.pid };
                        g.health = Some(child);
                    }
                    Err(e) => self.fail_starting(number, format!("cannot run the health check: {e}")),
                }
            }
        }
    }

    /// Which generation a notify sender belongs to, per `NotifyAccess`.
    fn attribute(&self, pid: u32) -> Option<usize> {
        if let Some(i) = self.generations.iter().position(|g| g.is_main(pid)) {
            return Some(i);
        }
        let health_check = || self.generations.iter().position(|g| g.is_health_check(pid));
        match self.cfg.notify_access {
            NotifyAccess::Main => None,
            NotifyAccess::Exec => health_check(),
            // Members of the leader's process group that also descend from
            // it: anyone in Baton's session can join the group (see
            // crate::lineage).
            NotifyAccess::All => health_check().or_else(|| {
                self.generations.iter().position(|g| g.child.is_running() && lineage::belongs_to(pid, g.child.pid))
            }),
        }
    }

    // ---- stopping -----------------------------------------------------

    /// Whether Baton's stop has begun, beginning it now if a stop signal
    /// arrived that tokio's stream has not delivered yet: nothing may be
    /// spawned then. Under `KillMode=control-group` systemd's SIGTERM reaches
    /// Baton and the generations at once, and a generation's STOPPING=1 (or
    /// exit) read before the stream fires would otherwise start a
    /// replacement that is stopped right away (see [`crate::stop_signal`]).
    fn stop_begun(&mut self) -> bool {
        if self.stopping.is_none() && self.ended.is_none() && crate::stop_signal::arrived() {
            tracing::info!(event = "stop-signal", "stop signal received");
            self.begin_stop(None);
        }
        self.stopping.is_some() || self.ended.is_some()
    }

    fn begin_stop(&mut self, reply: Option<oneshot::Sender<Response>>) {
        if let Some(waiters) = &mut self.stopping {
            waiters.extend(reply);
            return;
        }
        tracing::info!(event = "stopping", "stopping all generations");
        if let Some(up) = self.upgrading.take() {
            let _ = up.reply.send(Response::Error { message: "baton is stopping; the upgrade was cancelled".into() });
        }
        if self.restart.as_ref().is_some_and(|r| r.trigger != Trigger::Initial) {
            // We announced RELOADING=1; systemd 252 ignores STOPPING=1 until
            // the reload is over, so end it first, in its own datagram.
            self.upstream_notify(&[NotifyState::Ready]);
        }
        self.upstream_notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        self.stopping = Some(reply.into_iter().collect());
        self.scheduled = None;
        if let Some(r) = self.restart.take() {
            for w in r.waiters {
                let _ = w.send(Response::Stopping);
            }
        }
        for w in self.pending.drain(..) {
            let _ = w.send(Response::Stopping);
        }
        let now = Instant::now();
        for g in &mut self.generations {
            if let Some(h) = g.health.take() {
                let _ = h.signal_group(Signal::KILL);
            }
            if !matches!(g.state, State::Draining { .. }) {
                let _ = g.child.signal_group(self.cfg.stop_signal);
                g.state = State::Draining { kill_at: after(now, self.cfg.stop_timeout), killed: false };
            }
        }
        self.check_stopped();
    }

    fn check_stopped(&mut self) {
        if self.generations.is_empty()
            && let Some(waiters) = self.stopping.take()
        {
            for w in waiters {
                let _ = w.send(Response::Stopping);
            }
            self.ended.get_or_insert(Ended::Stopped);
        }
    }

    fn kill_all(&mut self) {
        for g in &mut self.generations {
            if let Some(h) = g.health.take() {
                let _ = h.signal_group(Signal::KILL);
            }
            let _ = g.child.signal_group(Signal::KILL);
        }
    }

    fn upstream_notify(&self, states: &[NotifyState<'_>]) {
        if let Some(up) = &self.upstream
            && let Err(e) = up.notify(states)
        {
            tracing::warn!(event = "upstream-notify-failed", "notifying the service manager failed: {e}");
        }
    }
}

// ---- baton upgrade ------------------------------------------------------

impl Supervisor {
    /// Why an upgrade cannot happen now, if it cannot: only a stable state
    /// (no generation starting, no restart pending or scheduled) is handed
    /// over, so the new image never has to resume a half-done transition.
    fn busy_reason(&self) -> Option<String> {
        if self.stopping.is_some() || self.ended.is_some() {
            return Some("baton is stopping".into());
        }
        if self.upgrading.is_some() {
            return Some("another upgrade is in progress".into());
        }
        if let Some(r) = &self.restart {
            return Some(format!("a restart is in progress (generation {} is starting)", r.generation));
        }
        if self.pending_requested {
            return Some("a restart is queued".into());
        }
        if self.scheduled.is_some() || self.pending_exit.is_some() {
            return Some("a crashed generation is being replaced".into());
        }
        if let Some(g) = self.generations.iter().find(|g| !matches!(g.state, State::Active | State::Draining { .. })) {
            return Some(format!("generation {} is starting", g.number));
        }
        None
    }

    fn request_upgrade(&mut self, binary: Option<PathBuf>, reply: oneshot::Sender<Response>, conn: Option<OwnedFd>) {
        if let Some(reason) = self.busy_reason() {
            let message = format!("busy: {reason}; nothing was changed, retry `baton upgrade` once it is over");
            let _ = reply.send(Response::Error { message });
            return;
        }
        let binary = match binary.or_else(|| self.image.binary.clone()) {
            None => return drop(reply.send(Response::Error { message: UpgradeError::NoDefaultBinary.to_string() })),
            Some(b) if !b.is_absolute() => {
                let message = UpgradeError::RelativeBinary { path: b }.to_string();
                return drop(reply.send(Response::Error { message }));
            }
            Some(b) => b,
        };
        tracing::info!(event = "upgrade-requested", binary = %binary.display(), "checking {} before upgrading", binary.display());
        // The probe runs beside the supervisor, which keeps serving; the
        // outcome comes back to `on_probe`.
        let (tx, rx) = oneshot::channel();
        let path = binary.clone();
        tokio::spawn(async move {
            let _ = tx.send(upgrade::probe(&path, upgrade::PROBE_TIMEOUT).await);
        });
        self.upgrading = Some(PendingUpgrade { reply, conn, binary, requested: Instant::now(), probe: Some(rx) });
    }

    fn on_probe(&mut self, probed: Result<ProbeInfo, UpgradeError>) {
        let Some(mut up) = self.upgrading.take() else { return };
        up.probe = None;
        match probed {
            Err(e) => {
                tracing::warn!(event = "upgrade-refused", "{e}");
                let _ = up.reply.send(Response::Error { message: e.to_string() });
            }
            Ok(info) => {
                // A restart may have begun while probing.
                if let Some(reason) = self.busy_reason() {
                    let message = format!("busy: {reason}; nothing was changed, retry `baton upgrade` once it is over");
                    let _ = up.reply.send(Response::Error { message });
                    return;
                }
                tracing::info!(
                    event = "upgrade-probed",
                    version = %info.version,
                    "{} is baton {}; upgrading",
                    up.binary.display(),
                    info.version
                );
                // Executed at the top of the run loop, which owns the
                // control channel.
                self.upgrading = Some(up);
            }
        }
    }

    /// Answers a control request that arrives while the exec is being
    /// prepared: status as usual, anything else "retry".
    fn answer_while_upgrading(&mut self, incoming: Incoming) {
        let response = match incoming.request {
            Request::Status => Response::Status(Box::new(self.status())),
            _ => Response::Error {
                message: "busy: baton is upgrading itself to a new binary right now; retry in a moment".into(),
            },
        };
        let _ = incoming.reply.send(response);
    }

    fn fail_upgrade(&mut self, up: PendingUpgrade, message: String) {
        tracing::error!(event = "upgrade-failed", "{message}");
        // Signals that came meanwhile are delivered now, to the run loop.
        upgrade::unblock_handled_signals();
        if let Some(server) = &mut self.control {
            server.resume();
        }
        let _ = up.reply.send(Response::Error { message });
    }

    /// Quiesces, hands the state over and re-executes. Returns only if the
    /// upgrade did not happen (the client got the reason).
    ///
    /// `signals` are the run loop's SIGHUP, SIGTERM and SIGINT streams: from
    /// here on those signals are blocked, so they stay pending in the kernel
    /// and survive the exec (or are delivered when the upgrade fails); one
    /// that tokio's handler already took before is found on the streams and
    /// cancels the upgrade instead of being lost with this image.
    async fn execute_upgrade(
        &mut self,
        control: &mut mpsc::Receiver<Incoming>,
        signals: [&mut tokio::signal::unix::Signal; 3],
    ) {
        let Some(up) = self.upgrading.take() else { return };
        upgrade::block_handled_signals();
        if let Some(server) = &mut self.control {
            server.pause();
        }
        // Clients already connected get their answers first (at most the
        // grace): their connections die with this image. The upgrade's own
        // client is the one allowed to stay.
        let grace = tokio::time::sleep(UPGRADE_QUIESCE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                Some(incoming) = control.recv() => self.answer_while_upgrading(incoming),
                _ = settled(&self.control) => break,
                _ = &mut grace => break,
            }
        }
        while let Ok(incoming) = control.try_recv() {
            self.answer_while_upgrading(incoming);
        }
        // A signal that reached tokio's handler before the block above is in
        // its pipe: one pass of the driver (yield) moves it to the streams.
        tokio::task::yield_now().await;
        let [hup, term, int] = signals;
        // The flag as well: it is set by the handler itself, whatever the
        // driver has done since (see `crate::stop_signal`).
        let (stop, restart) = (taken(term) | taken(int) | crate::stop_signal::arrived(), taken(hup));
        if stop || restart {
            let what = if stop { "baton is stopping" } else { "a restart was requested (SIGHUP)" };
            self.fail_upgrade(up, format!("busy: {what}; nothing was changed"));
            if stop {
                self.begin_stop(None);
            } else {
                self.request_restart(None);
            }
            return;
        }
        // Exits already reaped are known only to this image: apply them.
        while let Some(exit) = self.reaper.try_next() {
            self.on_exit(exit.pid, &exit.status);
        }
        let mut peers = Vec::new();
        if let Some((_, rx)) = &mut self.handoff {
            while let Ok(peer) = rx.try_recv() {
                peers.push(peer);
            }
        }
        for peer in peers {
            self.on_handoff_peer(peer);
        }
        if let Some(reason) = self.busy_reason() {
            let message = format!("busy: {reason}; nothing was changed, retry `baton upgrade` once it is over");
            return self.fail_upgrade(up, message);
        }
        let state = match self.handover(&up) {
            Ok(state) => state,
            Err(e) => return self.fail_upgrade(up, e.to_string()),
        };
        let status = format!("upgrading baton in place to {}", up.binary.display());
        self.upstream_notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now(),
            NotifyState::Status(&status),
        ]);
        tracing::info!(
            event = "upgrade-exec",
            binary = %up.binary.display(),
            generations = self.generations.len(),
            prepare_ms = up.requested.elapsed().as_millis() as u64,
            "re-executing {} with {} generation(s), {} socket(s), {} stored fd(s)",
            up.binary.display(),
            self.generations.len(),
            self.cfg.sockets.len(),
            self.store.len()
        );
        // execve() would close the fds queued for the closer on this thread.
        crate::closer::close_queued_without_lingering();
        // Only returns if the exec failed; everything is as before.
        let e = upgrade::exec(&up.binary, &self.image.argv, &state, self.image.exe.as_deref().map(|e| e.as_fd()));
        let serving = self.active().map(|g| format!("generation {} serving as pid {}", g.number, g.main_pid()));
        let status = format!("upgrade failed; {}", serving.unwrap_or_else(|| "no generation serving".into()));
        self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.fail_upgrade(up, e.to_string());
    }

    /// The state to hand over; every fd it names is owned by `self` and
    /// stays open while `self` lives.
    fn handover(&self, up: &PendingUpgrade) -> Result<Handover, UpgradeError> {
        let cfg = &self.cfg;
        // The new image rebuilds the app's command from its command line
        // (see `adopt`): make sure that works now, rather than after the
        // exec.
        if let Some((program, args)) = cfg.command_line.split_first()
            && let Err(e) = AppCommand::new(program, args)
            && AppCommand::new(cfg.command.program().as_os_str(), args).is_err()
        {
            return Err(UpgradeError::AppProgram { program: program.into(), reason: e.to_string() });
        }
        let control = self.control.as_ref().ok_or_else(|| UpgradeError::Exec {
            context: "handing over the control socket",
            source: std::io::Error::other("this supervisor has no control socket"),
        })?;
        let mut generations = Vec::with_capacity(self.generations.len());
        for g in &self.generations {
            let (state, kill_at, killed) = match g.state {
                State::Active => ("active", None, false),
                State::Draining { kill_at, killed } => ("draining", Some(upgrade::to_mono(kill_at)), killed),
                _ => {
                    return Err(UpgradeError::Exec {
                        context: "handing over the generations",
                        source: std::io::Error::other(format!("generation {} is {}", g.number, g.state_name())),
                    });
                }
            };
            generations.push(upgrade::GenerationState {
                number: g.number,
                pid: g.child.pid,
                pidfd: g.child.pidfd.as_raw_fd(),
                main_pid: g.main_pid(),
                main_pidfd: g.main.as_ref().filter(|m| m.is_alive()).map(|m| m.pidfd().as_raw_fd()),
                state: state.into(),
                kill_at_mono_us: kill_at,
                killed,
                spawned_mono_us: upgrade::to_mono(g.spawned_at),
                ready_mono_us: g.ready_at.map(upgrade::to_mono),
                status_text: g.status_text.clone(),
                watchdog: g.watchdog,
                last_ping_mono_us: upgrade::to_mono(g.last_ping),
                output: g.output.kind(),
                output_fd: g.output.pipe_fd(),
                output_lines: g.output.lines(),
                output_unwritten: g.output.unwritten(),
                handoff: g.handoff.as_ref().map(|h| h.as_raw_fd()),
                passed: g.passed.clone(),
            });
        }
        let supervisor = upgrade::SupervisorState {
            name: cfg.name.clone(),
            app_argv: cfg.command_line.iter().map(|a| upgrade::os_bytes(a)).collect(),
            app_program: cfg.command.program().to_owned(),
            sockets: cfg
                .sockets
                .iter()
                .map(|s| upgrade::SocketState { name: s.name.clone(), fd: s.fd.as_raw_fd(), local: s.local.clone() })
                .collect(),
            ready_timeout: cfg.ready_timeout,
            stop_signal: cfg.stop_signal.as_raw(),
            stop_timeout: cfg.stop_timeout,
            notify_access: match cfg.notify_access {
                NotifyAccess::Main => "main",
                NotifyAccess::Exec => "exec",
                NotifyAccess::All => "all",
            }
            .into(),
            watchdog: cfg.watchdog,
            fdstore_max: self.store.max(),
            health_cmd: cfg.health_cmd.clone(),
            max_draining: cfg.max_draining,
            backoff_initial: cfg.backoff.initial,
            backoff_max: cfg.backoff.max,
            backoff_burst: cfg.backoff.burst,
            backoff_interval: cfg.backoff.interval,
            store: self
                .store
                .export()
                .into_iter()
                .map(|(name, fd, polled)| upgrade::StoredState { name, fd, polled })
                .collect(),
            store_watching: self.store.is_watching(),
            output_mode: cfg.output,
            generations,
            next_number: self.next_number,
            crashes: self.crashes.iter().map(|c| upgrade::to_mono(*c)).collect(),
            consecutive_failures: self.consecutive_failures,
            started_mono_us: upgrade::to_mono(self.started),
            restarts: self.restarts,
            crash_restarts: self.crash_restarts,
            last_failure: self.last_failure.clone(),
            flush_retry_mono_us: self.flush_retry.map(upgrade::to_mono),
        };
        Ok(Handover {
            format: upgrade::STATE_FORMAT,
            from_version: env!("CARGO_PKG_VERSION").into(),
            binary: up.binary.clone(),
            previous_binary: self.image.binary.clone(),
            argv: self.image.argv.iter().map(|a| upgrade::os_bytes(a)).collect(),
            upgrades: self.image.upgrades + 1,
            requested_mono_us: upgrade::to_mono(up.requested),
            control: upgrade::PathFd { path: control.path().to_owned(), fd: control.listener_fd() },
            client: up.conn.as_ref().map(|c| c.as_raw_fd()),
            notify: self.notify.export(),
            handoff: self
                .handoff
                .as_ref()
                .map(|(h, _)| upgrade::PathFd { path: h.path().to_owned(), fd: h.listener_fd() }),
            upstream: self.upstream.as_ref().map(|u| u.address().to_owned()),
            supervisor,
        })
    }

    /// Rebuilds the supervisor from the state handed over by the previous
    /// program image (`baton upgrade`), taking over every fd it names.
    /// Returns it with its control requests, ready to [`run`](Self::run)
    /// (which answers the upgrade's client and tells systemd READY=1). Must
    /// run inside a tokio runtime.
    pub fn adopt(h: Handover) -> Result<(Self, mpsc::Receiver<Incoming>), SupervisorError> {
        let bad = |m: String| SupervisorError::Upgrade(UpgradeError::State(m));
        let io = |context| move |source| SupervisorError::Io { context, source };
        let s = h.supervisor;
        // Own every fd first: whatever fails below, they are closed, not
        // leaked.
        let mut fds = upgrade::Adopter::default();
        let control_fd = fds.take(h.control.fd, "the control socket")?;
        let notify_fd = fds.take(h.notify.fd, "the notify socket")?;
        let client = h.client.map(|fd| fds.take(fd, "the upgrade client's connection")).transpose()?;
        let handoff_fd = match &h.handoff {
            Some(x) => Some((x.path.clone(), fds.take(x.fd, "the handoff socket")?)),
            None => None,
        };
        let mut sockets = Vec::with_capacity(s.sockets.len());
        for x in &s.sockets {
            let fd = fds.take(x.fd, &format!("listening socket {}", x.name))?;
            sockets.push(BoundSocket { name: x.name.clone(), fd, local: x.local.clone() });
        }
        let mut stored = Vec::with_capacity(s.store.len());
        for x in &s.store {
            stored.push((x.name.clone(), fds.take(x.fd, &format!("fd-store entry {}", x.name))?, x.polled));
        }
        struct Taken {
            pidfd: OwnedFd,
            main: Option<MainProcess>,
            output: Option<OwnedFd>,
            handoff: Option<OwnedFd>,
        }
        let mut taken = Vec::with_capacity(s.generations.len());
        for g in &s.generations {
            let what = |x: &str| format!("generation {}'s {x}", g.number);
            taken.push(Taken {
                pidfd: fds.take(g.pidfd, &what("pidfd"))?,
                main: match g.main_pidfd {
                    Some(fd) => Some(MainProcess::adopt(g.main_pid, fds.take(fd, &what("main process pidfd"))?)),
                    // Written by an image that kept no pidfd for it: pin it
                    // now if it still belongs to the generation.
                    None if g.main_pid != g.pid => MainProcess::pin(g.main_pid, g.pid).ok(),
                    None => None,
                },
                output: g.output_fd.map(|fd| fds.take(fd, &what("output pipe"))).transpose()?,
                handoff: g.handoff.map(|fd| fds.take(fd, &what("handoff connection"))).transpose()?,
            });
        }

        let argv: Vec<OsString> = s.app_argv.iter().map(|a| upgrade::bytes_os(a)).collect();
        let Some((program, args)) = argv.split_first() else {
            return Err(bad("the app's command line is empty".into()));
        };
        // Resolved again from the command line as given, so argv[0] stays
        // what the user wrote; if that now finds another program, the one
        // the generations run is kept.
        let command = match AppCommand::new(program, args) {
            Ok(c) if c.program() == s.app_program => c,
            other => match (AppCommand::new(s.app_program.as_os_str(), args), other) {
                (Ok(c), _) | (Err(_), Ok(c)) => c,
                // Checked by the old image moments ago, so the program just
                // vanished. Failing here would abandon the running
                // generations; instead starting a new one reports why.
                (Err(e), Err(_)) => {
                    tracing::error!("the app's program is gone: {e}; restarts fail until baton is restarted");
                    let message = format!("baton: the app's program vanished during baton's upgrade: {e}");
                    let script = "echo \"$1\" >&2; exit 127";
                    AppCommand::new("/bin/sh".as_ref(), &["-c".into(), script.into(), "sh".into(), message.into()])
                        .map_err(|e| bad(e.to_string()))?
                }
            },
        };
        let stop_signal = Signal::from_named_raw(s.stop_signal)
            .ok_or_else(|| bad(format!("stop signal {} is not a known signal", s.stop_signal)))?;
        let notify_access = match s.notify_access.as_str() {
            "main" => NotifyAccess::Main,
            "exec" => NotifyAccess::Exec,
            "all" => NotifyAccess::All,
            other => return Err(bad(format!("unknown notify access {other:?}"))),
        };

        reaper::become_subreaper().map_err(io("becoming the subreaper of the app's processes"))?;
        let reaper = Reaper::start().map_err(io("starting the child reaper"))?;
        // Not dropped if anything below fails: dropping them would unlink
        // their paths, which the previous image needs back when this one
        // hands control back (see `upgrade::Fallback`).
        let (control, requests) = ControlServer::adopt(&h.control.path, control_fd).map_err(|e| bad(e.to_string()))?;
        let control = ManuallyDrop::new(control);
        let notify =
            ManuallyDrop::new(NotifyServer::adopt(notify_fd, &h.notify).map_err(io("adopting the notify socket"))?);
        let handoff = ManuallyDrop::new(match handoff_fd {
            Some((path, fd)) => {
                Some(crate::handoff::HandoffServer::adopt(&path, fd).map_err(io("adopting the handoff socket"))?)
            }
            None => None,
        });
        let upstream = match h.upstream.as_deref().map(Notifier::new) {
            Some(Ok(n)) => Some(Arc::new(n)),
            Some(Err(e)) => {
                tracing::warn!("cannot notify the service manager any more: {e}");
                None
            }
            None => None,
        };
        let store = FdStore::restore(s.fdstore_max, stored, s.store_watching).map_err(|e| bad(e.to_string()))?;
        let output_closed = Arc::new(tokio::sync::Notify::new());
        let now = Instant::now();
        let mut generations = Vec::with_capacity(s.generations.len());
        let mut lost = Vec::new();
        for (g, t) in s.generations.into_iter().zip(taken) {
            let state = match g.state.as_str() {
                "active" => State::Active,
                "draining" => {
                    State::Draining { kill_at: g.kill_at_mono_us.map_or(now, upgrade::from_mono), killed: g.killed }
                }
                other => return Err(bad(format!("generation {} is in state {other:?}", g.number))),
            };
            let output = match (g.output, t.output) {
                (OutputKind::Pipe, Some(fd)) => Output::Captured(
                    crate::output::adopt(
                        crate::output::Adopted {
                            read_end: fd,
                            lines: g.output_lines,
                            unwritten: g.output_unwritten,
                            identity: crate::journal::Identity::new(command.program(), g.number),
                            pid: g.pid,
                        },
                        Arc::clone(&output_closed),
                    )
                    .map_err(io("adopting a generation's output pipe"))?,
                ),
                (OutputKind::Pipe, None) => Output::Captured(crate::output::Tail::finished(g.output_lines)),
                (OutputKind::None, None) => Output::Inherited,
                (OutputKind::None, Some(_)) => {
                    return Err(bad(format!("generation {} has no output pipe but names one", g.number)));
                }
            };
            // An exit the previous image reaped but had not processed yet
            // (it takes all it can before the exec; this is the safety
            // net): the pidfd then no longer refers to a child of ours.
            let gone = matches!(
                rustix::process::waitid(
                    rustix::process::WaitId::PidFd(t.pidfd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED
                        | rustix::process::WaitIdOptions::NOHANG
                        | rustix::process::WaitIdOptions::NOWAIT,
                ),
                Err(rustix::io::Errno::CHILD)
            );
            if gone {
                lost.push(g.pid);
            }
            generations.push(Generation {
                number: g.number,
                child: Child { pid: g.pid, pidfd: t.pidfd },
                main: t.main,
                state,
                spawned_at: upgrade::from_mono(g.spawned_mono_us),
                ready_at: g.ready_mono_us.map(upgrade::from_mono),
                start_deadline: now,
                status_text: g.status_text,
                watchdog: g.watchdog,
                last_ping: upgrade::from_mono(g.last_ping_mono_us),
                output,
                health: None,
                handoff: t.handoff.map(ReceivedFd::new),
                passed: g.passed,
            });
        }
        let cfg = Config {
            name: s.name,
            command,
            command_line: argv,
            sockets,
            stored: Vec::new(),
            ready_timeout: s.ready_timeout,
            stop_signal,
            stop_timeout: s.stop_timeout,
            notify_access,
            watchdog: s.watchdog,
            fdstore_max: s.fdstore_max,
            health_cmd: s.health_cmd,
            max_draining: s.max_draining,
            backoff: Backoff {
                initial: s.backoff_initial,
                max: s.backoff_max,
                burst: s.backoff_burst,
                interval: s.backoff_interval,
            },
            output: s.output_mode,
        };
        let image = Image {
            binary: Some(h.binary),
            argv: h.argv.iter().map(|a| upgrade::bytes_os(a)).collect(),
            upgrades: h.upgrades,
            started: now,
            exe: upgrade::open_own_exe().map(Arc::new),
        };
        let supervisor = Supervisor {
            cfg,
            notify: ManuallyDrop::into_inner(notify),
            reaper,
            store,
            upstream,
            generations,
            next_number: s.next_number,
            restart: None,
            pending: Vec::new(),
            pending_requested: false,
            scheduled: None,
            crashes: s.crashes.into_iter().map(upgrade::from_mono).collect(),
            consecutive_failures: s.consecutive_failures,
            started: upgrade::from_mono(s.started_mono_us),
            restarts: s.restarts,
            crash_restarts: s.crash_restarts,
            last_failure: s.last_failure,
            stopping: None,
            ended: None,
            failed_output: None,
            pending_exit: None,
            output_closed,
            inherited_to: InheritedTo::detect(),
            handoff: ManuallyDrop::into_inner(handoff),
            flush_retry: s.flush_retry_mono_us.map(upgrade::from_mono),
            control: Some(ManuallyDrop::into_inner(control)),
            image,
            upgrading: None,
            adopted: Some(Adopted {
                client,
                requested_mono_us: h.requested_mono_us,
                from_version: h.from_version,
                lost,
                failed: None,
                previous_binary: h.previous_binary,
            }),
            refusals: RefusalLog::new(),
            // The image before proved its generations already; an upgrade
            // is no restart systemd counts.
            restart_reset: RestartReset::Done,
        };
        Ok((supervisor, requests))
    }

    /// This image is the previous one, back after the next image could not
    /// adopt its state (`reason`): it answers the `baton upgrade` client
    /// with that, and is again what it was before the upgrade.
    pub fn after_failed_upgrade(mut self, reason: String) -> Self {
        if let Some(adopted) = &mut self.adopted {
            self.image.binary = adopted.previous_binary.take().or(self.image.binary.take());
            self.image.upgrades = self.image.upgrades.saturating_sub(1);
            adopted.failed = Some(reason);
        }
        self
    }

    /// The adopting image is running (signal handlers installed): let
    /// pending signals in, settle lost exits, tell systemd and the client.
    fn finish_adoption(&mut self, adopted: Adopted) {
        upgrade::unblock_handled_signals();
        for pid in adopted.lost {
            tracing::warn!(event = "exit-lost", pid, "pid {pid} ended during the upgrade; its exit status is unknown");
            self.on_gone(pid, "ended during baton's upgrade (exit status unknown)".into(), false);
        }
        let elapsed_ms = upgrade::mono_now_us().saturating_sub(adopted.requested_mono_us) / 1000;
        let version = env!("CARGO_PKG_VERSION");
        let binary = self.image.binary.as_ref().map(|b| b.display().to_string()).unwrap_or_default();
        let response = match adopted.failed {
            Some(reason) => {
                let message = format!(
                    "{reason}; baton went back to the binary it ran before ({binary}, baton {version}), which keeps \
                     running: the generations were not touched"
                );
                tracing::error!(event = "upgrade-failed", elapsed_ms, "{message}");
                let serving = self.active().map(|g| format!("generation {} serving as pid {}", g.number, g.main_pid()));
                let status = format!("upgrade failed; {}", serving.unwrap_or_else(|| "no generation serving".into()));
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                Response::Error { message }
            }
            None => self.announce_upgrade(&adopted.from_version, binary, elapsed_ms),
        };
        let Some(conn) = adopted.client else { return };
        let mut line = serde_json::to_vec(&response).unwrap_or_default();
        line.push(b'\n');
        let stream = std::os::unix::net::UnixStream::from(conn);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut stream) = tokio::net::UnixStream::from_std(stream) else { return };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Bounded like every control answer; closing is the end of it.
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&line)).await;
        });
    }

    /// Logs a successful upgrade and tells systemd; the client's answer.
    fn announce_upgrade(&self, from_version: &str, binary: String, elapsed_ms: u64) -> Response {
        let version = env!("CARGO_PKG_VERSION");
        tracing::info!(
            event = "upgraded",
            version,
            from_version,
            elapsed_ms,
            generations = self.generations.len(),
            "baton upgraded in place from {from_version} to {version} ({binary}) in {elapsed_ms} ms"
        );
        let status = match self.active() {
            Some(g) => {
                format!("generation {} serving as pid {}; baton {version} (upgraded in place)", g.number, g.main_pid())
            }
            None => format!("baton {version} (upgraded in place)"),
        };
        self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        Response::Upgraded(UpgradeDone {
            pid: std::process::id(),
            version: version.into(),
            binary,
            upgrades: self.image.upgrades,
            elapsed_ms,
            generations: self.generations.len(),
        })
    }
}

/// The probe's outcome, or never when no upgrade is being probed.
async fn probe_result(upgrading: &mut Option<PendingUpgrade>) -> Result<ProbeInfo, UpgradeError> {
    match upgrading.as_mut().and_then(|u| u.probe.as_mut()) {
        Some(rx) => rx.await.unwrap_or_else(|_| {
            Err(UpgradeError::Exec {
                context: "probing the new binary",
                source: std::io::Error::other("the probe task ended without an answer"),
            })
        }),
        None => std::future::pending().await,
    }
}

/// Whether `signal` was received (without waiting).
fn taken(signal: &mut tokio::signal::unix::Signal) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(signal.poll_recv(&mut cx), std::task::Poll::Ready(Some(())))
}

/// Resolves once at most one control client (the upgrade's) is connected.
async fn settled(control: &Option<ControlServer>) {
    if let Some(server) = control {
        server.settled(1).await;
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
