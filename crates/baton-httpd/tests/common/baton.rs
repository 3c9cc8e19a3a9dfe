//! baton-httpd under Baton itself, standalone (no root, no systemd):
//! `baton run -l http=127.0.0.1:PORT --control DIR/b.sock -- baton-httpd
//! --root DIR`, restarted with `baton restart --control DIR/b.sock` — an
//! overlapped restart: the new generation runs and is ready before the old
//! one is told to stop, and the connections the old one hands over are
//! pushed to the new one over `$BATON_HANDOFF_SOCKET`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;
use super::scenarios::{self, Deployment, WAIT};

/// Baton's binary, built by cargo for these tests (the `baton` package is
/// not a dependency of this crate, so `CARGO_BIN_EXE_baton` is not set).
pub fn baton_bin() -> PathBuf {
    baton_testbed::cargo_bin("baton", "baton")
}

/// One generation as `baton status --json` shows it.
#[derive(Debug, Clone)]
pub struct Gen {
    pub pid: u32,
    pub state: String,
    pub status: String,
}

/// Parses `baton status --json` output into its generations.
pub fn parse_generations(json: &str) -> Vec<Gen> {
    let doc: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("baton status --json: {e}: {json}"));
    doc["generations"]
        .as_array()
        .map(|gens| {
            gens.iter()
                .map(|g| Gen {
                    pid: g["pid"].as_u64().unwrap_or(0) as u32,
                    state: g["state"].as_str().unwrap_or_default().to_owned(),
                    status: g["status_text"].as_str().unwrap_or_default().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Done when exactly one generation is left, active, serving, and not
/// `old_pid`: the old one has handed everything over and exited.
pub fn settled_after(gens: &[Gen], old_pid: Option<u32>) -> bool {
    matches!(gens, [g] if g.state == "active" && g.status.starts_with("serving") && Some(g.pid) != old_pid)
}

/// `baton run` as a child of the test.
pub struct BatonRun {
    baton: PathBuf,
    child: Option<Child>,
    control: PathBuf,
    log: PathBuf,
    port: u16,
    pub root: PathBuf,
    extra: Vec<String>,
    dir: TempDir,
}

impl BatonRun {
    /// Started, with one generation serving.
    pub fn start(extra: &[&str]) -> Self {
        let dir = TempDir::new("baton");
        let root = scenarios::make_root(dir.path());
        let mut d = BatonRun {
            baton: baton_bin(),
            child: None,
            control: dir.path().join("b.sock"),
            log: dir.path().join("baton.log"),
            port: baton_testbed::free_loopback_port(),
            root,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        d.launch();
        d
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("baton log file");
        let child = Command::new(&self.baton)
            .arg("run")
            .args(["-l", &format!("http=127.0.0.1:{}", self.port)])
            .arg("--control")
            .arg(&self.control)
            .arg("--")
            .arg(super::BIN)
            .arg("--root")
            .arg(&self.root)
            .args(["--threads", "2"])
            .args(&self.extra)
            // BATON_HTTPD_TEST_LOG=debug shows the server's view of a test.
            .env("RUST_LOG", std::env::var("BATON_HTTPD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn baton run");
        self.child = Some(child);
        self.wait_gens("the first generation to serve", |g| settled_after(g, None));
    }

    /// `baton ARGS --control …`.
    pub fn baton(&self, args: &[&str]) -> Output {
        Command::new(&self.baton)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("baton {args:?}: {e}"))
    }

    fn baton_ok(&self, args: &[&str]) -> String {
        let out = self.baton(args);
        assert!(
            out.status.success(),
            "baton {args:?}: {}\nstdout: {}\nstderr: {}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Baton's (and the generations') output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The generations, from `baton status --json`.
    pub fn generations(&self) -> Vec<Gen> {
        parse_generations(&self.baton_ok(&["status", "--json"]))
    }

    /// `baton status --json` as a document.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.baton_ok(&["status", "--json"])).expect("status JSON")
    }

    /// Polls `baton status` until `pred` holds; fails at once if Baton exits.
    fn wait_gens(&mut self, what: &str, pred: impl Fn(&[Gen]) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut last = Vec::new();
        loop {
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("baton exited ({status}) while waiting for {what}\nlog:\n{}", self.log_text());
            }
            let out = self.baton(&["status", "--json"]);
            if out.status.success() {
                last = parse_generations(&String::from_utf8_lossy(&out.stdout));
                if pred(&last) {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; generations: {last:?}\nlog:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn active_pid(&self) -> u32 {
        self.generations().iter().find(|g| g.state == "active").map_or(0, |g| g.pid)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = self.baton(&["stop"]);
            // `baton stop` waits for the generations; Baton exits right after.
            match baton_testbed::poll_until("baton to exit", WAIT, || child.try_wait().ok().flatten()) {
                Ok(status) => assert!(status.success(), "baton run exited with {status}\n{}", self.log_text()),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{e}\n{}", self.log_text());
                }
            }
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for BatonRun {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What Baton and the generations said, to explain the failure.
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("--- last lines of baton's output ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = self.baton(&["stop"]);
            if baton_testbed::poll_until("baton to exit", WAIT, || child.try_wait().ok().flatten()).is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Deployment for BatonRun {
    fn describe(&self) -> String {
        "baton (standalone)".into()
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// `baton restart` returns once the new generation is ready; the old one
    /// is draining then. Returns once it has handed everything over and
    /// exited, so that every later request is the new generation's to answer.
    fn restart(&mut self) {
        let old = self.active_pid();
        self.baton_ok(&["restart"]);
        self.wait_gens("the old generation to hand over and exit", |g| settled_after(g, Some(old)));
    }

    fn begin_restart(&mut self) {
        self.baton_ok(&["restart", "--no-block"]);
    }

    fn wait_status(&mut self, what: &str, pred: &dyn Fn(&str) -> bool) {
        self.wait_gens(what, |gens| gens.iter().any(|g| pred(&g.status)));
    }

    fn finish_restart(&mut self, old_pid: u32) {
        self.wait_gens("the new generation alone", |g| settled_after(g, Some(old_pid)));
    }

    /// Baton keeps its command line: a whole new `baton run` (on the same
    /// port) takes the new arguments. Connections are not kept across that.
    fn set_extra_args(&mut self, args: &[&str]) {
        self.stop();
        self.extra = args.iter().map(|s| s.to_string()).collect();
        self.launch();
    }
}
