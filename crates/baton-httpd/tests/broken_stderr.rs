//! A generation outlives its supervisor's output pipe: under `baton run`,
//! stderr is a pipe to Baton, and when Baton is killed that pipe breaks
//! while the server still has requests to finish. Logging must then fail
//! silently instead of taking the server down (tracing-subscriber's default
//! is to report its own write errors with `eprintln!`, which panics).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_testbed::{free_loopback_port, unique_temp_dir};

#[test]
fn a_broken_stderr_pipe_neither_kills_serving_nor_draining() {
    let root = unique_temp_dir("baton-httpd-broken-stderr", "root");
    std::fs::write(root.join("index.html"), "hi\n").unwrap();
    let port = free_loopback_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton-httpd"))
        .args(["--root", root.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for its first log line ("serving on ..."), then break the pipe.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("serving on"), "{line}");
    drop(stderr);

    // Requests log (at debug) into the broken pipe and are still answered.
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // Draining logs too; the server must still exit cleanly.
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "baton-httpd did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}: logging into a broken pipe must not crash the server");
}
