//! The bed of tests/proving.rs and tests/probation.rs (see the module
//! docs there): a Baton whose generations run what `DIR/cmd` says at
//! their spawn, the apps (`baton-httpd`, `tiny.py`), loads and their
//! accounting. Each test file uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use baton::control::{GenerationStatus, Status};
use baton_testbed::baton::{Baton, BatonBuilder};
use baton_testbed::cargo_bin;
use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};

pub fn scratch(test: &str) -> PathBuf {
    baton_testbed::unique_temp_dir("baton-proving", test)
}

pub fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// A python3 HTTP server for apps that know nothing of Baton: serves every
/// passed listening socket (`LISTEN_FDS`, the probe listener included),
/// one request per connection, answering `STATUS` with a `baton-pid`
/// header. `--notify` sends `READY=1`; `--no-accept` never accepts;
/// `--probe-only` accepts from the `probe` listener only;
/// `--die-on-traffic` exits 1 at its first request that did not come
/// through the `probe` listener (a crash on the first real request);
/// `--trigger-on-traffic` sends `WATCHDOG=trigger` then, and serves on. On
/// SIGTERM it stops accepting, finishes what it accepted, exits 0.
pub const TINY_PY: &str = include_str!("tiny.py");

/// The python3 interpreter itself (not a shim that may stay the main
/// process).
pub fn python3() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed (Debian's python3)");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// One test's Baton and the command its next generation runs.
pub struct Bed {
    pub dir: PathBuf,
    pub b: Baton,
}

impl Bed {
    /// `baton run ARGS` whose generations run what [`Bed::next`] wrote;
    /// the first runs `cmd`. `listen`: the `-l` of the app (the default
    /// TCP listener when `None`).
    pub fn start(test: &str, args: &[&str], listen: Option<&str>, cmd: impl FnOnce(&Path) -> String) -> Bed {
        let (dir, mut builder) = Bed::prepare(test, args, cmd);
        if let Some(l) = listen {
            builder = builder.no_http_listener().args(["-l", l]);
        }
        let b = builder.spawn();
        if listen.is_none() {
            b.port();
        }
        b.wait_active(1);
        Bed { dir, b }
    }

    /// The test's directory (web roots, `tiny.py`, `cmd`) and the builder
    /// of its `baton run ARGS` (with the default listener).
    pub fn prepare(test: &str, args: &[&str], cmd: impl FnOnce(&Path) -> String) -> (PathBuf, BatonBuilder) {
        let dir = scratch(test);
        for (root, probe) in [("www", true), ("www-noprobe", false)] {
            std::fs::create_dir_all(dir.join(root)).unwrap();
            std::fs::write(dir.join(root).join("index.html"), "proving\n").unwrap();
            if probe {
                std::fs::write(dir.join(root).join("probe.txt"), "ok\n").unwrap();
            }
        }
        std::fs::write(dir.join("tiny.py"), TINY_PY).unwrap();
        std::fs::write(dir.join("cmd"), cmd(&dir)).unwrap();
        let app: [&OsStr; 3] = ["/bin/sh".as_ref(), "-c".as_ref(), r#"exec $(cat "$T_DIR/cmd")"#.as_ref()];
        let builder = BatonBuilder::new(baton_bin(), &dir).args(args).app(app).env("T_DIR", &dir).current_dir(&dir);
        (dir, builder)
    }

    /// What the next generation runs.
    pub fn next(&self, cmd: String) {
        std::fs::write(self.dir.join("cmd"), cmd).unwrap();
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.b.port()))
    }

    /// A load on the listener.
    pub fn load(&self, mode: Mode, connections: usize, rate: u32) -> Load {
        let config = LoadConfig::new(self.addr())
            .mode(mode)
            .connections(connections)
            .rate(Some(rate))
            .request_timeout(Duration::from_secs(20))
            .max_duration(Duration::from_secs(120));
        Load::start(config).expect("the load")
    }

    /// `baton restart` in a thread (it returns only after proving and
    /// probation).
    pub fn restart_in_background(&self) -> std::thread::JoinHandle<Output> {
        let (baton, control) = (baton_bin().to_owned(), self.b.control().to_owned());
        std::thread::spawn(move || baton_testbed::baton::cli_at(Path::new(&baton), &control, &["restart"]))
    }

    /// Polls `status` until generation `n` is there and `pred` holds for it.
    pub fn wait_gen(&self, what: &str, n: u64, mut pred: impl FnMut(&GenerationStatus) -> bool) -> Status {
        self.b.wait_status(what, |s| s.generations.iter().any(|g| g.generation == n && pred(g)))
    }
}

/// `baton-httpd` serving `DIR/ROOT`, with more flags.
pub fn httpd(dir: &Path, root: &str, flags: &str) -> String {
    let httpd = cargo_bin("baton-httpd", "baton-httpd");
    format!("{} --root {} {flags}", httpd.display(), dir.join(root).display())
}

/// `tiny.py` with flags.
pub fn tiny(dir: &Path, flags: &str) -> String {
    format!("{} {} {flags}", python3(), dir.join("tiny.py").display())
}

pub fn gen_of(s: &Status, n: u64) -> &GenerationStatus {
    s.generations.iter().find(|g| g.generation == n).unwrap_or_else(|| panic!("no generation {n}: {s:?}"))
}

/// Stops the loads, prints each report, and returns them.
pub fn finish(test: &str, loads: Vec<(&'static str, Load)>) -> Vec<(&'static str, LoadReport)> {
    loads
        .into_iter()
        .map(|(name, load)| {
            let r = load.stop();
            eprintln!("{test}: {name} load: {}", r.to_json());
            (name, r)
        })
        .collect()
}

pub fn assert_nothing_failed(reports: &[(&str, LoadReport)]) {
    for (name, r) in reports {
        assert!(r.ok > 0, "{name}: nothing answered: {}", r.to_json());
        assert_eq!(r.failed(), 0, "{} {name} requests failed: {}", r.failed(), r.to_json());
        assert!(r.bad_statuses.is_empty(), "{name}: non-2xx answers: {}", r.to_json());
    }
}

/// Answers by generation, all loads together.
pub fn answered_by(reports: &[(&str, LoadReport)]) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for (_, r) in reports {
        for (g, n) in &r.per_generation {
            *by.entry(g.clone()).or_default() += n;
        }
    }
    by
}

pub fn failed_restart(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "the restart should fail: {out:?}");
    err
}

/// SIGKILL to `pid` (a crash, as the kernel's OOM killer would).
pub fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
}
