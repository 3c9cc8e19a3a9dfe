//! Restarting baton-httpd under constant load, six ways, side by side
//! (issue 6): how many requests fail, how many connections the server
//! closes, and what happens to latency while a restart is under way; and
//! (issue 12) a bad deploy under the same load, three ways, and how long
//! Baton's proof of a new generation takes.
//!
//! ```sh
//! sudo cargo bench --bench restarts                          # needs root
//! BATON_BENCH_PUBLISH=1 cargo bench --bench restarts         # also writes docs/bench/
//! ```
//!
//! The setups, all with the real reference server `baton-httpd`, 1–4 in a
//! real systemd booted by `baton_testbed` (the host's, 252 on Debian 12), 4b
//! in systemd 257 (the testbed's Debian trixie root):
//!
//! - **1. naive**: the app binds its own port, `Type=simple`,
//!   `systemctl restart`: today's common setup;
//! - **2. socket activation**: `.socket` + `Type=notify` service,
//!   `--handoff=false`, `systemctl restart` (stop, then start);
//! - **3. fd-store handoff**: the same, with `FileDescriptorStoreMax=` and
//!   baton-httpd handing its idle connections over through the fd store;
//! - **4. Baton under systemd 252**: the supervised units of `baton units`,
//!   `systemctl reload` (an overlapped restart), which forks
//!   `ExecReload=+baton restart` (`+`: outside the unit's sandbox, whose
//!   setup costs more than the restart; see src/units.rs);
//! - **4b. Baton under systemd 257**: the same, as `baton units` writes it
//!   for 257: the same `ExecReload=+baton restart` (until issue 14 it was
//!   `Type=notify-reload`, a SIGHUP and no process forked, whose reloads
//!   cannot fail; to measure that again: `BATON_BENCH_SETUPS=4b
//!   BATON_BENCH_DROPIN='[Service]\nType=notify-reload\nReloadSignal=SIGHUP\nExecReload='`)
//!   (4b, so that 5 keeps issue 6's number);
//! - **5. Baton standalone**: `baton run` on the host, `baton restart`.
//!
//! Units 2–4b are written by `baton units` (hardening included), with a
//! drop-in setting `StartLimitIntervalSec=0` so that back-to-back restarts
//! never hit the start limit (and, for 2, `FileDescriptorStoreMax=0`).
//!
//! For each setup: a fresh deployment on its own loopback port, two
//! concurrent paced loads from `baton_testbed::load` (keep-alive on a few
//! connections, and one new connection per request), a warm-up, a stretch of
//! steady state, then `BATON_BENCH_RESTARTS` (default 50) restarts. Each
//! restart records when its command was issued; the new generation's first
//! response is the earliest successful load sample carrying its
//! `baton-generation` header (setups 1–3 get a distinct `BATON_GENERATION`
//! per start through `systemctl set-environment`: without Baton and without
//! a counter in the fd store each start would be generation 1). After the
//! new generation served, the benchmark waits a fixed settle time before
//! the next restart.
//!
//! Baton (4, 4b, 5) proves each new generation before the old one drains
//! (quiet period 2 s, then probation 2 s: README "No-impact deploys"), so
//! its restart command returns after both. Standalone (5) it steers new
//! connections to the old generation during the quiet period: the new
//! one's first response comes at the flip. Under systemd (4, 4b) the units
//! `baton units` writes by default hold one socket per address (its
//! `--steering off`), shared accept: the new generation answers real
//! requests from READY=1. For 5 the table is
//! followed by the split `baton restart` reports: ready (spawn → READY=1),
//! probes + quiet period (READY=1 → the flip), probation (the flip → the
//! old generation asked to drain).
//!
//! A request is in a **restart window** when it was in flight between a
//! restart command and 100 ms after the later of the new generation's first
//! response and the command's return (after a probation the old generation
//! drains and hands its idle connections over);
//! every other request after warm-up is **steady state**. Latency figures
//! are of successful requests, measured by the open-loop load from each
//! request's scheduled send time whenever the client was held up by an
//! earlier request, so stalls are not hidden.
//!
//! Outputs: a markdown table and PASS/MISS for the targets of issue 6 on
//! stdout, `target/bench/restarts.json` and `target/bench/restarts.svg`;
//! with `BATON_BENCH_PUBLISH=1` (full runs of all nine setups only) also
//! `docs/bench/restarts.{md,json,svg}`. A missed target is reported, not
//! fatal; a setup that could not run makes the benchmark fail.
//!
//! **Bad deploys** (issue 12, `bad_deploy.rs`): the deploy points
//! baton-httpd's `--root` symlink (`current`) at a broken release, an
//! empty directory (every file answers 404; `/healthz` still 200: no app
//! change), and restarts, while the same two loads ask `GET /index.html`:
//! B3 is setup 3 (`systemctl restart`), B5 Baton standalone with
//! `--health-http /index.html` and steering (the default), B5s the same
//! with `--steering off` (today's shared accept). Each deploy is observed
//! for 5 s from its command; then the good release is put back (and
//! restarted where the broken one serves), outside the counts. Columns:
//! requests and failures in the windows, non-2xx answers among them,
//! whether the command refused the deploy (its exit code), and how long it
//! took to say so.
//!
//! Run without `--bench` (e.g. by `cargo test --benches`) it is a smoke run:
//! 2 restarts per setup and 1 bad deploy per bad-deploy setup (observed
//! 2 s) under a light, short load, written to `target/bench/restarts-smoke.*`
//! only.
//!
//! Environment: `BATON_BENCH_RESTARTS` (restarts per setup),
//! `BATON_BENCH_BAD_DEPLOYS` (bad deploys per bad-deploy setup, default 5),
//! `BATON_BENCH_SETUPS` (e.g. `4,4b,5` or `naive,baton-standalone`, bad
//! deploys `B3,B5,B5s` or their keys: run only these, in the order given),
//! `BATON_BENCH_PUBLISH=1`.
//!
//! Diagnostic knobs for setups 4/4b only (they change what is measured: never
//! publish with them): `BATON_BENCH_DROPIN` adds its text (`\n` escapes
//! allowed) to the service's drop-in, e.g. `[Service]\nSystemCallFilter=` to
//! price one unit setting; `BATON_BENCH_DIRECT_RESTART=1` restarts with
//! `baton restart` run inside the testbed instead of `systemctl reload`, to
//! separate the cost of systemctl and PID 1 from that of the unit's sandbox.

#[path = "restarts/analysis.rs"]
mod analysis;
#[path = "restarts/bad_deploy.rs"]
mod bad_deploy;
#[path = "restarts/report.rs"]
mod report;
#[path = "restarts/setups.rs"]
mod setups;
#[path = "restarts/svg.rs"]
mod svg;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use analysis::{Analysis, Restart, Run, analyse};
use bad_deploy::{BadKind, BadResult};
use baton_testbed::load::{self, Load, LoadConfig, Mode};
use setups::{Bins, Deployment, INDEX_PATH, SetupKind, WAIT, probe_generation, wait_new_generation};

/// What one invocation runs.
struct Params {
    full: bool,
    restarts: usize,
    warmup: Duration,
    steady: Duration,
    settle: Duration,
    /// How far a restart window reaches past the new generation's first
    /// response.
    tail: Duration,
    keepalive_rate: u32,
    keepalive_connections: usize,
    newconn_rate: u32,
    newconn_workers: usize,
    setups: Vec<SetupKind>,
    /// The bad-deploy setups to run.
    bad: Vec<BadKind>,
    /// Bad deploys per bad-deploy setup.
    bad_deploys: usize,
    /// How long each bad deploy is observed, from its command.
    observe: Duration,
    publish: bool,
}

impl Params {
    fn from_env(full: bool) -> Params {
        let restarts =
            match std::env::var("BATON_BENCH_RESTARTS") {
                Ok(v) => v.trim().parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
                    panic!("BATON_BENCH_RESTARTS={v:?}: give a positive number of restarts per setup")
                }),
                Err(_) if full => 50,
                Err(_) => 2,
            };
        let bad_deploys = match std::env::var("BATON_BENCH_BAD_DEPLOYS") {
            Ok(v) => v.trim().parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
                panic!("BATON_BENCH_BAD_DEPLOYS={v:?}: give a positive number of bad deploys per bad-deploy setup")
            }),
            Err(_) if full => 5,
            Err(_) => 1,
        };
        let (mut setups, mut bad) = (Vec::new(), Vec::new());
        match std::env::var("BATON_BENCH_SETUPS") {
            Ok(v) => {
                for s in v.split(',') {
                    if let Some(k) = SetupKind::parse(s) {
                        setups.push(k);
                    } else if let Some(k) = BadKind::parse(s) {
                        bad.push(k);
                    } else {
                        panic!(
                            "BATON_BENCH_SETUPS: unknown setup {s:?}: use 1, 2, 3, 4, 4b, 5 or naive, socket-activation, \
                             fd-store-handoff, baton-systemd, baton-systemd-257, baton-standalone; bad deploys: B3, B5, B5s \
                             or bad-socket-activation-handoff, bad-baton-steered, bad-baton-shared-accept"
                        )
                    }
                }
            }
            Err(_) => (setups, bad) = (SetupKind::ALL.to_vec(), BadKind::ALL.to_vec()),
        }
        let mut publish = std::env::var("BATON_BENCH_PUBLISH").is_ok_and(|v| v == "1");
        let knobs = ["BATON_BENCH_DROPIN", "BATON_BENCH_DIRECT_RESTART"];
        if publish && let Some(knob) = knobs.iter().find(|k| std::env::var_os(k).is_some()) {
            // The diagnostic knobs change what is measured (and the table
            // would still say `systemctl reload`): never publish with them.
            eprintln!("restarts: {knob} is set: BATON_BENCH_PUBLISH ignored (diagnostic runs are not published)");
            publish = false;
        }
        if full {
            Params {
                full,
                restarts,
                warmup: Duration::from_secs(2),
                steady: Duration::from_secs(5),
                settle: Duration::from_millis(500),
                tail: Duration::from_millis(100),
                keepalive_rate: 1000,
                keepalive_connections: 4,
                newconn_rate: 200,
                newconn_workers: 8,
                setups,
                bad,
                bad_deploys,
                observe: Duration::from_secs(5),
                publish,
            }
        } else {
            Params {
                full,
                restarts,
                warmup: Duration::from_millis(500),
                steady: Duration::from_secs(1),
                settle: Duration::from_millis(300),
                tail: Duration::from_millis(100),
                keepalive_rate: 200,
                keepalive_connections: 2,
                newconn_rate: 50,
                newconn_workers: 4,
                setups,
                bad,
                bad_deploys,
                observe: Duration::from_secs(2),
                publish: false,
            }
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": if self.full { "full" } else { "smoke" },
            "restarts_per_setup": self.restarts,
            "warmup_ms": self.warmup.as_millis() as u64,
            "steady_before_first_restart_ms": self.steady.as_millis() as u64,
            "settle_ms": self.settle.as_millis() as u64,
            "window_tail_ms": self.tail.as_millis() as u64,
            "path": "/healthz",
            "keepalive": { "rate_per_s": self.keepalive_rate, "connections": self.keepalive_connections },
            "new_connection": { "rate_per_s": self.newconn_rate, "workers": self.newconn_workers },
            "bad_deploys": {
                "per_setup": self.bad_deploys,
                "observe_ms": self.observe.as_millis() as u64,
                "path": INDEX_PATH,
            },
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} restarts per setup, {} ms apart after the new generation served; load: {} req/s keep-alive on {} \
             connections + {} req/s on new connections, GET /healthz",
            self.restarts,
            self.settle.as_millis(),
            self.keepalive_rate,
            self.keepalive_connections,
            self.newconn_rate,
        )
    }

    /// What the bad-deploy runs print: how many, what is observed.
    fn describe_bad(&self) -> String {
        format!(
            "{} bad deploys per setup, each observed for {} ms from its command; the same load, GET {INDEX_PATH}",
            self.bad_deploys,
            self.observe.as_millis()
        )
    }

    /// The hard bound on each load: it must outlast the slowest acceptable
    /// run.
    fn load_budget(&self) -> Duration {
        self.warmup + self.steady + (self.settle + WAIT * 2) * self.restarts as u32 + WAIT * 2
    }

    /// The same for a bad-deploy run (each deploy: its window, a rollback).
    fn bad_load_budget(&self) -> Duration {
        (self.observe + self.settle + WAIT * 3) * self.bad_deploys as u32 + WAIT * 2
    }

    fn load_config(&self, addr: SocketAddr, mode: Mode, connections: usize, rate: u32) -> LoadConfig {
        self.load_config_for("/healthz", self.load_budget(), addr, mode, connections, rate)
    }

    /// Both loads of a bad-deploy run, against `port`.
    fn bad_loads(&self, port: u16) -> Result<Vec<Load>, String> {
        let (addr, budget) = (SocketAddr::from((Ipv4Addr::LOCALHOST, port)), self.bad_load_budget());
        let keepalive = self.load_config_for(
            INDEX_PATH,
            budget,
            addr,
            Mode::KeepAlive,
            self.keepalive_connections,
            self.keepalive_rate,
        );
        let newconn = self.load_config_for(
            INDEX_PATH,
            budget,
            addr,
            Mode::NewConnection,
            self.newconn_workers,
            self.newconn_rate,
        );
        let a = Load::start(keepalive).map_err(|e| format!("starting the keep-alive load: {e}"))?;
        let b = Load::start(newconn).map_err(|e| format!("starting the new-connection load: {e}"))?;
        Ok(vec![a, b])
    }

    fn load_config_for(
        &self,
        path: &str,
        budget: Duration,
        addr: SocketAddr,
        mode: Mode,
        connections: usize,
        rate: u32,
    ) -> LoadConfig {
        LoadConfig {
            addr,
            path: path.into(),
            mode,
            connections,
            rate: Some(rate),
            request_timeout: Duration::from_secs(5),
            max_duration: budget,
            max_requests: Some(u64::from(rate) * (budget.as_secs() + 1)),
            ..LoadConfig::default()
        }
    }
}

/// Runs one setup from start to teardown. Errors say what could not be
/// done, with the journal's or Baton's log tail.
fn run_setup(kind: SetupKind, p: &Params, bins: &Bins) -> (Option<Run>, Vec<String>) {
    let mut errors = Vec::new();
    let mut d = match Deployment::start(kind, bins) {
        Ok(d) => d,
        Err(e) => return (None, vec![format!("setup {} ({}): start: {e}", kind.label(), kind.key())]),
    };
    let run = match drive(&mut d, kind, p) {
        Ok(run) => Some(run),
        Err(e) => {
            errors.push(format!("setup {} ({}): {e}\n{}", kind.label(), kind.key(), d.diagnostics()));
            None
        }
    };
    if let Err(e) = d.teardown() {
        errors.push(format!("setup {} ({}): teardown: {e}", kind.label(), kind.key()));
    }
    (run, errors)
}

fn drive(d: &mut Deployment, kind: SetupKind, p: &Params) -> Result<Run, String> {
    let port = d.port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let keepalive = Load::start(p.load_config(addr, Mode::KeepAlive, p.keepalive_connections, p.keepalive_rate))
        .map_err(|e| format!("starting the keep-alive load: {e}"))?;
    let newconn = Load::start(p.load_config(addr, Mode::NewConnection, p.newconn_workers, p.newconn_rate))
        .map_err(|e| format!("starting the new-connection load: {e}"))?;
    for (load, what) in [(&keepalive, "keep-alive"), (&newconn, "new-connection")] {
        if !load.wait_for_ok(10, WAIT) {
            let pr = load.progress();
            return Err(format!(
                "the {what} load got no 10 successful requests within {WAIT:?} ({} requests, {} failed)",
                pr.requests, pr.failed
            ));
        }
    }
    std::thread::sleep(p.warmup);
    let steady_from = Instant::now();
    std::thread::sleep(p.steady);

    let mut restarts = Vec::with_capacity(p.restarts);
    for i in 1..=p.restarts {
        let old = probe_generation(port).map_err(|e| format!("before restart {i}: not serving: {e}"))?;
        d.prepare_restart().map_err(|e| format!("before restart {i}: {e}"))?;
        let t_cmd = Instant::now();
        let report = d.restart().map_err(|e| format!("restart {i}: {e}"))?;
        let t_returned = Instant::now();
        let (new, t_probe) = wait_new_generation(port, &old).map_err(|e| format!("restart {i}: {e}"))?;
        restarts.push(Restart { t_cmd, t_returned, t_probe, old, new, report });
        if i % 10 == 0 || i == p.restarts {
            let pr = (keepalive.progress(), newconn.progress());
            eprintln!(
                "restarts:   {i}/{} restarts; {} requests, {} failed so far",
                p.restarts,
                pr.0.requests + pr.1.requests,
                pr.0.failed + pr.1.failed
            );
        }
        std::thread::sleep(p.settle);
    }
    let steady_to = Instant::now();
    let loads = vec![("keep-alive", keepalive.stop()), ("new-connection", newconn.stop())];
    Ok(Run { kind, systemd_version: d.systemd_version(), steady_from, steady_to, restarts, loads })
}

/// The cargo target directory this benchmark was built in (it holds
/// CACHEDIR.TAG), else `<workspace>/target`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()).map(Path::to_owned))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn write(path: &Path, contents: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    println!("wrote {}", path.display());
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    setups::check_report_parser();
    if !rustix::process::geteuid().is_root() {
        println!(
            "restarts: SKIPPED: this benchmark needs root (it boots a real systemd in private namespaces and \
             installs units there); run it as root: sudo cargo bench --bench restarts"
        );
        return;
    }
    // Root, but another prerequisite missing (util-linux, cgroup2): skips,
    // or panics under CI=true.
    if !baton_testbed::skip_unless_root("restarts") {
        return;
    }
    let p = Params::from_env(full);
    if cfg!(debug_assertions) {
        eprintln!("restarts: built without optimisations; run `cargo bench --bench restarts` for meaningful numbers");
    }
    if !full && std::env::var("BATON_BENCH_PUBLISH").is_ok_and(|v| v == "1") {
        eprintln!("restarts: smoke run: BATON_BENCH_PUBLISH ignored (only full runs are published)");
    }
    let bins = Bins {
        baton: PathBuf::from(env!("CARGO_BIN_EXE_baton")),
        httpd: baton_testbed::cargo_bin("baton-httpd", "baton-httpd"),
    };

    let started = Instant::now();
    let mut results: Vec<Analysis> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for &kind in &p.setups {
        let t = Instant::now();
        eprintln!("restarts: setup {} ({}): {} restarts ...", kind.label(), kind.key(), p.restarts);
        let (run, errs) = run_setup(kind, &p, &bins);
        for e in &errs {
            eprintln!("restarts: ERROR: {e}");
        }
        errors.extend(errs);
        if let Some(run) = run {
            let a = analyse(&run, p.tail);
            eprintln!(
                "restarts: setup {} done in {:.1?}: {} requests, {} failed, {} server-closed",
                kind.label(),
                t.elapsed(),
                a.requests,
                a.failed,
                a.server_closed
            );
            results.push(a);
        }
    }
    let mut bad_results: Vec<BadResult> = Vec::new();
    for &kind in &p.bad {
        let t = Instant::now();
        eprintln!("restarts: bad deploy {} ({}): {} deploys ...", kind.label(), kind.key(), p.bad_deploys);
        let (result, errs) =
            bad_deploy::run(kind, &bins, p.bad_deploys, p.observe, p.settle, &|port| p.bad_loads(port));
        for e in &errs {
            eprintln!("restarts: ERROR: {e}");
        }
        errors.extend(errs);
        if let Some(r) = result {
            eprintln!(
                "restarts: bad deploy {} done in {:.1?}: {} requests, {} failed, {} non-2xx",
                kind.label(),
                t.elapsed(),
                r.requests,
                r.failed,
                r.non_2xx
            );
            bad_results.push(r);
        }
    }
    let elapsed = started.elapsed();

    let machine = report::Machine::detect(results.iter().find_map(|a| a.systemd_version));
    let table = report::table(&results);
    let split = report::split_table(&results);
    let targets = report::targets(&results);
    let bad_table = bad_deploy::table(&bad_results);
    println!("\nRestarts under load: {}\n{}\n", p.describe(), machine.line());
    println!("{table}");
    if !split.is_empty() {
        println!("Restart command → new generation taking all traffic, Baton standalone:\n\n{split}");
    }
    println!("Targets (issue 6):\n{targets}");
    if !bad_results.is_empty() {
        println!("Bad deploys under load: {}\n\n{bad_table}", p.describe_bad());
    }
    println!("{} setups and {} bad-deploy setups in {elapsed:.1?}", results.len(), bad_results.len());

    let mut json = report::json(&p.to_json(), &machine, &results, &errors);
    json["bad_deploys"] = bad_results.iter().map(bad_deploy::json).collect();
    let json = serde_json::to_string_pretty(&json).expect("JSON of plain values");
    let (describe, line) = (p.describe(), machine.line());
    let svg = svg::render(&results, [&describe, &line]);
    let bench = target_dir().join("bench");
    let stem = if full { "restarts" } else { "restarts-smoke" };
    write(&bench.join(format!("{stem}.json")), &json);
    write(&bench.join(format!("{stem}.svg")), &svg);

    if p.publish {
        if !errors.is_empty() || p.setups.len() != SetupKind::ALL.len() || p.bad.len() != BadKind::ALL.len() {
            eprintln!(
                "restarts: not publishing to docs/bench: only complete runs of all six setups and three bad-deploy \
                 setups are published"
            );
        } else {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bench");
            let md = format!(
                "# Restarts under load\n\n\
                 Generated by `BATON_BENCH_PUBLISH=1 cargo bench --bench restarts` (benches/restarts.rs); \
                 do not edit by hand.\n\n\
                 {}.\n\n\
                 Machine: {}. Setups 1–4 run in the host's systemd (252) booted in private namespaces, \
                 4b in systemd 257 from a Debian trixie root the same way; 5 on the host.\n\n\
                 {table}\n\
                 A request is in a *restart window* when it was in flight between the restart command and \
                 {} ms after the later of the new generation's first response and the command's return; \
                 *steady state* is every other request after warm-up. Baton proves every new generation (2 s \
                 quiet period, then 2 s probation before the old one drains), so its restart commands return \
                 after about 4 s. *Restart → first response from the new generation*: standalone (5) Baton \
                 steers new connections away from the candidate, which answers its first real request after \
                 the quiet period, at the flip; under systemd (4, 4b) the units `baton units` writes by default \
                 have one socket per address (`--steering off`), shared by both generations, so the candidate \
                 answers real requests from READY=1. Latencies are of successful requests, open loop: measured from the scheduled \
                 send time when the client was held up by an earlier request, so stalls are not hidden. \
                 *Server-closed connections*: keep-alive connections the server \
                 closed while the client still wanted them.\n\n\
                 Restart command → new generation taking all traffic, Baton standalone (from `baton restart`'s \
                 report: ready = spawn → READY=1, probes + quiet period = READY=1 → the flip, probation = the flip \
                 → the old generation asked to drain):\n\n{split}\n\
                 Targets (issue 6):\n\n{targets}\n\
                 ## Bad deploys under load\n\n\
                 {}. The deploy points baton-httpd's root at a broken release (an empty directory: every file \
                 answers 404, `/healthz` still 200) and restarts; a request counts when it was in flight in a \
                 deploy's window. After it the good release is put back (restarted where the broken one serves), \
                 outside the counts.\n\n{bad_table}\n\
                 ![Latency of every request across restarts](restarts.svg)\n",
                p.describe(),
                machine.line(),
                p.tail.as_millis(),
                p.describe_bad(),
            );
            write(&docs.join("restarts.md"), &md);
            write(&docs.join("restarts.json"), &json);
            write(&docs.join("restarts.svg"), &svg);
        }
    }

    if !errors.is_empty() {
        eprintln!("\nrestarts: {} setup(s) could not run:", errors.len());
        for e in &errors {
            eprintln!("\n{e}");
        }
        std::process::exit(1);
    }
}
