//! Conformance of `baton-sd` against a real systemd, 252 (the host's), 257
//! (Debian trixie) and 262 (Debian forky): the probe service (`crates/sd-probe`, built only on
//! `baton-sd`) runs as a real `.socket` + `Type=notify` `.service` and every
//! protocol claim is checked through systemd's own view (`systemctl show`,
//! the journal) and through real loopback connections.
//!
//! Each scenario boots its own testbed, so scenarios run in parallel and a
//! failure shows that scenario's journal only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_testbed::probe::ask;
use baton_testbed::{Flavor, Testbed, cargo_bin, free_loopback_port, skip_unless_root};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(30);

struct Probe {
    tb: Testbed,
    bin: PathBuf,
    report: PathBuf,
}

impl Probe {
    /// Boots a testbed, or returns `None` when the test may skip (see
    /// [`skip_unless_root`]).
    fn boot(flavor: Flavor, test: &str) -> Option<Probe> {
        if !skip_unless_root(test) {
            return None;
        }
        let bin = cargo_bin("sd-probe", "baton-sd-probe");
        let tb = Testbed::boot(flavor).unwrap_or_else(|e| panic!("{test}: boot {flavor}: {e}"));
        let report = tb.scratch().join("report");
        Some(Probe { tb, bin, report })
    }

    /// `ExecStart=` for the probe with these options and our report file.
    fn exec(&self, opts: &str) -> String {
        self.exec_to(&self.report, opts)
    }

    /// `ExecStart=` for the probe reporting to another file.
    fn exec_to(&self, report: &Path, opts: &str) -> String {
        format!("{} --report {} {opts}", self.bin.display(), report.display())
    }

    fn install(&self, name: &str, unit: &str) {
        self.tb.install_unit(name, unit).unwrap_or_else(|e| panic!("install {name}: {e}"));
    }

    fn systemctl(&self, args: &[&str]) -> baton_testbed::CmdOutput {
        self.tb.systemctl(args).unwrap_or_else(|e| panic!("systemctl {args:?}: {e}"))
    }

    fn ok(&self, args: &[&str]) {
        self.tb.systemctl_checked(args).unwrap_or_else(|e| panic!("systemctl {args:?}: {e}"));
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.tb.show(unit, prop).unwrap_or_else(|e| panic!("show {unit} {prop}: {e}"))
    }

    /// The report, split into one block per start of the probe.
    fn starts(&self) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(&self.report).unwrap_or_default();
        let mut blocks: Vec<Vec<String>> = Vec::new();
        for line in text.lines() {
            if line.starts_with("start ") {
                blocks.push(Vec::new());
            }
            if let Some(b) = blocks.last_mut() {
                b.push(line.to_owned());
            }
        }
        blocks
    }

    fn wait_starts(&self, n: usize, line: &str) -> Vec<Vec<String>> {
        self.tb
            .wait_for(&format!("start #{n} of the probe reporting {line:?}"), WAIT, || {
                self.starts().get(n - 1).is_some_and(|b| b.iter().any(|l| l == line))
            })
            .unwrap_or_else(|e| panic!("{e}\nreport:\n{}", self.report_text()));
        self.starts()
    }

    fn report_text(&self) -> String {
        std::fs::read_to_string(&self.report).unwrap_or_default()
    }

    fn journal(&self, unit: &str) -> String {
        self.tb.journal(Some(unit)).unwrap_or_else(|e| panic!("journal: {e}"))
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
fn start_waits_for_ready(p: &Probe) {
    let port = free_loopback_port();
    p.install("probe.socket", &socket_unit(port, "http"));
    p.install(
        "probe.service",
        &format!(
            "[Service]\nType=notify\nExecStart={}\n",
            p.exec("--serve http --ready-delay-ms 1500 --status probe-is-ready")
        ),
    );
    p.ok(&["start", "probe.socket"]);
    let t0 = Instant::now();
    p.ok(&["start", "probe.service"]);
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
fn named_sockets(p: &Probe) {
    let (a, b) = (free_loopback_port(), free_loopback_port());
    p.install("probe-a.socket", &socket_unit(a, "alpha"));
    p.install("probe-b.socket", &socket_unit(b, "beta"));
    p.install(
        "probe.service",
        &format!(
            "[Service]\nType=notify\nSockets=probe-a.socket probe-b.socket\nExecStart={}\n",
            p.exec("--serve beta --serve alpha")
        ),
    );
    p.ok(&["start", "probe-a.socket", "probe-b.socket"]);
    p.ok(&["start", "probe.service"]);
    let pid = pid_of(&p.starts()[0]).to_owned();
    assert_eq!(ask(a), Ok(format!("alpha {pid}")));
    assert_eq!(ask(b), Ok(format!("beta {pid}")));
    let fds = p.starts()[0].iter().filter(|l| l.starts_with("fd ")).count();
    assert_eq!(fds, 2, "{}", p.report_text());
}

/// A memfd stored with FDSTORE=1 survives `systemctl restart` and a crash
/// with `Restart=always`; FDSTOREREMOVE removes it.
fn fd_store(p: &Probe) {
    let service = |opts: &str| {
        format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=notify\nFileDescriptorStoreMax=8\n\
             Restart=always\nRestartSec=100ms\nExecStart={}\n",
            p.exec(opts)
        )
    };
    p.install("probe.service", &service("--store state=kept-across-restarts"));
    p.ok(&["start", "probe.service"]);
    let s = p.wait_starts(1, "ready");
    assert!(has(&s[0], "store-sent name=state"), "{}", p.report_text());

    p.ok(&["restart", "probe.service"]);
    let s = p.wait_starts(2, "ready");
    assert!(has(&s[1], "stored name=state content=kept-across-restarts"), "after restart:\n{}", p.report_text());
    assert!(!has(&s[1], "store-sent name=state"));

    // A crash: SIGKILL, then systemd's auto-restart.
    p.ok(&["kill", "--signal=SIGKILL", "probe.service"]);
    let s = p.wait_starts(3, "ready");
    assert!(has(&s[2], "stored name=state content=kept-across-restarts"), "after crash:\n{}", p.report_text());
    assert_eq!(p.show("probe.service", "NRestarts"), "1");

    // daemon-reload keeps the store; the next start removes the entry.
    p.install("probe.service", &service("--remove state"));
    p.ok(&["restart", "probe.service"]);
    let s = p.wait_starts(4, "ready");
    assert!(s[3].iter().any(|l| l.starts_with("fd ") && l.contains("name=state")), "{}", p.report_text());
    assert!(has(&s[3], "remove-sent name=state"));
    // FDSTOREREMOVE and READY=1 are separate datagrams from one sender,
    // processed in order, so the removal is done once the restart below
    // (queued after READY) runs.
    p.ok(&["restart", "probe.service"]);
    let s = p.wait_starts(5, "ready");
    assert!(
        !s[4].iter().any(|l| l.starts_with("fd ") && l.contains("name=state")),
        "FDSTOREREMOVE did not remove it:\n{}",
        p.report_text()
    );
}

/// `BARRIER=1` is acknowledged.
fn barrier(p: &Probe) {
    p.install("probe.service", &format!("[Service]\nType=notify\nExecStart={}\n", p.exec("--barrier")));
    p.ok(&["start", "probe.service"]);
    p.wait_starts(1, "barrier ok");
}

/// Missed watchdog pings make systemd restart the service; regular pings
/// keep it alive.
fn watchdog(p: &Probe) {
    p.install(
        "probe.service",
        &format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=notify\nWatchdogSec=1s\nRestart=on-watchdog\n\
             RestartSec=100ms\nExecStart={}\n",
            p.exec("")
        ),
    );
    p.ok(&["start", "probe.service"]);
    let s = p.wait_starts(2, "ready");
    assert_ne!(pid_of(&s[0]), pid_of(&s[1]));
    assert!(p.journal("probe.service").contains("Watchdog timeout"), "{}", p.journal("probe.service"));

    let pinging = p.tb.scratch().join("pinging");
    p.install(
        "probe-pinging.service",
        &format!(
            "[Service]\nType=notify\nWatchdogSec=2s\nRestart=on-watchdog\nExecStart={}\n",
            p.exec_to(&pinging, "--watchdog")
        ),
    );
    p.ok(&["start", "probe-pinging.service"]);
    let pid = p.show("probe-pinging.service", "MainPID");
    // Three watchdog periods; pings every second keep it alive throughout.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(p.show("probe-pinging.service", "NRestarts"), "0", "{}", p.journal("probe-pinging.service"));
    assert_eq!(p.show("probe-pinging.service", "MainPID"), pid);
    let report = std::fs::read_to_string(&pinging).unwrap();
    assert!(report.contains("watchdog usec=2000000"), "{report}");
}

/// EXTEND_TIMEOUT_USEC keeps a slow start alive past TimeoutStartSec=, and
/// without it the same start times out.
fn extend_timeout(p: &Probe) {
    let unit = |report: &Path, opts: &str| {
        format!("[Service]\nType=notify\nTimeoutStartSec=2s\nExecStart={}\n", p.exec_to(report, opts))
    };
    p.install("probe.service", &unit(&p.report, "--ready-delay-ms 5000 --extend-ms 2000"));
    let t0 = Instant::now();
    p.ok(&["start", "probe.service"]);
    assert!(t0.elapsed() >= Duration::from_secs(5));
    assert_eq!(p.show("probe.service", "ActiveState"), "active");
    assert!(has(&p.starts()[0], "extend-sent"));

    p.install("probe-slow.service", &unit(Path::new("/dev/null"), "--ready-delay-ms 5000"));
    let out = p.systemctl(&["start", "probe-slow.service"]);
    assert!(!out.success(), "a 5 s start with TimeoutStartSec=2s and no extension must fail");
    assert!(p.journal("probe-slow.service").contains("timed out"), "{}", p.journal("probe-slow.service"));
}

/// `Type=notify-reload` (systemd ≥ 253): RELOADING=1 + MONOTONIC_USEC, then
/// READY=1, completes `systemctl reload`.
fn notify_reload(p: &Probe) {
    p.install("probe.service", &format!("[Service]\nType=notify-reload\nExecStart={}\n", p.exec("--reload")));
    p.ok(&["start", "probe.service"]);
    let pid = p.show("probe.service", "MainPID");
    p.ok(&["reload", "probe.service"]);
    let s = p.wait_starts(1, "reloaded");
    assert_eq!(s.len(), 1, "reload must not restart");
    assert_eq!(p.show("probe.service", "MainPID"), pid);
    assert_eq!(p.show("probe.service", "ActiveState"), "active");
}

/// A `LISTEN_PID` meant for another process: no fds are taken.
fn wrong_listen_pid(p: &Probe) {
    let port = free_loopback_port();
    p.install("probe.socket", &socket_unit(port, "http"));
    p.install(
        "probe.service",
        &format!("[Service]\nType=notify\nExecStart=/bin/sh -c 'LISTEN_PID=1 exec {}'\n", p.exec("")),
    );
    p.ok(&["start", "probe.socket", "probe.service"]);
    let s = p.wait_starts(1, "ready");
    let pid = pid_of(&s[0]).to_owned();
    assert!(has(&s[0], &format!("other-pid listen_pid=1 own_pid={pid}")), "{}", p.report_text());
    assert!(!s[0].iter().any(|l| l.starts_with("fd ")), "{}", p.report_text());
}

/// Garbage in `LISTEN_FDS`: a clear error naming the variable, and the
/// service fails instead of running without its socket.
fn garbage_env(p: &Probe) {
    let port = free_loopback_port();
    p.install("probe.socket", &socket_unit(port, "http"));
    p.install(
        "probe.service",
        &format!("[Service]\nType=notify\nExecStart=/bin/sh -c 'LISTEN_FDS=3x exec {}'\n", p.exec("")),
    );
    p.ok(&["start", "probe.socket"]);
    assert!(!p.systemctl(&["start", "probe.service"]).success());
    let journal = p.journal("probe.service");
    assert!(journal.contains(r#"LISTEN_FDS="3x" is invalid"#), "{journal}");
    assert_eq!(p.show("probe.service", "ActiveState"), "failed");
}

/// Instantiates each scenario on systemd 252, 257 and 262 (the name is from
/// when there were two).
macro_rules! on_both {
    ($($scenario:ident),* $(,)?) => {
        mod systemd_252 {
            $(#[test] fn $scenario() {
                if let Some(p) = super::Probe::boot(baton_testbed::Flavor::Host, concat!("systemd_252::", stringify!($scenario))) {
                    assert_eq!(p.tb.systemd_version(), 252);
                    super::$scenario(&p);
                }
            })*
        }
        mod systemd_257 {
            $(#[test] fn $scenario() {
                if let Some(p) = super::Probe::boot(baton_testbed::Flavor::Trixie, concat!("systemd_257::", stringify!($scenario))) {
                    assert_eq!(p.tb.systemd_version(), 257);
                    super::$scenario(&p);
                }
            })*
        }
        mod systemd_262 {
            $(#[test] fn $scenario() {
                if let Some(p) = super::Probe::boot(baton_testbed::Flavor::Forky, concat!("systemd_262::", stringify!($scenario))) {
                    assert_eq!(p.tb.systemd_version(), 262);
                    super::$scenario(&p);
                }
            })*
        }
    };
}

on_both!(
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
    if let Some(p) = Probe::boot(Flavor::Trixie, "systemd_257_notify_reload") {
        assert_eq!(p.tb.systemd_version(), 257);
        notify_reload(&p);
    }
}

#[test]
fn systemd_262_notify_reload() {
    if let Some(p) = Probe::boot(Flavor::Forky, "systemd_262_notify_reload") {
        assert_eq!(p.tb.systemd_version(), 262);
        notify_reload(&p);
    }
}
