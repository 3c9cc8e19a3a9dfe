//! Shared by the integration tests (and, by path, the benchmark). Not every
//! test file uses every helper.
#![allow(dead_code)]

pub mod baton;
pub mod client;
pub mod manager;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use manager::MiniManager;
use scenarios::{Deployment, WAIT};

/// The server under test, built by cargo for this package's tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_baton-httpd");

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "baton-httpd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// baton-httpd under the mini manager, serving a fresh root.
pub struct Mini {
    pub m: MiniManager,
    base: Vec<String>,
    pub root: PathBuf,
    _dir: TempDir,
}

impl Mini {
    /// Started and ready.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, |_| {})
    }

    /// Started and ready, after `configure` adjusted the manager (stderr,
    /// limits) before the first start.
    pub fn start_with(extra: &[&str], configure: impl FnOnce(&mut MiniManager)) -> Self {
        let dir = TempDir::new("mini");
        let root = scenarios::make_root(dir.path());
        let base = vec!["--root".to_owned(), root.display().to_string(), "--threads".into(), "2".into()];
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let mut m = MiniManager::new(Path::new(BIN), &args, "http").expect("mini manager");
        // BATON_HTTPD_TEST_LOG=debug shows the server's view of a test.
        m.set_env("RUST_LOG", &std::env::var("BATON_HTTPD_TEST_LOG").unwrap_or_else(|_| "warn".into()));
        configure(&mut m);
        m.start(WAIT).expect("start baton-httpd");
        Self { m, base, root, _dir: dir }
    }

    pub fn stored_connections(&self) -> usize {
        self.m
            .store_names()
            .iter()
            .filter(|n| baton_sd::StoredName::parse(n) == baton_sd::StoredName::Connection)
            .count()
    }
}

impl Deployment for Mini {
    fn describe(&self) -> String {
        "mini manager".into()
    }

    fn port(&self) -> u16 {
        self.m.port()
    }

    fn restart(&mut self) {
        self.m.restart(WAIT).unwrap_or_else(|e| panic!("restart under the mini manager: {e}"));
    }

    fn begin_restart(&mut self) {
        self.m.begin_stop().expect("SIGTERM");
    }

    fn wait_status(&mut self, what: &str, pred: &dyn Fn(&str) -> bool) {
        self.m.wait_status(WAIT, pred).unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    }

    fn finish_restart(&mut self, _old_pid: u32) {
        self.m.wait_stopped(WAIT).expect("old generation stops");
        self.m.start(WAIT).expect("new generation starts");
    }

    fn set_extra_args(&mut self, extra: &[&str]) {
        let mut args: Vec<&str> = self.base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.m.set_args(&args);
    }
}

/// Short pause for "nothing should happen" checks.
pub const SETTLE: Duration = Duration::from_millis(200);
