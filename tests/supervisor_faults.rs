//! `baton run` against misbehaving apps, with real processes and sockets:
//! failing and hanging health checks, watchdog expiry, crashes and crash
//! loops, generations that ignore SIGTERM or stop on their own, the
//! draining limit, the CLI's exit codes, and abuse of the notify socket.
//!
//! Wherever the fault leaves an old generation in charge, the test checks
//! that it kept serving and that no client request failed meanwhile. No
//! root needed: Baton's control and notify sockets live in a private
//! temporary directory. Timing assertions are lower bounds (a slow machine
//! only makes them truer) or generous upper bounds.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use baton::control::{Request, Response, Status};
use baton_testbed::{cargo_bin, poll_until};
use rustix::process::{Pid, Signal};

/// Deadline for anything that should happen "soon": generous, the machine
/// is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(30);

fn scratch(test: &str) -> PathBuf {
    baton_testbed::unique_temp_dir("baton-faults", test)
}

fn probe_bin() -> PathBuf {
    cargo_bin("sd-probe", "baton-sd-probe")
}

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// `CLOCK_MONOTONIC` in µs, the clock of the probe's `--timestamps`.
fn mono_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
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

struct Baton {
    child: Child,
    exited: Option<ExitStatus>,
    dir: PathBuf,
    control: PathBuf,
    port: u16,
    report: PathBuf,
}

impl Baton {
    /// `baton run --control DIR/baton.sock -l http=127.0.0.1:0 ARGS -- APP...`,
    /// returning once Baton has bound its socket (not waiting for the app).
    fn launch(dir: &Path, args: &[&str], app: &[&OsStr]) -> Baton {
        no_core_dumps();
        let control = dir.join("baton.sock");
        let out = dir.join("baton.out");
        let mut cmd = Command::new(baton_bin());
        cmd.arg("run").arg("--control").arg(&control).args(["-l", "http=127.0.0.1:0"]).args(args).arg("--").args(app);
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("baton.log")).unwrap())
            .stdin(Stdio::null())
            .current_dir(dir)
            .env("BATON_LOG", "debug");
        let child = cmd.spawn().expect("spawn baton");
        let mut b = Baton { child, exited: None, dir: dir.to_owned(), control, port: 0, report: dir.join("report") };
        // Baton prints "baton: NAME ADDR" for each socket before starting the app.
        let line = poll_until("baton's socket line", WAIT, || {
            let text = std::fs::read_to_string(&out).ok()?;
            text.lines().find(|l| l.starts_with("baton: http ")).map(str::to_owned)
        })
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", b.log()));
        b.port = line.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {line:?}"));
        b
    }

    /// Baton running `baton-sd-probe --serve http --timestamps --report
    /// DIR/report PROBE_ARGS`, with generation 1 active.
    fn probe(dir: &Path, args: &[&str], probe_args: &[&str]) -> Baton {
        let b = Baton::launch(dir, args, &probe_command(&dir.join("report"), probe_args));
        b.wait_active(1);
        b
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.control, args)
    }

    fn try_status(&self) -> Option<Status> {
        match call(&self.control, Request::Status) {
            Ok(Response::Status(s)) => Some(*s),
            _ => None,
        }
    }

    fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|| panic!("no status from baton\nlog:\n{}", self.log()))
    }

    /// Waits until generation `n` is the active one.
    fn wait_active(&self, n: u64) {
        self.wait_status(&format!("generation {n} active"), |s| {
            s.generations.iter().any(|g| g.generation == n && g.state == "active")
        });
    }

    fn wait_status(&self, what: &str, mut pred: impl FnMut(&Status) -> bool) -> Status {
        poll_until(what, WAIT, || self.try_status().filter(|s| pred(s)))
            .unwrap_or_else(|e| panic!("{e}\nstatus: {:?}\nreport:\n{}", self.try_status(), self.report_text()))
    }

    fn active_pid(&self) -> u32 {
        let s = self.status();
        s.generations.iter().find(|g| g.state == "active").unwrap_or_else(|| panic!("no active generation: {s:?}")).pid
    }

    fn report_text(&self) -> String {
        std::fs::read_to_string(&self.report).unwrap_or_default()
    }

    fn lines(&self) -> Vec<Line> {
        parse_report(&self.report_text())
    }

    /// Waits for a report line of `pid` starting with `prefix`.
    fn wait_line(&self, pid: u32, prefix: &str) -> Line {
        poll_until(&format!("report line {prefix:?} of pid {pid}"), WAIT, || {
            self.lines().into_iter().find(|l| l.pid == Some(pid) && l.text.starts_with(prefix))
        })
        .unwrap_or_else(|e| panic!("{e}\nreport:\n{}", self.report_text()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("baton.log")).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        poll_until(&format!("{needle:?} in baton's log"), WAIT, || self.log().contains(needle).then_some(()))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn baton_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).unwrap().count()
    }

    fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }

    /// Waits for `baton run` to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let status = poll_until("baton run to exit", WAIT, || self.child.try_wait().ok().flatten())
            .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", self.log()));
        self.exited = Some(status);
        status
    }

    /// Every probe pid the report has seen start.
    fn probe_pids(&self) -> Vec<u32> {
        self.lines().iter().filter(|l| l.text.starts_with("start pid=")).filter_map(|l| l.pid).collect()
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            // The notify-abuse tests log thousands of refusals: keep the end.
            let tail = &log[log.len().saturating_sub(20_000)..];
            eprintln!("----- baton's log (tail) -----\n{tail}\n----- probe report -----\n{}", self.report_text());
        }
        if self.exited.is_none() {
            let _ = rustix::process::kill_process(Pid::from_child(&self.child), Signal::TERM);
            let stopped = poll_until("baton to stop", WAIT, || self.child.try_wait().ok().flatten());
            if stopped.is_err() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // A failed test may leave generations behind (e.g. ones ignoring
        // SIGTERM after Baton was SIGKILLed): never leak them.
        for pid in self.probe_pids() {
            let is_probe = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("baton-sd-probe"));
            if is_probe && alive(pid) {
                let _ = rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
            }
        }
        // Shells (health checks, apps) that tests leave in `exec sleep`,
        // reported as `health-sh pid=P` / `app-sh pid=P`.
        for l in self.report_text().lines() {
            let Some(pid) = l.split_once("-sh pid=").and_then(|(_, r)| r.split(' ').next()?.parse::<u32>().ok()) else {
                continue;
            };
            let is_sleep = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep\0"));
            if is_sleep && alive(pid) {
                let _ = rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn probe_command(report: &Path, probe_args: &[&str]) -> Vec<&'static OsStr> {
    // Leaked once per test: the command line lives as long as the test.
    let mut cmd: Vec<OsString> = vec![probe_bin().into(), "--serve".into(), "http".into(), "--timestamps".into()];
    cmd.extend(["--report".into(), report.as_os_str().to_owned()]);
    cmd.extend(probe_args.iter().map(OsString::from));
    cmd.into_iter().map(|s| &*Box::leak(s.into_boxed_os_str())).collect()
}

fn call(control: &Path, request: Request) -> Result<Response, baton::control::ControlError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(baton::control::call(control, &request))
}

fn cli_at(control: &Path, args: &[&str]) -> Output {
    Command::new(baton_bin())
        .args(&args[..1])
        .arg("--control")
        .arg(control)
        .args(&args[1..])
        .output()
        .expect("run baton cli")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One request to the probe: it answers "http PID" and closes.
fn ask(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    if out.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(out.trim().to_owned())
}

/// Clients asking in a loop until stopped; every failure is kept.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..3)
            .map(|_| {
                let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match ask(port) {
                            Ok(_) => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load { stop, served, failures, threads }
    }

    /// Stops the clients and asserts that all was served.
    fn finish(self, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let served = self.served.load(Ordering::Relaxed);
        let failures = self.failures.lock().unwrap();
        eprintln!("{what}: {served} requests served, {} failed", failures.len());
        assert!(served > 0, "{what}: no request was served");
        assert!(
            failures.is_empty(),
            "{what}: {} failed requests: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
}

// ---- health checks ----------------------------------------------------------

#[test]
fn passing_health_check_cuts_over_and_sees_the_new_generations_pid() {
    let dir = scratch("health-ok");
    let report = dir.join("report");
    let health = format!("echo \"health pid=$BATON_PID gen=$BATON_GENERATION\" >> {}", report.display());
    let b = Baton::probe(&dir, &["--health-cmd", &health], &[]);
    let pid1 = b.active_pid();
    assert!(b.report_text().contains(&format!("health pid={pid1} gen=1\n")), "{}", b.report_text());

    let load = Load::start(b.port);
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    let pid2 = b.active_pid();
    assert_ne!(pid1, pid2);
    load.finish("restart with a passing health check");
    // Generation 1 may take a connection or two before handling its SIGTERM.
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    assert_eq!(ask(b.port).unwrap(), format!("http {pid2}"));

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

#[test]
fn failing_health_check_keeps_the_old_generation_serving() {
    let dir = scratch("health-fail");
    let report = dir.join("report");
    let flag = dir.join("unhealthy");
    let health = format!(
        "echo \"health pid=$BATON_PID gen=$BATON_GENERATION\" >> {}; test ! -e {}",
        report.display(),
        flag.display()
    );
    let b = Baton::probe(&dir, &["--health-cmd", &health], &[]);
    let pid1 = b.active_pid();

    std::fs::write(&flag, "").unwrap();
    // (No client load here: the unhealthy generation is SIGKILLed with what
    // it accepted, see `a_failed_generation_is_stopped_gracefully`.)
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("health check exited with status 1"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    assert_eq!(ask(b.port).unwrap(), format!("http {pid1}"));

    // The new generation passed READY=1, failed its check and was killed.
    let text = b.report_text();
    let pid2: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("health pid=")?.strip_suffix(" gen=2")?.parse().ok())
        .unwrap_or_else(|| panic!("no health check of generation 2:\n{text}"));
    assert!(b.lines().iter().any(|l| l.pid == Some(pid2) && l.text == "ready"), "{text}");
    wait_gone(pid2, "the unhealthy generation");
    let s = b.wait_status("only generation 1 left", |s| s.generations.len() == 1);
    assert_eq!((s.generations[0].generation, s.generations[0].state.as_str()), (1, "active"));
    assert!(s.last_failure.as_deref().unwrap_or("").contains("health check"), "{s:?}");

    std::fs::remove_file(&flag).unwrap();
    ok(&b.cli(&["restart"]));
    assert_ne!(b.active_pid(), pid1);
}

#[test]
fn a_failed_generation_is_stopped_gracefully() {
    let dir = scratch("health-fail-load");
    let flag = dir.join("unhealthy");
    let health = format!("test ! -e {}", flag.display());
    // Requests take 300 ms, and the new generation accepts during its 500 ms
    // start-up, as soon as it has the socket (like most apps): it holds some
    // when its check fails.
    let b = Baton::probe(&dir, &["--health-cmd", &health], &["--reply-delay-ms", "300", "--ready-delay-ms", "500"]);
    let pid1 = b.active_pid();
    std::fs::write(&flag, "").unwrap();
    let load = Load::start(b.port);
    for _ in 0..3 {
        let out = b.cli(&["restart"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
    }
    load.finish("failing restarts with slow requests");
    assert_eq!(b.active_pid(), pid1);
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
    let b = Baton::probe(&dir, &["--health-cmd", &health, "--ready-timeout", "2s"], &[]);
    let pid1 = b.active_pid();

    std::fs::write(&flag, "").unwrap();
    let load = Load::start(b.port);
    let out = b.cli(&["restart"]);
    load.finish("restart with a hanging health check");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(ask(b.port).unwrap(), format!("http {pid1}"));
    let text = b.report_text();
    let check: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("health-sh pid=")?.strip_suffix(" gen=2")?.parse().ok())
        .unwrap_or_else(|| panic!("no health check of generation 2:\n{text}"));
    wait_gone(check, "the hanging health check");
    // The generation did send READY=1: the failure is its health check.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("health check"), "the failure should name the health check: {err}");
}

// ---- watchdog ---------------------------------------------------------------

#[test]
fn watchdog_without_pings_aborts_and_replaces_the_generation() {
    let dir = scratch("watchdog-silent");
    // The probe does not ping (no --watchdog), though WATCHDOG_USEC asks it to.
    let b = Baton::probe(&dir, &["--watchdog", "1s"], &[]);
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
    let answer = ask(b.port).unwrap();
    let server: u32 = answer.strip_prefix("http ").unwrap().parse().unwrap();
    assert_ne!(server, pid1);
}

#[test]
fn watchdog_pings_keep_the_generation_over_several_periods() {
    let dir = scratch("watchdog-ping");
    // WATCHDOG_USEC=2s: the probe pings every second.
    let b = Baton::probe(&dir, &["--watchdog", "2s"], &["--watchdog"]);
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
    assert_eq!(ask(b.port).unwrap(), format!("http {pid1}"));
}

// ---- crashes ----------------------------------------------------------------

#[test]
fn killed_generation_is_replaced_with_backoff_and_the_socket_stays_open() {
    let dir = scratch("crash");
    let fail = dir.join("fail");
    let b = Baton::probe(&dir, &[], &["--fail-if-exists", fail.to_str().unwrap()]);
    let pid1 = b.active_pid();

    // The first replacements fail before READY=1, making a long gap.
    std::fs::write(&fail, "").unwrap();
    let killed_at = mono_us();
    signal(pid1, Signal::KILL);
    wait_gone(pid1, "the killed generation");

    // A client connecting during the gap is queued on the listening socket
    // that Baton keeps open, not refused.
    let (tx, rx) = std::sync::mpsc::channel();
    let port = b.port;
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect during the gap: {e}"))?;
        let _ = tx.send(mono_us());
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

#[test]
fn crash_loop_gives_up_with_exit_1_without_busy_looping() {
    let dir = scratch("crash-loop");
    let fail = dir.join("fail");
    std::fs::write(&fail, "").unwrap();
    let t0 = Instant::now();
    let mut b = Baton::launch(
        &dir,
        &["--restart-burst", "3", "--restart-interval", "60s"],
        &probe_command(&dir.join("report"), &["--fail-if-exists", fail.to_str().unwrap()]),
    );
    let (status, cpu) = wait4(b.child.id());
    let wall = t0.elapsed();
    b.exited = Some(status);
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
    let mut b = Baton::launch(
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

#[test]
fn generation_ignoring_sigterm_is_killed_at_the_stop_timeout() {
    let dir = scratch("ignore-term");
    let b = Baton::probe(&dir, &["--stop-timeout", "1s"], &["--ignore-sigterm"]);
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
    assert_eq!(ask(b.port).unwrap(), format!("http {pid2}"));
}

#[test]
fn generation_sending_stopping_on_its_own_is_replaced() {
    let dir = scratch("self-stop");
    let b = Baton::probe(&dir, &[], &["--stop-on-usr1"]);
    let pid1 = b.active_pid();
    let load = Load::start(b.port);
    signal(pid1, Signal::USR1);
    b.wait_active(2);
    wait_gone(pid1, "the generation that stopped itself");
    load.finish("a generation stopping on its own");
    b.wait_line(pid1, "stopping-self");
    assert!(b.wait_line(pid1, "stopping signal=SIGUSR1").text.contains("drained=true"));
    assert!(b.log().contains("generation 1 is stopping on its own"), "{}", b.log());
    let s = b.wait_status("only generation 2 left", |s| s.generations.len() == 1);
    assert_eq!((s.generations[0].generation, s.generations[0].state.as_str()), (2, "active"));
    assert_eq!(ask(b.port).unwrap(), format!("http {}", s.generations[0].pid));
}

#[test]
fn max_draining_kills_the_oldest_draining_generation() {
    let dir = scratch("max-draining");
    // Draining generations never leave by themselves (they ignore SIGTERM)
    // within the 5 s stop timeout.
    let b = Baton::probe(&dir, &["--max-draining", "1", "--stop-timeout", "5s"], &["--ignore-sigterm"]);
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
    assert_eq!(ask(b.port).unwrap().split_whitespace().next(), Some("http"));
    assert!(alive(pid3));
}

// ---- the CLI ----------------------------------------------------------------

#[test]
fn status_json_and_exit_code_3_without_a_baton() {
    let dir = scratch("cli");
    // Nothing runs at the control path yet: exit code 3.
    for cmd in ["restart", "status", "stop"] {
        let out = cli_at(&dir.join("baton.sock"), &[cmd]);
        assert_eq!(out.status.code(), Some(3), "baton {cmd} with no baton: {out:?}");
    }

    let b = Baton::probe(&dir, &[], &[]);
    let pid1 = b.active_pid();
    let out = ok(&b.cli(&["status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["result"], "status", "{json}");
    assert_eq!(json["generations"][0]["generation"], 1, "{json}");
    assert_eq!(json["generations"][0]["pid"], pid1, "{json}");
    assert_eq!(json["generations"][0]["state"], "active", "{json}");
    assert_eq!(json["sockets"][0]["name"], "http", "{json}");
    assert!(json["sockets"][0]["local"].as_str().unwrap().ends_with(&format!(":{}", b.port)), "{json}");
    let parsed: Response = serde_json::from_str(&out).unwrap();
    assert!(matches!(parsed, Response::Status(s) if s.generations.len() == 1));
}

/// `baton stop`, then what must hold whatever the CLI printed: every
/// generation asked to stop and gone, `baton run` exited 0, its control
/// socket removed, and exit code 3 from then on. Returns the CLI's output.
fn stop_scenario(test: &str) -> Output {
    let dir = scratch(test);
    let mut b = Baton::probe(&dir, &[], &[]);
    let pid1 = b.active_pid();
    let load = Load::start(b.port);
    ok(&b.cli(&["restart"]));
    load.finish("restart before stop");
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
    assert!(!b.control.exists(), "the control socket was left behind");
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
    let b = Baton::launch(
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
    let mut b = Baton::launch(
        &dir,
        &["--notify-access", "all"],
        &[OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(script), OsStr::new(baton_bin()), report.as_os_str()],
    );
    let survived = poll_until("generation 1 active", Duration::from_secs(10), || {
        if let Ok(Some(status)) = b.child.try_wait() {
            return Some(Err(status));
        }
        let s = b.try_status()?;
        s.generations.iter().any(|g| g.state == "active").then_some(Ok(s))
    });
    if let Ok(Err(status)) = &survived {
        b.exited = Some(*status);
    }
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
        poll_until("baton's fd count back", Duration::from_secs(10), || (b.baton_fds() <= before).then_some(()));
    let after = b.baton_fds();
    eprintln!("baton fds: {before} before, {after} after the abuse");
    settled.unwrap_or_else(|e| panic!("{e}: {before} before, {after} after: {:?}", b.fd_targets()));
}

#[test]
fn notify_abuse_from_strangers_and_from_the_main_process_changes_nothing() {
    let dir = scratch("abuse-main");
    // Every generation sends the battery right after READY=1.
    let b = Baton::probe(&dir, &[], &["--abuse"]);
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
    let before = b.baton_fds();

    // Processes outside any generation: refused, fds closed.
    let notify_socket = b.control.with_extension("notify");
    let load = Load::start(b.port);
    for _ in 0..2 {
        let out = Command::new(probe_bin())
            .args(["--abuse-only", "--timestamps", "--report"])
            .arg(&b.report)
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
    assert_eq!(ask(b.port).unwrap(), format!("http {pid2}"));

    // And Baton still works: a restart (with more abuse from generation 3).
    ok(&b.cli(&["restart"]));
    let pid3 = b.active_pid();
    assert_abuse_line(&b.wait_line(pid3, "abuse"));
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    load.finish("notify abuse");
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
    let b = Baton::launch(
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
    assert_eq!(ask(b.port).unwrap(), format!("http {pid1}"));
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    let before = b.baton_fds();

    let load = Load::start(b.port);
    ok(&b.cli(&["restart"]));
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    load.finish("restart with a helper abusing the notify socket");
    let s = b.status();
    assert_eq!((s.crash_restarts, s.restarts, s.fdstore), (0, 2, 0), "{s:?}");
    assert_eq!(b.lines().iter().filter(|l| l.text.starts_with("abuse")).count(), 3, "{}", b.report_text());
    b.lines().iter().filter(|l| l.text.starts_with("abuse")).for_each(assert_abuse_line);
    assert_fds_settle(&b, before);
}
