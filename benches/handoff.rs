//! Hand-off latency of `baton run`: how long Baton itself takes between the
//! events of a restart, measured with real processes on real sockets.
//!
//! `cargo bench --bench handoff` (release builds of Baton and of the probe;
//! the probe is built by this benchmark through `cargo_bin`). Set
//! `BATON_BENCH_N` to change the number of restarts (default 200). Run
//! without `--bench` (e.g. by `cargo test --benches`) it does a 5-restart
//! smoke run.
//!
//! Every time is `CLOCK_MONOTONIC`, shared by all processes of the machine:
//! the probe (`baton-sd-probe --timestamps`) stamps its report lines with it,
//! so the numbers come from the app's side of the protocol and need nothing
//! added to Baton:
//!
//! - **READY → old signalled**: the new generation's `READY=1` sent → the
//!   old generation's stop signal received (its signal handler running).
//!   Includes both processes' scheduling, the datagram and the signal
//!   delivery: an upper bound of Baton's own reaction time.
//! - **spawn() call** and **spawn → app main()**: `AppCommand::spawn`, the
//!   fork+exec Baton does for each generation, timed in this process: until
//!   it returns (the child has exec'd), and until the probe's first
//!   statement in `main` ran (dynamic loading and runtime start-up
//!   included).
//! - **restart overhead**: restart request sent → old generation signalled,
//!   minus the app's own start-up (the probe's start → `READY=1`): what
//!   Baton adds to a restart.
//! - **restart round trip**: the control request until its answer.
//!
//! Each restart waits for the previous old generation to exit first, so
//! they do not overlap. Baton's RSS and fd count are read from /proc after
//! start-up and after all restarts.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton::control::{Request, Response, Status};
use baton::spawn::{AppCommand, GenerationSetup};
use baton_testbed::cargo_bin;

const WAIT: Duration = Duration::from_secs(30);

/// Polls `probe` until it yields, every millisecond (a benchmark wants to
/// see events promptly; the wait is bounded by `WAIT`).
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The probe's report: for each pid, each line's first word → its time.
fn report_events(path: &Path) -> HashMap<(u32, String), u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut events = HashMap::new();
    for line in text.lines() {
        let Some((head, at)) = line.rsplit_once(" mono_us=") else { continue };
        let Some((text, pid)) = head.rsplit_once(" pid=") else { continue };
        let (Ok(pid), Ok(at)) = (pid.parse(), at.parse()) else { continue };
        let word = text.split_whitespace().next().unwrap_or("").to_owned();
        events.entry((pid, word)).or_insert(at);
    }
    events
}

fn event(path: &Path, pid: u32, word: &str) -> u64 {
    wait_for(&format!("{word} of pid {pid}"), || report_events(path).get(&(pid, word.to_owned())).copied())
}

/// VmRSS in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

struct Stats {
    name: &'static str,
    us: Vec<u64>,
}

impl Stats {
    fn new(name: &'static str) -> Stats {
        Stats { name, us: Vec::new() }
    }

    fn row(&mut self) -> String {
        self.us.sort_unstable();
        let at = |q: f64| self.us[((self.us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        format!("| {:<34} | {:>9.3} | {:>9.3} | {:>9.3} |", self.name, at(0.5), at(0.9), at(1.0))
    }
}

fn status(control: &Path, rt: &tokio::runtime::Runtime) -> Option<Status> {
    match rt.block_on(baton::control::call(control, &Request::Status)) {
        Ok(Response::Status(s)) => Some(*s),
        _ => None,
    }
}

/// `AppCommand::spawn` of the probe, `n` times, one at a time.
fn bench_spawn(probe: &Path, dir: &Path, n: usize) -> (Stats, Stats) {
    let report = dir.join("spawn-report");
    let args: Vec<OsString> = vec!["--timestamps".into(), "--report".into(), report.clone().into()];
    let cmd = AppCommand::new(probe.as_os_str(), &args).expect("probe command");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fds = [(listener.as_fd(), "http")];
    let setup = GenerationSetup { fds: &fds, ..GenerationSetup::default() };
    let (mut call, mut to_main) = (Stats::new("spawn() call (fork → exec'd)"), Stats::new("spawn → app main()"));
    for _ in 0..n {
        let t0 = baton_sd::monotonic_usec();
        let child = cmd.spawn(&setup).expect("spawn the probe");
        call.us.push(baton_sd::monotonic_usec() - t0);
        to_main.us.push(event(&report, child.pid, "start") - t0);
        child.signal(rustix::process::Signal::KILL).unwrap();
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(child.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap();
    }
    (call, to_main)
}

struct BatonRun {
    child: Child,
    dir: PathBuf,
}

impl Drop for BatonRun {
    fn drop(&mut self) {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), rustix::process::Signal::TERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = match std::env::var("BATON_BENCH_N") {
        Ok(v) => v.parse().expect("BATON_BENCH_N must be a number"),
        Err(_) if full => 200,
        Err(_) => 5,
    };
    if cfg!(debug_assertions) {
        eprintln!("handoff: built without optimisations; run `cargo bench --bench handoff` for meaningful numbers");
    }
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    let baton = env!("CARGO_BIN_EXE_baton");
    let dir = std::env::temp_dir().join(format!("baton-bench-handoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let (spawn_call, spawn_main) = bench_spawn(&probe, &dir, n);

    let control = dir.join("baton.sock");
    let report = dir.join("report");
    let child = Command::new(baton)
        .arg("run")
        .arg("--control")
        .arg(&control)
        .args(["-l", "http=127.0.0.1:0", "--"])
        .arg(&probe)
        .args(["--serve", "http", "--timestamps", "--report"])
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("BATON_LOG", "warn")
        .spawn()
        .expect("spawn baton");
    let run = BatonRun { child, dir: dir.clone() };
    let pid = run.child.id();
    wait_for("generation 1 active", || {
        status(&control, &rt)?.generations.iter().any(|g| g.state == "active").then_some(())
    });
    let (rss_start, fds_start) = (rss_kib(pid), fd_count(pid));

    let mut ready_to_signal = Stats::new("READY → old signalled");
    let mut overhead = Stats::new("restart overhead (minus app start)");
    let mut round_trip = Stats::new("restart round trip");
    let mut app_start = Stats::new("app's own start → READY (probe)");
    let started = Instant::now();
    for _ in 0..n {
        let old = status(&control, &rt).unwrap().generations[0].pid;
        let t_cmd = baton_sd::monotonic_usec();
        let done = match rt.block_on(baton::control::call(&control, &Request::Restart { wait: true })) {
            Ok(Response::Restarted(done)) => done,
            other => panic!("restart: {other:?}"),
        };
        round_trip.us.push(baton_sd::monotonic_usec() - t_cmd);
        let signalled = event(&report, old, "signal-received");
        let (start, ready) = (event(&report, done.pid, "start"), event(&report, done.pid, "ready"));
        ready_to_signal.us.push(signalled.saturating_sub(ready));
        app_start.us.push(ready - start);
        overhead.us.push((signalled - t_cmd).saturating_sub(ready - start));
        // The next restart starts from one generation.
        wait_for("the old generation gone", || (status(&control, &rt)?.generations.len() == 1).then_some(()));
    }
    let elapsed = started.elapsed();
    // Control connections of our own status polls close asynchronously.
    std::thread::sleep(Duration::from_millis(200));
    let (rss_end, fds_end) = (rss_kib(pid), fd_count(pid));

    println!("\nbaton hand-off, {n} restarts in {elapsed:.1?} (times in ms)\n");
    println!("| {:<34} | {:>9} | {:>9} | {:>9} |", "metric", "median", "p90", "max");
    println!("|{:-<36}|{:->11}|{:->11}|{:->11}|", "", "", "", "");
    for mut s in [ready_to_signal, overhead, round_trip, app_start, spawn_call, spawn_main] {
        println!("{}", s.row());
    }
    println!("\nbaton (pid {pid}): VmRSS {rss_start} KiB after start-up, {rss_end} KiB after {n} restarts");
    println!("baton fds: {fds_start} after start-up, {fds_end} after {n} restarts");
    drop(run);
}
