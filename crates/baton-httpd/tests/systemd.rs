//! baton-httpd under a real systemd — 252 (the host's) and 257 (Debian
//! trixie), booted by `baton-testbed` — deployed two ways:
//!
//! - as a `.socket` + `Type=notify` `.service` pair, restarted with
//!   `systemctl restart` (stop, then start; the fd store outlives the
//!   process);
//! - under Baton as the service's main process (`ExecStart=baton run …`,
//!   `ExecReload=baton restart`), restarted with `systemctl reload`: an
//!   overlapped restart, the old generation's connections pushed to the
//!   running new one.
//!
//! The scenarios are those of `tests/handoff.rs` and `tests/baton.rs`,
//! written against [`Deployment`]. Each test boots its own testbed, so a
//! failure shows that test's journal.

mod common;

use std::path::PathBuf;

use baton_testbed::{Flavor, Testbed, free_loopback_port, skip_unless_root};
use common::baton::{Gen, baton_bin, parse_generations, settled_after};
use common::client::{HttpConn, raise_nofile};
use common::scenarios::{self, Deployment, WAIT};

const SERVICE: &str = "baton-httpd.service";
const SOCKET: &str = "baton-httpd.socket";

/// baton-httpd as a socket-activated systemd service in a testbed.
struct Systemd {
    tb: Testbed,
    port: u16,
    root: PathBuf,
    extra: Vec<String>,
    restart_policy: &'static str,
}

impl Systemd {
    /// Boots `flavor`, installs the units and starts the service; `None`
    /// when the test may skip (see [`skip_unless_root`]).
    fn boot(flavor: Flavor, test: &str) -> Option<Self> {
        Self::boot_with(flavor, test, "on-failure")
    }

    fn boot_with(flavor: Flavor, test: &str, restart_policy: &'static str) -> Option<Self> {
        if !skip_unless_root(test) {
            return None;
        }
        let tb = Testbed::boot(flavor).unwrap_or_else(|e| panic!("{test}: boot {flavor}: {e}"));
        let root = scenarios::make_root(tb.scratch());
        let port = free_loopback_port();
        let d = Self { tb, port, root, extra: Vec::new(), restart_policy };
        d.tb.install_unit(
            SOCKET,
            &format!(
                "[Socket]\nListenStream=127.0.0.1:{port}\nFileDescriptorName=http\nService={SERVICE}\nBacklog=4096\n"
            ),
        )
        .expect("install the socket unit");
        d.install_service();
        d.ok(&["start", SOCKET]);
        d.ok(&["start", SERVICE]);
        Some(d)
    }

    fn install_service(&self) {
        let unit = format!(
            "[Unit]\nStartLimitIntervalSec=0\n\
             [Service]\nType=notify\nExecStart={bin} --root {root} --threads 2 {extra}\n\
             FileDescriptorStoreMax=4096\nLimitNOFILE=16384\nRestart={restart}\nRestartSec=200ms\n\
             Environment=RUST_LOG=info\n",
            bin = common::BIN,
            root = self.root.display(),
            extra = self.extra.join(" "),
            restart = self.restart_policy,
        );
        self.tb.install_unit(SERVICE, &unit).expect("install the service unit");
    }

    fn ok(&self, args: &[&str]) {
        self.tb.systemctl_checked(args).unwrap_or_else(|e| panic!("systemctl {args:?}: {e}"));
    }

    fn show(&self, prop: &str) -> String {
        self.tb.show(SERVICE, prop).unwrap_or_else(|e| panic!("show {prop}: {e}"))
    }

    fn main_pid(&self) -> u32 {
        self.show("MainPID").parse().unwrap_or(0)
    }
}

impl Deployment for Systemd {
    fn describe(&self) -> String {
        format!("systemd {}", self.tb.systemd_version())
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn restart(&mut self) {
        // Returns once the new instance sent READY=1 (Type=notify).
        self.ok(&["restart", SERVICE]);
    }

    fn begin_restart(&mut self) {
        self.ok(&["restart", "--no-block", SERVICE]);
    }

    fn wait_status(&mut self, what: &str, pred: &dyn Fn(&str) -> bool) {
        self.tb
            .wait_for(what, WAIT, || pred(&self.show("StatusText")))
            .unwrap_or_else(|e| panic!("{e}\nStatusText={}", self.show("StatusText")));
    }

    fn finish_restart(&mut self, old_pid: u32) {
        self.tb
            .wait_for("the new generation to be ready", WAIT, || {
                let pid = self.main_pid();
                pid != 0
                    && pid != old_pid
                    && self.show("ActiveState") == "active"
                    && self.show("StatusText").starts_with("serving")
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn set_extra_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(|s| s.to_string()).collect();
        self.install_service();
    }
}

const BATON_SERVICE: &str = "httpd.service";

/// baton-httpd under Baton, Baton being the main process of a systemd
/// service.
struct BatonUnderSystemd {
    tb: Testbed,
    baton: PathBuf,
    port: u16,
    root: PathBuf,
    extra: Vec<String>,
}

impl BatonUnderSystemd {
    fn boot(flavor: Flavor, test: &str) -> Option<Self> {
        if !skip_unless_root(test) {
            return None;
        }
        let baton = baton_bin();
        let tb = Testbed::boot(flavor).unwrap_or_else(|e| panic!("{test}: boot {flavor}: {e}"));
        let root = scenarios::make_root(tb.scratch());
        let d = Self { tb, baton, port: free_loopback_port(), root, extra: Vec::new() };
        d.install_service();
        d.ok(&["start", BATON_SERVICE]);
        d.wait_gens("the first generation to serve", |g| settled_after(g, None));
        Some(d)
    }

    fn install_service(&self) {
        let unit = format!(
            "[Unit]\nStartLimitIntervalSec=0\n\
             [Service]\nType=notify\nRuntimeDirectory=baton\n\
             ExecStart={baton} run -l http=127.0.0.1:{port} --name httpd -- {bin} --root {root} --threads 2 {extra}\n\
             ExecReload={baton} restart --name httpd\n\
             FileDescriptorStoreMax=4096\nLimitNOFILE=65536\nEnvironment=RUST_LOG=info\n",
            baton = self.baton.display(),
            port = self.port,
            bin = common::BIN,
            root = self.root.display(),
            extra = self.extra.join(" "),
        );
        self.tb.install_unit(BATON_SERVICE, &unit).expect("install the service unit");
    }

    fn ok(&self, args: &[&str]) {
        self.tb.systemctl_checked(args).unwrap_or_else(|e| panic!("systemctl {args:?}: {e}\n{}", self.journal()));
    }

    fn journal(&self) -> String {
        self.tb.journal(Some(BATON_SERVICE)).unwrap_or_default()
    }

    fn generations(&self) -> Option<Vec<Gen>> {
        let baton = self.baton.display().to_string();
        let out = self.tb.run(&[&baton, "status", "--name", "httpd", "--json"]).ok()?;
        out.success().then(|| parse_generations(&out.stdout))
    }

    fn wait_gens(&self, what: &str, pred: impl Fn(&[Gen]) -> bool) {
        let mut last = None;
        self.tb
            .wait_for(what, WAIT, || {
                last = self.generations();
                last.as_deref().is_some_and(&pred)
            })
            .unwrap_or_else(|e| panic!("{e}; generations: {last:?}\n{}", self.journal()));
    }

    fn active_pid(&self) -> u32 {
        self.generations().unwrap_or_default().iter().find(|g| g.state == "active").map_or(0, |g| g.pid)
    }
}

impl Drop for BatonUnderSystemd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What Baton and the generations said, to explain the failure.
            let journal = self.journal();
            let tail: Vec<&str> = journal.lines().rev().take(200).collect();
            eprintln!("--- last lines of {BATON_SERVICE}'s journal ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Deployment for BatonUnderSystemd {
    fn describe(&self) -> String {
        format!("baton under systemd {}", self.tb.systemd_version())
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// `systemctl reload` returns once `baton restart` did, i.e. the new
    /// generation is ready; then wait until the old one handed everything
    /// over and exited.
    fn restart(&mut self) {
        let old = self.active_pid();
        self.ok(&["reload", BATON_SERVICE]);
        self.wait_gens("the old generation to hand over and exit", |g| settled_after(g, Some(old)));
    }

    fn begin_restart(&mut self) {
        self.ok(&["reload", "--no-block", BATON_SERVICE]);
    }

    fn wait_status(&mut self, what: &str, pred: &dyn Fn(&str) -> bool) {
        self.wait_gens(what, |gens| gens.iter().any(|g| pred(&g.status)));
    }

    fn finish_restart(&mut self, old_pid: u32) {
        self.wait_gens("the new generation alone", |g| settled_after(g, Some(old_pid)));
    }

    /// Baton keeps its command line: restarting the whole service takes the
    /// new arguments.
    fn set_extra_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(|s| s.to_string()).collect();
        self.install_service();
        self.ok(&["restart", BATON_SERVICE]);
        self.wait_gens("the first generation to serve", |g| settled_after(g, None));
    }
}

fn baton_keepalive(flavor: Flavor, test: &str) {
    let Some(mut d) = BatonUnderSystemd::boot(flavor, test) else { return };
    scenarios::keepalive_across_restart(&mut d, 20);
    scenarios::keepalive_across_restart(&mut d, 20);
    // Baton is still the same main process: only its app was restarted.
    assert_eq!(d.tb.show(BATON_SERVICE, "ActiveState").unwrap(), "active");
}

fn baton_thousand_idle(flavor: Flavor, test: &str) {
    assert!(raise_nofile(4096) >= 2100, "RLIMIT_NOFILE too low for 1,000 connections on both sides");
    let Some(mut d) = BatonUnderSystemd::boot(flavor, test) else { return };
    scenarios::keepalive_across_restart(&mut d, 1000);
}

fn baton_in_flight(flavor: Flavor, test: &str) {
    let Some(mut d) = BatonUnderSystemd::boot(flavor, test) else { return };
    scenarios::in_flight_and_pipelined(&mut d);
    scenarios::drain_deadline(&mut d);
}

fn keepalive(flavor: Flavor, test: &str) {
    let Some(mut d) = Systemd::boot(flavor, test) else { return };
    scenarios::keepalive_across_restart(&mut d, 20);
    // Adopted connections were removed from the store: a second restart
    // hands over exactly the same 20 again, no duplicates.
    scenarios::keepalive_across_restart(&mut d, 20);
}

fn thousand_idle(flavor: Flavor, test: &str) {
    assert!(raise_nofile(4096) >= 2100, "RLIMIT_NOFILE too low for 1,000 connections on both sides");
    let Some(mut d) = Systemd::boot(flavor, test) else { return };
    scenarios::keepalive_across_restart(&mut d, 1000);
}

fn in_flight(flavor: Flavor, test: &str) {
    let Some(mut d) = Systemd::boot(flavor, test) else { return };
    scenarios::in_flight_and_pipelined(&mut d);
    scenarios::drain_deadline(&mut d);
}

/// Generations that fail to start (`Restart=on-failure` retries them) leave
/// the handed-over connections in the store; the first one that starts
/// adopts them.
fn failed_generations(flavor: Flavor, test: &str) {
    let Some(mut d) = Systemd::boot(flavor, test) else { return };
    let mut conns: Vec<HttpConn> = (0..5).map(|_| HttpConn::connect(d.port).unwrap()).collect();
    let old = d.main_pid();
    for c in &mut conns {
        assert_eq!(c.get("/healthz").unwrap().pid(), old);
    }
    d.set_extra_args(&["--fail-startup"]);
    d.begin_restart();
    d.tb.wait_for("two failed starts", WAIT, || d.show("NRestarts").parse::<u32>().unwrap_or(0) >= 2)
        .unwrap_or_else(|e| panic!("{e}"));
    d.set_extra_args(&[]);
    d.finish_restart(old);
    let new = d.main_pid();
    for c in &mut conns {
        let r = c.get("/healthz").unwrap_or_else(|e| panic!("{}: a connection was lost: {e}", d.describe()));
        assert_eq!(r.pid(), new);
    }
    let doc: serde_json::Value = serde_json::from_slice(&conns[0].get("/.well-known/baton").unwrap().body).unwrap();
    assert_eq!(doc["adopted_connections"], 5, "{doc}");
}

/// When no generation follows (the next start fails and nothing restarts
/// it), systemd releases the store: the handed-over connections are closed,
/// not leaked; a later start finds none.
fn never_adopted(flavor: Flavor, test: &str) {
    let Some(mut d) = Systemd::boot_with(flavor, test, "no") else { return };
    let mut conns: Vec<HttpConn> = (0..3).map(|_| HttpConn::connect(d.port).unwrap()).collect();
    for c in &mut conns {
        c.get("/healthz").unwrap();
    }
    d.set_extra_args(&["--fail-startup"]);
    let out = d.tb.systemctl(&["restart", SERVICE]).unwrap();
    assert!(!out.success(), "the restart should fail: {out:?}");
    assert_eq!(d.show("ActiveState"), "failed");
    for (i, c) in conns.iter_mut().enumerate() {
        assert!(c.closed_by_server(WAIT), "{}: connection {i} still open after the store was released", d.describe());
    }
    d.set_extra_args(&[]);
    d.ok(&["start", SERVICE]);
    let mut c = HttpConn::connect(d.port).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&c.get("/.well-known/baton").unwrap().body).unwrap();
    assert_eq!(doc["adopted_connections"], 0, "{doc}");
    // The generation counter went with the store.
    assert_eq!(doc["generation"], 1, "{doc}");
}

/// The service logs natively to the journal, and STATUS= reaches systemd.
fn journal_and_status(flavor: Flavor, test: &str) {
    let Some(d) = Systemd::boot(flavor, test) else { return };
    let status = d.show("StatusText");
    assert!(status.starts_with("serving on 127.0.0.1:") && status.contains("passed socket"), "{status}");
    let journal = d.tb.journal(Some(SERVICE)).unwrap();
    assert!(journal.contains("serving on 127.0.0.1"), "{journal}");
    // Native records carry our fields; a plain stderr line would not.
    let out =
        d.tb.run_checked(&["journalctl", "--no-pager", "-b", "-u", SERVICE, "-o", "verbose", "-g", "serving on"])
            .unwrap();
    assert!(out.stdout.contains("ROOT="), "native journal fields expected:\n{}", out.stdout);
}

/// Runs `scenario` on `flavor` (the shape `baton_testbed::systemd_tests!`
/// calls: every scenario takes the flavor and the test's name).
fn run(flavor: baton_testbed::Flavor, name: &str, scenario: fn(baton_testbed::Flavor, &str)) {
    scenario(flavor, name)
}

baton_testbed::systemd_tests!(
    grouped by version,
    run:
    keepalive,
    thousand_idle,
    in_flight,
    failed_generations,
    never_adopted,
    journal_and_status,
    baton_keepalive,
    baton_thousand_idle,
    baton_in_flight,
);
