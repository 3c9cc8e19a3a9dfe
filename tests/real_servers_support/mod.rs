//! What `tests/real_servers.rs` (standalone `baton run`) and
//! `tests/real_servers_systemd.rs` (under systemd 252 and 257) share: the
//! real servers (gunicorn from PyPI, Debian's Node.js) with their fixture
//! apps, the deploys, the loopback load, and the scenarios themselves,
//! written once against [`Service`].
//!
//! The fixtures are `tests/fixtures/apps/wsgi_app.py` and `node_app.js`; the
//! variant a generation runs is read at its start from the file
//! `$APP_VARIANT_FILE`, so a deploy is [`Service::deploy`] (writing that
//! file) followed by `baton restart`. gunicorn comes from
//! [`GUNICORN_DIR`], where `.ci/deps` installs it.
//!
//! Each test's load is bounded (at most [`LOAD_MAX`], a few hundred
//! requests per second, loopback only).

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};

/// Where `.ci/deps` installs gunicorn (`pip install --target`, pure Python:
/// the host's python3 and the trixie root's both run it; the testbed binds
/// it at the same path).
pub const GUNICORN_DIR: &str = "/opt/baton-ci/gunicorn";
/// Debian's python3 and nodejs, by full path: the same inside the testbed
/// roots, whatever comes first on this `$PATH` (pyenv shims, say).
pub const PYTHON: &str = "/usr/bin/python3";
/// See [`PYTHON`].
pub const NODE: &str = "/usr/bin/node";
/// The path the load asks for: a real request, not a probe.
pub const LOAD_PATH: &str = "/work";
/// The health path the probes ask for.
pub const HEALTH_PATH: &str = "/healthz";
/// The longest a test's load runs.
pub const LOAD_MAX: Duration = Duration::from_secs(120);
/// Generous: a noisy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(60);

/// The directory of the fixture apps (in the source tree; bound into the
/// testbeds at the same path).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apps")
}

/// Panics, naming the fix, unless the real servers are installed.
pub fn require_servers(test: &str) {
    let gunicorn = Path::new(GUNICORN_DIR).join("gunicorn/__init__.py");
    for (what, path) in [("python3", Path::new(PYTHON)), ("node", Path::new(NODE)), ("gunicorn", gunicorn.as_path())] {
        assert!(path.exists(), "{test}: {what} is missing ({} does not exist): run .ci/deps as root", path.display());
    }
}

/// A real server, run by Baton from its fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// gunicorn (4 sync workers) with `wsgi_app.py`: sends READY=1 itself
    /// (before its workers load the app) and serves every passed socket.
    Gunicorn,
    /// Node.js `http` with `node_app.js`: no sd_notify; ready by probe.
    Node,
}

/// What a deploy ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deploy {
    /// Works.
    Good,
    /// Exits before it is ready (gunicorn: raises at import, after its
    /// arbiter sent READY=1; Node: before listening).
    ExitsBeforeReady,
    /// Crashes about 1 s after READY=1 (Node: after listening).
    CrashesAfterReady,
    /// Ready, but every request, /healthz included, answers 500.
    Answers500,
    /// Passes its probes, crashes on its first real request.
    CrashesOnFirstRequest,
}

impl Server {
    /// For messages.
    pub fn name(self) -> &'static str {
        match self {
            Server::Gunicorn => "gunicorn",
            Server::Node => "node",
        }
    }

    /// The app's command line (after `baton run ... --`).
    pub fn command(self) -> Vec<String> {
        let fixtures = fixtures_dir().display().to_string();
        match self {
            Server::Gunicorn => {
                let config = format!("{fixtures}/gunicorn_conf.py");
                [PYTHON, "-m", "gunicorn", "--config", &config, "--workers", "4", "--chdir", &fixtures, "wsgi_app:app"]
                    .map(str::to_owned)
                    .to_vec()
            }
            Server::Node => vec![NODE.to_owned(), format!("{fixtures}/node_app.js")],
        }
    }

    /// The app's environment; `variant_file` selects its [`Deploy`].
    pub fn env(self, variant_file: &Path) -> Vec<(String, String)> {
        let mut env = vec![("APP_VARIANT_FILE".to_owned(), variant_file.display().to_string())];
        if self == Server::Gunicorn {
            env.push(("PYTHONPATH".to_owned(), GUNICORN_DIR.to_owned()));
            // The gunicorn dir is shared between test runs and roots.
            env.push(("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()));
        }
        env
    }

    /// The `baton run` options this server is proven with (issue 12's CLI):
    /// gunicorn says READY=1 itself and gets an HTTP health probe; Node
    /// never says it, so its first passing probe is its readiness. Until
    /// then a failing probe only means "not ready yet", so a Node deploy
    /// answering 500 is refused at the ready timeout: 15 s (it listens
    /// within ~100 ms here) instead of the default 90 s, which would make
    /// its test last a minute and a half.
    pub fn proven_args(self) -> Vec<&'static str> {
        match self {
            Server::Gunicorn => vec!["--health-http", HEALTH_PATH],
            Server::Node => vec!["--ready", "probe", "--health-http", HEALTH_PATH, "--ready-timeout", "15s"],
        }
    }

    /// The fixture's name for `deploy`.
    pub fn variant(self, deploy: Deploy) -> &'static str {
        match (self, deploy) {
            (_, Deploy::Good) => "good",
            (Server::Gunicorn, Deploy::ExitsBeforeReady) => "import-error",
            (Server::Node, Deploy::ExitsBeforeReady) => "exit-before-ready",
            (Server::Gunicorn, Deploy::CrashesAfterReady) => "crash-after-ready",
            (Server::Node, Deploy::CrashesAfterReady) => "crash-after-listening",
            (_, Deploy::Answers500) => "http-500",
            (_, Deploy::CrashesOnFirstRequest) => "crash-on-first-request",
        }
    }

    /// A line the app writes when `deploy` fails, which the refusal should
    /// carry among the app's last output lines (where Baton has them).
    pub fn failure_line(self, deploy: Deploy) -> Option<&'static str> {
        match (self, deploy) {
            (Server::Gunicorn, Deploy::ExitsBeforeReady) => Some("variant import-error"),
            (Server::Node, Deploy::ExitsBeforeReady) => Some("variant exit-before-ready"),
            (Server::Node, Deploy::CrashesAfterReady) => Some("variant crash-after-listening"),
            (Server::Node, Deploy::CrashesOnFirstRequest) => Some("variant crash-on-first-request"),
            _ => None,
        }
    }
}

impl Deploy {
    /// Words one of which the reason of a refusal must contain
    /// (lowercase): the candidate exited, or its probe saw a 500.
    fn reason_words(self) -> &'static [&'static str] {
        match self {
            Deploy::Good => &[],
            Deploy::Answers500 => &["500"],
            Deploy::ExitsBeforeReady | Deploy::CrashesAfterReady | Deploy::CrashesOnFirstRequest => &["exit"],
        }
    }
}

/// What `baton restart` answered.
#[derive(Debug)]
pub struct Restarted {
    /// Exit status code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// How long it took.
    pub took: Duration,
}

impl Restarted {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Restarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?} after {:?}\nstdout: {}\nstderr: {}", self.code, self.took, self.stdout, self.stderr)
    }
}

/// A service run by Baton, standalone or under systemd.
pub trait Service {
    /// The test's name, for messages.
    fn test(&self) -> &str;
    /// The loopback port of its `http` listener.
    fn port(&self) -> u16;
    /// Makes the next generation run `variant`.
    fn deploy(&self, variant: &str);
    /// `baton restart`, as an operator runs it.
    fn restart(&self) -> Restarted;
    /// `baton status --json`.
    fn status(&self) -> serde_json::Value;
    /// Baton's log or the journal, for failure messages.
    fn diagnostics(&self) -> String;
    /// Whether a refusal carries the app's last output lines (not when the
    /// output goes to the journal: then the report names journalctl).
    fn reports_output(&self) -> bool;
}

/// `(generation, state)` of the live generations.
pub fn generations(status: &serde_json::Value) -> Vec<(u64, String)> {
    status["generations"]
        .as_array()
        .map(|gens| {
            gens.iter()
                .map(|g| (g["generation"].as_u64().unwrap_or(0), g["state"].as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The number of the active generation, if one is.
pub fn active(status: &serde_json::Value) -> Option<u64> {
    generations(status).into_iter().find(|(_, s)| s == "active").map(|(n, _)| n)
}

/// Polls the status until `pred` holds, at most [`WAIT`].
pub fn wait_status(svc: &dyn Service, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = svc.status();
        if pred(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{}: waited {WAIT:?} for {what}; status: {status}\n{}",
            svc.test(),
            svc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Loopback load on `port`: a paced keep-alive pool and paced
/// one-connection-per-request clients, both on [`LOAD_PATH`].
pub struct Traffic {
    loads: Vec<(&'static str, Load)>,
}

impl Traffic {
    /// Starts both loads.
    pub fn start(port: u16) -> Traffic {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let config = |mode, connections, rate| {
            LoadConfig::new(addr)
                .path(LOAD_PATH)
                .mode(mode)
                .connections(connections)
                .rate(Some(rate))
                .request_timeout(Duration::from_secs(10))
                .max_duration(LOAD_MAX)
        };
        let loads = vec![
            ("keep-alive", Load::start(config(Mode::KeepAlive, 4, 150)).unwrap()),
            ("new-connection", Load::start(config(Mode::NewConnection, 2, 50)).unwrap()),
        ];
        Traffic { loads }
    }

    /// Waits until each load has `n` more successes than it had, at most
    /// [`WAIT`] (so the service is still serving).
    pub fn wait_ok(&self, svc: &dyn Service, n: u64) {
        for (name, load) in &self.loads {
            assert!(
                load.wait_for_ok(n, WAIT),
                "{}: the {name} load stalled: {:?}\n{}",
                svc.test(),
                load.progress(),
                svc.diagnostics()
            );
        }
    }

    /// Failed requests so far, over both loads.
    pub fn failed(&self) -> u64 {
        self.loads.iter().map(|(_, l)| l.progress().failed).sum()
    }

    /// Stops both loads; their reports, printed.
    pub fn stop(self, test: &str) -> Vec<(&'static str, LoadReport)> {
        self.loads
            .into_iter()
            .map(|(name, load)| {
                let r = load.stop();
                eprintln!("{test}: {name} load: {}", r.to_json());
                (name, r)
            })
            .collect()
    }
}

/// Asserts what every load must show: requests answered, none failed, no
/// 5xx among them.
fn assert_clean(test: &str, reports: &[(&str, LoadReport)]) {
    for (name, r) in reports {
        assert!(r.ok > 0, "{test}: the {name} load got no answer: {}", r.to_json());
        assert_eq!(r.failed(), 0, "{test}: {} {name} requests failed: {}", r.failed(), r.to_json());
        assert!(r.bad_statuses.is_empty(), "{test}: {name}: error statuses answered: {:?}", r.bad_statuses);
    }
}

/// Generations that answered any request of `reports`.
fn answered(reports: &[(&str, LoadReport)]) -> std::collections::BTreeSet<String> {
    reports.iter().flat_map(|(_, r)| r.per_generation.keys().cloned()).collect()
}

/// Waits for the first generation of `svc` to be active and serving.
fn wait_first(svc: &dyn Service) -> u64 {
    let status = wait_status(svc, "a generation active", |s| active(s).is_some());
    active(&status).unwrap_or(0)
}

/// (a) Five overlapped restarts of a good deploy under load: nothing fails,
/// no 5xx, every generation answers.
pub fn good_restarts_lose_nothing(svc: &dyn Service) {
    let first = wait_first(svc);
    let traffic = Traffic::start(svc.port());
    traffic.wait_ok(svc, 30);
    let mut numbers = vec![first];
    for _ in 0..5 {
        let out = svc.restart();
        eprintln!("{}: restart took {:?}: {}", svc.test(), out.took, out.stdout.trim());
        assert!(out.success(), "{}: restart of a good deploy: {out}\n{}", svc.test(), svc.diagnostics());
        let before = *numbers.last().unwrap_or(&0);
        let status = wait_status(svc, "a newer generation active", |s| active(s).is_some_and(|n| n > before));
        numbers.push(active(&status).unwrap_or(0));
        traffic.wait_ok(svc, 20);
    }
    let reports = traffic.stop(svc.test());
    assert_clean(svc.test(), &reports);
    let want: std::collections::BTreeSet<String> = numbers.iter().map(u64::to_string).collect();
    assert_eq!(answered(&reports), want, "{}: every generation answers, and only they", svc.test());
}

/// (b) A bad deploy under load: `baton restart` exits non-zero with the
/// reason, the old generation serves throughout (0 failed requests, 0
/// 5xx, the candidate answers nothing), no crash restart follows, and a
/// good deploy afterwards succeeds. `deploy` is not [`Deploy::Good`] or
/// [`Deploy::CrashesOnFirstRequest`] (see [`first_real_request_crash`]).
pub fn bad_deploy_is_refused_without_impact(svc: &dyn Service, server: Server, deploy: Deploy) {
    let test = svc.test().to_owned();
    let old = wait_first(svc);
    let crash_restarts = svc.status()["crash_restarts"].as_u64();
    let traffic = Traffic::start(svc.port());
    traffic.wait_ok(svc, 30);

    svc.deploy(server.variant(deploy));
    let out = svc.restart();
    eprintln!("{test}: bad deploy {:?}: {out}", server.variant(deploy));
    assert_refused(svc, server, deploy, &out);
    let status = wait_status(svc, "only the old generation left", |s| generations(s) == [(old, "active".to_owned())]);
    assert_eq!(status["crash_restarts"].as_u64(), crash_restarts, "{test}: a crash restart followed: {status}");
    traffic.wait_ok(svc, 30);

    svc.deploy(server.variant(Deploy::Good));
    let out = svc.restart();
    assert!(out.success(), "{test}: the good deploy after the bad one: {out}\n{}", svc.diagnostics());
    let status = wait_status(svc, "the good generation active", |s| active(s).is_some_and(|n| n > old));
    let good = active(&status).unwrap_or(0);
    traffic.wait_ok(svc, 20);

    let reports = traffic.stop(&test);
    assert_clean(&test, &reports);
    let want: std::collections::BTreeSet<String> = [old, good].iter().map(u64::to_string).collect();
    assert_eq!(answered(&reports), want, "{test}: only the old and the good generation answer");
}

/// (c) A deploy that passes its probes and crashes on its first real
/// request after the flip: what the mechanism guarantees is asserted (the
/// restart is refused with the reason, the old generation serves after, no
/// crash restart follows); what it cost the load is printed.
pub fn first_real_request_crash(svc: &dyn Service, server: Server) {
    let test = svc.test().to_owned();
    let deploy = Deploy::CrashesOnFirstRequest;
    let old = wait_first(svc);
    let crash_restarts = svc.status()["crash_restarts"].as_u64();
    let traffic = Traffic::start(svc.port());
    traffic.wait_ok(svc, 30);
    let failed_before = traffic.failed();

    svc.deploy(server.variant(deploy));
    let out = svc.restart();
    eprintln!("{test}: deploy {:?}: {out}", server.variant(deploy));
    assert_refused(svc, server, deploy, &out);
    let status = wait_status(svc, "only the old generation left", |s| generations(s) == [(old, "active".to_owned())]);
    assert_eq!(status["crash_restarts"].as_u64(), crash_restarts, "{test}: a crash restart followed: {status}");
    traffic.wait_ok(svc, 30);
    let cost = traffic.failed() - failed_before;

    let reports = traffic.stop(&test);
    let bad: u64 = reports.iter().map(|(_, r)| r.bad_statuses.values().sum::<u64>()).sum();
    let candidate_answers: u64 = reports
        .iter()
        .flat_map(|(_, r)| r.per_generation.iter())
        .filter(|(g, _)| g.parse::<u64>().is_ok_and(|g| g > old))
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "{test}: COST of a crash on the first real request after the flip ({}): {cost} failed requests \
         ({bad} of them error statuses), {candidate_answers} answered by the candidate",
        server.name()
    );
    for (name, r) in &reports {
        assert!(r.ok > 0, "{test}: the {name} load got no answer: {}", r.to_json());
    }
}

/// The restart of a bad deploy was refused, naming why.
fn assert_refused(svc: &dyn Service, server: Server, deploy: Deploy, out: &Restarted) {
    let test = svc.test();
    let variant = server.variant(deploy);
    assert!(
        !out.success() && out.code.is_some(),
        "{test}: the restart of the bad deploy {variant:?} was not refused: {out}\n{}",
        svc.diagnostics()
    );
    let stderr = out.stderr.to_lowercase();
    assert!(
        deploy.reason_words().iter().any(|w| stderr.contains(w)),
        "{test}: the refusal of {variant:?} does not say why (one of {:?}): {out}",
        deploy.reason_words()
    );
    if let (true, Some(line)) = (svc.reports_output(), server.failure_line(deploy)) {
        assert!(out.stderr.contains(line), "{test}: the refusal lacks the app's output {line:?}: {out}");
    }
}
