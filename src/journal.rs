//! The app's lines in the journal under the app's own name
//! ([`Identity`]), whichever way they get there.
//!
//! - **A stdout stream per generation** ([`open_stream`], for inherited
//!   output): what systemd itself gives a service with
//!   `StandardOutput=journal`. Baton connects to journald's
//!   `/run/systemd/journal/stdout` and writes the stream header of
//!   systemd's `src/journal/journald-stream.c` (`stdout_stream_line()`:
//!   identifier, unit id, priority, level prefix, forward to syslog, kmsg,
//!   console, one per line), then hands the socket to the generation as its
//!   fds 1 and 2 and closes its own copy. The generation owns its stream:
//!   its logging never depends on Baton. journald gives each stream its own
//!   `_STREAM_ID=` and files each write under the writer's credentials
//!   (`_PID=`, per `recvmsg()` since systemd 240), but a stream carries no
//!   fields of the writer's choosing, so `BATON_GENERATION=` cannot be on
//!   these lines.
//! - **Native entries** ([`NativeJournal`], for piped output): Baton reads
//!   the pipe and sends each line as an entry of journald's native protocol
//!   (systemd's `src/journal/journald-native.c`; `KEY=value` lines in one
//!   datagram to `/run/systemd/journal/socket`) with `SYSLOG_IDENTIFIER=`,
//!   `BATON_GENERATION=`, `BATON_PID=` and `SYSLOG_PID=`. journald takes
//!   `_PID=` only from the kernel's credentials; a privileged Baton
//!   (`CAP_SYS_ADMIN`) sends the generation's pid as `SCM_CREDENTIALS`, as
//!   util-linux `logger --id` does, so journald files the line as the app's
//!   (`_PID=`, `_COMM=`, `_EXE=`); otherwise `_PID=` is Baton's. A line
//!   starting `<0>`..`<7>` takes that priority, as with systemd's
//!   `SyslogLevelPrefix=yes`; lines longer than [`LINE_MAX`] are split, as
//!   journald splits stream lines at its default `LineMax=`.
//!
//! The tracing-journald crate Baton logs with is a `tracing` layer with one
//! identifier and blocking sends; the lines here need the app's identifier,
//! a non-blocking send (a full journald must not block the supervisor's
//! thread, and `baton upgrade` must know exactly what was sent) and the
//! sender's credentials, so the few lines of the protocol are written out.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;

/// journald's native protocol socket.
pub const NATIVE_SOCKET: &str = "/run/systemd/journal/socket";
/// journald's stdout stream socket.
pub const STDOUT_SOCKET: &str = "/run/systemd/journal/stdout";
/// Longest line sent as one entry: journald's default `LineMax=` (48 KiB),
/// where it splits stream lines too.
pub const LINE_MAX: usize = 48 * 1024;
/// `LOG_INFO`, what systemd gives stdout streams (`SyslogLevel=`'s default).
pub const PRIORITY_INFO: u8 = 6;

/// Whose lines these are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `SYSLOG_IDENTIFIER=`: the file name of the app's program, what
    /// systemd's default `SyslogIdentifier=` would be for it.
    pub identifier: String,
    /// `BATON_GENERATION=`.
    pub generation: u64,
}

impl Identity {
    /// The identity of generation `generation` of `program`.
    pub fn new(program: &Path, generation: u64) -> Identity {
        let identifier = program.file_name().map_or_else(|| "app".into(), |n| n.to_string_lossy().into_owned());
        Identity { identifier, generation }
    }
}

/// Opens a stdout stream to journald for one generation, with `identity`'s
/// identifier, and returns it (blocking, close-on-exec: the spawn dups it
/// onto 1 and 2) with its `JOURNAL_STREAM` value (`device:inode`).
///
/// Connects without blocking: a journald too busy to accept at once makes
/// this fail, and the caller falls back to Baton's own stdout and stderr.
pub fn open_stream(identity: &Identity) -> io::Result<(OwnedFd, String)> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(STDOUT_SOCKET)?)?;
    // journald reads the header only once it is complete; the identifier
    // must be one line.
    let identifier: String = identity.identifier.chars().filter(|c| *c != '\n').collect();
    // The unit, as systemd names it in its own streams: journald files a
    // line under it when the writer is gone before journald reads it (an
    // app that fails at once; the cgroup of a dead pid cannot be read).
    // journald honours it from a root peer only, and only a system unit.
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let unit = match crate::output::unit_of_cgroup(&cgroup) {
        Some((unit, false)) if !unit.contains('\n') => unit,
        _ => String::new(),
    };
    // Forwarding flags 0: journald's own ForwardTo*= settings still apply.
    let header = format!("{identifier}\n{unit}\n{PRIORITY_INFO}\n1\n0\n0\n0\n");
    let n = rustix::net::send(&fd, header.as_bytes(), SendFlags::NOSIGNAL)?;
    if n != header.len() {
        return Err(io::Error::other("journald took only part of the stream header"));
    }
    // As systemd does (`connect_journal_socket()`): the app only writes, and
    // a large send buffer absorbs bursts. Best effort.
    let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Read);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, 8 * 1024 * 1024);
    // The app expects a blocking stdout.
    rustix::io::ioctl_fionbio(&fd, false)?;
    let st = rustix::fs::fstat(&fd)?;
    Ok((fd, format!("{}:{}", st.st_dev, st.st_ino)))
}

/// The entry for one line: `line` without its newline.
pub fn entry(identity: &Identity, pid: u32, line: &[u8]) -> Vec<u8> {
    let (priority, message) = match line {
        [b'<', d @ b'0'..=b'7', b'>', rest @ ..] => (d - b'0', rest),
        _ => (PRIORITY_INFO, line),
    };
    let mut e = Vec::with_capacity(message.len() + 128);
    e.extend_from_slice(format!("PRIORITY={priority}\n").as_bytes());
    // Simple `KEY=value\n` form: the identifier cannot hold a newline here.
    let identifier: String = identity.identifier.chars().filter(|c| *c != '\n').collect();
    e.extend_from_slice(format!("SYSLOG_IDENTIFIER={identifier}\n").as_bytes());
    if pid != 0 {
        e.extend_from_slice(format!("SYSLOG_PID={pid}\nBATON_PID={pid}\n").as_bytes());
    }
    e.extend_from_slice(format!("BATON_GENERATION={}\n", identity.generation).as_bytes());
    // A line never holds a newline, so the simple form fits it too.
    e.extend_from_slice(b"MESSAGE=");
    e.extend_from_slice(message);
    e.push(b'\n');
    e
}

/// A connected datagram socket to journald's native socket, non-blocking:
/// connected so that a full journald makes it unwritable (an unconnected
/// socket would poll writable and spin).
#[derive(Debug)]
pub struct NativeJournal {
    sock: AsyncFd<OwnedFd>,
    /// Whether the kernel refused the generation's pid as credentials
    /// (unprivileged Baton, or the process is gone): then none are sent.
    plain: bool,
}

/// What one send did.
#[derive(Debug)]
pub enum Sent {
    /// The entry is journald's.
    Done,
    /// journald's queue is full: wait for [`NativeJournal::writable`].
    Full,
}

impl NativeJournal {
    /// Connects. Must run inside a tokio runtime.
    pub fn connect() -> io::Result<NativeJournal> {
        Self::connect_to(Path::new(NATIVE_SOCKET))
    }

    pub(crate) fn connect_to(path: &Path) -> io::Result<NativeJournal> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
        // Entries up to LINE_MAX plus fields must fit one datagram.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, 8 * 1024 * 1024);
        // SAFETY: the AsyncFd owns the fd, so it stays open and keeps its
        // number while registered.
        let sock = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE) }?;
        Ok(NativeJournal { sock, plain: false })
    }

    /// Sends one entry now, without blocking, as `pid`'s when allowed.
    pub fn send(&mut self, entry: &[u8], pid: u32) -> io::Result<Sent> {
        let fd = self.sock.get_ref().as_fd();
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        let result = if self.plain || pid == 0 {
            rustix::net::send(fd, entry, flags).map(drop)
        } else {
            match send_as(fd, entry, pid, flags) {
                Err(rustix::io::Errno::PERM | rustix::io::Errno::SRCH | rustix::io::Errno::INVAL) => {
                    // Not privileged (it will not change), or the process
                    // is gone: the line still goes, as Baton's.
                    self.plain = true;
                    rustix::net::send(fd, entry, flags).map(drop)
                }
                other => other,
            }
        };
        match result {
            Ok(()) => Ok(Sent::Done),
            Err(rustix::io::Errno::AGAIN) => Ok(Sent::Full),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until journald takes entries again.
    pub async fn writable(&self) -> io::Result<()> {
        let mut guard = self.sock.writable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// After journald restarted: a new connection.
    pub fn reconnect(&mut self) -> io::Result<()> {
        let plain = self.plain;
        *self = Self::connect()?;
        self.plain = plain;
        Ok(())
    }
}

/// `send()` with `SCM_CREDENTIALS` naming `pid` (and Baton's own uid and
/// gid, which the app shares): the kernel accepts another pid only from a
/// process with `CAP_SYS_ADMIN` over its pid namespace.
fn send_as(fd: std::os::fd::BorrowedFd<'_>, entry: &[u8], pid: u32, flags: SendFlags) -> rustix::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, UCred};
    let pid = rustix::process::Pid::from_raw(pid as i32).ok_or(rustix::io::Errno::INVAL)?;
    let creds = UCred { pid, uid: rustix::process::getuid(), gid: rustix::process::getgid() };
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmCredentials(creds));
    rustix::net::sendmsg(fd, &[io::IoSlice::new(entry)], &mut control, flags).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(e: Vec<u8>) -> String {
        String::from_utf8(e).unwrap()
    }

    #[test]
    fn entries_carry_the_identity_and_the_level_prefix() {
        let id = Identity::new(Path::new("/usr/bin/web"), 3);
        assert_eq!(id.identifier, "web");
        assert_eq!(
            text(entry(&id, 42, b"hello")),
            "PRIORITY=6\nSYSLOG_IDENTIFIER=web\nSYSLOG_PID=42\nBATON_PID=42\nBATON_GENERATION=3\nMESSAGE=hello\n"
        );
        assert!(text(entry(&id, 42, b"<3>bad")).starts_with("PRIORITY=3\n"));
        assert!(text(entry(&id, 42, b"<3>bad")).ends_with("\nMESSAGE=bad\n"));
        assert!(text(entry(&id, 42, b"<9>odd")).ends_with("\nMESSAGE=<9>odd\n"), "not a level");
        assert!(!text(entry(&id, 0, b"x")).contains("PID="), "no pid yet");
    }

    #[tokio::test]
    async fn sends_reach_a_datagram_socket() {
        let dir = std::env::temp_dir().join(format!("baton-journal-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("socket");
        let _ = std::fs::remove_file(&path);
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let mut j = NativeJournal::connect_to(&path).unwrap();
        let id = Identity::new(Path::new("app"), 1);
        let me = std::process::id();
        assert!(matches!(j.send(&entry(&id, me, b"one"), me).unwrap(), Sent::Done));
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("MESSAGE=one\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
