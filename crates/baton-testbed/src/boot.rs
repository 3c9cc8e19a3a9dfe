//! Booting systemd as PID 1 of fresh namespaces, and tearing it down.
//!
//! Steps of [`TestbedBuilder::boot`]:
//!
//! 1. Pick the lower layer: `/` for [`Flavor::Host`], the cached debootstrap
//!    root for [`Flavor::Trixie`] and [`Flavor::Forky`] (built on first use,
//!    see [`crate::rootfs`]).
//! 2. Create a state directory (`/var/tmp/baton-testbed/<pid>-<n>`, holding
//!    the overlay mount points, the logs and the shared `scratch/`) and a
//!    cgroup subtree (see [`crate::cgroup`]).
//! 3. Start `scripts/supervise.sh` in its own process group. It puts a shell
//!    into the payload cgroup, which execs `unshare --pid --mount --uts --ipc
//!    --cgroup --fork --kill-child` (the network namespace stays shared so
//!    tests reach services on 127.0.0.1).
//! 4. `scripts/stage2.sh` runs as PID 1 of the new namespaces: it reports its
//!    host pid, mounts a tmpfs-backed overlay over the lower layer, mounts
//!    /proc, /sys (ro), cgroup2, a private /dev and /tmp, bind-mounts the
//!    shared directories at their host paths, writes a fresh machine-id and
//!    `baton-testbed.target`, `pivot_root`s and execs
//!    `systemd --system --unit=baton-testbed.target` with `container=other`.
//! 5. We poll `systemctl is-system-running --wait` (through `nsenter`) until
//!    it says `running` or `degraded`, or the boot timeout passes.
//!
//! Teardown (drop or [`Testbed::shutdown`]): SIGKILL PID 1 through a pidfd
//! (the kernel then kills the whole pid namespace; its mount namespace and
//! all mounts go with it), wait for it, close the supervisor's keep-alive
//! pipe; the supervisor removes the cgroup and the state directory, and we
//! check that it did. If the test process dies without dropping the testbed
//! (even SIGKILL), the keep-alive pipe hits EOF and the supervisor does the
//! same teardown on its own.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use crate::cgroup::{self, CgroupTree};
use crate::cmd::{self, deadline_after, remaining, wait_readable};
use crate::error::{Error, IoContext, Result};
use crate::rootfs::{Recipe, require_tool};
use crate::testbed::Testbed;
use crate::{Flavor, mounts};

/// The systemd binary in both roots (`/lib` is `/usr/lib` on merged-/usr).
pub(crate) const HOST_SYSTEMD: &str = "/lib/systemd/systemd";
/// `$PATH` for the helper scripts and for commands inside the testbed.
pub(crate) const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Environment variable overriding [`DEFAULT_STATE_BASE`].
pub const STATE_DIR_ENV: &str = "BATON_TESTBED_STATE_DIR";
/// Where per-testbed state directories are created. Not under /tmp, which
/// systemd empties at boot (we shadow it inside, but a user-set path might not
/// be shadowed).
pub const DEFAULT_STATE_BASE: &str = "/var/tmp/baton-testbed";
/// Default limit for reaching `running`/`degraded` (boot takes well under a
/// second on an idle machine; CI machines are not idle).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit for one command run inside the testbed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

const SUPERVISE_SH: &str = include_str!("scripts/supervise.sh");
const STAGE2_SH: &str = include_str!("scripts/stage2.sh");

/// The unit systemd boots into instead of `default.target`: only sysinit and
/// sockets. The host's `multi-user.target` would start whatever the host has
/// enabled (databases, timers running apt, ...) and, as the network namespace
/// is shared, they would fight the host's instances for ports.
const TARGET_UNIT: &str = "\
[Unit]
Description=baton-testbed: sysinit + sockets, nothing else from the host
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
";

/// Configures and boots a [`Testbed`]. Get one from [`Testbed::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct TestbedBuilder {
    flavor: Flavor,
    binds: Vec<PathBuf>,
    share_target_dir: bool,
    boot_timeout: Duration,
    command_timeout: Duration,
}

impl TestbedBuilder {
    pub(crate) fn new(flavor: Flavor) -> TestbedBuilder {
        TestbedBuilder {
            flavor,
            binds: Vec::new(),
            share_target_dir: true,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// Also share host directory `dir` (absolute, existing) with the testbed,
    /// bind-mounted at the same path. Changes on either side are visible on
    /// the other.
    pub fn bind(mut self, dir: impl Into<PathBuf>) -> Self {
        self.binds.push(dir.into());
        self
    }

    /// Whether to share the cargo target directory of the running test
    /// executable (default: yes), so binaries built by the tests can run
    /// inside.
    pub fn share_target_dir(mut self, share: bool) -> Self {
        self.share_target_dir = share;
        self
    }

    /// Limit for reaching `running`/`degraded`, from starting the namespace
    /// (building a cached Debian root is not counted). Default
    /// [`DEFAULT_BOOT_TIMEOUT`].
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Limit for each command run inside. Default [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Boots systemd and returns once it reports `running` or `degraded`.
    pub fn boot(self) -> Result<Testbed> {
        if !rustix::process::geteuid().is_root() {
            return Err(Error::Missing {
                what: "root".into(),
                hint: "booting a testbed needs root (namespaces, mounts, cgroups)".into(),
            });
        }
        let nsenter = require_tool("nsenter", "util-linux")?;
        require_tool("unshare", "util-linux")?;
        let lower = match Recipe::of(self.flavor) {
            None => PathBuf::from("/"),
            Some(recipe) => recipe.ensure()?,
        };
        if !lower.join(HOST_SYSTEMD.trim_start_matches('/')).exists() {
            return Err(Error::Missing {
                what: format!("systemd in {}", lower.display()),
                hint: "apt-get install systemd".into(),
            });
        }

        let (id, state_dir) = create_state_dir()?;
        // From here on, dropping `res` undoes everything done so far.
        let mut res = Resources::new(state_dir.clone());
        let scratch = state_dir.join("scratch");
        for dir in ["root", "layers", "scratch"] {
            let p = state_dir.join(dir);
            fs::create_dir(&p).context(|| format!("creating {}", p.display()))?;
        }
        res.cgroup = Some(CgroupTree::create(&id)?);
        let cgroup_dir = res.cgroup.as_ref().map(|c| c.dir.clone()).unwrap_or_default();

        let binds = self.bind_list(&scratch)?;
        let supervise = state_dir.join("supervise.sh");
        let stage2 = state_dir.join("stage2.sh");
        fs::write(&supervise, SUPERVISE_SH).context(|| format!("writing {}", supervise.display()))?;
        fs::write(&stage2, STAGE2_SH).context(|| format!("writing {}", stage2.display()))?;
        let supervisor_log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join("supervisor.log"))
            .context(|| "creating supervisor.log".into())?;

        let started = Instant::now();
        let deadline = deadline_after(self.boot_timeout);
        let mut child = Command::new("/bin/sh")
            .arg(&supervise)
            .env("PATH", SYSTEM_PATH)
            .env("BT_STATE", &state_dir)
            .env("BT_CGROUP", &cgroup_dir)
            .env("BT_STAGE2", &stage2)
            .env("BT_LOWER", &lower)
            .env("BT_BINDS", binds_env(&binds)?)
            .env("BT_MACHINE_ID", machine_id())
            .env("BT_TARGET_UNIT", TARGET_UNIT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(supervisor_log)
            // Own process group: Ctrl-C in a terminal must not kill the
            // supervisor before it cleaned up after the test process.
            .process_group(0)
            .spawn()
            .context(|| "starting the testbed supervisor (sh)".into())?;
        res.keepalive = child.stdin.take();
        let report = child.stdout.take();
        res.supervisor = Some(child);

        let (pid, unshare_pid) = match report {
            Some(report) => read_report(report, deadline, &state_dir)?,
            None => return Err(boot_error("supervisor has no stdout", &state_dir, None)),
        };
        // Open the pidfd first, then check the process is the child of our
        // unshare: from then on the pidfd is known to name systemd, and
        // killing through it can never hit a recycled pid.
        let pidfd = Pid::from_raw(pid as i32)
            .ok_or_else(|| boot_error("reported pid 0", &state_dir, None))
            .and_then(|p| pidfd_open(p, PidfdFlags::empty()).context(|| format!("pidfd_open({pid})")))?;
        if parent_of(pid) != Some(unshare_pid) {
            return Err(boot_error(
                &format!("pid {pid} is not the child of unshare ({unshare_pid})"),
                &state_dir,
                None,
            ));
        }
        res.pid1 = Some(Pid1 { pid, pidfd });
        if let Some(cg) = &res.cgroup {
            cg.park_helper(unshare_pid)?;
        }

        let mut testbed = Testbed {
            flavor: self.flavor,
            pid,
            nsenter,
            scratch,
            cgroup: cgroup_dir,
            systemd_version: 0,
            boot_duration: Duration::ZERO,
            command_timeout: self.command_timeout,
            res,
        };
        wait_until_booted(&testbed, deadline)?;
        testbed.boot_duration = started.elapsed();
        testbed.systemd_version = testbed.query_version()?;
        Ok(testbed)
    }

    /// The directories to bind-mount: scratch, the cargo target dir, extras.
    fn bind_list(&self, scratch: &Path) -> Result<Vec<PathBuf>> {
        let mut dirs = vec![scratch.to_owned()];
        if self.share_target_dir {
            // Not built by cargo (e.g. a stand-alone binary): nothing to share.
            if let Ok(layout) = crate::cargo::BuildLayout::of_current_exe() {
                dirs.push(layout.target_dir().to_owned());
            }
        }
        for dir in &self.binds {
            if !dir.is_absolute() || !dir.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "bind {}: must be an existing absolute directory",
                    dir.display()
                )));
            }
            dirs.push(dir.clone());
        }
        let mut out: Vec<PathBuf> = Vec::new();
        for dir in dirs {
            // The same path must work on both sides, so resolve symlinks now.
            let dir = dir.canonicalize().context(|| format!("resolving {}", dir.display()))?;
            if !out.contains(&dir) {
                out.push(dir);
            }
        }
        // Parents before children, or a later bind would hide an earlier one.
        out.sort_by_key(|d| d.components().count());
        Ok(out)
    }
}

/// Reads `"<pid> <unshare pid>\n"` from stage 2, waiting at most until
/// `deadline`.
fn read_report(report: std::process::ChildStdout, deadline: Instant, state_dir: &Path) -> Result<(u32, u32)> {
    let left = remaining(deadline).unwrap_or_default();
    if !wait_readable(&report, left).context(|| "waiting for the boot report".into())? {
        return Err(boot_error("no report from stage 2 before the boot timeout", state_dir, None));
    }
    let mut line = String::new();
    BufReader::new(report).read_line(&mut line).context(|| "reading the boot report".into())?;
    let mut fields = line.split_whitespace().map(str::parse::<u32>);
    match (fields.next(), fields.next()) {
        (Some(Ok(pid)), Some(Ok(unshare))) => Ok((pid, unshare)),
        _ => Err(boot_error(&format!("stage 2 did not start (report {line:?})"), state_dir, None)),
    }
}

/// Polls `systemctl is-system-running --wait` until systemd has booted.
fn wait_until_booted(testbed: &Testbed, deadline: Instant) -> Result<()> {
    let mut last = String::new();
    loop {
        if testbed.res.pid1_exited() {
            return Err(boot_error(
                &format!("systemd (pid {}) exited during boot", testbed.pid),
                testbed.state_dir(),
                None,
            ));
        }
        let Some(left) = remaining(deadline) else {
            return Err(boot_error(
                &format!("not running/degraded before the boot timeout; last answer: {last:?}"),
                testbed.state_dir(),
                Some(testbed),
            ));
        };
        // --wait returns once the boot job queue is empty; before systemd
        // listens on its private socket it fails at once ("offline").
        let out = match testbed.run_with_timeout(&["systemctl", "is-system-running", "--wait"], left) {
            Ok(out) => out,
            Err(Error::CommandTimeout { stdout, stderr, .. }) => {
                last = format!("{}{}", stdout.trim(), stderr.trim());
                continue;
            }
            Err(e) => return Err(e),
        };
        let state = out.stdout.trim();
        match state {
            "running" | "degraded" => return Ok(()),
            "maintenance" | "stopping" => {
                return Err(boot_error(&format!("system state is {state:?}"), testbed.state_dir(), Some(testbed)));
            }
            _ => {
                last = format!("{} {}", state, out.stderr.trim());
                thread::sleep(Duration::from_millis(20).min(left));
            }
        }
    }
}

/// Builds an [`Error::Boot`] with the logs of the state directory and, if
/// `testbed` is given, the tail of the journal.
fn boot_error(reason: &str, state_dir: &Path, testbed: Option<&Testbed>) -> Error {
    let mut diagnostics = String::new();
    for log in ["supervisor.log", "pid1.log", "console.log"] {
        let text = fs::read_to_string(state_dir.join(log)).unwrap_or_default();
        if !text.trim().is_empty() {
            diagnostics.push_str(&format!("--- {log} ---\n{}\n", tail(&text, 40)));
        }
    }
    if let Some(tb) = testbed {
        let journal = tb.journal_tail(80);
        diagnostics.push_str(&format!("--- journal (last lines) ---\n{journal}\n"));
    }
    Error::Boot { reason: reason.to_owned(), diagnostics }
}

pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Creates `<base>/<pid>-<n>`, returning the id and the path.
fn create_state_dir() -> Result<(String, PathBuf)> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var_os(STATE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_BASE));
    if !base.is_absolute() {
        return Err(Error::InvalidArgument(format!("{STATE_DIR_ENV} must be absolute, got {}", base.display())));
    }
    fs::create_dir_all(&base).context(|| format!("creating {}", base.display()))?;
    loop {
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = base.join(&id);
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            // Left over by an earlier process with the same pid: take the next.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context(|| format!("creating {}", dir.display())),
        }
    }
}

/// The newline-separated list stage 2 reads.
fn binds_env(binds: &[PathBuf]) -> Result<String> {
    let mut out = String::new();
    for b in binds {
        let s = b.to_str().filter(|s| !s.contains('\n')).ok_or_else(|| {
            Error::InvalidArgument(format!("cannot share {}: not UTF-8 or contains a newline", b.display()))
        })?;
        out.push_str(s);
        out.push('\n');
    }
    Ok(out)
}

/// A fresh machine id per boot, so the journal starts empty (the host's
/// /var/log/journal/<host id> stays untouched) and boots are distinguishable.
fn machine_id() -> String {
    let mut bytes = [0u8; 16];
    let got = File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if got.is_err() {
        // Unlikely; uniqueness is all that matters.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The parent pid of `pid` from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: skip to the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The namespace's PID 1 (systemd), by host pid and pidfd.
#[derive(Debug)]
pub(crate) struct Pid1 {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
}

/// Everything a testbed owns on the host, in the order it is created.
/// Dropping it tears everything down.
#[derive(Debug)]
pub(crate) struct Resources {
    pub(crate) state_dir: PathBuf,
    pub(crate) cgroup: Option<CgroupTree>,
    pub(crate) supervisor: Option<Child>,
    pub(crate) keepalive: Option<ChildStdin>,
    pub(crate) pid1: Option<Pid1>,
    torn_down: bool,
}

impl Resources {
    fn new(state_dir: PathBuf) -> Resources {
        Resources { state_dir, cgroup: None, supervisor: None, keepalive: None, pid1: None, torn_down: false }
    }

    /// Whether PID 1 has exited (or was never started).
    pub(crate) fn pid1_exited(&self) -> bool {
        match &self.pid1 {
            Some(p) => wait_readable(&p.pidfd, Duration::ZERO).unwrap_or(true),
            None => true,
        }
    }

    /// Kills and removes everything; idempotent. Collects all problems
    /// instead of stopping at the first, so as much as possible is cleaned.
    pub(crate) fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut problems = Vec::new();

        if let Some(p) = self.pid1.take() {
            // SIGKILL to a pid namespace's init kills every process in it.
            match pidfd_send_signal(&p.pidfd, Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => problems.push(format!("killing systemd (pid {}): {e}", p.pid)),
            }
            // The pidfd turns readable only after the kernel has reaped all
            // other processes of the namespace.
            match wait_readable(&p.pidfd, Duration::from_secs(20)) {
                Ok(true) => {}
                Ok(false) => problems.push(format!("systemd (pid {}) alive 20 s after SIGKILL", p.pid)),
                Err(e) => problems.push(format!("waiting for systemd (pid {}): {e}", p.pid)),
            }
        }

        // EOF on the keep-alive pipe: the supervisor kills unshare (if still
        // there), removes the cgroup and the state directory, and exits.
        drop(self.keepalive.take());
        if let Some(mut child) = self.supervisor.take() {
            match cmd::wait_deadline(&mut child, deadline_after(Duration::from_secs(40))) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    problems.push("supervisor did not exit within 40 s; killed".into());
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(e) => problems.push(format!("waiting for the supervisor: {e}")),
            }
        }

        // Normally nothing is left; this covers a supervisor that never ran
        // or failed.
        let leftovers = [
            self.cgroup.take().map(|cg| cgroup::remove_tree(&cg.dir, Duration::from_secs(10))),
            self.state_dir.exists().then(|| remove_state_dir(&self.state_dir)),
        ];
        problems.extend(leftovers.into_iter().flatten().filter_map(|r| r.err()).map(|e| e.to_string()));

        if problems.is_empty() { Ok(()) } else { Err(Error::Teardown(problems.join("; "))) }
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("baton-testbed: {e}");
        }
    }
}

/// Removes a state directory, refusing if anything is mounted below it in
/// our namespace (everything should have been mounted in the testbed's own
/// mount namespace only; deleting through a mount would destroy shared data).
fn remove_state_dir(dir: &Path) -> Result<()> {
    let mounted = mounts::mounts_under(dir)?;
    if !mounted.is_empty() {
        return Err(Error::Teardown(format!("not removing {}: {mounted:?} mounted below it", dir.display())));
    }
    fs::remove_dir_all(dir).context(|| format!("removing {}", dir.display()))
}
