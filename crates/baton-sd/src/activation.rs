//! Taking the file descriptors a service manager passed in (`sd_listen_fds(3)`).

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::FileType;
use rustix::io::FdFlags;
use rustix::net::{AddressFamily, SocketType};

use crate::wire::{EnvError, LISTEN_FDS_START, ListenEnv, ListenOutcome};

/// Why passed fds could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// A `LISTEN_*` variable is malformed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// A variable is not valid UTF-8.
    #[error("{var} is not valid UTF-8; fix or unset it in the service's environment")]
    NotUtf8 {
        /// The variable's name.
        var: &'static str,
    },
    /// `LISTEN_FDS` promises an fd that is not open.
    #[error(
        "LISTEN_FDS={count} promises fd {fd}, but it is not open ({source}); was the variable inherited from a parent without its fds?"
    )]
    NotOpen {
        /// The fd number.
        fd: RawFd,
        /// The value of `LISTEN_FDS`.
        count: usize,
        /// The error from `fcntl`.
        source: std::io::Error,
    },
    /// The fd is not what the caller asked for; it stays available.
    #[error("fd {fd} '{name}' is {actual}, expected {expected}")]
    WrongKind {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// What it really is.
        actual: String,
        /// What was asked for.
        expected: &'static str,
    },
    /// Inspecting or converting the fd failed.
    #[error("fd {fd} '{name}': {source}")]
    Io {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tokio type was requested outside a tokio runtime.
    #[error("fd {fd} '{name}': a tokio socket can only be created inside a tokio runtime")]
    NoRuntime {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
    },
}

impl From<ActivationError> for std::io::Error {
    fn from(e: ActivationError) -> Self {
        let kind = match &e {
            ActivationError::Io { source, .. } | ActivationError::NotOpen { source, .. } => source.kind(),
            _ => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, e)
    }
}

/// The `LISTEN_FDNAMES` name of the probe listener Baton passes with `baton
/// run --probe`, after the listening sockets (see
/// [`ListenFds::take_probe_listener`]).
pub const PROBE_FDNAME: &str = "probe";

/// Which passed fd to take: by position (0 is fd 3) or by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select<'a> {
    /// The n-th passed fd (fd `3 + n`).
    Index(usize),
    /// The first not yet taken fd with this `LISTEN_FDNAMES` name.
    Name(&'a str),
}

impl From<usize> for Select<'_> {
    fn from(i: usize) -> Self {
        Select::Index(i)
    }
}

impl<'a> From<&'a str> for Select<'a> {
    fn from(n: &'a str) -> Self {
        Select::Name(n)
    }
}

/// The fds passed to this process, each taken at most once.
///
/// Created once per process by [`ListenFds::from_env`]; `take_*` methods
/// return `Ok(None)` when the fd is absent or already taken, `Err` when it
/// exists but is not what was asked for (the fd then stays available).
#[derive(Debug, Default)]
pub struct ListenFds {
    entries: Vec<Entry>,
    other_pid: Option<(u32, u32)>,
}

#[derive(Debug)]
struct Entry {
    fd: Option<OwnedFd>,
    raw: RawFd,
    name: String,
}

/// Ensures fds 3.. become owned at most once per process: a second
/// `OwnedFd` for the same number would close it twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

impl ListenFds {
    /// No fds: for services started without socket activation.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, validates them
    /// like `sd_listen_fds_with_names(3)` (and, when set, `LISTEN_PIDFDID`
    /// like libsystemd 259: on a kernel with pidfs it must be this process's
    /// pidfd id, see [`crate::pidfs`]; without pidfs `LISTEN_PID` alone
    /// decides), sets `FD_CLOEXEC` on every passed
    /// fd and takes ownership of them. Leaves the environment unchanged (see
    /// [`from_env_and_unset`](Self::from_env_and_unset)).
    ///
    /// Only the first call in a process can return fds; later calls return an
    /// empty set. A `LISTEN_PID` naming another process also gives an empty
    /// set ([`other_pid`](Self::other_pid) says so), and so does a
    /// `LISTEN_PIDFDID` naming another process: those fds were meant for
    /// someone else and are left alone. If an fd that `LISTEN_FDS` promises
    /// is not open, the error names the first missing one and no fd is
    /// changed or taken.
    pub fn from_env() -> Result<Self, ActivationError> {
        let var = |name: &'static str| match std::env::var_os(name) {
            None => Ok(None),
            Some(v) => v.into_string().map(Some).map_err(|_| ActivationError::NotUtf8 { var: name }),
        };
        let (pid, fds, names) = (var("LISTEN_PID")?, var("LISTEN_FDS")?, var("LISTEN_FDNAMES")?);
        let pidfd_id = var(ListenEnv::PIDFD_ID_VAR)?;
        // Before one name per fd is allocated, make sure the fds exist: a
        // garbage `LISTEN_FDS=2147483000` without `LISTEN_FDNAMES` must fail at
        // the first closed fd (as `sd_listen_fds(3)` does), not build two
        // billion names first. F_GETFD changes nothing. Once the fds are
        // taken they may have been closed by their new owner; later calls
        // return an empty set without looking.
        let check_open = |count: usize| -> Result<(), ActivationError> {
            if TAKEN.load(Ordering::SeqCst) {
                return Ok(());
            }
            for i in 0..count {
                let raw = LISTEN_FDS_START + i as RawFd;
                // SAFETY: only used for this fcntl(F_GETFD), which reports a
                // closed fd number as EBADF without touching anything.
                let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
                if let Err(e) = rustix::io::fcntl_getfd(borrowed) {
                    return Err(ActivationError::NotOpen { fd: raw, count, source: e.into() });
                }
            }
            Ok(())
        };
        let outcome = ListenEnv::parse_checked(
            pid.as_deref(),
            pidfd_id.as_deref(),
            fds.as_deref(),
            names.as_deref(),
            std::process::id(),
            crate::pidfs::own_pidfd_id,
            check_open,
        )?;
        let env = match outcome {
            ListenOutcome::NotActivated => return Ok(Self::empty()),
            ListenOutcome::OtherPid { listen_pid, own_pid } => {
                return Ok(Self { entries: Vec::new(), other_pid: Some((listen_pid, own_pid)) });
            }
            // Our pid, reused: the process the fds were for is gone.
            ListenOutcome::OtherProcess { .. } => {
                let own = std::process::id();
                return Ok(Self { entries: Vec::new(), other_pid: Some((own, own)) });
            }
            ListenOutcome::Activated(env) => env,
        };
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(Self::empty());
        }
        let count = env.count();
        let mut entries = Vec::with_capacity(count);
        for (i, name) in env.names.into_iter().enumerate() {
            let raw = LISTEN_FDS_START + i as RawFd;
            // SAFETY: only used for this fcntl; the fd number may be closed,
            // which fcntl reports as EBADF without touching anything.
            let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
            if let Err(e) = rustix::io::fcntl_setfd(borrowed, FdFlags::CLOEXEC) {
                // Entries taken so far are dropped (closed) with `entries`;
                // the remaining numbers are not ours to close.
                return Err(ActivationError::NotOpen { fd: raw, count, source: e.into() });
            }
            // SAFETY: the service manager passed fds 3..3+LISTEN_FDS to this
            // pid (checked against LISTEN_PID), fcntl just proved this one is
            // open, and TAKEN guarantees no other owner is ever created here.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            entries.push(Entry { fd: Some(fd), raw, name });
        }
        Ok(Self { entries, other_pid: None })
    }

    /// [`from_env`](Self::from_env), then removes `LISTEN_PID`, `LISTEN_PIDFDID`, `LISTEN_FDS`
    /// and `LISTEN_FDNAMES` from the environment whatever the outcome, so
    /// child processes do not believe the fds are theirs.
    ///
    /// # Safety
    ///
    /// Changing the environment is unsound while another thread may read it.
    /// Call this only while the process is single-threaded, in particular
    /// before starting a tokio runtime.
    pub unsafe fn from_env_and_unset() -> Result<Self, ActivationError> {
        let result = Self::from_env();
        for var in ListenEnv::VARS.into_iter().chain([ListenEnv::PIDFD_ID_VAR]) {
            // SAFETY: the caller guarantees no other thread reads the environment.
            unsafe { std::env::remove_var(var) };
        }
        result
    }

    /// How many fds were passed (taken or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no fds were passed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `Some((LISTEN_PID, own pid))` when the variables were meant for
    /// another process and were therefore ignored (both equal when
    /// `LISTEN_PIDFDID` showed that our pid was reused).
    pub fn other_pid(&self) -> Option<(u32, u32)> {
        self.other_pid
    }

    /// The names of all passed fds with their fd numbers, and whether each
    /// is still available.
    pub fn names(&self) -> impl Iterator<Item = (RawFd, &str, bool)> {
        self.entries.iter().map(|e| (e.raw, e.name.as_str(), e.fd.is_some()))
    }

    /// Takes an fd of any kind.
    pub fn take_fd<'a>(&mut self, which: impl Into<Select<'a>>) -> Result<Option<OwnedFd>, ActivationError> {
        Ok(self.find(which.into()).and_then(|e| e.fd.take()))
    }

    /// Takes every remaining fd whose name satisfies `pred`, with its name.
    /// Handy for fd-store entries (see [`crate::fdstore::StoredName`]).
    pub fn take_matching(&mut self, mut pred: impl FnMut(&str) -> bool) -> Vec<(String, OwnedFd)> {
        self.entries
            .iter_mut()
            .filter(|e| e.fd.is_some() && pred(&e.name))
            .filter_map(|e| e.fd.take().map(|fd| (e.name.clone(), fd)))
            .collect()
    }

    /// Takes a listening TCP socket (IPv4 or IPv6).
    pub fn take_tcp_listener<'a>(
        &mut self,
        which: impl Into<Select<'a>>,
    ) -> Result<Option<std::net::TcpListener>, ActivationError> {
        self.take_kind(which.into(), Kind::TcpListener).map(|o| o.map(Into::into))
    }

    /// Takes a connected TCP socket (for example a stored connection).
    pub fn take_tcp_stream<'a>(
        &mut self,
        which: impl Into<Select<'a>>,
    ) -> Result<Option<std::net::TcpStream>, ActivationError> {
        self.take_kind(which.into(), Kind::TcpStream).map(|o| o.map(Into::into))
    }

    /// Takes a UDP socket.
    pub fn take_udp_socket<'a>(
        &mut self,
        which: impl Into<Select<'a>>,
    ) -> Result<Option<std::net::UdpSocket>, ActivationError> {
        self.take_kind(which.into(), Kind::Udp).map(|o| o.map(Into::into))
    }

    /// Takes a listening Unix stream socket.
    pub fn take_unix_listener<'a>(
        &mut self,
        which: impl Into<Select<'a>>,
    ) -> Result<Option<std::os::unix::net::UnixListener>, ActivationError> {
        self.take_kind(which.into(), Kind::UnixListener).map(|o| o.map(Into::into))
    }

    /// Takes a connected Unix stream socket.
    pub fn take_unix_stream<'a>(
        &mut self,
        which: impl Into<Select<'a>>,
    ) -> Result<Option<std::os::unix::net::UnixStream>, ActivationError> {
        self.take_kind(which.into(), Kind::UnixStream).map(|o| o.map(Into::into))
    }

    /// Takes a Unix datagram socket.
    pub fn take_unix_datagram<'a>(
        &mut self,
        which: impl Into<Select<'a>>,
    ) -> Result<Option<std::os::unix::net::UnixDatagram>, ActivationError> {
        self.take_kind(which.into(), Kind::UnixDatagram).map(|o| o.map(Into::into))
    }

    /// Takes the probe listener Baton passes with `baton run --probe`
    /// (named [`PROBE_FDNAME`]): a loopback TCP listener that only this
    /// process received, so a health check connecting to it
    /// (`$BATON_PROBE_ADDR`) reaches this generation and no other. Serve it
    /// like the listening socket. `Ok(None)` when none was passed.
    pub fn take_probe_listener(&mut self) -> Result<Option<std::net::TcpListener>, ActivationError> {
        self.take_tcp_listener(PROBE_FDNAME)
    }

    fn find(&mut self, which: Select<'_>) -> Option<&mut Entry> {
        match which {
            Select::Index(i) => self.entries.get_mut(i),
            Select::Name(n) => self.entries.iter_mut().find(|e| e.fd.is_some() && e.name == n),
        }
    }

    fn take_kind(&mut self, which: Select<'_>, want: Kind) -> Result<Option<OwnedFd>, ActivationError> {
        let Some(entry) = self.find(which) else { return Ok(None) };
        let Some(fd) = entry.fd.as_ref() else { return Ok(None) };
        let actual = FdKind::of(fd.as_fd()).map_err(|source| ActivationError::Io {
            fd: entry.raw,
            name: entry.name.clone(),
            source,
        })?;
        if !want.matches(&actual) {
            return Err(ActivationError::WrongKind {
                fd: entry.raw,
                name: entry.name.clone(),
                actual: actual.to_string(),
                expected: want.describe(),
            });
        }
        Ok(entry.fd.take())
    }

    /// The fd number and name of a selection, for error messages.
    #[cfg(feature = "tokio")]
    fn label(&mut self, which: Select<'_>) -> (RawFd, String) {
        self.find(which).map_or((-1, String::new()), |e| (e.raw, e.name.clone()))
    }
}

#[cfg(feature = "tokio")]
macro_rules! tokio_take {
    ($(#[$doc:meta])* $name:ident, $std:ident, $tokio:ty) => {
        $(#[$doc])*
        ///
        /// Sets `O_NONBLOCK`, as tokio requires. Must run inside a tokio runtime.
        pub fn $name<'a>(&mut self, which: impl Into<Select<'a>>) -> Result<Option<$tokio>, ActivationError> {
            let which = which.into();
            let (fd, name) = self.label(which);
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(ActivationError::NoRuntime { fd, name });
            }
            let Some(sock) = self.$std(which)? else { return Ok(None) };
            let io = |source| ActivationError::Io { fd, name: name.clone(), source };
            sock.set_nonblocking(true).map_err(io)?;
            <$tokio>::from_std(sock).map(Some).map_err(io)
        }
    };
}

#[cfg(feature = "tokio")]
impl ListenFds {
    /// [`take_probe_listener`](Self::take_probe_listener) as a tokio
    /// listener (`O_NONBLOCK` set). Must run inside a tokio runtime.
    pub fn take_tokio_probe_listener(&mut self) -> Result<Option<tokio::net::TcpListener>, ActivationError> {
        self.take_tokio_tcp_listener(PROBE_FDNAME)
    }

    tokio_take!(
        /// Takes a listening TCP socket as a tokio listener.
        take_tokio_tcp_listener, take_tcp_listener, tokio::net::TcpListener
    );
    tokio_take!(
        /// Takes a connected TCP socket as a tokio stream.
        take_tokio_tcp_stream, take_tcp_stream, tokio::net::TcpStream
    );
    tokio_take!(
        /// Takes a UDP socket as a tokio socket.
        take_tokio_udp_socket, take_udp_socket, tokio::net::UdpSocket
    );
    tokio_take!(
        /// Takes a listening Unix stream socket as a tokio listener.
        take_tokio_unix_listener, take_unix_listener, tokio::net::UnixListener
    );
    tokio_take!(
        /// Takes a connected Unix stream socket as a tokio stream.
        take_tokio_unix_stream, take_unix_stream, tokio::net::UnixStream
    );
    tokio_take!(
        /// Takes a Unix datagram socket as a tokio socket.
        take_tokio_unix_datagram, take_unix_datagram, tokio::net::UnixDatagram
    );
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    TcpListener,
    TcpStream,
    Udp,
    UnixListener,
    UnixStream,
    UnixDatagram,
}

impl Kind {
    fn matches(self, fd: &FdKind) -> bool {
        let FdKind::Socket { family, ty, listening } = *fd else { return false };
        let inet = family == AddressFamily::INET || family == AddressFamily::INET6;
        let unix = family == AddressFamily::UNIX;
        match self {
            Kind::TcpListener => inet && ty == SocketType::STREAM && listening,
            Kind::TcpStream => inet && ty == SocketType::STREAM && !listening,
            Kind::Udp => inet && ty == SocketType::DGRAM,
            Kind::UnixListener => unix && ty == SocketType::STREAM && listening,
            Kind::UnixStream => unix && ty == SocketType::STREAM && !listening,
            Kind::UnixDatagram => unix && ty == SocketType::DGRAM,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::TcpListener => "a listening TCP socket",
            Kind::TcpStream => "a connected TCP socket",
            Kind::Udp => "a UDP socket",
            Kind::UnixListener => "a listening Unix stream socket",
            Kind::UnixStream => "a connected Unix stream socket",
            Kind::UnixDatagram => "a Unix datagram socket",
        }
    }
}

/// What an fd really is, found with `fstat` and `getsockopt`
/// (`SO_DOMAIN`, `SO_TYPE`, `SO_ACCEPTCONN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FdKind {
    /// A socket.
    Socket {
        /// Its address family.
        family: AddressFamily,
        /// Stream, datagram, seqpacket, …
        ty: SocketType,
        /// Whether `listen()` was called on it.
        listening: bool,
    },
    /// A named or anonymous pipe.
    Fifo,
    /// A regular file (memfds included).
    RegularFile,
    /// A character device.
    CharacterDevice,
    /// A directory.
    Directory,
    /// Anything else (block device, symlink, eventfd, …).
    Other,
}

impl FdKind {
    /// Inspects an fd.
    pub fn of(fd: BorrowedFd<'_>) -> std::io::Result<Self> {
        let stat = rustix::fs::fstat(fd)?;
        Ok(match FileType::from_raw_mode(stat.st_mode) {
            FileType::Socket => FdKind::Socket {
                family: rustix::net::sockopt::socket_domain(fd)?,
                ty: rustix::net::sockopt::socket_type(fd)?,
                // Only stream and seqpacket sockets can listen.
                listening: rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false),
            },
            FileType::Fifo => FdKind::Fifo,
            FileType::RegularFile => FdKind::RegularFile,
            FileType::CharacterDevice => FdKind::CharacterDevice,
            FileType::Directory => FdKind::Directory,
            _ => FdKind::Other,
        })
    }
}

impl std::fmt::Display for FdKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let FdKind::Socket { family, ty, listening } = *self else {
            return f.write_str(match self {
                FdKind::Fifo => "a FIFO",
                FdKind::RegularFile => "a regular file",
                FdKind::CharacterDevice => "a character device",
                FdKind::Directory => "a directory",
                _ => "not a socket",
            });
        };
        let inet = family == AddressFamily::INET || family == AddressFamily::INET6;
        let state = if listening { "listening " } else { "" };
        let connected = if listening { "" } else { "connected " };
        match (inet, family == AddressFamily::UNIX, ty) {
            (true, _, SocketType::STREAM) if listening => write!(f, "a {state}TCP socket"),
            (true, _, SocketType::STREAM) => write!(f, "a {connected}TCP socket"),
            (true, _, SocketType::DGRAM) => f.write_str("a UDP socket"),
            (_, true, SocketType::STREAM) if listening => write!(f, "a {state}Unix stream socket"),
            (_, true, SocketType::STREAM) => write!(f, "a {connected}Unix stream socket"),
            (_, true, SocketType::DGRAM) => f.write_str("a Unix datagram socket"),
            (_, true, SocketType::SEQPACKET) => write!(f, "a {state}Unix seqpacket socket"),
            _ => write!(f, "a socket of family {} type {}", family.as_raw(), ty.as_raw()),
        }
    }
}
