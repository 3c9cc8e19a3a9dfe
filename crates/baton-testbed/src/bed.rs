//! [`Bed`]: a booted [`Testbed`] as the integration tests under systemd use
//! it, with the operations they share as methods that panic (naming the
//! test) instead of returning errors, and [`systemd_tests!`](crate::systemd_tests),
//! which instantiates a test once per systemd flavor.
//!
//! ```no_run
//! use baton_testbed::{Bed, Flavor};
//!
//! fn demo(flavor: Flavor, test: &str) {
//!     let Some(bed) = Bed::boot(flavor, test) else { return };
//!     bed.install_unit("demo.service", "[Service]\nExecStart=/bin/sleep infinity\n");
//!     bed.systemctl_ok(&["start", "demo.service"]);
//!     bed.wait_for("demo to run", || bed.show("demo.service", "ActiveState") == "active");
//! }
//!
//! baton_testbed::systemd_tests! {
//!     demo:
//!     demo_on_252: Host,
//!     demo_on_257: Trixie,
//!     demo_on_262: Forky,
//! }
//! # fn main() {}
//! ```

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd::CmdOutput;
use crate::support::{free_loopback_port, skip_unless_root};
use crate::{Flavor, Testbed};

/// How long [`Bed::wait_for`] waits unless [`BedBuilder::wait`] says
/// otherwise: generous, the machines running these tests are noisy.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// File name, in [`Testbed::scratch`], of the report that
/// [`BedBuilder::report`] enables.
const REPORT_FILE: &str = "report";

/// A booted [`Testbed`] for one test, and what the test needs around it: its
/// name (every panic message starts with it), a free loopback [`port`](Bed::port)
/// for the service under test and, optionally, the conformance probe's
/// report file ([`BedBuilder::report`]).
///
/// Dropping it tears the testbed down, also when the test panicked: then
/// the report (if any) is printed first, and the [`Testbed`] prints the
/// whole journal.
pub struct Bed {
    /// The testbed itself, for everything the methods here do not cover.
    pub tb: Testbed,
    /// The test's name, as passed to [`Bed::boot`].
    pub name: String,
    /// A free loopback port reserved for the service under test.
    pub port: u16,
    report: Option<PathBuf>,
    wait: Duration,
}

/// Options of a [`Bed`] before it boots; from [`Bed::builder`].
#[must_use]
pub struct BedBuilder {
    flavor: Flavor,
    name: String,
    wait: Duration,
    report: bool,
    binaries: Vec<(PathBuf, String)>,
    binds: Vec<PathBuf>,
}

impl BedBuilder {
    /// How long [`Bed::wait_for`] waits (default [`DEFAULT_WAIT`]).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The test's probe writes a report to [`Bed::report_path`]: its text is
    /// added to the failure messages of [`Bed::systemctl_ok`] and
    /// [`Bed::wait_for`], and printed when the test panics.
    pub fn report(mut self) -> Self {
        self.report = true;
        self
    }

    /// Copies the host file `from` to `to` inside right after the boot
    /// (see [`Bed::install_binary`]).
    pub fn binary(mut self, from: impl Into<PathBuf>, to: &str) -> Self {
        self.binaries.push((from.into(), to.to_owned()));
        self
    }

    /// Also shares the host directory `dir` (absolute, existing) with the
    /// testbed at the same path (see [`TestbedBuilder::bind`](crate::TestbedBuilder::bind)):
    /// e.g. a test's fixtures, or software installed on the host that the
    /// trixie and forky roots lack.
    pub fn bind(mut self, dir: impl Into<PathBuf>) -> Self {
        self.binds.push(dir.into());
        self
    }

    /// Boots, or returns `None` when the test may skip (not root, outside
    /// CI: see [`skip_unless_root`]).
    ///
    /// # Panics
    /// If the testbed fails to boot, or a binary cannot be installed.
    pub fn boot(self) -> Option<Bed> {
        if !skip_unless_root(&self.name) {
            return None;
        }
        let flavor = self.flavor;
        let builder = self.binds.iter().fold(Testbed::builder(flavor), |b, dir| b.bind(dir));
        let tb = builder.boot().unwrap_or_else(|e| panic!("{}: boot {flavor}: {e}", self.name));
        let report = self.report.then(|| tb.scratch().join(REPORT_FILE));
        let bed = Bed { tb, name: self.name, port: free_loopback_port(), report, wait: self.wait };
        for (from, to) in &self.binaries {
            bed.install_binary(from, to);
        }
        Some(bed)
    }
}

impl Bed {
    /// Boots `flavor` for the test `name` with default options, or returns
    /// `None` when the test may skip; see [`BedBuilder::boot`].
    pub fn boot(flavor: Flavor, name: &str) -> Option<Bed> {
        Bed::builder(flavor, name).boot()
    }

    /// Starts configuring a [`Bed`] for the test `name`.
    pub fn builder(flavor: Flavor, name: &str) -> BedBuilder {
        BedBuilder {
            flavor,
            name: name.to_owned(),
            wait: DEFAULT_WAIT,
            report: false,
            binaries: Vec::new(),
            binds: Vec::new(),
        }
    }

    /// Panics with `what` and `e`, prefixed by the test's name and followed
    /// by the report, if there is one.
    #[track_caller]
    fn fail(&self, what: &str, e: impl Display) -> ! {
        match &self.report {
            Some(_) => panic!("{}: {what}: {e}\nreport:\n{}", self.name, self.report_text()),
            None => panic!("{}: {what}: {e}", self.name),
        }
    }

    /// Runs `argv` inside; a non-zero exit is not a failure (check
    /// [`CmdOutput::success`]). Killed after the testbed's command timeout.
    ///
    /// # Panics
    /// If the command cannot be run.
    #[track_caller]
    pub fn run(&self, argv: &[&str]) -> CmdOutput {
        self.tb.run(argv).unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", self.name))
    }

    /// Runs `argv` inside and returns its stdout.
    ///
    /// # Panics
    /// If it cannot be run or exits non-zero.
    #[track_caller]
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(out.success(), "{}: {out}", self.name);
        out.stdout
    }

    /// Runs `argv` inside with its own `timeout` (e.g. a package
    /// operation) and returns its output.
    ///
    /// # Panics
    /// If it cannot be run, times out or exits non-zero.
    #[track_caller]
    pub fn run_ok_with_timeout(&self, argv: &[&str], timeout: Duration) -> CmdOutput {
        let out = self.tb.run_with_timeout(argv, timeout).unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", self.name));
        assert!(out.success(), "{}: {out}", self.name);
        out
    }

    /// `systemctl <args>` inside; a non-zero exit is not a failure (queries
    /// like `is-active` answer through it).
    ///
    /// # Panics
    /// If `systemctl` cannot be run.
    #[track_caller]
    pub fn systemctl(&self, args: &[&str]) -> CmdOutput {
        self.tb.systemctl(args).unwrap_or_else(|e| self.fail(&format!("systemctl {args:?}"), e))
    }

    /// Writes the units `baton units` generates inside for `baton-httpd`
    /// supervised by Baton (`/usr/bin/baton` and `/usr/bin/baton-httpd`, as
    /// packaged), listening on this bed's port as `http`, into
    /// `/etc/systemd/system`, and reloads systemd. `units_args` go to `baton
    /// units`, `app_args` to `baton-httpd`.
    ///
    /// # Panics
    /// If `baton units` or the reload fails.
    #[track_caller]
    pub fn generate_httpd_units(&self, units_args: &[&str], app_args: &[&str]) {
        let listen = format!("http=127.0.0.1:{}", self.port);
        let mut argv = vec!["/usr/bin/baton", "units", "--name", "baton-httpd", "--listen", &listen];
        argv.extend_from_slice(units_args);
        argv.extend(["--output", "/etc/systemd/system", "--", "/usr/bin/baton-httpd"]);
        argv.extend_from_slice(app_args);
        if let Err(e) = self.tb.run_checked(&argv) {
            self.fail("baton units", e);
        }
        if let Err(e) = self.tb.daemon_reload() {
            self.fail("daemon-reload", e);
        }
    }

    /// `systemctl <args>` inside, which must succeed.
    ///
    /// # Panics
    /// If it fails; the message has systemctl's stderr, the journal's tail
    /// and the report.
    #[track_caller]
    pub fn systemctl_ok(&self, args: &[&str]) {
        if let Err(e) = self.tb.systemctl_checked(args) {
            self.fail(&format!("systemctl {args:?}"), e);
        }
    }

    /// `systemctl show -p <property> --value <unit>`.
    ///
    /// # Panics
    /// If systemctl fails.
    #[track_caller]
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.tb.show(unit, property).unwrap_or_else(|e| self.fail(&format!("show {unit} {property}"), e))
    }

    /// The journal of this boot, of `unit` only if given.
    ///
    /// # Panics
    /// If `journalctl` fails.
    #[track_caller]
    pub fn journal(&self, unit: Option<&str>) -> String {
        self.tb.journal(unit).unwrap_or_else(|e| self.fail("journal", e))
    }

    /// Polls `predicate` until it holds, at most the bed's wait (see
    /// [`BedBuilder::wait`]).
    ///
    /// # Panics
    /// After the wait, naming `what`, with the journal's tail and the report.
    #[track_caller]
    pub fn wait_for(&self, what: &str, mut predicate: impl FnMut() -> bool) {
        if let Err(e) = self.tb.wait_for(what, self.wait, &mut predicate) {
            self.fail("wait", e);
        }
    }

    /// Writes `/etc/systemd/system/<name>` inside and reloads systemd.
    ///
    /// # Panics
    /// If writing or `daemon-reload` fails.
    #[track_caller]
    pub fn install_unit(&self, name: &str, contents: &str) {
        self.tb.install_unit(name, contents).unwrap_or_else(|e| self.fail(&format!("install {name}"), e));
    }

    /// Writes each `(name, contents)` to `/etc/systemd/system/<name>` inside,
    /// then reloads systemd once (a socket and its service appear together).
    ///
    /// # Panics
    /// If writing or `daemon-reload` fails.
    #[track_caller]
    pub fn install_units<N: AsRef<str>, C: AsRef<str>>(&self, files: impl IntoIterator<Item = (N, C)>) {
        for (name, contents) in files {
            self.write_file(&format!("/etc/systemd/system/{}", name.as_ref()), contents.as_ref());
        }
        self.tb.daemon_reload().unwrap_or_else(|e| self.fail("daemon-reload", e));
    }

    /// Writes a file inside (creating its directories).
    ///
    /// # Panics
    /// If `inside` is not absolute or cannot be written.
    #[track_caller]
    pub fn write_file(&self, inside: &str, contents: &str) {
        self.tb.write_file(inside, contents).unwrap_or_else(|e| self.fail(&format!("write {inside}"), e));
    }

    /// Copies the host file `from` to `to` inside, creating its directory.
    /// Use a path outside `/root`, which `ProtectHome=` hides from
    /// hardened services.
    ///
    /// # Panics
    /// If the copy fails.
    #[track_caller]
    pub fn install_binary(&self, from: &Path, to: &str) {
        let dest = self.tb.host_path(to);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| self.fail(&format!("mkdir {}", dir.display()), e));
        }
        std::fs::copy(from, &dest).unwrap_or_else(|e| self.fail(&format!("copy {} to {to}", from.display()), e));
    }

    /// Copies the host file `file` into [`Testbed::scratch`] (visible inside
    /// at the same path) and returns that path, e.g. for a package to
    /// install inside.
    ///
    /// # Panics
    /// If `file` has no file name or the copy fails.
    #[track_caller]
    pub fn carry(&self, file: &Path) -> String {
        let name =
            file.file_name().unwrap_or_else(|| self.fail("carry", format!("{} has no file name", file.display())));
        let dest = self.tb.scratch().join(name);
        std::fs::copy(file, &dest).unwrap_or_else(|e| self.fail(&format!("copy {}", file.display()), e));
        dest.to_string_lossy().into_owned()
    }

    /// Whether process `pid` exists inside (asked of `/proc`: the trixie
    /// and forky roots have no `kill` binary).
    #[track_caller]
    pub fn alive(&self, pid: impl Display) -> bool {
        self.run(&["test", "-d", &format!("/proc/{pid}")]).success()
    }

    /// Sends `signal` (e.g. `TERM`) to `pid` inside.
    ///
    /// # Panics
    /// If `kill` fails.
    #[track_caller]
    pub fn signal(&self, pid: impl Display, signal: &str) {
        let out = self.run(&["/bin/sh", "-c", &format!("kill -{signal} {pid}")]);
        assert!(out.success(), "{}: {out}", self.name);
    }

    /// Pids of the processes inside whose `comm` is `comm` (from `/proc`:
    /// the trixie and forky roots have no `pgrep`).
    #[track_caller]
    pub fn pids_named(&self, comm: &str) -> Vec<u32> {
        let script = format!(
            "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = {comm} ] && echo ${{p#/proc/}}; done; true"
        );
        self.run_ok(&["/bin/sh", "-c", &script]).lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// A field of `/proc/<pid>/status` inside (e.g. `PPid`), trimmed.
    #[track_caller]
    pub fn proc_status(&self, pid: impl Display, field: &str) -> Option<String> {
        let out = self.run(&["cat", &format!("/proc/{pid}/status")]);
        out.stdout.lines().find_map(|l| Some(l.strip_prefix(field)?.strip_prefix(':')?.trim().to_owned()))
    }

    /// `readlink /proc/<pid>/exe` inside: the file a process runs.
    ///
    /// # Panics
    /// If `readlink` fails.
    #[track_caller]
    pub fn exe(&self, pid: impl Display) -> String {
        self.run_ok(&["readlink", &format!("/proc/{pid}/exe")]).trim().to_owned()
    }

    /// Where the probe writes its report (`--report`), shared with the host.
    ///
    /// # Panics
    /// If the bed was built without [`BedBuilder::report`].
    pub fn report_path(&self) -> &Path {
        self.report.as_deref().unwrap_or_else(|| panic!("{}: this Bed has no report (BedBuilder::report)", self.name))
    }

    /// The report's text so far (empty before the probe wrote any).
    pub fn report_text(&self) -> String {
        self.report.as_deref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The report's lines so far.
    pub fn report_lines(&self) -> Vec<String> {
        self.report_text().lines().map(str::to_owned).collect()
    }

    /// Pids of the probe's starts (its `start pid=N` lines), in order.
    pub fn probe_starts(&self) -> Vec<u32> {
        self.report_lines().iter().filter_map(|l| l.strip_prefix("start pid=")?.parse().ok()).collect()
    }
}

impl Drop for Bed {
    /// On a panicking thread, prints the report first; the [`Testbed`]
    /// then prints the journal and tears down.
    fn drop(&mut self) {
        if std::thread::panicking() && self.report.is_some() {
            eprintln!("----- probe report -----\n{}----- end of report -----", self.report_text());
        }
    }
}

/// Instantiates `#[test]`s once per systemd flavor, in one of three shapes
/// (the names are the tests' names in CI logs; pick the shape that keeps
/// them):
///
/// - `grouped by version, RUN: a, b, …` — modules `systemd_252`,
///   `systemd_257` and `systemd_262`, each with `#[test] fn a()`, … calling
///   `RUN(flavor, "systemd_252::a", a)` (`RUN` and the scenarios are looked
///   up in the invoking module);
/// - `grouped by scenario, RUN: a, b, …` — a module per scenario with
///   `#[test] fn systemd_252()`, … calling `RUN(flavor, "a::systemd_252", a)`;
/// - `RUN: test_name: Flavor, …` — one `#[test] fn test_name()` per entry,
///   calling `RUN(Flavor::Flavor, "test_name")`.
///
/// `flavor.expected_systemd()` gives the version a test expects.
///
/// ```no_run
/// use baton_testbed::{Bed, Flavor};
///
/// fn run_scenario(flavor: Flavor, name: &str, scenario: fn(&Bed)) {
///     let Some(bed) = Bed::boot(flavor, name) else { return };
///     assert_eq!(bed.tb.systemd_version(), flavor.expected_systemd());
///     scenario(&bed);
/// }
/// fn starts(bed: &Bed) { /* ... */ }
/// fn stops(bed: &Bed) { /* ... */ }
///
/// // systemd_252::starts, systemd_252::stops, systemd_257::starts, ...
/// baton_testbed::systemd_tests!(grouped by version, run_scenario: starts, stops);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! systemd_tests {
    (grouped by version, $run:ident: $($scenario:ident),* $(,)?) => {
        $crate::systemd_tests!(@version $run, systemd_252, Host: $($scenario),*);
        $crate::systemd_tests!(@version $run, systemd_257, Trixie: $($scenario),*);
        $crate::systemd_tests!(@version $run, systemd_262, Forky: $($scenario),*);
    };
    (grouped by scenario, $run:ident: $($scenario:ident),* $(,)?) => {
        $(mod $scenario {
            $crate::systemd_tests!(@one $run, $scenario, systemd_252, Host);
            $crate::systemd_tests!(@one $run, $scenario, systemd_257, Trixie);
            $crate::systemd_tests!(@one $run, $scenario, systemd_262, Forky);
        })*
    };
    (@version $run:ident, $module:ident, $flavor:ident: $($scenario:ident),*) => {
        mod $module {
            $($crate::systemd_tests!(@one $run, $scenario, $scenario, $flavor, concat!(stringify!($module), "::", stringify!($scenario)));)*
        }
    };
    (@one $run:ident, $scenario:ident, $test:ident, $flavor:ident) => {
        $crate::systemd_tests!(@one $run, $scenario, $test, $flavor, concat!(stringify!($scenario), "::", stringify!($test)));
    };
    (@one $run:ident, $scenario:ident, $test:ident, $flavor:ident, $name:expr) => {
        #[test]
        fn $test() {
            super::$run($crate::Flavor::$flavor, $name, super::$scenario);
        }
    };
    ($run:ident: $($test:ident: $flavor:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                $run($crate::Flavor::$flavor, stringify!($test));
            }
        )+
    };
}
