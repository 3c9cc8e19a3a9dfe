//! Listen specs and the sockets Baton holds for its whole life.
//!
//! `baton run -l [NAME=]ADDR …` binds each socket once, exactly as a systemd
//! `.socket` unit would, and passes it to every generation of the app at fds
//! 3.. with `LISTEN_FDNAMES`. Baton itself never accepts on them: connections
//! that arrive while no generation is accepting wait in the kernel's backlog.
//!
//! - [`ListenSpec`]: one `-l` argument, parsed with [`FromStr`] and printed
//!   back with [`Display`](fmt::Display).
//! - [`bind`]: creates, configures and binds the socket ([`SocketOptions`]).
//! - [`inherit`]: takes the sockets Baton itself was passed (by systemd or a
//!   parent Baton), so a socket-activated Baton keeps them too.
//! - [`describe`]: a one-line human description of any socket fd.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use baton_sd::{FdKind, ListenFds};
use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};

/// The name `sd_listen_fds_with_names(3)` reports for an fd without one.
pub const UNNAMED: &str = "unknown";

/// Longest Unix socket path or abstract name in bytes: `sun_path` holds 108
/// bytes, one of which is the path's NUL terminator or the abstract marker.
pub const UNIX_PATH_MAX: usize = 107;

/// Every accepted address form, for error messages.
const FORMS: &str = "accepted: PORT (TCP on every IPv4 and IPv6 address), IPV4:PORT, [IPV6]:PORT, \
udp:PORT|IPV4:PORT|[IPV6]:PORT, unix:/PATH, unix:@ABSTRACT, seqpacket:/PATH|@ABSTRACT, \
unixgram:/PATH|@ABSTRACT, each optionally as NAME=ADDR (NAME of letters, digits, '.', '_', '-')";

/// One `-l [NAME=]ADDR`: a socket to listen on and its `LISTEN_FDNAMES` name.
///
/// Parsed with [`FromStr`]; [`Display`](fmt::Display) prints a form that
/// parses back to an equal spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name the app sees in `LISTEN_FDNAMES`; [`UNNAMED`] when none was
    /// given, as systemd reports unnamed fds.
    pub name: String,
    /// Where to listen.
    pub addr: ListenAddr,
}

/// Where a socket listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenAddr {
    /// A TCP listener: `127.0.0.1:8080`, `[::1]:443`, `[::]:443`, or a bare
    /// port `8080`, which means `[::]:8080` serving IPv4 too (like
    /// `ListenStream=8080`).
    Tcp(SocketAddr),
    /// A UDP socket: `udp:127.0.0.1:53`, `udp:[::1]:53`, `udp:53`.
    Udp(SocketAddr),
    /// A Unix socket at a file system path: `unix:/run/app.sock` (stream),
    /// `seqpacket:/run/app.sock`, `unixgram:/run/app.sock` (datagram).
    Unix {
        /// The absolute path of the socket file.
        path: PathBuf,
        /// The socket type.
        kind: UnixKind,
    },
    /// A Unix socket in the abstract namespace: `unix:@name`,
    /// `seqpacket:@name`, `unixgram:@name`.
    UnixAbstract {
        /// The name without the leading `@`.
        name: String,
        /// The socket type.
        kind: UnixKind,
    },
}

/// The type of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnixKind {
    /// `SOCK_STREAM` (`unix:`), listening.
    Stream,
    /// `SOCK_SEQPACKET` (`seqpacket:`), listening.
    SeqPacket,
    /// `SOCK_DGRAM` (`unixgram:`).
    Datagram,
}

impl UnixKind {
    /// The spec prefix, which is also the word [`describe`] uses.
    fn prefix(self) -> &'static str {
        match self {
            UnixKind::Stream => "unix",
            UnixKind::SeqPacket => "seqpacket",
            UnixKind::Datagram => "unixgram",
        }
    }

    fn socket_type(self) -> SocketType {
        match self {
            UnixKind::Stream => SocketType::STREAM,
            UnixKind::SeqPacket => SocketType::SEQPACKET,
            UnixKind::Datagram => SocketType::DGRAM,
        }
    }
}

/// How sockets are set up, like the options of a systemd `.socket` unit.
/// Options that do not apply to a socket's family are ignored, as systemd
/// does.
#[derive(Debug, Clone, Default)]
pub struct SocketOptions {
    /// `listen()` backlog for stream and seqpacket sockets. `None` asks for
    /// the largest the kernel allows, which it caps at `net.core.somaxconn`
    /// (4096 by default): systemd's `Backlog=` default.
    pub backlog: Option<u32>,
    /// `SO_REUSEPORT` on IP sockets (`ReusePort=`).
    pub reuse_port: bool,
    /// `IPV6_V6ONLY` on IPv6 sockets (`BindIPv6Only=`). `None`: the wildcard
    /// address `[::]` (and so a bare port) serves IPv4 too, whatever
    /// `net.ipv6.bindv6only` says; specific addresses keep the kernel default.
    pub v6_only: Option<bool>,
    /// `IP_FREEBIND` / `IPV6_FREEBIND` (`FreeBind=`): bind an address that is
    /// not (yet) configured on this host.
    pub freebind: bool,
    /// Permissions of a Unix socket file, applied before anyone can connect
    /// (`SocketMode=`); `None` means 0666.
    pub unix_mode: Option<u32>,
    /// Owner and group of a Unix socket file (`SocketUser=`/`SocketGroup=`),
    /// as numeric ids; `None` in either keeps it.
    pub unix_owner: Option<(Option<u32>, Option<u32>)>,
}

/// A socket Baton holds: bound by [`bind`] or taken over by [`inherit`].
#[derive(Debug)]
pub struct BoundSocket {
    /// Its `LISTEN_FDNAMES` name.
    pub name: String,
    /// The socket: `CLOEXEC`, blocking.
    pub fd: OwnedFd,
    /// What it really is, from the kernel ([`describe`]): `tcp
    /// 127.0.0.1:41234` with the real port when port 0 was asked, `unix
    /// /run/app.sock`, `unix @name`.
    pub local: String,
}

/// Why a listen spec could not be parsed or its socket not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The `-l` argument is malformed.
    #[error("invalid listen address {input:?}: {reason}")]
    Parse {
        /// The argument as given.
        input: String,
        /// What is wrong, and the accepted forms.
        reason: String,
    },
    /// Creating or binding the socket failed.
    #[error("cannot listen on {spec}: {source}{}", hint_suffix(.hint))]
    Bind {
        /// The spec, as [`ListenSpec`] displays it.
        spec: String,
        /// The error from the kernel.
        source: io::Error,
        /// The usual cause and fix, or empty.
        hint: &'static str,
    },
    /// A step after binding (socket option, `listen`, `chmod`, `chown`) failed.
    #[error("cannot listen on {spec}: {step} failed: {source}")]
    Setup {
        /// The spec, as [`ListenSpec`] displays it.
        spec: String,
        /// The failed step, such as `setsockopt(IPV6_V6ONLY)`.
        step: &'static str,
        /// The error from the kernel.
        source: io::Error,
    },
    /// Something other than a socket is where a Unix socket should go.
    #[error(
        "cannot listen on {spec}: {} exists and is {found}, not a socket; refusing to delete it (remove it yourself or pick another path)",
        path.display()
    )]
    NotASocket {
        /// The spec, as [`ListenSpec`] displays it.
        spec: String,
        /// The path.
        path: PathBuf,
        /// What is there, such as "a regular file".
        found: &'static str,
    },
    /// A [`SocketOptions`] value is out of range.
    #[error("cannot listen on {spec}: {reason}")]
    Options {
        /// The spec, as [`ListenSpec`] displays it.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// An fd passed to Baton could not be inspected.
    #[error("passed fd {fd} '{name}' could not be inspected: {source}")]
    Inherit {
        /// The fd number.
        fd: RawFd,
        /// Its `LISTEN_FDNAMES` name.
        name: String,
        /// The underlying error.
        source: io::Error,
    },
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() { String::new() } else { format!("; {hint}") }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Udp(a) => write!(f, "udp:{a}"),
            ListenAddr::Unix { path, kind } => write!(f, "{}:{}", kind.prefix(), path.display()),
            ListenAddr::UnixAbstract { name, kind } => write!(f, "{}:@{name}", kind.prefix()),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = ListenError;

    /// Parses an address without a name (see [`ListenSpec`] for the forms).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_addr(s).map_err(|reason| ListenError::Parse { input: s.to_owned(), reason })
    }
}

impl fmt::Display for ListenSpec {
    /// `NAME=ADDR`, or just `ADDR` for the default name, which parses back
    /// to the same spec (as long as the name is one [`FromStr`] accepts).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name != UNNAMED {
            write!(f, "{}=", self.name)?;
        }
        write!(f, "{}", self.addr)
    }
}

impl FromStr for ListenSpec {
    type Err = ListenError;

    /// Parses `[NAME=]ADDR`.
    ///
    /// The text before the first `=` is a NAME only if it is made of ASCII
    /// letters, digits, `.`, `_` and `-` and the rest is an address: `=` may
    /// appear in a Unix path (`unix:/a=b`), and a name never contains `:`,
    /// `/`, `@` or `[`, so it cannot be confused with an address. The
    /// restricted set also keeps user names apart from the fd-store names
    /// `listen/…` and `conn/…`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| ListenError::Parse { input: s.to_owned(), reason };
        if let Some((prefix, rest)) = s.split_once('=') {
            if is_plain_name(prefix) {
                match parse_addr(rest) {
                    Ok(addr) => {
                        baton_sd::wire::validate_fdname(prefix).map_err(|e| fail(e.to_string()))?;
                        return Ok(ListenSpec { name: prefix.to_owned(), addr });
                    }
                    // The whole text may still be an address; if not, the
                    // user clearly meant NAME=ADDR, so report the ADDR part.
                    Err(reason) => {
                        return parse_addr(s)
                            .map(|addr| ListenSpec { name: UNNAMED.to_owned(), addr })
                            .map_err(|_| fail(format!("after NAME '{prefix}=': {reason}")));
                    }
                }
            }
            // Looks like a name attempt ("my app=8080") rather than part of an
            // address: say what a name may contain.
            if !prefix.contains([':', '/', '@', '[']) && parse_addr(s).is_err() {
                return Err(fail(if prefix.is_empty() {
                    "the NAME before '=' is empty; write NAME=ADDR or just ADDR".to_owned()
                } else {
                    format!("NAME '{prefix}' may only contain ASCII letters, digits, '.', '_' and '-'")
                }));
            }
        }
        parse_addr(s).map(|addr| ListenSpec { name: UNNAMED.to_owned(), addr }).map_err(fail)
    }
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn parse_addr(s: &str) -> Result<ListenAddr, String> {
    if s.is_empty() {
        return Err(format!("the address is empty; {FORMS}"));
    }
    if let Some(rest) = s.strip_prefix("tcp:") {
        return parse_inet(rest).map(ListenAddr::Tcp);
    }
    if let Some(rest) = s.strip_prefix("udp:") {
        return parse_inet(rest).map(ListenAddr::Udp);
    }
    for kind in [UnixKind::Stream, UnixKind::SeqPacket, UnixKind::Datagram] {
        if let Some(rest) = s.strip_prefix(kind.prefix()).and_then(|r| r.strip_prefix(':')) {
            return parse_unix(kind, rest);
        }
    }
    // systemd's ListenStream= spelling of Unix sockets.
    if s.starts_with(['/', '@']) {
        return parse_unix(UnixKind::Stream, s);
    }
    // Also catches IPv6 written without brackets ("::1:443"), to say so.
    if s.starts_with('[') || s.bytes().all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'%')) {
        return parse_inet(s).map(ListenAddr::Tcp);
    }
    if let Some((word, rest)) = s.split_once(':')
        && !word.is_empty()
    {
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "host names are not resolved; use an IP address such as 127.0.0.1:{rest} or [::1]:{rest}"
            ));
        }
        return Err(format!("unknown address type '{word}:'; {FORMS}"));
    }
    Err(format!("not an address; {FORMS}"))
}

/// `PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
fn parse_inet(s: &str) -> Result<SocketAddr, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = s.parse().map_err(|_| format!("port {s} is out of range (0-65535)"))?;
        return Ok(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !s.starts_with('[') && s.matches(':').count() > 1 {
        let example = match s.rsplit_once(':') {
            Some((host, port)) if host.parse::<Ipv6Addr>().is_ok() && port.parse::<u16>().is_ok() => {
                format!("[{host}]:{port}")
            }
            _ => "[::1]:443".to_owned(),
        };
        return Err(format!("IPv6 addresses need brackets, as in {example}"));
    }
    let bare_ip = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    if let Ok(ip) = bare_ip.parse::<IpAddr>() {
        let hint = match ip {
            IpAddr::V4(_) => format!("{ip}:PORT"),
            IpAddr::V6(_) => format!("[{ip}]:PORT"),
        };
        return Err(format!("'{s}' has no port; write {hint}"));
    }
    if let Some((host, port)) = s.rsplit_once(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_err()
        && host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).parse::<IpAddr>().is_ok()
    {
        return Err(format!("port {port} is out of range (0-65535)"));
    }
    Err(format!("'{s}' is not PORT, IPV4:PORT or [IPV6]:PORT"))
}

fn parse_unix(kind: UnixKind, s: &str) -> Result<ListenAddr, String> {
    let prefix = kind.prefix();
    let checked = |what: &str, value: &str| {
        if value.contains('\0') {
            Err(format!("the {what} contains a NUL byte"))
        } else if value.len() > UNIX_PATH_MAX {
            Err(format!("the {what} is {} bytes long; the limit is {UNIX_PATH_MAX}", value.len()))
        } else {
            Ok(())
        }
    };
    if let Some(name) = s.strip_prefix('@') {
        if name.is_empty() {
            return Err(format!("'{prefix}:@' needs a name after '@', as in {prefix}:@app"));
        }
        checked("abstract name", name)?;
        return Ok(ListenAddr::UnixAbstract { name: name.to_owned(), kind });
    }
    if s.starts_with('/') {
        checked("path", s)?;
        return Ok(ListenAddr::Unix { path: PathBuf::from(s), kind });
    }
    Err(format!(
        "'{prefix}:' needs an absolute path or an abstract name, as in {prefix}:/run/app.sock or {prefix}:@app"
    ))
}

/// Creates, configures and binds the socket for `spec`, the way a systemd
/// `.socket` unit does:
///
/// - every socket is `SOCK_CLOEXEC` and stays blocking (the app decides
///   about `O_NONBLOCK`; Baton never does I/O on it);
/// - TCP gets `SO_REUSEADDR`, so a restarted Baton can bind while old
///   connections linger in `TIME_WAIT`; UDP does not, since there it would
///   let a second process bind the same port silently;
/// - `SO_REUSEPORT`, `IPV6_V6ONLY`, `IP_FREEBIND`/`IPV6_FREEBIND` per
///   `opts`; the wildcard `[::]` falls back to `0.0.0.0` on hosts without
///   IPv6, like systemd's bare ports;
/// - stream and seqpacket sockets `listen()`;
/// - a Unix path must have an existing parent directory. A socket file
///   already there is replaced only if no process listens on it (checked
///   with a `connect()`, which a live stream server sees as a connection
///   closing at once); anything else at the path is an error, never deleted.
///   The file gets `unix_mode` (0666) and `unix_owner` before `listen()`, so
///   nobody connects under the wrong permissions; if a step after `bind()`
///   fails, the file is removed again.
pub fn bind(spec: &ListenSpec, opts: &SocketOptions) -> Result<BoundSocket, ListenError> {
    let fd = match &spec.addr {
        ListenAddr::Tcp(addr) => bind_inet(spec, *addr, SocketType::STREAM, opts)?,
        ListenAddr::Udp(addr) => bind_inet(spec, *addr, SocketType::DGRAM, opts)?,
        ListenAddr::Unix { path, kind } => bind_unix_path(spec, path, *kind, opts)?,
        ListenAddr::UnixAbstract { name, kind } => bind_unix_abstract(spec, name, *kind, opts)?,
    };
    let local = describe(fd.as_fd());
    Ok(BoundSocket { name: spec.name.clone(), fd, local })
}

fn bind_error(spec: &ListenSpec, err: io::Error) -> ListenError {
    let hint = hint_for(&err, &spec.addr);
    ListenError::Bind { spec: spec.to_string(), source: err, hint }
}

fn setup_error(spec: &ListenSpec, step: &'static str) -> impl FnOnce(Errno) -> ListenError {
    move |e| ListenError::Setup { spec: spec.to_string(), step, source: e.into() }
}

/// The usual cause of a failure to create or bind a socket, and its fix.
fn hint_for(err: &io::Error, addr: &ListenAddr) -> &'static str {
    let Some(errno) = Errno::from_io_error(err) else { return "" };
    let ip_port = match addr {
        ListenAddr::Tcp(a) | ListenAddr::Udp(a) => Some(a.port()),
        _ => None,
    };
    let is_path = matches!(addr, ListenAddr::Unix { .. });
    match errno {
        Errno::ADDRINUSE => match addr {
            ListenAddr::Unix { .. } => "another process listens on this socket; stop it or pick another path",
            ListenAddr::UnixAbstract { .. } => "another process listens there; stop it or pick another name",
            _ => "another process listens there; stop it or pick another port",
        },
        Errno::ACCESS | Errno::PERM => match ip_port {
            Some(port) if (1..1024).contains(&port) => "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            _ if is_path => "no permission to create the socket file in its directory",
            _ => "",
        },
        Errno::ADDRNOTAVAIL => {
            "the address is not configured on this host; configure it first, or pass --freebind \
             (IP_FREEBIND) to bind it anyway"
        }
        Errno::AFNOSUPPORT => "IPv6 is disabled on this host; use an IPv4 address",
        Errno::NOENT if is_path => "the socket's directory does not exist; create it first",
        Errno::NOTDIR if is_path => "a component of the socket's path is not a directory",
        Errno::ROFS if is_path => "the file system is read-only; pick a path on a writable one, such as under /run",
        _ => "",
    }
}

fn new_socket(family: AddressFamily, ty: SocketType) -> Result<OwnedFd, Errno> {
    // Blocking on purpose: the flag lives on the open file description that
    // every generation shares, and the app chooses it (systemd's
    // NonBlocking= defaults to off too).
    net::socket_with(family, ty, SocketFlags::CLOEXEC, None)
}

fn listen_backlog(opts: &SocketOptions) -> i32 {
    // The kernel silently caps larger values at net.core.somaxconn.
    opts.backlog.map_or(i32::MAX, |b| i32::try_from(b).unwrap_or(i32::MAX))
}

fn bind_inet(
    spec: &ListenSpec,
    addr: SocketAddr,
    ty: SocketType,
    opts: &SocketOptions,
) -> Result<OwnedFd, ListenError> {
    let wildcard_v6 = matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified() && a.scope_id() == 0);
    let family = if addr.is_ipv6() { AddressFamily::INET6 } else { AddressFamily::INET };
    let (fd, addr) = match new_socket(family, ty) {
        // Like systemd's bare ports: no IPv6 on this host, so the wildcard
        // means every IPv4 address.
        Err(Errno::AFNOSUPPORT) if wildcard_v6 => {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
            (new_socket(AddressFamily::INET, ty).map_err(|e| bind_error(spec, e.into()))?, v4)
        }
        r => (r.map_err(|e| bind_error(spec, e.into()))?, addr),
    };
    if ty == SocketType::STREAM {
        sockopt::set_socket_reuseaddr(&fd, true).map_err(setup_error(spec, "setsockopt(SO_REUSEADDR)"))?;
    }
    if opts.reuse_port {
        sockopt::set_socket_reuseport(&fd, true).map_err(setup_error(spec, "setsockopt(SO_REUSEPORT)"))?;
    }
    if addr.is_ipv6() {
        // The wildcard serves IPv4 too unless told otherwise: a bare port
        // must not depend on the net.ipv6.bindv6only sysctl.
        let v6_only = opts.v6_only.or(if wildcard_v6 { Some(false) } else { None });
        if let Some(v) = v6_only {
            sockopt::set_ipv6_v6only(&fd, v).map_err(setup_error(spec, "setsockopt(IPV6_V6ONLY)"))?;
        }
        if opts.freebind {
            sockopt::set_ipv6_freebind(&fd, true).map_err(setup_error(spec, "setsockopt(IPV6_FREEBIND)"))?;
        }
    } else if opts.freebind {
        sockopt::set_ip_freebind(&fd, true).map_err(setup_error(spec, "setsockopt(IP_FREEBIND)"))?;
    }
    net::bind(&fd, &addr).map_err(|e| bind_error(spec, e.into()))?;
    if ty == SocketType::STREAM {
        net::listen(&fd, listen_backlog(opts)).map_err(setup_error(spec, "listen"))?;
    }
    Ok(fd)
}

fn bind_unix_abstract(
    spec: &ListenSpec,
    name: &str,
    kind: UnixKind,
    opts: &SocketOptions,
) -> Result<OwnedFd, ListenError> {
    let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).map_err(|e| bind_error(spec, e.into()))?;
    let fd = new_socket(AddressFamily::UNIX, kind.socket_type()).map_err(|e| bind_error(spec, e.into()))?;
    net::bind(&fd, &addr).map_err(|e| bind_error(spec, e.into()))?;
    if kind != UnixKind::Datagram {
        net::listen(&fd, listen_backlog(opts)).map_err(setup_error(spec, "listen"))?;
    }
    Ok(fd)
}

fn bind_unix_path(
    spec: &ListenSpec,
    path: &Path,
    kind: UnixKind,
    opts: &SocketOptions,
) -> Result<OwnedFd, ListenError> {
    let mode = opts.unix_mode.unwrap_or(0o666);
    if mode > 0o7777 {
        return Err(ListenError::Options {
            spec: spec.to_string(),
            reason: format!("socket mode {mode:o} is not a file mode (at most 7777 in octal)"),
        });
    }
    let addr = SocketAddrUnix::new(path).map_err(|e| bind_error(spec, e.into()))?;
    clear_stale(spec, path, &addr, kind)?;
    let fd = new_socket(AddressFamily::UNIX, kind.socket_type()).map_err(|e| bind_error(spec, e.into()))?;
    // The mode is the socket's own from the moment bind() creates the file
    // (set on the fd, the umask cleared for the bind), never a chmod() of
    // the path afterwards, which could be made to follow a symlink.
    crate::rundir::bind_with_mode(fd.as_fd(), &addr, mode).map_err(|e| bind_error(spec, e))?;
    // The file is ours from here on. The owner comes before listen(): until
    // then a stream or seqpacket connect() is refused, so nobody gets in
    // before the socket has its owner.
    let finish = || -> Result<(), ListenError> {
        if let Some((uid, gid)) = opts.unix_owner
            && (uid.is_some() || gid.is_some())
        {
            std::os::unix::fs::lchown(path, uid, gid).map_err(|source| ListenError::Setup {
                spec: spec.to_string(),
                step: "chown",
                source,
            })?;
        }
        if kind != UnixKind::Datagram {
            net::listen(&fd, listen_backlog(opts)).map_err(setup_error(spec, "listen"))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        // Leave nothing behind that a later attempt would trip over.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(fd)
}

/// Makes room at `path`: nothing there is fine, a socket nobody listens on
/// (left by a crash) is removed, a live socket or any other file is an error.
fn clear_stale(spec: &ListenSpec, path: &Path, addr: &SocketAddrUnix, kind: UnixKind) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bind_error(spec, e)),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let found = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else if ft.is_fifo() {
            "a FIFO"
        } else {
            "a device node"
        };
        return Err(ListenError::NotASocket { spec: spec.to_string(), path: path.to_owned(), found });
    }
    // Non-blocking so that a live listener with a full backlog answers
    // EAGAIN at once instead of blocking us.
    let probe =
        net::socket_with(AddressFamily::UNIX, kind.socket_type(), SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)
            .map_err(|e| bind_error(spec, e.into()))?;
    match net::connect(&probe, addr) {
        // Nobody is bound to it: left over from a process that died.
        Err(Errno::CONNREFUSED) => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(bind_error(spec, e)),
        },
        Err(Errno::NOENT) => Ok(()),
        // Someone is there (PROTOTYPE: a live socket of another type).
        Ok(()) | Err(Errno::AGAIN | Errno::INPROGRESS | Errno::PROTOTYPE) => {
            Err(bind_error(spec, Errno::ADDRINUSE.into()))
        }
        Err(e) => Err(ListenError::Bind {
            spec: spec.to_string(),
            source: e.into(),
            hint: "a socket file is in the way and could not be checked for a listener; delete it if no process uses it",
        }),
    }
}

/// Takes every remaining passed fd from `fds` that is a listening socket or a
/// datagram socket (sockets Baton received from systemd's `.socket` units or
/// from a parent Baton), in fd order, each with its `LISTEN_FDNAMES` name.
///
/// Everything else stays in `fds` for the caller: non-sockets, and connected
/// stream sockets, which are fd-store entries (stored connections,
/// `conn/<pid>/<seq>`) or `Accept=yes` connections, never something to
/// listen on. The fds are taken as they are; in particular `O_NONBLOCK` is
/// left as the sender set it.
///
/// Every fd is inspected before any is taken, so an error leaves `fds`
/// untouched.
pub fn inherit(fds: &mut ListenFds) -> Result<Vec<BoundSocket>, ListenError> {
    let mut wanted = Vec::new();
    for (index, (raw, name, available)) in fds.names().enumerate() {
        if !available {
            continue;
        }
        // SAFETY: `fds` owns this still-available fd, and the `&mut` borrow
        // of `fds` keeps anyone from closing it while this borrow lives (it
        // ends within this iteration).
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let kind = FdKind::of(fd).map_err(|source| ListenError::Inherit { fd: raw, name: name.to_owned(), source })?;
        if let FdKind::Socket { ty, listening, .. } = kind
            && (listening || ty == SocketType::DGRAM)
        {
            wanted.push((index, raw, name.to_owned()));
        }
    }
    let mut taken = Vec::with_capacity(wanted.len());
    for (index, raw, name) in wanted {
        let fd =
            fds.take_fd(index).map_err(|e| ListenError::Inherit { fd: raw, name: name.clone(), source: e.into() })?;
        // Only this function took fds since the scan above.
        if let Some(fd) = fd {
            let local = describe(fd.as_fd());
            taken.push(BoundSocket { name, fd, local });
        }
    }
    Ok(taken)
}

/// Describes any fd the way [`BoundSocket::local`] does, from the kernel's
/// view (`getsockname`, `SO_DOMAIN`, `SO_TYPE`, `SO_ACCEPTCONN`):
/// `tcp 127.0.0.1:41234`, `udp [::]:53`, `unix /run/app.sock`,
/// `seqpacket @name`, `unixgram /run/log.sock`. A stream socket that does
/// not listen gets ` (not listening)`; a non-socket or an error is described
/// as such, starting with `fd N:`.
pub fn describe(fd: BorrowedFd<'_>) -> String {
    describe_socket(fd).unwrap_or_else(|e| format!("fd {}: {e}", fd.as_raw_fd()))
}

fn describe_socket(fd: BorrowedFd<'_>) -> io::Result<String> {
    let kind = FdKind::of(fd)?;
    let FdKind::Socket { family, ty, listening } = kind else {
        return Ok(format!("fd {}: not a socket ({kind})", fd.as_raw_fd()));
    };
    let local = net::getsockname(fd)?;
    let stream_like = ty == SocketType::STREAM || ty == SocketType::SEQPACKET;
    let suffix = if stream_like && !listening { " (not listening)" } else { "" };
    if family == AddressFamily::INET || family == AddressFamily::INET6 {
        let proto = match ty {
            SocketType::STREAM => "tcp",
            SocketType::DGRAM => "udp",
            _ => "ip",
        };
        let addr = SocketAddr::try_from(local)?;
        return Ok(format!("{proto} {addr}{suffix}"));
    }
    if family == AddressFamily::UNIX {
        let proto = match ty {
            SocketType::STREAM => "unix",
            SocketType::SEQPACKET => "seqpacket",
            SocketType::DGRAM => "unixgram",
            _ => "unix-other",
        };
        let addr = SocketAddrUnix::try_from(local)?;
        // An unbound socket (a socketpair end) comes back as an empty
        // abstract name.
        let place = match (addr.path_bytes(), addr.abstract_name()) {
            (Some(path), _) => printable(path),
            (None, Some(name)) if !name.is_empty() => format!("@{}", printable(name)),
            _ => "(unnamed)".to_owned(),
        };
        return Ok(format!("{proto} {place}{suffix}"));
    }
    Ok(format!("socket of family {} type {}{suffix}", family.as_raw(), ty.as_raw()))
}

/// Bytes as text for a log line: invalid UTF-8 replaced, control characters
/// (abstract names may hold NULs) escaped.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for c in String::from_utf8_lossy(bytes).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn spec(s: &str) -> ListenSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn tcp(a: &str) -> ListenAddr {
        ListenAddr::Tcp(a.parse().unwrap())
    }

    fn udp(a: &str) -> ListenAddr {
        ListenAddr::Udp(a.parse().unwrap())
    }

    fn unix(p: &str, kind: UnixKind) -> ListenAddr {
        ListenAddr::Unix { path: p.into(), kind }
    }

    fn abs(n: &str, kind: UnixKind) -> ListenAddr {
        ListenAddr::UnixAbstract { name: n.into(), kind }
    }

    #[test]
    fn parse_accepts() {
        use UnixKind::*;
        let long_path = format!("/{}", "p".repeat(UNIX_PATH_MAX - 1));
        let table: Vec<(&str, &str, ListenAddr)> = vec![
            ("8080", UNNAMED, tcp("[::]:8080")),
            ("0", UNNAMED, tcp("[::]:0")),
            ("tcp:8080", UNNAMED, tcp("[::]:8080")),
            ("127.0.0.1:8080", UNNAMED, tcp("127.0.0.1:8080")),
            ("[::1]:443", UNNAMED, tcp("[::1]:443")),
            ("[::]:443", UNNAMED, tcp("[::]:443")),
            ("[fe80::1%2]:443", UNNAMED, tcp("[fe80::1%2]:443")),
            ("http=127.0.0.1:8080", "http", tcp("127.0.0.1:8080")),
            ("a.b_c-9=[::1]:1", "a.b_c-9", tcp("[::1]:1")),
            ("dns=udp:127.0.0.1:53", "dns", udp("127.0.0.1:53")),
            ("udp:[::1]:53", UNNAMED, udp("[::1]:53")),
            ("udp:53", UNNAMED, udp("[::]:53")),
            ("unix:/run/app.sock", UNNAMED, unix("/run/app.sock", Stream)),
            ("/run/app.sock", UNNAMED, unix("/run/app.sock", Stream)),
            ("@app", UNNAMED, abs("app", Stream)),
            ("unix:/a=b", UNNAMED, unix("/a=b", Stream)),
            ("x=unix:/a=b", "x", unix("/a=b", Stream)),
            ("seqpacket:/run/s", UNNAMED, unix("/run/s", SeqPacket)),
            ("unixgram:/run/log", UNNAMED, unix("/run/log", Datagram)),
            ("unix:@name", UNNAMED, abs("name", Stream)),
            ("seqpacket:@n=m:x", UNNAMED, abs("n=m:x", SeqPacket)),
            ("logs=unixgram:@n", "logs", abs("n", Datagram)),
            ("unknown=8080", UNNAMED, tcp("[::]:8080")),
        ];
        for (input, name, addr) in table {
            let parsed = spec(input);
            assert_eq!(parsed, ListenSpec { name: name.into(), addr }, "{input}");
            let shown = parsed.to_string();
            assert_eq!(spec(&shown), parsed, "{input} displayed as {shown}");
        }
        assert_eq!(spec(&format!("unix:{long_path}")).addr, unix(&long_path, Stream));
        assert_eq!(spec("http=127.0.0.1:8080").to_string(), "http=127.0.0.1:8080");
        assert_eq!(spec("8080").to_string(), "[::]:8080");
        assert_eq!(spec("/run/a").to_string(), "unix:/run/a");
        assert_eq!(spec("d=udp:53").to_string(), "d=udp:[::]:53");
    }

    #[test]
    fn parse_rejects() {
        let long_name = "n".repeat(256);
        let long_path = format!("unix:/{}", "p".repeat(UNIX_PATH_MAX));
        let long_abstract = format!("unix:@{}", "p".repeat(UNIX_PATH_MAX + 1));
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            ("65536".into(), "out of range"),
            ("127.0.0.1:70000".into(), "out of range"),
            ("127.0.0.1".into(), "127.0.0.1:PORT"),
            ("[::1]".into(), "[::1]:PORT"),
            ("::1:443".into(), "brackets, as in [::1]:443"),
            ("fe80::1".into(), "brackets"),
            ("localhost:8080".into(), "host names are not resolved"),
            ("http://x".into(), "unknown address type 'http:'"),
            ("vsock:1:2".into(), "unknown address type"),
            ("unix:run/app.sock".into(), "absolute path"),
            ("unix:".into(), "absolute path"),
            ("unix:@".into(), "needs a name"),
            ("unix:/a\0b".into(), "NUL"),
            (long_path, "limit is 107"),
            (long_abstract, "limit is 107"),
            ("1.2.3:80".into(), "not PORT"),
            ("my app=8080".into(), "may only contain"),
            ("=8080".into(), "NAME before '=' is empty"),
            ("http=".into(), "after NAME 'http='"),
            ("http=nonsense".into(), "after NAME 'http='"),
            (format!("{long_name}=8080"), "longer than 255"),
            ("8080 ".into(), "not an address; accepted"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<ListenSpec>().expect_err(&input);
            let msg = err.to_string();
            assert!(matches!(err, ListenError::Parse { .. }), "{input}: {err:?}");
            assert!(msg.contains(needle), "{input:?}: {msg:?} lacks {needle:?}");
        }
        let msg = "nope".parse::<ListenSpec>().unwrap_err().to_string();
        assert!(msg.contains("unix:/PATH") && msg.contains("[IPV6]:PORT"), "{msg}");
    }

    static SEQ: AtomicU32 = AtomicU32::new(0);

    /// A unique name for this test process.
    fn unique(what: &str) -> String {
        format!("baton-listen-{what}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
    }

    /// A private directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(unique("dir"));
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn check_fd(fd: BorrowedFd<'_>, family: AddressFamily, ty: SocketType, listening: bool) {
        assert_eq!(FdKind::of(fd).unwrap(), FdKind::Socket { family, ty, listening });
        assert!(rustix::io::fcntl_getfd(fd).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
        assert!(!rustix::fs::fcntl_getfl(fd).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
    }

    fn port_of(sock: &BoundSocket) -> u16 {
        SocketAddr::try_from(net::getsockname(&sock.fd).unwrap()).unwrap().port()
    }

    /// `TCP_INFO` of a listener reports its accept-queue limit in
    /// `tcpi_sacked` (see tcp_get_info() in the kernel).
    fn tcp_max_backlog(fd: BorrowedFd<'_>) -> u32 {
        let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the buffer and its length match; the kernel writes at most
        // `len` bytes.
        let rc = unsafe {
            libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: zero-initialised, then (partly) filled by the kernel.
        unsafe { info.assume_init() }.tcpi_sacked
    }

    #[test]
    fn tcp_port_zero_reports_real_port_and_accepts() {
        let s = bind(&spec("web=127.0.0.1:0"), &SocketOptions::default()).unwrap();
        check_fd(s.fd.as_fd(), AddressFamily::INET, SocketType::STREAM, true);
        assert_eq!(s.name, "web");
        let port = port_of(&s);
        assert_ne!(port, 0);
        assert_eq!(s.local, format!("tcp 127.0.0.1:{port}"));
        assert!(sockopt::socket_reuseaddr(&s.fd).unwrap());
        assert!(!sockopt::socket_reuseport(&s.fd).unwrap());
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
        assert_eq!(tcp_max_backlog(s.fd.as_fd()), somaxconn);

        // The connection waits in the backlog until someone accepts it.
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let listener = std::net::TcpListener::from(s.fd);
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"hi").unwrap();
        let mut buf = [0; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn tcp_options_are_applied() {
        let opts = SocketOptions { backlog: Some(7), reuse_port: true, ..Default::default() };
        let a = bind(&spec("[::1]:0"), &opts).unwrap();
        check_fd(a.fd.as_fd(), AddressFamily::INET6, SocketType::STREAM, true);
        assert!(sockopt::socket_reuseport(&a.fd).unwrap());
        assert_eq!(tcp_max_backlog(a.fd.as_fd()), 7);
        let port = port_of(&a);
        assert_eq!(a.local, format!("tcp [::1]:{port}"));
        // SO_REUSEPORT on both: a second listener on the same port is allowed.
        let b = bind(&spec(&format!("[::1]:{port}")), &opts).unwrap();
        assert_eq!(port_of(&b), port);

        // The kernel forces IPV6_V6ONLY on for specific IPv6 addresses at
        // bind(), so the option is observable on the wildcard only, where
        // it overrides the dual-stack default.
        let c = bind(&spec("[::]:0"), &SocketOptions { v6_only: Some(true), ..Default::default() }).unwrap();
        assert!(sockopt::ipv6_v6only(&c.fd).unwrap());
    }

    #[test]
    fn bare_port_is_dual_stack() {
        let s = bind(&spec("0"), &SocketOptions::default()).unwrap();
        check_fd(s.fd.as_fd(), AddressFamily::INET6, SocketType::STREAM, true);
        assert!(!sockopt::ipv6_v6only(&s.fd).unwrap());
        let port = port_of(&s);
        assert_eq!(s.local, format!("tcp [::]:{port}"));
        let listener = std::net::TcpListener::from(s.fd);
        for ip in ["127.0.0.1", "::1"] {
            let _client = std::net::TcpStream::connect((ip, port)).unwrap();
            let (_, peer) = listener.accept().unwrap();
            assert!(peer.ip().to_canonical().is_loopback(), "{peer}");
        }
    }

    #[test]
    fn udp_binds_and_receives() {
        let s = bind(&spec("dns=udp:127.0.0.1:0"), &SocketOptions::default()).unwrap();
        check_fd(s.fd.as_fd(), AddressFamily::INET, SocketType::DGRAM, false);
        let port = port_of(&s);
        assert_eq!(s.local, format!("udp 127.0.0.1:{port}"));
        assert!(!sockopt::socket_reuseaddr(&s.fd).unwrap(), "UDP must not get SO_REUSEADDR");
        let server = std::net::UdpSocket::from(s.fd);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"q", ("127.0.0.1", port)).unwrap();
        let mut buf = [0; 4];
        let (n, _) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"q");

        let v6 = bind(&spec("udp:[::1]:0"), &SocketOptions::default()).unwrap();
        check_fd(v6.fd.as_fd(), AddressFamily::INET6, SocketType::DGRAM, false);
    }

    #[test]
    fn addr_in_use_names_the_spec() {
        let first = bind(&spec("127.0.0.1:0"), &SocketOptions::default()).unwrap();
        let taken = format!("api=127.0.0.1:{}", port_of(&first));
        let err = bind(&spec(&taken), &SocketOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, ListenError::Bind { source, .. } if source.raw_os_error() == Some(libc::EADDRINUSE)));
        assert!(msg.contains(&taken) && msg.contains("stop it or pick another port"), "{msg}");
    }

    #[test]
    fn freebind_binds_an_address_not_on_this_host() {
        // TEST-NET-2, never configured on a test machine.
        let foreign = spec("198.51.100.7:0");
        // With this sysctl on, every address binds without IP_FREEBIND.
        let nonlocal_ok = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind").is_ok_and(|v| v.trim() != "0");
        if !nonlocal_ok {
            let err = bind(&foreign, &SocketOptions::default()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("198.51.100.7:0") && msg.contains("pass --freebind"), "{msg}");
        }
        let s = bind(&foreign, &SocketOptions { freebind: true, ..Default::default() }).unwrap();
        assert!(sockopt::ip_freebind(&s.fd).unwrap());
        assert!(s.local.starts_with("tcp 198.51.100.7:"), "{}", s.local);
        let v6 = bind(&spec("[2001:db8::7]:0"), &SocketOptions { freebind: true, ..Default::default() }).unwrap();
        assert!(sockopt::ipv6_freebind(&v6.fd).unwrap());
    }

    #[test]
    fn hints_for_common_errors() {
        let eacces = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(hint_for(&eacces, &tcp("0.0.0.0:80")), "ports below 1024 need root or CAP_NET_BIND_SERVICE");
        assert_eq!(hint_for(&eacces, &tcp("0.0.0.0:8080")), "");
        assert!(hint_for(&eacces, &unix("/x", UnixKind::Stream)).contains("permission"));
        let enoent = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(hint_for(&enoent, &unix("/x", UnixKind::Stream)).contains("does not exist"));
    }

    #[test]
    fn unix_stream_path_with_mode_and_owner() {
        let dir = TempDir::new();
        let path = dir.0.join("app.sock");
        let s = bind(&spec(&format!("app=unix:{}", path.display())), &SocketOptions::default()).unwrap();
        check_fd(s.fd.as_fd(), AddressFamily::UNIX, SocketType::STREAM, true);
        assert_eq!(s.local, format!("unix {}", path.display()));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
        let mut client = UnixStream::connect(&path).unwrap();
        let listener = UnixListener::from(s.fd);
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"ok").unwrap();
        let mut buf = [0; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");

        // Root may give the file away; anyone may set their own group.
        let (uid, gid) = if rustix::process::geteuid().is_root() {
            (Some(65534), Some(65534))
        } else {
            (None, Some(rustix::process::getegid().as_raw()))
        };
        let path2 = dir.0.join("private.sock");
        let opts = SocketOptions { unix_mode: Some(0o600), unix_owner: Some((uid, gid)), ..Default::default() };
        let _s2 = bind(&spec(&format!("unix:{}", path2.display())), &opts).unwrap();
        let meta = std::fs::symlink_metadata(&path2).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        if let Some(uid) = uid {
            assert_eq!(meta.uid(), uid);
        }
        assert_eq!(Some(meta.gid()), gid);

        let bad = SocketOptions { unix_mode: Some(0o17777), ..Default::default() };
        let err = bind(&spec(&format!("unix:{}", dir.0.join("bad.sock").display())), &bad).unwrap_err();
        assert!(matches!(err, ListenError::Options { .. }), "{err}");
    }

    #[test]
    fn unix_seqpacket_and_datagram_paths() {
        let dir = TempDir::new();
        let seq = dir.0.join("seq.sock");
        let s = bind(&spec(&format!("seqpacket:{}", seq.display())), &SocketOptions::default()).unwrap();
        check_fd(s.fd.as_fd(), AddressFamily::UNIX, SocketType::SEQPACKET, true);
        assert_eq!(s.local, format!("seqpacket {}", seq.display()));

        let gram = dir.0.join("gram.sock");
        let g = bind(&spec(&format!("unixgram:{}", gram.display())), &SocketOptions::default()).unwrap();
        check_fd(g.fd.as_fd(), AddressFamily::UNIX, SocketType::DGRAM, false);
        assert_eq!(g.local, format!("unixgram {}", gram.display()));
        UnixDatagram::unbound().unwrap().send_to(b"m", &gram).unwrap();
        let mut buf = [0; 2];
        assert_eq!(UnixDatagram::from(g.fd).recv(&mut buf).unwrap(), 1);
    }

    #[test]
    fn unix_abstract_kinds() {
        for (prefix, ty, listening) in [
            ("unix", SocketType::STREAM, true),
            ("seqpacket", SocketType::SEQPACKET, true),
            ("unixgram", SocketType::DGRAM, false),
        ] {
            let name = unique(prefix);
            let s = bind(&spec(&format!("{prefix}:@{name}")), &SocketOptions::default()).unwrap();
            check_fd(s.fd.as_fd(), AddressFamily::UNIX, ty, listening);
            assert_eq!(s.local, format!("{prefix} @{name}"));
            let err = bind(&spec(&format!("{prefix}:@{name}")), &SocketOptions::default()).unwrap_err();
            assert!(err.to_string().contains("pick another name"), "{err}");
        }
    }

    #[test]
    fn stale_socket_replaced_live_socket_and_file_refused() {
        let dir = TempDir::new();
        let path = dir.0.join("s.sock");
        let text = format!("unix:{}", path.display());

        // Left behind by a dead process: the file stays, nobody listens.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let s = bind(&spec(&text), &SocketOptions::default()).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert_eq!(FdKind::of(s.fd.as_fd()).unwrap().to_string(), "a listening Unix stream socket");

        // Still in use by `s`: refused, and `s` keeps its file.
        let err = bind(&spec(&text), &SocketOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&text) && msg.contains("another process listens"), "{msg}");
        UnixStream::connect(&path).unwrap();
        drop(s);

        // A live datagram socket is detected too, even when asked for a stream.
        let gram_path = dir.0.join("g.sock");
        let _gram = UnixDatagram::bind(&gram_path).unwrap();
        let err = bind(&spec(&format!("unix:{}", gram_path.display())), &SocketOptions::default()).unwrap_err();
        assert!(err.to_string().contains("another process listens"), "{err}");

        // A regular file is never deleted.
        let file = dir.0.join("data");
        std::fs::write(&file, "precious").unwrap();
        let err = bind(&spec(&format!("app=unix:{}", file.display())), &SocketOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ListenError::NotASocket { found: "a regular file", .. }), "{err:?}");
        assert!(msg.contains(&file.display().to_string()) && msg.contains("refusing to delete"), "{msg}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

        // Nor is a directory or a symlink (even to a stale socket).
        let err = bind(&spec(&format!("unix:{}", dir.0.display())), &SocketOptions::default()).unwrap_err();
        assert!(matches!(err, ListenError::NotASocket { found: "a directory", .. }), "{err:?}");
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = bind(&spec(&format!("unix:{}", link.display())), &SocketOptions::default()).unwrap_err();
        assert!(matches!(err, ListenError::NotASocket { found: "a symbolic link", .. }), "{err:?}");
    }

    #[test]
    fn missing_directory_is_an_error_with_hint() {
        let dir = TempDir::new();
        let path = dir.0.join("missing").join("app.sock");
        let err = bind(&spec(&format!("unix:{}", path.display())), &SocketOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("create it first"), "{msg}");
        assert!(!dir.0.join("missing").exists());
    }

    #[test]
    fn describe_other_fds() {
        let (r, _w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let d = describe(r.as_fd());
        assert!(d.starts_with(&format!("fd {}: not a socket", r.as_raw_fd())) && d.contains("FIFO"), "{d}");
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(describe(a.as_fd()), "unix (unnamed) (not listening)");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(describe(c.as_fd()), format!("tcp {} (not listening)", c.local_addr().unwrap()));
        assert_eq!(printable(b"a\0b\n"), "a\\u{0}b\\n");
    }
}
