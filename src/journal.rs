//! The app's piped lines in the journal under the app's own name
//! ([`Identity`]).
//!
//! Baton reads a generation's pipe (`--output pipe`) and sends each line
//! as an entry of journald's native protocol (systemd's
//! `src/journal/journald-native.c`; `KEY=value` lines in one datagram to
//! `/run/systemd/journal/socket`) with `SYSLOG_IDENTIFIER=` (the app's),
//! `SYSLOG_PID=`, `BATON_PID=` (the generation's pid) and
//! `BATON_GENERATION=`. A line starting `<0>`..`<7>` takes that priority,
//! as with systemd's `SyslogLevelPrefix=yes`; lines longer than
//! [`LINE_MAX`] are split, as journald splits stream lines at its default
//! `LineMax=`.
//!
//! The entries go under Baton's own credentials (`_PID=` is Baton's), not
//! the generation's as `SCM_CREDENTIALS` (which a privileged sender may
//! forge): journald reads a sender's unit from its cgroup when it processes
//! the entry, and a generation that already exited (one that fails at once)
//! has none left to read, so its last lines would not be under `journalctl
//! -u`. Baton outlives what it sends, so its lines always are.
//!
//! Inherited output (`--output inherit`) never comes here: generations
//! write to Baton's own stdout and stderr, the stream systemd opened, and
//! the unit's `SyslogIdentifier=` (written by `baton units`) names the app.
//!
//! The tracing-journald crate Baton logs with is a `tracing` layer with one
//! identifier and blocking sends; the lines here need the app's identifier
//! and a non-blocking send (a full journald must not block the supervisor's
//! thread, and `baton upgrade` must know exactly what was sent), so the few
//! lines of the protocol are written out.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;

/// journald's native protocol socket.
pub const NATIVE_SOCKET: &str = "/run/systemd/journal/socket";
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
        Ok(NativeJournal { sock })
    }

    /// Sends one entry now, without blocking, under Baton's credentials.
    pub fn send(&mut self, entry: &[u8]) -> io::Result<Sent> {
        match rustix::net::send(self.sock.get_ref(), entry, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(_) => Ok(Sent::Done),
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
        *self = Self::connect()?;
        Ok(())
    }
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
        assert!(matches!(j.send(&entry(&id, me, b"one")).unwrap(), Sent::Done));
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("MESSAGE=one\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
