//! Where a generation's stdout and stderr go ([`OutputMode`]).
//!
//! **Inherited** (the default when Baton's stderr is the journal, see
//! [`stderr_is_journal`]): the generation gets Baton's own stdout and
//! stderr, so under systemd it writes straight into the journal stream and
//! nothing depends on Baton staying alive. That matters when Baton dies:
//! with `KillMode=control-group` systemd then SIGTERMs the generation so it
//! drains, and an app that logs while draining must not meet a broken pipe
//! (`EPIPE`, or death by `SIGPIPE` for a C program with the default
//! disposition Baton gives it) and lose its requests in flight.
//! `JOURNAL_STREAM` is passed on unchanged and stays true for the app, which
//! may then use the journal's native protocol. Baton keeps no lines then;
//! failure reports say where to read them instead ([`InheritedTo::hint`]).
//! The stream is the one systemd opened for the unit (as root, so journald
//! trusts its unit name: the lines of a generation that exited before
//! journald read them are still the unit's); its identifier is the unit's
//! `SyslogIdentifier=`, which `baton units` sets to the app's program name.
//! Baton's own lines are native entries with their own identifier, `baton`.
//!
//! **Piped** (the default otherwise): each generation writes into its own
//! pipe; one task per generation copies it on, without blocking the
//! supervisor's thread: under the journal as one native entry per line with
//! the generation's identity ([`crate::journal::NativeJournal`]), else the
//! bytes unchanged to Baton's stderr. It remembers the last [`TAIL_LINES`]
//! lines (each cut at [`LINE_MAX`] bytes). Memory per generation is
//! bounded whatever the app prints ([`UNWRITTEN_MAX`] waiting to be
//! written, plus the tail).
//!
//! The read end is shared between the copying task and the [`Tail`] until
//! the output ends, so that `baton upgrade` can hand it, with the lines
//! kept and the bytes read but not yet written ([`Tail::unwritten`]), to
//! the next program image ([`Tail::pipe_fd`], [`adopt`]): the app never
//! notices, its pipe stays open, unread bytes wait in it, and no byte read
//! is lost or written twice.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use rustix::net::SendFlags;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::journal::Identity;

/// Lines kept per generation.
///
/// Enough for the cause to survive what a failing app prints after it: a
/// gunicorn whose workers fail to import the app ends with the arbiter's own
/// chained `HaltServer` traceback, up to ~40 lines after the last worker's
/// `RuntimeError` (measured; 20 lines lost the cause in about one run of
/// six). At most `TAIL_LINES * LINE_MAX` = 60 KiB per generation.
pub const TAIL_LINES: usize = 60;
/// Longest line kept (longer lines are cut, not dropped).
pub const LINE_MAX: usize = 1024;

/// How generations' stdout and stderr are connected (`baton run --output`,
/// resolved: `auto` is decided once at startup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// A pipe per generation, copied to Baton's stderr with the last lines
    /// kept for failure reports.
    #[default]
    Pipe,
    /// Baton's own stdout and stderr, unchanged (the journal under systemd).
    Inherit,
}

impl OutputMode {
    /// `auto`: [`Inherit`](Self::Inherit) when Baton's stderr is the journal
    /// stream, [`Pipe`](Self::Pipe) otherwise.
    pub fn auto() -> OutputMode {
        if stderr_is_journal() { OutputMode::Inherit } else { OutputMode::Pipe }
    }
}

/// systemd.exec(5): stderr is connected to the journal when
/// `$JOURNAL_STREAM` (`<dev>:<inode>`) names the file fd 2 refers to. A
/// wrapper may have redirected stderr since, hence the comparison.
pub fn stderr_is_journal() -> bool {
    journal_stream_matches(std::env::var_os("JOURNAL_STREAM").as_deref(), std::io::stderr().as_fd())
}

/// Whether a `JOURNAL_STREAM` value names the file `fd` refers to.
pub fn journal_stream_matches(value: Option<&std::ffi::OsStr>, fd: BorrowedFd<'_>) -> bool {
    let Some((dev, ino)) = value.and_then(|v| v.to_str()).and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match rustix::fs::fstat(fd) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Where inherited output ends up, so failure reports can point there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InheritedTo {
    /// The journal, through Baton's own stream.
    Journal {
        /// The systemd unit Baton runs in (from its cgroup), if any.
        unit: Option<String>,
        /// Whether that unit belongs to a user manager (`journalctl --user-unit`).
        user: bool,
    },
    /// Baton's own stdout and stderr, which are not the journal.
    BatonsOwn,
}

impl InheritedTo {
    /// Looks at Baton's stderr and cgroup now (both survive `baton upgrade`).
    pub fn detect() -> InheritedTo {
        if !stderr_is_journal() {
            return InheritedTo::BatonsOwn;
        }
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match unit_of_cgroup(&cgroup) {
            Some((unit, user)) => InheritedTo::Journal { unit: Some(unit), user },
            None => InheritedTo::Journal { unit: None, user: false },
        }
    }

    /// Where to read what generation `pid`, started at `since`, printed.
    ///
    /// journald files each line of a stream under the credentials the
    /// kernel attaches to the write (`SO_PASSCRED`), so the app's lines carry
    /// its own `_PID` although the stream is Baton's (checked on systemd 252
    /// and 257 by tests/under_systemd.rs). Processes the app started write
    /// under their own pids, hence the second, wider command.
    pub fn hint(&self, pid: u32, since: SystemTime) -> String {
        let secs = since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match self {
            InheritedTo::Journal { unit, user } => {
                let unit = match unit {
                    Some(u) if *user => format!(" --user-unit {u}"),
                    Some(u) => format!(" -u {u}"),
                    None => String::new(),
                };
                format!(
                    "its output is in the journal: `journalctl{unit} _PID={pid}` (with what its child processes \
                     printed: `journalctl{unit} --since @{secs}`)"
                )
            }
            InheritedTo::BatonsOwn => "its output went to baton's own stdout and stderr (--output inherit)".into(),
        }
    }
}

/// The innermost systemd unit in a `/proc/PID/cgroup` text (the unified
/// hierarchy's `0::` line, else v1's `name=systemd` one), and whether it runs
/// under a user manager (`user@UID.service` above it). `None` outside any
/// unit.
pub fn unit_of_cgroup(cgroup: &str) -> Option<(String, bool)> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| cgroup.lines().find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p)))?;
    let parts: Vec<&str> = path.trim().split('/').filter(|p| !p.is_empty()).collect();
    // A delegated unit may have put Baton in a sub-cgroup of its own: the
    // innermost component that is a unit name.
    let i = parts.iter().rposition(|p| p.ends_with(".service") || p.ends_with(".scope"))?;
    let user = parts[..i].iter().any(|p| p.starts_with("user@") && p.ends_with(".service"));
    Some((parts[i].to_owned(), user))
}

/// A generation's output as Baton holds it.
#[derive(Debug, Clone)]
pub enum Output {
    /// Read from its pipe, with the last lines kept.
    Captured(Tail),
    /// Not seen by Baton: the generation writes to Baton's own stdout and
    /// stderr.
    Inherited,
}

impl Output {
    /// The last lines it printed; none when inherited.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Output::Captured(t) => t.lines(),
            Output::Inherited => Vec::new(),
        }
    }

    /// Whether its output has ended (always, when there is nothing Baton
    /// reads: a failure report then need not wait for it).
    pub fn is_closed(&self) -> bool {
        match self {
            Output::Captured(t) => t.is_closed(),
            Output::Inherited => true,
        }
    }

    /// The pipe's read end while it is open ([`Tail::pipe_fd`]).
    pub fn pipe_fd(&self) -> Option<RawFd> {
        match self {
            Output::Captured(t) => t.pipe_fd(),
            Output::Inherited => None,
        }
    }

    /// Bytes read from the pipe and not yet written on ([`Tail::unwritten`]).
    pub fn unwritten(&self) -> Vec<u8> {
        match self {
            Output::Captured(t) => t.unwritten(),
            Output::Inherited => Vec::new(),
        }
    }

    /// The generation's pid, once spawned: its lines in the journal carry it.
    pub fn set_pid(&self, pid: u32) {
        if let Output::Captured(t) = self {
            t.0.lock().unwrap_or_else(|e| e.into_inner()).pid = pid;
        }
    }

    /// How `baton upgrade` hands it over.
    pub fn kind(&self) -> OutputKind {
        match self {
            Output::Captured(_) => OutputKind::Pipe,
            Output::Inherited => OutputKind::None,
        }
    }
}

/// A generation's output in `baton upgrade`'s state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Through a pipe (its read end handed over while open); the default, as
    /// in states written before output could be inherited.
    #[default]
    Pipe,
    /// No pipe: the generation writes to Baton's stdout and stderr.
    None,
}

/// The last lines a generation printed.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<Lines>>);

#[derive(Debug, Default)]
struct Lines {
    done: VecDeque<String>,
    partial: Vec<u8>,
    closed: bool,
    /// The pipe's read end while the output has not ended (shared with the
    /// copying task; dropped at end-of-file so the fd closes then, as
    /// before it was shared).
    pipe: Option<Arc<OwnedFd>>,
    /// Read from the pipe, not yet written on. Bytes leave it only in the
    /// same step as the write that took them, so at any moment the
    /// supervisor looks, each byte is either written or here: `baton
    /// upgrade` hands these over and the next image writes them first.
    unwritten: Vec<u8>,
    /// The generation's pid (0 until spawned).
    pid: u32,
}

/// The most that waits to be written: a partial line shorter than a
/// journal entry's longest plus one read (reading waits while the rest is
/// written, and the app's writes then block on its full pipe).
pub const UNWRITTEN_MAX: usize = crate::journal::LINE_MAX + READ_CHUNK;
/// Read at once from the pipe.
const READ_CHUNK: usize = 16 * 1024;

impl Tail {
    /// The last complete lines, oldest first, plus an unterminated last line.
    pub fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = lines.done.iter().cloned().collect();
        if !lines.partial.is_empty() {
            out.push(String::from_utf8_lossy(&lines.partial).into_owned());
        }
        out
    }

    /// A tail whose output already ended, with `lines` kept (a generation
    /// handed over by `baton upgrade` after its output closed).
    pub fn finished(lines: Vec<String>) -> Tail {
        let mut done: VecDeque<String> = lines.into_iter().collect();
        while done.len() > TAIL_LINES {
            done.pop_front();
        }
        Tail(Arc::new(Mutex::new(Lines { done, closed: true, ..Lines::default() })))
    }

    /// Whether every writer is gone and all output has been read.
    pub fn is_closed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// The read end of the generation's output pipe, while its output has
    /// not ended: valid as long as this `Tail` lives.
    pub fn pipe_fd(&self) -> Option<RawFd> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.pipe.as_ref().map(|p| p.as_raw_fd())
    }

    /// What was read from the pipe and not yet written on (at most
    /// [`crate::journal::LINE_MAX`] plus 16 KiB): with piped output to the
    /// journal, at least the line being written.
    pub fn unwritten(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).unwritten.clone()
    }

    fn close(&self) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.closed = true;
        lines.pipe = None;
    }

    /// Bytes just read: kept for the tail and queued for writing.
    fn push(&self, bytes: &[u8]) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.unwritten.extend_from_slice(bytes);
        lines.keep(bytes);
    }
}

impl Lines {
    fn keep(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                if self.done.len() == TAIL_LINES {
                    self.done.pop_front();
                }
                self.done.push_back(line);
            } else if self.partial.len() < LINE_MAX {
                self.partial.push(b);
            }
        }
    }
}

/// Creates the pipe for one generation. Returns the write end to hand to the
/// child (blocking, close-on-exec: the spawn dups it onto 1 and 2) and the
/// tail, and starts the task that copies the output; `closed` is notified
/// when the output ends. Must run inside a tokio runtime.
pub fn capture(closed: Arc<tokio::sync::Notify>, identity: Identity) -> std::io::Result<(OwnedFd, Tail)> {
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // Only our end is non-blocking: the app's writes must block, not fail,
    // when the pipe is full.
    let flags = rustix::fs::fcntl_getfl(&read_end)?;
    rustix::fs::fcntl_setfl(&read_end, flags | rustix::fs::OFlags::NONBLOCK)?;
    let tail = start(read_end, closed, Lines::default(), identity)?;
    Ok((write_end, tail))
}

/// What the previous program image handed over for one generation's pipe.
#[derive(Debug)]
pub struct Adopted {
    /// The read end (close-on-exec already).
    pub read_end: OwnedFd,
    /// The lines it had collected.
    pub lines: Vec<String>,
    /// What it had read and not written ([`Tail::unwritten`]): written first.
    pub unwritten: Vec<u8>,
    /// Whose output it is.
    pub identity: Identity,
    /// The generation's pid.
    pub pid: u32,
}

/// Resumes copying a generation's output from a pipe read end handed over
/// by the previous program image (`baton upgrade`), keeping the lines it
/// had already collected and writing first what it had read but not
/// written. Must run inside a tokio runtime.
pub fn adopt(a: Adopted, closed: Arc<tokio::sync::Notify>) -> std::io::Result<Tail> {
    let flags = rustix::fs::fcntl_getfl(&a.read_end)?;
    rustix::fs::fcntl_setfl(&a.read_end, flags | rustix::fs::OFlags::NONBLOCK)?;
    let mut done: VecDeque<String> = a.lines.into_iter().collect();
    while done.len() > TAIL_LINES {
        done.pop_front();
    }
    let lines = Lines { done, unwritten: a.unwritten, pid: a.pid, ..Lines::default() };
    start(a.read_end, closed, lines, a.identity)
}

fn start(
    read_end: OwnedFd,
    closed: Arc<tokio::sync::Notify>,
    mut lines: Lines,
    identity: Identity,
) -> std::io::Result<Tail> {
    let read_end = Arc::new(read_end);
    // SAFETY: the AsyncFd holds one clone of the Arc, so the fd stays open
    // and keeps its number while it is registered; nothing closes or
    // replaces an fd owned by an `OwnedFd`.
    let receiver = unsafe { AsyncFd::register_with_interest(Arc::clone(&read_end), Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    lines.pipe = Some(read_end);
    let tail = Tail(Arc::new(Mutex::new(lines)));
    let kept = tail.clone();
    let mut sink = Sink::open(identity);
    tokio::spawn(async move {
        let mut buf = vec![0u8; READ_CHUNK];
        // Ends at EOF: when the generation and everything it started have
        // closed their copies of the write end.
        loop {
            // Returns once what is left is at most a partial line, so
            // what waits stays bounded (UNWRITTEN_MAX).
            sink.flush(&kept, false).await;
            let Ok(mut guard) = receiver.readable().await else { break };
            // No await between the read and the push: what was read is
            // queued before anything else can look.
            match guard.try_io(|fd| rustix::io::read(fd.get_ref().as_fd(), &mut buf).map_err(Into::into)) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => kept.push(&buf[..n]),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => break,
                Err(_would_block) => {}
            }
        }
        // The last line may lack its newline.
        sink.flush(&kept, true).await;
        // Deregister before the tail lets go of the fd.
        drop(receiver);
        kept.close();
        closed.notify_one();
    });
    Ok(tail)
}

/// Where a copying task writes a generation's output.
enum Sink {
    /// journald's native socket, one entry per line, under the app's
    /// identity (when Baton's stderr is the journal).
    Journal(crate::journal::NativeJournal, Identity),
    /// Baton's stderr, the bytes unchanged.
    Stderr(RawStderr),
}

/// Baton's stderr, written without blocking the supervisor's thread.
enum RawStderr {
    /// A descriptor of its own (a pipe, FIFO or terminal reopened
    /// non-blocking), or a copy of a socket written with `MSG_DONTWAIT`:
    /// both leave the flags of the description Baton shares alone.
    Async { fd: AsyncFd<OwnedFd>, socket: bool },
    /// A regular file or a device that cannot be polled: writes there do
    /// not wait.
    Direct,
}

impl RawStderr {
    fn open() -> RawStderr {
        use rustix::fs::{FileType, Mode, OFlags};
        let stderr = std::io::stderr();
        let Ok(st) = rustix::fs::fstat(stderr.as_fd()) else { return RawStderr::Direct };
        let own = match FileType::from_raw_mode(st.st_mode) {
            FileType::Socket => rustix::io::fcntl_dupfd_cloexec(stderr.as_fd(), 3).ok().map(|fd| (fd, true)),
            FileType::Fifo | FileType::CharacterDevice => rustix::fs::open(
                "/proc/self/fd/2",
                OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
                Mode::empty(),
            )
            .ok()
            .map(|fd| (fd, false)),
            _ => None,
        };
        // SAFETY: the AsyncFd owns the fd, so it stays open and keeps its
        // number while registered.
        let register = |fd: OwnedFd| unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }.ok();
        match own.and_then(|(fd, socket)| Some((register(fd)?, socket))) {
            Some((fd, socket)) => RawStderr::Async { fd, socket },
            None => RawStderr::Direct,
        }
    }

    /// Writes all that is unwritten.
    async fn flush(&mut self, kept: &Tail) {
        loop {
            // The guard ends with this block: nothing awaits while it lives.
            let blocked = {
                let mut lines = kept.0.lock().unwrap_or_else(|e| e.into_inner());
                if lines.unwritten.is_empty() {
                    return;
                }
                let result = match self {
                    RawStderr::Direct => rustix::io::write(std::io::stderr().as_fd(), &lines.unwritten),
                    RawStderr::Async { fd, socket: true } => {
                        rustix::net::send(fd.get_ref(), &lines.unwritten, SendFlags::DONTWAIT | SendFlags::NOSIGNAL)
                    }
                    RawStderr::Async { fd, socket: false } => rustix::io::write(fd.get_ref(), &lines.unwritten),
                };
                match result {
                    Ok(n) => {
                        lines.unwritten.drain(..n);
                        false
                    }
                    Err(rustix::io::Errno::INTR) => false,
                    Err(rustix::io::Errno::AGAIN) => true,
                    // Losing Baton's stderr must not stop the tail.
                    Err(_) => {
                        lines.unwritten.clear();
                        false
                    }
                }
            };
            if blocked {
                let RawStderr::Async { fd, .. } = self else {
                    // Someone made Baton's own stderr non-blocking: wait a
                    // little rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                match fd.writable().await {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => *self = RawStderr::Direct,
                }
            }
        }
    }
}

impl Sink {
    fn open(identity: Identity) -> Sink {
        if stderr_is_journal() {
            match crate::journal::NativeJournal::connect() {
                Ok(j) => return Sink::Journal(j, identity),
                Err(e) => tracing::warn!(
                    event = "journal-socket-failed",
                    "cannot reach journald's native socket ({e}): generation {}'s lines go to baton's stderr",
                    identity.generation
                ),
            }
        }
        Sink::Stderr(RawStderr::open())
    }

    /// Writes what is unwritten; to the journal, only whole lines (or
    /// [`crate::journal::LINE_MAX`] bytes of a longer one) unless `last`.
    async fn flush(&mut self, kept: &Tail, last: bool) {
        let mut retried = false;
        loop {
            let (journal, identity) = match self {
                Sink::Journal(journal, identity) => (journal, identity),
                Sink::Stderr(raw) => return raw.flush(kept).await,
            };
            // The guard ends with this block: nothing awaits while it lives.
            let sent = {
                let mut lines = kept.0.lock().unwrap_or_else(|e| e.into_inner());
                let pending = &lines.unwritten;
                let limit = pending.len().min(crate::journal::LINE_MAX);
                let (line_len, taken) = match pending[..limit].iter().position(|b| *b == b'\n') {
                    Some(i) => (i, i + 1),
                    None if limit == crate::journal::LINE_MAX || (last && limit > 0) => (limit, limit),
                    None => return,
                };
                let entry = crate::journal::entry(identity, lines.pid, &pending[..line_len]);
                // Sent and dequeued in one step (see `Lines::unwritten`).
                let sent = journal.send(&entry);
                if let Ok(crate::journal::Sent::Done) = sent {
                    lines.unwritten.drain(..taken);
                }
                sent
            };
            match sent {
                Ok(crate::journal::Sent::Done) => retried = false,
                Ok(crate::journal::Sent::Full) => {
                    // Woken when journald reads; the timer only guards
                    // against a missed wake-up (measured once on systemd
                    // 257: output stalled with journald idle).
                    tokio::select! {
                        r = journal.writable() => if r.is_err() {
                            *self = Sink::Stderr(RawStderr::open());
                        },
                        () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    }
                }
                // journald restarted: a new connection, once.
                Err(_) if !retried && journal.reconnect().is_ok() => retried = true,
                Err(e) => {
                    tracing::warn!(
                        event = "journal-socket-failed",
                        "cannot write generation {}'s output to the journal ({e}): its lines go to baton's stderr",
                        identity.generation
                    );
                    *self = Sink::Stderr(RawStderr::open());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_bounded() {
        let t = Tail::default();
        let printed = TAIL_LINES + 30;
        for i in 0..printed {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(&[b'x'; 5000]);
        let lines = t.lines();
        assert_eq!(lines.len(), TAIL_LINES + 1);
        assert_eq!(lines[0], "line 30");
        assert_eq!(lines[TAIL_LINES - 1], format!("line {}", printed - 1));
        assert_eq!(lines[TAIL_LINES].len(), LINE_MAX);
    }

    #[test]
    fn the_unit_comes_from_the_innermost_unit_cgroup() {
        assert_eq!(unit_of_cgroup("0::/system.slice/app.service\n"), Some(("app.service".into(), false)));
        assert_eq!(unit_of_cgroup("0::/system.slice/app.service/baton\n"), Some(("app.service".into(), false)));
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/web.service\n"),
            Some(("web.service".into(), true))
        );
        assert_eq!(
            unit_of_cgroup("12:pids:/x\n1:name=systemd:/system.slice/old.service\n0::/\n"),
            None,
            "the unified line wins, and / is in no unit"
        );
        assert_eq!(
            unit_of_cgroup("12:pids:/x\n1:name=systemd:/system.slice/old.service\n"),
            Some(("old.service".into(), false))
        );
        assert_eq!(unit_of_cgroup("0::/init.scope\n"), Some(("init.scope".into(), false)));
        assert_eq!(unit_of_cgroup(""), None);
        assert_eq!(unit_of_cgroup("0::/user.slice\n"), None);
    }

    #[test]
    fn hints_name_the_unit_the_pid_and_the_start() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let h = InheritedTo::Journal { unit: Some("app.service".into()), user: false }.hint(42, at);
        assert!(h.contains("`journalctl -u app.service _PID=42`"), "{h}");
        assert!(h.contains("`journalctl -u app.service --since @1700000000`"), "{h}");
        let h = InheritedTo::Journal { unit: Some("web.service".into()), user: true }.hint(42, at);
        assert!(h.contains("`journalctl --user-unit web.service _PID=42`"), "{h}");
        let h = InheritedTo::Journal { unit: None, user: false }.hint(42, at);
        assert!(h.contains("`journalctl _PID=42`") && h.contains("`journalctl --since @1700000000`"), "{h}");
        assert!(InheritedTo::BatonsOwn.hint(42, at).contains("baton's own stdout"));
    }

    #[test]
    fn journal_stream_must_name_the_same_file() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let st = rustix::fs::fstat(&file).unwrap();
        let matching = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(journal_stream_matches(Some(std::ffi::OsStr::new(&matching)), file.as_fd()));
        let other = format!("{}:{}", st.st_dev, st.st_ino + 1);
        assert!(!journal_stream_matches(Some(std::ffi::OsStr::new(&other)), file.as_fd()));
        for bad in ["", "1", "a:b", ":"] {
            assert!(!journal_stream_matches(Some(std::ffi::OsStr::new(bad)), file.as_fd()), "{bad}");
        }
        assert!(!journal_stream_matches(None, file.as_fd()));
    }

    #[test]
    fn old_states_mean_a_pipe() {
        assert_eq!(serde_json::to_string(&OutputKind::None).unwrap(), "\"none\"");
        assert_eq!(serde_json::from_str::<OutputKind>("\"pipe\"").unwrap(), OutputKind::Pipe);
        assert_eq!(OutputKind::default(), OutputKind::Pipe);
        assert_eq!(serde_json::to_string(&OutputMode::Inherit).unwrap(), "\"inherit\"");
    }

    #[tokio::test]
    async fn capture_passes_output_through_and_keeps_the_tail() {
        let closed = Arc::new(tokio::sync::Notify::new());
        let (write_end, tail) = capture(Arc::clone(&closed), Identity::new("app".as_ref(), 1)).unwrap();
        let mut w = std::fs::File::from(write_end);
        std::io::Write::write_all(&mut w, b"hello\nworld\n").unwrap();
        drop(w);
        closed.notified().await;
        assert!(tail.is_closed());
        assert!(tail.pipe_fd().is_none(), "the read end is closed at end-of-file");
        assert_eq!(tail.lines(), ["hello", "world"]);
    }

    #[tokio::test]
    async fn journal_entries_are_whole_lines_and_a_partial_one_waits() {
        let dir = std::env::temp_dir().join(format!("baton-output-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("journal");
        let _ = std::fs::remove_file(&path);
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let journal = crate::journal::NativeJournal::connect_to(&path).unwrap();
        let mut sink = Sink::Journal(journal, Identity::new("app".as_ref(), 7));
        let tail = Tail::default();
        tail.push(b"one\ntwo\npart");
        sink.flush(&tail, false).await;
        let mut buf = [0u8; 4096];
        let mut messages = Vec::new();
        while let Ok(n) = server.recv(&mut buf) {
            let entry = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(entry.contains("\nSYSLOG_IDENTIFIER=app\n") && entry.contains("\nBATON_GENERATION=7\n"), "{entry}");
            messages.push(entry.rsplit_once("MESSAGE=").unwrap().1.to_owned());
        }
        assert_eq!(messages, ["one\n", "two\n"]);
        assert_eq!(tail.unwritten(), b"part", "the partial line waits (and is what an upgrade hands over)");
        tail.push(b"ial\nlast");
        sink.flush(&tail, true).await;
        let n = server.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("MESSAGE=partial\n"));
        let n = server.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("MESSAGE=last\n"), "at the end, the last line goes too");
        assert!(tail.unwritten().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn adopted_pipe_keeps_the_lines_and_reads_on() {
        let closed = Arc::new(tokio::sync::Notify::new());
        let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let mut w = std::fs::File::from(write_end);
        std::io::Write::write_all(&mut w, b"queued\n").unwrap();
        let adopted = Adopted {
            read_end,
            lines: vec!["before".into()],
            unwritten: b"carried\n".to_vec(),
            identity: Identity::new("app".as_ref(), 1),
            pid: 0,
        };
        let tail = adopt(adopted, Arc::clone(&closed)).unwrap();
        assert!(tail.pipe_fd().is_some());
        drop(w);
        closed.notified().await;
        assert_eq!(tail.lines(), ["before", "queued"]);
        assert!(tail.unwritten().is_empty(), "the carried bytes were written first");
    }
}
