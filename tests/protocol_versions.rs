//! Baton and the newer parts of systemd's protocol (253–262, see
//! `shared/reference/systemd-protocol.md` §7), and the stop race they made
//! visible:
//!
//! - a stop signal and a generation's own `STOPPING=1` arriving together
//!   (systemd's `KillMode=control-group` signals Baton and the generations
//!   at once) never spawn a replacement: deterministically pending together
//!   (SIGSTOP/SIGCONT), and through 20 real `systemctl stop`s;
//! - `STOPPING=1` is final from systemd 259 on: a generation's own
//!   `STOPPING=1` is never forwarded, the unit stays active;
//! - Baton's own `$MAINPIDFDID`/`$MANAGERPIDFDID` (258+) never reach a
//!   generation;
//! - `LISTEN_PIDFDID` (259+) names the generation's own pidfd inode id on
//!   kernels with pidfs (6.9+);
//! - `RESTART_RESET=1` (258+) once a generation has proven healthy, harmless
//!   where systemd does not know it.
//!
//! Real processes and sockets throughout; the systemd cases boot the testbed
//! (252 on the host, 257 from the trixie root, 262 from the forky root).

use std::ffi::OsString;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::probe::ask;
use baton_testbed::{Bed, Flavor, cargo_bin, poll_until, unique_temp_dir};
use rustix::process::{Pid, PidfdFlags, Signal};

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

fn probe_bin() -> PathBuf {
    cargo_bin("sd-probe", "baton-sd-probe")
}

fn signal(pid: u32, sig: Signal) {
    rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `T`, `Z`, ...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// How many fds `pid` has open.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `baton run --control DIR/baton.sock -l http=127.0.0.1:0 -- APP...` in
/// `DIR` with `env`, its log in `DIR/baton.log`; SIGKILLed on drop unless
/// it exited, the directory left in place.
fn launch(dir: &Path, app: &[OsString], env: &[(&str, &str)]) -> Baton {
    BatonBuilder::new(baton_bin(), dir)
        .app(app)
        .envs(env.iter().copied())
        .current_dir(dir)
        .kill_on_drop()
        .keep_dir()
        .spawn()
}

fn wait_file_line(path: &Path, line: &str) {
    poll_until(&format!("{line:?} in {}", path.display()), WAIT, || {
        std::fs::read_to_string(path).ok()?.lines().any(|l| l.starts_with(line)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

// ---- the stop race ------------------------------------------------------

/// SIGTERM to Baton and the generation's own `STOPPING=1` pending together
/// (Baton frozen with SIGSTOP while both are queued, then SIGCONT), as under
/// `systemctl stop` with `KillMode=control-group`: Baton stops and never
/// spawns generation 2. Before the fix, whichever of the two events tokio's
/// `select!` polled first won, so some rounds started a replacement only to
/// stop it; 40 rounds make a miss all but impossible.
#[test]
fn stop_signal_with_a_generations_own_stopping_spawns_nothing() {
    const ROUNDS: usize = 40;
    // Four at a time: each round waits about a second for the drain.
    const PARALLEL: usize = 4;
    let t0 = Instant::now();
    let mut spawned: Vec<usize> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|w| {
                scope.spawn(move || (w..ROUNDS).step_by(PARALLEL).filter(|&r| stop_race_round(r)).collect::<Vec<_>>())
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    spawned.sort();
    eprintln!("stop race: generation 2 spawned in {} of {ROUNDS} rounds ({:?} in all)", spawned.len(), t0.elapsed());
    assert!(spawned.is_empty(), "a replacement was spawned during baton's stop in rounds {spawned:?}");
}

/// One round of [`stop_signal_with_a_generations_own_stopping_spawns_nothing`]:
/// whether Baton spawned generation 2.
fn stop_race_round(round: usize) -> bool {
    let dir = unique_temp_dir("baton-proto", &format!("stop-race-{round}"));
    let report = dir.join("report");
    let app: Vec<OsString> = vec![
        probe_bin().into(),
        "--serve".into(),
        "http".into(),
        "--stop-on-usr1".into(),
        "--reply-delay-ms".into(),
        "1000".into(),
        "--report".into(),
        report.clone().into(),
    ];
    let mut b = launch(&dir, &app, &[]);
    let pid1 = b.wait_active(1);
    // A request in flight keeps the generation draining (alive) after its
    // STOPPING=1: an exited sender's datagram is refused anyway.
    let fds = fd_count(pid1);
    let _in_flight = TcpStream::connect(("127.0.0.1", b.port())).unwrap();
    poll_until("the probe accepting the request", WAIT, || (fd_count(pid1) > fds).then_some(()))
        .unwrap_or_else(|e| panic!("{e}"));
    signal(b.pid(), Signal::STOP);
    poll_until("baton stopped by SIGSTOP", WAIT, || (proc_state(b.pid()) == Some('T')).then_some(()))
        .unwrap_or_else(|e| panic!("{e}"));
    // systemd's order: Baton first, then the rest of the cgroup.
    signal(b.pid(), Signal::TERM);
    signal(pid1, Signal::USR1);
    // The probe writes this line right after its STOPPING=1 went out: the
    // datagram waits in Baton's socket.
    wait_file_line(&report, "stopping-self");
    signal(b.pid(), Signal::CONT);
    let status = b.wait_exit();
    let log = b.log();
    assert!(status.success(), "baton exited with {status}\nlog:\n{log}");
    assert!(log.contains("stopping all generations"), "{log}");
    log.contains("generation 2 started")
}

// ---- what a generation inherits -------------------------------------------

/// Baton started with systemd's variables about *its* process and manager
/// (`$MAINPID`/`$MAINPIDFDID`, `$MANAGERPID`/`$MANAGERPIDFDID`, 258+) and a
/// stale `LISTEN_PIDFDID`: the generation sees none of Baton's, and a
/// `LISTEN_PIDFDID` that is its own pidfd id (on kernels with pidfs), which
/// `baton-sd` accepts (the probe takes its listener).
#[test]
fn a_generation_gets_its_own_pidfd_id_and_none_of_batons_ids() {
    let dir = unique_temp_dir("baton-proto", "generation-env");
    let (env_file, report) = (dir.join("env"), dir.join("report"));
    let script = format!(
        "env > {}.tmp && mv {0}.tmp {0}; exec \"$0\" --serve http --report {}",
        env_file.display(),
        report.display()
    );
    let app: Vec<OsString> = vec!["/bin/sh".into(), "-c".into(), script.into(), probe_bin().into()];
    let batons = [
        ("MAINPID", "1"),
        ("MAINPIDFDID", "4242"),
        ("MANAGERPID", "1"),
        ("MANAGERPIDFDID", "4243"),
        ("LISTEN_PIDFDID", "4244"),
    ];
    let b = launch(&dir, &app, &batons);
    let pid = b.wait_active(1);
    let text = std::fs::read_to_string(&env_file).unwrap();
    let var = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('=').map(str::to_owned));
    for (name, _) in &batons[..4] {
        assert_eq!(var(name), None, "baton's {name} reached the generation:\n{text}");
    }
    assert_eq!(var("LISTEN_PID"), Some(pid.to_string()));
    let pidfd = rustix::process::pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty()).unwrap();
    let expected = baton_sd::pidfs::pidfd_inode_id(pidfd.as_fd());
    eprintln!("generation pid {pid}: LISTEN_PIDFDID={:?}, its pidfd id {expected:?}", var("LISTEN_PIDFDID"));
    assert_eq!(var("LISTEN_PIDFDID"), expected.map(|id| id.to_string()), "{text}");
    if kernel_release_at_least(6, 9) {
        assert!(expected.is_some(), "a kernel with pidfs must name the generation by pidfd id");
    }
    let report = std::fs::read_to_string(&report).unwrap();
    assert!(report.lines().any(|l| l.starts_with("fd 3 name=http kind=a listening TCP socket")), "{report}");
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_release_at_least(major: u32, minor: u32) -> bool {
    let release = rustix::system::uname().release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

// ---- under systemd ------------------------------------------------------

/// The unit under test: Baton running the probe.
const APP: &str = "app.service";

/// `STOPPING=1` final (259+) and `RESTART_RESET=1` (258+), on whatever
/// systemd `b` runs:
///
/// 1. systemd restarts a SIGKILLed Baton (`Restart=always`): `NRestarts=1`.
/// 2. The new Baton's generation sends `STOPPING=1` on its own (the probe
///    on SIGUSR1): Baton starts a replacement and forwards none of it
///    upstream, so the unit is never deactivating (sampled until the
///    replacement serves; it may be `reloading/*` for the moment the
///    replacement starts, as for every generation after the first, whose
///    start Baton announces with `RELOADING=1`) and `MainPID` stays Baton.
/// 3. 10 s after that cutover Baton sends `RESTART_RESET=1`: systemd ≥ 258
///    resets `NRestarts` to 0; older ones ignore the unknown assignment and
///    the unit stays active with `NRestarts=1`.
fn stopping_is_never_forwarded_and_restart_reset(b: &Bed) {
    let version = b.tb.systemd_version();
    let unit = format!(
        "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=notify\nRestart=always\nRestartSec=200ms\n\
         RuntimeDirectory=baton\nFileDescriptorStoreMax=64\n\
         ExecStart={} run -l http=127.0.0.1:{} --name app -- {} --serve http --stop-on-usr1 --reply-delay-ms 1000 --report {}\n",
        baton_bin(),
        b.port,
        probe_bin().display(),
        b.report_path().display()
    );
    b.tb.install_unit("app.service", &unit).unwrap_or_else(|e| panic!("install: {e}"));
    b.systemctl_ok(&["start", "app.service"]);
    let main1 = b.show(APP, "MainPID");
    let before = b.probe_starts().len();
    b.systemctl_ok(&["kill", "-s", "SIGKILL", "--kill-whom=main", "app.service"]);
    b.wait_for("a new Baton", || {
        let main = b.show(APP, "MainPID");
        main != main1 && main != "0" && b.show(APP, "ActiveState") == "active"
    });
    let main2 = b.show(APP, "MainPID");
    assert_eq!(b.show(APP, "NRestarts"), "1");
    b.wait_for("the new Baton's generation", || b.probe_starts().len() > before);
    let pid1 = *b.probe_starts().last().unwrap();
    b.wait_for("its generation serving", || ask(b.port) == Ok(format!("http {pid1}")));

    // The generation stops on its own, while a request keeps it draining
    // (an exited sender's datagram would be refused, see the report).
    let fds = || {
        let out = b.tb.run(&["/bin/sh", "-c", &format!("ls /proc/{pid1}/fd | wc -l")]).unwrap();
        out.stdout_trimmed().parse::<usize>().unwrap_or(0)
    };
    let idle = fds();
    let in_flight = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    b.wait_for("the generation accepting a request", || fds() > idle);
    let t0 = Instant::now();
    let out = b.tb.run(&["/bin/sh", "-c", &format!("kill -USR1 {pid1}")]).unwrap();
    assert!(out.success(), "{out}");
    let mut states = std::collections::BTreeSet::new();
    let mut pid2 = None;
    b.wait_for("the replacement serving", || {
        states.insert(format!("{}/{}", b.show(APP, "ActiveState"), b.show(APP, "SubState")));
        pid2 = b.probe_starts().last().copied().filter(|&p| p != pid1);
        pid2.is_some_and(|p| ask(b.port) == Ok(format!("http {p}")))
    });
    let replaced_in = t0.elapsed();
    drop(in_flight);
    for _ in 0..10 {
        states.insert(format!("{}/{}", b.show(APP, "ActiveState"), b.show(APP, "SubState")));
    }
    // Seen on a loaded machine: the sample fell inside the replacement's
    // start (RELOADING=1 ... READY=1): `reloading/running` on 257,
    // `reloading/reload-notify` on 262. Only a STOPPING=1 would deactivate.
    assert!(
        states.iter().all(|s| s.starts_with("active/") || s.starts_with("reloading/")),
        "a generation's STOPPING=1 reached systemd: {states:?}"
    );
    assert!(states.contains("active/running"), "{states:?}");
    assert_eq!(b.show(APP, "MainPID"), main2, "baton must stay the main process");
    let journal = b.journal(Some(APP));
    assert!(journal.contains("is stopping on its own; starting a replacement"), "{journal}");

    // RESTART_RESET=1 once generation 2 has served for 10 s.
    b.tb.wait_for("RESTART_RESET=1 in baton's log", Duration::from_secs(40), || {
        b.journal(Some(APP)).contains("RESTART_RESET=1 (earlier restarts")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", b.journal(Some(APP))));
    let expected = if version >= 258 { "0" } else { "1" };
    b.wait_for(&format!("NRestarts={expected}"), || b.show(APP, "NRestarts") == expected);
    assert_eq!(format!("{}/{}", b.show(APP, "ActiveState"), b.show(APP, "SubState")), "active/running");
    assert_eq!(ask(b.port), Ok(format!("http {}", pid2.unwrap())));
    eprintln!(
        "systemd {version}: generation's own STOPPING=1 replaced in {replaced_in:?}, unit stayed active/running; \
         after RESTART_RESET=1 NRestarts={}",
        b.show(APP, "NRestarts")
    );
}

/// `systemctl stop` with `KillMode=control-group`: systemd's SIGTERM
/// reaches Baton and the generation at once, and the generation (the probe,
/// kept draining by a request in flight) answers it with its own
/// `STOPPING=1`. In 20 stops Baton never spawns a replacement, and every
/// stop ends `inactive` with `Result=success`.
fn systemctl_stop_spawns_no_replacement(b: &Bed) {
    const ROUNDS: usize = 20;
    let unit = format!(
        "[Service]\nType=notify\nKillMode=control-group\nRuntimeDirectory=baton\n\
         ExecStart={} run -l http=127.0.0.1:{} --name app -- {} --serve http --reply-delay-ms 300 --report {}\n",
        baton_bin(),
        b.port,
        probe_bin().display(),
        b.report_path().display()
    );
    b.tb.install_unit("app.service", &unit).unwrap_or_else(|e| panic!("install: {e}"));
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        b.systemctl_ok(&["start", "app.service"]);
        let pid = *b.probe_starts().last().unwrap();
        let fds = || {
            let out = b.tb.run(&["/bin/sh", "-c", &format!("ls /proc/{pid}/fd | wc -l")]).unwrap();
            out.stdout_trimmed().parse::<usize>().unwrap_or(0)
        };
        let idle = fds();
        let in_flight = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
        b.wait_for("the generation accepting a request", || fds() > idle);
        b.systemctl_ok(&["stop", "app.service"]);
        drop(in_flight);
        assert_eq!(b.show(APP, "Result"), "success", "round {round}");
        let journal = b.journal(Some(APP));
        assert!(!journal.contains("generation 2 started"), "round {round}: a replacement was spawned:\n{journal}");
    }
    eprintln!(
        "systemd {}: {ROUNDS} stops under KillMode=control-group with the generation's own STOPPING=1, no \
         replacement spawned ({:?})",
        b.tb.systemd_version(),
        t0.elapsed()
    );
}

/// The real `systemd-notify --pid` of each version names the main process
/// to Baton: 252's with `MAINPID=` alone, 257's and 262's with
/// `MAINPIDFDID=` too (the pidfd id, Linux 6.9+), which Baton checks
/// against the process holding the pid before taking it.
fn systemd_notify_pid_names_the_main_process(b: &Bed) {
    let version = b.tb.systemd_version();
    let control = "/run/baton/app.sock";
    let script = "sleep 1000 & echo $! > /run/baton/forked; systemd-notify --ready --pid=$!; wait";
    let unit = format!(
        "[Service]\nType=notify\nRuntimeDirectory=baton\n\
         ExecStart={} run --control {control} --notify-access all -- /bin/sh -c '{script}'\n",
        baton_bin()
    );
    b.tb.install_unit("app.service", &unit).unwrap_or_else(|e| panic!("install: {e}"));
    b.systemctl_ok(&["start", "app.service"]);
    let forked = || b.tb.run(&["cat", "/run/baton/forked"]).ok().and_then(|o| o.stdout_trimmed().parse::<u32>().ok());
    let mut sleeper = 0;
    b.wait_for("the forked pid", || {
        sleeper = forked().unwrap_or(0);
        sleeper != 0
    });
    let named = format!("generation 1's main process is now {sleeper} (named by ");
    b.wait_for("Baton taking the main process", || b.journal(Some(APP)).contains(&named));
    let journal = b.journal(Some(APP));
    let how = journal[journal.find(&named).unwrap() + named.len()..].lines().next().unwrap_or("").to_owned();
    let status = b.tb.run(&[baton_bin(), "status", "--json", "--control", control]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert_eq!(status["generations"][0]["pid"], sleeper, "{status}");
    assert!(!journal.contains("ignored"), "{journal}");
    if version >= 257 && kernel_release_at_least(6, 9) {
        assert!(how.starts_with("pid and MAINPIDFDID="), "systemd-notify {version} sends MAINPIDFDID=: {how}");
    } else {
        assert!(how.starts_with("pid)"), "systemd-notify {version} sends MAINPID= alone: {how}");
    }
    eprintln!("systemd-notify {version} --pid: Baton's generation 1 main process {sleeper}, named by {how}");
}

/// Boots `flavor` for the test `name` and runs `scenario` in it.
fn run_scenario(flavor: Flavor, name: &str, scenario: fn(&Bed)) {
    let Some(b) = Bed::builder(flavor, name).report().boot() else { return };
    assert_eq!(b.tb.systemd_version(), flavor.expected_systemd());
    let t0 = Instant::now();
    scenario(&b);
    eprintln!("{name}: scenario {:?} (boot {:?})", t0.elapsed(), b.tb.boot_duration());
}

// One test per systemd version: `scenario::systemd_252`, ...
baton_testbed::systemd_tests!(
    grouped by scenario, run_scenario:
    stopping_is_never_forwarded_and_restart_reset,
    systemctl_stop_spawns_no_replacement,
    systemd_notify_pid_names_the_main_process
);
