//! `systemctl restart app` and `systemctl reload app` — the user's own words
//! — in the supervised topology, under load, on systemd 252 (the host's),
//! 257 (Debian trixie) and 262 (Debian forky).
//!
//! The units are the ones `baton units` generates inside each testbed for
//! its own systemd (`Type=notify` + `ExecReload=+baton restart --wait` on
//! every version, so that a refused restart fails the reload), running the reference server as packaged
//! (`/usr/bin/baton`, `/usr/bin/baton-httpd`). During each command:
//!
//! - paced load (`baton_testbed::load`, keep-alive and new-connection
//!   clients) fails no request;
//! - [`IDLE`] idle keep-alive connections, opened and used once before,
//!   are each answered again afterwards on the same TCP connection: on
//!   restart they went from the old generation through Baton and systemd's
//!   fd store (`FDSTORE=1`, `FileDescriptorStoreMax=`) to the new Baton's
//!   generation; on reload, from the old generation to the new one.
//!
//! Figures (time of the command, time until a new process serves, requests
//! served and failed, idle connections kept) are printed per version; run
//! with `--nocapture` to see them.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_testbed::httpd;
use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};
use baton_testbed::{Bed, Flavor, cargo_bin};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(60);
/// Idle keep-alive connections held across each command (the figure
/// measured by hand on 252 before: 20 of 20).
const IDLE: usize = 20;
const SERVICE: &str = "baton-httpd.service";
const SOCKET: &str = "baton-httpd.socket";
const INDEX: &str = "hello from restart_versions\n";

/// `GET /` with keep-alive on `stream`, reading exactly one response,
/// whose body must be [`INDEX`]: the status and the generation's pid.
fn request(stream: &mut BufReader<TcpStream>) -> Result<(u16, u32), String> {
    let r = httpd::get(stream, "/", false)?;
    if r.body != INDEX.as_bytes() {
        return Err(format!("unexpected body {:?}", String::from_utf8_lossy(&r.body)));
    }
    Ok((r.status, r.pid()?))
}

fn connect(port: u16) -> Result<BufReader<TcpStream>, String> {
    httpd::connect(port, WAIT)
}

/// One request on a fresh connection: the serving generation's pid.
fn serving_pid(port: u16) -> Result<u32, String> {
    let (status, pid) = request(&mut connect(port)?)?;
    if status == 200 { Ok(pid) } else { Err(format!("status {status}")) }
}

/// [`IDLE`] keep-alive connections, each used once and then left idle.
struct IdleConnections {
    streams: Vec<BufReader<TcpStream>>,
}

impl IdleConnections {
    fn open(port: u16) -> IdleConnections {
        let streams = (0..IDLE)
            .map(|i| {
                let mut s = connect(port).unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
                let (status, _) = request(&mut s).unwrap_or_else(|e| panic!("idle connection {i}, first request: {e}"));
                assert_eq!(status, 200, "idle connection {i}");
                s
            })
            .collect();
        IdleConnections { streams }
    }

    /// Sends one more request on each connection; keeps those answered and
    /// returns (kept, the pids that answered, the errors of the others).
    fn use_again(&mut self) -> (usize, Vec<u32>, Vec<String>) {
        let mut pids = Vec::new();
        let mut errors = Vec::new();
        self.streams.retain_mut(|s| match request(s) {
            Ok((200, pid)) => {
                pids.push(pid);
                true
            }
            Ok((status, _)) => {
                errors.push(format!("status {status}"));
                false
            }
            Err(e) => {
                errors.push(e);
                false
            }
        });
        (self.streams.len(), pids, errors)
    }
}

/// What one command cost, as printed.
struct Figures {
    command: Duration,
    until_new_serves: Duration,
    report: LoadReport,
    kept: usize,
}

/// What these tests add to the shared [`Bed`].
trait RestartBed {
    /// Boots `flavor`, installs the binaries as packaged and the units
    /// `baton units` generates there for this systemd, and starts them.
    fn boot_started(flavor: Flavor, name: &str) -> Option<Bed>;
    /// Waits until a fresh connection is served by a pid other than `old`.
    fn wait_new_pid(&self, old: u32) -> u32;
    /// Runs `systemctl <verb> baton-httpd` under load with [`IDLE`] idle
    /// keep-alive connections held across it.
    fn under_load(&self, verb: &str) -> Figures;
}

impl RestartBed for Bed {
    fn boot_started(flavor: Flavor, name: &str) -> Option<Bed> {
        let bed = Bed::builder(flavor, name)
            .wait(WAIT)
            .binary(env!("CARGO_BIN_EXE_baton"), "/usr/bin/baton")
            .binary(cargo_bin("baton-httpd", "baton-httpd"), "/usr/bin/baton-httpd")
            .boot()?;
        assert_eq!(bed.tb.systemd_version(), flavor.expected_systemd(), "{name}");
        bed.tb.write_file("/usr/share/baton-httpd/www/index.html", INDEX).unwrap();
        bed.generate_httpd_units(&[], &["--root", "/usr/share/baton-httpd/www"]);
        assert_eq!(bed.show(SERVICE, "Type"), "notify", "{name}: the units were generated for this systemd");
        bed.systemctl_ok(&["start", SOCKET, SERVICE]);
        bed.wait_new_pid(0);
        Some(bed)
    }

    fn wait_new_pid(&self, old: u32) -> u32 {
        let mut pid = 0;
        let what = format!("{}: a generation other than pid {old} to serve", self.name);
        self.tb
            .wait_for(&what, WAIT, || {
                pid = serving_pid(self.port).unwrap_or(old);
                pid != old
            })
            .unwrap_or_else(|e| panic!("{e}"));
        pid
    }

    fn under_load(&self, verb: &str) -> Figures {
        let mut idle = IdleConnections::open(self.port);
        let before = serving_pid(self.port).unwrap_or_else(|e| panic!("{}: before {verb}: {e}", self.name));
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let config = |mode| {
            LoadConfig::new(addr)
                .path("/index.html")
                .mode(mode)
                .connections(2)
                .rate(Some(100))
                .request_timeout(Duration::from_secs(30))
                .max_duration(Duration::from_secs(300))
        };
        let keepalive = Load::start(config(Mode::KeepAlive)).unwrap();
        let fresh = Load::start(config(Mode::NewConnection)).unwrap();
        assert!(keepalive.wait_for_ok(100, WAIT) && fresh.wait_for_ok(100, WAIT), "{}: load did not start", self.name);

        let t0 = Instant::now();
        self.systemctl_ok(&[verb, SERVICE]);
        let command = t0.elapsed();
        let after = self.wait_new_pid(before);
        let until_new_serves = t0.elapsed();
        // After a reload the old generation drains: once it is gone, every
        // idle connection it held was handed over (or lost), so the requests
        // below cannot race with the handover.
        let what = format!("{}: the old generation (pid {before}) to exit after {verb}", self.name);
        self.tb
            .wait_for(&what, WAIT, || !self.tb.run(&["test", "-d", &format!("/proc/{before}")]).unwrap().success())
            .unwrap_or_else(|e| panic!("{e}"));
        let (kept, pids, errors) = idle.use_again();
        // Let both loads go through the new generation for a while.
        let (k0, f0) = (keepalive.progress().ok, fresh.progress().ok);
        assert!(
            keepalive.wait_for_ok(k0 + 100, WAIT) && fresh.wait_for_ok(f0 + 100, WAIT),
            "{}: load stalled after {verb}",
            self.name
        );
        let mut report = keepalive.stop();
        let fresh = fresh.stop();
        report.requests += fresh.requests;
        report.ok += fresh.ok;
        for (kind, n) in fresh.failures {
            *report.failures.entry(kind).or_default() += n;
        }
        report.server_closed_connections += fresh.server_closed_connections;

        eprintln!(
            "{}: systemctl {verb}: command {command:?}, new generation serving after {until_new_serves:?}; \
             load: {} requests, {} failed {:?}; idle keep-alive connections kept: {kept} of {IDLE} \
             (answered by pids {:?}, old pid {before}, new {after})",
            self.name,
            report.requests,
            report.failed(),
            report.failures,
            pids.iter().collect::<std::collections::BTreeSet<_>>(),
        );
        assert_eq!(report.failed(), 0, "{}: systemctl {verb}: failed requests {:?}", self.name, report.failures);
        assert_eq!(kept, IDLE, "{}: systemctl {verb}: idle connections lost: {errors:?}", self.name);
        assert!(
            pids.iter().all(|&p| p != before),
            "{}: systemctl {verb}: an idle connection was still answered by the old generation {before}: {pids:?}",
            self.name
        );
        Figures { command, until_new_serves, report, kept }
    }
}

fn restart_and_reload(flavor: Flavor, name: &str) {
    let Some(bed) = Bed::boot_started(flavor, name) else { return };
    let main = bed.show(SERVICE, "MainPID");

    let restart = bed.under_load("restart");
    let main_after_restart = bed.show(SERVICE, "MainPID");
    assert_ne!(main_after_restart, main, "{name}: systemctl restart restarts Baton");
    assert_eq!(bed.show(SERVICE, "NRestarts"), "0", "{name}: an asked-for restart is not an automatic one");

    let reload = bed.under_load("reload");
    assert_eq!(bed.show(SERVICE, "MainPID"), main_after_restart, "{name}: systemctl reload keeps Baton");

    for (verb, f) in [("restart", &restart), ("reload", &reload)] {
        eprintln!(
            "FIGURES systemd {} {verb}: {:?} command, {:?} until a new generation serves, {} requests {} failed, \
             {}/{IDLE} idle keep-alive connections kept",
            bed.tb.systemd_version(),
            f.command,
            f.until_new_serves,
            f.report.requests,
            f.report.failed(),
            f.kept
        );
    }
    bed.systemctl_ok(&["stop", SERVICE, SOCKET]);
    assert_eq!(bed.show(SERVICE, "Result"), "success", "{name}");
}

baton_testbed::systemd_tests! { restart_and_reload:
    restart_and_reload_on_252: Host,
    restart_and_reload_on_257: Trixie,
    restart_and_reload_on_262: Forky,
}
