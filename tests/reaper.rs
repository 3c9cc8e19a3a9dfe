//! `reaper` on real processes.
//!
//! `become_subreaper` and the reaper's `waitpid(-1)` act on the whole test
//! process, so everything runs in one `#[test]`, sub-case after sub-case, on
//! one tokio runtime: nothing else in this binary spawns or waits.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use baton::reaper::{Exit, Reaper, become_subreaper, describe};
use baton::spawn::{AppCommand, Child, GenerationSetup, SpawnError};
use rustix::process::Signal;

/// Generous: the machine is a noisy 2-core box.
const DEADLINE: Duration = Duration::from_secs(30);

fn sh(script: &str) -> AppCommand {
    AppCommand::new(OsStr::new("/bin/sh"), &[OsString::from("-c"), OsString::from(script)]).unwrap()
}

fn spawn(cmd: &AppCommand) -> Child {
    cmd.spawn(&GenerationSetup::default()).unwrap()
}

/// Waits (blocking) until the process behind `pidfd` has exited; it stays a
/// zombie until reaped.
fn wait_exited(pidfd: &OwnedFd) {
    let mut pfd = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    let ts = rustix::time::Timespec { tv_sec: DEADLINE.as_secs() as i64, tv_nsec: 0 };
    loop {
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(1) => return,
            Ok(_) => panic!("child did not exit within {DEADLINE:?}"),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll on pidfd: {e}"),
        }
    }
}

/// Collects exits until every pid in `want` was reported; other pids are
/// returned separately.
async fn collect(reaper: &mut Reaper, want: &BTreeSet<u32>) -> (BTreeMap<u32, ExitStatus>, Vec<Exit>) {
    let mut got = BTreeMap::new();
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !want.iter().all(|pid| got.contains_key(pid)) {
        let exit = tokio::time::timeout_at(deadline, reaper.next())
            .await
            .unwrap_or_else(|_| panic!("missing exits for {:?}; got {got:?}", want))
            .expect("reaper stopped");
        if want.contains(&exit.pid) {
            assert!(got.insert(exit.pid, exit.status).is_none(), "pid {} reported twice", exit.pid);
        } else {
            others.push(exit);
        }
    }
    (got, others)
}

/// Our children that are zombies right now (state `Z` in /proc/PID/stat).
fn our_zombies() -> Vec<u32> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[0] == "Z" && fields[1].parse() == Ok(me) {
            zombies.push(entry.file_name().to_string_lossy().parse().unwrap_or(0));
        }
    }
    zombies
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-reaper-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn reaper_reports_every_exit_and_adopts_orphans() {
    // The root package has no rt-multi-thread: the reaper runs whenever the
    // test awaits, and cases that need true concurrency use a std thread.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert!(Reaper::start().is_err(), "outside a runtime, start() must fail cleanly");
    rt.block_on(async {
        let dir = scratch();
        become_subreaper().unwrap();
        let mut flag: libc::c_int = 0;
        // SAFETY: PR_GET_CHILD_SUBREAPER writes an int through the pointer.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int) }, 0);
        assert_eq!(flag, 1);

        // 1. A child that ended before the reaper started is found by the
        //    initial sweep.
        let early = spawn(&sh("exit 5"));
        wait_exited(&early.pidfd);
        let mut reaper = Reaper::start().unwrap();
        let (got, _) = collect(&mut reaper, &BTreeSet::from([early.pid])).await;
        assert_eq!(got[&early.pid].code(), Some(5));

        // 2. Exit status.
        let child = spawn(&sh("exit 3"));
        let (got, _) = collect(&mut reaper, &BTreeSet::from([child.pid])).await;
        assert_eq!(got[&child.pid].code(), Some(3));
        assert_eq!(describe(&got[&child.pid]), "exited with status 3");

        // 3. Killed by a signal.
        let child = spawn(&AppCommand::new(OsStr::new("sleep"), &["100".into()]).unwrap());
        child.signal(Signal::KILL).unwrap();
        let (got, _) = collect(&mut reaper, &BTreeSet::from([child.pid])).await;
        assert_eq!(describe(&got[&child.pid]), "killed by SIGKILL");

        // 4. An orphaned grandchild is reparented to us and reaped too.
        let pidfile = dir.join("grandchild");
        let child = spawn(&sh(&format!(
            "(sleep 0.2; exit 0) & echo $! > {p}.tmp && mv {p}.tmp {p}; exit 0",
            p = pidfile.display()
        )));
        let (got, _) = collect(&mut reaper, &BTreeSet::from([child.pid])).await;
        assert_eq!(got[&child.pid].code(), Some(0));
        let grandchild: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let (got, _) = collect(&mut reaper, &BTreeSet::from([grandchild])).await;
        assert_eq!(got[&grandchild].code(), Some(0));

        // 5. More exits than the channel holds, none read meanwhile: the
        //    reaper waits instead of dropping any.
        let cmd = AppCommand::new(OsStr::new("/bin/true"), &[]).unwrap();
        let children: Vec<Child> = (0..150).map(|_| spawn(&cmd)).collect();
        for child in &children {
            wait_exited(&child.pidfd);
        }
        let want: BTreeSet<u32> = children.iter().map(|c| c.pid).collect();
        let (got, others) = collect(&mut reaper, &want).await;
        assert!(got.values().all(ExitStatus::success));
        assert!(others.is_empty(), "unexpected exits {others:?}");

        // 6. Exec failures race the reaper's waitpid(-1): spawn must neither
        //    panic nor hang, and whoever reaps, nothing is left behind.
        let garbage = dir.join("garbage");
        std::fs::write(&garbage, b"\x01\x02 not a program\n").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bad = AppCommand::new(garbage.as_os_str(), &[]).unwrap();
        let spawner = std::thread::spawn(move || {
            for _ in 0..50 {
                let err = bad.spawn(&GenerationSetup::default()).unwrap_err();
                assert!(matches!(err, SpawnError::Exec { .. }), "{err:?}");
            }
        });
        let mut raced = 0;
        while !spawner.is_finished() {
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(5), reaper.next()).await {
                raced += 1;
            }
        }
        spawner.join().unwrap();
        println!("the reaper won the race for {raced} of 50 failed spawns");

        // 7. No zombie of ours is left (exits reported but not yet read are
        //    already reaped; give the reaper a moment to drain SIGCHLD).
        let start = Instant::now();
        loop {
            let zombies = our_zombies();
            if zombies.is_empty() {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "zombies left behind: {zombies:?}");
            // Drain whatever the reaper reports meanwhile (failed spawns it won).
            let _ = tokio::time::timeout(Duration::from_millis(100), reaper.next()).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
