//! `baton run` with real processes and real sockets: the conformance probe
//! (built only on `baton-sd`, knowing nothing of Baton) runs unchanged under
//! it, restarts overlap, failures leave the old generation serving.
//!
//! These need no root: Baton's control and notify sockets live in a
//! private temporary directory.

use std::ffi::OsStr;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::expect_success as ok;
use baton_testbed::load::{Load, LoadConfig, Mode};
use baton_testbed::probe::ask;
use baton_testbed::{cargo_bin, poll_until};

fn scratch(test: &str) -> PathBuf {
    baton_testbed::unique_temp_dir("baton-sup", test)
}

/// `baton run -l http=127.0.0.1:0 ARGS -- baton-sd-probe --serve http
/// --report DIR/report PROBE_ARGS`, generation 1 active.
fn start(test: &str, args: &[&str], probe_args: &[&str]) -> Baton {
    let dir = scratch(test);
    let report = dir.join("report");
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    let mut app: Vec<&OsStr> = vec![probe.as_os_str(), "--serve".as_ref(), "http".as_ref(), "--report".as_ref()];
    app.push(report.as_os_str());
    app.extend(probe_args.iter().map(OsStr::new));
    run(dir, args, &app).start()
}

/// `baton run -l http=127.0.0.1:0 ARGS -- APP...` in `dir`.
fn run(dir: PathBuf, args: &[&str], app: &[&OsStr]) -> BatonBuilder {
    BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), dir).args(args).app(app)
}

#[test]
fn conformance_app_runs_unchanged_and_restarts_overlapped() {
    let b = start("overlap", &[], &[]);
    let pid1 = b.active_pid();
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid1}"));
    let text = b.report_text();
    assert!(text.contains("fd 3 name=http kind=a listening TCP socket"), "{text}");

    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    let pid2 = b.active_pid();
    assert_ne!(pid1, pid2);
    // Generation 1 may still take a connection or two between the cutover
    // and handling its SIGTERM (both serve the same socket); once it is
    // gone, only generation 2 answers.
    poll_until("generation 1 gone", WAIT, || (b.status().generations.len() == 1).then_some(())).unwrap();
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid2}"));
    // The old generation was asked to stop only after the new one was ready.
    let text = b.report_text();
    let ready2 = text.match_indices("ready").nth(1).map(|(i, _)| i).unwrap();
    let stop1 = text.find("stopping").expect("generation 1 stopped");
    assert!(ready2 < stop1, "old generation stopped before the new one was ready:\n{text}");
}

/// Ten restarts of the reference server under a paced keep-alive pool and
/// one-connection-per-request clients (the shared load generator speaks
/// HTTP, so the app here is `baton-httpd`, not the probe): not one request
/// fails, and each generation answers some.
#[test]
fn restarts_under_load_lose_nothing() {
    let dir = scratch("load");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "load\n").unwrap();
    let httpd = cargo_bin("baton-httpd", "baton-httpd");
    let app = [httpd.as_os_str(), "--root".as_ref(), www.as_os_str()];
    let b = run(dir, &[], &app).start();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, b.port()));
    let config = |mode, connections, rate| {
        LoadConfig::new(addr)
            .mode(mode)
            .connections(connections)
            .rate(Some(rate))
            .request_timeout(Duration::from_secs(10))
            .max_duration(Duration::from_secs(300))
    };
    let loads = [
        ("keep-alive", Load::start(config(Mode::KeepAlive, 4, 200)).unwrap()),
        ("new-connection", Load::start(config(Mode::NewConnection, 4, 100)).unwrap()),
    ];
    let wait_ok = |n: u64| {
        for (name, load) in &loads {
            assert!(load.wait_for_ok(n, WAIT), "the {name} load stalled: {:?}", load.progress());
        }
    };
    wait_ok(50);
    for n in 2..=11 {
        ok(&b.cli(&["restart"]));
        b.wait_active(n);
        wait_ok(20);
    }
    let mut answered = std::collections::BTreeSet::new();
    for (name, load) in loads {
        let r = load.stop();
        eprintln!("restarts_under_load: {name} load across 10 restarts: {}", r.to_json());
        assert!(r.ok > 0, "{name}: nothing answered");
        assert_eq!(r.failed(), 0, "{} {name} requests failed: {}", r.failed(), r.to_json());
        answered.extend(r.per_generation.keys().map(|g| g.parse::<u64>().unwrap()));
    }
    assert_eq!(answered, (1..=11).collect(), "every generation answers");
}

#[test]
fn failed_restarts_leave_the_old_generation_serving() {
    let dir = scratch("fail-marks");
    let fail = dir.join("fail");
    let hang = dir.join("hang");
    let b = start(
        "fail",
        &["--ready-timeout", "2s"],
        &["--fail-if-exists", fail.to_str().unwrap(), "--hang-if-exists", hang.to_str().unwrap()],
    );
    let pid1 = b.active_pid();

    std::fs::write(&fail, "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited with status 3 before READY=1"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    // The app's last output comes with the failure.
    assert!(err.contains("last output:") && err.contains("failing before READY=1"), "{err}");
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid1}"));
    std::fs::remove_file(&fail).unwrap();

    std::fs::write(&hang, "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no READY=1 within 2s"), "{err}");
    // The hung generation was asked to stop (SIGTERM, like systemd after a
    // start timeout) and finishes what it accepted; then only 1 is left.
    poll_until("the failed generation gone", WAIT, || (b.status().generations.len() == 1).then_some(())).unwrap();
    assert_eq!(ask(b.port()).unwrap(), format!("http {pid1}"));
    let status = b.status();
    assert!(status.last_failure.as_deref().unwrap_or("").contains("no READY=1"), "{status:?}");
    std::fs::remove_file(&hang).unwrap();

    // And a good restart still works afterwards.
    ok(&b.cli(&["restart"]));
    assert_ne!(b.active_pid(), pid1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn concurrent_restarts_all_get_an_outcome() {
    let b = start("concurrent", &[], &["--ready-delay-ms", "200"]);
    let control = b.control().to_owned();
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let control = control.clone();
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_baton")).args(["restart", "--control"]).arg(&control).output().unwrap()
            })
        })
        .collect();
    let outs: Vec<Output> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    for out in &outs {
        ok(out);
    }
    // Requests that arrived during a restart share the next one: far fewer
    // than 20 generations were started.
    let generations: std::collections::BTreeSet<String> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1).unwrap_or("").to_owned())
        .collect();
    eprintln!("20 concurrent restarts were served by {} restart(s): {generations:?}", generations.len());
    assert!(generations.len() < 20);
}

#[test]
fn a_stalled_control_client_does_not_delay_a_restart() {
    let b = start("stall", &[], &[]);
    // Connects and says nothing, holding the connection open.
    let _stalled = std::os::unix::net::UnixStream::connect(b.control()).unwrap();
    let _half = {
        let mut s = std::os::unix::net::UnixStream::connect(b.control()).unwrap();
        std::io::Write::write_all(&mut s, b"{\"cmd\":\"rest").unwrap();
        s
    };
    let t0 = Instant::now();
    ok(&b.cli(&["restart"]));
    // The request deadline for silent clients is 5 s; the restart must not
    // have waited for it.
    assert!(t0.elapsed() < Duration::from_secs(5), "restart took {:?}", t0.elapsed());
}

#[test]
fn notifications_from_other_processes_are_refused() {
    let dir = scratch("spoof-marks");
    let hang = dir.join("hang");
    let b = start("spoof", &["--ready-timeout", "3s"], &["--hang-if-exists", hang.to_str().unwrap()]);
    std::fs::write(&hang, "").unwrap();
    let control = b.control().to_owned();
    let restart = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_baton")).args(["restart", "--control"]).arg(&control).output().unwrap()
    });
    // While generation 2 hangs before READY, an unrelated process claims
    // READY=1 for it.
    poll_until("generation 2 starting", WAIT, || {
        b.status().generations.iter().any(|g| g.generation == 2).then_some(())
    })
    .unwrap();
    let notify_socket = b.control().with_extension("notify");
    for _ in 0..5 {
        let out = Command::new("systemd-notify")
            .args(["--ready", "--no-block"])
            .env("NOTIFY_SOCKET", &notify_socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let out = restart.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "a spoofed READY=1 must not complete the restart: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no READY=1"), "{out:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn systemd_notify_from_a_shell_script_child_works() {
    let b = BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), scratch("shell"))
        .no_http_listener()
        .args(["--notify-access", "all", "--ready-timeout", "20s"])
        .app(["/bin/sh", "-c", "sleep 0.1; systemd-notify --ready --status='from a script' && exec sleep 1000"])
        .spawn();
    let status = b.wait_status("the shell generation active", |s| s.generations.iter().any(|g| g.state == "active"));
    drop(b);
    assert_eq!(status.generations[0].status_text.as_deref(), Some("from a script"));
}

#[test]
fn no_fd_leak_over_200_restarts() {
    // Each restart flips steering, retires the old generation once its
    // queue is empty and so on, but at once: the quiet period and the
    // probation (4 s a restart by default, tested in tests/proving.rs)
    // would make 200 restarts take 15 minutes.
    let b = start("leak", &["--quiet-period", "0", "--probation", "0"], &[]);
    // Warm up lazily created fds (runtime, logging).
    ok(&b.cli(&["restart"]));
    b.wait_active(2);
    poll_until("generation 1 gone", WAIT, || (b.status().generations.len() == 1).then_some(())).unwrap();
    let before = b.fd_count();
    for n in 3..=202 {
        ok(&b.cli(&["restart"]));
        b.wait_active(n);
    }
    poll_until("draining generations gone", WAIT, || (b.status().generations.len() == 1).then_some(())).unwrap();
    // Control connections from our own status polls and the output pipe of
    // a retiring generation close asynchronously; a real leak never returns
    // to the starting count.
    let settled = poll_until("baton's fd count back to its start", Duration::from_secs(10), || {
        (b.fd_count() <= before).then_some(())
    });
    let after = b.fd_count();
    eprintln!("baton fds: {before} before, {after} after 200 restarts");
    settled.unwrap_or_else(|e| panic!("{e}: {before} before, {after} after: {:?}", b.fd_targets()));
    assert_eq!(b.status().restarts, 201);
}

#[test]
fn connections_stored_by_the_old_generation_reach_the_running_one() {
    let b = start("handoff", &[], &["--hold"]);
    let pid1 = b.active_pid();
    // Connections generation 1 accepted and holds without answering.
    let clients: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(("127.0.0.1", b.port())).unwrap()).collect();
    let ports: Vec<u16> = clients.iter().map(|c| c.local_addr().unwrap().port()).collect();
    poll_until("generation 1 holding 5 connections", WAIT, || {
        (b.report_text().lines().filter(|l| *l == "held").count() == 5).then_some(())
    })
    .unwrap();
    ok(&b.cli(&["restart"]));
    let pid2 = b.active_pid();
    assert_ne!(pid1, pid2);
    // Generation 1 stores them on SIGTERM; Baton moves them to the running
    // generation 2, which answers on the very same TCP connections.
    for (mut c, port) in clients.into_iter().zip(ports) {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer.trim(), format!("http {pid2}"), "connection from port {port}");
        assert_eq!(c.local_addr().unwrap().port(), port);
    }
    let text = b.report_text();
    assert!(text.contains("handed-over 5"), "{text}");
    assert!(text.contains("received name=conn count=5"), "{text}");
    assert_eq!(b.status().fdstore, 0, "moved connections must not stay in the store");
}

#[test]
fn connections_wait_in_the_store_for_a_late_receiver() {
    let dir = scratch("late-gate");
    let gate = dir.join("gate");
    let b = start("late", &[], &["--hold", "--handoff-gate", gate.to_str().unwrap()]);
    // Generation 1's own receiver is gated too; it never matters for it.
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", b.port())).unwrap()).collect();
    poll_until("generation 1 holding 3 connections", WAIT, || {
        (b.report_text().lines().filter(|l| *l == "held").count() == 3).then_some(())
    })
    .unwrap();
    ok(&b.cli(&["restart"]));
    let pid2 = b.active_pid();
    // Generation 1 hands them over while generation 2 has no receiver yet:
    // they must wait in Baton's store, not be lost or given to nobody.
    poll_until("generation 1 handed over", WAIT, || b.report_text().contains("handed-over 3").then_some(())).unwrap();
    poll_until("the connections stored", WAIT, || (b.status().fdstore == 3).then_some(())).unwrap();
    std::fs::write(&gate, "").unwrap();
    for mut c in clients {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer.trim(), format!("http {pid2}"));
    }
    poll_until("the store emptied", WAIT, || (b.status().fdstore == 0).then_some(())).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

// ---- where the generations' output goes (--output) -------------------------

/// Where `/proc/PID/fd/FD` points.
fn fd_target(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|p| p.display().to_string()).unwrap_or_default()
}

/// Pipes open in process `a` that process `b` holds at fds above 2.
fn shared_pipes(a: u32, b: u32) -> Vec<String> {
    let targets = |pid: u32, min: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let fd: u32 = e.file_name().to_str()?.parse().ok()?;
                (fd >= min).then(|| std::fs::read_link(e.path()).ok()).flatten()
            })
            .map(|p| p.display().to_string())
            .filter(|t| t.starts_with("pipe:"))
            .collect()
    };
    let theirs = targets(b, 3);
    let mut shared: Vec<String> = targets(a, 0).into_iter().filter(|t| theirs.contains(t)).collect();
    shared.sort();
    shared.dedup();
    shared
}

/// A generation's main process, held by pidfd (it is not the test's child,
/// and outlives Baton in these tests): signalled only through the pidfd,
/// so a reused pid is never hit, and SIGKILLed with its process group on
/// drop if still running.
struct Orphan {
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
}

impl Orphan {
    fn new(pid: u32) -> Orphan {
        let p = rustix::process::Pid::from_raw(pid as i32).unwrap();
        Orphan { pid, pidfd: rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).unwrap() }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::pidfd_send_signal(&self.pidfd, sig).unwrap();
    }

    /// Waits (event-driven: a pidfd polls readable once the process exits)
    /// up to `timeout`; whether it exited.
    fn wait_exit(&self, timeout: Duration) -> bool {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let ts = rustix::time::Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: 0 };
        matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL).is_ok() {
            // Its `sleep`s too: the group lives while its leader does.
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_raw(self.pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

/// An app like a C program that logs: default SIGPIPE disposition (Baton
/// resets it), a line on stderr every 10 ms, and on SIGTERM 50 `draining`
/// lines, then `$1/exited` and exit 0. Readiness through `baton notify`
/// (hence `--notify-access all`).
const LOGGING_APP: &str = r#"
trap 'i=0; while [ $i -lt 50 ]; do echo "draining $i" >&2; i=$((i+1)); sleep 0.01; done; echo 0 > "$1/exited"; exit 0' TERM
"$2" notify --ready
while :; do echo "tick $$" >&2; sleep 0.01; done
"#;

/// Starts Baton with `output` over [`LOGGING_APP`], SIGKILLs it, and returns
/// the orphaned generation and the scratch directory.
fn logging_app_outliving_baton(test: &str, output: &str) -> (Orphan, Baton) {
    let dir = scratch(test);
    let script = dir.join("app.sh");
    std::fs::write(&script, LOGGING_APP).unwrap();
    let b = run(
        dir.clone(),
        &["--output", output, "--notify-access", "all"],
        &["/bin/sh".as_ref(), script.as_os_str(), dir.as_os_str(), env!("CARGO_BIN_EXE_baton").as_ref()],
    )
    .start();
    let gen1 = Orphan::new(b.active_pid());
    (gen1, b)
}

/// `--output inherit`: the generation's stdout and stderr are Baton's own
/// (same open files), so when Baton is SIGKILLed the app, which keeps
/// logging, neither gets EPIPE nor dies of SIGPIPE: it drains on SIGTERM
/// and exits 0, its lines all in Baton's stderr file. The same app under
/// `--output pipe` dies of SIGPIPE as soon as Baton is gone, which is
/// what this option exists for.
#[test]
fn inherited_output_outlives_baton() {
    let (gen1, mut b) = logging_app_outliving_baton("inherit-kill", "inherit");
    let baton = b.pid();
    for fd in [1, 2] {
        let (theirs, ours) = (fd_target(gen1.pid, fd), fd_target(baton, fd));
        assert!(!ours.is_empty(), "baton's fd {fd}");
        assert_eq!(theirs, ours, "the generation's fd {fd} is baton's own");
    }
    assert!(fd_target(baton, 2).ends_with("baton.log"), "{}", fd_target(baton, 2));
    // Baton reads no pipe of the generation's.
    assert_eq!(shared_pipes(gen1.pid, baton), Vec::<String>::new());

    b.kill();
    // Still logging after Baton's death.
    let log = b.dir().join("baton.log");
    let ticks = || std::fs::read_to_string(&log).unwrap_or_default().matches("tick").count();
    let before = ticks();
    poll_until("the orphaned generation logging on", WAIT, || (ticks() > before + 5).then_some(())).unwrap();
    gen1.signal(rustix::process::Signal::TERM);
    assert!(gen1.wait_exit(WAIT), "the generation did not finish draining");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("draining 49"), "{text}");
    assert_eq!(std::fs::read_to_string(b.dir().join("exited")).unwrap().trim(), "0", "it ran to its `exit 0`");
}

/// The control for [`inherited_output_outlives_baton`]: with `--output pipe`
/// (the old behaviour) the same app is killed by SIGPIPE once Baton dies —
/// before it could drain and reach its `exit 0`.
#[test]
fn piped_output_breaks_when_baton_dies() {
    let (gen1, mut b) = logging_app_outliving_baton("pipe-kill", "pipe");
    assert!(fd_target(gen1.pid, 2).starts_with("pipe:"), "{}", fd_target(gen1.pid, 2));
    assert_ne!(fd_target(gen1.pid, 2), fd_target(b.pid(), 2));
    assert_eq!(shared_pipes(gen1.pid, b.pid()), vec![fd_target(gen1.pid, 2)], "baton reads its pipe");
    b.kill();
    assert!(gen1.wait_exit(WAIT), "the app should die of SIGPIPE within {WAIT:?}");
    assert!(!b.dir().join("exited").exists(), "it never reached its exit");
}

/// `--output auto` (the default) inherits when `$JOURNAL_STREAM` names
/// Baton's stderr (here a plain file standing in for the journal stream):
/// the generation writes there directly and gets `JOURNAL_STREAM` unchanged;
/// a failed start's report then points to the journal instead of quoting
/// lines. Without a matching `JOURNAL_STREAM` it pipes.
#[test]
fn auto_output_inherits_when_stderr_is_the_journal() {
    let dir = scratch("auto-journal");
    let fail = dir.join("fail");
    let log = std::fs::File::create(dir.join("baton.log")).unwrap();
    let st = rustix::fs::fstat(&log).unwrap();
    let stream = format!("{}:{}", st.st_dev, st.st_ino);
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    let report = dir.join("report");
    let app: Vec<&OsStr> = vec![
        probe.as_os_str(),
        "--serve".as_ref(),
        "http".as_ref(),
        "--report".as_ref(),
        report.as_os_str(),
        "--fail-if-exists".as_ref(),
        fail.as_os_str(),
    ];
    let b = run(dir.clone(), &[], &app).env("JOURNAL_STREAM", &stream).start();
    let pid1 = b.active_pid();
    assert_eq!(fd_target(pid1, 2), fd_target(b.pid(), 2), "inherited");
    let environ = std::fs::read(format!("/proc/{pid1}/environ")).unwrap();
    let want = format!("JOURNAL_STREAM={stream}");
    assert!(environ.split(|&c| c == 0).any(|v| v == want.as_bytes()), "the app can log natively");

    std::fs::write(&fail, "").unwrap();
    let out = b.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited with status 3 before READY=1"), "{err}");
    assert!(err.contains("its output is in the journal: `journalctl "), "{err}");
    assert!(!err.contains("last output:"), "nothing captured, nothing quoted: {err}");
    let status = b.status();
    assert!(status.last_failure.as_deref().unwrap_or("").contains("journalctl"), "{status:?}");
    // What the failed generation printed is in Baton's stderr file.
    let text = std::fs::read_to_string(dir.join("baton.log")).unwrap();
    assert!(text.contains("failing before READY=1"), "{text}");
    drop(b);

    // The same without JOURNAL_STREAM: a pipe, as before.
    let b = start("auto-pipe", &[], &[]);
    let pid = b.active_pid();
    assert!(fd_target(pid, 2).starts_with("pipe:"), "{}", fd_target(pid, 2));
    assert_ne!(fd_target(pid, 2), fd_target(b.pid(), 2));
}
