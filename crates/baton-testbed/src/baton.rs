//! `baton run` as a child of a test, with real processes and sockets: the
//! one launcher of the root crate's integration tests. The probe's clients
//! are in [`crate::probe`].
//!
//! ```no_run
//! use baton_testbed::baton::BatonBuilder;
//! use baton_testbed::probe::ask;
//!
//! let dir = baton_testbed::unique_temp_dir("example", "doc");
//! let b = BatonBuilder::new("/usr/bin/baton", dir)
//!     .args(["--max-draining", "2"])
//!     .app(["/usr/bin/baton-sd-probe", "--serve", "http"])
//!     .start();
//! let pid = b.active_pid();
//! assert_eq!(ask(b.port()).unwrap(), format!("http {pid}"));
//! ```
//!
//! Layout of a test's directory (the builder's `dir`): Baton's control
//! socket `baton.sock` (so its notify and handoff sockets are
//! `baton.notify` and `baton.handoff`), its stdout in `baton.out` (where
//! it prints `baton: NAME ADDR` for each socket it holds, before starting
//! the app), its stderr in `baton.log`, and, by convention, the probe's
//! report in `report`. Files, not pipes: nothing blocks when nobody reads,
//! and with `--output inherit` the generations' stdout never turns into a
//! broken pipe.
//!
//! Dropping a [`Baton`] stops it (SIGTERM then SIGKILL after [`WAIT`], or
//! SIGKILL at once with [`BatonBuilder::kill_on_drop`]) and reaps it, also
//! when the test panics; on a panic it first prints the end of Baton's log
//! and the probe's report.

use std::cell::OnceCell;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use ::baton::control::{Request, Response, Status};

use crate::support::{poll_until, terminate};

/// Deadline for anything that should happen "soon": generous, the tests
/// run on noisy 2-core machines.
pub const WAIT: Duration = Duration::from_secs(30);

/// The longest one `status` request may take before [`Baton::try_status`]
/// gives up on it: far beyond a responsive Baton, short enough that a
/// frozen one fails the test instead of hanging it.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of Baton's log a failing test prints (the notify-abuse tests
/// log thousands of refusals: the end is what explains the failure).
const LOG_TAIL_BYTES: usize = 20_000;

/// Called once Baton is stopped, before its directory is removed: for
/// processes a test's app may have left behind.
type AfterStop = Box<dyn FnOnce(&Baton)>;

/// How to start `baton run`: `[WRAPPER...] BATON run --control
/// DIR/baton.sock [-l http=127.0.0.1:0] ARGS -- APP...`.
pub struct BatonBuilder {
    baton: PathBuf,
    run_from: Option<PathBuf>,
    wrapper: Vec<OsString>,
    dir: PathBuf,
    http_listener: bool,
    args: Vec<OsString>,
    app: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    log_level: Option<String>,
    current_dir: Option<PathBuf>,
    report: PathBuf,
    kill_on_drop: bool,
    keep_dir: bool,
    stderr_piped: bool,
    after_stop: Option<AfterStop>,
}

impl BatonBuilder {
    /// `baton` is the binary (`env!("CARGO_BIN_EXE_baton")`), also used for
    /// the CLI calls of [`Baton::cli`]; `dir` the test's own directory
    /// (see the module docs), removed when the [`Baton`] is dropped unless
    /// [`keep_dir`](Self::keep_dir). Defaults: `-l http=127.0.0.1:0`,
    /// `BATON_LOG=debug`, stdin `/dev/null`, the test's working directory.
    pub fn new(baton: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> BatonBuilder {
        let dir = dir.into();
        BatonBuilder {
            baton: baton.into(),
            run_from: None,
            wrapper: Vec::new(),
            report: dir.join("report"),
            dir,
            http_listener: true,
            args: Vec::new(),
            app: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            log_level: Some("debug".into()),
            current_dir: None,
            kill_on_drop: false,
            keep_dir: false,
            stderr_piped: false,
            after_stop: None,
        }
    }

    /// More options of `baton run`, after `--control` and the listener.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> BatonBuilder {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The app's command line, after `--`.
    pub fn app<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, app: I) -> BatonBuilder {
        self.app.extend(app.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable for Baton (its generations inherit it).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> BatonBuilder {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// [`env`](Self::env) for each pair.
    pub fn envs<I, K, V>(mut self, vars: I) -> BatonBuilder
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// Removes `key` from the environment Baton inherits from the test.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> BatonBuilder {
        self.env_remove.push(key.as_ref().to_owned());
        self
    }

    /// `BATON_LOG` (default `debug`); `None` leaves Baton's default level.
    pub fn log_level(mut self, level: Option<&str>) -> BatonBuilder {
        self.log_level = level.map(str::to_owned);
        self
    }

    /// Without the default `-l http=127.0.0.1:0` ([`Baton::port`] then
    /// has nothing to find).
    pub fn no_http_listener(mut self) -> BatonBuilder {
        self.http_listener = false;
        self
    }

    /// Baton's working directory (default: the test's).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> BatonBuilder {
        self.current_dir = Some(dir.into());
        self
    }

    /// Runs `baton run` from another copy of the binary (a test that
    /// replaces it, as a package upgrade does); the CLI stays `baton`.
    pub fn run_from(mut self, binary: impl Into<PathBuf>) -> BatonBuilder {
        self.run_from = Some(binary.into());
        self
    }

    /// Starts Baton under a wrapper command (`unshare --pid --fork`, ...):
    /// `WRAPPER... BATON run ...`.
    pub fn wrapped_in<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, wrapper: I) -> BatonBuilder {
        self.wrapper = wrapper.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Where the probe writes its report (default `DIR/report`), read by
    /// [`Baton::report_text`].
    pub fn report(mut self, path: impl Into<PathBuf>) -> BatonBuilder {
        self.report = path.into();
        self
    }

    /// On drop, SIGKILL at once instead of SIGTERM and a grace period: for
    /// tests whose Baton may be frozen or must not run its stop sequence.
    /// Its children (the generations, each with its process group) are
    /// SIGKILLed right after it.
    pub fn kill_on_drop(mut self) -> BatonBuilder {
        self.kill_on_drop = true;
        self
    }

    /// Leaves the directory in place on drop (the test owns it).
    pub fn keep_dir(mut self) -> BatonBuilder {
        self.keep_dir = true;
        self
    }

    /// Baton's stderr a pipe the test reads ([`Baton::take_stderr`])
    /// instead of `DIR/baton.log` ([`Baton::log`] is then empty): for a
    /// test that makes Baton's writes wait, as a slow reader does.
    pub fn stderr_piped(mut self) -> BatonBuilder {
        self.stderr_piped = true;
        self
    }

    /// Runs `f` on drop once Baton is stopped and reaped, before its
    /// directory goes: for what the app may have left behind.
    pub fn after_stop(mut self, f: impl FnOnce(&Baton) + 'static) -> BatonBuilder {
        self.after_stop = Some(Box::new(f));
        self
    }

    /// Starts `baton run` and returns at once (Baton may not have bound
    /// anything yet: [`Baton::port`] waits for its socket line).
    ///
    /// # Panics
    /// If the directory's files cannot be created or Baton cannot be
    /// spawned: a test helper.
    pub fn spawn(self) -> Baton {
        let control = self.dir.join("baton.sock");
        let file = |name: &str| {
            let path = self.dir.join(name);
            std::fs::File::create(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        let run_from = self.run_from.clone().unwrap_or_else(|| self.baton.clone());
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(&run_from);
                cmd
            }
            None => Command::new(&run_from),
        };
        cmd.arg("run").arg("--control").arg(&control);
        if self.http_listener {
            cmd.args(["-l", "http=127.0.0.1:0"]);
        }
        cmd.args(&self.args).arg("--").args(&self.app);
        let stderr = if self.stderr_piped { Stdio::piped() } else { file("baton.log").into() };
        cmd.stdout(file("baton.out")).stderr(stderr).stdin(Stdio::null());
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        for key in &self.env_remove {
            cmd.env_remove(key);
        }
        if let Some(level) = &self.log_level {
            cmd.env("BATON_LOG", level);
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", run_from.display()));
        Baton {
            child,
            binary: run_from,
            stopped: false,
            baton: self.baton,
            dir: self.dir,
            control,
            report: self.report,
            port: OnceCell::new(),
            kill_on_drop: self.kill_on_drop,
            keep_dir: self.keep_dir,
            after_stop: self.after_stop,
        }
    }

    /// [`spawn`](Self::spawn), then waits until generation 1 is active
    /// (and, with the default listener, for its port).
    pub fn start(self) -> Baton {
        let http = self.http_listener;
        let b = self.spawn();
        if http {
            b.port();
        }
        b.wait_active(1);
        b
    }
}

/// A running `baton run`, stopped and reaped on drop (see the module docs).
pub struct Baton {
    child: Child,
    binary: PathBuf,
    /// Reaped already: by [`Baton::wait_exit`] or [`Baton::stop`].
    stopped: bool,
    baton: PathBuf,
    dir: PathBuf,
    control: PathBuf,
    report: PathBuf,
    port: OnceCell<u16>,
    kill_on_drop: bool,
    keep_dir: bool,
    after_stop: Option<AfterStop>,
}

impl Baton {
    /// Baton's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The read end of Baton's stderr, once, when started with
    /// [`BatonBuilder::stderr_piped`].
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The binary `baton run` was started from ([`BatonBuilder::run_from`]).
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The test's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The control socket (`--control`).
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// Baton's notify socket, next to the control socket.
    pub fn notify_socket(&self) -> PathBuf {
        self.control.with_extension("notify")
    }

    /// Baton's handoff socket, next to the control socket.
    pub fn handoff_socket(&self) -> PathBuf {
        self.control.with_extension("handoff")
    }

    /// The port of the `http` listener, from Baton's `baton: http ADDR`
    /// line (waited for the first time, at most [`WAIT`]).
    ///
    /// # Panics
    /// If the line does not come: a test helper.
    pub fn port(&self) -> u16 {
        *self.port.get_or_init(|| {
            let out = self.dir.join("baton.out");
            let line = poll_until("baton's `baton: http` socket line", WAIT, || {
                let text = std::fs::read_to_string(&out).ok()?;
                text.lines().find(|l| l.starts_with("baton: http ")).map(str::to_owned)
            })
            .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", self.log_tail()));
            line.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {line:?}"))
        })
    }

    /// `baton ARGS[0] --control CONTROL ARGS[1..]`, e.g. `["restart"]`,
    /// `["upgrade", "--binary", path]`, `["status", "--json"]`.
    ///
    /// # Panics
    /// If `args` is empty or the CLI cannot be run.
    pub fn cli<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        cli_at(&self.baton, &self.control, args)
    }

    /// `baton restart` through the CLI, as an operator would; the new
    /// generation's number.
    ///
    /// # Panics
    /// If the restart fails, with its output.
    pub fn restart(&self) -> u64 {
        let out = self.cli(&["restart"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "baton restart: {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // "generation N (pid P) ready after T ms, replacing generation M"
        stdout
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no generation in {stdout:?}"))
    }

    /// One control request, with [`STATUS_TIMEOUT`] for the answer.
    pub fn call(&self, request: &Request) -> Result<Response, String> {
        call_at(&self.control, request)
    }

    /// Baton's status, or `None` while it does not answer.
    pub fn try_status(&self) -> Option<Status> {
        match self.call(&Request::Status) {
            Ok(Response::Status(s)) => Some(*s),
            _ => None,
        }
    }

    /// Baton's status.
    ///
    /// # Panics
    /// If Baton does not answer, with its log.
    pub fn status(&self) -> Status {
        match self.call(&Request::Status) {
            Ok(Response::Status(s)) => *s,
            other => panic!("no status from baton: {other:?}\nlog:\n{}", self.log_tail()),
        }
    }

    /// Polls the status until `pred` holds, at most [`WAIT`].
    ///
    /// # Panics
    /// On the deadline, with the last status, the log and the report.
    pub fn wait_status(&self, what: &str, mut pred: impl FnMut(&Status) -> bool) -> Status {
        poll_until(what, WAIT, || self.try_status().filter(|s| pred(s))).unwrap_or_else(|e| {
            panic!("{e}\nstatus: {:?}\nlog:\n{}\nreport:\n{}", self.try_status(), self.log_tail(), self.report_text())
        })
    }

    /// Waits until generation `n` is the active one; its pid.
    pub fn wait_active(&self, n: u64) -> u32 {
        let s = self.wait_status(&format!("generation {n} active"), |s| {
            s.generations.iter().any(|g| g.generation == n && g.state == "active")
        });
        s.generations.iter().find(|g| g.generation == n && g.state == "active").map_or(0, |g| g.pid)
    }

    /// The pid of the active generation.
    ///
    /// # Panics
    /// If none is active.
    pub fn active_pid(&self) -> u32 {
        let s = self.status();
        s.generations.iter().find(|g| g.state == "active").unwrap_or_else(|| panic!("no active generation: {s:?}")).pid
    }

    /// The pid of generation `n`.
    ///
    /// # Panics
    /// If it is not live.
    pub fn generation_pid(&self, n: u64) -> u32 {
        let s = self.status();
        s.generations.iter().find(|g| g.generation == n).unwrap_or_else(|| panic!("no generation {n}: {s:?}")).pid
    }

    /// Baton's log (its stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("baton.log")).unwrap_or_default()
    }

    /// The last 20 kB of [`log`](Self::log), for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log(), LOG_TAIL_BYTES).to_owned()
    }

    /// Waits for `needle` in the log, at most [`WAIT`].
    pub fn wait_log(&self, needle: &str) {
        self.wait_log_within(needle, WAIT);
    }

    /// Waits for `needle` in the log, at most `limit`.
    ///
    /// # Panics
    /// On the deadline, with the log.
    pub fn wait_log_within(&self, needle: &str, limit: Duration) {
        poll_until(&format!("{needle:?} in baton's log"), limit, || self.log().contains(needle).then_some(()))
            .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", self.log_tail()));
    }

    /// Where the probe writes its report ([`BatonBuilder::report`]).
    pub fn report_path(&self) -> &Path {
        &self.report
    }

    /// The probe's report so far (empty if there is none).
    pub fn report_text(&self) -> String {
        std::fs::read_to_string(&self.report).unwrap_or_default()
    }

    /// How many fds Baton has open now.
    ///
    /// # Panics
    /// If `/proc/PID/fd` cannot be read.
    pub fn fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")).count()
    }

    /// Baton's open fds, once two reads a moment apart agree (a control
    /// connection being closed must not count).
    ///
    /// # Panics
    /// If the count does not settle within [`WAIT`].
    pub fn settled_fd_count(&self) -> usize {
        poll_until("a stable fd count", WAIT, || {
            let a = self.fd_count();
            std::thread::sleep(Duration::from_millis(100));
            (self.fd_count() == a).then_some(a)
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// What Baton's fds point to now (`socket:[N]`, paths, ...).
    pub fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).map(|p| p.display().to_string()).collect()
            })
            .unwrap_or_default()
    }

    /// The binary Baton's process runs now (`/proc/PID/exe`).
    ///
    /// # Panics
    /// If the link cannot be read.
    pub fn exe(&self) -> String {
        let link = format!("/proc/{}/exe", self.pid());
        std::fs::read_link(&link).unwrap_or_else(|e| panic!("{link}: {e}")).display().to_string()
    }

    /// Waits for `baton run` to exit on its own, at most [`WAIT`], and
    /// reaps it.
    ///
    /// # Panics
    /// On the deadline, with the log.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let status = poll_until("baton run to exit", WAIT, || child.try_wait().ok().flatten());
        let status = status.unwrap_or_else(|e| panic!("{e}\nlog:\n{}", self.log_tail()));
        self.stopped = true;
        status
    }

    /// Tells the launcher that the test reaped Baton itself (`wait4()` for
    /// its resource usage): the pid may be another process's by now, so
    /// the drop must not signal it.
    pub fn reaped_by_the_test(&mut self) {
        self.stopped = true;
    }

    /// Whether `baton run` has exited (it is then reaped).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        self.stopped |= status.is_some();
        status
    }

    /// SIGKILLs Baton now (its generations live on: a crash) and reaps it.
    ///
    /// # Panics
    /// If it was reaped already.
    pub fn kill(&mut self) {
        assert!(!self.stopped, "baton run was reaped already");
        self.child.kill().expect("SIGKILL baton");
        self.child.wait().expect("reap baton");
        self.stopped = true;
    }

    /// Stops Baton as the drop does (SIGTERM and up to [`WAIT`], then
    /// SIGKILL; SIGKILL at once with [`BatonBuilder::kill_on_drop`]) and
    /// reaps it. Does nothing once it is reaped.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        if self.kill_on_drop {
            // Its children first (read while they are still its own), so
            // that the generations a killed Baton leaves behind are ended
            // too instead of serving on as orphans.
            let children = children_of(self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
            for pid in children {
                // Each generation leads its own process group.
                if let Some(group) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
            }
        } else {
            terminate(&mut self.child, WAIT);
        }
        self.stopped = true;
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- baton's log (tail) -----\n{}\n----- probe report -----\n{}",
                self.log_tail(),
                self.report_text()
            );
        }
        self.stop();
        if let Some(after_stop) = self.after_stop.take() {
            after_stop(self);
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `baton ARGS[0] --control CONTROL ARGS[1..]` with the binary `baton`.
///
/// # Panics
/// If `args` is empty or the CLI cannot be run.
pub fn cli_at<S: AsRef<OsStr>>(baton: &Path, control: &Path, args: &[S]) -> Output {
    let (command, rest) = args.split_first().expect("a baton subcommand");
    Command::new(baton)
        .arg(command)
        .arg("--control")
        .arg(control)
        .args(rest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", baton.display()))
}

/// One control request to the socket at `control`, with
/// [`STATUS_TIMEOUT`] for the answer; the error as text.
pub fn call_at(control: &Path, request: &Request) -> Result<Response, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async { tokio::time::timeout(STATUS_TIMEOUT, ::baton::control::call(control, request)).await })
        .map_err(|_| format!("no answer within {STATUS_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The children of process `pid` (every thread's `children` list in
/// `/proc`); none if it is gone.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut children: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect();
    children.sort_unstable();
    children.dedup();
    children
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_cuts_at_a_character_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 2), "ef");
        // 'é' is two bytes: a cut inside it moves past it.
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }
}
