//! A minimal service manager for tests and the benchmark, speaking the same
//! protocol as systemd: it owns a listening socket and an fd store, starts
//! the service with `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID` and
//! `NOTIFY_SOCKET`, and handles `READY=1`, `STATUS=`, `FDSTORE=1`
//! (`FDNAME=`, `FDPOLL=0`), `FDSTOREREMOVE=1` and `BARRIER=1`. A restart is
//! systemd's: stop (SIGTERM, wait for exit), then start with the socket and
//! the store.
//!
//! It lets the handoff be tested without root, and measured without a
//! testbed. It is not Baton: no credentials check (there is one child), no
//! watchdog, no timeouts beyond the caller's.

use std::ffi::OsString;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_sd::wire::{self, BarrierUse, Lifecycle, NotifyState};
use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketAddrUnix, SocketFlags};

/// One fd-store entry.
#[derive(Debug)]
pub struct Stored {
    pub name: String,
    pub fd: OwnedFd,
    /// Dropped on hang-up (systemd's default; `FDPOLL=0` turns it off).
    pub poll: bool,
}

#[derive(Debug)]
pub struct MiniManager {
    dir: PathBuf,
    notify: OwnedFd,
    notify_path: PathBuf,
    listener: TcpListener,
    listen_name: String,
    pub store: Vec<Stored>,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub ready: bool,
    pub status: String,
    pub stopping: bool,
    /// Datagrams received, for debugging failed tests.
    pub received: usize,
    /// `FDSTORE=1` datagrams received, and the most fds one carried.
    pub store_datagrams: usize,
    pub most_fds_in_one: usize,
    /// `FDSTOREREMOVE=1` datagrams received.
    pub remove_datagrams: usize,
    /// Where the service's stderr goes (appended); inherited when `None`.
    stderr: Option<PathBuf>,
    /// The service's `RLIMIT_NOFILE` (soft and hard), when set.
    nofile: Option<u64>,
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl MiniManager {
    /// A manager for `program args…` listening on a fresh 127.0.0.1 port
    /// (passed to the service under `listen_name`).
    pub fn new(program: &Path, args: &[&str], listen_name: &str) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "baton-httpd-manager-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let notify_path = dir.join("notify");
        let notify = rustix::net::socket_with(
            AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&notify, &SocketAddrUnix::new(&notify_path)?)?;
        // Room for a burst of FDSTORE datagrams (the sender blocks beyond).
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&notify, 8 << 20);
        let listener = bind_listener()?;
        Ok(Self {
            dir,
            notify,
            notify_path,
            listener,
            listen_name: listen_name.to_owned(),
            store: Vec::new(),
            program: program.to_owned(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
            child: None,
            ready: false,
            status: String::new(),
            stopping: false,
            received: 0,
            store_datagrams: 0,
            most_fds_in_one: 0,
            remove_datagrams: 0,
            stderr: None,
            nofile: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Replaces the arguments for later starts.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(OsString::from).collect();
    }

    /// Adds an environment variable for later starts.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Appends the service's stderr to `path` for later starts.
    pub fn set_stderr_file(&mut self, path: &Path) {
        self.stderr = Some(path.to_owned());
    }

    /// Sets the service's `RLIMIT_NOFILE` (soft and hard) for later starts.
    pub fn set_nofile_limit(&mut self, limit: u64) {
        self.nofile = Some(limit);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn store_names(&self) -> Vec<String> {
        self.store.iter().map(|s| s.name.clone()).collect()
    }

    /// Starts the service with the listener and the store, and waits for
    /// `READY=1`. Fails if it exits first or `timeout` passes.
    pub fn start(&mut self, timeout: Duration) -> io::Result<u32> {
        self.prune_hung_up();
        self.spawn()?;
        let deadline = Instant::now() + timeout;
        while !self.ready {
            if let Some(status) = self.child_exited()? {
                self.child = None;
                // What it sent before exiting (its `STATUS=failed: ...`)
                // may still be queued: the exit can be seen first.
                self.pump(Duration::ZERO)?;
                return Err(other(format!("the service exited before READY=1: {status}; STATUS={}", self.status)));
            }
            if Instant::now() >= deadline {
                return Err(other(format!("no READY=1 within {timeout:?}; STATUS={}", self.status)));
            }
            self.pump(Duration::from_millis(50))?;
        }
        Ok(self.pid().unwrap_or(0))
    }

    /// Starts the service without waiting for anything.
    pub fn spawn(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Err(other("the service is already running".into()));
        }
        self.ready = false;
        self.stopping = false;
        self.status.clear();
        let n = 1 + self.store.len();
        let mut raw: Vec<RawFd> = Vec::with_capacity(n);
        let mut names: Vec<&str> = Vec::with_capacity(n);
        raw.push(self.listener.as_raw_fd());
        names.push(&self.listen_name);
        for s in &self.store {
            raw.push(s.fd.as_raw_fd());
            names.push(&s.name);
        }
        // Planned here: nothing may be allocated between fork and exec.
        let moves = plan_moves(&raw);
        let mut cmd = Command::new("/bin/sh");
        // The shell is replaced by the service (same pid), so $$ is the
        // pid LISTEN_PID must name.
        cmd.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
            .arg(&self.program)
            .args(&self.args)
            .env("LISTEN_FDS", n.to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env("NOTIFY_SOCKET", &self.notify_path)
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(path) = &self.stderr {
            cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
        }
        let nofile = self.nofile.map(|n| libc::rlimit { rlim_cur: n, rlim_max: n });
        // SAFETY: between fork and exec only dup2, fcntl and setrlimit,
        // which are async-signal-safe; `moves` and `nofile` are read, not
        // allocated or freed.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(lim) = &nofile
                    && libc::setrlimit(libc::RLIMIT_NOFILE, lim) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                for &(from, to) in &moves {
                    // dup2 clears close-on-exec on its target; an fd already
                    // in place needs it cleared by hand.
                    let r = if from == to { libc::fcntl(to, libc::F_SETFD, 0) } else { libc::dup2(from, to) };
                    if r < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Sends SIGTERM to the service.
    pub fn begin_stop(&mut self) -> io::Result<()> {
        let pid = self.pid().ok_or_else(|| other("the service is not running".into()))?;
        // SAFETY: plain syscall; the child is not reaped yet, so the pid is ours.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Simulates the manager's death (Baton SIGKILLed): the notify socket's
    /// path stays but nothing is bound to it any more, so the service's
    /// next datagram (`STOPPING=1`, `FDSTORE=1`) fails with
    /// `ECONNREFUSED`, as it does once Baton is gone.
    pub fn lose_notify_socket(&mut self) -> io::Result<()> {
        std::fs::remove_file(&self.notify_path)?;
        let dead =
            rustix::net::socket_with(AddressFamily::UNIX, rustix::net::SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
        rustix::net::bind(&dead, &SocketAddrUnix::new(&self.notify_path)?)?;
        // Closing it leaves the path with no socket behind it.
        drop(dead);
        Ok(())
    }

    /// Processes notifications until the service exits; then reads what it
    /// sent before exiting. SIGKILLs it after `timeout`.
    pub fn wait_stopped(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child_exited()? {
                self.child = None;
                self.ready = false;
                self.pump(Duration::ZERO)?;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                if let Some(c) = &mut self.child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                self.child = None;
                return Err(other(format!("the service did not stop within {timeout:?}; STATUS={}", self.status)));
            }
            self.pump(Duration::from_millis(50))?;
        }
    }

    pub fn stop(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        self.begin_stop()?;
        self.wait_stopped(timeout)
    }

    /// systemd's restart: stop, then start with the socket and the store.
    pub fn restart(&mut self, timeout: Duration) -> io::Result<u32> {
        self.stop(timeout)?;
        self.start(timeout)
    }

    /// Processes notifications until `pred(STATUS)` holds.
    pub fn wait_status(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !pred(&self.status) {
            if Instant::now() >= deadline {
                return Err(other(format!("STATUS never matched within {timeout:?}; last: {:?}", self.status)));
            }
            self.pump(Duration::from_millis(50))?;
        }
        Ok(())
    }

    fn child_exited(&mut self) -> io::Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(c) => c.try_wait(),
            None => Err(other("the service is not running".into())),
        }
    }

    /// Waits up to `wait` for notifications, then processes every queued one.
    pub fn pump(&mut self, wait: Duration) -> io::Result<()> {
        if !wait.is_zero() {
            let ts = rustix::time::Timespec::try_from(wait).map_err(|_| other("bad wait".into()))?;
            let mut pfd = [PollFd::new(&self.notify, PollFlags::IN)];
            match rustix::event::poll(&mut pfd, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        while self.receive_one()? {}
        Ok(())
    }

    /// Receives and applies one datagram; false when none is queued.
    fn receive_one(&mut self) -> io::Result<bool> {
        let mut data = [0u8; wire::NOTIFY_BUFFER_MAX + 1];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(wire::NOTIFY_FD_MAX))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            &self.notify,
            &mut [IoSliceMut::new(&mut data)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        ) {
            Ok(m) => m,
            Err(rustix::io::Errno::AGAIN) => return Ok(false),
            Err(rustix::io::Errno::INTR) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        self.received += 1;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(iter) = m {
                fds.extend(iter);
            }
        }
        let Ok(parsed) = wire::parse(&data[..msg.bytes.min(data.len())]) else { return Ok(true) };
        match parsed.barrier() {
            // Closing the fd (dropping `fds`) is the acknowledgement: every
            // earlier datagram has been processed.
            BarrierUse::Valid | BarrierUse::WithOtherFields => return Ok(true),
            BarrierUse::None => {}
        }
        match parsed.lifecycle() {
            Some(Lifecycle::Ready) => self.ready = true,
            Some(Lifecycle::Stopping) => self.stopping = true,
            _ => {}
        }
        if let Some(s) = parsed.status() {
            self.status = s.to_owned();
        }
        let name = parsed.fdname();
        if parsed.has(&NotifyState::FdStoreRemove) {
            self.remove_datagrams += 1;
            if let Some(name) = name {
                self.store.retain(|s| s.name != name);
            }
        } else if parsed.has(&NotifyState::FdStore) {
            let poll = !parsed.has(&NotifyState::FdPollDisable);
            let name = name.unwrap_or("stored");
            self.store_datagrams += 1;
            self.most_fds_in_one = self.most_fds_in_one.max(fds.len());
            for fd in fds {
                self.store.push(Stored { name: name.to_owned(), fd, poll });
            }
        }
        Ok(true)
    }

    /// Drops stored fds whose peer hung up, as systemd does by polling.
    pub fn prune_hung_up(&mut self) {
        self.store.retain(|s| {
            if !s.poll {
                return true;
            }
            let mut pfd = [PollFd::new(&s.fd, PollFlags::empty())];
            let ts = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
            match rustix::event::poll(&mut pfd, Some(&ts)) {
                Ok(0) => true,
                Ok(_) => !pfd[0].revents().intersects(PollFlags::HUP | PollFlags::ERR),
                Err(_) => true,
            }
        });
    }

    /// Puts an arbitrary fd into the store (to test what the service does
    /// with entries it cannot use).
    pub fn store_fd(&mut self, name: &str, fd: impl AsFd) -> io::Result<()> {
        let fd = fd.as_fd().try_clone_to_owned()?;
        self.store.push(Stored { name: name.to_owned(), fd, poll: true });
        Ok(())
    }
}

/// The `dup2(from, to)` steps that put `sources[i]` at fd `3 + i`, whatever
/// the overlaps between sources and targets (a step with `from == to` means
/// "clear close-on-exec"). Moving every source above the target range first
/// would need fds numbered up to twice the store's size, more than the fd
/// limit allows with 10,000 stored connections; instead the moves are
/// ordered so that no source is overwritten before it is copied — the
/// "parallel move" problem: each target is the source of at most one other
/// move, so the moves form chains, done from their free end backwards, and
/// cycles, broken by one copy to a spare fd number.
pub fn plan_moves(sources: &[RawFd]) -> Vec<(RawFd, RawFd)> {
    use std::collections::{HashMap, HashSet};
    let n = sources.len();
    let target = |i: usize| 3 + i as RawFd;
    let by_src: HashMap<RawFd, usize> = sources.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    let by_dst: HashMap<RawFd, usize> = (0..n).map(|i| (target(i), i)).collect();
    let taken: HashSet<RawFd> = sources.iter().copied().chain((0..n).map(target)).collect();
    let spare = (3..).find(|fd| !taken.contains(fd)).unwrap_or(RawFd::MAX);
    let mut src: Vec<RawFd> = sources.to_vec();
    let mut done = vec![false; n];
    let mut moves = Vec::with_capacity(n + 1);
    // Move `k`, then each move waiting for `k`'s old place, backwards.
    let back_from = |mut k: usize, src: &[RawFd], done: &mut [bool], moves: &mut Vec<(RawFd, RawFd)>| loop {
        moves.push((src[k], target(k)));
        done[k] = true;
        match by_dst.get(&sources[k]) {
            Some(&q) if !done[q] && q != k => k = q,
            _ => break,
        }
    };
    for start in 0..n {
        if done[start] {
            continue;
        }
        // Follow "my target is someone's source" to the chain's free end,
        // or back to `start` (a cycle).
        let mut k = start;
        let cycle = loop {
            match by_src.get(&target(k)) {
                Some(&j) if j == start => break j != k,
                Some(&j) if !done[j] && j != k => k = j,
                _ => break false,
            }
        };
        if cycle {
            // Park `start`'s source on the spare fd: the move whose target
            // is `start`'s old place (`k`, the last one walked) is free.
            moves.push((src[start], spare));
            src[start] = spare;
        }
        back_from(k, &src, &mut done, &mut moves);
    }
    moves
}

/// A listening socket on 127.0.0.1 with a deep backlog (std's is 128).
fn bind_listener() -> io::Result<TcpListener> {
    use rustix::net::{SocketType, sockopt};
    let fd = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, 4096)?;
    Ok(TcpListener::from(fd))
}

impl Drop for MiniManager {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
