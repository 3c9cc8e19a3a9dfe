//! Conformance of `baton-sd` against a real systemd, 252 (the host's), 257
//! (Debian trixie) and 262 (Debian forky): the probe service (`crates/sd-probe`, built only on
//! `baton-sd`) runs as a real `.socket` + `Type=notify` `.service` and every
//! protocol claim is checked through systemd's own view (`systemctl show`,
//! the journal) and through real loopback connections.
//!
//! Each scenario boots its own testbed, so scenarios run in parallel and a
//! failure shows that scenario's journal only.

use std::path::Path;
use std::time::{Duration, Instant};

use baton_testbed::probe::ask;
use baton_testbed::{Bed, Flavor, cargo_bin, free_loopback_port};

/// What the conformance scenarios add to the shared [`Bed`] (booted with
/// the probe's report).
trait Probe {
    /// `ExecStart=` for the probe with these options and our report file.
    fn exec(&self, opts: &str) -> String;
    /// `ExecStart=` for the probe reporting to another file.
    fn exec_to(&self, report: &Path, opts: &str) -> String;
    /// The report, split into one block per start of the probe.
    fn starts(&self) -> Vec<Vec<String>>;
    /// Waits for the `n`-th start to report `line`; all starts' blocks.
    fn wait_starts(&self, n: usize, line: &str) -> Vec<Vec<String>>;
}

impl Probe for Bed {
    fn exec(&self, opts: &str) -> String {
        self.exec_to(self.report_path(), opts)
    }

    fn exec_to(&self, report: &Path, opts: &str) -> String {
        format!("{} --report {} {opts}", cargo_bin("sd-probe", "baton-sd-probe").display(), report.display())
    }

    fn starts(&self) -> Vec<Vec<String>> {
        let mut blocks: Vec<Vec<String>> = Vec::new();
        for line in self.report_lines() {
            if line.starts_with("start ") {
                blocks.push(Vec::new());
            }
            if let Some(b) = blocks.last_mut() {
                b.push(line);
            }
        }
        blocks
    }

    fn wait_starts(&self, n: usize, line: &str) -> Vec<Vec<String>> {
        self.wait_for(&format!("start #{n} of the probe reporting {line:?}"), || {
            self.starts().get(n - 1).is_some_and(|b| b.iter().any(|l| l == line))
        });
        self.starts()
    }
}

/// A socket unit for `probe.service` on 127.0.0.1:`port`.
fn socket_unit(port: u16, fdname: &str) -> String {
    format!("[Socket]\nListenStream=127.0.0.1:{port}\nFileDescriptorName={fdname}\nService=probe.service\n")
}

fn has(block: &[String], line: &str) -> bool {
    block.iter().any(|l| l == line)
}

fn pid_of(block: &[String]) -> &str {
    block[0].strip_prefix("start pid=").expect("start line")
}

/// `systemctl start` returns only after READY=1, STATUS= reaches
/// `StatusText`, and the named socket arrives and serves.
fn start_waits_for_ready(p: &Bed) {
    let port = free_loopback_port();
    p.install_unit("probe.socket", &socket_unit(port, "http"));
    p.install_unit(
        "probe.service",
        &format!(
            "[Service]\nType=notify\nExecStart={}\n",
            p.exec("--serve http --ready-delay-ms 1500 --status probe-is-ready")
        ),
    );
    p.systemctl_ok(&["start", "probe.socket"]);
    let t0 = Instant::now();
    p.systemctl_ok(&["start", "probe.service"]);
    let took = t0.elapsed();
    // The probe writes `ready` right before sending READY=1, after 1.5 s.
    let starts = p.starts();
    assert_eq!(starts.len(), 1, "{}", p.report_text());
    assert!(has(&starts[0], "ready"), "systemctl start returned before READY=1:\n{}", p.report_text());
    assert!(took >= Duration::from_millis(1500), "start returned after {took:?}, before the probe's 1.5 s delay");
    assert_eq!(p.show("probe.service", "ActiveState"), "active");
    assert_eq!(p.show("probe.service", "StatusText"), "probe-is-ready");
    assert!(has(&starts[0], "fd 3 name=http kind=a listening TCP socket"), "{}", p.report_text());
    let pid = pid_of(&starts[0]).to_owned();
    assert_eq!(ask(port), Ok(format!("http {pid}")));
    assert_eq!(p.show("probe.service", "MainPID"), pid);
}

/// Two socket units with `FileDescriptorName=` reach the service by name.
fn named_sockets(p: &Bed) {
    let (a, b) = (free_loopback_port(), free_loopback_port());
    p.install_unit("probe-a.socket", &socket_unit(a, "alpha"));
    p.install_unit("probe-b.socket", &socket_unit(b, "beta"));
    p.install_unit(
        "probe.service",
        &format!(
            "[Service]\nType=notify\nSockets=probe-a.socket probe-b.socket\nExecStart={}\n",
            p.exec("--serve beta --serve alpha")
        ),
    );
    p.systemctl_ok(&["start", "probe-a.socket", "probe-b.socket"]);
    p.systemctl_ok(&["start", "probe.service"]);
    let pid = pid_of(&p.starts()[0]).to_owned();
    assert_eq!(ask(a), Ok(format!("alpha {pid}")));
    assert_eq!(ask(b), Ok(format!("beta {pid}")));
    let fds = p.starts()[0].iter().filter(|l| l.starts_with("fd ")).count();
    assert_eq!(fds, 2, "{}", p.report_text());
}

/// A memfd stored with FDSTORE=1 survives `systemctl restart` and a crash
/// with `Restart=always`; FDSTOREREMOVE removes it.
fn fd_store(p: &Bed) {
    let service = |opts: &str| {
        format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=notify\nFileDescriptorStoreMax=8\n\
             Restart=always\nRestartSec=100ms\nExecStart={}\n",
            p.exec(opts)
        )
    };
    p.install_unit("probe.service", &service("--store state=kept-across-restarts"));
    p.systemctl_ok(&["start", "probe.service"]);
    let s = p.wait_starts(1, "ready");
    assert!(has(&s[0], "store-sent name=state"), "{}", p.report_text());

    p.systemctl_ok(&["restart", "probe.service"]);
    let s = p.wait_starts(2, "ready");
    assert!(has(&s[1], "stored name=state content=kept-across-restarts"), "after restart:\n{}", p.report_text());
    assert!(!has(&s[1], "store-sent name=state"));

    // A crash: SIGKILL, then systemd's auto-restart.
    p.systemctl_ok(&["kill", "--signal=SIGKILL", "probe.service"]);
    let s = p.wait_starts(3, "ready");
    assert!(has(&s[2], "stored name=state content=kept-across-restarts"), "after crash:\n{}", p.report_text());
    assert_eq!(p.show("probe.service", "NRestarts"), "1");

    // daemon-reload keeps the store; the next start removes the entry.
    p.install_unit("probe.service", &service("--remove state"));
    p.systemctl_ok(&["restart", "probe.service"]);
    let s = p.wait_starts(4, "ready");
    assert!(s[3].iter().any(|l| l.starts_with("fd ") && l.contains("name=state")), "{}", p.report_text());
    assert!(has(&s[3], "remove-sent name=state"));
    // FDSTOREREMOVE and READY=1 are separate datagrams from one sender,
    // processed in order, so the removal is done once the restart below
    // (queued after READY) runs.
    p.systemctl_ok(&["restart", "probe.service"]);
    let s = p.wait_starts(5, "ready");
    assert!(
        !s[4].iter().any(|l| l.starts_with("fd ") && l.contains("name=state")),
        "FDSTOREREMOVE did not remove it:\n{}",
        p.report_text()
    );
}

/// `BARRIER=1` is acknowledged.
fn barrier(p: &Bed) {
    p.install_unit("probe.service", &format!("[Service]\nType=notify\nExecStart={}\n", p.exec("--barrier")));
    p.systemctl_ok(&["start", "probe.service"]);
    p.wait_starts(1, "barrier ok");
}

/// Missed watchdog pings make systemd restart the service; regular pings
/// keep it alive.
fn watchdog(p: &Bed) {
    p.install_unit(
        "probe.service",
        &format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=notify\nWatchdogSec=1s\nRestart=on-watchdog\n\
             RestartSec=100ms\nExecStart={}\n",
            p.exec("")
        ),
    );
    p.systemctl_ok(&["start", "probe.service"]);
    let s = p.wait_starts(2, "ready");
    assert_ne!(pid_of(&s[0]), pid_of(&s[1]));
    assert!(p.journal(Some("probe.service")).contains("Watchdog timeout"), "{}", p.journal(Some("probe.service")));

    let pinging = p.tb.scratch().join("pinging");
    p.install_unit(
        "probe-pinging.service",
        &format!(
            "[Service]\nType=notify\nWatchdogSec=2s\nRestart=on-watchdog\nExecStart={}\n",
            p.exec_to(&pinging, "--watchdog")
        ),
    );
    p.systemctl_ok(&["start", "probe-pinging.service"]);
    let pid = p.show("probe-pinging.service", "MainPID");
    // Three watchdog periods; pings every second keep it alive throughout.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(p.show("probe-pinging.service", "NRestarts"), "0", "{}", p.journal(Some("probe-pinging.service")));
    assert_eq!(p.show("probe-pinging.service", "MainPID"), pid);
    let report = std::fs::read_to_string(&pinging).unwrap();
    assert!(report.contains("watchdog usec=2000000"), "{report}");
}

/// EXTEND_TIMEOUT_USEC keeps a slow start alive past TimeoutStartSec=, and
/// without it the same start times out.
fn extend_timeout(p: &Bed) {
    let unit = |report: &Path, opts: &str| {
        format!("[Service]\nType=notify\nTimeoutStartSec=2s\nExecStart={}\n", p.exec_to(report, opts))
    };
    p.install_unit("probe.service", &unit(p.report_path(), "--ready-delay-ms 5000 --extend-ms 2000"));
    let t0 = Instant::now();
    p.systemctl_ok(&["start", "probe.service"]);
    assert!(t0.elapsed() >= Duration::from_secs(5));
    assert_eq!(p.show("probe.service", "ActiveState"), "active");
    assert!(has(&p.starts()[0], "extend-sent"));

    p.install_unit("probe-slow.service", &unit(Path::new("/dev/null"), "--ready-delay-ms 5000"));
    let out = p.systemctl(&["start", "probe-slow.service"]);
    assert!(!out.success(), "a 5 s start with TimeoutStartSec=2s and no extension must fail");
    assert!(p.journal(Some("probe-slow.service")).contains("timed out"), "{}", p.journal(Some("probe-slow.service")));
}

/// `Type=notify-reload` (systemd ≥ 253): RELOADING=1 + MONOTONIC_USEC, then
/// READY=1, completes `systemctl reload`.
fn notify_reload(p: &Bed) {
    p.install_unit("probe.service", &format!("[Service]\nType=notify-reload\nExecStart={}\n", p.exec("--reload")));
    p.systemctl_ok(&["start", "probe.service"]);
    let pid = p.show("probe.service", "MainPID");
    p.systemctl_ok(&["reload", "probe.service"]);
    let s = p.wait_starts(1, "reloaded");
    assert_eq!(s.len(), 1, "reload must not restart");
    assert_eq!(p.show("probe.service", "MainPID"), pid);
    assert_eq!(p.show("probe.service", "ActiveState"), "active");
}

/// A `LISTEN_PID` meant for another process: no fds are taken.
fn wrong_listen_pid(p: &Bed) {
    let port = free_loopback_port();
    p.install_unit("probe.socket", &socket_unit(port, "http"));
    p.install_unit(
        "probe.service",
        &format!("[Service]\nType=notify\nExecStart=/bin/sh -c 'LISTEN_PID=1 exec {}'\n", p.exec("")),
    );
    p.systemctl_ok(&["start", "probe.socket", "probe.service"]);
    let s = p.wait_starts(1, "ready");
    let pid = pid_of(&s[0]).to_owned();
    assert!(has(&s[0], &format!("other-pid listen_pid=1 own_pid={pid}")), "{}", p.report_text());
    assert!(!s[0].iter().any(|l| l.starts_with("fd ")), "{}", p.report_text());
}

/// Garbage in `LISTEN_FDS`: a clear error naming the variable, and the
/// service fails instead of running without its socket.
fn garbage_env(p: &Bed) {
    let port = free_loopback_port();
    p.install_unit("probe.socket", &socket_unit(port, "http"));
    p.install_unit(
        "probe.service",
        &format!("[Service]\nType=notify\nExecStart=/bin/sh -c 'LISTEN_FDS=3x exec {}'\n", p.exec("")),
    );
    p.systemctl_ok(&["start", "probe.socket"]);
    assert!(!p.systemctl(&["start", "probe.service"]).success());
    let journal = p.journal(Some("probe.service"));
    assert!(journal.contains(r#"LISTEN_FDS="3x" is invalid"#), "{journal}");
    assert_eq!(p.show("probe.service", "ActiveState"), "failed");
}

/// Boots `flavor` for the test `name` (with the probe's report) and runs
/// `scenario` in it.
fn run_scenario(flavor: Flavor, name: &str, scenario: fn(&Bed)) {
    if let Some(p) = Bed::builder(flavor, name).report().boot() {
        assert_eq!(p.tb.systemd_version(), flavor.expected_systemd());
        scenario(&p);
    }
}

// Each scenario on systemd 252, 257 and 262: `systemd_252::start_waits_for_ready`, ...
baton_testbed::systemd_tests!(
    grouped by version, run_scenario:
    start_waits_for_ready,
    named_sockets,
    fd_store,
    barrier,
    watchdog,
    extend_timeout,
    wrong_listen_pid,
    garbage_env,
);

/// `Type=notify-reload` exists only from systemd 253 on.
#[test]
fn systemd_257_notify_reload() {
    run_scenario(Flavor::Trixie, "systemd_257_notify_reload", notify_reload);
}

#[test]
fn systemd_262_notify_reload() {
    run_scenario(Flavor::Forky, "systemd_262_notify_reload", notify_reload);
}
