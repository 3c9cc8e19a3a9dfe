//! `baton run` against senders that are not who their pid says, and against
//! values too large for a deadline: real processes, real sockets.
//!
//! - A pid named by `MAINPID=` whose process exited, then handed to a
//!   stranger with exactly that pid (`clone3()` with `set_tid`, root only:
//!   deterministic, no fork race), is not the generation's any more.
//! - `--notify-access all` does not accept a process that joined the
//!   generation's process group (`setpgid()`) without descending from it.
//! - Huge `--ready-timeout`/`--stop-timeout` are refused at parse time
//!   (exit 2, the flag and its maximum named); huge `EXTEND_TIMEOUT_USEC=`
//!   and `WATCHDOG_USEC=` from the app are saturated.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::expect_success as ok;
use baton_testbed::poll_until;

/// How long a `baton run` with a bad option may take to refuse it.
const REFUSAL: Duration = Duration::from_secs(10);

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// `baton run --control DIR/baton.sock ARGS -- APP...` with `env` and
/// `T_DIR=DIR`, once generation 1 is active.
fn start(test: &str, args: &[&str], app: &[&OsStr], env: &[(&str, &OsStr)]) -> Baton {
    let dir = baton_testbed::unique_temp_dir("baton-hardening", test);
    BatonBuilder::new(baton_bin(), &dir)
        .no_http_listener()
        .args(args)
        .app(app)
        .env("T_DIR", &dir)
        .envs(env.iter().copied())
        .start()
}

fn read_pid(path: &Path) -> u32 {
    poll_until(&format!("{} written", path.display()), WAIT, || {
        std::fs::read_to_string(path).ok().and_then(|t| t.strip_suffix('\n')?.parse().ok())
    })
    .unwrap()
}

// ---- 4: pid reuse after MAINPID= ------------------------------------------

/// Not a test of its own: [`a_reused_mainpid_is_not_the_generation`] runs
/// this test binary as the app (`T_ROLE=mainpid-app`). As the generation's
/// leader it starts `sleep` and names it with `MAINPID=`, then obeys the
/// lines of the FIFO `$T_FIFO`: `kill` ends and reaps the `sleep` (its
/// pid is free from then on), `status TEXT` sends `STATUS=TEXT`.
#[test]
fn mainpid_app_helper() {
    if std::env::var_os("T_ROLE").as_deref() != Some(OsStr::new("mainpid-app")) {
        return;
    }
    let dir = PathBuf::from(std::env::var_os("T_DIR").unwrap());
    let mut sleeper = Command::new("sleep").arg("1000").spawn().unwrap();
    let n = baton_sd::Notifier::from_env().unwrap().expect("NOTIFY_SOCKET");
    use baton_sd::NotifyState;
    n.notify(&[NotifyState::Ready, NotifyState::MainPid(sleeper.id()), NotifyState::Status("serving")]).unwrap();
    std::fs::write(dir.join("leader"), format!("{}\n", std::process::id())).unwrap();
    std::fs::write(dir.join("mainpid"), format!("{}\n", sleeper.id())).unwrap();
    // Read-write: opening never blocks and the FIFO never reports EOF.
    let fifo = std::fs::OpenOptions::new().read(true).write(true).open(std::env::var_os("T_FIFO").unwrap()).unwrap();
    for line in BufReader::new(fifo).lines() {
        let line = line.unwrap();
        if line == "kill" {
            sleeper.kill().unwrap();
            sleeper.wait().unwrap();
            std::fs::write(dir.join("killed"), "").unwrap();
        } else if let Some(text) = line.strip_prefix("status ") {
            n.notify(&[NotifyState::Status(text)]).unwrap();
        }
    }
    // Not reached (the FIFO never ends); Baton's SIGTERM ends this process.
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// Creates a process with exactly pid `pid` (`clone3()` with `set_tid`,
/// which needs CAP_SYS_ADMIN) that sends `payload` to the unix datagram
/// socket at `socket` and exits; returns once it has been reaped.
fn send_as_pid(pid: u32, socket: &Path, payload: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    // Everything the child needs is prepared here: after clone3() in this
    // multi-threaded process it may only make async-signal-safe calls.
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = socket.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len(), "socket path too long");
    for (slot, byte) in addr.sun_path.iter_mut().zip(path) {
        *slot = *byte as libc::c_char;
    }
    let set_tid: [libc::pid_t; 1] = [pid as libc::pid_t];
    // SAFETY: an all-zero clone_args is valid (no flags, no pointers).
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.exit_signal = libc::SIGCHLD as u64;
    args.set_tid = set_tid.as_ptr() as u64;
    args.set_tid_size = 1;
    // SAFETY: clone3 with a valid, fully initialised clone_args of the size
    // passed; the child only calls sendto and _exit (async-signal-safe) on
    // memory prepared above.
    let ret =
        unsafe { libc::syscall(libc::SYS_clone3, &args as *const libc::clone_args, size_of::<libc::clone_args>()) };
    if ret == 0 {
        // SAFETY: the child: sendto on prepared buffers, then _exit.
        unsafe {
            let sent = libc::sendto(
                fd,
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&addr as *const libc::sockaddr_un).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            libc::_exit(if sent == payload.len() as isize { 0 } else { 1 });
        }
    }
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours and no longer used.
    unsafe { libc::close(fd) };
    assert!(ret > 0, "clone3 with set_tid={pid} failed: {err} (needs root: CAP_SYS_ADMIN)");
    assert_eq!(ret as u32, pid, "clone3 gave another pid");
    let mut status = 0;
    // SAFETY: waits for our own child, status is a valid out-pointer.
    let waited = unsafe { libc::waitpid(ret as libc::pid_t, &mut status, 0) };
    assert_eq!(waited as u32, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the stranger could not send: {status:#x}");
}

#[test]
fn a_reused_mainpid_is_not_the_generation() {
    if !rustix::process::geteuid().is_root() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root (clone3 with set_tid) in CI");
        eprintln!("SKIP a_reused_mainpid_is_not_the_generation: needs root (clone3 with set_tid)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let app = [exe.as_os_str(), OsStr::new("--exact"), OsStr::new("mainpid_app_helper"), OsStr::new("--nocapture")];
    let dir = baton_testbed::unique_temp_dir("baton-hardening", "fifo");
    let fifo = dir.join("cmd");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let b = start(
        "mainpid",
        &["--notify-access", "main"],
        &app,
        &[("T_ROLE", OsStr::new("mainpid-app")), ("T_FIFO", fifo.as_os_str())],
    );
    let leader = read_pid(&b.dir().join("leader"));
    let sleeper = read_pid(&b.dir().join("mainpid"));
    let s = b.status();
    assert_eq!((s.generations.len(), s.generations[0].pid), (1, sleeper), "MAINPID= taken: {s:?}");

    // The sleeper exits and is reaped: its pid is free.
    let mut cmd = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    cmd.write_all(b"kill\n").unwrap();
    poll_until("the MAINPID= process reaped", WAIT, || b.dir().join("killed").exists().then_some(())).unwrap();
    assert!(!Path::new(&format!("/proc/{sleeper}")).exists(), "pid {sleeper} still taken");

    // A stranger with exactly that pid.
    send_as_pid(sleeper, &b.notify_socket(), b"STATUS=hijacked\nSTOPPING=1");
    // Then the leader, after it: datagrams are processed in order, so once
    // this status shows, the stranger's was handled.
    cmd.write_all(b"status after the stranger\n").unwrap();
    let s = b.wait_status("the leader's or the stranger's status", |s| {
        s.generations.len() != 1
            || s.generations[0].status_text.as_deref() != Some("serving")
            || s.restarting
            || s.crash_restarts > 0
    });
    assert_eq!(s.generations.len(), 1, "a replacement was started: {s:?}");
    let g = &s.generations[0];
    assert_eq!((g.generation, g.state.as_str()), (1, "active"), "{s:?}");
    assert_eq!(g.status_text.as_deref(), Some("after the stranger"), "{s:?}");
    assert_eq!(g.pid, leader, "the leader is the main process again once its MAINPID= process exited");
    assert!(!s.restarting && s.crash_restarts == 0, "{s:?}");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 15: --notify-access all and setpgid -----------------------------------

#[test]
fn notify_access_all_refuses_a_process_that_joined_the_group() {
    // The app: `baton notify` (its child, so a descendant) sends READY=1.
    let script = r#""$0" notify --ready --status original && exec sleep 1000"#;
    let b = start(
        "setpgid",
        &["--notify-access", "all"],
        &[OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(script), OsStr::new(baton_bin())],
        &[],
    );
    let s = b.status();
    let leader = s.generations[0].pid;
    assert_eq!(s.generations[0].status_text.as_deref(), Some("original"));

    // A process of the test (not of the generation) moves itself into the
    // generation's process group, as anyone in Baton's session can, and
    // notifies. `baton notify` waits for its BARRIER=1: once it returns,
    // Baton has handled the message before it (taken or refused).
    let out = Command::new(baton_bin())
        .args(["notify", "--status", "hijacked", "--stopping"])
        .env("NOTIFY_SOCKET", b.notify_socket())
        .process_group(leader as i32)
        .output()
        .unwrap();
    eprintln!("stranger's baton notify: {out:?}");
    let s = b.status();
    assert_eq!(s.generations.len(), 1, "STOPPING=1 from a stranger started a replacement: {s:?}");
    assert_eq!(s.generations[0].status_text.as_deref(), Some("original"), "{s:?}");
    assert!(!s.restarting && s.crash_restarts == 0, "{s:?}");

    // A real descendant is still accepted: the generation's own shell
    // spawns one through a restart.
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
}

// ---- 6: deadlines out of range ----------------------------------------------

#[test]
fn huge_timeouts_are_refused_at_parse_time() {
    for flag in ["--ready-timeout", "--stop-timeout"] {
        // The first fits an Instant and was accepted; the second overflowed
        // one and panicked at the first restart or stop.
        for value in ["1000000000000h", "4000000000000000h", "8761h"] {
            let dir = baton_testbed::unique_temp_dir("baton-hardening", "parse");
            let mut child = Command::new(baton_bin())
                .arg("run")
                .arg("--control")
                .arg(dir.join("baton.sock"))
                .args([flag, value, "--", "/bin/sleep", "1000"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
                .spawn()
                .unwrap();
            // Refused at once; one that was accepted runs until stopped.
            let exited = poll_until("baton run to exit", REFUSAL, || child.try_wait().unwrap());
            if exited.is_err() {
                baton_testbed::terminate(&mut child, WAIT);
            }
            let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let status = exited.unwrap_or_else(|e| panic!("{flag} {value} was accepted: {e}\n{stderr}"));
            assert_eq!(status.code(), Some(2), "{flag} {value}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(stderr.contains(flag) && stderr.contains("the maximum is 8760h"), "{flag} {value}: {stderr}");
        }
    }
}

#[test]
fn huge_extend_timeout_and_watchdog_from_the_app_are_saturated() {
    // While starting, and again while draining (on SIGTERM), the app asks
    // for u64::MAX µs more, and sets a watchdog of u64::MAX µs; with the
    // longest timeouts allowed on top. Baton goes on: it restarts, retires
    // the old generation (which exits on its own), and stops.
    let max = u64::MAX;
    let script = format!(
        r#"trap '"$0" notify EXTEND_TIMEOUT_USEC={max}; exit 0' TERM
"$0" notify EXTEND_TIMEOUT_USEC={max}
"$0" notify --ready WATCHDOG_USEC={max}
sleep 1000 & wait"#
    );
    let b = start(
        "extend",
        &["--notify-access", "all", "--stop-timeout", "8760h", "--ready-timeout", "8760h"],
        &[OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(&script), OsStr::new(baton_bin())],
        &[],
    );
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    let s = b.wait_status("generation 1 retired", |s| s.generations.len() == 1);
    assert_eq!(s.generations[0].generation, 2, "{s:?}");
    let out = ok(&b.cli(&["stop"]));
    assert!(out.contains("stopped"), "{out}");
}
