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
//! - [`bind_sibling`]: a second socket in a socket's `SO_REUSEPORT` group,
//!   for [`steering`](crate::steering).

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
    /// `SO_REUSEPORT` on IP sockets (`ReusePort=`), before `bind()`: the
    /// socket may join a group other sockets of this user already have.
    pub reuse_port: bool,
    /// Make IP sockets steerable (`crate::steering`; [`bind_sibling`] can
    /// then join their group): `SO_REUSEPORT` on a TCP listener only after
    /// `bind()`, just before `listen()`, so the bind still fails with
    /// `EADDRINUSE` on a port in use, the listener founds its reuseport
    /// group (index 0) and a sibling listening next is index 1; on UDP
    /// sockets before `bind()` (their group forms there).
    pub steerable: bool,
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
    if opts.reuse_port || (opts.steerable && ty != SocketType::STREAM) {
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
        if opts.steerable && !opts.reuse_port {
            sockopt::set_socket_reuseport(&fd, true).map_err(setup_error(spec, "setsockopt(SO_REUSEPORT)"))?;
        }
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

mod sibling;
pub use sibling::bind_sibling;

#[cfg(test)]
mod tests;
