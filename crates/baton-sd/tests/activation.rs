//! Socket activation in a real child process: sockets placed at fds 3.., the
//! `LISTEN_*` variables set, `LISTEN_PID` the child's own pid. The child is
//! the `listen_report` example, which prints what `ListenFds` made of it.

mod common;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

use common::{Spawn, TempDir, line, run};

/// A child activated with `fds` named `names` (`None`: `LISTEN_FDNAMES`
/// unset), `LISTEN_PID` its own pid.
fn activated<'a>(fds: &[BorrowedFd<'a>], names: Option<&str>) -> Spawn<'a> {
    let spawn =
        Spawn::new().fds(fds.iter().copied()).env("LISTEN_FDS", fds.len().to_string()).own_pid_var("LISTEN_PID");
    match names {
        Some(n) => spawn.env("LISTEN_FDNAMES", n),
        None => spawn,
    }
}

fn tcp_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind TCP listener")
}

fn udp_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind UDP socket")
}

#[test]
fn a_named_tcp_listener_is_taken_by_name() {
    let http = tcp_listener();
    let lines = run(activated(&[http.as_fd()], Some("http"))
        .args(["names", "cloexec", "3", "take-tcp", "http", "take-tcp", "http", "take-tcp", "0", "names"]));
    // The fd arrives without FD_CLOEXEC, from_env sets it.
    assert_eq!(line(&lines, "before 3"), "before 3 no");
    assert_eq!(line(&lines, "before 4"), "before 4 closed");
    assert_eq!(line(&lines, "from_env"), "from_env ok len=1 other_pid=None");
    assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 yes");
    let takes: Vec<&String> = lines.iter().filter(|l| l.starts_with("take-tcp")).collect();
    assert_eq!(takes, ["take-tcp http: ok fd=3 cloexec=yes", "take-tcp http: none", "take-tcp 0: none"]);
    let names: Vec<&String> = lines.iter().filter(|l| l.starts_with("name ")).collect();
    assert_eq!(names, ["name 3 http true", "name 3 http false"]);
}

#[test]
fn the_probe_listener_is_taken_in_one_call_and_only_if_it_listens() {
    let (http, probe) = (tcp_listener(), tcp_listener());
    let lines = run(activated(&[http.as_fd(), probe.as_fd()], Some("http:probe")).args(["take-probe", "take-probe"]));
    let takes: Vec<&String> = lines.iter().filter(|l| l.starts_with("take-probe")).collect();
    assert_eq!(takes, ["take-probe probe: ok fd=4 cloexec=yes", "take-probe probe: none"]);
    // Not a listener under that name: refused, not taken.
    let udp = udp_socket();
    let lines = run(activated(&[udp.as_fd()], Some("probe")).args(["take-probe"]));
    let take = line(&lines, "take-probe");
    assert!(take.starts_with("take-probe probe: err ") && take.contains("listening TCP"), "{take}");
}

#[test]
fn four_kinds_by_index_and_by_name() {
    let dir = TempDir::new("kinds");
    let web = tcp_listener();
    let dns = udp_socket();
    let ctl = UnixListener::bind(dir.path().join("ctl")).expect("bind unix listener");
    let log = UnixDatagram::bind(dir.path().join("log")).expect("bind unix datagram");
    let fds = [web.as_fd(), dns.as_fd(), ctl.as_fd(), log.as_fd()];
    let lines = run(activated(&fds, Some("web:dns:ctl:log")).args([
        "take-udp",
        "1",
        "take-unix-listener",
        "ctl",
        "take-unix-datagram",
        "3",
        "take-tcp",
        "web",
        "take-udp",
        "1",
        "names",
    ]));
    assert_eq!(line(&lines, "from_env"), "from_env ok len=4 other_pid=None");
    for fd in 3..=6 {
        assert_eq!(line(&lines, &format!("before {fd}")), format!("before {fd} no"));
    }
    let takes: Vec<&String> = lines.iter().filter(|l| l.starts_with("take-")).collect();
    assert_eq!(
        takes,
        [
            "take-udp 1: ok fd=4 cloexec=yes",
            "take-unix-listener ctl: ok fd=5 cloexec=yes",
            "take-unix-datagram 3: ok fd=6 cloexec=yes",
            "take-tcp web: ok fd=3 cloexec=yes",
            "take-udp 1: none",
        ]
    );
    let names: Vec<&String> = lines.iter().filter(|l| l.starts_with("name ")).collect();
    assert_eq!(names, ["name 3 web false", "name 4 dns false", "name 5 ctl false", "name 6 log false"]);
}

#[test]
fn without_fdnames_every_fd_is_unknown() {
    let (a, b) = (tcp_listener(), udp_socket());
    let lines = run(activated(&[a.as_fd(), b.as_fd()], None)
        .args(["names", "take-fd", "unknown", "take-fd", "unknown", "take-fd", "unknown"]));
    let names: Vec<&String> = lines.iter().filter(|l| l.starts_with("name ")).collect();
    assert_eq!(names, ["name 3 unknown true", "name 4 unknown true"]);
    let takes: Vec<&String> = lines.iter().filter(|l| l.starts_with("take-fd")).collect();
    assert_eq!(
        takes,
        ["take-fd unknown: ok fd=3 cloexec=yes", "take-fd unknown: ok fd=4 cloexec=yes", "take-fd unknown: none"]
    );
}

#[test]
fn stored_entries_are_taken_by_prefix() {
    let (l, c1, c2) = (tcp_listener(), udp_socket(), udp_socket());
    let fds = [l.as_fd(), c1.as_fd(), c2.as_fd()];
    let lines = run(activated(&fds, Some("listen/http:conn/10/1:conn/10/2")).args(["take-matching", "conn/", "names"]));
    let matching: Vec<&String> = lines.iter().filter(|l| l.starts_with("matching")).collect();
    assert_eq!(matching, ["matching conn/10/1 fd=4 cloexec=yes", "matching conn/10/2 fd=5 cloexec=yes"]);
    assert_eq!(line(&lines, "name 3"), "name 3 listen/http true");
}

#[test]
fn the_wrong_kind_is_refused_and_the_fd_stays_available() {
    let http = udp_socket();
    let lines = run(activated(&[http.as_fd()], Some("http")).args([
        "take-tcp",
        "http",
        "take-unix-stream",
        "0",
        "take-tcp-stream",
        "http",
        "take-udp",
        "http",
    ]));
    let takes: Vec<&String> = lines.iter().filter(|l| l.starts_with("take-")).collect();
    assert_eq!(
        takes,
        [
            "take-tcp http: err fd 3 'http' is a UDP socket, expected a listening TCP socket",
            "take-unix-stream 0: err fd 3 'http' is a UDP socket, expected a connected Unix stream socket",
            "take-tcp-stream http: err fd 3 'http' is a UDP socket, expected a connected TCP socket",
            "take-udp http: ok fd=3 cloexec=yes",
        ]
    );
}

#[test]
fn connected_sockets_and_files_are_told_apart() {
    let listener = tcp_listener();
    let conn = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let file = std::fs::File::open("/dev/null").expect("open /dev/null");
    let fds = [conn.as_fd(), file.as_fd(), listener.as_fd()];
    let lines = run(activated(&fds, Some("conn:null:http")).args([
        "take-tcp",
        "conn",
        "take-tcp-stream",
        "conn",
        "take-udp",
        "null",
        "take-fd",
        "null",
        "take-tcp-stream",
        "http",
    ]));
    let takes: Vec<&String> = lines.iter().filter(|l| l.starts_with("take-")).collect();
    assert_eq!(
        takes,
        [
            "take-tcp conn: err fd 3 'conn' is a connected TCP socket, expected a listening TCP socket",
            "take-tcp-stream conn: ok fd=3 cloexec=yes",
            "take-udp null: err fd 4 'null' is a character device, expected a UDP socket",
            "take-fd null: ok fd=4 cloexec=yes",
            "take-tcp-stream http: err fd 5 'http' is a listening TCP socket, expected a connected TCP socket",
        ]
    );
    drop(accepted);
}

#[test]
fn a_foreign_listen_pid_takes_nothing() {
    let http = tcp_listener();
    let parent = std::process::id();
    let mut child = Spawn::new()
        .fds([http.as_fd()])
        .env("LISTEN_PID", parent.to_string())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http")
        .args(["cloexec", "3", "take-tcp", "0", "take-fd", "http", "names"])
        .spawn();
    let child_pid = child.pid();
    let from_env = child.wait_line(|l| l.starts_with("from_env"));
    assert_eq!(from_env, format!("from_env ok len=0 other_pid=Some(({parent}, {child_pid}))"));
    let (lines, code) = child.finish();
    assert_eq!(code, Some(0));
    // fd 3 is left exactly as it was: open, FD_CLOEXEC still clear.
    assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
    assert_eq!(line(&lines, "take-tcp 0"), "take-tcp 0: none");
    assert_eq!(line(&lines, "take-fd http"), "take-fd http: none");
    assert!(!lines.iter().any(|l| l.starts_with("name ")), "{lines:?}");
}

/// `LISTEN_PIDFDID` (systemd ≥ 259) naming another process (here: the
/// test's own pidfd id) next to the child's own `LISTEN_PID`: the pid was
/// reused, nothing is taken. Only on kernels with pidfs, where the child
/// can know its own id; without it `LISTEN_PID` alone decides (the
/// `listen_pidfd_id_decides_next_to_listen_pid` property covers both).
#[test]
fn a_foreign_listen_pidfd_id_takes_nothing() {
    let Some(ours) = baton_sd::pidfs::own_pidfd_id() else {
        eprintln!("no pidfs on this kernel: LISTEN_PIDFDID cannot be checked, skipping");
        return;
    };
    let http = tcp_listener();
    let mut child = activated(&[http.as_fd()], Some("http"))
        .env("LISTEN_PIDFDID", ours.to_string())
        .args(["--unset", "cloexec", "3", "take-tcp", "0", "env"])
        .spawn();
    let child_pid = child.pid();
    let from_env = child.wait_line(|l| l.starts_with("from_env"));
    assert_eq!(from_env, format!("from_env ok len=0 other_pid=Some(({child_pid}, {child_pid}))"));
    let (lines, code) = child.finish();
    assert_eq!(code, Some(0));
    assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no", "fd 3 must stay untouched");
    assert_eq!(line(&lines, "take-tcp 0"), "take-tcp 0: none");
    // from_env_and_unset clears it with the others.
    assert_eq!(line(&lines, "env LISTEN_PIDFDID"), "env LISTEN_PIDFDID <unset>");
}

#[test]
fn garbage_in_listen_pidfdid_is_an_error_naming_it() {
    let http = tcp_listener();
    for bad in ["abc", "-1", "", " 1", "18446744073709551616"] {
        let lines = run(activated(&[http.as_fd()], Some("http")).env("LISTEN_PIDFDID", bad).args(["cloexec", "3"]));
        let err = line(&lines, "from_env");
        assert!(err.contains(&format!("LISTEN_PIDFDID={bad:?}")), "{bad:?}: {err}");
        assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
    }
}

#[test]
fn garbage_in_listen_fds_is_an_error_naming_it() {
    let http = tcp_listener();
    for bad in ["abc", "0", "-1", "", " 1", "+1", "1x", "2147483645", "99999999999999999999"] {
        let spawn = Spawn::new().fds([http.as_fd()]).env("LISTEN_FDS", bad).own_pid_var("LISTEN_PID");
        let lines = run(spawn.args(["cloexec", "3"]));
        let err = line(&lines, "from_env");
        assert!(err.starts_with("from_env err "), "{bad:?}: {err}");
        assert!(err.contains(&format!("LISTEN_FDS={bad:?}")), "{bad:?}: {err}");
        assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no", "{bad:?}: fd 3 must stay untouched");
    }
}

#[test]
fn garbage_in_listen_pid_is_an_error_naming_it() {
    let http = tcp_listener();
    for bad in ["abc", "0", "-5", "", "2147483648"] {
        let spawn = Spawn::new().fds([http.as_fd()]).env("LISTEN_PID", bad).env("LISTEN_FDS", "1");
        let lines = run(spawn.args(["cloexec", "3"]));
        let err = line(&lines, "from_env");
        assert!(err.contains(&format!("LISTEN_PID={bad:?}")), "{bad:?}: {err}");
        assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
    }
}

#[test]
fn a_name_count_mismatch_is_an_error() {
    let (a, b) = (tcp_listener(), udp_socket());
    for names in ["one", "a:b:c", ""] {
        let lines = run(activated(&[a.as_fd(), b.as_fd()], Some(names)).args(["cloexec", "3", "cloexec", "4"]));
        let err = line(&lines, "from_env");
        assert!(err.starts_with("from_env err LISTEN_FDNAMES="), "{names:?}: {err}");
        assert!(err.contains("LISTEN_FDS=2"), "{names:?}: {err}");
        assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
        assert_eq!(line(&lines, "cloexec 4"), "cloexec 4 no");
    }
}

#[test]
fn a_promised_fd_that_is_not_open_is_an_error_and_nothing_is_taken() {
    let (a, b) = (tcp_listener(), udp_socket());
    let spawn = Spawn::new()
        .fds([a.as_fd(), b.as_fd()])
        .env("LISTEN_FDS", "3")
        .env("LISTEN_FDNAMES", "a:b:c")
        .own_pid_var("LISTEN_PID");
    let lines = run(spawn.args(["cloexec", "3", "cloexec", "4", "from-env"]));
    assert_eq!(line(&lines, "before 5"), "before 5 closed");
    let err = line(&lines, "from_env");
    assert!(err.starts_with("from_env err LISTEN_FDS=3 promises fd 5, but it is not open"), "{err}");
    // The check runs before anything is touched.
    assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
    assert_eq!(line(&lines, "cloexec 4"), "cloexec 4 no");
    // Nothing was taken, so the next call checks again.
    assert!(line(&lines, "again").starts_with("again err LISTEN_FDS=3 promises fd 5"), "{lines:?}");
}

#[test]
fn a_huge_listen_fds_without_names_fails_fast_at_the_first_closed_fd() {
    // Without LISTEN_FDNAMES every fd gets a name; this must not build two
    // billion of them before noticing fd 4 is not open.
    let a = tcp_listener();
    let spawn = Spawn::new().fds([a.as_fd()]).env("LISTEN_FDS", "2147483644").own_pid_var("LISTEN_PID");
    let lines = run(spawn.args(["cloexec", "3"]));
    let err = line(&lines, "from_env");
    assert!(err.starts_with("from_env err LISTEN_FDS=2147483644 promises fd 4, but it is not open"), "{err}");
    assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
}

#[test]
fn only_the_first_from_env_gets_the_fds() {
    let http = tcp_listener();
    let lines = run(activated(&[http.as_fd()], Some("http")).args(["from-env", "take-tcp", "http"]));
    assert_eq!(line(&lines, "from_env"), "from_env ok len=1 other_pid=None");
    assert_eq!(line(&lines, "again"), "again ok len=0");
    assert_eq!(line(&lines, "take-tcp http"), "take-tcp http: ok fd=3 cloexec=yes");
}

#[test]
fn from_env_leaves_the_environment_and_from_env_and_unset_clears_it() {
    let http = tcp_listener();
    let lines = run(activated(&[http.as_fd()], Some("http")).args(["env"]));
    let child_pid = line(&lines, "env LISTEN_PID ").strip_prefix("env LISTEN_PID ").unwrap().to_owned();
    assert!(child_pid.parse::<u32>().is_ok(), "{lines:?}");
    assert_eq!(line(&lines, "env LISTEN_FDS"), "env LISTEN_FDS 1");
    assert_eq!(line(&lines, "env LISTEN_FDNAMES"), "env LISTEN_FDNAMES http");

    let lines = run(activated(&[http.as_fd()], Some("http")).args(["--unset", "env", "take-tcp", "http"]));
    assert_eq!(line(&lines, "from_env"), "from_env ok len=1 other_pid=None");
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert_eq!(line(&lines, &format!("env {var} ")), format!("env {var} <unset>"));
    }
    assert_eq!(line(&lines, "take-tcp http"), "take-tcp http: ok fd=3 cloexec=yes");

    // Unset whatever the outcome, errors included.
    let spawn = Spawn::new().fds([http.as_fd()]).env("LISTEN_FDS", "abc").own_pid_var("LISTEN_PID");
    let lines = run(spawn.args(["--unset", "env"]));
    assert!(line(&lines, "from_env").starts_with("from_env err"), "{lines:?}");
    assert_eq!(line(&lines, "env LISTEN_FDS"), "env LISTEN_FDS <unset>");
}

#[test]
fn not_activated_without_the_variables() {
    let http = tcp_listener();
    let lines = run(Spawn::new().fds([http.as_fd()]).args(["take-tcp", "0", "cloexec", "3"]));
    assert_eq!(line(&lines, "from_env"), "from_env ok len=0 other_pid=None");
    assert_eq!(line(&lines, "take-tcp 0"), "take-tcp 0: none");
    assert_eq!(line(&lines, "cloexec 3"), "cloexec 3 no");
}

#[cfg(feature = "tokio")]
#[test]
fn a_tokio_listener_taken_in_a_runtime_accepts_a_real_connection() {
    use std::io::BufRead as _;
    let http = tcp_listener();
    let addr = http.local_addr().unwrap();
    let mut child = activated(&[http.as_fd()], Some("http")).args(["tokio-accept", "http"]).spawn();
    drop(http);
    child.wait_line(|l| l == "tokio-accept http: listening");
    let conn = TcpStream::connect(addr).expect("connect to the child's listener");
    conn.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let mut greeting = String::new();
    std::io::BufReader::new(&conn).read_line(&mut greeting).expect("read greeting");
    assert_eq!(greeting, "hello\n");
    child.wait_line(|l| l == "tokio-accept http: accepted");
    let (_, code) = child.finish();
    assert_eq!(code, Some(0));
}

#[cfg(feature = "tokio")]
#[test]
fn a_tokio_take_outside_a_runtime_is_an_error_not_a_panic() {
    let http = tcp_listener();
    let lines = run(activated(&[http.as_fd()], Some("http")).args(["tokio-no-runtime", "http", "take-tcp", "http"]));
    assert_eq!(
        line(&lines, "tokio-no-runtime"),
        "tokio-no-runtime http: err fd 3 'http': a tokio socket can only be created inside a tokio runtime"
    );
    assert_eq!(line(&lines, "take-tcp http"), "take-tcp http: ok fd=3 cloexec=yes");

    // The same without any fds, in this process: nothing to take, still no panic.
    let err = baton_sd::ListenFds::empty().take_tokio_tcp_listener(0).unwrap_err();
    assert!(matches!(err, baton_sd::ActivationError::NoRuntime { .. }), "{err}");
}
