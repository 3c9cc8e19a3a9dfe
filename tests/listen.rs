//! `baton::listen` across a real exec: sockets bound by [`bind`] are passed
//! to a child process at fds 3.. with `LISTEN_*`, exactly as systemd or a
//! parent Baton would pass them, and the child takes them with
//! `ListenFds::from_env` + [`inherit`].
//!
//! The child is this test binary itself, re-executed to run only
//! [`child_helper_for_inherit`] with [`CHILD_ENV`] set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use baton::listen::{BoundSocket, ListenSpec, SocketOptions, bind, inherit};
use baton_sd::ListenFds;

/// Set in the re-executed child; tells [`child_helper_for_inherit`] to act.
const CHILD_ENV: &str = "BATON_LISTEN_TEST_CHILD";

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(120);

/// Not a test on its own: the child half of [`inherited_sockets_survive_exec`],
/// which runs it in a fresh process with `LISTEN_*` set. Elsewhere it returns
/// at once.
#[test]
fn child_helper_for_inherit() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let mut fds = ListenFds::from_env().expect("ListenFds::from_env");
    let got = inherit(&mut fds).expect("inherit");
    let mut out = std::io::stdout().lock();
    writeln!(out, "CHILD pid {}", std::process::id()).unwrap();
    for s in &got {
        writeln!(out, "CHILD inherited {} {} {}", s.fd.as_raw_fd(), s.name, s.local).unwrap();
    }
    for (raw, name, available) in fds.names() {
        if available {
            writeln!(out, "CHILD left {raw} {name}").unwrap();
        }
    }
    out.flush().unwrap();
    // Serve the connection that was made before this process existed.
    if let Some(web) = got.iter().find(|s| s.name == "web") {
        let listener = std::net::TcpListener::from(web.fd.try_clone().unwrap());
        let (mut conn, _) = listener.accept().unwrap();
        write!(conn, "served by {}", std::process::id()).unwrap();
    }
}

fn bound(text: &str) -> BoundSocket {
    let spec: ListenSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
    bind(&spec, &SocketOptions::default()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn inherited_sockets_survive_exec() {
    let dir = TempDir(std::env::temp_dir().join(format!("baton-listen-inherit-{}", std::process::id())));
    std::fs::create_dir(&dir.0).unwrap();
    let abstract_name = format!("baton-listen-inherit-{}", std::process::id());

    let web = bound("web=127.0.0.1:0");
    let dns = bound("dns=udp:127.0.0.1:0");
    let app = bound(&format!("app=unix:{}", dir.0.join("app.sock").display()));
    let logs = bound(&format!("logs=unixgram:@{abstract_name}"));
    // Not for `inherit`: a pipe (fd-store state) and a connected stream
    // socket (a stored connection).
    let (state, _state_writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let (conn, _conn_peer) = UnixStream::pair().unwrap();

    let passed: Vec<(&str, OwnedFd)> = vec![
        ("web", web.fd.try_clone().unwrap()),
        ("state", state.try_clone().unwrap()),
        ("dns", dns.fd.try_clone().unwrap()),
        ("conn/1/2", conn.as_fd().try_clone_to_owned().unwrap()),
        ("app", app.fd.try_clone().unwrap()),
        ("logs", logs.fd.try_clone().unwrap()),
    ];
    // Copies above every target number, so the dup2 calls in the child
    // never overwrite a source; CLOEXEC, so they vanish at exec.
    let high: Vec<OwnedFd> = passed.iter().map(|(_, fd)| rustix::io::fcntl_dupfd_cloexec(fd, 100).unwrap()).collect();
    let high_raw: Vec<i32> = high.iter().map(|fd| fd.as_raw_fd()).collect();
    let names: Vec<&str> = passed.iter().map(|(n, _)| *n).collect();

    // This connection waits in the backlog: no process accepts yet.
    let web_addr = SocketAddr::try_from(rustix::net::getsockname(&web.fd).unwrap()).unwrap();
    let mut client = TcpStream::connect(web_addr).unwrap();

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        // LISTEN_PID must be the pid that execs the test binary: the shell's.
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child_helper_for_inherit", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("LISTEN_FDS", passed.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .stdout(Stdio::piped());
    // SAFETY: the closure only calls dup2, which is async-signal-safe, and
    // reads errno on failure; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &raw) in high_raw.iter().enumerate() {
                // dup2 leaves FD_CLOEXEC clear on the target, so it survives exec.
                if libc::dup2(raw, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(high);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = BufReader::new(stdout).lines().map_while(Result::ok).collect();
        let _ = tx.send(lines);
    });
    let lines = match rx.recv_timeout(WAIT) {
        Ok(lines) => lines,
        Err(_) => {
            let _ = child.kill();
            panic!("child did not finish within {WAIT:?}");
        }
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}; output: {lines:#?}");
    // The harness prints "test child_helper_for_inherit ... " without a
    // newline before the test's own output.
    let report: Vec<&str> = lines.iter().filter_map(|l| l.split_once("CHILD ").map(|(_, r)| r)).collect();
    let child_pid = report.iter().find_map(|l| l.strip_prefix("pid ")).expect("child reported its pid");

    let expected = vec![
        format!("pid {child_pid}"),
        format!("inherited 3 web {}", web.local),
        format!("inherited 5 dns {}", dns.local),
        format!("inherited 7 app {}", app.local),
        format!("inherited 8 logs {}", logs.local),
        "left 4 state".to_owned(),
        "left 6 conn/1/2".to_owned(),
    ];
    assert_eq!(report, expected, "full output: {lines:#?}");
    assert_eq!(logs.local, format!("unixgram @{abstract_name}"));

    // The connection made before the child existed was served by it.
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("served by {child_pid}"));
}
