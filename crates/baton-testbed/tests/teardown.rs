//! Nothing survives a testbed: not on drop, not on a panic, not when the test
//! process is SIGKILLed. And the host's /tmp is never touched.

use std::fs;
use std::io::{BufRead, BufReader};
use std::panic;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_testbed::{Flavor, Testbed, mounts, poll_until, skip_unless_root};

/// What must be gone after teardown.
struct Traces {
    pid: u32,
    cgroup: PathBuf,
    state_dir: PathBuf,
}

impl Traces {
    fn of(tb: &Testbed) -> Traces {
        Traces { pid: tb.pid(), cgroup: tb.cgroup().to_owned(), state_dir: tb.scratch().parent().unwrap().to_owned() }
    }

    fn assert_present(&self) {
        assert!(Path::new(&format!("/proc/{}", self.pid)).exists());
        assert!(self.cgroup.is_dir());
        assert!(self.state_dir.is_dir());
        self.assert_no_mounts_on_host();
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if Path::new(&format!("/proc/{}", self.pid)).exists() {
            left.push(format!("process {}", self.pid));
        }
        if self.cgroup.exists() {
            left.push(format!("cgroup {}", self.cgroup.display()));
        }
        if self.state_dir.exists() {
            left.push(format!("state dir {}", self.state_dir.display()));
        }
        left
    }

    fn assert_gone(&self) {
        assert_eq!(self.leftovers(), Vec::<String>::new());
        self.assert_no_mounts_on_host();
    }

    /// The overlay and every other testbed mount live in the testbed's own
    /// mount namespace only, never in ours.
    fn assert_no_mounts_on_host(&self) {
        let ours: Vec<_> = mounts::current()
            .unwrap()
            .into_iter()
            .filter(|m| m.source.starts_with("baton-testbed") || m.mount_point.starts_with(&self.state_dir))
            .collect();
        assert!(ours.is_empty(), "testbed mounts visible on the host: {ours:?}");
    }
}

#[test]
fn drop_removes_everything_and_host_tmp_is_untouched() {
    if !skip_unless_root("drop_removes_everything_and_host_tmp_is_untouched") {
        return;
    }
    let marker = std::env::temp_dir().join(format!("baton-testbed-marker-{}", std::process::id()));
    fs::write(&marker, "host marker\n").unwrap();
    let inside_only = std::env::temp_dir().join(format!("baton-testbed-inside-{}", std::process::id()));

    let tb = Testbed::boot(Flavor::Host).expect("boot");
    let traces = Traces::of(&tb);
    traces.assert_present();
    // systemd-tmpfiles has emptied /tmp inside - a private tmpfs, so the
    // host's marker is not even visible there...
    let seen = tb.run(&["test", "-e", marker.to_str().unwrap()]).unwrap();
    assert!(!seen.success(), "host /tmp visible inside");
    // ...and what is written to /tmp inside does not reach the host.
    tb.run_checked(&["touch", inside_only.to_str().unwrap()]).unwrap();
    assert!(!inside_only.exists());
    // Neither does anything written elsewhere in the overlay.
    tb.write_file("/etc/baton-testbed-overlay-probe", "x").unwrap();
    assert!(!Path::new("/etc/baton-testbed-overlay-probe").exists());

    drop(tb);
    traces.assert_gone();
    assert_eq!(fs::read_to_string(&marker).unwrap(), "host marker\n");
    fs::remove_file(&marker).unwrap();
}

#[test]
fn panic_in_a_test_still_tears_down() {
    if !skip_unless_root("panic_in_a_test_still_tears_down") {
        return;
    }
    let mut traces = None;
    let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
        let tb = Testbed::boot(Flavor::Host).expect("boot");
        traces = Some(Traces::of(&tb));
        panic!("deliberate panic with a live testbed (its journal is printed below)");
    }));
    assert!(result.is_err());
    traces.expect("booted before the panic").assert_gone();
}

const ORPHAN_ENV: &str = "BATON_TESTBED_ORPHAN_CHILD";

/// Not a test on its own: the body of the child process of
/// `sigkilled_test_process_leaves_nothing`. Boots, reports, waits to be killed.
#[test]
#[ignore = "child process of sigkilled_test_process_leaves_nothing"]
fn orphan_child() {
    if std::env::var_os(ORPHAN_ENV).is_none() {
        return;
    }
    let tb = Testbed::boot(Flavor::Host).expect("boot");
    println!("ORPHAN {} {} {}", tb.pid(), tb.cgroup().display(), tb.scratch().parent().unwrap().display());
    // Block until SIGKILLed (the parent never writes to our stdin).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    panic!("orphan child was not killed");
}

#[test]
fn sigkilled_test_process_leaves_nothing() {
    if !skip_unless_root("sigkilled_test_process_leaves_nothing") {
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_child", "--include-ignored", "--nocapture"])
        .env(ORPHAN_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line =
        stdout.lines().map(Result::unwrap).find(|l| l.starts_with("ORPHAN ")).expect("child reports its testbed");
    let fields: Vec<&str> = line.split(' ').collect();
    let traces = Traces {
        pid: fields[1].parse().unwrap(),
        cgroup: PathBuf::from(fields[2]),
        state_dir: PathBuf::from(fields[3]),
    };
    traces.assert_present();

    child.kill().unwrap(); // SIGKILL: no destructor runs in the child
    child.wait().unwrap();

    // The supervisor notices (keep-alive pipe EOF) and cleans up on its own.
    poll_until("the supervisor to clean up", Duration::from_secs(60), || traces.leftovers().is_empty().then_some(()))
        .unwrap_or_else(|e| panic!("{e}; left: {:?}", traces.leftovers()));
    traces.assert_gone();
}
