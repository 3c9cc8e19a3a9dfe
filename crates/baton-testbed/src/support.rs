//! Small helpers for tests: the skip rule, ports, polling.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use crate::cmd::{deadline_after, remaining};
use crate::error::{Error, Result};
use crate::rootfs::which;

/// Decides whether a test that needs root and a bootable systemd can run.
///
/// Returns `true` if it can. Otherwise:
/// - outside CI (`CI` is not `"true"`): prints `SKIP <test_name>: <reason>`
///   and returns `false`; the test should then return early;
/// - in CI (`CI=true`): **panics** with the reason, because a CI run must
///   never silently skip the tests it exists for.
///
/// ```no_run
/// #[test]
/// fn boots() {
///     if !baton_testbed::skip_unless_root("boots") {
///         return;
///     }
///     // ...
/// }
/// ```
pub fn skip_unless_root(test_name: &str) -> bool {
    match missing_prerequisite() {
        None => true,
        Some(reason) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test_name}: cannot run in CI: {reason}");
            }
            // Straight to fd 2: libtest captures `eprintln!` of passing
            // tests, and a skip must be visible in the run's output.
            let _ = writeln!(std::io::stderr(), "SKIP {test_name}: {reason}");
            false
        }
    }
}

/// Why a testbed cannot boot here, if we can tell without trying.
fn missing_prerequisite() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (namespaces, mounts, cgroups)".into());
    }
    for (tool, package) in [("unshare", "util-linux"), ("nsenter", "util-linux")] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` not found (apt-get install {package})"));
        }
    }
    if !Path::new(crate::boot::HOST_SYSTEMD).exists() {
        return Some(format!("{} not found (apt-get install systemd)", crate::boot::HOST_SYSTEMD));
    }
    if let Err(e) = crate::cgroup::cgroup2_mount() {
        return Some(e.to_string());
    }
    None
}

/// A new, empty directory under the system temp dir, unique within this
/// machine (`PREFIX-PID-N-NAME`), for one test's sockets and files.
///
/// # Panics
/// If the directory cannot be created - a test helper: the test cannot run.
pub fn unique_temp_dir(prefix: &str, name: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A TCP port that is currently free on 127.0.0.1.
///
/// Found by binding port 0 and releasing it, so another process may grab it
/// in between; within this process the same port is never handed out twice,
/// so parallel tests get distinct ports.
///
/// # Panics
/// If no port can be bound on 127.0.0.1 at all (no loopback interface) -
/// this is a test helper, such a machine cannot run the tests anyway.
pub fn free_loopback_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("cannot bind a port on 127.0.0.1: {e}"));
        let port = listener.local_addr().unwrap_or_else(|e| panic!("cannot read the bound address: {e}")).port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no unused loopback port found in 1000 attempts");
}

/// Calls `probe` until it returns `Some`, sleeping between attempts (5 ms
/// growing to 200 ms), and gives up with [`Error::Timeout`] after `timeout`.
/// `what` describes the awaited condition for the error message.
///
/// `probe` is always called at least once, and once more right at the
/// deadline, so a slow machine does not fail a condition that became true
/// during the last sleep.
pub fn poll_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = deadline_after(timeout);
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        let Some(left) = remaining(deadline) else {
            return Err(Error::Timeout { what: what.to_owned(), timeout, detail: String::new() });
        };
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The stdout of a finished command that must have succeeded.
///
/// # Panics
/// If it did not, with its status, stdout and stderr: this is a test helper.
pub fn expect_success(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops a child the way a service manager would: SIGTERM, up to `timeout`
/// for it to exit, then SIGKILL. Always reaps it (no zombie left behind by a
/// test). Returns whether it exited on its own after the SIGTERM.
pub fn terminate(child: &mut std::process::Child, timeout: Duration) -> bool {
    let _ = rustix::process::kill_process(rustix::process::Pid::from_child(child), rustix::process::Signal::TERM);
    if poll_until("the child to exit after SIGTERM", timeout, || child.try_wait().ok().flatten()).is_ok() {
        return true;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ports_are_distinct_and_free() {
        let ports: HashSet<u16> = (0..20).map(|_| free_loopback_port()).collect();
        assert_eq!(ports.len(), 20);
        for port in ports {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port is free");
        }
    }

    #[test]
    fn poll_until_returns_value_or_times_out() {
        let mut calls = 0;
        let v = poll_until("third call", Duration::from_secs(10), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(v.unwrap(), 3);
        let e = poll_until("never", Duration::from_millis(50), || None::<()>).unwrap_err();
        assert!(e.to_string().contains("waiting for never"), "{e}");
    }
}
