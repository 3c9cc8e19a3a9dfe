//! A generation naming its main process race-free, as systemd ≥ 257 lets a
//! service do (sd_notify(3)): `MAINPIDFD=1` with the process's pidfd
//! attached (`baton notify --pid`, `baton_sd::Notifier::notify_main_pid`),
//! or `MAINPID=` with `MAINPIDFDID=`, the pidfd id `systemd-notify --pid`
//! adds from 257 on (under systemd: `tests/protocol_versions.rs`). Baton
//! takes the process the pidfd names and refuses a `MAINPIDFDID=` that does
//! not match the process now holding the pid.
//!
//! Real processes and sockets: `baton run` with a shell app that forks the
//! process it names.

use std::path::Path;

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::poll_until;

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// `baton run --notify-access all` of `/bin/sh -c SCRIPT`; the script gets
/// `$BATON` (the CLI) and `$REPORT` (a file to write the forked pid to).
fn start(dir: &Path, script: &str) -> Baton {
    BatonBuilder::new(baton_bin(), dir)
        .no_http_listener()
        .args(["--notify-access", "all"])
        .app(["/bin/sh", "-c", script])
        .env("BATON", baton_bin())
        .env("REPORT", dir.join("forked"))
        .spawn()
}

/// Generation 1's leader, the process Baton started.
fn leader(b: &Baton) -> u32 {
    b.wait_log("generation 1 started as pid ");
    let log = b.log();
    let rest = &log[log.find("generation 1 started as pid ").unwrap() + "generation 1 started as pid ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// The pid the app wrote to `$REPORT`.
fn forked(dir: &Path) -> u32 {
    poll_until("the forked pid", WAIT, || std::fs::read_to_string(dir.join("forked")).ok()?.trim().parse().ok())
        .unwrap()
}

#[test]
fn baton_notify_pid_sends_the_pidfd_and_baton_takes_that_process() {
    let dir = baton_testbed::unique_temp_dir("baton-main-pid", "pidfd");
    let b = start(&dir, r#"sleep 1000 & echo $! > "$REPORT"; "$BATON" notify --ready --pid $!; wait"#);
    let sleeper = forked(&dir);
    b.wait_active(1);
    let leader = leader(&b);
    let status = b.wait_status("generation 1's main pid", |s| s.generations[0].pid == sleeper);
    assert_ne!(leader, sleeper);
    assert!(!b.log().contains("ignored"), "{}", b.log());
    b.wait_log(&format!("generation 1's main process is now {sleeper} (named by its pidfd (MAINPIDFD=1))"));
    eprintln!("MAINPIDFD=1: generation 1's main process is {sleeper} (leader {leader}): {:?}", status.generations[0]);
}

#[test]
fn a_pidfd_id_of_another_process_is_refused() {
    let dir = baton_testbed::unique_temp_dir("baton-main-pid", "mismatch");
    // MAINPIDFDID=1 names no live process (ids count up from boot), so the
    // process holding the pid is not the one meant.
    let b = start(&dir, r#"sleep 1000 & echo $! > "$REPORT"; "$BATON" notify --ready MAINPID=$! MAINPIDFDID=1; wait"#);
    let sleeper = forked(&dir);
    b.wait_active(1);
    let leader = leader(&b);
    let want = format!("MAINPID={sleeper} for generation 1 ignored");
    b.wait_log(&want);
    let log = b.log();
    if baton_sd::pidfs::own_pidfd_id().is_some() {
        assert!(log.contains("not MAINPIDFDID=1: the process meant has exited"), "{log}");
        assert_eq!(b.status().generations[0].pid, leader, "the leader stays the main process");
    }
}

#[test]
fn mainpidfd_without_exactly_one_pidfd_is_refused() {
    let dir = baton_testbed::unique_temp_dir("baton-main-pid", "nopidfd");
    // No fd at all, then a file that is no pidfd.
    let script = r#""$BATON" notify MAINPIDFD=1; sleep 1000 & echo $! > "$REPORT";
        "$BATON" notify --ready MAINPIDFD=1 --fd 0 < /dev/null; wait"#;
    let b = start(&dir, script);
    let _ = forked(&dir);
    b.wait_active(1);
    let leader = leader(&b);
    b.wait_log(
        "MAINPIDFD=1 for generation 1 ignored: it needs exactly one fd, the pidfd, and no FDSTORE=1 (0 attached)",
    );
    b.wait_log("(1 attached)");
    assert_eq!(b.status().generations[0].pid, leader);
}
