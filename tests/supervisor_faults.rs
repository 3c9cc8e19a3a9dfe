//! `baton run` against misbehaving apps, with real processes and sockets:
//! failing and hanging health checks, watchdog expiry, crashes and crash
//! loops, generations that ignore SIGTERM or stop on their own, the
//! draining limit, the CLI's exit codes, and abuse of the notify socket.
//!
//! The issue's fault cases (a new generation that exits before READY=1,
//! hangs past the ready timeout, crashes right after READY=1, fails its
//! health check, ignores SIGTERM, crash-loops; notify abuse) run under
//! continuous client load from `baton_testbed::load` — a paced keep-alive
//! pool and paced one-connection-per-request clients at once — against the
//! reference server `baton-httpd`. The app is a small shell switch: while a
//! fault file exists in the test's directory a generation runs the faulty
//! command, otherwise it execs `baton-httpd` (same pid). Each of these tests
//! asserts that the old generation kept serving (the same pid answers after
//! the fault) and that not one request failed, and prints the load reports.
//!
//! A few tests keep `baton-sd-probe` as the app because they read its
//! report (signal order, `STOPPING=1` on its own, its abuse battery); the
//! shared generator speaks HTTP, which the probe's one-line answer is not,
//! so those use [`ProbeClients`]. No root needed: Baton's control and notify
//! sockets live in a private temporary directory. Timing assertions are
//! lower bounds (a slow machine only makes them truer) or generous upper
//! bounds.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

use baton::control::{Response, Status};
use baton_testbed::baton::{Baton, BatonBuilder, WAIT, cli_at};
use baton_testbed::expect_success as ok;
use baton_testbed::httpd::{Served, healthz};
use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};
use baton_testbed::probe::{ProbeClients, ask};
use baton_testbed::{cargo_bin, poll_until};
use rustix::process::{Pid, Signal};

fn scratch(test: &str) -> PathBuf {
    baton_testbed::unique_temp_dir("baton-faults", test)
}

fn probe_bin() -> PathBuf {
    cargo_bin("sd-probe", "baton-sd-probe")
}

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// Whether `pid` is a live process (a zombie counts as gone: Baton reaps its
/// children, so a zombie is only a moment away from disappearing).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pid: u32, what: &str) {
    poll_until(&format!("{what} (pid {pid}) gone"), WAIT, || (!alive(pid)).then_some(()))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn signal(pid: u32, sig: Signal) {
    rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
}

/// A core dump from a SIGABRTed probe must not land anywhere: set once for
/// the test process, inherited by Baton and every generation.
fn no_core_dumps() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Core);
        limit.current = Some(0);
        let _ = setrlimit(Resource::Core, limit);
    });
}

/// One line of the probe's report, with `--timestamps`: `TEXT pid=P mono_us=T`.
#[derive(Debug, Clone)]
struct Line {
    text: String,
    pid: Option<u32>,
    at_us: Option<u64>,
}

fn parse_report(text: &str) -> Vec<Line> {
    text.lines()
        .map(|l| {
            let parsed = l.rsplit_once(" mono_us=").and_then(|(head, at)| {
                let (text, pid) = head.rsplit_once(" pid=")?;
                Some(Line { text: text.to_owned(), pid: pid.parse().ok(), at_us: at.parse().ok() })
            });
            parsed.unwrap_or_else(|| Line { text: l.to_owned(), pid: None, at_us: None })
        })
        .collect()
}

/// `baton run --control DIR/baton.sock -l http=127.0.0.1:0 ARGS -- APP...`
/// in `dir`, returning once Baton has bound its socket (not waiting for
/// the app).
fn launch(dir: &Path, args: &[&str], app: &[&OsStr]) -> Baton {
    launch_with_env(dir, args, app, &[])
}

/// [`launch`] with extra environment for Baton, which its generations
/// inherit.
fn launch_with_env(dir: &Path, args: &[&str], app: &[&OsStr], env: &[(&str, &OsStr)]) -> Baton {
    no_core_dumps();
    let b = BatonBuilder::new(baton_bin(), dir)
        .args(args)
        .app(app)
        .envs(env.iter().copied())
        .current_dir(dir)
        .after_stop(kill_leftovers)
        .spawn();
    b.port();
    b
}

/// Baton running `baton-sd-probe --serve http --timestamps --report
/// DIR/report PROBE_ARGS`, with generation 1 active.
fn start_probe(dir: &Path, args: &[&str], probe_args: &[&str]) -> Baton {
    let b = launch(dir, args, &probe_command(&dir.join("report"), probe_args));
    b.wait_active(1);
    b
}

/// Baton running the fault switch (see the module docs): while a fault
/// file exists, `fault` (shell commands) decides what the generation
/// does; when it falls through, the generation execs `baton-httpd
/// --root DIR/www`. The script sees `$T_DIR` (the test's directory),
/// `$T_HTTPD`, `$T_PROBE`, `$T_BATON` and `$T_SELF` (this test binary).
/// Returns with generation 1 (`baton-httpd`) active.
fn start_httpd(dir: &Path, args: &[&str], fault: &str) -> Baton {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "fault suite\n").unwrap();
    std::fs::write(dir.join("report"), "").unwrap();
    let script = format!("{fault}\nexec \"$T_HTTPD\" --root \"$T_DIR/www\"");
    let (httpd, probe, exe) = (httpd_bin(), probe_bin(), std::env::current_exe().unwrap());
    let env: [(&str, &OsStr); 5] = [
        ("T_DIR", dir.as_os_str()),
        ("T_HTTPD", httpd.as_os_str()),
        ("T_PROBE", probe.as_os_str()),
        ("T_BATON", OsStr::new(baton_bin())),
        ("T_SELF", exe.as_os_str()),
    ];
    let app = [OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(&script), OsStr::new("baton-fault-switch")];
    let b = launch_with_env(dir, args, &app, &env);
    b.wait_active(1);
    b
}

/// What this suite reads of a Baton besides what the harness has.
trait FaultSuite {
    /// Which `baton-httpd` answers now (one request on a new connection).
    fn http(&self) -> Served;
    /// Baton's own CPU time so far (user + system, not its children's).
    fn cpu(&self) -> Duration;
    /// The probe's report, parsed.
    fn lines(&self) -> Vec<Line>;
    /// Waits for a report line of `pid` starting with `prefix`.
    fn wait_line(&self, pid: u32, prefix: &str) -> Line;
    /// Every probe pid the report has seen start.
    fn probe_pids(&self) -> Vec<u32>;
}

impl FaultSuite for Baton {
    fn http(&self) -> Served {
        healthz(self.port()).unwrap_or_else(|e| panic!("GET /healthz: {e}\nlog:\n{}", self.log()))
    }

    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    fn lines(&self) -> Vec<Line> {
        parse_report(&self.report_text())
    }

    fn wait_line(&self, pid: u32, prefix: &str) -> Line {
        poll_until(&format!("report line {prefix:?} of pid {pid}"), WAIT, || {
            self.lines().into_iter().find(|l| l.pid == Some(pid) && l.text.starts_with(prefix))
        })
        .unwrap_or_else(|e| panic!("{e}\nreport:\n{}", self.report_text()))
    }

    fn probe_pids(&self) -> Vec<u32> {
        self.lines().iter().filter(|l| l.text.starts_with("start pid=")).filter_map(|l| l.pid).collect()
    }
}

/// Once Baton is stopped: a failed test may leave generations behind (e.g.
/// ones ignoring SIGTERM after Baton was SIGKILLed): never leak them.
fn kill_leftovers(b: &Baton) {
    for pid in b.probe_pids() {
        let is_probe = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("baton-sd-probe"));
        if is_probe && alive(pid) {
            let _ = rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
        }
    }
    // Shells (health checks, apps) that tests leave in `exec sleep`,
    // reported as `health-sh pid=P` / `app-sh pid=P`.
    for l in b.report_text().lines() {
        let Some(pid) = l.split_once("-sh pid=").and_then(|(_, r)| r.split(' ').next()?.parse::<u32>().ok()) else {
            continue;
        };
        let is_sleep = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep\0"));
        if is_sleep && alive(pid) {
            let _ = rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
        }
    }
}

fn probe_command(report: &Path, probe_args: &[&str]) -> Vec<&'static OsStr> {
    // Leaked once per test: the command line lives as long as the test.
    let mut cmd: Vec<OsString> = vec![probe_bin().into(), "--serve".into(), "http".into(), "--timestamps".into()];
    cmd.extend(["--report".into(), report.as_os_str().to_owned()]);
    cmd.extend(probe_args.iter().map(OsString::from));
    cmd.into_iter().map(|s| &*Box::leak(s.into_boxed_os_str())).collect()
}

/// Stops the probe's clients and asserts that all was served.
fn assert_all_served(load: ProbeClients, what: &str) {
    let (served, failures) = load.finish();
    eprintln!("{what}: {served} requests served, {} failed", failures.len());
    assert!(served > 0, "{what}: no request was served");
    assert!(
        failures.is_empty(),
        "{what}: {} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

fn httpd_bin() -> PathBuf {
    cargo_bin("baton-httpd", "baton-httpd")
}

/// Continuous load on the app from the shared generator: a keep-alive pool
/// (4 connections, 200 requests/s) and one-connection-per-request clients
/// (2 workers, 100 requests/s), both paced so that a busy 2-core machine
/// still has room for Baton. The request timeout is long: a request queued
/// on the held listening socket while no generation accepts (a crash gap)
/// must be counted as served late, not failed.
struct Clients {
    keep_alive: Load,
    new_connection: Load,
}

impl Clients {
    fn start(port: u16) -> Clients {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let config = |mode, connections, rate| {
            LoadConfig::new(addr)
                .mode(mode)
                .connections(connections)
                .rate(Some(rate))
                .request_timeout(Duration::from_secs(30))
                .max_duration(Duration::from_secs(600))
        };
        let clients = Clients {
            keep_alive: Load::start(config(Mode::KeepAlive, 4, 200)).expect("keep-alive load"),
            new_connection: Load::start(config(Mode::NewConnection, 2, 100)).expect("new-connection load"),
        };
        clients.wait_ok(50, "at the start");
        clients
    }

    fn loads(&self) -> [(&'static str, &Load); 2] {
        [("keep-alive", &self.keep_alive), ("new-connection", &self.new_connection)]
    }

    /// Waits until both loads got `n` more answers.
    fn wait_ok(&self, n: u64, when: &str) {
        for (name, load) in self.loads() {
            assert!(
                load.wait_for_ok(n, WAIT),
                "{when}: the {name} load did not get {n} more answers within {WAIT:?}: {:?}",
                load.progress()
            );
        }
    }

    /// Stops both loads, prints their reports and asserts that every request
    /// was answered. Returns the generations (`baton-generation`) that
    /// answered.
    fn finish(self, what: &str) -> (BTreeSet<String>, [LoadReport; 2]) {
        let reports = [self.keep_alive.stop(), self.new_connection.stop()];
        let mut generations = BTreeSet::new();
        for (name, r) in ["keep-alive", "new-connection"].into_iter().zip(&reports) {
            eprintln!("{what}: {name} load: {}", r.to_json());
            assert!(r.ok > 0, "{what}: the {name} load got no answer");
            assert_eq!(r.failed(), 0, "{what}: {} {name} requests failed: {}", r.failed(), r.to_json());
            generations.extend(r.per_generation.keys().cloned());
        }
        (generations, reports)
    }
}

fn generations(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

// ---- new generations failing to start ---------------------------------------

/// The fault: a probe that never accepts a connection, with a report.
const PROBE_FAULT: &str = r#"if [ -e "$T_DIR/fault" ]; then exec "$T_PROBE" --timestamps --report "$T_DIR/report" "#;

/// The pids the report saw start (in order).
fn started(b: &Baton) -> Vec<u32> {
    b.probe_pids()
}

#[test]
fn new_generation_exiting_before_ready_leaves_the_old_one_serving() {
    let dir = scratch("exit-before-ready");
    let b = start_httpd(&dir, &[], &format!(r#"{PROBE_FAULT} --fail-if-exists "$T_DIR/fault"; fi"#));
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(dir.join("fault"), "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("generation 2 exited with status 3 before READY=1"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    // The app's last output comes with the failure.
    assert!(err.contains("last output:") && err.contains("failing before READY=1"), "{err}");
    clients.wait_ok(100, "after the failed restart");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
    let s = b.status();
    assert_eq!((s.generations.len(), s.generations[0].generation, s.restarts, s.crash_restarts), (1, 1, 0, 0));
    assert!(s.last_failure.as_deref().unwrap_or("").contains("before READY=1"), "{s:?}");
    assert!(!b.log().contains("generation 1 draining"), "generation 1 was asked to drain:\n{}", b.log());

    // A failed restart is not retried on its own: generation 1 stays alone.
    std::fs::remove_file(dir.join("fault")).unwrap();
    clients.wait_ok(100, "a while after the failed restart");
    assert_eq!(b.status().generations.len(), 1);
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1 && s.generations[0].generation == 3);
    let (served, _) = clients.finish("a generation exiting before READY=1");
    assert_eq!(served, generations(&["1", "3"]));
}

#[test]
fn new_generation_hanging_past_the_ready_timeout_is_stopped_and_the_old_one_keeps_serving() {
    let dir = scratch("hang");
    let b =
        start_httpd(&dir, &["--ready-timeout", "2s"], &format!(r#"{PROBE_FAULT} --hang-if-exists "$T_DIR/fault"; fi"#));
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(dir.join("fault"), "").unwrap();
    let t0 = Instant::now();
    let out = b.cli(&["restart"]);
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("generation 2 no READY=1 within 2s"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    assert!(took >= Duration::from_secs(2), "failed after {took:?}, before the 2 s ready timeout");
    // Like systemd after a start timeout, the hung generation was asked to
    // stop (SIGTERM), and it did, by itself.
    let hung = *started(&b).first().expect("the hung generation's report");
    assert!(b.wait_line(hung, "stopping signal=Terminate").text.contains("drained=true"));
    wait_gone(hung, "the hung generation");
    assert!(!b.log().contains("SIGKILL"), "{}", b.log());
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    clients.wait_ok(100, "after the failed restart");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
    assert!(b.status().last_failure.as_deref().unwrap_or("").contains("no READY=1"));
    let (served, _) = clients.finish("a generation hanging before READY=1");
    assert_eq!(served, generations(&["1"]));
}

#[test]
fn new_generation_hanging_and_ignoring_sigterm_is_killed_at_the_stop_deadline() {
    let dir = scratch("hang-ignore-term");
    // Never ready, and SIGTERM is ignored (an ignored signal stays ignored
    // across exec): only SIGKILL ends it.
    let b = start_httpd(
        &dir,
        &["--ready-timeout", "2s", "--stop-timeout", "1s"],
        r#"if [ -e "$T_DIR/fault" ]; then echo "app-sh pid=$$" >> "$T_DIR/report"; trap '' TERM; exec sleep 1000; fi"#,
    );
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(dir.join("fault"), "").unwrap();
    let t0 = Instant::now();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no READY=1 within 2s") && err.contains("generation 1 keeps serving"), "{err}");
    let text = b.report_text();
    let hung: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("app-sh pid=")?.parse().ok())
        .unwrap_or_else(|| panic!("no faulty generation in the report:\n{text}"));
    // Still there after the SIGTERM...
    assert!(alive(hung) || b.log().contains("generation 2 still running at the stop deadline"));
    // ...until the stop deadline: 2 s ready timeout + 1 s stop timeout.
    wait_gone(hung, "the generation ignoring SIGTERM");
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(3), "gone after {took:?}, before the ready and stop timeouts");
    b.wait_log("generation 2 still running at the stop deadline; SIGKILL");
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    clients.wait_ok(100, "after the kill");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
    let (served, _) = clients.finish("a hung generation ignoring SIGTERM");
    assert_eq!(served, generations(&["1"]));
}

/// Without a health check, READY=1 *is* the cutover (as under systemd):
/// the old generation is told to drain at once, so when the new one dies
/// right after its READY=1 nothing is serving any more and "the old
/// generation kept serving" cannot hold. What Baton guarantees instead:
/// it keeps the listening socket, so connections queue in its backlog (none
/// refused), idle keep-alive connections the old generation hands over wait
/// in the fd store, and replacements start with backoff (100 ms, doubling
/// after each failed one, no busy loop) until one serves them all. Here
/// the first replacements also fail (a crash loop) before one works.
#[test]
fn new_generation_crashing_right_after_ready_is_replaced_and_no_request_fails() {
    let dir = scratch("ready-crash-load");
    let fault = format!(
        r#"if [ -e "$T_DIR/crash" ]; then rm "$T_DIR/crash"; "$T_BATON" notify --ready && exit 1; exit 2; fi
{PROBE_FAULT} --fail-if-exists "$T_DIR/fault"; fi"#
    );
    // The immediate cutover at READY=1: with the default quiet period the
    // crash is caught before generation 2 takes over, and refused
    // (tests/proving.rs); this test is about what follows a crash after it
    // took over (replacement, backoff). Shared sockets (`--steering off`):
    // with steering, even a zero probation waits for the old generation's
    // accept queue to be seen empty before the cutover, and a crash within
    // that wait (4 ms after READY=1 in one CI run) is a failure on
    // probation, handed back, not a crash while serving.
    let b = start_httpd(
        &dir,
        &["--notify-access", "all", "--quiet-period", "0", "--probation", "0", "--steering", "off"],
        &fault,
    );
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(dir.join("fault"), "").unwrap();
    std::fs::write(dir.join("crash"), "").unwrap();
    let cpu0 = b.cpu();
    let t0 = Instant::now();
    // Generation 2 reports READY=1: the restart itself succeeds.
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    b.wait_log("generation 2 exited with status 1 while serving");
    // Three replacements fail before READY=1 (a crash loop)...
    poll_until("three failed replacements", WAIT, || (started(&b).len() >= 3).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", b.report_text()));
    wait_gone(first.pid, "generation 1 (drained)");
    // ...then the fault is gone and the next one serves.
    std::fs::remove_file(dir.join("fault")).unwrap();
    let s = b.wait_status("a replacement active", |s| s.generations.iter().any(|g| g.state == "active"));
    let gap = t0.elapsed();
    let cpu = b.cpu().saturating_sub(cpu0);
    let active = s.generations.iter().find(|g| g.state == "active").unwrap().clone();
    let last = active.generation.to_string();
    eprintln!("crash gap: {gap:?}, {cpu:?} of Baton's CPU; generation {last} serves");
    clients.wait_ok(100, "after the replacement");
    assert_eq!(b.http().pid, active.pid);
    assert!(s.crash_restarts >= 4, "{s:?}");

    // Backoff between the failed replacements: 200 ms, then 400 ms, ...
    // (lower bounds: a slow machine only adds to them).
    let starts: Vec<u64> =
        b.lines().iter().filter(|l| l.text.starts_with("start pid=")).map(|l| l.at_us.unwrap()).collect();
    for (k, pair) in starts.windows(2).enumerate() {
        let want = 100_000u64 << (k + 1);
        assert!(
            pair[1] - pair[0] >= want,
            "attempt {} came {} µs after the previous, want >= {want}",
            k + 2,
            pair[1] - pair[0]
        );
    }
    // No busy loop while waiting (CPU time only counts time on a CPU: a
    // busy machine cannot inflate it).
    assert!(cpu < gap / 2, "Baton used {cpu:?} of CPU in {gap:?}: busy loop?");

    let (served, reports) = clients.finish("a generation crashing right after READY=1");
    // Requests sent while nothing was serving were queued, then answered
    // (none refused: the socket stayed open), by the replacement only.
    assert_eq!(served, generations(&["1", &last]));
    let gap_requests: u64 = reports.iter().map(|r| r.window(t0, t0 + gap).requests).sum();
    assert!(gap_requests > 0, "no request was sent during the gap");
}

// ---- health checks ----------------------------------------------------------

#[test]
fn passing_health_check_cuts_over_and_sees_the_new_generations_pid() {
    let dir = scratch("health-ok");
    let report = dir.join("report");
    let health = format!("echo \"health pid=$BATON_PID gen=$BATON_GENERATION\" >> {}", report.display());
    let b = start_probe(&dir, &["--health-cmd", &health], &[]);
    let pid1 = b.active_pid();
    assert!(b.report_text().contains(&format!("health pid={pid1} gen=1\n")), "{}", b.report_text());

    let load = ProbeClients::start(b.port(), 3, "");
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    let pid2 = b.active_pid();
    assert_ne!(pid1, pid2);
    assert_all_served(load, "restart with a passing health check");
    // Generation 1 may take a connection or two before handling its SIGTERM.
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid2}"));

    // The check ran for the new generation, after its READY=1 and before the
    // old generation was asked to stop.
    let stopped = b.wait_line(pid1, "signal-received");
    let lines = b.lines();
    let pos = |pred: &dyn Fn(&Line) -> bool| lines.iter().position(pred);
    let ready2 = pos(&|l| l.pid == Some(pid2) && l.text == "ready").expect("generation 2 ready");
    let health2 = pos(&|l| l.text == format!("health pid={pid2} gen=2")).expect("health check of generation 2");
    let signal1 = pos(&|l| l.pid == Some(pid1) && l.text == stopped.text).unwrap();
    assert!(ready2 < health2 && health2 < signal1, "wrong order:\n{}", b.report_text());
}

/// The app answers during its health check (it has the shared socket from
/// the start, like most apps), so a generation failing its check holds
/// connections: Baton asks it to stop (SIGTERM), it finishes its requests
/// and hands its idle keep-alive connections over, which Baton moves to the
/// generation that keeps serving.
#[test]
fn failing_health_check_keeps_the_old_generation_serving() {
    let dir = scratch("health-fail");
    let report = dir.join("report");
    let flag = dir.join("unhealthy");
    // The check takes a while, so that the new generation serves for some
    // time before it fails.
    let health = format!(
        "echo \"health pid=$BATON_PID gen=$BATON_GENERATION\" >> {}; sleep 0.5; test ! -e {}",
        report.display(),
        flag.display()
    );
    let b = start_httpd(&dir, &["--health-cmd", &health], "");
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(&flag, "").unwrap();
    let mut failed = Vec::new();
    for attempt in [2, 3] {
        let out = b.cli(&["restart"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("generation {attempt} health check exited with status 1")), "{err}");
        assert!(err.contains("health check exited with status 1"), "{err}");
        assert!(err.contains("generation 1 keeps serving"), "{err}");
        let text = b.report_text();
        let pid: u32 = text
            .lines()
            .find_map(|l| l.strip_prefix("health pid=")?.strip_suffix(&format!(" gen={attempt}"))?.parse().ok())
            .unwrap_or_else(|| panic!("no health check of generation {attempt}:\n{text}"));
        failed.push(pid);
        clients.wait_ok(100, "after a failed health check");
        assert_eq!(b.http(), first, "generation 1 no longer answers");
    }
    // The unhealthy generations were stopped and are gone.
    for pid in &failed {
        wait_gone(*pid, "an unhealthy generation");
    }
    let s = b.wait_status("only generation 1 left", |s| s.generations.len() == 1);
    assert_eq!((s.generations[0].generation, s.generations[0].state.as_str()), (1, "active"));
    assert_eq!(s.generations[0].pid, first.pid);
    assert!(s.last_failure.as_deref().unwrap_or("").contains("health check"), "{s:?}");
    assert!(!b.log().contains("generation 1 draining"), "generation 1 was asked to drain:\n{}", b.log());

    // Healthy again: a passing check cuts over, under the same load.
    std::fs::remove_file(&flag).unwrap();
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1 && s.generations[0].generation == 4);
    clients.wait_ok(100, "after the passing restart");
    let (served, _) = clients.finish("failing health checks, then a passing one");
    // The unhealthy generations answered while they were being checked:
    // what they held was finished or handed over, not dropped.
    eprintln!("generations that answered: {served:?}");
    assert!(served.contains("1") && served.contains("4"), "{served:?}");
    assert!(served.is_subset(&generations(&["1", "2", "3", "4"])), "{served:?}");
}

#[test]
fn hanging_health_check_is_killed_at_the_ready_timeout() {
    let dir = scratch("health-hang");
    let report = dir.join("report");
    let flag = dir.join("hang");
    // `$$` is the shell's pid, kept by `exec sleep`.
    let health = format!(
        "echo \"health-sh pid=$$ gen=$BATON_GENERATION\" >> {}; if [ -e {} ]; then exec sleep 1000; fi",
        report.display(),
        flag.display()
    );
    let b = start_httpd(&dir, &["--health-cmd", &health, "--ready-timeout", "2s"], "");
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(&flag, "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // The generation did send READY=1: the failure is its health check.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("health check did not finish within the ready timeout"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    let text = b.report_text();
    let check: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("health-sh pid=")?.strip_suffix(" gen=2")?.parse().ok())
        .unwrap_or_else(|| panic!("no health check of generation 2:\n{text}"));
    wait_gone(check, "the hanging health check");
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    clients.wait_ok(100, "after the failed restart");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
    let (served, _) = clients.finish("restart with a hanging health check");
    assert!(served.is_subset(&generations(&["1", "2"])) && served.contains("1"), "{served:?}");
}

/// A generation that dies while its health check hangs: the check (in a
/// process group of its own) is killed with it, not left running once the
/// generation is gone (found by reading the shell while widening the
/// supervisor core's simulation; before, it ran until it ended by itself,
/// here for 1000 s, long after the 120 s ready timeout no longer applied).
#[test]
fn a_hanging_health_check_dies_with_its_generation() {
    let dir = scratch("health-orphan");
    let health = format!(
        "if [ -e {dir}/fault ]; then echo $$ > {dir}/check-$BATON_GENERATION; exec sleep 1000; fi",
        dir = dir.display()
    );
    // The faulty generation sends READY=1, waits until its check has
    // written its pid, then dies.
    let b = start_httpd(
        &dir,
        &["--notify-access", "all", "--health-cmd", &health, "--ready-timeout", "120s"],
        r#"if [ -e "$T_DIR/fault" ]; then "$T_BATON" notify --ready || exit 2;
           while [ ! -s "$T_DIR/check-$BATON_GENERATION" ]; do sleep 0.05; done; exit 1; fi"#,
    );
    let first = b.http();
    std::fs::write(dir.join("fault"), "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("generation 2 exited with status 1 after READY=1, during its health check"), "{err}");
    let check: u32 = std::fs::read_to_string(dir.join("check-2")).unwrap().trim().parse().unwrap();
    wait_gone(check, "the health check of a generation that died");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
}

/// Crashing right after READY=1 while the health check runs is a failed
/// start: the old generation was not asked to drain yet (that happens only
/// once the check passes), so it keeps serving.
#[test]
fn new_generation_crashing_during_its_health_check_leaves_the_old_one_serving() {
    let dir = scratch("health-crash");
    // The check takes a second; the faulty generation sends READY=1 (and
    // waits until Baton processed it: `baton notify` ends with a barrier),
    // then dies without ever accepting a connection.
    let b = start_httpd(
        &dir,
        &["--notify-access", "all", "--health-cmd", "sleep 1"],
        r#"if [ -e "$T_DIR/fault" ]; then "$T_BATON" notify --ready && exit 1; exit 2; fi"#,
    );
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(dir.join("fault"), "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    // Exit status 1: its READY=1 went through (2 would mean `baton notify`
    // failed).
    assert!(err.contains("generation 2 exited with status 1 after READY=1, during its health check"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    assert!(b.log().contains("generation 2 started"), "{}", b.log());
    assert!(!b.log().contains("generation 1 draining"), "generation 1 was asked to drain:\n{}", b.log());
    clients.wait_ok(100, "after the crash");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
    let s = b.status();
    assert_eq!((s.generations.len(), s.generations[0].generation, s.restarts, s.crash_restarts), (1, 1, 0, 0));

    std::fs::remove_file(dir.join("fault")).unwrap();
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1 && s.generations[0].generation == 3);
    clients.wait_ok(100, "after the good restart");
    let (served, _) = clients.finish("a generation crashing during its health check");
    assert_eq!(served, generations(&["1", "3"]));
}

// ---- watchdog ---------------------------------------------------------------

#[test]
fn watchdog_without_pings_aborts_and_replaces_the_generation() {
    let dir = scratch("watchdog-silent");
    // The probe does not ping (no --watchdog), though WATCHDOG_USEC asks it to.
    let b = start_probe(&dir, &["--watchdog", "1s"], &[]);
    let pid1 = b.status().generations[0].pid;
    let s = b.wait_status("a later generation active", |s| {
        s.generations.iter().any(|g| g.generation >= 2 && g.state == "active")
    });
    b.wait_log("generation 1 killed by SIGABRT");
    wait_gone(pid1, "the hung generation");
    assert!(s.crash_restarts >= 1, "{s:?}");
    let failure = b.status().last_failure.unwrap_or_default();
    assert!(failure.contains("watchdog timeout"), "{failure}");

    // Aborted no earlier than one watchdog period after it became active
    // (which was after it reported ready).
    let lines = b.lines();
    let ready1 = lines.iter().find(|l| l.pid == Some(pid1) && l.text == "ready").unwrap().at_us.unwrap();
    let pid_of_2 = |s: &Status| s.generations.iter().find(|g| g.generation == 2).map(|g| g.pid);
    let start2 = b
        .lines()
        .iter()
        .filter(|l| l.text.starts_with("start pid=") && l.pid != Some(pid1))
        .map(|l| l.at_us.unwrap())
        .min()
        .unwrap_or_else(|| panic!("no second start: {:?}", pid_of_2(&s)));
    assert!(start2 - ready1 >= 1_000_000, "replaced {} µs after READY=1, before the 1 s watchdog", start2 - ready1);

    // The replacement serves.
    let answer = ask(b.port()).unwrap();
    let server: u32 = answer.strip_prefix("http ").unwrap().parse().unwrap();
    assert_ne!(server, pid1);
}

/// A new generation that sends `WATCHDOG=trigger` before READY=1 fails its
/// start at once (SIGABRT, as systemd does), and the old one keeps serving.
/// Found while moving the generation table into the pure core: Baton used
/// to drain it and keep waiting for a READY=1 that could no longer count,
/// so `baton restart` never returned and every later restart queued
/// behind it.
#[test]
fn watchdog_trigger_before_ready_fails_the_start_and_the_old_one_keeps_serving() {
    let dir = scratch("watchdog-trigger-starting");
    let fault = r#"if [ -e "$T_DIR/fault" ]; then exec "$T_BATON" notify WATCHDOG=trigger; fi"#;
    let b = start_httpd(&dir, &[], fault);
    let first = b.http();
    let clients = Clients::start(b.port());

    std::fs::write(dir.join("fault"), "").unwrap();
    let t0 = Instant::now();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}\nlog:\n{}", b.log());
    assert!(t0.elapsed() < Duration::from_secs(30), "the failed restart took {:?}", t0.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("generation 2 sent WATCHDOG=trigger before it took over"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    clients.wait_ok(100, "after the failed restart");
    assert_eq!(b.http(), first, "generation 1 no longer answers");
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1 && s.generations[0].generation == 1);
    let s = b.status();
    assert!(s.last_failure.as_deref().unwrap_or("").contains("WATCHDOG=trigger"), "{s:?}");
    assert_eq!((s.restarts, s.crash_restarts), (0, 0), "{s:?}");

    // The next restart is not stuck behind it.
    std::fs::remove_file(dir.join("fault")).unwrap();
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 3 alone", |s| s.generations.len() == 1 && s.generations[0].generation == 3);
    let (served, _) = clients.finish("a generation triggering its watchdog before READY=1");
    assert_eq!(served, generations(&["1", "3"]));
}

#[test]
fn watchdog_pings_keep_the_generation_over_several_periods() {
    let dir = scratch("watchdog-ping");
    // WATCHDOG_USEC=2s: the probe pings every second.
    let b = start_probe(&dir, &["--watchdog", "2s"], &["--watchdog"]);
    let pid1 = b.active_pid();
    b.wait_line(pid1, "watchdog usec=2000000");
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let s = b.status();
        assert!(
            s.generations.len() == 1 && s.generations[0].pid == pid1 && s.crash_restarts == 0,
            "a pinging generation was replaced: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!b.log().contains("watchdog timeout"), "{}", b.log());
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid1}"));
}

// ---- crashes ----------------------------------------------------------------

/// The active generation SIGKILLed: no client load here, because a killed
/// process loses the connections it had accepted whatever the supervisor
/// does; one client queued during the gap shows that the socket stayed
/// open. The same guarantee under load, with a generation that dies without
/// holding connections, is
/// `new_generation_crashing_right_after_ready_is_replaced_and_no_request_fails`.
#[test]
fn killed_generation_is_replaced_with_backoff_and_the_socket_stays_open() {
    let dir = scratch("crash");
    let fail = dir.join("fail");
    let b = start_probe(&dir, &[], &["--fail-if-exists", fail.to_str().unwrap()]);
    let pid1 = b.active_pid();

    // The first replacements fail before READY=1, making a long gap.
    std::fs::write(&fail, "").unwrap();
    let killed_at = baton_sd::monotonic_usec();
    signal(pid1, Signal::KILL);
    wait_gone(pid1, "the killed generation");

    // A client connecting during the gap is queued on the listening socket
    // that Baton keeps open, not refused.
    let (tx, rx) = std::sync::mpsc::channel();
    let port = b.port();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect during the gap: {e}"))?;
        let _ = tx.send(baton_sd::monotonic_usec());
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(out.trim().to_owned())
    });
    let Ok(connected_at) = rx.recv_timeout(WAIT) else { panic!("client: {:?}", client.join()) };
    poll_until("two failed replacements", WAIT, || {
        (b.report_text().matches("failing before ready").count() >= 2).then_some(())
    })
    .unwrap();
    std::fs::remove_file(&fail).unwrap();

    let answer = client.join().unwrap().expect("the queued client is served");
    let s = b.wait_status("a replacement active", |s| s.generations.iter().any(|g| g.state == "active"));
    let active = s.generations.iter().find(|g| g.state == "active").unwrap();
    assert_eq!(answer, format!("http {}", active.pid));
    assert!(s.crash_restarts >= 3, "{s:?}");
    assert!(b.log().contains("generation 1 killed by SIGKILL while serving"), "{}", b.log());

    // Backoff: 100 ms before the first replacement, then doubling after each
    // failed one (lower bounds: a slow machine only adds to them).
    let starts: Vec<u64> = b
        .lines()
        .iter()
        .filter(|l| l.text.starts_with("start pid=") && l.pid != Some(pid1))
        .map(|l| l.at_us.unwrap())
        .collect();
    assert!(starts.len() >= 3, "{}", b.report_text());
    assert!(starts[0] - killed_at >= 100_000, "first replacement {} µs after the kill", starts[0] - killed_at);
    for (k, pair) in starts.windows(2).enumerate() {
        let want = 100_000u64 << (k + 1);
        assert!(
            pair[1] - pair[0] >= want,
            "attempt {} came {} µs after the previous, want >= {want}",
            k + 2,
            pair[1] - pair[0]
        );
    }
    assert!(connected_at < *starts.last().unwrap(), "the client connected only once the replacement was up");
}

/// CPU time (user + system) of a reaped child and its reaped descendants.
fn wait4(pid: u32) -> (ExitStatus, Duration) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut status = 0;
        // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are valid for writes; WNOHANG keeps it
        // from blocking.
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid as i32 {
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            return (ExitStatus::from_raw(status), tv(usage.ru_utime) + tv(usage.ru_stime));
        }
        assert!(Instant::now() < deadline, "baton run did not give up within 90 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A first generation that never starts: there is nothing to serve (so no
/// load), and after the burst Baton gives up and exits, closing the socket
/// by design. The crash loop with sockets held under load is in
/// `new_generation_crashing_right_after_ready_is_replaced_and_no_request_fails`.
#[test]
fn crash_loop_gives_up_with_exit_1_without_busy_looping() {
    let dir = scratch("crash-loop");
    let fail = dir.join("fail");
    std::fs::write(&fail, "").unwrap();
    let t0 = Instant::now();
    let mut b = launch(
        &dir,
        &["--restart-burst", "3", "--restart-interval", "60s"],
        &probe_command(&dir.join("report"), &["--fail-if-exists", fail.to_str().unwrap()]),
    );
    let (status, cpu) = wait4(b.pid());
    let wall = t0.elapsed();
    b.reaped_by_the_test();
    eprintln!("crash loop: gave up after {wall:?}, {cpu:?} CPU (baton and its generations)");
    assert_eq!(status.code(), Some(1), "{status:?}\n{}", b.log());
    assert!(b.log().contains("giving up"), "{}", b.log());
    // The first start and 3 restarts (the burst), then it gave up.
    let pids = b.probe_pids();
    assert_eq!(pids.len(), 4, "{}", b.report_text());
    // Backoff 100 + 200 + 400 ms between them: no tight loop...
    assert!(wall >= Duration::from_millis(700), "gave up after only {wall:?}");
    // ...and no spinning while waiting: CPU time is a fraction of the wall
    // time (it counts only time on a CPU, so a busy machine cannot inflate
    // it; a busy loop would make it close to the wall time).
    assert!(cpu < wall / 2, "{cpu:?} of CPU in {wall:?}: busy loop?");
    for pid in pids {
        assert!(!alive(pid), "generation {pid} left running");
    }
}

#[test]
fn ready_then_crash_loop_gives_up() {
    let dir = scratch("ready-crash");
    let starts = dir.join("starts");
    // Ready (acknowledged: `baton notify` waits on a barrier), then dies.
    let script = format!("echo start >> {}; \"$0\" notify --ready; exit 1", starts.display());
    let mut b = launch(
        &dir,
        &["--notify-access", "all", "--restart-burst", "2", "--restart-interval", "60s"],
        &[OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(&script), OsStr::new(baton_bin())],
    );
    let status = b.wait_exit();
    assert_eq!(status.code(), Some(1), "{status:?}\n{}", b.log());
    let log = b.log();
    assert!(log.contains("while serving") && log.contains("giving up"), "{log}");
    let count = std::fs::read_to_string(&starts).unwrap().lines().count();
    assert_eq!(count, 3, "the first start and 2 restarts");
}

// ---- stopping ---------------------------------------------------------------

/// A *retiring* generation ignoring SIGTERM. No client load: it keeps
/// accepting until the SIGKILL, which loses whatever it accepted last (the
/// app's fault, not Baton's). A *new* generation ignoring SIGTERM, under
/// load, is `new_generation_hanging_and_ignoring_sigterm_is_killed_at_the_stop_deadline`.
#[test]
fn generation_ignoring_sigterm_is_killed_at_the_stop_timeout() {
    let dir = scratch("ignore-term");
    let b = start_probe(&dir, &["--stop-timeout", "1s"], &["--ignore-sigterm"]);
    let pid1 = b.active_pid();
    let t0 = Instant::now();
    ok(&b.cli(&["restart"]));
    let pid2 = b.active_pid();
    b.wait_line(pid1, "ignoring signal=SIGTERM");
    wait_gone(pid1, "the generation ignoring SIGTERM");
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(1), "killed after {took:?}, before the 1 s stop timeout");
    assert!(b.log().contains("generation 1 still running at the stop deadline; SIGKILL"), "{}", b.log());
    assert!(!b.lines().iter().any(|l| l.pid == Some(pid1) && l.text.starts_with("stopping")), "{}", b.report_text());
    let s = b.wait_status("only generation 2 left", |s| s.generations.len() == 1);
    assert_eq!(s.generations[0].pid, pid2);
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid2}"));
}

#[test]
fn generation_sending_stopping_on_its_own_is_replaced() {
    let dir = scratch("self-stop");
    let b = start_probe(&dir, &[], &["--stop-on-usr1"]);
    let pid1 = b.active_pid();
    let load = ProbeClients::start(b.port(), 3, "");
    signal(pid1, Signal::USR1);
    b.wait_active(2);
    wait_gone(pid1, "the generation that stopped itself");
    assert_all_served(load, "a generation stopping on its own");
    b.wait_line(pid1, "stopping-self");
    assert!(b.wait_line(pid1, "stopping signal=SIGUSR1").text.contains("drained=true"));
    assert!(b.log().contains("generation 1 is stopping on its own"), "{}", b.log());
    let s = b.wait_status("only generation 2 left", |s| s.generations.len() == 1);
    assert_eq!((s.generations[0].generation, s.generations[0].state.as_str()), (2, "active"));
    assert_eq!(ask(b.port()).unwrap(), format!("http {}", s.generations[0].pid));
}

#[test]
fn max_draining_kills_the_oldest_draining_generation() {
    let dir = scratch("max-draining");
    // Draining generations never leave by themselves (they ignore SIGTERM)
    // within the 5 s stop timeout.
    let b = start_probe(&dir, &["--max-draining", "1", "--stop-timeout", "5s"], &["--ignore-sigterm"]);
    let pid1 = b.active_pid();
    ok(&b.cli(&["restart"]));
    let pid2 = b.active_pid();
    b.wait_line(pid1, "ignoring signal=SIGTERM");
    ok(&b.cli(&["restart"]));
    let pid3 = b.active_pid();
    wait_gone(pid1, "the oldest draining generation");
    assert!(b.log().contains("too many draining generations; killing 1"), "{}", b.log());
    let s = b.wait_status("generation 1 reaped", |s| s.generations.len() == 2);
    let states: Vec<(u64, &str)> = s.generations.iter().map(|g| (g.generation, g.state.as_str())).collect();
    assert_eq!(states, [(2, "draining"), (3, "active")], "{s:?}");
    assert!(alive(pid2), "generation 2 is within its limit and must keep draining");
    assert_eq!(ask(b.port()).unwrap().split_whitespace().next(), Some("http"));
    assert!(alive(pid3));
}

/// The draining limit holds after every drain, not only at a cutover: a
/// generation that fails its health check is asked to drain too, and with
/// one generation already draining that is one too many, so the oldest is
/// killed at once (found by the supervisor core's simulation: before, both
/// drained on past the limit until the next cutover, here for the whole
/// 300 s stop timeout).
#[test]
fn max_draining_holds_after_a_failed_start() {
    let dir = scratch("max-draining-failed-start");
    let flag = dir.join("unhealthy");
    let health = format!("test ! -e {}", flag.display());
    let mut b = start_probe(
        &dir,
        &["--max-draining", "1", "--stop-timeout", "300s", "--health-cmd", &health],
        &["--ignore-sigterm"],
    );
    let pid1 = b.active_pid();
    ok(&b.cli(&["restart"]));
    let pid2 = b.active_pid();
    b.wait_line(pid1, "ignoring signal=SIGTERM");
    std::fs::write(&flag, "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // At once, not at a deadline: 10 s is far below the stop timeout.
    poll_until("the oldest draining generation gone", Duration::from_secs(10), || (!alive(pid1)).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));
    assert!(b.log().contains("too many draining generations; killing 1"), "{}", b.log());
    let s = b.wait_status("generation 1 reaped", |s| s.generations.len() == 2);
    let states: Vec<(u64, &str)> = s.generations.iter().map(|g| (g.generation, g.state.as_str())).collect();
    assert_eq!(states, [(2, "active"), (3, "draining")], "{s:?}");
    // Generation 3 ignores SIGTERM and so still answers too.
    assert!(ask(b.port()).unwrap().starts_with("http "));
    // Both ignore SIGTERM for the 300 s stop timeout: end them all now.
    let pid3 = s.generations[1].pid;
    b.kill();
    for pid in [pid2, pid3] {
        signal(pid, Signal::KILL);
        wait_gone(pid, "a generation of the killed baton");
    }
}

// ---- the CLI ----------------------------------------------------------------

#[test]
fn status_json_and_exit_code_3_without_a_baton() {
    let dir = scratch("cli");
    // Nothing runs at the control path yet: exit code 3.
    for cmd in ["restart", "status", "stop"] {
        let out = cli_at(baton_bin().as_ref(), &dir.join("baton.sock"), &[cmd]);
        assert_eq!(out.status.code(), Some(3), "baton {cmd} with no baton: {out:?}");
    }

    let b = start_probe(&dir, &[], &[]);
    let pid1 = b.active_pid();
    let out = ok(&b.cli(&["status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["result"], "status", "{json}");
    assert_eq!(json["generations"][0]["generation"], 1, "{json}");
    assert_eq!(json["generations"][0]["pid"], pid1, "{json}");
    assert_eq!(json["generations"][0]["state"], "active", "{json}");
    assert_eq!(json["sockets"][0]["name"], "http", "{json}");
    assert!(json["sockets"][0]["local"].as_str().unwrap().ends_with(&format!(":{}", b.port())), "{json}");
    let parsed: Response = serde_json::from_str(&out).unwrap();
    assert!(matches!(parsed, Response::Status(s) if s.generations.len() == 1));
}

#[test]
fn status_reports_the_policy() {
    let dir = scratch("policy");
    let b = start_probe(&dir, &["--max-draining", "2", "--stop-timeout", "7s", "--notify-access", "all"], &[]);
    let out = ok(&b.cli(&["status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let policy = &json["policy"];
    assert_eq!(policy["max_draining"], 2, "{json}");
    assert_eq!(policy["stop_timeout"]["secs"], 7, "{json}");
    assert_eq!(policy["notify_access"], "all", "{json}");
    assert_eq!(policy["stop_signal"], 15, "SIGTERM, as its number: {json}");
    // What `baton upgrade` carries is what status reports.
    ok(&b.cli(&["upgrade"]));
    let after: serde_json::Value = serde_json::from_str(&ok(&b.cli(&["status", "--json"]))).unwrap();
    assert_eq!(after["policy"], json["policy"]);
}

/// `baton stop`, then what must hold whatever the CLI printed: every
/// generation asked to stop and gone, `baton run` exited 0, its control
/// socket removed, and exit code 3 from then on. Returns the CLI's output.
fn stop_scenario(test: &str) -> Output {
    let dir = scratch(test);
    let mut b = start_probe(&dir, &[], &[]);
    let pid1 = b.active_pid();
    let load = ProbeClients::start(b.port(), 3, "");
    ok(&b.cli(&["restart"]));
    assert_all_served(load, "restart before stop");
    let out = b.cli(&["stop"]);
    let status = b.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let pid2 = b.lines().iter().rev().find(|l| l.text.starts_with("start pid=")).unwrap().pid.unwrap();
    for pid in [pid1, pid2] {
        assert!(b.wait_line(pid, "stopping signal=Terminate").text.contains("drained=true"));
    }
    for pid in b.probe_pids() {
        assert!(!alive(pid), "probe {pid} left running after baton stop");
    }
    assert!(!b.control().exists(), "the control socket was left behind");
    for cmd in ["restart", "status"] {
        let out = b.cli(&[cmd]);
        assert_eq!(out.status.code(), Some(3), "baton {cmd} after stop: {out:?}");
    }
    out
}

#[test]
fn baton_stop_stops_every_generation_and_baton_run_exits_0() {
    // The CLI's own answer is checked by the test below.
    stop_scenario("stop");
}

#[test]
fn baton_stop_answers_stopped_and_exits_0() {
    let out = stop_scenario("stop-answer");
    let stdout = ok(&out);
    assert!(stdout.contains("stopped"), "{stdout}");
}

#[test]
fn baton_notify_works_from_a_shell_script_app() {
    let dir = scratch("notify-cli");
    let script = "\"$0\" notify --ready --status \"from baton notify $$\" && exec sleep 1000";
    let b = launch(
        &dir,
        &["--notify-access", "all"],
        &[OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(script), OsStr::new(baton_bin())],
    );
    b.wait_active(1);
    let g = &b.status().generations[0];
    assert_eq!(g.status_text.as_deref(), Some(&*format!("from baton notify {}", g.pid)));
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    let g = &b.status().generations.into_iter().find(|g| g.state == "active").unwrap();
    assert_eq!(g.status_text.as_deref(), Some(&*format!("from baton notify {}", g.pid)));

    // Outside a service manager it says so.
    let out = Command::new(baton_bin()).args(["notify", "--ready"]).env_remove("NOTIFY_SOCKET").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOTIFY_SOCKET is not set"), "{out:?}");
}

#[test]
fn mainpid_of_a_process_outside_the_namespace_group_is_ignored() {
    let dir = scratch("mainpid");
    // A valid MAINPID= of a process that is not in the generation: systemd
    // refuses it with a warning and goes on.
    let script = "echo \"app-sh pid=$$\" >> \"$1\"; \"$0\" notify --ready MAINPID=1 && exec sleep 1000";
    let report = dir.join("report");
    let mut b = launch(
        &dir,
        &["--notify-access", "all"],
        &[OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(script), OsStr::new(baton_bin()), report.as_os_str()],
    );
    let survived = poll_until("generation 1 active", Duration::from_secs(10), || {
        if let Some(status) = b.try_exit() {
            return Some(Err(status));
        }
        let s = b.try_status()?;
        s.generations.iter().any(|g| g.state == "active").then_some(Ok(s))
    });
    let s = survived.unwrap().unwrap_or_else(|status| panic!("baton died ({status:?})"));
    assert_ne!(s.generations[0].pid, 1, "{s:?}");
    ok(&b.cli(&["restart"]));
}

// ---- notify abuse -----------------------------------------------------------

/// Parses `abuse sent=N barrier=ok fds-closed=true` and checks it.
fn assert_abuse_line(line: &Line) {
    assert!(
        line.text.starts_with("abuse sent=") && line.text.ends_with("barrier=ok fds-closed=true"),
        "the abuse battery did not go through cleanly: {line:?}"
    );
}

/// Baton's fd count back where it was (or lower: `before` may have caught
/// a control connection of our own status polls, or a retiring generation's
/// output pipe, still closing). A leak never comes back down.
fn assert_fds_settle(b: &Baton, before: usize) {
    let settled =
        poll_until("baton's fd count back", Duration::from_secs(10), || (b.fd_count() <= before).then_some(()));
    let after = b.fd_count();
    eprintln!("baton fds: {before} before, {after} after the abuse");
    settled.unwrap_or_else(|e| {
        let holders: Vec<String> =
            b.fd_targets().iter().filter(|t| t.starts_with("pipe:")).map(|t| holders(t)).collect();
        panic!("{e}: {before} before, {after} after: {:?}\nother holders of its pipes: {holders:?}", b.fd_targets())
    });
}

/// The processes (pid and command line) with an fd open on `target` (as
/// `readlink /proc/PID/fd/N` shows it), for failure messages.
fn holders(target: &str) -> String {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_str() == Some(target))) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push(format!("{pid} {}", String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    format!("{target}: {found:?}")
}

#[test]
fn notify_abuse_from_strangers_and_from_the_main_process_changes_nothing() {
    let dir = scratch("abuse-main");
    // Every generation sends the battery right after READY=1.
    let b = start_probe(&dir, &[], &["--abuse"]);
    let pid1 = b.active_pid();
    assert_abuse_line(&b.wait_line(pid1, "abuse"));
    let s = b.status();
    // Malformed STOPPING=1 did not retire it, FDSTORE=1 without fds stored
    // nothing, and the valid STATUS= that followed was taken.
    assert_eq!((s.generations.len(), s.crash_restarts, s.restarts, s.fdstore), (1, 0, 0, 0), "{s:?}");
    assert_eq!(s.generations[0].status_text.as_deref(), Some(&*format!("abuse done by {pid1}")));

    // Warm up lazily created fds, then count.
    ok(&b.cli(&["restart"]));
    let pid2 = b.active_pid();
    assert_abuse_line(&b.wait_line(pid2, "abuse"));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    let before = b.fd_count();

    // Processes outside any generation: refused, fds closed.
    let notify_socket = b.control().with_extension("notify");
    let load = ProbeClients::start(b.port(), 3, "");
    for _ in 0..2 {
        let out = Command::new(probe_bin())
            .args(["--abuse-only", "--timestamps", "--report"])
            .arg(b.report_path())
            .env("NOTIFY_SOCKET", &notify_socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let strangers: Vec<Line> = b.lines().into_iter().filter(|l| l.text.starts_with("abuse")).skip(2).collect();
    assert_eq!(strangers.len(), 2, "{}", b.report_text());
    strangers.iter().for_each(assert_abuse_line);
    let s = b.status();
    assert_eq!((s.generations.len(), s.crash_restarts, s.restarts, s.fdstore), (1, 0, 1, 0), "{s:?}");
    // A stranger's (valid) STATUS= was not taken either.
    assert_eq!(s.generations[0].status_text.as_deref(), Some(&*format!("abuse done by {pid2}")));
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid2}"));

    // And Baton still works: a restart (with more abuse from generation 3).
    ok(&b.cli(&["restart"]));
    let pid3 = b.active_pid();
    assert_abuse_line(&b.wait_line(pid3, "abuse"));
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    assert_all_served(load, "notify abuse");
    let s = b.status();
    assert_eq!((s.crash_restarts, s.restarts, s.fdstore), (0, 2, 0), "{s:?}");
    assert_fds_settle(&b, before);
    let log = b.log();
    for needle in ["notify-refused", "dropped", "closing 3 fd(s) sent without FDSTORE=1", "closing 250 fd(s)"] {
        assert!(log.contains(needle), "{needle:?} not in the log");
    }
}

#[test]
fn notify_abuse_from_a_helper_inside_a_starting_generation_changes_nothing() {
    let dir = scratch("abuse-helper");
    let report = dir.join("report");
    let gate = dir.join("gate");
    std::fs::write(&gate, "").unwrap();
    // A helper in the generation's process group sends the battery while the
    // generation is starting; then (once the gate is gone) the shell becomes
    // the real app.
    let script = "\"$0\" --abuse-only --timestamps --report \"$1\"; \
                  while [ -e \"$2\" ]; do sleep 0.05; done; \
                  exec \"$0\" --serve http --timestamps --report \"$1\"";
    let probe = probe_bin();
    let b = launch(
        &dir,
        &["--notify-access", "all"],
        &[
            OsStr::new("/bin/sh"),
            OsStr::new("-c"),
            OsStr::new(script),
            probe.as_os_str(),
            report.as_os_str(),
            gate.as_os_str(),
        ],
    );
    let helper =
        poll_until("the helper's battery", WAIT, || b.lines().into_iter().find(|l| l.text.starts_with("abuse")))
            .unwrap_or_else(|e| panic!("{e}\n{}", b.report_text()));
    assert_abuse_line(&helper);
    // Not made ready by a malformed READY=1, but a group member's valid
    // STATUS= counts (--notify-access all).
    let s = b.status();
    assert_eq!(s.generations.len(), 1, "{s:?}");
    assert_eq!(s.generations[0].state, "starting", "{s:?}");
    assert_eq!(s.generations[0].status_text.as_deref(), Some(&*format!("abuse done by {}", helper.pid.unwrap())));

    std::fs::remove_file(&gate).unwrap();
    b.wait_active(1);
    let pid1 = b.active_pid();
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid1}"));
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    let before = b.fd_count();

    let load = ProbeClients::start(b.port(), 3, "");
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    assert_all_served(load, "restart with a helper abusing the notify socket");
    let s = b.status();
    assert_eq!((s.crash_restarts, s.restarts, s.fdstore), (0, 2, 0), "{s:?}");
    assert_eq!(b.lines().iter().filter(|l| l.text.starts_with("abuse")).count(), 3, "{}", b.report_text());
    b.lines().iter().filter(|l| l.text.starts_with("abuse")).for_each(assert_abuse_line);
    assert_fds_settle(&b, before);
}

/// One end of a new Unix socket pair: sent to Baton, while the test keeps the
/// other end to see when Baton closes its copy.
fn socket_pair() -> (OwnedFd, OwnedFd) {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap()
}

/// Whether the other end of `peer` is closed (end-of-file or hang-up),
/// waiting up to `timeout` for it.
fn peer_closed(peer: BorrowedFd<'_>, timeout: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let ts = rustix::time::Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: timeout.subsec_nanos() as i64 };
    let mut pfd = [PollFd::new(&peer, PollFlags::IN)];
    match poll(&mut pfd, Some(&ts)) {
        Ok(0) | Err(_) => false,
        Ok(_) => {
            let flags = rustix::net::RecvFlags::DONTWAIT;
            matches!(rustix::net::recv(peer, &mut [0u8; 1][..], flags), Ok((0, _)) | Err(_))
        }
    }
}

/// Not a test of its own: [`notify_abuse_under_load_is_refused_and_leaks_nothing`]
/// runs this test binary inside a generation (`T_ROLE=notify-helper`, a
/// member of its process group, so `--notify-access all` attributes what it
/// sends to the generation) to send what no well-behaved tool sends, and
/// report what became of the fds. Without `T_ROLE` it does nothing.
#[test]
fn notify_abuse_helper() {
    if std::env::var_os("T_ROLE").as_deref() != Some(OsStr::new("notify-helper")) {
        return;
    }
    let report = PathBuf::from(std::env::var_os("T_DIR").expect("T_DIR")).join("report");
    let line = |text: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&report).unwrap();
        writeln!(f, "helper {text} pid={}", std::process::id()).unwrap();
    };
    // A failure is reported at once rather than left for the test to time
    // out on.
    match std::panic::catch_unwind(send_helper_abuse) {
        Ok(outcome) => line(&outcome),
        Err(panic) => {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            line(&format!("error {}", msg.unwrap_or_default().replace('\n', " ")));
        }
    }
}

/// [`notify_abuse_helper`]'s datagrams; returns its report line.
fn send_helper_abuse() -> String {
    let n = baton_sd::Notifier::from_env().unwrap().expect("NOTIFY_SOCKET");
    let wait = Duration::from_secs(10);

    // Barrier misuse. BARRIER=1 alone with one fd that is not a pipe: a
    // socket, then a memfd. Baton closes whatever it is (the close is the
    // acknowledgement), like systemd.
    let (sent, peer) = socket_pair();
    n.send_raw(b"BARRIER=1", &[sent.as_fd()]).unwrap();
    drop(sent);
    let socket_closed = peer_closed(peer.as_fd(), wait);
    let memfd = rustix::fs::memfd_create("barrier", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    n.send_raw(b"BARRIER=1", &[memfd.as_fd()]).unwrap();
    // BARRIER=1 with other fields (FDSTORE=1) and a socket: refused as a
    // whole, nothing stored, the fd closed.
    let (sent, misuse_peer) = socket_pair();
    n.send_raw(b"BARRIER=1\nFDSTORE=1\nFDNAME=barrier", &[sent.as_fd()]).unwrap();
    drop(sent);
    let misuse_closed = peer_closed(misuse_peer.as_fd(), wait);
    // BARRIER=1 with two fds of different kinds: refused, both closed.
    let (sent, two_peer) = socket_pair();
    n.send_raw(b"BARRIER=1", &[sent.as_fd(), memfd.as_fd()]).unwrap();
    drop(sent);
    let two_closed = peer_closed(two_peer.as_fd(), wait);

    // Too many fds for the store (--fdstore-max 8): 200 sockets at once.
    // Baton keeps 8 and closes the rest at once.
    let pairs: Vec<(OwnedFd, OwnedFd)> = (0..200).map(|_| socket_pair()).collect();
    let fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|(s, _)| s.as_fd()).collect();
    n.send_raw(b"FDSTORE=1\nFDNAME=overflow", &fds).unwrap();
    drop(fds);
    let peers: Vec<OwnedFd> = pairs.into_iter().map(|(_, p)| p).collect();
    // Everything sent before a barrier has been processed when it returns.
    n.barrier(wait).unwrap();
    let closed = peers.iter().filter(|p| peer_closed(p.as_fd(), Duration::ZERO)).count();
    n.notify(&[baton_sd::NotifyState::Status("helper done")]).unwrap();
    // Exiting closes the peers of the 8 stored sockets: Baton sees them hang
    // up and drops them from the store.
    format!(
        "done barrier-socket-closed={socket_closed} barrier-misuse-closed={misuse_closed} \
         barrier-two-closed={two_closed} overflow-closed={closed}"
    )
}

/// Every kind of notify abuse while a generation serves under load:
/// unrelated processes (the probe's battery, twice), a datagram whose
/// control data the kernel truncates, and members of the active
/// generation's own process group sending the probe's battery (oversized,
/// NUL bytes, garbage, 250 fds without FDSTORE=1, `MAINPID=` games, barrier
/// misuse) and [`notify_abuse_helper`]'s (BARRIER=1 with non-pipe fds, with
/// other fields, with two fds; more fds than the store holds). All refused
/// or bounded, every fd closed, Baton's fd count back where it was, the
/// generation untouched, and no request failed.
#[test]
fn notify_abuse_under_load_is_refused_and_leaks_nothing() {
    let dir = scratch("abuse-load");
    // Each generation starts two group members waiting for its gate file;
    // `exec` keeps their pids (the probe's parent is then the main process,
    // so its `MAINPID=<parent>` changes nothing).
    let gate = r#"while [ ! -e "$T_DIR/gate-$BATON_GENERATION" ]; do sleep 0.1; done"#;
    let fault = format!(
        r#"({gate}; exec "$T_PROBE" --abuse-only --timestamps --report "$T_DIR/report") &
({gate}; T_ROLE=notify-helper exec "$T_SELF" --exact notify_abuse_helper --nocapture --test-threads=1) &"#
    );
    let b = start_httpd(&dir, &["--notify-access", "all", "--fdstore-max", "8"], &fault);
    let abuse_lines = || -> Vec<Line> { b.lines().into_iter().filter(|l| l.text.starts_with("abuse")).collect() };
    let helper_lines = || -> Vec<Line> {
        let lines: Vec<Line> = b.lines().into_iter().filter(|l| l.text.starts_with("helper ")).collect();
        if let Some(error) = lines.iter().find(|l| l.text.starts_with("helper error")) {
            panic!("the helper failed: {}", error.text);
        }
        lines
    };
    // Warm up lazily created fds (the store's epoll instance is created for
    // the first polled entry): generation 1 gets the same abuse first.
    std::fs::write(dir.join("gate-1"), "").unwrap();
    poll_until("generation 1's abuse", WAIT, || (helper_lines().len() == 1 && abuse_lines().len() == 1).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", b.report_text()));
    b.wait_status("the store empty again", |s| s.fdstore == 0);
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1 && s.generations[0].generation == 2);
    let serving = b.http();
    let before = b.fd_count();
    let clients = Clients::start(b.port());

    // Unrelated processes: refused, their fds closed.
    let notify_socket = b.control().with_extension("notify");
    for _ in 0..2 {
        let out = Command::new(probe_bin())
            .args(["--abuse-only", "--timestamps", "--report"])
            .arg(b.report_path())
            .env("NOTIFY_SOCKET", &notify_socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let strangers = abuse_lines();
    assert_eq!(strangers.len(), 3, "{}", b.report_text());
    strangers.iter().for_each(assert_abuse_line);

    // Truncated control data: with Baton's fd limit lowered, the kernel can
    // install only some of 200 fds and flags MSG_CTRUNC. Baton must close
    // the ones that arrived and drop the datagram.
    let baton = b.pid() as libc::pid_t;
    let nofile = |new: Option<libc::rlimit>| {
        let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let new_ptr = new.as_ref().map_or(std::ptr::null(), |n| n as *const libc::rlimit);
        // SAFETY: `new_ptr` is null or points to a live rlimit, `old` is
        // valid for writes; prlimit only reads and writes those.
        let r = unsafe { libc::prlimit(baton, libc::RLIMIT_NOFILE, new_ptr, &mut old) };
        assert_eq!(r, 0, "prlimit on baton: {}", std::io::Error::last_os_error());
        old
    };
    // Only the soft limit is lowered (the hard one stays), so no privilege
    // is needed and it can be put back.
    let limit = nofile(None);
    nofile(Some(libc::rlimit { rlim_cur: b.fd_count() as libc::rlim_t + 8, rlim_max: limit.rlim_max }));
    let pairs: Vec<(OwnedFd, OwnedFd)> = (0..200).map(|_| socket_pair()).collect();
    let fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|(s, _)| s.as_fd()).collect();
    let stranger = baton_sd::Notifier::new(notify_socket.to_str().unwrap()).unwrap();
    stranger.send_raw(b"STATUS=truncated", &fds).unwrap();
    drop(fds);
    let truncated = poll_until("the truncated datagram dropped", WAIT, || {
        b.log().contains("its control data was truncated").then_some(())
    });
    nofile(Some(limit));
    truncated.unwrap_or_else(|e| panic!("{e}"));
    let peers: Vec<OwnedFd> = pairs.into_iter().map(|(_, p)| p).collect();
    let open = peers.iter().filter(|p| !peer_closed(p.as_fd(), Duration::from_secs(5))).count();
    assert_eq!(open, 0, "{open} of the fds of the truncated datagram are still open in baton");
    drop(peers);

    // The generation's own process group.
    let s = b.status();
    assert_eq!(s.fdstore, 0, "{s:?}");
    std::fs::write(dir.join("gate-2"), "").unwrap();
    poll_until("generation 2's abuse", WAIT, || (helper_lines().len() == 2 && abuse_lines().len() == 4).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", b.report_text()));
    for helper in helper_lines() {
        assert_eq!(
            helper.text.rsplit_once(" pid=").map_or(&*helper.text, |(t, _)| t),
            "helper done barrier-socket-closed=true barrier-misuse-closed=true barrier-two-closed=true \
             overflow-closed=192",
            "{}",
            b.report_text()
        );
    }
    abuse_lines().iter().for_each(assert_abuse_line);
    // The 8 stored sockets hung up when the helper exited: dropped.
    b.wait_status("the store empty again", |s| s.fdstore == 0);
    let s = b.status();
    assert_eq!((s.generations.len(), s.restarts, s.crash_restarts), (1, 1, 0), "{s:?}");
    assert_eq!((s.generations[0].pid, s.generations[0].state.as_str()), (serving.pid, "active"), "{s:?}");
    clients.wait_ok(100, "after the abuse");
    assert_eq!(b.http(), serving, "generation 2 no longer answers");

    // And Baton still works: a restart under the same load.
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1 && s.generations[0].generation == 3);
    clients.wait_ok(100, "after the restart");
    let (served, _) = clients.finish("notify abuse");
    assert_eq!(served, generations(&["2", "3"]));
    assert_fds_settle(&b, before);
    let log = b.log();
    for needle in [
        "notify-refused",
        "BARRIER=1 must come alone with exactly one fd",
        "closing 250 fd(s)",
        "fdstore-full",
        "its control data was truncated",
    ] {
        assert!(log.contains(needle), "{needle:?} not in the log");
    }
}
