//! `baton upgrade`: replacing Baton's own program image in place.
//!
//! A package upgrade of Baton must not restart the service: restarting
//! Baton would mean stopping the app (its generations are Baton's children)
//! and, under systemd, a new main pid. Instead the running Baton `execve()`s
//! the new binary in the *same* process:
//!
//! - the pid stays (systemd's `MAINPID` never changes, fd-store entries and
//!   notify credentials stay attributed to it), the generations stay its
//!   children (and it stays their subreaper: the attribute survives
//!   `execve()`), their pidfds and process groups stay valid;
//! - every fd that matters is kept open across the exec by clearing its
//!   `FD_CLOEXEC` — the listeners, the fd store, the notify, control and
//!   handoff sockets, each generation's pidfd, output pipe (unless it
//!   inherited Baton's stdout and stderr, which need no handing over) and
//!   handoff connection, and the `baton upgrade` client's connection so that the new
//!   image itself answers it. Everything else (tokio's epoll, the store's
//!   private epoll, …) is close-on-exec and disappears;
//! - the supervisor's state goes in a sealed memfd as JSON ([`Handover`]),
//!   its fd number in [`STATE_ENV`]; fd numbers do not change across
//!   `execve()`, so the state simply names them;
//! - requests arriving meanwhile wait in the sockets (control clients in the
//!   listen backlog, notify datagrams in the receive queue, exited children
//!   as zombies with a pending `SIGCHLD`).
//!
//! What can go wrong is checked *before* anything is touched: the new binary
//! is run once with the hidden [`PROBE_SUBCOMMAND`] and must say, within
//! [`PROBE_TIMEOUT`], that it reads [`STATE_FORMAT`]. A missing,
//! non-executable or incompatible binary is refused and Baton goes on
//! untouched. If `execve()` itself fails, `FD_CLOEXEC` is restored and Baton
//! goes on too. If the new image runs but cannot adopt the state, it
//! re-executes the previous image, which takes its state back and answers
//! the client with the reason ([`Fallback`], the `fallback` module).
//!
//! Signals: `SIGTERM`, `SIGINT`, `SIGHUP` and `SIGCHLD` are blocked in the
//! exec'ing thread just before `execve()` (the runtime's other threads keep
//! them blocked all the time, see [`block_handled_signals`]); the mask and
//! pending signals survive `execve()`, so a `SIGTERM` arriving while the new
//! image starts is delivered once its handlers are installed
//! ([`unblock_handled_signals`]) instead of killing Baton with the default
//! action.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::notify_server::NotifyExport;

mod fallback;
pub mod format_v1;
pub use fallback::{FAILED_ENV, Fallback, RETURN_ENV, open_own_exe};

/// Version of the [`Handover`] format this binary writes: 2 carries the
/// policy as one [`crate::supervisor::Policy`] (1 had its fields flat; read
/// through [`format_v1`]).
pub const STATE_FORMAT: u32 = 2;
/// Oldest [`Handover`] format this binary still reads: a Baton of the
/// previous release must be able to upgrade to this one.
pub const MIN_STATE_FORMAT: u32 = 1;
/// Environment variable naming the memfd with the handed-over state.
pub const STATE_ENV: &str = "BATON_UPGRADE_STATE";
/// Hidden subcommand that prints [`probe_line`] and exits 0.
pub const PROBE_SUBCOMMAND: &str = "upgrade-probe";
/// How long the new binary may take to answer the probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest probe output read (anything a real Baton prints fits easily).
const PROBE_OUTPUT_MAX: usize = 4096;
/// The first word of the probe's answer line.
const PROBE_TAG: &str = "baton-upgrade-probe";
/// The largest state accepted (a full fd store of long names stays far
/// below it; it bounds what a corrupt fd could make us allocate).
const STATE_MAX: u64 = 64 << 20;

/// Why an upgrade was refused or failed. In every case but
/// [`State`](Self::State) Baton keeps running untouched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The new binary cannot be run.
    #[error("cannot run the new binary {path}: {reason}; baton keeps running the current one")]
    Binary {
        /// The binary.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The new binary ran but is not a Baton that can adopt this state.
    #[error(
        "{path} cannot take over this baton: {reason}; baton keeps running the current one (install a baton that \
         reads state format {STATE_FORMAT}, or pass --binary)"
    )]
    Incompatible {
        /// The binary.
        path: PathBuf,
        /// What it answered, or did not.
        reason: String,
    },
    /// The app's program cannot be resolved now: the new image could not
    /// rebuild the command that restarts it.
    #[error(
        "the app's program {program:?} cannot be found or run now ({reason}); the upgraded baton could not restart \
         the app: put it back first, then retry `baton upgrade`"
    )]
    AppProgram {
        /// The program as given to `baton run`.
        program: PathBuf,
        /// Why it cannot be resolved.
        reason: String,
    },
    /// No binary given and the start path is unknown.
    #[error("the path baton was started from is unknown; pass --binary PATH")]
    NoDefaultBinary,
    /// Relative `--binary` path.
    #[error("--binary {path:?} must be an absolute path (baton's working directory is not yours)")]
    RelativeBinary {
        /// What was given.
        path: PathBuf,
    },
    /// Preparing or performing the exec failed; Baton keeps running.
    #[error("{context}: {source}; baton keeps running the current binary")]
    Exec {
        /// The step.
        context: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The handed-over state could not be read by the new image.
    #[error("cannot adopt the state handed over by the previous baton image: {0}")]
    State(String),
}

fn exec_err(context: &'static str) -> impl FnOnce(std::io::Error) -> UpgradeError {
    move |source| UpgradeError::Exec { context, source }
}

/// What the running program image is: shown by `baton status`, and what a
/// `baton upgrade` re-executes.
#[derive(Debug, Clone)]
pub struct Image {
    /// The binary this image was started from (the default for `baton
    /// upgrade`); `None` if it could not be determined.
    pub binary: Option<PathBuf>,
    /// Baton's original command line, passed unchanged to the new image so
    /// `ps` and a later upgrade see the same one.
    pub argv: Vec<OsString>,
    /// Upgrades so far.
    pub upgrades: u64,
    /// When this image started.
    pub started: Instant,
    /// This image's own executable ([`open_own_exe`]): the way back for the
    /// next image if it cannot adopt the state (see [`Fallback`]).
    pub exe: Option<std::sync::Arc<OwnedFd>>,
}

impl Image {
    /// The image of a Baton started normally: its binary resolved now.
    pub fn at_startup() -> Image {
        Image {
            binary: startup_binary(),
            argv: std::env::args_os().collect(),
            upgrades: 0,
            started: Instant::now(),
            exe: open_own_exe().map(std::sync::Arc::new),
        }
    }
}

/// The path Baton was started from, resolved at startup, *not* through
/// `/proc/self/exe` later: after a package upgrade replaced the file, that
/// link names the deleted old inode (and it has symlinks resolved, while a
/// package may switch a symlink to the new version). `argv[0]` is what the
/// caller executed: made absolute against the current directory, or looked
/// up in `PATH` like the shell did; `/proc/self/exe` only as a last resort.
pub fn startup_binary() -> Option<PathBuf> {
    let arg0 = std::env::args_os().next()?;
    let arg0 = Path::new(&arg0);
    if arg0.as_os_str().as_bytes().contains(&b'/') {
        if arg0.is_absolute() {
            return Some(arg0.to_owned());
        }
        if let Ok(cwd) = std::env::current_dir() {
            return Some(cwd.join(arg0));
        }
    } else if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path).filter(|d| d.is_absolute()) {
            let candidate = dir.join(arg0);
            if rustix::fs::access(&candidate, rustix::fs::Access::EXEC_OK).is_ok() {
                return Some(candidate);
            }
        }
    }
    std::env::current_exe().ok()
}

// ---- the probe ------------------------------------------------------------

/// The line `baton upgrade-probe` prints: which state formats this binary
/// reads, and its version.
pub fn probe_line() -> String {
    format!(
        "{PROBE_TAG} state-format={STATE_FORMAT} min-state-format={MIN_STATE_FORMAT} version={}",
        env!("CARGO_PKG_VERSION")
    )
}

/// What the new binary said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    /// Its version.
    pub version: String,
    /// Newest state format it reads.
    pub state_format: u32,
    /// Oldest state format it reads.
    pub min_state_format: u32,
}

impl ProbeInfo {
    /// The newest state format both this binary writes and the probed one
    /// reads; `None` if there is none (then it cannot take over).
    pub fn format_to_write(&self) -> Option<u32> {
        let newest = STATE_FORMAT.min(self.state_format);
        (newest >= MIN_STATE_FORMAT.max(self.min_state_format)).then_some(newest)
    }
}

/// Parses the probe's output; `Err` says what was wrong, for the user.
pub fn parse_probe(output: &str) -> Result<ProbeInfo, String> {
    let Some(line) = output.lines().find(|l| l.split_whitespace().next() == Some(PROBE_TAG)) else {
        let shown: String = output.trim().chars().take(200).collect();
        return Err(if shown.is_empty() {
            "it printed nothing for `baton upgrade-probe` (not a baton, or one without in-place upgrades)".into()
        } else {
            format!("it did not answer `baton upgrade-probe` like a baton (it printed {shown:?})")
        });
    };
    let mut version = None;
    let mut max = None;
    let mut min = None;
    for word in line.split_whitespace().skip(1) {
        match word.split_once('=') {
            Some(("version", v)) => version = Some(v.to_owned()),
            Some(("state-format", v)) => max = v.parse::<u32>().ok(),
            Some(("min-state-format", v)) => min = v.parse::<u32>().ok(),
            _ => {}
        }
    }
    match (version, max, min) {
        (Some(version), Some(state_format), Some(min_state_format)) => {
            Ok(ProbeInfo { version, state_format, min_state_format })
        }
        _ => Err(format!("its probe answer {line:?} is malformed")),
    }
}

/// Runs `binary upgrade-probe` (as Baton's child: the reaper collects it)
/// and checks it can read [`STATE_FORMAT`]. Never waits more than `timeout`;
/// a binary that hangs is killed.
pub async fn probe(binary: &Path, timeout: Duration) -> Result<ProbeInfo, UpgradeError> {
    let bad = |reason: String| UpgradeError::Binary { path: binary.to_owned(), reason };
    let cmd = crate::spawn::AppCommand::new(binary.as_os_str(), &[PROBE_SUBCOMMAND.into()])
        .map_err(|e| bad(e.to_string()))?;
    let (read_end, write_end) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| bad(format!("pipe: {e}")))?;
    let flags = rustix::fs::fcntl_getfl(&read_end).map_err(|e| bad(e.to_string()))?;
    rustix::fs::fcntl_setfl(&read_end, flags | rustix::fs::OFlags::NONBLOCK).map_err(|e| bad(e.to_string()))?;
    let setup = crate::spawn::GenerationSetup { output: Some(write_end.as_fd()), ..Default::default() };
    let child = cmd.spawn(&setup).map_err(|e| bad(e.to_string()))?;
    drop(write_end);
    let mut receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end).map_err(|e| bad(e.to_string()))?;
    let mut output = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while output.len() < PROBE_OUTPUT_MAX {
            match receiver.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => output.extend_from_slice(&buf[..n]),
            }
        }
    };
    let finished = tokio::time::timeout(timeout, read).await.is_ok();
    // Whatever it does now, it is done; the reaper collects it. The pidfd
    // cannot hit another process even if it already exited and was reaped.
    let _ = child.signal(rustix::process::Signal::KILL);
    if !finished {
        // Hung, with its output still open: whatever it started goes too
        // (its group is alive, so the id cannot have been reused).
        let _ = child.signal_group(rustix::process::Signal::KILL);
        return Err(UpgradeError::Incompatible {
            path: binary.to_owned(),
            reason: format!("it did not answer `baton upgrade-probe` within {timeout:?}"),
        });
    }
    let info = parse_probe(&String::from_utf8_lossy(&output))
        .map_err(|reason| UpgradeError::Incompatible { path: binary.to_owned(), reason })?;
    if info.format_to_write().is_none() {
        return Err(UpgradeError::Incompatible {
            path: binary.to_owned(),
            reason: format!(
                "version {} reads state formats {}..={}, this baton writes formats {MIN_STATE_FORMAT}..={STATE_FORMAT}",
                info.version, info.min_state_format, info.state_format
            ),
        });
    }
    Ok(info)
}

// ---- the state ------------------------------------------------------------

/// Everything the new image needs, serialized into the memfd. Fds are named
/// by number: `execve()` keeps numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    /// [`STATE_FORMAT`] of the writer.
    pub format: u32,
    /// Version of the image that wrote it.
    pub from_version: String,
    /// The binary being exec'd: the new image's default for the next upgrade.
    pub binary: PathBuf,
    /// The binary of the image that wrote this: its own again if the new
    /// image hands control back.
    #[serde(default)]
    pub previous_binary: Option<PathBuf>,
    /// Baton's command line (bytes: it need not be UTF-8).
    pub argv: Vec<Vec<u8>>,
    /// Upgrades including this one.
    pub upgrades: u64,
    /// When the request reached the old image (`CLOCK_MONOTONIC`, µs).
    pub requested_mono_us: u64,
    /// The control socket.
    pub control: PathFd,
    /// The `baton upgrade` client's connection, answered by the new image.
    pub client: Option<RawFd>,
    /// The notify socket.
    pub notify: NotifyExport,
    /// The handoff socket, if any.
    pub handoff: Option<PathFd>,
    /// `NOTIFY_SOCKET` of Baton's own service manager, if any.
    pub upstream: Option<String>,
    /// The state machine.
    pub supervisor: SupervisorState,
}

/// A listening socket bound at a path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathFd {
    /// Where it is bound.
    pub path: PathBuf,
    /// Its fd.
    pub fd: RawFd,
}

/// The supervisor's configuration and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorState {
    /// Instance name.
    pub name: String,
    /// The app's command line as given (bytes).
    pub app_argv: Vec<Vec<u8>>,
    /// The app's resolved program.
    pub app_program: PathBuf,
    /// Listening sockets, in `LISTEN_FDS` order.
    pub sockets: Vec<SocketState>,
    /// The policy (`baton run`'s options), as the supervisor has it
    /// (format 1 had its fields flat here: see [`format_v1`]).
    pub policy: crate::supervisor::Policy,
    /// The fd store, in order.
    pub store: Vec<StoredState>,
    /// Whether the store had its epoll instance.
    #[serde(default)]
    pub store_watching: bool,
    /// Live generations, oldest first.
    pub generations: Vec<GenerationState>,
    /// Number of the next generation.
    pub next_number: u64,
    /// Recent failures (`CLOCK_MONOTONIC`, µs) for the crash-loop verdict.
    pub crashes: Vec<u64>,
    /// Failures in a row (backoff exponent).
    pub consecutive_failures: u32,
    /// When Baton started (µs).
    pub started_mono_us: u64,
    /// Successful restarts.
    pub restarts: u64,
    /// Crash restarts.
    pub crash_restarts: u64,
    /// Last failure text.
    pub last_failure: Option<String>,
    /// Pending retry of moving stored connections (µs).
    pub flush_retry_mono_us: Option<u64>,
    /// The sibling sockets Baton bound for steering (standalone), each
    /// named like the listener it pairs with. Absent without steering (so
    /// such states are what Batons before it wrote).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub siblings: Vec<SocketState>,
    /// Which socket of each pair is which, and where traffic goes
    /// (`crate::steering::Layout`): the next image neither measures nor
    /// re-attaches. Absent without steering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<crate::steering::Layout>,
    /// The connection vault under systemd (see [`crate::vault`]); absent
    /// when there is none (so such states are what Batons before it wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultState>,
}

/// The connection vault: its sending end (the receiving end is in
/// systemd's store), its name there and how many connections it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaultState {
    /// Its name in systemd's store.
    pub name: String,
    /// Its sending end.
    pub fd: RawFd,
    /// Connections queued in it, live or gone.
    pub held: usize,
    /// The serial of the last vault created.
    pub serial: u64,
}

/// One listening socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketState {
    /// `LISTEN_FDNAMES` name.
    pub name: String,
    /// Its fd.
    pub fd: RawFd,
    /// Its description (`tcp 127.0.0.1:8080`).
    pub local: String,
}

/// One fd-store entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredState {
    /// `FDNAME=`.
    pub name: String,
    /// Its fd.
    pub fd: RawFd,
    /// Watched for hang-ups.
    pub polled: bool,
}

/// One generation (only running or draining ones are ever handed over).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationState {
    /// Its number.
    pub number: u64,
    /// The process Baton started (also the process group id).
    pub pid: u32,
    /// Its pidfd.
    pub pidfd: RawFd,
    /// `MAINPID=` (normally `pid`).
    pub main_pid: u32,
    /// A pidfd for `main_pid` when it is not `pid` (states written before
    /// it existed lack it: the new image pins `main_pid` itself).
    #[serde(default)]
    pub main_pidfd: Option<RawFd>,
    /// `active` or `draining`.
    pub state: String,
    /// Draining: when it gets SIGKILL (µs).
    pub kill_at_mono_us: Option<u64>,
    /// Draining: SIGKILL already sent.
    pub killed: bool,
    /// Spawn time (µs).
    pub spawned_mono_us: u64,
    /// READY=1 time (µs).
    pub ready_mono_us: Option<u64>,
    /// Last `STATUS=`.
    pub status_text: Option<String>,
    /// Watchdog interval in force.
    pub watchdog: Option<Duration>,
    /// Last watchdog ping (µs).
    pub last_ping_mono_us: u64,
    /// `pipe`, or `none` when it writes to Baton's own stdout and stderr
    /// (then `output_fd` is `None` and `output_lines` empty). States written
    /// before output could be inherited lack it: `pipe`.
    #[serde(default)]
    pub output: crate::output::OutputKind,
    /// The read end of its output pipe, while open.
    pub output_fd: Option<RawFd>,
    /// The last lines it printed.
    pub output_lines: Vec<String>,
    /// Bytes read from its pipe and not yet written on (a partial line, or
    /// what journald or Baton's stderr had not taken yet): the next image
    /// writes them first, so nothing read is lost or written twice.
    /// Absent in states written before it existed.
    #[serde(default)]
    pub output_unwritten: Vec<u8>,
    /// Its handoff connection.
    pub handoff: Option<RawFd>,
    /// Fd-store fds it received at start.
    pub passed: Vec<RawFd>,
    /// Its probe listener (`--probe`). Absent without one (so such states
    /// are what Batons before it wrote) and in states written before it
    /// existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<RawFd>,
    /// Which socket of each steered pair it accepts from: the first (0) or
    /// the second (1). Absent when 0, so states without steering are what
    /// Batons before it wrote.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slot: u8,
}

impl Handover {
    /// Every fd the state names, each once: exactly the ones that must
    /// survive the exec.
    pub fn fds(&self) -> Vec<RawFd> {
        let s = &self.supervisor;
        let mut fds = vec![self.control.fd, self.notify.fd];
        fds.extend(self.client);
        fds.extend(self.handoff.as_ref().map(|h| h.fd));
        fds.extend(s.sockets.iter().map(|x| x.fd));
        fds.extend(s.siblings.iter().map(|x| x.fd));
        fds.extend(s.store.iter().map(|x| x.fd));
        fds.extend(s.vault.as_ref().map(|v| v.fd));
        for g in &s.generations {
            fds.push(g.pidfd);
            fds.extend(g.main_pidfd);
            fds.extend(g.output_fd);
            fds.extend(g.handoff);
            fds.extend(g.probe);
        }
        fds
    }
}

/// Converts an `Instant` to `CLOCK_MONOTONIC` microseconds, a value the
/// next image can convert back (the clock is system-wide).
pub fn to_mono(at: Instant) -> u64 {
    let now = Instant::now();
    let mono = mono_now_us();
    if at <= now {
        mono.saturating_sub((now - at).as_micros() as u64)
    } else {
        mono.saturating_add((at - now).as_micros() as u64)
    }
}

/// The inverse of [`to_mono`] (clamped to now for times before the
/// `Instant` epoch).
pub fn from_mono(us: u64) -> Instant {
    let now = Instant::now();
    let mono = mono_now_us();
    if us <= mono {
        now.checked_sub(Duration::from_micros(mono - us)).unwrap_or(now)
    } else {
        // Saturating: a corrupt or far-future value must not panic.
        now.checked_add(Duration::from_micros(us - mono)).unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600))
    }
}

/// `CLOCK_MONOTONIC` now, in microseconds.
pub use baton_sd::monotonic_usec as mono_now_us;

/// `OsString` ↔ bytes, for the JSON state.
pub fn os_bytes(s: &OsStr) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Bytes → `OsString`.
pub fn bytes_os(b: &[u8]) -> OsString {
    OsStr::from_bytes(b).to_owned()
}

// ---- taking the fds over ----------------------------------------------------

/// Turns the fd numbers named in a [`Handover`] into owned fds, each at most
/// once, checking each is open, and marking each close-on-exec again.
#[derive(Debug, Default)]
pub struct Adopter {
    taken: HashSet<RawFd>,
}

impl Adopter {
    /// Takes ownership of handed-over fd `fd`; `what` names it in errors.
    pub fn take(&mut self, fd: RawFd, what: &str) -> Result<OwnedFd, UpgradeError> {
        if fd < 3 {
            return Err(UpgradeError::State(format!("{what}: fd {fd} is not a handed-over fd")));
        }
        if !self.taken.insert(fd) {
            return Err(UpgradeError::State(format!("{what}: fd {fd} is named twice in the state")));
        }
        // SAFETY: F_GETFD only reads the fd's flags; an fd that is not open
        // fails with EBADF and is rejected before anything owns it.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(UpgradeError::State(format!(
                "{what}: fd {fd} is not open ({})",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: the fd is open (checked above), was handed over to this
        // image by the previous one for exactly this purpose, and is taken
        // only once (the set above), so nothing else owns or closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| UpgradeError::State(format!("{what}: setting FD_CLOEXEC on fd {fd}: {e}")))?;
        Ok(owned)
    }
}

// ---- reading the state in the new image ---------------------------------------

/// What an image started by `baton upgrade` finds in its environment.
#[derive(Debug)]
pub struct Arrival {
    /// The state handed over.
    pub state: Result<Handover, UpgradeError>,
    /// Set when the next image could not adopt this state and handed
    /// control back to this one: why, for the `baton upgrade` client.
    pub failed: Option<String>,
    /// The way back to the previous image, while this one has not adopted
    /// the state yet (`None` when coming back from a failed upgrade).
    pub fallback: Option<Fallback>,
    /// A [`RETURN_ENV`] that could not be used, for the log.
    pub fallback_error: Option<String>,
}

/// Takes the handed-over state if this image was started by `baton
/// upgrade`: reads [`STATE_ENV`], [`RETURN_ENV`] and [`FAILED_ENV`],
/// removes them from the environment (so no child ever sees them), reads
/// the memfd (closed unless it is the one the way back keeps). `None` for a
/// normal start.
///
/// # Safety
///
/// Modifies the environment: call it before any other thread exists.
pub unsafe fn take_from_env() -> Option<Arrival> {
    let value = std::env::var_os(STATE_ENV)?;
    let back = std::env::var_os(RETURN_ENV);
    let failed = std::env::var_os(FAILED_ENV).map(|f| f.to_string_lossy().into_owned());
    for name in [STATE_ENV, RETURN_ENV, FAILED_ENV] {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::remove_var(name) };
    }
    let mut adopter = Adopter::default();
    let (fallback, fallback_error) = match back.map(|b| Fallback::from_env_value(&b, &mut adopter)) {
        Some(Ok(f)) => (Some(f), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let state = read_state(&value, fallback.as_ref(), &mut adopter);
    Some(Arrival { state, failed, fallback, fallback_error })
}

fn read_state(value: &OsStr, fallback: Option<&Fallback>, adopter: &mut Adopter) -> Result<Handover, UpgradeError> {
    let bad = |m: String| UpgradeError::State(m);
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|&fd| fd >= 3)
        .ok_or_else(|| bad(format!("{STATE_ENV}={value:?} is not an fd number")))?;
    // The memfd the way back keeps is read through a copy; any other is
    // taken and closed after reading.
    let memfd = match fallback.map(|f| f.state()) {
        Some(kept) if kept.as_raw_fd() == fd => {
            kept.try_clone_to_owned().map_err(|e| bad(format!("duplicating the state memfd: {e}")))?
        }
        _ => adopter.take(fd, "the state memfd")?,
    };
    let mut file = std::fs::File::from(memfd);
    file.seek(std::io::SeekFrom::Start(0)).map_err(|e| bad(format!("reading the state memfd: {e}")))?;
    let mut json = Vec::new();
    // Closed after this (the way back keeps its own fd): the state lives
    // on in memory only.
    file.take(STATE_MAX).read_to_end(&mut json).map_err(|e| bad(format!("reading the state memfd: {e}")))?;
    parse_state(&json)
}

/// The handed-over state from its JSON, in any format this binary reads
/// ([`MIN_STATE_FORMAT`]`..=`[`STATE_FORMAT`]; older ones are brought up
/// to date first).
pub fn parse_state(json: &[u8]) -> Result<Handover, UpgradeError> {
    let bad = UpgradeError::State;
    let mut value =
        serde_json::from_slice::<serde_json::Value>(json).map_err(|e| bad(format!("the state is not JSON: {e}")))?;
    let format =
        value.get("format").and_then(|f| f.as_u64()).ok_or_else(|| bad("the state has no format number".into()))?;
    if !(u64::from(MIN_STATE_FORMAT)..=u64::from(STATE_FORMAT)).contains(&format) {
        return Err(bad(format!(
            "state format {format} is not one this baton reads ({MIN_STATE_FORMAT}..={STATE_FORMAT})"
        )));
    }
    if format == 1 {
        format_v1::migrate(&mut value).map_err(|e| bad(format!("the state is malformed (format 1): {e}")))?;
    }
    serde_json::from_value(value).map_err(|e| bad(format!("the state is malformed: {e}")))
}

// ---- exec -------------------------------------------------------------------

/// Signals Baton handles itself; see the module docs.
const HANDLED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only writes it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in HANDLED {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks the signals Baton handles in the calling thread. Every runtime
/// thread but the one running the supervisor calls it when it starts, so
/// that those signals are only ever taken by the supervisor's thread — the
/// one that blocks them before `execve()`; a signal taken by another thread
/// in that moment would be lost with it.
pub fn block_handled_signals() {
    let set = handled_set();
    // SAFETY: a valid, initialised set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Unblocks them again: in the new image once its handlers are installed
/// (pending signals are delivered now), or after a failed `execve()`.
pub fn unblock_handled_signals() {
    let set = handled_set();
    // SAFETY: as above.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Baton's environment for the next image, less the variables of an
/// upgrade (state, way back, failure), which the caller sets anew.
fn environment_without_upgrade_variables() -> Result<Vec<CString>, UpgradeError> {
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k == STATE_ENV || k == RETURN_ENV || k == FAILED_ENV {
            continue;
        }
        let mut entry = k.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(v.as_bytes());
        env.push(cstring(&entry, "an environment variable")?);
    }
    Ok(env)
}

fn cstring(b: &[u8], what: &'static str) -> Result<CString, UpgradeError> {
    CString::new(b).map_err(|_| UpgradeError::Exec {
        context: what,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

/// Writes `state` to a sealed memfd and `execve()`s `binary` with `argv`
/// and the current environment plus [`STATE_ENV`] and, given this image's
/// executable `exe`, [`RETURN_ENV`] (the way back, see [`Fallback`]).
/// Returns only on failure, with everything as before (close-on-exec
/// restored, signals unblocked).
pub fn exec(binary: &Path, argv: &[OsString], state: &Handover, exe: Option<BorrowedFd<'_>>) -> UpgradeError {
    match prepare_and_exec(binary, argv, state, exe) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

/// The state as JSON in its [`Handover::format`]: format 1 (for a binary
/// that reads nothing newer) is format 2 with the policy's fields flat.
pub fn state_json(state: &Handover) -> Result<Vec<u8>, String> {
    let mut value = serde_json::to_value(state).map_err(|e| e.to_string())?;
    if state.format == 1 {
        format_v1::downgrade(&mut value)?;
    }
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

fn prepare_and_exec(
    binary: &Path,
    argv: &[OsString],
    state: &Handover,
    exe: Option<BorrowedFd<'_>>,
) -> Result<Never, UpgradeError> {
    let json = state_json(state)
        .map_err(|e| UpgradeError::Exec { context: "serializing the state", source: std::io::Error::other(e) })?;
    use rustix::fs::{MemfdFlags, SealFlags};
    let memfd = rustix::fs::memfd_create("baton-upgrade-state", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| exec_err("creating the state memfd")(e.into()))?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(&json).map_err(exec_err("writing the state memfd"))?;
    // Sealed: the new image reads exactly what was written.
    rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL)
        .map_err(|e| exec_err("sealing the state memfd")(e.into()))?;
    let memfd_raw = file.as_raw_fd();

    // Everything allocated before touching any flag.
    let path = cstring(binary.as_os_str().as_bytes(), "the binary path")?;
    let args: Vec<CString> = argv.iter().map(|a| cstring(a.as_bytes(), "an argument")).collect::<Result<_, _>>()?;
    let mut env = environment_without_upgrade_variables()?;
    env.push(cstring(format!("{STATE_ENV}={memfd_raw}").as_bytes(), "the state variable")?);
    if let Some(exe) = exe {
        let back = format!("{RETURN_ENV}={},{memfd_raw}", exe.as_raw_fd());
        env.push(cstring(back.as_bytes(), "the way back")?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let mut keep = state.fds();
    keep.push(memfd_raw);
    keep.extend(exe.map(|e| e.as_raw_fd()));
    let mut cleared = Vec::with_capacity(keep.len());
    let result = (|| {
        for &fd in &keep {
            // SAFETY: the fd is open and owned by the supervisor for as
            // long as this function runs (it holds `state`'s sources);
            // only borrowed to change its flags.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::empty())
                .map_err(|e| exec_err("clearing FD_CLOEXEC on a handed-over fd")(e.into()))?;
            cleared.push(fd);
        }
        block_handled_signals();
        // SAFETY: path, argv and envp are NUL-terminated arrays of valid C
        // strings that outlive the call; on success it does not return.
        unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        let e = std::io::Error::last_os_error();
        unblock_handled_signals();
        Err(UpgradeError::Exec { context: "execve() of the new binary", source: e })
    })();
    for fd in cleared {
        // SAFETY: as above.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC);
    }
    drop(file);
    result
}

/// Whether `n` is 0 (for `skip_serializing_if`).
fn is_zero(n: &u8) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_are_parsed_strictly() {
        let ok = parse_probe(&format!("noise\n{}\n", probe_line())).unwrap();
        assert_eq!(ok.state_format, STATE_FORMAT);
        assert_eq!(ok.version, env!("CARGO_PKG_VERSION"));
        assert!(parse_probe("").unwrap_err().contains("printed nothing"));
        assert!(parse_probe("usage: baton ...").unwrap_err().contains("did not answer"));
        assert!(parse_probe("baton-upgrade-probe version=2").unwrap_err().contains("malformed"));
    }

    #[test]
    fn mono_round_trips() {
        let past = Instant::now() - Duration::from_secs(5);
        let back = from_mono(to_mono(past));
        let diff = if back > past { back - past } else { past - back };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
        let future = Instant::now() + Duration::from_secs(30);
        let back = from_mono(to_mono(future));
        let diff = if back > future { back - future } else { future - back };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
    }

    #[test]
    fn adopter_refuses_closed_and_repeated_fds() {
        let (a, _b) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::empty()).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(a);
        let mut adopter = Adopter::default();
        let owned = adopter.take(raw, "pipe").unwrap();
        assert!(rustix::io::fcntl_getfd(&owned).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
        assert!(adopter.take(raw, "pipe again").is_err());
        drop(owned);
        // A number far above anything open (another test's fd may reuse `raw`).
        assert!(Adopter::default().take(1 << 20, "closed").unwrap_err().to_string().contains("not open"));
    }
}
