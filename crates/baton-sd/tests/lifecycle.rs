//! Shutdown on SIGTERM/SIGINT and the watchdog task, in real child processes
//! reporting to a real notify socket.
#![cfg(feature = "tokio")]

mod common;

use common::{Receiver, Spawn};
use rustix::process::{Pid, Signal, kill_process};

fn signal(pid: i32, sig: Signal) {
    kill_process(Pid::from_raw(pid).expect("child pid"), sig).expect("kill");
}

#[test]
fn sigterm_sends_stopping_and_exits_cleanly() {
    for rx in Receiver::both("sigterm") {
        let mut child = Spawn::new().env("NOTIFY_SOCKET", &rx.addr).args(["shutdown"]).spawn();
        // The handlers are installed before "ready" is printed.
        child.wait_line(|l| l == "ready");
        signal(child.pid(), Signal::TERM);
        let d = rx.recv();
        assert_eq!(d.text(), "STOPPING=1\n");
        assert_eq!(d.pid, Some(child.pid()), "sent by the child itself");
        let (lines, code) = child.finish();
        assert!(lines.contains(&"stopped Terminate sent=Ok(())".to_owned()), "{lines:?}");
        assert_eq!(code, Some(0));
        rx.assert_empty();
    }
}

#[test]
fn sigint_is_a_stop_request_too() {
    let rx = Receiver::abstract_name("sigint");
    let mut child = Spawn::new().env("NOTIFY_SOCKET", &rx.addr).args(["shutdown"]).spawn();
    child.wait_line(|l| l == "ready");
    signal(child.pid(), Signal::INT);
    assert_eq!(rx.recv().text(), "STOPPING=1\n");
    let (lines, code) = child.finish();
    assert!(lines.contains(&"stopped Interrupt sent=Ok(())".to_owned()), "{lines:?}");
    assert_eq!(code, Some(0));
}

#[test]
fn a_failed_stopping_notification_is_reported_not_hidden() {
    // A notify socket nobody listens on: the signal still ends the wait, and
    // the send error comes with it.
    let dir = common::TempDir::new("stopping-fails");
    let addr = dir.path().join("gone");
    let mut child = Spawn::new().env("NOTIFY_SOCKET", addr.to_str().unwrap()).args(["shutdown"]).spawn();
    child.wait_line(|l| l == "ready");
    signal(child.pid(), Signal::TERM);
    let (lines, code) = child.finish();
    assert!(lines.iter().any(|l| l.starts_with("stopped Terminate sent=Err(")), "{lines:?}");
    assert_eq!(code, Some(1));
}

/// Receives until `n` `WATCHDOG=1` pings from `pid` have arrived.
fn expect_pings(rx: &Receiver, pid: i32, n: usize) {
    for _ in 0..n {
        let d = rx.recv();
        assert_eq!(d.text(), "WATCHDOG=1\n");
        assert_eq!(d.pid, Some(pid));
    }
}

#[test]
fn the_watchdog_task_pings_when_watchdog_pid_is_ours() {
    for rx in Receiver::both("watchdog") {
        let mut child = Spawn::new()
            .env("NOTIFY_SOCKET", &rx.addr)
            .env("WATCHDOG_USEC", "200000")
            .own_pid_var("WATCHDOG_PID")
            .args(["watchdog"])
            .spawn();
        assert_eq!(child.wait_line(|l| l.starts_with("watchdog")), "watchdog 200000us");
        expect_pings(&rx, child.pid(), 3);
        // Dropping the child kills it.
    }
}

#[test]
fn the_watchdog_is_ours_when_watchdog_pid_is_unset() {
    let rx = Receiver::abstract_name("watchdog-nopid");
    let mut child =
        Spawn::new().env("NOTIFY_SOCKET", &rx.addr).env("WATCHDOG_USEC", "200000").args(["watchdog"]).spawn();
    assert_eq!(child.wait_line(|l| l.starts_with("watchdog")), "watchdog 200000us");
    expect_pings(&rx, child.pid(), 3);
}

#[test]
fn a_foreign_watchdog_pid_disables_the_watchdog() {
    let rx = Receiver::abstract_name("watchdog-foreign");
    let spawn = Spawn::new()
        .env("NOTIFY_SOCKET", &rx.addr)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", std::process::id().to_string())
        .args(["watchdog"]);
    let (lines, code) = spawn.spawn().finish();
    assert_eq!(lines, ["watchdog none"]);
    assert_eq!(code, Some(0));
    rx.assert_empty();
}

#[test]
fn a_bad_watchdog_usec_is_an_error_naming_it() {
    for bad in ["0", "abc", "-1", ""] {
        let (lines, code) = Spawn::new().env("WATCHDOG_USEC", bad).args(["watchdog"]).spawn().finish();
        assert_eq!(code, Some(0));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with(&format!("watchdog err WATCHDOG_USEC={bad:?}")), "{lines:?}");
    }
    let (lines, _) = Spawn::new().args(["watchdog"]).spawn().finish();
    assert_eq!(lines, ["watchdog none"]);
}
