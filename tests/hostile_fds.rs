//! Hostile traffic on Baton's notify and handoff sockets, against the real
//! `baton run` (issue 10, findings 1, 5 and 12).
//!
//! The weapon of finding 1: a loopback TCP connection whose send buffer is
//! full (its peer, a listener of this test, never reads) and whose
//! `SO_LINGER` is [`LINGER`]. Whoever closes its last reference waits in the
//! kernel until the peer acknowledges the data, i.e. the whole linger time.
//! The test sends it to Baton with `SCM_RIGHTS` and closes its own copy, so
//! Baton's close is the last one (the test sends while Baton is stopped and
//! closes its copy before Baton runs again). Baton must stay responsive: it
//! logs the refusal and answers `status` requests within [`PROMPT`], far
//! below the linger. Each
//! test ends the linger itself by closing the never-reading peers (which
//! resets the connections), then checks that Baton's fd count is back to
//! where it started.
//!
//! Senders: this test process, which is no generation (refused datagrams,
//! oversized ones, truncated control data, refused handoff connections); a
//! generation that is this test binary re-executed ([`generation_helper`]),
//! for fds sent without `FDSTORE=1` and to a full store; and, for finding
//! 12, this test process seen from a Baton in its own PID namespace, where
//! the kernel reports the peer's pid as 0. And `baton upgrade` while such
//! fds wait for Baton's closer thread: `execve` would close them on Baton's
//! own thread.
//!
//! Finding 5: a flood of refused datagrams must produce a few log lines and
//! a summary with the exact count, not a line per datagram.

use std::ffi::OsStr;
use std::io::{IoSlice, Write};
use std::mem::MaybeUninit;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::{cargo_bin, poll_until};
use rustix::net::{AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType};

/// How long a close of the weapon socket blocks.
const LINGER: Duration = Duration::from_secs(20);

/// A responsive Baton answers `status` well within this, even on a loaded
/// machine; a frozen one takes about [`LINGER`].
const PROMPT: Duration = Duration::from_secs(5);

/// Set in the environment of a generation that is this test binary.
const HELPER_PORT_ENV: &str = "BATON_HOSTILE_SINK_PORT";
/// The file whose existence tells the helper generation to attack.
const HELPER_TRIGGER_ENV: &str = "BATON_HOSTILE_TRIGGER";

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// A loopback listener whose connections are never read: the weapon
/// sockets' peers. Dropping it resets every connection it holds (unread
/// data), which ends their lingering.
struct Sink {
    listener: TcpListener,
}

impl Sink {
    fn new() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        // Inherited by the connections it accepts: a small window fills fast.
        rustix::net::sockopt::set_socket_recv_buffer_size(&listener, 4096).expect("SO_RCVBUF");
        Sink { listener }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// Ends the weapons' lingering: closing the peers (accepted or still
    /// queued) with unread data resets the connections.
    fn release(self) {
        self.listener.set_nonblocking(true).unwrap();
        let mut peers = Vec::new();
        while let Ok((peer, _)) = self.listener.accept() {
            peers.push(peer);
        }
        drop(peers);
    }
}

/// A connection to the sink at `port` whose close lingers for [`LINGER`]:
/// its send buffer is full and the peer never reads.
fn weapon(port: u16) -> OwnedFd {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sink");
    rustix::net::sockopt::set_socket_send_buffer_size(&conn, 4096).expect("SO_SNDBUF");
    conn.set_nonblocking(true).unwrap();
    let chunk = [0x55u8; 16384];
    let deadline = Instant::now() + WAIT;
    // Written until the kernel takes nothing more: the peer's window and
    // our send buffer are both full.
    loop {
        match conn.write(&chunk) {
            Ok(_) => assert!(Instant::now() < deadline, "the sink's window never filled"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the weapon's send buffer: {e}"),
        }
    }
    rustix::net::sockopt::set_socket_linger(&conn, Some(LINGER)).expect("SO_LINGER");
    OwnedFd::from(conn)
}

/// `PREFIX baton run --control DIR/baton.sock -l http=127.0.0.1:0 ARGS --
/// APP` at `BATON_LOG=info` (the flood test counts lines), with generation
/// 1 active; killed, not stopped, on drop: a Baton frozen by a failing
/// test must not hold the test up for another linger.
fn start(test: &str, prefix: &[&OsStr], args: &[&str], app: &[&OsStr], env: &[(&str, &OsStr)]) -> Baton {
    BatonBuilder::new(baton_bin(), baton_testbed::unique_temp_dir("baton-hostile", test))
        .wrapped_in(prefix)
        .args(args)
        .app(app)
        .envs(env.iter().copied())
        .log_level(Some("info"))
        .kill_on_drop()
        .start()
}

/// Baton serving `baton-sd-probe`.
fn with_probe(test: &str, prefix: &[&OsStr]) -> Baton {
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    let report = std::env::temp_dir().join(format!("baton-hostile-{test}-{}.report", std::process::id()));
    let app =
        [probe.as_os_str(), OsStr::new("--serve"), OsStr::new("http"), OsStr::new("--report"), report.as_os_str()];
    start(test, prefix, &[], &app, &[])
}

/// What these tests watch of Baton besides what the harness has.
trait Responsive {
    /// Asks for `status` `times` times; each answer must come within
    /// [`PROMPT`].
    fn assert_status_prompt(&self, times: usize, during: &str);
    /// Waits until Baton holds at most `at_most` fds.
    fn wait_fds(&self, at_most: usize);
}

impl Responsive for Baton {
    fn assert_status_prompt(&self, times: usize, during: &str) {
        for i in 0..times {
            let started = Instant::now();
            let status = self.try_status();
            let took = started.elapsed();
            assert!(status.is_some(), "status #{i} failed after {took:?} {during}\nlog:\n{}", self.log());
            assert!(
                took < PROMPT,
                "status #{i} took {took:?} {during} (the weapon lingers {LINGER:?}): Baton's thread was blocked \
                 in a close\nlog:\n{}",
                self.log()
            );
        }
    }

    fn wait_fds(&self, at_most: usize) {
        poll_until(&format!("baton's fds back to {at_most}"), WAIT, || (self.fd_count() <= at_most).then_some(()))
            .unwrap_or_else(|e| panic!("{e}: {} now: {:?}\nlog:\n{}", self.fd_count(), self.fd_targets(), self.log()));
    }
}

/// Runs `f` while the process `pid` (Baton) is stopped, so that what `f`
/// sends is received only after `f` has closed its own copies: Baton's close
/// is then certainly the last one, the one that lingers. (Without it, an
/// unfixed Baton that is quick may drop its copy first, and the test's own
/// close would linger instead.)
fn while_stopped<R>(pid: u32, f: impl FnOnce() -> R) -> R {
    let target = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(target, rustix::process::Signal::STOP).expect("SIGSTOP baton");
    poll_until(&format!("pid {pid} stopped"), WAIT, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
        (state == 'T').then_some(())
    })
    .unwrap();
    let result = f();
    rustix::process::kill_process(target, rustix::process::Signal::CONT).expect("SIGCONT baton");
    result
}

/// Sends `payload` with `fds` to a datagram socket at `path`.
fn send_dgram(path: &Path, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let notifier = baton_sd::Notifier::new(path.to_str().unwrap()).expect("notifier");
    notifier.send_raw(payload, fds).unwrap_or_else(|e| panic!("sending to {}: {e}", path.display()));
}

/// Connects to the handoff socket at `path` and queues `fd` in the
/// connection (Baton stopped: it waits in the backlog), then closes our end:
/// Baton's close of its end releases `fd`.
fn send_through_handoff(path: &Path, fd: BorrowedFd<'_>) {
    let conn = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .expect("socket");
    rustix::net::connect(&conn, &rustix::net::SocketAddrUnix::new(path).unwrap()).expect("connect to handoff");
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(&conn, &[IoSlice::new(b"conn")], &mut control, SendFlags::NOSIGNAL)
        .expect("queue an fd in the handoff connection");
}

#[test]
fn refused_notify_datagrams_with_lingering_fds_do_not_freeze_baton() {
    let b = with_probe("refused-notify", &[]);
    let baseline = b.fd_count();
    let sink = Sink::new();
    let weapons: Vec<OwnedFd> = (0..4).map(|_| weapon(sink.port())).collect();
    while_stopped(b.pid(), || {
        // Repeatedly: each would freeze an unfixed Baton for the whole linger.
        for w in &weapons[..3] {
            send_dgram(&b.notify_socket(), b"READY=1\nFDSTORE=1", &[w.as_fd()]);
        }
        // Oversized: refused by the receive path itself.
        send_dgram(&b.notify_socket(), &vec![b'x'; 5000], &[weapons[3].as_fd(), weapons[3].as_fd()]);
        drop(weapons);
    });
    // Logged just before the fds are dropped.
    b.wait_log_within("refused: not a generation's main process", PROMPT);
    b.assert_status_prompt(3, "after refused datagrams carried lingering sockets");
    b.wait_log_within("notify datagram of 5000 bytes", PROMPT);
    b.assert_status_prompt(1, "after an oversized datagram carried lingering sockets");
    sink.release();
    b.wait_fds(baseline);
}

#[test]
fn refused_handoff_peers_with_queued_lingering_fds_do_not_freeze_baton() {
    let b = with_probe("refused-handoff", &[]);
    let baseline = b.fd_count();
    let sink = Sink::new();
    let weapons: Vec<OwnedFd> = (0..3).map(|_| weapon(sink.port())).collect();
    while_stopped(b.pid(), || {
        for w in &weapons {
            send_through_handoff(&b.handoff_socket(), w.as_fd());
        }
        drop(weapons);
    });
    b.wait_log_within("handoff connection from pid", PROMPT);
    b.assert_status_prompt(3, "after refused handoff connections held lingering sockets");
    sink.release();
    b.wait_fds(baseline);
}

#[test]
fn truncated_control_data_with_lingering_fds_does_not_freeze_baton() {
    use rustix::process::{Pid, Resource, prlimit};
    let b = with_probe("truncated", &[]);
    let baseline = b.fd_count();
    let sink = Sink::new();
    let w = weapon(sink.port());
    // Baton at its open-file limit: the kernel installs the few fds that fit
    // and truncates the control data.
    let pid = Pid::from_raw(b.pid() as i32).unwrap();
    // Baton inherited ours.
    let limit = rustix::process::getrlimit(Resource::Nofile);
    let low = rustix::process::Rlimit { current: Some(baseline as u64 + 6), maximum: limit.maximum };
    prlimit(Some(pid), Resource::Nofile, low).expect("lower baton's RLIMIT_NOFILE");
    while_stopped(b.pid(), || {
        let copies = vec![w.as_fd(); 200];
        send_dgram(&b.notify_socket(), b"FDSTORE=1", &copies);
        drop(w);
    });
    b.wait_log_within("its control data was truncated", PROMPT);
    prlimit(Some(pid), Resource::Nofile, limit).expect("restore baton's RLIMIT_NOFILE");
    b.assert_status_prompt(3, "after truncated control data carried lingering sockets");
    sink.release();
    b.wait_fds(baseline);
}

#[test]
fn a_generations_unstored_and_overflowing_fds_do_not_freeze_baton() {
    let sink = Sink::new();
    let dir = baton_testbed::unique_temp_dir("baton-hostile", "generation-trigger");
    let trigger = dir.join("attack");
    let exe = std::env::current_exe().unwrap();
    let port = sink.port().to_string();
    let app = [exe.as_os_str(), OsStr::new("generation_helper"), OsStr::new("--exact"), OsStr::new("--nocapture")];
    let env: [(&str, &OsStr); 2] = [(HELPER_PORT_ENV, OsStr::new(&port)), (HELPER_TRIGGER_ENV, trigger.as_os_str())];
    let b = start("generation", &[], &["--fdstore-max", "1"], &app, &env);
    let baseline = b.fd_count();
    std::fs::write(&trigger, "").unwrap();
    b.wait_log_within("fd(s) sent without FDSTORE=1", PROMPT);
    b.assert_status_prompt(3, "after a generation sent lingering sockets without FDSTORE=1");
    b.wait_log_within("the fd store is full", PROMPT);
    b.assert_status_prompt(1, "after a full store refused lingering sockets");
    sink.release();
    // The one fd the store took may stay until its hang-up is noticed.
    b.wait_fds(baseline + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The app of [`a_generations_unstored_and_overflowing_fds_do_not_freeze_baton`]
/// when run by Baton (a no-op as a test): READY=1, then, once the trigger
/// file exists, two lingering sockets without `FDSTORE=1` and three with it
/// (the store holds one).
#[test]
fn generation_helper() {
    let (Some(port), Some(trigger)) = (std::env::var_os(HELPER_PORT_ENV), std::env::var_os(HELPER_TRIGGER_ENV)) else {
        return;
    };
    let port: u16 = port.to_str().unwrap().parse().unwrap();
    let notifier = baton_sd::Notifier::from_env().unwrap().expect("NOTIFY_SOCKET");
    notifier.send_raw(b"READY=1", &[]).unwrap();
    poll_until("the trigger file", Duration::from_secs(600), || Path::new(&trigger).exists().then_some(())).unwrap();
    let unstored = [weapon(port), weapon(port)];
    let overflow = [weapon(port), weapon(port), weapon(port)];
    // Baton is our parent.
    while_stopped(rustix::process::getppid().unwrap().as_raw_nonzero().get() as u32, || {
        let fds: Vec<BorrowedFd<'_>> = unstored.iter().map(|f| f.as_fd()).collect();
        notifier.send_raw(b"STATUS=sending fds without FDSTORE=1", &fds).unwrap();
        let fds: Vec<BorrowedFd<'_>> = overflow.iter().map(|f| f.as_fd()).collect();
        notifier.send_raw(b"FDSTORE=1\nFDNAME=hostile", &fds).unwrap();
        drop((unstored, overflow));
    });
    // A generation lives until Baton stops it.
    std::thread::sleep(Duration::from_secs(3600));
}

/// `N notify datagrams refused from pid P in the last T s` lines: the
/// counts.
fn summary_counts(log: &str, what: &str, from: &str) -> Vec<u64> {
    let needle = format!(" {what} refused from {from} in the last ");
    log.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            let head = l.split(&needle).next()?;
            head.rsplit(' ').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn a_flood_of_refused_datagrams_is_summarised_not_logged_line_by_line() {
    let b = with_probe("flood", &[]);
    let lines_before = b.log().lines().count();
    let sock = UnixDatagram::unbound().unwrap();
    sock.connect(b.notify_socket()).unwrap();
    let started = Instant::now();
    let mut sent: u64 = 0;
    while started.elapsed() < Duration::from_secs(2) {
        // Blocking: when Baton's receive queue is full, we wait for it.
        sock.send(b"READY=1").expect("send to the notify socket");
        sent += 1;
    }
    let me = format!("pid {}", std::process::id());
    let one_by_one = format!("notify message from pid {} refused", std::process::id());
    // Every datagram is counted: by a summary of its interval, or logged on
    // its own in an interval that needed no summary. A summarised interval
    // logged exactly its burst.
    let accounted = |log: &str| {
        let summaries = summary_counts(log, "notify datagrams", &me);
        let single = log.lines().filter(|l| l.contains(&one_by_one)).count() as u64;
        summaries.iter().sum::<u64>() + single - summaries.len() as u64 * baton::ratelimit::RefusalLog::BURST
    };
    poll_until(&format!("all {sent} refused datagrams accounted for in the log"), 3 * WAIT, || {
        (accounted(&b.log()) == sent).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {} so far\nlog:\n{}", accounted(&b.log()), b.log()));
    let log = b.log();
    let lines = log.lines().count() - lines_before;
    assert!(sent > 1000, "the flood was too small to mean anything: {sent}");
    assert!(lines <= 40, "{sent} refused datagrams made {lines} log lines:\n{log}");
    b.assert_status_prompt(1, "after the flood");
}

#[test]
fn a_handoff_peer_whose_pid_baton_cannot_see_is_refused_clearly_and_quietly() {
    if !baton_testbed::skip_unless_root("a_handoff_peer_whose_pid_baton_cannot_see_is_refused_clearly_and_quietly") {
        return;
    }
    // Baton in a PID namespace of its own: this test process is outside it,
    // so SO_PEERCRED reports our pid as 0 to Baton.
    let prefix = ["unshare", "--pid", "--mount-proc", "--kill-child", "--"].map(OsStr::new);
    let b = with_probe("pidns", &prefix);
    for _ in 0..30 {
        let conn = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .expect("socket");
        rustix::net::connect(&conn, &rustix::net::SocketAddrUnix::new(b.handoff_socket()).unwrap())
            .expect("connect to handoff");
    }
    b.wait_log("its pid is not visible in Baton's PID namespace");
    poll_until("the summary of refused handoff connections", 3 * WAIT, || {
        let counts = summary_counts(&b.log(), "handoff connections", "senders whose pid is not visible to Baton");
        (counts.iter().sum::<u64>() == 30).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", b.log()));
    let log = b.log();
    let single = log.lines().filter(|l| l.contains("its pid is not visible in Baton's PID namespace")).count();
    assert_eq!(single as u64, baton::ratelimit::RefusalLog::BURST, "{log}");
    assert!(!log.contains("from pid 0"), "pid 0 is no pid:\n{log}");
    b.assert_status_prompt(1, "after refused handoff connections");
}

#[test]
fn an_upgrade_is_not_held_up_by_fds_waiting_for_the_closer() {
    let b = with_probe("upgrade", &[]);
    let baseline = b.fd_count();
    let sink = Sink::new();
    // One keeps the closer thread busy, the others wait in its queue; the
    // exec of `baton upgrade` would close those on Baton's thread, one
    // linger after the other.
    let weapons: Vec<OwnedFd> = (0..3).map(|_| weapon(sink.port())).collect();
    while_stopped(b.pid(), || {
        for w in &weapons {
            send_dgram(&b.notify_socket(), b"READY=1", &[w.as_fd()]);
        }
        drop(weapons);
    });
    b.wait_log_within("refused: not a generation's main process", PROMPT);
    let started = Instant::now();
    let out =
        Command::new(baton_bin()).args(["upgrade", "--control"]).arg(b.control()).output().expect("baton upgrade");
    let took = started.elapsed();
    assert!(out.status.success(), "baton upgrade failed after {took:?}: {out:?}\nlog:\n{}", b.log());
    assert!(took < LINGER, "baton upgrade took {took:?} (the weapons linger {LINGER:?} each)\nlog:\n{}", b.log());
    let s = b.wait_status("the upgrade done", |s| s.upgrades == 1);
    assert_eq!(s.generations.len(), 1, "{s:?}");
    b.assert_status_prompt(1, "after the upgrade");
    sink.release();
    b.wait_fds(baseline);
}
