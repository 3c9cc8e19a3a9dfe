//! Shared helpers for baton-sd's integration tests: real notify receivers,
//! temporary directories and child processes with fds placed at 3...
//!
//! Tests run as threads of one process, so nothing here changes this
//! process's environment or its fds 3..: whatever needs a particular
//! environment or fd layout runs in a child process.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, IoSliceMut, Read as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// How long anything that should happen promptly may take on a loaded
/// machine before a test gives up. Only ever an upper bound.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A name unique within this test run: the test's own name, our pid and a
/// counter.
pub fn unique(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("baton-sd-{test}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(unique(test));
        std::fs::create_dir(&path).expect("create temp dir");
        TempDir(path)
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

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The sender's pid from `SCM_CREDENTIALS`.
    pub pid: Option<i32>,
}

impl Datagram {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("UTF-8 payload")
    }
}

/// A real notify socket: a bound `AF_UNIX` datagram socket with
/// `SO_PASSCRED`, at a path in a fresh temp dir or at a unique abstract name.
pub struct Receiver {
    sock: UnixDatagram,
    /// The address in `NOTIFY_SOCKET` syntax.
    pub addr: String,
    _dir: Option<TempDir>,
}

impl Receiver {
    /// Bound to `<tempdir>/notify`.
    pub fn path(test: &str) -> Self {
        let dir = TempDir::new(test);
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind path socket");
        Self::finish(sock, path.to_str().expect("UTF-8 temp path").to_owned(), Some(dir))
    }

    /// Bound to a unique abstract name.
    pub fn abstract_name(test: &str) -> Self {
        use std::os::linux::net::SocketAddrExt as _;
        let name = unique(test);
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        Self::finish(sock, format!("@{name}"), None)
    }

    /// Both kinds, for tests that must pass on either.
    pub fn both(test: &str) -> [Self; 2] {
        [Self::path(test), Self::abstract_name(test)]
    }

    fn finish(sock: UnixDatagram, addr: String, dir: Option<TempDir>) -> Self {
        rustix::net::sockopt::set_socket_passcred(&sock, true).expect("SO_PASSCRED");
        sock.set_read_timeout(Some(PATIENCE)).expect("SO_RCVTIMEO");
        Receiver { sock, addr, _dir: dir }
    }

    /// Waits (at most [`PATIENCE`]) for the next datagram.
    pub fn recv(&self) -> Datagram {
        self.recv_flags(RecvFlags::empty())
            .unwrap_or_else(|e| panic!("no datagram on {} within {PATIENCE:?}: {e}", self.addr))
    }

    /// The next datagram if one is queued right now.
    pub fn try_recv(&self) -> Option<Datagram> {
        match self.recv_flags(RecvFlags::DONTWAIT) {
            Ok(d) => Some(d),
            Err(rustix::io::Errno::AGAIN) => None,
            Err(e) => panic!("recvmsg on {}: {e}", self.addr),
        }
    }

    /// Asserts that nothing was sent.
    pub fn assert_empty(&self) {
        if let Some(d) = self.try_recv() {
            panic!("expected no datagram on {}, got {:?}", self.addr, String::from_utf8_lossy(&d.payload));
        }
    }

    fn recv_flags(&self, flags: RecvFlags) -> rustix::io::Result<Datagram> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253), ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match rustix::net::recvmsg(&self.sock, &mut iov, &mut control, flags | RecvFlags::CMSG_CLOEXEC) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other?,
            }
        };
        let mut fds = Vec::new();
        let mut pid = None;
        for msg in control.drain() {
            match msg {
                RecvAncillaryMessage::ScmRights(rights) => fds.extend(rights),
                RecvAncillaryMessage::ScmCredentials(cred) => pid = Some(cred.pid.as_raw_nonzero().get()),
                _ => {}
            }
        }
        buf.truncate(received.bytes);
        Ok(Datagram { payload: buf, fds, pid })
    }
}

/// Our own pid as `SCM_CREDENTIALS` reports it.
pub fn own_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// The `FD_CLOEXEC` state of an fd we own.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
    rustix::io::fcntl_getfd(fd).expect("F_GETFD").contains(rustix::io::FdFlags::CLOEXEC)
}

/// The `listen_report` example, built once per test binary.
///
/// `cargo test` builds examples along with the tests, but `cargo test
/// --test NAME` does not, and a binary left from an earlier build may be
/// stale, so this asks cargo to build it (a no-op when it is up to date) and
/// takes the path cargo reports.
pub fn example_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let release = std::env::current_exe().is_ok_and(|p| p.components().any(|c| c.as_os_str() == "release"));
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "baton-sd", "--example", "listen_report", "--message-format=json"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build --example listen_report");
        assert!(out.status.success(), "cargo build --example listen_report failed: {}", out.status);
        let stdout = String::from_utf8(out.stdout).expect("cargo's JSON is UTF-8");
        let exe = stdout
            .lines()
            .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"listen_report\""))
            .find_map(|l| {
                let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
                let end = start + l[start..].find('"')?;
                Some(PathBuf::from(&l[start..end]))
            })
            .expect("cargo reported the listen_report executable");
        assert!(exe.is_file(), "{} does not exist", exe.display());
        exe
    })
}

/// How to start a child: arguments, environment and fds for 3...
#[derive(Default)]
pub struct Spawn<'a> {
    args: Vec<String>,
    env: Vec<(String, String)>,
    fds: Vec<BorrowedFd<'a>>,
    own_pid_vars: Vec<&'static str>,
}

/// Variables no child inherits from the test process, whatever it runs under.
const SCRUBBED: [&str; 7] =
    ["LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The highest fd number (exclusive) the child has closed before exec,
/// beyond the passed ones; sources are parked at or above it.
const FD_SWEEP_END: RawFd = 64;

impl<'a> Spawn<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Places these fds at 3, 4, … in the child (without `FD_CLOEXEC`).
    pub fn fds(mut self, fds: impl IntoIterator<Item = BorrowedFd<'a>>) -> Self {
        self.fds.extend(fds);
        self
    }

    /// Sets `var` to the child's own pid. The child is started through
    /// `sh -c 'export VAR=$$; exec "$0" "$@"'`: the shell's pid is the pid of
    /// the program it execs, and nothing is computed after fork.
    pub fn own_pid_var(mut self, var: &'static str) -> Self {
        self.own_pid_vars.push(var);
        self
    }

    pub fn spawn(self) -> ChildProc {
        let exe = example_bin();
        let mut cmd = if self.own_pid_vars.is_empty() {
            Command::new(exe)
        } else {
            let exports: Vec<String> = self.own_pid_vars.iter().map(|v| format!("{v}=$$")).collect();
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(format!("export {}; exec \"$0\" \"$@\"", exports.join(" "))).arg(exe);
            cmd
        };
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for var in SCRUBBED {
            cmd.env_remove(var);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Park the sources above the range the child rearranges, so that
        // placing one never overwrites another. Close-on-exec: other tests'
        // children must not inherit them.
        let parked: Vec<OwnedFd> = self
            .fds
            .iter()
            .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, FD_SWEEP_END).expect("F_DUPFD_CLOEXEC"))
            .collect();
        let sources: Vec<RawFd> = parked.iter().map(AsRawFd::as_raw_fd).collect();
        assert!(sources.len() < (FD_SWEEP_END - 3) as usize);
        // SAFETY: the closure runs in the forked child before exec, where
        // only async-signal-safe operations are allowed: it performs only
        // fcntl/close/dup syscalls on fd numbers, reads the `sources` slice
        // allocated before fork and allocates nothing (an `io::Error` from
        // an errno does not allocate).
        unsafe {
            cmd.pre_exec(move || place_fds(&sources));
        }
        let mut child = cmd.spawn().expect("spawn child");
        drop(parked);
        let out = lines(child.stdout.take().expect("stdout"));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        ChildProc { child, out, seen: Vec::new(), stderr: Some(stderr) }
    }
}

/// In the forked child: moves `sources[i]` to fd `3 + i` without
/// `FD_CLOEXEC`, and closes every other fd below [`FD_SWEEP_END`] so that no
/// stray inherited fd sits where a test expects a closed one.
fn place_fds(sources: &[RawFd]) -> std::io::Result<()> {
    for (i, &src) in sources.iter().enumerate() {
        let target = 3 + i as RawFd;
        close_if_open(target);
        // SAFETY: `src` is one of the parked fds, open until after spawn.
        let src = unsafe { BorrowedFd::borrow_raw(src) };
        // F_DUPFD_CLOEXEC takes the lowest free number >= target: target
        // itself, just closed. Clearing FD_CLOEXEC lets it survive exec; it
        // must stay open, so it is forgotten rather than dropped.
        let placed = std::mem::ManuallyDrop::new(rustix::io::fcntl_dupfd_cloexec(src, target)?);
        if placed.as_raw_fd() != target {
            return Err(std::io::Error::from_raw_os_error(rustix::io::Errno::BUSY.raw_os_error()));
        }
        rustix::io::fcntl_setfd(&*placed, rustix::io::FdFlags::empty())?;
    }
    for fd in 3 + sources.len() as RawFd..FD_SWEEP_END {
        close_if_open(fd);
    }
    Ok(())
}

fn close_if_open(fd: RawFd) {
    // SAFETY: in the forked child, single-threaded, right before exec: an
    // fd below FD_SWEEP_END is either closed (fcntl says EBADF and nothing
    // happens) or a copy that nothing in this process image will use again,
    // so closing it cannot pull an fd from under a user.
    unsafe {
        if rustix::io::fcntl_getfd(BorrowedFd::borrow_raw(fd)).is_ok() {
            rustix::io::close(fd);
        }
    }
}

/// Reads a child's stdout line by line on a thread.
fn lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running child whose stdout lines arrive through a channel. Killed on
/// drop if still running.
pub struct ChildProc {
    pub child: Child,
    out: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl ChildProc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (at most [`PATIENCE`]) for the next line that satisfies `pred`.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            match self.out.recv_timeout(PATIENCE) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let stderr = self.stderr();
                    panic!("child gave no expected line ({e}); it said {:?}, stderr {stderr:?}", self.seen);
                }
            }
        }
    }

    /// Waits for the child to exit on its own (at most [`PATIENCE`] for its
    /// output to end) and returns every line and the exit code.
    pub fn finish(mut self) -> (Vec<String>, Option<i32>) {
        loop {
            match self.out.recv_timeout(PATIENCE) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("child did not finish; it said {:?}", self.seen);
                }
            }
        }
        let status = self.child.wait().expect("wait for child");
        let stderr = self.stderr();
        if !status.success() {
            eprintln!("child {status}; stderr: {stderr}");
        }
        (std::mem::take(&mut self.seen), status.code())
    }

    fn stderr(&mut self) -> String {
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the example to completion and returns its stdout lines, asserting
/// it exited 0.
pub fn run(spawn: Spawn<'_>) -> Vec<String> {
    let (lines, code) = spawn.spawn().finish();
    assert_eq!(code, Some(0), "child failed; it said {lines:?}");
    lines
}

/// The one line starting with `prefix`.
pub fn line<'l>(lines: &'l [String], prefix: &str) -> &'l str {
    let mut found = lines.iter().filter(|l| l.starts_with(prefix));
    let first = found.next().unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:?}"));
    assert!(found.next().is_none(), "several lines starting with {prefix:?} in {lines:?}");
    first
}

/// Borrows several owned sockets' fds in order.
pub fn borrow_all<'a>(socks: &'a [&'a dyn AsFd]) -> Vec<BorrowedFd<'a>> {
    socks.iter().map(|s| s.as_fd()).collect()
}
