//! Spawning one generation of the app exactly as systemd's `exec_child()`
//! would: passed fds at 3.. without `FD_CLOEXEC`, `LISTEN_PID`/`LISTEN_FDS`/
//! `LISTEN_FDNAMES` (and `LISTEN_PIDFDID` on kernels with pidfs, as systemd
//! 259's `exec_child()` sets it), `NOTIFY_SOCKET`, `WATCHDOG_PID`/`WATCHDOG_USEC`, default
//! signal dispositions and an empty signal mask, its own process group, and
//! no other fd of Baton's. Under `--compat`, also crank's `NOTIFY_FD` socket
//! (right after the passed fds) and einhorn's `EINHORN_FDS` (see
//! [`compat`](CompatSetup)).
//!
//! # Why our own `fork()` rather than `std::process::Command` + `pre_exec`
//!
//! Baton is a multi-threaded tokio process, so between `fork()` and
//! `execve()` the child may only make async-signal-safe calls and must not
//! allocate. `LISTEN_PID` and `WATCHDOG_PID` must hold the *child's* pid, which
//! is only known after the fork, so the whole `argv`/`envp` is built in the
//! parent (`ExecPlan`) with room for ten digits in those two entries, and the
//! child writes its pid there and calls `execve()` itself. We do the fork
//! ourselves instead of going through `Command::pre_exec` because:
//!
//! - when the child reports an exec failure, std's `Command::spawn` calls
//!   `waitpid(pid)` on it and *asserts* that this succeeds. Baton's
//!   [`Reaper`](crate::reaper::Reaper) reaps every child with `waitpid(-1)`
//!   from another thread, so it can win that race and std would panic;
//! - std (checked for rustc 1.95: `library/std/src/sys/process/unix/unix.rs`,
//!   `do_exec`, "Inherit the signal mask from the parent rather than resetting
//!   it", and confirmed by experiment) resets SIGPIPE but *not* the signal
//!   mask nor other ignored signals, and systemd resets both; we would have to
//!   do it ourselves anyway;
//! - std's exec path would swap its own `environ` in; calling `execve()` from
//!   inside a `pre_exec` hook works but leaves std's machinery half-used.
//!
//! Owning the fork also lets us hold the reaper's gate (`REAP_GATE`)
//! from `fork()` until `pidfd_open()`, which is what makes the pidfd
//! race-free (see [`AppCommand::spawn`]).

use std::ffi::{CString, OsStr, OsString, c_char, c_int};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use baton_sd::wire::{EnvError, ListenEnv};
use rustix::process::{Pid, PidfdFlags, Signal};

use crate::reaper::REAP_GATE;

mod compat;
mod place;
pub use compat::{CRANK_NAME_ENV, CompatSetup, CrankSetup, NOTIFY_FD_ENV, crank_notify_socket};

/// `PATH` used when Baton's own environment has none (systemd's default for
/// system services).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables Baton manages for the app. Baton's own copies (for example set
/// by the systemd that started Baton) describe *Baton's* fds and socket and
/// must never reach the app, so they are dropped from the inherited
/// environment and refused in [`GenerationSetup::extra_env`].
/// `LISTEN_PIDFDID` (systemd ≥ 259) is included: a stale one would make a
/// new libsystemd in the app reject the fds we pass; Baton sets its own.
const MANAGED_VARS: [&str; 7] =
    ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Variables systemd sets that describe *Baton's* place in the service, not
/// a generation's: `$MAINPID`/`$MAINPIDFDID` (258+ for the latter; set for
/// control processes, and they would name Baton) and `$MANAGERPID`/
/// `$MANAGERPIDFDID` (258+; user managers: a generation's manager is Baton,
/// not systemd). Dropped from what generations inherit, and refused in
/// [`GenerationSetup::extra_env`], so an app never mistakes them for its own.
const BATONS_OWN_VARS: [&str; 4] = ["MAINPID", "MAINPIDFDID", "MANAGERPID", "MANAGERPIDFDID"];

/// Room for a pidfd inode id in `LISTEN_PIDFDID=`: a `u64`, twenty digits.
const ID_DIGITS: usize = 20;

/// `PID_FS_MAGIC` (see [`baton_sd::pidfs`]), as `statfs` reports it.
const PID_FS_MAGIC: libc::c_long = baton_sd::pidfs::PID_FS_MAGIC as libc::c_long;

/// One past the highest signal number on Linux (`_NSIG`, 64 + 1).
const NSIG: c_int = 65;

/// Room for a pid in `LISTEN_PID=`/`WATCHDOG_PID=`: `pid_t` is at most
/// 2^31-1, ten decimal digits.
const PID_DIGITS: usize = 10;

/// Why the app could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The program does not exist: no `PATH` directory holds the name, or
    /// the path given does not exist.
    #[error(
        "program {program:?} was not found{}; give its correct absolute path or add its directory to PATH",
        searched_in(.search_path)
    )]
    NotFound {
        /// The name or path as given (made absolute).
        program: PathBuf,
        /// The `PATH` that was searched (relative entries are skipped, as
        /// systemd does); `None` for a path, which is not searched.
        search_path: Option<String>,
    },
    /// The program exists but cannot be executed.
    #[error("{path:?} cannot be executed: {reason}; make it an executable file (chmod +x) or name the right program")]
    NotExecutable {
        /// The file found.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An argument, the program name or a variable holds a NUL byte, which a
    /// C string (and so `execve`) cannot carry.
    #[error("{what} contains a NUL byte, which cannot be passed to a program; remove it")]
    Nul {
        /// Which item.
        what: String,
    },
    /// A variable in [`GenerationSetup::extra_env`] or the notify socket
    /// cannot be passed.
    #[error("environment variable {name:?} cannot be passed to the app: {reason}")]
    InvalidEnv {
        /// The variable's name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An fd name that `LISTEN_FDNAMES` cannot carry.
    #[error("cannot pass the fds to the app: {0}")]
    FdNames(#[source] EnvError),
    /// `execve()` failed in the child (`ENOEXEC`, `EACCES`, `ENOENT` of an
    /// interpreter, ...).
    #[error(
        "could not execute {program:?}: {source}; check that it is an executable for this machine (a script needs a valid #! line)"
    )]
    Exec {
        /// The resolved program.
        program: PathBuf,
        /// The `errno` of `execve()`.
        source: io::Error,
    },
    /// Preparing the child after `fork()` failed (placing the fds, ...).
    #[error("starting {program:?} failed while {step} in the child: {source}")]
    ChildSetup {
        /// The resolved program.
        program: PathBuf,
        /// Which step.
        step: &'static str,
        /// Its `errno`.
        source: io::Error,
    },
    /// A system call in Baton itself failed.
    #[error("{context}: {source}")]
    Io {
        /// What Baton was doing.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// The app's command line, resolved once (`PATH` lookup done here, in the
/// parent) and reused for every generation.
#[derive(Debug, Clone)]
pub struct AppCommand {
    /// Absolute path of the executable.
    program: PathBuf,
    /// `program` as a C string, for `execve()`.
    program_c: CString,
    /// `argv`, `argv[0]` being the program as the user wrote it.
    argv: Vec<CString>,
}

/// What one generation receives besides the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationSetup<'a> {
    /// Passed fds, in order: they land at 3, 4, ... (sockets first, then
    /// fd-store entries — the caller orders them). Names go to
    /// `LISTEN_FDNAMES` (always set when fds is non-empty; when it is empty,
    /// no `LISTEN_*` variable is set at all).
    pub fds: &'a [(BorrowedFd<'a>, &'a str)],
    /// `NOTIFY_SOCKET` value (path or `@abstract`) or `None`.
    pub notify_socket: Option<&'a str>,
    /// `WATCHDOG_USEC`; `WATCHDOG_PID` is then set to the child's own pid,
    /// like `LISTEN_PID`.
    pub watchdog_usec: Option<u64>,
    /// Extra variables (e.g. `BATON_GENERATION=3`), added after the inherited
    /// environment; an inherited variable of the same name is replaced.
    pub extra_env: &'a [(&'a str, String)],
    /// Where the child's stdout and stderr go (`None`: inherited from Baton).
    pub output: Option<BorrowedFd<'a>>,
    /// Other supervisors' protocols (`--compat`): crank's notify socket is
    /// placed right after `fds`, outside `LISTEN_FDS`.
    pub compat: CompatSetup<'a>,
}

/// A started generation's main process.
#[derive(Debug)]
pub struct Child {
    /// Its pid; also its process group id.
    pub pid: u32,
    /// A pidfd for it (`O_CLOEXEC`), valid even after the pid is reaped and
    /// reused.
    pub pidfd: OwnedFd,
}

impl Child {
    /// Sends `sig` to the main process with `pidfd_send_signal()`, which
    /// cannot hit another process even if the pid was reaped and reused.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        rustix::process::pidfd_send_signal(&self.pidfd, sig).map_err(io::Error::from)
    }

    /// Whether it is still running (its pidfd: an exited child whose exit
    /// Baton has not handled yet no longer counts, whatever has its pid).
    pub fn is_running(&self) -> bool {
        crate::lineage::is_running(self.pidfd.as_fd())
    }

    /// Sends `sig` to the whole generation, `kill(-pgid, sig)`: the main
    /// process leads its own process group (pgid == pid), and its children
    /// stay in it unless they move themselves. A process group id stays
    /// allocated while any member lives, so this cannot reach a stranger while
    /// the generation has a live member.
    pub fn signal_group(&self, sig: Signal) -> io::Result<()> {
        let pgid = Pid::from_raw(self.pid as i32).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        rustix::process::kill_process_group(pgid, sig).map_err(io::Error::from)
    }
}

impl AppCommand {
    /// Resolves `program`: looked up in `PATH` if it has no `/` (relative
    /// `PATH` entries are skipped, as systemd does), made absolute if it is a
    /// relative path, and checked to be an executable regular file. `argv[0]`
    /// is `program` as given.
    pub fn new(program: &OsStr, args: &[OsString]) -> Result<Self, SpawnError> {
        if program.is_empty() {
            return Err(SpawnError::NotFound { program: PathBuf::new(), search_path: Some(search_path()) });
        }
        let resolved = if program.as_bytes().contains(&b'/') {
            let path = Path::new(program);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|source| SpawnError::Io { context: "reading the current directory", source })?
                    .join(path)
            };
            match check_executable(&path) {
                Ok(()) => path,
                Err(Check::Missing) => {
                    return Err(SpawnError::NotFound { program: path, search_path: None });
                }
                Err(Check::Unusable(reason)) => return Err(SpawnError::NotExecutable { path, reason }),
            }
        } else {
            lookup_in_path(program)?
        };
        let program_c = c_string(resolved.as_os_str(), || "the program path".into())?;
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(c_string(program, || "the program name".into())?);
        for (i, arg) in args.iter().enumerate() {
            argv.push(c_string(arg, || format!("argument {}", i + 1))?);
        }
        Ok(AppCommand { program: resolved, program_c, argv })
    }

    /// The resolved absolute path of the executable.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Spawns one generation and returns once it has `execve()`d (or failed
    /// to: then the error comes back here, the failed child already reaped or
    /// left to the [`Reaper`](crate::reaper::Reaper)).
    ///
    /// The pidfd is opened with `pidfd_open()` right after `fork()`, while
    /// the reaper's gate (`REAP_GATE`) is held: every `waitpid()` of the
    /// reaper takes that lock too, so the child cannot be reaped — and its
    /// pid cannot be reused — before the pidfd refers to it (a zombie is
    /// still a valid target).
    ///
    /// It blocks for one `fork()` + `execve()`: about 0.5 ms for `/bin/true`
    /// on a 2-core test box, longer for a large Baton or program.
    pub fn spawn(&self, setup: &GenerationSetup<'_>) -> Result<Child, SpawnError> {
        // Until the child has exec'd, the closer releases no discarded fd:
        // the child's copy of one must not be the last, or its close-on-exec
        // close would linger in execve() while this thread waits for it.
        let _spawning = crate::closer::spawning();
        let mut plan = ExecPlan::build(self, setup)?;
        let (status_read, status_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| SpawnError::Io { context: "creating the exec status pipe", source: e.into() })?;
        let output = setup.output.map_or(-1, |fd| fd.as_raw_fd());
        let child_plan = plan.child_plan(self, status_write.as_raw_fd(), output);

        // Block every signal in this thread across fork(), so that none of
        // Baton's handlers (tokio's write into its self-pipe, shared with the
        // parent) can run in the child before it resets them. The child
        // clears the mask just before execve().
        let all = SigSet::full();
        let mut old = SigSet::empty();
        // SAFETY: both sets are valid, initialised sigset_t values.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all.0, &mut old.0) };

        let gate = REAP_GATE.lock().unwrap_or_else(|poison| poison.into_inner());
        // SAFETY: the child runs only `child_after_fork`, which makes
        // async-signal-safe system calls on memory prepared before the fork
        // and never returns (execve or _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: we are the child of a fork; `child_plan` points into
            // `plan`, alive in this copy of the address space.
            unsafe { child_after_fork(&child_plan) }
        }
        let fork_error = io::Error::last_os_error();
        // SAFETY: restoring the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old.0, std::ptr::null_mut()) };
        if pid < 0 {
            return Err(SpawnError::Io { context: "fork() for the app", source: fork_error });
        }
        // fork() returned a positive pid, so this is never `None`.
        let rpid = Pid::from_raw(pid).ok_or_else(|| SpawnError::Io {
            context: "fork() for the app",
            source: io::ErrorKind::InvalidData.into(),
        })?;
        let pidfd = match rustix::process::pidfd_open(rpid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                // The gate is still held, so `pid` is still our child: kill it
                // and let the reaper collect it.
                let _ = rustix::process::kill_process(rpid, Signal::KILL);
                return Err(SpawnError::Io {
                    context: "pidfd_open() for the new child (needs Linux 5.3)",
                    source: e.into(),
                });
            }
        };
        drop(gate);
        // The child works on its own copy of the plan.
        drop(plan);
        // Our copy of the write end must go, or EOF would never come.
        drop(status_write);
        let report = read_status(&status_read);
        match report {
            Ok(None) => Ok(Child { pid: pid as u32, pidfd }),
            Ok(Some((step, errno))) => {
                // The child _exit()s right after writing; collect it here so
                // the supervisor never hears of it (if the reaper won the
                // race, waitid() fails with ECHILD, which is fine).
                let _ = rustix::process::waitid(
                    rustix::process::WaitId::PidFd(pidfd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED,
                );
                let source = io::Error::from_raw_os_error(errno);
                let program = self.program.clone();
                Err(match step {
                    STEP_EXEC => SpawnError::Exec { program, source },
                    _ => SpawnError::ChildSetup { program, step: step_name(step), source },
                })
            }
            Err(source) => {
                // We cannot tell whether it exec'd: do not leave an untracked
                // process behind.
                let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
                Err(SpawnError::Io { context: "reading the exec status pipe", source })
            }
        }
    }
}

/// " in PATH (...)" for [`SpawnError::NotFound`].
fn searched_in(search_path: &Option<String>) -> String {
    search_path.as_ref().map_or_else(String::new, |p| format!(" in PATH ({p})"))
}

/// `PATH` to search, as text for error messages too.
fn search_path() -> String {
    std::env::var_os("PATH").map_or_else(|| DEFAULT_PATH.to_owned(), |p| p.to_string_lossy().into_owned())
}

/// Why a candidate file is not usable.
enum Check {
    Missing,
    Unusable(&'static str),
}

fn check_executable(path: &Path) -> Result<(), Check> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Err(Check::Missing);
        }
        Err(_) => return Err(Check::Unusable("it cannot be inspected (stat failed; check the directory permissions)")),
    };
    if meta.is_dir() {
        return Err(Check::Unusable("it is a directory"));
    }
    if !meta.is_file() {
        return Err(Check::Unusable("it is not a regular file"));
    }
    if rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_err() {
        return Err(Check::Unusable("it has no execute permission for Baton's user"));
    }
    Ok(())
}

/// `execvp`-style lookup, done once in the parent. The first executable
/// candidate wins; if none is executable but one exists, that one is reported.
fn lookup_in_path(program: &OsStr) -> Result<PathBuf, SpawnError> {
    let path_var = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut unusable = None;
    for dir in std::env::split_paths(&path_var) {
        // A relative entry would depend on Baton's working directory; systemd
        // skips them too.
        if !dir.is_absolute() {
            continue;
        }
        let candidate = dir.join(program);
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(Check::Missing) => {}
            Err(Check::Unusable(reason)) => {
                unusable.get_or_insert((candidate, reason));
            }
        }
    }
    Err(match unusable {
        Some((path, reason)) => SpawnError::NotExecutable { path, reason },
        None => SpawnError::NotFound { program: PathBuf::from(program), search_path: Some(search_path()) },
    })
}

fn c_string(s: &OsStr, what: impl FnOnce() -> String) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul { what: what() })
}

/// A `sigset_t` with its constructors.
struct SigSet(libc::sigset_t);

impl SigSet {
    fn empty() -> Self {
        // SAFETY: sigemptyset initialises the zeroed set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            SigSet(set)
        }
    }

    fn full() -> Self {
        // SAFETY: sigfillset initialises the zeroed set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            SigSet(set)
        }
    }
}

/// Everything the child needs, built in the parent so the child allocates
/// nothing. Each environment entry is its own heap buffer, so raw pointers
/// into them stay valid however the `Vec`s move.
struct ExecPlan {
    /// `KEY=VALUE\0` buffers, referenced by `envp`: only owned here, never
    /// read through this field.
    #[allow(dead_code)]
    env_storage: Vec<Box<[u8]>>,
    /// Null-terminated pointer array for `execve()`.
    envp: Vec<*const c_char>,
    /// Null-terminated `argv` pointers (into the [`AppCommand`]).
    argv: Vec<*const c_char>,
    /// Where the child writes its pid (`LISTEN_PID=`, `WATCHDOG_PID=`
    /// values), or null.
    pid_slots: [*mut u8; 2],
    /// Where the child writes its pidfd id (`LISTEN_PIDFDID=` value), or null.
    pidfd_id_slot: *mut u8,
    /// The index of that entry in `envp` (the last one).
    pidfd_id_entry: Option<usize>,
    /// Source fds, in passing order.
    placement: place::Placement,
    /// The empty signal mask the child installs before `execve()`.
    empty_mask: SigSet,
}

/// Raw view of an [`ExecPlan`] handed to the child: plain pointers and
/// numbers, so the child touches no Rust container.
struct ChildPlan {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    pid_slots: [*mut u8; 2],
    pidfd_id_slot: *mut u8,
    /// The `envp` element of `LISTEN_PIDFDID=`, nulled when there is no id.
    pidfd_id_envp: *mut *const c_char,
    placement: place::RawPlacement,
    count: usize,
    status_fd: c_int,
    output: c_int,
    empty_mask: *const libc::sigset_t,
}

impl ExecPlan {
    fn build(cmd: &AppCommand, setup: &GenerationSetup<'_>) -> Result<ExecPlan, SpawnError> {
        for (name, value) in setup.extra_env {
            validate_extra(name, value)?;
        }
        let compat_env = compat::env(&setup.compat, setup.fds.len())
            .map_err(|reason| SpawnError::InvalidEnv { name: "EINHORN_FDS".into(), reason })?;
        let overridden = |key: &[u8]| {
            MANAGED_VARS.iter().chain(&BATONS_OWN_VARS).any(|m| m.as_bytes() == key)
                || compat::is_foreign_fd_var(key)
                || setup.extra_env.iter().any(|(name, _)| name.as_bytes() == key)
                || compat_env.iter().any(|(name, _)| name.as_bytes() == key)
        };
        let mut env_storage: Vec<Box<[u8]>> = Vec::new();
        for (key, value) in std::env::vars_os() {
            if overridden(key.as_bytes()) {
                continue;
            }
            // The process environment cannot hold NUL bytes, so this is just
            // formatting.
            env_storage.push(entry(key.as_bytes(), value.as_bytes()));
        }
        // Indices of the entries whose value the child fills in.
        let mut pid_entries = Vec::with_capacity(2);
        if !setup.fds.is_empty() {
            let names = setup.fds.iter().map(|(_, name)| (*name).to_owned()).collect();
            let vars = ListenEnv { pid: 0, names }.to_vars().map_err(SpawnError::FdNames)?;
            for (key, value) in vars {
                if key == "LISTEN_PID" {
                    pid_entries.push(env_storage.len());
                    env_storage.push(entry(key.as_bytes(), &[0; PID_DIGITS]));
                } else {
                    env_storage.push(entry(key.as_bytes(), value.as_bytes()));
                }
            }
        }
        if let Some(socket) = setup.notify_socket {
            if socket.is_empty() || socket.contains('\0') {
                return Err(SpawnError::InvalidEnv {
                    name: "NOTIFY_SOCKET".into(),
                    reason: "the notify socket address is empty or contains a NUL byte",
                });
            }
            env_storage.push(entry(b"NOTIFY_SOCKET", socket.as_bytes()));
        }
        if let Some(usec) = setup.watchdog_usec {
            pid_entries.push(env_storage.len());
            env_storage.push(entry(b"WATCHDOG_PID", &[0; PID_DIGITS]));
            env_storage.push(entry(b"WATCHDOG_USEC", usec.to_string().as_bytes()));
        }
        let extra = setup.extra_env.iter().map(|(name, value)| (*name, value.as_str()));
        for (name, value) in extra.chain(compat_env.iter().map(|(name, value)| (name.as_str(), value.as_str()))) {
            env_storage.push(entry(name.as_bytes(), value.as_bytes()));
        }
        // Last, so the child can drop it by ending `envp` one entry early
        // when its kernel has no pidfs (no id to give).
        let pidfd_id_entry = (!setup.fds.is_empty()).then(|| {
            env_storage.push(entry(ListenEnv::PIDFD_ID_VAR.as_bytes(), &[0; ID_DIGITS]));
            env_storage.len() - 1
        });

        // All pointers are derived from `as_mut_ptr()` once, after the last
        // push, and the buffers are not touched through references again.
        let mut envp = Vec::with_capacity(env_storage.len() + 1);
        let mut pid_slots = [std::ptr::null_mut(); 2];
        let mut pidfd_id_slot = std::ptr::null_mut();
        let mut slot = 0;
        for (i, buf) in env_storage.iter_mut().enumerate() {
            let base = buf.as_mut_ptr();
            if pidfd_id_entry == Some(i) {
                let eq = buf.iter().position(|&b| b == b'=').expect("entry() writes KEY=");
                // SAFETY: `eq + 1` is within the buffer: ID_DIGITS zero bytes
                // plus the terminator follow the '='.
                pidfd_id_slot = unsafe { base.add(eq + 1) };
            }
            if pid_entries.contains(&i) {
                let eq = buf.iter().position(|&b| b == b'=').expect("entry() writes KEY=");
                // SAFETY: `eq + 1` is within the buffer: PID_DIGITS zero bytes
                // plus the terminator follow the '='.
                pid_slots[slot] = unsafe { base.add(eq + 1) };
                slot += 1;
            }
            envp.push(base as *const c_char);
        }
        envp.push(std::ptr::null());
        let mut argv: Vec<*const c_char> = cmd.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        // crank's socket last: the child places every source at 3.., and
        // LISTEN_FDS counts only `fds`.
        let crank = setup.compat.crank.map(|c| c.notify.as_raw_fd());
        let sources: Vec<c_int> = setup.fds.iter().map(|(fd, _)| fd.as_raw_fd()).chain(crank).collect();
        let placement = place::Placement::new(sources)
            .map_err(|source| SpawnError::Io { context: "duplicating an fd passed twice", source })?;
        Ok(ExecPlan {
            env_storage,
            envp,
            argv,
            pid_slots,
            pidfd_id_slot,
            pidfd_id_entry,
            placement,
            empty_mask: SigSet::empty(),
        })
    }

    fn child_plan(&mut self, cmd: &AppCommand, status_fd: RawFd, output: RawFd) -> ChildPlan {
        let pidfd_id_envp = match self.pidfd_id_entry {
            // SAFETY: the index is within `envp` (it has one more element,
            // the terminating null).
            Some(i) => unsafe { self.envp.as_mut_ptr().add(i) },
            None => std::ptr::null_mut(),
        };
        ChildPlan {
            program: cmd.program_c.as_ptr(),
            argv: self.argv.as_ptr(),
            envp: self.envp.as_ptr(),
            pid_slots: self.pid_slots,
            pidfd_id_slot: self.pidfd_id_slot,
            pidfd_id_envp,
            count: self.placement.len(),
            placement: self.placement.raw(),
            status_fd,
            output,
            empty_mask: &self.empty_mask.0,
        }
    }
}

/// `KEY=VALUE\0` as a heap buffer.
fn entry(key: &[u8], value: &[u8]) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(key.len() + value.len() + 2);
    buf.extend_from_slice(key);
    buf.push(b'=');
    buf.extend_from_slice(value);
    buf.push(0);
    buf.into_boxed_slice()
}

fn validate_extra(name: &str, value: &str) -> Result<(), SpawnError> {
    let fail = |reason| Err(SpawnError::InvalidEnv { name: name.to_owned(), reason });
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return fail("a variable name must be non-empty and contain neither '=' nor NUL");
    }
    if value.contains('\0') {
        return fail("its value contains a NUL byte");
    }
    if MANAGED_VARS.contains(&name) {
        return fail("Baton sets it itself from the generation's fds, notify socket and watchdog");
    }
    if BATONS_OWN_VARS.contains(&name) {
        return fail("it describes baton's own process and manager, never a generation's");
    }
    if compat::is_foreign_fd_var(name.as_bytes()) {
        return fail("it names passed fds, which Baton sets itself under --compat");
    }
    Ok(())
}

// Steps the child reports through the status pipe, with the errno.
const STEP_SETPGID: u32 = 1;
const STEP_DUP: u32 = 2;
const STEP_PLACE: u32 = 3;
const STEP_CLOSE: u32 = 4;
const STEP_EXEC: u32 = 5;
const STEP_OUTPUT: u32 = 6;

fn step_name(step: u32) -> &'static str {
    match step {
        STEP_SETPGID => "creating its process group (setpgid)",
        STEP_DUP => "duplicating the passed fds out of the way (F_DUPFD_CLOEXEC)",
        STEP_PLACE => "placing the passed fds at 3.. (dup3)",
        STEP_CLOSE => "closing Baton's other fds",
        STEP_OUTPUT => "connecting stdout and stderr to Baton (dup2)",
        _ => "an unknown step",
    }
}

/// Reads the child's report: EOF means `execve()` succeeded (the write end
/// was `O_CLOEXEC`); 8 bytes are (step, errno).
fn read_status(fd: &OwnedFd) -> io::Result<Option<(u32, i32)>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    match got {
        0 => Ok(None),
        8 => {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            Ok(Some((step, errno)))
        }
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short report from the child on the exec status pipe")),
    }
}

/// The child's whole life between `fork()` and `execve()`.
///
/// Only async-signal-safe system calls, no allocation, no panicking
/// operation (all indexing is through raw pointers with counts fixed in the
/// parent), and it never returns.
///
/// # Safety
///
/// Must be called only in the child of `fork()`, with `plan` pointing into an
/// [`ExecPlan`] that was alive at the fork.
unsafe fn child_after_fork(plan: &ChildPlan) -> ! {
    // SAFETY (whole body): every pointer comes from the ExecPlan, which is
    // alive in this copy of the address space; every call is an
    // async-signal-safe syscall wrapper.
    unsafe {
        let mut status_fd = plan.status_fd;

        // Default dispositions for every signal (SIG_IGN would survive
        // execve; Rust ignores SIGPIPE), as systemd's exec_child() does. The
        // mask still blocks everything, so no handler of Baton's can run here.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..NSIG {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // glibc refuses its two internal signals; that is fine.
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }

        if libc::setpgid(0, 0) != 0 {
            fail(status_fd, STEP_SETPGID);
        }

        // Output first: the source keeps its number (close-on-exec), so the
        // placement below may overwrite or close it freely.
        if plan.output >= 0 && (libc::dup2(plan.output, 1) < 0 || libc::dup2(plan.output, 2) < 0) {
            fail(status_fd, STEP_OUTPUT);
        }

        // Every source at 3+i, the status pipe at 3+n (see `place`).
        let n = plan.count;
        if let Err(failed) = place::place(&plan.placement, &mut status_fd) {
            fail(
                status_fd,
                match failed {
                    place::Failed::Dup => STEP_DUP,
                    place::Failed::Place => STEP_PLACE,
                },
            );
        }
        // Everything above: the temporaries and any fd of Baton's, even one
        // that forgot O_CLOEXEC.
        let first = (3 + n + 1) as libc::c_uint;
        if libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0 as libc::c_uint) != 0 {
            // Kernel < 5.9: close one by one up to the fd limit.
            let mut limit: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                fail(status_fd, STEP_CLOSE);
            }
            let max = limit.rlim_cur.min(c_int::MAX as libc::rlim_t) as c_int;
            let mut fd = first as c_int;
            while fd < max {
                libc::close(fd);
                fd += 1;
            }
        }

        let pid = libc::getpid() as u32;
        for slot in plan.pid_slots {
            if !slot.is_null() {
                write_decimal(slot, u64::from(pid));
            }
        }
        if !plan.pidfd_id_slot.is_null() {
            match own_pidfd_id() {
                Some(id) => write_decimal(plan.pidfd_id_slot, id),
                // No pidfs: LISTEN_PID alone, as systemd does then. The
                // entry is the last one, so ending the array drops it.
                None => *plan.pidfd_id_envp = std::ptr::null(),
            }
        }

        libc::sigprocmask(libc::SIG_SETMASK, plan.empty_mask, std::ptr::null_mut());
        libc::execve(plan.program, plan.argv, plan.envp);
        fail(status_fd, STEP_EXEC)
    }
}

/// The pidfd inode id of the calling process (see [`baton_sd::pidfs`]),
/// with raw system calls only: `pidfd_open`, `fstatfs`, `fstat`, `close`.
/// `None` without pidfs (Linux < 6.9) or if any call fails.
///
/// # Safety
///
/// Async-signal-safe and allocation-free, for the child of `fork()`; the
/// pidfd it opens is `O_CLOEXEC` and closed again.
unsafe fn own_pidfd_id() -> Option<u64> {
    // SAFETY: plain system calls on a fd we opened and on stack buffers.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0 as libc::c_uint) as c_int;
        if fd < 0 {
            return None;
        }
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        let id = (libc::fstatfs(fd, &mut fs) == 0 && fs.f_type == PID_FS_MAGIC && libc::fstat(fd, &mut st) == 0)
            .then_some(st.st_ino);
        libc::close(fd);
        id
    }
}

/// Reports (step, errno) to the parent and exits. Async-signal-safe.
///
/// # Safety
///
/// Only for the child of `fork()`.
unsafe fn fail(status_fd: c_int, step: u32) -> ! {
    // SAFETY: errno location, write and _exit are async-signal-safe; the
    // buffer is on the stack.
    unsafe {
        let errno = *libc::__errno_location();
        let s = step.to_ne_bytes();
        let e = errno.to_ne_bytes();
        let buf = [s[0], s[1], s[2], s[3], e[0], e[1], e[2], e[3]];
        // 8 bytes < PIPE_BUF: written whole or not at all.
        libc::write(status_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// Writes `value` as decimal digits followed by NUL at `slot`, which has room
/// for its digits and the NUL: [`PID_DIGITS`] + 1 bytes for a pid (a
/// `u32`), [`ID_DIGITS`] + 1 for any `u64`. No leading zeros.
///
/// # Safety
///
/// `slot` must point to at least (number of digits of `value`) + 1 writable
/// bytes.
unsafe fn write_decimal(slot: *mut u8, mut value: u64) {
    // u64::MAX has exactly ID_DIGITS digits, so `len` never exceeds it.
    let mut digits = [0u8; ID_DIGITS];
    let mut len = 0;
    loop {
        // SAFETY: len < ID_DIGITS, see above.
        unsafe { *digits.as_mut_ptr().add(len) = b'0' + (value % 10) as u8 };
        len += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= ID_DIGITS, within `digits`; the caller
        // guarantees `slot` holds len + 1 bytes.
        unsafe { *slot.add(i) = *digits.as_ptr().add(len - 1 - i) };
    }
    // SAFETY: as above, the slot holds len + 1 bytes.
    unsafe { *slot.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_without_leading_zeros() {
        for (value, text) in [
            (0u64, "0"),
            (7, "7"),
            (4_194_304, "4194304"),
            (u64::from(u32::MAX), "4294967295"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let mut buf = [b'x'; ID_DIGITS + 1];
            // SAFETY: the buffer holds PID_DIGITS + 1 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), value) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }

    #[test]
    fn extra_env_is_validated() {
        assert!(validate_extra("BATON_GENERATION", "3").is_ok());
        for bad in
            ["", "A=B", "LISTEN_PID", "NOTIFY_SOCKET", "WATCHDOG_PID", "LISTEN_PIDFDID", "MAINPIDFDID", "NOTIFY_FD"]
        {
            assert!(matches!(validate_extra(bad, "x"), Err(SpawnError::InvalidEnv { .. })), "{bad}");
        }
        assert!(validate_extra("X", "a\0b").is_err());
    }
}
