//! Clients of the conformance probe's one-line protocol: `baton-sd-probe
//! --serve NAME` answers each connection with `NAME PID` and closes it.
//! (The HTTP load generator for `baton-httpd` is [`crate::load`].)

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::baton::WAIT;

/// One request to the conformance probe (`baton-sd-probe --serve`): it
/// answers `NAME PID` and closes. The answer trimmed, or what went wrong.
pub fn ask(port: u16) -> Result<String, String> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
    read_answer(s)
}

/// The probe's answer on a connection already made (at most [`WAIT`]);
/// an empty one is an error.
pub fn read_answer(mut s: TcpStream) -> Result<String, String> {
    s.set_read_timeout(Some(WAIT)).map_err(|e| format!("timeout: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    if out.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(out.trim().to_owned())
}

/// Client threads asking the probe in a loop until [`finish`](Self::finish)ed;
/// every failure is kept (a test asserts there were none). For tests whose
/// app must be the probe: the HTTP load generator cannot read its answers.
pub struct ProbeClients {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl ProbeClients {
    /// `clients` threads asking on `port`; an answer that does not start
    /// with `expect` (`""`: any answer) counts as a failure.
    pub fn start(port: u16, clients: usize, expect: &'static str) -> ProbeClients {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let failure = match ask(port) {
                            Ok(a) if a.starts_with(expect) => {
                                served.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Ok(other) => format!("unexpected answer {other:?}"),
                            Err(e) => e,
                        };
                        failures.lock().unwrap_or_else(|e| e.into_inner()).push(failure);
                    }
                })
            })
            .collect();
        ProbeClients { stop, served, failures, threads }
    }

    /// Stops the clients; the requests served and the failures.
    ///
    /// # Panics
    /// If a client thread panicked.
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a probe client thread panicked");
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()));
        (self.served.load(Ordering::Relaxed), failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn ask_reads_the_answer_and_refuses_an_empty_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            first.write_all(b"http 42\n").unwrap();
            drop(first);
            let (second, _) = listener.accept().unwrap();
            drop(second);
        });
        assert_eq!(ask(port), Ok("http 42".to_owned()));
        assert_eq!(ask(port), Err("closed without an answer".to_owned()));
        server.join().unwrap();
    }

    #[test]
    fn clients_count_answers_and_keep_failures() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients = ProbeClients::start(port, 1, "http ");
        // Two good answers, one wrong one; the clients are stopped while
        // the listener still accepts (it is dropped only after `finish`).
        for answer in [&b"http 1\n"[..], b"http 2\n", b"other 3\n"] {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(answer).unwrap();
        }
        let stopper = std::thread::spawn(move || clients.finish());
        // Whatever the clients still ask until they see the stop: answered.
        listener.set_nonblocking(true).unwrap();
        while !stopper.is_finished() {
            if let Ok((mut conn, _)) = listener.accept() {
                let _ = conn.write_all(b"http 9\n");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (served, failures) = stopper.join().unwrap();
        assert!(served >= 2, "{served}");
        assert_eq!(failures, ["unexpected answer \"other 3\""]);
    }
}
