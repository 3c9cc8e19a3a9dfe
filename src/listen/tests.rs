//! Unit tests of [`super`]: real sockets, paths and fds.

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
