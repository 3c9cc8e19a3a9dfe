//! The booted testbed and what tests do with it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::Flavor;
use crate::boot::{Resources, SYSTEM_PATH, TestbedBuilder};
use crate::cmd::{self, CmdOutput};
use crate::error::{Error, IoContext, Result};
use crate::support::poll_until;

/// A real systemd running as PID 1 of private pid, mount, uts, ipc and cgroup
/// namespaces, on a throw-away overlay of the host root (or of a cached Debian
/// trixie or forky root). The network namespace is the host's: services inside listen
/// on the host's 127.0.0.1.
///
/// Dropping it kills the whole namespace and removes every trace (see
/// [`Drop`](#impl-Drop-for-Testbed)). If the current thread is panicking (a
/// failed assertion), the full journal is printed to stderr first.
#[derive(Debug)]
pub struct Testbed {
    pub(crate) flavor: Flavor,
    pub(crate) pid: u32,
    pub(crate) nsenter: PathBuf,
    pub(crate) scratch: PathBuf,
    pub(crate) cgroup: PathBuf,
    pub(crate) systemd_version: u32,
    pub(crate) boot_duration: Duration,
    pub(crate) command_timeout: Duration,
    // Last: dropped after `Drop for Testbed` has printed the journal.
    pub(crate) res: Resources,
}

impl Testbed {
    /// Boots `flavor` with default settings; see [`TestbedBuilder::boot`].
    pub fn boot(flavor: Flavor) -> Result<Testbed> {
        Testbed::builder(flavor).boot()
    }

    /// Starts configuring a testbed (extra shared directories, timeouts).
    pub fn builder(flavor: Flavor) -> TestbedBuilder {
        TestbedBuilder::new(flavor)
    }

    /// Which systemd this is.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The major version of the running systemd (e.g. 252), from
    /// `systemctl --version` inside.
    pub fn systemd_version(&self) -> u32 {
        self.systemd_version
    }

    /// Host pid of the namespace's PID 1 (systemd).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A per-testbed directory shared with the host at the same absolute path
    /// (bind mount): scripts, sockets, result files. Removed on teardown.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Host path of the testbed's cgroup directory; the namespace's cgroup
    /// root is its `payload` child. Removed on teardown.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// From starting the namespace until systemd reported
    /// `running`/`degraded`.
    pub fn boot_duration(&self) -> Duration {
        self.boot_duration
    }

    pub(crate) fn state_dir(&self) -> &Path {
        &self.res.state_dir
    }

    /// The host path under which `inside` (an absolute path in the testbed)
    /// can be read and written: `/proc/<pid>/root/<inside>`.
    ///
    /// Absolute symlinks met on the way resolve against the *host* root, so
    /// use this for real directories such as `/etc/systemd/system`.
    pub fn host_path(&self, inside: impl AsRef<Path>) -> PathBuf {
        let inside = inside.as_ref();
        Path::new(&format!("/proc/{}/root", self.pid)).join(inside.strip_prefix("/").unwrap_or(inside))
    }

    /// Writes a file inside the testbed (creating parent directories), e.g.
    /// a config file for a service. Only the overlay is modified.
    pub fn write_file(&self, inside: impl AsRef<Path>, contents: &str) -> Result<()> {
        let inside = inside.as_ref();
        if !inside.is_absolute() {
            return Err(Error::InvalidArgument(format!("write_file: {} is not absolute", inside.display())));
        }
        let path = self.host_path(inside);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&path, contents).context(|| format!("writing {} (inside: {})", path.display(), inside.display()))
    }

    /// Writes `/etc/systemd/system/<name>` inside and runs `daemon-reload`.
    ///
    /// `name` is a full unit name such as `demo.service` or `demo.socket`.
    pub fn install_unit(&self, name: &str, contents: &str) -> Result<()> {
        check_unit_name(name)?;
        self.write_file(Path::new("/etc/systemd/system").join(name), contents)?;
        self.daemon_reload()
    }

    /// Writes the drop-in `/etc/systemd/system/<unit>.d/<name>.conf` inside
    /// and runs `daemon-reload` (e.g. to raise `StartLimitBurst` in a test).
    pub fn install_dropin(&self, unit: &str, name: &str, contents: &str) -> Result<()> {
        check_unit_name(unit)?;
        if name.is_empty() || name.contains('/') {
            return Err(Error::InvalidArgument(format!("bad drop-in name {name:?}")));
        }
        let file = if name.ends_with(".conf") { name.to_owned() } else { format!("{name}.conf") };
        self.write_file(Path::new("/etc/systemd/system").join(format!("{unit}.d")).join(file), contents)?;
        self.daemon_reload()
    }

    /// `systemctl daemon-reload` (synchronous: returns after the reload).
    pub fn daemon_reload(&self) -> Result<()> {
        self.systemctl_checked(&["daemon-reload"]).map(drop)
    }

    /// A [`Command`] that runs `program` inside all of the testbed's
    /// namespaces (`nsenter --target <pid> --all`), with a clean environment
    /// (`PATH`, `LANG=C.UTF-8`, no pager, no colors). Add arguments,
    /// environment or stdio as needed; the working directory is `/`.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(&self.nsenter);
        cmd.arg("--target")
            .arg(self.pid.to_string())
            .args(["--all", "--", program])
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
        cmd
    }

    /// Runs `argv` inside the testbed and collects its output; a non-zero
    /// exit is *not* an error (see [`Testbed::run_checked`]). Killed after
    /// the command timeout.
    pub fn run(&self, argv: &[&str]) -> Result<CmdOutput> {
        self.run_with_timeout(argv, self.command_timeout)
    }

    /// [`Testbed::run`] with an explicit timeout.
    pub fn run_with_timeout(&self, argv: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let (program, args) = argv.split_first().ok_or_else(|| Error::InvalidArgument("run: empty argv".into()))?;
        let mut cmd = self.command(program);
        cmd.args(args);
        let mut out = cmd::run(cmd, timeout)?;
        // Report what the test asked for, not the nsenter plumbing.
        out.argv = argv.iter().map(|s| s.to_string()).collect();
        Ok(out)
    }

    /// Like [`Testbed::run`], but a non-zero exit is an
    /// [`Error::CommandFailed`] carrying the output and a journal excerpt.
    pub fn run_checked(&self, argv: &[&str]) -> Result<CmdOutput> {
        let out = self.run(argv)?;
        if out.success() {
            Ok(out)
        } else {
            Err(Error::CommandFailed { journal: self.journal_tail(60), output: Box::new(out) })
        }
    }

    /// `systemctl <args>` inside; a non-zero exit is not an error (many
    /// queries like `is-active` answer through the exit code).
    pub fn systemctl(&self, args: &[&str]) -> Result<CmdOutput> {
        self.run(&systemctl_argv(args))
    }

    /// `systemctl <args>` inside; a non-zero exit is an
    /// [`Error::CommandFailed`] with stderr and a journal excerpt.
    pub fn systemctl_checked(&self, args: &[&str]) -> Result<CmdOutput> {
        self.run_checked(&systemctl_argv(args))
    }

    /// `systemctl show -p <property> --value <unit>`, without the trailing
    /// newline.
    pub fn show(&self, unit: &str, property: &str) -> Result<String> {
        let out = self.systemctl_checked(&["show", "-p", property, "--value", unit])?;
        Ok(out.stdout_trimmed().to_owned())
    }

    /// The journal of this boot (`journalctl --no-pager -b [-u <unit>]`),
    /// after `journalctl --sync` so messages logged before the call are in it.
    pub fn journal(&self, unit: Option<&str>) -> Result<String> {
        // Best effort: a missing sync only makes the result less complete.
        let _ = self.run_with_timeout(&["journalctl", "--sync"], Duration::from_secs(10));
        let mut argv = vec!["journalctl", "--no-pager", "-b", "-o", "short-precise"];
        if let Some(unit) = unit {
            argv.extend(["-u", unit]);
        }
        Ok(self.run_checked(&argv)?.stdout)
    }

    /// The last `lines` lines of the journal, or why they are unavailable.
    /// Never fails: used to enrich error messages.
    pub(crate) fn journal_tail(&self, lines: usize) -> String {
        let n = lines.to_string();
        match self.run_with_timeout(
            &["journalctl", "--no-pager", "-b", "-o", "short-precise", "-n", &n],
            Duration::from_secs(20),
        ) {
            Ok(out) if out.success() => out.stdout,
            Ok(out) => format!("(journalctl failed: {})", out.stderr.trim()),
            Err(e) => format!("(journalctl failed: {e})"),
        }
    }

    /// Polls `predicate` (sleeping between calls, 5 ms growing to 200 ms)
    /// until it returns `true`; after `timeout`, fails with an
    /// [`Error::Timeout`] naming `what` and showing the journal's tail.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut predicate: impl FnMut() -> bool) -> Result<()> {
        poll_until(what, timeout, || predicate().then_some(())).map_err(|e| match e {
            Error::Timeout { what, timeout, .. } => Error::Timeout {
                what,
                timeout,
                detail: format!("\n--- journal (last lines) ---\n{}", self.journal_tail(60)),
            },
            other => other,
        })
    }

    /// Tears the testbed down now and reports whether everything was
    /// removed (dropping does the same but can only print problems).
    pub fn shutdown(mut self) -> Result<()> {
        self.res.teardown()
    }

    /// Parses the major version from `systemctl --version`.
    pub(crate) fn query_version(&self) -> Result<u32> {
        let out = self.systemctl_checked(&["--version"])?;
        parse_version(&out.stdout).ok_or_else(|| Error::Boot {
            reason: format!("cannot parse `systemctl --version`: {:?}", out.stdout),
            diagnostics: String::new(),
        })
    }
}

impl Drop for Testbed {
    /// On a panicking thread, prints the whole journal (the most useful
    /// evidence for a failed protocol test), then tears down: SIGKILL to PID 1
    /// kills the pid namespace, and the overlay, cgroup and state directory
    /// are removed. Problems are printed, never panicked on.
    fn drop(&mut self) {
        if std::thread::panicking() && !self.res.pid1_exited() {
            match self.journal(None) {
                Ok(journal) => eprintln!(
                    "===== journal of baton-testbed (systemd {}, pid {}) =====\n{journal}===== end of journal =====",
                    self.systemd_version, self.pid
                ),
                Err(e) => eprintln!("baton-testbed: cannot read the journal: {e}"),
            }
        }
        if let Err(e) = self.res.teardown() {
            eprintln!("baton-testbed: {e}");
        }
    }
}

fn systemctl_argv<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["systemctl", "--no-pager"];
    argv.extend_from_slice(args);
    argv
}

fn check_unit_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.contains('/')
        && name.rsplit_once('.').is_some_and(|(stem, suffix)| !stem.is_empty() && !suffix.is_empty());
    if ok { Ok(()) } else { Err(Error::InvalidArgument(format!("{name:?} is not a unit name like `demo.service`"))) }
}

/// `"systemd 252 (252.38-1~deb12u1)\n+PAM ..."` -> 252.
fn parse_version(text: &str) -> Option<u32> {
    let mut words = text.lines().next()?.split_whitespace();
    (words.next()? == "systemd").then_some(())?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testbed_can_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Testbed>();
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("systemd 252 (252.38-1~deb12u1)\n+PAM"), Some(252));
        assert_eq!(parse_version("systemd 257 (257.13-1~deb13u1)\n"), Some(257));
        assert_eq!(parse_version("systemd 262 (262-1)\n+PAM"), Some(262));
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn checks_unit_names() {
        assert!(check_unit_name("demo.service").is_ok());
        assert!(check_unit_name("demo@1.socket").is_ok());
        for bad in ["", "demo", "../x.service", ".service", "demo."] {
            assert!(check_unit_name(bad).is_err(), "{bad}");
        }
    }
}
