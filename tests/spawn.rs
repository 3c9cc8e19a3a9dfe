//! `AppCommand::spawn` on real processes.
//!
//! The child under test is this very test binary, re-executed with
//! `--exact <test> --nocapture` and `BATON_SPAWN_TEST_ROLE` set: every test
//! starts with [`as_child`], which plays the role and exits the process, so
//! the re-executed binary never runs the test itself.
//!
//! - `report:PATH`: probe fds 0..1024 with `fcntl(F_GETFD)` (opens nothing),
//!   `fstat` them, then write pid, pgid, the protocol variables and the
//!   signal state from `/proc/thread-self/status` to PATH.
//! - `relay:CASE:PATH`: an intermediate Baton-like process, for cases that
//!   must change process-wide state (fds at fixed numbers, a leaked fd, its
//!   own environment, signal dispositions) without disturbing the other tests
//!   running as threads here; it spawns a reporter with `AppCommand` and
//!   waits for it.
//!
//! Children are waited for with `waitpid(pid)`: this binary has no
//! `waitpid(-1)` reaper (that is `tests/reaper.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use baton::spawn::{AppCommand, Child, GenerationSetup, SpawnError};
use rustix::process::Signal;

const ROLE: &str = "BATON_SPAWN_TEST_ROLE";

/// Variables the reporter reports (present or not).
const WATCHED: [&str; 10] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "BATON_GENERATION",
    "BATON_TEST_KEPT",
    ROLE,
];

/// Generous: the machine is a noisy 2-core box.
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The child side.

/// Plays the role in `BATON_SPAWN_TEST_ROLE`, if set, and exits.
fn as_child() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let code = if let Some(path) = role.strip_prefix("report:") {
        write_report(Path::new(path));
        0
    } else if let Some(rest) = role.strip_prefix("relay:") {
        let (case, path) = rest.split_once(':').expect("relay:CASE:PATH");
        relay(case, Path::new(path))
    } else {
        eprintln!("unknown role {role:?}");
        2
    };
    std::process::exit(code);
}

fn write_report(path: &Path) {
    let mut out = String::new();
    // First, before anything opens an fd of its own.
    for fd in 0..1024 {
        // SAFETY: F_GETFD on any number is harmless.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            continue;
        }
        // SAFETY: F_GETFL likewise.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let (dev, ino) = dev_ino_raw(fd);
        let cloexec = flags & libc::FD_CLOEXEC != 0;
        let nonblock = fl & libc::O_NONBLOCK != 0;
        out += &format!("fd {fd} {} {} {dev} {ino}\n", cloexec as u8, nonblock as u8);
    }
    out += &format!("pid {}\n", std::process::id());
    // SAFETY: getpgid(0) has no preconditions.
    out += &format!("pgid {}\n", unsafe { libc::getpgid(0) });
    for var in WATCHED {
        if let Some(value) = std::env::var_os(var) {
            out += &format!("env {var}={}\n", value.to_string_lossy());
        }
    }
    // This thread's view: the process-wide file shows the main thread, whose
    // mask is briefly full while glibc's pthread_create() runs there. A
    // thread inherits the mask it was created with, so this thread still
    // shows the mask the program started with.
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("SigBlk:") {
            out += &format!("sigblk {}\n", v.trim());
        }
        if let Some(v) = line.strip_prefix("SigIgn:") {
            out += &format!("sigign {}\n", v.trim());
        }
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The intermediate process of the `relay` cases. Returns its exit code.
fn relay(case: &str, path: &Path) -> i32 {
    let test = std::env::var("BATON_SPAWN_TEST_NAME").unwrap();
    let cmd = reporter_command(&test);
    let mut meta = String::new();
    let child = match case {
        // Sources at 3, 4, 5 passed as [4, 3, 5]: a naive dup2 loop would
        // copy fd 4 over 3 before moving 3.
        "awkward" => {
            // Park the sockets high, so that 3..6 are free to stage.
            let parked: Vec<OwnedFd> = (0..3)
                .map(|_| {
                    let sock = UnixDatagram::pair().unwrap().0;
                    // SAFETY: F_DUPFD_CLOEXEC returns a new fd that we own.
                    let high = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                    assert!(high >= 100);
                    // SAFETY: `high` was just created and is owned by nobody else.
                    unsafe { OwnedFd::from_raw_fd(high) }
                })
                .collect();
            let mut placed = Vec::new();
            for (i, sock) in parked.iter().enumerate() {
                let target = 3 + i as RawFd;
                // SAFETY: probing only.
                if unsafe { libc::fcntl(target, libc::F_GETFD) } >= 0 {
                    eprintln!("relay: fd {target} is already in use; cannot stage the awkward layout");
                    return 3;
                }
                // SAFETY: `target` is free (checked above); dup3 makes a
                // close-on-exec copy there, which we then own.
                let got = unsafe { libc::dup3(sock.as_raw_fd(), target, libc::O_CLOEXEC) };
                assert_eq!(got, target);
                // SAFETY: see above.
                placed.push(unsafe { OwnedFd::from_raw_fd(target) });
            }
            drop(parked);
            let order = [&placed[1], &placed[0], &placed[2]];
            for fd in order {
                let (dev, ino) = dev_ino(fd.as_fd());
                meta += &format!("source {dev} {ino}\n");
            }
            let fds: Vec<(BorrowedFd<'_>, &str)> =
                order.iter().zip(["a", "b", "c"]).map(|(fd, name)| (fd.as_fd(), name)).collect();
            let child = spawn_reporter(&cmd, path, &fds, None, None);
            drop(placed);
            child
        }
        // 600 sockets at about 3..603, passed in reverse order with the
        // first one again at the end, under a soft RLIMIT_NOFILE of 800:
        // moving every source above the targets first would need fd
        // numbers up to ~1,200; placing them in place needs ~610.
        "crowded" => {
            let limit = libc::rlimit { rlim_cur: 800, rlim_max: 800.max(current_nofile_max()) };
            // SAFETY: a valid rlimit structure; lowering our own soft limit.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
            let socks: Vec<UnixDatagram> = (0..600).map(|_| UnixDatagram::unbound().unwrap()).collect();
            let mut order: Vec<&UnixDatagram> = socks.iter().rev().collect();
            order.push(&socks[599]);
            for sock in &order {
                let (dev, ino) = dev_ino(sock.as_fd());
                meta += &format!("source {dev} {ino}\n");
            }
            let fds: Vec<(BorrowedFd<'_>, &str)> = order.iter().map(|sock| (sock.as_fd(), "c")).collect();
            spawn_reporter(&cmd, path, &fds, None, None)
        }
        // A pipe without O_CLOEXEC and a socket whose FD_CLOEXEC was cleared:
        // neither may reach the child.
        "leak" => {
            let mut pipe = [0; 2];
            // SAFETY: pipe() fills the array; we keep the fds open on purpose.
            assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
            let sock = UnixDatagram::pair().unwrap().0;
            // SAFETY: clearing FD_CLOEXEC on our own socket.
            assert_eq!(unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, 0) }, 0);
            let leaked = [pipe[0], pipe[1], sock.as_raw_fd()];
            meta += &format!("leaked {} {} {}\n", leaked[0], leaked[1], leaked[2]);
            let passed = UnixDatagram::pair().unwrap().0;
            let (dev, ino) = dev_ino(passed.as_fd());
            meta += &format!("source {dev} {ino}\n");
            let child = spawn_reporter(&cmd, path, &[(passed.as_fd(), "only")], None, None);
            std::mem::forget(sock);
            child
        }
        // Our environment holds Baton-from-systemd's variables: none may
        // reach the app, with or without fds of its own.
        "env-nofds" => spawn_reporter(&cmd, path, &[], None, None),
        "env-fds" => {
            let passed = UnixDatagram::pair().unwrap().0;
            spawn_reporter(&cmd, path, &[(passed.as_fd(), "mine")], Some("@baton-test-notify"), Some(7_000_000))
        }
        // SIGUSR2 ignored process-wide and SIGUSR1 blocked in the spawning
        // thread: the app must start with default dispositions and an empty
        // mask, as systemd gives it.
        "signals" => {
            // SAFETY: plain sigaction/sigmask calls on valid structures.
            unsafe {
                libc::signal(libc::SIGUSR2, libc::SIG_IGN);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            for line in status.lines().filter(|l| l.starts_with("SigBlk:") || l.starts_with("SigIgn:")) {
                meta += &format!("relay {}\n", line.replace('\t', " "));
            }
            spawn_reporter(&cmd, path, &[], None, None)
        }
        other => panic!("unknown relay case {other}"),
    };
    std::fs::write(path.with_extension("meta"), meta).unwrap();
    let status = wait(&child);
    if status.success() { 0 } else { 10 }
}

// ---------------------------------------------------------------------------
// The parent side.

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("baton-spawn-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This test binary, re-executed to run only `test` (which plays the role).
fn reporter_command(test: &str) -> AppCommand {
    let exe = std::env::current_exe().unwrap();
    let args: Vec<OsString> =
        ["--exact", test, "--nocapture", "--test-threads=1", "-q"].iter().map(OsString::from).collect();
    AppCommand::new(exe.as_os_str(), &args).unwrap()
}

fn spawn_reporter(
    cmd: &AppCommand,
    report: &Path,
    fds: &[(BorrowedFd<'_>, &str)],
    notify: Option<&str>,
    watchdog: Option<u64>,
) -> Child {
    let extra = [(ROLE, format!("report:{}", report.display())), ("BATON_GENERATION", "new".to_owned())];
    let setup = GenerationSetup {
        fds,
        notify_socket: notify,
        watchdog_usec: watchdog,
        extra_env: &extra,
        output: None,
        ..Default::default()
    };
    cmd.spawn(&setup).unwrap()
}

/// Blocks until `child` ends and reaps it.
fn wait(child: &Child) -> ExitStatus {
    let mut raw = 0;
    loop {
        // SAFETY: waiting for our own child into a valid status pointer.
        let r = unsafe { libc::waitpid(child.pid as i32, &mut raw, 0) };
        if r == child.pid as i32 {
            return ExitStatus::from_raw(raw);
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::EINTR), "waitpid({}): {err}", child.pid);
    }
}

fn dev_ino_raw(fd: RawFd) -> (u64, u64) {
    // SAFETY: fstat into a zeroed stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return (0, 0);
        }
        (st.st_dev, st.st_ino)
    }
}

fn dev_ino(fd: BorrowedFd<'_>) -> (u64, u64) {
    dev_ino_raw(fd.as_raw_fd())
}

/// One open fd in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FdState {
    cloexec: bool,
    nonblock: bool,
    dev: u64,
    ino: u64,
}

#[derive(Debug, Default)]
struct Report {
    fds: BTreeMap<RawFd, FdState>,
    pid: u32,
    pgid: u32,
    env: BTreeMap<String, String>,
    sigblk: String,
    sigign: String,
}

impl Report {
    fn read(path: &Path) -> Report {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
        let mut r = Report::default();
        for line in text.lines() {
            let (kind, rest) = line.split_once(' ').unwrap();
            match kind {
                "fd" => {
                    let v: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                    let state = FdState { cloexec: v[1] == 1, nonblock: v[2] == 1, dev: v[3], ino: v[4] };
                    r.fds.insert(v[0] as RawFd, state);
                }
                "pid" => r.pid = rest.parse().unwrap(),
                "pgid" => r.pgid = rest.parse().unwrap(),
                "env" => {
                    let (k, v) = rest.split_once('=').unwrap();
                    r.env.insert(k.to_owned(), v.to_owned());
                }
                "sigblk" => r.sigblk = rest.to_owned(),
                "sigign" => r.sigign = rest.to_owned(),
                _ => panic!("bad report line {line:?}"),
            }
        }
        r
    }

    fn open_fds(&self) -> BTreeSet<RawFd> {
        self.fds.keys().copied().collect()
    }

    fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }
}

fn fd_set(range: std::ops::Range<RawFd>) -> BTreeSet<RawFd> {
    range.collect()
}

/// Runs a relay case in a fresh intermediate process with `env` added to
/// its environment; returns the reporter's report and the relay's notes.
fn run_relay(test: &str, case: &str, env: &[(&str, &str)]) -> (Report, String) {
    let scratch = Scratch::new(&format!("{test}-{case}"));
    let report = scratch.path("report");
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, format!("relay:{case}:{}", report.display()))
        .env("BATON_SPAWN_TEST_NAME", test);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().unwrap();
    assert!(status.success(), "relay {case} failed: {status}");
    let meta = std::fs::read_to_string(report.with_extension("meta")).unwrap();
    (Report::read(&report), meta)
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn no_fds_means_no_listen_variables_and_only_stdio() {
    as_child();
    let scratch = Scratch::new("nofds");
    let report = scratch.path("report");
    let cmd = reporter_command("no_fds_means_no_listen_variables_and_only_stdio");
    let child = spawn_reporter(&cmd, &report, &[], None, None);
    assert!(wait(&child).success());
    let r = Report::read(&report);
    assert_eq!(r.pid, child.pid);
    assert_eq!(r.pgid, child.pid, "the child leads its own process group");
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"] {
        assert_eq!(r.env(var), None, "{var} must not be set without fds/notify/watchdog");
    }
    assert_eq!(r.env("BATON_GENERATION"), Some("new"));
    assert_eq!(r.open_fds(), fd_set(0..3), "only stdio may be open: {:?}", r.fds);
}

#[test]
fn three_named_fds_land_at_3_with_notify_and_watchdog() {
    as_child();
    let scratch = Scratch::new("three");
    let report = scratch.path("report");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let unix = UnixListener::bind(scratch.path("sock")).unwrap();
    let (dgram, _peer) = UnixDatagram::pair().unwrap();
    let sources: [BorrowedFd<'_>; 3] = [tcp.as_fd(), unix.as_fd(), dgram.as_fd()];
    let fds: Vec<(BorrowedFd<'_>, &str)> = sources.iter().copied().zip(["http", "admin", "stored"]).collect();
    let cmd = reporter_command("three_named_fds_land_at_3_with_notify_and_watchdog");
    let child = spawn_reporter(&cmd, &report, &fds, Some("/run/baton/notify"), Some(5_000_000));
    assert!(wait(&child).success());
    let r = Report::read(&report);

    let pid = child.pid.to_string();
    assert_eq!(r.pid, child.pid);
    assert_eq!(r.env("LISTEN_PID"), Some(pid.as_str()), "LISTEN_PID is the child's own pid, no padding");
    assert_eq!(r.env("WATCHDOG_PID"), Some(pid.as_str()));
    assert_eq!(r.env("WATCHDOG_USEC"), Some("5000000"));
    assert_eq!(r.env("LISTEN_FDS"), Some("3"));
    assert_eq!(r.env("LISTEN_FDNAMES"), Some("http:admin:stored"));
    assert_eq!(r.env("NOTIFY_SOCKET"), Some("/run/baton/notify"));
    assert_eq!(r.pgid, child.pid);
    assert_eq!(r.open_fds(), fd_set(0..6), "stdio and the three passed fds only: {:?}", r.fds);
    for (i, source) in sources.iter().enumerate() {
        let fd = &r.fds[&(3 + i as RawFd)];
        assert!(!fd.cloexec, "fd {} must not be close-on-exec", 3 + i);
        assert_eq!((fd.dev, fd.ino), dev_ino(*source), "fd {} is the same socket as source {i}", 3 + i);
    }
    // O_NONBLOCK is left as it was (it is shared with our copy).
    assert!(r.fds[&3].nonblock);
    assert!(!r.fds[&4].nonblock);
    // SAFETY: F_GETFD/F_GETFL on our own open fds.
    unsafe {
        for source in sources {
            assert_eq!(libc::fcntl(source.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        assert_ne!(libc::fcntl(tcp.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK, 0);
        assert_eq!(libc::fcntl(unix.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK, 0);
    }
}

#[test]
fn sources_at_target_numbers_in_swapped_order() {
    as_child();
    let (r, meta) = run_relay("sources_at_target_numbers_in_swapped_order", "awkward", &[]);
    let sources = sources_in(&meta);
    assert_eq!(sources.len(), 3);
    assert_eq!(r.open_fds(), fd_set(0..6), "{:?}", r.fds);
    for (i, source) in sources.iter().enumerate() {
        let fd = r.fds[&(3 + i as RawFd)];
        assert_eq!((fd.dev, fd.ino), *source, "fd {} holds source {i}", 3 + i);
        assert!(!fd.cloexec);
    }
    assert_eq!(r.env("LISTEN_FDNAMES"), Some("a:b:c"));
}

/// The (dev, inode) of each source the relay passed, in order.
fn sources_in(meta: &str) -> Vec<(u64, u64)> {
    meta.lines()
        .filter_map(|l| l.strip_prefix("source "))
        .map(|l| {
            let (d, i) = l.split_once(' ').unwrap();
            (d.parse().unwrap(), i.parse().unwrap())
        })
        .collect()
}

fn current_nofile_max() -> libc::rlim_t {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the structure.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_max
}

#[test]
fn many_sources_in_the_target_range_are_placed_in_place() {
    as_child();
    let (r, meta) = run_relay("many_sources_in_the_target_range_are_placed_in_place", "crowded", &[]);
    let sources = sources_in(&meta);
    assert_eq!(sources.len(), 601);
    assert_eq!(r.open_fds(), fd_set(0..3 + 601), "{:?}", r.open_fds());
    for (i, source) in sources.iter().enumerate() {
        let fd = r.fds[&(3 + i as RawFd)];
        assert_eq!((fd.dev, fd.ino), *source, "fd {} holds source {i}", 3 + i);
        assert!(!fd.cloexec, "fd {} is close-on-exec", 3 + i);
    }
}

#[test]
fn leaked_fd_without_cloexec_does_not_reach_the_child() {
    as_child();
    let (r, meta) = run_relay("leaked_fd_without_cloexec_does_not_reach_the_child", "leak", &[]);
    let leaked: Vec<RawFd> =
        meta.lines().find_map(|l| l.strip_prefix("leaked ")).unwrap().split(' ').map(|x| x.parse().unwrap()).collect();
    let source = meta.lines().find_map(|l| l.strip_prefix("source ")).unwrap();
    assert_eq!(r.open_fds(), fd_set(0..4), "leaked {leaked:?} must not be open in the child: {:?}", r.fds);
    let fd3 = r.fds[&3];
    assert_eq!(format!("{} {}", fd3.dev, fd3.ino), source, "fd 3 is the passed socket, not a leaked one");
}

#[test]
fn batons_own_protocol_variables_never_leak() {
    as_child();
    let inherited = [
        ("LISTEN_PID", "1"),
        ("LISTEN_FDS", "7"),
        ("LISTEN_FDNAMES", "a:b:c:d:e:f:g"),
        ("LISTEN_PIDFDID", "12345"),
        ("NOTIFY_SOCKET", "/run/systemd/notify"),
        ("WATCHDOG_USEC", "1"),
        ("WATCHDOG_PID", "1"),
        ("BATON_GENERATION", "old"),
        ("BATON_TEST_KEPT", "yes"),
    ];
    let test = "batons_own_protocol_variables_never_leak";
    let (r, _) = run_relay(test, "env-nofds", &inherited);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET"] {
        assert_eq!(r.env(var), None, "inherited {var} leaked to the app");
    }
    assert_eq!(r.env("WATCHDOG_USEC"), None);
    assert_eq!(r.env("WATCHDOG_PID"), None);
    assert_eq!(r.env("BATON_TEST_KEPT"), Some("yes"), "the rest of the environment is inherited");
    assert_eq!(r.env("BATON_GENERATION"), Some("new"), "extra_env replaces an inherited variable");

    let (r, _) = run_relay(test, "env-fds", &inherited);
    let pid = r.pid.to_string();
    assert_eq!(r.env("LISTEN_PID"), Some(pid.as_str()));
    assert_eq!(r.env("LISTEN_FDS"), Some("1"));
    assert_eq!(r.env("LISTEN_FDNAMES"), Some("mine"));
    // Its own pidfd id where the kernel has pidfs (checked against the
    // child's pidfd in tests/protocol_versions.rs), never the inherited one.
    let pidfd_id = r.env("LISTEN_PIDFDID");
    assert!(pidfd_id.is_none_or(|id| id != "12345" && id.parse::<u64>().is_ok()), "LISTEN_PIDFDID={pidfd_id:?}");
    assert_eq!(r.env("NOTIFY_SOCKET"), Some("@baton-test-notify"));
    assert_eq!(r.env("WATCHDOG_PID"), Some(pid.as_str()));
    assert_eq!(r.env("WATCHDOG_USEC"), Some("7000000"));
    assert_eq!(r.open_fds(), fd_set(0..4));
}

#[test]
fn child_starts_with_default_signals_and_empty_mask() {
    as_child();
    let (r, meta) = run_relay("child_starts_with_default_signals_and_empty_mask", "signals", &[]);
    // The relay really had SIGUSR1 (bit 9) blocked and SIGUSR2 (bit 11)
    // ignored, so the check below can fail.
    let relay_mask = |key: &str| {
        let line = meta.lines().find_map(|l| l.strip_prefix(&format!("relay {key}: "))).unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    assert_ne!(relay_mask("SigBlk") & (1 << (libc::SIGUSR1 - 1)), 0);
    assert_ne!(relay_mask("SigIgn") & (1 << (libc::SIGUSR2 - 1)), 0);
    assert_eq!(u64::from_str_radix(&r.sigblk, 16).unwrap(), 0, "empty signal mask in the app");
    let ignored = u64::from_str_radix(&r.sigign, 16).unwrap();
    assert_eq!(ignored & (1 << (libc::SIGUSR2 - 1)), 0, "SIGUSR2 must be back to default, SigIgn={ignored:#x}");
}

#[test]
fn missing_and_non_executable_programs_are_clear_errors() {
    as_child();
    let scratch = Scratch::new("errors");
    let name = "baton-test-no-such-program-9f3";
    let err = AppCommand::new(OsStr::new(name), &[]).unwrap_err();
    assert!(matches!(err, SpawnError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(name) && msg.contains("PATH"), "{msg}");

    let missing = scratch.path("missing");
    let err = AppCommand::new(missing.as_os_str(), &[]).unwrap_err();
    assert!(matches!(err, SpawnError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");

    let plain = scratch.path("plain-file");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = AppCommand::new(plain.as_os_str(), &[]).unwrap_err();
    assert!(matches!(err, SpawnError::NotExecutable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("plain-file") && msg.contains("execute permission"), "{msg}");

    let err = AppCommand::new(scratch.0.as_os_str(), &[]).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");

    let err = AppCommand::new(OsStr::new("/bin/sh"), &[OsString::from("a\0b")]).unwrap_err();
    assert!(matches!(err, SpawnError::Nul { .. }), "{err:?}");
    assert!(err.to_string().contains("argument 1"), "{err}");

    // PATH lookup resolves to an absolute path.
    let sh = AppCommand::new(OsStr::new("sh"), &[]).unwrap();
    assert!(sh.program().is_absolute() && sh.program().ends_with("sh"), "{}", sh.program().display());
}

#[test]
fn exec_failures_come_back_as_errors() {
    as_child();
    let scratch = Scratch::new("exec");
    let garbage = scratch.path("garbage");
    std::fs::write(&garbage, b"\x01\x02 this is not a program\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = AppCommand::new(garbage.as_os_str(), &[]).unwrap();
    let started = Instant::now();
    let err = cmd.spawn(&GenerationSetup::default()).unwrap_err();
    assert!(started.elapsed() < DEADLINE);
    match &err {
        SpawnError::Exec { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENOEXEC), "{err}"),
        other => panic!("expected Exec, got {other:?}"),
    }
    assert!(err.to_string().contains("garbage"), "{err}");

    let script = scratch.path("script");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = AppCommand::new(script.as_os_str(), &[]).unwrap().spawn(&GenerationSetup::default()).unwrap_err();
    assert!(matches!(&err, SpawnError::Exec { source, .. } if source.raw_os_error() == Some(libc::ENOENT)), "{err:?}");

    // Executable at resolution time, no longer at spawn time.
    let later = scratch.path("later");
    std::fs::write(&later, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&later, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = AppCommand::new(later.as_os_str(), &[]).unwrap();
    std::fs::set_permissions(&later, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = cmd.spawn(&GenerationSetup::default()).unwrap_err();
    assert!(matches!(&err, SpawnError::Exec { source, .. } if source.raw_os_error() == Some(libc::EACCES)), "{err:?}");
}

#[test]
fn invalid_names_and_variables_are_refused_before_fork() {
    as_child();
    let cmd = AppCommand::new(OsStr::new("/bin/true"), &[]).unwrap();
    let (sock, _peer) = UnixDatagram::pair().unwrap();
    let fds = [(sock.as_fd(), "a:b")];
    let err = cmd.spawn(&GenerationSetup { fds: &fds, ..Default::default() }).unwrap_err();
    assert!(matches!(err, SpawnError::FdNames(_)), "{err:?}");
    assert!(err.to_string().contains("a:b"), "{err}");

    for name in ["LISTEN_FDS", "NOTIFY_SOCKET", "WATCHDOG_PID", "", "A=B"] {
        let extra = [(name, "1".to_owned())];
        let err = cmd.spawn(&GenerationSetup { extra_env: &extra, ..Default::default() }).unwrap_err();
        assert!(matches!(err, SpawnError::InvalidEnv { .. }), "{name}: {err:?}");
    }
    let err = cmd.spawn(&GenerationSetup { notify_socket: Some(""), ..Default::default() }).unwrap_err();
    assert!(matches!(err, SpawnError::InvalidEnv { .. }), "{err:?}");
}

/// `sh` running two background `sleep`s; returns the child, pidfds for the
/// sleeps and their pids.
fn spawn_family(scratch: &Scratch) -> (Child, Vec<OwnedFd>) {
    let pids = scratch.path("pids");
    let script = format!(
        "sleep 100 & echo $! > {p}.tmp; sleep 100 & echo $! >> {p}.tmp; mv {p}.tmp {p}; wait",
        p = pids.display()
    );
    let cmd = AppCommand::new(OsStr::new("/bin/sh"), &["-c".into(), script.into()]).unwrap();
    let child = cmd.spawn(&GenerationSetup::default()).unwrap();
    let start = Instant::now();
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&pids) {
            break text;
        }
        assert!(start.elapsed() < DEADLINE, "the shell never wrote its children's pids");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The sleeps are the shell's children and the shell is still waiting for
    // them, so these pids are theirs while the shell lives.
    let sleeps = text
        .lines()
        .map(|l| {
            let pid = rustix::process::Pid::from_raw(l.trim().parse().unwrap()).unwrap();
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap()
        })
        .collect();
    (child, sleeps)
}

/// Whether the process behind `pidfd` has exited, waiting up to `timeout`.
fn exited_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    let ts = rustix::time::Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: timeout.subsec_nanos() as i64 };
    loop {
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(n) => return n == 1,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll on pidfd: {e}"),
        }
    }
}

#[test]
fn signal_reaches_the_main_process_only() {
    as_child();
    let scratch = Scratch::new("signal");
    let (child, sleeps) = spawn_family(&scratch);
    child.signal(Signal::TERM).unwrap();
    let status = wait(&child);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    for sleep in &sleeps {
        assert!(!exited_within(sleep, Duration::ZERO), "a grandchild died from a signal meant for the main process");
    }
    // The group outlives its leader: signal_group still reaches the sleeps.
    child.signal_group(Signal::KILL).unwrap();
    for sleep in &sleeps {
        assert!(exited_within(sleep, DEADLINE), "signal_group did not reach an orphaned member");
    }
    // After the leader is reaped, pidfd_send_signal reports ESRCH, never
    // hitting a stranger.
    assert_eq!(child.signal(Signal::TERM).unwrap_err().raw_os_error(), Some(libc::ESRCH));
}

#[test]
fn signal_group_reaches_the_whole_generation() {
    as_child();
    let scratch = Scratch::new("group");
    let (child, sleeps) = spawn_family(&scratch);
    child.signal_group(Signal::TERM).unwrap();
    let status = wait(&child);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    for sleep in &sleeps {
        assert!(exited_within(sleep, DEADLINE), "signal_group did not reach a child of the main process");
    }
}

#[test]
fn measure_spawn_latency() {
    as_child();
    let cmd = AppCommand::new(OsStr::new("/bin/true"), &[]).unwrap();
    let socks: Vec<(UnixDatagram, UnixDatagram)> = (0..3).map(|_| UnixDatagram::pair().unwrap()).collect();
    let fds: Vec<(BorrowedFd<'_>, &str)> =
        socks.iter().zip(["a", "b", "c"]).map(|((s, _), name)| (s.as_fd(), name)).collect();
    let extra = [("BATON_GENERATION", "1".to_owned())];
    let setup = GenerationSetup {
        fds: &fds,
        notify_socket: Some("@n"),
        watchdog_usec: None,
        extra_env: &extra,
        output: None,
        ..Default::default()
    };
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let start = Instant::now();
        let child = cmd.spawn(&setup).unwrap();
        times.push(start.elapsed());
        assert!(wait(&child).success());
    }
    times.sort();
    println!(
        "AppCommand::spawn(/bin/true, 3 fds): median {:?}, p90 {:?}, max {:?} over {} spawns",
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[times.len() - 1],
        times.len()
    );
}
