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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};
use baton_testbed::{Flavor, Testbed, cargo_bin, free_loopback_port, skip_unless_root};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(60);
/// Idle keep-alive connections held across each command (the figure
/// measured by hand on 252 before: 20 of 20).
const IDLE: usize = 20;
const SERVICE: &str = "baton-httpd.service";
const SOCKET: &str = "baton-httpd.socket";
const INDEX: &str = "hello from restart_versions\n";

/// One parsed response of baton-httpd.
struct Response {
    status: u16,
    /// `baton-pid`: the generation's pid.
    pid: u32,
}

/// `GET /` with keep-alive on `stream`, reading exactly one response.
fn request(stream: &mut BufReader<TcpStream>) -> Result<Response, String> {
    stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    if stream.read_line(&mut line).map_err(|e| format!("read status line: {e}"))? == 0 {
        return Err("closed by the server without a response".into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        stream.read_line(&mut line).map_err(|e| format!("read headers: {e}"))?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no Content-Length in {headers:?}"))?;
    let mut body = vec![0; len];
    stream.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    if body != INDEX.as_bytes() {
        return Err(format!("unexpected body {:?}", String::from_utf8_lossy(&body)));
    }
    let pid =
        headers.get("baton-pid").and_then(|v| v.parse().ok()).ok_or_else(|| format!("no baton-pid: {headers:?}"))?;
    Ok(Response { status, pid })
}

fn connect(port: u16) -> Result<BufReader<TcpStream>, String> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).map_err(|e| format!("timeout: {e}"))?;
    s.set_write_timeout(Some(WAIT)).map_err(|e| format!("timeout: {e}"))?;
    Ok(BufReader::new(s))
}

/// One request on a fresh connection: the serving generation's pid.
fn serving_pid(port: u16) -> Result<u32, String> {
    let r = request(&mut connect(port)?)?;
    if r.status == 200 { Ok(r.pid) } else { Err(format!("status {}", r.status)) }
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
                let r = request(&mut s).unwrap_or_else(|e| panic!("idle connection {i}, first request: {e}"));
                assert_eq!(r.status, 200, "idle connection {i}");
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
            Ok(r) if r.status == 200 => {
                pids.push(r.pid);
                true
            }
            Ok(r) => {
                errors.push(format!("status {}", r.status));
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

struct Bed {
    tb: Testbed,
    port: u16,
    name: String,
}

impl Bed {
    /// Boots `flavor`, installs the binaries as packaged and the units
    /// `baton units` generates there for this systemd, and starts them.
    fn boot(flavor: Flavor, name: &str) -> Option<Bed> {
        if !skip_unless_root(name) {
            return None;
        }
        let tb = Testbed::boot(flavor).unwrap_or_else(|e| panic!("{name}: boot {flavor}: {e}"));
        assert_eq!(tb.systemd_version(), flavor.expected_systemd(), "{name}");
        let port = free_loopback_port();
        let bed = Bed { tb, port, name: name.to_owned() };
        bed.install_binary(Path::new(env!("CARGO_BIN_EXE_baton")), "/usr/bin/baton");
        bed.install_binary(&cargo_bin("baton-httpd", "baton-httpd"), "/usr/bin/baton-httpd");
        bed.tb.write_file("/usr/share/baton-httpd/www/index.html", INDEX).unwrap();
        let listen = format!("http=127.0.0.1:{port}");
        let generate = [
            "/usr/bin/baton",
            "units",
            "--name",
            "baton-httpd",
            "--listen",
            &listen,
            "--output",
            "/etc/systemd/system",
            "--",
            "/usr/bin/baton-httpd",
            "--root",
            "/usr/share/baton-httpd/www",
        ];
        bed.tb.run_checked(&generate).unwrap_or_else(|e| panic!("{name}: baton units: {e}"));
        bed.tb.daemon_reload().unwrap();
        assert_eq!(bed.show("Type"), "notify", "{name}: the units were generated for this systemd");
        bed.systemctl_ok(&["start", SOCKET, SERVICE]);
        bed.wait_new_pid(0);
        Some(bed)
    }

    /// Copies a host binary to `to` inside (not under /root, which
    /// `ProtectHome=` hides).
    fn install_binary(&self, from: &Path, to: &str) {
        let dest = self.tb.host_path(to);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("{}: copy {} to {to}: {e}", self.name, from.display()));
    }

    fn show(&self, prop: &str) -> String {
        self.tb.show(SERVICE, prop).unwrap_or_else(|e| panic!("{}: show {prop}: {e}", self.name))
    }

    fn systemctl_ok(&self, args: &[&str]) {
        self.tb.systemctl_checked(args).unwrap_or_else(|e| panic!("{}: systemctl {args:?}: {e}", self.name));
    }

    /// Waits until a fresh connection is served by a pid other than `old`.
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

    /// Runs `systemctl <verb> baton-httpd` under load with [`IDLE`] idle
    /// keep-alive connections held across it.
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
    let Some(bed) = Bed::boot(flavor, name) else { return };
    let main = bed.show("MainPID");

    let restart = bed.under_load("restart");
    let main_after_restart = bed.show("MainPID");
    assert_ne!(main_after_restart, main, "{name}: systemctl restart restarts Baton");
    assert_eq!(bed.show("NRestarts"), "0", "{name}: an asked-for restart is not an automatic one");

    let reload = bed.under_load("reload");
    assert_eq!(bed.show("MainPID"), main_after_restart, "{name}: systemctl reload keeps Baton");

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
    assert_eq!(bed.show("Result"), "success", "{name}");
}

#[test]
fn restart_and_reload_on_252() {
    restart_and_reload(Flavor::Host, "restart_and_reload_on_252");
}

#[test]
fn restart_and_reload_on_257() {
    restart_and_reload(Flavor::Trixie, "restart_and_reload_on_257");
}

#[test]
fn restart_and_reload_on_262() {
    restart_and_reload(Flavor::Forky, "restart_and_reload_on_262");
}
